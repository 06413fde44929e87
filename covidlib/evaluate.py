"""Honest metrics: per-class rates, probability AUCs, patient-level bootstrap CIs, calibration.

Conventions (the metrics block of docs/CONTRACTS.md):

* AUC is computed from probabilities (for the hard vote: from its ranking score, ``output:
  "score"``; AUC needs only an ordering), never from hard labels. Multi-class ``auc_macro``
  is the mean one-vs-rest AUC over the classes for which it is defined (the class and its
  complement both present). Binary problems report the AUC of the positive class:
  ``"covid"`` if it is among the classes, else the class at index 1.
* ``f1_macro`` averages the per-class F1 over classes present in ``y_true`` (support > 0);
  a class absent from the truth has no defined recall, so it is reported as ``None`` rather
  than silently counted as 0.
* Anything undefined (division by zero, class absent) is ``None``; nothing here warns or
  crashes on such cases.
* Calibration (ECE, reliability, temperature fitted on validation) is only for outputs that are
  probabilities; a score's block says ``"calibration": {"applicable": false, "reason": ...}``
  (:func:`calibration_block`). Every block states ``output`` and ``calibrated`` (always
  ``false``: the metrics are of the raw outputs, temperature scaling shows only in
  ``calibration``).
* Confidence intervals are 95 % percentile bootstrap intervals. With patient ids the
  PATIENTS are resampled (cluster bootstrap): slices of one patient are not independent,
  and resampling images would give intervals that are too narrow. One rule for resamples in
  which a metric is undefined holds everywhere (:data:`CI_RULE`): an interval is reported only
  when the metric is defined in at least 90 % of them. Two models tested on the same cases are
  compared with a PAIRED bootstrap of their difference (:func:`paired_bootstrap_diff`).

Bootstrap resamples are represented as a weight matrix (resample x image: how often each
image was drawn), which makes every metric a vectorised weighted computation.

Test-time augmentation (:func:`tta_split_predictions`, :func:`evaluate_tta`, :func:`tta_by_patient`)
re-runs a run's saved models on a split with the views of :data:`covidlib.predict.TTA_TRANSFORMS`;
keras is imported only inside those functions.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from covidlib.config import POSITIVE_LABEL

AGGREGATION_METHODS: tuple[str, ...] = ("mean", "topk", "fraction")
DEFAULT_METRICS: tuple[str, ...] = ("accuracy", "f1_macro", "auc_macro")
_EPS = 1e-12


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------


def predictions_to_arrays(df: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Turn a predictions table into ``(y_true, probs)``.

    Args:
        df: table with a ``label`` column and one ``p_<class>`` column per class.
        classes: class order (``labels.json``); defines the probability columns' order.

    Returns:
        ``y_true`` (int indices into ``classes``) and ``probs`` (n x len(classes) floats).

    Raises:
        ValueError: a required column is missing, a label is not in ``classes``, or a
            probability is missing / not finite.
    """
    classes = list(classes)
    if not classes:
        raise ValueError("classes is empty")
    needed = ["label"] + [f"p_{c}" for c in classes]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"predictions table lacks column(s) {missing}; has {list(df.columns)}")
    labels = df["label"].astype(str)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"label(s) {unknown} are not among the classes {classes}")
    index = {c: i for i, c in enumerate(classes)}
    y_true = labels.map(index).to_numpy(dtype=np.int64)
    probs = df[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)
    if not np.isfinite(probs).all():
        bad = int((~np.isfinite(probs)).any(axis=1).sum())
        raise ValueError(f"{bad} row(s) have missing or non-finite probabilities")
    return y_true, probs


def _check_arrays(y_true: Any, probs: Any, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (n_samples, n_classes), got shape {p.shape}")
    if y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"y_true must be 1-D with one entry per probs row: {y.shape} vs {p.shape}")
    if n_classes is not None and p.shape[1] != n_classes:
        raise ValueError(f"probs has {p.shape[1]} columns but there are {n_classes} classes")
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))
    if len(y) and not integral:
        raise ValueError("y_true must hold integer class indices (use predictions_to_arrays for labels)")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"y_true indices must lie in [0, {p.shape[1] - 1}]")
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or infinite values")
    return y, p


def positive_index(classes: Sequence[str]) -> int:
    """Index of the positive class for binary AUC: ``"covid"`` if present, else 1."""
    classes = list(classes)
    return classes.index(POSITIVE_LABEL) if POSITIVE_LABEL in classes else 1


def _ratio(num: float, den: float) -> float | None:
    return None if den <= 0 else float(num) / float(den)


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


# --------------------------------------------------------------------------------------
# weighted (vectorised) metric kernels, shared by point estimates and the bootstrap
# --------------------------------------------------------------------------------------


