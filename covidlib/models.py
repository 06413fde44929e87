"""Backbone registry, classification heads, weights policy and in-model preprocessing.

Every model built here takes raw grayscale images, shape ``(S, S, 1)``, values 0..255, and carries
its backbone's own ``preprocess_input`` as a registered layer, so a saved model can be given raw
pixels and the preprocessing can be neither forgotten nor applied twice.

Layer chain (linear, relied on by :mod:`covidlib.explain`)::

    image -> [augment] -> preprocess -> backbone (nested keras.Model) -> pool -> [hidden] -> dropout
          -> predictions
"""
from __future__ import annotations

import functools
import json
import numbers
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import keras
from keras import layers, ops

# ImageNet statistics used by the "torch" style preprocessing (DenseNet).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Caffe-style (ResNet v1) means, BGR order.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and preprocess its input."""

    name: str
    constructor: str  # attribute of keras.applications
    preprocess: str  # "torch" | "tf" | "caffe" | "unit"
    weights_file: str  # name of the ImageNet no-top weights file in the Keras cache
    weights_url: str
    paper: str


_GCS = "https://storage.googleapis.com/tensorflow/keras-applications/"

BACKBONES: dict[str, BackboneSpec] = {
    "DenseNet121": BackboneSpec(
        "DenseNet121", "DenseNet121", "torch",
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", _GCS + "densenet/",
        "AICOV-CT stage 1"),
    "ResNet50V2": BackboneSpec(
        "ResNet50V2", "ResNet50V2", "tf",
        "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5", _GCS + "resnet/",
        "AICOV-CT stage 1"),
    "MobileNetV2": BackboneSpec(
        "MobileNetV2", "MobileNetV2", "tf",
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5",
        _GCS + "mobilenet_v2/", "AICOV-CT stage 1"),
    "DenseNet201": BackboneSpec(
        "DenseNet201", "DenseNet201", "torch",
        "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5", _GCS + "densenet/",
        "what the seeds' code used"),
    "ResNet152": BackboneSpec(
        "ResNet152", "ResNet152", "caffe",
        "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5", _GCS + "resnet/",
        "what the seeds' code used"),
    # A small plain CNN: the quick model of the enhancement ablation and of fast tests.
    "SmallCNN": BackboneSpec("SmallCNN", "", "unit", "", "", "covidlib quick model"),
}

HEADS = ("gap", "gap_dense256")


class WeightsUnavailableError(RuntimeError):
    """Raised when pretrained weights cannot be found or downloaded."""


def keras_cache_dir() -> Path:
    """Folder where Keras keeps downloaded application weights."""
    base = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return Path(base) / "models"


def imagenet_weights_file(backbone: str, img_size: int) -> str:
    """File name Keras looks for when ``weights="imagenet"`` (no-top variant)."""
    spec = _spec(backbone)
    rows = img_size if img_size in (96, 128, 160, 192, 224) else 224
    return spec.weights_file.format(rows=rows)


def _spec(backbone: str) -> BackboneSpec:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {list(BACKBONES)}")
    return BACKBONES[backbone]


@keras.saving.register_keras_serializable(package="covidlib")
class BackbonePreprocess(layers.Layer):
    """Grayscale 0..255 -> three channels in the scale the backbone was trained on.

    Modes follow ``keras.applications.<family>.preprocess_input``: ``torch`` (DenseNet:
    /255 then ImageNet mean/std), ``tf`` (ResNetV2, MobileNetV2: scale to [-1, 1]), ``caffe``
    (ResNet v1: BGR, ImageNet mean subtracted, no scaling) and ``unit`` (/255, SmallCNN).
    """

    def __init__(self, mode: str = "tf", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in ("torch", "tf", "caffe", "unit"):
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, "float32")
        if x.shape[-1] == 1:
            x = ops.concatenate([x, x, x], axis=-1)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_IMAGENET_MEAN, dtype="float32")
            std = ops.convert_to_tensor(_IMAGENET_STD, dtype="float32")
            return (x / 255.0 - mean) / std
        # caffe: RGB -> BGR, zero-centre per channel; gray input makes the flip a no-op but keep it exact.
        x = ops.flip(x, axis=-1)
        return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype="float32")

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


