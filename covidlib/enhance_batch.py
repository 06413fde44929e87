"""The batch enhancement pass: a pipeline of :mod:`covidlib.enhance` over a folder or manifest.

:func:`enhance_tree` / :func:`enhance_manifest` run a chain over a folder or manifest, in this
process (``workers=1``) or on a ``concurrent.futures.ProcessPoolExecutor`` started for the pass,
with atomic writes, resume and a failure report. The destination is checked before any work
(never the source, never inside it unless asked); each output PNG carries a stamp of the source it
was made from, so resume redoes outputs whose source changed; a full or read-only destination
stops the pass at once. Scripts that run it with ``workers > 1`` need Python's usual
``if __name__ == "__main__":`` guard (the workers are started with "spawn").

Only numpy and OpenCV are imported here (pandas / tqdm lazily): no keras, no tensorflow.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import signal
import time
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import cv2
import numpy as np

from covidlib import config
from covidlib.crop import _check_image
from covidlib.enhance import CROP_STEPS, _run_steps, pipeline_config
from covidlib.fsutil import atomic_write_bytes
from covidlib.images import read_image

if TYPE_CHECKING:
    from concurrent.futures import Future

__all__ = ["enhance_tree", "enhance_manifest", "OutputWriteError", "unreadable_folder_reason"]

_TMP_SUFFIX = ".enh-tmp"
_STATE_FILE = "enhance.json"
_FAILURES_FILE = "enhance_failures.csv"
_MANIFEST_FILE = "manifest.csv"


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------


def _encode_png(img: np.ndarray) -> bytes:
    # OpenCV's default PNG settings (Z_BEST_SPEED, RLE, "sub" filter) are its fastest lossless
    # ones, the same as cv2.imwrite's; naming a compression level would switch to slower ones.
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - PNG encoding of a uint8 array does not fail
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _atomic_write_bytes(path: str, data: bytes) -> None:
    # The enhance-specific suffix lets a resumed run find and remove strays of a killed one.
    atomic_write_bytes(path, data, suffix=_TMP_SUFFIX)


# Every output PNG carries a stamp of the source it was made from (a tEXt chunk right after
# IHDR): resume redoes an output whose source changed since, and the stamp travels with the file
# itself, so a killed run can never leave an output that looks current but is not.
_STAMP_KEY = b"covidlib-source"
_IHDR_END = 33  # 8-byte signature + IHDR chunk (4 length + 4 type + 13 data + 4 CRC)


def _source_stamp(task: tuple) -> str | None:
    """Short digest of what an output depends on: source name, size, mtime, bbox, modality."""
    src, _, bbox, modality = task
    try:
        st = os.stat(src)
    except OSError:
        return None
    key = f"{os.path.basename(src)}\0{st.st_size}\0{st.st_mtime_ns}\0{bbox}\0{modality}"
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _stamped(png: bytes, stamp: str) -> bytes:
    body = b"tEXt" + _STAMP_KEY + b"\0" + stamp.encode("ascii")
    chunk = len(body[4:]).to_bytes(4, "big") + body + (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "big")
    return png[:_IHDR_END] + chunk + png[_IHDR_END:]


def _read_stamp(out: str) -> str | None:
    """The source stamp stored in an output PNG, or None (missing file, no stamp)."""
    try:
        with open(out, "rb") as fh:
            head = fh.read(_IHDR_END + 12 + len(_STAMP_KEY) + 64)
    except OSError:
        return None
    at = _IHDR_END + 8 + len(_STAMP_KEY)
    if head[_IHDR_END + 4 : at] != b"tEXt" + _STAMP_KEY or head[at : at + 1] != b"\0":
        return None
    n = int.from_bytes(head[_IHDR_END : _IHDR_END + 4], "big") - len(_STAMP_KEY) - 1
    return head[at + 1 : at + 1 + n].decode("ascii", "replace")


#: errno values that doom every later write too: stop the pass instead of failing each file.
_FATAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                       getattr(errno, "EDQUOT", errno.ENOSPC)}


def _process_one(task: tuple, steps: Sequence[str], params: dict[str, Any]) -> tuple[str, str | None, list[str]]:
    """Enhance one file. Returns (status, reason, warnings); never raises for a bad image."""
    src, out, bbox, modality = task
    stamp = _source_stamp(task)  # before reading: a source replaced meanwhile is redone next time
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = _run_steps(_check_image(read_image(src)), steps, params, bbox, modality)
            data = _encode_png(res)
        except Exception as e:  # reported per file, never fatal to the run
            reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
            return "failed", str(reason), [str(w.message) for w in caught]
    _atomic_write_bytes(out, _stamped(data, stamp) if stamp else data)
    return "written", None, [str(w.message) for w in caught]


def _process_chunk(chunk: list[tuple], steps: Sequence[str], params: dict[str, Any]) -> list[tuple]:
    """Results of a run of tasks; ends early, with a "fatal" result, when dst takes no more files."""
    out = []
    for task in chunk:
        try:
            out.append(_process_one(task, steps, params))
        except OSError as e:
            if e.errno in _FATAL_WRITE_ERRNOS:
                # Full disk / read-only folder: every later write fails too; the caller stops.
                out.append(("fatal", f"{e.strerror or e} ({task[1]})", []))
                break
            out.append(("failed", f"could not write output: {e}", []))  # this file only
    return out


# --------------------------------------------------------------------------------------------
# The pass: in this process, or on a process pool
# --------------------------------------------------------------------------------------------


def _worker_init(parent: int) -> None:
    """Set up a pool worker: one thread, Ctrl-C left to the caller, gone with the caller."""
    # Ctrl-C reaches the whole process group: the caller stops the pass and waits for the chunks
    # already running, so no worker stops halfway through a file or prints a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One process per core: no nested OpenCV threads fighting over the same cores.
    cv2.setNumThreads(1)
    # Kept by hand because the executor cannot do it: a worker whose caller was killed (SIGKILL,
    # a notebook kernel restarted) waits on the task queue forever. Linux ends it with its parent.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the caller died before the line above
        os._exit(1)


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True)


def _execute(tasks: list[tuple], steps, params, workers: int, progress: bool) -> list[tuple | None]:
    """Run the tasks; one result per task, None for tasks never run (the pass stopped early).

    A "fatal" result (the output folder is full or read-only) stops the pass: the remaining
    tasks are dropped and the running ones awaited.
    """
    results: list[tuple | None] = [None] * len(tasks)
    bar = _progress_bar(len(tasks), progress and len(tasks) > 0, "enhance")
    try:
        if workers <= 1 or len(tasks) <= 1:
            _execute_here(tasks, steps, params, bar, results)
        else:
            _execute_parallel(tasks, steps, params, workers, bar, results)
    finally:
        if bar is not None:
            bar.close()
    return results


def _execute_here(tasks: list[tuple], steps, params, bar, results: list) -> None:
    # One worker is one core, as in a pool worker and in a `covidlib run --parallel` job given
    # one thread: OpenCV's own threads cost about a quarter more CPU on these small images for
    # a few percent of wall time (BENCHMARKS.md, Enhancement). The caller's setting (a notebook
    # kernel that trains next) is restored.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        for i, t in enumerate(tasks):
            results[i] = _process_chunk([t], steps, params)[0]
            if bar is not None:
                bar.update(1)
            if results[i][0] == "fatal":
                break
    finally:
        cv2.setNumThreads(threads)


def _execute_parallel(tasks: list[tuple], steps, params, workers: int, bar, results: list) -> None:
    # Imported here: only a pool needs them, and `--workers 1` starts faster without.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # Chunks of up to 16 images (a few tens of ms): few round trips, and still about eight per
    # worker, so that the last ones end together.
    size = max(1, min(16, math.ceil(len(tasks) / (workers * 8))))
    # "spawn", not "fork": OpenCV's thread pool does not survive fork (opencv/opencv#5150).
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(os.getpid(),))
    futs: dict[Future, int] = {}
    try:
        futs = {ex.submit(_process_chunk, tasks[i : i + size], steps, params): i
                for i in range(0, len(tasks), size)}
        for fut in as_completed(futs):
            got = fut.result()
            results[futs[fut] : futs[fut] + len(got)] = got  # shorter after a fatal write error
            if bar is not None:
                bar.update(len(got))
            if got[-1][0] == "fatal":
                break
    except BrokenProcessPool as e:
        raise RuntimeError(
            f"an enhancement worker process died ({e}); bad images do not do that (they are reported "
            "per file). A script that starts workers needs `if __name__ == \"__main__\":` around its "
            "code; or re-run with workers=1 to see the error in this process."
        ) from e
    finally:
        # Unstarted chunks are dropped, running ones finish (Ctrl-C too): no worker is still
        # writing into dst when the pass returns or raises.
        ex.shutdown(wait=True, cancel_futures=True)
    for fut, i in futs.items():  # chunks that finished while the pass was being stopped
        if results[i] is None and fut.done() and not fut.cancelled() and fut.exception() is None:
            got = fut.result()
            results[i : i + len(got)] = got


def _out_name_map(srcs: list[str], rels: list[str]) -> list[str]:
    """Output relative paths: source relative path with a .png suffix; when two sources in one
    folder would collide (``a.jpg`` and ``a.png``), both keep their full name (``a.jpg.png``)."""
    first = [os.path.splitext(r)[0] + ".png" for r in rels]
    seen: dict[str, set[str]] = {}
    for s, o in zip(srcs, first):
        seen.setdefault(os.path.normcase(o), set()).add(s)
    return [r + ".png" if len(seen[os.path.normcase(o)]) > 1 else o for r, o in zip(rels, first)]


def _writer_alive(name: str) -> bool:
    """Whether the process that is writing temporary file ``name`` (pid in its name) still runs."""
    m = re.search(r"\.(\d+)\.[^.]*" + re.escape(_TMP_SUFFIX) + r"$", name)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(m.group(1)) != os.getpid()


def _clean_stray_tmp(dst: Path) -> int:
    n = 0
    for dirpath, _, files in os.walk(dst):
        for f in files:
            # Another live process (a parallel training sharing this folder) may be mid-write.
            if f.startswith(".") and f.endswith(_TMP_SUFFIX) and not _writer_alive(f):
                try:
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
                except OSError:
                    pass
    return n


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(str(path), text.encode("utf-8"))


def _prepare_dst(dst: Path, cfg: dict, outputs: list[str], overwrite: bool) -> None:
    """Check / record the config in dst/enhance.json before any image is written.

    Same config on record: existing outputs count as done (resume). Another config, or outputs
    present without a record (not ours): refused, unless ``overwrite`` -- then this run's outputs
    are deleted first, and only then is the new config recorded, so that a run killed in between
    still has the old config on record and no stale image can pass for a new one.
    """
    dst.mkdir(parents=True, exist_ok=True)
    state = dst / _STATE_FILE
    old: Any = None
    if state.exists():
        try:
            old = json.loads(state.read_text(encoding="utf-8")).get("config")
        except (OSError, ValueError, AttributeError):
            old = "(unreadable enhance.json)"
        if old == cfg and not overwrite:
            return
        if not overwrite:
            raise ValueError(
                f"{dst} already holds images enhanced with a different configuration\n"
                f"  recorded:  {json.dumps(old, sort_keys=True)}\n  requested: {json.dumps(cfg, sort_keys=True)}\n"
                "use another destination folder, or overwrite=True (CLI: --overwrite) to redo them"
            )
    elif not overwrite:
        existing = [o for o in outputs if os.path.exists(o)]
        if existing:
            raise ValueError(
                f"{dst} has no {_STATE_FILE} but already holds {len(existing)} of this run's output files "
                f"(e.g. {existing[0]}), made by something else; use another destination folder or overwrite=True"
            )
    if overwrite:
        for o in outputs:
            try:
                os.unlink(o)
            except FileNotFoundError:
                pass
        for name in (_MANIFEST_FILE, _FAILURES_FILE):
            try:
                os.unlink(dst / name)
            except FileNotFoundError:
                pass
    _atomic_write_text(state, json.dumps({"config": cfg}, indent=2, sort_keys=True) + "\n")


class OutputWriteError(RuntimeError):
    """The destination cannot take more files (full disk, read-only folder): the pass stopped."""


def _unique_tasks(tasks: list[tuple]) -> dict[str, tuple]:
    """Output -> task; refuses outputs over sources and two inputs for one output."""
    srcs = {os.path.normcase(os.path.abspath(t[0])) for t in tasks}
    clash = [t[1] for t in tasks if os.path.normcase(os.path.abspath(t[1])) in srcs]
    if clash:
        raise ValueError(f"destination would overwrite source images (e.g. {clash[0]}); choose another dst")
    # Identical tasks (same file listed twice) run once.
    unique: dict[str, tuple] = {}
    for t in tasks:
        prev = unique.setdefault(t[1], t)
        if prev != t:
            raise ValueError(f"two different inputs map to the same output {t[1]} ({prev[0]}, bbox {prev[2]} / {t[0]}, bbox {t[2]})")
    return unique


def _stale(task: tuple) -> bool:
    """True when the output is missing or was made from another version of its source."""
    stored = _read_stamp(task[1])
    return stored is None or stored != _source_stamp(task)


def _failures_kept(dst: Path, not_run: set[str]) -> list[dict]:
    """Entries of the previous failure list for sources this (stopped) pass did not reach."""
    try:
        with open(dst / _FAILURES_FILE, encoding="utf-8", newline="") as fh:
            return [r for r in csv.DictReader(fh) if r.get("path") in not_run]
    except (OSError, ValueError):
        return []


def _stop_on_fatal(dst: Path, todo: list[tuple], results: list, failed: list[dict]) -> None:
    """A fatal write error: save the failures known so far (and the earlier ones not retried)
    and end with one line."""
    fatal = next(r for r in results if r is not None and r[0] == "fatal")
    done = sum(1 for r in results if r is not None and r[0] in ("written", "failed"))
    not_run = {t[0] for t, r in zip(todo, results) if r is None or r[0] == "fatal"}
    failed = failed + _failures_kept(dst, not_run)
    try:
        _write_failures(dst, failed)
        note = f"the {len(failed)} failure(s) known so far are listed in {dst / _FAILURES_FILE}"
    except OSError as e:
        note = (f"the failure list could not be saved either ({e.strerror or e}); "
                f"{dst / _FAILURES_FILE} is unchanged")
    raise OutputWriteError(f"cannot write into {dst}: {fatal[1]}; stopped after {done} of {len(todo)} "
                           f"image(s); {note}")


def _run_tasks(
    tasks: list[tuple], dst: Path, cfg: dict, workers: int | None, progress: bool, overwrite: bool,
    src_desc: str, unreadable: list[dict] | None = None,
) -> tuple[dict[str, Any], list[tuple]]:
    t0 = time.perf_counter()
    unique = _unique_tasks(tasks)
    try:
        _prepare_dst(dst, cfg, sorted(unique), overwrite)
        _clean_stray_tmp(dst)
    except OSError as e:
        raise OutputWriteError(f"cannot write into {dst}: {e.strerror or e}") from None
    # Resume: an output counts as done only if it was made from the source as it is now.
    todo = [t for t in unique.values() if _stale(t)]
    n_redo = sum(1 for t in todo if os.path.exists(t[1]))
    n_workers = _default_workers() if workers is None else int(workers)
    if n_workers < 1:
        raise ValueError(f"workers must be >= 1 or None (all cores), got {workers!r}")
    n_workers = min(n_workers, max(1, len(todo)))
    results = _execute(todo, cfg["steps"], cfg["params"], n_workers, progress)

    status = {out: ("skipped", None, []) for out in unique}
    for t, r in zip(todo, results):
        status[t[1]] = r if r is not None else ("pending", None, [])
    failed, warned = list(unreadable or []), []
    for out, t in unique.items():
        st, reason, warns = status[out]
        if st == "failed":
            failed.append({"path": t[0], "reason": reason})
        warned.extend({"path": t[0], "warning": w} for w in warns)
    if any(r is not None and r[0] == "fatal" for r in results):
        _stop_on_fatal(dst, todo, results, failed)
    _write_failures(dst, failed)
    summary = {
        "src": src_desc,
        "dst": str(dst),
        "config": cfg,
        "total": len(unique),
        "written": sum(1 for r in results if r is not None and r[0] == "written"),
        "skipped": len(unique) - len(todo),
        "redone": n_redo,  # outputs made again because their source changed since
        "n_failed": len(failed),
        "failed": failed,
        "warnings": warned,
        "workers": n_workers,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    per_task = [status[t[1]] for t in tasks]
    return summary, per_task


def _write_failures(dst: Path, failed: list[dict]) -> None:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["path", "reason"])
    for f in failed:
        wr.writerow([f["path"], f["reason"]])
    _atomic_write_text(dst / _FAILURES_FILE, buf.getvalue())


def unreadable_folder_reason(err: OSError, what: str = "its images were not read") -> str:
    """The failure-list reason for a folder that could not be listed (permissions, I/O)."""
    return f"folder could not be read ({err.strerror or err}): {what}"


def _folder_tasks(src: Path, dst: Path, modality: str) -> tuple[list[tuple], list[dict]]:
    """Tasks for every image under ``src``, and the folders that could not be listed."""
    exts = tuple(config.IMAGE_EXTENSIONS) + (".dcm",)
    dst_abs = os.path.normcase(os.path.abspath(dst))
    found: list[str] = []
    unreadable: list[dict] = []

    def note(err: OSError) -> None:  # os.walk skips such a folder silently otherwise
        unreadable.append({"path": str(err.filename or src),
                           "reason": unreadable_folder_reason(err, "its images were not enhanced")})

    for dirpath, dirnames, files in os.walk(src, onerror=note):
        # never read our own output when dst lies inside src; hidden folders / files are skipped
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and os.path.normcase(os.path.abspath(os.path.join(dirpath, d))) != dst_abs
        )
        for f in sorted(files):
            if not f.startswith(".") and f.lower().endswith(exts):
                found.append(os.path.join(dirpath, f))
    rels = [os.path.relpath(p, src) for p in found]
    outs = _out_name_map(found, rels)
    return [(p, str(dst / o), None, modality) for p, o in zip(found, outs)], unreadable


def _enhance_csv(src_p: Path, dst_p: Path, pipeline: str, **kw: Any) -> dict[str, Any]:
    """:func:`enhance_tree` for a manifest ``.csv`` source: :func:`enhance_manifest`'s summary."""
    if src_p.suffix.lower() != ".csv":
        raise ValueError(f"enhance source must be a folder or a manifest .csv, got file {src_p}")
    df = _read_manifest_csv(src_p)
    out = enhance_manifest(df, dst_p, pipeline, base_dir=src_p.parent, **kw)
    summary = dict(out.attrs["enhance_summary"])
    summary["src"] = str(src_p)
    return summary


