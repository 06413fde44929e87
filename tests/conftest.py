"""Shared fixtures: a tiny synthetic CT data set and isolated data / report folders."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import covidlib  # noqa: E402,F401  before any test module loads cv2: it sets OpenCV's pixel cap

from pathlib import Path

import pandas as pd
import pytest


def _absolute_manifest(labels_csv: Path) -> pd.DataFrame:
    df = pd.read_csv(labels_csv, dtype={"patient_id": str}, keep_default_na=False)
    df["path"] = [str((labels_csv.parent / p).resolve()) for p in df["path"]]
    return df


@pytest.fixture(scope="session")
def tiny_ct_root(tmp_path_factory) -> Path:
    """4 patients per class x 3 slices, 64 px (train 18 / val 9 / test 9 images). Do not modify."""
    from covidlib.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny_ct")
    return write_synthetic_dataset(root, modality="ct", n_patients=4, slices_per_patient=3,
                                   size=64).parent


@pytest.fixture(scope="session")
def tiny_ct_manifest_session(tiny_ct_root) -> pd.DataFrame:
    return _absolute_manifest(tiny_ct_root / "labels.csv")


@pytest.fixture()
def tiny_ct_manifest(tiny_ct_manifest_session) -> pd.DataFrame:
    """A fresh copy of the tiny CT manifest with absolute paths (safe to modify)."""
    return tiny_ct_manifest_session.copy()


@pytest.fixture()
def isolated_dirs(tmp_path, monkeypatch) -> dict[str, Path]:
    """COVIDLIB_DATA / COVIDLIB_REPORTS pointed at empty folders under ``tmp_path``."""
    dirs = {"data": tmp_path / "covidlib_data", "reports": tmp_path / "covidlib_reports"}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("COVIDLIB_DATA", str(dirs["data"]))
    monkeypatch.setenv("COVIDLIB_REPORTS", str(dirs["reports"]))
    return dirs


@pytest.fixture(autouse=True, scope="session")
def _download_cache(tmp_path_factory):
    """Downloads cache into a temporary folder, never the user's cache."""
    os.environ["COVIDLIB_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """The wheel ``pip wheel .`` builds from this checkout (no build isolation: offline-safe)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("wheel")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out), str(root)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("covidlib-*.whl")
    return wheel


@pytest.fixture(scope="session")
def installed_wheel(built_wheel, tmp_path_factory) -> Path:
    """The wheel installed without dependencies into a fresh folder (put it first on PYTHONPATH)."""
    import subprocess
    import sys

    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
                           "--target", str(target), str(built_wheel)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


@pytest.fixture(scope="session")
def kill_after():
    """``kill_after(n)``: a Keras callback that raises ``KeyboardInterrupt`` after ``n`` training
    batches, counted over every ``fit`` it is given to (simulates a killed run)."""
    import keras  # here, not at import: most test modules must not load Keras

    class KillAfter(keras.callbacks.Callback):
        def __init__(self, n_batches: int) -> None:
            super().__init__()
            self.n = n_batches
            self.seen = 0

        def on_train_batch_end(self, batch, logs=None):
            self.seen += 1
            if self.seen >= self.n:
                raise KeyboardInterrupt(f"simulated kill after {self.seen} batches")

    return KillAfter


@pytest.fixture(scope="session")
def eager_training():
    """``with eager_training():`` covidlib.train compiles its models with ``run_eagerly=True``.

    For tests that fit a handful of steps: tracing the train / test functions (again after every
    recompile, e.g. phase 2) costs more than running those steps eagerly."""
    from contextlib import contextmanager

    @contextmanager
    def eager():
        from covidlib import train

        compile_ = train._compile

        def compile_eagerly(model, *args, **kwargs):
            compile_(model, *args, **kwargs)
            model.run_eagerly = True

        patch = pytest.MonkeyPatch()
        patch.setattr(train, "_compile", compile_eagerly)
        try:
            yield
        finally:
            patch.undo()

    return eager
