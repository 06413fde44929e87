"""Tests for covidlib.arraystore: the decode-once store, square resizing and the batch loader."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import keras  # noqa: F401 - a hard dependency: a broken install must fail, not skip

from covidlib import arraystore  # noqa: E402


def _write_images(folder: Path, n: int = 6, size: int = 24) -> pd.DataFrame:
    """n distinct grayscale PNGs (image i has value 20*i+10 with a diagonal bar) and their manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = np.full((size, size), 20 * i + 10, np.uint8)
        np.fill_diagonal(img, 255)
        p = folder / f"img_{i}.png"
        cv2.imwrite(str(p), img)
        rows.append({"path": str(p), "label": ["covid", "normal"][i % 2], "patient_id": f"p{i}",
                     "split": "train" if i < 4 else "val"})
    return pd.DataFrame(rows)


def _counting_reader():
    calls: list[str] = []

    def read(path: str) -> np.ndarray:
        calls.append(path)
        img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError(f"cannot decode {path}")
        return img

    return read, calls


def test_build_store_decodes_once_and_reuses(tmp_path):
    man = _write_images(tmp_path / "img")
    read, calls = _counting_reader()
    s1 = arraystore.build_store(man, 16, tmp_path / "cache", reader=read, workers=1)
    assert len(calls) == len(man)
    assert s1.images.shape == (6, 16, 16) and s1.images.dtype == np.uint8
    assert s1.img_size == 16
    # Row i of the store is image i, resized.
    for i in range(6):
        src = cv2.imread(man.loc[i, "path"], cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(s1.images[i], arraystore.square_resize(src, 16))
        assert s1.images[i][0, 5] == 20 * i + 10
    assert list(s1.index["path"]) == list(man["path"])
    assert list(s1.split_indices("val")) == [4, 5]
    s2 = arraystore.build_store(man.copy(), 16, tmp_path / "cache", reader=read, workers=1)
    assert len(calls) == len(man), "second call must not decode again"
    assert s2.root == s1.root
    np.testing.assert_array_equal(np.asarray(s2.images), np.asarray(s1.images))
    assert not s2.images.flags.writeable  # memory-mapped read-only


def test_build_store_rebuilds_when_a_file_changes(tmp_path):
    man = _write_images(tmp_path / "img")
    read, calls = _counting_reader()
    s1 = arraystore.build_store(man, 16, tmp_path / "cache", reader=read, workers=1)
    target = Path(man.loc[2, "path"])
    cv2.imwrite(str(target), np.full((24, 24), 7, np.uint8))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # a surely newer stamp
    s2 = arraystore.build_store(man, 16, tmp_path / "cache", reader=read, workers=1)
    assert s2.root != s1.root
    assert len(calls) == 2 * len(man)
    assert np.all(np.asarray(s2.images[2]) == 7)
    assert s1.images[2][0, 5] == 50  # the old store is untouched


def test_build_store_rebuilds_for_another_size_or_label(tmp_path):
    man = _write_images(tmp_path / "img")
    read, calls = _counting_reader()
    s16 = arraystore.build_store(man, 16, tmp_path / "cache", reader=read, workers=1)
    s20 = arraystore.build_store(man, 20, tmp_path / "cache", reader=read, workers=1)
    assert s20.root != s16.root and s20.img_size == 20
    relabel = man.copy()
    relabel.loc[0, "label"] = "cap"
    s16b = arraystore.build_store(relabel, 16, tmp_path / "cache", reader=read, workers=1)
    assert s16b.root != s16.root
    assert s16b.index.loc[0, "label"] == "cap"
    assert len(calls) == 3 * len(man)


def test_corrupt_file_left_out_with_warning(tmp_path):
    man = _write_images(tmp_path / "img")
    bad = Path(man.loc[3, "path"])
    bad.write_bytes(b"this is not a png")
    before = (bad.read_bytes(), bad.stat().st_mtime_ns)
    with pytest.warns(UserWarning, match="could not be decoded"):
        store = arraystore.build_store(man, 16, tmp_path / "cache", workers=2)  # default reader (covidlib.images)
    assert [f["path"] for f in store.params["failed"]] == [str(bad)]
    assert store.params["failed"][0]["reason"]
    assert store.params["n"] == 5 and store.images.shape[0] == 5
    assert str(bad) not in set(store.index["path"])
    # The remaining rows still line up with their images after the compaction.
    for i, path in enumerate(store.index["path"]):
        k = int(Path(path).stem.split("_")[1])
        assert store.images[i][0, 5] == 20 * k + 10
    assert (bad.read_bytes(), bad.stat().st_mtime_ns) == before  # raw data untouched
    # The reused store still reports the failure.
    again = arraystore.build_store(man, 16, tmp_path / "cache")
    assert again.root == store.root and len(again.params["failed"]) == 1


def test_build_store_bad_manifest(tmp_path):
    with pytest.raises(ValueError, match="lacks columns"):
        arraystore.build_store(pd.DataFrame({"path": ["a.png"]}), 16, tmp_path)
    with pytest.raises(ValueError, match="empty"):
        arraystore.build_store(pd.DataFrame(columns=["path", "label", "split", "patient_id"]), 16, tmp_path)
    with pytest.raises(FileNotFoundError):
        arraystore.open_store(tmp_path / "nothing")


def test_store_labels(tmp_path):
    man = _write_images(tmp_path / "img")
    read, _ = _counting_reader()
    store = arraystore.build_store(man, 16, tmp_path / "cache", reader=read, workers=1)
    assert list(store.labels(["covid", "normal"])) == [0, 1, 0, 1, 0, 1]
    assert list(store.labels(["normal", "covid"], np.array([0, 1]))) == [1, 0]
    with pytest.raises(ValueError, match="not among the classes"):
        store.labels(["covid"])


@pytest.mark.parametrize("shape", [(20, 40), (40, 20)])
def test_square_resize_pads_and_keeps_aspect(shape):
    img = np.full(shape, 200, np.uint8)
    out = arraystore.square_resize(img, 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    bright = out > 100
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    h, w = int(np.ptp(rows)) + 1, int(np.ptp(cols)) + 1
    # Aspect 1:2 kept (16 x 32 or 32 x 16), content centred, black padding.
    assert sorted((h, w)) == [16, 32]
    assert (h, w) == ((16, 32) if shape[0] < shape[1] else (32, 16))
    if h == 16:
        assert out[:7].max() == 0 and out[-7:].max() == 0
        assert 7 <= rows.min() <= 9
    else:
        assert out[:, :7].max() == 0 and out[:, -7:].max() == 0


def test_square_resize_same_size_and_enlarge():
    img = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16).astype(np.uint8)
    np.testing.assert_array_equal(arraystore.square_resize(img, 16), img)
    big = arraystore.square_resize(np.full((10, 10), 90, np.uint8), 40)
    assert big.shape == (40, 40) and np.all(big == 90)


def _indexed_images(n: int, size: int = 4) -> np.ndarray:
    """Image i is filled with the value i, so a batch tells which rows it holds."""
    return np.repeat(np.arange(n, dtype=np.uint8), size * size).reshape(n, size, size)


def _epoch_rows(loader) -> list[int]:
    return [int(v) for i in range(len(loader)) for v in loader[i][0][:, 0, 0, 0]]


def test_array_loader_batches():
    n, k = 10, 3
    images = _indexed_images(n)
    y = np.arange(n) % k
    loader = arraystore.ArrayLoader(images, y, k, batch_size=4)
    assert len(loader) == 3
    x, onehot = loader[0]
    assert x.dtype == np.uint8 and x.shape == (4, 4, 4, 1)
    assert onehot.dtype == np.float32 and onehot.shape == (4, 3)
    np.testing.assert_array_equal(onehot.argmax(axis=1), x[:, 0, 0, 0] % k)
    np.testing.assert_array_equal(onehot.sum(axis=1), 1.0)
    assert loader[2][0].shape[0] == 2  # the last, partial batch
    assert _epoch_rows(loader) == list(range(n))  # no shuffle: manifest order


def test_array_loader_rows_subset():
    images = _indexed_images(10)
    rows = np.array([7, 2, 9])
    loader = arraystore.ArrayLoader(images, np.array([1, 0, 1]), 2, batch_size=8, rows=rows)
    x, y = loader[0]
    got = dict(zip(x[:, 0, 0, 0].tolist(), y.argmax(axis=1).tolist()))
    assert got == {7: 1, 2: 0, 9: 1}
    with pytest.raises(ValueError, match="labels"):
        arraystore.ArrayLoader(images, np.array([0, 1]), 2, rows=rows)
    with pytest.raises(ValueError, match="sampling"):
        arraystore.ArrayLoader(images, np.zeros(10, int), 2, sampling="oversample")


def test_array_loader_shuffle_covers_each_row_once_and_reshuffles():
    n, k = 23, 2
    images = _indexed_images(n)
    y = (np.arange(n) % 5 == 0).astype(int)
    a = arraystore.ArrayLoader(images, y, k, batch_size=5, shuffle=True, seed=7)
    b = arraystore.ArrayLoader(images, y, k, batch_size=5, shuffle=True, seed=7)
    c = arraystore.ArrayLoader(images, y, k, batch_size=5, shuffle=True, seed=8)
    epochs_a, epochs_b = [], []
    for _ in range(3):
        ea = _epoch_rows(a)
        assert sorted(ea) == list(range(n))  # every row exactly once per epoch
        for i in range(len(a)):  # labels follow their images inside a shuffled batch
            xb, yb = a[i]
            np.testing.assert_array_equal(yb.argmax(axis=1), y[xb[:, 0, 0, 0]])
        epochs_a.append(ea)
        epochs_b.append(_epoch_rows(b))
        a.on_epoch_end()
        b.on_epoch_end()
    assert epochs_a == epochs_b  # same seed -> same order, epoch after epoch
    assert epochs_a[0] != epochs_a[1] != epochs_a[2]  # reshuffled every epoch
    assert epochs_a[0] != list(range(n))
    assert _epoch_rows(c) != epochs_a[0]


def test_balanced_sampling_equalises_classes():
    n = 100
    images = _indexed_images(n)
    y = np.array([0] * 90 + [1] * 10)
    loader = arraystore.ArrayLoader(images, y, 2, batch_size=16, shuffle=True, seed=0, sampling="balanced")
    plain = arraystore.ArrayLoader(images, y, 2, batch_size=16, shuffle=True, seed=0)
    for _ in range(3):
        labels = np.concatenate([loader[i][1].argmax(axis=1) for i in range(len(loader))])
        assert len(labels) == n  # epoch length unchanged
        assert 0.35 <= labels.mean() <= 0.65
        plain_labels = np.concatenate([plain[i][1].argmax(axis=1) for i in range(len(plain))])
        assert plain_labels.mean() == pytest.approx(0.10)
        loader.on_epoch_end()
        plain.on_epoch_end()


def test_class_weights():
    w = arraystore.class_weights(np.array([0, 0, 0, 1]), 3)
    assert w[0] == pytest.approx(4 / 9)
    assert w[1] == pytest.approx(4 / 3)
    assert w[2] == 0.0
    balanced = arraystore.class_weights(np.array([0, 1, 2, 0, 1, 2]), 3)
    assert all(v == pytest.approx(1.0) for v in balanced.values())
    # Weighted counts are equal across present classes.
    y = np.array([0] * 90 + [1] * 10)
    w = arraystore.class_weights(y, 2)
    assert 90 * w[0] == pytest.approx(10 * w[1])