def enhance_tree(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    pipeline: str = "crop+wb+clahe",
    workers: int | None = None,
    progress: bool = True,
    modality: str = "ct",
    overwrite: bool = False,
    allow_inside_input: bool = False,
    **params: Any,
) -> dict[str, Any]:
    """Enhance every image under a folder, or every row of a manifest CSV, into ``dst``.

    * Folder: images (``config.IMAGE_EXTENSIONS`` and ``.dcm``; hidden files skipped) at any
      depth; ``dst`` mirrors the relative layout, each file saved as ``<stem>.png`` (``uint8``,
      lossless). ``dst`` is checked before any work (:func:`covidlib.fsutil.check_output_path`):
      ``dst == src`` is refused; ``dst`` inside ``src`` (or holding it) only with
      ``allow_inside_input=True``, and then it is not read. Folders that cannot be listed
      (permissions) are failures, not silently skipped.
    * Manifest CSV (``path, label, patient_id, split, source, modality`` [+ ``xmin, ymin, xmax,
      ymax``]): see :func:`enhance_manifest`; writes ``dst/manifest.csv``.

    Writes are atomic (temp file in the same folder + ``os.replace``), so a killed run leaves no
    half-written image. ``dst/enhance.json`` records :func:`pipeline_config`: a re-run with the
    same config skips images already written from the source as it is now (each output PNG
    carries a stamp of its source's name, size and mtime: a source replaced since is redone);
    a different config is refused unless ``overwrite=True``. Unreadable sources are listed in the
    summary and in ``dst/enhance_failures.csv``; they never stop the run. A destination that
    takes no more files (full disk, read-only) stops the pass at the first such error with
    :class:`OutputWriteError`, keeping the failures found so far. Sources are only read. The
    output is byte-identical whatever the worker count.

    Args:
        src: folder or manifest ``.csv``.
        dst: output folder (created).
        pipeline: a name from :data:`PIPELINES`.
        workers: processes; None = all cores, 1 = in this process.
        progress: show a tqdm progress bar.
        modality: ``"ct"`` or ``"xray"`` (a manifest's ``modality`` column wins per row).
        overwrite: redo everything when ``dst`` holds another config.
        allow_inside_input: the user asked explicitly for ``dst`` inside (or around) ``src``.
        **params: step parameters, see :func:`pipeline_config`.

    Returns:
        Summary dict: ``src, dst, config, total, written, skipped, redone`` (outputs made again
        because their source changed), ``n_failed, failed`` (list of ``{path, reason}``, also
        unreadable folders), ``warnings`` (list of ``{path, warning}``, e.g. no body found),
        ``workers, seconds``; plus ``manifest`` (path of ``dst/manifest.csv``) for a CSV source,
        ``unreadable_folders`` for a folder source.

    Raises:
        FileNotFoundError: no ``src``. ValueError: bad pipeline / parameters, ``dst`` holding
        another config or overwriting / polluting the source (``fsutil.UnsafeOutputError``).
        PermissionError: ``dst`` not writable. OutputWriteError: ``dst`` filled up mid-pass.
    """
    from covidlib.fsutil import check_output_path

    cfg = pipeline_config(pipeline, modality, **params)
    src_p = Path(src)
    dst_p = Path(dst)
    if not src_p.exists():
        raise FileNotFoundError(f"enhance source not found: {src_p}")
    check_output_path(dst_p, [src_p], kind="dir", what="enhance destination",
                      allow_inside_input=allow_inside_input)
    if src_p.is_file():
        return _enhance_csv(src_p, dst_p, pipeline, workers=workers, progress=progress, modality=modality,
                            overwrite=overwrite, allow_inside_input=allow_inside_input, **params)
    tasks, unreadable = _folder_tasks(src_p, dst_p, modality)
    summary, _ = _run_tasks(tasks, dst_p, cfg, workers, progress, overwrite, str(src_p), unreadable)
    summary["unreadable_folders"] = [u["path"] for u in unreadable]
    return summary


