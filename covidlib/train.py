"""Fitting a backbone on a manifest, with callbacks, resume, and a saved run.

A run lives in ``RUN_DIR/models/<NAME>/``: ``model.keras``, ``labels.json`` (class order),
``config.json`` (everything needed to reproduce it), ``history.csv`` and
``predictions_<split>.csv`` (per-image probabilities of the val and test splits). Evaluating
the test split beyond saving its predictions is :mod:`covidlib.evaluate`'s job.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

import keras

from covidlib import config
from covidlib.fsutil import atomic_open, atomic_write_text
from covidlib.data import ArrayLoader, ArrayStore, build_store, class_weights, manifest_fingerprint
from covidlib.models import build_model, set_backbone_trainable

# Best weights by validation AUC (numpy .npz of model.get_weights(), see BestWeights).
BEST_WEIGHTS = "best.weights.npz"


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``).

    Attributes:
        backbone: a name from :data:`covidlib.models.BACKBONES`.
        modality: ``"ct"`` or ``"xray"``; only manifest rows of this modality are used.
        img_size: square input size.
        epochs: epochs of the first phase (the only phase when training from scratch).
        fine_tune_epochs: with pretrained weights, epochs after unfreezing (0 = head only).
        batch_size: images per batch.
        weights: ``"imagenet"``, ``None`` or a path to a backbone weights file.
        head: classification head (see :func:`covidlib.models.build_model`).
        learning_rate: first-phase learning rate (Adam).
        fine_tune_lr: learning rate after unfreezing (10-100x lower, keras-io recipe).
        unfreeze: ``"all"`` or the number of top backbone layers to unfreeze.
        imbalance: ``"class_weight"`` (default), ``"balanced_sampling"`` or ``"none"``.
        augment: train with the augmentation block.
        patience: early-stopping patience (epochs without a better validation AUC).
        seed: seed of weights init, shuffling and augmentation.
        bn_momentum: batch-norm momentum when training from scratch.
        mixed_precision: ``"auto"`` (on with a GPU), ``"on"`` or ``"off"``.
        jit_compile: ``"auto"`` (XLA with a GPU), ``"on"`` or ``"off"``.
        tensorboard: write TensorBoard logs.
        enhancement: the enhancement pipeline configuration the images went through.
        name: run name (default: the backbone, or ``xray_<backbone>``).
    """

    backbone: str = "MobileNetV2"
    modality: str = "ct"
    img_size: int = 224
    epochs: int = 10
    fine_tune_epochs: int = 0
    batch_size: int = 32
    weights: str | None = None
    head: str = "gap"
    dropout: float = 0.3
    learning_rate: float = 1e-3
    fine_tune_lr: float = 1e-5
    unfreeze: str | int = "all"
    imbalance: str = "class_weight"
    augment: bool = True
    patience: int = 5
    seed: int = 0
    bn_momentum: float = 0.5
    mixed_precision: str = "auto"
    jit_compile: str = "auto"
    tensorboard: bool = True
    enhancement: dict = field(default_factory=lambda: {"name": "none"})
    name: str | None = None

    def run_name(self) -> str:
        if self.name:
            return self.name
        return self.backbone if self.modality == "ct" else f"xray_{self.backbone}"

    def validate(self) -> None:
        from covidlib.models import BACKBONES, HEADS

        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {list(BACKBONES)}")
        if self.modality not in config.MODALITIES:
            raise ValueError(f"modality must be one of {config.MODALITIES}, got {self.modality!r}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose one of {list(HEADS)}")
        if self.imbalance not in ("class_weight", "balanced_sampling", "none"):
            raise ValueError("imbalance must be 'class_weight', 'balanced_sampling' or 'none'")
        for opt in ("mixed_precision", "jit_compile"):
            if getattr(self, opt) not in ("auto", "on", "off"):
                raise ValueError(f"{opt} must be 'auto', 'on' or 'off'")
        if self.epochs < 1 or self.batch_size < 1 or self.img_size < 32:
            raise ValueError("epochs and batch_size must be >= 1 and img_size >= 32")


@dataclass
class TrainResult:
    """What a finished run left on disk."""

    model_dir: Path
    classes: list[str]
    history: pd.DataFrame
    model: keras.Model
    resumed: bool = False
    skipped: bool = False


