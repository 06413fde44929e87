"""Export a trained covidlib model (one backbone or the saved ensemble) for serving.

Three formats, all taking raw grayscale 0..255 images ``(n, S, S, 1)`` float32 (preprocessing,
and for the ensemble the vote, are inside the graph). They output what the Keras model does: a
backbone's uncalibrated softmax probabilities; for the ensemble, what ``models/ensemble/config.json``
``"output"`` says (``"score"`` for the hard vote: a ranking score, not a probability; see
:mod:`covidlib.ensemble`):

* ``savedmodel`` -- TensorFlow SavedModel (``model.export(..., format="tf_saved_model")``),
  signature ``serving_default`` with input ``image``; TF Serving / ``tf.saved_model.load``.
* ``tflite`` -- float32 TFLite flatbuffer converted from that SavedModel (builtin ops only).
* ``onnx`` -- ``model.export(..., format="onnx")``; with the TensorFlow backend Keras converts
  through ``tf2onnx`` (needs ``tf2onnx`` and ``onnx``; ``onnxruntime`` to verify).

Two details make the exports match ``model.predict``:

* **Inference mode is pinned.** ``model.export`` traces ``model.__call__`` without a ``training``
  argument. Keras' random augmentation layers default to ``training=True`` and that value then
  spreads through the call context, so a plain export of a covidlib model (augmentation inside)
  would augment every request and run batch-norm in training mode. We export a thin wrapper that
  calls the model with ``training=False``.
* **float32.** Models trained with mixed precision (``mixed_float16``) are rebuilt with a float32
  policy (same weights) before export; ONNX export requires it and TFLite is asked for float32.

:func:`verify_export` runs each artifact and reports its largest difference from the Keras model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from covidlib.fsutil import atomic_path, atomic_write_bytes, atomic_write_text

FORMATS: tuple[str, ...] = ("savedmodel", "tflite", "onnx")

#: Where each format is written inside ``out_dir``.
ARTIFACT_NAMES: dict[str, str] = {
    "savedmodel": "saved_model",
    "tflite": "model.tflite",
    "onnx": "model.onnx",
}

ONNX_REQUIREMENTS = "tf2onnx>=1.17 onnx>=1.17 onnxruntime>=1.20"


class ExportError(RuntimeError):
    """A format could not be produced (missing toolchain, unsupported op, ...)."""


class ExportMismatchError(ValueError):
    """An exported artifact does not reproduce the Keras model within tolerance.

    Attributes:
        diffs: ``{format: max abs difference}`` for every artifact that was checked.
    """

    def __init__(self, message: str, diffs: dict[str, float]):
        super().__init__(message)
        self.diffs = diffs


# --------------------------------------------------------------------------- loading
def load_exportable(model_or_path: Any) -> tuple[Any, Path | None]:
    """``(model, its folder or None)`` from a keras.Model, a ``.keras`` file or a model folder.

    Files are checked before they are trusted: the archive must be complete
    (:func:`covidlib.runs.check_keras_file`), and a folder's ``labels.json`` / ``config.json``
    must agree with each other and with the model (:func:`_check_folder`). They are loaded with
    :func:`covidlib.models.load_model` (Keras safe mode).
    """
    import keras

    from covidlib import ensemble  # noqa: F401 - registers VoteLayer for ensemble files
    from covidlib.models import load_model
    from covidlib.runs import check_keras_file

    if isinstance(model_or_path, keras.Model):
        return model_or_path, None
    p = Path(model_or_path)
    if p.is_dir():
        p = p / "model.keras"
    if not p.is_file():
        raise FileNotFoundError(f"no model at {model_or_path} (expected a .keras file or a folder holding model.keras)")
    check_keras_file(p)
    model = load_model(p)
    _check_folder(model, p.parent)
    return model, p.parent


def _check_folder(model: Any, folder: Path) -> None:
    """The labels.json that travels with the export must name the model's outputs correctly."""
    from covidlib import runs

    if not (folder / "labels.json").is_file():
        return
    labels = runs.read_labels(folder)
    cfg = runs.read_config(folder) if (folder / "config.json").is_file() else {}
    runs.check_classes(labels, cfg, folder)
    size = runs.check_img_size(cfg, folder) if "img_size" in cfg else None
    runs.check_model_io(model, len(labels), size, folder)


def _check_image_model(model: Any) -> tuple[int, ...]:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"export expects one image input and one output; {model.name!r} has "
                         f"{len(model.inputs)} inputs and {len(model.outputs)} outputs")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise ValueError(f"export expects a 4-D image input (n, S, S, 1); got {shape}")
    return shape