def _read_manifest_csv(path: Path):
    import pandas as pd

    try:
        # Text columns stay text ("NA" is a patient id, not a missing value); only empty cells
        # are missing.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as e:
        raise ValueError(f"could not read manifest {path}: {e}") from None
    return df


def _row_bboxes(df) -> list[tuple[int, int, int, int] | None]:
    import pandas as pd

    cols = config.BBOX_COLUMNS
    present = [c for c in cols if c in df.columns]
    if not present:
        return [None] * len(df)
    if len(present) != len(cols):
        raise ValueError(f"manifest has bbox columns {present} but not all of {cols}")
    vals = []
    for c in cols:
        try:
            vals.append(pd.to_numeric(df[c], errors="raise").to_numpy(dtype=np.float64))
        except (ValueError, TypeError):
            raise ValueError(f"manifest column {c!r} holds non-numeric values") from None
    out: list[tuple[int, int, int, int] | None] = []
    for i in range(len(df)):
        row = [v[i] for v in vals]
        if all(math.isfinite(x) for x in row):
            out.append(tuple(int(round(x)) for x in row))  # type: ignore[arg-type]
        elif any(math.isfinite(x) for x in row):
            raise ValueError(f"manifest row {i} has a partial bounding box {row}")
        else:
            out.append(None)
    return out