def _weighted_auc(W: np.ndarray, y_bin: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per row of weights W (B x n); ties count one half. NaN if undefined."""
    order = np.argsort(score, kind="mergesort")
    s_sorted = score[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    Ws = W[:, order]
    pos = y_bin[order].astype(bool)
    pos_g = np.add.reduceat(Ws * pos, starts, axis=1)
    neg_g = np.add.reduceat(Ws * ~pos, starts, axis=1)
    below = np.cumsum(neg_g, axis=1) - neg_g  # negatives with a strictly lower score
    n_pos, n_neg = pos_g.sum(axis=1), neg_g.sum(axis=1)
    num = (pos_g * (below + 0.5 * neg_g)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = num / (n_pos * n_neg)
    auc[(n_pos <= 0) | (n_neg <= 0)] = np.nan
    return auc


def _weighted_metrics(W: np.ndarray, y: np.ndarray, probs: np.ndarray, pos: int,
                      metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Accuracy, macro F1 and macro AUC for each row of weights ``W`` (B x n)."""
    K = probs.shape[1]
    pred = probs.argmax(axis=1)
    out: dict[str, np.ndarray] = {}
    total = W.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if "accuracy" in metrics:
            out["accuracy"] = (W @ (pred == y).astype(np.float64)) / total
        if "f1_macro" in metrics:
            onehot = np.zeros((len(y), K * K))
            onehot[np.arange(len(y)), y * K + pred] = 1.0
            cm = (W @ onehot).reshape(-1, K, K)  # rows = truth
            tp = np.diagonal(cm, axis1=1, axis2=2)
            support, predicted = cm.sum(axis=2), cm.sum(axis=1)
            f1 = 2 * tp / (support + predicted)
            f1 = np.where(support > 0, f1, np.nan)
            present = (support > 0).sum(axis=1)
            out["f1_macro"] = np.where(present > 0, np.nansum(f1, axis=1) / np.maximum(present, 1), np.nan)
        if "auc_macro" in metrics:
            if K == 2:
                out["auc_macro"] = _weighted_auc(W, (y == pos), probs[:, pos])
            else:
                aucs = np.stack([_weighted_auc(W, (y == k), probs[:, k]) for k in range(K)], axis=1)
                n_def = np.isfinite(aucs).sum(axis=1)
                out["auc_macro"] = np.where(n_def > 0, np.nansum(aucs, axis=1) / np.maximum(n_def, 1), np.nan)
    for m in metrics:
        if m.startswith("auc#"):  # one class's one-vs-rest AUC (index after '#')
            k = int(m[4:])
            out[m] = _weighted_auc(W, (y == k), probs[:, k])
    unknown = set(metrics) - set(out)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {list(DEFAULT_METRICS)}")
    return out


# --------------------------------------------------------------------------------------
# point metrics
# --------------------------------------------------------------------------------------


def compute_metrics(y_true: Any, probs: Any, classes: Sequence[str]) -> dict:
    """Accuracy, macro F1, macro AUC, per-class rates and the confusion matrix.

    Args:
        y_true: int class indices, shape (n,).
        probs: class probabilities, shape (n, len(classes)); the prediction is the argmax.
        classes: class names in column order.

    Returns:
        ``{"accuracy", "f1_macro", "auc_macro", "per_class": {cls: {sensitivity, specificity,
        ppv, npv, f1, auc, support}}, "confusion_matrix"}`` (rows = truth, columns =
        prediction). Undefined values are ``None``.
    """
    classes = list(classes)
    K = len(classes)
    y, p = _check_arrays(y_true, probs, K)
    n = len(y)
    pred = p.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    cm = np.zeros((K, K), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    per_class: dict[str, dict] = {}
    for k, cls in enumerate(classes):
        tp = int(cm[k, k])
        fn = int(cm[k].sum() - tp)
        fp = int(cm[:, k].sum() - tp)
        tn = int(n - tp - fn - fp)
        auc = _weighted_auc(np.ones((1, n)), y == k, p[:, k])[0] if n else np.nan
        per_class[cls] = {
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp),
            "npv": _ratio(tn, tn + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn) if tp + fn > 0 else None,
            "auc": _nan_to_none(auc),
            "support": tp + fn,
        }
    pos = positive_index(classes) if K == 2 else 0
    agg = _weighted_metrics(np.ones((1, n)), y, p, pos, DEFAULT_METRICS) if n else {}
    summary = {m: _nan_to_none(agg[m][0]) if n else None for m in DEFAULT_METRICS}
    return {**summary, "n": int(n), "per_class": per_class, "confusion_matrix": cm.tolist()}


# --------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------


# The one rule for every bootstrap interval in covidlib (metrics blocks, the enhancement
# ablation, the cascade): resamples in which a metric is undefined (an AUC when the resample
# holds one class, a sensitivity without positives) are dropped, and dropping many of them biases
# the interval towards the resamples that happened to keep every class. So an interval is only
# reported when the metric is defined in at least MIN_DEFINED_FRACTION of the resamples.
MIN_DEFINED_FRACTION: float = 0.9
CI_RULE: str = (
    f"95% percentile bootstrap interval; resamples in which the metric is undefined are dropped "
    f"and the interval is reported only when the metric is defined in at least "
    f"{MIN_DEFINED_FRACTION:.0%} of the resamples (otherwise null)"
)


def percentile_ci(values: Any, n_boot: int | None = None) -> list[float] | None:
    """The 95 % percentile interval of bootstrap replicates under :data:`CI_RULE`.

    Args:
        values: the metric in each resample; NaN (or None) where it is undefined.
        n_boot: how many resamples were drawn (default ``len(values)``).

    Returns:
        ``[lo, hi]``; ``None`` when fewer than ``MIN_DEFINED_FRACTION`` of the resamples (or
        fewer than two) define the metric.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    n = len(v) if n_boot is None else int(n_boot)
    v = v[np.isfinite(v)]
    # The epsilon keeps 0.9 * 30 = 27.000000000000004 from asking for 28 resamples.
    if n < 1 or len(v) < max(2, math.ceil(MIN_DEFINED_FRACTION * n - 1e-9)):
        return None
    lo, hi = np.percentile(v, [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap_groups(df: pd.DataFrame) -> tuple[np.ndarray | None, str]:
    """Resampling units of a predictions table and their name (the ``ci_unit``).

    Returns:
        ``(patient ids, "patient")`` when every row has a patient id and some patient has
        several images; otherwise ``(None, "image")`` (images are resampled).
    """
    pid = _patient_ids(df)
    if pid is not None and len(np.unique(pid)) < len(pid):
        return pid, "patient"
    return None, "image"


def _metric_keys(classes: list[str], metrics: Sequence[str]) -> tuple[str, ...]:
    """Kernel names of public metric names (``auc:<class>`` -> ``auc#<index>``)."""
    per_class = {f"auc:{c}": f"auc#{k}" for k, c in enumerate(classes)}
    unknown = set(metrics) - set(DEFAULT_METRICS) - set(per_class)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from "
                         f"{list(DEFAULT_METRICS) + list(per_class)}")
    return tuple(per_class.get(m, m) for m in metrics)


def _resampling_units(groups: Any, n: int) -> tuple[np.ndarray, int]:
    """Unit index of each row (its patient, or the row itself without groups) and the count."""
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups)
    if len(g) != n:
        raise ValueError(f"groups has {len(g)} entries for {n} predictions")
    _, gid = np.unique(g.astype(str), return_inverse=True)
    return gid.ravel(), (int(gid.max()) + 1 if n else 0)


