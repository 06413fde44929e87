"""Atomic file writes, shared by every module that writes results.

A crash or a kill must never leave a half-written file under its final name: data goes to a
uniquely named temporary file in the same folder, then ``os.replace`` (atomic on POSIX and
Windows) moves it into place. The temporary file is created with mode 0o666 (not with
``mkstemp``'s 0o600), so the result gets the usual umask permissions.
"""
from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

# pid + a per-import random token + a counter: unique across processes, threads (next() on
# itertools.count is atomic under the GIL) and hosts sharing a network folder, without the
# getrandom() call per file that uuid4 costs.
_TOKEN = os.urandom(4).hex()
_COUNTER = itertools.count()
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _tmp_path(path: str, suffix: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{os.getpid()}.{_TOKEN}{next(_COUNTER)}{suffix}")


@contextmanager
def atomic_open(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at ``path`` only if the block completes.

    For writers that stream into a file (``np.savez``) instead of building the bytes first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(_tmp_path(str(path), suffix))
    try:
        with open(tmp, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, suffix: str = ".tmp") -> Path:
    """Write ``data`` to ``path`` atomically (parent folders created); return the path.

    Plain ``os`` calls: create, write, close, rename. The batch enhancement pass writes
    thousands of small files, and ``open()``'s extra fstat / lseek / ioctl calls and a mkdir
    per file were a measurable share of its kernel time. Parents are made only when missing.
    """
    dst = os.fspath(path)
    tmp = _tmp_path(dst, suffix)
    try:
        fd = os.open(tmp, _CREATE_FLAGS, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(tmp) or ".", exist_ok=True)
        fd = os.open(tmp, _CREATE_FLAGS, 0o666)
    try:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        while view:
            view = view[os.write(fd, view) :]
        os.close(fd)
        fd = -1
        os.replace(tmp, dst)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return Path(dst)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))
