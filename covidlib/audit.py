"""Data audit: duplicates, leakage across splits, missing patient ids and shortcut features.

Everything here only *reads* images: no file is ever written, moved or deleted (apart from the
report written by :func:`write_audit`, where the caller asks for it).

Perceptual hash
---------------
:func:`perceptual_hash` is a 64-bit *difference hash* (dHash): the 2-D image is resized with area
averaging to 9 columns x 8 rows, and bit ``8*r + c`` (most significant bit first) is 1 when pixel
``(r, c)`` is brighter than its right neighbour ``(r, c+1)`` by more than 1 % of the thumbnail's
intensity range. The 1 % dead zone matters: in flat regions (the black background of a CT slice)
plain dHash compares noise with noise, and a re-encoded copy flipped up to 19 of 64 bits on
ct-mosmed; with it, re-encoded / resized / noised copies stay within 2 bits.

Near-duplicate threshold
------------------------
Candidates are pairs whose hashes differ in ``<= 6`` of 64 bits (~10 %): copies measured 0-2 bits
apart, unrelated natural images ~32. But 64 bits at 9x8 mostly encode the outline of the body, and
*different* CT slices taken with the same field of view are 0-2 bits apart as well (on ct-mosmed
every slice had another within 2 bits). So when pixels are available a candidate is confirmed only if
the two images' *structure signatures* -- 32x32 area-averaged thumbnails, high-passed (minus a
Gaussian blur, sigma 1 px) so the shared outline drops out, then correlated (Pearson) -- correlate
``>= 0.95``. Copies (re-encoded, resized, noise sigma 8, gamma 0.8, contrast changes) scored >= 0.988;
the most similar *distinct* slices of ct-mosmed scored <= 0.91. Pass ``min_correlation=None`` for the
pure-hash behaviour.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from covidlib import config
from covidlib.evaluate import to_jsonable
from covidlib.fsutil import atomic_write_text

__all__ = [
    "DEFAULT_NEAR_DUP_THRESHOLD", "SHORTCUT_BALANCED_ACCURACY", "DEFAULT_MIN_CORRELATION",
    "perceptual_hash", "structure_signature", "hamming_distance", "near_duplicate_groups",
    "audit_manifest", "write_audit", "format_audit", "audit_by_modality", "format_audit_by_modality",
]

DEFAULT_NEAR_DUP_THRESHOLD = 6
DEFAULT_MIN_CORRELATION = 0.95
# Fraction of the thumbnail range a neighbour must exceed to set a bit (see module docstring).
_DHASH_DEAD_ZONE = 0.01
_SIG_SIZE = 32
_SIG_SIGMA = 1.0

# Pairwise Hamming distances are computed in blocks of this many rows, so memory stays at
# ~block * n bytes however large the data set.
_PAIR_BLOCK = 1024


def _gray2d(img: np.ndarray, who: str) -> np.ndarray:
    """``img`` as a non-empty 2-D array (a single trailing channel is dropped)."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{who} expects a non-empty 2-D grayscale image, got shape {a.shape}")
    return a


def perceptual_hash(img: np.ndarray) -> int:
    """64-bit difference hash (dHash) of a 2-D grayscale image.

    The image is resized (area averaging) to 9 wide x 8 high; each of the 64 bits says whether a
    pixel is brighter than its right-hand neighbour by more than 1 % of the thumbnail's range
    (row-major, most significant bit first).
    Works for uint8, uint16 and float images; a constant image hashes to 0.

    Args:
        img: 2-D array (H, W). A 3-D array with 1 channel is accepted; colour images must be
            converted to gray first (``covidlib.images.read_image`` does that).

    Returns:
        The hash as a non-negative Python ``int`` < 2**64.

    Raises:
        ValueError: if ``img`` is not a non-empty 2-D image.
    """
    a = _gray2d(img, "perceptual_hash")
    import cv2  # local: keeps `import covidlib.audit` light

    small = cv2.resize(a.astype(np.float32, copy=False), (9, 8), interpolation=cv2.INTER_AREA)
    # The floor absorbs float round-off of the resize (a constant image must hash to 0).
    tol = max(_DHASH_DEAD_ZONE * float(small.max() - small.min()), 1e-4 * max(1.0, float(np.abs(small).max())))
    bits = small[:, :-1] - small[:, 1:] > tol
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def structure_signature(img: np.ndarray) -> np.ndarray:
    """Unit-norm 1024-vector used to confirm near-duplicate candidates (see module docstring).

    32x32 area-averaged thumbnail minus its Gaussian blur (sigma 1 px), zero mean, unit length:
    the dot product of two signatures is their Pearson correlation. A constant image gives zeros.
    """
    a = _gray2d(img, "structure_signature")
    import cv2

    t = cv2.resize(a.astype(np.float32, copy=False), (_SIG_SIZE, _SIG_SIZE), interpolation=cv2.INTER_AREA)
    t = (t - cv2.GaussianBlur(t, (0, 0), _SIG_SIGMA)).ravel()
    t -= t.mean()
    norm = float(np.linalg.norm(t))
    return (t / norm if norm > 1e-6 else np.zeros_like(t)).astype(np.float32)