def _resample_weights(gid: np.ndarray, n_units: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples as weight matrices (resamples x rows), yielded in chunks.

    Units are drawn with replacement; a row's weight is how often its unit was drawn. Equal
    seeds give equal resamples: that is what pairs two models scored on the same cases.
    """
    rng = np.random.default_rng(seed)
    # Chunk so the (resamples x images) weight matrix stays a few tens of MB.
    chunk = max(1, min(n_boot, 4_000_000 // max(len(gid), n_units, 1)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        draws = rng.integers(0, n_units, size=(b, n_units))
        counts = np.bincount((draws + n_units * np.arange(b)[:, None]).ravel(),
                             minlength=b * n_units).reshape(b, n_units).astype(np.float64)
        yield counts[:, gid]
        done += b


def bootstrap_ci(
    y_true: Any,
    probs: Any,
    classes: Sequence[str],
    groups: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, list[float] | None]:
    """95 % percentile bootstrap intervals for summary metrics (rule: :data:`CI_RULE`).

    Args:
        y_true: int class indices, shape (n,).
        probs: probabilities, shape (n, K).
        classes: class names (sets the binary positive class).
        groups: patient id per row. When given, patients are resampled with all their
            images (cluster bootstrap); otherwise images are resampled.
        n_boot: number of resamples.
        seed: RNG seed; the same inputs and seed give the same interval.
        metrics: any of ``accuracy``, ``f1_macro``, ``auc_macro``, or ``auc:<class>`` for one
            class's one-vs-rest AUC.

    Returns:
        ``{metric: [lo, hi]}``; ``None`` for a metric defined in fewer than
        ``MIN_DEFINED_FRACTION`` of the resamples (e.g. AUC with one class) or when there is
        nothing to resample.
    """
    classes = list(classes)
    y, p = _check_arrays(y_true, probs, len(classes))
    public = tuple(metrics)
    keys = _metric_keys(classes, public)
    n = len(y)
    if n == 0 or n_boot < 1:
        return {m: None for m in public}
    gid, n_units = _resampling_units(groups, n)
    pos = positive_index(classes) if len(classes) == 2 else 0
    vals: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for W in _resample_weights(gid, n_units, n_boot, seed):
        for k, v in _weighted_metrics(W, y, p, pos, keys).items():
            vals[k].append(v)
    return {name: percentile_ci(np.concatenate(vals[k]), n_boot) for name, k in zip(public, keys)}


def _arm(y_true: Any, probs: Any, n_classes: int, name: str) -> list[np.ndarray]:
    """The probability matrices of one arm of a paired comparison, checked against ``y_true``."""
    is_matrix = isinstance(probs, (np.ndarray, pd.DataFrame)) and np.ndim(probs) == 2
    mats = [probs] if is_matrix else list(probs)
    if not mats:
        raise ValueError(f"{name} holds no probability matrix")
    return [_check_arrays(y_true, m, n_classes)[1] for m in mats]


def _arm_scores(W: np.ndarray, y: np.ndarray, mats: list[np.ndarray], pos: int,
                keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each metric per row of ``W``, averaged over an arm's matrices (NaN if any is undefined)."""
    total = {k: np.zeros(len(W)) for k in keys}
    for p in mats:
        for k, v in _weighted_metrics(W, y, p, pos, keys).items():
            total[k] += v
    return {k: v / len(mats) for k, v in total.items()}


def paired_bootstrap_diff(
    y_true: Any,
    probs_a: Any,
    probs_b: Any,
    classes: Sequence[str],
    groups: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    metrics: Sequence[str] = ("auc_macro", "accuracy"),
) -> dict[str, dict[str, Any]]:
    """Paired bootstrap of ``metric(A) - metric(B)`` for two models tested on the same cases.

    Every replicate scores both arms on the SAME resample, so the interval measures how much
    the models differ, not how much each score moves between test sets (two separate CIs that
    overlap answer that weaker question). An arm may hold several probability matrices for the
    same rows, e.g. one per training seed: its score in a replicate is the mean over them, so the
    difference is the seed-averaged difference and no single initialisation decides.

    Args:
        y_true: int class indices, shape (n,), shared by every matrix.
        probs_a: one (n, K) probability matrix or a sequence of them (arm A).
        probs_b: the same for arm B, the reference (e.g. no enhancement).
        classes: class names in column order.
        groups: patient id per row: patients are resampled with all their images (cluster
            bootstrap). None resamples images.
        n_boot: number of resamples.
        seed: RNG seed; equal seeds give equal resamples.
        metrics: as in :func:`bootstrap_ci`.

    Returns:
        ``{metric: {"a", "b", "diff", "a_ci", "b_ci", "diff_ci", "n_defined"}}``: point values
        on the whole test set (arm means over their matrices), 95 % intervals under
        :data:`CI_RULE` (``None`` when not reportable) and the number of replicates in which
        the difference is defined.

    Raises:
        ValueError: an arm is empty, or a matrix does not fit ``y_true`` / ``classes``.
    """
    classes = list(classes)
    # Check the labels once against a dummy matrix; each arm's matrices are checked in _arm.
    y = _check_arrays(y_true, np.zeros((len(np.asarray(y_true)), len(classes))), len(classes))[0]
    arms = [_arm(y, probs_a, len(classes), "probs_a"), _arm(y, probs_b, len(classes), "probs_b")]
    public = tuple(metrics)
    keys = _metric_keys(classes, public)
    n = len(y)
    empty = {"a": None, "b": None, "diff": None, "a_ci": None, "b_ci": None, "diff_ci": None,
             "n_defined": 0}
    if n == 0:
        return {m: dict(empty) for m in public}
    gid, n_units = _resampling_units(groups, n)
    pos = positive_index(classes) if len(classes) == 2 else 0
    point = [_arm_scores(np.ones((1, n)), y, mats, pos, keys) for mats in arms]
    reps: dict[str, list[list[np.ndarray]]] = {k: [[], []] for k in keys}
    for W in _resample_weights(gid, n_units, max(int(n_boot), 0), seed):
        for side, mats in enumerate(arms):
            for k, v in _arm_scores(W, y, mats, pos, keys).items():
                reps[k][side].append(v)
    out: dict[str, dict[str, Any]] = {}
    for name, k in zip(public, keys):
        ra, rb = (np.concatenate(r) if r else np.zeros(0) for r in reps[k])
        diff = ra - rb
        out[name] = {
            "a": _nan_to_none(point[0][k][0]), "b": _nan_to_none(point[1][k][0]),
            "diff": _nan_to_none(point[0][k][0] - point[1][k][0]),
            "a_ci": percentile_ci(ra, n_boot), "b_ci": percentile_ci(rb, n_boot),
            "diff_ci": percentile_ci(diff, n_boot), "n_defined": int(np.isfinite(diff).sum()),
        }
    return out


# --------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------


def _bins(conf: np.ndarray, n_bins: int) -> np.ndarray:
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return np.clip((conf * n_bins).astype(np.int64), 0, n_bins - 1)


def reliability_curve(y_true: Any, probs: Any, n_bins: int = 15) -> dict:
    """Top-label reliability diagram data over equal-width confidence bins on [0, 1].

    Returns:
        ``{"bin_edges", "bin_confidence", "bin_accuracy", "bin_count"}``; the mean confidence
        and accuracy of an empty bin are ``None``.
    """
    y, p = _check_arrays(y_true, probs)
    conf = p.max(axis=1) if len(y) else np.zeros(0)
    correct = (p.argmax(axis=1) == y).astype(np.float64) if len(y) else np.zeros(0)
    b = _bins(conf, n_bins)
    count = np.bincount(b, minlength=n_bins)
    s_conf = np.bincount(b, weights=conf, minlength=n_bins)
    s_acc = np.bincount(b, weights=correct, minlength=n_bins)
    return {
        "bin_edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "bin_confidence": [float(s_conf[i] / count[i]) if count[i] else None for i in range(n_bins)],
        "bin_accuracy": [float(s_acc[i] / count[i]) if count[i] else None for i in range(n_bins)],
        "bin_count": count.astype(int).tolist(),
    }


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 15) -> float | None:
    """Top-label expected calibration error (equal-width bins); ``None`` for no samples."""
    y, p = _check_arrays(y_true, probs)
    if len(y) == 0:
        return None
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    b = _bins(conf, n_bins)
    gap = np.bincount(b, weights=correct - conf, minlength=n_bins)
    return float(np.abs(gap).sum() / len(y))


