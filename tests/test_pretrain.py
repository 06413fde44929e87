"""Self-supervised (SimSiam) pretraining, offline, on tiny synthetic CT slices (issue 16).

One module-scoped pretraining of a SmallCNN at 32 px on the tiny CT manifest's train rows feeds
the tests of the record, the output file, the WEIGHTS folder and the transfer path; resume, the
command line (a folder with an unreadable file) and notebook 03's step pretrain again, each
for 1-3 short epochs.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import keras

from covidlib import cli, models, pretrain, runner, train

S = 32
PROJ = 32  # projector width: 1/sqrt(32) = 0.177 is a healthy z_std
FAST = dict(backbone="SmallCNN", img_size=S, proj_dim=PROJ, batch_size=6, learning_rate=0.3,
            jit_compile="off", mixed_precision="off")
EPOCHS = 3


class Recorder(keras.callbacks.Callback):
    """Epochs begun, and the backbone's weights when ``fit`` ended."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[int] = []
        self.final: list[np.ndarray] | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)

    def on_train_end(self, logs=None):
        self.final = [np.array(w) for w in self.model.backbone.get_weights()]


class KillAtEpochEnd(keras.callbacks.Callback):
    """Raise ``KeyboardInterrupt`` at the end of epoch ``epoch`` (after the backup was written)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt(f"simulated kill after epoch {epoch}")


@pytest.fixture(autouse=True, scope="module")
def eager_pretraining():
    """Pretraining fits run eagerly: a few steps cost less than tracing SimSiam's train step.
    The traced path runs in the objective's own test."""
    build = pretrain._build

    def eager(*args, **kwargs):
        model = build(*args, **kwargs)
        model.run_eagerly = True
        return model

    patch = pytest.MonkeyPatch()
    patch.setattr(pretrain, "_build", eager)
    yield
    patch.undo()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_ct_manifest_session):
    """SmallCNN pretrained on the 18 train images: (weights file, record, recorder)."""
    out_dir = tmp_path_factory.mktemp("pretrain")
    rec = Recorder()
    out = _quiet(pretrain.pretrain_backbone, tiny_ct_manifest_session, out_dir, epochs=EPOCHS,
                 verbose=0, callbacks=[rec], **FAST)
    return out, pretrain.read_record(out), rec


# ---------------------------------------------------------------- the objective


def test_simsiam_loss_falls_while_the_outputs_stay_spread(tiny_ct_manifest_session, tmp_path):
    """The objective itself, on mild views (strong ones need far more steps than a test has)."""
    from covidlib.arraystore import build_store
    from covidlib.simsiam import ImageBatches, SimSiam

    rows = tiny_ct_manifest_session[tiny_ct_manifest_session["split"] == "train"]
    images = build_store(rows, S, tmp_path).images
    keras.utils.set_random_seed(0)
    mild = dict(min_area=0.8, rotation=0.0, contrast=0.1, brightness=0.05, blur=0.0, noise=0.0)
    model = SimSiam(models.build_backbone("SmallCNN", S), "unit", proj_dim=PROJ, seed=0, augment=mild)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    hist = model.fit(ImageBatches(images, 6), epochs=10, verbose=0).history
    loss, std = hist["loss"], hist["z_std"]
    assert np.mean(loss[-2:]) < np.mean(loss[:2]) - 0.15, loss
    # SimSiam's collapse monitor: near 1/sqrt(d) when healthy, 0 when collapsed
    assert min(std) > 0.8 / math.sqrt(PROJ), std


def test_pretraining_records_loss_and_a_healthy_collapse_monitor(pretrained):
    _, record, _ = pretrained
    loss = [h["loss"] for h in record["history"]]
    std = [h["z_std"] for h in record["history"]]
    assert [h["epoch"] for h in record["history"]] == list(range(EPOCHS))
    assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in loss)  # a negative cosine
    assert record["z_std_healthy"] == pytest.approx(1 / math.sqrt(PROJ))
    assert min(std) > 0.5 / math.sqrt(PROJ) and not record["collapsed"], std


def test_views_are_random_crops_of_the_same_image_in_training_only():
    from covidlib.simsiam import ViewAugment

    x = np.random.default_rng(0).uniform(0, 255, (4, S, S, 1)).astype("float32")
    views = ViewAugment(seed=1)
    np.testing.assert_array_equal(np.asarray(views(x, training=False)), x)
    a, b = np.asarray(views(x, training=True)), np.asarray(views(x, training=True))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 255
    assert not np.allclose(a, b) and not np.allclose(a, x)  # two draws, two different views