def check_input_scale(x: np.ndarray, *, where: str = "input") -> None:
    """Warn when images do not look like raw 0..255 pixels.

    Models built here preprocess inside the graph; feeding images already scaled to [0, 1]
    (or [-1, 1]) silently gives near-constant predictions, so we say so loudly.
    """
    arr = np.asarray(x)
    if arr.size == 0:
        return
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= 1.0 + 1e-6:
        warnings.warn(
            f"{where}: pixel values lie in [{lo:.3g}, {hi:.3g}]; covidlib models expect raw 0..255 "
            "images (preprocessing is inside the model). Did you rescale them already?",
            UserWarning,
            stacklevel=2,
        )
    elif hi > 255.0 + 1e-3 or lo < -1e-3:
        warnings.warn(
            f"{where}: pixel values lie in [{lo:.3g}, {hi:.3g}], outside 0..255 "
            "(16-bit or HU data must be windowed to 8 bits first, see covidlib.images).",
            UserWarning,
            stacklevel=2,
        )


@keras.saving.register_keras_serializable(package="covidlib")
class RandomAffine(layers.Layer):
    """Random horizontal flip, rotation, zoom and translation as ONE bilinear warp per image.

    Keras' ``RandomFlip`` / ``RandomRotation`` / ``RandomZoom`` / ``RandomTranslation`` each
    resample the whole batch; composing the four into one affine matrix per image and warping
    once is 2.5x faster on a CPU (BENCHMARKS.md, training-loop overhead) and interpolates once
    instead of three times. Backend-agnostic (``keras.ops.image.affine_transform``), seeded,
    inactive unless ``training`` is true, saved and loaded in safe mode like any layer.

    Each image draws, uniformly: a rotation angle in ``+-rotation * 2 pi`` (Keras'
    ``RandomRotation`` convention), a scale of the sampling grid in ``1 +- zoom`` (above 1 zooms
    out), a shift of up to ``translation`` of the width / height, and a horizontal flip with
    probability 1/2. Pixels mapped from outside the image are 0.
    """

    def __init__(self, rotation: float = 0.04, zoom: float = 0.1, translation: float = 0.06,
                 horizontal_flip: bool = True, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, v, hi in (("rotation", rotation, 0.5), ("zoom", zoom, 0.9), ("translation", translation, 1.0)):
            if not 0.0 <= float(v) <= hi:
                raise ValueError(f"{name} must lie in [0, {hi}], got {v!r}")
        self.rotation = float(rotation)
        self.zoom = float(zoom)
        self.translation = float(translation)
        self.horizontal_flip = bool(horizontal_flip)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        if not training:
            return x
        n = ops.shape(x)[0]
        h = ops.cast(ops.shape(x)[1], "float32")
        w = ops.cast(ops.shape(x)[2], "float32")
        u = keras.random.uniform((n, 5), -1.0, 1.0, dtype="float32", seed=self.seed_generator)
        theta = u[:, 0] * (2.0 * np.pi * self.rotation)
        scale = 1.0 + u[:, 1] * self.zoom
        tx = u[:, 2] * (self.translation * w)
        ty = u[:, 3] * (self.translation * h)
        flip = ops.where(u[:, 4] < 0.0, -1.0, 1.0) if self.horizontal_flip else ops.ones_like(scale)
        cos, sin = ops.cos(theta) * scale, ops.sin(theta) * scale
        # output pixel p -> input pixel A (p - c) + c + t, A = scale * R(theta) * diag(flip, 1)
        a00, a01, a10, a11 = cos * flip, -sin, sin * flip, cos
        cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
        b0 = cx + tx - (a00 * cx + a01 * cy)
        b1 = cy + ty - (a10 * cx + a11 * cy)
        zero = ops.zeros_like(scale)
        transform = ops.stack([a00, a01, b0, a10, a11, b1, zero, zero], axis=1)
        return ops.image.affine_transform(x, transform, interpolation="bilinear",
                                          fill_mode="constant", fill_value=0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "rotation": self.rotation, "zoom": self.zoom,
                "translation": self.translation, "horizontal_flip": self.horizontal_flip,
                "seed": self.seed}


def build_augmentation(seed: int = 0, strength: float = 1.0) -> keras.Sequential:
    """Augmentation as preprocessing layers inside the training model.

    Flip, small rotation, zoom and translation (one fused warp, :class:`RandomAffine`) and
    contrast; they run on the accelerator and are inactive at inference. ``RandomShear`` is
    deliberately absent: in Keras 3.15 a model holding it saves but does not load back. The
    block computes in float32 whatever the mixed-precision policy (the warp's matrices must be
    float32; the preprocessing layer after it casts to float32 anyway).
    """
    s = float(strength)
    return keras.Sequential(
        [
            RandomAffine(0.04 * s, 0.1 * s, 0.06 * s, horizontal_flip=True, seed=seed,
                         dtype="float32", name="random_affine"),
            # RandomContrast expects a known value range; our inputs are 0..255.
            layers.RandomContrast(0.15 * s, value_range=(0, 255), seed=seed + 4, dtype="float32"),
        ],
        name="augment",
    )


def _small_cnn(img_size: int, bn_momentum: float | None = 0.5) -> keras.Model:
    inp = keras.Input((img_size, img_size, 3))
    x = inp
    for i, filters in enumerate((16, 32, 64, 96)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=bn_momentum or 0.99, name=f"bn{i}")(x)
        x = layers.Activation("relu", name=f"relu{i}")(x)
        if i < 3:
            x = layers.MaxPooling2D(name=f"pool{i}")(x)
    return keras.Model(inp, x, name="backbone")


def build_backbone(backbone: str, img_size: int, weights: str | None = None,
                   bn_momentum: float | None = 0.5, zero_residual: bool = False) -> keras.Model:
    """Build a headless backbone whose output is the last 4-D feature map.

    Args:
        backbone: a name from :data:`BACKBONES`.
        img_size: square input size in pixels (>= 32).
        weights: ``"imagenet"``, ``None`` (random init), a path to a weights file for this
            backbone (``.weights.h5`` or Keras ``.h5``), or a folder holding ``<backbone>.weights.h5``
            (:func:`resolve_weights_file`; what ``covidlib pretrain`` writes).
        bn_momentum: when training from scratch, batch-norm momentum to use instead of the
            Keras default (0.99 / MobileNetV2's 0.999): with a few hundred steps the moving
            statistics otherwise lag far behind the fast-changing weights and every prediction
            collapses to one class. 0.5 (a ~2-batch window) was the value that kept MobileNetV2's
            predictions apart in our small-data runs; use 0.9+ for long runs on large sets.
            Ignored for pretrained weights, whose statistics are already right.
        zero_residual: when training from scratch, start every residual branch at zero
            (:func:`zero_init_residual`). Ignored for pretrained weights.

    Raises:
        WeightsUnavailableError: ImageNet weights are not cached and cannot be downloaded.
        FileNotFoundError: ``weights`` is a path that does not exist, or a folder without
            ``<backbone>.weights.h5``.
        ValueError: the file was pretrained for another backbone or input size.
    """
    spec = _spec(backbone)
    if img_size < 32:
        raise ValueError(f"img_size must be >= 32 for {backbone}, got {img_size}")
    if weights not in (None, "imagenet"):
        weights = str(resolve_weights_file(weights, backbone, img_size))
    if backbone == "SmallCNN":
        model = _small_cnn(img_size, bn_momentum)
        if weights not in (None, "imagenet"):
            model.load_weights(weights)
        elif weights == "imagenet":
            raise ValueError("SmallCNN has no ImageNet weights; use weights=None")
        return model

    ctor = getattr(keras.applications, spec.constructor)
    kwargs = dict(include_top=False, input_shape=(img_size, img_size, 3), pooling=None)
    if weights is None:
        model = ctor(weights=None, **kwargs)
    elif weights == "imagenet":
        model = _build_with_imagenet(ctor, kwargs, backbone, img_size)
    else:
        path = Path(weights)
        model = ctor(weights=None, **kwargs)
        try:
            model.load_weights(str(path))
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"could not load weights for {backbone} from {path}: {exc}") from exc
    model.name = "backbone"
    if weights is None and bn_momentum is not None:
        set_batchnorm_momentum(model, bn_momentum)
    if weights is None and zero_residual:
        zero_init_residual(model)
    return model