def apply_temperature(probs: Any, T: float) -> np.ndarray:
    """Rescale probabilities: ``softmax(log(p) / T)``. T > 1 softens, T < 1 sharpens."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D, got shape {p.shape}")
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"temperature must be a positive finite number, got {T!r}")
    from scipy.special import softmax

    return softmax(np.log(np.clip(p, _EPS, None)) / float(T), axis=1)


def fit_temperature(probs_val: Any, y_val: Any, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature minimising the validation NLL of ``softmax(log(p) / T)``.

    Works on log-probabilities because the saved predictions are probabilities, not logits
    (equivalent up to a per-row constant). Bounded scalar minimisation over log T.

    Raises:
        ValueError: with no validation samples.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    y, p = _check_arrays(y_val, probs_val)
    if len(y) == 0:
        raise ValueError("cannot fit a temperature on an empty validation set")
    logp = np.log(np.clip(p, _EPS, None))
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logp / math.exp(log_t), axis=1)[rows, y].mean())

    res = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-4})
    return float(math.exp(res.x))


#: What a predictions table's class columns hold, and their name prefix. A ``"score"`` (the hard
#: vote's) ranks images, so AUC applies, but it is no probability: no calibration.
OUTPUT_PREFIX: dict[str, str] = {"probability": "p_", "score": "score_"}
SCORE_NOT_CALIBRATABLE = ("a ranking score, not a probability (the hard vote's (votes + mean "
                          "probability) / (n_members + 1)): ECE, reliability diagrams and temperature "
                          "scaling do not apply; AUC is computed from the score as a ranking")


def calibration_block(y: Any, probs: Any, y_val: Any = None, probs_val: Any = None, *,
                      output: str = "probability") -> dict:
    """The ``calibration`` entry of a metrics block.

    Args:
        y, probs: test class indices and outputs.
        y_val, probs_val: validation ones; the temperature is fitted there (never on test).
        output: ``"probability"`` or ``"score"`` (:data:`OUTPUT_PREFIX`).

    Returns:
        ``{"applicable": True, "ece", "temperature", "ece_after_temperature", "reliability", "note"}``
        for probabilities (``ece`` of the uncalibrated ones; temperature fields ``None`` without
        validation data), or ``{"applicable": False, "reason", ...}`` with those fields ``None``
        for a score.
    """
    if output not in OUTPUT_PREFIX:
        raise ValueError(f"output must be one of {list(OUTPUT_PREFIX)}, got {output!r}")
    if output == "score":
        return {"applicable": False, "reason": SCORE_NOT_CALIBRATABLE, "ece": None,
                "temperature": None, "ece_after_temperature": None, "reliability": None}
    T = fit_temperature(probs_val, y_val) if y_val is not None and len(y_val) else None
    return {
        "applicable": True,
        "ece": expected_calibration_error(y, probs),
        "temperature": T,
        "ece_after_temperature": expected_calibration_error(y, apply_temperature(probs, T)) if T else None,
        "reliability": reliability_curve(y, probs),
        "note": "ece: the uncalibrated probabilities; ece_after_temperature: softmax(log p / T), "
                "T fitted on validation",
    }


def _score_columns_as_p(df: pd.DataFrame, classes: Sequence[str], output: str) -> pd.DataFrame:
    """A score table's ``score_<class>`` columns under the ``p_`` names the metric code reads.

    Only inside :func:`evaluate_predictions`, whose block then says ``"output": "score"``.
    """
    if output == "probability":
        return df
    prefix = OUTPUT_PREFIX[output]
    missing = [f"{prefix}{c}" for c in classes if f"{prefix}{c}" not in df.columns]
    if missing:
        raise ValueError(f"a {output} table needs column(s) {missing}; has {list(df.columns)}")
    stale = [f"p_{c}" for c in classes if f"p_{c}" in df.columns]
    return df.drop(columns=stale).rename(columns={f"{prefix}{c}": f"p_{c}" for c in classes})


# --------------------------------------------------------------------------------------
# patient aggregation
# --------------------------------------------------------------------------------------


def aggregate_by_patient(
    probs: Any,
    patient_ids: Any,
    y_true: Any,
    method: str = "mean",
    k: int = 3,
    threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine slice (image) probabilities into one prediction per patient.

    Methods:
        ``mean``: mean slice probability per class.
        ``topk``: per class, the mean of its ``k`` highest slice probabilities; rows are
            renormalised to sum to 1 (a few strongly affected slices drive the call).
        ``fraction``: per class, the fraction of voting slices whose argmax is that class.
            A slice votes when its top probability is >= ``threshold``; a patient with no
            such slice falls back to all its slices.

    Returns:
        ``(patient_ids, y_patient, probs_patient)`` in order of first appearance.

    Raises:
        ValueError: unknown method, length mismatch, or a patient whose slices carry
            different labels.
    """
    if method not in AGGREGATION_METHODS:
        raise ValueError(f"method must be one of {list(AGGREGATION_METHODS)}, got {method!r}")
    y, p = _check_arrays(y_true, probs)
    pids = np.asarray(patient_ids).astype(str)
    if len(pids) != len(y):
        raise ValueError(f"patient_ids has {len(pids)} entries for {len(y)} predictions")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gid, uniq = pd.factorize(pids)  # patients numbered in order of first appearance
    uniq = uniq.astype(str)
    n_pat, K = len(uniq), p.shape[1]

    y_min = np.full(n_pat, np.iinfo(np.int64).max)
    y_max = np.full(n_pat, -1)
    np.minimum.at(y_min, gid, y)
    np.maximum.at(y_max, gid, y)
    bad = np.flatnonzero(y_min != y_max)
    if len(bad):
        names = uniq[bad][:5].tolist()
        raise ValueError(f"{len(bad)} patient(s) have slices with different labels, e.g. {names}")
    counts = np.bincount(gid, minlength=n_pat).astype(np.float64)
    out = np.zeros((n_pat, K))
    if method == "mean":
        np.add.at(out, gid, p)
        out /= counts[:, None]
    elif method == "topk":
        srt = np.argsort(gid, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(gid, minlength=n_pat))]
        ps = p[srt]
        for i in range(n_pat):  # patients are few; per-patient sort is cheap
            block = np.sort(ps[bounds[i]:bounds[i + 1]], axis=0)[::-1][:k]
            out[i] = block.mean(axis=0)
        s = out.sum(axis=1, keepdims=True)
        out = np.divide(out, s, out=np.full_like(out, 1.0 / K), where=s > 0)
    else:
        votes_mask = p.max(axis=1) >= threshold
        has_vote = np.bincount(gid, weights=votes_mask.astype(float), minlength=n_pat) > 0
        use = votes_mask | ~has_vote[gid]
        np.add.at(out, (gid[use], p[use].argmax(axis=1)), 1.0)
        out /= out.sum(axis=1, keepdims=True)
    return uniq, y_min.astype(np.int64), out


