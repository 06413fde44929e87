"""Tests for data-parallel training (covidlib.distribute, issue #15), on CPU only.

Engines need fresh processes (logical TensorFlow devices and a multi-worker strategy are set up
before TensorFlow starts; JAX's device count comes from ``XLA_FLAGS`` at import), so each engine
trains in subprocesses: SmallCNN at 32 px on the tiny synthetic CT set (train 18 / val 9 /
test 9 images). TensorFlow runs go without augmentation and dropout (each TensorFlow replica draws
its own random numbers); JAX runs with both (its sharded program draws the single-device ones).

Tolerance of the loss comparisons: data-parallel training computes the same global-batch
gradient and the same global batch-norm statistics as one device, but sums in another order
(per replica, then across replicas; synchronized batch norm as E[x^2] - E[x]^2). That moves
float32 results in their last digits: over 2 epochs (6 Adam steps) the per-epoch values differed
by at most 2.4e-7 (TensorFlow, mirrored and two workers) and 3.6e-7 (JAX) on values near 1.
``TOL`` (relative 1e-4) leaves room for other CPUs' summation orders and still fails on any real
difference (replica-local batch norm instead raised the first epoch's loss by 19%).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Per-epoch loss / val_loss / val_auc: data-parallel vs one device (see the module docstring).
TOL = dict(rtol=1e-4, atol=1e-6)
COLUMNS = ("loss", "val_loss", "val_auc")

CHILD = r"""
import json, os, sys, warnings
warnings.simplefilter("ignore")
import keras
import numpy as np
import pandas as pd
from covidlib import train as T
from covidlib.models import load_model

spec = json.loads(sys.argv[1])
manifest = pd.read_csv(spec["manifest"], dtype={"patient_id": str}, keep_default_na=False)

class Kill(keras.callbacks.Callback):
    def __init__(self, n):
        super().__init__()
        self.n, self.seen = n, 0
    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen >= self.n:
            raise KeyboardInterrupt

out = {}
for run in spec["runs"]:
    noise = run.get("noise", False)  # augmentation and dropout
    # The curves agree up to float reduction order; a fixed, moderate learning rate keeps two
    # epochs from amplifying that beyond TOL (at 3e-3 this tiny model's val_loss drifts 3e-4).
    cfg = T.TrainConfig(backbone="SmallCNN", img_size=32, epochs=2, batch_size=run["batch"],
                        augment=noise, dropout=0.3 if noise else 0.0, tensorboard=False, seed=0,
                        learning_rate=1e-3, distribute=run["distribute"], name=run["name"])
    if run.get("kill"):
        try:
            T.train(manifest, spec["run_dir"], cfg, verbose=0, extra_callbacks=[Kill(run["kill"])])
        except KeyboardInterrupt:
            pass
    res = T.train(manifest, spec["run_dir"], cfg, verbose=0)
    d = res.model_dir
    store = T.build_store(manifest, 32, os.path.join(spec["run_dir"], "cache"))
    x = np.asarray(store.images)[:9, ..., None]
    out[run["name"]] = {
        "history": {c: res.history[c].tolist() for c in ("loss", "val_loss", "val_auc")},
        "files": sorted(p.name for p in d.iterdir()),
        "config": json.loads((d / "config.json").read_text()),
        "resumed": res.resumed,
        "same_predictions": bool(np.allclose(load_model(d / "model.keras").predict_on_batch(x),
                                             res.model.predict_on_batch(x), atol=1e-5)),
    }
print("RESULT " + json.dumps(out))
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home"), "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu", "KERAS_BACKEND": "tensorflow"}
    for key in ("TF_CONFIG", "XLA_FLAGS", "KERAS_DISTRIBUTION_JOB_ADDRESSES",
                "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID",
                "JAX_COORDINATOR_ADDRESS", "COVIDLIB_TF_LOGICAL_CPUS"):
        env.pop(key, None)
    env.update(extra)
    return env


