"""Test helpers: a corpus of malformed inputs, plus writers for small valid PNG / DICOM / NIfTI files.

Shared by ``tests/test_io.py``, ``tests/test_datasets.py`` and the audit tests. Import it as::

    try:
        from malformed import write_malformed_corpus, MALFORMED_EXPECTATIONS, tree_snapshot
    except ImportError:  # tests/ made into a package
        from tests.malformed import write_malformed_corpus, MALFORMED_EXPECTATIONS, tree_snapshot

``write_malformed_corpus(folder)`` writes every item flat into ``folder``. What each one should do
is in :data:`MALFORMED_EXPECTATIONS` (keyed by file name):

* ``"error"``    -- ``covidlib.io.read_image`` raises ``ImageReadError`` (with a reason);
* ``"unusable"`` -- it decodes, but ``covidlib.io.image_problem`` flags it (1x1, blank), so ingest
  quarantines it;
* ``"ok"``       -- it is a valid image under a misleading name and must read fine (a PNG saved as
  ``.bmp``: decoding goes by content, not by extension).
"""
from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np

# name -> expected outcome; items that the platform cannot create (symlinks on some Windows set-ups,
# permissions when running as root) are left out of the returned list.
MALFORMED_EXPECTATIONS: dict[str, str] = {
    "empty.png": "error",
    "leer datei ü.jpg": "error",  # zero bytes, space and non-ASCII in the name
    "truncated.png": "error",
    "truncated.jpg": "error",
    "jpeg_header_only.jpg": "error",
    "text_file.jpg": "error",
    "html_error_page.png": "error",
    "random_bytes.tif": "error",
    "bad_crc.png": "error",
    "zero_width.png": "error",
    "bomb_100000x100000.png": "error",
    "not_dicom.dcm": "error",
    "dicom_no_pixels.dcm": "error",
    "dicom_short_pixels.dcm": "error",
    "corrupt.nii.gz": "error",
    "empty.nii": "error",
    "folder_named_like.png": "error",  # a directory
    "broken_link.png": "error",
    "no_read_permission.png": "error",
    "tiny_1x1.png": "unusable",
    "all_black.png": "unusable",
    "png_named.bmp": "ok",
}


def _png_bytes(img: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _texture(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = 100 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + rng.normal(0, 10, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: str | os.PathLike, img: np.ndarray) -> Path:
    """Write an image with cv2 to any path (non-ASCII too); format from the extension."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix.lower(), img)
    assert ok, path
    buf.tofile(str(path))
    return path


def write_ct_dicom(
    path: str | os.PathLike,
    hu: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = -2048.0,
    z: float = 0.0,
    instance: int = 1,
    series_uid: str | None = None,
    patient_id: str = "P001",
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    with_pixels: bool = True,
    pixel_bytes: bytes | None = None,
) -> Path:
    """Write a small uncompressed single-frame DICOM: stored = (hu - intercept) / slope (uint16)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hu = np.asarray(hu, dtype=np.float64)
    stored = np.rint((hu - intercept) / slope)
    assert stored.min() >= 0 and stored.max() < 65536, "choose slope/intercept so values fit uint16"
    stored = stored.astype(np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.InstanceNumber = int(instance)
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    if with_pixels:
        ds.PixelData = stored.tobytes() if pixel_bytes is None else pixel_bytes
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write a NIfTI volume (float32 values taken as HU)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    nib.save(nib.Nifti1Image(np.asarray(volume, dtype=np.float32), aff), str(path))
    return path


def write_malformed_corpus(folder: str | os.PathLike) -> list[Path]:
    """Write >= 15 distinct malformed inputs flat into ``folder``; return their paths.

    See :data:`MALFORMED_EXPECTATIONS` for what each should do. Nothing outside ``folder`` is
    touched; ``folder`` is created if needed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []

    def put(name: str, data: bytes) -> None:
        p = folder / name
        p.write_bytes(data)
        out.append(p)

    good = _png_bytes(_texture())
    import cv2

    ok, jpg = cv2.imencode(".jpg", _texture(128, seed=1))
    jpg = jpg.tobytes()

    put("empty.png", b"")
    put("leer datei ü.jpg", b"")
    put("truncated.png", good[: len(good) // 2])
    put("truncated.jpg", jpg[: int(len(jpg) * 0.7)])
    put("jpeg_header_only.jpg", jpg[:20])
    put("text_file.jpg", b"this is not an image, it is a note someone saved with a .jpg name\n" * 3)
    put(
        "html_error_page.png",
        b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>"
        b"<body><h1>Access denied</h1><p>Please log in to download this file.</p></body></html>\n",
    )
    put("random_bytes.tif", np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    # Flip bytes inside the IDAT chunk: CRC and zlib stream both break.
    idat = good.index(b"IDAT")
    bad = bytearray(good)
    for k in range(idat + 8, min(idat + 40, len(bad) - 12)):
        bad[k] ^= 0xA5
    put("bad_crc.png", bytes(bad))
    sig = b"\x89PNG\r\n\x1a\n"
    put(
        "zero_width.png",
        sig + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 64, 8, 0, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 65)) + _png_chunk(b"IEND", b""),
    )
    # Header claims 100000 x 100000 (10 Gpx); the payload is tiny. A reader must refuse by the
    # header instead of allocating 10 GB.
    put(
        "bomb_100000x100000.png",
        sig + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + _png_chunk(b"IEND", b""),
    )
    put("not_dicom.dcm", b"Patient: anonymous\nThis is a text export, not DICOM.\n" * 4)
    p = write_ct_dicom(folder / "dicom_no_pixels.dcm", np.zeros((8, 8)), with_pixels=False)
    out.append(p)
    p = write_ct_dicom(folder / "dicom_short_pixels.dcm", np.zeros((32, 32)), pixel_bytes=b"\x00\x01" * 40)
    out.append(p)
    put("corrupt.nii.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + b"garbage that is not deflate" * 10)
    put("empty.nii", b"")
    d = folder / "folder_named_like.png"
    d.mkdir(exist_ok=True)
    out.append(d)
    try:
        link = folder / "broken_link.png"
        if os.path.lexists(link):
            link.unlink()
        link.symlink_to(folder / "does_not_exist_target.png")
        out.append(link)
    except (OSError, NotImplementedError):
        pass
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads anything
        p = folder / "no_read_permission.png"
        p.write_bytes(good)
        p.chmod(0)
        out.append(p)
    put("tiny_1x1.png", _png_bytes(np.full((1, 1), 128, np.uint8)))
    put("all_black.png", _png_bytes(np.zeros((64, 64), np.uint8)))
    put("png_named.bmp", good)
    return out


def tree_snapshot(folder: str | os.PathLike) -> dict[str, tuple]:
    """Content hash, size, mode and mtime of every entry under ``folder`` (links not followed).

    Compare two snapshots to prove that nothing on disk changed.
    """
    folder = Path(folder)
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                snap[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif p.is_dir():
                snap[rel] = ("dir", tuple(sorted(os.listdir(p))), st.st_mtime_ns, st.st_mode)
            else:
                try:
                    digest = hashlib.sha256(p.read_bytes()).hexdigest()
                except PermissionError:
                    digest = "unreadable"
                snap[rel] = ("file", digest, st.st_size, st.st_mtime_ns, st.st_mode)
    return snap
