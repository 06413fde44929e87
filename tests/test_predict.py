"""Tests for covidlib.predict (and the `covidlib predict` command) on a tiny run built here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pandas as pd
import pytest

import keras  # a hard dependency: a broken install must fail, not skip

# Keras' own saving code trips numpy 2's copy-keyword deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

try:
    from malformed import _texture, write_ct_dicom, write_image, write_nifti
except ImportError:  # tests/ made into a package
    from tests.malformed import _texture, write_ct_dicom, write_image, write_nifti

from covidlib import config, ensemble, enhance, predict  # noqa: E402
from covidlib.arraystore import square_resize  # noqa: E402
from covidlib.models import build_model, load_model  # noqa: E402
from covidlib.train import save_model_atomic  # noqa: E402

S = 32
CLASSES = ["covid", "cap", "normal"]
NAMES = ["SmallA", "SmallB", "SmallC"]
REPO = Path(__file__).resolve().parents[1]


def _save_member(model_dir: Path, model, classes=CLASSES, **cfg) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    save_model_atomic(model, model_dir / "model.keras")
    (model_dir / "labels.json").write_text(json.dumps(classes))
    (model_dir / "config.json").write_text(json.dumps({"img_size": S, "modality": "ct", **cfg}))


def make_run(root: Path, method: str = "hard") -> Path:
    """RUN_DIR with three SmallCNN members (one trained on crop+wb+clahe images) and an ensemble."""
    keras.utils.set_random_seed(0)
    models = {n: build_model("SmallCNN", len(CLASSES), S, augment=True, seed=i) for i, n in enumerate(NAMES)}
    for i, (name, m) in enumerate(models.items()):
        extra = {"enhancement": enhance.pipeline_config("crop+wb+clahe", "ct")} if i == 0 else {"enhancement": "none"}
        _save_member(root / "models" / name, m, **extra)
    # Runs predict must leave alone: an ablation run and an X-ray model.
    _save_member(root / "models" / "ablation_ct_none", models[NAMES[0]])
    _save_member(root / "models" / "xray_SmallCNN", models[NAMES[0]], modality="xray")
    ens = ensemble.build_ensemble_model(models, method)
    ens_dir = root / "models" / "ensemble"
    save_model_atomic(ens, ens_dir / "model.keras")
    (ens_dir / "labels.json").write_text(json.dumps(CLASSES))
    (ens_dir / "config.json").write_text(json.dumps(
        {"method": method, "members": NAMES, "weights": None, "img_size": S,
         "output": ensemble.output_kind(method), "calibrated": False}))
    return root


def write_inputs(folder: Path) -> dict[str, Path]:
    """A PNG, a CT DICOM, a 3-slice NIfTI, a corrupt PNG and a text file, in nested folders."""
    files = {
        "png": write_image(folder / "a" / "scan.png", _texture(48, seed=3)),
        "dcm": write_ct_dicom(folder / "b" / "slice.dcm",
                              np.linspace(-1000, 400, 40 * 40).reshape(40, 40), intercept=-1024.0),
        "nii": write_nifti(folder / "c" / "vol.nii.gz",
                           np.random.default_rng(1).uniform(-1000, 300, (24, 24, 3))),
    }
    files["bad"] = folder / "a" / "broken.png"
    files["bad"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    files["txt"] = folder / "a" / "notes.txt"
    files["txt"].write_text("not an image")
    return files


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def predicted(run_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    files = write_inputs(root / "data")
    missing = root / "does_not_exist.png"
    cams = root / "gradcam"
    with pytest.warns(UserWarning, match="other types"):
        df = predict.predict_paths([root / "data", missing], run_dir, gradcam_dir=cams, batch_size=4)
    return df, files, missing, cams


def _cols(df, prefix):
    return [f"{prefix}:p_{c}" for c in CLASSES]


def _score_cols():
    return [f"vote:score_{c}" for c in CLASSES]


def test_rows_keys_and_errors(predicted):
    df, files, missing, _ = predicted
    by_path = df.set_index("path")
    assert str(files["png"]) in by_path.index
    assert str(files["dcm"]) in by_path.index
    assert [f"{files['nii']}#z{k:04d}" for k in range(3)] == [p for p in df["path"] if "vol.nii.gz" in p]
    # Unreadable inputs: a row each with the reason, no probabilities; never dropped.
    for bad in (files["bad"], missing):
        row = by_path.loc[str(bad)]
        assert row["error"], bad
        assert row[_score_cols() + ["vote:votes", "vote:agreement"]].isna().all()
    assert "not found" in by_path.loc[str(missing), "error"]
    assert len(df) == 1 + 1 + 3 + 2
    assert df.attrs["skipped"] == [str(files["txt"])]
    assert df.attrs["members"] == NAMES and df.attrs["vote"] == "hard"
    # ablation_* and X-ray runs are not members.
    assert not any(c.startswith(("ablation", "xray")) for c in df.columns)


def test_probabilities_and_vote(predicted):
    df, *_ = predicted
    ok = df[df["error"] == ""]
    assert len(ok) == 5
    members = [ok[_cols(df, n)].to_numpy(dtype=float) for n in NAMES]
    for p in members:
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    vote = ensemble.combine(members, "hard")
    np.testing.assert_allclose(ok[_score_cols()].to_numpy(dtype=float), vote, atol=1e-12)
    assert list(ok["prediction"]) == [config.display_name(CLASSES[i]) for i in vote.argmax(axis=1)]


def test_hard_vote_publishes_scores_votes_and_agreement_not_probabilities(predicted):
    """Issue #11: the hard vote's score is a ranking score; it never gets a p_ name."""
    df, *_ = predicted
    assert not [c for c in df.columns if c.startswith("vote:p_")]
    assert list(df.columns[2:7]) == _score_cols() + ["vote:votes", "vote:agreement"]
    ok = df[df["error"] == ""]
    members = [ok[_cols(df, n)].to_numpy(dtype=float) for n in NAMES]
    winner = ok[_score_cols()].to_numpy(dtype=float).argmax(axis=1)
    tops = np.stack([m.argmax(axis=1) for m in members])
    np.testing.assert_array_equal(ok["vote:votes"].to_numpy(dtype=int), (tops == winner).sum(axis=0))
    assert (ok["vote:votes"] >= 1).all()  # three members, three classes: the winner has a vote
    np.testing.assert_allclose(ok["vote:agreement"].to_numpy(dtype=float),
                               ok["vote:votes"].to_numpy(dtype=float) / 3)
    assert df.attrs["vote_output"] == "score"
    cols = df.attrs["columns"]
    assert list(cols) == list(df.columns)
    assert "not a probability" in cols["vote:score_covid"]
    assert "uncalibrated" in cols[f"{NAMES[0]}:p_covid"]
    text = predict.format_table(df)
    assert "/3 votes" in text and "NOT probabilities" in text


