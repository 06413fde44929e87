"""Tests for covidlib.enhance: crop, white balance, CLAHE, DCT denoising, pipelines, batch pass."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covidlib import denoise
from covidlib import enhance as E
from covidlib import enhance_batch as EB

# --------------------------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------------------------


def ct_phantom(size: int = 256, seed: int = 0, table: bool = True, link: bool = False) -> np.ndarray:
    """Dark background, elliptic body with two dark lungs, a bright table bar below the body."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size), 12, np.uint8)
    s = size / 256
    c = (int(128 * s), int(110 * s))
    cv2.ellipse(img, c, (int(90 * s), int(60 * s)), 0, 0, 360, 150, -1)  # body: x 38..218, y 50..170
    cv2.ellipse(img, (int(95 * s), int(110 * s)), (int(28 * s), int(38 * s)), 0, 0, 360, 40, -1)
    cv2.ellipse(img, (int(161 * s), int(110 * s)), (int(28 * s), int(38 * s)), 0, 0, 360, 40, -1)
    if table:
        img[int(196 * s) : int(203 * s), int(20 * s) : int(236 * s)] = 220  # table bar
        if link:  # a thin strut touching the body
            img[int(168 * s) : int(197 * s), int(127 * s) : int(129 * s)] = 200
    noise = rng.normal(0, 4, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def fov_phantom(size: int = 256) -> np.ndarray:
    """A gray reconstruction circle filling the frame, a brighter body inside, a table line."""
    img = np.zeros((size, size), np.uint8)
    cv2.circle(img, (size // 2, size // 2), size // 2, 100, -1)
    cv2.ellipse(img, (128, 110), (85, 55), 0, 0, 360, 185, -1)  # body: x 43..213, y 55..165
    cv2.ellipse(img, (95, 110), (26, 34), 0, 0, 360, 40, -1)
    cv2.ellipse(img, (161, 110), (26, 34), 0, 0, 360, 40, -1)
    img[190:193, 40:216] = 190  # thin table rail
    return img


def smooth_image(size: int = 128, seed: int = 0) -> np.ndarray:
    """A piecewise-smooth test image (gradient + shapes), float in 30..220."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = 60 + 80 * xx / size + 30 * np.sin(yy / 9.0)
    cv2.circle(img, (size // 3, size // 3), size // 6, 200, -1)
    cv2.rectangle(img, (size // 2, size // 2), (size - 20, size - 15), 40, -1)
    return img


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(peak**2 / mse))


def write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    buf.tofile(str(path))


def tree_hash(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# crop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("link", [False, True])
def test_crop_body_finds_body_and_drops_table(link):
    img = ct_phantom(link=link)
    x0, y0, x1, y1 = E.body_bbox(img, margin=0.0)
    # the body ellipse spans x 38..218, y 50..170 (allow the mask's coarse resolution)
    assert x0 <= 40 and y0 <= 52 and x1 >= 216 and y1 >= 168
    assert x0 >= 28 and y0 >= 40 and x1 <= 228
    assert y1 < 190, "the table bar below the body must not be in the crop"
    out = E.crop_body(img, margin=0.02)
    assert out.dtype == np.uint8 and out.shape[0] < 190 and out.shape[1] < 215
    assert out.max() < 215  # the bright table (220) is gone


def test_crop_body_uint16_and_margin():
    img8 = ct_phantom()
    img16 = img8.astype(np.uint16) * 257
    assert E.body_bbox(img16, 0.0) == E.body_bbox(img8, 0.0)
    out = E.crop_body(img16)
    assert out.dtype == np.uint16
    b0, b1 = E.body_bbox(img8, 0.0), E.body_bbox(img8, 0.05)
    assert b1[0] < b0[0] and b1[1] < b0[1] and b1[2] > b0[2] and b1[3] > b0[3]


def test_crop_body_field_of_view_circle():
    """The reconstruction circle is not the body: the crop is the brighter body inside it."""
    x0, y0, x1, y1 = E.body_bbox(fov_phantom(), margin=0.0)
    assert x0 <= 45 and y0 <= 57 and x1 >= 211 and y1 >= 163
    assert y0 >= 40 and y1 < 185 and x0 >= 30 and x1 <= 226


def test_crop_body_keeps_both_lungs_of_a_lung_masked_slice():
    img = np.zeros((200, 200), np.uint8)
    cv2.ellipse(img, (60, 100), (30, 50), 0, 0, 360, 90, -1)
    cv2.ellipse(img, (140, 100), (28, 48), 0, 0, 360, 90, -1)
    x0, y0, x1, y1 = E.body_bbox(img, 0.0)
    assert x0 <= 32 and x1 >= 166 and y0 <= 52 and y1 >= 148


def test_crop_body_with_bbox():
    img = ct_phantom()
    out = E.crop_body(img, bbox=(10, 20, 100, 120))
    assert out.shape == (100, 90)
    assert np.array_equal(out, img[20:120, 10:100])
    assert np.array_equal(E.crop_body(img, bbox=(10.0, 20.0, 100.0, 120.0)), out)
    with pytest.raises(ValueError, match="outside"):
        E.crop_body(img, bbox=(10, 20, 300, 120))
    with pytest.raises(ValueError, match="outside"):
        E.crop_body(img, bbox=(-1, 0, 10, 10))
    with pytest.raises(ValueError, match="outside|empty"):
        E.crop_body(img, bbox=(50, 20, 50, 120))
    with pytest.raises(ValueError, match="four numbers"):
        E.crop_body(img, bbox=(1, 2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        E.crop_body(img, bbox=(1, 2, float("nan"), 5))


def test_crop_body_blank_image_warns_and_is_noop():
    blank = np.full((64, 80), 7, np.uint8)
    with pytest.warns(UserWarning, match="no body"):
        out = E.crop_body(blank)
    assert np.array_equal(out, blank)
    speck = np.zeros((128, 128), np.uint8)
    speck[5, 5] = 255  # a single bright pixel is not a body
    with pytest.warns(UserWarning, match="no body"):
        assert E.crop_body(speck).shape == speck.shape


def test_crop_body_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8 or uint16"):
        E.crop_body(np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        E.crop_body(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="margin"):
        E.crop_body(ct_phantom(), margin=0.7)


def test_crop_border_trims_uniform_frame_with_text():
    rng = np.random.default_rng(0)
    inner = rng.integers(40, 220, (100, 80)).astype(np.uint8)
    img = np.zeros((140, 120), np.uint8)
    img[15:115, 25:105] = inner
    img[5:8, 30:33] = 255  # burned-in text in the top margin (sparse)
    out = E.crop_border(img)
    assert out.shape == (100, 80) and np.array_equal(out, inner)
    # no border: unchanged; uint16 works
    assert np.array_equal(E.crop_border(inner), inner)
    assert E.crop_border(img.astype(np.uint16) * 257).shape == (100, 80)
    # at most max_fraction per side
    img2 = np.zeros((100, 100), np.uint8)
    img2[45:55, 45:55] = 200
    assert E.crop_border(img2, max_fraction=0.25).shape == (50, 50)


# --------------------------------------------------------------------------------------------
# white balance, CLAHE
# --------------------------------------------------------------------------------------------


def test_white_balance_stretches_to_full_range():
    rng = np.random.default_rng(1)
    img = rng.integers(60, 120, (90, 70)).astype(np.uint8)
    out = E.white_balance(img)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    lo = np.percentile(img, 0.05, method="lower")
    hi = np.percentile(img, 99.95, method="higher")
    expect = np.clip(np.rint((img.astype(np.float64) - lo) * 255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    assert np.array_equal(out, expect)
    # 16-bit: same stretch on 16-bit values
    img16 = img.astype(np.uint16) * 300
    out16 = E.white_balance(img16)
    assert out16.dtype == np.uint8 and out16.min() == 0 and out16.max() == 255
    assert np.array_equal(out16, expect)
    # constant image: nothing to stretch
    assert np.array_equal(E.white_balance(np.full((5, 5), 9, np.uint8)), np.full((5, 5), 9, np.uint8))
    with pytest.raises(ValueError, match="low < high"):
        E.white_balance(img, low=50, high=10)
    with pytest.raises(ValueError, match="method"):
        E.white_balance(img, method="auto")


def test_white_balance_is_one_stretch_not_per_channel():
    """Colour input: one mapping for all channels (the seed stretched each channel separately)."""
    rng = np.random.default_rng(2)
    g = rng.integers(0, 256, (50, 50)).astype(np.uint8)
    bgr = np.dstack([g // 4 + 10, g // 2 + 20, g]).astype(np.uint8)  # channels with different ranges
    out = E.white_balance(bgr)
    lo, hi = E._percentile_bounds(bgr, 0.05, 99.95)
    lut = np.clip(np.rint((np.arange(256) - lo) * 255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    assert np.array_equal(out, lut[bgr])
    # per-channel stretching would have pushed every channel to 255; one stretch keeps the ratios
    assert out[..., 0].max() < 100 and out[..., 2].max() == 255
    # three identical gray channels: the same as the 2-D stretch, done once
    three = np.dstack([g, g, g])
    assert np.array_equal(E.white_balance(three)[..., 1], E.white_balance(g))


def test_white_balance_gray_world():
    rng = np.random.default_rng(3)
    base = rng.integers(50, 200, (40, 40)).astype(np.float64)
    bgr = np.dstack([base * 1.2, base * 0.9, base * 0.7]).clip(0, 255).astype(np.uint8)  # blue cast
    out = E.white_balance(bgr, method="gray_world")
    means = out.reshape(-1, 3).mean(axis=0)
    assert out.shape == bgr.shape and out.dtype == np.uint8
    assert means.max() - means.min() < 2.0
    with pytest.raises(ValueError, match="colour"):
        E.white_balance(base.astype(np.uint8), method="gray_world")


def test_clahe_parameters_and_cache():
    img = ct_phantom()
    a = E.clahe(img)
    ref = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(16, 16)).apply(img)
    assert np.array_equal(a, ref)
    b = E.clahe(img, clip_limit=4.0, tile_grid=(8, 8))
    assert np.array_equal(b, cv2.createCLAHE(clipLimit=4.0, tileGridSize=(8, 8)).apply(img))
    assert not np.array_equal(a, b)
    assert E._clahe_object(2.0, (16, 16)) is E._clahe_object(2.0, (16, 16))
    img16 = img.astype(np.uint16) * 257
    assert E.clahe(img16).dtype == np.uint16
    with pytest.raises(ValueError, match="clip_limit"):
        E.clahe(img, clip_limit=0)
    with pytest.raises(ValueError, match="tile_grid"):
        E.clahe(img, tile_grid=(0, 8))


# --------------------------------------------------------------------------------------------
# DCT denoising
# --------------------------------------------------------------------------------------------


def test_dct_denoise_raises_psnr_and_is_not_identity():
    clean = smooth_image(128)
    rng = np.random.default_rng(4)
    noisy = np.clip(np.rint(clean + rng.normal(0, 15, clean.shape)), 0, 255).astype(np.uint8)
    clean8 = np.rint(clean).astype(np.uint8)
    before = psnr(noisy, clean8)
    for step in (1, 2, 4):
        out = E.dct_denoise(noisy, sigma=15, step=step)
        assert out.dtype == np.uint8 and out.shape == noisy.shape
        assert psnr(out, clean8) > before + 5, f"step={step}"
    est = E.dct_denoise(noisy)  # sigma estimated
    assert psnr(est, clean8) > before + 5
    assert not np.array_equal(est, noisy)
    assert np.mean(est != noisy) > 0.5
    # step=1 (every offset, the paper's version) is at least as good as the fast default
    assert psnr(E.dct_denoise(noisy, 15, step=1), clean8) >= psnr(E.dct_denoise(noisy, 15), clean8) - 0.1


def reference_dct_denoise(img: np.ndarray, sigma: float, block: int = 8, step: int = 4) -> np.ndarray:
    """The algorithm written out patch by patch (float64): every block x block patch on each grid
    shifted by step, 2-D DCT, hard threshold at 3 sigma keeping the DC term, inverse, average."""
    b = block
    k = np.arange(b)[:, None]
    d = np.sqrt(2.0 / b) * np.cos(np.pi * (2 * np.arange(b)[None, :] + 1) * k / (2 * b))
    d[0] /= np.sqrt(2.0)
    x = cv2.copyMakeBorder(img, b, b, b, b, cv2.BORDER_REFLECT_101).astype(np.float64)
    acc = np.zeros_like(x)
    for dy in range(0, b, step):
        for dx in range(0, b, step):
            for y in range(dy, x.shape[0] - b + 1, b):
                for xx in range(dx, x.shape[1] - b + 1, b):
                    c = d @ x[y : y + b, xx : xx + b] @ d.T
                    dc = c[0, 0]
                    c[np.abs(c) <= 3 * sigma] = 0
                    c[0, 0] = dc
                    acc[y : y + b, xx : xx + b] += d.T @ c @ d
    out = acc[b:-b, b:-b] / (len(range(0, b, step)) ** 2)
    return np.clip(np.rint(out), 0, np.iinfo(img.dtype).max).astype(img.dtype)


@pytest.mark.parametrize("shape,step", [((40, 56), 4), ((37, 29), 2), ((24, 24), 8), ((19, 33), 1)])
def test_dct_denoise_matches_patch_by_patch_reference(shape, step):
    rng = np.random.default_rng(sum(shape) + step)
    clean = cv2.resize(smooth_image(64), shape[::-1])
    noisy = np.clip(np.rint(clean + rng.normal(0, 12, clean.shape)), 0, 255).astype(np.uint8)
    ours = E.dct_denoise(noisy, sigma=12.0, step=step)
    ref = reference_dct_denoise(noisy, 12.0, step=step)
    diff = np.abs(ours.astype(int) - ref)
    # float32 vs float64: a coefficient within rounding of the threshold may fall either way
    assert diff.max() <= 2 and np.mean(diff > 0) < 0.02


def test_dct_denoise_reuses_scratch_buffers_safely(monkeypatch):
    # the scratch buffers are reused across calls: a big image then a small one then the big one
    # again must give exactly what a fresh call gives
    rng = np.random.default_rng(9)
    big = rng.integers(0, 256, (200, 150)).astype(np.uint8)
    small = rng.integers(0, 256, (17, 23)).astype(np.uint8)
    a = E.dct_denoise(big, sigma=20.0)
    b_small = E.dct_denoise(small, sigma=20.0)
    assert np.array_equal(E.dct_denoise(big, sigma=20.0), a)
    assert np.array_equal(E.dct_denoise(small, sigma=20.0), b_small)
    # above the keep limit the buffers are temporaries: same result, nothing retained
    monkeypatch.setattr(denoise, "_WORKSPACE_KEEP", 100)
    monkeypatch.setattr(denoise._WORKSPACE, "pool", {})
    assert np.array_equal(E.dct_denoise(big, sigma=20.0), a)
    assert not denoise._WORKSPACE.pool
    assert np.abs(b_small.astype(int) - reference_dct_denoise(small, 20.0)).max() <= 2


def test_estimate_sigma():
    clean = smooth_image(256)
    for sigma in (3.0, 10.0, 25.0):
        rng = np.random.default_rng(int(sigma))
        noisy = np.clip(np.rint(clean + rng.normal(0, sigma, clean.shape)), 0, 255).astype(np.uint8)
        assert abs(E.estimate_sigma(noisy) - sigma) < 0.15 * sigma + 0.5
    assert E.estimate_sigma(np.full((32, 32), 5, np.uint8)) == 0.0
    const = np.full((16, 16), 5, np.uint8)
    assert np.array_equal(E.dct_denoise(const), const)  # nothing to remove: a copy


def test_dct_denoise_uint16_and_odd_sizes():
    clean = smooth_image(100)[:97, :]  # not a multiple of 8
    rng = np.random.default_rng(5)
    clean16 = np.rint(clean * 257).astype(np.uint16)
    noisy16 = np.clip(np.rint(clean * 257 + rng.normal(0, 12 * 257, clean.shape)), 0, 65535).astype(np.uint16)
    out = E.dct_denoise(noisy16)
    assert out.dtype == np.uint16 and out.shape == (97, 100)
    assert psnr(out, clean16, 65535) > psnr(noisy16, clean16, 65535) + 4
    with pytest.raises(ValueError, match="step"):
        E.dct_denoise(noisy16, step=9)
    with pytest.raises(ValueError, match="sigma"):
        E.dct_denoise(noisy16, sigma=-1)


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", list(E.PIPELINES))
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_every_pipeline_runs(pipeline, dtype):
    img = ct_phantom(160)
    if dtype == np.uint16:
        img = img.astype(np.uint16) * 257 + 5
    out = E.enhance(img, pipeline)
    assert out.dtype == np.uint8 and out.ndim == 2
    if "crop" in pipeline:
        assert out.shape[0] < img.shape[0]
    else:
        assert out.shape == img.shape
    xr = E.enhance(img, pipeline, modality="xray")
    assert xr.dtype == np.uint8 and xr.ndim == 2
    with_box = E.enhance(img, pipeline, bbox=(10, 10, 90, 70))
    if pipeline.startswith("lungcrop"):  # the lung field inside the given box, or the box
        assert with_box.shape[0] <= 60 and with_box.shape[1] <= 80
    else:
        assert with_box.shape == ((60, 80) if "crop" in pipeline else img.shape)


def test_enhance_seed_hybrid_matches_steps():
    img = ct_phantom()
    expect = E.clahe(E.white_balance(E.crop_body(img)))
    assert np.array_equal(E.enhance(img), expect)
    assert np.array_equal(E.enhance(img, "crop+clahe", clip_limit=3.0), E.clahe(E.crop_body(img), 3.0))


def test_pipeline_config_stable_and_validated():
    a = E.pipeline_config("crop+wb+clahe")
    assert a == E.pipeline_config("crop+wb+clahe", low=0.05, clip_limit=2, tile_grid=16)
    assert a["name"] == "crop+wb+clahe" and a["steps"] == ["crop", "wb", "clahe"]
    assert a["params"]["low"] == 0.05 and a["params"]["high"] == 99.95
    assert a["params"]["clip_limit"] == 2.0 and a["params"]["tile_grid"] == [16, 16]
    assert a["params"]["margin"] == 0.02
    assert json.loads(json.dumps(a)) == a
    assert json.dumps(a, sort_keys=True) == json.dumps(E.pipeline_config("crop+wb+clahe"), sort_keys=True)
    d = E.pipeline_config("crop+dct+wb+clahe", step=2)
    assert d["params"]["sigma"] is None and d["params"]["step"] == 2 and d["params"]["block"] == 8
    assert E.pipeline_config("none")["params"] == {}
    assert E.pipeline_config("crop", modality="xray")["modality"] == "xray"
    with pytest.raises(ValueError) as ei:
        E.pipeline_config("wb+clahe")
    for name in E.PIPELINES:
        assert name in str(ei.value)
    with pytest.raises(ValueError, match="clip_limit"):
        E.pipeline_config("crop", clip_limit=3.0)  # not a parameter of this pipeline
    with pytest.raises(ValueError, match="low"):
        E.pipeline_config("crop+wb", low=120)
    with pytest.raises(ValueError, match="modality"):
        E.pipeline_config("crop", modality="mri")
    with pytest.raises(ValueError, match="unknown enhancement pipeline"):
        E.enhance(ct_phantom(), "bogus")


# --------------------------------------------------------------------------------------------
# Batch pass
# --------------------------------------------------------------------------------------------


def make_tree(root: Path) -> list[Path]:
    files = [
        root / "COVID" / "a.png",
        root / "COVID" / "b.jpg",
        root / "with space" / "c d.png",
        root / "nïce ünicode" / "deep" / "e.png",
        root / "f.png",
    ]
    for i, p in enumerate(files):
        img = ct_phantom(96, seed=i)
        p.parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(p.suffix, img)
        buf.tofile(str(p))
    write_png(root / "16bit.png", ct_phantom(96, seed=9).astype(np.uint16) * 257)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"x")
    return files


def test_one_worker_runs_opencv_on_one_thread_and_restores_the_callers_setting(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_tree(src)
    seen = []
    chunk = EB._process_chunk

    def recording(*args):
        seen.append(cv2.getNumThreads())
        return chunk(*args)

    monkeypatch.setattr(EB, "_process_chunk", recording)
    before = cv2.getNumThreads()
    cv2.setNumThreads(2)  # the caller's own choice, e.g. a kernel that trains next
    try:
        s = EB.enhance_tree(src, tmp_path / "out", workers=1, progress=False)
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)
    assert s["written"] == 6 and seen == [1] * 6


def test_enhance_tree_mirrors_layout_and_resumes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out dir"
    make_tree(src)
    before = tree_hash(src)
    s = EB.enhance_tree(src, dst, workers=1, progress=False)
    assert s["total"] == 6 and s["written"] == 6 and s["skipped"] == 0 and s["failed"] == []
    for rel in ["COVID/a.png", "COVID/b.png", "with space/c d.png", "nïce ünicode/deep/e.png", "f.png", "16bit.png"]:
        out = cv2.imdecode(np.fromfile(str(dst / rel), np.uint8), cv2.IMREAD_UNCHANGED)
        assert out is not None and out.dtype == np.uint8 and out.ndim == 2, rel
    state = json.loads((dst / "enhance.json").read_text())
    assert state["config"] == E.pipeline_config("crop+wb+clahe")
    assert (dst / "enhance_failures.csv").read_text().strip() == "path,reason"
    assert tree_hash(src) == before  # sources never modified

    s2 = EB.enhance_tree(src, dst, workers=1, progress=False)
    assert s2["written"] == 0 and s2["skipped"] == 6

    # a "killed" run: one output missing, a stray temp file left behind
    stamp = (dst / "f.png").stat().st_mtime_ns
    (dst / "COVID" / "a.png").unlink()
    stray = dst / "COVID" / ".a.png.12345.enh-tmp"
    stray.write_bytes(b"half-written")
    s3 = EB.enhance_tree(src, dst, workers=1, progress=False)
    assert s3["written"] == 1 and s3["skipped"] == 5
    assert (dst / "COVID" / "a.png").exists() and not stray.exists()
    assert (dst / "f.png").stat().st_mtime_ns == stamp  # done files untouched
    assert tree_hash(src) == before


def test_enhance_tree_other_config_refused_unless_overwrite(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    EB.enhance_tree(src, dst, workers=1, progress=False)
    old = (dst / "f.png").read_bytes()
    with pytest.raises(ValueError, match="different configuration"):
        EB.enhance_tree(src, dst, pipeline="crop+clahe", workers=1, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        EB.enhance_tree(src, dst, workers=1, progress=False, clip_limit=3.0)
    s = EB.enhance_tree(src, dst, pipeline="crop", workers=1, progress=False, overwrite=True)
    assert s["written"] == 6
    assert (dst / "f.png").read_bytes() != old
    assert json.loads((dst / "enhance.json").read_text())["config"]["name"] == "crop"
    # outputs present but no record of who made them: refused
    other = tmp_path / "other"
    write_png(other / "f.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="enhance.json"):
        EB.enhance_tree(src, other, workers=1, progress=False)


def test_enhance_tree_unreadable_file_is_reported_not_fatal(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    (src / "COVID" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (src / "empty.jpg").write_bytes(b"")
    blank = np.full((64, 64), 3, np.uint8)
    write_png(src / "blank.png", blank)
    s = EB.enhance_tree(src, dst, workers=1, progress=False)
    assert s["written"] == 7 and s["n_failed"] == 2
    bad = {Path(f["path"]).name for f in s["failed"]}
    assert bad == {"broken.png", "empty.jpg"}
    assert all(f["reason"] for f in s["failed"])
    fails = pd.read_csv(dst / "enhance_failures.csv")
    assert sorted(Path(p).name for p in fails["path"]) == ["broken.png", "empty.jpg"]
    assert not (dst / "COVID" / "broken.png").exists()
    # the blank image: written uncropped, with a warning in the summary
    assert any(Path(w["path"]).name == "blank.png" and "no body" in w["warning"] for w in s["warnings"])
    # a re-run retries only the failures
    s2 = EB.enhance_tree(src, dst, workers=1, progress=False)
    assert s2["written"] == 0 and s2["n_failed"] == 2 and s2["skipped"] == 7


def test_enhance_tree_same_bytes_with_one_and_two_workers(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    for i in range(6):
        write_png(src / "more" / f"m{i}.png", ct_phantom(128, seed=20 + i))
    s1 = EB.enhance_tree(src, tmp_path / "w1", pipeline="crop+dct+wb+clahe", workers=1, progress=False)
    s2 = EB.enhance_tree(src, tmp_path / "w2", pipeline="crop+dct+wb+clahe", workers=2, progress=False)
    assert s1["written"] == s2["written"] == 12 and s2["workers"] == 2
    assert tree_hash(tmp_path / "w1") == tree_hash(tmp_path / "w2")


def test_one_worker_runs_in_this_process_without_a_pool(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_tree(src)

    def no_pool(*args, **kwargs):
        raise AssertionError("workers=1 must not start a process pool")

    import concurrent.futures

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_pool)
    s = EB.enhance_tree(src, tmp_path / "out", workers=1, progress=False)
    assert s["written"] == 6 and s["workers"] == 1


_UNGUARDED_SCRIPT = """
from covidlib import enhance_batch as EB
EB.enhance_tree({src!r}, {dst!r}, workers=2, progress=False)
"""


def test_a_script_without_the_main_guard_gets_a_clear_error(tmp_path):
    """Workers are started with "spawn", which re-runs the caller's script: without Python's
    ``if __name__ == "__main__":`` guard the pool breaks; the caller is told why."""
    import subprocess
    import sys

    src = tmp_path / "src"
    make_tree(src)
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED_SCRIPT.format(src=str(src), dst=str(tmp_path / "out")))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    # The error ends the caller's traceback; multiprocessing's resource tracker (another process
    # sharing stderr) may print its leaked-semaphore warning after it, at a time of its own.
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("RuntimeError: ")]
    last = lines[-1] if lines else out.stderr
    assert out.returncode == 1 and last.startswith("RuntimeError: an enhancement worker process died"), last
    assert 'needs `if __name__ == "__main__":`' in last
    assert not list((tmp_path / "out").rglob("*.enh-tmp"))


def test_enhance_tree_dst_inside_src_and_name_collisions(tmp_path):
    src = tmp_path / "src"
    write_png(src / "x.png", ct_phantom(64, seed=1))
    ok, buf = cv2.imencode(".jpg", ct_phantom(64, seed=2))
    buf.tofile(str(src / "x.jpg"))
    # Issue #13: writing into the source needs an explicit yes; then dst is not read back.
    with pytest.raises(ValueError, match="inside the input folder"):
        EB.enhance_tree(src, src / "enhanced", workers=1, progress=False)
    assert not (src / "enhanced").exists()
    s = EB.enhance_tree(src, src / "enhanced", workers=1, progress=False, allow_inside_input=True)
    assert s["written"] == 2
    assert (src / "enhanced" / "x.png.png").exists() and (src / "enhanced" / "x.jpg.png").exists()
    s2 = EB.enhance_tree(src, src / "enhanced", workers=1, progress=False,
                        allow_inside_input=True)  # its own output is not input
    assert s2["total"] == 2 and s2["skipped"] == 2
    with pytest.raises(ValueError, match="is the input folder"):
        EB.enhance_tree(src, src, pipeline="none", workers=1, progress=False, allow_inside_input=True)
    with pytest.raises(FileNotFoundError):
        EB.enhance_tree(tmp_path / "nope", tmp_path / "d", progress=False)


def test_enhance_tree_manifest_csv_with_bbox(tmp_path):
    data = tmp_path / "data set"
    rows = []
    for i, (label, split) in enumerate([("covid", "train"), ("normal", "val"), ("cap", "test")]):
        rel = f"imgs/{label}/p{i}.png"
        write_png(data / rel, ct_phantom(120, seed=i))
        rows.append({"path": rel, "label": label, "patient_id": f"NA{i}" if i else "NA",
                     "split": split, "source": "unit", "modality": "ct"})
    rows[0].update(xmin=10, ymin=20, xmax=90, ymax=80)
    rows[1].update(xmin=0, ymin=0, xmax=120, ymax=100)
    rows[2].update(xmin=None, ymin=None, xmax=None, ymax=None)  # no box: automatic crop
    rows.append({"path": "imgs/missing.png", "label": "covid", "patient_id": "p9", "split": "train",
                 "source": "unit", "modality": "ct"})
    man = data / "labels.csv"
    pd.DataFrame(rows).to_csv(man, index=False)
    dst = tmp_path / "enh"
    s = EB.enhance_tree(man, dst, workers=1, progress=False)
    assert s["written"] == 3 and s["n_failed"] == 1 and Path(s["manifest"]) == dst / "manifest.csv"
    out = pd.read_csv(dst / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(out.columns) == ["path", "label", "patient_id", "split", "source", "modality"]
    assert list(out["path"]) == ["covid/p0.png", "normal/p1.png", "cap/p2.png"]  # relative to dst
    assert list(out["patient_id"]) == ["NA", "NA1", "NA2"]  # text kept as text
    a = cv2.imread(str(dst / "covid" / "p0.png"), cv2.IMREAD_UNCHANGED)
    assert a.shape == (60, 80)  # the bbox was used
    b = cv2.imread(str(dst / "normal" / "p1.png"), cv2.IMREAD_UNCHANGED)
    assert b.shape == (100, 120)
    c = cv2.imread(str(dst / "cap" / "p2.png"), cv2.IMREAD_UNCHANGED)
    assert c.shape[0] < 120  # automatic body crop

    # the DataFrame API: absolute paths back, same files
    df = pd.read_csv(man)
    res = EB.enhance_manifest(df, dst, workers=1, progress=False, base_dir=data)
    assert all(os.path.isabs(p) and os.path.exists(p) for p in res["path"])
    assert res.attrs["enhance_summary"]["skipped"] == 3
    with pytest.raises(ValueError, match="path"):
        EB.enhance_manifest(pd.DataFrame({"x": [1]}), dst, progress=False)


def test_enhance_manifest_bbox_outside_image_reported(tmp_path):
    write_png(tmp_path / "in" / "a.png", ct_phantom(64))  # dst may not lie in the sources' folder
    df = pd.DataFrame([{"path": str(tmp_path / "in" / "a.png"), "label": "covid", "xmin": 0, "ymin": 0, "xmax": 500, "ymax": 50}])
    res = EB.enhance_manifest(df, tmp_path / "out", workers=1, progress=False)
    s = res.attrs["enhance_summary"]
    assert len(res) == 0 and s["n_failed"] == 1 and "outside" in s["failed"][0]["reason"]


_CTRL_C_SCRIPT = """
import multiprocessing, os, time
from covidlib import enhance_batch as EB

_run = EB._run_steps


def slow(*args):  # each image takes 50 ms, so the pass is still running when Ctrl-C comes
    open(os.path.join({busy!r}, str(os.getpid())), "w").close()  # this worker is at work
    time.sleep(0.05)
    return _run(*args)


EB._run_steps = slow  # module level: the spawned workers run this too

if __name__ == "__main__":
    try:
        EB.enhance_tree({src!r}, {dst!r}, workers=2, progress=False)
        print("PASS DONE", flush=True)
    except KeyboardInterrupt:
        print("CALLER INTERRUPTED", len(multiprocessing.active_children()), flush=True)
"""


def test_ctrl_c_stops_the_pass_and_leaves_nothing_half_written(tmp_path):
    """SIGINT to the process group (Ctrl-C in a terminal, papermill stopping a kernel) during a
    2-worker pass: the caller gets KeyboardInterrupt once the running chunks are done; workers
    print no traceback and are gone; every output in dst is complete; no temporary file is left."""
    import signal
    import subprocess
    import sys
    import time

    src, dst = tmp_path / "src", tmp_path / "out"
    for i in range(60):
        write_png(src / f"{i:02d}.png", ct_phantom(64, seed=i))
    script = tmp_path / "run.py"
    busy = tmp_path / "busy"
    busy.mkdir()
    script.write_text(_CTRL_C_SCRIPT.format(src=str(src), dst=str(dst), busy=str(busy)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    # Ctrl-C once both workers are at work (one still starting up would die of it, as any
    # Python process does before it can ignore the signal)
    while time.time() < deadline and proc.poll() is None and len(os.listdir(busy)) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert "CALLER INTERRUPTED 0" in out, out[-3000:]  # interrupted mid-pass, no worker left
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    pngs = list(dst.rglob("*.png"))
    assert 0 < len(pngs) < 60
    assert all(EB._read_stamp(str(p)) and cv2.imread(str(p), cv2.IMREAD_UNCHANGED) is not None for p in pngs)
    assert not [p for p in dst.rglob("*") if p.name.endswith(".enh-tmp")]
