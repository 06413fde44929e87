"""Benchmark of the input pipeline: images/s delivered at 224 px.

Usage::

    python benchmarks/bench_input_pipeline.py                 # all images of the default folder
    python benchmarks/bench_input_pipeline.py --data DIR      # DIR/<class>/<image> (any classes)
    python benchmarks/bench_input_pipeline.py --write BENCHMARKS.md

On the same images, in one run (batch 32, 224 x 224, grayscale):

(a) ``keras.utils.image_dataset_from_directory`` (+ ``prefetch(AUTOTUNE)``, as the Keras guides
    recommend), which decodes and resizes every image file again every epoch;
(b) covidlib's decode-once store: ``covidlib.arraystore.build_store`` (the one-off build is timed
    separately) + ``covidlib.arraystore.ArrayLoader(shuffle=True)``, iterated over a full epoch with
    ``for i in range(len(loader)): loader[i]`` (``on_epoch_end`` between epochs, as ``fit`` does);
(c) the same loader with ``sampling="balanced"``.

Each variant runs one untimed warm-up epoch (tf.data graph, page cache), then ``--repeats`` timed
epochs; the variants are interleaved (a, b, c, a, b, c, ...) so a burst of load from other jobs
on the shared machine hits all of them alike. Figures are medians. Nothing is written next to the
images: the store lives in a temporary folder that is deleted afterwards.
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
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from covidlib import config  # noqa: E402

DEFAULT_DATA = "/work/shared/data/ct-mosmed"
# Folder names of the image sets we ship defaults for -> canonical labels; others are lower-cased.
FOLDER_LABELS = {"covid": "covid", "noncovid": "non_covid", "non_covid": "non_covid",
                 "normal": "normal", "cap": "cap"}
TARGET_RATIO = 10.0
TARGET_IPS = 6000.0
SECTION = "## Input pipeline"


def list_images(data: Path) -> list[tuple[str, str]]:
    """(path, folder) for every image in ``data/<folder>/``, sorted (the order Keras uses)."""
    if not data.is_dir():
        raise FileNotFoundError(f"{data} is not a folder of class sub-folders")
    exts = {e.lower() for e in config.IMAGE_EXTENSIONS}
    out = []
    for sub in sorted(p for p in data.iterdir() if p.is_dir()):
        for f in sorted(sub.iterdir()):
            if f.is_file() and f.suffix.lower() in exts:
                out.append((str(f.resolve()), sub.name))
    if not out:
        raise ValueError(f"no images found in the class sub-folders of {data}")
    return out


# Formats tf.io.decode_image (hence (a)) reads, by their leading bytes; OpenCV reads more (TIFF).
_TF_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM", b"RIFF")


def tf_decodable(path: str) -> bool:
    """Whether TensorFlow's image decoder can read the file (decided by content, not name)."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    return head.startswith(_TF_MAGIC) and (not head.startswith(b"RIFF") or head[8:12] == b"WEBP")


def make_manifest(items: list[tuple[str, str]], source: str) -> pd.DataFrame:
    return pd.DataFrame({
        "path": [p for p, _ in items],
        "label": [FOLDER_LABELS.get(d.lower(), d.lower()) for _, d in items],
        "patient_id": [Path(p).stem for p, _ in items],  # no patient ids in a flat folder set
        "split": "train",
        "source": source,
        "modality": "ct",
    })


def subset_tree(items: list[tuple[str, str]], dst: Path) -> None:
    """Symlink a subset into ``dst/<class>/`` so (a) reads exactly the images (b) stores."""
    for p, d in items:
        (dst / d).mkdir(parents=True, exist_ok=True)
        os.symlink(p, dst / d / Path(p).name)