def choose_aggregation(
    probs_val: Any,
    pid_val: Any,
    y_val: Any,
    methods: Sequence[str] = AGGREGATION_METHODS,
    classes: Sequence[str] | None = None,
    k: int = 3,
) -> str:
    """Pick the aggregation method with the best patient-level macro AUC on validation data.

    Ties, and the case where no AUC is defined, go to ``"mean"`` (the simplest method).
    """
    y, p = _check_arrays(y_val, probs_val)
    classes = list(classes) if classes is not None else [str(i) for i in range(p.shape[1])]
    best, best_auc = "mean", None
    for m in ["mean"] + [x for x in methods if x != "mean"]:
        _, yp, pp = aggregate_by_patient(p, pid_val, y, method=m, k=k)
        auc = compute_metrics(yp, pp, classes)["auc_macro"]
        if auc is not None and (best_auc is None or auc > best_auc + 1e-12):
            best, best_auc = m, auc
    return best


# --------------------------------------------------------------------------------------
# the metrics block
# --------------------------------------------------------------------------------------


def _patient_ids(df: pd.DataFrame) -> np.ndarray | None:
    if "patient_id" not in df.columns:
        return None
    pid = df["patient_id"]
    if pid.isna().any() or (pid.astype(str).str.strip() == "").any():
        return None
    return pid.astype(str).to_numpy()


