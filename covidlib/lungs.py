"""Lung-field crop (step ``lungcrop`` of :mod:`covidlib.enhance`).

* :func:`crop_lungs` -- a tighter, lung-field crop: air enclosed by the body, largest two
  regions, morphology (:func:`find_lungs`); falls back to the body crop, with a warning saying
  why, when no plausible lung field is found. No learned weights.

Only numpy and OpenCV are imported here.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from covidlib.crop import _Body, _check_image, _find_body, _full_box, _otsu, _small_gray, body_bbox, crop_body

__all__ = ["LungField", "find_lungs", "crop_lungs"]


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
