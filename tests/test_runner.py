"""Tests for covidlib.runner's checks before any notebook runs, and for ``covidlib run``'s errors.

No notebook executes here: ``runner._execute`` is replaced by a recorder, and the subprocess
tests use copies of the notebooks whose kernel does not exist (a check that let a bad value
through fails at once instead of running the pipeline).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from covidlib import cli, runner

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32  # never decoded: the shape check only looks at names


def _images(root: Path, *rel: str) -> Path:
    for r in rel:
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        (root / r).write_bytes(PNG)
    return root


@pytest.fixture()
def user(tmp_path, monkeypatch, isolated_dirs):
    """A user's working folder; ``runner._execute`` records instead of running notebooks."""
    monkeypatch.chdir(tmp_path)
    executed: list = []
    monkeypatch.setattr(runner, "_execute", lambda label, path, out, params, **kw:
                        executed.append((label, params)))
    return tmp_path, executed


def _cli_run(tmp_path: Path, capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["run", "--quiet", "-p", "RUN_DIR", str(tmp_path / "run"), *args])
    return code, capsys.readouterr().err


ONE_CLASS = "one_class"


@pytest.mark.parametrize("args, expected", [
    (["-p", "EPOCHS", "-1"], "EPOCHS=-1: expected an integer >= 1"),
    (["-p", "IMG_SIZE", "7"], "IMG_SIZE=7: expected an integer >= 32"),
    (["-p", "EPOCHS", "three"], "EPOCHS='three': expected an integer >= 1"),
    (["-p", "BACKBONES", '["DenseNet121", "Nope"]'], "BACKBONES=['DenseNet121', 'Nope']: expected a "
     "non-empty list of distinct names from ['DenseNet121'"),
    (["-p", "XRAY_BACKBONE", "Nope"], "XRAY_BACKBONE='Nope': expected one of ['DenseNet121'"),
    (["-p", "ABLATION_BACKBONE", "Nope"], "ABLATION_BACKBONE='Nope': expected one of"),
    (["-p", "DATASET", ONE_CLASS], "only one class holds images (covid); expected at least 2 classes"),
    (["-p", "DATASET", "no_such_folder"], "DATASET='no_such_folder': not found (relative paths start at"),
    (["--params", "bad.yaml"], "bad.yaml: not valid YAML: "),
    (["-p", "RUN_DIR", "a_file"], "a_file is a file; expected None or a folder path"),
])
def test_issue_cases_fail_in_one_line_before_any_notebook(user, capsys, args, expected):
    tmp_path, executed = user
    _images(tmp_path / ONE_CLASS, "covid/p1_1.png", "covid/p2_1.png")
    (tmp_path / "bad.yaml").write_text("EPOCHS: [1, 2\nIMG_SIZE: 64\n")
    (tmp_path / "a_file").write_text("not a folder")
    code, err = _cli_run(tmp_path, capsys, *args)
    assert code == 2, err
    assert err.startswith("covidlib run: error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err
    assert executed == [] and not (tmp_path / "run").exists()


def _kernelless_notebooks(dest: Path) -> Path:
    """Copies of the notebooks naming a kernel that does not exist."""
    runner.copy_notebooks(dest)
    for path in dest.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        nb.metadata["kernelspec"]["name"] = "covidlib-no-such-kernel"
        nbformat.write(nb, path)
    return dest


@pytest.mark.parametrize("args, expected", [
    (["-p", "BACKBONES", '["Nope"]'], "BACKBONES=['Nope']"),
    (["--params", "bad.yaml"], "not valid YAML"),
])
def test_command_line_errors_are_one_line_before_any_kernel(tmp_path, args, expected):
    nb_dir = _kernelless_notebooks(tmp_path / "nb")
    (tmp_path / "bad.yaml").write_text("EPOCHS: 1\n  IMG_SIZE: 64\n")
    env = {**os.environ, "COVIDLIB_REPORTS": str(tmp_path / "reports"),
           "COVIDLIB_DATA": str(tmp_path / "data")}
    # The notebooks name a kernel that does not exist: had any started, the error would be that.
    proc = subprocess.run([sys.executable, "-m", "covidlib", "run", "--notebooks", str(nb_dir), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("covidlib run: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "reports").exists()


def test_defaults_pass_and_plan_keeps_its_shape():
    steps = runner.plan({})
    assert [s[0] for s in steps][:2] == ["01_download_data", "02_enhancement_ablation"]
    assert all(isinstance(p, dict) for _, _, p in steps)


@pytest.mark.parametrize("params, expected", [
    ({"EPOCHS": True}, "EPOCHS=True: expected an integer >= 1"),  # a bool is not an int
    ({"EPOCHS": 2.0}, "EPOCHS=2.0: expected an integer >= 1"),
    ({"EPOCHS": None}, "EPOCHS=None: expected an integer >= 1"),
    ({"RUN_ABLATION": 1}, "RUN_ABLATION=1: expected True or False"),
    ({"LEARNING_RATE": 0}, "LEARNING_RATE=0: expected a number > 0"),
    ({"LEARNING_RATE": float("nan")}, "LEARNING_RATE=nan: expected a number > 0"),
    ({"FINE_TUNE_LR": "1e-5"}, "FINE_TUNE_LR='1e-5': expected a number > 0"),
    ({"VAL_FRACTION": 0}, "VAL_FRACTION=0: expected a number between 0 and 1"),
    ({"TEST_FRACTION": 1.0}, "TEST_FRACTION=1.0: expected a number between 0 and 1"),
    ({"VAL_FRACTION": 0.5, "TEST_FRACTION": 0.5}, "VAL_FRACTION=0.5 + TEST_FRACTION=0.5: expected a sum < 1"),
    ({"ABLATION_SEEDS": 0}, "ABLATION_SEEDS=0: expected a non-empty list of distinct integers"),
    ({"ABLATION_SEEDS": []}, "ABLATION_SEEDS=[]: expected a non-empty list"),
    ({"ABLATION_SEEDS": [1, 1]}, "ABLATION_SEEDS=[1, 1]: expected a non-empty list of distinct"),
    ({"ABLATION_PIPELINES": ["none", "sharpen"]}, "ABLATION_PIPELINES=['none', 'sharpen']: expected"),
    ({"ENHANCEMENT": "sharpen"}, "ENHANCEMENT='sharpen': expected one of ['none', 'crop'"),
    ({"MODALITY": "ct"}, "MODALITY='ct': covidlib run sets it for each training notebook"),
    ({"BACKBONE": "SmallCNN"}, "BACKBONE='SmallCNN': covidlib run sets it"),
    ({"BACKBONES": []}, "BACKBONES=[]: expected a non-empty list"),
    ({"VOTE": "majority"}, "VOTE='majority': expected one of ['hard', 'soft', 'weighted']"),
    ({"HEAD": "mlp"}, "HEAD='mlp': expected one of ['gap', 'gap_dense256']"),
    ({"IMBALANCE": "oversample"}, "IMBALANCE='oversample': expected one of"),
    ({"UNFREEZE": 0}, "UNFREEZE=0: expected 'all' or an integer >= 1"),
    ({"UNFREEZE": "some"}, "UNFREEZE='some': expected 'all' or an integer >= 1"),
    ({"SEED": -1}, "SEED=-1: expected an integer from 0 to 4294967295"),
    ({"N_BOOT": 0}, "N_BOOT=0: expected an integer >= 1"),
    ({"PATIENCE": -1}, "PATIENCE=-1: expected an integer >= 0"),
    ({"SYNTHETIC_PATIENTS": 2}, "SYNTHETIC_PATIENTS=2: expected an integer >= 3"),
    ({"SYNTHETIC_XRAY_PATIENTS": 2}, "SYNTHETIC_XRAY_PATIENTS=2: expected an integer >= 3"),
    ({"PHASE1_THRESHOLD": 1.5}, "PHASE1_THRESHOLD=1.5: expected a number from 0 to 1"),
    ({"GRADCAM_IMAGES": -1}, "GRADCAM_IMAGES=-1: expected an integer >= 0"),
    ({"PATIENT_PATTERN": "(unclosed"}, "PATIENT_PATTERN='(unclosed': not a regular expression"),
    ({"WEIGHTS": "none"}, "WEIGHTS='none': no such file"),
    ({"WEIGHTS": "imagenet", "BACKBONES": ["SmallCNN"]}, "SmallCNN (in BACKBONES or XRAY_BACKBONE) has no"),
    ({"PRETRAIN_EPOCHS": 2, "DISTRIBUTE": "multiworker"}, "every worker would pretrain into the same"),
    ({"COHORT": "pairs.csv"}, "COHORT='pairs.csv': no such file (relative paths start at"),
    ({"EXTERNAL_DATASET": "nowhere"}, "EXTERNAL_DATASET='nowhere': not found"),
    ({"XRAY_DATASET": 3}, "XRAY_DATASET=3: expected None, 'synthetic', a registry name"),
    ({"RUN_DIR": 5}, "RUN_DIR=5: expected None or a folder path"),
])
def test_each_parameter_is_checked(user, params, expected):
    with pytest.raises(ValueError) as ei:
        runner.plan(params)
    assert expected in str(ei.value) and "\n" not in str(ei.value)


def test_accepted_values(user):
    tmp_path, _ = user
    (tmp_path / "w.weights.h5").write_bytes(b"w")
    (tmp_path / "pairs.csv").write_text("patient_id\n")
    for params in ({"XRAY_DATASET": None, "COHORT": None, "WEIGHTS": None},
                   {"XRAY_DATASET": "", "EXTERNAL_DATASET": "", "COHORT": "", "RUN_DIR": ""},
                   {"LEARNING_RATE": 1, "UNFREEZE": 20, "BACKBONES": "SmallCNN", "SEED": 2**32 - 1},
                   {"WEIGHTS": "w.weights.h5", "COHORT": "pairs.csv", "PATIENT_PATTERN": "covidx"},
                   {"WEIGHTS": "imagenet", "BACKBONES": ["MobileNetV2"], "XRAY_BACKBONE": "MobileNetV2"},
                   {"DATASET": "sarscov2-ct", "XRAY_DATASET": "kaggle:someone/some-set",
                    "EXTERNAL_DATASET": "covidx-ct", "RUN_DIR": "new/run"}):
        runner.plan(params)


def test_all_problems_in_one_line(user):
    with pytest.raises(ValueError) as ei:
        runner.plan({"EPOCHS": -1, "IMG_SIZE": 7, "VOTE": "x"})
    msg = str(ei.value)
    assert "\n" not in msg and msg.count("; ") >= 2
    assert all(name in msg for name in ("EPOCHS=-1", "IMG_SIZE=7", "VOTE='x'"))


def test_data_set_shape(user):
    tmp_path, _ = user
    ok = _images(tmp_path / "ok", "COVID/a.png", "non-COVID/sub/b.jpg")
    runner.plan({"DATASET": str(ok), "XRAY_DATASET": None})
    # Two folders, one label: still one class.
    same = _images(tmp_path / "same", "COVID/a.png", "covid-19/b.png")
    # A class folder without images does not count.
    (tmp_path / "empty_class" / "normal").mkdir(parents=True)
    _images(tmp_path / "empty_class", "covid/a.png", "normal/notes.txt")
    splits = _images(tmp_path / "splits", "train/covid/a.png", "train/normal/b.png", "test/covid/c.png")
    (splits / "val" / "covid").mkdir(parents=True)
    no_train = _images(tmp_path / "no_train", "val/covid/a.png", "test/normal/b.png")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    cases = {
        same: "only one class holds images (covid)",
        tmp_path / "empty_class": "only one class holds images (covid)",
        splits: "split folder(s) ['val'] hold no class folder with images",
        no_train: "no train split folder",
        nothing: "no class folders, split folders, label files or CSV found",
    }
    for root, expected in cases.items():
        for name in ("DATASET", "XRAY_DATASET"):
            with pytest.raises(ValueError, match=f"{name}=") as ei:
                runner.plan({name: str(root)})
            assert expected in str(ei.value) and "\n" not in str(ei.value)
    # Given splits with a val folder removed: val is carved out of train, so that is fine.
    (splits / "val" / "covid").rmdir()
    (splits / "val").rmdir()
    runner.plan({"DATASET": str(splits)})
    # Label files and CSVs are left to ingest.
    (tmp_path / "labels.csv").write_text("path,label\na.png,covid\n")
    runner.plan({"DATASET": str(tmp_path / "labels.csv")})


def test_relative_paths_follow_the_working_folder(user):
    tmp_path, executed = user
    _images(tmp_path / "data" / "ct", "covid/a.png", "normal/b.png")
    (tmp_path / "w.weights.h5").write_bytes(b"w")
    runner.run({"DATASET": "data/ct", "XRAY_DATASET": None, "RUN_DIR": "runs/x", "RUN_ABLATION": False,
                "BACKBONES": ["SmallCNN"], "WEIGHTS": "w.weights.h5"}, progress=False)
    ran = {label.split("] ")[1]: params for label, params in executed}
    first = ran["01_download_data"]
    assert first["DATASET"] == str((tmp_path / "data" / "ct").resolve())
    assert first["RUN_DIR"] == str((tmp_path / "runs" / "x").resolve())
    train = ran["03_train_SmallCNN"]
    assert train["WEIGHTS"] == str((tmp_path / "w.weights.h5").resolve())


def test_params_file_values(user, capsys):
    tmp_path, executed = user
    (tmp_path / "p.yaml").write_text("LEARNING_RATE: 1e-4\nFINE_TUNE_LR: 2.5E-6\nEPOCHS: 3\n")
    assert cli._read_params_file("p.yaml") == {"LEARNING_RATE": 1e-4, "FINE_TUNE_LR": 2.5e-6, "EPOCHS": 3}
    for text, expected in (("- 1\n- 2\n", "expected a mapping of NAME: value, got a list"),
                           ("1: 2\n", "parameter names must be words like EPOCHS")):
        (tmp_path / "p.yaml").write_text(text)
        code, err = _cli_run(tmp_path, capsys, "--params", "p.yaml")
        assert code == 2 and expected in err and err.count("\n") == 1
    code, err = _cli_run(tmp_path, capsys, "--params", "missing.yaml")
    assert code == 2 and "--params missing.yaml: cannot read it" in err
    assert executed == []


def test_backbone_names_are_read_without_keras():
    code = ("import sys; from covidlib import runner; runner.plan({'BACKBONES': ['SmallCNN']}); "
            "sys.exit(int('keras' in sys.modules or 'tensorflow' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_static_names_match_the_models_module():
    code = ("import json; from covidlib import models; "
            "print(json.dumps([list(models.BACKBONES), list(models.HEADS)]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    backbones, heads = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(runner._static_names("models", "BACKBONES")) == backbones
    assert list(runner._static_names("models", "HEADS")) == heads


def test_download_without_a_name_is_one_line(capsys):
    assert cli.main(["download"]) == 2
    err = capsys.readouterr().err
    assert err == "covidlib download: error: name a data set (see covidlib download --list)\n"
