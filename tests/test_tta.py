"""Test-time augmentation (issue #16): ``predict_paths(tta=N)``, ``covidlib predict --tta N`` and
the evaluation helpers that re-run a run's saved models on its test split with TTA."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import numpy as np
import pandas as pd
import pytest

import keras  # a hard dependency: a broken install must fail, not skip

from covidlib import cli, evaluate, predict, train  # noqa: E402
from covidlib.models import build_model  # noqa: E402

# Keras' own saving code trips numpy 2's copy-keyword deprecation; not ours to fix.
# A one-epoch model may collapse to one class; the warning says so and is beside the point here.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*collapsed to one class:UserWarning")]

S = 32
CLASSES = ["covid", "cap", "normal"]


def _png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def _symmetric(size: int = S, seed: int = 0) -> np.ndarray:
    """A textured square image, exactly mirror-symmetric left to right."""
    half = np.random.default_rng(seed).integers(20, 235, (size, size // 2), dtype=np.uint8)
    return np.ascontiguousarray(np.hstack([half, half[:, ::-1]]))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained SmallCNN saved as a member without enhancement (inputs go in as read)."""
    keras.utils.set_random_seed(3)
    d = tmp_path_factory.mktemp("run") / "models" / "Small"
    d.mkdir(parents=True)
    train.save_model_atomic(build_model("SmallCNN", len(CLASSES), S, augment=False, seed=3), d / "model.keras")
    (d / "labels.json").write_text(json.dumps(CLASSES))
    (d / "config.json").write_text(json.dumps({"img_size": S, "modality": "ct", "enhancement": "none"}))
    return d


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    for i in range(5):
        _png(root / f"img{i}.png", rng.integers(0, 256, (40 + 4 * i, 48), dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_ct_manifest_session) -> tuple[Path, str]:
    """A tiny run trained for one epoch (SmallCNN, 32 px, no enhancement) on the synthetic CT set."""
    run_dir = tmp_path_factory.mktemp("trained")
    res = train.train_backbone(run_dir, manifest=tiny_ct_manifest_session.copy(), enhancement="none",
                               backbone="SmallCNN", img_size=S, epochs=1, batch_size=18, augment=False,
                               tensorboard=False, seed=0, verbose=0)
    return run_dir, res.model_dir.name


# ------------------------------------------------------------------------------ the views


def test_views_are_the_documented_fixed_list():
    x = np.random.default_rng(0).uniform(0, 255, (2, S, S, 1)).astype(np.float32)
    views = predict.tta_views(x, len(predict.TTA_TRANSFORMS))
    assert len(views) == 10 and predict.TTA_TRANSFORMS[:2] == ("identity", "hflip")
    assert np.array_equal(views[0], x)
    assert np.array_equal(views[1], x[:, :, ::-1])
    d = max(1, round(predict.TTA_SHIFT * S))
    right = views[predict.TTA_TRANSFORMS.index("shift_right")]
    assert np.array_equal(right[:, :, d:], x[:, :, :-d]) and not right[:, :, :d].any()
    up = views[predict.TTA_TRANSFORMS.index("hflip+shift_up")]
    assert np.array_equal(up[:, :-d], x[:, d:, ::-1]) and not up[:, -d:].any()
    assert predict.tta_views(x, 0) == []
    for bad in (-1, 11, 2.5, True):
        with pytest.raises(ValueError, match="tta"):
            predict.tta_views(x, bad)


# ------------------------------------------------------------------------------ predict


def test_tta_off_is_the_plain_table(model_dir, inputs, tmp_path):
    plain = predict.predict_paths(inputs, model_dirs=[model_dir])
    off = predict.predict_paths(inputs, model_dirs=[model_dir], tta=0)
    assert not [c for c in off.columns if "tta" in c] and "tta" not in off.attrs
    a = predict.write_predictions(plain, tmp_path / "a" / "p.csv")
    b = predict.write_predictions(off, tmp_path / "b" / "p.csv")
    assert a.read_bytes() == b.read_bytes()
    assert predict.columns_path(a).read_text() == predict.columns_path(b).read_text()


def test_identity_only_tta_equals_plain_predict(model_dir, inputs):
    plain = predict.predict_paths(inputs, model_dirs=[model_dir], vote="soft")
    one = predict.predict_paths(inputs, model_dirs=[model_dir], vote="soft", tta=1)
    p_cols = [f"Small:p_{c}" for c in CLASSES]
    assert list(one.columns) == list(plain.columns[:-1]) + ["Small:tta_sd", "error"]
    np.testing.assert_array_equal(one[p_cols].to_numpy(), plain[p_cols].to_numpy())
    assert (one["Small:tta_sd"] == 0).all()
    assert list(one["prediction"]) == list(plain["prediction"])


def test_flips_of_a_symmetric_image_give_zero_spread(model_dir, tmp_path):
    img = _symmetric()
    assert np.array_equal(img, img[:, ::-1])
    _png(tmp_path / "in" / "sym.png", img)
    two = predict.predict_paths(tmp_path / "in", model_dirs=[model_dir], tta=2)
    one = predict.predict_paths(tmp_path / "in", model_dirs=[model_dir], tta=1)
    assert two.loc[0, "Small:tta_sd"] == pytest.approx(0.0, abs=1e-6)
    p_cols = [f"Small:p_{c}" for c in CLASSES]
    np.testing.assert_allclose(two[p_cols].to_numpy(), one[p_cols].to_numpy(), atol=1e-6)


def test_tta_sd_column_is_a_spread_in_range_and_described(model_dir, inputs, tmp_path):
    df = predict.predict_paths(inputs, model_dirs=[model_dir], tta=10, batch_size=2)
    ok = df[df["error"] == ""]
    sd = ok["Small:tta_sd"].to_numpy(dtype=float)
    assert len(sd) == 5 and ((sd >= 0) & (sd <= 0.5)).all() and sd.max() > 0
    np.testing.assert_allclose(ok[[f"Small:p_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-5)
    assert df.attrs["tta"]["views"] == list(predict.TTA_TRANSFORMS)
    out = predict.write_predictions(df, tmp_path / "p.csv")
    doc = json.loads(predict.columns_path(out).read_text())
    assert "SD" in doc["columns"]["Small:tta_sd"] and doc["tta"]["n_views"] == 10
    assert "Small:tta_sd" not in doc["probability_columns"]


def test_predict_tta_matches_the_mean_over_views(model_dir):
    from covidlib.models import load_model

    model = load_model(model_dir / "model.keras")
    x = np.random.default_rng(5).uniform(0, 255, (3, S, S, 1)).astype(np.float32)
    mean, sd = predict.predict_tta(model, x, 4, batch_size=2)
    per = np.stack([np.asarray(model.predict_on_batch(v), dtype=np.float64) for v in predict.tta_views(x, 4)])
    np.testing.assert_allclose(mean, per.mean(axis=0), atol=1e-6)
    top = mean.argmax(axis=1)
    np.testing.assert_allclose(sd, per[:, np.arange(3), top].std(axis=0), atol=1e-6)
    with pytest.raises(ValueError, match="at least one view"):
        predict.predict_tta(model, x, 0)


def test_cli_tta_flag_on_a_trained_run(trained_run, tiny_ct_manifest_session, tmp_path, capsys):
    run_dir, name = trained_run
    src = tmp_path / "in"
    test_rows = tiny_ct_manifest_session[tiny_ct_manifest_session["split"] == "test"].head(3)
    for p in test_rows["path"]:
        _png(src / Path(p).name, cv2.imread(p, cv2.IMREAD_GRAYSCALE))
    out = tmp_path / "pred.csv"
    rc = cli.main(["predict", str(src), "--model-dir", str(run_dir / "models" / name), "--out", str(out),
                   "--tta", "3"])
    assert rc == 0, capsys.readouterr().err
    df = pd.read_csv(out, keep_default_na=False)
    assert f"{name}:tta_sd" in df.columns and len(df) == 3
    assert df[f"{name}:tta_sd"].between(0, 0.5).all()
    assert cli.main(["predict", str(src), "--model-dir", str(run_dir / "models" / name),
                     "--out", str(tmp_path / "bad.csv"), "--tta", "11"]) == 2
    assert "tta" in capsys.readouterr().err


# ------------------------------------------------------------------------------ evaluation


def test_tta_split_predictions_identity_reproduces_the_saved_ones(trained_run):
    run_dir, name = trained_run
    d = run_dir / "models" / name
    one = evaluate.tta_split_predictions(d, "test", tta=1)
    saved = pd.read_csv(d / "predictions_test.csv", dtype={"patient_id": str}, keep_default_na=False)
    assert list(one["path"]) == list(saved["path"]) and list(one["label"]) == list(saved["label"])
    p_cols = [f"p_{c}" for c in one.attrs["classes"]]
    np.testing.assert_allclose(one[p_cols].to_numpy(), saved[p_cols].to_numpy(), atol=1e-5)
    assert (one["tta_sd"] == 0).all()
    with pytest.raises(ValueError, match="tta"):
        evaluate.tta_split_predictions(d, "test", tta=0)


def test_evaluate_tta_reports_members_vote_patients_and_the_difference_to_plain(trained_run):
    run_dir, name = trained_run
    ev = evaluate.evaluate_tta(run_dir, [name], tta=4, vote="soft", n_boot=50)
    json.dumps(ev)  # JSON-ready
    assert ev["tta"]["views"] == list(predict.TTA_TRANSFORMS[:4]) and "SD" in ev["tta"]["uncertainty"]
    block = ev["models"][name]
    assert block["patient_level"]["n_patients"] == 3 * 1  # 1 test patient per class in the tiny set
    assert 0 <= block["tta_sd_mean"] <= 0.5
    assert set(block["vs_plain"]) == {"auc_macro", "accuracy"} and block["vs_plain"]["accuracy"]["b"] is not None
    assert ev["ensemble"]["method"] == "soft" and ev["ensemble"]["output"] == "probability"


def test_tta_by_patient_reuses_the_patient_aggregation(trained_run):
    run_dir, name = trained_run
    df = evaluate.tta_split_predictions(run_dir / "models" / name, "test", tta=3)
    classes = df.attrs["classes"]
    pat = evaluate.tta_by_patient(df, classes, method="mean")
    y, p = evaluate.predictions_to_arrays(df, classes)
    pids, yp, pp = evaluate.aggregate_by_patient(p, df["patient_id"], y, method="mean")
    assert list(pat["patient_id"]) == list(pids)
    np.testing.assert_allclose(pat[[f"p_{c}" for c in classes]].to_numpy(), pp)
    assert (pat["n_images"] == 3).all()
    assert (pat["tta_sd_max"] >= pat["tta_sd_mean"]).all()


def test_run_report_tta_step(trained_run):
    from covidlib.report import RunReport

    run_dir, name = trained_run
    rep = RunReport(run_dir, [name], vote_method="soft", n_boot=30)
    table = rep.tta(3)
    assert list(table["model"]) == [f"{name} (TTA)", "soft vote (TTA)"]
    assert table.loc[0, "auc_diff_vs_plain"] is not None or table.loc[0, "auc_macro"] is None
    assert rep.evaluation["tta"]["tta"]["n_views"] == 3