def test_written_csv_says_which_columns_are_probabilities(predicted, tmp_path):
    df, *_ = predicted
    out = predict.write_predictions(df, tmp_path / "pred.csv")
    back = pd.read_csv(out, keep_default_na=False)
    assert list(back.columns) == list(df.columns)
    assert back.loc[back["error"] == "", "vote:votes"].astype(int).between(1, 3).all()
    assert (back.loc[back["error"] != "", "vote:votes"] == "").all()  # not NaN / 2.0
    doc = json.loads(predict.columns_path(out).read_text())
    assert predict.columns_path(out).name == "pred.csv.columns.json"
    assert doc["vote"] == "hard" and doc["vote_output"] == "score" and doc["csv"] == "pred.csv"
    assert doc["score_columns"] == _score_cols()
    assert doc["probability_columns"] == [c for n in NAMES for c in _cols(df, n)]
    assert doc["calibrated_columns"] == []
    assert set(doc["columns"]) == set(df.columns)


def test_member_sees_its_training_preparation(predicted, run_dir):
    """Member 0 was trained on crop+wb+clahe images: predict applies it, then square_resize."""
    df, files, *_ = predicted
    from covidlib.images import read_image

    img = read_image(files["png"])
    for name, enh in ((NAMES[0], True), (NAMES[1], False)):
        prep = enhance.enhance(img, "crop+wb+clahe", modality="ct") if enh else img
        x = square_resize(prep, S).astype(np.float32)[None, ..., None]
        model = load_model(run_dir / "models" / name / "model.keras")
        expect = np.asarray(model.predict_on_batch(x))[0]
        got = df.set_index("path").loc[str(files["png"]), _cols(df, name)].to_numpy(dtype=float)
        np.testing.assert_allclose(got, expect, atol=1e-6)


def test_gradcam_files(predicted):
    df, _, _, cams = predicted
    ok = df[df["error"] == ""]
    cols = [f"gradcam_{n}" for n in NAMES] + ["gradcam_vote"]
    assert set(cols) <= set(df.columns)
    paths = ok[cols].to_numpy().ravel()
    assert len(set(paths)) == len(paths) == 5 * 4
    for p in paths:
        assert Path(p).is_file() and Path(p).parent == cams and Path(p).stat().st_size > 100
    assert (df.loc[df["error"] != "", cols].isna() | (df.loc[df["error"] != "", cols] == "")).all().all()


