"""Atomic writes: all or nothing under the final name, parents made, umask respected."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from covidlib import fsutil


def test_writes_bytes_and_buffers_and_makes_parents(tmp_path):
    p = tmp_path / "a" / "b" / "out.bin"
    assert fsutil.atomic_write_bytes(p, b"hello") == p
    assert p.read_bytes() == b"hello"
    arr = np.arange(10, dtype=np.uint16)  # any buffer, written as its raw bytes
    fsutil.atomic_write_bytes(p, arr)
    assert p.read_bytes() == arr.tobytes()
    assert sorted(os.listdir(p.parent)) == ["out.bin"]  # no temporary file left


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        p = fsutil.atomic_write_bytes(tmp_path / "x.txt", b"x")
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o640


def test_failed_replace_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    p = tmp_path / "keep.txt"
    p.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(OSError, match="disk went away"):
        fsutil.atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_temporary_names_are_unique_across_threads(tmp_path):
    names: list[str] = []
    lock = threading.Lock()

    def grab():
        mine = [fsutil._tmp_path(str(tmp_path / "f.png"), ".tmp") for _ in range(500)]
        with lock:
            names.extend(mine)

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == len(names) == 2000
    assert all(os.path.basename(n).startswith(".f.png.") for n in names)


def test_atomic_open_streams_and_cleans_up_on_error(tmp_path):
    p = tmp_path / "s" / "w.npz"
    with fsutil.atomic_open(p) as fh:
        np.savez(fh, a=np.ones(3))
    assert np.load(p)["a"].sum() == 3
    with pytest.raises(RuntimeError):
        with fsutil.atomic_open(p) as fh:
            fh.write(b"partial")
            raise RuntimeError("stop")
    assert np.load(p)["a"].sum() == 3
    assert os.listdir(p.parent) == ["w.npz"]



def test_atomic_path_replaces_files_and_folders_only_when_complete(tmp_path):
    out = tmp_path / "export" / "saved_model"
    with fsutil.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "v1").write_text("1")
    with fsutil.atomic_path(out) as tmp:  # a folder over a non-empty folder
        tmp.mkdir()
        (tmp / "v2").write_text("2")
    assert os.listdir(out) == ["v2"]
    with pytest.raises(RuntimeError):
        with fsutil.atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "v3").write_text("3")
            raise RuntimeError("writer failed")
    assert os.listdir(out) == ["v2"] and os.listdir(out.parent) == ["saved_model"]
    with fsutil.atomic_path(tmp_path / "m.onnx", suffix=".onnx") as tmp:
        assert tmp.name.endswith(".onnx") and tmp.parent == tmp_path
        tmp.write_bytes(b"onnx")
    assert (tmp_path / "m.onnx").read_bytes() == b"onnx"


def test_stderr_to_redirects_file_descriptor_2(tmp_path):
    log = tmp_path / "stderr.log"
    before = os.fstat(2)
    with fsutil.stderr_to(log):
        os.write(2, b"from C++\n")  # what a C library or a child process writes
    with fsutil.stderr_to(log):
        os.write(2, b"appended\n")
    with pytest.raises(ValueError):
        with fsutil.stderr_to(os.devnull):
            raise ValueError("still raised")
    with fsutil.stderr_to(None):
        pass
    assert log.read_bytes() == b"from C++\nappended\n"
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)  # restored

# --------------------------------------------------------------------------- output paths (issue #13)
def test_check_output_path_refuses_inputs_folders_and_scans(tmp_path):
    data = tmp_path / "data"
    (data / "COVID").mkdir(parents=True)
    scan = data / "COVID" / "a.png"
    scan.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
    check = fsutil.check_output_path
    with pytest.raises(fsutil.UnsafeOutputError, match="is an input file"):
        check(scan, [scan], allow_inside_input=True)  # never, even when allowed
    with pytest.raises(fsutil.UnsafeOutputError, match="is the input folder"):
        check(data, [data], kind="dir", allow_inside_input=True)
    with pytest.raises(fsutil.UnsafeOutputError, match="lies inside the input folder"):
        check(data / "COVID" / "out", [data], kind="dir")
    with pytest.raises(fsutil.UnsafeOutputError, match="holds the input folder"):
        check(tmp_path, [data / "COVID"], kind="dir")
    with pytest.raises(fsutil.UnsafeOutputError, match="inside the folder holding the input"):
        check(data / "COVID" / "p.csv", [scan])
    with pytest.raises(fsutil.UnsafeOutputError, match="is a folder"):
        check(data, [])
    with pytest.raises(fsutil.UnsafeOutputError, match="is a file, not a folder"):
        check(scan, [], kind="dir")
    with pytest.raises(fsutil.UnsafeOutputError, match="not a text file"):
        check(scan, [], text=True)
    with pytest.raises(fsutil.UnsafeOutputError, match="is a file, so no folder"):
        check(scan / "x.csv", [])
    # allowed: outside the data, or inside it when asked; an old CSV may be replaced by a CSV
    assert check(tmp_path / "out" / "p.csv", [data]) == tmp_path / "out" / "p.csv"
    assert check(data / "enh", [data], kind="dir", allow_inside_input=True) == data / "enh"
    (tmp_path / "old.csv").write_text("path,label\n")
    assert check(tmp_path / "old.csv", [data], text=True) == tmp_path / "old.csv"
    # a missing input protects nothing; a symbolic link to the data is the data
    assert check(tmp_path / "x.csv", [tmp_path / "missing.png"]) == tmp_path / "x.csv"
    (tmp_path / "alias").symlink_to(data)
    with pytest.raises(fsutil.UnsafeOutputError, match="lies inside"):
        check(tmp_path / "alias" / "p.csv", [data])


def test_check_output_path_not_writable(tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if os.fspath(p) == str(tmp_path) else real(p, m))
    with pytest.raises(PermissionError, match="is not writable"):
        fsutil.check_output_path(tmp_path / "new" / "p.csv")
