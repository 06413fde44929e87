"""Image enhancement for chest CT and X-ray: body crop, white balance, CLAHE, DCT denoising.

AICOV-CT's published pre-processing, rebuilt so that each step does what its name says (the
crops live in :mod:`covidlib.crop`, the lung-field crop in :mod:`covidlib.lungs`, the denoiser in
:mod:`covidlib.denoise`; all are re-exported here):

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
The batch pass over a folder or manifest (:func:`covidlib.enhance_batch.enhance_tree` /
:func:`~covidlib.enhance_batch.enhance_manifest`) lives in :mod:`covidlib.enhance_batch`.

Only numpy and OpenCV are imported here: no keras, no tensorflow.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Sequence

import cv2
import numpy as np

from covidlib import config
from covidlib.crop import _check_image, _max_value, body_bbox, crop_body, crop_border
from covidlib.denoise import dct_denoise, estimate_sigma
from covidlib.images import to_uint8
from covidlib.lungs import LungField, crop_lungs, find_lungs

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
            img = clahe(to_uint8(img), p["clip_limit"], p["tile_grid"])
        else:  # pragma: no cover - PIPELINES only names known steps
            raise AssertionError(step)
    return np.ascontiguousarray(to_uint8(img))


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
    a ``uint16`` image left after the last step is range-scaled (``covidlib.images.to_uint8``).

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