def _spec(manifest, tmp_path: Path, runs: list[dict]) -> str:
    csv = tmp_path / "manifest.csv"
    if not csv.exists():
        manifest.to_csv(csv, index=False)
    return json.dumps({"manifest": str(csv), "run_dir": str(tmp_path / "run"), "runs": runs})


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _children(jobs: list[tuple[str, dict]], cwd: Path, timeout: int = 300) -> list[dict]:
    """Run ``CHILD`` once per ``(spec, env)``, all at once (the workers of one cluster); the
    results, in order."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, spec], env=env, cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for spec, env in jobs]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [_result(subprocess.CompletedProcess(p.args, p.returncode, out, err))
            for p, (out, err) in zip(procs, outs)]


def _assert_same_curve(got: dict, ref: dict) -> None:
    for col in COLUMNS:
        np.testing.assert_allclose(got["history"][col], ref["history"][col], err_msg=col, **TOL)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------ in-process: no engine


def test_choices_are_checked_against_the_backend():
    from covidlib import distribute

    for choice, backend in [("mirrored", "tensorflow"), ("multiworker", "tensorflow"),
                            ("jax_dataparallel", "jax"), ("auto", "torch"), ("off", "jax")]:
        distribute.check_choice(choice, backend)
    with pytest.raises(ValueError, match="needs KERAS_BACKEND=jax") as err:
        distribute.check_choice("jax_dataparallel", "tensorflow")
    assert "\n" not in str(err.value) and "mirrored or multiworker" in str(err.value)
    with pytest.raises(ValueError, match="needs KERAS_BACKEND=tensorflow"):
        distribute.check_choice("mirrored", "jax")
    with pytest.raises(ValueError, match="distribute must be one of"):
        distribute.check_choice("horovod", "tensorflow")


def test_train_config_validates_distribute():
    import keras

    from covidlib.train import TrainConfig

    other = "jax_dataparallel" if keras.backend.backend() == "tensorflow" else "mirrored"
    with pytest.raises(ValueError, match="needs KERAS_BACKEND"):
        TrainConfig(backbone="SmallCNN", distribute=other).validate()
    if keras.backend.backend() == "tensorflow":
        with pytest.raises(ValueError, match="jit_compile='on'"):
            TrainConfig(backbone="SmallCNN", distribute="mirrored", jit_compile="on").validate()
    TrainConfig(backbone="SmallCNN", distribute="auto").validate()


def test_off_and_auto_without_accelerators_train_on_one_device():
    from covidlib import distribute

    for choice in ("off", "auto"):  # this machine has no GPU
        plan = distribute.plan(choice)
        assert (plan.mode, plan.replicas, plan.workers, plan.is_chief) == ("off", 1, 1, True)
        assert plan.loader_options(True) == {} and plan.record(32)["global_batch"] == 32


def test_loader_shards_split_each_global_batch_without_copying():
    from covidlib.arraystore import ArrayLoader

    images = np.arange(11 * 2 * 2, dtype=np.uint8).reshape(11, 2, 2)
    labels = np.arange(11) % 3
    whole = ArrayLoader(images, labels, 3, 4, shuffle=True, seed=1)
    even = ArrayLoader(images, labels, 3, 4, shuffle=True, seed=1, multiple=2)
    parts = [ArrayLoader(images, labels, 3, 4, shuffle=True, seed=1, multiple=2, shard=(k, 2))
             for k in range(2)]
    assert all(p.images is images for p in parts)  # a view of the store, never a copy
    # 11 images, global batch 4: 4 + 4 + 3, the last cut to 2 so it splits over 2 devices
    assert len(whole) == len(even) == len(parts[0]) == 3
    for i in range(3):
        x, y = even[i]
        got = [p[i] for p in parts]
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), x)
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), y)
        full = whole[i][0]
        if i < 2:
            np.testing.assert_array_equal(x, full)
        else:  # 2 of the 3 images, the one left out is the last of this epoch's order
            assert len(x) == 2 and set(x[:, 0, 0, 0]) < set(full[:, 0, 0, 0])
    # evaluation: the last batch padded with zero-weight copies instead
    ev = ArrayLoader(images, labels, 3, 4, multiple=2, pad=True)
    x, y, w = ev[2]
    assert len(x) == 4 and w.tolist() == [1, 1, 1, 0]
    np.testing.assert_array_equal(x[3], x[2])
    with pytest.raises(ValueError, match="multiple"):
        ArrayLoader(images, labels, 3, 3, multiple=2)


def test_runs_saved_before_distribute_existed_still_match():
    from covidlib import train

    old = {"backbone": "SmallCNN", "batch_size": 32, "keras_version": "3.0"}
    new = {**old, "distribute": "off", "distribute_mode": "off", "replicas": 1, "workers": 1,
           "global_batch": 32, "lr_rule": train.distribute.LR_RULE, "keras_version": "3.15"}
    assert train._same_run(old, new)
    # the layout of the replicas does not matter, their number does
    assert train._same_run({**new, "distribute": "auto", "workers": 2}, new)
    assert not train._same_run({**new, "replicas": 2, "global_batch": 64}, new)


# ------------------------------------------------------------------ subprocesses: engines


@pytest.fixture(scope="module")
def tf_runs(tmp_path_factory, tiny_ct_manifest_session):
    """One process, 2 logical CPU devices: mirrored (also killed and resumed), then one device."""
    tmp = tmp_path_factory.mktemp("tf")
    runs = [{"name": "mirrored", "distribute": "mirrored", "batch": 3},
            {"name": "mirrored_resumed", "distribute": "mirrored", "batch": 3, "kill": 4},
            {"name": "single", "distribute": "off", "batch": 6}]
    spec = _spec(tiny_ct_manifest_session, tmp, runs)
    return _children([(spec, _env(tmp, COVIDLIB_TF_LOGICAL_CPUS="2"))], tmp)[0]


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_matches_one_device(tf_runs):
    got, ref = tf_runs["mirrored"], tf_runs["single"]
    cfg = got["config"]
    assert (cfg["distribute"], cfg["replicas"], cfg["global_batch"]) == ("mirrored", 2, 6)
    assert cfg["lr_rule"].startswith("none")  # the learning rate is not scaled with replicas
    assert cfg["learning_rate"] == ref["config"]["learning_rate"]
    _assert_same_curve(got, ref)
    assert "model.keras" in got["files"] and "backup" not in got["files"]
    assert got["same_predictions"]


@pytest.mark.slow
def test_mirrored_run_killed_mid_epoch_resumes_to_the_same_curve(tf_runs):
    got = tf_runs["mirrored_resumed"]
    assert got["resumed"]
    _assert_same_curve(got, tf_runs["mirrored"])


@pytest.mark.slow
def test_jax_dataparallel_on_two_host_devices_matches_one_device(tmp_path,
                                                                 tiny_ct_manifest_session):
    import jax  # noqa: F401 - a dev dependency: a broken install fails here instead of skipping
    # 6 validation and 6 test images (one of each class fewer): JAX splits every batch evenly
    # over its devices, and 9 would need a zero-weight copy in the last validation batch, which
    # val_auc counts (see covidlib.arraystore.ArrayLoader). One batch shape also means fewer compiles.
    m = tiny_ct_manifest_session
    manifest = m.drop(m[m["split"] != "train"].groupby(["split", "label"]).tail(1).index)
    # XLA ends the process when a device waits over 40 s at an all-reduce for the other one,
    # which a loaded 2-core machine (the suite runs on two workers) can exceed: seen once in CI.
    env = _env(tmp_path, KERAS_BACKEND="jax",
               XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                         "--xla_cpu_collective_call_terminate_timeout_seconds=600")
    runs = [{"name": "dataparallel", "distribute": "jax_dataparallel", "batch": 3, "noise": True},
            {"name": "single", "distribute": "off", "batch": 6, "noise": True}]
    res = _children([(_spec(manifest, tmp_path, runs), env)], tmp_path)[0]
    got, ref = res["dataparallel"], res["single"]
    assert (got["config"]["replicas"], got["config"]["global_batch"]) == (2, 6)
    _assert_same_curve(got, ref)
    assert got["same_predictions"]


@pytest.mark.slow
def test_two_tf_workers_on_localhost_write_one_model(tmp_path, tiny_ct_manifest_session, tf_runs):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    spec = _spec(tiny_ct_manifest_session, tmp_path,
                 [{"name": "multiworker", "distribute": "multiworker", "batch": 3}])
    results = _children([(spec, _env(tmp_path, TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}}))) for i in range(2)],
        tmp_path, timeout=240)
    models = list((tmp_path / "run").rglob("*.keras"))
    assert [m.relative_to(tmp_path / "run").as_posix() for m in models] == \
        ["models/multiworker/model.keras"]
    got = results[0]["multiworker"]
    assert (got["config"]["workers"], got["config"]["replicas"]) == (2, 2)
    assert results[1]["multiworker"]["history"] == got["history"]  # both return the chief's run
    _assert_same_curve(got, tf_runs["single"])
