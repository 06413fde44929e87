"""Fitting a backbone on a manifest, with callbacks, resume, and a saved run.

A run lives in ``RUN_DIR/models/<NAME>/``: ``model.keras``, ``labels.json`` (class order),
``config.json`` (everything needed to reproduce it), ``history.csv`` (one row per epoch with its
``phase``: 1, or 2 for fine-tuning) and ``predictions_<split>.csv`` (per-image probabilities of
the val and test splits). Evaluating the test split beyond saving its predictions is
:mod:`covidlib.evaluate`'s job.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import numpy as np
import pandas as pd

import keras

from covidlib import config, distribute
from covidlib.fsutil import atomic_path, atomic_write_text
from covidlib.arraystore import ArrayLoader, ArrayStore, build_store, class_weights, manifest_fingerprint
from covidlib.callbacks import (BestWeights, BudgetedBackupAndRestore, EpochTensorBoard,
                                PhaseCSVLogger, load_best_weights, read_backup, restore_backup,
                                truncate_history)
from covidlib.models import build_model, check_unfreeze, resolve_weights_file, set_backbone_trainable
from covidlib.runner import notebook_field

# Best weights by validation AUC (numpy .npz of model.get_weights(), see BestWeights).
BEST_WEIGHTS = "best.weights.npz"


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``).

    A field that notebook 03 sets (``IMG_SIZE`` -> ``img_size``, ...) defaults to that notebook's
    parameter value, so the library, the CLI and the notebook cannot disagree.

    Attributes:
        backbone: a name from :data:`covidlib.models.BACKBONES`.
        modality: ``"ct"`` or ``"xray"``; only manifest rows of this modality are used.
        img_size: square input size.
        epochs: most epochs of the first phase (the only phase when training from scratch);
            early stopping may end it sooner.
        fine_tune_epochs: with pretrained weights, epochs after unfreezing (0 = head only),
            exactly this many whenever phase 1 ended.
        batch_size: images per batch on each replica; the global batch (one optimizer step) is
            ``batch_size x replicas`` (1 replica unless ``distribute`` uses several devices).
        weights: ``"imagenet"``, ``None`` or a path to a backbone weights file.
        head: classification head (see :func:`covidlib.models.build_model`).
        learning_rate: first-phase learning rate (Adam).
        fine_tune_lr: learning rate after unfreezing (10-100x lower, keras-io recipe).
        unfreeze: ``"all"`` or the number of top backbone layers to unfreeze, from 1 to the
            backbone's layer count (:func:`covidlib.models.backbone_layer_count`).
        imbalance: ``"class_weight"`` (default), ``"balanced_sampling"`` or ``"none"``.
        augment: train with the augmentation block.
        patience: early-stopping patience of phase 1 (epochs without a better validation AUC).
        seed: seed of weights init, shuffling and augmentation.
        bn_momentum: batch-norm momentum when training from scratch.
        zero_init_residual: when training from scratch, every residual branch starts at zero
            (:func:`covidlib.models.zero_init_residual`); measured gains: ResNet50V2 on the demo
            phantoms, MobileNetV2 on UCSD (README, "From-scratch training").
        mixed_precision: ``"auto"`` (on with a GPU), ``"on"`` or ``"off"``.
        jit_compile: ``"auto"`` (XLA with a GPU), ``"on"`` or ``"off"``; off under TensorFlow's
            distribution strategies (Keras turns XLA off there).
        distribute: data-parallel training: ``"off"``, ``"auto"``, ``"mirrored"``,
            ``"multiworker"`` (TensorFlow) or ``"jax_dataparallel"`` (JAX); see
            :mod:`covidlib.distribute`. The learning rate applies to the global batch as given
            (:data:`covidlib.distribute.LR_RULE`).
        tensorboard: write TensorBoard logs.
        enhancement: the enhancement pipeline configuration the images went through.
        name: run name (default: the backbone, or ``xray_<backbone>``).
    """

    backbone: str = notebook_field("train", "BACKBONE")
    modality: str = notebook_field("train", "MODALITY")
    img_size: int = notebook_field("train", "IMG_SIZE")
    epochs: int = notebook_field("train", "EPOCHS")
    fine_tune_epochs: int = notebook_field("train", "FINE_TUNE_EPOCHS")
    batch_size: int = notebook_field("train", "BATCH_SIZE")
    weights: str | None = notebook_field("train", "WEIGHTS")
    head: str = notebook_field("train", "HEAD")
    dropout: float = 0.3
    learning_rate: float = notebook_field("train", "LEARNING_RATE")
    fine_tune_lr: float = notebook_field("train", "FINE_TUNE_LR")
    unfreeze: str | int = notebook_field("train", "UNFREEZE")
    imbalance: str = notebook_field("train", "IMBALANCE")
    augment: bool = True
    patience: int = notebook_field("train", "PATIENCE")
    seed: int = notebook_field("train", "SEED")
    bn_momentum: float = 0.5
    zero_init_residual: bool = True
    mixed_precision: str = "auto"
    jit_compile: str = "auto"
    distribute: str = notebook_field("train", "DISTRIBUTE")
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
        if self.fine_tune_epochs < 0 or self.patience < 0:
            raise ValueError("fine_tune_epochs and patience must be >= 0")
        # Checked here, not when phase 2 starts: a bad value must not cost a trained phase 1.
        check_unfreeze(self.unfreeze, self.backbone)
        if self.weights not in (None, "imagenet"):  # before the images are enhanced and stored
            resolve_weights_file(self.weights, self.backbone, self.img_size)
        distribute.check_choice(self.distribute, keras.backend.backend())
        if self.jit_compile == "on" and self.distribute in ("mirrored", "multiworker"):
            raise ValueError("jit_compile='on' does not work with TensorFlow distribution "
                             "strategies (Keras turns XLA off under them); use 'auto' or 'off'")


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


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """Save a ``.keras`` file so a crash never leaves a half-written model behind."""
    with atomic_path(path, suffix=".keras") as tmp:  # Keras picks the format by the suffix
        model.save(tmp)


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


