"""Image enhancement for chest CT and X-ray: body crop, white balance, CLAHE, DCT denoising.

AICOV-CT's published pre-processing, rebuilt so that each step does what its name says:

* :func:`crop_body` -- finds the body automatically (threshold, morphology, connected components)
  and drops background, scanner table and padding; uses a given bounding box (COVIDx
  ``xmin, ymin, xmax, ymax``) when there is one. The seed could only crop from a given box.
  :func:`crop_border` is the X-ray counterpart: it trims uniform borders / text margins.
* :func:`crop_lungs` -- a tighter, lung-field crop (step ``lungcrop``): air enclosed by the
  body, largest two regions, morphology (:func:`find_lungs`); falls back to the body crop, with
  a warning saying why, when no plausible lung field is found. No learned weights.
* :func:`white_balance` -- the seed's 0.05 / 99.95 percentile stretch, applied ONCE to the gray
  image (the seed stretched three identical channels separately); ``gray_world`` for true colour.
* :func:`clahe` -- OpenCV CLAHE, clip 2.0 on a 16x16 tile grid (the seed's values).
* :func:`dct_denoise` -- a real DCT-domain denoiser (overlapping 8x8 blocks, hard threshold at
  3 sigma; Yu & Sapiro, IPOL 2011). The seed's "DCT" step was ``idct(dct(x))``: an identity.

Every step is a pure function of a 2-D ``uint8`` / ``uint16`` array. :data:`PIPELINES` names the
step chains compared in the enhancement ablation; :func:`enhance` runs one on an image and
:func:`pipeline_config` gives the JSON-serialisable record of a chain and all its parameters.
:func:`enhance_tree` / :func:`enhance_manifest` run a chain over a folder or manifest on all
cores, with atomic writes, resume and a failure report. The destination is checked before any work
(never the source, never inside it unless asked); each output PNG carries a stamp of the source it
was made from, so resume redoes outputs whose source changed; workers end when the process that
started them dies (even by SIGKILL); a full or read-only destination stops the pass at once.

Only numpy and OpenCV are imported here (pandas / tqdm lazily): no keras, no tensorflow.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np

from covidlib.fsutil import atomic_write_bytes

from covidlib import config

__all__ = [
    "PIPELINES",
    "ENHANCE_VERSION",
    "crop_body",
    "crop_border",
    "body_bbox",
    "crop_lungs",
    "find_lungs",
    "LungField",
    "CROP_STEPS",
    "white_balance",
    "clahe",
    "estimate_sigma",
    "dct_denoise",
    "enhance",
    "pipeline_config",
    "enhance_tree",
    "enhance_manifest",
]

#: Bump when any step's output changes for the same parameters: it is part of every recorded
#: config, so an enhanced set made by an older version is never silently resumed or mixed.
ENHANCE_VERSION = 1

#: Named step chains. ``crop+wb+clahe`` is the seed's hybrid.
PIPELINES: dict[str, tuple[str, ...]] = {
    "none": (),
    "crop": ("crop",),
    "crop+wb": ("crop", "wb"),
    "crop+clahe": ("crop", "clahe"),
    "crop+wb+clahe": ("crop", "wb", "clahe"),
    "crop+dct+wb+clahe": ("crop", "dct", "wb", "clahe"),
    # Lung-field crop instead of the body crop (every prefix is named, so the ablation's
    # step-by-step preview finds each one).
    "lungcrop": ("lungcrop",),
    "lungcrop+wb": ("lungcrop", "wb"),
    "lungcrop+wb+clahe": ("lungcrop", "wb", "clahe"),
}

#: Steps that crop (a manifest's bounding box no longer applies to their output).
CROP_STEPS: tuple[str, ...] = ("crop", "lungcrop")

# Pipeline parameters per step, with defaults (``enhance`` takes them flat: a name shared by
# two steps means the same thing in both, and no pipeline has both crops). The X-ray border
# crop's parameters carry a ``border_`` prefix; ``lungcrop`` falls back to the body crop (and
# uses the border crop for X-ray), so it takes the body crop's parameters too.
_CROP_PARAMS: dict[str, Any] = {"margin": 0.02, "border_tol": 0.03, "border_text_fraction": 0.05,
                                "border_max_fraction": 0.25}
_STEP_PARAMS: dict[str, dict[str, Any]] = {
    "crop": dict(_CROP_PARAMS),
    "lungcrop": {**_CROP_PARAMS, "lung_margin": 0.05},
    "dct": {"sigma": None, "block": 8, "step": 4},
    "wb": {"low": 0.05, "high": 99.95},
    "clahe": {"clip_limit": 2.0, "tile_grid": (16, 16)},
}

# PNG: lossless; level 1 + RLE strategy is the fastest setting and, on CT, also the smallest.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]

_TMP_SUFFIX = ".enh-tmp"
_STATE_FILE = "enhance.json"
_FAILURES_FILE = "enhance_failures.csv"
_MANIFEST_FILE = "manifest.csv"


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
    raise ValueError(f"{name} must be {want}, got shape {a.shape} (covidlib.io.read_image returns 2-D gray)")


def _max_value(a: np.ndarray) -> int:
    return 255 if a.dtype == np.uint8 else 65535


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """``uint8`` unchanged; ``uint16`` min-max scaled by its range (as ``covidlib.io.to_uint8``)."""
    if img.dtype == np.uint8:
        return img
    try:
        from covidlib.io import to_uint8
    except ImportError:  # pragma: no cover - io is part of the package
        lo, hi = int(img.min()), int(img.max())
        if hi <= lo:
            return np.zeros(img.shape, np.uint8)
        return np.clip(np.rint((img.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return to_uint8(img)


def _gray_for_analysis(img: np.ndarray) -> np.ndarray:
    """8-bit view of an image for mask finding only (never returned to the caller)."""
    return img if img.dtype == np.uint8 else _to_uint8(img)


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
    n, labels, stats, cents = cv2.connectedComponentsWithStats(mask, connectivity=8)
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
    g = _gray_for_analysis(img)
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

    The algorithm (on a copy shrunk to 128 px, so it costs well under a millisecond):

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


# --------------------------------------------------------------------------------------------
# Lung-field crop
# --------------------------------------------------------------------------------------------

# Air covering less than this fraction of the body's cross-section is no plausible lung field
# (mid-chest slices: 25-50 %; the apex and the recesses just above the diaphragm: about 5 %).
_MIN_LUNG_FRACTION = 0.03
# The second enclosed air region is the other lung only when it is at least this fraction of the
# first; smaller ones (trachea, oesophagus, a lone bowel-gas bubble) are left out.
_SECOND_LUNG_FRACTION = 0.1
# An air region is a lung only when at most this share of its contour borders the outside of
# the body: a lung reaching a chest wall thinner than a pixel of the analysis copy does so
# along a short arc, air outside the body caught in the torso's convex hull along a chord.
_MAX_OPEN_FRACTION = 0.2
# Tissue on at least this share of the frame's perimeter: the image is cropped to the chest
# already (whole-field-of-view slices: under 10 %).
_TIGHT_FRAME_FRACTION = 0.15
# In an image cropped to the chest, a lung may border the frame along at most this share of its
# contour.
_MAX_FRAME_FRACTION = 0.4
# Aerated lung is denser than air (about -850 against -1000 HU): in a lung window some 25 gray
# levels brighter than the air outside the body; an outside-air pocket is not brighter at all.
_AIR_CONTRAST = 5.0


@dataclass(frozen=True)
class LungField:
    """What :func:`find_lungs` found in one image.

    Attributes:
        box: ``(xmin, ymin, xmax, ymax)`` end-exclusive crop box (lungs + margin), or None.
        mask: full-resolution boolean lung mask (vessels and lesions inside filled in), or None.
        reason: why no lung field was accepted ("" when one was).
        fallback: what :func:`crop_lungs` does without a lung field: ``"body"`` (body crop) or
            ``"none"`` (no crop: no body found, or an image cropped to the chest already, where
            the body crop often finds the mediastinum alone and would cut the lungs off).
    """

    box: tuple[int, int, int, int] | None
    mask: np.ndarray | None
    reason: str
    fallback: str = "body"


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` (0/1) plus every background region not connected to the image border."""
    h, w = mask.shape
    pad = np.zeros((h + 2, w + 2), np.uint8)
    pad[1:-1, 1:-1] = mask
    cv2.floodFill(pad, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 2)  # the outside becomes 2
    return (pad[1:-1, 1:-1] != 2).astype(np.uint8)


def _torso(body: _Body) -> int:
    """Label id of the largest kept body component (the torso)."""
    return int(body.keep[np.argmax(body.stats[body.keep, cv2.CC_STAT_AREA])])


def _body_parts(body: _Body) -> np.ndarray:
    """Label ids of the body's parts: the kept components, and pieces of chest wall beside them.

    The opening breaks a thin lateral chest wall into pieces too small to be kept with the
    torso; a piece is taken when it is at least 2% of the torso, its centre lies level with the
    body (a table lies below it) and it reaches past the body's box to the left or right (a
    piece between the lungs of a lung-masked image does not).
    """
    st, cy = body.stats, body.centroids[:, 1]
    x0, y0, x1, y1 = body.box
    left, right = st[:, cv2.CC_STAT_LEFT], st[:, cv2.CC_STAT_LEFT] + st[:, cv2.CC_STAT_WIDTH]
    ok = ((st[:, cv2.CC_STAT_AREA] >= 0.02 * st[_torso(body), cv2.CC_STAT_AREA])
          & (cy >= y0) & (cy < y1) & ((left < x0) | (right > x1)))
    ok[0] = False  # background
    return np.union1d(body.keep, np.flatnonzero(ok))