def gpu_available() -> bool:
    """Whether the active Keras backend sees a GPU."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no GPU runtime means no GPU
        return False
    return False


def describe_device() -> str:
    """One line for notebooks: backend and whether a GPU is used."""
    return f"Keras {keras.__version__}, backend {keras.backend.backend()}, " + (
        "GPU available" if gpu_available() else "no GPU (CPU only)")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and the backend; make TensorFlow ops deterministic."""
    keras.utils.set_random_seed(int(seed))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.experimental.enable_op_determinism()
        except Exception:  # noqa: BLE001 - older TF: best effort
            pass


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """Save a ``.keras`` file so a crash never leaves a half-written model behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


def predict_store(model: keras.Model, store: ArrayStore, rows: np.ndarray, classes: list[str],
                  batch_size: int = 64) -> pd.DataFrame:
    """Per-image probabilities for ``rows`` of a store: ``path, patient_id, label, p_<class>``."""
    if len(rows) == 0:
        return pd.DataFrame(columns=["path", "patient_id", "label"] + [f"p_{c}" for c in classes])
    # ArrayLoader sorts each batch by row number (sequential memory-map reads); feed it sorted rows
    # and put the probabilities back in the caller's order, or they land on the wrong images.
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    loader = ArrayLoader(store.images, np.zeros(len(rows), dtype=np.int64), len(classes),
                         batch_size, rows=rows[order])
    probs_sorted = np.concatenate([np.asarray(model.predict_on_batch(loader[i][0]))
                                   for i in range(len(loader))])
    probs = np.empty_like(probs_sorted)
    probs[order] = probs_sorted
    idx = store.index.iloc[rows]
    out = pd.DataFrame({"path": idx["path"].to_numpy(),
                        "patient_id": idx["patient_id"].astype(str).to_numpy(),
                        "label": idx["label"].to_numpy()})
    for j, c in enumerate(classes):
        out[f"p_{c}"] = probs[:, j].astype(float)
    return out


def prediction_collapse(probs: np.ndarray, min_std: float = 0.05) -> bool:
    """True when a model gives (almost) the same output for every image.

    The failure mode of from-scratch backbones whose batch-norm statistics lag behind the
    weights: every validation image lands in one class with near-identical probabilities
    (measured: MobileNetV2 with Keras' momentum 0.999 gives a spread of 0.000, with 0.9 about
    0.03, with 0.5 about 0.1 on the synthetic CT set at 64 px).
    """
    probs = np.asarray(probs)
    if len(probs) < 2:
        return False
    one_class = len(np.unique(probs.argmax(axis=1))) == 1
    return bool(one_class and float(probs.std(axis=0).max()) < min_std)


class _KillAfter(keras.callbacks.Callback):
    """Test hook: raise after ``n_batches`` training batches (simulates a killed run)."""

    def __init__(self, n_batches: int) -> None:
        super().__init__()
        self.n = n_batches
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen >= self.n:
            raise KeyboardInterrupt(f"simulated kill after {self.seen} batches")


def _policy(cfg: TrainConfig, gpu: bool) -> tuple[bool, bool]:
    mp = cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto" and gpu)
    jit = cfg.jit_compile == "on" or (cfg.jit_compile == "auto" and gpu)
    return mp, jit


def _compile(model: keras.Model, lr: float, num_classes: int, jit: bool) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="categorical_crossentropy",
        metrics=[
            "accuracy",
            # One-vs-rest AUC averaged over classes, from probabilities.
            keras.metrics.AUC(name="auc", multi_label=True, num_labels=num_classes),
        ],
        jit_compile=jit,
    )


def _best_so_far(history_csv: Path) -> float | None:
    if not history_csv.is_file():
        return None
    try:
        h = pd.read_csv(history_csv)
        return float(h["val_auc"].max()) if "val_auc" in h and len(h) else None
    except Exception:  # noqa: BLE001 - an unreadable log only loses the threshold
        return None


class BestWeights(keras.callbacks.Callback):
    """Keep the best weights by a monitored metric; write them when it is safe and cheap.

    ``ModelCheckpoint(save_best_only=True)`` writes an HDF5 file on every improvement: 37 ms for
    the small CNN and 230 ms for ResNet50V2 per improving epoch on this machine (BENCHMARKS.md),
    most of an epoch's overhead. Here an improvement copies the weights into a second set of
    variables on the same device (15 ms for ResNet50V2 on a CPU, far less on a GPU); the copy is
    written (atomically, ``.npz`` of ``model.get_weights()`` order) by :meth:`flush`, which the
    budgeted backup calls when it saves (so after a kill the best file matches the history the
    resume keeps) and which runs at the end of training. Load it with :func:`load_best_weights`.
    """

    def __init__(self, path: str | os.PathLike, monitor: str = "val_auc", mode: str = "max",
                 initial_value_threshold: float | None = None) -> None:
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.path = Path(path)
        self.monitor = monitor
        self.sign = 1.0 if mode == "max" else -1.0
        self.best = -np.inf if initial_value_threshold is None else self.sign * float(initial_value_threshold)
        self.best_epoch: int | None = None
        self._copy: list | None = None
        self._pending = False

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value):
            return
        if self.sign * float(value) > self.best:
            self.best = self.sign * float(value)
            self.best_epoch = epoch
            self._snapshot()

    def _snapshot(self) -> None:
        weights = self.model.weights
        same = self._copy is not None and len(self._copy) == len(weights) and all(
            tuple(c.shape) == tuple(w.shape) for c, w in zip(self._copy, weights))
        if same:
            for c, w in zip(self._copy, weights):
                c.assign(w)
        else:  # first improvement: allocate the copy once (never from w.value: on TensorFlow
            # that would wrap the very same variable, not copy it)
            self._copy = []
            for i, w in enumerate(weights):
                c = keras.Variable(keras.ops.zeros(w.shape, w.dtype), trainable=False, name=f"best_{i}")
                c.assign(w)
                self._copy.append(c)
        self._pending = True

    def flush(self) -> None:
        """Write the pending best weights, if any."""
        if not self._pending or self._copy is None:
            return
        arrays = [keras.ops.convert_to_numpy(c) for c in self._copy]
        with atomic_open(self.path) as fh:
            np.savez(fh, *arrays)
        self._pending = False

    def on_train_end(self, logs=None):
        self.flush()


class EpochTensorBoard(keras.callbacks.Callback):
    """Epoch metrics as TensorBoard event files, on every Keras backend.

    Writes what Keras' ``TensorBoard`` callback writes with ``write_graph=False`` and no
    histograms: ``log_dir/train`` and ``log_dir/validation`` runs with ``epoch_<metric>`` tags
    (``val_`` metrics go to ``validation``) and ``epoch_learning_rate``. It uses TensorBoard's own
    framework-free writer (``tensorboard.summary.Writer``): about 0.3 ms an epoch, where the Keras
    callback's eager TensorFlow summary ops took 6-7 ms (BENCHMARKS.md), and it needs no
    TensorFlow, so JAX / PyTorch runs get logs too.
    """

    def __init__(self, log_dir: str | os.PathLike) -> None:
        super().__init__()
        self.log_dir = Path(log_dir)
        self._writers: dict[str, Any] = {}

    def _writer(self, run: str):
        if run not in self._writers:
            from tensorboard.summary import Writer

            self._writers[run] = Writer(str(self.log_dir / run))
        return self._writers[run]

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if "learning_rate" not in logs:
            try:
                logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            except Exception:  # noqa: BLE001 - a schedule or a missing optimizer: log the rest
                pass
        for key, value in logs.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            run, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            self._writer(run).add_scalar(f"epoch_{name}", value, step=epoch)
        for w in self._writers.values():
            w.flush()

    def on_train_end(self, logs=None):
        for w in self._writers.values():
            w.close()
        self._writers = {}


def load_best_weights(model: keras.Model, path: str | os.PathLike) -> None:
    """Load weights written by :class:`BestWeights` into ``model`` (same architecture)."""
    with np.load(path) as data:
        weights = [data[f"arr_{i}"] for i in range(len(data.files))]
    model.set_weights(weights)


class BudgetedBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` that spends at most ``budget`` of the training time on backups.

    Writing weights + optimizer state every epoch cost up to 1.2 s per epoch on short epochs
    (BENCHMARKS.md, "Training loop overhead"). Here an epoch end is backed up only when the time
    since the last backup is at least ``last backup's cost / budget``; the first epoch always is.
    A killed run therefore loses at most about ``cost / budget`` seconds of work (60 s for a 1.2 s
    backup at the default 2 %) and still resumes to the same number of epochs. ``also_save`` callables run
    with each backup, inside the same budget (:meth:`BestWeights.flush`).
    """

    def __init__(self, backup_dir: str, budget: float = 0.02, also_save: Sequence[Callable[[], None]] = (),
                 **kwargs: Any) -> None:
        super().__init__(backup_dir, save_freq="epoch", **kwargs)
        self.budget = float(budget)
        self.also_save = list(also_save)
        self._cost = 0.0
        self._trained = 0.0  # seconds of training (epoch begin -> end) since the last backup
        self._epoch_t0: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._epoch_t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch = epoch + 1
        self._last_batch_seen = 0
        if self._epoch_t0 is not None:
            # Training time, not wall time: time outside fit (another fit call, a paused
            # notebook) must not make backups more frequent.
            self._trained += time.perf_counter() - self._epoch_t0
        if self._cost <= self.budget * self._trained:
            t0 = time.perf_counter()
            for save in self.also_save:
                save()
            self._save_model()
            self._cost = time.perf_counter() - t0
            self._trained = 0.0

    # Backups are taken at epoch ends only. BackupAndRestore's batch hook (for an integer
    # save_freq) would make Keras treat this callback as unsafe for asynchronous dispatch and
    # pull every step's logs back to the host: a device sync per step, so on a GPU the input
    # pipeline no longer overlapped the compute (DenseNet121 on an H100: ours / bare 0.78 with the
    # hook, 1.04 without; BENCHMARKS.md, GPU).
    on_train_batch_end = keras.callbacks.Callback.on_train_batch_end


