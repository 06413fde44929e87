"""Atomic file writes, shared by every module that writes results.

A crash or a kill must never leave a half-written file under its final name: data goes to a
uniquely named temporary file in the same folder, then ``os.replace`` (atomic on POSIX and
Windows) moves it into place. The temporary file is opened normally, not with ``mkstemp``, so
the result gets the usual umask permissions.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, suffix: str = ".tmp") -> Path:
    """Write ``data`` to ``path`` atomically (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}{suffix}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))