def zero_init_residual(model: keras.Model) -> int:
    """Zero the last layer of every residual branch, so each block starts as the identity.

    The from-scratch recipe of Goyal et al. (2017) and He et al. ("Bag of tricks", 2019): the
    signal first flows through the shortcuts and each block learns its correction. A ResNet
    (V1) bottleneck ends in a batch norm (``*_block*_3_bn``: its gamma is zeroed), a ResNet V2
    one in a convolution (``*_block*_3_conv``: its kernel and bias are zeroed); MobileNetV2's
    inverted residuals that have a shortcut (``block_N_add``) end in a batch norm
    (``block_N_project_BN``: its gamma is zeroed). DenseNet and SmallCNN have no residual
    branches. Layer names are those of ``keras.applications``. Returns how many were zeroed.
    """
    names = {layer.name for layer in model.layers}
    n = 0
    for layer in model.layers:
        name = layer.name
        if "_block" in name and name.endswith("_3_bn") and isinstance(layer, layers.BatchNormalization):
            targets = [layer.gamma]
        elif ("_block" in name and name.endswith("_3_conv") and isinstance(layer, layers.Conv2D)
              and name[: -len("_conv")] + "_bn" not in names):
            targets = [layer.kernel] + ([layer.bias] if layer.use_bias else [])
        elif (name.endswith("_project_BN") and isinstance(layer, layers.BatchNormalization)
              and name[: -len("_project_BN")] + "_add" in names):
            targets = [layer.gamma]
        else:
            continue
        for var in targets:
            var.assign(keras.ops.zeros(var.shape, var.dtype))
        n += 1
    return n