def _restored_epoch(backup_dir: Path) -> int:
    """The epoch a BackupAndRestore folder will resume from (0 when nothing was backed up)."""
    meta = backup_dir / "training_metadata.json"
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def _truncate_history(history_csv: Path, keep_before: int) -> None:
    """Drop logged epochs that a resume will run again (backups are not taken every epoch)."""
    if not history_csv.is_file():
        return
    h = pd.read_csv(history_csv)
    if "epoch" in h and (h["epoch"] >= keep_before).any():
        atomic_write_text(history_csv, h[h["epoch"] < keep_before].to_csv(index=False))


def _callbacks(model_dir: Path, cfg: TrainConfig, phase: str, extra: list | None) -> list:
    backup = model_dir / "backup" / phase
    first_epoch = 0 if phase == "phase1" else cfg.epochs
    _truncate_history(model_dir / "history.csv", max(_restored_epoch(backup), first_epoch))
    # Order matters at an epoch's end: the best weights, the learning-rate change and the history
    # row must all be in place before the backup records the epoch as done.
    best = BestWeights(model_dir / BEST_WEIGHTS, monitor="val_auc", mode="max",
                       initial_value_threshold=_best_so_far(model_dir / "history.csv"))
    cbs: list = [
        best,
        keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=cfg.patience),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                          patience=max(1, cfg.patience // 2), min_lr=1e-7),
        keras.callbacks.CSVLogger(str(model_dir / "history.csv"), append=True),
        BudgetedBackupAndRestore(str(backup), delete_checkpoint=True, also_save=[best.flush]),
    ]
    if cfg.tensorboard:
        try:
            import tensorboard.summary  # noqa: F401
        except ImportError:
            warnings.warn("TensorBoard logs need the tensorboard package; skipping them", stacklevel=2)
        else:
            cbs.append(EpochTensorBoard(model_dir / "logs"))
    return cbs + list(extra or [])


