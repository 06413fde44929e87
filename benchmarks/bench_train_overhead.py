"""Benchmark of covidlib's training loop against a bare ``model.fit`` of the same model.

Usage::

    python benchmarks/bench_train_overhead.py                       # CPU: 64 px, 4 backbones
    python benchmarks/bench_train_overhead.py --write BENCHMARKS.md
    KERAS_BACKEND=jax python benchmarks/bench_train_overhead.py --size 224 --mixed-precision \\
        --n-train 1024 --n-val 256 --write BENCHMARKS.md \\
        --section "Training loop overhead (GPU, JAX)"               # on a GPU machine

Per backbone, on the same images and the same number of steps (``--n-train`` / ``--batch``,
a multiple of the batch so no step is partial), it times:

* bare: ``model.fit(x, y)`` on in-memory float32 tensors, the model built WITHOUT the
  augmentation block, no callbacks (but the two timing ones), no validation;
* ours: what :func:`covidlib.train.train` runs: the decode-once store, ``ArrayLoader(shuffle=True)``
  (uint8 batches, cast in the model), the augmentation block inside the model, class weights,
  a validation loader and every callback of ``train._callbacks`` (BestWeights, EarlyStopping,
  ReduceLROnPlateau, PhaseCSVLogger, BudgetedBackupAndRestore, EpochTensorBoard);
* for the backbones named in ``--breakdown`` (default SmallCNN): ours without the augmentation
  block, to split the overhead.

Both compile the same way (``train._compile``: Adam, categorical cross-entropy, accuracy and
multi-label AUC, XLA as ``train`` would choose it) under ``config.seed_everything`` (TensorFlow op
determinism is process-wide). Each variant runs one warm-up epoch (graph tracing, excluded)
and ``--epochs`` timed epochs, the variants alternating epoch by epoch (see :class:`Fit`). An
epoch is timed from the first callback's ``on_epoch_begin`` to the last callback's
``on_epoch_end``, so it includes every other callback's epoch work (checkpoint writes,
TensorBoard, CSV) and the validation pass, which is also timed apart
(``on_test_begin`` / ``on_test_end``). The timing callbacks have epoch hooks only, so they force
no per-batch syncs. Time spent inside each covidlib callback is measured by wrapping its hooks.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from covidlib import config  # noqa: E402

DEFAULT_DATA = "/work/shared/data/ct-mosmed"
DEFAULT_BACKBONES = ("SmallCNN", "MobileNetV2", "ResNet50V2", "DenseNet121")
FOLDER_LABELS = {"covid": "covid", "noncovid": "non_covid", "non_covid": "non_covid",
                 "normal": "normal", "cap": "cap"}
TARGET = 0.9
SECTION = "## Training loop overhead"
HOOKS = ("on_epoch_begin", "on_epoch_end", "on_train_batch_begin", "on_train_batch_end",
         "on_test_begin", "on_test_end", "on_test_batch_begin", "on_test_batch_end")


def pick_manifest(data: str, n_train: int, n_val: int, tmp: Path, seed: int = 0) -> pd.DataFrame:
    """``n_train + n_val`` images drawn at random (seeded), as a manifest (train / val rows)."""
    if data == "synthetic":
        from covidlib.datasets import read_manifest
        from covidlib.synthetic import write_synthetic_dataset

        per_class = -(-(n_train + n_val) // 3)
        labels = write_synthetic_dataset(tmp / "synthetic", modality="ct", n_patients=per_class,
                                         slices_per_patient=1, size=128, seed=seed)
        rows = read_manifest(labels)[["path", "label"]]
    else:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder of class sub-folders "
                                    "(or pass --data synthetic)")
        exts = {e.lower() for e in config.IMAGE_EXTENSIONS}
        recs = [(str(f.resolve()), FOLDER_LABELS.get(d.name.lower(), d.name.lower()))
                for d in sorted(p for p in root.iterdir() if p.is_dir())
                for f in sorted(d.iterdir()) if f.suffix.lower() in exts]
        rows = pd.DataFrame(recs, columns=["path", "label"])
    need = n_train + n_val
    if len(rows) < need:
        raise ValueError(f"{data} holds {len(rows)} images; need {need}")
    rng = np.random.default_rng(seed)
    rows = rows.iloc[rng.permutation(len(rows))[:need]].reset_index(drop=True)
    rows["split"] = ["train"] * n_train + ["val"] * n_val
    rows["patient_id"] = [Path(p).stem for p in rows["path"]]
    rows["source"] = Path(str(data)).name
    rows["modality"] = "ct"
    return rows


def _timers():
    """Two callbacks: one placed first (epoch start), one placed last (epoch end, validation)."""

    class First(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.t0 = self.c0 = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

    class Last(keras.callbacks.Callback):
        def __init__(self, first) -> None:
            super().__init__()
            self.first = first
            self.epoch_s = self.epoch_cpu_s = 0.0
            self.val_s = self.val_cpu_s = 0.0
            self._c_test = 0.0
            self._t_test = 0.0

        def on_test_begin(self, logs=None):
            self._t_test, self._c_test = time.perf_counter(), time.process_time()

        def on_test_end(self, logs=None):
            self.val_s = time.perf_counter() - self._t_test
            self.val_cpu_s = time.process_time() - self._c_test

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_s = time.perf_counter() - self.first.t0
            self.epoch_cpu_s = time.process_time() - self.first.c0

    first = First()
    return first, Last(first)


def instrument(callbacks: list, acc: dict) -> None:
    """Wrap each callback's hooks so the time spent in them accumulates in ``acc[class]``."""
    from keras.src.utils.python_utils import is_default

    for cb in callbacks:
        name = type(cb).__name__
        acc[name] += 0.0
        for hook in HOOKS:
            fn = getattr(cb, hook)
            if is_default(fn):  # a no-op; wrapping it would change Keras' async-dispatch choice
                continue

            def timed(*a, _fn=fn, _name=name, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    acc[_name] += time.perf_counter() - t0

            setattr(cb, hook, timed)


class Fit:
    """One variant ('bare' | 'ours' | 'ours_noaug') of one backbone, fitted one epoch per call.

    Calling ``model.fit(initial_epoch=e, epochs=e + 1)`` epoch by epoch lets the variants
    alternate, so load from other jobs on the shared machine hits them alike; the traced
    train / test functions are kept between calls. An epoch is timed from the first callback's
    ``on_epoch_begin`` to the last callback's ``on_epoch_end``, which spans everything
    ``fit`` does per epoch (steps, data-adapter epoch end, validation, every callback's epoch
    work); what a ``fit`` call does once (callback set-up and tear-down) is reported apart.
    """

    def __init__(self, variant: str, backbone: str, store, tr, va, classes, args, work: Path):
        from covidlib import train as T
        from covidlib.arraystore import ArrayLoader, class_weights
        from covidlib.models import build_model

        self.variant, self.backbone = variant, backbone
        nc = len(classes)
        y_tr, y_va = store.labels(classes, tr), store.labels(classes, va)
        cfg = T.TrainConfig(backbone=backbone, img_size=args.size, batch_size=args.batch,
                            epochs=1 + args.epochs, seed=0,
                            mixed_precision="on" if args.mixed_precision else "off",
                            jit_compile=args.jit)
        _, jit = T.precision_policy(cfg)
        self.model = build_model(backbone, nc, args.size, augment=(variant == "ours"), seed=0)
        T._compile(self.model, cfg.learning_rate, nc, jit)
        self.first, self.last = _timers()
        self.acc: dict = defaultdict(float)
        self.records: list[dict] = []
        if variant == "bare":
            x = np.asarray(store.images[tr], dtype=np.float32)[..., None]
            y = np.eye(nc, dtype=np.float32)[y_tr]
            self.fit_kwargs = dict(x=x, y=y, batch_size=args.batch, shuffle=True,
                                   callbacks=[self.first, self.last])
            self.best = None
        else:
            train_loader = ArrayLoader(store.images, y_tr, nc, args.batch, rows=tr, shuffle=True,
                                       seed=0)
            val_loader = ArrayLoader(store.images, y_va, nc, args.batch, rows=va)
            model_dir = work / f"{variant}_{backbone}"
            model_dir.mkdir(parents=True, exist_ok=True)  # train() makes it before fitting
            cbs = T._callbacks(model_dir, cfg, "phase1", None)
            instrument(cbs, self.acc)
            self.best = model_dir / T.BEST_WEIGHTS
            # As train() does: the loader shuffles (seeded); Keras must not reorder its batches.
            self.fit_kwargs = dict(x=train_loader, validation_data=val_loader, shuffle=False,
                                   class_weight=class_weights(y_tr, nc),
                                   callbacks=[self.first, *cbs, self.last])

    def epoch(self, e: int) -> None:
        before = dict(self.acc)
        stamp = self.best.stat().st_mtime_ns if self.best and self.best.exists() else 0
        self.last.val_s = self.last.val_cpu_s = 0.0
        t0 = time.perf_counter()
        self.model.fit(initial_epoch=e, epochs=e + 1, verbose=0, **self.fit_kwargs)
        wall = time.perf_counter() - t0
        after = self.best.stat().st_mtime_ns if self.best and self.best.exists() else 0
        per_cb = {k: v - before.get(k, 0.0) for k, v in self.acc.items()}
        self.records.append({"epoch_s": self.last.epoch_s, "val_s": self.last.val_s,
                             "train_s": self.last.epoch_s - self.last.val_s,
                             "train_cpu_s": self.last.epoch_cpu_s - self.last.val_cpu_s,
                             "fit_extra_s": wall - self.last.epoch_s, "per_cb": per_cb,
                             "cb_s": sum(per_cb.values()), "saved": after != stamp})

    def summary(self) -> dict:
        timed = self.records[1:]
        med = {k: statistics.median(r[k] for r in timed)
               for k in ("epoch_s", "val_s", "train_s", "train_cpu_s", "fit_extra_s", "cb_s")}
        med["per_cb"] = {k: statistics.median(r["per_cb"].get(k, 0.0) for r in timed)
                         for k in timed[0]["per_cb"]}
        med["warmup_s"] = self.records[0]["epoch_s"]
        med["saves"] = sum(r["saved"] for r in timed)
        med["epochs"] = [r["epoch_s"] for r in timed]
        med["train_list"] = [r["train_s"] for r in timed]
        return med


def paired_ratios(bare_epochs: list[float], ours_train: list[float]) -> list[float]:
    """bare / ours time for each timed epoch pair. The two variants' epoch ``e`` run back to
    back, so each pair sees the same machine state; the median of the pairs resists the slow
    spells of a shared machine (here whole seconds where every epoch runs ~30 % slower) better
    than a ratio of two separate medians, which a spell can hit unevenly."""
    return [b / o for b, o in zip(bare_epochs, ours_train)]


def run_backbone(backbone: str, variants: list[str], store, tr, va, classes, args,
                 work: Path) -> dict[str, dict]:

    # covidlib's seeding (TensorFlow op determinism on) applies to the whole process, so both
    # variants run under it.
    config.seed_everything(0, deterministic_ops=True)
    fits = [Fit(v, backbone, store, tr, va, classes, args, work) for v in variants]
    for f in fits:  # warm-up epoch: tracing, first-call graph optimisation
        f.epoch(0)
    for e in range(1, args.epochs + 1):
        for f in (fits if e % 2 else fits[::-1]):
            f.epoch(e)
    out = {f.variant: f.summary() for f in fits}
    del fits
    keras.backend.clear_session()
    return out


def loader_epoch_s(store, tr, classes, args) -> float:
    """Median time of one epoch of ``ArrayLoader.__getitem__`` alone (no Keras)."""
    from covidlib.arraystore import ArrayLoader

    loader = ArrayLoader(store.images, store.labels(classes, tr), len(classes), args.batch,
                         rows=tr, shuffle=True, seed=0)
    ts = []
    for _ in range(6):
        t0 = time.perf_counter()
        for i in range(len(loader)):
            loader[i]
        loader.on_epoch_end()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:])


