"""Test helpers: a corpus of malformed inputs, plus writers for small valid PNG / DICOM / NIfTI files.

Shared by ``tests/test_images.py``, ``tests/test_datasets.py`` and the audit tests. Import it as::

    try:
        from malformed import write_malformed_corpus, MALFORMED_EXPECTATIONS, tree_snapshot
    except ImportError:  # tests/ made into a package
        from tests.malformed import write_malformed_corpus, MALFORMED_EXPECTATIONS, tree_snapshot

``write_malformed_corpus(folder)`` writes every item flat into ``folder``. What each one should do
is in :data:`MALFORMED_EXPECTATIONS` (keyed by file name):

* ``"error"``    -- ``covidlib.images.read_image`` raises ``ImageReadError`` (with a reason);
* ``"unusable"`` -- it decodes, but ``covidlib.images.image_problem`` flags it (1x1, blank), so ingest
  quarantines it;
* ``"ok"``       -- it is a valid image under a misleading name and must read fine (a PNG saved as
  ``.bmp``: decoding goes by content, not by extension).

:data:`MALFORMED_REASONS` gives the reason some of them must be refused with (decompression bombs in
every format, a truncated JPEG with its end marker put back, 1x1 / 1x4000 / blank images). The
20000 x 20000 TIFF bombs are under OpenCV's default cap (2**30 pixels): they are refused only where
covidlib's cap (2**27) is in force, i.e. where covidlib was imported before cv2.

:data:`SAFETY_CASES` (issue #13) is the corpus of commands that must not destroy or pollute data:
each case writes its inputs, runs a ``covidlib`` command line, and names the one-line error (or the
reason reported in the predictions / failure list / audit) and the inputs whose bytes must not
change. ``tests/test_safety.py`` runs them. Every file is built here; none is over ~70 kB.
"""
from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
    # Issue #13: every format capped from its header, and what decodes "fine" but is not a scan.
    "bigtiff_bomb_20000x20000.tif": "error",
    "tiff_ifd_at_end_20000x20000.tif": "error",
    "dicom_rle_bomb_20000x20000.dcm": "error",
    "nifti_bomb_2048x2048x300.nii": "error",
    "truncated_eoi_appended.jpg": "error",
    "tiny_1x4000.png": "unusable",
}

#: file name -> regex that the reason (``ImageReadError.reason`` from ``read_image`` /
#: ``read_volume``, or ``image_problem``) must match: the reason names the real problem.
#: The raster bombs are refused by OpenCV's own cap (``OPENCV_IO_MAX_IMAGE_PIXELS``), which reads
#: the header and does not say the declared size, only that it is over the cap.
_OVER_THE_CAP = r"image dimensions exceed the cap of [\d,]+ pixels \(OPENCV_IO_MAX_IMAGE_PIXELS"
MALFORMED_REASONS: dict[str, str] = {
    "bomb_100000x100000.png": _OVER_THE_CAP,
    "bigtiff_bomb_20000x20000.tif": _OVER_THE_CAP,
    "tiff_ifd_at_end_20000x20000.tif": _OVER_THE_CAP,
    "dicom_rle_bomb_20000x20000.dcm": r"DICOM header declares 20000x20000 = 400,000,000 pixels \(800\.0 MB decoded\), over the cap",
    "nifti_bomb_2048x2048x300.nii": r"NIfTI header declares 2048x2048x300 = .*GB decoded.*over the cap",
    "truncated_eoi_appended.jpg": r"truncated JPEG",
    "tiny_1x1.png": r"too small",
    "tiny_1x4000.png": r"too small \(4000x1 px",
    "all_black.png": r"blank image",
}

#: Corpus files that are volumes: ``read_volume`` gives their reason (``read_image`` refuses all
#: NIfTI files as "not one image").
MALFORMED_VOLUMES = ("nifti_bomb_2048x2048x300.nii", "corrupt.nii.gz", "empty.nii")


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


def _tiff_entry(big: bool, tag: int, typ: int, value: int) -> bytes:
    if big:  # BigTIFF: tag, type, count (8 bytes), value (8 bytes)
        return struct.pack("<HHQQ", tag, typ, 1, value)
    return struct.pack("<HHII", tag, typ, 1, value)


