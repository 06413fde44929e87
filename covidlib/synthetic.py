"""Embedded, seeded phantom data: CT-like slices and X-ray-like radiographs, no network.

The phantoms exist so that every pipeline stage (ingest, body crop, enhancement, training,
evaluation, Grad-CAM) has realistic-looking work to do in tests and demos. They are NOT a
model of real disease and results on them say nothing about clinical performance.

CT slices (classes ``covid`` / ``cap`` / ``normal``): a soft-tissue torso on a dark
background, a bright scanner-table bar below the body (so body cropping is not a no-op),
two dark lungs with vessels and a fissure, spine, ribs and heart, plus noise.

* ``normal``: clear lungs; about a quarter have one small faint opacity.
* ``cap``: dense, fairly homogeneous, mostly unilateral lobar/segmental consolidation
  bounded by the fissure, sometimes with air bronchograms.
* ``covid``: bilateral, peripheral (subpleural), multifocal faint ground-glass opacities.

Severity varies per patient and lesions span a limited range of slice levels, so some
slices of sick patients look (nearly) normal: the slice label is the patient label, as
in real slice-level data sets. Classes are learnable but not trivially separable.

X-rays (classes ``covid`` / ``non_covid``): a frontal chest radiograph look. ``covid`` has
bilateral peripheral lower-zone hazy opacities; ``non_covid`` is a mix of clear lungs and
unilateral focal opacities, so "any opacity" is not the answer.

Pictures are drawn with numpy and OpenCV only.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd

from covidlib.config import MANIFEST_COLUMNS, SPLITS
from covidlib.fsutil import atomic_write_bytes

# Bump when the pictures change, so cached data sets on disk are regenerated.
GENERATOR_VERSION = 1

CT_CLASSES: tuple[str, ...] = ("covid", "cap", "normal")
XRAY_CLASSES: tuple[str, ...] = ("covid", "non_covid")
_MODALITY_PREFIX = {"ct": "ct", "xray": "xr"}
_MODALITY_CODE = {"ct": 1, "xray": 2}


def classes_for(modality: str) -> list[str]:
    """Canonical class list of the synthetic data set for ``modality`` ("ct" or "xray")."""
    if modality == "ct":
        return list(CT_CLASSES)
    if modality == "xray":
        return list(XRAY_CLASSES)
    raise ValueError(f"modality must be 'ct' or 'xray', got {modality!r}")


def _check_label(label: str, modality: str) -> None:
    allowed = classes_for(modality)
    if label not in allowed:
        raise ValueError(f"synthetic {modality} label must be one of {allowed}, got {label!r}")


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"size must be an int >= 32, got {size!r}")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1] (low-res noise upsampled): lesion texture."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x)), int(round(y))


# --------------------------------------------------------------------------------------
# CT
# --------------------------------------------------------------------------------------


def sample_ct_anatomy(rng: np.random.Generator) -> dict:
    """Draw one patient's fixed CT anatomy (size, position, rotation, scanner look, seed).

    All lengths are fractions of the image size, so one anatomy renders at any size.
    """
    return {
        "cx": float(0.5 + rng.uniform(-0.06, 0.06)),
        "cy": float(0.45 + rng.uniform(-0.05, 0.04)),
        "body_w": float(rng.uniform(0.33, 0.43)),  # semi-axes of the torso
        "body_h": float(rng.uniform(0.23, 0.30)),
        "angle": float(rng.uniform(-8.0, 8.0)),  # degrees
        "lung_w": float(rng.uniform(0.36, 0.42)),  # fraction of body_w
        "lung_h": float(rng.uniform(0.66, 0.78)),  # fraction of body_h
        "lung_sep": float(rng.uniform(0.44, 0.5)),  # lung centre offset, fraction of body_w
        "fat": float(rng.uniform(0.03, 0.07)),  # subcutaneous fat thickness, fraction of body_w
        "table_gap": float(rng.uniform(0.015, 0.06)),
        "table_curv": float(rng.uniform(0.0, 1.0)),
        "table_bright": float(rng.uniform(0.55, 0.85)),
        "noise": float(rng.uniform(0.015, 0.04)),
        "contrast": float(rng.uniform(0.9, 1.1)),
        "offset": float(rng.uniform(-0.03, 0.03)),
        "seed": int(rng.integers(0, 2**31 - 1)),
    }


def _ct_lesions(label: str, anatomy: dict) -> dict:
    """Patient-level lesions, fixed by the anatomy seed so every slice agrees.

    Positions are in lung-local coordinates (u, v) with the lung ellipse = unit circle;
    u > 0 points laterally for both lungs. ``z`` / ``zw`` give the slice-level range.
    """
    rng = np.random.default_rng([anatomy["seed"], 17])
    severity = float(rng.beta(2.0, 2.2))  # 0 = barely visible, 1 = florid
    out: dict = {"severity": severity, "ggo": [], "consolidation": [], "faint": []}
    if label == "covid":
        n = 2 + int(round(severity * 6 + rng.uniform(0, 2)))
        # Mild cases are sometimes unilateral: keeps covid vs cap from being "count the lungs".
        sides = [0, 1] if (severity > 0.3 or rng.random() < 0.6) else [int(rng.integers(2))]
        for i in range(n):
            side = sides[i % len(sides)]
            theta = rng.uniform(-0.55 * math.pi, 0.75 * math.pi)  # lateral / posterior arc
            r = rng.uniform(0.62, 0.92)
            out["ggo"].append({
                "side": side, "u": r * math.cos(theta), "v": r * math.sin(theta),
                "sigma": rng.uniform(0.13, 0.26) * (0.8 + 0.5 * severity),
                "amp": rng.uniform(0.09, 0.15) + 0.14 * severity,
                "z": rng.uniform(0.15, 0.9), "zw": rng.uniform(0.25, 0.5),
            })
    elif label == "cap":
        side = int(rng.integers(2))
        n_main = 1 if rng.random() < 0.7 else 2
        for k in range(n_main + (1 if rng.random() < 0.2 else 0)):
            main = k < n_main
            out["consolidation"].append({
                "side": side if main else 1 - side,
                # fissure: a line through the lung; the lesion fills one side of it
                "fiss_angle": rng.uniform(0.15 * math.pi, 0.4 * math.pi) * (1 if rng.random() < 0.5 else -1),
                "fiss_off": rng.uniform(-0.3, 0.3),
                "fiss_side": 1 if rng.random() < 0.5 else -1,
                "u": rng.uniform(-0.2, 0.7), "v": rng.uniform(-0.5, 0.6),
                "radius": (rng.uniform(0.35, 0.6) + 0.45 * severity) * (1.0 if main else 0.45),
                "density": rng.uniform(0.26, 0.34) + 0.2 * severity,
                "bronchogram": bool(rng.random() < 0.5),
                "z": rng.uniform(0.25, 0.75), "zw": rng.uniform(0.35, 0.7),
            })
    # A small faint opacity (scar, atelectasis, partial volume) in some patients of any class.
    if rng.random() < (0.25 if label == "normal" else 0.15):
        theta = rng.uniform(-math.pi, math.pi)
        r = rng.uniform(0.2, 0.85)
        out["faint"].append({
            "side": int(rng.integers(2)), "u": r * math.cos(theta), "v": r * math.sin(theta),
            "sigma": rng.uniform(0.07, 0.13), "amp": rng.uniform(0.06, 0.14),
            "z": rng.uniform(0.2, 0.8), "zw": rng.uniform(0.2, 0.4),
        })
    return out


def _level_weight(level: float, z: float, zw: float) -> float:
    return math.exp(-0.5 * ((level - z) / zw) ** 2)


def make_ct_slice(
    label: str,
    rng: np.random.Generator,
    size: int = 128,
    *,
    anatomy: dict | None = None,
    level: float = 0.5,
) -> np.ndarray:
    """Render one CT-like axial slice.

    Args:
        label: ``"covid"``, ``"cap"`` or ``"normal"``.
        rng: per-slice randomness (noise, vessel jitter).
        size: output side length in pixels.
        anatomy: the patient's fixed anatomy from :func:`sample_ct_anatomy`; drawn from
            ``rng`` when ``None``. Lesions are derived from ``anatomy["seed"]``, so slices
            of one patient share them.
        level: slice position from apex (0) to base (1); lung area peaks mid-way.

    Returns:
        2-D uint8 image of shape ``(size, size)``.

    Raises:
        ValueError: on an unknown label, a bad size or a level outside [0, 1].
    """
    _check_label(label, "ct")
    _check_size(size)
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be in [0, 1], got {level!r}")
    a = sample_ct_anatomy(rng) if anatomy is None else anatomy
    # The draws below happen in a fixed order (the picture of a seed must never change):
    # prng = patient-fixed structure (vessels, ribs), rng = this slice.
    prng = np.random.default_rng([a["seed"], 3])
    img, f = _ct_body(a, size, level)
    img = _ct_fill_body(img, f, level, prng)
    vessels = np.zeros_like(img)
    lesion_add = np.zeros_like(img)
    les = _ct_lesions(label, a)
    for side, lung in enumerate(f.lungs):
        _ct_vessels(vessels, lung, f.S, rng, prng)
        lesion_add = _ct_lung_lesions(lesion_add, side, lung, les, level, f, rng, prng)
    # Ground glass: hazy texture; vessels stay visible. Consolidation: replaces the parenchyma.
    haze = 1.0 + 0.35 * _smooth_noise(rng, size, 12)
    lesion_add *= np.clip(haze, 0.3, 1.7)
    inside = f.lung_mask
    img = img + inside * (vessels * (1.0 - np.clip(lesion_add * 2.0, 0, 0.8)) + lesion_add)
    img = _ct_rotate_and_table(img, a, f)
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    img = img + rng.normal(0.0, a["noise"], img.shape).astype(np.float32)
    img = (img - 0.5) * a["contrast"] + 0.5 + a["offset"]
    return _to_uint8(img)


@dataclass
class _CTFrame:
    """Where things are on one CT slice (pixels): body centre and semi-axes, lungs, masks."""

    S: float  # image size
    cx: float
    cy: float
    bw: float  # torso semi-axes
    bh: float
    lungs: list[tuple[float, float, float, float, int]]  # (centre x, centre y, semi-axes, lateral sign)
    lung_mask: np.ndarray  # soft, mediastinum / heart / spine cut out
    heart_r: float
    spine_c: tuple[int, int]
    yy: np.ndarray  # pixel row / column grids
    xx: np.ndarray


def _ct_body(a: dict, size: int, level: float) -> tuple[np.ndarray, _CTFrame]:
    """The torso (fat ring, soft tissue) and the geometry of lungs, mediastinum, heart, spine."""
    S = float(size)
    img = np.zeros((size, size), np.float32)
    cx, cy = a["cx"] * S, a["cy"] * S
    bw, bh = a["body_w"] * S, a["body_h"] * S
    # Torso: subcutaneous fat ring, then muscle / mediastinum soft tissue.
    cv2.ellipse(img, _pt(cx, cy), _pt(bw, bh), 0, 0, 360, 0.40, -1)
    fat = a["fat"] * bw
    cv2.ellipse(img, _pt(cx, cy), _pt(bw - fat, bh - fat * 0.8), 0, 0, 360, 0.50, -1)

    # Lungs: biggest mid-chest, small at the apex, shrinking again over the diaphragm.
    lscale = 0.45 + 0.55 * math.sin(math.pi * (0.1 + 0.85 * level)) ** 0.6
    lw, lh = a["lung_w"] * bw * lscale, a["lung_h"] * bh * (0.6 + 0.4 * lscale)
    lungs = []  # (centre x, centre y, semi-axes, lateral sign)
    lung_mask = np.zeros((size, size), np.float32)
    for side, sgn in ((0, -1), (1, 1)):
        lx = cx + sgn * a["lung_sep"] * bw
        ly = cy - 0.06 * bh
        lungs.append((lx, ly, lw, lh, sgn))
        cv2.ellipse(lung_mask, _pt(lx, ly), _pt(lw, lh), sgn * 8, 0, 360, 1.0, -1)
    # Mediastinum, heart (lower levels, anterior, patient's left = image right), spine.
    med = np.zeros_like(lung_mask)
    cv2.ellipse(med, _pt(cx, cy - 0.1 * bh), _pt(0.17 * bw, 0.55 * bh), 0, 0, 360, 1.0, -1)
    heart_r = max(0.0, level - 0.35) * 0.55 * bw
    if heart_r > 1:
        cv2.ellipse(med, _pt(cx + 0.12 * bw, cy - 0.2 * bh), _pt(heart_r, heart_r * 0.8), 20, 0, 360, 1.0, -1)
    spine_c = _pt(cx, cy + 0.72 * bh)
    cv2.circle(med, spine_c, int(0.14 * bh) + 2, 1.0, -1)
    lung_mask *= 1.0 - med
    lung_mask = cv2.GaussianBlur(lung_mask, (3, 3), 0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return img, _CTFrame(S, cx, cy, bw, bh, lungs, lung_mask, heart_r, spine_c, yy, xx)


def _ct_fill_body(img: np.ndarray, f: _CTFrame, level: float, prng: np.random.Generator) -> np.ndarray:
    """Lung parenchyma, heart, aorta, vertebra and ribs."""
    cx, cy, bw, bh, S = f.cx, f.cy, f.bw, f.bh, f.S
    # Lung parenchyma with a gravity-dependent (posterior) density gradient.
    dep = np.clip((f.yy - (cy - bh)) / (2 * bh), 0, 1) * 0.05
    lung_val = 0.06 + dep
    img = img * (1 - f.lung_mask) + lung_val * f.lung_mask
    if f.heart_r > 1:
        cv2.ellipse(img, _pt(cx + 0.12 * bw, cy - 0.2 * bh), _pt(f.heart_r, f.heart_r * 0.8), 20, 0, 360, 0.56, -1)
    cv2.circle(img, _pt(cx, cy - 0.35 * bh), int(0.09 * bh) + 1, 0.6, -1)  # aorta / trachea region
    cv2.circle(img, f.spine_c, int(0.14 * bh) + 1, 0.92, -1)  # vertebral body
    cv2.circle(img, f.spine_c, int(0.07 * bh), 0.75, -1)
    # Ribs: bright cross-sections just outside the lateral and posterior lung surface.
    for lx, ly, lw_, lh_, sgn in f.lungs:
        for t in np.linspace(-0.55 * math.pi, 0.6 * math.pi, 6) + prng.uniform(-0.06, 0.06, 6):
            rx = lx + sgn * 1.12 * lw_ * math.cos(t)
            ry = ly + 1.1 * lh_ * math.sin(t)
            tang = math.degrees(math.atan2(lh_ * math.cos(t), -sgn * lw_ * math.sin(t)))
            cv2.ellipse(img, _pt(rx, ry), _pt(0.014 * S + 1, 0.007 * S + 1), tang, 0, 360, 0.85, -1)
    return img


def _ct_vessels(vessels: np.ndarray, lung: tuple, S: float, rng: np.random.Generator,
                prng: np.random.Generator) -> None:
    """Vessels and the oblique fissure of one lung, drawn into ``vessels`` (patient-fixed
    positions, slight per-slice jitter)."""
    lx, ly, lw_, lh_, sgn = lung
    hx, hy = lx - sgn * 0.8 * lw_, ly + 0.1 * lh_  # hilum: medial side
    n_v = 26
    us = prng.uniform(-1, 1, n_v)
    vs = prng.uniform(-1, 1, n_v)
    jit = rng.normal(0, 0.05, (n_v, 2))
    for u, v, (ju, jv) in zip(us, vs, jit):
        px, py = lx + sgn * (u + ju) * lw_, ly + (v + jv) * lh_
        near = 1.0 - min(1.0, math.hypot(px - hx, py - hy) / (1.6 * lw_))
        r = 0.4 + 2.2 * near * S / 128.0
        if prng.random() < 0.5:
            cv2.circle(vessels, _pt(px, py), max(1, int(round(r))), 0.22 + 0.2 * near, -1)
        else:  # in-plane vessel: short segment pointing at the hilum
            d = math.hypot(hx - px, hy - py) + 1e-6
            ln = (2 + 5 * near) * S / 128.0
            q = (px + (hx - px) / d * ln, py + (hy - py) / d * ln)
            cv2.line(vessels, _pt(px, py), _pt(*q), 0.2 + 0.18 * near, max(1, int(round(r * 0.8))))
    # Oblique fissure: faint thin line through the lung.
    fa = prng.uniform(0.2, 0.35) * math.pi
    p0 = (lx - sgn * math.cos(fa) * lw_, ly - math.sin(fa) * lh_)
    p1 = (lx + sgn * math.cos(fa) * lw_, ly + math.sin(fa) * lh_)
    cv2.line(vessels, _pt(*p0), _pt(*p1), 0.12, 1)


def _ct_lung_lesions(lesion_add: np.ndarray, side: int, lung: tuple, les: dict, level: float, f: _CTFrame,
                     rng: np.random.Generator, prng: np.random.Generator) -> np.ndarray:
    """Add one lung's ground glass / faint opacities (sum) and consolidations (max) at this level."""
    lx, ly, lw_, lh_, sgn = lung
    # lung-local coordinates: u lateral, v posterior (down in the image)
    uu = (f.xx - lx) * sgn / lw_
    vv = (f.yy - ly) / lh_
    for g in les["ggo"] + les["faint"]:
        if g["side"] != side:
            continue
        w = _level_weight(level, g["z"], g["zw"])
        if w < 0.05:
            continue
        d2 = (uu - g["u"]) ** 2 + (vv - g["v"]) ** 2 * (lw_ / lh_) ** 2
        lesion_add += (g["amp"] * w) * np.exp(-0.5 * d2 / g["sigma"] ** 2)
    for c in les["consolidation"]:
        if c["side"] != side:
            continue
        w = _level_weight(level, c["z"], c["zw"])
        if w < 0.1:
            continue
        cons = _ct_consolidation(c, w, lung, uu, vv, f.S, rng, prng)
        if cons is not None:
            lesion_add = np.maximum(lesion_add, cons)
    return lesion_add


