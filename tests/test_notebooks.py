"""Every numbered notebook, executed the way a user runs them, with tiny parameters.

One module-scoped run of ``covidlib run`` feeds several tests that assert on what the notebooks
saved. It walks the user's path: covidlib installed from its wheel (no checkout on the path),
started from an empty working folder with no COVIDLIB_* variables, so the notebooks must come
from the package and every output must land under that folder.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from covidlib import runner

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(runner.notebooks_dir().glob("*.ipynb"))

TINY = {
    "SYNTHETIC_PATIENTS": 3,
    "SYNTHETIC_XRAY_PATIENTS": 3,
    "IMG_SIZE": 32,
    "EPOCHS": 1,
    "ABLATION_EPOCHS": 1,
    "ABLATION_SEEDS": [0],
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
    params = runner.notebook_parameters(path)
    assert "RUN_DIR" in params and "SEED" in params or path.name.startswith("03") and "SEED" in params
    assert "config.seed_everything(SEED)" in "".join(c.source for c in code)


def test_shared_parameter_vocabulary():
    declared = {p.name: runner.notebook_parameters(p) for p in NOTEBOOKS}
    for name, params in declared.items():
        for shared in ("RUN_DIR", "SEED"):
            assert shared in params, (name, shared)
        for key, value in params.items():
            assert key.isupper()
            assert value is None or isinstance(value, (str, int, float, bool, list)), (name, key)


def test_plan_order_and_per_notebook_parameters():
    steps = runner.plan({"BACKBONES": ["MobileNetV2", "SmallCNN"], "EPOCHS": 2})
    labels = [s[0] for s in steps]
    assert labels == ["01_download_data", "02_enhancement_ablation", "03_train_MobileNetV2",
                      "03_train_SmallCNN", "03_train_xray_DenseNet121",
                      "04_two_phase_evaluation_voting"]
    assert steps[2][2] == {"BACKBONE": "MobileNetV2", "MODALITY": "ct", "EPOCHS": 2}
    assert "EPOCHS" not in steps[0][2]  # only parameters a notebook declares are passed
    no_xray = runner.plan({"XRAY_DATASET": None})
    assert not any("xray" in s[0] for s in no_xray)
    with pytest.raises(ValueError, match="unknown parameter"):
        runner.plan({"EPOCS": 3})


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def installed_run(installed_wheel, tmp_path_factory):
    """``covidlib run`` from the installed wheel in an empty folder: (run_dir, console, target)."""
    cwd = tmp_path_factory.mktemp("user_folder")
    before = _snapshot(installed_wheel)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDLIB_")}
    env.update(PYTHONPATH=str(installed_wheel), PYTHONDONTWRITEBYTECODE="1")
    args = [x for k, v in TINY.items() for x in ("-p", k, json.dumps(v))]
    # Bytes, not text: universal newlines would turn each progress bar's carriage returns into
    # lines, while a terminal shows one line per notebook.
    proc = subprocess.run([sys.executable, "-m", "covidlib", "run", *args], cwd=cwd, env=env,
                          capture_output=True, timeout=1200)
    console = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    assert proc.returncode == 0, console[-6000:]
    assert _snapshot(installed_wheel) == before, "covidlib run wrote into the installed package"
    return cwd / "reports" / "runs" / "demo", console, installed_wheel


@pytest.fixture(scope="module")
def tiny_run(installed_run):
    return installed_run[0]


@pytest.mark.slow
def test_installed_run_uses_the_package_notebooks_and_the_user_folder(installed_run):
    run_dir, console, target = installed_run
    executed = nbformat.read(run_dir / "notebooks" / "01_download_data.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert str(target / "covidlib" / "__init__.py") in text
    assert (run_dir.parents[2] / "data" / "synthetic").is_dir()  # ./data of the working folder


@pytest.mark.slow
def test_console_is_one_screen_without_startup_noise(installed_run):
    _, console, _ = installed_run
    lines = [line for line in re.split(r"[\r\n]+", console) if line.strip()]
    noise = ("absl::InitializeLog", "oneDNN", "cuInit", "cuda_", "IPKernelApp",
             "without encryption", "Task was destroyed")
    assert not [line for line in lines if any(n in line for n in noise)], console
    assert len(console.rstrip("\n").split("\n")) <= 60, console
    assert "done in" in console and "vote" in console  # the closing summary


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
    for name in executed:  # no TensorFlow start-up lines in any cell's stderr
        nb = nbformat.read(tiny_run / "notebooks" / name, as_version=4)
        stderr = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", [])
                         if o.get("name") == "stderr")
        assert "absl::InitializeLog" not in stderr and "oneDNN" not in stderr, name


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
    assert set(ev["gradcam_lung_share"]) == {"DenseNet121", "ResNet50V2", "MobileNetV2", "vote"}
    # The vote saved as one model that loads in safe mode.
    from covidlib.models import load_model

    assert load_model(tiny_run / "models" / "ensemble" / "model.keras").output_shape[-1] == 3


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