def pretrain_meta_path(weights_file: str | os.PathLike) -> Path:
    """The JSON :mod:`covidlib.pretrain` writes beside a weights file: ``X.weights.h5`` -> ``X.pretrain.json``."""
    path = Path(weights_file)
    stem = path.name[: -len(".weights.h5")] if path.name.endswith(".weights.h5") else path.stem
    return path.with_name(stem + ".pretrain.json")


def resolve_weights_file(weights: str | os.PathLike, backbone: str, img_size: int) -> Path:
    """The weights file ``weights`` names for ``backbone``, checked against its pretraining record.

    A folder (one ``covidlib pretrain`` run per backbone, e.g. ``RUN_DIR/pretrain``) resolves to
    ``<folder>/<backbone>.weights.h5``. When :func:`pretrain_meta_path` exists beside the file, its
    backbone and input size must be this model's: the file would otherwise load into the wrong
    layers, or give features learned at another scale than the one being trained.

    Raises:
        FileNotFoundError: no such file or folder, or the folder lacks ``<backbone>.weights.h5``.
        ValueError: the pretraining record names another backbone or input size, or is unreadable.
    """
    path = Path(weights).expanduser()
    if path.is_dir():
        want = path / f"{backbone}.weights.h5"
        if not want.is_file():
            found = sorted(p.name for p in path.glob("*.weights.h5"))
            raise FileNotFoundError(
                f"WEIGHTS folder {path} has no {want.name} for backbone {backbone} (it holds "
                f"{found or 'no .weights.h5 file'}); pretrain it with: covidlib pretrain <images> "
                f"--backbone {backbone} --img-size {img_size} --out {path}")
        path = want
    elif not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; WEIGHTS must be 'imagenet', None, a path to a "
            "weights file or a folder of <backbone>.weights.h5 files")
    _check_pretrain_record(path, backbone, img_size)
    return path


