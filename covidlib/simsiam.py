"""The SimSiam objective of :mod:`covidlib.pretrain`, on every Keras backend (public API only).

SimSiam (Chen & He, CVPR 2021): two augmented views of one image go through the same encoder
(backbone -> pooling -> projector MLP, output ``z``); a small predictor MLP maps one view's ``z``
to ``p``, and the loss is the negative cosine similarity between ``p`` of one view and ``z`` of
the other, symmetrised, with a stop-gradient on ``z``. No negative pairs, no momentum encoder:
the stop-gradient alone prevents the trivial constant solution, so it works at small batches.

:class:`SimSiam` is a ``keras.Model`` subclass whose ``call`` makes both views in the graph and
whose ``compute_loss`` (the public hook every backend's ``train_step`` calls) holds the loss, so
``fit`` runs unchanged on TensorFlow, JAX and PyTorch. It also tracks ``z_std``, the paper's
collapse monitor: the per-channel standard deviation over the batch of the L2-normalised ``z``,
averaged over channels -- about ``1/sqrt(d)`` for healthy outputs, 0 when every image maps to the
same vector.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

import keras
from keras import layers, ops

from covidlib.models import BackbonePreprocess, walk_layers


@keras.saving.register_keras_serializable(package="covidlib")
class ViewAugment(layers.Layer):
    """One random view of each raw 0..255 gray image: crop-resize, rotation, flip, intensity.

    The geometry is one bilinear warp per image (as :class:`covidlib.models.RandomAffine`, but
    zooming in only): a random crop of ``min_area``..1 of the image area with aspect ratio
    3/4..4/3 (SimCLR's random resized crop, the augmentation SimSiam depends on most), a rotation
    in ``+-rotation * 2 pi``, a horizontal flip. Then contrast (``1 +- contrast`` around the image
    mean) and brightness (``+- brightness * 255``) jitter -- the gray-image stand-in for colour
    jitter -- a Gaussian blur with probability ``blur`` and Gaussian noise up to ``noise * 255``.
    Output float32, clipped to 0..255, so the backbone's own preprocessing follows as in a
    classifier. Inactive (a cast only) unless ``training``.
    """

    def __init__(self, min_area: float = 0.25, rotation: float = 0.04, contrast: float = 0.4,
                 brightness: float = 0.15, blur: float = 0.5, noise: float = 0.03,
                 seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, v, lo, hi in (("min_area", min_area, 0.01, 1.0), ("rotation", rotation, 0.0, 0.5),
                                ("contrast", contrast, 0.0, 1.0), ("brightness", brightness, 0.0, 1.0),
                                ("blur", blur, 0.0, 1.0), ("noise", noise, 0.0, 1.0)):
            if not lo <= float(v) <= hi:
                raise ValueError(f"{name} must lie in [{lo}, {hi}], got {v!r}")
        self.min_area, self.rotation = float(min_area), float(rotation)
        self.contrast, self.brightness = float(contrast), float(brightness)
        self.blur, self.noise, self.seed = float(blur), float(noise), seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        g = np.exp(-0.5 * np.arange(-2, 3) ** 2)  # 5-tap Gaussian, sigma 1 pixel
        self.kernel = (np.outer(g, g) / np.outer(g, g).sum()).astype("float32")[:, :, None, None]

    def call(self, x, training=False):
        x = ops.cast(x, "float32")
        if not training:
            return x
        return self._intensity(self._warp(x))

    def _warp(self, x):
        n = ops.shape(x)[0]
        h, w = float(x.shape[1]), float(x.shape[2])
        u = keras.random.uniform((n, 5), 0.0, 1.0, dtype="float32", seed=self.seed_generator)
        area = self.min_area + (1.0 - self.min_area) * u[:, 0]
        ratio = ops.exp((2.0 * u[:, 1] - 1.0) * math.log(4.0 / 3.0))
        sx = ops.minimum(ops.sqrt(area * ratio), 1.0)  # crop width / image width
        sy = ops.minimum(ops.sqrt(area / ratio), 1.0)
        cx0, cy0 = (w - 1.0) / 2.0, (h - 1.0) / 2.0
        # crop centre: anywhere the crop fits inside the image
        cx = cx0 + (2.0 * u[:, 2] - 1.0) * (1.0 - sx) * w / 2.0
        cy = cy0 + (2.0 * u[:, 3] - 1.0) * (1.0 - sy) * h / 2.0
        theta = (2.0 * u[:, 4] - 1.0) * (2.0 * math.pi * self.rotation)
        flip = ops.where(keras.random.uniform((n,), seed=self.seed_generator) < 0.5, -1.0, 1.0)
        cos, sin = ops.cos(theta), ops.sin(theta)
        # output pixel p -> input pixel A (p - c) + crop centre, A = R(theta) diag(flip sx, sy)
        a00, a01, a10, a11 = cos * sx * flip, -sin * sy, sin * sx * flip, cos * sy
        b0 = cx - (a00 * cx0 + a01 * cy0)
        b1 = cy - (a10 * cx0 + a11 * cy0)
        zero = ops.zeros_like(sx)
        transform = ops.stack([a00, a01, b0, a10, a11, b1, zero, zero], axis=1)
        return ops.image.affine_transform(x, transform, interpolation="bilinear",
                                          fill_mode="constant", fill_value=0)

    def _intensity(self, x):
        n = ops.shape(x)[0]
        u = keras.random.uniform((n, 5), 0.0, 1.0, dtype="float32", seed=self.seed_generator)
        u = ops.reshape(u, (n, 1, 1, 5))
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        contrast = 1.0 + (2.0 * u[..., 0:1] - 1.0) * self.contrast
        shift = (2.0 * u[..., 1:2] - 1.0) * (self.brightness * 255.0)
        x = (x - mean) * contrast + mean + shift
        # blur with probability self.blur, by a random amount (a mix of the image and its blur)
        mix = ops.where(u[..., 2:3] < self.blur, u[..., 3:4], 0.0)
        blurred = ops.conv(x, ops.convert_to_tensor(self.kernel), padding="same")
        x = x + mix * (blurred - x)
        sigma = u[..., 4:5] * (self.noise * 255.0)
        x = x + sigma * keras.random.normal(ops.shape(x), seed=self.seed_generator)
        return ops.clip(x, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "min_area": self.min_area, "rotation": self.rotation,
                "contrast": self.contrast, "brightness": self.brightness, "blur": self.blur,
                "noise": self.noise, "seed": self.seed}


def _mlp(name: str, widths: Iterable[int], last_bn: bool) -> keras.Sequential:
    """Dense (no bias) -> BN -> ReLU blocks; the last block has no ReLU (and BN if ``last_bn``)."""
    widths = list(widths)
    block: list = []
    for i, width in enumerate(widths):
        last = i == len(widths) - 1
        block.append(layers.Dense(width, use_bias=last and not last_bn, name=f"{name}_dense{i}"))
        if not last or last_bn:
            block.append(layers.BatchNormalization(name=f"{name}_bn{i}"))
        if not last:
            block.append(layers.Activation("relu", name=f"{name}_relu{i}"))
    return keras.Sequential(block, name=name)


def negative_cosine(p, z):
    """Mean over the batch of ``-cos(p, z)``, in float32; 0 is unrelated, -1 identical."""
    p = ops.cast(p, "float32")
    z = ops.cast(z, "float32")
    p = p / ops.maximum(ops.norm(p, axis=1, keepdims=True), 1e-12)
    z = z / ops.maximum(ops.norm(z, axis=1, keepdims=True), 1e-12)
    return -ops.mean(ops.sum(p * z, axis=1))


def collapse_std(z):
    """SimSiam's collapse monitor: std over the batch of L2-normalised ``z``, mean over channels."""
    z = ops.cast(z, "float32")
    z = z / ops.maximum(ops.norm(z, axis=1, keepdims=True), 1e-12)
    return ops.mean(ops.std(z, axis=0))


class SimSiam(keras.Model):
    """Backbone -> pooling -> projector (``z``) -> predictor (``p``), trained by ``fit`` on raw images.

    ``fit(x)`` needs images only: ``call`` draws two views of each image with one
    :class:`ViewAugment` (two draws of its random generator), and ``compute_loss`` returns
    ``(D(p1, sg(z2)) + D(p2, sg(z1))) / 2`` with ``D`` :func:`negative_cosine` and ``sg``
    ``keras.ops.stop_gradient``. Projector: 2 layers of ``proj_dim`` with batch norm (SimSiam's
    CIFAR variant, fit for small sets); predictor: a ``proj_dim // 4`` bottleneck (the paper's
    ratio). The backbone runs in training mode, batch norm included, as when training from scratch.

    Args:
        backbone: the headless backbone (:func:`covidlib.models.build_backbone`).
        preprocess: its preprocessing mode (:class:`covidlib.models.BackbonePreprocess`).
        proj_dim: width of ``z`` and ``p``.
        seed: seed of the view augmentation.
        augment: view augmentation options (:class:`ViewAugment`).
    """

    def __init__(self, backbone: keras.Model, preprocess: str, proj_dim: int = 512, seed: int = 0,
                 augment: dict | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.views = ViewAugment(seed=seed, dtype="float32", name="views", **(augment or {}))
        self.preprocess = BackbonePreprocess(preprocess, name="preprocess")
        self.backbone = backbone
        self.pool = layers.GlobalAveragePooling2D(name="pool")
        self.proj_dim = int(proj_dim)
        self.projector = _mlp("projector", [self.proj_dim, self.proj_dim], last_bn=True)
        self.predictor = _mlp("predictor", [max(self.proj_dim // 4, 8), self.proj_dim], last_bn=False)
        self.z_std = keras.metrics.Mean(name="z_std")

    def project(self, x, training=False):
        """``z`` of raw images ``x`` (no augmentation)."""
        h = self.backbone(self.preprocess(x), training=training)
        return self.projector(self.pool(h), training=training)

    def call(self, x, training=False):
        z1 = self.project(self.views(x, training=training), training=training)
        z2 = self.project(self.views(x, training=training), training=training)
        return {"z1": z1, "z2": z2, "p1": self.predictor(z1, training=training),
                "p2": self.predictor(z2, training=training)}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        z1, z2 = ops.stop_gradient(y_pred["z1"]), ops.stop_gradient(y_pred["z2"])
        loss = 0.5 * negative_cosine(y_pred["p1"], z2) + 0.5 * negative_cosine(y_pred["p2"], z1)
        self.z_std.update_state(collapse_std(z1))
        return loss


def recalibrate_batchnorm(backbone: keras.Model, preprocess: str, batches: Iterable[np.ndarray]) -> int:
    """Reset the backbone's batch-norm moving statistics to their mean over clean ``batches``.

    During pretraining they follow the augmented views with a short window (the ``bn_momentum``
    of a from-scratch run); a classifier that loads the backbone runs it in inference mode on
    un-augmented images, so it gets their statistics instead ("precise BN", Wu & Johnson 2021).
    Each layer's batch mean and variance are averaged over the batches (momentum ``k / (k + 1)``
    at batch ``k``); the momenta are put back after. Returns the number of images used.
    """
    norms = [layer for layer in walk_layers(backbone) if isinstance(layer, layers.BatchNormalization)]
    saved = [bn.momentum for bn in norms]
    prep = BackbonePreprocess(preprocess)
    seen = 0
    try:
        for k, batch in enumerate(batches):
            for bn in norms:
                bn.momentum = k / (k + 1.0)
            backbone(prep(ops.convert_to_tensor(np.asarray(batch))), training=True)
            seen += len(batch)
    finally:
        for bn, m in zip(norms, saved):
            bn.momentum = m
    return seen


class ImageBatches(keras.utils.PyDataset):
    """Image-only batches ``(B, S, S, 1)`` uint8 from an ``(N, S, S)`` array, reshuffled per epoch.

    Seeded per epoch (``epoch`` may be set to resume), and only full batches: SimSiam's batch
    norm needs several images per batch, and a last batch of one would have none to compare.
    With fewer images than ``batch_size``, one batch of all of them per epoch.
    """

    def __init__(self, images: np.ndarray, batch_size: int, seed: int = 0, shuffle: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(images) < 2:
            raise ValueError(f"need at least 2 images, got {len(images)}")
        self.images = images
        self.batch_size = min(int(batch_size), len(images))
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch = 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        n = len(self.images)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def seek(self, epoch: int) -> None:
        """Draw the order of ``epoch`` (a resumed ``fit`` does not start at epoch 0)."""
        self.epoch = int(epoch)
        self.order = self._order()

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def __getitem__(self, i: int):
        pick = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        return np.asarray(self.images[pick])[..., None]  # sorted: sequential memory-map reads

    def on_epoch_end(self) -> None:
        self.seek(self.epoch + 1)
