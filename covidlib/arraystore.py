"""Decode-once array store and the batch loader that feeds every Keras backend.

Decoding every JPEG again every epoch makes the CPU, not the accelerator, the bottleneck
(BENCHMARKS.md, Input pipeline). The store decodes each image of a manifest once, pads it to a
square, resizes it and keeps the result as one memory-mapped ``uint8`` array on disk. Epochs
then read batches straight from the memory map. The store is keyed by the manifest's content
(paths, labels, splits, file sizes and times) and the image size, so it is rebuilt only when
its inputs change.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import keras
import numpy as np
import pandas as pd

STORE_VERSION = 1


@dataclass
class ArrayStore:
    """Images of one manifest, decoded once: ``images[i]`` is row ``i`` of ``index``."""

    root: Path
    images: np.ndarray  # (N, S, S) uint8, memory-mapped
    index: pd.DataFrame  # path, label, patient_id, split, ... (one row per stored image)
    params: dict = field(default_factory=dict)

    @property
    def img_size(self) -> int:
        return int(self.images.shape[1])

    def split_indices(self, split: str) -> np.ndarray:
        """Row numbers of one split, in manifest order."""
        return np.flatnonzero(self.index["split"].to_numpy() == split)

    def labels(self, classes: list[str], rows: np.ndarray | None = None) -> np.ndarray:
        """Integer labels (indices into ``classes``) of ``rows`` (all rows by default)."""
        lab = self.index["label"].to_numpy() if rows is None else self.index["label"].to_numpy()[rows]
        lookup = {c: i for i, c in enumerate(classes)}
        missing = sorted(set(lab) - set(lookup))
        if missing:
            raise ValueError(f"labels {missing} are not among the classes {classes}")
        return np.array([lookup[v] for v in lab], dtype=np.int64)


def manifest_fingerprint(manifest: pd.DataFrame) -> str:
    """Hash of what a store depends on: each row's path, label, split, patient and file stamp."""
    h = hashlib.sha1()
    for row in manifest[["path", "label", "split", "patient_id"]].itertuples(index=False):
        try:
            st = os.stat(row.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{row.path}|{row.label}|{row.split}|{row.patient_id}|{stamp}\n".encode())
    return h.hexdigest()


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Pad a 2-D image to a square with black (keeps anatomy proportions), then resize.

    INTER_AREA when shrinking (no aliasing), INTER_LINEAR when enlarging.
    """
    h, w = img.shape[:2]
    side = max(h, w)
    if h != w:
        top, left = (side - h) // 2, (side - w) // 2
        img = cv2.copyMakeBorder(img, top, side - h - top, left, side - w - left,
                                 cv2.BORDER_CONSTANT, value=0)
    if side == size:
        return np.ascontiguousarray(img)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def _default_reader(path: str) -> np.ndarray:
    from covidlib.images import read_image, to_uint8

    return to_uint8(read_image(path))


def read_resized(path: str, size: int) -> np.ndarray:
    """One image file exactly as the store keeps it: 8-bit gray, padded square, ``size`` px."""
    return square_resize(_default_reader(path), size)


def _store_root(manifest: pd.DataFrame, img_size: int, cache_dir: str | os.PathLike) -> tuple[Path, str]:
    """The folder a store of ``manifest`` at ``img_size`` lives in, and its content key."""
    key_src = json.dumps({"v": STORE_VERSION, "size": int(img_size),
                          "manifest": manifest_fingerprint(manifest)})
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"store_{int(img_size)}px_{key}", key


def _decode_all(paths: list[str], out: Path, img_size: int, read: Callable[[str], np.ndarray],
                workers: int | None, progress: bool) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Decode ``paths`` into the ``.npy`` file ``out`` (one row each); return (ok mask, failures)."""
    n = len(paths)
    images = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(n, img_size, img_size))
    ok = np.zeros(n, dtype=bool)
    failed: list[dict[str, str]] = []

    def work(i: int) -> tuple[int, str | None]:
        try:
            images[i] = square_resize(read(paths[i]), img_size)
            return i, None
        except Exception as exc:  # noqa: BLE001 - every failure is reported by build_store
            return i, f"{type(exc).__name__}: {exc}"

    it: Any
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        it = pool.map(work, range(n), chunksize=16)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=n, desc=f"decoding to {img_size}px", unit="img")
        for i, err in it:
            if err is None:
                ok[i] = True
            else:
                failed.append({"path": paths[i], "reason": err})
    images.flush()
    return ok, failed