def _check_pretrain_record(path: Path, backbone: str, img_size: int) -> None:
    meta_path = pretrain_meta_path(path)
    if not meta_path.is_file():
        return  # not from covidlib pretrain (e.g. an ImageNet file): the load itself checks it
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        got_backbone, got_size = str(meta["backbone"]), int(meta["img_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta_path}: unreadable pretraining record of {path.name} ({exc})") from None
    if got_backbone != backbone:
        raise ValueError(f"{path} holds {got_backbone} weights (see {meta_path.name}), not {backbone}; "
                         f"expected a file pretrained with --backbone {backbone}")
    if got_size != int(img_size):
        raise ValueError(f"{path} was pretrained at {got_size} px (see {meta_path.name}) but this "
                         f"{backbone} takes {img_size} px; pretrain again with --img-size {img_size} "
                         f"(or train at IMG_SIZE {got_size})")


def _build_with_imagenet(ctor, kwargs: dict, backbone: str, img_size: int) -> keras.Model:
    fname = imagenet_weights_file(backbone, img_size)
    cached = keras_cache_dir() / fname
    hint = (
        f"ImageNet weights for {backbone} are not available: the file {fname} is not in "
        f"{cached.parent} and could not be downloaded ({BACKBONES[backbone].weights_url}{fname}). "
        f"Either connect to the internet once, or download that file on another machine and "
        f"put it at {cached} (or set KERAS_HOME), or pass WEIGHTS=None to train from scratch, "
        f"or WEIGHTS='/path/to/backbone.weights.h5'."
    )
    old_timeout = socket.getdefaulttimeout()
    # urlretrieve has no timeout of its own: without one a half-open network hangs forever.
    socket.setdefaulttimeout(20)
    try:
        return ctor(weights="imagenet", **kwargs)
    except Exception as exc:  # noqa: BLE001 - any download/IO failure gets the same clear message
        raise WeightsUnavailableError(hint) from exc
    finally:
        socket.setdefaulttimeout(old_timeout)


def set_batchnorm_momentum(model: keras.Model, momentum: float) -> int:
    """Set the momentum of every BatchNormalization layer in ``model``; return how many."""
    n = 0
    for layer in walk_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = float(momentum)
            n += 1
    return n


def walk_layers(model):
    """Every layer of ``model``, nested models' layers included (depth first)."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from walk_layers(layer)


def build_model(
    backbone: str,
    num_classes: int,
    img_size: int = 224,
    *,
    weights: str | None = None,
    head: str = "gap",
    dropout: float = 0.3,
    augment: bool = True,
    seed: int = 0,
    bn_momentum: float | None = 0.5,
    zero_residual: bool = False,
) -> keras.Model:
    """Build a classifier: raw 0..255 grayscale in, class probabilities out.

    With pretrained weights the backbone runs with ``training=False`` (keras-io transfer-learning
    recipe): its batch-norm layers stay in inference mode even after unfreezing, so fine-tuning
    does not wreck the learned statistics. From scratch it trains normally.

    Args:
        backbone: a name from :data:`BACKBONES`.
        num_classes: number of output classes (>= 2).
        img_size: square input size.
        weights: ``"imagenet"``, ``None`` or a weights-file path.
        head: ``"gap"`` (pool -> dropout -> softmax) or ``"gap_dense256"`` (pool -> dense 256 relu ->
            dropout -> softmax, the classic transfer-learning head of the seeds' notebooks).
        dropout: dropout rate before the classifier.
        augment: include the augmentation block (active only while training).
        seed: seed of the augmentation layers.
        bn_momentum, zero_residual: see :func:`build_backbone`.
    """
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {list(HEADS)}")
    spec = _spec(backbone)
    base = build_backbone(backbone, img_size, weights, bn_momentum=bn_momentum, zero_residual=zero_residual)
    pretrained = weights is not None
    inputs = keras.Input((img_size, img_size, 1), name="image")
    x = inputs
    if augment:
        x = build_augmentation(seed)(x)
    x = BackbonePreprocess(spec.preprocess, name="preprocess")(x)
    x = base(x, training=False) if pretrained else base(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if head == "gap_dense256":
        x = layers.Dense(256, activation="relu", name="hidden")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_classifier")


@functools.lru_cache(maxsize=None)
def backbone_layer_count(backbone: str) -> int:
    """Number of layers of a backbone (``len(backbone.layers)``, what ``unfreeze`` counts).

    Built once per name without weights (no download) and cached: the architecture, hence the
    count, does not depend on the weights or on the input size.
    """
    _spec(backbone)
    return len(build_backbone(backbone, 224, weights=None, bn_momentum=None).layers)


def check_unfreeze(unfreeze: Any, backbone: str) -> None:
    """Raise ``ValueError`` unless ``unfreeze`` is ``"all"`` or an int in 1..layers of ``backbone``.

    Zero would slice ``layers[:-0]`` (nothing frozen, the whole backbone trained) and a bool is
    an int to Python, so both are refused explicitly.
    """
    if unfreeze == "all" and isinstance(unfreeze, str):
        return
    if isinstance(unfreeze, bool) or not isinstance(unfreeze, numbers.Integral):
        raise ValueError(f"unfreeze must be 'all' or a positive int (the number of top backbone "
                         f"layers to fine-tune), got {unfreeze!r}")
    n = backbone_layer_count(backbone)
    if not 1 <= int(unfreeze) <= n:
        raise ValueError(f"unfreeze must be 'all' or an int from 1 to {n} (the layers of the "
                         f"{backbone} backbone), got {unfreeze!r}")


def set_backbone_trainable(model: keras.Model, trainable: bool, top_n: int | None = None) -> None:
    """Freeze or unfreeze the backbone; with ``top_n``, unfreeze only its last ``top_n`` layers.

    Batch-norm layers inside a pretrained backbone stay frozen (they run in inference mode anyway).
    Recompile the model afterwards: Keras reads ``trainable`` at compile time.

    Raises:
        ValueError: ``top_n`` is not an int from 1 to the backbone's number of layers.
    """
    base = model.get_layer("backbone")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, numbers.Integral)
                              or not 1 <= int(top_n) <= len(base.layers)):
        raise ValueError(f"top_n must be None or an int from 1 to {len(base.layers)}, got {top_n!r}")
    base.trainable = trainable
    if trainable and top_n is not None:
        for layer in base.layers[:-top_n]:
            layer.trainable = False
    if trainable:
        for layer in base.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False


def load_model(path: str | os.PathLike, *, safe_mode: bool = True) -> keras.Model:
    """Load a saved ``.keras`` model with Keras safe mode on (no code from the file runs).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds code (e.g. a Lambda layer) or is not a Keras model.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file {p} does not exist")
    import covidlib.ensemble  # noqa: F401 - registers VoteLayer, which ensemble files contain

    try:
        return keras.saving.load_model(p, safe_mode=safe_mode, compile=False)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            raise ValueError(
                f"refusing to load {p}: it contains code (e.g. a Lambda layer) and covidlib loads "
                "models in Keras safe mode. Only load model files you trust, and rebuild them "
                "without Lambda layers."
            ) from exc
        raise
