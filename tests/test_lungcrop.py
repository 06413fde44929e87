"""The lung-field crop (issue #16): ``enhance.find_lungs`` / ``crop_lungs`` and the ``lungcrop``
pipelines, on synthetic phantoms whose anatomy (lung ellipses, table) is known."""
from __future__ import annotations

import math
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import numpy as np
import pandas as pd
import pytest

from covidlib import enhance as E
from covidlib import enhance_batch as EB
from covidlib import synthetic

SIZES = (128, 256)
LEVELS = (0.25, 0.5, 0.75)


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x)), int(round(y))


def _slice(seed: int, size: int, level: float, label: str = "covid") -> tuple[np.ndarray, dict]:
    anatomy = synthetic.sample_ct_anatomy(np.random.default_rng(seed))
    return synthetic.make_ct_slice(label, np.random.default_rng(seed + 1), size, anatomy=anatomy,
                                   level=level), anatomy


def _truth(a: dict, size: int, level: float) -> tuple[np.ndarray, float]:
    """The lungs (their ellipses within the body's) and the table's top row of
    :func:`synthetic.make_ct_slice`.

    Written out from the generator's geometry (GENERATOR_VERSION 1): update with it. A lung
    ellipse of the generator may reach past the body's: that part looks like background, no
    lung, in the image (a real lung always has a chest wall around it).
    """
    s = float(size)
    cx, cy, bw, bh = a["cx"] * s, a["cy"] * s, a["body_w"] * s, a["body_h"] * s
    lscale = 0.45 + 0.55 * math.sin(math.pi * (0.1 + 0.85 * level)) ** 0.6
    lw, lh = a["lung_w"] * bw * lscale, a["lung_h"] * bh * (0.6 + 0.4 * lscale)
    mask = np.zeros((size, size), np.uint8)
    for sgn in (-1, 1):
        cv2.ellipse(mask, _pt(cx + sgn * a["lung_sep"] * bw, cy - 0.06 * bh), _pt(lw, lh), sgn * 8, 0, 360, 1, -1)
    body = np.zeros_like(mask)
    cv2.ellipse(body, _pt(cx, cy), _pt(bw, bh), 0, 0, 360, 1, -1)
    mask &= body
    rot = cv2.getRotationMatrix2D((cx, cy), a["angle"], 1.0)
    mask = cv2.warpAffine(mask, rot, (size, size), flags=cv2.INTER_NEAREST)
    ang = math.radians(a["angle"])
    bottom = cy + math.sqrt((bh * math.cos(ang)) ** 2 + (bw * math.sin(ang)) ** 2)
    thick = max(2, int(round(0.025 * s)))
    return mask.astype(bool), bottom + a["table_gap"] * s + 1 - thick / 2 - 1