def test_the_loss_stops_the_gradient_at_z():
    """No gradient reaches ``z`` through the loss (SimSiam's collapse guard), only ``p``."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("reads gradients with TensorFlow's GradientTape")
    import tensorflow as tf

    from covidlib.simsiam import SimSiam

    model = SimSiam(models.build_backbone("SmallCNN", S), "unit", proj_dim=PROJ)
    rng = np.random.default_rng(0)
    outs = {k: tf.Variable(rng.normal(size=(4, PROJ)).astype("float32")) for k in ("z1", "z2", "p1", "p2")}
    with tf.GradientTape() as tape:
        loss = model.compute_loss(y_pred=dict(outs))
    grads = dict(zip(outs, tape.gradient(loss, list(outs.values()))))
    assert grads["z1"] is None and grads["z2"] is None
    assert float(tf.reduce_sum(tf.abs(grads["p1"]))) > 0 and float(tf.reduce_sum(tf.abs(grads["p2"]))) > 0


def test_negative_cosine_and_collapse_monitor():
    from covidlib.simsiam import collapse_std, negative_cosine

    z = np.random.default_rng(0).normal(size=(256, 64)).astype("float32")
    assert float(negative_cosine(z, 3 * z)) == pytest.approx(-1.0, abs=1e-5)
    assert float(negative_cosine(z, -z)) == pytest.approx(1.0, abs=1e-5)
    assert float(collapse_std(z)) == pytest.approx(1 / 8, rel=0.1)  # ~1/sqrt(d)
    assert float(collapse_std(np.ones_like(z) + 1e-3 * z)) < 0.01  # collapsed


# ---------------------------------------------------------------- the output file


def test_output_file_and_record(pretrained, tiny_ct_manifest_session):
    out, record, _ = pretrained
    assert out.name == "SmallCNN.weights.h5" and out.is_file()
    assert (out.parent / "SmallCNN.pretrain.json").is_file()
    assert not (out.parent / ".SmallCNN.pretrain").exists()  # the backup is gone once finished
    n_train = int((tiny_ct_manifest_session["split"] == "train").sum())
    assert record["n_images"] == n_train == 18  # only train rows: val / test never seen
    assert record["record"]["splits"] == ["train"]
    assert {"objective", "backbone", "img_size", "epochs", "history", "keras_version",
            "unreadable", "batchnorm_recalibrated_on"} <= set(record)
    assert record["objective"] == "simsiam" and record["img_size"] == S
    assert record["batchnorm_recalibrated_on"] == n_train


def test_weights_load_through_build_backbone_from_file_and_folder(pretrained):
    out, _, rec = pretrained
    for weights in (out, out.parent):
        base = models.build_backbone("SmallCNN", S, weights=str(weights))
        loaded = {w.path: np.array(w) for w in base.weights}
        trained = dict(zip([w.path for w in base.weights], rec.final))
        for path, value in loaded.items():
            if "moving_" in path:
                continue  # recomputed on the clean images after training
            np.testing.assert_array_equal(value, trained[path], err_msg=path)
    fresh = models.build_backbone("SmallCNN", S)
    assert not np.allclose(fresh.get_layer("conv0").kernel, base.get_layer("conv0").kernel)


def test_batchnorm_statistics_are_those_of_the_clean_images(pretrained, tiny_ct_manifest_session,
                                                            tmp_path):
    """Recalibrated after training: the first batch-norm's moving mean is the mean of conv0's
    output over the un-augmented train images (equal batches, so the mean of the batch means)."""
    from covidlib.arraystore import build_store

    out, _, _ = pretrained
    rows = tiny_ct_manifest_session[tiny_ct_manifest_session["split"] == "train"]
    x = np.asarray(build_store(rows, S, tmp_path).images, dtype="float32")[..., None]
    base = models.build_backbone("SmallCNN", S, weights=str(out))
    conv0 = keras.Model(base.inputs, base.get_layer("conv0").output)
    want = np.asarray(conv0(models.BackbonePreprocess("unit")(x))).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(np.array(base.get_layer("bn0").moving_mean), want, rtol=1e-4, atol=1e-6)


def test_weights_folder_errors_name_the_file_expected(pretrained, tmp_path):
    out, _, _ = pretrained
    with pytest.raises(FileNotFoundError, match=r"has no MobileNetV2\.weights\.h5 .*--backbone MobileNetV2"):
        models.build_backbone("MobileNetV2", S, weights=str(out.parent))
    with pytest.raises(ValueError, match=r"pretrained at 32 px .* takes 48 px"):
        models.build_backbone("SmallCNN", 48, weights=str(out))
    # a file of another backbone put under this backbone's name: the record says whose it is
    shutil.copy(out, tmp_path / "MobileNetV2.weights.h5")
    shutil.copy(out.parent / "SmallCNN.pretrain.json", tmp_path / "MobileNetV2.pretrain.json")
    with pytest.raises(ValueError, match=r"holds SmallCNN weights .* not MobileNetV2"):
        models.build_backbone("MobileNetV2", S, weights=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="or a folder of"):
        models.build_backbone("SmallCNN", S, weights=str(tmp_path / "nothing.weights.h5"))


def test_transfer_path_trains_from_a_pretrained_folder(pretrained, tiny_ct_manifest_session,
                                                       tmp_path, eager_training):
    """WEIGHTS=<folder>: phase 1 on the frozen pretrained backbone, then phase 2 fine-tunes."""
    out, _, _ = pretrained
    ref = {w.path: np.array(w) for w in models.build_backbone("SmallCNN", S, weights=str(out)).weights}
    cfg = train.TrainConfig(backbone="SmallCNN", img_size=S, epochs=1, fine_tune_epochs=1,
                            batch_size=18, weights=str(out.parent), augment=False,
                            tensorboard=False, fine_tune_lr=1e-3)

    class Phases(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_end(self, logs=None):
            base = self.model.get_layer("backbone")
            self.ends.append({w.path: np.array(w) for w in base.weights})

    phases = Phases()
    with eager_training():
        result = _quiet(train.train, tiny_ct_manifest_session, tmp_path, cfg, verbose=0,
                        extra_callbacks=[phases])
    assert list(result.history["phase"]) == [1, 2]
    for path, value in phases.ends[0].items():  # phase 1: the backbone did not move
        np.testing.assert_array_equal(value, ref[path], err_msg=path)
    assert any(not np.array_equal(v, ref[p]) for p, v in phases.ends[1].items())


def test_mobilenetv2_output_matches_the_keras_applications_layout(tiny_ct_manifest_session, tmp_path):
    """The backbone nested in the SimSiam model saves in the layout of an ImageNet no-top file.

    Saved through the same step as a finished run (batch-norm recalibration, weights, record),
    without the fit: the SmallCNN tests cover it, and MobileNetV2's steps are slow on a CPU.
    """
    from covidlib.arraystore import build_store

    cfg = pretrain.PretrainConfig(**{**FAST, "backbone": "MobileNetV2"})
    images = build_store(tiny_ct_manifest_session, S, tmp_path / "cache").images
    model = pretrain._build(cfg, steps=1, jit=False)
    out = tmp_path / "w" / "MobileNetV2.weights.h5"
    pretrain._save(model, cfg, images, out, tmp_path / "no-work", {"n_images": len(images)})
    assert pretrain.read_record(out)["batchnorm_recalibrated_on"] == len(images)
    base = models.build_backbone("MobileNetV2", S, weights=str(out.parent))
    plain = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(S, S, 3))
    plain.load_weights(out)  # the layout of an ImageNet no-top file
    assert len(base.weights) == len(plain.weights) == len(model.backbone.weights)
    for a, b, c in zip(base.weights, plain.weights, model.backbone.weights):
        np.testing.assert_array_equal(np.array(a), np.array(b))
        np.testing.assert_array_equal(np.array(a), np.array(c))


# ---------------------------------------------------------------- resume, reuse


def test_resume_after_a_kill_continues_to_the_same_weights(tiny_ct_manifest_session, tmp_path):
    kw = dict(epochs=3, verbose=0, **FAST)
    whole = Recorder()
    _quiet(pretrain.pretrain_backbone, tiny_ct_manifest_session, tmp_path / "a", callbacks=[whole], **kw)
    with pytest.raises(KeyboardInterrupt):
        _quiet(pretrain.pretrain_backbone, tiny_ct_manifest_session, tmp_path / "b",
               callbacks=[KillAtEpochEnd(0)], **kw)
    backup = tmp_path / "b" / ".SmallCNN.pretrain" / "backup"
    assert json.loads((backup / "state.json").read_text())["epoch"] == 1
    assert not (tmp_path / "b" / "SmallCNN.weights.h5").exists()
    resumed = Recorder()
    out = _quiet(pretrain.pretrain_backbone, tiny_ct_manifest_session, tmp_path / "b",
                 callbacks=[resumed], **kw)
    assert resumed.epochs == [1, 2]  # epoch 0 was not trained again
    for a, b in zip(whole.final, resumed.final):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    hist_a = pretrain.read_record(tmp_path / "a" / "SmallCNN.weights.h5")["history"]
    hist_b = pretrain.read_record(out)["history"]
    assert [h["epoch"] for h in hist_b] == [0, 1, 2]
    np.testing.assert_allclose([h["loss"] for h in hist_b], [h["loss"] for h in hist_a], atol=1e-5)


def test_a_finished_identical_run_is_reused(pretrained, tiny_ct_manifest_session, monkeypatch):
    out, _, _ = pretrained

    def no_fit(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(pretrain, "_fit", no_fit)
    again = _quiet(pretrain.pretrain_backbone, tiny_ct_manifest_session, out.parent, epochs=EPOCHS,
                   verbose=0, **FAST)
    assert again == out
    with pytest.raises(AssertionError, match="trained again"):  # another configuration trains
        _quiet(pretrain.pretrain_backbone, tiny_ct_manifest_session, out.parent, epochs=EPOCHS + 1,
               verbose=0, **FAST)


# ---------------------------------------------------------------- inputs


def test_manifest_csv_keeps_train_rows_only(tiny_ct_root, tmp_path):
    csv = tiny_ct_root / "labels.csv"  # relative paths, all three splits
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    rows, unreadable, notes = pretrain.collect_images([csv], work_dir=tmp_path)
    want = [str((tiny_ct_root / p).resolve()) for p in table.loc[table["split"] == "train", "path"]]
    assert sorted(map(str, rows["path"])) == sorted(want) and len(want) == 18
    assert not unreadable and any("18 of 36 rows" in n for n in notes)
    every, _, _ = pretrain.collect_images([csv], splits=None, work_dir=tmp_path)
    assert len(every) == len(table)
    no_split = tmp_path / "paths.csv"
    table[["path"]].assign(path=[str(tiny_ct_root / p) for p in table["path"]]).to_csv(no_split, index=False)
    rows, _, notes = pretrain.collect_images([no_split], work_dir=tmp_path)
    assert len(rows) == len(table) and any("no 'split' column" in n for n in notes)


def test_folder_volumes_become_slices_in_the_cache_not_in_the_source(tmp_path):
    try:
        from malformed import write_nifti
    except ImportError:  # tests/ turned into a package
        from tests.malformed import write_nifti

    src = tmp_path / "scans"
    hu = np.random.default_rng(0).uniform(-1000, 400, (40, 40, 3))
    write_nifti(src / "patient1" / "ct.nii.gz", hu)
    (src / "patient1" / "broken.nii.gz").write_bytes(b"not a volume")
    before = sorted(p.name for p in src.rglob("*"))
    rows, unreadable, _ = pretrain.collect_images([src], work_dir=tmp_path / "cache")
    assert len(rows) == 3 and all(Path(p).suffix == ".png" for p in rows["path"])
    assert all((tmp_path / "cache") in Path(p).parents for p in rows["path"])
    assert [Path(u["path"]).name for u in unreadable] == ["broken.nii.gz"]
    assert sorted(p.name for p in src.rglob("*")) == before  # the source is only read


def test_cli_pretrains_a_folder_and_reports_an_unreadable_file(tiny_ct_root, tmp_path, capsys):
    src = tmp_path / "unlabelled"
    for i, png in enumerate(sorted((tiny_ct_root / "train").rglob("*.png"))[:8]):
        (src / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(png, src / f"sub{i % 2}" / f"{i}.png")
    (src / "broken.png").write_bytes(b"not an image at all")
    (src / "notes.txt").write_text("not an image")
    parser = cli.build_parser()
    out = tmp_path / "weights"
    args = parser.parse_args(["pretrain", str(src), "--out", str(out), "--backbone", "SmallCNN",
                              "--img-size", str(S), "--epochs", "1", "--batch-size", "4",
                              "--lr", "0.1", "--quiet"])
    assert args.splits == ["train"] and args.seed is None  # None: notebook 03 SEED when run
    with pytest.warns(UserWarning, match=r"1 of 9 file\(s\) could not be read.*broken\.png"):
        assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert str(out / "SmallCNN.weights.h5") in printed and "1 unreadable file" in printed
    record = pretrain.read_record(out / "SmallCNN.weights.h5")
    assert record["n_images"] == 8
    assert [Path(u["path"]).name for u in record["unreadable"]] == ["broken.png"]
    assert any("not images" in n for n in record["notes"])  # notes.txt was skipped, and said so


def test_cli_passes_every_option_through(monkeypatch, tmp_path, capsys):
    seen = {}
    weights = tmp_path / "w" / "DenseNet121.weights.h5"

    def fake(sources, out, **kw):
        seen.update(sources=sources, out=out, **kw)
        return weights

    monkeypatch.setattr(pretrain, "pretrain_backbone", fake)
    monkeypatch.setattr(pretrain, "read_record", lambda _: {
        "backbone": "DenseNet121", "img_size": 64, "n_images": 5, "epochs": 2, "history": [],
        "z_std_healthy": 0.044, "unreadable": []})
    parser = cli.build_parser()
    args = parser.parse_args(["pretrain", "a", "b.csv", "--out", "w", "--backbone", "DenseNet121",
                              "--img-size", "64", "--epochs", "2", "--batch-size", "8", "--lr", "0.2",
                              "--seed", "3", "--init-weights", "imagenet", "--splits", "all",
                              "--modality", "ct", "--cache-dir", "c", "--overwrite"])
    assert args.func(args) == 0
    assert seen == dict(sources=["a", "b.csv"], out="w", splits=None, modality="ct", cache_dir="c",
                        overwrite=True, verbose="auto", allow_inside_input=False,
                        backbone="DenseNet121", img_size=64, epochs=2, batch_size=8,
                        learning_rate=0.2, seed=3, init_weights="imagenet")
    assert f"--weights {weights.parent}" in capsys.readouterr().out


@pytest.mark.parametrize("change, error", [
    ({"backbone": "ResNet18"}, "unknown backbone 'ResNet18'"),
    ({"img_size": 16}, "img_size must be an integer >= 32"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"batch_size": 1}, "batch_size must be an integer >= 2"),
    ({"learning_rate": 0}, "learning_rate must be a number > 0"),
    ({"learning_rate": float("nan")}, "learning_rate must be a number > 0"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"mixed_precision": "yes"}, "mixed_precision must be 'auto', 'on' or 'off'"),
    ({"init_weights": "imagenet"}, "SmallCNN has no ImageNet weights"),
    ({"init_weights": "missing.weights.h5"}, "does not exist"),
    ({"splits": ["training"]}, "splits must be a non-empty list from"),
    ({"modality": "mri"}, "modality must be one of"),
    ({"out": "model.h5"}, "expected a folder or a file name ending in .weights.h5"),
    ({"sources": ["nowhere"]}, "source nowhere does not exist"),
    ({"sources": []}, "no sources given"),
    ({"out": "SRC/inside"}, "lies inside the input folder"),
])
def test_bad_arguments_are_refused_before_any_work(change, error, tmp_path, monkeypatch):
    import covidlib.arraystore

    def forbidden(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    for target, name in ((covidlib.arraystore, "build_store"), (pretrain, "collect_images"),
                         (pretrain, "_fit")):
        monkeypatch.setattr(target, name, forbidden)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SRC").mkdir()
    kw = {"sources": ["SRC"], "out": "out", "epochs": 1, **FAST, **change}
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        pretrain.pretrain_backbone(kw.pop("sources"), kw.pop("out"), **kw)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- notebook 03's step


def test_notebook_step_pretrains_the_run_train_split(tiny_ct_manifest_session, tmp_path, capsys):
    from covidlib.datasets import write_manifest

    write_manifest(tiny_ct_manifest_session, tmp_path / "manifest.csv")
    kw = dict(backbone="SmallCNN", enhancement="none", img_size=S, batch_size=6, seed=0)
    assert pretrain.pretrain_for_run(tmp_path, epochs=0, weights=None, **kw) is None
    assert not (tmp_path / "pretrain").exists()
    weights = _quiet(pretrain.pretrain_for_run, tmp_path, epochs=1, weights=None, verbose=0, **kw)
    assert Path(weights) == (tmp_path / "pretrain").resolve()
    record = pretrain.read_record(Path(weights) / "SmallCNN.weights.h5")
    assert record["n_images"] == 18 and record["record"]["modality"] == "ct"
    assert "pretrained SmallCNN (SimSiam, 18 unlabelled train images" in capsys.readouterr().out
    with pytest.raises(ValueError, match="PRETRAIN_EPOCHS must be an integer >= 0"):
        pretrain.pretrain_for_run(tmp_path, epochs=-1, **kw)


def test_notebook_step_defaults_are_notebook_03s(tmp_path, monkeypatch):
    """Unset arguments take notebook 03's parameters, so pretraining sees the images, size and
    batch its training will (the library has no second copy of those defaults)."""
    from covidlib import runner, train
    from covidlib.datasets import write_manifest

    write_manifest(pd.DataFrame({"path": ["a.png"], "label": ["covid"], "split": ["train"],
                                 "patient_id": ["p"], "source": ["s"], "modality": ["ct"]}),
                   tmp_path / "manifest.csv")
    seen = {}

    def stop(rows, run_dir, enhancement, modality, **_):
        seen["enhancement"] = enhancement
        raise RuntimeError("stop")

    monkeypatch.setattr(train, "enhanced_manifest", stop)
    with pytest.raises(RuntimeError, match="stop"):
        pretrain.pretrain_for_run(tmp_path, backbone="SmallCNN", epochs=1)
    assert seen["enhancement"] == runner.default_parameters("train")["ENHANCEMENT"]
    assert pretrain.pretrain_for_run(tmp_path, backbone="SmallCNN") is None  # PRETRAIN_EPOCHS 0


def test_runner_checks_the_new_parameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    defaults = runner.notebook_parameters(runner.notebooks_dir() / runner.NOTEBOOKS["train"])
    assert defaults["PRETRAIN_EPOCHS"] == 0
    with pytest.raises(ValueError, match=r"PRETRAIN_EPOCHS=-1: expected an integer >= 0"):
        runner.plan({"PRETRAIN_EPOCHS": -1})
    (tmp_path / "pretrained").mkdir()
    steps = runner.plan({"PRETRAIN_EPOCHS": 2, "WEIGHTS": "pretrained"})  # a folder is accepted
    assert steps[2][2]["PRETRAIN_EPOCHS"] == 2


BACKEND_CHILD = r"""
import json, os, sys, warnings
warnings.simplefilter("ignore")
import keras
from covidlib import models, pretrain
from covidlib.datasets import read_manifest
from covidlib.synthetic import write_synthetic_dataset

