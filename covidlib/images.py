"""Reading chest images: PNG / JPEG / BMP / TIFF, DICOM (single files and series) and NIfTI volumes.

Everything returns plain 2-D numpy arrays:

* :func:`read_image` -- one 2-D grayscale image, ``uint8`` for 8-bit sources, ``uint16`` for 16-bit
  ones (colour is converted to gray, alpha is dropped). ``.dcm`` files go through :func:`read_dicom`.
* :func:`read_dicom` -- CT: raw values -> Hounsfield units (pydicom's modality LUT: RescaleSlope /
  RescaleIntercept) -> a window (``lung`` = centre -600 HU, width 1500 by default) -> ``uint8``.
  Other DICOM (CR / DX X-ray, no HU) is min-max scaled to ``uint8``. MONOCHROME1 (bright = low
  value) is inverted in both cases.
* :func:`read_dicom_series` / :func:`read_volume` -- a CT series / NIfTI volume as a list of axial
  slices, each windowed to ``uint8`` and oriented like a radiological view (patient's right on the
  image's left, anterior at the top), ordered feet -> head.
* :func:`iter_images` -- any file or folder of the above, as ``(key, image)`` pairs.

Every failure is an :class:`ImageReadError` (a ``ValueError``) that names the file and says why
("empty file", "not a decodable image", ...), never a bare traceback from cv2 / pydicom / nibabel.
Files are only ever read; nothing here writes to disk.

Raster files are read with ``np.fromfile`` + ``cv2.imdecode``: by their bytes, not their extension
(a PNG saved as ``.bmp`` reads fine; non-ASCII paths work on every OS). The size cap against
"decompression bombs" is OpenCV's own: it reads the image header and refuses, before allocating
anything, an image over ``OPENCV_IO_MAX_IMAGE_PIXELS`` pixels, an environment variable it reads
once, when ``cv2`` is loaded. Importing covidlib sets it to 2**27 unless it is set already (see
:data:`MAX_IMAGE_PIXELS`). DICOM (Rows x Columns x NumberOfFrames, also compressed transfer
syntaxes) and NIfTI (header shape) are checked from their headers against the same per-image cap
and :data:`MAX_VOLUME_VOXELS` per volume.
"""
from __future__ import annotations

import math
import os
import stat
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from covidlib import config

__all__ = [
    "ImageReadError",
    "ImageNotFoundError",
    "WINDOWS",
    "MAX_IMAGE_PIXELS",
    "MAX_VOLUME_VOXELS",
    "MIN_IMAGE_SIDE",
    "read_image",
    "read_dicom",
    "read_dicom_series",
    "read_volume",
    "to_uint8",
    "iter_images",
    "sniff_format",
    "image_problem",
    "is_dicom_file",
    "is_nifti_path",
    "apply_window",
    "dicom_sort_key",
]

#: CT window presets, ``name: (centre, width)`` in Hounsfield units.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}

# OpenCV reads this variable once, when cv2 is loaded; covidlib/__init__ sets it (2**27) first,
# before anything can load cv2, unless the user set it.
_CAP_VARIABLE = "OPENCV_IO_MAX_IMAGE_PIXELS"


def _opencv_pixel_cap() -> int:
    """The cap OpenCV applies: its variable (a number, optionally ``Kb`` / ``Mb`` / ``Gb``, as
    OpenCV parses it), or OpenCV's default 2**30 when unset."""
    raw = os.environ.get(_CAP_VARIABLE, "").strip()
    if not raw:
        return 2**30
    scale = {"kb": 2**10, "mb": 2**20, "gb": 2**30}.get(raw[-2:].lower(), 1)
    digits = raw[:-2] if scale > 1 else raw
    if not digits.isdigit():
        raise ValueError(f"{_CAP_VARIABLE}={raw!r}: expected a whole number of pixels, e.g. {2**27}")
    return int(digits) * scale


