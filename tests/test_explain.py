"""Tests for covidlib.explain: Grad-CAM on tiny models with the covidlib layer structure."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import numpy as np
import pytest

import keras  # a hard dependency: a broken install must fail, not skip

from covidlib import explain  # noqa: E402

S = 32


def _tiny_model(num_classes: int = 3, seed: int = 0, hidden_head: bool = False, name: str = "tiny"):
    """Same structure as models.build_model: image -> augment -> rescale -> backbone -> pool -> dropout -> predictions."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((S, S, 1), name="image")
    x = keras.Sequential([keras.layers.RandomFlip("horizontal_and_vertical")], name="augment")(inp)
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    b_in = keras.Input((S, S, 1))
    b = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(b_in)
    b = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv2")(b)
    x = keras.Model(b_in, b, name="backbone")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if hidden_head:
        x = keras.layers.Dense(6, activation="tanh", name="hidden")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    out = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name=name)


def _quadrant_model():
    """Class-1 evidence = brightness, carried by one channel: bright top-left square -> class 1."""
    m = _tiny_model(num_classes=2, seed=1)
    bb = m.get_layer("backbone")
    c1, c2 = bb.get_layer("conv1"), bb.get_layer("conv2")
    k1 = np.zeros((3, 3, 1, 4), np.float32)
    k1[1, 1, 0, 0] = 1.0  # channel 0 = the (rescaled) image itself
    c1.set_weights([k1, np.zeros(4, np.float32)])
    k2 = np.zeros((3, 3, 4, 8), np.float32)
    k2[1, 1, 0, 0] = 1.0  # channel 0 = image, downsampled
    c2.set_weights([k2, np.zeros(8, np.float32)])
    w = np.zeros((8, 2), np.float32)
    w[0, 1], w[0, 0] = 20.0, -20.0
    m.get_layer("predictions").set_weights([w, np.array([1.0, -1.0], np.float32)])
    return m


def _square_images(n: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imgs = rng.uniform(0, 3, size=(n, S, S)).astype(np.float32)
    imgs[:, 2:12, 3:13] = 250.0  # bright square in the top-left quadrant
    return imgs


@pytest.fixture(scope="module")
def model3():
    return _tiny_model(3, seed=0)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, size=(5, S, S)).astype(np.float32)


def test_shapes_and_range(model3, images):
    cams = explain.grad_cam(model3, images)
    assert cams.shape == (5, S, S)
    assert cams.dtype == np.float32
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    # Single 2-D image and (n, S, S, 1) both accepted.
    assert explain.grad_cam(model3, images[0]).shape == (1, S, S)
    assert explain.grad_cam(model3, images[..., None]).shape == (5, S, S)


def test_heatmap_resized_to_input_size(model3):
    big = np.random.default_rng(1).uniform(0, 255, size=(2, 48, 40)).astype(np.float32)
    cams = explain.grad_cam(model3, big)
    assert cams.shape == (2, 48, 40)


