"""Tests for covidlib.export: SavedModel / TFLite / ONNX exports reproduce the Keras model."""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import keras  # a hard dependency: a broken install must fail, not skip
import tensorflow  # noqa: F401 - the default backend: must be installed

from covidlib import cli, ensemble, export  # noqa: E402
from covidlib.models import build_model  # noqa: E402
from covidlib.train import save_model_atomic  # noqa: E402

# Keras' own saving code trips numpy 2's copy-keyword deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

S = 32
CLASSES = ["covid", "cap", "normal"]
HAS_ONNX = export.onnx_available() is None
ALL = ["savedmodel", "tflite", "onnx"] if HAS_ONNX else ["savedmodel", "tflite"]


@pytest.fixture(scope="module")
def members():
    keras.utils.set_random_seed(0)
    return {f"Small{i}": build_model("SmallCNN", len(CLASSES), S, augment=True, seed=i) for i in range(3)}


@pytest.fixture(scope="module")
def images():
    return export.sample_images(S, n=5, seed=3)


def _check(model, paths, images):
    diffs = export.verify_export(model, paths, images, atol=1e-4)
    assert set(diffs) == set(paths)
    assert all(v <= 1e-4 for v in diffs.values()), diffs
    return diffs


def test_single_model_all_formats(members, images, tmp_path):
    model = members["Small0"]
    paths = export.export_model(model, tmp_path / "single", formats=ALL)
    assert set(paths) == set(ALL)
    assert (paths["savedmodel"] / "saved_model.pb").is_file()
    assert paths["tflite"].stat().st_size > 10_000
    _check(model, paths, images)
    meta = json.loads((tmp_path / "single" / "export.json").read_text())
    assert meta["input"]["shape"] == [None, S, S, 1] and set(meta["formats"]) == set(ALL)
    # Inference mode is pinned: augmentation inside the model must not run in the export.
    again = export.run_savedmodel(paths["savedmodel"], images)
    np.testing.assert_array_equal(again, export.run_savedmodel(paths["savedmodel"], images))
    # A wrong reference is caught.
    with pytest.raises(export.ExportMismatchError) as err:
        export.verify_export(members["Small1"], paths, images)
    assert set(err.value.diffs) == set(ALL)


@pytest.mark.parametrize("method", ["hard", "soft"])
def test_ensemble_from_run_folder(members, images, tmp_path, method):
    # Two members keep it quick; the hard vote's argmax / one-hot path is the same for any number.
    pair = {k: members[k] for k in ("Small0", "Small1")}
    ens = ensemble.build_ensemble_model(pair, method)
    ens_dir = tmp_path / "models" / "ensemble"
    save_model_atomic(ens, ens_dir / "model.keras")
    (ens_dir / "labels.json").write_text(json.dumps(CLASSES))
    # ONNX goes through the same wrapper for both rules; converting it once is enough.
    formats = ALL if method == "hard" else ["savedmodel", "tflite"]
    paths = export.export_model(ens_dir, tmp_path / "out", formats=formats)
    diffs = _check(ens_dir, paths, images)
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == CLASSES
    # The export reproduces ensemble.combine of the members, not only the saved Keras model.
    probs = [np.asarray(m.predict_on_batch(images)) for m in pair.values()]
    got = export.run_tflite(paths["tflite"], images)
    np.testing.assert_allclose(got, ensemble.combine(probs, method), atol=1e-4)
    assert (got.argmax(1) == ensemble.combine(probs, method).argmax(1)).all(), diffs


def test_onnx_missing_toolchain_is_a_clear_error(members, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import now fails, as if not installed
    assert "pip install" in export.onnx_available()
    with pytest.raises(export.ExportError, match="ONNX export needs tf2onnx.*pip install"):
        export.export_model(members["Small0"], tmp_path / "x", formats=["onnx"])
    assert not (tmp_path / "x" / "model.onnx").exists()


@pytest.mark.skipif(HAS_ONNX, reason="the ONNX toolchain is installed (ONNX tested above)")
def test_onnx_absent_here():
    assert "pip install" in export.onnx_available()


def test_bad_arguments(members, tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        export.export_model(members["Small0"], tmp_path, formats=["pickle"])
    with pytest.raises(FileNotFoundError, match="no model"):
        export.export_model(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(ValueError, match="images must be"):
        export.verify_export(members["Small0"], {}, np.zeros((2, S + 1, S + 1, 1)))


def test_mixed_precision_model_rebuilt_in_float32(members, images):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = build_model("SmallCNN", len(CLASSES), S, augment=True, seed=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(members["Small0"].get_weights())
    with pytest.warns(UserWarning, match="rebuilt in float32"):
        f32 = export._as_float32(mixed)
    assert {lyr.dtype_policy.name for lyr in f32.layers} == {"float32"}
    # Same weights in float32 -> the float32 twin's predictions.
    np.testing.assert_allclose(f32.predict_on_batch(images), members["Small0"].predict_on_batch(images),
                               atol=1e-6)
    assert export._as_float32(members["Small0"]) is members["Small0"]


def test_cli_export(members, tmp_path, capsys):
    run = tmp_path / "run"
    save_model_atomic(members["Small1"], run / "models" / "Small1" / "model.keras")
    rc = cli.main(["export", "--run-dir", str(run), "--model", "Small1", "--out", str(tmp_path / "exp"),
                   "--formats", "tflite", "--verify-n", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "max |export - keras|" in out and "tflite" in out
    assert (tmp_path / "exp" / "model.tflite").is_file()
    # TFLite alone: its intermediate SavedModel is not left behind, nor any temp file.
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["export.json", "model.tflite"]
    assert cli.main(["export", "--run-dir", str(run), "--model", "Nope", "--out", str(tmp_path / "e2")]) == 2
    assert "holds no model.keras" in capsys.readouterr().err
