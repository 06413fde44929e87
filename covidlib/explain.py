"""Grad-CAM heatmaps for covidlib models, and overlays to look at them.

Models from :func:`covidlib.models.build_model` are a linear chain
``image -> (augment) -> preprocessing -> backbone -> pool -> dropout -> predictions``.
Grad-CAM hooks on the ``backbone`` output (the last conv block, 4-D feature map).

Two ways to get the channel weights:

* **analytic** (default when the head is GAP -> Dropout* -> Dense): for a global average
  pool followed by a linear logit, ``d logit_c / d A_k(i, j) = W[k, c] / (H * W)`` for every
  position, so the Grad-CAM weights are exactly ``W[:, c] / (H * W)`` (CAM == Grad-CAM for
  this head). Backend-free.
* **gradient**: any head; the gradient of the class logit (pre-softmax when the last layer is
  a softmax Dense or a softmax Activation, else the output itself) w.r.t. the feature map,
  taken with the running Keras backend (TensorFlow, JAX or PyTorch).

Keras is imported lazily so importing this module stays cheap (plots.py uses
:func:`overlay_heatmap`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from covidlib.images import to_uint8

__all__ = [
    "grad_cam",
    "ensemble_grad_cam",
    "lung_share",
    "cam_grid",
    "overlay_heatmap",
    "save_gradcam",
]

_BATCH = 32


# --------------------------------------------------------------------------- model surgery
def _layer_chain(model: Any, layer_name: str) -> tuple[list, Any, list]:
    """Split a linear-chain model into (layers before, target layer, head layers)."""
    import keras

    layers = [lyr for lyr in model.layers if not isinstance(lyr, keras.layers.InputLayer)]
    names = [lyr.name for lyr in layers]
    if layer_name not in names:
        raise ValueError(
            f"grad_cam: model {model.name!r} has no top-level layer {layer_name!r}; "
            f"its layers are {names}"
        )
    i = names.index(layer_name)
    return layers[:i], layers[i], layers[i + 1 :]


def _is_softmax(fn: Any) -> bool:
    import keras

    return fn is keras.activations.softmax or getattr(fn, "__name__", "") == "softmax"


def _is_linear(fn: Any) -> bool:
    import keras

    return fn is None or fn is keras.activations.linear or getattr(fn, "__name__", "") == "linear"


def _analytic_head(head: list) -> Any | None:
    """The final Dense layer when the head is GAP -> (Dropout|identity)* -> Dense, else None."""
    import keras

    if len(head) < 2:
        return None
    pool, *middle, dense = head
    if not isinstance(pool, keras.layers.GlobalAveragePooling2D):
        return None
    if getattr(pool, "data_format", "channels_last") != "channels_last" or getattr(pool, "keepdims", False):
        return None
    passthrough = (keras.layers.Dropout, keras.layers.Identity)
    if not all(isinstance(lyr, passthrough) for lyr in middle):
        return None
    if not isinstance(dense, keras.layers.Dense):
        return None
    if not (_is_softmax(dense.activation) or _is_linear(dense.activation)):
        return None
    return dense


def _dense_logits(dense: Any, x: Any) -> Any:
    from keras import ops

    z = ops.matmul(x, ops.cast(dense.kernel, x.dtype))
    if dense.bias is not None:
        z = z + ops.cast(dense.bias, x.dtype)
    return z


def _head_logits(head: list, features: Any) -> Any:
    """Run the head on ``features`` (training=False); pre-softmax logits when reachable."""
    import keras

    x = features
    last = len(head) - 1
    for j, lyr in enumerate(head):
        if j == last and isinstance(lyr, keras.layers.Dense) and _is_softmax(lyr.activation):
            return _dense_logits(lyr, x)
        if j == last and isinstance(lyr, keras.layers.Activation) and _is_softmax(lyr.activation):
            return x
        if j == last and isinstance(lyr, keras.layers.Softmax):
            return x
        x = lyr(x, training=False)
    return x


# --------------------------------------------------------------------------- gradients
def _logit_grads(head: list, features: Any, onehot: np.ndarray) -> np.ndarray:
    """d (sum_i logit_i[c_i]) / d features, per backend. Samples are independent at inference."""
    import keras
    from keras import ops

    backend = keras.backend.backend()
    onehot_t = ops.convert_to_tensor(onehot, dtype="float32")

    def score_fn(feat):
        logits = ops.cast(_head_logits(head, feat), "float32")
        return ops.sum(logits * onehot_t)

    if backend == "tensorflow":
        import tensorflow as tf

        feat = tf.convert_to_tensor(features)
        with tf.GradientTape() as tape:
            tape.watch(feat)
            score = score_fn(feat)
        grads = tape.gradient(score, feat)
    elif backend == "jax":
        import jax

        grads = jax.grad(score_fn)(features)
    elif backend == "torch":
        import torch

        feat = features.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            score = score_fn(feat)
            (grads,) = torch.autograd.grad(score, feat)
    else:
        raise NotImplementedError(
            f"grad_cam: gradient path not implemented for Keras backend {backend!r}; "
            "use a model whose head is GAP -> Dropout -> Dense (analytic path)"
        )
    if grads is None:
        raise ValueError("grad_cam: the class score does not depend on the feature map")
    return np.asarray(ops.convert_to_numpy(grads), dtype=np.float64)


# --------------------------------------------------------------------------- inputs
def _model_hw(model: Any) -> tuple[int | None, int | None]:
    shape = model.inputs[0].shape
    if len(shape) != 4:
        raise ValueError(f"grad_cam: expected a model with 4-D image input, got input shape {tuple(shape)}")
    return shape[1], shape[2]


def _as_batch(images: Any, channels: int | None) -> np.ndarray:
    """To (n, H, W, C) float32. Accepts (H, W), (H, W, C), (n, H, W), (n, H, W, C)."""
    arr = np.asarray(images)
    if arr.dtype == object or arr.size == 0:
        raise ValueError("grad_cam: images must be a non-empty numeric array of equal-sized images")
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        # (H, W, C) with C equal to the model's channels is one image, otherwise a batch of 2-D.
        if channels is not None and arr.shape[-1] == channels and channels in (1, 3):
            arr = arr[None]
        else:
            arr = arr[..., None]
    elif arr.ndim != 4:
        raise ValueError(f"grad_cam: images must be 2-D, 3-D or 4-D, got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError("grad_cam: images contain NaN or inf")
    if channels is not None and arr.shape[-1] != channels:
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, channels, axis=-1)
        else:
            raise ValueError(f"grad_cam: images have {arr.shape[-1]} channels, the model expects {channels}")
    return arr


def _resize_batch(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    if x.shape[1:3] == (h, w):
        return x
    out = np.stack([cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR) for img in x])
    return out.reshape(len(x), h, w, x.shape[-1])


def _class_indices(class_index: Any, n: int, k: int | None) -> np.ndarray | None:
    if class_index is None:
        return None
    idx = np.asarray(class_index)
    if idx.ndim == 0:
        idx = np.full(n, int(idx))
    if idx.shape != (n,):
        raise ValueError(f"grad_cam: class_index must be an int or one int per image ({n}), got shape {idx.shape}")
    if idx.dtype.kind not in "iuf":
        raise ValueError(f"grad_cam: class_index must be integer, got dtype {idx.dtype}")
    if idx.dtype.kind == "f":
        if not np.all(np.isfinite(idx)) or not np.all(np.equal(np.mod(idx, 1), 0)):
            raise ValueError("grad_cam: class_index must be integer")
        idx = idx.astype(np.int64)
    if k is not None and (idx.min() < 0 or idx.max() >= k):
        raise ValueError(f"grad_cam: class_index out of range for {k} classes: {sorted(set(idx.tolist()))}")
    return idx.astype(np.int64)


def _finish(cam: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """ReLU, resize to the input size, scale each map to [0, 1] (all-zero map stays zero)."""
    cam = np.maximum(cam, 0.0).astype(np.float32)
    h, w = out_hw
    maps = []
    for c in cam:
        r = cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) if c.shape != (h, w) else c
        r = np.maximum(r, 0.0)
        peak = float(r.max())
        maps.append(r / peak if peak > 1e-12 else np.zeros_like(r))
    return np.clip(np.stack(maps), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- public API
_NOT_CHAIN = ("grad_cam: running the layers one after another does not reproduce the model's "
              "output; the model is not a linear layer chain")


def _analytic_dense(head: list, method: str, layer_name: str) -> Any | None:
    """The Dense layer whose weights give the channel weights, or None for the gradient path."""
    if not head:
        raise ValueError(f"grad_cam: layer {layer_name!r} is the model's last layer; nothing to explain")
    dense = _analytic_head(head)
    if method == "analytic" and dense is None:
        raise ValueError(
            "grad_cam: analytic weights need a GAP -> Dropout -> Dense(softmax|linear) head; "
            f"this head is {[type(h).__name__ for h in head]} (use method='gradient')"
        )
    return None if method == "gradient" else dense


def _features(model: Any, before: list, target: Any, head: list, xb: Any, layer_name: str,
              check: bool) -> Any:
    """The target layer's 4-D feature map for the batch ``xb``.

    With ``check`` (the first batch), the layer-by-layer run must reproduce the model's output,
    else the heatmap would be silently wrong.
    """
    from keras import ops

    try:
        feats = _run_layers(before + [target], xb)
    except Exception as exc:
        if not check:
            raise
        raise ValueError(f"{_NOT_CHAIN} ({type(exc).__name__}: {exc})") from exc
    if len(feats.shape) != 4:
        raise ValueError(
            f"grad_cam: layer {layer_name!r} outputs shape {tuple(feats.shape)}; a 4-D feature map is needed"
        )
    if check:
        try:
            mine = np.asarray(ops.convert_to_numpy(_run_layers(head, feats)), dtype=np.float64)
        except Exception as exc:  # a branching graph fails in many layer-specific ways
            raise ValueError(f"{_NOT_CHAIN} ({type(exc).__name__}: {exc})") from exc
        ref = np.asarray(ops.convert_to_numpy(model(xb, training=False)), dtype=np.float64)
        if ref.shape != mine.shape or not np.allclose(ref, mine, atol=1e-3, rtol=1e-3):
            raise ValueError(_NOT_CHAIN)
    return feats


def _batch_cam(head: list, dense: Any | None, feats: Any, cls: np.ndarray | None) -> np.ndarray:
    """Grad-CAM maps ``(b, h, w)`` of one batch of features, before ReLU and resizing.

    ``cls``: the batch's class per image; None takes each image's predicted class.
    """
    from keras import ops

    feats_np = np.asarray(ops.convert_to_numpy(feats), dtype=np.float64)
    logits = np.asarray(ops.convert_to_numpy(_head_logits(head, feats)), dtype=np.float64)
    cb = np.argmax(logits, axis=1) if cls is None else cls
    if dense is not None:
        kernel = np.asarray(ops.convert_to_numpy(dense.kernel), dtype=np.float64)  # (C, k)
        weights = kernel[:, cb].T / (feats_np.shape[1] * feats_np.shape[2])  # (b, C)
    else:
        onehot = np.zeros(logits.shape, dtype=np.float32)
        onehot[np.arange(len(cb)), cb] = 1.0
        weights = _logit_grads(head, feats, onehot).mean(axis=(1, 2))  # (b, C)
    return np.einsum("bhwc,bc->bhw", feats_np, weights)


def grad_cam(
    model: Any,
    images: Any,
    class_index: int | Sequence[int] | np.ndarray | None = None,
    layer_name: str = "backbone",
    method: str = "auto",
    batch_size: int = _BATCH,
) -> np.ndarray:
    """Grad-CAM heatmaps for a linear-chain covidlib model.

    Args:
        model: functional ``keras.Model`` with a linear layer chain (see module docstring).
        images: one image (H, W) / (H, W, C) or a batch (n, H, W) / (n, H, W, C), values as the
            model expects them (0..255 grayscale for covidlib models). Images whose size differs
            from the model input are resized for the model; heatmaps come back at the images' size.
        class_index: None -> each image's predicted class; an int -> that class for all images;
            a sequence -> one class per image.
        layer_name: top-level layer whose 4-D output is the Grad-CAM target.
        method: "auto" (analytic when the head allows it, else gradient), "analytic" or "gradient".
        batch_size: images per forward pass.

    Returns:
        float32 array (n, H, W) in [0, 1]; each map scaled by its own maximum (a map with no
        positive evidence is all zeros).

    Raises:
        ValueError: unknown layer, non-4-D target output, bad class_index / images, analytic
            method requested for a head it does not apply to, or a model that is not a linear chain.
    """
    if method not in ("auto", "analytic", "gradient"):
        raise ValueError(f"grad_cam: method must be 'auto', 'analytic' or 'gradient', got {method!r}")
    from keras import ops

    before, target, head = _layer_chain(model, layer_name)
    dense = _analytic_dense(head, method, layer_name)
    batch_size = max(1, int(batch_size))

    mh, mw = _model_hw(model)
    x_all = _as_batch(images, model.inputs[0].shape[-1])
    n, out_hw = len(x_all), x_all.shape[1:3]
    cls = _class_indices(class_index, n, model.outputs[0].shape[-1])
    if mh is not None and mw is not None:
        x_all = _resize_batch(x_all, (mh, mw))

    cams = []
    for start in range(0, n, batch_size):
        batch = slice(start, start + batch_size)
        feats = _features(model, before, target, head, ops.convert_to_tensor(x_all[batch]),
                          layer_name, check=start == 0)
        cams.append(_batch_cam(head, dense, feats, None if cls is None else cls[batch]))
    return _finish(np.concatenate(cams), out_hw)


def _run_layers(layers: list, x: Any) -> Any:
    """Apply layers in order at inference (augmentation and dropout inactive)."""
    for lyr in layers:
        x = lyr(x, training=False)
    return x


def _predict_probs(model: Any, images: np.ndarray, batch_size: int = _BATCH) -> np.ndarray:
    from keras import ops

    mh, mw = _model_hw(model)
    x = _as_batch(images, model.inputs[0].shape[-1])
    if mh is not None and mw is not None:
        x = _resize_batch(x, (mh, mw))
    out = [
        np.asarray(ops.convert_to_numpy(model(ops.convert_to_tensor(x[s : s + batch_size]), training=False)))
        for s in range(0, len(x), batch_size)
    ]
    return np.concatenate(out).astype(np.float64)


def ensemble_grad_cam(
    models: Sequence[Any],
    images: Any,
    class_index: int | Sequence[int] | np.ndarray | None = None,
    layer_name: str = "backbone",
) -> np.ndarray:
    """Mean of the members' Grad-CAM heatmaps for the ensemble's class.

    Args:
        models: the ensemble members (same class order).
        images: as for :func:`grad_cam`.
        class_index: None -> argmax of the soft vote (mean of the members' probabilities);
            else as for :func:`grad_cam`.
        layer_name: target layer in every member.

    Returns:
        float32 (n, H, W) in [0, 1]: the plain mean of the members' [0, 1] maps.
    """
    models = list(models)
    if not models:
        raise ValueError("ensemble_grad_cam: no models given")
    ks = {m.outputs[0].shape[-1] for m in models}
    if len(ks) != 1:
        raise ValueError(f"ensemble_grad_cam: members disagree on the number of classes: {sorted(ks)}")
    if class_index is None:
        probs = np.mean([_predict_probs(m, images) for m in models], axis=0)
        class_index = np.argmax(probs, axis=1)
    maps = [grad_cam(m, images, class_index=class_index, layer_name=layer_name) for m in models]
    return np.clip(np.mean(maps, axis=0), 0.0, 1.0).astype(np.float32)


def cam_grid(model: Any, layer_name: str = "backbone") -> tuple[int, int]:
    """Rows and columns of the feature map a model's Grad-CAM is computed on (before upsampling)."""
    shape = tuple(model.get_layer(layer_name).output.shape)
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        raise ValueError(f"cam_grid: layer {layer_name!r} has no fixed 4-D output (shape {shape})")
    return int(shape[1]), int(shape[2])


def _coarse(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``mask`` averaged onto ``grid`` and brought back to its size as Grad-CAM upsamples a map."""
    small = cv2.resize(mask.astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR)


def lung_share(images: Any, heatmaps: Any, grid: tuple[int, int] | None = None) -> dict[str, Any]:
    """How much of each CT Grad-CAM lies in the lung field, against how much lung there is.

    The lung field is :func:`covidlib.lungs.find_lungs`' mask (classical, no learned weights)
    of each image as the model sees it. ``cam_in_lungs`` is the share of a heatmap's sum inside
    the mask; ``lung_area`` the share of the image's pixels inside it, which is what a heatmap
    spread evenly over the image would score. A model that looks at the lungs scores well above
    its ``lung_area``; one that reads borders, the table or the mediastinum, below it.

    A Grad-CAM is upsampled from the model's last feature map, a few cells across at small
    input sizes, so it cannot follow the lungs' outline. With ``grid`` (:func:`cam_grid`),
    ``ceiling`` is what the lung field itself scores after being averaged onto that grid and
    upsampled the same way: about the most such a heatmap can put in the lungs. When the
    ceiling is close to ``lung_area`` the measure cannot tell where the model looks.

    Args:
        images: (n, H, W) or (n, H, W, 1) ``uint8`` CT slices.
        heatmaps: (n, H, W) Grad-CAMs of those images (:func:`grad_cam`), values >= 0.
        grid: the heatmaps' feature-map rows and columns, for ``ceiling``.

    Returns:
        ``{"n_images", "n_lung_field", "cam_in_lungs", "lung_area", "ceiling"}``: the shares are
        means over the images with a lung field and a non-zero heatmap (None when there is
        none, ``ceiling`` also without ``grid``), and ``n_lung_field`` counts those images.
    """
    from covidlib.lungs import find_lungs

    imgs = np.asarray(images)
    if imgs.ndim == 4 and imgs.shape[-1] == 1:
        imgs = imgs[..., 0]
    cams = np.asarray(heatmaps, dtype=np.float64)
    if imgs.ndim != 3 or cams.shape != imgs.shape:
        raise ValueError(f"lung_share: need (n, H, W) images and heatmaps of the same shape, "
                         f"got {imgs.shape} and {cams.shape}")
    inside, area, ceiling = [], [], []
    for img, cam in zip(imgs, cams):
        mask = find_lungs(to_uint8(img)).mask
        if mask is None or cam.sum() <= 0:
            continue
        inside.append(cam[mask].sum() / cam.sum())
        area.append(mask.mean())
        if grid is not None:
            best = _coarse(mask, grid)
            ceiling.append(best[mask].sum() / best.sum())
    mean = (lambda v: round(float(np.mean(v)), 4) if v else None)
    return {"n_images": len(imgs), "n_lung_field": len(inside), "cam_in_lungs": mean(inside),
            "lung_area": mean(area), "ceiling": mean(ceiling)}


def _gray_uint8(image: Any) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        img = cv2.cvtColor(np.ascontiguousarray(img[..., :3]).astype(np.float32), cv2.COLOR_RGB2GRAY)
    if img.ndim != 2:
        raise ValueError(f"overlay_heatmap: image must be 2-D grayscale (or H, W, 1/3), got shape {img.shape}")
    if img.dtype == np.uint8:
        return img
    img = img.astype(np.float64)
    if not np.all(np.isfinite(img)):
        raise ValueError("overlay_heatmap: image contains NaN or inf")
    lo, hi = float(img.min()), float(img.max())
    if lo >= 0.0 and hi <= 255.0 and hi > 1.0:
        return np.round(img).astype(np.uint8)  # already on a 0..255 scale (float model input)
    return to_uint8(img)


def overlay_heatmap(
    image_2d_uint8: np.ndarray,
    heatmap: np.ndarray,
    alpha: float = 0.4,
    colormap: int = cv2.COLORMAP_JET,
) -> np.ndarray:
    """Blend a [0, 1] heatmap (colour-mapped) over a grayscale image.

    Args:
        image_2d_uint8: (H, W) uint8 grayscale. Other dtypes are scaled to uint8 (0..255 floats
            kept, anything else min-max scaled); (H, W, 1) and RGB are accepted.
        heatmap: (h, w) values in [0, 1]; resized to (H, W) if needed.
        alpha: weight of the heatmap colour, 0..1.
        colormap: an OpenCV colormap id.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"overlay_heatmap: alpha must be in [0, 1], got {alpha}")
    gray = _gray_uint8(image_2d_uint8)
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.ndim == 3 and hm.shape[-1] == 1:
        hm = hm[..., 0]
    if hm.ndim != 2:
        raise ValueError(f"overlay_heatmap: heatmap must be 2-D, got shape {hm.shape}")
    if not np.all(np.isfinite(hm)):
        raise ValueError("overlay_heatmap: heatmap contains NaN or inf")
    if hm.shape != gray.shape:
        hm = cv2.resize(hm, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
    hm8 = np.round(np.clip(hm, 0.0, 1.0) * 255.0).astype(np.uint8)
    color = cv2.cvtColor(cv2.applyColorMap(hm8, colormap), cv2.COLOR_BGR2RGB)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    out = (1.0 - alpha) * base.astype(np.float32) + alpha * color.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def save_gradcam(image: np.ndarray, heatmap: np.ndarray, path: str | os.PathLike, alpha: float = 0.4) -> Path:
    """Write the heatmap overlay of ``image`` as a PNG, atomically (parent folders created).

    Returns:
        The path written.
    """
    path = Path(path)
    rgb = overlay_heatmap(image, heatmap, alpha=alpha)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"save_gradcam: could not encode PNG for {path}")
    from covidlib.fsutil import atomic_write_bytes

    atomic_write_bytes(path, buf.tobytes())
    return path
