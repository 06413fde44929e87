"""Tests for covidlib.report.evaluate_run on a tiny fake run: what the vote's outputs are (issue #11).

The run is built here: three SmallCNN members saved untrained (only ``models/ensemble/`` is built
from them) with synthetic saved predictions on the tiny CT data set, plus an X-ray phase-1 run's
predictions for the cascade.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pandas as pd
import pytest

import keras  # a hard dependency: a broken install must fail, not skip

# Keras' own saving code trips numpy 2's copy-keyword deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

from covidlib import report  # noqa: E402
from covidlib.models import build_model, load_model  # noqa: E402
from covidlib.train import save_model_atomic  # noqa: E402

S = 32
CLASSES = ["covid", "cap", "normal"]
NAMES = ["SmallA", "SmallB", "SmallC"]
FAST = dict(n_boot=20, gradcam_images=0)


def _predictions(rows: pd.DataFrame, classes: list[str], rng: np.random.Generator) -> pd.DataFrame:
    """Informative but noisy softmax outputs for ``rows`` (label, path, patient_id)."""
    y = rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    z = rng.normal(size=(len(rows), len(classes)))
    z[np.arange(len(rows)), y] += 1.5
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    out = rows[["path", "patient_id", "label"]].reset_index(drop=True)
    for j, c in enumerate(classes):
        out[f"p_{c}"] = p[:, j]
    return out


def _write_model_dir(d: Path, classes: list[str], val: pd.DataFrame, test: pd.DataFrame,
                     model=None, modality: str = "ct") -> None:
    d.mkdir(parents=True, exist_ok=True)
    if model is not None:
        save_model_atomic(model, d / "model.keras")
    (d / "labels.json").write_text(json.dumps(classes))
    (d / "config.json").write_text(json.dumps({"img_size": S, "modality": modality}))
    val.to_csv(d / "predictions_val.csv", index=False)
    test.to_csv(d / "predictions_test.csv", index=False)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_ct_manifest_session) -> Path:
    root = tmp_path_factory.mktemp("report_run")
    man = tiny_ct_manifest_session
    val, test = man[man["split"] == "val"], man[man["split"] == "test"]
    keras.utils.set_random_seed(0)
    for i, name in enumerate(NAMES):
        rng = np.random.default_rng(i)
        model = build_model("SmallCNN", len(CLASSES), S, augment=False, seed=i)
        _write_model_dir(root / "models" / name, CLASSES, _predictions(val, CLASSES, rng),
                         _predictions(test, CLASSES, rng), model)
    # Phase 1: X-ray predictions on other (X-ray) patients; the simulated cohort pairs by status.
    xclasses = ["covid", "non_covid"]
    rng = np.random.default_rng(9)

    def xray(rows: pd.DataFrame, tag: str) -> pd.DataFrame:
        lab = np.where(rows["label"] == "covid", "covid", "non_covid")
        fake = pd.DataFrame({"path": [f"/xray/{tag}{i}.png" for i in range(len(rows))],
                             "patient_id": [f"x{tag}{pid}" for pid in rows["patient_id"]],
                             "label": lab})
        return _predictions(fake, xclasses, rng)

    _write_model_dir(root / "models" / "xray_SmallCNN", xclasses, xray(val, "v"), xray(test, "t"),
                     modality="xray")
    return root


@pytest.fixture()
def run_copy(base_run, tmp_path) -> Path:
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def test_hard_vote_is_a_score_without_calibration(run_copy):
    res = report.evaluate_run(run_copy, backbones=NAMES, xray_backbone="SmallCNN", vote="hard",
                              **{**FAST, "gradcam_images": 2})
    assert res.figures["gradcam"].is_file()
    ev = json.loads((run_copy / "evaluation.json").read_text())
    shares = ev["gradcam_lung_share"]
    assert set(shares) == set(NAMES) | {"vote"}
    assert all(s["n_images"] > 0 and s["n_lung_field"] <= s["n_images"] for s in shares.values())
    assert all("ceiling" in s for s in shares.values())
    assert "## Where the Grad-CAMs look" in (run_copy / "results.md").read_text()
    ens = ev["ensemble"]
    assert ens["output"] == "score" and ens["calibrated"] is False
    cal = ens["calibration"]
    assert cal["applicable"] is False and "not a probability" in cal["reason"]
    assert cal["ece"] is None and cal["temperature"] is None and cal["ece_after_temperature"] is None
    assert 0 <= ens["auc_macro"] <= 1  # AUC from the score: a ranking is enough
    assert "not a probability" in ens["definition"]
    assert 0 < ens["agreement"]["mean"] <= 1
    # The members are probabilities: calibration with a temperature fitted on validation.
    for name in NAMES:
        block = ev["models"][name]
        assert block["output"] == "probability" and block["calibrated"] is False
        assert block["calibration"]["applicable"] is True and block["calibration"]["temperature"] > 0
        assert (run_copy / "figures" / f"reliability_{name}.png").is_file()
    # No reliability diagram for the score, anywhere.
    assert "reliability_vote" not in res.figures
    assert not (run_copy / "figures" / "reliability_vote.png").exists()
    md = (run_copy / "results.md").read_text()
    assert "| **hard vote** |" in md and "n/a (score)" in md and "ranking score" in md
    # The saved per-image table names scores as scores.
    table = pd.read_csv(run_copy / "predictions_test_vote.csv")
    assert not [c for c in table.columns if c.startswith("p_")]
    assert [f"score_{c}" for c in CLASSES] + ["votes", "agreement"] == list(table.columns[3:])
    assert set(table["votes"]) <= {1, 2, 3}
    np.testing.assert_allclose(table["agreement"], table["votes"] / 3)
    # The cascade still runs on the hard vote's decision.
    tp = ev["two_phase"]
    assert not tp.get("skipped") and "score" in tp["ct_decision"]
    assert 0 <= tp["ct_fraction"] <= 1
    # The saved ensemble model says what it outputs.
    cfg = json.loads((run_copy / "models" / "ensemble" / "config.json").read_text())
    assert cfg["output"] == "score" and cfg["calibrated"] is False and cfg["members"] == NAMES
    assert load_model(run_copy / "models" / "ensemble" / "model.keras").name == "ensemble_hard"


def test_soft_vote_keeps_probability_calibration(run_copy):
    # A hard-vote evaluation first: its files must not survive as the soft vote's, and back.
    report.evaluate_run(run_copy, backbones=NAMES, xray_backbone=None, vote="hard",
                        save_ensemble=False, **FAST)
    res = report.evaluate_run(run_copy, backbones=NAMES, xray_backbone=None, vote="soft",
                              save_ensemble=False, **FAST)
    ens = res.evaluation["ensemble"]
    assert ens["output"] == "probability" and ens["calibration"]["applicable"] is True
    assert ens["calibration"]["ece"] is not None and ens["calibration"]["temperature"] > 0
    assert (run_copy / "figures" / "reliability_vote.png").is_file()
    assert "reliability_vote" in res.figures
    table = pd.read_csv(run_copy / "predictions_test_vote.csv")
    assert [f"p_{c}" for c in CLASSES] + ["votes", "agreement"] == list(table.columns[3:])
    assert "n/a (score)" not in (run_copy / "results.md").read_text()
    assert res.evaluation["two_phase"]["skipped"] is True
    # Back to hard: the soft vote's reliability diagram is removed, not left to be misread.
    report.evaluate_run(run_copy, backbones=NAMES, xray_backbone=None, vote="hard",
                        save_ensemble=False, **FAST)
    assert not (run_copy / "figures" / "reliability_vote.png").exists()


def test_backbones_and_xray_backbone_have_no_library_default(run_copy):
    with pytest.raises(TypeError):
        report.evaluate_run(run_copy, vote="hard", **FAST)  # noqa
    with pytest.raises(TypeError):
        report.evaluate_run(run_copy, backbones=NAMES, **FAST)  # noqa
    with pytest.raises(TypeError):
        report.evaluate_run(run_copy, NAMES, xray_backbone=None, **FAST)  # noqa


def test_results_markdown_reads_old_and_new_calibration_blocks(tmp_path):
    def block(cal: dict) -> dict:
        return {"accuracy": 0.5, "f1_macro": 0.5, "auc_macro": 0.6, "calibration": cal,
                "patient_level": None}

    ev = {"dataset": "x", "classes": CLASSES, "n_test": 3,
          "models": {"A": block({"ece": 0.1, "temperature": 1.2})},  # written before issue #11
          "ensemble": {"method": "hard", **block({"applicable": False, "reason": "score",
                                                  "ece": None})},
          "two_phase": {"skipped": True, "reason": "none"}}
    md = report.results_markdown(ev, {}, tmp_path)
    assert "| A |" in md and "0.100" in md and "n/a (score)" in md


def test_external_validation_names_the_vote_output(run_copy, tiny_ct_root, isolated_dirs):
    hard = report.external_validation(run_copy, tiny_ct_root, NAMES, vote="hard", n_boot=10)
    assert hard["mapping"] == "same classes" and hard["n_images"] == 36
    vote = hard["models"]["vote"]
    assert vote["method"] == "hard" and vote["output"] == "score"
    assert vote["calibration"]["applicable"] is False
    assert hard["models"][NAMES[0]]["output"] == "probability"
    assert hard["models"][NAMES[0]]["calibration"]["applicable"] is True
    # The weighted vote uses the weights given (no run config needed) and is a probability.
    weighted = report.external_validation(run_copy, tiny_ct_root, NAMES, vote="weighted",
                                          weights=[0.6, 0.3, 0.1], n_boot=10)
    assert weighted["models"]["vote"]["output"] == "probability"
    assert weighted["models"]["vote"]["calibration"]["ece"] is not None
    with pytest.raises(ValueError, match="needs weights"):
        report.external_validation(run_copy, tiny_ct_root, NAMES, vote="weighted", n_boot=10)


def test_evaluate_run_defaults_are_notebook_04s():
    """Every keyword left out reads notebook 04's parameter; none may point at a missing one."""
    import inspect

    from covidlib import runner

    sig = inspect.signature(report.evaluate_run)
    left_out = {k: p.default for k, p in sig.parameters.items()
                if p.default is runner.NOTEBOOK_DEFAULT}
    assert {"vote", "n_boot", "seed", "phase1_threshold", "patient_pattern"} <= set(left_out)
    filled = runner.fill_defaults("evaluate", left_out,
                                  {"patient_pattern": "EXTERNAL_PATIENT_PATTERN"})
    nb = runner.default_parameters("evaluate")
    assert filled["vote"] == nb["VOTE"] and filled["n_boot"] == nb["N_BOOT"]
    assert filled["patient_pattern"] == nb["EXTERNAL_PATIENT_PATTERN"]
    assert runner.fill_defaults("evaluate", {"n_boot": 7}) == {"n_boot": 7}  # given values stay