def _area(box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def test_generator_geometry_is_the_one_written_out_here():
    assert synthetic.GENERATOR_VERSION == 1, "synthetic CT geometry changed: update _truth()"


@pytest.mark.parametrize("size", SIZES)
def test_crop_holds_the_lungs_and_leaves_out_the_table(size):
    found, tighter, recall = 0, 0, []
    for seed in range(6):
        for level in LEVELS:
            img, a = _slice(100 * seed, size, level, ("covid", "cap", "normal")[seed % 3])
            lungs, table_top = _truth(a, size, level)
            field = E.find_lungs(img)
            if field.box is None:
                continue
            found += 1
            x0, y0, x1, y1 = field.box
            inside = lungs[y0:y1, x0:x1].sum() / lungs.sum()
            assert inside >= 0.98, (seed, level, field.box, inside)
            assert y1 <= table_top, (seed, level, field.box, table_top)  # no table row
            assert np.array_equal(E.crop_lungs(img), img[y0:y1, x0:x1])
            # The mask is aerated lung: nearly all of it lies in the lungs; dense lesions at the
            # lung's edge and a lung leaking through a wall too thin to see may be missing from
            # it (the box is mirrored about the midline and grown by the margin for them).
            assert field.mask.shape == img.shape and lungs[field.mask].mean() >= 0.95
            recall.append(field.mask[lungs].mean())
            tighter += _area(field.box) < _area(E.body_bbox(img))
    assert found >= 16  # of 18: the phantoms have a lung field
    assert tighter >= 0.8 * found  # and it is tighter than the body crop
    assert float(np.median(recall)) >= 0.8


def test_stable_under_noise_and_translation():
    img, a = _slice(7, 256, 0.5)
    again = synthetic.make_ct_slice("covid", np.random.default_rng(99), 256, anatomy=a, level=0.5)
    b1, b2 = E.find_lungs(img).box, E.find_lungs(again).box
    assert max(abs(u - v) for u, v in zip(b1, b2)) <= 0.03 * 256
    shifted = cv2.copyMakeBorder(img, 20, 0, 30, 0, cv2.BORDER_CONSTANT, value=int(img[:5, :5].mean()))
    b3 = E.find_lungs(shifted).box
    assert max(abs(u - v) for u, v in zip(b3, (b1[0] + 30, b1[1] + 20, b1[2] + 30, b1[3] + 20))) <= 5


def test_cropping_again_changes_little():
    kept = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a second pass may fall back to no crop
        for seed in range(6):
            for size in SIZES:
                once = E.crop_lungs(_slice(seed, size, 0.5)[0])
                kept.append(E.crop_lungs(once).size / once.size)
    assert min(kept) >= 0.7 and float(np.median(kept)) >= 0.85


def test_uint16_gives_the_same_box():
    img, _ = _slice(3, 128, 0.5)
    img16 = img.astype(np.uint16) * 257 + 7
    assert E.find_lungs(img16).box == E.find_lungs(img).box
    out = E.crop_lungs(img16)
    assert out.dtype == np.uint16 and out.shape == E.crop_lungs(img).shape


@pytest.mark.parametrize("kind", ["blank", "bright", "tiny", "speck"])
def test_featureless_images_fall_back_without_a_crop(kind):
    img = {"blank": np.zeros((64, 80), np.uint8), "bright": np.full((64, 64), 255, np.uint8),
           "tiny": np.random.default_rng(0).integers(0, 256, (6, 5), dtype=np.uint8),
           "speck": np.pad(np.full((2, 2), 200, np.uint8), 40)}[kind]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = E.crop_lungs(img)
        enhanced = E.enhance(img, "lungcrop+wb+clahe")
    assert out.size > 0 and out.dtype == img.dtype and out.ndim == 2
    assert enhanced.size > 0 and enhanced.dtype == np.uint8
    if kind != "tiny":
        assert out.shape == img.shape
        assert any("crop_lungs" in str(w.message) for w in caught)
    if kind in ("blank", "bright"):
        assert E.find_lungs(img).fallback == "none" and "no body" in E.find_lungs(img).reason


def test_a_body_without_enclosed_air_falls_back_to_the_body_crop():
    # Lungs already masked out (lung-masked exports) or a slice below the lungs: no enclosed air.
    img = np.full((160, 160), 10, np.uint8)
    cv2.ellipse(img, (80, 75), (60, 40), 0, 0, 360, 170, -1)
    img[130:134, 15:145] = 220  # table
    with pytest.warns(UserWarning, match="no air enclosed"):
        out = E.crop_lungs(img)
    assert np.array_equal(out, E.crop_body(img))
    field = E.find_lungs(img)
    assert field.box is None and field.fallback == "body"


def test_a_lung_masked_image_keeps_its_lungs():
    """Lungs on black, the gap between them black too: that gap is no lung (the body crop is)."""
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(90, 12, (200, 200)), 0, 255).astype(np.uint8)
    lungs = np.zeros_like(img)
    cv2.ellipse(lungs, (60, 100), (35, 55), 0, 0, 360, 1, -1)
    cv2.ellipse(lungs, (140, 100), (35, 55), 0, 0, 360, 1, -1)
    img[lungs == 0] = 0
    with pytest.warns(UserWarning, match="no air enclosed"):
        out = E.crop_lungs(img)
    assert np.array_equal(out, E.crop_body(img))
    assert out.shape[1] >= 150  # both lungs, 25..175


def test_a_white_out_lung_stays_in_the_crop():
    """One lung fully dense: the box is mirrored about the torso's midline."""
    img = np.full((200, 200), 10, np.uint8)
    cv2.ellipse(img, (100, 95), (80, 55), 0, 0, 360, 160, -1)
    cv2.ellipse(img, (65, 95), (25, 38), 0, 0, 360, 35, -1)  # the aerated lung (image left)
    cv2.ellipse(img, (135, 95), (25, 38), 0, 0, 360, 150, -1)  # consolidated: tissue-bright
    x0, _, x1, _ = E.find_lungs(img, margin=0.0).box
    assert x0 <= 41 and x1 >= 159  # both lungs, 40..90 and 110..160


