"""Atomic file writes, shared by every module that writes results.

A crash or a kill must never leave a half-written file under its final name: data goes to a
uniquely named temporary file in the same folder, then ``os.replace`` (atomic on POSIX and
Windows) moves it into place. The temporary file is opened normally, not with ``mkstemp``, so
the result gets the usual umask permissions.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def atomic_open(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at ``path`` only if the block completes.

    For writers that stream into a file (``np.savez``) instead of building the bytes first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}{suffix}")
    try:
        with open(tmp, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, suffix: str = ".tmp") -> Path:
    """Write ``data`` to ``path`` atomically (parent folders created); return the path."""
    with atomic_open(path, suffix=suffix) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))