def machine() -> str:
    import keras

    from _machine import cpu_and_cores

    cpu, cores = cpu_and_cores()
    from covidlib.train import gpu_available

    extra = ""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        extra = f", TensorFlow {tf.__version__}"
    elif keras.backend.backend() == "jax":
        import jax

        extra = f", JAX {jax.__version__}"
    return (f"{cores} cores ({cpu}), {'GPU' if gpu_available() else 'no GPU'}, Linux "
            f"{platform.release()}, Python {platform.python_version()}, Keras {keras.__version__} "
            f"(backend {keras.backend.backend()}){extra}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA,
                    help="folder with one sub-folder of images per class, or 'synthetic' "
                         "(default: %(default)s)")
    ap.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES),
                    help="comma-separated backbones (default: %(default)s)")
    ap.add_argument("--size", type=int, default=64, help="image size (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=320, help="training images (default: %(default)s)")
    ap.add_argument("--n-val", type=int, default=64, help="validation images (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up epoch")
    ap.add_argument("--mixed-precision", action="store_true",
                    help="mixed_float16 policy for both variants (for GPUs)")
    ap.add_argument("--jit", choices=("auto", "on", "off"), default="auto",
                    help="XLA for both variants; auto = on with a GPU, as covidlib.train does")
    ap.add_argument("--breakdown", default="SmallCNN",
                    help="backbones that also run 'ours without augmentation' to split the "
                         "overhead ('' for none; default: %(default)s)")
    ap.add_argument("--write", metavar="MD", help="write the results into a section of this file")
    ap.add_argument("--section", default=SECTION[3:],
                    help="heading of the section --write replaces or appends (default: "
                         "%(default)s; give GPU runs their own, e.g. 'Training loop overhead "
                         "(GPU, JAX)')")
    args = ap.parse_args(argv)
    if args.n_train % args.batch:
        ap.error("--n-train must be a multiple of --batch (no partial step)")
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")

    from covidlib.arraystore import build_store

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    breakdown = {b.strip() for b in args.breakdown.split(",") if b.strip()}
    previous_policy = keras.mixed_precision.global_policy().name
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="covidlib-bench-train-"))
    results: dict[str, dict[str, dict]] = {}
    try:
        man = pick_manifest(args.data, args.n_train, args.n_val, tmp)
        classes = config.ordered_classes(man["label"].unique())
        store = build_store(man, args.size, tmp / "cache")
        tr, va = store.split_indices("train"), store.split_indices("val")
        print(f"{len(tr)} train + {len(va)} val images ({classes}) at {args.size} px, backend "
              f"{keras.backend.backend()}; load avg {load0[0]:.2f}", flush=True)
        loader_s = loader_epoch_s(store, tr, classes, args)
        for bb in backbones:
            t0 = time.perf_counter()
            variants = ["bare", "ours"] + (["ours_noaug"] if bb in breakdown else [])
            results[bb] = run_backbone(bb, variants, store, tr, va, classes, args, tmp)
            for v, r in results[bb].items():
                print(f"{bb:12s} {v:10s} epochs {', '.join(f'{e:.3f}' for e in r['epochs'])} s "
                      f"(val {r['val_s']:.3f}, callbacks {r['cb_s']:.3f}) warm-up "
                      f"{r['warmup_s']:.1f} s", flush=True)
            print(f"{bb}: {time.perf_counter() - t0:.0f} s; load avg {os.getloadavg()[0]:.2f}",
                  flush=True)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    total = time.perf_counter() - t_start

    n = len(tr)
    lines = [
        "| Backbone | bare img/s | ours img/s (train steps) | ours / bare (paired) | per-epoch ratios, min - max "
        "| target >= 0.9 | ours / bare (ratio of medians) "
        "| ours img/s (whole epoch, incl. validation) | ours / bare "
        "| ours / bare by process CPU time (train steps) |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for bb, r in results.items():
        bare = n / r["bare"]["epoch_s"]
        ours_tr = n / r["ours"]["train_s"]
        ours_ep = n / r["ours"]["epoch_s"]
        pairs = paired_ratios(r["bare"]["epochs"], r["ours"]["train_list"])
        paired = statistics.median(pairs)
        ok = paired >= TARGET
        cpu = r["bare"]["train_cpu_s"] / r["ours"]["train_cpu_s"]
        lines.append(f"| {bb} | {bare:,.1f} | {ours_tr:,.1f} | {paired:.3f} "
                     f"| {min(pairs):.2f} - {max(pairs):.2f} "
                     f"| {'met' if ok else '**missed**'} | {ours_tr / bare:.3f} "
                     f"| {ours_ep:,.1f} | {ours_ep / bare:.2f} | {cpu:.2f} |")
    lines += ["", "Where the time goes (seconds per timed epoch, medians):", "",
              "| Backbone | bare epoch | ours epoch | - validation pass | - inside callbacks "
              "| = ours steps (loader + augmentation + model) | ours / bare without the callbacks "
              "| ours without augmentation, steps | best-weights file writes in timed epochs "
              "| timed epochs bare; ours | warm-up epoch bare / ours |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for bb, r in results.items():
        o, b = r["ours"], r["bare"]
        steps = o["epoch_s"] - o["val_s"] - o["cb_s"]
        noaug = r.get("ours_noaug")
        noaug_s = f"{noaug['epoch_s'] - noaug['val_s'] - noaug['cb_s']:.3f}" if noaug else "-"
        lines.append(f"| {bb} | {b['epoch_s']:.3f} | {o['epoch_s']:.3f} | {o['val_s']:.3f} "
                     f"| {o['cb_s']:.3f} | {steps:.3f} | {b['epoch_s'] / steps:.2f} | {noaug_s} "
                     f"| {o['saves']} of {args.epochs} "
                     f"| {', '.join(f'{e:.2f}' for e in b['epochs'])}; "
                     f"{', '.join(f'{e:.2f}' for e in o['epochs'])} "
                     f"| {b['warmup_s']:.0f} s / {o['warmup_s']:.0f} s |")
    cb_names = sorted({k for r in results.values() for k in r["ours"]["per_cb"]})
    lines += ["", "Time inside each callback (ms per timed epoch, ours, medians):", "",
              "| Backbone | " + " | ".join(cb_names) + " |",
              "|---|" + "---:|" * len(cb_names)]
    for bb, r in results.items():
        lines.append(f"| {bb} | " + " | ".join(
            f"{1000 * r['ours']['per_cb'].get(k, 0.0):.0f}" for k in cb_names) + " |")
    table = "\n".join(lines)
    fit_extra = {bb: (r["bare"]["fit_extra_s"], r["ours"]["fit_extra_s"])
                 for bb, r in results.items()}
    noisy = [bb for bb, r in results.items()
             if any(max(v["epochs"]) > 1.3 * min(v["epochs"]) for v in r.values())]
    notes = (
        f"- {n} training images = {n // args.batch} steps of {args.batch} per epoch for both "
        f"variants; ours also validates {len(va)} images per epoch (its callbacks monitor "
        "`val_auc`), so the target is checked on 'train steps' = epoch time minus the validation "
        "pass (the same work as bare), as the median over timed epochs of bare epoch / ours "
        "train steps of the same (back-to-back) epoch; the ratio of the two medians is shown too.\n"
        f"- 1 warm-up epoch (tracing) + {args.epochs} timed epochs per variant, the variants "
        "alternating epoch by epoch (one `fit(initial_epoch=e, epochs=e + 1)` call each); "
        "medians. Both run under `covidlib.config.seed_everything` (TensorFlow op determinism is "
        "process-wide) and the same `train._compile`.\n"
        "- Process CPU time (all threads of the benchmark process) is less sensitive than wall "
        "time to other jobs on the machine; its ratio is a cross-check of the wall-time ratio.\n"
        "- Outside the timed epochs, once per `fit` call here (once per run in `train()`: "
        "data-adapter and callback set-up / tear-down, e.g. the budgeted backup's "
        "final save), median bare / ours: "
        + ", ".join(f"{bb} {a:.2f} / {b:.2f} s" for bb, (a, b) in fit_extra.items()) + ".\n"
        + (f"- **Noisy**: the timed epochs of one variant differ by more than 30 % for "
           f"{', '.join(noisy)} (other jobs on the machine); read those ratios with care, or rerun "
           "with more `--epochs`.\n" if noisy else "")
        + f"- `ArrayLoader.__getitem__` alone: {1000 * loader_s:.2f} ms per epoch of {n} images "
        f"({n / loader_s:,.0f} images / s).\n"
        f"- Mixed precision: {'on' if args.mixed_precision else 'off'}; XLA: {args.jit} "
        "(resolved as `covidlib.train` does; same for both variants).\n"
        f"- Load average (1 min) {load0[0]:.2f} at the start, {load1[0]:.2f} at the end.\n"
        f"- Whole benchmark: {total:.0f} s."
    )
    print()
    print(table)
    print()
    print(notes)
    if args.write:
        from _machine import section_header, write_section

        heading = f"## {args.section}"
        argv_used = argv if argv is not None else sys.argv[1:]
        section = (
            section_header(heading, "bench_train_overhead.py", argv_used, machine(), env=("KERAS_BACKEND",))
            + f"Data: {n} train + {len(va)} val images drawn at random (seed 0) from `{args.data}`, "
            f"stored at {args.size} px; batch {args.batch}.\n\n"
            f"{table}\n\n{notes}\n"
        )
        write_section(Path(args.write), heading, section)
        print(f"\nwrote the {args.section} section of {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