def train(
    manifest: pd.DataFrame,
    run_dir: str | os.PathLike,
    cfg: TrainConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    verbose: int | str = "auto",
    extra_callbacks: list | None = None,
) -> TrainResult:
    """Train ``cfg.backbone`` on the train split, select on val, save predictions for val/test.

    Re-running the same configuration on the same data returns the finished run without training
    again; a run killed part-way resumes from its last completed epoch
    (``keras.callbacks.BackupAndRestore``) and ends with the same number of epochs.

    Args:
        manifest: rows ``path, label, patient_id, split, modality`` (absolute paths).
        run_dir: the run folder; the model goes to ``run_dir/models/<name>/``.
        cfg: the training configuration.
        cache_dir: where the decoded array store lives (default ``run_dir/cache``).
        overwrite: retrain even when a finished run with this configuration exists.
        verbose: Keras ``fit`` verbosity.
        extra_callbacks: more Keras callbacks (tests use one to simulate a kill).
    """
    cfg.validate()
    rows = manifest[manifest["modality"] == cfg.modality] if "modality" in manifest else manifest
    if rows.empty:
        raise ValueError(f"the manifest has no {cfg.modality!r} images")
    classes = config.ordered_classes(rows["label"].unique())
    if len(classes) < 2:
        raise ValueError(f"need at least two classes to train, found {classes}")
    for split in ("train", "val"):
        if not (rows["split"] == split).any():
            raise ValueError(f"the manifest has no {split!r} images for {cfg.modality!r}")

    run_dir = Path(run_dir)
    model_dir = run_dir / "models" / cfg.run_name()
    full_cfg = {**asdict(cfg), "classes": classes, "manifest_sha1": manifest_fingerprint(rows),
                "keras_version": keras.__version__, "backend": keras.backend.backend()}
    done_marker = model_dir / "done.json"
    if model_dir.exists() and not overwrite and done_marker.is_file():
        saved = json.loads((model_dir / "config.json").read_text())
        if _same_run(saved, full_cfg):
            from covidlib.models import load_model

            return TrainResult(model_dir, classes, pd.read_csv(model_dir / "history.csv"),
                               load_model(model_dir / "model.keras"), skipped=True)
    in_progress = (model_dir / "backup").exists() and not overwrite
    if in_progress:
        saved_cfg = model_dir / "config.json"
        if not saved_cfg.is_file() or not _same_run(json.loads(saved_cfg.read_text()), full_cfg):
            in_progress = False
    if not in_progress and model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(model_dir / "config.json", json.dumps(full_cfg, indent=2, default=str))
    atomic_write_text(model_dir / "labels.json", json.dumps(classes))

    store = build_store(rows, cfg.img_size, cache_dir or (run_dir / "cache"))
    tr, va = store.split_indices("train"), store.split_indices("val")
    y_tr, y_va = store.labels(classes, tr), store.labels(classes, va)
    sampling = "balanced" if cfg.imbalance == "balanced_sampling" else "none"
    train_loader = ArrayLoader(store.images, y_tr, len(classes), cfg.batch_size, rows=tr,
                               shuffle=True, seed=cfg.seed, sampling=sampling)
    val_loader = ArrayLoader(store.images, y_va, len(classes), cfg.batch_size, rows=va)
    cw = class_weights(y_tr, len(classes)) if cfg.imbalance == "class_weight" else None

    gpu = gpu_available()
    mixed, jit = _policy(cfg, gpu)
    previous_policy = keras.mixed_precision.global_policy().name
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        set_seed(cfg.seed)
        pretrained = cfg.weights is not None
        model = build_model(cfg.backbone, len(classes), cfg.img_size, weights=cfg.weights,
                            head=cfg.head, dropout=cfg.dropout, augment=cfg.augment,
                            seed=cfg.seed, bn_momentum=cfg.bn_momentum)
        phase1_weights = model_dir / "phase1.weights.h5"
        if pretrained:
            set_backbone_trainable(model, False)
        if not (pretrained and phase1_weights.is_file()):
            _compile(model, cfg.learning_rate, len(classes), jit)
            model.fit(train_loader, validation_data=val_loader, epochs=cfg.epochs,
                      class_weight=cw, verbose=verbose,
                      callbacks=_callbacks(model_dir, cfg, "phase1", extra_callbacks))
            if pretrained and cfg.fine_tune_epochs > 0:
                model.save_weights(phase1_weights)
        else:
            model.load_weights(phase1_weights)
        if pretrained and cfg.fine_tune_epochs > 0:
            top_n = None if cfg.unfreeze == "all" else int(cfg.unfreeze)
            set_backbone_trainable(model, True, top_n=top_n)
            _compile(model, cfg.fine_tune_lr, len(classes), jit)  # trainable flags take effect
            done_epochs = len(pd.read_csv(model_dir / "history.csv"))
            model.fit(train_loader, validation_data=val_loader,
                      initial_epoch=min(done_epochs, cfg.epochs),
                      epochs=cfg.epochs + cfg.fine_tune_epochs, class_weight=cw, verbose=verbose,
                      callbacks=_callbacks(model_dir, cfg, "phase2", extra_callbacks))
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    best = model_dir / BEST_WEIGHTS
    if best.is_file():
        load_best_weights(model, best)
    final = model
    save_model_atomic(final, model_dir / "model.keras")
    for split in ("val", "test"):
        preds = predict_store(final, store, store.split_indices(split), classes)
        atomic_write_text(model_dir / f"predictions_{split}.csv", preds.to_csv(index=False))
        if split == "val" and len(preds) and prediction_collapse(
                preds[[f"p_{c}" for c in classes]].to_numpy()):
            warnings.warn(
                f"{cfg.run_name()}: every validation image gets the same prediction - the model "
                "collapsed to one class. Train longer, lower bn_momentum, or use pretrained weights.",
                UserWarning, stacklevel=2)
    if phase1_weights.is_file():
        phase1_weights.unlink()
    history = pd.read_csv(model_dir / "history.csv")
    atomic_write_text(done_marker, json.dumps({"epochs_run": len(history)}))
    shutil.rmtree(model_dir / "backup", ignore_errors=True)  # a finished run resumes nothing
    return TrainResult(model_dir, classes, history, final, resumed=in_progress)


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    ignore = {"keras_version"}
    return {k: v for k, v in a.items() if k not in ignore} == json.loads(
        json.dumps({k: v for k, v in b.items() if k not in ignore}, default=str))


