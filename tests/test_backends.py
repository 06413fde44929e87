"""The same covidlib training path runs on every installed Keras backend.

Keras picks its backend once per process (``KERAS_BACKEND``), so each backend runs in its own
subprocess: build a SmallCNN with :func:`covidlib.models.build_model`, train one epoch on a
tiny synthetic store through :class:`covidlib.arraystore.ArrayLoader`, predict; then run
:func:`covidlib.train.train` end to end (augmentation, every callback, saving). A backend whose
package is not installed (``torch`` is an optional extra) is skipped, not failed.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_CODE = 77  # the child's exit status when the backend package is missing

CHILD = r"""
import importlib, json, os, sys

backend = os.environ["KERAS_BACKEND"]
try:
    importlib.import_module(backend)
except ImportError as exc:
    print(f"{backend} is not installed: {exc}", file=sys.stderr)
    sys.exit(%(skip)d)

import numpy as np
import keras

from covidlib import config
from covidlib.arraystore import ArrayLoader, build_store
from covidlib.datasets import read_manifest
from covidlib.models import build_model
from covidlib.synthetic import write_synthetic_dataset

assert keras.backend.backend() == backend, keras.backend.backend()
tmp = sys.argv[1]
manifest = read_manifest(write_synthetic_dataset(os.path.join(tmp, "data"), n_patients=3,
                                                 slices_per_patient=2, size=48))
store = build_store(manifest, 48, os.path.join(tmp, "cache"))
classes = config.ordered_classes(manifest["label"].unique())
# batch 6: 18 images make 3 full batches, so JAX compiles one train-step shape, not two
loader = ArrayLoader(store.images, store.labels(classes), len(classes), 6, shuffle=True, seed=0)
keras.utils.set_random_seed(0)
model = build_model("SmallCNN", len(classes), 48, augment=True, seed=0)
model.compile(optimizer="adam", loss="categorical_crossentropy")
history = model.fit(loader, epochs=1, verbose=0)
probs = np.asarray(model.predict(np.asarray(store.images)[..., None], verbose=0))
# and the whole of covidlib.train.train: loaders, augmentation, every callback, saving
from covidlib import train as T
run = T.train(manifest, os.path.join(tmp, "run"), T.TrainConfig(
    backbone="SmallCNN", img_size=48, epochs=2, batch_size=6, tensorboard=False, seed=0), verbose=0)
print("RESULT " + json.dumps({
    "train_epochs": int(len(run.history)),
    "train_files": sorted(p.name for p in run.model_dir.iterdir()),
    "backend": keras.backend.backend(), "n": int(len(store.images)), "classes": classes,
    "loss": float(history.history["loss"][-1]), "shape": list(probs.shape),
    "sums": probs.sum(axis=1).astype(float).tolist(), "finite": bool(np.isfinite(probs).all()),
}))
""" % {"skip": SKIP_CODE}


@pytest.mark.slow
# torch is an optional extra (pip install "covidlib[torch]"): its wheel is large, so CI may skip it.
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_train_one_epoch_on_backend(backend: str, tmp_path: Path) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"Keras backend {backend!r}: the {backend} package is not installed")
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "KERAS_HOME": str(tmp_path / "keras_home"),  # no writes to the user's ~/.keras
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == SKIP_CODE:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"{backend} run failed:\n{proc.stderr[-4000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    assert res["backend"] == backend
    assert res["n"] == 18 and len(res["classes"]) == 3  # 3 classes x 3 patients x 2 slices
    assert math.isfinite(res["loss"])
    assert res["shape"] == [res["n"], 3]
    assert res["finite"]
    assert all(abs(s - 1.0) < 1e-4 for s in res["sums"])
    assert res["train_epochs"] == 2
    assert {"model.keras", "best.weights.npz", "history.csv", "predictions_test.csv",
            "done.json"} <= set(res["train_files"])


DONATION_CHILD = r"""
import sys
import numpy as np
import keras
from covidlib.callbacks import BestWeights, load_best_weights

model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()])
cb = BestWeights(sys.argv[1])
cb.set_model(model)
cb.on_epoch_end(0, {"val_auc": 0.7})  # first improvement: allocates the copy
for w in model.weights:
    w.assign(np.random.default_rng(0).normal(size=w.shape).astype("float32"))
cb.on_epoch_end(1, {"val_auc": 0.8})  # later improvement: reuses it
expected = model.get_weights()
# What a JAX train step on a GPU does to the model's variables: their buffers are donated to
# the step, i.e. deleted, and the variables get new ones. The best copy must not be among them.
for w in model.weights:
    w.value.delete()
    w.assign(np.zeros(w.shape, "float32"))
cb.flush()
load_best_weights(model, sys.argv[1])
assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), expected)), "best copy changed"
print("OK")
"""


def test_best_weights_keep_their_own_buffers_when_jax_donates_the_models(tmp_path: Path) -> None:
    """On a GPU, Keras' JAX trainer donates the variables' buffers to each train step (CPU does
    not donate, so training tests never see it). Seen on an H200: the best-weights copy shared
    the model's buffers and the end of training failed with 'Array has been deleted'."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "KERAS_HOME": str(tmp_path / "keras_home"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", DONATION_CHILD, str(tmp_path / "best.weights.npz")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