def _ct_consolidation(c: dict, w: float, lung: tuple, uu: np.ndarray, vv: np.ndarray, S: float,
                      rng: np.random.Generator, prng: np.random.Generator) -> np.ndarray | None:
    """One consolidation bounded by its fissure, textured, with air bronchograms when it has
    them; None when it does not reach this slice."""
    lx, ly, lw_, lh_, sgn = lung
    size = uu.shape[0]
    ca, sa = math.cos(c["fiss_angle"]), math.sin(c["fiss_angle"])
    half = ((uu * sa - vv * ca) - c["fiss_off"]) * c["fiss_side"]
    blob = ((uu - c["u"]) ** 2 + (vv - c["v"]) ** 2) < (c["radius"] * min(1.0, 0.4 + w)) ** 2
    m = ((half > 0) & blob).astype(np.float32)
    if not m.any():
        return None
    m = cv2.GaussianBlur(m, (0, 0), 0.9 * S / 128.0)
    dens = c["density"] * (0.55 + 0.45 * w)
    tex = 1.0 + 0.06 * _smooth_noise(rng, size, 10)
    cons = m * dens * tex
    if c["bronchogram"]:
        # Air bronchograms: dark branching lines kept open inside the consolidation.
        br = np.zeros(uu.shape, np.float32)
        for _ in range(3):
            ang = prng.uniform(-0.6, 0.6) + (0 if sgn > 0 else math.pi)
            q0 = (lx + sgn * c["u"] * lw_ * 0.6, ly + c["v"] * lh_ * 0.6)
            q1 = (q0[0] + math.cos(ang) * 0.5 * lw_, q0[1] + math.sin(ang) * 0.5 * lh_)
            cv2.line(br, _pt(*q0), _pt(*q1), 1.0, 1)
        cons *= 1.0 - 0.7 * br
    return cons