def _float32_policies(obj: Any) -> tuple[Any, bool]:
    """Replace every mixed-precision DTypePolicy in a serialized config by float32."""
    changed = False
    if isinstance(obj, dict):
        if obj.get("class_name") == "DTypePolicy" and isinstance(obj.get("config"), dict):
            name = str(obj["config"].get("name", ""))
            if name.startswith("mixed_"):
                return {**obj, "config": {**obj["config"], "name": "float32"}}, True
        out = {}
        for k, v in obj.items():
            out[k], c = _float32_policies(v)
            changed |= c
        return out, changed
    if isinstance(obj, list):
        items = [_float32_policies(v) for v in obj]
        return [v for v, _ in items], any(c for _, c in items)
    return obj, False


def _as_float32(model: Any) -> Any:
    """The model itself when it computes in float32, else a float32 rebuild with the same weights."""
    import keras

    cfg, changed = _float32_policies(keras.saving.serialize_keras_object(model))
    if not changed:
        return model
    warnings.warn(f"{model.name}: mixed-precision model rebuilt in float32 for export "
                  "(predictions may differ from the float16 model by ~1e-3)", UserWarning, stacklevel=3)
    clone = keras.saving.deserialize_keras_object(cfg, safe_mode=True)
    clone.set_weights(model.get_weights())
    return clone


def inference_model(model: Any) -> Any:
    """A functional wrapper that always runs ``model`` with ``training=False``.

    Needed because ``model.export`` traces ``model(x)`` with no ``training`` argument, and the
    augmentation layers inside covidlib models default to training mode (see module docstring).
    """
    import keras

    shape = _check_image_model(model)
    inp = keras.Input(shape[1:], name="image", dtype="float32")
    out = model(inp, training=False)
    return keras.Model(inp, out, name=f"{model.name}_inference")


def _keras_predict(model: Any, x: np.ndarray) -> np.ndarray:
    """Inference-mode outputs (``training=False``: no augmentation, batch-norm statistics fixed)."""
    from keras import ops

    return np.asarray(ops.convert_to_numpy(model(ops.convert_to_tensor(x), training=False)), dtype=np.float64)