def bigtiff_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A BigTIFF whose one deflate strip claims ``width x height`` 8-bit pixels (a few hundred bytes)."""
    strip = zlib.compress(b"\x00" * 65536, 9)
    ifd_off, n = 16, 9
    data_off = ifd_off + 8 + 20 * n + 8
    entries = [(256, 16, width), (257, 16, height), (258, 3, 8), (259, 3, 8), (262, 3, 1),
               (273, 16, data_off), (277, 3, 1), (278, 4, height), (279, 16, len(strip))]
    head = b"II" + struct.pack("<HHHQ", 43, 8, 0, ifd_off)
    ifd = struct.pack("<Q", n) + b"".join(_tiff_entry(True, *e) for e in entries) + struct.pack("<Q", 0)
    return head + ifd + strip


def tiff_ifd_at_end(width: int = 20000, height: int = 20000, pad: int = 70_000) -> bytes:
    """A classic TIFF whose IFD (with the size) sits after ``pad`` bytes of pixel data, i.e. past
    the first 64 kB a reader may look at for the header."""
    strip = b"\x00" * pad
    ifd_off = 8 + len(strip)
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, len(strip))]
    ifd = struct.pack("<H", len(entries)) + b"".join(_tiff_entry(False, *e) for e in entries) + b"\0" * 4
    return b"II*\x00" + struct.pack("<I", ifd_off) + strip + ifd


def write_rle_dicom_bomb(path: str | os.PathLike, rows: int = 20000, cols: int = 20000) -> Path:
    """An RLE Lossless CT DICOM whose header claims ``rows x cols`` 16-bit pixels; the pixel data
    is one tiny fragment (a real one would inflate ~1 MB of RLE to gigabytes)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import CTImageStorage, RLELossless, generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg = bytes([0x81, 0x00]) * 64  # runs of 128 zeros
    frame = struct.pack("<16I", 2, 64, 64 + len(seg), *([0] * 13)) + seg + seg
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = RLELossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "BOMB"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def nifti_header_bomb(shape: tuple[int, ...] = (2048, 2048, 300)) -> bytes:
    """A NIfTI-1 header declaring a float32 volume of ``shape`` followed by 16 bytes of data."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\x00" * 4 + b"\x00" * 16


def truncated_jpeg_with_eoi(fraction: float = 0.6) -> bytes:
    """A JPEG cut at ``fraction`` of its bytes and given its end-of-image marker back."""
    import cv2

    ok, jpg = cv2.imencode(".jpg", _texture(128, seed=1))
    assert ok
    data = jpg.tobytes()
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


def write_malformed_corpus(folder: str | os.PathLike) -> list[Path]:
    """Write >= 15 distinct malformed inputs flat into ``folder``; return their paths.

    See :data:`MALFORMED_EXPECTATIONS` for what each should do. Nothing outside ``folder`` is
    touched; ``folder`` is created if needed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []

    def put(name: str, data: bytes) -> None:
        (folder / name).write_bytes(data)
        out.append(folder / name)

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
    for name, data in _issue13_files().items():
        put(name, data)
    out.append(write_rle_dicom_bomb(folder / "dicom_rle_bomb_20000x20000.dcm"))
    return out


def _issue13_files() -> dict[str, bytes]:
    """Corpus files of issue #13 that are plain bytes (the RLE DICOM is written by pydicom)."""
    return {
        "bigtiff_bomb_20000x20000.tif": bigtiff_bomb(),
        "tiff_ifd_at_end_20000x20000.tif": tiff_ifd_at_end(),
        "nifti_bomb_2048x2048x300.nii": nifti_header_bomb(),
        "truncated_eoi_appended.jpg": truncated_jpeg_with_eoi(),
        "tiny_1x4000.png": _png_bytes(np.tile(_texture(64)[0], 63)[None, :4000]),
    }


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


def snapshot(path: str | os.PathLike) -> object:
    """:func:`tree_snapshot` of a folder, or (hash, size, mode, mtime) of one file."""
    p = Path(path)
    if p.is_dir():
        return tree_snapshot(p)
    st = os.lstat(p)
    return ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mode, st.st_mtime_ns)


# --------------------------------------------------------------------------------------------
# Issue #13: the safety corpus -- commands that must never destroy or pollute data
# --------------------------------------------------------------------------------------------

TINY_CLASSES = ["covid", "cap", "normal"]
TINY_SIZE = 32


def write_tiny_run(root: str | os.PathLike, name: str = "Tiny") -> Path:
    """``root/models/<name>/`` with an untrained SmallCNN, labels.json and config.json (classes,
    img_size, modality, enhancement) as ``covidlib train`` writes them; returns ``root``."""
    import json

    from covidlib.models import build_model

    root = Path(root)
    d = root / "models" / name
    d.mkdir(parents=True, exist_ok=True)
    build_model("SmallCNN", len(TINY_CLASSES), TINY_SIZE, augment=False, seed=0).save(d / "model.keras")
    (d / "labels.json").write_text(json.dumps(TINY_CLASSES))
    (d / "config.json").write_text(json.dumps({"img_size": TINY_SIZE, "modality": "ct", "enhancement": "none",
                                               "classes": TINY_CLASSES}))
    return root