def _row_sources(df, base: Path) -> list[str]:
    """Absolute, normalised source path per manifest row (relative ones against ``base``)."""
    srcs = []
    for i, p in enumerate(df["path"]):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"manifest row {i} has an empty path")
        pp = Path(p)
        srcs.append(os.path.normpath(str(pp if pp.is_absolute() else base / pp)))
    return srcs


def _row_modalities(df, modality: str) -> list[str]:
    """Per row: its ``modality`` cell, ``modality`` where the cell is empty or the column absent."""
    if "modality" not in df.columns:
        return [modality] * len(df)
    mods = []
    for i, m in enumerate(df["modality"]):
        if not isinstance(m, str) or not m.strip():
            mods.append(modality)
        elif m.strip().lower() in config.MODALITIES:
            mods.append(m.strip().lower())
        else:
            raise ValueError(f"manifest row {i}: modality {m!r} not in {list(config.MODALITIES)}")
    return mods


def _write_enhanced_manifest(df, per_task: list[tuple], outs: list[str], cfg: dict, dst_p: Path,
                             summary: dict[str, Any]):
    """The rows enhanced (written now or before), pointing at their copies; also saved as
    ``dst/manifest.csv`` with paths relative to ``dst``."""
    ok = [st != "failed" for st, _, _ in per_task]
    res = df.loc[ok].copy()
    res["path"] = [os.path.abspath(o) for o, good in zip(outs, ok) if good]
    if any(step in CROP_STEPS for step in cfg["steps"]):
        res = res.drop(columns=[c for c in config.BBOX_COLUMNS if c in res.columns])
    res = res.reset_index(drop=True)
    on_disk = res.copy()
    on_disk["path"] = [Path(os.path.relpath(p, os.path.abspath(dst_p))).as_posix() for p in res["path"]]
    manifest_path = dst_p / _MANIFEST_FILE
    _atomic_write_text(manifest_path, on_disk.to_csv(index=False, lineterminator="\n"))
    summary["manifest"] = str(manifest_path)
    res.attrs["enhance_summary"] = summary
    return res