# --------------------------------------------------------------------------- formats
def _export_savedmodel(wrapper: Any, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        wrapper.export(str(tmp), format="tf_saved_model", verbose=False)


def _tflite_bytes(saved_model_dir: Path) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    # float32, builtin ops only: no quantisation, no TF Select (the plain TFLite runtime runs it).
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        return converter.convert()
    except Exception as exc:  # the converter raises its own types with a page of MLIR text
        lines = [ln for ln in str(exc).splitlines() if "not supported" in ln or "TF Select ops" in ln]
        detail = "; ".join(lines[:3]) or str(exc).splitlines()[0][:300]
        raise ExportError(f"TFLite conversion failed: {detail}") from exc


def onnx_available() -> str | None:
    """None when the ONNX toolchain imports, else the reason (what to install)."""
    import importlib

    missing = []
    for mod in ("tf2onnx", "onnx"):
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001 - a broken install counts as missing
            missing.append(f"{mod} ({type(exc).__name__}: {exc})")
    if missing:
        return (f"ONNX export needs {', '.join(missing)}; install them with "
                f"`pip install {ONNX_REQUIREMENTS}`")
    return None


def _export_onnx(wrapper: Any, dst: Path) -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        # JAX/PyTorch go through jax2onnx / torch.onnx, which covidlib does not install or test.
        raise ExportError(f"ONNX export is supported with the TensorFlow backend only "
                          f"(running {keras.backend.backend()!r})")
    problem = onnx_available()
    if problem:
        raise ExportError(problem)
    try:
        with atomic_path(dst, suffix=".onnx") as tmp, warnings.catch_warnings():
            # Keras' tf2onnx numpy-2 patch probes np.object, which numpy announces as changing.
            warnings.simplefilter("ignore", FutureWarning)
            wrapper.export(str(tmp), format="onnx", verbose=False)
    except Exception as exc:  # tf2onnx raises many types
        raise ExportError(f"ONNX export failed ({type(exc).__name__}: {exc})") from exc


def _source_dir(model_dir_or_file: Any) -> Path | None:
    """The folder a model comes from (no loading), or None for an in-memory model."""
    if not isinstance(model_dir_or_file, (str, os.PathLike)):
        return None
    p = Path(model_dir_or_file)
    if not p.exists():
        return None  # load_exportable says "no model at ..."
    return p if p.is_dir() else p.parent


def _check_artifact(path: Path, fmt: str) -> None:
    """An artifact already there is replaced only by the same kind of thing."""
    from covidlib.fsutil import UnsafeOutputError

    if not os.path.lexists(path):
        return
    if fmt == "savedmodel":
        ok = path.is_dir() and ((path / "saved_model.pb").is_file() or not any(path.iterdir()))
    elif fmt == "tflite":
        ok = path.is_file() and (path.stat().st_size == 0 or path.read_bytes()[4:8] == b"TFL3")
    else:
        ok = path.is_file()
    if not ok:
        raise UnsafeOutputError(f"{path} exists and is not a {fmt} export; refusing to replace it "
                                "(choose another output folder)")


def check_export_out(out_dir: str | os.PathLike, model_dir_or_file: Any, formats: Iterable[str],
                     allow_inside_input: bool = False) -> Path:
    """Check the export folder before anything is loaded or converted.

    Refused: the model's own folder, a folder inside it (unless ``allow_inside_input``), a file,
    an unwritable folder, and artifacts already there that are another kind of file.
    """
    from covidlib.fsutil import check_output_path

    src = _source_dir(model_dir_or_file)
    out = check_output_path(out_dir, [src] if src is not None else [], kind="dir",
                            what="export folder", allow_inside_input=allow_inside_input)
    for fmt in formats:
        _check_artifact(out / ARTIFACT_NAMES[fmt], fmt)
    for name in ("labels.json", "export.json"):
        check_output_path(out / name, kind="file", what="export file", text=True)
    return out


def export_model(
    model_dir_or_file: Any,
    out_dir: str | os.PathLike,
    formats: Iterable[str] = FORMATS,
    *,
    allow_inside_input: bool = False,
) -> dict[str, Path]:
    """Export a model to SavedModel / TFLite / ONNX.

    Args:
        model_dir_or_file: a run's model folder (``RUN_DIR/models/<NAME>`` or ``.../ensemble``), a
            ``.keras`` file (loaded in Keras safe mode), or a ``keras.Model``.
        out_dir: output folder (created). Artifacts: ``saved_model/``, ``model.tflite``,
            ``model.onnx``, plus ``labels.json`` (copied when the source folder has one) and
            ``export.json`` (input name/shape, formats, source).
        formats: any of :data:`FORMATS`.
        allow_inside_input: the user asked explicitly for ``out_dir`` inside the model's folder.

    Returns:
        ``{format: path}`` for every format written.

    Raises:
        ValueError: unknown format, a model that is not one-image-in, one-output, a model folder
            whose files disagree (:class:`covidlib.runs.ModelFolderError`), an unsafe ``out_dir``
            (:func:`check_export_out`).
        FileNotFoundError: no model at the given path.
        ExportError: a format could not be produced (e.g. the ONNX toolchain is not installed);
            the formats before it in ``formats`` are already written.
    """
    formats = list(dict.fromkeys(_formats_arg(formats)))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown export format(s) {unknown or formats}; choose from {list(FORMATS)}")
    out = check_export_out(out_dir, model_dir_or_file, formats, allow_inside_input)
    model, src_dir = load_exportable(model_dir_or_file)
    shape = _check_image_model(model)
    wrapper = inference_model(_as_float32(model))
    out.mkdir(parents=True, exist_ok=True)

    written: dict[str, Path] = {}
    scratch: Path | None = None
    try:
        if "savedmodel" in formats or "tflite" in formats:
            sm = out / ARTIFACT_NAMES["savedmodel"]
            if "savedmodel" not in formats:
                scratch = Path(tempfile.mkdtemp(prefix=".sm_", dir=out))
                sm = scratch / "saved_model"
            _export_savedmodel(wrapper, sm)
            if "savedmodel" in formats:
                written["savedmodel"] = sm
            if "tflite" in formats:
                dst = out / ARTIFACT_NAMES["tflite"]
                atomic_write_bytes(dst, _tflite_bytes(sm))
                written["tflite"] = dst
        if "onnx" in formats:
            dst = out / ARTIFACT_NAMES["onnx"]
            _export_onnx(wrapper, dst)
            written["onnx"] = dst
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        _write_meta(out, model, shape, src_dir, written)
    return written


def _write_meta(out: Path, model: Any, shape: tuple, src_dir: Path | None,
                written: Mapping[str, Path]) -> None:
    classes = None
    if src_dir is not None and (src_dir / "labels.json").is_file():
        classes = json.loads((src_dir / "labels.json").read_text())
        atomic_write_text(out / "labels.json", json.dumps(classes))
    cfg = src_dir / "config.json" if src_dir is not None else None
    kind = json.loads(cfg.read_text()).get("output", "probability") if cfg and cfg.is_file() else "probability"
    meta = {
        "source": str(src_dir) if src_dir is not None else model.name,
        "model": model.name,
        "classes": classes,
        "input": {"name": "image", "shape": [None, *shape[1:]], "dtype": "float32",
                  "values": "raw grayscale 0..255 (preprocessing is inside the model)"},
        # A hard-vote ensemble outputs a ranking score: say so wherever the export travels.
        "output": ("hard-vote ranking scores (n, k), NOT probabilities, in the order of labels.json"
                   if kind == "score" else
                   "class probabilities (n, k), uncalibrated, in the order of labels.json"),
        "formats": {k: v.name for k, v in written.items()},
    }
    atomic_write_text(out / "export.json", json.dumps(meta, indent=2))


# --------------------------------------------------------------------------- running exports
def _as_input(images: Any, shape: tuple) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape[1:]):
        raise ValueError(f"images must be (n, {shape[1]}, {shape[2]}, {shape[3]}) (or without the channel "
                         f"axis); got {np.asarray(images).shape}")
    return np.ascontiguousarray(x)