def machine() -> str:
    import cv2
    import keras
    import tensorflow as tf

    from _machine import cpu_and_cores

    cpu, cores = cpu_and_cores()
    gpu = "GPU" if tf.config.list_physical_devices("GPU") else "no GPU"
    return (f"{cores} cores ({cpu}), {gpu}, Linux {platform.release()}, Python "
            f"{platform.python_version()}, Keras {keras.__version__} (backend "
            f"{keras.backend.backend()}), TensorFlow {tf.__version__}, numpy {np.__version__}, "
            f"OpenCV {cv2.__version__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA,
                    help="folder with one sub-folder of images per class (default: %(default)s)")
    ap.add_argument("--n", type=int, default=0, help="use only the first N images (0 = all)")
    ap.add_argument("--size", type=int, default=224, help="square image size (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=15, help="timed epochs per variant (median)")
    ap.add_argument("--write", metavar="MD", help="write the results into the Input pipeline "
                                                  "section of this file")
    args = ap.parse_args(argv)

    import keras
    import tensorflow as tf

    from covidlib.arraystore import ArrayLoader, build_store

    load0 = os.getloadavg()
    t_start = time.perf_counter()
    data = Path(args.data)
    items = list_images(data)
    n_found = len(items)
    # Same images for every variant: leave out what (a) cannot decode (e.g. TIFFs named .jpg).
    skipped = [p for p, _ in items if not tf_decodable(p)]
    items = [it for it in items if it[0] not in set(skipped)]
    if args.n:
        items = items[: args.n]
    tmp = Path(tempfile.mkdtemp(prefix="covidlib-bench-pipe-"))
    try:
        if args.n or skipped:
            src = tmp / "images"
            subset_tree(items, src)
        else:
            src = data
        man = make_manifest(items, data.name)
        n = len(man)
        classes = config.ordered_classes(man["label"].unique())
        print(f"{n} images from {data} ({dict(man['label'].value_counts())}); "
              f"load avg {load0[0]:.2f}", flush=True)

        # (a) decode every epoch
        ds = keras.utils.image_dataset_from_directory(
            str(src), labels="inferred", label_mode="categorical", color_mode="grayscale",
            batch_size=args.batch, image_size=(args.size, args.size), shuffle=True, seed=0,
            verbose=False)
        ds = ds.prefetch(tf.data.AUTOTUNE)

        def epoch_a() -> int:
            k = 0
            for x, _ in ds:
                k += int(x.shape[0])
            return k

        # (b) decode once
        t0 = time.perf_counter()
        store = build_store(man, args.size, tmp / "cache")
        build_s = time.perf_counter() - t0
        if len(store.images) != n:
            raise RuntimeError(f"store holds {len(store.images)} of {n} images")
        y = store.labels(classes)
        loaders = {
            "b": ArrayLoader(store.images, y, len(classes), args.batch, shuffle=True, seed=0),
            "c": ArrayLoader(store.images, y, len(classes), args.batch, shuffle=True, seed=0,
                             sampling="balanced"),
        }

        def epoch_loader(loader) -> int:
            k = 0
            for i in range(len(loader)):
                x, yb = loader[i]
                k += x.shape[0]
            loader.on_epoch_end()
            return k

        first = loaders["b"][0]
        contract = (first[0].dtype == np.uint8 and first[0].shape[1:] == (args.size, args.size, 1)
                    and first[1].dtype == np.float32 and first[1].shape[1] == len(classes))
        runs = {"a": epoch_a, "b": lambda: epoch_loader(loaders["b"]),
                "c": lambda: epoch_loader(loaders["c"])}
        times: dict[str, list[float]] = {k: [] for k in runs}
        counts: dict[str, int] = {}
        for k, fn in runs.items():  # warm-up epoch of each
            t0 = time.perf_counter()
            counts[k] = fn()
            print(f"warm-up {k}: {time.perf_counter() - t0:.2f} s", flush=True)
        for r in range(args.repeats):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                got = fn()
                times[k].append(time.perf_counter() - t0)
                if got != n:
                    raise RuntimeError(f"variant {k} delivered {got} of {n} images")
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.3f} s" for k in runs),
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    total = time.perf_counter() - t_start

    ips = {k: n / statistics.median(v) for k, v in times.items()}
    spread = {k: (n / max(v), n / min(v)) for k, v in times.items()}
    ratio = ips["b"] / ips["a"]
    ok_ratio, ok_ips = ratio >= TARGET_RATIO, ips["b"] >= TARGET_IPS

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = [
        f"| Variant ({n} images, {args.size} px, batch {args.batch}) | images / s (median) "
        "| range over repeats | x (a) |",
        "|---|---:|---:|---:|",
        f"| (a) `image_dataset_from_directory`, decodes every epoch | {ips['a']:,.0f} "
        f"| {spread['a'][0]:,.0f} - {spread['a'][1]:,.0f} | 1.0 |",
        f"| (b) `build_store` + `ArrayLoader(shuffle=True)` | {ips['b']:,.0f} "
        f"| {spread['b'][0]:,.0f} - {spread['b'][1]:,.0f} | {ratio:.1f} |",
        f"| (c) `ArrayLoader(sampling=\"balanced\")` | {ips['c']:,.0f} "
        f"| {spread['c'][0]:,.0f} - {spread['c'][1]:,.0f} | {ips['c'] / ips['a']:.1f} |",
        "",
        "| One-off cost | value |",
        "|---|---:|",
        f"| `build_store` ({n} images decoded, padded, resized to {args.size} px, written) "
        f"| {build_s:.2f} s ({n / build_s:,.0f} images / s) |",
        f"| break-even vs (a) | {build_s * ips['a'] / n:.1f} epochs |",
        "",
        f"Targets: (b) / (a) >= {TARGET_RATIO:.0f} x: {verdict(ok_ratio)} ({ratio:.1f} x); "
        f"(b) >= {TARGET_IPS:,.0f} images / s: {verdict(ok_ips)} ({ips['b']:,.0f}).",
    ]
    table = "\n".join(lines)
    notes = (
        f"- Load average (1 min) {load0[0]:.2f} at the start, {load1[0]:.2f} at the end (the machine is "
        "shared with other jobs).\n"
        f"- One untimed warm-up epoch per variant, then {args.repeats} timed epochs each, interleaved "
        "a, b, c, a, b, c, ...; images / s = images per epoch / median epoch time.\n"
        "- (a) yields float32 tensors (B, S, S, 1) already batched by tf.data's own threads; (b) / (c) "
        "yield uint8 (B, S, S, 1) + one-hot float32 NumPy arrays (the model casts in-graph), read "
        "from the memory-mapped store (in the page cache after the warm-up epoch).\n"
        f"- Batch contract checked: uint8 (B, {args.size}, {args.size}, 1) + one-hot float32: "
        f"{'yes' if contract else '**NO**'}.\n"
        f"- Whole benchmark: {total:.0f} s."
    )
    if skipped:
        notes = (
            f"- {len(skipped)} of the {n_found} files are in a format `tf.io.decode_image` cannot read "
            f"(e.g. `{Path(skipped[0]).parent.name}/{Path(skipped[0]).name}`: TIFF content behind a "
            f".jpg name); they are left out of every variant, which all read the same {n} images "
            "(through a folder of symlinks).\n" + notes)
    print()
    print(table)
    print()
    print(notes)
    if args.write:
        from _machine import section_header, write_section

        argv_used = argv if argv is not None else sys.argv[1:]
        section = (
            section_header(SECTION, "bench_input_pipeline.py", argv_used, machine(), env=("KERAS_BACKEND",))
            + f"Data: {n} images from `{args.data}` (CT slices, folders COVID / NonCOVID, mostly 512 x 512 JPEGs; "
            "`--data DIR` points elsewhere). Same images for every variant.\n\n"
            f"{table}\n\n{notes}\n"
        )
        write_section(Path(args.write), SECTION, section)
        print(f"\nwrote the {SECTION[3:]} section of {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