def enhance_manifest(
    manifest_df,
    dst: str | os.PathLike,
    pipeline: str = "crop+wb+clahe",
    workers: int | None = None,
    progress: bool = True,
    modality: str = "ct",
    overwrite: bool = False,
    base_dir: str | os.PathLike | None = None,
    allow_inside_input: bool = False,
    **params: Any,
):
    """Enhance the images of a manifest and write ``dst/manifest.csv`` pointing at the copies.

    Outputs mirror the source paths relative to their common folder. The bounding box columns
    (when present and filled) are used to crop the row's image; a row's ``modality`` (ct / xray)
    picks the crop, ``modality`` is the fallback for empty cells. Same machinery, resume and
    failure report as :func:`enhance_tree`. ``dst`` may not lie in (or hold) a folder that
    holds a source image unless ``allow_inside_input``.

    Args:
        manifest_df: DataFrame with at least a ``path`` column.
        dst: output folder.
        pipeline, workers, progress, modality, overwrite, **params: as in :func:`enhance_tree`.
        base_dir: folder that relative paths are relative to (default: the working directory).
        allow_inside_input: as in :func:`enhance_tree`.

    Returns:
        The enhanced manifest: the rows whose image was enhanced (written now or before), same
        columns and order, ``path`` absolute to the enhanced PNG. The bbox columns are dropped
        when the pipeline crops (the box no longer applies to the cropped image). The CSV on disk
        stores paths relative to ``dst``. ``df.attrs["enhance_summary"]`` holds the summary dict
        of :func:`enhance_tree`, with ``manifest`` = the CSV's path.
    """
    import pandas as pd

    cfg = pipeline_config(pipeline, modality, **params)
    if not isinstance(manifest_df, pd.DataFrame):
        raise ValueError(f"manifest_df must be a pandas DataFrame, got {type(manifest_df).__name__}")
    if "path" not in manifest_df.columns:
        raise ValueError(f"manifest has no 'path' column (columns: {list(manifest_df.columns)})")
    df = manifest_df.reset_index(drop=True)
    dst_p = Path(dst)
    srcs = _row_sources(df, Path(base_dir) if base_dir is not None else Path.cwd())
    mods = _row_modalities(df, modality)
    bboxes = _row_bboxes(df)
    if srcs:
        root = os.path.commonpath([os.path.dirname(s) for s in srcs])
        rels = [os.path.relpath(s, root) for s in srcs]
    else:
        rels = []
    from covidlib.fsutil import check_output_path

    # The folders holding the sources are the data: the outputs stay out of them.
    check_output_path(dst_p, sorted({os.path.dirname(s) for s in srcs}), kind="dir",
                      what="enhance destination", allow_inside_input=allow_inside_input)
    outs = [str(dst_p / o) for o in _out_name_map(srcs, rels)]
    tasks = [(s, o, b, m) for s, o, b, m in zip(srcs, outs, bboxes, mods)]
    summary, per_task = _run_tasks(tasks, dst_p, cfg, workers, progress, overwrite, "manifest")

    return _write_enhanced_manifest(df, per_task, outs, cfg, dst_p, summary)
