"""Every numbered notebook, executed through the real batch runner with tiny parameters.

One module-scoped run of ``covidlib run`` (papermill) feeds several tests that assert on what the
notebooks saved; nbval then re-executes the executed copies (`--nbval-lax`).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from covidlib import pipeline

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

TINY = {
    "SYNTHETIC_PATIENTS": 3,
    "IMG_SIZE": 32,
    "EPOCHS": 1,
    "BATCH_SIZE": 16,
    "XRAY_BACKBONE": "SmallCNN",
    "ABLATION_PIPELINES": ["none", "crop+wb+clahe"],
    "N_BOOT": 50,
    "GRADCAM_IMAGES": 2,
}


def test_four_numbered_notebooks_exist():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), "strip outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    # Library first: notebooks hold calls, never definitions.
    assert not any(line.lstrip().startswith(("def ", "class ")) for c in code
                   for line in c.source.splitlines())
    # Every parameter parses (papermill silently skips lines it cannot parse).
    params = pipeline.notebook_parameters(path)
    assert "RUN_DIR" in params and "SEED" in params or path.name.startswith("03") and "SEED" in params
    assert "config.seed_everything(SEED)" in "".join(c.source for c in code)


def test_shared_parameter_vocabulary():
    declared = {p.name: pipeline.notebook_parameters(p) for p in NOTEBOOKS}
    for name, params in declared.items():
        for shared in ("RUN_DIR", "SEED"):
            assert shared in params, (name, shared)
        for key, value in params.items():
            assert key.isupper()
            assert value is None or isinstance(value, (str, int, float, bool, list)), (name, key)


def test_plan_order_and_per_notebook_parameters():
    steps = pipeline.plan({"BACKBONES": ["MobileNetV2", "SmallCNN"], "EPOCHS": 2})
    labels = [s[0] for s in steps]
    assert labels == ["01_download_data", "02_enhancement_ablation", "03_train_MobileNetV2",
                      "03_train_SmallCNN", "03_train_xray_DenseNet121",
                      "04_two_phase_evaluation_voting"]
    assert steps[2][2] == {"BACKBONE": "MobileNetV2", "MODALITY": "ct", "EPOCHS": 2}
    assert "EPOCHS" not in steps[0][2]  # only parameters a notebook declares are passed
    no_xray = pipeline.plan({"XRAY_DATASET": None})
    assert not any("xray" in s[0] for s in no_xray)
    with pytest.raises(ValueError, match="unknown parameter"):
        pipeline.plan({"EPOCS": 3})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    mp = pytest.MonkeyPatch()
    mp.setenv("COVIDLIB_DATA", str(base / "data"))
    mp.setenv("COVIDLIB_REPORTS", str(base / "reports"))
    try:
        run_dir = pipeline.run({**TINY, "RUN_DIR": str(base / "run")}, progress=False)
        yield run_dir
    finally:
        mp.undo()


@pytest.mark.slow
def test_pipeline_writes_manifest_audit_and_models(tiny_run):
    manifest = pd.read_csv(tiny_run / "manifest.csv", dtype={"patient_id": str})
    assert set(manifest.modality) == {"ct", "xray"}
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    audit = json.loads((tiny_run / "data_audit.json").read_text())
    assert set(audit["modalities"]) == {"ct", "xray"}
    assert all(rep["counts"] for rep in audit["modalities"].values())
    for name in ("DenseNet121", "ResNet50V2", "MobileNetV2", "xray_SmallCNN"):
        d = tiny_run / "models" / name
        for f in ("model.keras", "labels.json", "config.json", "history.csv", "predictions_test.csv"):
            assert (d / f).is_file(), (name, f)
    table = pd.read_csv(tiny_run / "enhancement_ablation.csv")
    assert list(table.pipeline) == ["none", "crop+wb+clahe"]
    assert {"accuracy_lo", "accuracy_hi", "verdict_vs_none"} <= set(table.columns)
    executed = sorted(p.name for p in (tiny_run / "notebooks").glob("*.ipynb"))
    assert len(executed) == 7


@pytest.mark.slow
def test_pipeline_evaluation_json(tiny_run):
    ev = json.loads((tiny_run / "evaluation.json").read_text())
    assert ev["classes"] == ["covid", "cap", "normal"]
    assert ev["dataset"] == "synthetic"
    assert set(ev["models"]) == {"DenseNet121", "ResNet50V2", "MobileNetV2"}
    for block in [*ev["models"].values(), ev["ensemble"]]:
        for key in ("accuracy", "f1_macro", "auc_macro", "ci95", "calibration", "patient_level"):
            assert key in block
        assert 0.0 <= block["accuracy"] <= 1.0
    assert ev["ensemble"]["method"] == "hard"
    assert ev["n_test"] == len(pd.read_csv(tiny_run / "models" / "DenseNet121" / "predictions_test.csv"))
    tp = ev["two_phase"]
    assert tp["simulated"] is True and 0.0 <= tp["ct_fraction"] <= 1.0
    assert "sensitivity" in tp and "phase1" in tp
    for fig in ("test_grid_vote.png", "confusion_vote.png", "roc_vote.png", "gradcam.png",
                "two_phase_threshold_sweep.png", "class_counts.png"):
        assert (tiny_run / "figures" / fig).stat().st_size > 1000, fig
    assert (tiny_run / "results.md").read_text().startswith("# covidlib results")
    # The vote saved as one model that loads in safe mode.
    from covidlib.models import load_model

    assert load_model(tiny_run / "models" / "ensemble" / "model.keras").output_shape[-1] == 3


@pytest.mark.slow
def test_nbval_reexecutes_executed_notebooks(tiny_run):
    """nbval runs every executed copy again (tiny injected parameters; finished runs are reused)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--nbval-lax", "-p", "no:cacheprovider",
         str(tiny_run / "notebooks")],
        capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_external_validation_same_and_binary_classes(tiny_run, tmp_path, monkeypatch):
    import cv2

    from covidlib import report, synthetic

    monkeypatch.setenv("COVIDLIB_DATA", str(tmp_path / "data"))
    other = synthetic.write_synthetic_dataset(tmp_path / "other", n_patients=3,
                                              slices_per_patient=2, size=64, seed=7)
    ext = report.external_validation(tiny_run, other.parent, ["DenseNet121", "MobileNetV2"],
                                     n_boot=20)
    assert ext["mapping"] == "same classes" and ext["n_images"] == 18
    assert set(ext["models"]) >= {"DenseNet121", "vote"}
    # A binary COVID / non-COVID set is compared as COVID-19 vs the rest.
    labels = pd.read_csv(other)
    for i, row in labels.iterrows():
        folder = "COVID" if row.label == "covid" else "NonCOVID"
        (tmp_path / "binary" / folder).mkdir(parents=True, exist_ok=True)
        img = cv2.imread(str(other.parent / row.path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(tmp_path / "binary" / folder / f"{row.patient_id}_{i}.png"), img)
    ext = report.external_validation(tiny_run, tmp_path / "binary", ["DenseNet121"], n_boot=20)
    assert ext["mapping"].startswith("COVID-19 vs rest")
    assert ext["classes"] == ["covid", "non_covid"]
    assert ext["models"]["vote"]["auc_macro"] is None or 0 <= ext["models"]["vote"]["auc_macro"] <= 1
