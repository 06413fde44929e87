"""Atomic file writes and safe file names, shared by every module that writes results.

A crash or a kill must never leave a half-written file under its final name: data goes to a
uniquely named temporary file in the same folder, then ``os.replace`` (atomic on POSIX and
Windows) moves it into place. The temporary file is created with mode 0o666 (not with
``mkstemp``'s 0o600), so the result gets the usual umask permissions. :func:`atomic_path` does
the same for writers that want a name (a SavedModel folder, an ONNX file).

:func:`check_output_path` is the one rule for where a command may write, checked before any work:
never over an input, never a file where a folder is (or the reverse), never a text result over a
scan, never into / beside the inputs unless the user asked explicitly (``--allow-inside-input``),
never into a folder that cannot be written.

:func:`slug` turns any text (a data set folder, an image key) into a safe file-name part.
:func:`stderr_to` sends file descriptor 2 elsewhere for a while (C++ start-up noise).
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

# pid + a per-import random token + a counter: unique across processes, threads (next() on
# itertools.count is atomic under the GIL) and hosts sharing a network folder, without the
# getrandom() call per file that uuid4 costs.
_TOKEN = os.urandom(4).hex()
_COUNTER = itertools.count()
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _tmp_path(path: str, suffix: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{os.getpid()}.{_TOKEN}{next(_COUNTER)}{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary name beside ``path``; what the block writes there replaces ``path`` if it completes.

    For writers that take a name rather than bytes (``df.to_csv``, ``model.export``). The block
    may make a file or a folder; an old folder at ``path`` is removed only after the new one is
    in place. On failure the temporary is removed and ``path`` is left as it was.

    Args:
        path: the final file or folder (parent folders are created).
        suffix: end of the temporary name (some writers choose the format by it).
    """
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(_tmp_path(str(dst), suffix))
    try:
        yield tmp
        if tmp.is_dir() and dst.is_dir():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = Path(_tmp_path(str(dst), ".old"))
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        _remove(tmp)


@contextmanager
def atomic_open(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at ``path`` only if the block completes.

    For writers that stream into a file (``np.savez``) instead of building the bytes first."""
    with atomic_path(path, suffix=suffix) as tmp, open(tmp, "wb") as fh:
        yield fh


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


def slug(text: str, *, default: str = "data", limit: int | None = None) -> str:
    """``text`` as a safe file-name part (ASCII letters, digits, ``.``, ``_``, ``-``).

    Every run of other characters becomes one ``_``; leading and trailing ``.`` / ``_`` are
    dropped (no hidden files, no ``..``).

    Args:
        text: any text, e.g. a folder name or an image file name.
        default: returned when nothing is left.
        limit: keep only the last ``limit`` characters (the end of a file name tells files apart
            more often than its start); None keeps all.
    """
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or default
    return s[-limit:] if limit else s


@contextmanager
def stderr_to(path: str | os.PathLike | None) -> Iterator[None]:
    """Send file descriptor 2 of this process (and of the children it starts) to ``path``.

    C++ libraries (TensorFlow's start-up lines) and child processes (Jupyter kernels) write to
    the descriptor, not to ``sys.stderr``, so only redirecting the descriptor silences them.
    ``path`` is appended to (``os.devnull`` discards); None leaves stderr alone. Exceptions
    raised in the block still propagate.
    """
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


# --------------------------------------------------------------------------------------------
# Output paths: checked before any work starts
# --------------------------------------------------------------------------------------------


class UnsafeOutputError(ValueError):
    """An output path would write into, over or beside the inputs, or replace another kind of file."""


INSIDE_INPUT_HINT = "choose a path outside the input, or pass --allow-inside-input (allow_inside_input=True)"


def _real(p: str | os.PathLike) -> Path:
    """Absolute path with symbolic links resolved (also for paths that do not exist yet)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(p))))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _looks_like_text(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at 4096 is still text
        return e.start >= len(head) - 3
    return True


def _protected(inputs: Iterable[str | os.PathLike]) -> list[tuple[Path, Path, str]]:
    """(real input, folder no output may enter, description) per existing input."""
    out = []
    for raw in inputs:
        real = _real(raw)
        if real.is_dir():
            out.append((real, real, f"the input folder {raw}"))
        elif real.exists():
            out.append((real, real.parent, f"the folder holding the input {raw}"))
    return out


def _check_kind(p: Path, kind: str, what: str, text: bool) -> None:
    if kind == "dir":
        if p.exists() and not p.is_dir():
            raise UnsafeOutputError(f"{what} {p} is a file, not a folder; refusing to write a folder over it")
        return
    if p.is_dir():
        raise UnsafeOutputError(f"{what} {p} is a folder; give a file name (e.g. {p / 'predictions.csv'})")
    if text and p.exists() and p.stat().st_size > 0 and not _looks_like_text(p):
        raise UnsafeOutputError(f"{what} {p} exists and is not a text file (an image or other data?); "
                                "refusing to replace it with a different kind of file")


def _check_writable(p: Path, what: str) -> None:
    """The nearest existing folder on the way to ``p`` must be a folder we can write into."""
    anc = p if p.is_dir() else p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UnsafeOutputError(f"{what} {p}: {anc} is a file, so no folder can be made there")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {p}: the folder {anc} is not writable (read-only or no permission)")


def check_output_path(
    path: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    *,
    kind: str = "file",
    what: str = "output",
    text: bool = False,
    allow_inside_input: bool = False,
) -> Path:
    """Refuse an output path that would destroy or pollute the inputs; call it before any work.

    Refused always: an output that is an input file, a file output that is a folder, a folder
    output that is a file, a ``text`` output over an existing non-text file (a scan), a folder
    that cannot be written. Refused unless ``allow_inside_input``: an output inside an input
    folder or beside an input file (in the folder that holds it), and a folder output that
    holds an input.

    Args:
        path: the output file or folder.
        inputs: the command's input files / folders (missing ones are ignored).
        kind: ``"file"`` or ``"dir"``.
        what: how the message names the output (``"--out"``).
        text: the output is a text file (CSV / JSON).
        allow_inside_input: the user asked explicitly to write inside the input.

    Returns:
        ``path`` with ``~`` expanded.

    Raises:
        UnsafeOutputError (a ValueError): refused, with the reason. PermissionError: not writable.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    p = Path(os.path.expanduser(os.fspath(path)))
    real = _real(p)
    for inp, folder, desc in _protected(inputs):
        if real == inp and not inp.is_dir():
            raise UnsafeOutputError(f"{what} {p} is an input file; refusing to overwrite it")
        if real == inp:
            raise UnsafeOutputError(f"{what} {p} is {desc}; refusing to write into it")
        if allow_inside_input:
            continue
        if _within(real, folder):
            raise UnsafeOutputError(f"{what} {p} lies inside {desc}: the outputs would mix with the "
                                    f"data; {INSIDE_INPUT_HINT}")
        if kind == "dir" and _within(inp, real):
            raise UnsafeOutputError(f"{what} {p} holds {desc}: the outputs would mix with the data; "
                                    f"{INSIDE_INPUT_HINT}")
    _check_kind(p, kind, what, text)
    _check_writable(p, what)
    return p
