"""Benchmark of the enhancement pass: ms / image against the decode + encode floor.

Usage::

    python benchmarks/bench_enhance.py                      # 400 CT images from the default folder
    python benchmarks/bench_enhance.py --data DIR --n 200   # any folder of images (any depth)
    python benchmarks/bench_enhance.py --write BENCHMARKS.md

On the same N images, in one run, it times (median over repeats, after a warm-up pass):

(a) floor: decode + PNG encode only (``covidlib.images.read_image`` + ``cv2.imencode``, exactly
    what the batch pass does around the enhancement);
(b) the seed's recipe as published (AICOV-CT notebook): 3-channel decode, DCT round trip
    (``cv2.dct`` then ``cv2.idct`` per channel), per-channel percentile stretch, to gray, CLAHE
    (created per image, as published), + the same PNG encode of the gray result;
(c) ours, ``crop+wb+clahe`` and ``crop+dct+wb+clahe``, + decode / encode;
(a)-(c) on ONE core: ``cv2.setNumThreads(1)`` and BLAS limited to one thread, so neither
OpenCV nor OpenBLAS secretly uses a second core;
(d) the batch pass ``enhance_tree`` (files written, atomic) with 1 and 2 workers, its
    speed-up, and a byte-for-byte comparison of the two outputs.

Nothing is written next to the images: the batch pass reads them through a manifest CSV in a
temporary folder and writes there.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from covidlib import config  # noqa: E402
from covidlib import enhance as E  # noqa: E402
from covidlib import enhance_batch as EB  # noqa: E402
from covidlib.images import read_image  # noqa: E402

DEFAULT_DATA = "/work/shared/data/ct-mosmed"
TARGETS = {"crop+wb+clahe": 1.3, "crop+dct+wb+clahe": 2.0}
TARGET_SPEEDUP = 1.8


# ----------------------------------------------------------------------------------------------
# Methods (one image path in, PNG bytes out)
# ----------------------------------------------------------------------------------------------


def floor(path: str) -> bytes:
    return EB._encode_png(read_image(path))


def _seed_white_balance(channel: np.ndarray, perc: float = 0.05) -> np.ndarray:
    mi, ma = np.percentile(channel, perc), np.percentile(channel, 100.0 - perc)
    return np.uint8(np.clip((channel - mi) * 255.0 / (ma - mi), 0, 255))


def seed(path: str) -> bytes:
    img = cv2.imread(path)  # 3 identical channels, as the seed read them
    chans = [cv2.idct(cv2.dct(c.astype(np.float32))) for c in cv2.split(img)]  # identity round trip
    wb = np.dstack([_seed_white_balance(c, 0.05) for c in chans])  # 3 separate stretches
    gray = cv2.cvtColor(wb, cv2.COLOR_BGR2GRAY)
    out = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(16, 16)).apply(gray)
    return EB._encode_png(out)


def ours(pipeline: str):
    def run(path: str) -> bytes:
        return EB._encode_png(E.enhance(read_image(path), pipeline))

    run.__name__ = pipeline
    return run


# ----------------------------------------------------------------------------------------------


def pick_images(data: Path, n: int) -> list[str]:
    exts = tuple(config.IMAGE_EXTENSIONS)
    files = sorted(
        str(p) for p in data.rglob("*") if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")
    )
    if not files:
        raise SystemExit(f"no images under {data}")
    if len(files) <= n:
        return files
    stride = len(files) / n  # evenly spread over the sorted list (every class folder)
    return [files[int(i * stride)] for i in range(n)]


def time_loop(fn, paths: list[str]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        fn(p)
    return (time.perf_counter() - t0) / len(paths) * 1000.0


def single_core(methods: dict, paths: list[str], repeats: int) -> dict[str, float]:
    """ms / image per method, one core. Methods are interleaved image by image (order rotated),
    so load from other jobs on a shared machine falls on all of them alike."""
    from threadpoolctl import threadpool_limits

    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    names = list(methods)
    fns = [methods[k] for k in names]
    try:
        with threadpool_limits(1):
            for fn in fns:  # warm-up: page cache, CLAHE objects, allocator
                time_loop(fn, paths)
            runs: dict[str, list[float]] = {k: [] for k in names}
            clock = time.perf_counter
            for r in range(repeats):
                tot = [0.0] * len(names)
                for i, p in enumerate(paths):
                    k0 = (i + r) % len(names)
                    for j in list(range(k0, len(names))) + list(range(k0)):
                        t0 = clock()
                        fns[j](p)
                        tot[j] += clock() - t0
                for j, k in enumerate(names):
                    runs[k].append(tot[j] / len(paths) * 1000.0)
    finally:
        cv2.setNumThreads(prev)
    return {k: statistics.median(v) for k, v in runs.items()}


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def batch(paths: list[str], pipeline: str, repeats: int, tmp: Path, control: MachineControl) -> dict:
    import pandas as pd
    from threadpoolctl import threadpool_limits

    man = tmp / "bench_manifest.csv"
    pd.DataFrame({"path": paths, "label": "covid"}).to_csv(man, index=False)
    out: dict = {"w1": [], "w2": [], "control": []}
    digests = {}

    def one(workers: int, tag: str) -> float:
        dst = tmp / f"{pipeline.replace('+', '_')}_{tag}"
        shutil.rmtree(dst, ignore_errors=True)
        prev = cv2.getNumThreads()
        if workers == 1:
            cv2.setNumThreads(1)  # the in-process run gets one core, like each worker
        try:
            with threadpool_limits(1):
                t0 = time.perf_counter()
                s = EB.enhance_tree(man, dst, pipeline=pipeline, workers=workers, progress=False)
                dt = time.perf_counter() - t0
        finally:
            cv2.setNumThreads(prev)
        if s["written"] != len(paths) or s["n_failed"]:
            raise SystemExit(f"batch pass failed: {s['n_failed']} failures, {s['written']} written")
        if tag.endswith("_0"):
            digests[workers] = tree_digest(dst)
        shutil.rmtree(dst, ignore_errors=True)
        return dt / len(paths) * 1000.0

    for r in range(repeats):
        out["control"].append(control())  # what the machine offered right at this pair
        for w in ((1, 2) if r % 2 == 0 else (2, 1)):
            out[f"w{w}"].append(one(w, f"w{w}_{r}"))
        print(
            f"  {pipeline} pair {r}: 1 worker {out['w1'][-1]:.2f} ms, 2 workers {out['w2'][-1]:.2f} ms, "
            f"speed-up {out['w1'][-1] / out['w2'][-1]:.2f} (control {out['control'][-1]:.2f})",
            flush=True,
        )
    return {
        "w1": statistics.median(out["w1"]),
        "w2": statistics.median(out["w2"]),
        "identical": digests[1] == digests[2],
        # speed-up of each back-to-back pair of passes: shows how much the shared machine wobbles
        "pairs": [a / b for a, b in zip(out["w1"], out["w2"])],
        "control": out["control"],
    }


def _busy(n: int) -> float:
    t0 = time.perf_counter()
    s = 0
    for i in range(n):
        s += i * i
    return time.perf_counter() - t0


class MachineControl:
    """Speed-up of a trivially parallel pure-Python loop from 1 to 2 processes, measured now:
    the ceiling the (shared) machine offers at this moment.

    This VM's speed drifts by up to 2x over seconds (the host's other tenants), so one long
    sample of each case compares two different moments. Short samples alternate instead (one
    task alone, then two at once, in the same two pool workers) and each call returns the
    median of its back-to-back ratios. The pool lives as long as the benchmark, so a control
    can run right next to every pair of batch passes."""

    def __init__(self) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.ex = ProcessPoolExecutor(2, mp_context=EB._pool_context())
        list(self.ex.map(_busy, [1000, 1000]))  # start the workers first

    def __call__(self, n: int = 1_000_000, repeats: int = 5) -> float:
        ratios = []
        for _ in range(repeats):
            one = self.ex.submit(_busy, n).result()
            t0 = time.perf_counter()
            list(self.ex.map(_busy, [n, n]))
            ratios.append(2 * one / (time.perf_counter() - t0))
        return statistics.median(ratios)

    def close(self) -> None:
        self.ex.shutdown()


def dct_tradeoff(paths: list[str]) -> list[tuple[int, float, float]]:
    """(step, ms on one 512x512 image, PSNR gain in dB at sigma=10 added noise)."""
    from threadpoolctl import threadpool_limits

    img = read_image(paths[0])
    rng = np.random.default_rng(0)
    noisy = np.clip(np.rint(img + rng.normal(0, 10, img.shape)), 0, 255).astype(np.uint8)

    def psnr(a, b):
        return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2))

    rows = []
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    with threadpool_limits(1):
        for step in (1, 2, 4, 8):
            E.dct_denoise(noisy, 10.0, step=step)
            ts = []
            for _ in range(5 if step > 1 else 2):
                t0 = time.perf_counter()
                out = E.dct_denoise(noisy, 10.0, step=step)
                ts.append(time.perf_counter() - t0)
            rows.append((step, statistics.median(ts) * 1000, psnr(out, img) - psnr(noisy, img)))
    cv2.setNumThreads(prev)
    return rows


def machine() -> str:
    from _machine import cpu_and_cores

    cpu, cores = cpu_and_cores()
    cpu = cpu or platform.processor() or ""
    return (
        f"{cores} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}, OpenCV {cv2.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder of images, any depth (default: %(default)s)")
    ap.add_argument("--n", type=int, default=400, help="number of images (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median; default: %(default)s)")
    ap.add_argument("--batch-repeats", type=int, default=5, help="timed batch passes per worker count (median; default: %(default)s)")
    ap.add_argument("--write", metavar="MD", help="write the results into the Enhancement section of this file")
    args = ap.parse_args(argv)

    paths = pick_images(Path(args.data), args.n)
    shapes = {read_image(p).shape for p in paths[:20]}
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    print(f"{len(paths)} images from {args.data} (shapes e.g. {sorted(shapes)[:3]}); load avg {load0[0]:.2f}", flush=True)

    methods = {
        "floor": floor,
        "seed": seed,
        "crop+wb+clahe": ours("crop+wb+clahe"),
        "crop+dct+wb+clahe": ours("crop+dct+wb+clahe"),
    }
    sc = single_core(methods, paths, args.repeats)
    print("single core:", {k: round(v, 2) for k, v in sc.items()}, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="covidlib-bench-"))
    try:
        # Cold start: the first parallel pass in a process also starts the fork server.
        t0 = time.perf_counter()
        import pandas as pd

        man = tmp / "cold.csv"
        pd.DataFrame({"path": paths[:20], "label": "covid"}).to_csv(man, index=False)
        EB.enhance_tree(man, tmp / "cold", workers=2, progress=False)
        cold = time.perf_counter() - t0
        shutil.rmtree(tmp / "cold", ignore_errors=True)
        control = MachineControl()
        try:
            b = {p: batch(paths, p, args.batch_repeats, tmp, control) for p in ("crop+wb+clahe", "crop+dct+wb+clahe")}
        finally:
            control.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    trade = dct_tradeoff(paths)
    load1 = os.getloadavg()
    total = time.perf_counter() - t_start

    fl = sc["floor"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = []
    lines.append("| Method (one core unless noted) | ms / image | x floor | target |")
    lines.append("|---|---:|---:|---|")
    lines.append(f"| (a) floor: decode + PNG encode | {fl:.2f} | 1.00 | |")
    lines.append(f"| (b) seed recipe as published (+ decode / encode) | {sc['seed']:.2f} | {sc['seed'] / fl:.2f} | |")
    for p, tgt in TARGETS.items():
        r = sc[p] / fl
        lines.append(f"| (c) ours `{p}` (+ decode / encode) | {sc[p]:.2f} | {r:.2f} | <= {tgt} x: {verdict(r <= tgt)} |")
    lines.append("")
    lines.append(
        "| (d) Batch pass `enhance_tree` (files written) | 1 worker ms / image | 2 workers ms / image "
        "| speed-up (medians) | per-pair speed-ups, min - max | control before each pair, min - max "
        "| outputs 1 vs 2 workers |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---|")
    for p, v in b.items():
        sp = v["w1"] / v["w2"]
        lines.append(
            f"| `{p}` | {v['w1']:.2f} | {v['w2']:.2f} | {sp:.2f} x (target >= {TARGET_SPEEDUP}: {verdict(sp >= TARGET_SPEEDUP)}) "
            f"| {min(v['pairs']):.2f} - {max(v['pairs']):.2f} "
            f"| {min(v['control']):.2f} - {max(v['control']):.2f} "
            f"| {'byte-identical' if v['identical'] else '**DIFFER**'} |"
        )
    lines.append("")
    lines.append("DCT denoiser step (one 512 x 512 image, sigma = 10 noise added, one core):")
    lines.append("")
    lines.append("| step | grids averaged | ms | PSNR gain (dB) |")
    lines.append("|---:|---:|---:|---:|")
    for step, ms, gain in trade:
        lines.append(f"| {step}{' (default)' if step == 4 else ''} | {(8 // step) ** 2} | {ms:.2f} | {gain:.2f} |")
    table = "\n".join(lines)
    print()
    print(table)
    notes = (
        f"- Cold start of the first parallel pass in a process (fork server + 2 workers, 20 images): "
        f"{cold:.2f} s in all; the figures above are steady state (median of {args.batch_repeats} passes).\n"
        f"- Load average (1 min) {load0[0]:.2f} at the start, {load1[0]:.2f} at the end; the machine is shared, "
        "so other jobs running at the same time inflate times and cut the 2-worker speed-up.\n"
        "- Control: right before each pair of batch passes, a trivially parallel pure-Python loop is timed on "
        "1 and then 2 processes (median of 5 back-to-back samples): the speed-up the machine offered at that "
        "moment. On this VM it swings between about 1.1 and 2.0 within a minute (the host's other tenants) and "
        "does not track the batch speed-ups pair by pair: read it as a measure of how noisy the machine was "
        "during the run, not as a ceiling.\n"
        "- PNG encoding is most of the floor; `crop+...` encodes the cropped image (here about two thirds of "
        "the pixels), which is why ours can come out near or even below the floor.\n"
        "- The seed row leaves out the seed's crop (it needs a bounding box) and its 3-channel PNG write "
        "(GRAY2RGB before `imwrite`): it is timed with the same 1-channel encode as the others.\n"
        f"- Whole benchmark: {total:.0f} s."
    )
    print()
    print(notes)

    if args.write:
        from _machine import section_header, write_section

        argv_used = argv if argv is not None else sys.argv[1:]
        section = (
            section_header("## Enhancement", "bench_enhance.py", argv_used, machine())
            + f"Data: {len(paths)} images from `{args.data}` (512 x 512 CT JPEGs there; point `--data` at any "
            "folder of images). Median of "
            f"{args.repeats} timed passes over all images after a warm-up pass (methods interleaved image by image); "
            "single-core rows run with "
            "`cv2.setNumThreads(1)` and BLAS limited to one thread (threadpoolctl), so neither OpenCV nor "
            "OpenBLAS uses a second core.\n\n"
            f"{table}\n\n{notes}\n"
        )
        write_section(Path(args.write), "## Enhancement", section)
        print(f"\nwrote the Enhancement section of {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