def hamming_distance(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return bin((int(a) ^ int(b)) & 0xFFFFFFFFFFFFFFFF).count("1")


def _popcount64(x: np.ndarray) -> np.ndarray:
    """Bit count of a uint64 array (numpy >= 2 has it built in)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int16)
    return np.unpackbits(x[..., None].view(np.uint8), axis=-1).sum(axis=-1, dtype=np.int16)


def _near_duplicate_pairs(
    hashes: Sequence[int] | np.ndarray,
    threshold: int = DEFAULT_NEAR_DUP_THRESHOLD,
    signatures: np.ndarray | None = None,
    min_correlation: float | None = DEFAULT_MIN_CORRELATION,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` with Hamming distance <= threshold (and, with ``signatures``, structure
    correlation >= min_correlation): arrays (i, j, hamming distance)."""
    h = np.asarray([int(x) for x in hashes], dtype=np.uint64)
    n = len(h)
    use_sig = signatures is not None and min_correlation is not None and n > 0
    # Keep each block's n-wide float matrix around 64 MB whatever the data set size.
    block = max(16, min(_PAIR_BLOCK, int(16_000_000 // max(n, 1)))) if use_sig else _PAIR_BLOCK
    ii, jj, dd = ([np.zeros(0, dtype=np.int64)] for _ in range(3))
    for start in range(0, n, block):
        stop = min(start + block, n)
        # Compare the block against everything from its own first row on (upper triangle only).
        d = _popcount64(h[start:stop, None] ^ h[None, start:])
        mask = d <= threshold
        mask &= np.arange(start, n)[None, :] > np.arange(start, stop)[:, None]
        if use_sig and mask.any():
            corr = signatures[start:stop] @ signatures[start:].T
            mask &= corr >= min_correlation
        r, c = np.nonzero(mask)
        ii.append(r + start)
        jj.append(c + start)
        dd.append(d[r, c])
    return tuple(np.concatenate(a).astype(np.int64) for a in (ii, jj, dd))


def _connected_groups(n: int, pairs_i: Iterable[int], pairs_j: Iterable[int]) -> list[int]:
    """Connected components of the pair graph; group ids 0, 1, 2... in order of first member."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return []
    i = np.fromiter(pairs_i, dtype=np.int64)
    j = np.fromiter(pairs_j, dtype=np.int64)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # SciPy's numbering is an implementation detail: renumber in order of first appearance
    # (reports and tests rely on it).
    return pd.factorize(labels)[0].tolist()


def _hash_item(item) -> tuple[int, np.ndarray | None]:
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        return int(item), None
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (int, np.integer)):
        sig = None if item[1] is None else np.asarray(item[1], dtype=np.float32).ravel()
        return int(item[0]), sig
    if isinstance(item, (str, os.PathLike)):
        from covidlib import images as cimg

        item = cimg.read_image(Path(item))
    a = np.asarray(item)
    return perceptual_hash(a), structure_signature(a)


def near_duplicate_groups(
    images_or_paths: Sequence,
    threshold: int = DEFAULT_NEAR_DUP_THRESHOLD,
    *,
    min_correlation: float | None = DEFAULT_MIN_CORRELATION,
) -> list[int]:
    """Group near-identical images.

    Two items are linked when their perceptual hashes are within Hamming distance ``threshold``
    and -- if every item has pixels (arrays or paths) and ``min_correlation`` is not None -- their
    structure signatures correlate >= ``min_correlation``. Links are closed transitively
    (connected components): a chain a~b~c is one group even when a and c are further apart. See the module
    docstring for why 6 bits and 0.95 (in short: copies <= 2 bits / >= 0.988; distinct CT slices
    can be 0 bits apart, hence the confirmation).

    Args:
        images_or_paths: 2-D arrays, image paths (read with ``covidlib.images.read_image``),
            precomputed ``perceptual_hash`` ints, or ``(hash, structure_signature(img))`` tuples
            (computed once while reading), in any mix. A bare int disables the confirmation.
        threshold: maximum Hamming distance (0..64 bits).
        min_correlation: structure-correlation needed to confirm a pair; None = hash only.

    Returns:
        One group id per item (ints 0, 1, 2... numbered by first appearance). Items in the same
        group are near-duplicates; a unique item has a group of its own.

    Raises:
        ValueError: bad threshold or a non-2-D image.
        covidlib.images.ImageReadError: a path cannot be read.
    """
    if not 0 <= int(threshold) <= 64:
        raise ValueError(f"threshold must be between 0 and 64 bits, got {threshold}")
    items = [_hash_item(x) for x in images_or_paths]
    hashes = [h for h, _ in items]
    sigs = None
    if min_correlation is not None and items and all(s is not None for _, s in items):
        sigs = np.stack([s for _, s in items])
    i, j, _ = _near_duplicate_pairs(hashes, int(threshold), sigs, min_correlation)
    return _connected_groups(len(hashes), i, j)


# --------------------------------------------------------------------------------------------
# Manifest audit
# --------------------------------------------------------------------------------------------

# A property "alone" separates a class when a depth-2 decision tree on that one property (or, for a
# categorical property, the best value -> class table) reaches a 5-fold cross-validated balanced
# accuracy >= 0.9 -- far above chance (1/K) -- for that class against the rest (or for all classes
# at once). Classes with fewer than MIN_CLASS_SUPPORT images are never flagged: too few to tell.
# With real patient ids the folds are grouped by patient (StratifiedGroupKFold): the check must
# not leak itself, or a property that only recognises a patient (shared by all their slices)
# would be reported as a class shortcut.
SHORTCUT_BALANCED_ACCURACY = 0.9
MIN_CLASS_SUPPORT = 10
# A "pure subgroup" (e.g. every `nor_*` file is non-COVID): one value of a categorical or
# few-valued property that holds >= 20 images, >= 95 % of them one class, >= 10 % of that class,
# and is that pure with probability < 1e-6 if classes were spread at random over the values.
SUBGROUP_MIN_SIZE = 20
SUBGROUP_MIN_PURITY = 0.95
SUBGROUP_MIN_COVERAGE = 0.10
SUBGROUP_MAX_P = 1e-6
# Numeric properties with at most this many distinct values are also checked for pure subgroups.
_FEW_VALUES = 12
# "Pure black" = at most 1 % of the dtype's range (JPEG ringing turns exact 0 into 1 or 2).
_BLACK_LEVEL = 0.01
# Border ring used for the border intensity: 5 % of the shorter side.
_BORDER_FRACTION = 0.05

_NUMERIC_PROPS = (
    "width", "height", "channels", "bit_depth", "file_size",
    "mean", "std", "black_fraction", "border_mean",
)
_CATEGORICAL_PROPS = ("extension", "source", "name_pattern")
_INTENSITY_PROPS = {"mean", "std", "black_fraction", "border_mean"}


def _extension(path: str) -> str:
    name = path.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return os.path.splitext(name)[1] or "<none>"


def _decode(data: bytes, path: str) -> tuple[np.ndarray, int | None]:
    """Decode bytes to a 2-D gray array plus the stored channel count (None if unknown)."""
    if _extension(path) not in config.MEDICAL_EXTENSIONS:
        import cv2

        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is not None and arr.ndim == 2:
            return arr, 1
        if arr is not None:
            to_gray = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}.get(arr.shape[2])
            return (arr[:, :, 0] if to_gray is None else cv2.cvtColor(arr, to_gray)), int(arr.shape[2])
    # DICOM / NIfTI / anything OpenCV cannot decode: the project's reader knows more formats and
    # gives a proper reason when it fails.
    from covidlib import images as cimg

    return np.asarray(cimg.read_image(Path(path))), None


def _scan_one(path: str) -> dict[str, Any]:
    """Read one file once: content hash, size, decoded properties, perceptual hash, statistics."""
    rec: dict[str, Any] = {"ok": False, "reason": None, "sha1": None, "file_size": None}
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        rec["reason"] = "file not found"
        return rec
    except OSError as exc:
        rec["reason"] = f"cannot read file: {exc.strerror or exc}"
        return rec
    rec["sha1"] = hashlib.sha1(data).hexdigest()
    rec["file_size"] = len(data)
    try:
        img, channels = _decode(data, path)
        if img.ndim != 2 or img.size == 0:
            raise ValueError(f"decoded to shape {img.shape}, not a 2-D image")
    except Exception as exc:  # any decoder failure is reported, never raised
        reason = str(exc) or type(exc).__name__
        rec["reason"] = f"cannot decode image: {reason}"
        return rec
    import cv2

    h, w = img.shape
    if img.dtype == np.uint8:
        scale, full = 1.0, 255.0
    elif img.dtype == np.uint16:
        scale, full = 255.0 / 65535.0, 65535.0
    else:
        img = img.astype(np.float32, copy=False)
        lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
        # Floats: scale their own range onto 0..255 so statistics are comparable.
        scale = 255.0 / (hi - lo) if hi > lo else 1.0
        img = img - lo
        full = hi - lo if hi > lo else 1.0
    mean, std = cv2.meanStdDev(img)
    b = max(1, int(round(_BORDER_FRACTION * min(h, w))))
    if 2 * b >= min(h, w):
        border_mean = float(img.mean())
    else:
        total = float(img.sum(dtype=np.float64))
        inner = float(img[b:-b, b:-b].sum(dtype=np.float64))
        border_mean = (total - inner) / (h * w - (h - 2 * b) * (w - 2 * b))
    rec.update(
        ok=True,
        width=int(w),
        height=int(h),
        channels=channels,
        bit_depth=int(img.dtype.itemsize * 8),
        mean=float(mean[0, 0]) * scale,
        std=float(std[0, 0]) * scale,
        black_fraction=float(np.count_nonzero(img <= _BLACK_LEVEL * full)) / img.size,
        border_mean=border_mean * scale,
        phash=perceptual_hash(img),
        signature=structure_signature(img),
    )
    return rec


def _name_pattern(path: str, label: str) -> str:
    """File stem with digit runs -> '#' and class words -> '{label}' ('nor_13_img_4' -> 'nor_#_img_#')."""
    p = Path(path)
    name = p.name.lower()
    ext = _extension(name)
    stem = name[: -len(ext)] if ext != "<none>" and name.endswith(ext) else name
    # Names that merely repeat the class (covid_001.png / normal_001.png) are not a source
    # difference: fold the label and the class folder name into one token first.
    for token in sorted({str(label).lower(), p.parent.name.lower()}, key=len, reverse=True):
        if len(token) >= 3:
            stem = stem.replace(token, "{label}")
    return re.sub(r"\d+", "#", stem)


def _fit_predict(x_tr, y_tr, x_te, categorical: bool) -> np.ndarray:
    if categorical:
        # Value -> the class it is most typical of: highest P(value | class), i.e. balanced priors
        # like class_weight="balanced" for the numeric tree; ties go to the larger class, then
        # the first. An unseen value -> the majority class.
        table = pd.crosstab(np.asarray(x_tr), np.asarray(y_tr))  # value x class counts
        n_class = table.sum()
        by_size = np.argsort(-n_class.to_numpy(), kind="stable")
        best, majority = (table / n_class).iloc[:, by_size].idxmax(axis=1), n_class.idxmax()
        return np.array([best.get(v, majority) for v in x_te], dtype=object)
    from sklearn.tree import DecisionTreeClassifier

    tree = DecisionTreeClassifier(max_depth=2, class_weight="balanced", random_state=0)
    tree.fit(np.asarray(x_tr, dtype=np.float64).reshape(-1, 1), y_tr)
    return tree.predict(np.asarray(x_te, dtype=np.float64).reshape(-1, 1))


def _cv_balanced_accuracy(x: np.ndarray, y: np.ndarray, categorical: bool,
                          groups: np.ndarray | None = None) -> float:
    """Cross-validated balanced accuracy of the class predicted from property ``x`` alone.

    With ``groups`` (patient ids) the folds keep each patient's images together
    (StratifiedGroupKFold): slices of one patient share scanner, dose and body, so under image
    folds a property that merely recognises the patient would pass for a class shortcut.
    Without ids, StratifiedKFold over images. Up to 5 folds, fewer when a class has fewer
    images (patients); NaN when it has only one.
    """
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    classes, counts = np.unique(y, return_counts=True)
    if groups is None:
        n_splits = int(min(5, counts.min()))
        cv = StratifiedKFold(n_splits=max(n_splits, 2), shuffle=True, random_state=0)
    else:
        n_splits = min(5, min(len(set(groups[y == c].tolist())) for c in classes))
        cv = StratifiedGroupKFold(n_splits=max(n_splits, 2), shuffle=True, random_state=0)
    if n_splits < 2:
        return float("nan")
    pred = np.empty(len(y), dtype=object)
    for tr, te in cv.split(np.zeros(len(y)), y, groups):
        if len(te):  # grouped folds can come out empty when patients are few
            pred[te] = _fit_predict(x[tr], y[tr], x[te], categorical)
    return float(balanced_accuracy_score(y.astype(object), pred))


def _describe_by_class(x: np.ndarray, y: np.ndarray, classes: list[str], categorical: bool) -> dict:
    out: dict[str, Any] = {}
    for c in classes:
        v = x[y == c]
        if len(v) == 0:
            continue
        if categorical:
            top = Counter(v.tolist()).most_common(3)
            out[c] = {"n_distinct": len(set(v.tolist())), "top": [[str(k), int(n)] for k, n in top]}
        else:
            v = v.astype(np.float64)
            p5, p95 = np.percentile(v, [5, 95])
            out[c] = {"median": round(float(np.median(v)), 4), "p5": round(float(p5), 4),
                      "p95": round(float(p95), 4)}
    return out


def _pure_subgroups(x: np.ndarray, y: np.ndarray) -> list[dict]:
    """Values of ``x`` that (almost) only one class has, beyond chance (criteria: SUBGROUP_*)."""
    from scipy.stats import binom  # lazy: scipy.stats costs CLI start-up time

    table = pd.crosstab(x.astype(str), y)  # value x class counts
    class_n, n = table.sum(), len(y)
    found = []
    for v, row in table.iterrows():
        c = row.idxmax()
        n_v, n_c = int(row.sum()), int(row[c])
        purity, coverage = n_c / n_v, n_c / int(class_n[c])
        if (n_v < SUBGROUP_MIN_SIZE or n_v > 0.9 * n or purity < SUBGROUP_MIN_PURITY
                or coverage < SUBGROUP_MIN_COVERAGE):
            continue
        # Chance that a random value holding n_v images is this pure: at most n_v - n_c others.
        p = float(binom.cdf(n_v - n_c, n_v, 1.0 - int(class_n[c]) / n))
        if p < SUBGROUP_MAX_P:
            found.append({"value": str(v), "class": c, "n": n_v, "purity": round(purity, 4),
                          "class_coverage": round(coverage, 4), "p_value": p})
    return sorted(found, key=lambda d: -d["n"])


def _tree_bins(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Label each value with its depth-2 tree leaf as an interval ('12.5 < v <= 40'), so that a
    range of a continuous property holding one class only can be tested like a category."""
    from sklearn.tree import DecisionTreeClassifier

    xf = np.asarray(x, dtype=np.float64)
    tree = DecisionTreeClassifier(max_depth=2, class_weight="balanced", random_state=0).fit(xf[:, None], y)
    # A tree on one number cuts the line at its split points: each leaf is an interval between two.
    edges = np.sort(tree.tree_.threshold[tree.tree_.children_left != -1])
    names = [_interval(lo, hi) for lo, hi in zip(np.r_[-np.inf, edges], np.r_[edges, np.inf])]
    # The tree's own rule: float32 input, left when x <= threshold.
    return np.array(names, dtype=object)[np.searchsorted(edges, xf.astype(np.float32), side="left")]


def _interval(lo: float, hi: float) -> str:
    if np.isinf(lo):
        return f"<= {hi:.4g}"
    return f"> {lo:.4g}" if np.isinf(hi) else f"{lo:.4g} < v <= {hi:.4g}"


def _shortcut_property(name: str, x: np.ndarray, y: np.ndarray, categorical: bool,
                       groups: np.ndarray | None = None) -> dict:
    """How well property ``name`` alone predicts the class (see SHORTCUT_BALANCED_ACCURACY).

    ``groups``: patient id per image for patient-grouped folds (None: image folds).
    """
    classes = sorted(set(y.tolist()), key=_class_key)
    k = len(classes)
    distinct = len(set(x.tolist()))
    res: dict[str, Any] = {
        "kind": "categorical" if categorical else "numeric",
        "n": int(len(y)),
        "n_distinct": distinct,
        "baseline": round(1.0 / k, 4) if k else None,
        "balanced_accuracy": None,
        "per_class_balanced_accuracy": {},
        "separable_classes": [],
        "pure_subgroups": [],
        "shortcut": False,
        "by_class": _describe_by_class(x, y, classes, categorical),
    }
    if distinct <= 1:
        res["constant"] = True
        return res
    bacc = _cv_balanced_accuracy(x, y, categorical, groups)
    res["balanced_accuracy"] = round(bacc, 4) if not math.isnan(bacc) else None
    support = {c: int(np.sum(y == c)) for c in classes}
    for c in classes:
        if k == 2:
            ovr = bacc
        else:
            yb = np.where(y == c, c, "__rest__").astype(object)
            ovr = _cv_balanced_accuracy(x, yb, categorical, groups)
        res["per_class_balanced_accuracy"][c] = None if math.isnan(ovr) else round(ovr, 4)
        if not math.isnan(ovr) and ovr >= SHORTCUT_BALANCED_ACCURACY and support[c] >= MIN_CLASS_SUPPORT:
            res["separable_classes"].append(c)
    if k > 2 and not math.isnan(bacc) and bacc >= SHORTCUT_BALANCED_ACCURACY and min(support.values()) >= MIN_CLASS_SUPPORT:
        res["separable_classes"] = classes
    if categorical or distinct <= _FEW_VALUES:
        xs = x if categorical else np.array([_fmt_num(v) for v in x], dtype=object)
        res["pure_subgroups"] = _pure_subgroups(xs, y)[:10]
    else:
        res["pure_subgroups"] = _pure_subgroups(_tree_bins(x, y), y)[:10]
    res["shortcut"] = bool(res["separable_classes"] or res["pure_subgroups"])
    return res


def _fmt_num(v: Any) -> str:
    f = float(v)
    return str(int(f)) if f.is_integer() else f"{f:.4g}"


def _class_key(c: str) -> tuple[int, str]:
    order = list(config.CANONICAL_LABELS)
    return (order.index(c) if c in order else len(order), str(c))


def _clusters(index_lists: Iterable[Sequence[int]], t: _Table) -> list[dict]:
    """Every group of 2+ rows as a cluster record (up to 10 paths): clusters across splits or
    labels first, then the largest."""
    out = []
    for idx in (list(ix) for ix in index_lists if len(ix) > 1):
        sp = sorted({t.splits[i] for i in idx})
        lb = sorted({t.labels[i] for i in idx}, key=_class_key)
        out.append({"n": len(idx), "splits": sp, "labels": lb, "cross_split": len(sp) > 1,
                    "label_conflict": len(lb) > 1, "paths": [t.paths[i] for i in idx[:10]]})
    return sorted(out, key=lambda d: (not d["cross_split"], not d["label_conflict"], -d["n"]))


def _clean_ids(ids: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Patient ids as stripped strings and the mask of rows without one."""
    s = ids.astype("string").str.strip()
    missing = s.isna() | (s == "") | s.str.lower().isin(["nan", "none", "null"])
    return s, missing.fillna(True).astype(bool)


def _patient_status(ids: pd.Series | None) -> dict:
    """Are patient ids real, missing, or one placeholder per image?"""
    if ids is None:
        return {"status": "missing", "n_missing": None, "n_unique": 0}
    s, missing = _clean_ids(ids)
    present = s[~missing]
    n_unique = int(present.nunique())
    out = {"n_missing": int(missing.sum()), "n_unique": n_unique, "n_images": int(len(s))}
    if len(present) == 0:
        out["status"] = "missing"
    elif float(present.str.startswith("img:").mean()) >= 0.5:
        out["status"] = "placeholder"
    elif n_unique == len(present) and len(present) > 1:
        out["status"] = "all_unique"
    else:
        out["status"] = "real"
    out["images_per_patient_median"] = (
        float(pd.Series(present).value_counts().median()) if len(present) else None
    )
    return out


def _cv_groups(ids: pd.Series | None, status: dict) -> tuple[np.ndarray | None, str]:
    """Patient id per image for the shortcut check's folds, and which split that gives.

    Real ids -> patient-grouped folds (an image without an id is a group of its own).
    Missing, placeholder or one-per-image ids carry no grouping -> image folds.
    """
    if ids is None or status["status"] != "real":
        why = {"missing": "no patient ids", "placeholder": "placeholder ids, one per image",
               "all_unique": "one patient id per image"}[status["status"]]
        return None, f"StratifiedKFold over images ({why})"
    s, missing = _clean_ids(ids)
    groups = s.astype(object).to_numpy().copy()
    groups[missing.to_numpy()] = [f"<no id> row {i}" for i in np.flatnonzero(missing.to_numpy())]
    text = f"StratifiedGroupKFold by patient_id ({int(s[~missing].nunique())} patients"
    if missing.any():
        text += f"; {int(missing.sum())} image(s) without an id are each a group of their own"
    return groups, text + ")"


@dataclass
class _Table:
    """The manifest's columns as the audit steps use them (one entry per row)."""

    df: pd.DataFrame  # index 0..n-1
    paths: list[str]  # absolute
    labels: list[str]
    splits: list[str]  # "all" without a split column, "unknown" for an empty cell
    classes: list[str]  # canonical order
    split_order: list[str]  # train, val, test, then any others sorted


def _check_manifest(manifest: Any, near_dup_threshold: int) -> None:
    if not isinstance(manifest, pd.DataFrame):
        raise ValueError(f"manifest must be a pandas DataFrame, got {type(manifest).__name__}")
    missing_cols = [c for c in ("path", "label") if c not in manifest.columns]
    if missing_cols:
        raise ValueError(f"manifest lacks required column(s) {missing_cols}; it has {list(manifest.columns)}")
    if len(manifest) == 0:
        raise ValueError("manifest is empty: nothing to audit")
    if not 0 <= int(near_dup_threshold) <= 64:
        raise ValueError(f"near_dup_threshold must be 0..64 bits, got {near_dup_threshold}")


def _table(manifest: pd.DataFrame, root: str | os.PathLike | None) -> _Table:
    df = manifest.reset_index(drop=True)
    base = Path(root) if root is not None else Path.cwd()
    paths = [str(p) if os.path.isabs(str(p)) else str(base / str(p)) for p in df["path"]]
    labels = [str(v) for v in df["label"]]
    splits = (
        [("unknown" if pd.isna(v) else str(v)) for v in df["split"]]
        if "split" in df.columns else ["all"] * len(df)
    )
    classes = sorted(set(labels), key=_class_key)
    split_order = [s for s in config.SPLITS if s in set(splits)] + sorted(set(splits) - set(config.SPLITS))
    return _Table(df, paths, labels, splits, classes, split_order)


def _counts(t: _Table, warnings: list[str]) -> dict:
    """Images per split x class, class balance; warns about one class, imbalance, empty cells."""
    classes, labels = t.classes, t.labels
    by_split = {s: {c: 0 for c in classes} for s in t.split_order}
    for s, c in zip(t.splits, labels):
        by_split[s][c] += 1
    by_class = {c: labels.count(c) for c in classes}
    n = len(labels)
    balance = {c: round(by_class[c] / n, 4) for c in classes}
    imbalance = (max(by_class.values()) / min(by_class.values())) if classes else None
    counts = {
        "by_split": by_split, "by_class": by_class, "balance": balance,
        "imbalance_ratio": round(imbalance, 3) if imbalance else None,
    }
    if len(classes) < 2:
        warnings.append(f"Only one class ({classes}) in the manifest: nothing to classify.")
    elif imbalance and imbalance >= 3:
        warnings.append(
            f"Classes are imbalanced (largest/smallest = {imbalance:.1f}): report balanced metrics "
            "(per-class sensitivity, macro F1, AUC), not accuracy alone."
        )
    for s in t.split_order:
        absent = [c for c in classes if by_split[s][c] == 0]
        if absent and s != "all":
            warnings.append(f"Split '{s}' has no images of class(es) {absent}.")
    return counts


def _exact_duplicates(recs: list[dict], t: _Table, max_list: int, warnings: list[str]) -> dict:
    """Byte-identical files (same SHA-1); warns when a cluster spans splits or labels."""
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(recs):
        if r["sha1"]:
            by_sha[r["sha1"]].append(i)
    exact = _clusters(by_sha.values(), t)
    exact_report = {
        "n_clusters": len(exact),
        "n_images": sum(d["n"] for d in exact),
        "n_redundant_copies": sum(d["n"] - 1 for d in exact),
        "n_cross_split_clusters": sum(d["cross_split"] for d in exact),
        "n_label_conflict_clusters": sum(d["label_conflict"] for d in exact),
        "clusters": exact[:max_list],
    }
    if exact_report["n_cross_split_clusters"]:
        warnings.append(
            f"LEAK: {exact_report['n_cross_split_clusters']} byte-identical image cluster(s) span "
            "more than one split (the same file is in train and val/test)."
        )
    if exact_report["n_label_conflict_clusters"]:
        warnings.append(
            f"{exact_report['n_label_conflict_clusters']} byte-identical cluster(s) carry different labels."
        )
    return exact_report


def _near_duplicates(recs: list[dict], ok: np.ndarray, t: _Table, near_dup_threshold: int,
                     min_correlation: float | None, max_list: int, warnings: list[str]) -> dict:
    """Perceptually near-identical images (see the module docstring); warns about pairs across
    splits. Frees the records' structure signatures (the only large part of a record)."""
    paths, splits, labels = t.paths, t.splits, t.labels
    ok_idx = np.flatnonzero(ok)
    hashes = [recs[i]["phash"] for i in ok_idx]
    sigs = np.stack([recs[i]["signature"] for i in ok_idx]) if len(ok_idx) else None
    pi, pj, pd_ = _near_duplicate_pairs(hashes, int(near_dup_threshold), sigs, min_correlation)
    for r in recs:  # the signatures are the only large part of a record; free them early
        r.pop("signature", None)
    gi, gj = ok_idx[pi], ok_idx[pj]
    split_arr = np.array(splits, dtype=object)
    label_arr = np.array(labels, dtype=object)
    cross_pairs = split_arr[gi] != split_arr[gj] if len(gi) else np.zeros(0, dtype=bool)
    groups = _connected_groups(len(ok_idx), pi, pj)
    members: dict[int, list[int]] = defaultdict(list)
    for local, g in enumerate(groups):
        members[g].append(int(ok_idx[local]))
    near = _clusters(members.values(), t)
    order = np.argsort(pd_[cross_pairs], kind="stable") if len(gi) else np.zeros(0, dtype=int)
    xi, xj, xd = gi[cross_pairs][order], gj[cross_pairs][order], pd_[cross_pairs][order]
    near_report = {
        "threshold": int(near_dup_threshold),
        "min_correlation": min_correlation,
        "method": (
            "64-bit dHash (9x8, 1% dead zone) within `threshold` bits"
            + ("" if min_correlation is None else
               f", confirmed by high-passed 32x32 thumbnail correlation >= {min_correlation}")
            + "; clusters = connected components of the pairs"
        ),
        "n_pairs": int(len(gi)),
        "n_cross_split_pairs": int(cross_pairs.sum()),
        "n_label_conflict_pairs": int((label_arr[gi] != label_arr[gj]).sum()) if len(gi) else 0,
        "n_clusters": len(near),
        "n_images": sum(d["n"] for d in near),
        "n_cross_split_clusters": sum(d["cross_split"] for d in near),
        "n_images_in_cross_split_clusters": sum(d["n"] for d in near if d["cross_split"]),
        "n_label_conflict_clusters": sum(d["label_conflict"] for d in near),
        "clusters": near[:max_list],
        "cross_split_pairs": [
            {"a": paths[a], "b": paths[b], "distance": int(d), "splits": [splits[a], splits[b]],
             "labels": [labels[a], labels[b]]}
            for a, b, d in list(zip(xi, xj, xd))[:max_list]
        ],
    }
    if near_report["n_cross_split_pairs"]:
        warnings.append(
            f"LEAK: {near_report['n_cross_split_pairs']} near-duplicate pair(s) ({near_report['method']}) "
            f"lie in different splits, in {near_report['n_cross_split_clusters']} "
            f"cluster(s) holding {near_report['n_images_in_cross_split_clusters']} images; test scores "
            "will be optimistic. Split by patient or drop the copies."
        )
    return near_report


def _patient_overlap(pid_col: pd.Series | None, pstat: dict, splits: list[str], max_list: int) -> dict:
    """Patients whose images sit in more than one split (checked only with usable ids)."""
    checked = pstat["status"] in ("real", "all_unique")  # both imply a patient_id column
    overlap: list[dict] = []
    if checked:
        tmp = pd.DataFrame({"pid": pid_col.astype("string"), "split": splits}).dropna()
        per = tmp.groupby("pid")["split"].agg(lambda s: dict(Counter(s)))
        overlap = [{"patient_id": str(pid), "splits": sc, "n": int(sum(sc.values()))}
                   for pid, sc in per.items() if len(sc) > 1]
    overlap.sort(key=lambda d: -d["n"])
    return {"checked": checked, "n_patients": len(overlap), "n_images": sum(d["n"] for d in overlap),
            "patients": overlap[:max_list]}


def _patient_warnings(pstat: dict, overlap: dict, warnings: list[str]) -> None:
    """Leakage across splits, and missing / placeholder ids (that one goes first)."""
    if overlap["n_patients"]:
        warnings.append(
            f"LEAK: {overlap['n_patients']} patient(s) ({overlap['n_images']} images) appear in more than "
            "one split. Split by patient."
        )
    if pstat["status"] in ("missing", "placeholder"):
        warnings.insert(0,
            "WARNING: NO REAL PATIENT IDS ("
            + ("none given" if pstat["status"] == "missing" else "one placeholder 'img:*' id per image")
            + "). Slices/images of one patient can sit in train AND test, so test metrics are likely "
            "optimistic and patient-level results are impossible. Give a patient pattern or a label "
            "file with patient ids if the source has them."
        )
    elif pstat["status"] == "all_unique":
        warnings.append(
            "Every image has its own patient id: fine if the source has one image per patient, "
            "otherwise the ids are placeholders and patient leakage cannot be checked."
        )
    elif pstat["n_missing"]:
        warnings.append(f"{pstat['n_missing']} image(s) have no patient id.")


def _property_columns(recs: list[dict], t: _Table) -> dict[str, list]:
    """Every checked property's value per image (None where unknown)."""
    columns: dict[str, list] = {p: [r.get(p) for r in recs] for p in _NUMERIC_PROPS}
    columns["extension"] = [_extension(p) for p in t.paths]
    columns["name_pattern"] = [_name_pattern(p, lb) for p, lb in zip(t.paths, t.labels)]
    if "source" in t.df.columns:
        columns["source"] = [None if pd.isna(v) else str(v) for v in t.df["source"]]
    return columns


def _shortcut_properties(recs: list[dict], t: _Table, by_class: dict[str, int],
                         cv_groups: np.ndarray | None) -> dict[str, dict]:
    """:func:`_shortcut_property` for every property, over the classes with >= 2 images."""
    props: dict[str, dict] = {}
    y_all = np.array(t.labels, dtype=object)
    big_classes = [c for c in t.classes if by_class[c] >= 2]
    if len(big_classes) < 2:
        return props
    columns = _property_columns(recs, t)
    for prop, vals in columns.items():
        categorical = prop in _CATEGORICAL_PROPS
        x = np.array(vals, dtype=object)
        keep = ~pd.isna(x) & np.isin(y_all, big_classes)
        if keep.sum() < 4:
            continue
        x = x[keep]
        if not categorical:
            x = x.astype(np.float64)
        props[prop] = _shortcut_property(prop, x, y_all[keep], categorical,
                                         None if cv_groups is None else cv_groups[keep])
    if "source" in props and not props["source"].get("constant"):
        per_source = pd.DataFrame({"source": columns["source"], "label": t.labels}).dropna()
        if (per_source.groupby("source")["label"].nunique() == 1).all():
            props["source"]["note"] = (
                "every source holds exactly one class: either `source` only repeats the class "
                "folder, or the classes really come from different sources"
            )
    return props


def _shortcut_warnings(props: dict[str, dict], grouped: bool, warnings: list[str]) -> None:
    """One warning per flagged property (separable classes), its pure subgroups and note."""
    for p in [p for p, r in props.items() if r["shortcut"]]:
        r = props[p]
        hint = ""
        if r["kind"] == "numeric":
            hint = "; medians " + ", ".join(
                f"{c} {_fmt_num(v['median'])}" for c, v in r["by_class"].items()
            )
        caveat = (
            " (a global intensity statistic can carry some real disease signal, but one this "
            "predictive usually means different scanners/processing per class)"
            if p in _INTENSITY_PROPS else ""
        )
        if r["separable_classes"]:
            warnings.append(
                f"SHORTCUT: '{p}' alone separates class(es) {r['separable_classes']} "
                f"(cross-validated balanced accuracy {r['balanced_accuracy']:.2f} with "
                f"{'patient-grouped' if grouped else 'image-level'} folds, chance "
                f"{r['baseline']:.2f}{hint}){caveat}. A model can learn this instead of the disease."
            )
        for sg in [g for g in r["pure_subgroups"] if g["class"] not in r["separable_classes"]][:3]:
            warnings.append(
                f"SHORTCUT (subgroup): {sg['n']} images with {p} = '{sg['value']}' are "
                f"{sg['purity']:.0%} '{sg['class']}' ({sg['class_coverage']:.0%} of that class) and "
                "(almost) no other class has it: "
                + ("the class is named differently, a sign of a different source."
                   if p == "name_pattern" else "likely a different source; a model can learn it.")
            )
        if r.get("note"):
            warnings.append(f"Note on '{p}': {r['note']}.")


def _shortcuts(recs: list[dict], t: _Table, by_class: dict[str, int], cv_groups: np.ndarray | None,
               cv_split: str, warnings: list[str]) -> dict:
    """The shortcut check: can one property (size, format, intensity, name, source) alone tell
    the classes apart? (criteria: see SHORTCUT_BALANCED_ACCURACY and SUBGROUP_*)."""
    props = _shortcut_properties(recs, t, by_class, cv_groups)
    _shortcut_warnings(props, cv_groups is not None, warnings)
    return {
        "criterion": (
            f"cross-validated (up to 5 folds, {cv_split}) balanced accuracy of the property alone "
            f"(depth-2 decision tree for numbers, value->class table for categories) "
            f">= {SHORTCUT_BALANCED_ACCURACY} for a "
            f"class vs the rest with >= {MIN_CLASS_SUPPORT} images in the class; or a pure subgroup "
            f"(one value, >= {SUBGROUP_MIN_SIZE} images, >= {SUBGROUP_MIN_PURITY:.0%} one class, "
            f">= {SUBGROUP_MIN_COVERAGE:.0%} of it, p < {SUBGROUP_MAX_P:g})"
        ),
        "cv_split": cv_split,
        "flagged": [p for p, r in props.items() if r["shortcut"]],
        "properties": props,
    }


def _quarantine_warnings(quarantine: list[dict] | None, unreadable: list[dict], warnings: list[str]) -> list[dict]:
    """The ingest quarantine (copied) and warnings about it and about unreadable images."""
    quarantine_out = [dict(q) for q in (quarantine or [])]
    if quarantine_out:
        warnings.append(f"{len(quarantine_out)} file(s) were quarantined at ingest (see 'quarantine').")
    if unreadable:
        warnings.append(
            f"{len(unreadable)} manifest image(s) could not be read during the audit (see 'unreadable')."
        )
    return quarantine_out


def audit_manifest(
    manifest,
    quarantine: list[dict] | None = None,
    near_dup_threshold: int = DEFAULT_NEAR_DUP_THRESHOLD,
    *,
    min_correlation: float | None = DEFAULT_MIN_CORRELATION,
    root: str | os.PathLike | None = None,
    max_list: int = 20,
    workers: int | None = None,
) -> dict:
    """Audit a manifest for leakage, duplicates, missing patient ids and shortcut features.

    Reads every image once (thread pool) to get its SHA-1, perceptual hash and statistics. Never
    writes, moves or deletes anything.

    Args:
        manifest: DataFrame with at least ``path`` and ``label``; ``split``, ``patient_id`` and
            ``source`` are used when present (see docs/CONTRACTS.md).
        quarantine: files the ingest step could not use (dicts with ``path``/``reason``); copied
            into the report.
        near_dup_threshold: Hamming distance (of 64 bits) for near-duplicates; see module docs.
        min_correlation: structure correlation that confirms a near-duplicate (None: hash only).
        root: folder that relative paths are relative to (default: current directory).
        max_list: cap on every list of clusters / pairs / patients in the report (totals are
            always given in full).
        workers: reader threads (default: CPU count + 2, at most 8).

    Returns:
        A JSON-serialisable dict: ``counts``, ``exact_duplicates``, ``near_duplicates``,
        ``patient_overlap``, ``patient_ids``, ``shortcuts``, ``quarantine``, ``unreadable``,
        ``warnings`` and ``settings``.

    Raises:
        ValueError: if the manifest is empty or lacks ``path`` / ``label``.
    """
    t0 = time.perf_counter()
    _check_manifest(manifest, near_dup_threshold)
    t = _table(manifest, root)
    warnings: list[str] = []  # in report order: counts, duplicates, patients, shortcuts, files
    n_workers = workers or min(8, (os.cpu_count() or 2) + 2)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:  # one read per image
        recs = list(pool.map(_scan_one, t.paths, chunksize=16))
    ok = np.array([r["ok"] for r in recs], dtype=bool)
    unreadable = [{"path": p, "reason": r["reason"]} for p, r in zip(t.paths, recs) if not r["ok"]]

    counts = _counts(t, warnings)
    exact_report = _exact_duplicates(recs, t, max_list, warnings)
    near_report = _near_duplicates(recs, ok, t, near_dup_threshold, min_correlation, max_list, warnings)
    pid_col = t.df["patient_id"] if "patient_id" in t.df.columns else None
    pstat = _patient_status(pid_col)
    cv_groups, cv_split = _cv_groups(pid_col, pstat)
    patient_overlap = _patient_overlap(pid_col, pstat, t.splits, max_list)
    _patient_warnings(pstat, patient_overlap, warnings)
    shortcuts = _shortcuts(recs, t, counts["by_class"], cv_groups, cv_split, warnings)
    quarantine_out = _quarantine_warnings(quarantine, unreadable, warnings)

    report = {
        "n_images": len(t.labels),
        "n_readable": int(ok.sum()),
        "classes": t.classes,
        "splits": t.split_order,
        "counts": counts,
        "exact_duplicates": exact_report,
        "near_duplicates": near_report,
        "patient_ids": pstat,
        "patient_overlap": patient_overlap,
        "shortcuts": shortcuts,
        "quarantine": quarantine_out,
        "unreadable": unreadable[:max(max_list, 100)],
        "n_unreadable": len(unreadable),
        "warnings": warnings,
        "settings": {
            "near_dup_threshold": int(near_dup_threshold), "min_correlation": min_correlation,
            "max_list": max_list, "workers": n_workers,
        },
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    return to_jsonable(report)


def write_audit(report: dict, path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON, atomically (temp file in the same folder + rename).

    Returns:
        The path written.
    """
    text = json.dumps(to_jsonable(report), indent=2, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def format_audit(report: dict) -> str:
    """A readable Markdown summary of an :func:`audit_manifest` report (for notebooks / logs)."""
    lines: list[str] = ["## Data audit", ""]
    classes = report.get("classes", [])
    counts = report.get("counts", {})
    lines.append(
        f"{report.get('n_images', 0)} images ({report.get('n_readable', 0)} readable), classes "
        + ", ".join(config.display_name(c) for c in classes)
        + f"; audit took {report.get('elapsed_s', 0)} s."
    )
    lines += ["", "### Counts", "", "| split | " + " | ".join(classes) + " | total |",
              "|---" * (len(classes) + 2) + "|"]
    for s, row in counts.get("by_split", {}).items():
        lines.append(f"| {s} | " + " | ".join(str(row.get(c, 0)) for c in classes) + f" | {sum(row.values())} |")
    bc = counts.get("by_class", {})
    lines.append("| **all** | " + " | ".join(str(bc.get(c, 0)) for c in classes) + f" | {sum(bc.values())} |")
    lines.append("")
    lines.append(
        "Balance: " + ", ".join(f"{c} {v:.1%}" for c, v in counts.get("balance", {}).items())
        + f"; imbalance ratio {counts.get('imbalance_ratio')}."
    )

    ex, nd = report.get("exact_duplicates", {}), report.get("near_duplicates", {})
    lines += [
        "", "### Duplicates", "",
        f"- Exact (identical bytes): {ex.get('n_clusters', 0)} cluster(s), {ex.get('n_images', 0)} images, "
        f"{ex.get('n_cross_split_clusters', 0)} across splits, {ex.get('n_label_conflict_clusters', 0)} with conflicting labels.",
        f"- Near ({nd.get('method')}): {nd.get('n_pairs', 0)} pair(s) in "
        f"{nd.get('n_clusters', 0)} cluster(s); {nd.get('n_cross_split_pairs', 0)} pair(s) across splits "
        f"({nd.get('n_images_in_cross_split_clusters', 0)} images in cross-split clusters); "
        f"{nd.get('n_label_conflict_pairs', 0)} pair(s) with different labels.",
    ]
    for p in nd.get("cross_split_pairs", [])[:5]:
        lines.append(f"  - `{Path(p['a']).name}` ({p['splits'][0]}) ~ `{Path(p['b']).name}` ({p['splits'][1]}), distance {p['distance']}")

    ps, po = report.get("patient_ids", {}), report.get("patient_overlap", {})
    lines += ["", "### Patients", "",
              f"- Patient ids: **{ps.get('status')}** ({ps.get('n_unique')} unique, {ps.get('n_missing')} missing)."]
    if po.get("checked"):
        lines.append(f"- Patients in more than one split: {po.get('n_patients', 0)} ({po.get('n_images', 0)} images).")
    else:
        lines.append("- Patient overlap across splits: **cannot be checked** (no real ids).")

    sc = report.get("shortcuts", {})
    props = sc.get("properties", {})
    if props:
        lines += ["", "### Shortcut check (each property alone)", "",
                  "| property | balanced acc. | chance | separable classes | pure subgroups | flag |",
                  "|---|---|---|---|---|---|"]
        for name, r in props.items():
            b = r.get("balanced_accuracy")
            sg = "; ".join(f"{g['value']}->{g['class']} ({g['n']})" for g in r.get("pure_subgroups", [])[:2])
            lines.append(
                f"| {name} | {'-' if b is None else f'{b:.2f}'} | {r.get('baseline')} | "
                f"{', '.join(r.get('separable_classes', [])) or '-'} | {sg or '-'} | "
                f"{'**SHORTCUT**' if r.get('shortcut') else ''} |"
            )
        lines += ["", f"Criterion: {sc.get('criterion')}."]

    if report.get("quarantine") or report.get("n_unreadable"):
        lines += ["", "### Quarantine / unreadable", ""]
        for q in (report.get("quarantine") or [])[:10]:
            lines.append(f"- `{q.get('path')}`: {q.get('reason')}")
        for q in (report.get("unreadable") or [])[:10]:
            lines.append(f"- `{q.get('path')}`: {q.get('reason')}")

    w = report.get("warnings", [])
    lines += ["", "### Warnings", ""]
    lines += [f"- {x}" for x in w] if w else ["- none"]
    return "\n".join(lines) + "\n"


def audit_by_modality(manifest, quarantine: list[dict] | None = None, **kwargs: Any) -> dict:
    """Audit each modality of a run's manifest on its own.

    CT and X-ray images always differ in size, format and intensity; auditing them together would
    flag the modality itself as a class "shortcut". Quarantined files are reported with the first
    modality (they have no label or modality of their own).

    Returns:
        ``{"modalities": {modality: audit_manifest report}}``.
    """
    mods = list(dict.fromkeys(manifest["modality"])) if "modality" in manifest else ["all"]
    out: dict[str, Any] = {}
    for i, m in enumerate(mods):
        rows = manifest if m == "all" else manifest[manifest["modality"] == m]
        out[m] = audit_manifest(rows.reset_index(drop=True), quarantine=quarantine if i == 0 else None,
                                **kwargs)
    return {"modalities": out}


def format_audit_by_modality(report: dict) -> str:
    """Markdown of :func:`audit_by_modality`: one :func:`format_audit` section per modality."""
    parts = []
    for m, rep in report["modalities"].items():
        parts.append(f"# Modality: {m}\n\n" + format_audit(rep))
    return "\n\n".join(parts)