def load_run(model_dir: str | os.PathLike) -> tuple[keras.Model, list[str], dict]:
    """Load a finished run: the model (safe mode), its class order and its configuration."""
    from covidlib.models import load_model

    model_dir = Path(model_dir)
    if not (model_dir / "model.keras").is_file():
        raise FileNotFoundError(f"{model_dir} holds no trained model (model.keras); train it first")
    classes = json.loads((model_dir / "labels.json").read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    return load_model(model_dir / "model.keras"), classes, cfg


def enhanced_manifest(manifest: pd.DataFrame, run_dir: str | os.PathLike, pipeline: str,
                      modality: str, *, workers: int | None = None,
                      progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """The manifest rows of ``modality`` pointing at enhanced copies (made once, then reused).

    Copies live in ``run_dir/enhanced/<modality>/<pipeline>/``; the sources are never touched.
    ``pipeline == "none"`` returns the rows unchanged.
    """
    from covidlib import enhance

    rows = manifest[manifest["modality"] == modality].reset_index(drop=True)
    cfg = enhance.pipeline_config(pipeline, modality=modality)
    if pipeline == "none":
        return rows, cfg
    dst = Path(run_dir) / "enhanced" / modality / pipeline.replace("+", "_")
    out = enhance.enhance_manifest(rows, dst, pipeline, workers=workers, progress=progress,
                                   modality=modality)
    failed = out.attrs.get("enhance_summary", {}).get("failed") or []
    if failed:
        warnings.warn(f"{len(failed)} images could not be enhanced (see {dst}/enhance_failures.csv)",
                      UserWarning, stacklevel=2)
    return out, cfg


def train_backbone(run_dir: str | os.PathLike, *, manifest: pd.DataFrame | None = None,
                   enhancement: str = "crop+wb+clahe", overwrite: bool = False,
                   verbose: int | str = "auto", **config_kwargs: Any) -> TrainResult:
    """Enhance (cached) and train one backbone on ``RUN_DIR/manifest.csv``: notebook 03's step.

    Args:
        run_dir: the run folder holding ``manifest.csv`` (from notebook 01).
        manifest: use this manifest instead of reading ``run_dir/manifest.csv``.
        enhancement: an enhancement pipeline name (see :data:`covidlib.enhance.PIPELINES`).
        overwrite: retrain even if a finished identical run exists.
        verbose: Keras ``fit`` verbosity.
        **config_kwargs: fields of :class:`TrainConfig` (``backbone``, ``modality``, ...).
    """
    from covidlib.datasets import read_manifest

    run_dir = Path(run_dir)
    if manifest is None:
        path = run_dir / "manifest.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run notebook 01 (or `covidlib run`) first")
        manifest = read_manifest(path)
    cfg = TrainConfig(**config_kwargs)
    cfg.validate()
    rows, enh_cfg = enhanced_manifest(manifest, run_dir, enhancement, cfg.modality)
    cfg.enhancement = enh_cfg
    return train(rows, run_dir, cfg, overwrite=overwrite, verbose=verbose)