def to_jsonable(obj: Any) -> Any:
    """Plain-Python copy of a report for ``json.dumps``: numpy scalars / arrays, paths, sets and
    pandas' missing values converted; NaN / inf become ``None``; anything else its ``str``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _nan_to_none(float(obj))
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is pd.NA or obj is pd.NaT:
        return None
    return str(obj)


def evaluate_predictions(
    test_df: pd.DataFrame,
    classes: Sequence[str],
    val_df: pd.DataFrame | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    output: str = "probability",
) -> dict:
    """The full metrics block of docs/CONTRACTS.md for one predictions table.

    Args:
        test_df: ``predictions_test.csv`` as a DataFrame (``label``, ``p_<class>``, and
            ideally ``patient_id``).
        classes: class order of the probability columns.
        val_df: validation predictions; used to fit the temperature and choose the patient
            aggregation method. Without it nothing is tuned on the test set: temperature
            fields are ``None`` and the aggregation is ``"mean"``.
        n_boot: bootstrap resamples for the CIs.
        seed: bootstrap seed.
        output: what the class columns hold: ``"probability"`` (``p_<class>``) or
            ``"score"`` (``score_<class>``, the hard vote's ranking score: AUC and the rates are
            computed from it, calibration is marked not applicable; see :func:`calibration_block`).

    Returns:
        A JSON-serialisable dict: ``compute_metrics`` fields plus ``output``, ``calibrated``
        (``False``: the metrics are those of the raw outputs; temperature scaling shows only in
        ``calibration``), ``ci95``, ``ci_unit`` (``"patient"`` or ``"image"``), ``ci_rule``
        (:data:`CI_RULE`: when an interval is reported at all), ``ci_note`` (when
        images are resampled), ``calibration`` and ``patient_level``.
    """
    classes = list(classes)
    if output not in OUTPUT_PREFIX:
        raise ValueError(f"output must be one of {list(OUTPUT_PREFIX)}, got {output!r}")
    test_df = _score_columns_as_p(test_df, classes, output)
    y, p = predictions_to_arrays(test_df, classes)
    out = compute_metrics(y, p, classes)
    pid = _patient_ids(test_df)
    groups, ci_unit = bootstrap_groups(test_df)
    # One set of resamples for every interval (each metric is computed on its own per resample).
    ci = bootstrap_ci(y, p, classes, groups=groups, n_boot=n_boot, seed=seed,
                      metrics=list(DEFAULT_METRICS) + [f"auc:{c}" for c in classes])
    out["ci95"] = {m: ci[m] for m in DEFAULT_METRICS}
    out["ci95_auc_per_class"] = {c: ci[f"auc:{c}"] for c in classes}
    out["ci_unit"], out["ci_rule"] = ci_unit, CI_RULE
    if groups is None:
        out["ci_note"] = ("no patient ids: images resampled as if independent; CIs are too narrow if "
                          "several images come from one patient" if pid is None else
                          "one image per patient: image and patient bootstrap coincide")

    y_val = p_val = pid_val = None
    if val_df is not None and len(val_df):
        y_val, p_val = predictions_to_arrays(_score_columns_as_p(val_df, classes, output), classes)
        pid_val = _patient_ids(val_df)
    out["output"] = output
    out["calibrated"] = False
    out["calibration"] = calibration_block(y, p, y_val, p_val, output=output)

    if pid is None:
        out["patient_level"] = {"method": None, "n_patients": None, "accuracy": None, "f1_macro": None,
                                "auc_macro": None, "confusion_matrix": None, "ci95": None,
                                "note": "no patient ids in the predictions"}
    else:
        method, note = "mean", "mean slice probability (no validation set to choose on)"
        if pid_val is not None:
            method = choose_aggregation(p_val, pid_val, y_val, classes=classes)
            note = "method chosen by validation patient-level macro AUC"
        pids, yp, pp = aggregate_by_patient(p, pid, y, method=method)
        pm = compute_metrics(yp, pp, classes)
        out["patient_level"] = {
            "method": method, "n_patients": int(len(pids)), "accuracy": pm["accuracy"],
            "f1_macro": pm["f1_macro"], "auc_macro": pm["auc_macro"],
            "confusion_matrix": pm["confusion_matrix"],
            "ci95": bootstrap_ci(yp, pp, classes, n_boot=n_boot, seed=seed), "note": note,
        }
    out["classes"] = classes
    return to_jsonable(out)


# --------------------------------------------------------------------------------------
# test-time augmentation (TTA) on a run's saved models
# --------------------------------------------------------------------------------------

TTA_SD_DEFINITION = ("tta_sd: population SD, across the test-time augmentation views, of the "
                     "probability of the class the TTA mean predicts (0 = views agree, at most 0.5)")


def _read_split(model_dir: Any, split: str) -> pd.DataFrame:
    path = os.path.join(os.fspath(model_dir), f"predictions_{split}.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: train the model first (notebook 03 / `covidlib train`)")
    return pd.read_csv(path, dtype={"patient_id": str}, keep_default_na=False)


def tta_split_predictions(
    model_dir: str | os.PathLike,
    split: str = "test",
    tta: int = 4,
    *,
    images: np.ndarray | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """A saved model's test-time-augmented predictions on one split of its run.

    The rows and their order are those of the model's ``predictions_<split>.csv`` (written when it
    was trained; its paths point at the images it was trained on, enhanced copies included). Each
    image is read and resized as the array store keeps it (:func:`covidlib.arraystore.read_resized`),
    unless ``images`` gives them already.

    Args:
        model_dir: ``RUN_DIR/models/<NAME>``.
        split: ``"val"`` or ``"test"``.
        tta: number of views, 1..len(:data:`covidlib.predict.TTA_TRANSFORMS`) (1 = identity only:
            the saved predictions again, up to float rounding).
        images: optional ``(n, S, S)`` uint8 array aligned with the split's rows (e.g. an
            ``ArrayStore``'s ``images[rows]``), ``S`` the model's input size.
        batch_size: images per forward pass.

    Returns:
        ``path, patient_id, label, p_<class>...`` (TTA means, uncalibrated) and ``tta_sd``
        (:data:`TTA_SD_DEFINITION`); ``df.attrs["tta"]`` names the views.
    """
    from covidlib.predict import TTA_SHIFT, TTA_TRANSFORMS, predict_tta
    from covidlib.runs import load_model_dir

    if isinstance(tta, bool) or not isinstance(tta, (int, np.integer)) or not 1 <= tta <= len(TTA_TRANSFORMS):
        raise ValueError(f"tta must be an int from 1 to {len(TTA_TRANSFORMS)}, got {tta!r}")
    base = _read_split(model_dir, split)
    model, classes, cfg = load_model_dir(model_dir)
    size = int(cfg["img_size"])
    if images is None:
        from covidlib.arraystore import read_resized

        images = np.stack([read_resized(p, size) for p in base["path"]]) if len(base) else \
            np.zeros((0, size, size), np.uint8)
    images = np.asarray(images)
    if images.shape != (len(base), size, size):
        raise ValueError(f"images has shape {images.shape}; the {split} split needs ({len(base)}, {size}, {size})")
    out = base[["path", "patient_id", "label"]].copy()
    mean = np.zeros((len(base), len(classes)))
    sd = np.zeros(len(base))
    if len(base):
        mean, sd = predict_tta(model, images.astype(np.float32)[..., None], int(tta), batch_size)
    for j, c in enumerate(classes):
        out[f"p_{c}"] = mean[:, j]
    out["tta_sd"] = sd
    out.attrs["tta"] = {"n_views": int(tta), "views": list(TTA_TRANSFORMS[:tta]), "shift": TTA_SHIFT}
    out.attrs["classes"] = list(classes)
    return out


def tta_by_patient(df: pd.DataFrame, classes: Sequence[str], method: str = "mean", k: int = 3) -> pd.DataFrame:
    """Patient-level TTA outputs: :func:`aggregate_by_patient` on the TTA means, plus the mean and
    the largest slice ``tta_sd`` of each patient.

    Returns:
        ``patient_id, label, p_<class>..., n_images, tta_sd_mean, tta_sd_max``, patients in order
        of first appearance.
    """
    classes = list(classes)
    y, p = predictions_to_arrays(df, classes)
    pids, yp, pp = aggregate_by_patient(p, df["patient_id"].astype(str).to_numpy(), y, method=method, k=k)
    out = pd.DataFrame({"patient_id": pids, "label": [classes[i] for i in yp]})
    for j, c in enumerate(classes):
        out[f"p_{c}"] = pp[:, j]
    grouped = df.assign(patient_id=df["patient_id"].astype(str)).groupby("patient_id", sort=False)
    out["n_images"] = grouped.size().reindex(pids).to_numpy()
    if "tta_sd" in df.columns:
        out["tta_sd_mean"] = grouped["tta_sd"].mean().reindex(pids).to_numpy()
        out["tta_sd_max"] = grouped["tta_sd"].max().reindex(pids).to_numpy()
    return out


def _aligned(df: pd.DataFrame, order: pd.Series) -> pd.DataFrame:
    """``df`` in the row order of the paths ``order`` (members may list a split differently)."""
    return df.set_index("path").loc[list(order)].reset_index()


def _tta_vote_block(base_test: pd.DataFrame, base_val: pd.DataFrame | None, test_p: list[np.ndarray],
                    val_p: list[np.ndarray] | None, classes: list[str], method: str,
                    n_boot: int, seed: int) -> dict:
    """The vote's metrics block on the members' TTA means (weights fitted on validation)."""
    from covidlib import ensemble

    kind = ensemble.output_kind(method)
    weights = None
    if method == "weighted":
        if not val_p:
            raise ValueError("the weighted vote needs validation predictions to fit its weights")
        weights = ensemble.fit_vote_weights(val_p, predictions_to_arrays(base_val, classes)[0])

    def table(base: pd.DataFrame, probs: list[np.ndarray]) -> pd.DataFrame:
        out = base[["path", "patient_id", "label"]].copy()
        values = ensemble.combine(probs, method, weights)
        for j, c in enumerate(classes):
            out[f"{OUTPUT_PREFIX[kind]}{c}"] = values[:, j]
        return out

    val_table = table(base_val, val_p) if val_p else None
    block = evaluate_predictions(table(base_test, test_p), classes, val_table, n_boot=n_boot, seed=seed,
                                 output=kind)
    return {"method": method, "weights": weights, **block}


def evaluate_tta(
    run_dir: str | os.PathLike,
    backbones: Sequence[str],
    tta: int = 4,
    *,
    vote: str | None = "soft",
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """Metrics of a run's saved models with test-time augmentation, next to their plain ones.

    For every backbone: TTA predictions on the test split (and on validation, which tunes the
    temperature and the patient aggregation exactly as for the plain predictions), the metrics
    block of :func:`evaluate_predictions` (``patient_level`` aggregates the TTA outputs with
    :func:`aggregate_by_patient`), ``tta_sd_mean``, and ``vs_plain``: a paired bootstrap
    (:func:`paired_bootstrap_diff`, patients resampled when there are patient ids) of TTA minus
    the saved plain predictions. ``vote`` (None: no vote) combines the members' TTA means.

    Returns:
        ``{"tta": {n_views, views, shift, uncertainty}, "models": {NAME: block}, "ensemble": block
        | None}``, JSON-ready (:func:`to_jsonable`): an ``evaluation_tta`` entry for
        ``evaluation.json``.
    """
    backbones = list(backbones)
    if not backbones:
        raise ValueError("backbones is empty: nothing to evaluate")
    models = os.path.join(os.fspath(run_dir), "models")
    blocks: dict[str, dict] = {}
    test_p: list[np.ndarray] = []
    val_p: list[np.ndarray] = []
    base_test = base_val = None
    classes: list[str] = []
    info: dict = {}
    for name in backbones:
        d = os.path.join(models, name)
        test = tta_split_predictions(d, "test", tta, batch_size=batch_size)
        has_val = os.path.isfile(os.path.join(d, "predictions_val.csv"))
        val = tta_split_predictions(d, "val", tta, batch_size=batch_size) if has_val else None
        if base_test is None:
            classes, info, base_test, base_val = test.attrs["classes"], test.attrs["tta"], test, val
        elif test.attrs["classes"] != classes:
            raise ValueError(f"{name} was trained on classes {test.attrs['classes']}, others on {classes}")
        test = _aligned(test, base_test["path"])
        blocks[name] = _member_tta_block(d, test, val, classes, n_boot, seed)
        test_p.append(predictions_to_arrays(test, classes)[1])
        if val is not None and base_val is not None:
            val_p.append(predictions_to_arrays(_aligned(val, base_val["path"]), classes)[1])
    ens = None
    if vote is not None:
        ens = _tta_vote_block(base_test, base_val, test_p, val_p if len(val_p) == len(test_p) else None,
                              classes, vote, n_boot, seed)
    return to_jsonable({"tta": {**info, "uncertainty": TTA_SD_DEFINITION}, "models": blocks,
                        "ensemble": ens})


def _member_tta_block(model_dir: str, test: pd.DataFrame, val: pd.DataFrame | None, classes: list[str],
                      n_boot: int, seed: int) -> dict:
    """One member's TTA metrics block, its mean spread and the paired difference to plain."""
    block = evaluate_predictions(test, classes, val, n_boot=n_boot, seed=seed)
    block["tta_sd_mean"] = float(test["tta_sd"].mean()) if len(test) else None
    plain = _aligned(_read_split(model_dir, "test"), test["path"])
    y, p_tta = predictions_to_arrays(test, classes)
    block["vs_plain"] = paired_bootstrap_diff(y, p_tta, predictions_to_arrays(plain, classes)[1], classes,
                                              groups=_patient_ids(test), n_boot=n_boot, seed=seed)
    block["vs_plain_note"] = "a: TTA, b: the saved plain predictions; diff = a - b, paired bootstrap"
    return block
