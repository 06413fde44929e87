"""covidlib as a user installs it: a wheel carrying its notebooks, Colab / Kaggle first cells, a
readable console. The whole-pipeline run itself (from the installed wheel) is ``tiny_run`` in
``test_notebooks.py``; these tests check the pieces around it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

from covidlib import runner

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_notebooks_and_a_single_version(built_wheel):
    import covidlib

    names = zipfile.ZipFile(built_wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("covidlib/notebooks/") and n.endswith(".ipynb"))
    assert [Path(n).name for n in shipped] == sorted(runner.NOTEBOOKS.values())
    assert f"covidlib-{covidlib.__version__}-" in built_wheel.name


def test_defaults_follow_the_working_folder(tmp_path, monkeypatch):
    from covidlib import config

    for var in ("COVIDLIB_DATA", "COVIDLIB_REPORTS", "COVIDLIB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    assert config.data_dir() == tmp_path / "data"
    assert config.reports_dir() == tmp_path / "reports"
    assert runner.resolve_run_dir(None) == tmp_path / "reports" / "runs" / "demo"
    package = Path(config.__file__).resolve().parent
    assert package not in config.cache_dir().parents
    monkeypatch.setenv("COVIDLIB_DATA", "elsewhere")  # relative: against the working folder
    assert config.data_dir() == tmp_path / "elsewhere"


def test_notebooks_command_keeps_edited_copies(tmp_path):
    cmd = [sys.executable, "-m", "covidlib", "notebooks", str(tmp_path / "nb")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.count("copied") == 4
    edited = tmp_path / "nb" / "03_train_backbone.ipynb"
    edited.write_text(edited.read_text().replace("EPOCHS = 10", "EPOCHS = 99"))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "kept" in again.stdout and "EPOCHS = 99" in edited.read_text()
    forced = subprocess.run(cmd + ["--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0 and "EPOCHS = 99" not in edited.read_text()


def _first_cells(name: str, n: int) -> list[str]:
    nb = nbformat.read(runner.notebooks_dir() / name, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code"][:n]


# Runs notebook cells in an IPython shell where covidlib is NOT importable, as on a fresh Colab or
# Kaggle kernel: the editable install's import hook is dropped, and sys.path holds only an empty
# target folder that the setup cell's pip installs into.
_FRESH_KERNEL = r"""
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if p not in ("", sys.argv[1])]
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
for cell in json.loads(sys.argv[2]):
    result = shell.run_cell(cell)
    if not result.success:
        sys.exit(3)
import covidlib
print("IMPORTED", covidlib.__file__)
"""


def _fresh_kernel(cells: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _FRESH_KERNEL, str(ROOT), json.dumps(cells)],
                          capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, **env})


@pytest.mark.slow
def test_colab_first_cells_install_from_the_wheel(built_wheel, tmp_path):
    """Colab: COVIDLIB_INSTALL names the wheel; Drive data is a plain folder path."""
    target = tmp_path / "site"
    target.mkdir()
    spec = f"--no-deps --target {target} {built_wheel}"
    cells = _first_cells("01_download_data.ipynb", 3)  # setup, parameters, imports
    env = {"COVIDLIB_INSTALL": spec, "PYTHONPATH": str(target), "COLAB_RELEASE_TAG": "test",
           "COVIDLIB_DATA": str(tmp_path / "data"), "COVIDLIB_REPORTS": str(tmp_path / "reports")}
    out = _fresh_kernel(cells, env, tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"IMPORTED {target}" in out.stdout
    # Without COVIDLIB_INSTALL the first cell stops with a message that says what to do.
    bare = _fresh_kernel(cells[:1], {"PYTHONPATH": str(tmp_path / "empty"),
                                     "COVIDLIB_INSTALL": ""}, tmp_path)
    assert bare.returncode == 3 and "COVIDLIB_INSTALL" in bare.stdout + bare.stderr


@pytest.mark.slow
def test_kaggle_attached_dataset_is_used_in_place(tmp_path, monkeypatch):
    """Kaggle: a registry data set attached under /kaggle/input is read there, never downloaded."""
    import papermill as pm

    from covidlib import download, synthetic

    info = next(download.get_info(n) for n in download.dataset_names()
                if download.get_info(n).kind == "kaggle")
    attached = tmp_path / "kaggle_input" / info.slug
    synthetic.write_synthetic_dataset(attached, n_patients=3, slices_per_patient=1, size=64)
    for var, sub in (("COVIDLIB_DATA", "data"), ("COVIDLIB_REPORTS", "reports")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("COVIDLIB_KAGGLE_INPUT", str(tmp_path / "kaggle_input"))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "01.ipynb"
    pm.execute_notebook(str(runner.notebooks_dir() / "01_download_data.ipynb"), str(out),
                        parameters={"DATASET": info.name, "XRAY_DATASET": None,
                                    "RUN_DIR": str(tmp_path / "run")}, progress_bar=False)
    manifest = (tmp_path / "run" / "manifest.csv").read_text()
    assert str(attached) in manifest or "/" not in manifest.splitlines()[1].split(",")[0]
    assert not (tmp_path / "data" / info.name).exists()  # nothing downloaded or copied


def test_failing_notebook_names_its_cell_and_exception(tmp_path):
    nb_dir = tmp_path / "nb"
    runner.copy_notebooks(nb_dir)
    path = nb_dir / "01_download_data.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    code[2].source += '\nraise ValueError("boom from the test")'
    nbformat.write(nb, path)
    out = subprocess.run([sys.executable, "-m", "covidlib", "run", "--quiet", "--notebooks",
                          str(nb_dir), "-p", "RUN_DIR", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()[-1]
    assert "01_download_data" in err and "cell" in err and "ValueError: boom from the test" in err
    assert str(tmp_path / "run" / "notebooks" / "01_download_data.ipynb") in err
    assert "Traceback" not in out.stderr