def _keep_rows(npy: Path, ok: np.ndarray) -> None:
    """Rewrite the ``.npy`` file ``npy`` with only the rows where ``ok`` is True."""
    full = np.load(npy, mmap_mode="r")
    tmp = npy.with_name(npy.stem + "_ok.npy")
    compact = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(int(ok.sum()), *full.shape[1:]))
    compact[:] = full[np.flatnonzero(ok)]
    compact.flush()
    del compact, full  # close both memory maps before the file is replaced
    os.replace(tmp, npy)


def build_store(
    manifest: pd.DataFrame,
    img_size: int,
    cache_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    reader: Callable[[str], np.ndarray] | None = None,
    progress: bool = False,
) -> ArrayStore:
    """Decode every image of ``manifest`` once into a memory-mapped store, or reuse it.

    Args:
        manifest: rows with at least ``path, label, split, patient_id`` (absolute paths).
        img_size: square size of the stored images.
        cache_dir: folder holding stores; each lives in ``store_<size>px_<key>/``.
        workers: decoding threads (OpenCV releases the GIL); default: all cores.
        reader: ``path -> 2-D uint8`` (default: :func:`covidlib.images.read_image` + ``to_uint8``).
        progress: show a progress bar.

    Returns:
        The store. Files that fail to decode are left out, listed in ``params["failed"]`` and
        reported with a warning (ingestion should have quarantined them already).
    """
    missing_cols = {"path", "label", "split", "patient_id"} - set(manifest.columns)
    if missing_cols:
        raise ValueError(f"manifest lacks columns {sorted(missing_cols)}")
    if len(manifest) == 0:
        raise ValueError("manifest is empty: nothing to store")
    root, key = _store_root(manifest, img_size, cache_dir)
    if (root / "store.json").is_file():
        return open_store(root)

    paths = manifest["path"].astype(str).tolist()
    root.parent.mkdir(parents=True, exist_ok=True)
    # Built in a temporary folder renamed at the end: a store folder is complete or absent.
    tmp = Path(tempfile.mkdtemp(prefix=".building_", dir=root.parent))
    try:
        ok, failed = _decode_all(paths, tmp / "images.npy", img_size, reader or _default_reader,
                                 workers, progress)
        if failed:
            warnings.warn(
                f"{len(failed)} of {len(paths)} images could not be decoded and are left out of the "
                f"store (first: {failed[0]['path']}: {failed[0]['reason']})",
                UserWarning,
                stacklevel=2,
            )
            _keep_rows(tmp / "images.npy", ok)
        index = manifest.iloc[np.flatnonzero(ok)].reset_index(drop=True)
        index.to_csv(tmp / "index.csv", index=False)
        params = {"version": STORE_VERSION, "img_size": int(img_size), "n": int(ok.sum()),
                  "key": key, "failed": failed}
        (tmp / "store.json").write_text(json.dumps(params, indent=2))
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process finished the same store first: use theirs.
            if not (root / "store.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return open_store(root)


def open_store(root: str | os.PathLike) -> ArrayStore:
    """Open an existing store (memory-mapped, read-only)."""
    root = Path(root)
    meta = root / "store.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{root} is not a covidlib array store (no store.json)")
    params = json.loads(meta.read_text())
    images = np.load(root / "images.npy", mmap_mode="r")
    index = pd.read_csv(root / "index.csv", dtype={"patient_id": str}, keep_default_na=False)
    return ArrayStore(root=root, images=images, index=index, params=params)


