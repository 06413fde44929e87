"""Transfer learning end to end on CPU, without network (issue #11).

A random MobileNetV2 (the smallest ``keras.applications`` backbone of the registry; SmallCNN has
no ImageNet layout) is saved in the layout of Keras' ImageNet ``include_top=False`` weights
(``.weights.h5``) with non-trivial batch-norm statistics, and :func:`covidlib.train.train` fine-tunes from that file on the tiny synthetic CT
set: phase 1 trains the head on the frozen backbone until early stopping ends it, phase 2 fine-tunes
the top layers at ``fine_tune_lr`` for exactly ``fine_tune_epochs``, a kill in phase 2 resumes.

Early stopping is made deterministic by a phase-1 learning rate of 0: the weights, hence the
validation AUC, cannot change, so with ``patience=1`` phase 1 stops after exactly 2 of its 4 epochs.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import keras  # a hard dependency: a broken install must fail, not skip

from covidlib import models, train  # noqa: E402

S = 32
BACKBONE = "MobileNetV2"
EPOCHS, PATIENCE, FT_EPOCHS = 4, 1, 2
PHASE1_EPOCHS = 2  # lr 0: epoch 1 cannot beat epoch 0, and patience 1 stops there
FT_LR = 1e-4
UNFREEZE = 20  # top layers of the backbone (of 154) fine-tuned in phase 2
BATCH = 18  # one batch per epoch: the 18 training images (and the 9 validation ones)


def _cfg(weights: Path | None, **kw) -> train.TrainConfig:
    base = dict(backbone=BACKBONE, img_size=S, epochs=EPOCHS, fine_tune_epochs=FT_EPOCHS,
                batch_size=BATCH, weights=str(weights) if weights else None, learning_rate=0.0,
                fine_tune_lr=FT_LR, unfreeze=UNFREEZE, patience=PATIENCE, augment=False,
                tensorboard=False, seed=0)
    base.update(kw)
    return train.TrainConfig(**base)


def _bns(base: keras.Model) -> list:
    return [l for l in base.layers if isinstance(l, keras.layers.BatchNormalization)]


def _layer_weights(base: keras.Model) -> dict[str, list[np.ndarray]]:
    return {l.name: [np.array(w) for w in l.weights] for l in base.layers if l.weights}


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """A MobileNetV2 no-top weights file as ``weights=<path>`` expects an ImageNet one, and its
    weights per layer."""
    keras.utils.set_random_seed(1)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(S, S, 3))
    rng = np.random.default_rng(0)
    # Statistics far from the (0, 1) init, so that any update in training mode shows.
    for bn in _bns(base):
        bn.moving_mean.assign(rng.normal(0.0, 0.5, bn.moving_mean.shape).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, bn.moving_variance.shape).astype("float32"))
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_notop.weights.h5"
    base.save_weights(path)
    return path, _layer_weights(base)


class Recorder(keras.callbacks.Callback):
    """What the model looked like when each ``fit`` (one per phase) began and ended."""

    def __init__(self) -> None:
        super().__init__()
        self.fits: list[dict] = []

    def _state(self) -> dict:
        base = self.model.get_layer("backbone")
        return {
            "backbone_trainable": base.trainable,
            "trainable_layers": {l.name for l in base.layers if l.trainable and l.weights},
            "trainable_vars": {v.path for v in self.model.trainable_variables},
            "bn_trainable": [bn.trainable for bn in _bns(base)],
            "lr": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "weights": _layer_weights(base),
        }

    def on_train_begin(self, logs=None):
        self.fits.append({"begin": self._state(), "batches": 0})

    def on_train_batch_end(self, batch, logs=None):
        self.fits[-1]["batches"] += 1

    def on_train_end(self, logs=None):
        self.fits[-1]["end"] = self._state()


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory, tiny_ct_manifest_session, backbone_file, kill_after,
                 eager_training):
    """A two-phase run killed in phase 2 (its 2nd epoch), then resumed to the end."""
    run_dir = tmp_path_factory.mktemp("transfer")
    cfg = _cfg(backbone_file[0])
    killed, kill = Recorder(), kill_after(PHASE1_EPOCHS + 2)
    # Eagerly: a few steps cost far less than tracing MobileNetV2's train and test functions.
    with eager_training(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt):
            train.train(tiny_ct_manifest_session, run_dir, cfg, verbose=0,
                        extra_callbacks=[killed, kill])
        d = run_dir / "models" / BACKBONE
        hist_killed = pd.read_csv(d / "history.csv")
        resumed = Recorder()
        result = train.train(tiny_ct_manifest_session, run_dir, cfg, verbose=0,
                             extra_callbacks=[resumed])
    return {"result": result, "killed": killed, "resumed": resumed, "hist_killed": hist_killed,
            "reference": backbone_file[1]}


def test_phase1_trains_the_head_on_a_frozen_backbone_in_inference_mode(transfer_run):
    phase1 = transfer_run["killed"].fits[0]
    ref = transfer_run["reference"]
    begin, end = phase1["begin"], phase1["end"]
    assert begin["backbone_trainable"] is False and not begin["trainable_layers"]
    assert begin["trainable_vars"] == {"predictions/kernel", "predictions/bias"}
    assert begin["lr"] == 0.0
    # Batch-norm in inference mode: the loaded statistics did not move during phase 1.
    for name, arrays in end["weights"].items():
        for got, want in zip(arrays, ref[name]):
            np.testing.assert_array_equal(got, want, err_msg=name)
    # The backbone is called with training=False (keras-io recipe), also after unfreezing.
    cfg = transfer_run["result"].model.get_config()
    node = next(l for l in cfg["layers"] if l["name"] == "backbone")["inbound_nodes"][0]
    assert node["kwargs"].get("training") is False


def test_early_stopping_ends_phase1_and_phase2_runs_exactly_fine_tune_epochs(transfer_run):
    result = transfer_run["result"]
    hist = pd.read_csv(result.model_dir / "history.csv")
    assert list(hist["epoch"]) == list(range(PHASE1_EPOCHS + FT_EPOCHS))
    assert list(hist["phase"]) == [1] * PHASE1_EPOCHS + [2] * FT_EPOCHS
    p1 = hist[hist["phase"] == 1]
    assert p1["val_auc"].nunique() == 1  # lr 0: nothing to improve, so early stopping fired
    done = json.loads((result.model_dir / "done.json").read_text())
    assert done["phase_epochs"] == {"1": PHASE1_EPOCHS, "2": FT_EPOCHS}
    assert done["epochs_run"] == PHASE1_EPOCHS + FT_EPOCHS
    assert result.history.equals(hist)


def test_phase2_fine_tunes_the_top_layers_at_the_low_learning_rate(transfer_run):
    killed, resumed, ref = transfer_run["killed"], transfer_run["resumed"], transfer_run["reference"]
    begin = killed.fits[1]["begin"]
    base_layers = models.build_backbone(BACKBONE, S).layers
    top = {l.name for l in base_layers[-UNFREEZE:]
           if l.weights and not isinstance(l, keras.layers.BatchNormalization)}
    assert begin["backbone_trainable"] is True
    assert begin["trainable_layers"] == top and top
    assert not any(begin["bn_trainable"])
    assert begin["lr"] == pytest.approx(FT_LR)
    hist = pd.read_csv(transfer_run["result"].model_dir / "history.csv")
    p2 = hist[hist["phase"] == 2]
    assert p2["learning_rate"].iloc[0] == pytest.approx(FT_LR)
    assert (p2["learning_rate"] <= FT_LR * (1 + 1e-6)).all()
    assert (hist[hist["phase"] == 1]["learning_rate"] == 0.0).all()
    # At the end of phase 2: the top layers moved, the rest and every batch-norm layer did not.
    end = resumed.fits[-1]["end"]["weights"]
    moved = {n for n in end if any(not np.array_equal(a, b) for a, b in zip(end[n], ref[n]))}
    assert moved and moved <= top


def test_a_kill_in_phase2_resumes_to_exactly_the_planned_epochs(transfer_run):
    result, hist_killed = transfer_run["result"], transfer_run["hist_killed"]
    # Killed in phase 2's second epoch: phase 1 and phase 2's first epoch were logged.
    assert list(hist_killed["epoch"]) == list(range(PHASE1_EPOCHS + 1))
    assert list(hist_killed["phase"]) == [1] * PHASE1_EPOCHS + [2]
    assert result.resumed and not result.skipped
    resumed = transfer_run["resumed"].fits
    assert len(resumed) == 1  # phase 1 was over: only phase 2 was fitted again
    assert resumed[0]["batches"] == FT_EPOCHS - 1  # one batch an epoch: phase 2's last epoch
    assert len(result.history) == PHASE1_EPOCHS + FT_EPOCHS
    assert resumed[0]["begin"]["backbone_trainable"] is True
    assert resumed[0]["begin"]["lr"] <= FT_LR * (1 + 1e-6)
    d = result.model_dir
    assert (d / "model.keras").is_file() and not (d / "backup").exists()
    x = np.random.default_rng(0).uniform(0, 255, (2, S, S, 1)).astype("float32")
    saved = models.load_model(d / "model.keras")
    np.testing.assert_allclose(np.asarray(saved(x, training=False)),
                               np.asarray(result.model(x, training=False)), atol=1e-6)


# ---------------------------------------------------------------- unfreeze validation

@pytest.fixture(scope="module")
def n_layers() -> int:
    """Layers of the MobileNetV2 backbone, what ``unfreeze`` counts."""
    return len(models.build_backbone(BACKBONE, S).layers)


def test_backbone_layer_count_is_what_unfreeze_counts(n_layers):
    assert models.backbone_layer_count(BACKBONE) == n_layers
    assert models.backbone_layer_count("SmallCNN") == len(models.build_backbone("SmallCNN", S).layers)


@pytest.mark.parametrize("bad", [0, -1, "abc", "3", True, False, 2.5, None, "n+1"])
def test_bad_unfreeze_is_refused_by_validate(bad, n_layers, monkeypatch):
    value = n_layers + 1 if bad == "n+1" else bad
    _cfg(None, unfreeze=1).validate()  # counts the layers (once per process)

    def no_build(*a, **k):
        raise AssertionError("validate built the backbone again: the layer count is not cached")

    monkeypatch.setattr(models, "build_backbone", no_build)
    with pytest.raises(ValueError, match="unfreeze") as err:
        _cfg(None, unfreeze=value).validate()
    if isinstance(value, int) and not isinstance(value, bool):
        assert f"1 to {n_layers}" in str(err.value)
    for good in ("all", 1, n_layers):
        _cfg(None, unfreeze=good).validate()


def test_bad_unfreeze_fails_before_any_training_or_enhancement(tiny_ct_manifest, tmp_path,
                                                                monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("work started before the configuration was validated")

    for name in ("build_store", "build_model", "enhanced_manifest"):
        monkeypatch.setattr(train, name, forbidden)
    with pytest.raises(ValueError, match="unfreeze"):
        train.train(tiny_ct_manifest, tmp_path, _cfg("w.weights.h5", unfreeze=0), verbose=0)
    with pytest.raises(ValueError, match="unfreeze"):
        train.train_backbone(tmp_path, manifest=tiny_ct_manifest, enhancement="crop+wb+clahe",
                             backbone=BACKBONE, unfreeze=True)
    assert not (tmp_path / "models").exists()


def test_set_backbone_trainable_refuses_a_top_n_that_would_unfreeze_everything():
    model = models.build_model("SmallCNN", 3, S, weights=None, augment=False)
    n = len(model.get_layer("backbone").layers)
    for bad in (0, -1, n + 1, True):
        with pytest.raises(ValueError, match="top_n"):
            models.set_backbone_trainable(model, True, top_n=bad)
    models.set_backbone_trainable(model, True, top_n=3)  # conv3, bn3 (stays frozen), relu3
    base = model.get_layer("backbone")
    assert [l.name for l in base.layers if l.trainable and l.weights] == ["conv3"]