def write_scan_tree(root: str | os.PathLike) -> Path:
    """``root/data``: a small class-folder data set, ``COVID/``, ``NonCOVID/`` and a nested
    ``NonCOVID/batch2/`` (the folder the unreadable-folder cases make unreadable)."""
    data = Path(root) / "data"
    for i, rel in enumerate(["COVID/a.png", "COVID/b.png", "COVID/c.png", "NonCOVID/d.png",
                             "NonCOVID/e.png", "NonCOVID/f.png", "NonCOVID/batch2/g.png"]):
        write_image(data / rel, _texture(64, seed=10 + i))
    return data


@dataclass(frozen=True)
class SafetyCase:
    """One way a command could destroy, pollute or mislead, and how it must end instead.

    ``argv`` is a ``covidlib`` command line; ``{root}`` is the case's folder, ``{run}`` a tiny
    trained run (:func:`write_tiny_run`) copied into it. ``expect``: regex the one-line CLI
    error must match (exit code 2), or None when the command succeeds (exit 0) and ``rows`` /
    ``files`` say what must be reported instead. ``inputs`` (relative to ``{root}``) must be
    byte-identical afterwards. ``patch`` simulates what root cannot create for real:
    ``unreadable:<rel>`` (listing that folder raises PermissionError), ``readonly:<rel>``
    (``os.access`` says not writable), ``enospc-after:<n>`` (the n+1-th PNG write fails with
    ENOSPC).
    """

    id: str
    surface: str
    argv: tuple[str, ...]
    expect: str | None
    setup: Callable[[Path], None] = lambda root: None
    inputs: tuple[str, ...] = ("data",)
    rows: tuple[tuple[str, str], ...] = ()  # (input relative to root, regex of its error column)
    files: tuple[tuple[str, str], ...] = ()  # (file relative to root, regex of its content)
    stdout: str | None = None  # regex the standard output must match
    patch: str | None = None