def test_vote_override_and_weighted_needs_weights(run_dir, tmp_path):
    png = write_image(tmp_path / "x.png", _texture(40, seed=5))
    df = predict.predict_paths(png, run_dir, vote="soft")
    members = [df[_cols(df, n)].to_numpy(dtype=float) for n in NAMES]
    np.testing.assert_allclose(df[_cols(df, "vote")].to_numpy(dtype=float), np.mean(members, axis=0), atol=1e-12)
    assert df.attrs["vote"] == "soft" and "gradcam_vote" not in df.columns
    # The soft vote is a probability: p_ names, no score columns; votes / agreement as for hard.
    assert df.attrs["vote_output"] == "probability"
    assert not [c for c in df.columns if c.startswith("vote:score_")]
    winner = np.mean(members, axis=0).argmax(axis=1)
    assert df.loc[0, "vote:votes"] == sum(int(m.argmax(axis=1)[0] == winner[0]) for m in members)
    assert "uncalibrated" in df.attrs["columns"]["vote:p_covid"]
    assert "p=" in predict.format_table(df)
    with pytest.raises(ValueError, match="weighted vote needs weights"):
        predict.predict_paths(png, run_dir, vote="weighted")


def test_find_members(run_dir, tmp_path):
    assert list(predict.find_members(run_dir)) == NAMES
    # Without an ensemble config: every CT model folder except ablation_* runs.
    bare = tmp_path / "bare" / "models"
    for name, modality in (("B", "ct"), ("A", "ct"), ("ablation_ct_x", "ct"), ("xray_A", "xray")):
        (bare / name).mkdir(parents=True)
        (bare / name / "model.keras").write_bytes(b"")
        (bare / name / "config.json").write_text(json.dumps({"modality": modality, "img_size": S}))
    assert list(predict.find_members(bare.parent)) == ["A", "B"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict.find_members(tmp_path / "nothing")
    with pytest.raises(ValueError, match="run_dir"):
        predict.find_members()


def test_class_order_must_agree(run_dir, tmp_path):
    other = tmp_path / "Reordered"
    model = load_model(run_dir / "models" / NAMES[1] / "model.keras")
    _save_member(other, model, classes=["normal", "cap", "covid"])
    png = write_image(tmp_path / "x.png", _texture(40))
    with pytest.raises(ValueError, match="disagree on the class order"):
        predict.predict_paths(png, model_dirs=[run_dir / "models" / NAMES[0], other])


def test_lambda_model_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "code_ran.txt"
    fn = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), x)[1]")  # noqa: S307
    inp = keras.Input((S, S, 1), name="image")
    x = keras.layers.Lambda(fn, name="evil")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    evil_dir = tmp_path / "run" / "models" / "Evil"
    _save_member(evil_dir, keras.Model(inp, out))
    marker.unlink()  # building the model traced the lambda once
    png = write_image(tmp_path / "x.png", _texture(40))

    with pytest.raises(ValueError, match="refusing to load .*Lambda"):
        load_model(evil_dir / "model.keras")
    with pytest.raises(ValueError, match="refusing to load"):
        predict.predict_paths(png, tmp_path / "run")
    assert not marker.exists()
    # The check is meaningful: without safe mode the file's code does run on load.
    keras.saving.load_model(evil_dir / "model.keras", safe_mode=False)
    assert marker.read_text() == "ran"


def test_cli_predict_writes_csv(run_dir, tmp_path):
    png = write_image(tmp_path / "in" / "x.png", _texture(40, seed=2))
    (tmp_path / "in" / "junk.jpg").write_bytes(b"")
    out = tmp_path / "pred.csv"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "covidlib", "predict", str(tmp_path / "in"),
                          "--run-dir", str(run_dir), "--out", str(out), "--vote", "soft"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    df = pd.read_csv(out, keep_default_na=False)
    assert list(df["path"]) == [str(tmp_path / "in" / "junk.jpg"), str(png)]
    assert df.loc[0, "error"] and not df.loc[1, "error"]
    assert df.loc[1, "prediction"] in {config.display_name(c) for c in CLASSES}
    assert "soft vote of SmallA, SmallB, SmallC" in res.stdout
    assert "1 unreadable" in res.stdout and "could not be read" in res.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pred.csv")]
    assert "vote:p_covid" in df.columns and "uncalibrated probabilities" in res.stdout
    doc = json.loads((tmp_path / "pred.csv.columns.json").read_text())
    assert doc["vote_output"] == "probability" and doc["score_columns"] == []