#: Largest image (width x height) :func:`read_image` decodes: OpenCV's own cap,
#: ``OPENCV_IO_MAX_IMAGE_PIXELS``, which importing covidlib sets to 2**27 (11585^2; a chest X-ray
#: is ~4k x 4k, 16 Mpx) unless the environment sets it already. OpenCV reads it when ``cv2`` is
#: first loaded: a process that loaded cv2 before covidlib keeps OpenCV's default, 2**30, and this
#: says so. The same cap holds for one DICOM / NIfTI slice.
MAX_IMAGE_PIXELS: int = _opencv_pixel_cap()

#: Largest volume (voxels, all slices / frames together) a NIfTI file or multi-frame DICOM may
#: declare: 2**28 (512 x 512 x 1024 slices; 1 GB as float32). Checked from the header, before
#: decoding.
MAX_VOLUME_VOXELS: int = 2**28

#: Smallest side :func:`image_problem` accepts for a training image (a 1x1 "image" is an export bug).
MIN_IMAGE_SIDE: int = 16


class ImageReadError(ValueError):
    """A file could not be read as an image.

    Attributes:
        path: the offending file.
        reason: short human-readable cause ("empty file", "not a decodable image", ...).
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """The path does not exist (or is a broken link). Also a ``FileNotFoundError``."""


# --------------------------------------------------------------------------------------------
# Raster images
# --------------------------------------------------------------------------------------------


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True for ``.nii`` / ``.nii.gz`` file names."""
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def sniff_format(data: bytes) -> str | None:
    """Identify a file's kind from its first bytes (to say why it did not decode).

    Returns:
        ``"png"``, ``"jpeg"``, ``"bmp"``, ``"tiff"``, ``"dicom"``, ``"gzip"`` (e.g. ``.nii.gz``),
        ``"html"``, ``"text"`` or ``None`` when unknown.
    """
    head = bytes(data[:512])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    low = head.lstrip().lower()
    if low.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "html"
    if head and _looks_like_text(head):
        return "text"
    return None


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * len(text)


def _read_error(path: Path, e: OSError) -> ImageReadError:
    """The specific reason an image file could not be opened / read."""
    if not os.path.lexists(path):
        return ImageNotFoundError(path, "file not found")
    if not path.exists():
        return ImageNotFoundError(path, "broken symbolic link (its target does not exist)")
    if isinstance(e, PermissionError):
        return ImageReadError(path, "permission denied (no read access)")
    return ImageReadError(path, f"could not be read from disk ({e.strerror or e})")


def _read_bytes(path: Path) -> np.ndarray:
    """File bytes as a uint8 array, with every OS error turned into an ImageReadError."""
    try:
        mode = os.stat(path).st_mode
        # Only regular files: opening a named pipe would wait for a writer forever.
        if stat.S_ISDIR(mode):
            raise ImageReadError(path, "is a folder, not an image file")
        if not stat.S_ISREG(mode):
            raise ImageReadError(path, "not a regular file (device, pipe or socket)")
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise _read_error(path, e) from None
    if data.size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    return data


def _to_gray(img: np.ndarray) -> np.ndarray:
    import cv2

    if img.ndim == 2:
        return img
    if img.ndim == 3:
        c = img.shape[2]
        if c in (1, 2):  # gray, gray + alpha
            return img[:, :, 0]
        if c == 3:
            return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        if c == 4:
            return cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
    raise ValueError(f"unsupported image layout {img.shape}")


def _normalise_dtype(img: np.ndarray) -> np.ndarray:
    if img.dtype in (np.uint8, np.uint16):
        return img
    if img.dtype == np.int8:
        return (img.astype(np.int16) + 128).astype(np.uint8)
    if img.dtype == np.int16:
        return (img.astype(np.int32) + 32768).astype(np.uint16)
    # float / 32-bit TIFFs carry no fixed display range: scale their own range to 8 bits.
    return to_uint8(img)


