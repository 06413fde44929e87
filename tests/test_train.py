"""Tests for covidlib.train: collapse detection, a saved run, skip, resume and determinism.

Every run is SmallCNN at 32 px on the tiny synthetic CT set (train 18 / val 9 / test 9 images);
batch_size 9 divides both splits, so each Keras step function is traced once.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

import keras  # a hard dependency: a broken install must fail, not skip

from covidlib import callbacks, models, train  # noqa: E402
from covidlib.arraystore import build_store, square_resize  # noqa: E402
from covidlib.images import read_image, to_uint8  # noqa: E402

S = 32
CLASSES = ["covid", "cap", "normal"]


def _cfg(**kw) -> train.TrainConfig:
    base = dict(backbone="SmallCNN", img_size=S, epochs=2, batch_size=9, tensorboard=False, seed=0)
    base.update(kw)
    return train.TrainConfig(**base)


def _probs(df: pd.DataFrame) -> np.ndarray:
    return df[[f"p_{c}" for c in CLASSES]].to_numpy()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_ct_manifest_session):
    """One finished 2-epoch SmallCNN run (augmentation on, the default), shared read-only."""
    run_dir = tmp_path_factory.mktemp("run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a possible collapse warning is not what these tests check
        result = train.train(tiny_ct_manifest_session, run_dir, _cfg(), verbose=0)
    return run_dir, result


# ---------------------------------------------------------------- prediction_collapse

def test_prediction_collapse_constant_vs_varied():
    constant = np.tile([0.2, 0.5, 0.3], (10, 1))
    assert train.prediction_collapse(constant)
    jitter = constant + np.random.default_rng(0).normal(0, 0.005, constant.shape)
    assert train.prediction_collapse(jitter)
    varied = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])
    assert not train.prediction_collapse(varied)
    # Same winning class but confidences spread widely: a model that ranks, not a collapse.
    same_class = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.6, 0.3, 0.1]])
    assert not train.prediction_collapse(same_class)
    assert not train.prediction_collapse(constant[:1])


def test_mobilenetv2_with_keras_bn_momentum_collapses(tiny_ct_manifest, tmp_path):
    """The trap: from scratch, Keras' momentum 0.999 leaves the moving statistics at their init.

    Measured (32-48 px, 2-3 epochs, batch 9 or 18, seeds 0-4): momentum 0.999 gave constant
    outputs (std 0.000) every time. The library default 0.5 moves the moving means ~100x further
    but did NOT reliably avoid a collapse in so tiny a budget (collapsed in 5 of 7 runs), so only
    the 0.999 side is asserted. Eager mode: tracing MobileNetV2 costs more than these 2 steps.
    """
    store = build_store(tiny_ct_manifest, S, tmp_path / "cache")
    tr, va = store.split_indices("train"), store.split_indices("val")
    x_tr = store.images[tr][..., None].astype("float32")
    y_tr = np.eye(3, dtype="float32")[store.labels(CLASSES, tr)]
    keras.utils.set_random_seed(0)
    model = models.build_model("MobileNetV2", 3, S, augment=False, bn_momentum=None)
    bns = [l for l in models.walk_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    assert {l.momentum for l in bns} == {0.999}
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", run_eagerly=True)
    model.fit(x_tr, y_tr, batch_size=18, epochs=2, shuffle=True, verbose=0)
    probs = np.asarray(model(store.images[va][..., None].astype("float32"), training=False))
    assert train.prediction_collapse(probs)
    moved = np.mean([np.abs(np.asarray(l.moving_mean)).mean() for l in bns])
    assert moved < 0.01  # the statistics barely left their initial zeros


# ---------------------------------------------------------------- a finished run

def test_train_writes_a_complete_run(finished_run, tiny_ct_manifest_session):
    run_dir, result = finished_run
    d = result.model_dir
    assert d == run_dir / "models" / "SmallCNN"
    assert not result.skipped and not result.resumed
    for name in ("model.keras", "labels.json", "config.json", "history.csv",
                 "predictions_val.csv", "predictions_test.csv", "done.json"):
        assert (d / name).is_file(), name
    assert json.loads((d / "labels.json").read_text()) == CLASSES == result.classes
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["backbone"] == "SmallCNN" and cfg["img_size"] == S and cfg["seed"] == 0
    assert cfg["enhancement"] == {"name": "none"}
    assert cfg["zero_init_residual"] is True  # the from-scratch recipe is recorded with the run
    assert len(cfg["manifest_sha1"]) == 40
    hist = pd.read_csv(d / "history.csv")
    assert len(hist) == 2 and {"loss", "val_loss", "val_auc"} <= set(hist.columns)
    assert list(hist["epoch"]) == [0, 1]
    assert list(hist["phase"]) == [1, 1]  # from scratch: one phase
    done = json.loads((d / "done.json").read_text())
    assert done == {"epochs_run": 2, "phase_epochs": {"1": 2, "2": 0}}
    man = tiny_ct_manifest_session
    for split in ("val", "test"):
        pred = pd.read_csv(d / f"predictions_{split}.csv", dtype={"patient_id": str})
        assert list(pred.columns) == ["path", "patient_id", "label"] + [f"p_{c}" for c in CLASSES]
        want = man[man["split"] == split]
        assert sorted(pred["path"]) == sorted(want["path"])
        truth = dict(zip(want["path"], want["label"]))
        assert all(truth[p] == lab for p, lab in zip(pred["path"], pred["label"]))
        np.testing.assert_allclose(_probs(pred).sum(axis=1), 1.0, atol=1e-5)
    assert not (d / "backup" / "phase1").exists()  # BackupAndRestore cleaned up after itself


def test_saved_model_reproduces_test_predictions(finished_run):
    _, result = finished_run
    pred = pd.read_csv(result.model_dir / "predictions_test.csv")
    model = models.load_model(result.model_dir / "model.keras")
    # Decode the images independently of the store: catches a row / path mix-up too.
    x = np.stack([square_resize(to_uint8(read_image(p)), S) for p in pred["path"]])[..., None]
    got = np.asarray(model(x.astype("float32"), training=False))
    np.testing.assert_allclose(got, _probs(pred), atol=1e-5)
    # Not a trivial match: the model tells images apart.
    assert np.ptp(got, axis=0).max() > 1e-6


def test_predict_store_keeps_the_order_of_rows(finished_run, tiny_ct_manifest_session):
    run_dir, result = finished_run
    store = build_store(tiny_ct_manifest_session, S, run_dir / "cache")  # the run's own store
    ref = pd.read_csv(result.model_dir / "predictions_test.csv").set_index("path")
    rows = store.split_indices("test")[::-1].copy()  # not ascending
    out = train.predict_store(result.model, store, rows, CLASSES, batch_size=4)
    assert list(out["path"]) == list(store.index["path"].to_numpy()[rows])
    np.testing.assert_allclose(_probs(out), _probs(ref.loc[out["path"]]), atol=1e-5)


def test_same_config_is_skipped_without_training(finished_run, tiny_ct_manifest_session,
                                                 monkeypatch):
    run_dir, result = finished_run
    stamp = (result.model_dir / "model.keras").stat().st_mtime_ns

    def no_build(*a, **k):
        raise AssertionError("a finished identical run must not be rebuilt")

    monkeypatch.setattr(train, "build_model", no_build)
    again = train.train(tiny_ct_manifest_session, run_dir, _cfg(), verbose=0)
    assert again.skipped
    assert (result.model_dir / "model.keras").stat().st_mtime_ns == stamp
    assert len(again.history) == 2
    x = np.zeros((1, S, S, 1), "float32")
    np.testing.assert_allclose(np.asarray(again.model(x)), np.asarray(result.model(x)), atol=1e-6)


def test_changed_config_or_data_is_not_skipped(finished_run, tiny_ct_manifest_session, tmp_path,
                                               monkeypatch):
    run_dir, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)

    class Rebuilt(Exception):
        pass

    def sentinel(*a, **k):
        raise Rebuilt

    monkeypatch.setattr(train, "build_model", sentinel)
    with pytest.raises(Rebuilt):
        train.train(tiny_ct_manifest_session, copy, _cfg(seed=1), verbose=0)
    shutil.rmtree(copy)
    shutil.copytree(run_dir, copy)
    fewer = tiny_ct_manifest_session.iloc[1:]  # one training image less
    with pytest.raises(Rebuilt):
        train.train(fewer, copy, _cfg(), verbose=0)


class _BatchCounter(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


def test_killed_run_resumes_to_the_planned_epochs(finished_run, tiny_ct_manifest_session, tmp_path,
                                                 kill_after):
    cfg = _cfg()  # the finished run's configuration: augmentation and dropout on
    # 18 training images / batch 9 = 2 batches per epoch: the 3rd batch is in epoch 2.
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_ct_manifest_session, tmp_path, cfg, verbose=0,
                    extra_callbacks=[kill_after(3)])
    d = tmp_path / "models" / "SmallCNN"
    assert len(pd.read_csv(d / "history.csv")) == 1
    assert callbacks.read_backup(d / "backup" / "phase1")["epoch"] == 1
    assert not (d / "done.json").exists() and not (d / "model.keras").exists()
    counter = _BatchCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train.train(tiny_ct_manifest_session, tmp_path, cfg, verbose=0,
                             extra_callbacks=[counter])
    assert result.resumed and not result.skipped
    assert counter.batches == 2  # only epoch 2 was trained again
    hist = pd.read_csv(d / "history.csv")
    assert len(hist) == cfg.epochs
    assert list(hist["epoch"]) == [0, 1] and list(hist["phase"]) == [1, 1]
    assert (d / "model.keras").is_file() and (d / "done.json").is_file()
    assert not (d / "backup").exists()  # nothing left to resume
    # Weights, optimizer state (Adam moments and step), random-generator states (augmentation,
    # dropout), the shuffling order and the callbacks' counters came back: the resumed run trained
    # exactly as the uninterrupted one did.
    ref = pd.read_csv(finished_run[1].model_dir / "history.csv")
    for col in ("loss", "val_loss", "val_auc", "learning_rate"):
        np.testing.assert_array_equal(hist[col].to_numpy(), ref[col].to_numpy(), err_msg=col)
    ref_pred = pd.read_csv(finished_run[1].model_dir / "predictions_test.csv")
    np.testing.assert_array_equal(_probs(pd.read_csv(d / "predictions_test.csv")), _probs(ref_pred))


def _back_up_every_epoch(monkeypatch) -> None:
    init = callbacks.BudgetedBackupAndRestore.__init__

    def every_epoch(self, backup_dir, budget=0.02, **kw):
        init(self, backup_dir, budget=1e9, **kw)

    monkeypatch.setattr(callbacks.BudgetedBackupAndRestore, "__init__", every_epoch)


@pytest.mark.parametrize("kill_at", [5, 7])
def test_a_kill_keeps_the_early_stopping_decision_and_the_fine_tune_epochs(
        tiny_ct_manifest, tmp_path, monkeypatch, kill_after, eager_training, kill_at):
    """Pretrained two-phase run: phase 1 stops early at the same epoch whether or not a kill
    interrupted it, and phase 2 then runs exactly ``fine_tune_epochs``."""
    weights = tmp_path / "smallcnn.weights.h5"
    models.build_backbone("SmallCNN", S).save_weights(weights)
    _back_up_every_epoch(monkeypatch)
    # Learning rate 0 in phase 1: the validation AUC cannot beat epoch 0's, so patience 2 stops
    # phase 1 after its epoch 2 (3 of 6 epochs); phase 2 is epochs 3 and 4.
    cfg = _cfg(augment=False, weights=str(weights), epochs=6, patience=2, learning_rate=0.0,
               fine_tune_epochs=2, fine_tune_lr=1e-3, unfreeze=3)
    # 2 batches an epoch. Batch 5 is in epoch 2 (early stopping has waited 1 epoch, the fresh
    # callback of a resume would wait 2 more); batch 7 is phase 2's first.
    with eager_training(), pytest.raises(KeyboardInterrupt):
        train.train(tiny_ct_manifest, tmp_path, cfg, verbose=0, extra_callbacks=[kill_after(kill_at)])
    d = tmp_path / "models" / "SmallCNN"
    state = callbacks.read_backup(d / "backup" / "phase1")
    if kill_at == 5:
        assert state["epoch"] == 2 and not state["finished"]
        assert state["callbacks"]["EarlyStopping"]["wait"] == 1
    else:
        assert state["epoch"] == 3 and state["finished"]
        assert list(pd.read_csv(d / "history.csv")["phase"]) == [1, 1, 1]
    counter = _BatchCounter()
    with eager_training(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train.train(tiny_ct_manifest, tmp_path, cfg, verbose=0, extra_callbacks=[counter])
    hist = pd.read_csv(d / "history.csv")
    assert list(hist["phase"]) == [1, 1, 1, 2, 2]
    assert list(hist["epoch"]) == [0, 1, 2, 3, 4]
    assert counter.batches == (2 if kill_at == 5 else 0) + 2 * 2
    assert json.loads((d / "done.json").read_text())["phase_epochs"] == {"1": 3, "2": 2}
    assert result.resumed


def test_same_seed_gives_identical_predictions(finished_run, tiny_ct_manifest_session, tmp_path):
    run_dir, result = finished_run
    first = pd.read_csv(result.model_dir / "predictions_test.csv")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)  # same cache, same folder layout; the shared run stays intact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = train.train(tiny_ct_manifest_session, copy, _cfg(), verbose=0, overwrite=True)
    assert not again.skipped
    second = pd.read_csv(again.model_dir / "predictions_test.csv")
    assert list(second["path"]) == list(first["path"])
    np.testing.assert_array_equal(_probs(second), _probs(first))
    h1 = pd.read_csv(result.model_dir / "history.csv")
    h2 = pd.read_csv(again.model_dir / "history.csv")
    np.testing.assert_array_equal(h1["loss"].to_numpy(), h2["loss"].to_numpy())


def test_train_rejects_bad_input(tiny_ct_manifest, tmp_path):
    with pytest.raises(ValueError, match="unknown backbone"):
        train.train(tiny_ct_manifest, tmp_path, _cfg(backbone="VGG"), verbose=0)
    with pytest.raises(ValueError, match="no 'xray' images"):
        train.train(tiny_ct_manifest, tmp_path, _cfg(modality="xray"), verbose=0)
    no_val = tiny_ct_manifest[tiny_ct_manifest["split"] != "val"]
    with pytest.raises(ValueError, match="no 'val' images"):
        train.train(no_val, tmp_path, _cfg(), verbose=0)
    one_class = tiny_ct_manifest[tiny_ct_manifest["label"] == "covid"]
    with pytest.raises(ValueError, match="two classes"):
        train.train(one_class, tmp_path, _cfg(), verbose=0)


def test_budgeted_backups_resume_without_duplicate_epochs(tiny_ct_manifest, tmp_path, monkeypatch,
                                                          kill_after, eager_training):
    """Backups skipped to save time: a resume re-runs the unsaved epochs and logs each once."""
    init = callbacks.BudgetedBackupAndRestore.__init__

    def tiny_budget(self, backup_dir, budget=0.02, **kw):
        init(self, backup_dir, budget=1e-12, **kw)  # only the first epoch is ever backed up

    monkeypatch.setattr(callbacks.BudgetedBackupAndRestore, "__init__", tiny_budget)
    cfg = _cfg(augment=False, epochs=4, patience=100)
    # 2 batches per epoch: the 7th batch is in epoch 3, after epochs 0-2 were logged.
    with eager_training(), pytest.raises(KeyboardInterrupt):
        train.train(tiny_ct_manifest, tmp_path, cfg, verbose=0, extra_callbacks=[kill_after(7)])
    d = tmp_path / "models" / "SmallCNN"
    assert len(pd.read_csv(d / "history.csv")) == 3
    assert callbacks.read_backup(d / "backup" / "phase1")["epoch"] == 1
    # the best weights went to disk with the (only) backup, so they belong to the kept history
    assert (d / train.BEST_WEIGHTS).is_file()
    counter = _BatchCounter()
    with eager_training(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train.train(tiny_ct_manifest, tmp_path, cfg, verbose=0, extra_callbacks=[counter])
    assert result.resumed
    assert counter.batches == 6  # epochs 1, 2, 3 trained (again)
    hist = pd.read_csv(d / "history.csv")
    assert list(hist["epoch"]) == [0, 1, 2, 3] and list(hist["phase"]) == [1, 1, 1, 1]


def test_best_weights_keeps_the_best_epoch_and_writes_only_on_flush(tmp_path):
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2, name="d")(inp))
    path = tmp_path / "best.weights.npz"
    cb = callbacks.BestWeights(path, monitor="val_auc", mode="max", initial_value_threshold=0.55)
    cb.set_model(model)
    kernels = {}
    for epoch, auc in enumerate([0.5, 0.7, 0.9, 0.8, float("nan")]):
        model.get_layer("d").kernel.assign(np.full((3, 2), float(epoch), "float32"))
        kernels[epoch] = np.asarray(model.get_layer("d").kernel)
        cb.on_epoch_end(epoch, {"val_auc": auc})
        assert not path.exists()  # improvements stay in memory until a flush
    assert cb.best_epoch == 2  # 0.5 is below the threshold a resumed run starts from
    cb.on_train_end()
    fresh = keras.Model(inp, keras.layers.Dense(2, name="d")(inp))
    callbacks.load_best_weights(fresh, path)
    np.testing.assert_array_equal(np.asarray(fresh.get_layer("d").kernel), kernels[2])
    mtime = path.stat().st_mtime_ns
    cb.flush()  # nothing pending: no rewrite
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="mode"):
        callbacks.BestWeights(path, mode="maximum")


def test_epoch_tensorboard_writes_train_and_validation_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    cb = callbacks.EpochTensorBoard(tmp_path / "logs")
    cb.set_model(model)
    for epoch in range(3):
        cb.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1), "val_loss": 2.0 + epoch, "val_auc": 0.5})
    cb.on_train_end()

    def read(run):
        acc = EventAccumulator(str(tmp_path / "logs" / run))
        acc.Reload()
        return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
                for tag in acc.Tags()["tensors"]}

    tr, va = read("train"), read("validation")
    assert [v for _, v in tr["epoch_loss"]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [s for s, _ in tr["epoch_loss"]] == [0, 1, 2]
    assert tr["epoch_learning_rate"][0][1] == pytest.approx(0.01)
    assert [v for _, v in va["epoch_loss"]] == pytest.approx([2.0, 3.0, 4.0])
    assert "epoch_auc" in va and "epoch_val_auc" not in va


def test_backup_budget_counts_training_time_only(tmp_path, monkeypatch):
    class Clock:
        t = 0.0

        def perf_counter(self):
            return self.t

    clock = Clock()
    monkeypatch.setattr(callbacks, "time", clock)
    cb = callbacks.BudgetedBackupAndRestore(tmp_path / "b", budget=0.05)
    saved = []

    def fake_save(finished=False):
        saved.append(cb.completed - 1)
        clock.t += 0.09  # each backup costs 0.09 s: at 5 % it needs 1.8 s of training in between

    cb.save = fake_save
    for epoch in range(7):
        cb.on_epoch_begin(epoch)
        clock.t += 1.0  # one second of training
        cb.on_epoch_end(epoch)
        clock.t += 100.0  # long pauses outside training (other fits, a notebook idle) do not count
    assert saved == [0, 2, 4, 6]


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
@pytest.mark.parametrize("tensorboard", [False, True])
def test_callbacks_keep_keras_asynchronous_step_dispatch(tmp_path, tensorboard, phase):
    # A callback with a batch-end hook makes Keras fetch every step's logs to the host (a device
    # sync per step): on a GPU the loader then stops overlapping the compute. Ours use epoch hooks.
    import keras
    from keras.src import utils as kutils

    cfg = _cfg(tensorboard=tensorboard)
    cbs = train._callbacks(tmp_path / "m", cfg, phase, None)
    # phase 2 runs exactly fine_tune_epochs: early stopping belongs to phase 1 only
    stops = [cb for cb in cbs if isinstance(cb, keras.callbacks.EarlyStopping)]
    assert len(stops) == (phase == "phase1")
    for cb in cbs:
        for hook in ("on_batch_end", "on_train_batch_end", "on_test_batch_end"):
            assert kutils.is_default(getattr(type(cb), hook)), f"{type(cb).__name__}.{hook} is overridden"
    if keras.src.backend.IS_THREAD_SAFE:
        cl = keras.callbacks.CallbackList(cbs, add_history=True, add_progbar=False)
        assert cl._async_train and cl._async_test


def test_backup_restores_weights_optimizer_and_random_state(tmp_path):
    """A backup is public-API files (``ckpt.weights.h5`` + ``state.json``) that bring back the
    weights, Adam's moments and step count, and the dropout generator's state."""

    def model_and_data():
        keras.utils.set_random_seed(0)
        inp = keras.Input((4,))
        out = keras.layers.Dense(3, activation="softmax")(keras.layers.Dropout(0.5)(inp))
        model = keras.Model(inp, out)
        model.compile(keras.optimizers.Adam(0.01), "categorical_crossentropy")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 4)).astype("float32")
        return model, x, np.eye(3, dtype="float32")[rng.integers(0, 3, 8)]

    model, x, y = model_and_data()
    cb = callbacks.BudgetedBackupAndRestore(tmp_path / "b", budget=1e9)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False, callbacks=[cb])
    cb.finish()
    state = callbacks.read_backup(tmp_path / "b")
    assert state["epoch"] == 2 and state["finished"] and len(state["rng"]) == 1
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["ckpt.weights.h5", "state.json"]
    model.fit(x, y, batch_size=4, initial_epoch=2, epochs=3, verbose=0, shuffle=False)

    fresh, _, _ = model_and_data()
    callbacks.restore_backup(fresh, tmp_path / "b", state)
    assert int(fresh.optimizer.iterations.numpy()) == 4
    fresh.fit(x, y, batch_size=4, initial_epoch=2, epochs=3, verbose=0, shuffle=False)
    for a, b in zip(fresh.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fresh.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_and_models_use_only_public_keras_api():
    """Issue #12: no private attribute, no BackupAndRestore internals (they change between releases)."""
    import re
    from pathlib import Path

    for mod in (train, models):
        src = Path(mod.__file__).read_text()
        assert not re.findall(r"\._[a-z]\w*", src), mod.__name__
        assert "training_metadata" not in src and "keras.src" not in src, mod.__name__