def precision_policy(cfg: Any, gpu: bool | None = None) -> tuple[bool, bool]:
    """``(mixed precision, XLA)`` for a config with ``mixed_precision`` / ``jit_compile`` fields
    (``"auto"`` = on with a GPU); shared by training and pretraining."""
    gpu = gpu_available() if gpu is None else gpu
    mp = cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto" and gpu)
    jit = cfg.jit_compile == "on" or (cfg.jit_compile == "auto" and gpu)
    return mp, jit


@contextmanager
def mixed_precision_scope(mixed: bool) -> Iterator[None]:
    """Keras' ``mixed_float16`` policy inside the block when ``mixed``; the caller's policy after."""
    previous = keras.mixed_precision.global_policy().name
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


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


def _callbacks(model_dir: Path, cfg: TrainConfig, phase: str, extra: list | None,
               io: Callable[[], ContextManager] | None = None) -> list:
    """The callbacks of one phase's ``fit``; ``phase`` is ``"phase1"`` or ``"phase2"``.

    ``model_dir`` is where this process writes (a worker that is not the chief writes into a
    folder of its own); ``io`` is the context backups are written in (``BudgetedBackupAndRestore``).
    """
    # Order matters at an epoch's end: the best weights, the stopping decision, the learning-rate
    # change and the history row must all be in place before the backup records the epoch as done.
    best = BestWeights(model_dir / BEST_WEIGHTS, monitor="val_auc", mode="max",
                       initial_value_threshold=_best_so_far(model_dir / "history.csv"))
    reduce_lr = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                                  patience=max(1, cfg.patience // 2), min_lr=1e-7)
    stateful: list = [reduce_lr]
    if phase == "phase1":  # phase 2 runs exactly fine_tune_epochs: no early stopping there
        stateful.insert(0, keras.callbacks.EarlyStopping(monitor="val_auc", mode="max",
                                                         patience=cfg.patience))
    cbs: list = [best, *stateful, PhaseCSVLogger(model_dir / "history.csv", phase=int(phase[-1])),
                 BudgetedBackupAndRestore(model_dir / "backup" / phase, also_save=[best.flush],
                                          stateful=stateful, io=io)]
    if cfg.tensorboard:
        try:
            import tensorboard.summary  # noqa: F401
        except ImportError:
            warnings.warn("TensorBoard logs need the tensorboard package; skipping them", stacklevel=2)
        else:
            cbs.append(EpochTensorBoard(model_dir / "logs"))
    return cbs + list(extra or [])


@dataclass
class _Fitting:
    """What the phases of one run share."""

    model: keras.Model
    train_loader: ArrayLoader
    val_loader: ArrayLoader
    class_weight: dict | None
    num_classes: int
    jit: bool
    verbose: int | str
    extra: list | None
    plan: distribute.Plan = field(default_factory=distribute.Plan)
    work_dir: Path | None = None  # where this process writes: the model folder, or its own folder


def _seek_epoch(loader: ArrayLoader, epoch: int) -> None:
    """Set the loader's seeded per-epoch shuffle to ``epoch``: a resumed fit does not start at 0."""
    loader.epoch = epoch - 1
    loader.on_epoch_end()  # advances to ``epoch`` and draws that epoch's order


def _run_phase(job: _Fitting, model_dir: Path, cfg: TrainConfig, phase: int, start: int,
               stop: int, lr: float) -> int:
    """Compile and fit one phase (epochs ``start`` to ``stop - 1``), resuming from its backup.

    Returns the epoch count at which the phase really ended: less than ``stop`` when early
    stopping ended it. ``fit(initial_epoch=e, epochs=E)`` runs ``E - e`` epochs, so the caller
    counts the next phase from this value.
    """
    # Every worker resumes from the chief's backup (the run folder is shared).
    backup_dir = model_dir / "backup" / f"phase{phase}"
    state = read_backup(backup_dir)
    work_dir = job.work_dir or model_dir
    with job.plan.variable_scope():
        _compile(job.model, lr, job.num_classes, job.jit)
        if state is not None:
            restore_backup(job.model, backup_dir, state)
    done = start
    if state is not None:
        done = state["epoch"]
        if state.get("finished") or done >= stop:
            return done
    truncate_history(work_dir / "history.csv", done)
    cbs = _callbacks(work_dir, cfg, f"phase{phase}", job.extra,
                     job.plan.host_io if job.plan.distributed else None)
    backup = next(cb for cb in cbs if isinstance(cb, BudgetedBackupAndRestore))
    backup.resume_state = state
    _seek_epoch(job.train_loader, done)
    # shuffle=False: the loader owns the (seeded, per-epoch) order. Keras' own shuffle would
    # reorder batches with Python's global random state, which a resumed run or another worker
    # does not share.
    job.model.fit(job.train_loader, validation_data=job.val_loader, initial_epoch=done,
                  epochs=stop, class_weight=job.class_weight, verbose=job.verbose, callbacks=cbs,
                  shuffle=False)
    backup.finish()
    return done if backup.completed is None else backup.completed


def _training_rows(manifest: pd.DataFrame, cfg: TrainConfig) -> tuple[pd.DataFrame, list[str]]:
    """The manifest rows of ``cfg.modality`` and their class order; bad input raises ValueError."""
    rows = manifest[manifest["modality"] == cfg.modality] if "modality" in manifest else manifest
    if rows.empty:
        raise ValueError(f"the manifest has no {cfg.modality!r} images")
    classes = config.ordered_classes(rows["label"].unique())
    if len(classes) < 2:
        raise ValueError(f"need at least two classes to train, found {classes}")
    for split in ("train", "val"):
        if not (rows["split"] == split).any():
            raise ValueError(f"the manifest has no {split!r} images for {cfg.modality!r}")
    return rows, classes


def _open_model_dir(model_dir: Path, full_cfg: dict, classes: list[str],
                    overwrite: bool) -> tuple[bool, TrainResult | None]:
    """Prepare ``model_dir``: ``(resuming, None)``, or ``(False, result)`` for a finished same run."""
    if model_dir.exists() and not overwrite and (model_dir / "done.json").is_file():
        saved = json.loads((model_dir / "config.json").read_text())
        if _same_run(saved, full_cfg):
            return False, _finished_result(model_dir, classes)
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
    return in_progress, None


def _finished_result(model_dir: Path, classes: list[str]) -> TrainResult:
    from covidlib.models import load_model

    return TrainResult(model_dir, classes, pd.read_csv(model_dir / "history.csv"),
                       load_model(model_dir / "model.keras"), skipped=True)


def _open_run(plan: distribute.Plan, model_dir: Path, full_cfg: dict, classes: list[str],
              overwrite: bool, make_store: Any) -> tuple[bool, TrainResult | None]:
    """:func:`_open_model_dir` on the chief; the other workers then read what it decided."""
    in_progress, finished = False, None
    if plan.is_chief:
        in_progress, finished = _open_model_dir(model_dir, full_cfg, classes, overwrite)
        if finished is None and plan.workers > 1:
            make_store()  # decoded once, by the chief: the other workers open it
    if plan.workers > 1:
        # Nobody reads the run folder before the chief has cleared or resumed it.
        plan.barrier("covidlib-run-folder")
        if not plan.is_chief:
            saved = model_dir / "config.json"
            if not saved.is_file():
                raise FileNotFoundError(f"{saved} not found: every worker must see the run folder "
                                        "the chief writes (RUN_DIR on a shared filesystem)")
            if (model_dir / "done.json").is_file() and _same_run(json.loads(saved.read_text()),
                                                                  full_cfg):
                return False, _finished_result(model_dir, classes)
            in_progress = (model_dir / "backup").exists()
    return in_progress, finished


def _worker_dir(model_dir: Path, plan: distribute.Plan) -> Path:
    """A folder of its own for a worker that is not the chief, starting from the chief's history.

    Its callbacks write there (nothing into the run folder); its copy of ``history.csv`` grows
    with the same rows as the chief's, so its decisions (best epoch, resume) match the chief's
    without reading a file the chief is writing.
    """
    work = Path(tempfile.mkdtemp(prefix=f"covidlib-{model_dir.name}-worker{plan.worker_index}-"))
    if (model_dir / "history.csv").is_file():
        shutil.copy2(model_dir / "history.csv", work / "history.csv")
    return work


def _fit_phases(job: _Fitting, model_dir: Path, cfg: TrainConfig) -> dict[str, int]:
    """Phase 1 (head only when pretrained), then phase 2 (fine-tuning); epochs run in each."""
    pretrained = cfg.weights is not None
    if pretrained:
        set_backbone_trainable(job.model, False)
    end1 = _run_phase(job, model_dir, cfg, 1, 0, cfg.epochs, cfg.learning_rate)
    end = end1
    if pretrained and cfg.fine_tune_epochs > 0:
        top_n = None if cfg.unfreeze == "all" else int(cfg.unfreeze)
        set_backbone_trainable(job.model, True, top_n=top_n)
        # Counted from where phase 1 really ended (early stopping), not from cfg.epochs.
        end = _run_phase(job, model_dir, cfg, 2, end1, end1 + cfg.fine_tune_epochs, cfg.fine_tune_lr)
    return {"1": end1, "2": end - end1}


def _save_outputs(model: keras.Model, model_dir: Path, store: ArrayStore, classes: list[str],
                  cfg: TrainConfig) -> None:
    """Best weights into ``model``, then ``model.keras`` and the val / test predictions."""
    best = model_dir / BEST_WEIGHTS
    if best.is_file():
        load_best_weights(model, best)
    save_model_atomic(model, model_dir / "model.keras")
    for split in ("val", "test"):
        preds = predict_store(model, store, store.split_indices(split), classes)
        atomic_write_text(model_dir / f"predictions_{split}.csv", preds.to_csv(index=False))
        if split == "val" and len(preds) and prediction_collapse(
                preds[[f"p_{c}" for c in classes]].to_numpy()):
            warnings.warn(
                f"{cfg.run_name()}: every validation image gets the same prediction - the model "
                "collapsed to one class. Train longer, lower bn_momentum, or use pretrained weights.",
                UserWarning, stacklevel=3)


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

    With pretrained weights, phase 1 trains the head on the frozen backbone (up to ``epochs``,
    early stopping may end it sooner) and phase 2 fine-tunes at ``fine_tune_lr`` for exactly
    ``fine_tune_epochs`` more. ``history.csv`` has a ``phase`` column. Re-running the same
    configuration on the same data returns the finished run without training again; a run killed
    part-way resumes from its last backup (:class:`BudgetedBackupAndRestore`) and ends with the
    same epochs in each phase.

    With ``cfg.distribute`` the steps run data-parallel (:mod:`covidlib.distribute`): every worker
    calls ``train`` with the same arguments; the chief (task / process 0) prepares and writes
    the run folder - checkpoints, logs, history, predictions and the model - while the others
    write only into a temporary folder of their own, and resume from the chief's backup.
    ``RUN_DIR`` must then be on a filesystem every worker sees.

    Args:
        manifest: rows ``path, label, patient_id, split, modality`` (absolute paths).
        run_dir: the run folder; the model goes to ``run_dir/models/<name>/``.
        cfg: the training configuration.
        cache_dir: where the decoded array store lives (default ``run_dir/cache``).
        overwrite: retrain even when a finished run with this configuration exists.
        verbose: Keras ``fit`` verbosity.
        extra_callbacks: more Keras callbacks, given to every phase's ``fit``.
    """
    # First: multi-worker engines and logical devices are set up before TensorFlow / JAX start
    # (validate() may build a backbone to count its layers).
    plan = distribute.plan(cfg.distribute)
    cfg.validate()
    rows, classes = _training_rows(manifest, cfg)
    run_dir = Path(run_dir)
    model_dir = run_dir / "models" / cfg.run_name()
    full_cfg = {**asdict(cfg), **plan.record(cfg.batch_size), "classes": classes,
                "manifest_sha1": manifest_fingerprint(rows), "keras_version": keras.__version__,
                "backend": keras.backend.backend()}
    cache = Path(cache_dir or (run_dir / "cache"))
    in_progress, finished = _open_run(plan, model_dir, full_cfg, classes, overwrite,
                                      lambda: build_store(rows, cfg.img_size, cache))
    if finished is not None:
        return finished

    store = build_store(rows, cfg.img_size, cache)
    work_dir = model_dir if plan.is_chief else _worker_dir(model_dir, plan)
    try:
        model, phase_epochs = _fit_model(store, classes, cfg, plan, model_dir, work_dir, verbose,
                                         extra_callbacks)
        if plan.is_chief:
            model = _finish_run(model, model_dir, store, classes, cfg, plan, phase_epochs)
    finally:
        if work_dir != model_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    plan.barrier("covidlib-model-saved")  # every worker returns once the model is on disk
    if not plan.is_chief:
        from covidlib.models import load_model

        model = load_model(model_dir / "model.keras")
    history = pd.read_csv(model_dir / "history.csv")
    return TrainResult(model_dir, classes, history, model, resumed=in_progress)


def _fit_model(store: ArrayStore, classes: list[str], cfg: TrainConfig, plan: distribute.Plan,
               model_dir: Path, work_dir: Path, verbose: int | str,
               extra: list | None) -> tuple[keras.Model, dict[str, int]]:
    """Loaders, model and both phases; returns the trained model and the epochs of each phase."""
    tr, va = store.split_indices("train"), store.split_indices("val")
    y_tr, y_va = store.labels(classes, tr), store.labels(classes, va)
    sampling = "balanced" if cfg.imbalance == "balanced_sampling" else "none"
    batch = cfg.batch_size * plan.replicas  # the global batch: the engine splits it
    train_loader = ArrayLoader(store.images, y_tr, len(classes), batch, rows=tr, shuffle=True,
                               seed=cfg.seed, sampling=sampling, **plan.loader_options(True))
    val_loader = ArrayLoader(store.images, y_va, len(classes), batch, rows=va,
                             **plan.loader_options(False))
    if val_loader.pad and len(va) % plan.replicas:
        extra = -len(va) % plan.replicas
        warnings.warn(f"{len(va)} validation images do not split evenly over {plan.replicas} "
                      f"devices: {extra} zero-weight copies fill the last batch; val_loss is "
                      f"scaled by {len(va)}/{len(va) + extra} and the copies count in val_auc / "
                      "val_accuracy (Keras metrics ignore sample weights)", UserWarning,
                      stacklevel=3)
    cw = class_weights(y_tr, len(classes)) if cfg.imbalance == "class_weight" else None

    mixed, jit = precision_policy(cfg)
    jit = jit and not plan.tf_strategy  # as Keras' own "auto": no XLA under tf.distribute
    with mixed_precision_scope(mixed), plan.active():
        config.seed_everything(cfg.seed, deterministic_ops=True)
        with plan.variable_scope():
            model = build_model(cfg.backbone, len(classes), cfg.img_size, weights=cfg.weights,
                                head=cfg.head, dropout=cfg.dropout, augment=cfg.augment,
                                seed=cfg.seed, bn_momentum=cfg.bn_momentum,
                                zero_residual=cfg.zero_init_residual)
        job = _Fitting(model, train_loader, val_loader, cw, len(classes), jit, verbose, extra,
                       plan, work_dir)
        with plan.batchnorm_sync(model):
            phase_epochs = _fit_phases(job, model_dir, cfg)
    return model, phase_epochs


def _single_device_copy(model: keras.Model, plan: distribute.Plan) -> keras.Model:
    """The trained model on one device, outside any distribution (saved and used to predict).

    Only the chief calls it, so it must not need the other workers: reading replicated weights
    does not, and the copy is made with no strategy or distribution in force.
    """
    weights = model.get_weights()
    with plan.host_io():
        copy = keras.models.clone_model(model)
        copy.set_weights(weights)
    return copy


def _finish_run(model: keras.Model, model_dir: Path, store: ArrayStore, classes: list[str],
                cfg: TrainConfig, plan: distribute.Plan,
                phase_epochs: dict[str, int]) -> keras.Model:
    """The chief's end of a run: model, predictions, ``done.json``; returns the saved model."""
    if plan.distributed:
        model = _single_device_copy(model, plan)
    _save_outputs(model, model_dir, store, classes, cfg)
    history = pd.read_csv(model_dir / "history.csv")
    atomic_write_text(model_dir / "done.json",
                      json.dumps({"epochs_run": len(history), "phase_epochs": phase_epochs}))
    shutil.rmtree(model_dir / "backup", ignore_errors=True)  # a finished run resumes nothing
    return model


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    # How the replicas are laid out (one machine or several, auto or named) does not change what
    # is trained; their count and the global batch do.
    ignore = {"keras_version", "distribute", "distribute_mode", "workers"}

    def key(c: dict[str, Any]) -> dict[str, Any]:
        # A run saved before data-parallel training existed ran on one replica.
        base = {"replicas": 1, "global_batch": c.get("batch_size"), "lr_rule": distribute.LR_RULE}
        return {k: v for k, v in {**base, **c}.items() if k not in ignore}

    return key(a) == json.loads(json.dumps(key(b), default=str))


def load_run(model_dir: str | os.PathLike) -> tuple[keras.Model, list[str], dict]:
    """Load a finished run: the model (safe mode), its class order and its configuration.

    Checked before it is trusted (:func:`covidlib.runs.load_model_dir`): labels.json against
    config.json and the model's output, the input size, a damaged archive.
    """
    from covidlib.runs import load_model_dir

    return load_model_dir(model_dir)


def enhanced_manifest(manifest: pd.DataFrame, run_dir: str | os.PathLike, pipeline: str,
                      modality: str, *, workers: int | None = None,
                      progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """The manifest rows of ``modality`` pointing at enhanced copies (made once, then reused).

    Copies live in ``run_dir/enhanced/<modality>/<pipeline>/``; the sources are never touched.
    ``pipeline == "none"`` returns the rows unchanged.
    """
    from covidlib import enhance, enhance_batch

    rows = manifest[manifest["modality"] == modality].reset_index(drop=True)
    cfg = enhance.pipeline_config(pipeline, modality=modality)
    if pipeline == "none":
        return rows, cfg
    dst = Path(run_dir) / "enhanced" / modality / pipeline.replace("+", "_")
    out = enhance_batch.enhance_manifest(rows, dst, pipeline, workers=workers, progress=progress,
                                         modality=modality)
    failed = out.attrs.get("enhance_summary", {}).get("failed") or []
    if failed:
        warnings.warn(f"{len(failed)} images could not be enhanced (see {dst}/enhance_failures.csv)",
                      UserWarning, stacklevel=2)
    return out, cfg


def train_backbone(run_dir: str | os.PathLike, *, manifest: pd.DataFrame | None = None,
                   enhancement: str | None = None, overwrite: bool = False,
                   verbose: int | str = "auto", **config_kwargs: Any) -> TrainResult:
    """Enhance (cached) and train one backbone on ``RUN_DIR/manifest.csv``: notebook 03's step.

    Args:
        run_dir: the run folder holding ``manifest.csv`` (from notebook 01).
        manifest: use this manifest instead of reading ``run_dir/manifest.csv``.
        enhancement: an enhancement pipeline name (see :data:`covidlib.enhance.PIPELINES`);
            default notebook 03's ``ENHANCEMENT``.
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
    if enhancement is None:
        from covidlib.runner import default_parameters

        enhancement = default_parameters("train")["ENHANCEMENT"]
    cfg = TrainConfig(**config_kwargs)
    plan = distribute.plan(cfg.distribute)  # before anything runs on TensorFlow / JAX
    cfg.validate()
    # The chief enhances; the other workers then reuse its copies (same files, same stamps, so
    # every worker fingerprints the same data).
    if plan.is_chief:
        rows, enh_cfg = enhanced_manifest(manifest, run_dir, enhancement, cfg.modality)
    plan.barrier("covidlib-enhanced")
    if not plan.is_chief:
        rows, enh_cfg = enhanced_manifest(manifest, run_dir, enhancement, cfg.modality,
                                          progress=False)
    cfg.enhancement = enh_cfg
    return train(rows, run_dir, cfg, overwrite=overwrite, verbose=verbose)