def _with(*writers: Callable[[Path], Any]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        write_scan_tree(root)
        for w in writers:
            w(root)
    return setup


def _model_edit(edit: Callable[[Path], Any]) -> Callable[[Path], None]:
    """Setup: the scans, and an edit of the copied run's model folder ``run/models/Tiny``."""
    return _with(lambda root: edit(root / "run" / "models" / "Tiny"))


def _put(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def w(root: Path) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return w


def _edit_json(name: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    import json

    def w(d: Path) -> None:
        (d / name).write_text(json.dumps(change(json.loads((d / name).read_text()))))
    return w


def _truncate(d: Path) -> None:
    data = (d / "model.keras").read_bytes()
    (d / "model.keras").write_bytes(data[: len(data) // 2])


def _outside_member(root: Path, link: bool) -> None:
    import json
    import shutil

    shutil.copytree(root / "run" / "models" / "Tiny", root / "elsewhere" / "Stranger")
    ens = root / "run" / "models" / "ensemble"
    ens.mkdir(parents=True)
    name = "Link" if link else "../../elsewhere/Stranger"
    if link:
        (root / "run" / "models" / "Link").symlink_to(root / "elsewhere" / "Stranger")
    (ens / "config.json").write_text(json.dumps({"method": "hard", "members": [name]}))


def _bad_inputs(root: Path) -> None:
    """``data/bad/``: every file that decodes badly or decodes into no usable scan."""
    bad = root / "data" / "bad"
    bad.mkdir(parents=True)
    (bad / "bigtiff_bomb.tif").write_bytes(bigtiff_bomb())
    (bad / "late_ifd_bomb.tif").write_bytes(tiff_ifd_at_end())
    write_rle_dicom_bomb(bad / "rle_bomb.dcm")
    (bad / "nifti_bomb.nii").write_bytes(nifti_header_bomb())
    (bad / "cut.jpg").write_bytes(truncated_jpeg_with_eoi())
    (bad / "one_by_one.png").write_bytes(_png_bytes(np.full((1, 1), 128, np.uint8)))
    (bad / "line_1x4000.png").write_bytes(_png_bytes(np.tile(_texture(64)[0], 63)[None, :4000]))
    (bad / "blank.png").write_bytes(_png_bytes(np.zeros((64, 64), np.uint8)))


_PREDICT = ("predict", "--run-dir", "{root}/run", "--out", "{root}/pred.csv")
_LABELS_PERMUTED = (r"labels\.json lists \['normal', 'cap', 'covid'\] but config\.json says the model "
                    r"was trained on \['covid', 'cap', 'normal'\] \(the same classes in another order\)")

SAFETY_CASES: tuple[SafetyCase, ...] = (
    # ---- outputs: never into, over or beside the inputs; checked before any work
    SafetyCase("predict-out-is-the-scan", "output", ("predict", "{root}/data/COVID/a.png", "--run-dir",
               "{root}/run", "--out", "{root}/data/COVID/a.png"),
               r"predictions file \S+a\.png is an input file; refusing to overwrite it", _with()),
    SafetyCase("predict-out-is-a-folder-checked-first", "output",
               ("predict", "{root}/data", "--run-dir", "{root}/no_such_run", "--out", "{root}/results"),
               r"predictions file \S+results is a folder; give a file name", _with(_put("results/keep.txt", "x")),
               inputs=("data", "results")),
    SafetyCase("predict-gradcam-is-a-file", "output", _PREDICT[:1] + ("{root}/data",) + _PREDICT[1:]
               + ("--gradcam", "{root}/cams.txt"), r"Grad-CAM folder \S+cams\.txt is a file, not a folder",
               _with(_put("cams.txt", "notes")), inputs=("data", "cams.txt")),
    SafetyCase("predict-out-inside-the-input-folder", "output",
               ("predict", "{root}/data", "--run-dir", "{root}/run", "--out", "{root}/data/pred.csv"),
               r"lies inside the input folder \S+data: the outputs would mix with the data", _with()),
    SafetyCase("predict-out-beside-the-input-file", "output",
               ("predict", "{root}/data/COVID/a.png", "--run-dir", "{root}/run", "--out", "{root}/data/COVID/p.csv"),
               r"lies inside the folder holding the input \S+a\.png", _with()),
    SafetyCase("predict-out-over-another-scan", "output",
               ("predict", "{root}/data", "--run-dir", "{root}/run", "--out", "{root}/other_scan.png"),
               r"other_scan\.png exists and is not a text file .*refusing to replace it",
               _with(lambda root: write_image(root / "other_scan.png", _texture(40))),
               inputs=("data", "other_scan.png")),
    SafetyCase("predict-out-not-writable", "output",
               ("predict", "{root}/data", "--run-dir", "{root}/run", "--out", "{root}/ro/pred.csv"),
               r"the folder \S+ro is not writable \(read-only or no permission\)",
               _with(_put("ro/keep.txt", "x")), patch="readonly:ro"),
    SafetyCase("enhance-into-itself", "output", ("enhance", "{root}/data", "{root}/data"),
               r"enhance destination \S+data is the input folder \S+data; refusing to write into it", _with()),
    SafetyCase("enhance-into-a-class-folder", "output", ("enhance", "{root}/data", "{root}/data/COVID"),
               r"enhance destination \S+COVID lies inside the input folder", _with()),
    SafetyCase("enhance-around-its-source", "output", ("enhance", "{root}/data/COVID", "{root}/data"),
               r"enhance destination \S+data holds the input folder \S+COVID", _with()),
    SafetyCase("enhance-manifest-into-its-data-folder", "output",
               ("enhance", "{root}/data/labels.csv", "{root}/data/enhanced"),
               r"lies inside the folder holding the input \S+labels\.csv",
               _with(_put("data/labels.csv", "path,label\nCOVID/a.png,covid\n"))),
    SafetyCase("enhance-to-a-read-only-folder", "fail fast", ("enhance", "{root}/data", "{root}/ro/enh"),
               r"the folder \S+ro is not writable", _with(_put("ro/keep.txt", "x")), patch="readonly:ro"),
    SafetyCase("enhance-disk-full-stops-and-keeps-failures", "fail fast",
               ("enhance", "{root}/data", "{root}/enh", "--workers", "1", "--quiet"),
               r"cannot write into \S+enh: No space left on device \(\S+\.png\); stopped after 3 of 8 "
               r"image\(s\); the 1 failure\(s\) known so far are listed in \S+enhance_failures\.csv",
               _with(_put("data/COVID/0_broken.png", b"\x89PNG\r\n\x1a\nnot a png")),
               files=(("enh/enhance_failures.csv", r"0_broken\.png,"),), patch="enospc-after:2"),
    SafetyCase("audit-out-inside-the-data", "output", ("audit", "{root}/data", "--out", "{root}/data/audit.json"),
               r"--out \S+audit\.json lies inside the input folder", _with()),
    SafetyCase("export-into-the-model-folder", "output",
               ("export", "--model-file", "{root}/run/models/Tiny", "--out", "{root}/run/models/Tiny",
                "--formats", "tflite", "--no-verify"), r"export folder \S+Tiny is the input folder", _with(),
               inputs=("run",)),
    # ---- readers: every format capped from its header; predict refuses what ingest refuses
    SafetyCase("predict-refuses-bombs-and-non-scans", "readers", _PREDICT[:1] + ("{root}/data/bad",) + _PREDICT[1:],
               None, _with(_bad_inputs), rows=(
                   ("data/bad/bigtiff_bomb.tif", _OVER_THE_CAP),
                   ("data/bad/late_ifd_bomb.tif", _OVER_THE_CAP),
                   ("data/bad/rle_bomb.dcm", r"DICOM header declares 20000x20000 .* over the cap"),
                   ("data/bad/nifti_bomb.nii", r"NIfTI header declares 2048x2048x300 .*5\.0 GB decoded.* over the cap"),
                   ("data/bad/cut.jpg", r"truncated JPEG"),
                   ("data/bad/one_by_one.png", r"image too small \(1x1 px"),
                   ("data/bad/line_1x4000.png", r"image too small \(4000x1 px"),
                   ("data/bad/blank.png", r"blank image"))),
    # ---- folders that cannot be listed are reported, never skipped silently
    SafetyCase("predict-unreadable-subfolder", "folders", _PREDICT[:1] + ("{root}/data",) + _PREDICT[1:], None,
               _with(), rows=(("data/NonCOVID/batch2", r"folder could not be read \(Permission denied\)"),),
               patch="unreadable:data/NonCOVID/batch2"),
    SafetyCase("enhance-unreadable-subfolder", "folders", ("enhance", "{root}/data", "{root}/enh", "--workers", "1",
               "--quiet"), None, _with(),
               files=(("enh/enhance_failures.csv", r"batch2,folder could not be read \(Permission denied\)"),),
               patch="unreadable:data/NonCOVID/batch2"),
    SafetyCase("audit-unreadable-subfolder", "folders", ("audit", "{root}/data"), None, _with(),
               stdout=r"WARNING: 1 folder\(s\) could not be read \(e\.g\. \S+batch2",
               patch="unreadable:data/NonCOVID/batch2"),
    # ---- a model folder is checked before it is trusted
    SafetyCase("labels-permuted", "model", _PREDICT[:1] + ("{root}/data",) + _PREDICT[1:], _LABELS_PERMUTED,
               _model_edit(_edit_json("labels.json", lambda c: c[::-1])), inputs=("data", "run")),
    SafetyCase("labels-not-a-list", "model", _PREDICT[:1] + ("{root}/data",) + _PREDICT[1:],
               r"labels\.json must be a JSON list of class names, got \"abc\"",
               _model_edit(_edit_json("labels.json", lambda c: "abc")), inputs=("data", "run")),
    SafetyCase("member-path-outside-the-run", "model", _PREDICT[:1] + ("{root}/data",) + _PREDICT[1:],
               r"lists member '\.\./\.\./elsewhere/Stranger'; members must be folder names under",
               _with(lambda root: _outside_member(root, link=False)), inputs=("data", "run", "elsewhere")),
    SafetyCase("member-link-outside-the-run", "model", _PREDICT[:1] + ("{root}/data",) + _PREDICT[1:],
               r"lists member 'Link', which leads outside the run",
               _with(lambda root: _outside_member(root, link=True)), inputs=("data", "run", "elsewhere")),
    SafetyCase("truncated-model-file", "model", _PREDICT[:1] + ("{root}/data",) + _PREDICT[1:],
               r"model\.keras is damaged or incomplete: not a readable \.keras archive", _model_edit(_truncate),
               inputs=("data", "run")),
    SafetyCase("input-size-mismatch", "model", _PREDICT[:1] + ("{root}/data",) + _PREDICT[1:],
               r"config\.json says img_size 64 but the model takes 32x32 images",
               _model_edit(_edit_json("config.json", lambda c: {**c, "img_size": 64})), inputs=("data", "run")),
    SafetyCase("img-size-7", "model", _PREDICT[:1] + ("{root}/data",) + _PREDICT[1:],
               r"img_size 7 is below the smallest size a covidlib model is trained at \(32\)",
               _model_edit(_edit_json("config.json", lambda c: {**c, "img_size": 7})), inputs=("data", "run")),
    SafetyCase("export-labels-permuted", "model", ("export", "--model-file", "{root}/run/models/Tiny", "--out",
               "{root}/exported", "--formats", "tflite", "--no-verify"), _LABELS_PERMUTED,
               _model_edit(_edit_json("labels.json", lambda c: c[::-1])), inputs=("data", "run")),
)
