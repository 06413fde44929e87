"""Body crop (CT) and border crop (X-ray): the ``crop`` step of :mod:`covidlib.enhance`.

* :func:`crop_body` -- finds the body automatically (threshold, morphology, connected components)
  and drops background, scanner table and padding; uses a given bounding box (COVIDx
  ``xmin, ymin, xmax, ymax``) when there is one. The seed could only crop from a given box.
* :func:`crop_border` is the X-ray counterpart: it trims uniform borders / text margins.

Also the small image checks shared by every enhancement step, and the body finder that the
lung-field crop (:mod:`covidlib.lungs`) starts from. Only numpy and OpenCV are imported here.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np

from covidlib.images import to_uint8

__all__ = ["body_bbox", "crop_body", "crop_border"]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _check_image(img: Any, name: str = "img", allow_color: bool = False) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{name} must be uint8 or uint16, got dtype {a.dtype}")
    if a.ndim == 2 or (allow_color and a.ndim == 3 and a.shape[2] == 3):
        if a.size == 0:
            raise ValueError(f"{name} is empty (shape {a.shape})")
        return a
    want = "a 2-D grayscale or (H, W, 3) colour image" if allow_color else "a 2-D grayscale image"
    raise ValueError(f"{name} must be {want}, got shape {a.shape} (covidlib.images.read_image returns 2-D gray)")


def _max_value(a: np.ndarray) -> int:
    return 255 if a.dtype == np.uint8 else 65535


# --------------------------------------------------------------------------------------------
# Crop
# --------------------------------------------------------------------------------------------

# Body finding works on a copy whose long side is this many pixels: masks need no more detail,
# and the bounding box error (<= 1 small pixel) is far below the margin.
_MASK_SIDE = 128
# Components at least this fraction of the largest one are kept with it (the second lung in a
# lung-masked slice, arms beside the torso); a scanner table is much smaller after opening.
_KEEP_FRACTION = 0.25
# A region smaller than this fraction of the image is not a body.
_MIN_BODY_FRACTION = 0.02


def _otsu(values: np.ndarray) -> float:
    v = np.ascontiguousarray(values.reshape(1, -1))
    t, _ = cv2.threshold(v, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t)


def _largest_regions(mask: np.ndarray, kernel: np.ndarray) -> tuple | None:
    """(area of the largest component, union bbox of the big components, component labels,
    label ids of the big components, OpenCV stats, centroids) after an opening."""
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    # 16-bit labels: the mask is at most _MASK_SIDE square, and they are a quarter faster.
    n, labels, stats, cents = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_16U)
    if n <= 1:
        return None
    st = stats[1:]
    areas = st[:, cv2.CC_STAT_AREA]
    big = int(areas.max())
    kept = areas >= _KEEP_FRACTION * big
    keep = st[kept]
    x0 = int(keep[:, cv2.CC_STAT_LEFT].min())
    y0 = int(keep[:, cv2.CC_STAT_TOP].min())
    x1 = int((keep[:, cv2.CC_STAT_LEFT] + keep[:, cv2.CC_STAT_WIDTH]).max())
    y1 = int((keep[:, cv2.CC_STAT_TOP] + keep[:, cv2.CC_STAT_HEIGHT]).max())
    return big, (x0, y0, x1, y1), labels, np.flatnonzero(kept) + 1, stats, cents


def _spans(box: tuple[int, int, int, int], shape: tuple[int, int]) -> bool:
    """True when a box spans (almost) the whole frame."""
    return box[2] - box[0] >= 0.95 * shape[1] and box[3] - box[1] >= 0.95 * shape[0]


def _frame_like(area: int, box: tuple[int, int, int, int], shape: tuple[int, int]) -> bool:
    """True when a region is the scanner's field of view rather than a body.

    That is a region spanning (almost) the whole frame, or a filled disc (a reconstruction circle
    smaller than the frame): round bounding box, filled like a disc (pi/4 of its box).
    """
    if _spans(box, shape):
        return True
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    if min(bw, bh) == 0 or abs(bw - bh) > 0.03 * max(bw, bh):
        return False
    fill = area / float(bw * bh)
    return abs(fill - math.pi / 4) < 0.03


@dataclass(frozen=True)
class _Body:
    """The body found on the shrunk analysis copy (all coordinates in its pixels)."""

    box: tuple[int, int, int, int]  # union box of the kept components, end-exclusive
    labels: np.ndarray  # component labels of the opened threshold mask
    keep: np.ndarray  # label ids kept as body (largest + those >= _KEEP_FRACTION of it)
    threshold: float  # gray level of the accepted threshold (body > threshold)
    frame_like: bool  # the accepted region is the field of view, not a body
    kernel: np.ndarray  # the opening's disc
    spans_frame: bool  # the first level's region spanned the frame (a tight crop)
    stats: np.ndarray  # OpenCV component stats of ``labels`` (row 0: background)
    centroids: np.ndarray  # component centres (x, y)


def _small_gray(img: np.ndarray) -> tuple[np.ndarray, float]:
    """8-bit copy with the long side at most ``_MASK_SIDE`` pixels, and its scale factor."""
    g = to_uint8(img)  # masks are found in 8 bits; the caller's image keeps its depth
    h, w = g.shape
    s = min(1.0, _MASK_SIDE / max(h, w))
    if s >= 1.0:
        return g, s
    return cv2.resize(g, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA), s


def _find_body(small: np.ndarray) -> _Body | None:
    """Steps 1-2 of :func:`body_bbox` on the shrunk copy; None when nothing body-like is found."""
    if int(small.max()) == int(small.min()):
        return None
    sh, sw = small.shape
    k = max(3, int(round(0.04 * max(sh, sw))) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    min_area = _MIN_BODY_FRACTION * sh * sw
    found = None
    values = small.ravel()
    for _level in range(3):
        if values.size < 2 or int(values.min()) == int(values.max()):
            break
        t = _otsu(values)
        res = _largest_regions((small > t).astype(np.uint8), kernel)
        if res is None or res[0] < min_area:
            break
        frame = _frame_like(res[0], res[1], (sh, sw))
        spans = found.spans_frame if found is not None else _spans(res[1], (sh, sw))
        found = _Body(res[1], res[2], res[3], t, frame, kernel, spans, res[4], res[5])
        if not frame:
            break
        values = values[values > t]
    return found


def _full_box(box: tuple[int, int, int, int], s: float, shape: tuple[int, int],
              margin_px: int = 0) -> tuple[int, int, int, int]:
    """A box of the shrunk copy at full resolution (floor / ceil: never lose a pixel), grown by
    ``margin_px`` and clipped to the image."""
    h, w = shape
    x0, y0, x1, y1 = box
    return (max(0, int(math.floor(x0 / s)) - margin_px), max(0, int(math.floor(y0 / s)) - margin_px),
            min(w, int(math.ceil(x1 / s)) + margin_px), min(h, int(math.ceil(y1 / s)) + margin_px))


def body_bbox(img: np.ndarray, margin: float = 0.02) -> tuple[int, int, int, int] | None:
    """Bounding box ``(xmin, ymin, xmax, ymax)`` (end-exclusive) of the body in a CT slice.

    The algorithm (on a copy shrunk to 128 px: masks need no more detail):

    1. Otsu threshold, opening with a disc of ~4% of the image side (cuts thin links such as a
       scanner table touching the body and removes thin table rails / text), connected
       components: the largest one is the body; components at least a quarter of its area are
       kept with it (second lung of a lung-masked slice, arms), smaller ones (table) dropped.
    2. If that region is the scanner's field of view -- it spans the frame, or it is a filled
       disc (a reconstruction circle) -- the threshold is raised (Otsu again on the pixels above
       it) and step 1 repeated, at most 3 levels; a level whose largest component is under 2%
       of the image is not a body and the previous level's answer stands.
    3. The box is grown by ``margin`` (fraction of the larger image side) and clipped.

    Returns:
        The box, or None when nothing body-like is found (blank or featureless image).
    """
    img = _check_image(img)
    small, s = _small_gray(img)
    body = _find_body(small)
    if body is None:
        return None
    return _full_box(body.box, s, img.shape, int(round(margin * max(img.shape))))


def _check_bbox(bbox: Sequence[Any], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    h, w = shape
    try:
        vals = [float(v) for v in bbox]
    except (TypeError, ValueError):
        raise ValueError(f"bbox must be four numbers (xmin, ymin, xmax, ymax), got {bbox!r}") from None
    if len(vals) != 4:
        raise ValueError(f"bbox must be four numbers (xmin, ymin, xmax, ymax), got {len(vals)} values: {bbox!r}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"bbox has a missing / non-finite value: {bbox!r}")
    x0, y0, x1, y1 = (int(round(v)) for v in vals)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(
            f"bbox (xmin={x0}, ymin={y0}, xmax={x1}, ymax={y1}) lies outside the {w}x{h} image or is "
            f"empty; need 0 <= xmin < xmax <= {w} and 0 <= ymin < ymax <= {h} (end-exclusive pixels)"
        )
    return x0, y0, x1, y1


def crop_body(
    img: np.ndarray, bbox: Sequence[float] | None = None, margin: float = 0.02
) -> np.ndarray:
    """Crop a CT slice to the body: background, scanner table and padding removed.

    Args:
        img: 2-D ``uint8`` / ``uint16`` image.
        bbox: optional ``(xmin, ymin, xmax, ymax)`` in pixels, end-exclusive (COVIDx CT
            convention, ``img[ymin:ymax, xmin:xmax]``); used as given, without margin.
        margin: with automatic detection, grow the body box by this fraction of the larger image
            side on every side (clipped to the image).

    Returns:
        The cropped image (a copy, same dtype). When nothing body-like is found (e.g. a blank
        image) the image is returned uncropped, with a ``UserWarning``.

    Raises:
        ValueError: bad image, or a bbox that is empty or outside the image.
    """
    img = _check_image(img)
    if bbox is not None:
        x0, y0, x1, y1 = _check_bbox(bbox, img.shape)
        return img[y0:y1, x0:x1].copy()
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be a fraction of the image side in [0, 0.5), got {margin!r}")
    box = body_bbox(img, margin)
    if box is None:
        warnings.warn(
            "crop_body: no body-like region found (blank or featureless image); returned uncropped",
            UserWarning,
            stacklevel=2,
        )
        return img.copy()
    x0, y0, x1, y1 = box
    return img[y0:y1, x0:x1].copy()


def crop_border(
    img: np.ndarray, tol: float = 0.03, text_fraction: float = 0.05, max_fraction: float = 0.25
) -> np.ndarray:
    """Trim uniform borders (and text margins) from a chest X-ray.

    From each side, lines (rows / columns) are removed while they are uniform: at most
    ``text_fraction`` of the line's pixels differ by more than ``tol`` (fraction of the dtype's
    range) from the outermost line's median. Black or white frames, scanner padding and margins
    carrying sparse burned-in text (labels, dates) go; text printed over the lung field itself is
    left alone (removing it would need inpainting, not cropping). At most ``max_fraction`` of the
    height / width is removed per side.

    Args:
        img: 2-D ``uint8`` / ``uint16`` radiograph.
        tol: intensity tolerance, fraction of 255 / 65535.
        text_fraction: share of a border line allowed to differ (burned-in text).
        max_fraction: most that may be trimmed from one side.

    Returns:
        The cropped image (a copy, same dtype); unchanged when there is no uniform border.
    """
    img = _check_image(img)
    if not (0 <= tol <= 1 and 0 <= text_fraction < 1 and 0 <= max_fraction < 0.5):
        raise ValueError(
            f"need 0 <= tol <= 1, 0 <= text_fraction < 1, 0 <= max_fraction < 0.5; "
            f"got tol={tol!r}, text_fraction={text_fraction!r}, max_fraction={max_fraction!r}"
        )
    h, w = img.shape
    tolv = tol * _max_value(img)

    def depth(band: np.ndarray) -> int:
        # band: lines stacked along axis 0, outermost first
        if band.shape[0] == 0:
            return 0
        ref = float(np.median(band[0]))
        off = (np.abs(band.astype(np.float32) - ref) > tolv).mean(axis=1)
        bad = np.flatnonzero(off > text_fraction)
        return int(bad[0]) if bad.size else band.shape[0]

    mh, mw = int(max_fraction * h), int(max_fraction * w)
    top = depth(img[:mh])
    bottom = depth(img[h - mh :][::-1]) if mh else 0
    left = depth(img[:, :mw].T)
    right = depth(img[:, w - mw :][:, ::-1].T) if mw else 0
    return img[top : h - bottom, left : w - right].copy()