def test_xray_modality_uses_the_border_crop():
    xr = synthetic.make_xray("covid", np.random.default_rng(0), 128)
    framed = cv2.copyMakeBorder(xr, 6, 6, 6, 6, cv2.BORDER_CONSTANT, value=0)
    assert np.array_equal(E.enhance(framed, "lungcrop+wb+clahe", modality="xray"),
                          E.enhance(framed, "crop+wb+clahe", modality="xray"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ct_mode = E.crop_lungs(framed)  # a radiograph mislabelled CT: some crop, never a crash
    assert ct_mode.ndim == 2 and min(ct_mode.shape) >= 16


def test_given_box_is_searched_and_kept_as_the_fallback():
    img, a = _slice(5, 256, 0.5)
    bb = E.body_bbox(img, 0.02)
    inner = E.crop_lungs(img, bbox=bb)
    assert inner.shape[0] <= bb[3] - bb[1] and inner.shape[1] <= bb[2] - bb[0]
    blank_box = (0, 0, 20, 20)  # background only
    with pytest.warns(UserWarning, match="given box"):
        assert E.crop_lungs(img, bbox=blank_box).shape == (20, 20)


def test_pipelines_config_and_validation():
    assert {"lungcrop", "lungcrop+wb", "lungcrop+wb+clahe"} <= set(E.PIPELINES)
    cfg = E.pipeline_config("lungcrop+wb+clahe")
    assert cfg["steps"] == ["lungcrop", "wb", "clahe"]
    assert cfg["params"]["lung_margin"] == 0.05 and cfg["params"]["margin"] == 0.02
    img, _ = _slice(2, 128, 0.5)
    expect = E.clahe(E.white_balance(E.crop_lungs(img)))
    assert np.array_equal(E.enhance(img, "lungcrop+wb+clahe"), expect)
    wide = E.enhance(img, "lungcrop", lung_margin=0.2)
    assert wide.size >= E.enhance(img, "lungcrop").size
    with pytest.raises(ValueError, match="lung_margin"):
        E.pipeline_config("lungcrop", lung_margin=0.7)
    with pytest.raises(ValueError, match="lung_margin"):
        E.pipeline_config("crop", lung_margin=0.1)  # not a parameter of the body crop


def test_manifest_pass_drops_the_bbox_columns(tmp_path):
    img, _ = _slice(4, 128, 0.5)
    src = tmp_path / "src" / "a.png"
    src.parent.mkdir()
    cv2.imwrite(str(src), img)
    df = pd.DataFrame({"path": [str(src)], "label": ["covid"], "patient_id": ["p"], "split": ["test"],
                       "source": ["x"], "modality": ["ct"], "xmin": [0], "ymin": [0], "xmax": [128], "ymax": [128]})
    out = EB.enhance_manifest(df, tmp_path / "dst", "lungcrop+wb+clahe", workers=1, progress=False)
    assert "xmin" not in out.columns
    assert np.array_equal(cv2.imread(out.loc[0, "path"], cv2.IMREAD_UNCHANGED),
                          E.enhance(img, "lungcrop+wb+clahe", bbox=(0, 0, 128, 128)))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*collapsed to one class:UserWarning")
def test_a_model_trained_on_lungcrop_gets_the_same_crop_at_predict_time(tmp_path, tiny_ct_manifest):
    from covidlib import predict, train
    from covidlib.arraystore import read_resized

    res = train.train_backbone(tmp_path, manifest=tiny_ct_manifest, enhancement="lungcrop+wb+clahe",
                               backbone="SmallCNN", img_size=32, epochs=1, batch_size=18, augment=False,
                               tensorboard=False, seed=0, verbose=0)
    cfg = __import__("json").loads((res.model_dir / "config.json").read_text())
    assert cfg["enhancement"] == E.pipeline_config("lungcrop+wb+clahe")
    saved = pd.read_csv(res.model_dir / "predictions_test.csv")
    tail = lambda p: "/".join(str(p).replace("\\", "/").rsplit("/", 3)[-3:]).rsplit(".", 1)[0]
    test = tiny_ct_manifest[tiny_ct_manifest["split"] == "test"]
    df = predict.predict_paths(list(test["path"]), model_dirs=[res.model_dir])
    (member,) = predict.load_members({res.model_dir.name: res.model_dir})
    from covidlib.images import read_image

    by_tail = {tail(p): p for p in saved["path"]}
    for src in test["path"]:  # the array training used == the array predict prepares
        assert np.array_equal(predict._prepare(read_image(src), member, False),
                              read_resized(by_tail[tail(src)], 32))
    p_cols = [f"p_{c}" for c in res.classes]
    got = df.set_index(df["path"].map(tail))[[f"{res.model_dir.name}:{c}" for c in p_cols]]
    want = saved.set_index(saved["path"].map(tail))[p_cols]
    np.testing.assert_allclose(got.loc[want.index].to_numpy(), want.to_numpy(), atol=1e-5)