def test_train_config_defaults_are_notebook_03s():
    """The library's defaults are the notebook's: one place, so the two cannot disagree."""
    import dataclasses

    from covidlib.runner import default_parameters

    nb = default_parameters("train")
    cfg = train.TrainConfig()
    mirrored = {f.name for f in dataclasses.fields(train.TrainConfig)} & {k.lower() for k in nb}
    assert {"backbone", "img_size", "epochs", "learning_rate", "weights", "seed"} <= mirrored
    mirrored.discard("enhancement")  # the config records the pipeline applied, not its name
    for name in mirrored:
        assert getattr(cfg, name) == nb[name.upper()], name


def test_missing_weights_file_is_refused_before_any_work(tmp_path):
    """A WEIGHTS path that does not exist fails in validate(), before images are enhanced."""
    with pytest.raises(FileNotFoundError, match="nothing.weights.h5"):
        train.TrainConfig(weights=str(tmp_path / "nothing.weights.h5")).validate()


def test_mixed_precision_scope_restores_the_callers_policy_even_on_error():
    # Training and pretraining both run inside it: a notebook kernel keeps its own policy after.
    mixed_precision_scope = train.mixed_precision_scope
    assert keras.mixed_precision.global_policy().name == "float32"
    with mixed_precision_scope(False):
        assert keras.mixed_precision.global_policy().name == "float32"
    with pytest.raises(RuntimeError):
        with mixed_precision_scope(True):
            assert keras.mixed_precision.global_policy().name == "mixed_float16"
            raise RuntimeError("a failed fit")
    assert keras.mixed_precision.global_policy().name == "float32"
