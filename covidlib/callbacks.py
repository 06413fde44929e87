"""Training callbacks that cost almost nothing per epoch, and resume with public Keras API only.

:class:`BestWeights` keeps the best weights on the device and writes them with each backup;
:class:`EpochTensorBoard` logs epochs on every backend; :class:`BudgetedBackupAndRestore` saves
weights + optimizer state (``save_weights``) and a small ``state.json`` within a time budget;
:class:`PhaseCSVLogger` adds the training phase to ``history.csv``. None overrides a per-batch
hook: Keras would then fetch every step's logs to the host (a device sync per step).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

import keras

from covidlib.fsutil import atomic_open, atomic_path, atomic_write_text


class BestWeights(keras.callbacks.Callback):
    """Keep the best weights by a monitored metric; write them when it is safe and cheap.

    ``ModelCheckpoint(save_best_only=True)`` writes an HDF5 file on every improvement, most of an
    epoch's overhead on short epochs (BENCHMARKS.md, training loop). Here an improvement copies the
    weights into a second set of variables on the same device; the copy is written (atomically, ``.npz`` of ``model.get_weights()`` order) by :meth:`flush`, which the
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
        self.copies: list | None = None
        self.pending = False

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value):
            return
        if self.sign * float(value) > self.best:
            self.best = self.sign * float(value)
            self.best_epoch = epoch
            self.snapshot()

    def snapshot(self) -> None:
        """Copy the current weights into the best-weights variables (pending a flush)."""
        weights = self.model.weights
        same = self.copies is not None and len(self.copies) == len(weights) and all(
            tuple(c.shape) == tuple(w.shape) for c, w in zip(self.copies, weights))
        if not same:  # first improvement: allocate the copy once (never from w.value: on
            # TensorFlow that would wrap the very same variable, not copy it)
            self.copies = [keras.Variable(keras.ops.zeros(w.shape, w.dtype), trainable=False, name=f"best_{i}")
                           for i, w in enumerate(weights)]
        # assign(ops.copy(w)), not assign(w): on JAX, assign keeps the very array it is given,
        # and on a GPU the next train step donates (deletes) the model's arrays.
        for c, w in zip(self.copies, weights):
            c.assign(keras.ops.copy(w))
        self.pending = True

    def flush(self) -> None:
        """Write the pending best weights, if any."""
        if not self.pending or self.copies is None:
            return
        arrays = [keras.ops.convert_to_numpy(c) for c in self.copies]
        with atomic_open(self.path) as fh:
            np.savez(fh, *arrays)
        self.pending = False

    def on_train_end(self, logs=None):
        self.flush()


class EpochTensorBoard(keras.callbacks.Callback):
    """Epoch metrics as TensorBoard event files, on every Keras backend.

    Writes what Keras' ``TensorBoard`` callback writes with ``write_graph=False`` and no
    histograms: ``log_dir/train`` and ``log_dir/validation`` runs with ``epoch_<metric>`` tags
    (``val_`` metrics go to ``validation``) and ``epoch_learning_rate``. It uses TensorBoard's own
    framework-free writer (``tensorboard.summary.Writer``), far cheaper than the Keras callback's
    eager TensorFlow summary ops (BENCHMARKS.md), and it needs no
    TensorFlow, so JAX / PyTorch runs get logs too.
    """

    def __init__(self, log_dir: str | os.PathLike) -> None:
        super().__init__()
        self.log_dir = Path(log_dir)
        self.writers: dict[str, Any] = {}

    def writer(self, run: str):
        if run not in self.writers:
            from tensorboard.summary import Writer

            self.writers[run] = Writer(str(self.log_dir / run))
        return self.writers[run]

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
            self.writer(run).add_scalar(f"epoch_{name}", value, step=epoch)
        for w in self.writers.values():
            w.flush()

    def on_train_end(self, logs=None):
        for w in self.writers.values():
            w.close()
        self.writers = {}