def _gray_filled_tail(img: np.ndarray) -> bool:
    """True when a decoded 8-bit JPEG ends in libjpeg's fill for missing scan data.

    Kept by hand because the decoder accepts such a file (tests/malformed.py's
    ``truncated_eoi_appended.jpg``): a JPEG cut short and given an end marker again decodes
    "fine", every block it has no data for filled with flat 128, from the cut to the end in block
    order. At least one block row's worth of such blocks at the end is taken as that fill (a real
    scan's padding is black, and JPEG noise rarely leaves whole blocks at exactly 128).
    """
    # The fill runs to the end, so a last pixel other than 128 rules it out (nearly every image).
    if img.dtype != np.uint8 or img.ndim != 2 or img[-1, -1] != 128:
        return False
    h, w = img.shape
    hb, wb = -(-h // 8), -(-w // 8)
    r0 = max(0, hb - 2) * 8
    flat = np.ones((hb * 8 - r0, wb * 8), bool)  # edge blocks padded as "flat"
    flat[: h - r0, :w] = img[r0:] == 128
    per_block = flat.reshape(-1, 8, wb, 8).all(axis=(1, 3)).ravel()
    bad = np.flatnonzero(~per_block)
    trailing = per_block.size - (int(bad[-1]) + 1 if bad.size else 0)
    return trailing >= wb


def _refusal(e: Exception) -> str:
    """The reason for an exception from ``cv2.imdecode``: OpenCV's size caps, or its message."""
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else "decoder error"
    if "CV_IO_MAX_IMAGE_PIXELS" in msg:
        return (f"image dimensions exceed the cap of {MAX_IMAGE_PIXELS:,} pixels ({_CAP_VARIABLE}; "
                "corrupt header or decompression bomb); not decoded")
    if "CV_IO_MAX_IMAGE_WIDTH" in msg or "CV_IO_MAX_IMAGE_HEIGHT" in msg:
        return ("image width or height exceeds OpenCV's limit (OPENCV_IO_MAX_IMAGE_WIDTH / _HEIGHT; "
                "corrupt header or decompression bomb); not decoded")
    return f"not a decodable image ({msg})"


def _decode(path: Path, data: np.ndarray) -> np.ndarray | None:
    """2-D ``uint8`` / ``uint16`` image from file bytes; None when no OpenCV decoder takes them."""
    import cv2

    jpeg = data[:3].tobytes() == b"\xff\xd8\xff"
    # A JPEG is decoded straight to its luma plane (the Y it stores; the same 0.299 / 0.587 /
    # 0.114 weights as cvtColor): faster than a colour decode + conversion, and byte-identical
    # on gray content. EXIF orientation stays ignored, as with IMREAD_UNCHANGED for the others.
    flags = (cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
             if jpeg else cv2.IMREAD_UNCHANGED)
    try:
        img = cv2.imdecode(data, flags)
    except cv2.error as e:
        raise ImageReadError(path, _refusal(e)) from None
    if img is None or img.size == 0:
        return None
    if jpeg and _gray_filled_tail(img):
        raise ImageReadError(
            path, "truncated JPEG (scan data ends early; the decoder filled the last rows with flat gray)"
        )
    try:
        return np.ascontiguousarray(_normalise_dtype(_to_gray(img)))
    except ValueError as e:
        raise ImageReadError(path, str(e)) from None


def _undecodable(path: Path, data: np.ndarray) -> str:
    """Why bytes that no decoder took are not an image, for the error message."""
    fmt = sniff_format(data)
    if fmt == "html":
        return "not a decodable image: the file is an HTML page (a failed download?)"
    if fmt == "text":
        return "not a decodable image: the file contains text"
    if fmt == "gzip":
        return "not a decodable image: gzip-compressed data"
    if fmt is not None:
        return f"not a decodable image (corrupt or truncated {fmt.upper()} data)"
    if path.suffix.lower() not in config.IMAGE_EXTENSIONS:
        return (f"unsupported file type {path.suffix or '(no extension)'!r}; "
                f"supported: {', '.join(config.IMAGE_EXTENSIONS + config.MEDICAL_EXTENSIONS)}")
    return "not a decodable image (unrecognised content)"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one image file as a 2-D grayscale array.

    Any format OpenCV decodes (PNG, JPEG, BMP, TIFF, ...; 8 or 16 bit; gray, RGB or RGBA) is read
    by its content, so a wrongly named file still reads. ``.dcm`` files and files with a DICOM
    preamble go to :func:`read_dicom` (lung window, ``uint8``).

    Args:
        path: the image file.

    Returns:
        2-D array, ``uint8`` for 8-bit sources and ``uint16`` for 16-bit sources. Colour is
        converted to gray (cv2 luminance weights; a JPEG is decoded straight to the luma it
        stores, which uses the same weights) and alpha is dropped. Float / 32-bit TIFFs are
        min-max scaled to ``uint8``.

    Raises:
        ImageNotFoundError: the path does not exist (also a ``FileNotFoundError``).
        ImageReadError: empty, truncated, non-image or unsupported file, a NIfTI volume (use
            :func:`read_volume`), or dimensions above :data:`MAX_IMAGE_PIXELS`.
    """
    path = Path(path)
    if is_nifti_path(path):
        raise ImageReadError(
            path, "is a NIfTI volume (many slices), not one image: use covidlib.images.read_volume"
        )
    data = _read_bytes(path)
    if data[128:132].tobytes() == b"DICM":
        return read_dicom(path)
    img = _decode(path, data)
    if img is not None:
        return img
    if path.suffix.lower() == ".dcm":  # DICOM without the 128-byte preamble
        return read_dicom(path)
    raise ImageReadError(path, _undecodable(path, data))


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Scale an image to ``uint8``.

    ``uint8`` is returned unchanged; anything else (``uint16``, float, ...) is min-max scaled by
    its own range (a constant image becomes all zeros). NaNs become 0.

    Args:
        img: array of any shape.
    """
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    f = a.astype(np.float64)
    finite = np.isfinite(f)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(f[finite].min()), float(f[finite].max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    out = (np.where(finite, f, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def image_problem(img: np.ndarray, min_side: int = MIN_IMAGE_SIDE) -> str | None:
    """Why a decoded image is unusable for training, or None when it is fine.

    Catches what decodes but is not a picture: tiny images (an export bug, e.g. 1x1) and blank
    images (every pixel equal, e.g. an all-black frame).
    """
    a = np.asarray(img)
    if a.ndim != 2:
        return f"not a 2-D image (shape {a.shape})"
    h, w = a.shape
    if min(h, w) < min_side:
        return f"image too small ({w}x{h} px; minimum side {min_side})"
    lo, hi = a.min(), a.max()
    if lo == hi:
        return f"blank image (every pixel = {lo})"
    return None


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def _window_bounds(window: str | Sequence[float]) -> tuple[float, float]:
    if isinstance(window, str):
        key = window.strip().lower()
        if key not in WINDOWS:
            raise ValueError(f"unknown window {window!r}; use one of {sorted(WINDOWS)} or (centre, width)")
        c, w = WINDOWS[key]
    else:
        try:
            c, w = (float(v) for v in window)
        except (TypeError, ValueError):
            raise ValueError(f"window must be a preset name or (centre, width), got {window!r}") from None
    if not w > 0:
        raise ValueError(f"window width must be > 0, got {w}")
    return c - w / 2.0, c + w / 2.0


def apply_window(hu: np.ndarray, window: str | Sequence[float] = "lung") -> np.ndarray:
    """Map Hounsfield units to ``uint8`` through a (centre, width) window.

    ``lo = c - w/2`` maps to 0 and ``hi = c + w/2`` to 255, linearly, values outside are clipped.
    """
    lo, hi = _window_bounds(window)
    out = (np.asarray(hu, dtype=np.float64) - lo) / (hi - lo) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file carries the DICOM ``DICM`` preamble (cheap: reads 132 bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dcmread(path: Path, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not os.path.lexists(path):
        raise ImageNotFoundError(path, "file not found")
    if not path.exists():
        raise ImageNotFoundError(path, "broken symbolic link (its target does not exist)")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not a DICOM file")
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(path, "empty file (0 bytes)")
        try:
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            # Old files without the 128-byte preamble: accept only if it parses into an image.
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
            if "Rows" not in ds or "Columns" not in ds:
                raise ImageReadError(path, "not a DICOM file (no DICM preamble, no image attributes)") from None
            return ds
    except ImageReadError:
        raise
    except PermissionError:
        raise ImageReadError(path, "permission denied (no read access)") from None
    except Exception as e:  # pydicom raises many types for garbage input
        raise ImageReadError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from None


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"  # pragma: no cover - the loop always returns


def _check_volume_size(path: Path, kind: str, dims: Sequence[int], bytes_per_voxel: float) -> None:
    """Refuse a declared image / volume above the caps, naming its declared size, before decoding.

    ``dims`` are the declared axes (columns, rows[, frames / slices...]); any two of the first
    three axes may become a slice (NIfTI volumes are reoriented).
    """
    dims = [int(d) for d in dims]
    if not dims or min(dims) <= 0:
        raise ImageReadError(path, f"{kind} header declares an empty size {'x'.join(map(str, dims))}")
    total = math.prod(dims)
    first = sorted(dims[:3], reverse=True)
    largest_slice = first[0] * (first[1] if len(first) > 1 else 1)
    if largest_slice <= MAX_IMAGE_PIXELS and total <= MAX_VOLUME_VOXELS:
        return
    unit = "pixels" if len(dims) == 2 else "voxels"
    raise ImageReadError(
        path,
        f"{kind} header declares {'x'.join(map(str, dims))} = {total:,} {unit} "
        f"({_human_bytes(total * bytes_per_voxel)} decoded), over the cap of {MAX_IMAGE_PIXELS:,} "
        f"pixels per image / {MAX_VOLUME_VOXELS:,} per volume (corrupt header or decompression "
        "bomb); not decoded",
    )


def _check_dicom_size(ds, path: Path) -> None:
    """Rows x Columns x NumberOfFrames from the header, checked before any pixel is decoded."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError) as e:
        raise ImageReadError(path, f"DICOM header has unreadable image attributes ({e})") from None
    _check_volume_size(path, "DICOM", [cols, rows] + ([frames] if frames > 1 else []),
                       max(spp, 1) * max(bits, 8) / 8)


def _dicom_pixels(ds, path: Path) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(path, "DICOM has no pixel data (not an image object, or cut off)")
    # Compressed pixel data (RLE, JPEG) can inflate a 1 MB file to gigabytes: check the header.
    _check_dicom_size(ds, path)
    try:
        arr = ds.pixel_array
    except Exception as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = ""
        if ts is not None and getattr(ts, "is_compressed", False):
            hint = f" -- compressed transfer syntax {ts.name}; install pylibjpeg / python-gdcm to decode it"
        raise ImageReadError(path, f"DICOM pixel data could not be decoded ({type(e).__name__}: {e}){hint}") from None
    return np.asarray(arr)


def _is_ct_like(ds) -> bool:
    modality = str(ds.get("Modality", "")).upper()
    if modality == "CT":
        return True
    if modality in ("CR", "DX", "MG", "RF", "XA", "US", "OT", "SC", "PX", "IO"):
        return False
    # Unknown modality: a rescale to HU (intercept about -1024) says CT.
    return "RescaleIntercept" in ds and float(ds.get("RescaleIntercept", 0) or 0) < -100


def _dicom_to_uint8(ds, path: Path, window) -> np.ndarray:
    arr = _dicom_pixels(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 or (arr.ndim == 3 and spp == 1) or arr.ndim == 4:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames): use covidlib.images.read_volume")
    if spp > 1 or arr.ndim == 3:
        import cv2

        rgb = to_uint8(arr) if arr.dtype != np.uint8 else arr
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            rgb = convert_color_space(rgb, photometric, "RGB")
        return cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(_gray_uint8(ds, arr, window))


def _gray_uint8(ds, arr: np.ndarray, window) -> np.ndarray:
    """Stored gray values (one frame or a stack) -> ``uint8``: CT through HU and the window,
    other modalities by their own range; MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    if _is_ct_like(ds):
        out = apply_window(apply_modality_lut(arr, ds), window)
    else:
        # X-ray (CR / DX) has no calibrated unit: use the image's own range.
        out = to_uint8(arr.astype(np.float64))
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        out = 255 - out
    return out


def read_dicom(path: str | os.PathLike, window: str | Sequence[float] = "lung") -> np.ndarray:
    """Read one single-frame DICOM image as 2-D ``uint8``.

    CT: stored values -> HU (``RescaleSlope`` / ``RescaleIntercept``) -> ``window``. Other
    modalities (CR / DX X-ray, no HU) are min-max scaled. MONOCHROME1 is inverted so that air is
    dark in every output.

    Args:
        path: the ``.dcm`` file.
        window: a preset from :data:`WINDOWS` (``"lung"``, ``"mediastinum"``, ``"bone"``) or a
            ``(centre, width)`` pair in HU. Ignored for non-CT images.

    Raises:
        ImageReadError: not DICOM, no pixel data, undecodable (e.g. compressed without a
            decoder), or multi-frame.
        ValueError: unknown window.
    """
    _window_bounds(window)  # fail on a bad window before touching the file
    path = Path(path)
    ds = _dcmread(path)
    return _dicom_to_uint8(ds, path, window)


def _slice_position(ds) -> float | None:
    """Position along the slice normal (falls back to z when orientation is missing)."""
    ipp = ds.get("ImagePositionPatient")
    if ipp is None or len(ipp) != 3:
        return None
    pos = np.array([float(v) for v in ipp])
    iop = ds.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        r, c = np.array([float(v) for v in iop[:3]]), np.array([float(v) for v in iop[3:]])
        normal = np.cross(r, c)
        if np.linalg.norm(normal) > 0:
            return float(pos @ normal)
    return float(pos[2])


def dicom_sort_key(ds, name: str) -> tuple:
    """Sort key of a slice: series, then position along the normal, then InstanceNumber, then name."""
    series = str(ds.get("SeriesInstanceUID", ""))
    pos = _slice_position(ds)
    inst = ds.get("InstanceNumber")
    try:
        inst_v = float(inst) if inst is not None and str(inst) != "" else None
    except (TypeError, ValueError):
        inst_v = None
    return (
        series,
        0 if pos is not None else 1,
        pos if pos is not None else 0.0,
        0 if inst_v is not None else 1,
        inst_v if inst_v is not None else 0.0,
        name,
    )


def _dicom_candidates(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        if p.suffix.lower() == ".dcm" or (p.suffix == "" and is_dicom_file(p)):
            out.append(p)
    return out


def read_dicom_series(
    folder: str | os.PathLike, window: str | Sequence[float] = "lung"
) -> list[tuple[str, np.ndarray]]:
    """Read every DICOM slice in a folder, sorted along the body axis.

    Slices are ordered by ``ImagePositionPatient`` projected on the slice normal (from
    ``ImageOrientationPatient``), then ``InstanceNumber``, then file name -- never by file name
    alone, which puts ``10.dcm`` before ``2.dcm``. Files ending ``.dcm`` and extension-less files
    with a DICOM preamble are read; several series in one folder are kept apart (grouped by
    ``SeriesInstanceUID``).

    Args:
        folder: folder holding the series.
        window: CT window, as in :func:`read_dicom`.

    Returns:
        ``[(file name, uint8 slice), ...]`` in body-axis order (ascending position: feet -> head
        for an axial series).

    Raises:
        FileNotFoundError: no such folder. ValueError: no DICOM files in it.
        ImageReadError: a slice cannot be read.
    """
    _window_bounds(window)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM series folder not found: {folder}")
    files = _dicom_candidates(folder)
    if not files:
        raise ValueError(f"no DICOM files (.dcm or files with a DICM preamble) in {folder}")
    datasets = [(p, _dcmread(p)) for p in files]
    datasets.sort(key=lambda t: dicom_sort_key(t[1], t[0].name))
    return [(p.name, _dicom_to_uint8(ds, p, window)) for p, ds in datasets]


# --------------------------------------------------------------------------------------------
# Volumes (NIfTI, multi-frame DICOM)
# --------------------------------------------------------------------------------------------


def _radiological(slice_ras: np.ndarray) -> np.ndarray:
    """Axial slice indexed [x (L->R), y (P->A)] in RAS+ -> image rows anterior->posterior, columns
    patient-right -> patient-left (the radiological convention: patient's right on the viewer's left)."""
    return np.ascontiguousarray(slice_ras[::-1, ::-1].T)


def read_volume(path: str | os.PathLike, window: str | Sequence[float] = "lung") -> list[np.ndarray]:
    """Read a CT volume as a list of axial ``uint8`` slices.

    NIfTI (``.nii`` / ``.nii.gz``) is reoriented with ``nibabel.as_closest_canonical`` (RAS+), so
    whatever the stored axis order, slice ``k`` is axial, slices run feet -> head, and each slice
    has anterior at the top and the patient's right on the image's left (radiological view).
    Values are taken as HU (NIfTI scaling applied) and windowed. A volume whose minimum is above
    -500 is not HU-calibrated (no air at about -1000 HU); it is min-max scaled instead, with a
    ``UserWarning``. A multi-frame DICOM file returns its frames the same way.

    Args:
        path: the volume file.
        window: CT window, as in :func:`read_dicom`.

    Raises:
        ImageReadError: not a readable volume, or not 3-D.
        ValueError: unknown window.
    """
    _window_bounds(window)
    path = Path(path)
    if not os.path.lexists(path):
        raise ImageNotFoundError(path, "file not found")
    if not is_nifti_path(path):
        if path.suffix.lower() == ".dcm" or is_dicom_file(path):
            return _read_multiframe_dicom(path, window)
        raise ImageReadError(path, "not a volume: expected .nii, .nii.gz or a multi-frame .dcm")
    if not path.exists():
        raise ImageNotFoundError(path, "broken symbolic link (its target does not exist)")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not a NIfTI file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    import nibabel as nib

    try:
        img = nib.load(str(path))  # reads the header only
        if len(img.shape) < 3:
            raise ImageReadError(path, f"NIfTI image is {len(img.shape)}-D, expected a 3-D volume")
        # Before anything touches the data: reorienting loads it, get_fdata makes float32 of it.
        _check_volume_size(path, "NIfTI", img.shape, 4)
        can = nib.as_closest_canonical(img)
        data = np.asarray(can.get_fdata(dtype=np.float32))
    except ImageReadError:
        raise
    except PermissionError:
        raise ImageReadError(path, "permission denied (no read access)") from None
    except Exception as e:  # nibabel / gzip / zlib raise many types on corrupt input
        raise ImageReadError(path, f"not a readable NIfTI volume ({type(e).__name__}: {e})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageReadError(path, f"NIfTI data has shape {data.shape}; expected one 3-D volume")
    finite = np.isfinite(data)
    if not finite.any():
        raise ImageReadError(path, "NIfTI volume holds no finite values")
    vmin = float(data[finite].min())
    if vmin > -500:
        warnings.warn(
            f"{path.name}: minimum value {vmin:.0f} > -500, so the volume is not in Hounsfield units; "
            "scaling its own range to 0..255 instead of the CT window",
            UserWarning,
            stacklevel=2,
        )
        vol8 = to_uint8(np.where(finite, data, vmin))
    else:
        vol8 = apply_window(np.where(finite, data, -1024.0), window)
    return [_radiological(vol8[:, :, k]) for k in range(vol8.shape[2])]


def _read_multiframe_dicom(path: Path, window) -> list[np.ndarray]:
    ds = _dcmread(path)
    arr = _dicom_pixels(ds, path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames <= 1 or spp != 1:
        return [_dicom_to_uint8(ds, path, window)]
    return [np.ascontiguousarray(f) for f in _gray_uint8(ds, arr, window)]


# --------------------------------------------------------------------------------------------
# Walking files and folders
# --------------------------------------------------------------------------------------------


def _is_readable_kind(p: Path) -> bool:
    suf = p.suffix.lower()
    return suf in config.IMAGE_EXTENSIONS or suf == ".dcm" or is_nifti_path(p)


def _read_entry(p: Path, key: str, window) -> Iterator[tuple[str, np.ndarray]]:
    """The image(s) of one file: a NIfTI's slices, a multi-frame DICOM's frames, or one image."""
    if is_nifti_path(p):
        for k, s in enumerate(read_volume(p, window)):
            yield f"{key}#z{k:04d}", s
        return
    if p.suffix.lower() == ".dcm":
        ds = _dcmread(p)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            for k, s in enumerate(_read_multiframe_dicom(p, window)):
                yield f"{key}#f{k:04d}", s
        else:
            yield key, _dicom_to_uint8(ds, p, window)
        return
    yield key, read_image(p)


def _folder_entries(root: Path, handle: Callable[[ImageReadError], None]) -> Iterator[tuple[Path, str]]:
    """``(file, key)`` for every readable file under ``root``, folder by folder in sorted order:
    a folder's DICOM slices first, in body-axis order, then its other images by name."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        d = Path(dirpath)
        files = [d / f for f in sorted(filenames) if not f.startswith(".")]
        dicoms = [p for p in files if p.suffix.lower() == ".dcm" or (p.suffix == "" and is_dicom_file(p))]
        rel_dir = d.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        # Headers first, so that slices come out in body-axis order, not file-name order.
        headed = []
        for p in dicoms:
            try:
                headed.append((p, _dcmread(p, stop_before_pixels=True)))
            except ImageReadError as e:
                handle(e)
        headed.sort(key=lambda t: dicom_sort_key(t[1], t[0].name))
        for p, _ in headed:
            yield p, prefix + p.name
        taken = set(dicoms)
        for p in files:
            if p not in taken and _is_readable_kind(p) and p.suffix.lower() != ".dcm":
                yield p, prefix + p.name


def iter_images(
    path: str | os.PathLike,
    window: str | Sequence[float] = "lung",
    errors: str = "warn",
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, 2-D image)`` for a file or every image under a folder.

    * PNG / JPEG / BMP / TIFF -> one image (``uint8`` or ``uint16``), key = path relative to
      ``path`` (the file name for a single file);
    * a folder of DICOM slices -> its slices in body-axis order, key ``<folder>/<file>``;
    * ``.nii`` / ``.nii.gz`` -> one key per axial slice, ``<file>#z0007``.

    Folders are walked recursively in sorted order; hidden files and files of other types are
    skipped.

    Args:
        path: a file or folder.
        window: CT window for DICOM / NIfTI.
        errors: ``"warn"`` (skip unreadable files with a ``UserWarning``), ``"skip"`` (silently)
            or ``"raise"`` (re-raise the :class:`ImageReadError`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: bad ``errors`` / window.
    """
    if errors not in ("warn", "skip", "raise"):
        raise ValueError(f"errors must be 'warn', 'skip' or 'raise', got {errors!r}")
    _window_bounds(window)
    root = Path(path)
    if not os.path.lexists(root):
        raise FileNotFoundError(f"no such file or folder: {root}")

    def handle(exc: ImageReadError) -> None:
        if errors == "raise":
            raise exc
        if errors == "warn":
            warnings.warn(f"skipped unreadable file {exc}", UserWarning, stacklevel=3)

    entries = _folder_entries(root, handle) if root.is_dir() else iter([(root, root.name)])
    for p, key in entries:
        try:
            yield from _read_entry(p, key, window)
        except ImageReadError as e:
            handle(e)
