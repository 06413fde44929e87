"""Issue #13: data is never destroyed or polluted, readers have limits, model folders are checked,
resume notices changed inputs, workers die with their parent, full / read-only outputs fail fast.

The corpus of cases lives in ``tests/malformed.py`` (:data:`SAFETY_CASES`): each names its input
(written by the test itself), the ``covidlib`` command, the one-line error or the reported
reason, and the inputs whose bytes must not change. Running as root, permissions cannot make a
folder unreadable or read-only, so those cases patch ``os.scandir`` / ``os.listdir`` (raise
PermissionError for one folder) or ``os.access`` (say "not writable"); a full disk is a patched
PNG write raising ENOSPC. :func:`test_unreadable_folder_with_real_permissions` runs the real
thing when not root.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pandas as pd
import pytest

try:
    from malformed import (SAFETY_CASES, _bad_inputs, _texture, snapshot, tree_snapshot, write_image,
                           write_scan_tree, write_tiny_run)
except ImportError:  # tests/ made into a package
    from tests.malformed import (SAFETY_CASES, _bad_inputs, _texture, snapshot, tree_snapshot,
                                 write_image, write_scan_tree, write_tiny_run)

from covidlib import cli, datasets, enhance, enhance_batch, predict  # noqa: E402

# Keras' own saving code trips numpy 2's copy-keyword deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("tiny_run"))


# --------------------------------------------------------------------------- simulated failures
def _unreadable(monkeypatch, folder: Path) -> None:
    """Listing ``folder`` raises PermissionError, as for a folder without read permission."""
    target = os.path.realpath(folder)
    real_scandir, real_listdir = os.scandir, os.listdir

    def guard(fn):
        def wrapped(path="."):
            if os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else ".") == target:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return fn(path)
        return wrapped

    monkeypatch.setattr(os, "scandir", guard(real_scandir))
    monkeypatch.setattr(os, "listdir", guard(real_listdir))


def _read_only(monkeypatch, folder: Path) -> None:
    target = os.path.realpath(folder)
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if os.path.realpath(path) == target and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def _disk_full_after(monkeypatch, n: int) -> None:
    """The first ``n`` PNG writes of the enhancement pass succeed, the next ones hit a full disk."""
    real = enhance_batch._atomic_write_bytes
    done = [0]

    def write(path, data):
        if str(path).endswith(".png"):
            if done[0] >= n:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            done[0] += 1
        real(path, data)

    monkeypatch.setattr(enhance_batch, "_atomic_write_bytes", write)


def _apply(patch: str | None, root: Path, monkeypatch) -> None:
    if patch is None:
        return
    kind, arg = patch.split(":", 1)
    if kind == "unreadable":
        _unreadable(monkeypatch, root / arg)
    elif kind == "readonly":
        _read_only(monkeypatch, root / arg)
    elif kind == "enospc-after":
        _disk_full_after(monkeypatch, int(arg))
    else:  # pragma: no cover - a typo in the corpus
        raise AssertionError(patch)


# --------------------------------------------------------------------------- the corpus
@pytest.mark.parametrize("case", SAFETY_CASES, ids=lambda c: c.id)
def test_safety_case(case, tiny_run, tmp_path, monkeypatch, capsys):
    root = tmp_path / "case"
    shutil.copytree(tiny_run, root / "run")
    case.setup(root)
    before = {rel: snapshot(root / rel) for rel in case.inputs}
    argv = [a.format(root=root) for a in case.argv]
    _apply(case.patch, root, monkeypatch)
    rc = cli.main(argv)
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith(f"covidlib {argv[0]}: error:")]
    if case.expect is None:
        assert rc == 0 and not errors, err[-2000:]
    else:
        assert rc == 2 and len(errors) == 1, err[-2000:]  # one line, nothing else
        assert re.search(case.expect, errors[0]), errors[0]
    if case.rows:
        df = pd.read_csv(root / "pred.csv", keep_default_na=False).set_index("path")
        for rel, pattern in case.rows:
            reason = df.loc[str(root / rel), "error"]
            assert re.search(pattern, reason), (rel, reason)
            assert df.loc[str(root / rel), "prediction"] == ""  # refused: no class, no probability
    for rel, pattern in case.files:
        text = (root / rel).read_text()
        assert re.search(pattern, text), (rel, text)
    if case.stdout:
        assert re.search(case.stdout, out), out[-3000:]
    for rel, snap in before.items():
        assert snapshot(root / rel) == snap, f"{rel} changed"


def test_the_corpus_covers_every_surface():
    surfaces = {c.surface for c in SAFETY_CASES}
    assert surfaces == {"output", "readers", "folders", "model", "fail fast"}
    assert len({c.id for c in SAFETY_CASES}) == len(SAFETY_CASES)


# --------------------------------------------------------------------------- predict == ingest
def test_predict_refuses_exactly_what_ingest_quarantines(tiny_run, tmp_path, monkeypatch):
    """The same files, the same reasons: predict applies ingestion's checks."""
    monkeypatch.setenv("COVIDLIB_DATA", str(tmp_path / "work"))
    root = tmp_path / "d"
    write_scan_tree(root)
    _bad_inputs(root)
    bad = root / "data" / "bad"
    for p in list(bad.iterdir()):  # ingest needs the files inside class folders
        p.rename(root / "data" / "COVID" / p.name)
    bad.rmdir()
    before = tree_snapshot(root)
    ingested = datasets.ingest(root / "data", work_dir=tmp_path / "work")
    quarantined = {Path(q["path"]).name: q["reason"] for q in ingested.quarantine}
    df = predict.predict_paths(root / "data", tiny_run)
    refused = {Path(p).name: e for p, e in zip(df["path"], df["error"]) if e}
    assert set(refused) == set(quarantined) and len(refused) == 8, (refused, quarantined)
    for name, reason in refused.items():
        # ingest converts DICOM / NIfTI first: same check, its reason names the same problem
        assert reason == quarantined[name] or reason.split(";")[0] in quarantined[name], name
    assert tree_snapshot(root) == before