def test_quadrant_evidence_localised():
    m = _quadrant_model()
    imgs = _square_images()
    probs = np.asarray(m(imgs[..., None], training=False))
    assert (probs.argmax(1) == 1).all()
    cams = explain.grad_cam(m, imgs, class_index=1)
    for cam in cams:
        top_left = cam[: S // 2, : S // 2].sum()
        assert top_left / cam.sum() > 0.9
        peak = np.unravel_index(np.argmax(cam), cam.shape)
        assert peak[0] < S // 2 and peak[1] < S // 2
    # Same answer through the gradient path, and for "predicted class" (= 1 here).
    np.testing.assert_allclose(explain.grad_cam(m, imgs, method="gradient", class_index=1), cams, atol=1e-5)
    np.testing.assert_allclose(explain.grad_cam(m, imgs), cams, atol=1e-6)
    # Class 0 has only negative evidence there -> ReLU leaves nothing.
    assert np.allclose(explain.grad_cam(m, imgs, class_index=0), 0.0)


def test_analytic_equals_gradient(model3, images):
    for cls in (None, 0, 2):
        a = explain.grad_cam(model3, images, class_index=cls, method="analytic")
        g = explain.grad_cam(model3, images, class_index=cls, method="gradient")
        np.testing.assert_allclose(a, g, atol=1e-5)


def test_general_head_uses_gradient():
    m = _tiny_model(3, seed=2, hidden_head=True)
    imgs = np.random.default_rng(2).uniform(0, 255, size=(3, S, S)).astype(np.float32)
    cams = explain.grad_cam(m, imgs)  # auto -> gradient path
    assert cams.shape == (3, S, S) and 0.0 <= cams.min() and cams.max() <= 1.0
    np.testing.assert_allclose(cams, explain.grad_cam(m, imgs, method="gradient"))
    with pytest.raises(ValueError, match="analytic"):
        explain.grad_cam(m, imgs, method="analytic")


def test_class_index_handling(model3, images):
    probs = np.asarray(model3(images[..., None], training=False))
    pred = probs.argmax(1)
    np.testing.assert_allclose(explain.grad_cam(model3, images), explain.grad_cam(model3, images, class_index=pred))
    per_image = np.array([0, 1, 2, 0, 1])
    cams = explain.grad_cam(model3, images, class_index=per_image)
    for i, c in enumerate(per_image):
        np.testing.assert_allclose(cams[i], explain.grad_cam(model3, images[i], class_index=int(c))[0], atol=1e-6)
    one = explain.grad_cam(model3, images, class_index=2)
    np.testing.assert_allclose(one, explain.grad_cam(model3, images, class_index=[2] * 5))
    with pytest.raises(ValueError, match="out of range"):
        explain.grad_cam(model3, images, class_index=3)
    with pytest.raises(ValueError, match="one int per image"):
        explain.grad_cam(model3, images, class_index=[0, 1])
    with pytest.raises(ValueError, match="no top-level layer"):
        explain.grad_cam(model3, images, layer_name="nope")
    with pytest.raises(ValueError, match="method"):
        explain.grad_cam(model3, images, method="magic")


def test_batching_consistent(model3, images):
    np.testing.assert_allclose(
        explain.grad_cam(model3, images, batch_size=2), explain.grad_cam(model3, images), atol=1e-6
    )


def test_ensemble_mean(model3, images):
    other = _tiny_model(3, seed=5, name="other")
    probs = (np.asarray(model3(images[..., None], training=False)) + np.asarray(other(images[..., None], training=False))) / 2
    cls = probs.argmax(1)
    expected = (explain.grad_cam(model3, images, class_index=cls) + explain.grad_cam(other, images, class_index=cls)) / 2
    got = explain.ensemble_grad_cam([model3, other], images)
    assert got.shape == (5, S, S)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    fixed = explain.ensemble_grad_cam([model3, other], images, class_index=1)
    np.testing.assert_allclose(
        fixed, (explain.grad_cam(model3, images, class_index=1) + explain.grad_cam(other, images, class_index=1)) / 2,
        atol=1e-6,
    )
    with pytest.raises(ValueError):
        explain.ensemble_grad_cam([], images)


def test_overlay_shape_dtype():
    img = np.random.default_rng(0).integers(0, 256, size=(40, 30), dtype=np.uint8)
    hm = np.zeros((10, 10), np.float32)
    hm[:5, :5] = 1.0
    out = explain.overlay_heatmap(img, hm)
    assert out.shape == (40, 30, 3) and out.dtype == np.uint8
    # alpha 0 -> the gray image itself, alpha 1 -> pure colormap.
    np.testing.assert_array_equal(explain.overlay_heatmap(img, hm, alpha=0.0), np.repeat(img[..., None], 3, axis=2))
    full = explain.overlay_heatmap(img, np.ones((40, 30)), alpha=1.0)
    expected = cv2.cvtColor(cv2.applyColorMap(np.full((40, 30), 255, np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(full, expected)
    # Float 0..255 and uint16 images are accepted.
    assert explain.overlay_heatmap(img.astype(np.float32), hm).dtype == np.uint8
    assert explain.overlay_heatmap(img.astype(np.uint16) * 200, hm).shape == (40, 30, 3)
    with pytest.raises(ValueError):
        explain.overlay_heatmap(img, hm, alpha=2.0)
    with pytest.raises(ValueError):
        explain.overlay_heatmap(np.zeros((2, 3, 4, 5)), hm)


def test_save_gradcam_atomic(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, size=(32, 32), dtype=np.uint8)
    hm = np.random.default_rng(1).uniform(size=(32, 32)).astype(np.float32)
    out = explain.save_gradcam(img, hm, tmp_path / "a" / "b" / "cam.png")
    assert out.exists() and out.stat().st_size > 100
    back = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert back.shape == (32, 32, 3)
    assert [p.name for p in out.parent.iterdir()] == ["cam.png"]  # no temp file left


def test_non_linear_chain_rejected(images):
    keras.utils.set_random_seed(3)
    inp = keras.Input((S, S, 1), name="image")
    side = keras.layers.GlobalAveragePooling2D(name="side")(keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inp))
    b_in = keras.Input((S, S, 1))
    b = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(b_in)
    x = keras.Model(b_in, b, name="backbone")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Concatenate(name="concat")([x, side])
    out = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    m = keras.Model(inp, out)
    with pytest.raises(ValueError, match="linear layer chain"):
        explain.grad_cam(m, images)


def _phantom(seed: int = 0, size: int = 128) -> np.ndarray:
    from covidlib import synthetic

    anatomy = synthetic.sample_ct_anatomy(np.random.default_rng(seed))
    return synthetic.make_ct_slice("covid", np.random.default_rng(seed + 1), size, anatomy=anatomy)


def test_lung_share_scores_where_the_heatmap_lies():
    from covidlib.lungs import find_lungs

    imgs = np.stack([_phantom(0), _phantom(5)])
    masks = np.stack([find_lungs(i).mask for i in imgs])
    assert masks.any(axis=(1, 2)).all()
    on = explain.lung_share(imgs, masks.astype(np.float32))
    off = explain.lung_share(imgs[..., None], (~masks).astype(np.float32))
    even = explain.lung_share(imgs, np.ones(imgs.shape, np.float32))
    assert on["n_images"] == on["n_lung_field"] == 2
    assert on["cam_in_lungs"] == 1.0 and off["cam_in_lungs"] == 0.0
    # an even heatmap scores the lung area, which is the same for every heatmap
    assert even["cam_in_lungs"] == pytest.approx(even["lung_area"], abs=1e-4)
    assert on["lung_area"] == off["lung_area"] == even["lung_area"]
    assert 0.05 < even["lung_area"] < 0.6


def test_lung_share_skips_images_without_a_lung_field_and_checks_shapes():
    blank = np.zeros((2, 64, 64), np.uint8)
    res = explain.lung_share(blank, np.ones((2, 64, 64), np.float32))
    assert res == {"n_images": 2, "n_lung_field": 0, "cam_in_lungs": None, "lung_area": None,
                   "ceiling": None}
    with pytest.raises(ValueError, match="same shape"):
        explain.lung_share(blank, np.ones((2, 32, 32), np.float32))


def test_lung_share_ceiling_falls_as_the_map_gets_coarser(model3):
    imgs = np.stack([_phantom(0), _phantom(5)])
    cams = np.ones(imgs.shape, np.float32)
    full = explain.lung_share(imgs, cams, grid=imgs.shape[1:])
    coarse = [explain.lung_share(imgs, cams, grid=(g, g))["ceiling"] for g in (16, 4, 1)]
    assert full["ceiling"] == pytest.approx(1.0) and full["cam_in_lungs"] == pytest.approx(full["lung_area"], abs=1e-4)
    assert 1.0 > coarse[0] > coarse[1] > coarse[2]
    assert coarse[2] == pytest.approx(full["lung_area"], abs=1e-3)  # one cell: an even map
    assert explain.cam_grid(model3) == (S // 2, S // 2)  # one stride-2 convolution
    from covidlib.models import build_model

    assert explain.cam_grid(build_model("DenseNet121", 2, 96, augment=False)) == (3, 3)