def _ct_rotate_and_table(img: np.ndarray, a: dict, f: _CTFrame) -> np.ndarray:
    """Small patient rotation (about the body centre), then the table (not rotated)."""
    S, cx, cy, bw, bh = f.S, f.cx, f.cy, f.bw, f.bh
    size = img.shape[0]
    M = cv2.getRotationMatrix2D((cx, cy), a["angle"], 1.0)
    img = cv2.warpAffine(img, M, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
    ang = math.radians(a["angle"])
    bottom = cy + math.sqrt((bh * math.cos(ang)) ** 2 + (bw * math.sin(ang)) ** 2)
    ty = bottom + a["table_gap"] * S + 1
    thick = max(2, int(round(0.025 * S)))
    if a["table_curv"] < 0.3:
        cv2.line(img, _pt(0.08 * S, ty), _pt(0.92 * S, ty), a["table_bright"], thick)
    else:
        # Curved cradle: the top arc of a wide ellipse, concave side up towards the body.
        ry = (1.3 - a["table_curv"]) * 1.2 * S
        cv2.ellipse(img, _pt(cx, ty - ry * 0.0), _pt(0.44 * S, 0.12 * S * a["table_curv"] + 2),
                    0, 10, 170, a["table_bright"], thick)
    cv2.line(img, _pt(0.15 * S, ty + 3 * thick), _pt(0.85 * S, ty + 3 * thick), a["table_bright"] * 0.5, 1)
    return img


# --------------------------------------------------------------------------------------
# X-ray
# --------------------------------------------------------------------------------------


def sample_xray_anatomy(rng: np.random.Generator) -> dict:
    """Draw one patient's fixed radiograph anatomy and exposure (fractions of image size)."""
    return {
        "cx": float(0.5 + rng.uniform(-0.04, 0.04)),
        "cy": float(0.47 + rng.uniform(-0.04, 0.04)),
        "scale": float(rng.uniform(0.88, 1.05)),
        "angle": float(rng.uniform(-5.0, 5.0)),
        "lung_w": float(rng.uniform(0.14, 0.17)),
        "lung_h": float(rng.uniform(0.27, 0.32)),
        "heart": float(rng.uniform(0.10, 0.14)),
        "noise": float(rng.uniform(0.01, 0.03)),
        "gamma": float(rng.uniform(0.8, 1.25)),
        "contrast": float(rng.uniform(0.85, 1.1)),
        "seed": int(rng.integers(0, 2**31 - 1)),
    }


def _xray_lesions(label: str, anatomy: dict) -> list[dict]:
    """Opacities in lung-local coordinates (u lateral, v downwards, lung = unit circle)."""
    rng = np.random.default_rng([anatomy["seed"], 29])
    severity = float(rng.beta(2.0, 2.0))
    out: list[dict] = []
    if label == "covid":
        sides = [0, 1] if (severity > 0.25 or rng.random() < 0.6) else [int(rng.integers(2))]
        n = 2 + int(round(severity * 4))
        for i in range(n):
            out.append({
                "side": sides[i % len(sides)],
                "u": rng.uniform(0.35, 0.85), "v": rng.uniform(0.1, 0.75),
                "sigma": rng.uniform(0.22, 0.38), "amp": rng.uniform(0.05, 0.09) + 0.12 * severity,
            })
    else:
        r = rng.random()
        if r < 0.45:  # unilateral focal opacity (pneumonia / nodule / atelectasis), any zone
            out.append({
                "side": int(rng.integers(2)), "u": rng.uniform(-0.4, 0.7), "v": rng.uniform(-0.7, 0.7),
                "sigma": rng.uniform(0.12, 0.25), "amp": rng.uniform(0.12, 0.2) + 0.12 * severity,
            })
        elif r < 0.55:  # faint small spot
            out.append({
                "side": int(rng.integers(2)), "u": rng.uniform(-0.6, 0.8), "v": rng.uniform(-0.7, 0.7),
                "sigma": rng.uniform(0.08, 0.15), "amp": rng.uniform(0.05, 0.1),
            })
    return out


def make_xray(
    label: str,
    rng: np.random.Generator,
    size: int = 128,
    *,
    anatomy: dict | None = None,
) -> np.ndarray:
    """Render one frontal chest-radiograph-like image.

    Args:
        label: ``"covid"`` or ``"non_covid"``.
        rng: per-image randomness (noise, small jitter).
        size: output side length in pixels.
        anatomy: fixed patient anatomy from :func:`sample_xray_anatomy`; drawn from ``rng``
            when ``None``. Lesions come from ``anatomy["seed"]``.

    Returns:
        2-D uint8 image of shape ``(size, size)``.

    Raises:
        ValueError: on an unknown label or a bad size.
    """
    _check_label(label, "xray")
    _check_size(size)
    a = sample_xray_anatomy(rng) if anatomy is None else anatomy
    # The draws below happen in a fixed order (the picture of a seed must never change):
    # prng = patient-fixed structure (ribs, markings), rng = this image.
    prng = np.random.default_rng([a["seed"], 5])
    img = np.full((size, size), 0.04, np.float32)
    body = _xray_torso(a, size)
    img += 0.36 * body
    f = _xray_frame(a, size)
    img = _xray_fill(img, f)
    img += 0.045 * _xray_ribs(f, prng) * body
    img += 0.08 * _xray_markings(f, prng) * f.lung_mask
    img += _xray_opacities(label, a, f, rng) * f.lung_mask

    S = f.S
    M = cv2.getRotationMatrix2D((f.cx, f.cy), a["angle"], 1.0)
    img = cv2.warpAffine(img, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    img = cv2.GaussianBlur(img, (0, 0), 0.9 * S / 128.0)
    img = img + rng.normal(0.0, a["noise"], img.shape).astype(np.float32)
    img = np.clip((img - 0.4) * a["contrast"] + 0.4, 0, 1) ** a["gamma"]
    return _to_uint8(img)


@dataclass
class _XRayFrame:
    """Where things are on one radiograph (pixels): centre, scale, lungs, masks."""

    S: float  # image size
    cx: float
    cy: float
    sc: float  # patient scale
    lw: float  # lung semi-axes
    lh: float
    lungs: list[tuple[float, float, int]]  # (centre x, centre y, lateral sign)
    lung_mask: np.ndarray  # soft, mediastinum and heart cut out
    med: np.ndarray  # mediastinum + heart (sharp)
    yy: np.ndarray  # pixel row / column grids
    xx: np.ndarray


def _xray_torso(a: dict, size: int) -> np.ndarray:
    """Soft tissue: torso with shoulders and neck (soft-edged), 0..1."""
    S = float(size)
    cx, sc = a["cx"] * S, a["scale"]
    body = np.zeros((size, size), np.float32)
    poly = np.array([
        (cx - 0.5 * S * sc, S * 1.1), (cx - 0.47 * S * sc, 0.22 * S), (cx - 0.38 * S * sc, 0.08 * S),
        (cx - 0.1 * S * sc, 0.02 * S), (cx - 0.08 * S * sc, -0.1 * S), (cx + 0.08 * S * sc, -0.1 * S),
        (cx + 0.1 * S * sc, 0.02 * S), (cx + 0.38 * S * sc, 0.08 * S), (cx + 0.47 * S * sc, 0.22 * S),
        (cx + 0.5 * S * sc, S * 1.1)], np.float32)
    cv2.fillPoly(body, [np.round(poly).astype(np.int32)], 1.0)
    return cv2.GaussianBlur(body, (0, 0), 2.0 * S / 128.0)


def _xray_frame(a: dict, size: int) -> _XRayFrame:
    """Lung fields (with the diaphragm domes), mediastinum and heart."""
    S = float(size)
    cx, cy, sc = a["cx"] * S, a["cy"] * S, a["scale"]
    lung_mask = np.zeros((size, size), np.float32)
    lw, lh = a["lung_w"] * S * sc, a["lung_h"] * S * sc
    lungs = []
    for side, sgn in ((0, -1), (1, 1)):
        lx, ly = cx + sgn * (0.19 * S * sc), cy - 0.03 * S * sc
        lungs.append((lx, ly, sgn))
        cv2.ellipse(lung_mask, _pt(lx, ly), _pt(lw, lh), -sgn * 6, 0, 360, 1.0, -1)
        # Diaphragm dome eats the bottom of the lung; the lateral costophrenic angle stays sharp.
        cv2.ellipse(lung_mask, _pt(lx - sgn * 0.02 * S, ly + lh * 1.05), _pt(lw * 1.05, lh * 0.42),
                    0, 0, 360, 0.0, -1)
    # Mediastinum (widening downwards) and heart (image right = patient's left).
    med = np.zeros_like(lung_mask)
    mpoly = np.array([(cx - 0.05 * S * sc, 0), (cx + 0.05 * S * sc, 0), (cx + 0.08 * S * sc, cy),
                      (cx - 0.08 * S * sc, cy)], np.float32)
    cv2.fillPoly(med, [np.round(mpoly).astype(np.int32)], 1.0)
    hr = a["heart"] * S * sc
    cv2.ellipse(med, _pt(cx + 0.045 * S * sc, cy + 0.13 * S * sc), _pt(hr * 1.3, hr), -20, 0, 360, 1.0, -1)
    lung_mask *= 1.0 - med
    lung_mask = cv2.GaussianBlur(lung_mask, (0, 0), 1.2 * S / 128.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return _XRayFrame(S, cx, cy, sc, lw, lh, lungs, lung_mask, med, yy, xx)


def _xray_fill(img: np.ndarray, f: _XRayFrame) -> np.ndarray:
    """Lung fields, mediastinum and spine over the soft tissue."""
    S, cx, cy, sc = f.S, f.cx, f.cy, f.sc
    # Lung fields: darkest in the mid/upper lateral zones (less overlying tissue).
    lung_val = 0.1 + 0.06 * np.clip((f.yy - cy) / (0.4 * S), -0.5, 1.0)
    img = img * (1 - f.lung_mask) + (lung_val * 0.45 + img * 0.4) * f.lung_mask
    med = cv2.GaussianBlur(f.med, (0, 0), 1.5 * S / 128.0)
    img += 0.2 * med
    spine = np.zeros_like(img)
    cv2.rectangle(spine, _pt(cx - 0.03 * S * sc, 0), _pt(cx + 0.03 * S * sc, S), 1.0, -1)
    img += 0.08 * cv2.GaussianBlur(spine, (0, 0), 1.0 * S / 128.0)
    return img


def _xray_ribs(f: _XRayFrame, prng: np.random.Generator) -> np.ndarray:
    """Ribs: posterior arcs, high medially and curving down laterally; clavicles at the top."""
    S, cx, sc, lw, lh = f.S, f.cx, f.sc, f.lw, f.lh
    ribs = np.zeros_like(f.lung_mask)
    for lx, ly, sgn in f.lungs:
        for k in range(8):
            y0 = ly - 1.05 * lh + (k + 0.3) * (1.9 * lh / 8) + prng.uniform(-1, 1)
            ax = (lw * 1.8, 0.14 * S * sc + k * 0.006 * S)
            cen = _pt(cx + sgn * 0.03 * S, y0 + ax[1])
            cv2.ellipse(ribs, cen, _pt(*ax), 0, 180 if sgn < 0 else 270, 270 if sgn < 0 else 360, 1.0,
                        max(1, int(round(0.014 * S))))
        cv2.line(ribs, _pt(cx + sgn * 0.04 * S, ly - lh * 0.9), _pt(lx + sgn * lw * 1.3, ly - lh * 1.15), 1.6,
                 max(1, int(round(0.02 * S))))
    return cv2.GaussianBlur(ribs, (0, 0), 0.7 * S / 128.0)


def _xray_markings(f: _XRayFrame, prng: np.random.Generator) -> np.ndarray:
    """Hilar / vascular markings radiating from the hila, fading to the periphery."""
    marks = np.zeros_like(f.lung_mask)
    for lx, ly, sgn in f.lungs:
        hx, hy = lx - sgn * 0.55 * f.lw, ly + 0.05 * f.lh
        for _ in range(10):
            ang = prng.uniform(-1.2, 1.2) + (0 if sgn > 0 else math.pi)
            ln = prng.uniform(0.3, 0.8) * f.lw
            cv2.line(marks, _pt(hx, hy), _pt(hx + math.cos(ang) * ln, hy + math.sin(ang) * ln), 1.0, 1)
    return cv2.GaussianBlur(marks, (0, 0), 0.8)


def _xray_opacities(label: str, a: dict, f: _XRayFrame, rng: np.random.Generator) -> np.ndarray:
    """Opacities: additive (a radiograph sums attenuation), soft-edged, textured."""
    opac = np.zeros_like(f.lung_mask)
    for les in _xray_lesions(label, a):
        lx, ly, sgn = f.lungs[les["side"]]
        uu = (f.xx - lx) * sgn / f.lw
        vv = (f.yy - ly) / f.lh
        d2 = (uu - les["u"]) ** 2 + ((vv - les["v"]) * f.lh / f.lw) ** 2
        opac += les["amp"] * np.exp(-0.5 * d2 / les["sigma"] ** 2)
    opac *= np.clip(1.0 + 0.3 * _smooth_noise(rng, f.yy.shape[0], 10), 0.4, 1.6)
    return opac


# --------------------------------------------------------------------------------------
# Data set on disk
# --------------------------------------------------------------------------------------


def _split_counts(n: int, splits: Sequence[float]) -> list[int]:
    """Whole-patient counts per split: every split with a positive fraction gets >= 1."""
    fr = [float(f) for f in splits]
    counts = [0 if f == 0 else max(1, int(round(f * n))) for f in fr]
    # Train absorbs the rounding; it must keep at least one patient when its fraction > 0.
    counts[0] = n - sum(counts[1:])
    if fr[0] > 0 and counts[0] < 1:
        need = sum(1 for f in fr if f > 0)
        raise ValueError(f"n_patients={n} is too small for splits {tuple(fr)}: need at least {need}")
    return counts


def _remove_previous(root: Path) -> None:
    """Delete only files an earlier call wrote (listed in its labels.csv), then empty dirs."""
    labels = root / "labels.csv"
    if labels.exists():
        try:
            old = pd.read_csv(labels)
            paths = list(old["path"].astype(str)) if "path" in old else []
        except Exception:  # a torn labels.csv: fall back to our own naming pattern
            paths = [str(p.relative_to(root)) for s in SPLITS for p in (root / s).glob("*/*_[0-9][0-9][0-9].png")]
        for rel in paths:
            p = root / rel
            if p.is_file():
                p.unlink()
        labels.unlink()
    for s in SPLITS:
        d = root / s
        if d.is_dir():
            for sub in d.iterdir():
                if sub.is_dir() and not any(sub.iterdir()):
                    sub.rmdir()
            if not any(d.iterdir()):
                d.rmdir()


def write_synthetic_dataset(
    root: str | os.PathLike,
    modality: str = "ct",
    n_patients: int = 12,
    slices_per_patient: int | None = None,
    size: int = 128,
    seed: int = 0,
    splits: Sequence[float] = (0.6, 0.2, 0.2),
) -> Path:
    """Write a seeded phantom data set and its ``labels.csv``; reuse it if already there.

    Layout: ``<root>/<split>/<class>/<patient>_<slice:03d>.png`` plus ``<root>/labels.csv``
    (columns ``path,label,patient_id,split,source,modality``, paths relative to ``root``) and
    ``<root>/synthetic.json`` (the parameters). Whole patients go to one split, stratified
    per class and seeded. Calling again with the same parameters returns at once; different
    parameters regenerate the root (only files this function wrote are removed).

    Args:
        root: output folder (created).
        modality: ``"ct"`` (covid / cap / normal) or ``"xray"`` (covid / non_covid).
        n_patients: patients per class.
        slices_per_patient: images per patient; ``None`` means 6 for CT and 1 for X-ray.
        size: image side in pixels.
        seed: master seed; one patient's images depend only on (seed, class, patient index).
        splits: train / val / test fractions of patients (sum 1).

    Returns:
        Path of ``labels.csv``.

    Raises:
        ValueError: on bad parameters, or if ``root`` holds a ``labels.csv`` this function
            did not write (user data is never overwritten).
    """
    classes = classes_for(modality)
    _check_size(size)
    if slices_per_patient is None:
        slices_per_patient = 6 if modality == "ct" else 1
    if int(slices_per_patient) < 1:
        raise ValueError(f"slices_per_patient must be >= 1, got {slices_per_patient!r}")
    if int(n_patients) < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients!r}")
    splits = tuple(float(f) for f in splits)
    if len(splits) != len(SPLITS) or any(f < 0 for f in splits) or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(f"splits must be 3 non-negative fractions (train, val, test) summing to 1, got {splits}")
    counts = _split_counts(int(n_patients), splits)

    root = Path(root).expanduser()
    params = {
        "generator_version": GENERATOR_VERSION, "modality": modality, "n_patients": int(n_patients),
        "slices_per_patient": int(slices_per_patient), "size": int(size), "seed": int(seed),
        "splits": list(splits),
    }
    labels_path = root / "labels.csv"
    meta_path = root / "synthetic.json"
    if _reuse_or_clear(root, params):
        return labels_path
    root.mkdir(parents=True, exist_ok=True)

    rows = []
    for ci, label in enumerate(classes):
        patient_split = _patient_splits(int(seed), modality, ci, int(n_patients), counts)
        for p in range(int(n_patients)):
            rows.extend(_write_patient(root, modality, label, ci, p, str(patient_split[p]), int(seed),
                                       int(slices_per_patient), size))

    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    atomic_write_bytes(labels_path, df.to_csv(index=False).encode())
    atomic_write_bytes(meta_path, (json.dumps(params, indent=2) + "\n").encode())
    return labels_path


def _reuse_or_clear(root: Path, params: dict) -> bool:
    """True when ``root`` already holds this exact data set (same parameters, every image there).

    Otherwise an earlier data set of this function is removed (its files only), so it can be
    written again.

    Raises:
        ValueError: ``root`` holds a ``labels.csv`` this function did not write.
    """
    labels_path = root / "labels.csv"
    meta_path = root / "synthetic.json"
    if meta_path.exists():
        try:
            same = json.loads(meta_path.read_text()) == params
        except (OSError, ValueError):
            same = False
        if same and labels_path.exists():
            try:
                rel = pd.read_csv(labels_path)["path"]
                if all((root / p).is_file() for p in rel):
                    return True
            except Exception:
                pass
        meta_path.unlink()  # no stale marker if we are interrupted while rewriting
        _remove_previous(root)
    elif labels_path.exists():
        raise ValueError(f"{labels_path} exists but was not written by write_synthetic_dataset; "
                         "refusing to overwrite it: choose another root")
    return False


def _patient_splits(seed: int, modality: str, ci: int, n_patients: int, counts: list[int]) -> np.ndarray:
    """The split of each patient of class number ``ci`` (seeded, whole patients)."""
    order = np.random.default_rng([seed, _MODALITY_CODE[modality], ci, 999]).permutation(n_patients)
    patient_split = np.empty(n_patients, dtype=object)
    patient_split[order] = np.repeat(SPLITS, counts)  # the counts sum to n_patients
    return patient_split


def _patient_images(modality: str, label: str, rng: np.random.Generator, k: int, size: int) -> list[np.ndarray]:
    """One patient's ``k`` images: CT slices spread over the chest, or follow-up radiographs."""
    if modality == "ct":
        anatomy = sample_ct_anatomy(rng)
        levels = np.linspace(0.15, 0.85, k) if k > 1 else np.array([0.5])
        levels = np.clip(levels + rng.uniform(-0.04, 0.04, k), 0.0, 1.0)
        return [make_ct_slice(label, rng, size, anatomy=anatomy, level=float(lv)) for lv in levels]
    anatomy = sample_xray_anatomy(rng)
    images: list[np.ndarray] = []
    for _ in range(k):
        # Follow-up films: same patient, slightly different positioning / exposure.
        a = dict(anatomy)
        if images:
            a.update(angle=a["angle"] + float(rng.uniform(-2, 2)),
                     gamma=a["gamma"] * float(rng.uniform(0.93, 1.07)))
        images.append(make_xray(label, rng, size, anatomy=a))
    return images


def _write_patient(root: Path, modality: str, label: str, ci: int, p: int, split: str, seed: int,
                   k: int, size: int) -> list[dict]:
    """Render and write patient ``p`` of class number ``ci``; its manifest rows."""
    rng = np.random.default_rng([seed, _MODALITY_CODE[modality], ci, p])
    pid = f"{_MODALITY_PREFIX[modality]}_{label.replace('_', '')}_p{p:03d}"
    out_dir = root / split / label
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for j, im in enumerate(_patient_images(modality, label, rng, k, size)):
        fname = f"{pid}_{j:03d}.png"
        ok, buf = cv2.imencode(".png", im)
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {fname}")
        atomic_write_bytes(out_dir / fname, buf.tobytes())
        rows.append({"path": f"{split}/{label}/{fname}", "label": label, "patient_id": pid,
                     "split": split, "source": "synthetic", "modality": modality})
    return rows