def _body_inside(sm: np.ndarray, body: _Body) -> tuple[np.ndarray, np.ndarray]:
    """The body's region to search: its walls with all they enclose plus their convex hull, and
    the enclosed part alone (bool masks)."""
    parts = np.isin(body.labels, _body_parts(body)).astype(np.uint8)
    # The opening cuts thin chest walls; the unopened threshold mask keeps them, so the lungs
    # are enclosed: its components that hold a body part make the wall.
    raw = (sm > body.threshold).astype(np.uint8)
    _, raw_labels = cv2.connectedComponents(raw, connectivity=8)
    hit = np.unique(raw_labels[parts > 0])
    wall = np.isin(raw_labels, hit[hit > 0]).astype(np.uint8)
    # A chest cross-section is close to convex: a lung reaching a wall too thin for this copy,
    # or cut by the frame of a tightly cropped figure, still lies inside the body's convex hull.
    hull = np.zeros_like(wall)
    contours, _ = cv2.findContours(parts, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.fillConvexPoly(hull, cv2.convexHull(np.vstack(contours)), 1)
    enclosed = _fill_holes(wall)
    return (enclosed | hull).astype(bool), enclosed.astype(bool)


def _enclosed_air(sm: np.ndarray, inside: np.ndarray, box: tuple[int, int, int, int],
                  frame_outside: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Air regions inside the body, and how much of each one's contour borders the outside.

    The threshold is Otsu's on the body's own pixels: exports come with unknown windows, so no
    fixed gray level means a fixed HU value, while aerated lung against soft tissue is bimodal
    in any lung or mediastinal window. Candidates have their centre in ``box`` (not in air
    caught between the body and a table).

    Returns:
        ``(labels, ids, open_share, stats)``: ids sorted by decreasing area; per label, the
        share of its contour bordering the outside of ``inside`` (the frame too when
        ``frame_outside``) and OpenCV's component stats (box, area) with the centre column
        appended.
    """
    t = _otsu(sm[inside])
    air = (inside & (sm <= t)).astype(np.uint8)
    n, labels, stats, cents = cv2.connectedComponentsWithStats(air, connectivity=4)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    contour = air.astype(bool) & ~cv2.erode(np.pad(air, 1), cross)[1:-1, 1:-1].astype(bool)
    outside = np.pad(~inside, 1, constant_values=frame_outside).astype(np.uint8)
    open_px = contour & cv2.dilate(outside, cross)[1:-1, 1:-1].astype(bool)
    share = np.bincount(labels[open_px], minlength=n) / np.maximum(np.bincount(labels[contour], minlength=n), 1)
    x0, y0, x1, y1 = box
    ok = (cents[:, 0] >= x0) & (cents[:, 0] < x1) & (cents[:, 1] >= y0) & (cents[:, 1] < y1)
    ids = np.flatnonzero(ok[1:]) + 1
    stats = np.column_stack([stats, cents[:, 0]])
    return labels, ids[np.argsort(-stats[ids, cv2.CC_STAT_AREA], kind="stable")], share, stats


def _pick_lungs(sm: np.ndarray, inside: np.ndarray, enclosed: np.ndarray, box: tuple[int, int, int, int],
                frame_outside: bool, kernel: np.ndarray, mid: float, max_open: float
                ) -> tuple[np.ndarray | None, str, int]:
    """The lung mask among the air in ``inside`` (None and the reason when there is none) and how
    many lungs it holds.

    The first lung is the largest air region bordering the outside along at most ``max_open``
    of its contour, at least half the plausible lung area on its own, and either lying mostly
    in ``enclosed`` (enclosed by the body's walls, not only by its hull) or brighter on average
    than the air outside the body by ``_AIR_CONTRAST`` gray levels (aerated lung is denser than
    air): the black gap between the lungs of a lung-masked image is neither. The second the next
    such region, else one beside the first across the midline ``mid`` (its centre across it,
    no column shared with the first, rows overlapping by half) bordering the outside along up
    to twice that -- a lung behind a chest wall too thin to see; outside air caught in the
    body's hull does not sit beside a lung like that -- when it is at least
    ``_SECOND_LUNG_FRACTION`` of the first.
    """
    vals = sm[inside]
    if int(vals.min()) == int(vals.max()):
        return None, "the body region is featureless", 0
    labels, ids, share, st = _enclosed_air(sm, inside, box, frame_outside)
    area = st[:, cv2.CC_STAT_AREA]
    lung_like = np.bincount(labels[enclosed], minlength=len(area)) >= 0.5 * area
    if not inside.all():
        mean = np.bincount(labels.ravel(), weights=sm.ravel(), minlength=len(area)) / np.maximum(area, 1)
        lung_like |= mean >= float(np.median(sm[~inside])) + _AIR_CONTRAST
    strict = ids[(share[ids] <= max_open) & lung_like[ids]]
    if strict.size == 0 or area[strict[0]] < 0.5 * _MIN_LUNG_FRACTION * inside.sum():
        return None, ("no air enclosed by the body (an image already masked to the lungs, "
                      "a slice below the lungs, or no CT slice)"), 0
    first = strict[0]
    left, top = st[:, cv2.CC_STAT_LEFT], st[:, cv2.CC_STAT_TOP]
    right, bottom = left + st[:, cv2.CC_STAT_WIDTH], top + st[:, cv2.CC_STAT_HEIGHT]
    rows = np.minimum(bottom, bottom[first]) - np.maximum(top, top[first])
    beside = (((st[:, -1] - mid) * (st[first, -1] - mid) < 0)
              & ((right <= left[first]) | (left >= right[first]))
              & (rows >= 0.5 * np.minimum(st[:, cv2.CC_STAT_HEIGHT], st[first, cv2.CC_STAT_HEIGHT])))
    others = ids[(ids != first) & (area[ids] >= _SECOND_LUNG_FRACTION * area[first])]
    rest = np.concatenate([others[share[others] <= max_open],
                           others[beside[others] & (share[others] > max_open) & (share[others] <= 2 * max_open)]])
    chosen = [first] + [int(i) for i in rest[:1]]
    lung = np.isin(labels, chosen).astype(np.uint8)
    # Vessels, nodules and dense lesions inside a lung are tissue-bright: close and fill them in.
    lung = _fill_holes(cv2.morphologyEx(lung, cv2.MORPH_CLOSE, kernel)).astype(bool) & inside
    frac = float(lung.sum()) / float(inside.sum())
    if frac < _MIN_LUNG_FRACTION:
        return None, (f"enclosed air covers {frac:.1%} of the body (< {_MIN_LUNG_FRACTION:.0%}): "
                      "no plausible lung field"), 0
    return lung, "", len(chosen)


@dataclass(frozen=True)
class _LungSearch:
    lung: np.ndarray | None  # lung mask on the shrunk copy
    inside: np.ndarray  # the body region searched
    reason: str  # why no lung field ("" when found)
    tight: bool  # the image is cropped to the chest already
    mid: float  # midline column the box is mirrored about
    n_lungs: int  # regions in the mask (1: the box is mirrored about ``mid``)


def _lung_mask_small(small: np.ndarray, body: _Body) -> _LungSearch:
    """The lung search on the shrunk copy.

    ``tight``: the image is cropped to the chest already (a figure, or our own lung crop): the
    first threshold's region spans the frame, or tissue covers at least
    ``_TIGHT_FRAME_FRACTION`` of the frame's perimeter. The body found there is often the
    mediastinum alone, the chest wall being cut into pieces by the frame; so the whole frame is
    taken as the body first (midline: the frame's centre), then the body found.
    """
    sm = cv2.medianBlur(small, 3)  # CT noise would bridge lungs and outside air pixel by pixel
    tissue = sm > body.threshold
    rim = np.concatenate([tissue[0], tissue[-1], tissue[:, 0], tissue[:, -1]])
    tight = body.spans_frame or bool(rim.mean() >= _TIGHT_FRAME_FRACTION)
    lung = None
    if tight:
        # Lungs cut by the frame border it along a short stretch; dark strips along the frame
        # (figure borders, background beside a radiograph's body) along half their contour.
        inside, mid = np.ones(sm.shape, bool), sm.shape[1] / 2.0
        lung, reason, n = _pick_lungs(sm, inside, inside, (0, 0, sm.shape[1], sm.shape[0]), True, body.kernel,
                                      mid, _MAX_FRAME_FRACTION)
    if lung is None:
        (inside, enclosed), mid = _body_inside(sm, body), (body.box[0] + body.box[2]) / 2.0
        lung, reason, n = _pick_lungs(sm, inside, enclosed, body.box, body.frame_like, body.kernel, mid,
                                      _MAX_OPEN_FRACTION)
    return _LungSearch(lung, inside, reason, tight, mid, n)


def _lung_box(found: _LungSearch) -> tuple[int, int, int, int]:
    """The lung mask's box; with one lung only, widened to be symmetric about the midline.

    A lung that is dense from end to end (white-out, large effusion) is not air and would be cut
    off; the mirror image of the other lung's extent keeps it in the crop.
    """
    ys, xs = np.nonzero(found.lung)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    if found.n_lungs > 1:
        return x0, y0, x1, y1
    mid = found.mid
    bx = np.nonzero(found.inside.any(axis=0))[0]
    return (max(int(bx[0]), min(x0, int(math.floor(2 * mid - x1)))), y0,
            min(int(bx[-1]) + 1, max(x1, int(math.ceil(2 * mid - x0)))), y1)


def find_lungs(img: np.ndarray, margin: float = 0.05) -> LungField:
    """Find the lung field of a CT slice (classical: no learned weights).

    On a copy shrunk to 128 px and median-filtered (noise would bridge lungs and outside air):

    1. The body as :func:`body_bbox` finds it; its cross-section is the unopened threshold
       mask's components that hold it (and pieces of a thin lateral chest wall beside it), with
       all they enclose filled in, plus their convex hull (a lung behind a wall too thin for
       the copy stays inside). In an image cropped to the chest already (tissue along the
       frame) the whole frame is searched first.
    2. Air: pixels of that region at or below Otsu's threshold of the region's own pixels.
    3. Air regions whose centre lies outside the body's box (air between body and table) are
       dropped. The first lung is the largest region whose contour borders the outside of the
       body along at most a fifth (outside air caught in the hull borders it along a chord),
       and at least 1.5% of the body; the second, at least a tenth of the first, is the next
       such region, or one level with the first across the midline bordering the outside along
       up to two fifths (a lung behind a wall too thin to see). The mask is closed and filled
       (vessels, nodules, lesions inside a lung); all of it must be 3% of the body.
    4. The mask's box -- with one lung only, widened to be symmetric about the midline (a
       white-out lung is no air, and would be cut off) -- is grown by ``margin`` (fraction of
       the larger image side; a table lies well below the lungs' bases, behind the spine and
       back muscles).

    Returns:
        A :class:`LungField`; ``box`` None with the ``reason`` when no plausible lung field is
        found: blank or featureless image, no enclosed air (an image already masked to the
        lungs, a slice below the lungs, no CT slice), or enclosed air under 3% of the body.
    """
    img = _check_image(img)
    if not 0 <= margin < 0.5:
        raise ValueError(f"lung margin must be a fraction of the image side in [0, 0.5), got {margin!r}")
    small, s = _small_gray(img)
    body = _find_body(small)
    if body is None:
        return LungField(None, None, "no body-like region found (blank or featureless image)", "none")
    found = _lung_mask_small(small, body)
    if found.lung is None:
        if found.tight:
            return LungField(None, None, found.reason + " in an image cropped to the chest already", "none")
        return LungField(None, None, found.reason)
    h, w = img.shape
    box = _full_box(_lung_box(found), s, (h, w), int(round(margin * max(h, w))))
    mask = cv2.resize(found.lung.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return LungField(box, mask, "")


def crop_lungs(
    img: np.ndarray,
    bbox: Sequence[float] | None = None,
    margin: float = 0.02,
    lung_margin: float = 0.05,
) -> np.ndarray:
    """Crop a CT slice to its lung field (:func:`find_lungs`), so a model sees the lungs rather
    than background, table, arms or burned-in text.

    Args:
        img: 2-D ``uint8`` / ``uint16`` image.
        bbox: optional body box ``(xmin, ymin, xmax, ymax)`` (end-exclusive, COVIDx): the image
            is cut to it first and the lungs are searched inside it.
        margin: the body crop's margin, used when falling back (see :func:`crop_body`).
        lung_margin: grow the lung box by this fraction of the larger image side.

    Returns:
        The cropped image (a copy, same dtype, never empty). When no plausible lung field is
        found it falls back, with a ``UserWarning`` that says why, to the given box, else to
        :func:`crop_body`, or to no crop when :attr:`LungField.fallback` says so (no body, or
        an image already cropped to the chest).
    """
    img = _check_image(img)
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be a fraction of the image side in [0, 0.5), got {margin!r}")
    if bbox is not None:
        img = crop_body(img, bbox)
    field = find_lungs(img, lung_margin)
    if field.box is not None:
        x0, y0, x1, y1 = field.box
        return img[y0:y1, x0:x1].copy()
    if bbox is not None or field.fallback == "none":
        warnings.warn(f"crop_lungs: {field.reason}; returned {'the given box' if bbox is not None else 'uncropped'}",
                      UserWarning, stacklevel=2)
        return img.copy()
    warnings.warn(f"crop_lungs: {field.reason}; used the body crop instead", UserWarning, stacklevel=2)
    x0, y0, x1, y1 = body_bbox(img, margin) or (0, 0, img.shape[1], img.shape[0])
    return img[y0:y1, x0:x1].copy()


# --------------------------------------------------------------------------------------------
# White balance (percentile stretch) and CLAHE
# --------------------------------------------------------------------------------------------


def _histogram(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8 and img.size < 2**24 and img.ndim == 2:
        # calcHist counts in float32: exact below 2**24 pixels, and 5x faster than bincount
        return cv2.calcHist([img], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return np.bincount(img.ravel(), minlength=_max_value(img) + 1)


def _percentile_bounds(img: np.ndarray, low: float, high: float) -> tuple[int, int]:
    """Nearest-rank percentiles: numpy's ``method="lower"`` for low, ``"higher"`` for high."""
    cdf = np.cumsum(_histogram(img))
    n = int(cdf[-1])
    lo_rank = math.floor(low / 100.0 * (n - 1))
    hi_rank = math.ceil(high / 100.0 * (n - 1))
    lo = int(np.searchsorted(cdf, lo_rank, side="right"))
    hi = int(np.searchsorted(cdf, hi_rank, side="right"))
    return lo, hi


def white_balance(
    img: np.ndarray, low: float = 0.05, high: float = 99.95, method: str = "percentile"
) -> np.ndarray:
    """Contrast stretch ("white balance" in the seed) to the full ``uint8`` range.

    ``percentile``: the values at the ``low`` / ``high`` percentiles (nearest rank) of the whole
    image map to 0 / 255, linearly, clipped. One stretch for the whole image -- a colour input
    gets the same mapping on every channel (the seed stretched three identical gray channels
    separately, three times the work for the same result on gray, and a colour shift otherwise).

    ``gray_world``: for true-colour (H, W, 3) images only; each channel is scaled so its mean
    equals the mean of the three channel means.

    Args:
        img: 2-D ``uint8`` / ``uint16`` image, or (H, W, 3) for either method.
        low, high: percentiles, 0 <= low < high <= 100.
        method: ``"percentile"`` or ``"gray_world"``.

    Returns:
        ``uint8`` image of the same shape. A constant image has nothing to stretch: it is only
        converted to ``uint8`` (value * 255 / dtype max).
    """
    img = _check_image(img, allow_color=True)
    if method == "gray_world":
        if img.ndim != 3:
            raise ValueError("white_balance(method='gray_world') needs an (H, W, 3) colour image; use 'percentile' for gray")
        f = img.astype(np.float32)
        means = f.reshape(-1, 3).mean(axis=0)
        gains = np.where(means > 0, means.mean() / np.maximum(means, 1e-12), 1.0).astype(np.float32)
        f *= gains
        scale = 255.0 / _max_value(img)
        return np.clip(np.rint(f * scale), 0, 255).astype(np.uint8)
    if method != "percentile":
        raise ValueError(f"white_balance method must be 'percentile' or 'gray_world', got {method!r}")
    if not (0 <= low < high <= 100):
        raise ValueError(f"need 0 <= low < high <= 100, got low={low!r}, high={high!r}")
    lo, hi = _percentile_bounds(img, low, high)
    vmax = _max_value(img)
    v = np.arange(vmax + 1, dtype=np.float64)
    if hi <= lo:
        lut = np.rint(v * (255.0 / vmax))
    else:
        lut = np.rint((v - lo) * (255.0 / (hi - lo)))
    lut = np.clip(lut, 0, 255).astype(np.uint8)
    if img.dtype == np.uint8:
        return cv2.LUT(img, lut)
    return lut[img]


_CLAHE_LOCAL = threading.local()


def _clahe_object(clip_limit: float, tile_grid: tuple[int, int]):
    # Creating a CLAHE object is costly and applying one is not thread-safe (it keeps buffers),
    # so keep one per parameter set per thread.
    cache = getattr(_CLAHE_LOCAL, "cache", None)
    if cache is None:
        cache = _CLAHE_LOCAL.cache = {}
    key = (float(clip_limit), (int(tile_grid[0]), int(tile_grid[1])))
    obj = cache.get(key)
    if obj is None:
        obj = cache[key] = cv2.createCLAHE(clipLimit=key[0], tileGridSize=key[1])
    return obj


def _check_tile_grid(tile_grid: Any) -> tuple[int, int]:
    if isinstance(tile_grid, (int, np.integer)):
        tile_grid = (tile_grid, tile_grid)
    try:
        tx, ty = (int(v) for v in tile_grid)
    except (TypeError, ValueError):
        raise ValueError(f"tile_grid must be two positive ints (columns, rows), got {tile_grid!r}") from None
    if tx < 1 or ty < 1 or any(float(v) != int(v) for v in tile_grid):
        raise ValueError(f"tile_grid must be two positive ints (columns, rows), got {tile_grid!r}")
    return tx, ty


def clahe(img: np.ndarray, clip_limit: float = 2.0, tile_grid: Sequence[int] = (16, 16)) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV).

    Args:
        img: 2-D ``uint8`` or ``uint16`` image (``uint16`` is equalised in 16 bits).
        clip_limit: histogram clip limit (OpenCV units; the seed used 2.0).
        tile_grid: tiles across and down (OpenCV ``tileGridSize``; the seed used 16x16).

    Returns:
        Image of the same shape and dtype.
    """
    img = _check_image(img)
    if not (isinstance(clip_limit, (int, float, np.number)) and clip_limit > 0):
        raise ValueError(f"clip_limit must be a positive number, got {clip_limit!r}")
    grid = _check_tile_grid(tile_grid)
    return _clahe_object(float(clip_limit), grid).apply(np.ascontiguousarray(img))


# --------------------------------------------------------------------------------------------
# DCT denoising (Yu & Sapiro 2011)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``D @ x`` is the DCT of a length-n vector, ``D.T @ c`` inverts."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    d = d.astype(np.float32)
    d.setflags(write=False)
    return d


_BLAS_LIBS: Any = None
_WORKSPACE = threading.local()
_WORKSPACE_KEEP = 1 << 22  # 4 Mi float32 = 16 MB per buffer (a 2k x 2k image)


def _blas_libs() -> list:
    global _BLAS_LIBS
    if _BLAS_LIBS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS_LIBS = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # threadpoolctl absent or broken: run as is
            _BLAS_LIBS = []
    return _BLAS_LIBS


@contextmanager
def _single_thread_blas() -> Iterator[None]:
    """Keep BLAS on one thread: the 8x8 products are far too small to gain from threads, and
    OpenBLAS threads spinning next to other processes (or our own workers) cost 10x.

    Talks to the BLAS libraries directly (a C call each, about 1 us) rather than through
    ``threadpool_limits``, which rescans the loaded libraries every time (about 70 us, a
    noticeable share of one image's denoising)."""
    libs = _blas_libs()
    before = [lib.get_num_threads() for lib in libs]
    for lib, n in zip(libs, before):
        if n != 1:
            lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, before):
            if n != 1:
                lib.set_num_threads(n)


def _workspace(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A reusable float32 scratch array of ``shape`` (per thread, grown on demand).

    Fresh multi-hundred-kB temporaries per operation made the denoiser several times slower than
    its arithmetic (allocation, page faults, cache misses); each buffer is now allocated once per
    thread and reused for every image. Buffers above ``_WORKSPACE_KEEP`` elements (images much
    larger than a CT slice, e.g. a 4k X-ray) are not kept, so a worker does not hold hundreds of
    MB after one big image."""
    n = math.prod(shape)
    if n > _WORKSPACE_KEEP:
        return np.empty(shape, np.float32)
    pool = getattr(_WORKSPACE, "pool", None)
    if pool is None:
        pool = _WORKSPACE.pool = {}
    buf = pool.get(name)
    if buf is None or buf.size < n:
        buf = pool[name] = np.empty(max(n, 1 << 16), np.float32)
    return buf[:n].reshape(shape)


def estimate_sigma(img: np.ndarray) -> float:
    """Noise standard deviation of an image, in its own units (Donoho's robust MAD estimator).

    The finest diagonal detail of an orthonormal Haar transform,
    ``(a - b - c + d) / 2`` over non-overlapping 2x2 blocks, is almost pure noise on natural /
    medical images and has the noise's standard deviation; ``sigma = median(|detail|) / 0.6745``.
    Constant 2x2 blocks (padding, clipped air, masked-out regions) carry no noise information and
    would drag the median to 0, so they are left out. The median is exact (a histogram of the
    integer ``|a - b - c + d|``).

    Returns:
        sigma >= 0 (0 for a constant image).
    """
    img = _check_image(img)
    h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
    if h == 0 or w == 0:
        return 0.0
    x = img[:h, :w]
    a, b, c, d = x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]
    varied = (a != b) | (a != c) | (a != d)
    wide = np.int16 if img.dtype == np.uint8 else np.int32  # |a - b - c + d| <= 2 * max
    s = np.abs((a.astype(wide) - b) - (c.astype(wide) - d))[varied]
    if s.size == 0:
        return 0.0
    cdf = np.cumsum(np.bincount(s))
    n = int(cdf[-1])
    # median of integers: mean of the two middle order statistics
    m1 = int(np.searchsorted(cdf, (n - 1) // 2, side="right"))
    m2 = int(np.searchsorted(cdf, n // 2, side="right"))
    return float((m1 + m2) / 2.0 / 2.0 / 0.6745)


def dct_denoise(
    img: np.ndarray, sigma: float | None = None, block: int = 8, step: int = 4
) -> np.ndarray:
    """DCT-domain denoising: overlapping-block DCT hard thresholding (Yu & Sapiro, IPOL 2011).

    Every ``block`` x ``block`` patch on a grid shifted by ``step`` pixels in x and y is
    transformed with an orthonormal 2-D DCT, coefficients with ``|c| < 3 sigma`` are set to zero
    (the DC term is always kept), the patches are transformed back and the overlapping estimates
    averaged. ``step=1`` is the paper's every-pixel version ((block/step)^2 = 64 shifted grids);
    the default ``step=4`` averages 4 grids, within about 1 dB of ``step=1`` at a small fraction
    of the cost (figures in docs/enhancement.md). The image is mirror-padded by one block so
    every pixel is covered by the same number of patches.

    It is vectorised: per x offset one row-DCT of the whole image (a ``(N, 8) @ (8, 8)``
    product), per y offset one batched column-DCT, threshold and inverse; the inverse row DCT is
    linear, so it is applied once per x offset to the sum over y offsets.

    Args:
        img: 2-D ``uint8`` / ``uint16`` image.
        sigma: noise standard deviation in the image's units; None = :func:`estimate_sigma`.
        block: patch side (8 as in the paper).
        step: grid shift between patch grids, 1..block.

    Returns:
        Denoised image, same shape and dtype (rounded, clipped). A copy of the input when sigma
        is 0.
    """
    img = _check_image(img)
    if not (isinstance(block, (int, np.integer)) and block >= 2):
        raise ValueError(f"block must be an int >= 2, got {block!r}")
    if not (isinstance(step, (int, np.integer)) and 1 <= step <= block):
        raise ValueError(f"step must be an int in 1..block ({block}), got {step!r}")
    if sigma is None:
        sigma = estimate_sigma(img)
    elif not (isinstance(sigma, (int, float, np.number)) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be None or a finite number >= 0, got {sigma!r}")
    if sigma == 0:
        return img.copy()
    b = int(block)
    d = _dct_matrix(b)
    dt = np.ascontiguousarray(d.T)
    h, w = img.shape
    padded = cv2.copyMakeBorder(img, b, b, b, b, cv2.BORDER_REFLECT_101)
    hp, wp = padded.shape
    x = _workspace("x", (hp, wp))
    np.copyto(x, padded)
    acc = _workspace("acc", (hp, wp))
    acc.fill(0.0)
    thr = float(3.0 * sigma)
    offsets = range(0, b, int(step))
    with _single_thread_blas():
        for dx in offsets:
            cw = ((wp - dx) // b) * b
            xs = _workspace("xs", (hp, cw))
            np.copyto(xs, x[:, dx : dx + cw])
            t = _workspace("t", (hp, cw))
            np.matmul(xs.reshape(-1, b), dt, out=t.reshape(-1, b))  # DCT along x
            acc_x = _workspace("acc_x", (hp, cw))
            acc_x.fill(0.0)
            for dy in offsets:
                nby = (hp - dy) // b
                r0, r1 = dy, dy + nby * b
                c = _workspace("c", (nby, b, cw))
                np.matmul(d, t[r0:r1].reshape(nby, b, cw), out=c)  # DCT along y: 2-D DCT of each patch
                keep = _workspace("keep", (nby, b, cw))
                np.abs(c, out=keep)
                k2 = keep.reshape(nby * b, cw)
                cv2.threshold(k2, thr, 1.0, cv2.THRESH_BINARY, dst=k2)  # 1 where |c| > 3 sigma
                keep[:, 0, 0::b] = 1.0  # the DC term (patch mean) is never thresholded
                np.multiply(c, keep, out=c)
                np.matmul(dt, c, out=keep)  # inverse along y
                acc_x[r0:r1] += k2
            # the inverse along x is linear and the same for every dy: once per dx on the sum
            np.matmul(acc_x.reshape(-1, b), d, out=xs.reshape(-1, b))
            acc[:, dx : dx + cw] += xs
    # scale, round to nearest and saturate to the input's type in one pass
    depth = cv2.CV_8U if img.dtype == np.uint8 else cv2.CV_16U
    return cv2.multiply(acc[b : b + h, b : b + w], 1.0 / (len(offsets) ** 2), dtype=depth)


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------


def _pipeline_steps(pipeline: str) -> tuple[str, ...]:
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown enhancement pipeline {pipeline!r}; valid names: {', '.join(PIPELINES)}")
    return PIPELINES[pipeline]


def _normalise_params(steps: tuple[str, ...], params: dict[str, Any]) -> dict[str, Any]:
    allowed: dict[str, Any] = {}
    for step in steps:
        allowed.update(_STEP_PARAMS[step])
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        every = sorted({k for p in _STEP_PARAMS.values() for k in p})
        used = sorted(allowed) or ["(none)"]
        raise ValueError(
            f"parameter(s) {unknown} not used by this pipeline (its parameters: {', '.join(used)}; "
            f"all enhancement parameters: {', '.join(every)})"
        )
    p = {**allowed, **params}
    out: dict[str, Any] = {}

    def num(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
        v = p[name]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a number, got {v!r}")
        v = float(v)
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            raise ValueError(f"{name}={v!r} out of range {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
        return v

    def integer(name: str, lo: int, hi: int) -> int:
        v = p[name]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer, float)) or float(v) != int(v):
            raise ValueError(f"{name} must be an int, got {v!r}")
        v = int(v)
        if not lo <= v <= hi:
            raise ValueError(f"{name}={v} out of range [{lo}, {hi}]")
        return v

    if any(step in CROP_STEPS for step in steps):
        out["margin"] = num("margin", 0.0, 0.5, hi_open=True)
        out["border_tol"] = num("border_tol", 0.0, 1.0)
        out["border_text_fraction"] = num("border_text_fraction", 0.0, 1.0, hi_open=True)
        out["border_max_fraction"] = num("border_max_fraction", 0.0, 0.5, hi_open=True)
    if "lungcrop" in steps:
        out["lung_margin"] = num("lung_margin", 0.0, 0.5, hi_open=True)
    if "dct" in steps:
        out["block"] = integer("block", 2, 64)
        out["step"] = integer("step", 1, out["block"])
        out["sigma"] = None if p["sigma"] is None else num("sigma", 0.0, float("inf"))
    if "wb" in steps:
        out["low"] = num("low", 0.0, 100.0)
        out["high"] = num("high", 0.0, 100.0)
        if not out["low"] < out["high"]:
            raise ValueError(f"need low < high, got low={out['low']}, high={out['high']}")
    if "clahe" in steps:
        out["clip_limit"] = num("clip_limit", 0.0, float("inf"), lo_open=True)
        out["tile_grid"] = list(_check_tile_grid(p["tile_grid"]))
    return dict(sorted(out.items()))


def _check_modality(modality: str) -> str:
    if modality not in config.MODALITIES:
        raise ValueError(f"modality must be one of {list(config.MODALITIES)}, got {modality!r}")
    return modality


def pipeline_config(pipeline: str = "crop+wb+clahe", modality: str = "ct", **params: Any) -> dict[str, Any]:
    """The full, JSON-serialisable description of an enhancement: recorded with every set / model.

    Args:
        pipeline: a name from :data:`PIPELINES`.
        modality: ``"ct"`` (body / lung crop) or ``"xray"`` (border crop).
        **params: step parameters overriding the defaults (``margin``, ``border_tol``,
            ``border_text_fraction``, ``border_max_fraction``, ``lung_margin``, ``sigma``,
            ``block``, ``step``, ``low``, ``high``, ``clip_limit``, ``tile_grid``); only those of
            the pipeline's steps.

    Returns:
        ``{"name", "steps", "modality", "params", "version"}`` with every parameter of the
        pipeline's steps filled in (floats as floats, ``tile_grid`` as a list), sorted keys, so
        equal settings always give equal dicts, also after a JSON round trip.

    Raises:
        ValueError: unknown pipeline (the message lists the valid names), unknown or out-of-range
            parameter, unknown modality.
    """
    steps = _pipeline_steps(pipeline)
    return {
        "name": pipeline,
        "steps": list(steps),
        "modality": _check_modality(modality),
        "params": _normalise_params(steps, params),
        "version": ENHANCE_VERSION,
    }


def _run_steps(img: np.ndarray, steps: Sequence[str], p: dict[str, Any], bbox, modality: str) -> np.ndarray:
    for step in steps:
        if step == "crop":
            if bbox is not None or modality == "ct":
                img = crop_body(img, bbox, p["margin"])
            else:
                img = crop_border(img, p["border_tol"], p["border_text_fraction"], p["border_max_fraction"])
        elif step == "lungcrop":
            # Radiographs have no air enclosed by tissue to find: they get the border crop.
            if bbox is not None or modality == "ct":
                img = crop_lungs(img, bbox, p["margin"], p["lung_margin"])
            else:
                img = crop_border(img, p["border_tol"], p["border_text_fraction"], p["border_max_fraction"])
        elif step == "dct":
            img = dct_denoise(img, p["sigma"], p["block"], p["step"])
        elif step == "wb":
            img = white_balance(img, p["low"], p["high"])
        elif step == "clahe":
            # 8-bit CLAHE: a 16-bit one has 65536-bin tile histograms and different clip semantics.
            img = clahe(_to_uint8(img), p["clip_limit"], p["tile_grid"])
        else:  # pragma: no cover - PIPELINES only names known steps
            raise AssertionError(step)
    return np.ascontiguousarray(_to_uint8(img))


def enhance(
    img: np.ndarray,
    pipeline: str = "crop+wb+clahe",
    bbox: Sequence[float] | None = None,
    modality: str = "ct",
    **params: Any,
) -> np.ndarray:
    """Run a named enhancement pipeline on one image.

    Steps run in the pipeline's order: ``crop`` (:func:`crop_body` for CT or whenever ``bbox`` is
    given, :func:`crop_border` for X-ray), ``lungcrop`` (:func:`crop_lungs` for CT or whenever
    ``bbox`` is given -- inside the box --, :func:`crop_border` for X-ray), ``dct``
    (:func:`dct_denoise`, on the source bit depth), ``wb`` (:func:`white_balance`, percentile), ``clahe`` (:func:`clahe`; a ``uint16``
    image not yet stretched is range-scaled to ``uint8`` first). The result is always ``uint8``:
    a ``uint16`` image left after the last step is range-scaled (``covidlib.io.to_uint8``).

    Args:
        img: 2-D ``uint8`` / ``uint16`` image.
        pipeline: a name from :data:`PIPELINES`.
        bbox: optional ``(xmin, ymin, xmax, ymax)`` crop box (end-exclusive).
        modality: ``"ct"`` or ``"xray"``.
        **params: step parameters, see :func:`pipeline_config`.

    Returns:
        2-D ``uint8`` image.
    """
    cfg = pipeline_config(pipeline, modality, **params)
    img = _check_image(img)
    return _run_steps(img, cfg["steps"], cfg["params"], bbox, modality)


# --------------------------------------------------------------------------------------------
# Batch pass
# --------------------------------------------------------------------------------------------


def _read(path: str) -> np.ndarray:
    """2-D gray uint8 / uint16 image; ``covidlib.io.read_image`` when present."""
    try:
        from covidlib.io import read_image
    except ImportError:  # pragma: no cover - io is part of the package
        data = np.fromfile(path, dtype=np.uint8)
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if img is None:
            raise ValueError("not a decodable image") from None
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if img.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
        return img
    return read_image(path)


def _encode_png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img, _PNG_PARAMS)
    if not ok:  # pragma: no cover - PNG encoding of a uint8 array does not fail
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _atomic_write_bytes(path: str, data: bytes) -> None:
    # The enhance-specific suffix lets a resumed run find and remove strays of a killed one.
    atomic_write_bytes(path, data, suffix=_TMP_SUFFIX)


# Every output PNG carries a stamp of the source it was made from (a tEXt chunk right after
# IHDR): resume redoes an output whose source changed since, and the stamp travels with the file
# itself, so a killed run can never leave an output that looks current but is not.
_STAMP_KEY = b"covidlib-source"
_IHDR_END = 33  # 8-byte signature + IHDR chunk (4 length + 4 type + 13 data + 4 CRC)


def _source_stamp(task: tuple) -> str | None:
    """Short digest of what an output depends on: source name, size, mtime, bbox, modality."""
    import hashlib

    src, _, bbox, modality = task
    try:
        st = os.stat(src)
    except OSError:
        return None
    key = f"{os.path.basename(src)}\0{st.st_size}\0{st.st_mtime_ns}\0{bbox}\0{modality}"
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _stamped(png: bytes, stamp: str) -> bytes:
    import zlib

    body = b"tEXt" + _STAMP_KEY + b"\0" + stamp.encode("ascii")
    chunk = len(body[4:]).to_bytes(4, "big") + body + (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "big")
    return png[:_IHDR_END] + chunk + png[_IHDR_END:]


def _read_stamp(out: str) -> str | None:
    """The source stamp stored in an output PNG, or None (missing file, no stamp)."""
    try:
        with open(out, "rb") as fh:
            head = fh.read(_IHDR_END + 12 + len(_STAMP_KEY) + 64)
    except OSError:
        return None
    at = _IHDR_END + 8 + len(_STAMP_KEY)
    if head[_IHDR_END + 4 : at] != b"tEXt" + _STAMP_KEY or head[at : at + 1] != b"\0":
        return None
    n = int.from_bytes(head[_IHDR_END : _IHDR_END + 4], "big") - len(_STAMP_KEY) - 1
    return head[at + 1 : at + 1 + n].decode("ascii", "replace")


#: errno values that doom every later write too: stop the pass instead of failing each file.
_FATAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                       getattr(errno, "EDQUOT", errno.ENOSPC)}


def _process_one(task: tuple, steps: Sequence[str], params: dict[str, Any]) -> tuple[str, str | None, list[str]]:
    """Enhance one file. Returns (status, reason, warnings); never raises for a bad image."""
    src, out, bbox, modality = task
    stamp = _source_stamp(task)  # before reading: a source replaced meanwhile is redone next time
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = _read(src)
            res = _run_steps(_check_image(img), steps, params, bbox, modality)
            data = _encode_png(res)
        except Exception as e:  # reported per file, never fatal to the run
            reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
            return "failed", str(reason), [str(w.message) for w in caught]
    _atomic_write_bytes(out, _stamped(data, stamp) if stamp else data)
    return "written", None, [str(w.message) for w in caught]


def _process_chunk(chunk: list[tuple], steps: Sequence[str], params: dict[str, Any]) -> list[tuple]:
    out = []
    for task in chunk:
        try:
            out.append(_process_one(task, steps, params))
        except OSError as e:
            if e.errno in _FATAL_WRITE_ERRNOS:
                # Full disk / read-only folder: every later write fails too; the caller stops.
                out.append(("fatal", f"{e.strerror or e} ({task[1]})", []))
                break
            out.append(("failed", f"could not write output: {e}", []))  # this file only
    return out


def _exit_with_parent(parent: int) -> None:
    """End this worker as soon as the process that started the pool is gone (even by SIGKILL).

    A kept pool's idle workers wait on a queue whose write end they hold themselves, so they
    never see their parent die. PR_SET_PDEATHSIG covers the worker's direct parent (the fork
    server, which exits with its owner); the thread watches the owner itself.
    """
    import signal

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass

    def watch() -> None:
        try:
            import select

            fd = os.pidfd_open(parent)  # Linux >= 5.3: readable once the process has exited
            select.select([fd], [], [])
        except (AttributeError, OSError):
            while True:
                time.sleep(1.0)
                try:
                    os.kill(parent, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    continue
        os._exit(1)

    threading.Thread(target=watch, name="covidlib-parent-watch", daemon=True).start()


def _worker_init(parent: int | None = None) -> None:
    if parent is not None:
        _exit_with_parent(parent)
    # Ctrl-C (SIGINT to the whole process group) is the caller's to handle: it cancels the pass
    # and waits for running chunks. Kept-alive workers would otherwise die with a traceback each.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One process per core: no nested OpenCV / BLAS threads fighting over the same cores.
    cv2.setNumThreads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except Exception:
        pass


@contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Start worker processes without re-importing the caller's ``__main__``.

    "spawn" / "forkserver" children normally re-run the main script's top level (as
    ``__mp_main__``): a script without an ``if __name__ == "__main__"`` guard would then recurse,
    and one that imports keras would import it once more per worker. The workers only need this
    module (tasks are plain tuples), so the main module's spec / file are hidden while the pool
    starts its processes.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    missing = object()
    saved = {k: getattr(main, k, missing) for k in ("__spec__", "__file__")}
    try:
        main.__spec__ = None
        if saved["__file__"] is not missing:
            del main.__file__
        yield
    finally:
        for k, v in saved.items():
            if v is not missing:
                setattr(main, k, v)


def _pool_context():
    import multiprocessing as mp

    # Not "fork": OpenCV's thread pool does not survive fork (opencv/opencv#5150). A fork server
    # that has imported this module (numpy, cv2) once makes worker start-up nearly free.
    if sys.platform != "win32" and "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        try:
            ctx.set_forkserver_preload(["covidlib.enhance", "covidlib.io", "threadpoolctl"])
        except Exception:
            pass
        return ctx
    return mp.get_context("spawn")


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True)


_POOL_LOCK = threading.Lock()
_POOL: tuple[int, ProcessPoolExecutor] | None = None


def _shared_pool(workers: int) -> ProcessPoolExecutor:
    """The worker pool, kept between batch passes of this process.

    Starting workers costs tens of milliseconds per pass (more on a cold fork server); notebook 02
    and the benchmark run several passes in a row, so the pool is reused while its size is the
    same. A broken pool (a worker died) is replaced; the interpreter's exit shuts it down."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and (_POOL[0] != workers or getattr(_POOL[1], "_broken", False)):
            _drop_pool_locked()
        if _POOL is None:
            _POOL = (workers, ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(),
                                                  initializer=_worker_init, initargs=(os.getpid(),)))
        return _POOL[1]


def _drop_pool_locked() -> None:
    global _POOL
    if _POOL is not None:
        _POOL[1].shutdown(wait=False, cancel_futures=True)
        _POOL = None


def _discard_pool() -> None:
    with _POOL_LOCK:
        _drop_pool_locked()


def _chunk_sizes(n: int, workers: int) -> list[int]:
    """Guided scheduling: big chunks first (few round trips), shrinking to single images at the
    end so no worker sits idle while another finishes a long chunk."""
    sizes = []
    left = n
    while left > 0:
        size = max(1, min(64, left // (workers * 4)))
        sizes.append(size)
        left -= size
    return sizes


def _execute(tasks: list[tuple], steps, params, workers: int, progress: bool) -> list[tuple | None]:
    """Run the tasks; one result per task, None for tasks never run (the pass stopped early).

    A "fatal" result (the output folder is full or read-only) stops the pass: the remaining
    tasks are dropped and the running ones awaited.
    """
    results: list[tuple | None] = [None] * len(tasks)
    bar = _progress_bar(len(tasks), progress and len(tasks) > 0, "enhance")
    try:
        if workers <= 1 or len(tasks) <= 1:
            with _single_thread_blas():
                for i, t in enumerate(tasks):
                    results[i] = _process_chunk([t], steps, params)[0]
                    if bar is not None:
                        bar.update(1)
                    if results[i][0] == "fatal":
                        break
        else:
            _execute_parallel(tasks, steps, params, workers, bar, results)
    finally:
        if bar is not None:
            bar.close()
    return results


def _submit_all(chunks: list[tuple[int, list[tuple]]], steps, params, workers: int) -> dict:
    futs = {}
    # Workers start on demand at submit time: keep the caller's __main__ hidden then.
    with _main_not_reimported():
        ex = _shared_pool(workers)
        try:
            first = ex.submit(_process_chunk, chunks[0][1], steps, params)
        except BrokenProcessPool:
            # a worker of the kept pool died while idle (OOM killer, a kill): start afresh
            _discard_pool()
            ex = _shared_pool(workers)
            first = ex.submit(_process_chunk, chunks[0][1], steps, params)
        futs[first] = (0, len(chunks[0][1]))
        for i, c in chunks[1:]:
            futs[ex.submit(_process_chunk, c, steps, params)] = (i, len(c))
    return futs


def _stop_futures(futs) -> None:
    """Drop what has not started, then wait for the running chunks, so no worker is still
    writing into dst when the pass returns."""
    for f in futs:
        f.cancel()
    for f in futs:
        if not f.cancelled():
            try:
                f.result()
            except BaseException:
                pass


def _execute_parallel(tasks: list[tuple], steps, params, workers: int, bar, results: list) -> None:
    chunks = []
    i = 0
    for size in _chunk_sizes(len(tasks), workers):
        chunks.append((i, tasks[i : i + size]))
        i += size
    futs: dict = {}
    try:
        futs = _submit_all(chunks, steps, params, workers)
        for fut in as_completed(futs):
            i, n = futs[fut]
            got = fut.result()
            results[i : i + len(got)] = got  # shorter than the chunk after a fatal write error
            if bar is not None:
                bar.update(n)
            if any(r[0] == "fatal" for r in got):
                _stop_futures(futs)
                for f, (j, _) in futs.items():  # chunks that finished meanwhile keep their results
                    if f is not fut and f.done() and not f.cancelled() and f.exception() is None:
                        res = f.result()
                        results[j : j + len(res)] = res
                return
    except BrokenProcessPool as e:
        _discard_pool()
        raise RuntimeError(
            f"an enhancement worker process died ({e}); this is not caused by a bad image "
            "(those are reported per file). Re-run with workers=1 to see the error in this process."
        ) from e
    except BaseException:
        _stop_futures(futs)
        raise


def _out_name_map(srcs: list[str], rels: list[str]) -> list[str]:
    """Output relative paths: source relative path with a .png suffix; when two sources in one
    folder would collide (``a.jpg`` and ``a.png``), both keep their full name (``a.jpg.png``)."""
    first = [os.path.splitext(r)[0] + ".png" for r in rels]
    seen: dict[str, set[str]] = {}
    for s, o in zip(srcs, first):
        seen.setdefault(os.path.normcase(o), set()).add(s)
    return [r + ".png" if len(seen[os.path.normcase(o)]) > 1 else o for r, o in zip(rels, first)]


def _writer_alive(name: str) -> bool:
    """Whether the process that is writing temporary file ``name`` (pid in its name) still runs."""
    m = re.search(r"\.(\d+)\.[^.]*" + re.escape(_TMP_SUFFIX) + r"$", name)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(m.group(1)) != os.getpid()


def _clean_stray_tmp(dst: Path) -> int:
    n = 0
    for dirpath, _, files in os.walk(dst):
        for f in files:
            # Another live process (a parallel training sharing this folder) may be mid-write.
            if f.startswith(".") and f.endswith(_TMP_SUFFIX) and not _writer_alive(f):
                try:
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
                except OSError:
                    pass
    return n


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(str(path), text.encode("utf-8"))


def _prepare_dst(dst: Path, cfg: dict, outputs: list[str], overwrite: bool) -> None:
    """Check / record the config in dst/enhance.json before any image is written.

    Same config on record: existing outputs count as done (resume). Another config, or outputs
    present without a record (not ours): refused, unless ``overwrite`` -- then this run's outputs
    are deleted first, and only then is the new config recorded, so that a run killed in between
    still has the old config on record and no stale image can pass for a new one.
    """
    dst.mkdir(parents=True, exist_ok=True)
    state = dst / _STATE_FILE
    old: Any = None
    if state.exists():
        try:
            old = json.loads(state.read_text(encoding="utf-8")).get("config")
        except (OSError, ValueError, AttributeError):
            old = "(unreadable enhance.json)"
        if old == cfg and not overwrite:
            return
        if not overwrite:
            raise ValueError(
                f"{dst} already holds images enhanced with a different configuration\n"
                f"  recorded:  {json.dumps(old, sort_keys=True)}\n  requested: {json.dumps(cfg, sort_keys=True)}\n"
                "use another destination folder, or overwrite=True (CLI: --overwrite) to redo them"
            )
    elif not overwrite:
        existing = [o for o in outputs if os.path.exists(o)]
        if existing:
            raise ValueError(
                f"{dst} has no {_STATE_FILE} but already holds {len(existing)} of this run's output files "
                f"(e.g. {existing[0]}), made by something else; use another destination folder or overwrite=True"
            )
    if overwrite:
        for o in outputs:
            try:
                os.unlink(o)
            except FileNotFoundError:
                pass
        for name in (_MANIFEST_FILE, _FAILURES_FILE):
            try:
                os.unlink(dst / name)
            except FileNotFoundError:
                pass
    _atomic_write_text(state, json.dumps({"config": cfg}, indent=2, sort_keys=True) + "\n")


class OutputWriteError(RuntimeError):
    """The destination cannot take more files (full disk, read-only folder): the pass stopped."""


def _unique_tasks(tasks: list[tuple]) -> dict[str, tuple]:
    """Output -> task; refuses outputs over sources and two inputs for one output."""
    srcs = {os.path.normcase(os.path.abspath(t[0])) for t in tasks}
    clash = [t[1] for t in tasks if os.path.normcase(os.path.abspath(t[1])) in srcs]
    if clash:
        raise ValueError(f"destination would overwrite source images (e.g. {clash[0]}); choose another dst")
    # Identical tasks (same file listed twice) run once.
    unique: dict[str, tuple] = {}
    for t in tasks:
        prev = unique.setdefault(t[1], t)
        if prev != t:
            raise ValueError(f"two different inputs map to the same output {t[1]} ({prev[0]}, bbox {prev[2]} / {t[0]}, bbox {t[2]})")
    return unique


def _stale(task: tuple) -> bool:
    """True when the output is missing or was made from another version of its source."""
    stored = _read_stamp(task[1])
    return stored is None or stored != _source_stamp(task)


def _failures_kept(dst: Path, not_run: set[str]) -> list[dict]:
    """Entries of the previous failure list for sources this (stopped) pass did not reach."""
    import csv

    try:
        with open(dst / _FAILURES_FILE, encoding="utf-8", newline="") as fh:
            return [r for r in csv.DictReader(fh) if r.get("path") in not_run]
    except (OSError, ValueError):
        return []


def _stop_on_fatal(dst: Path, todo: list[tuple], results: list, failed: list[dict]) -> None:
    """A fatal write error: save the failures known so far (and the earlier ones not retried)
    and end with one line."""
    fatal = next(r for r in results if r is not None and r[0] == "fatal")
    done = sum(1 for r in results if r is not None and r[0] in ("written", "failed"))
    not_run = {t[0] for t, r in zip(todo, results) if r is None or r[0] == "fatal"}
    failed = failed + _failures_kept(dst, not_run)
    try:
        _write_failures(dst, failed)
        note = f"the {len(failed)} failure(s) known so far are listed in {dst / _FAILURES_FILE}"
    except OSError as e:
        note = (f"the failure list could not be saved either ({e.strerror or e}); "
                f"{dst / _FAILURES_FILE} is unchanged")
    raise OutputWriteError(f"cannot write into {dst}: {fatal[1]}; stopped after {done} of {len(todo)} "
                           f"image(s); {note}")


def _run_tasks(
    tasks: list[tuple], dst: Path, cfg: dict, workers: int | None, progress: bool, overwrite: bool,
    src_desc: str, unreadable: list[dict] | None = None,
) -> tuple[dict[str, Any], list[tuple]]:
    t0 = time.perf_counter()
    unique = _unique_tasks(tasks)
    try:
        _prepare_dst(dst, cfg, sorted(unique), overwrite)
        _clean_stray_tmp(dst)
    except OSError as e:
        raise OutputWriteError(f"cannot write into {dst}: {e.strerror or e}") from None
    # Resume: an output counts as done only if it was made from the source as it is now.
    todo = [t for t in unique.values() if _stale(t)]
    n_redo = sum(1 for t in todo if os.path.exists(t[1]))
    n_workers = _default_workers() if workers is None else int(workers)
    if n_workers < 1:
        raise ValueError(f"workers must be >= 1 or None (all cores), got {workers!r}")
    n_workers = min(n_workers, max(1, len(todo)))
    results = _execute(todo, cfg["steps"], cfg["params"], n_workers, progress)

    status = {out: ("skipped", None, []) for out in unique}
    for t, r in zip(todo, results):
        status[t[1]] = r if r is not None else ("pending", None, [])
    failed, warned = list(unreadable or []), []
    for out, t in unique.items():
        st, reason, warns = status[out]
        if st == "failed":
            failed.append({"path": t[0], "reason": reason})
        warned.extend({"path": t[0], "warning": w} for w in warns)
    if any(r is not None and r[0] == "fatal" for r in results):
        _stop_on_fatal(dst, todo, results, failed)
    _write_failures(dst, failed)
    summary = {
        "src": src_desc,
        "dst": str(dst),
        "config": cfg,
        "total": len(unique),
        "written": sum(1 for r in results if r is not None and r[0] == "written"),
        "skipped": len(unique) - len(todo),
        "redone": n_redo,  # outputs made again because their source changed since
        "n_failed": len(failed),
        "failed": failed,
        "warnings": warned,
        "workers": n_workers,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    per_task = [status[t[1]] for t in tasks]
    return summary, per_task


def _write_failures(dst: Path, failed: list[dict]) -> None:
    import csv
    import io as _io

    buf = _io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["path", "reason"])
    for f in failed:
        wr.writerow([f["path"], f["reason"]])
    _atomic_write_text(dst / _FAILURES_FILE, buf.getvalue())


def unreadable_folder_reason(err: OSError, what: str = "its images were not read") -> str:
    """The failure-list reason for a folder that could not be listed (permissions, I/O)."""
    return f"folder could not be read ({err.strerror or err}): {what}"


def _folder_tasks(src: Path, dst: Path, modality: str) -> tuple[list[tuple], list[dict]]:
    """Tasks for every image under ``src``, and the folders that could not be listed."""
    exts = tuple(config.IMAGE_EXTENSIONS) + (".dcm",)
    dst_abs = os.path.normcase(os.path.abspath(dst))
    found: list[str] = []
    unreadable: list[dict] = []

    def note(err: OSError) -> None:  # os.walk skips such a folder silently otherwise
        unreadable.append({"path": str(err.filename or src),
                           "reason": unreadable_folder_reason(err, "its images were not enhanced")})

    for dirpath, dirnames, files in os.walk(src, onerror=note):
        # never read our own output when dst lies inside src; hidden folders / files are skipped
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and os.path.normcase(os.path.abspath(os.path.join(dirpath, d))) != dst_abs
        )
        for f in sorted(files):
            if not f.startswith(".") and f.lower().endswith(exts):
                found.append(os.path.join(dirpath, f))
    rels = [os.path.relpath(p, src) for p in found]
    outs = _out_name_map(found, rels)
    return [(p, str(dst / o), None, modality) for p, o in zip(found, outs)], unreadable


def enhance_tree(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    pipeline: str = "crop+wb+clahe",
    workers: int | None = None,
    progress: bool = True,
    modality: str = "ct",
    overwrite: bool = False,
    allow_inside_input: bool = False,
    **params: Any,
) -> dict[str, Any]:
    """Enhance every image under a folder, or every row of a manifest CSV, into ``dst``.

    * Folder: images (``config.IMAGE_EXTENSIONS`` and ``.dcm``; hidden files skipped) at any
      depth; ``dst`` mirrors the relative layout, each file saved as ``<stem>.png`` (``uint8``,
      lossless). ``dst`` is checked before any work (:func:`covidlib.fsutil.check_output_path`):
      ``dst == src`` is refused; ``dst`` inside ``src`` (or holding it) only with
      ``allow_inside_input=True``, and then it is not read. Folders that cannot be listed
      (permissions) are failures, not silently skipped.
    * Manifest CSV (``path, label, patient_id, split, source, modality`` [+ ``xmin, ymin, xmax,
      ymax``]): see :func:`enhance_manifest`; writes ``dst/manifest.csv``.

    Writes are atomic (temp file in the same folder + ``os.replace``), so a killed run leaves no
    half-written image. ``dst/enhance.json`` records :func:`pipeline_config`: a re-run with the
    same config skips images already written from the source as it is now (each output PNG
    carries a stamp of its source's name, size and mtime: a source replaced since is redone);
    a different config is refused unless ``overwrite=True``. Unreadable sources are listed in the
    summary and in ``dst/enhance_failures.csv``; they never stop the run. A destination that
    takes no more files (full disk, read-only) stops the pass at the first such error with
    :class:`OutputWriteError`, keeping the failures found so far. Sources are only read. The
    output is byte-identical whatever the worker count.

    Args:
        src: folder or manifest ``.csv``.
        dst: output folder (created).
        pipeline: a name from :data:`PIPELINES`.
        workers: processes; None = all cores, 1 = in this process.
        progress: show a tqdm progress bar.
        modality: ``"ct"`` or ``"xray"`` (a manifest's ``modality`` column wins per row).
        overwrite: redo everything when ``dst`` holds another config.
        allow_inside_input: the user asked explicitly for ``dst`` inside (or around) ``src``.
        **params: step parameters, see :func:`pipeline_config`.

    Returns:
        Summary dict: ``src, dst, config, total, written, skipped, redone`` (outputs made again
        because their source changed), ``n_failed, failed`` (list of ``{path, reason}``, also
        unreadable folders), ``warnings`` (list of ``{path, warning}``, e.g. no body found),
        ``workers, seconds``; plus ``manifest`` (path of ``dst/manifest.csv``) for a CSV source,
        ``unreadable_folders`` for a folder source.

    Raises:
        FileNotFoundError: no ``src``. ValueError: bad pipeline / parameters, ``dst`` holding
        another config or overwriting / polluting the source (``fsutil.UnsafeOutputError``).
        PermissionError: ``dst`` not writable. OutputWriteError: ``dst`` filled up mid-pass.
    """
    from covidlib.fsutil import check_output_path

    cfg = pipeline_config(pipeline, modality, **params)
    src_p = Path(src)
    dst_p = Path(dst)
    if not src_p.exists():
        raise FileNotFoundError(f"enhance source not found: {src_p}")
    check_output_path(dst_p, [src_p], kind="dir", what="enhance destination",
                      allow_inside_input=allow_inside_input)
    if src_p.is_file():
        if src_p.suffix.lower() != ".csv":
            raise ValueError(f"enhance source must be a folder or a manifest .csv, got file {src_p}")
        df = _read_manifest_csv(src_p)
        out = enhance_manifest(
            df, dst_p, pipeline, workers=workers, progress=progress, modality=modality,
            overwrite=overwrite, base_dir=src_p.parent, allow_inside_input=allow_inside_input,
            **params,
        )
        summary = dict(out.attrs["enhance_summary"])
        summary["src"] = str(src_p)
        return summary
    tasks, unreadable = _folder_tasks(src_p, dst_p, modality)
    summary, _ = _run_tasks(tasks, dst_p, cfg, workers, progress, overwrite, str(src_p), unreadable)
    summary["unreadable_folders"] = [u["path"] for u in unreadable]
    return summary


def _read_manifest_csv(path: Path):
    import pandas as pd

    try:
        # Text columns stay text ("NA" is a patient id, not a missing value); only empty cells
        # are missing.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as e:
        raise ValueError(f"could not read manifest {path}: {e}") from None
    return df


def _row_bboxes(df) -> list[tuple[int, int, int, int] | None]:
    import pandas as pd

    cols = config.BBOX_COLUMNS
    present = [c for c in cols if c in df.columns]
    if not present:
        return [None] * len(df)
    if len(present) != len(cols):
        raise ValueError(f"manifest has bbox columns {present} but not all of {cols}")
    vals = []
    for c in cols:
        try:
            vals.append(pd.to_numeric(df[c], errors="raise").to_numpy(dtype=np.float64))
        except (ValueError, TypeError):
            raise ValueError(f"manifest column {c!r} holds non-numeric values") from None
    out: list[tuple[int, int, int, int] | None] = []
    for i in range(len(df)):
        row = [v[i] for v in vals]
        if all(math.isfinite(x) for x in row):
            out.append(tuple(int(round(x)) for x in row))  # type: ignore[arg-type]
        elif any(math.isfinite(x) for x in row):
            raise ValueError(f"manifest row {i} has a partial bounding box {row}")
        else:
            out.append(None)
    return out


def _row_sources(df, base: Path) -> list[str]:
    """Absolute, normalised source path per manifest row (relative ones against ``base``)."""
    srcs = []
    for i, p in enumerate(df["path"]):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"manifest row {i} has an empty path")
        pp = Path(p)
        srcs.append(os.path.normpath(str(pp if pp.is_absolute() else base / pp)))
    return srcs


def _row_modalities(df, modality: str) -> list[str]:
    """Per row: its ``modality`` cell, ``modality`` where the cell is empty or the column absent."""
    if "modality" not in df.columns:
        return [modality] * len(df)
    mods = []
    for i, m in enumerate(df["modality"]):
        if not isinstance(m, str) or not m.strip():
            mods.append(modality)
        elif m.strip().lower() in config.MODALITIES:
            mods.append(m.strip().lower())
        else:
            raise ValueError(f"manifest row {i}: modality {m!r} not in {list(config.MODALITIES)}")
    return mods


def enhance_manifest(
    manifest_df,
    dst: str | os.PathLike,
    pipeline: str = "crop+wb+clahe",
    workers: int | None = None,
    progress: bool = True,
    modality: str = "ct",
    overwrite: bool = False,
    base_dir: str | os.PathLike | None = None,
    allow_inside_input: bool = False,
    **params: Any,
):
    """Enhance the images of a manifest and write ``dst/manifest.csv`` pointing at the copies.

    Outputs mirror the source paths relative to their common folder. The bounding box columns
    (when present and filled) are used to crop the row's image; a row's ``modality`` (ct / xray)
    picks the crop, ``modality`` is the fallback for empty cells. Same machinery, resume and
    failure report as :func:`enhance_tree`. ``dst`` may not lie in (or hold) a folder that
    holds a source image unless ``allow_inside_input``.

    Args:
        manifest_df: DataFrame with at least a ``path`` column.
        dst: output folder.
        pipeline, workers, progress, modality, overwrite, **params: as in :func:`enhance_tree`.
        base_dir: folder that relative paths are relative to (default: the working directory).
        allow_inside_input: as in :func:`enhance_tree`.

    Returns:
        The enhanced manifest: the rows whose image was enhanced (written now or before), same
        columns and order, ``path`` absolute to the enhanced PNG. The bbox columns are dropped
        when the pipeline crops (the box no longer applies to the cropped image). The CSV on disk
        stores paths relative to ``dst``. ``df.attrs["enhance_summary"]`` holds the summary dict
        of :func:`enhance_tree`, with ``manifest`` = the CSV's path.
    """
    import pandas as pd

    cfg = pipeline_config(pipeline, modality, **params)
    if not isinstance(manifest_df, pd.DataFrame):
        raise ValueError(f"manifest_df must be a pandas DataFrame, got {type(manifest_df).__name__}")
    if "path" not in manifest_df.columns:
        raise ValueError(f"manifest has no 'path' column (columns: {list(manifest_df.columns)})")
    df = manifest_df.reset_index(drop=True)
    dst_p = Path(dst)
    srcs = _row_sources(df, Path(base_dir) if base_dir is not None else Path.cwd())
    mods = _row_modalities(df, modality)
    bboxes = _row_bboxes(df)
    if srcs:
        root = os.path.commonpath([os.path.dirname(s) for s in srcs])
        rels = [os.path.relpath(s, root) for s in srcs]
    else:
        rels = []
    from covidlib.fsutil import check_output_path

    # The folders holding the sources are the data: the outputs stay out of them.
    check_output_path(dst_p, sorted({os.path.dirname(s) for s in srcs}), kind="dir",
                      what="enhance destination", allow_inside_input=allow_inside_input)
    outs = [str(dst_p / o) for o in _out_name_map(srcs, rels)]
    tasks = [(s, o, b, m) for s, o, b, m in zip(srcs, outs, bboxes, mods)]
    summary, per_task = _run_tasks(tasks, dst_p, cfg, workers, progress, overwrite, "manifest")

    ok = [st != "failed" for st, _, _ in per_task]
    res = df.loc[ok].copy()
    res["path"] = [os.path.abspath(o) for o, good in zip(outs, ok) if good]
    if any(step in CROP_STEPS for step in cfg["steps"]):
        res = res.drop(columns=[c for c in config.BBOX_COLUMNS if c in res.columns])
    res = res.reset_index(drop=True)
    on_disk = res.copy()
    on_disk["path"] = [Path(os.path.relpath(p, os.path.abspath(dst_p))).as_posix() for p in res["path"]]
    manifest_path = dst_p / _MANIFEST_FILE
    _atomic_write_text(manifest_path, on_disk.to_csv(index=False, lineterminator="\n"))
    summary["manifest"] = str(manifest_path)
    res.attrs["enhance_summary"] = summary
    return res