def run_savedmodel(path: str | os.PathLike, x: np.ndarray) -> np.ndarray:
    """Outputs of a SavedModel's ``serving_default`` signature for ``x``."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    sig = loaded.signatures["serving_default"]
    (name,) = sig.structured_input_signature[1].keys()
    outs = sig(**{name: tf.constant(x)})
    return np.asarray(next(iter(outs.values())).numpy())


def run_tflite(path: str | os.PathLike, x: np.ndarray) -> np.ndarray:
    """Outputs of a TFLite model for ``x`` (batch resized to ``len(x)``)."""
    import tensorflow as tf

    with warnings.catch_warnings():
        # tf.lite.Interpreter announces its move to ai-edge-litert; it still works in TF 2.21.
        warnings.simplefilter("ignore")
        interp = tf.lite.Interpreter(model_path=str(path))
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    return np.asarray(interp.get_tensor(interp.get_output_details()[0]["index"]))


def run_onnx(path: str | os.PathLike, x: np.ndarray) -> np.ndarray:
    """Outputs of an ONNX model for ``x`` through onnxruntime (CPU)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError(f"verifying ONNX needs onnxruntime (`pip install {ONNX_REQUIREMENTS}`)") from exc
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


_RUNNERS = {"savedmodel": run_savedmodel, "tflite": run_tflite, "onnx": run_onnx}


def verify_export(model: Any, paths: Mapping[str, str | os.PathLike], images: Any,
                  atol: float = 1e-4) -> dict[str, float]:
    """Run every exported artifact on ``images`` and compare with the Keras model.

    Args:
        model: the Keras model (or its ``.keras`` file / model folder) that was exported.
        paths: ``{format: path}`` as returned by :func:`export_model`.
        images: ``(n, S, S, 1)`` or ``(n, S, S)`` raw 0..255 images.
        atol: largest accepted absolute difference of any output value.

    Returns:
        ``{format: max abs difference}`` against the Keras model in inference mode.

    Raises:
        ExportMismatchError: some artifact differs by more than ``atol`` (``.diffs`` holds all).
    """
    from covidlib.models import check_input_scale

    model, _ = load_exportable(model)
    x = _as_input(images, _check_image_model(model))
    check_input_scale(x, where="verify_export images")
    ref = _keras_predict(model, x)
    diffs: dict[str, float] = {}
    for fmt, path in paths.items():
        if fmt not in _RUNNERS:
            raise ValueError(f"unknown export format {fmt!r}; choose from {list(FORMATS)}")
        got = np.asarray(_RUNNERS[fmt](path, x), dtype=np.float64)
        if got.shape != ref.shape:
            raise ExportMismatchError(f"{fmt}: output shape {got.shape} != Keras {ref.shape}",
                                      {**diffs, fmt: float("inf")})
        diffs[fmt] = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    if bad:
        shown = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        raise ExportMismatchError(f"exports differ from the Keras model by more than {atol:g}: {shown}", diffs)
    return diffs


def sample_images(img_size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """Deterministic ``(n, S, S, 1)`` float32 test images in 0..255 for :func:`verify_export`.

    Smooth blobs plus noise: closer to a chest slice's statistics than pure noise, and no
    dataset needed.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:img_size, 0:img_size] / max(img_size - 1, 1)
    out = []
    for _ in range(n):
        img = np.zeros((img_size, img_size))
        for _ in range(4):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.3)
            img += rng.uniform(60, 200) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += rng.normal(0, 12, img.shape)
        out.append(np.clip(img, 0, 255))
    return np.stack(out).astype(np.float32)[..., None]


def _formats_arg(formats: Sequence[str] | str) -> list[str]:
    return [formats] if isinstance(formats, str) else list(formats)