def class_weights(y: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced class weights ``n / (k * count_c)``; an absent class gets weight 0."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes).astype(float)
    n = counts.sum()
    return {c: (float(n / (num_classes * counts[c])) if counts[c] else 0.0)
            for c in range(num_classes)}


class ArrayLoader(keras.utils.PyDataset):
    """Batches ``(uint8 images (B, S, S, 1), one-hot float32 labels)`` from an array (or memmap).

    Works for the TensorFlow, JAX and PyTorch backends alike (a ``keras.utils.PyDataset``);
    images stay ``uint8`` until the model casts them, which keeps host-to-device copies 4x
    smaller. Shuffling is seeded per epoch, so a run is reproducible.

    Args:
        images: ``(N, S, S)`` uint8 array.
        labels: ``(N,)`` integer class indices.
        num_classes: width of the one-hot labels.
        batch_size: images per batch.
        shuffle: reshuffle every epoch.
        seed: base seed of the shuffling / sampling.
        sampling: ``"none"`` (each image once per epoch) or ``"balanced"`` (draw with replacement
            so every class is equally likely; epoch length unchanged).
        rows: subset of row numbers of ``images`` to serve (default: all).
        multiple: data-parallel width: every batch holds a multiple of this many images (JAX
            shards a batch evenly over its devices). Training batches (``pad=False``): the last
            batch of an epoch is cut down to a multiple (fewer than ``multiple`` images of that
            epoch's order are skipped). Evaluation batches (``pad=True``): the last batch is
            filled up with copies of its last image weighted 0, and batches come as
            ``(x, y, sample_weight)``: the copies add nothing to the loss but count in the
            size its mean divides by, and Keras' compiled metrics (no sample weights) count them.
        shard: ``(index, count)``: serve only part ``index`` of ``count`` equal, contiguous parts
            of every batch (the global batch) - one process's share in multi-process training.
            Nothing is copied: each part is read from the (memory-mapped) array.
        pad: see ``multiple``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int,
                 batch_size: int = 32, *, shuffle: bool = False, seed: int = 0,
                 sampling: str = "none", rows: np.ndarray | None = None, multiple: int = 1,
                 shard: tuple[int, int] = (0, 1), pad: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if sampling not in ("none", "balanced"):
            raise ValueError(f"sampling must be 'none' or 'balanced', got {sampling!r}")
        index, count = int(shard[0]), int(shard[1])
        if multiple < 1 or count < 1 or not 0 <= index < count or multiple % count:
            raise ValueError(f"need multiple >= 1 and a shard (index, count) with count dividing "
                             f"multiple, got multiple={multiple}, shard={shard}")
        if batch_size % multiple:
            raise ValueError(f"batch_size {batch_size} is not a multiple of {multiple}")
        self.multiple, self.shard, self.pad = int(multiple), (index, count), bool(pad)
        # Batches shaped for data-parallel training; the single-device path stays as it was.
        self.parallel = self.multiple > 1 or count > 1 or self.pad
        self.images = images
        self.rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.y = np.asarray(labels, dtype=np.int64)
        if len(self.y) != len(self.rows):
            raise ValueError(f"{len(self.rows)} images but {len(self.y)} labels")
        if len(self.rows) == 0:
            raise ValueError("no images to load")
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.sampling = sampling
        self.epoch = 0
        self._eye = np.eye(self.num_classes, dtype=np.float32)
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        n = len(self.rows)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.sampling == "balanced":
            counts = np.bincount(self.y, minlength=self.num_classes).astype(float)
            p = 1.0 / counts[self.y]
            return rng.choice(n, size=n, replace=True, p=p / p.sum())
        return rng.permutation(n) if self.shuffle else np.arange(n)

    def __len__(self) -> int:
        n = len(self.rows)
        if self.multiple > 1 and not self.pad:
            n -= (n % self.batch_size) % self.multiple  # the cut of the last batch
        return math.ceil(n / self.batch_size)

    def __getitem__(self, i: int):
        pick = self._order[i * self.batch_size:(i + 1) * self.batch_size]
        if self.parallel:
            return self._parallel_batch(pick)
        src = self.rows[pick]
        # Sorted reads keep memory-map access sequential; labels follow the same permutation.
        perm = np.argsort(src, kind="stable")
        x = self.images[src[perm]][..., None]
        y = self._eye[self.y[pick][perm]]
        return x, y

    def _parallel_batch(self, pick: np.ndarray):
        """One process's share of a global batch that splits evenly over ``multiple`` devices."""
        if not self.pad:
            pick = pick[:len(pick) - len(pick) % self.multiple]
        src, lab = self.rows[pick], self.y[pick]
        perm = np.argsort(src, kind="stable")  # the same sorted order as the single-device batch
        src, lab = src[perm], lab[perm]
        weight = np.ones(len(src), dtype=np.float32)
        extra = -len(src) % self.multiple if self.pad else 0
        if extra:  # copies of the last image, weighted 0 in the loss
            src, lab = np.append(src, [src[-1]] * extra), np.append(lab, [lab[-1]] * extra)
            weight = np.append(weight, np.zeros(extra, dtype=np.float32))
        index, count = self.shard
        part = slice(index * len(src) // count, (index + 1) * len(src) // count)
        x = self.images[src[part]][..., None]
        y = self._eye[lab[part]]
        return (x, y, weight[part]) if self.pad else (x, y)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._make_order()