# --------------------------------------------------------------------------- resume and caches
def _png_stamp_free(p: Path) -> bytes:
    import cv2

    return cv2.imdecode(np.fromfile(str(p), np.uint8), cv2.IMREAD_UNCHANGED).tobytes()


def test_enhance_resume_redoes_outputs_whose_source_changed(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_image(src / "a.png", _texture(96, seed=1))
    write_image(src / "b.png", _texture(96, seed=2))
    s1 = enhance_batch.enhance_tree(src, dst, workers=1, progress=False)
    assert s1["written"] == 2 and s1["redone"] == 0
    old_a, stamp_b = _png_stamp_free(dst / "a.png"), (dst / "b.png").stat().st_mtime_ns
    # a.png replaced by another scan under the same name (different size and mtime)
    time.sleep(0.01)
    write_image(src / "a.png", _texture(120, seed=7))
    before = tree_snapshot(src)
    s2 = enhance_batch.enhance_tree(src, dst, workers=1, progress=False)
    assert s2["written"] == 1 and s2["redone"] == 1 and s2["skipped"] == 1
    assert _png_stamp_free(dst / "a.png") != old_a
    assert (dst / "b.png").stat().st_mtime_ns == stamp_b  # unchanged source: output untouched
    s3 = enhance_batch.enhance_tree(src, dst, workers=1, progress=False)
    assert s3["written"] == 0 and s3["skipped"] == 2
    assert tree_snapshot(src) == before


def test_training_cache_notices_a_replaced_source(tmp_path):
    """``RUN_DIR/enhanced`` goes through enhance_manifest: same stamps, same redo."""
    from covidlib.train import enhanced_manifest

    src = tmp_path / "data"
    rows = []
    for i, label in enumerate(["covid", "normal"]):
        write_image(src / label / f"p{i}.png", _texture(80, seed=i))
        rows.append({"path": str(src / label / f"p{i}.png"), "label": label, "patient_id": f"p{i}",
                     "split": "train", "source": "unit", "modality": "ct"})
    man = pd.DataFrame(rows)
    out, _ = enhanced_manifest(man, tmp_path / "run", "crop+wb+clahe", "ct", workers=1, progress=False)
    first = {p: _png_stamp_free(Path(p)) for p in out["path"]}
    time.sleep(0.01)
    write_image(src / "covid" / "p0.png", _texture(100, seed=9))
    out2, _ = enhanced_manifest(man, tmp_path / "run", "crop+wb+clahe", "ct", workers=1, progress=False)
    s = out2.attrs["enhance_summary"]
    assert s["redone"] == 1 and s["written"] == 1
    changed = [p for p in out2["path"] if _png_stamp_free(Path(p)) != first[p]]
    assert [Path(p).name for p in changed] == ["p0.png"]


def test_fatal_write_error_stops_a_chunk(tmp_path, monkeypatch):
    """In a worker: the first ENOSPC ends the chunk with a "fatal" result, not one failure per file."""
    for i in range(3):
        write_image(tmp_path / "in" / f"{i}.png", _texture(64, seed=i))
    _disk_full_after(monkeypatch, 1)
    tasks = [(str(tmp_path / "in" / f"{i}.png"), str(tmp_path / "out" / f"{i}.png"), None, "ct") for i in range(3)]
    cfg = enhance.pipeline_config("crop")
    res = enhance_batch._process_chunk(tasks, cfg["steps"], cfg["params"])
    assert [r[0] for r in res] == ["written", "fatal"]
    assert "No space left on device" in res[1][1]


# --------------------------------------------------------------------------- worker lifetime
_KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from covidlib import enhance_batch as E

_run = E._run_steps


def slow(*args):  # each image takes 50 ms: the pass is still running when its caller is killed
    time.sleep(0.05)
    return _run(*args)


E._run_steps = slow  # module level: the spawned workers run this too

if __name__ == "__main__":
    E.enhance_tree({src!r}, {dst!r}, workers=2, progress=False)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as fh:
            out += [int(c) for c in fh.read().split()]
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_enhance_workers_end_when_their_parent_is_killed(tmp_path):
    for i in range(60):
        write_image(tmp_path / "src" / f"{i}.png", _texture(64, seed=i))
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(repo=str(REPO), src=str(tmp_path / "src"), dst=str(tmp_path / "dst")))
    proc = subprocess.Popen([sys.executable, str(script)],
                            stderr=subprocess.DEVNULL)  # its resource tracker reports leaks on kill
    pids: list[int] = []
    try:
        deadline = time.time() + 120  # killed mid-pass, once outputs appear
        while time.time() < deadline and proc.poll() is None and not list((tmp_path / "dst").rglob("*.png")):
            time.sleep(0.02)
        pids = _children(proc.pid)  # the workers (and multiprocessing's resource tracker)
        assert len(pids) >= 2, pids
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)], "enhance workers outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in pids:  # only the processes this test started
            if _alive(p):
                os.kill(p, signal.SIGKILL)


# --------------------------------------------------------------------------- real permissions
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads chmod-000 folders; the corpus simulates them instead")
def test_unreadable_folder_with_real_permissions(tmp_path):
    data = write_scan_tree(tmp_path)
    locked = data / "NonCOVID" / "batch2"
    locked.chmod(0)
    try:
        s = enhance_batch.enhance_tree(data, tmp_path / "enh", workers=1, progress=False)
        assert s["unreadable_folders"] == [str(locked)]
        unreadable: dict = {}
        files, _ = predict.expand_paths([data], unreadable)
        assert locked in unreadable and locked in files
    finally:
        locked.chmod(0o755)