def load_best_weights(model: keras.Model, path: str | os.PathLike) -> None:
    """Load weights written by :class:`BestWeights` into ``model`` (same architecture)."""
    with np.load(path) as data:
        weights = [data[f"arr_{i}"] for i in range(len(data.files))]
    model.set_weights(weights)


# Public counters of EarlyStopping / ReduceLROnPlateau that their on_train_begin resets: a backup
# keeps them so a resumed run stops and lowers the learning rate where the uninterrupted one would.
_CALLBACK_STATE = ("wait", "best", "best_epoch", "stopped_epoch", "cooldown_counter")


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a callback counter (numpy scalars become Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value


def save_weights_atomic(model: keras.Model, path: Path) -> None:
    """``model.save_weights(path)`` (a ``.weights.h5`` file) so a crash never leaves half a file."""
    with atomic_path(path, suffix=".weights.h5") as tmp:  # Keras insists on the suffix
        model.save_weights(str(tmp))


def _rng_variables(model: keras.Model) -> list:
    """The model's random-generator states (augmentation, dropout): ``variables`` minus ``weights``.

    ``save_weights`` leaves them out; without them a resumed run would draw other augmentations
    and dropout masks than the uninterrupted run did.
    """
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


class BudgetedBackupAndRestore(keras.callbacks.Callback):
    """Epoch-end backups that spend at most ``budget`` of the training time (public Keras API).

    A backup is ``backup_dir/ckpt.weights.h5`` (``model.save_weights``: the weights and, the
    optimizer being built, its state) plus ``backup_dir/state.json``: the epochs completed, whether
    the phase has finished, the random-generator states and the counters of the ``stateful``
    callbacks. Both are written atomically, the weights first: a kill between the two leaves the
    older epoch count, so that epoch is trained again, never skipped. :func:`train` reads the state
    (:func:`read_backup`), loads the weights after compiling and passes ``initial_epoch`` to ``fit``.

    Saving weights and optimizer state every epoch was most of a short epoch's overhead
    (BENCHMARKS.md, "Training loop overhead"). Here an epoch end is backed up only when the training
    time since the last backup is at least ``last backup's cost / budget``; the first epoch of a fit
    always is. A killed run loses at most about ``cost / budget`` of training and still resumes to
    the same number of epochs. ``also_save`` callables run with each backup, inside the same budget
    (:meth:`BestWeights.flush`); :meth:`finish` records the end of a phase. ``io`` gives the
    context a backup is written in (data-parallel training: one worker writes alone, see
    :meth:`covidlib.distribute.Plan.host_io`).

    Only epoch hooks: a batch hook makes Keras treat the callback list as unsafe for asynchronous
    dispatch and fetch every step's logs, a device sync per step (on a GPU the input pipeline then
    stopped overlapping the compute; BENCHMARKS.md, GPU).
    """

    WEIGHTS = "ckpt.weights.h5"
    STATE = "state.json"

    def __init__(self, backup_dir: str | os.PathLike, budget: float = 0.02,
                 also_save: Sequence[Callable[[], None]] = (),
                 stateful: Sequence[keras.callbacks.Callback] = (),
                 io: Callable[[], ContextManager] | None = None) -> None:
        super().__init__()
        self.backup_dir = Path(backup_dir)
        self.io = io or contextlib.nullcontext
        self.budget = float(budget)
        self.also_save = list(also_save)
        # They must come before this callback in the fit's list: their on_train_begin resets the
        # counters that this one's on_train_begin then puts back from ``resume_state``.
        self.stateful = list(stateful)
        self.resume_state: dict | None = None
        self.completed: int | None = None  # epochs completed at the last epoch end (global count)
        self.saved: int | None = None  # ``completed`` at the last backup
        self.cost = 0.0  # seconds the last backup took
        self.trained = 0.0  # seconds of training (epoch begin -> end) since the last backup
        self.epoch_t0: float | None = None

    def on_train_begin(self, logs=None):
        states = (self.resume_state or {}).get("callbacks") or {}
        for cb in self.stateful:
            for attr, value in states.get(type(cb).__name__, {}).items():
                setattr(cb, attr, value)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.completed = epoch + 1
        if self.epoch_t0 is not None:
            # Training time, not wall time: time outside fit (another fit call, a paused
            # notebook) must not make backups more frequent.
            self.trained += time.perf_counter() - self.epoch_t0
        if self.cost <= self.budget * self.trained:
            t0 = time.perf_counter()
            # Early stopping (earlier in the list) may have ended the phase at this epoch: record
            # it, or a resume would train on where the uninterrupted run stopped.
            self.save(finished=bool(getattr(self.model, "stop_training", False)))
            self.cost = time.perf_counter() - t0
            self.trained = 0.0

    def save(self, finished: bool = False) -> None:
        """Back up the model at the last completed epoch (``also_save`` first)."""
        with self.io():
            for save in self.also_save:
                save()
            save_weights_atomic(self.model, self.backup_dir / self.WEIGHTS)
            self.write_state(finished)

    def write_state(self, finished: bool) -> None:
        """Write ``state.json`` for the weights last saved."""
        state = {
            "epoch": self.completed,
            "finished": bool(finished),
            "callbacks": {type(cb).__name__: {a: _plain(getattr(cb, a)) for a in _CALLBACK_STATE
                                              if hasattr(cb, a)} for cb in self.stateful},
            "rng": [keras.ops.convert_to_numpy(v).tolist() for v in _rng_variables(self.model)],
        }
        atomic_write_text(self.backup_dir / self.STATE, json.dumps(state))
        self.saved = self.completed

    def finish(self) -> None:
        """Record that the phase ended (call when ``fit`` returns): a resume goes straight past it."""
        if self.completed is None:
            return
        if self.saved == self.completed:
            self.write_state(finished=True)
        else:
            self.save(finished=True)


def read_backup(backup_dir: str | os.PathLike) -> dict | None:
    """The ``state.json`` of a backup folder, or None when nothing usable was backed up."""
    backup_dir = Path(backup_dir)
    try:
        state = json.loads((backup_dir / BudgetedBackupAndRestore.STATE).read_text())
        state["epoch"] = int(state["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if (backup_dir / BudgetedBackupAndRestore.WEIGHTS).is_file() else None


def restore_backup(model: keras.Model, backup_dir: Path, state: dict) -> None:
    """Load a backup into the compiled model: weights, optimizer state, random-generator states."""
    # load_weights fills optimizer variables only if they exist; fit would create them too late.
    model.optimizer.build(model.trainable_variables)
    model.load_weights(str(backup_dir / BudgetedBackupAndRestore.WEIGHTS))
    rng, saved = _rng_variables(model), state.get("rng") or []
    if len(rng) == len(saved):
        for var, value in zip(rng, saved):
            var.assign(np.asarray(value, dtype=var.dtype))


class PhaseCSVLogger(keras.callbacks.CSVLogger):
    """``CSVLogger`` in append mode with a ``phase`` column (1: first phase, 2: fine-tuning)."""

    def __init__(self, filename: str | os.PathLike, phase: int) -> None:
        super().__init__(str(filename), append=True)
        self.phase = int(phase)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, {**(logs or {}), "phase": self.phase})


def truncate_history(history_csv: Path, keep_before: int) -> None:
    """Drop logged epochs that a resume will run again (backups are not taken every epoch).

    Shared by training and pretraining resumes: their ``CSVLogger`` files have an ``epoch`` column.
    """
    import pandas as pd

    if not history_csv.is_file():
        return
    try:
        h = pd.read_csv(history_csv)
    except pd.errors.EmptyDataError:  # opened by CSVLogger, killed before its first row
        h = pd.DataFrame()
    if "epoch" not in h or not (h["epoch"] < keep_before).any():
        # Nothing kept: CSVLogger then writes a fresh header (an old one may lack a column).
        history_csv.unlink()
    elif (h["epoch"] >= keep_before).any():
        atomic_write_text(history_csv, h[h["epoch"] < keep_before].to_csv(index=False))
