"""Tests for covidlib.models: backbones, in-model preprocessing, saving, weights policy."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import socket
import warnings

import numpy as np
import pytest

import keras  # a hard dependency: a broken install must fail, not skip

from covidlib import models  # noqa: E402

S = 32
# The AICOV-CT backbones + the quick model get the full build / save / load round trip.
CORE = ["DenseNet121", "ResNet50V2", "MobileNetV2", "SmallCNN"]
# The big seed backbones cost ~7 s (idle CPU) to ~15 s (shared CPU) to build and call at 32 px,
# which alone would eat the fast suite's budget: they run only with COVIDLIB_TEST_BIG_BACKBONES=1
# (build + softmax check; no save/load round trip). Their preprocessing modes ("torch", "caffe")
# always get the cheap serialisation round trip of test_preprocess_layer_survives_save_load.
BIG = ["DenseNet201", "ResNet152"]
_big = pytest.mark.skipif(not os.environ.get("COVIDLIB_TEST_BIG_BACKBONES"),
                          reason="big backbone: set COVIDLIB_TEST_BIG_BACKBONES=1 to build it")


def _raw_batch(n: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, S, S, 1)).astype("float32")
    x[0] = 0.0  # a black image and a bright one make the rows differ
    x[1, 8:24, 8:24] = 255.0
    return x


def _bn_layers(model):
    return [l for l in models.walk_layers(model) if isinstance(l, keras.layers.BatchNormalization)]


@pytest.fixture(scope="module")
def built():
    """One classifier per backbone (from scratch, default settings), built once."""
    cache: dict[str, keras.Model] = {}

    def get(name: str) -> keras.Model:
        if name not in cache:
            keras.utils.set_random_seed(0)
            cache[name] = models.build_model(name, 3, S)
        return cache[name]

    return get


def test_backbone_registry_covers_the_paper_and_seed_backbones():
    assert set(CORE + BIG) <= set(models.BACKBONES)
    assert models.BACKBONES["ResNet152"].preprocess == "caffe"
    assert models.BACKBONES["DenseNet121"].preprocess == "torch"
    assert models.BACKBONES["MobileNetV2"].preprocess == "tf"


@pytest.mark.parametrize("name", CORE + [pytest.param(b, marks=[_big, pytest.mark.slow]) for b in BIG])
def test_every_backbone_builds_and_outputs_softmax(built, name):
    m = built(name)
    assert m.input_shape == (None, S, S, 1)
    assert m.output_shape == (None, 3)
    # Contract: linear chain image -> augment -> preprocess -> backbone -> pool -> dropout -> predictions
    assert [l.name for l in m.layers] == [
        "image", "augment", "preprocess", "backbone", "pool", "dropout", "predictions"]
    assert len(m.get_layer("backbone").output.shape) == 4
    p = np.asarray(m(_raw_batch(), training=False))
    assert p.shape == (3, 3)
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "mode,family",
    [("torch", "densenet"), ("tf", "resnet_v2"), ("tf", "mobilenet_v2"), ("caffe", "resnet")],
)
def test_backbone_preprocess_matches_keras_applications(mode, family):
    gray = _raw_batch(2, seed=3)
    rgb = np.repeat(gray, 3, axis=-1).copy()
    # keras' numpy preprocess_input may work in place: give it its own copy.
    expected = getattr(keras.applications, family).preprocess_input(rgb.copy())
    got = np.asarray(models.BackbonePreprocess(mode)(gray))
    assert got.shape == rgb.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_preprocess_unit_mode_and_unknown_mode():
    got = np.asarray(models.BackbonePreprocess("unit")(np.full((1, 4, 4, 1), 255.0, "float32")))
    np.testing.assert_allclose(got, 1.0)
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        models.BackbonePreprocess("imagenet")


@pytest.mark.parametrize("mode", ["torch", "tf", "caffe", "unit"])
def test_preprocess_layer_survives_save_load(tmp_path, mode):
    inp = keras.Input((S, S, 1))
    m = keras.Model(inp, models.BackbonePreprocess(mode, name="preprocess")(inp))
    m.save(tmp_path / "p.keras")
    loaded = models.load_model(tmp_path / "p.keras")
    assert loaded.get_layer("preprocess").mode == mode
    x = _raw_batch(2)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(m(x)))


def test_augment_block_has_no_random_shear(built):
    aug = built("SmallCNN").get_layer("augment")
    kinds = {type(l).__name__ for l in aug.layers}
    assert "RandomShear" not in kinds
    assert {"RandomAffine", "RandomContrast"} <= kinds


def _dots(n: int = 32) -> np.ndarray:
    x = np.zeros((n, S, S, 1), "float32")
    x[:, 10:14, 4:9] = 200.0  # off-centre block: a mirror image is different
    x[:, 20, 25] = 90.0
    return x


def test_random_affine_is_identity_at_inference_and_seeded_in_training():
    x = _dots()
    layer = models.RandomAffine(seed=3)
    np.testing.assert_array_equal(np.asarray(layer(x)), x)  # default: inference
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    a = np.asarray(models.RandomAffine(seed=3)(x, training=True))
    b = np.asarray(models.RandomAffine(seed=3)(x, training=True))
    np.testing.assert_array_equal(a, b)  # same seed, same draws
    assert a.shape == x.shape and a.min() >= 0.0 and a.max() <= 200.0 + 1e-3
    changed = [not np.allclose(a[i], x[i], atol=1e-3) for i in range(len(x))]
    assert all(changed)  # every image moved (continuous draws)
    c = np.asarray(layer(x, training=True))
    d = np.asarray(layer(x, training=True))
    assert not np.allclose(c, d)  # a new draw per call


def test_random_affine_flip_only_mirrors_half_of_the_images():
    x = _dots(64)
    out = np.asarray(models.RandomAffine(0.0, 0.0, 0.0, horizontal_flip=True, seed=0)(x, training=True))
    same = [np.allclose(o, i, atol=1e-3) for o, i in zip(out, x)]
    mirrored = [np.allclose(o, i[:, ::-1], atol=1e-3) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 16 <= sum(mirrored) <= 48


def test_random_affine_geometry_zoom_and_shift_keep_the_centre_and_move_content():
    x = np.zeros((16, S, S, 1), "float32")
    x[:, 15:17, 15:17] = 255.0  # the centre 2x2
    zoom = np.asarray(models.RandomAffine(0.0, 0.5, 0.0, horizontal_flip=False, seed=1)(x, training=True))
    assert (zoom[:, 15:17, 15:17, 0] > 100).all()  # scaling about the centre keeps the centre
    y = np.zeros((64, S, S, 1), "float32")
    y[:, :, 16:] = 255.0  # right half bright
    shift = np.asarray(models.RandomAffine(0.0, 0.0, 0.25, horizontal_flip=False, seed=2)(y, training=True))
    # a pure translation moves the vertical edge by up to 25 % of the width, differently per image
    edge = np.argmax(shift[:, S // 2, :, 0] > 127, axis=1)
    assert (np.abs(edge - 16) <= 0.25 * S + 1).all() and np.ptp(edge) >= 6
    with pytest.raises(ValueError, match="zoom"):
        models.RandomAffine(zoom=2.0)


def test_random_affine_survives_save_load(tmp_path):
    inp = keras.Input((S, S, 1))
    m = keras.Model(inp, models.RandomAffine(0.1, 0.2, 0.1, seed=5, name="aff")(inp))
    m.save(tmp_path / "a.keras")
    loaded = models.load_model(tmp_path / "a.keras")
    layer = loaded.get_layer("aff")
    assert (layer.rotation, layer.zoom, layer.translation, layer.seed) == (0.1, 0.2, 0.1, 5)
    x = _dots(4)
    np.testing.assert_array_equal(np.asarray(loaded(x)), x)


@pytest.mark.parametrize("name", CORE)
def test_save_load_round_trip_gives_identical_predictions(built, tmp_path, name):
    m = built(name)
    path = tmp_path / f"{name}.keras"
    m.save(path)
    loaded = models.load_model(path)  # safe mode, with the augment block inside
    assert "augment" in [l.name for l in loaded.layers]
    x = _raw_batch()
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)),
                               np.asarray(m(x, training=False)), atol=1e-6)
    # The from-scratch batch-norm momentum must survive saving, or a reloaded model trains differently.
    if name != "SmallCNN":
        assert {l.momentum for l in _bn_layers(loaded)} == {0.5}


def test_check_input_scale_warnings():
    with pytest.warns(UserWarning, match="0..255"):
        models.check_input_scale(np.random.default_rng(0).random((2, 8, 8, 1)))
    with pytest.warns(UserWarning, match="outside 0..255"):
        models.check_input_scale(np.array([0.0, 4095.0]))
    with pytest.warns(UserWarning, match="outside 0..255"):
        models.check_input_scale(np.array([-1.0, 0.5, 200.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models.check_input_scale(np.array([0, 17, 255], dtype=np.uint8))
        models.check_input_scale(np.array([3.0, 254.9]))
        models.check_input_scale(np.array([]))


def test_from_scratch_batchnorm_momentum(built):
    mobilenet = built("MobileNetV2")
    bns = _bn_layers(mobilenet)
    assert len(bns) > 40
    assert {l.momentum for l in bns} == {0.5}
    keep = models.build_backbone("MobileNetV2", S, None, bn_momentum=None)
    assert {l.momentum for l in _bn_layers(keep)} == {0.999}  # MobileNetV2's own default
    assert models.set_batchnorm_momentum(keep, 0.9) == len(_bn_layers(keep))
    assert {l.momentum for l in _bn_layers(keep)} == {0.9}


# (backbone, block output, that block's shortcut input): an identity shortcut on both sides
_RESIDUAL_BLOCKS = [("ResNet50V2", "conv2_block2_out", "conv2_block1_out"),
                    ("MobileNetV2", "block_2_add", "block_1_project_BN")]


@pytest.mark.parametrize("name,block,shortcut", _RESIDUAL_BLOCKS)
def test_zero_residual_makes_every_from_scratch_block_start_as_the_identity(name, block, shortcut):
    x = np.random.default_rng(0).normal(size=(2, S, S, 3)).astype("float32")

    def block_and_shortcut(zero_residual: bool) -> tuple[np.ndarray, np.ndarray]:
        keras.utils.set_random_seed(0)
        base = models.build_backbone(name, S, None, zero_residual=zero_residual)
        probe = keras.Model(base.input, [base.get_layer(block).output, base.get_layer(shortcut).output])
        out, short = probe(x, training=False)
        return np.asarray(out), np.asarray(short)

    out, short = block_and_shortcut(True)
    np.testing.assert_array_equal(out, short)  # shortcut + 0
    out, short = block_and_shortcut(False)  # Keras' own init: the block adds its branch
    assert np.abs(out - short).max() > 0.01 * np.abs(short).max()


def test_zero_init_residual_counts_the_residual_branches_of_each_backbone():
    # ResNet50V2: 3+4+6+3 bottlenecks; MobileNetV2: the 10 inverted residuals with a shortcut;
    # DenseNet concatenates instead of adding, SmallCNN is plain.
    expected = {"ResNet50V2": 16, "MobileNetV2": 10, "DenseNet121": 0, "SmallCNN": 0}
    for name, n in expected.items():
        assert models.zero_init_residual(models.build_backbone(name, S, None)) == n, name


def test_zero_residual_leaves_pretrained_weights_alone(tmp_path):
    keras.utils.set_random_seed(3)
    src = models.build_backbone("ResNet50V2", S, None)
    path = tmp_path / "r.weights.h5"
    src.save_weights(path)
    loaded = models.build_backbone("ResNet50V2", S, str(path), zero_residual=True)
    assert all(np.array_equal(a, b) for a, b in zip(src.get_weights(), loaded.get_weights()))
    assert np.abs(loaded.get_layer("conv2_block1_3_conv").kernel.numpy()).max() > 0


def test_weights_from_a_path(built, tmp_path):
    src = built("MobileNetV2").get_layer("backbone")
    path = tmp_path / "b.weights.h5"
    src.save_weights(path)
    keras.utils.set_random_seed(2)  # a different init, so equality comes from the file
    rebuilt = models.build_backbone("MobileNetV2", S, str(path))
    a, b = src.get_weights(), rebuilt.get_weights()
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # Loaded weights count as pretrained: the momentum override is not applied.
    assert {l.momentum for l in _bn_layers(rebuilt)} == {0.999}


def test_smallcnn_weights_from_a_path_and_no_imagenet(tmp_path):
    keras.utils.set_random_seed(1)
    src = models.build_backbone("SmallCNN", S)
    src.save_weights(tmp_path / "s.weights.h5")
    keras.utils.set_random_seed(2)
    rebuilt = models.build_backbone("SmallCNN", S, tmp_path / "s.weights.h5")
    assert all(np.array_equal(x, y) for x, y in zip(src.get_weights(), rebuilt.get_weights()))
    with pytest.raises(ValueError, match="no ImageNet"):
        models.build_backbone("SmallCNN", S, "imagenet")


def test_missing_weights_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.weights.h5"):
        models.build_model("SmallCNN", 3, S, weights=str(tmp_path / "nope.weights.h5"))
    with pytest.raises(FileNotFoundError):
        models.build_backbone("MobileNetV2", S, tmp_path / "missing.h5")


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning")
def test_imagenet_offline_raises_weights_unavailable(tmp_path, monkeypatch):
    from keras.src.utils import file_utils

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
    asked: list[str] = []

    def offline_get_file(fname=None, origin=None, *args, **kwargs):
        asked.append(fname)
        raise OSError("network disabled in tests")

    def no_network(*args, **kwargs):  # belt and braces: nothing may reach the network
        raise AssertionError("test tried to download")

    monkeypatch.setattr(file_utils, "get_file", offline_get_file)
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    before = socket.getdefaulttimeout()

    expected = models.imagenet_weights_file("MobileNetV2", S)
    assert expected == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    with pytest.raises(models.WeightsUnavailableError) as info:
        models.build_model("MobileNetV2", 3, S, weights="imagenet")
    msg = str(info.value)
    assert expected in msg
    assert str(tmp_path / "empty_keras_home" / "models" / expected) in msg
    assert "WEIGHTS=None" in msg
    # covidlib names the very file keras looks for.
    assert asked == [expected]
    assert isinstance(info.value.__cause__, OSError)
    assert socket.getdefaulttimeout() == before


def test_imagenet_weights_file_names():
    assert models.imagenet_weights_file("MobileNetV2", 128).endswith("_1.0_128_no_top.h5")
    assert models.imagenet_weights_file("DenseNet121", 64) == (
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5")
    with pytest.raises(ValueError, match="unknown backbone"):
        models.imagenet_weights_file("VGG16", 224)


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        models.build_model("ResNet9000", 3, S)
    with pytest.raises(ValueError, match="num_classes"):
        models.build_model("SmallCNN", 1, S)
    with pytest.raises(ValueError, match="head"):
        models.build_model("SmallCNN", 3, S, head="mlp")
    with pytest.raises(ValueError, match="img_size"):
        models.build_model("SmallCNN", 3, 16)


def test_load_model_refuses_lambda_layers(tmp_path):
    inp = keras.Input((4,))
    out = keras.layers.Lambda(lambda t: t * 2.0)(inp)
    path = tmp_path / "lambda.keras"
    keras.Model(inp, out).save(path)
    with pytest.raises(ValueError, match="refusing to load"):
        models.load_model(path)


def test_load_model_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model(tmp_path / "none.keras")