tmp = sys.argv[1]
m = read_manifest(write_synthetic_dataset(os.path.join(tmp, "data"), n_patients=3,
                                          slices_per_patient=2, size=48))
out = pretrain.pretrain_backbone(m, os.path.join(tmp, "w"), backbone="SmallCNN", img_size=32,
                                 epochs=2, batch_size=4, proj_dim=32, learning_rate=0.1, verbose=0)
models.build_backbone("SmallCNN", 32, weights=os.path.join(tmp, "w"))
print("RESULT " + json.dumps({"backend": keras.backend.backend(), **pretrain.read_record(out)}))
"""


@pytest.mark.slow
def test_pretraining_runs_on_the_torch_backend(tmp_path):
    """``compute_loss`` is the only hook used: the same code fits on PyTorch (JAX was checked by
    hand: compiling the SimSiam step with XLA on a CPU is too slow for the suite)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("torch") is None:
        pytest.skip("the torch package is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "KERAS_BACKEND": "torch", "KERAS_HOME": str(tmp_path / "keras_home"),
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    proc = subprocess.run([sys.executable, "-c", BACKEND_CHILD, str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert res["backend"] == "torch" and res["n_images"] == 6
    assert [h["epoch"] for h in res["history"]] == [0, 1]
    assert all(math.isfinite(h["loss"]) and h["z_std"] > 0.5 / math.sqrt(32) for h in res["history"])
