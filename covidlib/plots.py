"""Figures for covidlib: data, enhancement, training, evaluation and Grad-CAM.

Every function returns a :class:`matplotlib.figure.Figure` and, when ``path`` is given, also
writes it as a PNG atomically (temp file + ``os.replace``, parent folders created, 110 dpi).

Figures are built with the object API (``Figure()``), not through ``pyplot``: they are not
registered with pyplot, so a notebook shows each figure once (as the cell's value), nothing
leaks in loops, and ``plt.close(fig)`` is harmless but unnecessary. Headless machines get the
Agg backend. No keras import; metrics come from ``covidlib.evaluate`` where one is shown, except
what drawing needs (ROC points, the area under the curve drawn).

Class labels passed in are canonical (``covid``, ``cap``, ``normal``, ``non_covid``); figures
show :func:`covidlib.config.display_name`.
"""
from __future__ import annotations

import io
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

if (
    "matplotlib.pyplot" not in sys.modules
    and not os.environ.get("MPLBACKEND")
    and sys.platform.startswith("linux")
    and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
):
    matplotlib.use("Agg")

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from covidlib import config
from covidlib.evaluate import expected_calibration_error, positive_index, reliability_curve
from covidlib.fsutil import atomic_write_bytes
from covidlib.images import to_uint8

__all__ = [
    "plot_class_counts", "plot_samples", "plot_enhancement_steps", "plot_training_curves",
    "plot_confusion_matrix", "plot_confusion_matrices", "plot_roc_curves",
    "plot_reliability_diagram", "plot_prediction_grid", "plot_ablation", "plot_threshold_sweep",
    "plot_gradcam_grid", "save_figure",
]

DPI = 110
RIGHT_COLOR = "green"
WRONG_COLOR = "red"
_PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]
# One fixed colour per canonical class, so every figure agrees.
CLASS_COLORS: dict[str, str] = {"covid": "#d62728", "cap": "#ff7f0e", "normal": "#2ca02c", "non_covid": "#1f77b4"}


# --------------------------------------------------------------------------- helpers
def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG atomically (parent folders created). Returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def _new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.0, 4.5), **kw: Any):
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _name(label: Any) -> str:
    return config.display_name(str(label))


def _class_color(label: str, i: int) -> str:
    return CLASS_COLORS.get(label, _PALETTE[i % len(_PALETTE)])


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Display copy of an image as uint8 (one channel dropped; see :func:`covidlib.images.to_uint8`)."""
    img = np.asarray(img)
    return to_uint8(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img)


def _show_gray(ax, img: np.ndarray) -> None:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        ax.imshow(_to_uint8(img) if img.dtype != np.uint8 else img)
    else:
        ax.imshow(_to_uint8(img), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set(xticks=[], yticks=[])


def _require_columns(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; have {list(df.columns)}")


def _check_classes(classes: Sequence[str], what: str) -> list[str]:
    classes = [str(c) for c in classes]
    if len(classes) < 2:
        raise ValueError(f"{what}: need at least 2 classes, got {classes}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"{what}: duplicate classes {classes}")
    return classes


def _label_indices(y: Any, classes: list[str], what: str) -> np.ndarray:
    """int class indices from ints or canonical label strings."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{what}: labels must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "OUS":
        lookup = {c: i for i, c in enumerate(classes)}
        unknown = sorted({str(v) for v in arr} - set(lookup))
        if unknown:
            raise ValueError(f"{what}: labels {unknown} not in classes {classes}")
        return np.array([lookup[str(v)] for v in arr], dtype=np.int64)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{what}: labels must be integer class indices")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= len(classes)):
        raise ValueError(f"{what}: label index out of range for {len(classes)} classes")
    return arr


def _probs_2d(probs: Any, n: int, k: int | None, what: str, classes: list[str] | None = None) -> np.ndarray:
    """(n, k) probabilities. A 1-D vector is P(positive class) of a binary problem."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        pos = positive_index(classes) if classes is not None else 1
        p2 = np.empty((len(p), 2))
        p2[:, pos], p2[:, 1 - pos] = p, 1.0 - p
        p = p2
    if p.ndim != 2 or p.shape[0] != n:
        raise ValueError(f"{what}: probabilities must be (n={n}, k), got shape {p.shape}")
    if k is not None and p.shape[1] != k:
        raise ValueError(f"{what}: probabilities have {p.shape[1]} columns, expected {k} (one per class)")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{what}: probabilities contain NaN or inf")
    return p


# --------------------------------------------------------------------------- data
def plot_class_counts(manifest_df: pd.DataFrame, path: str | os.PathLike | None = None) -> Figure:
    """Bar chart of image counts per split x class.

    Args:
        manifest_df: manifest with ``label`` and (optionally) ``split`` columns.
        path: optional PNG path.
    """
    _require_columns(manifest_df, ["label"], "plot_class_counts")
    if manifest_df.empty:
        raise ValueError("plot_class_counts: manifest is empty")
    df = manifest_df.copy()
    if "split" not in df.columns:
        df["split"] = "all"
    classes = config.ordered_classes(df["label"].astype(str))
    counts = pd.crosstab(df["split"].astype(str), df["label"].astype(str))
    splits = [s for s in config.SPLITS if s in counts.index] + sorted(set(counts.index) - set(config.SPLITS))
    counts = counts.reindex(index=splits, columns=classes, fill_value=0)

    fig, axes = _new_figure(figsize=(max(5.0, 1.6 * len(splits) + 2.5), 4.2))
    ax = axes[0, 0]
    x = np.arange(len(splits))
    width = 0.8 / len(classes)
    for i, cls in enumerate(classes):
        bars = ax.bar(x + (i - (len(classes) - 1) / 2) * width, counts[cls].to_numpy(), width,
                      label=_name(cls), color=_class_color(cls, i))
        ax.bar_label(bars, fontsize=8, padding=1)
    ax.set_xticks(x, [f"{s}\n(n={int(counts.loc[s].sum())})" for s in splits])
    ax.set_ylabel("images")
    ax.set_title(f"Images per split and class (total {int(counts.to_numpy().sum())})")
    ax.legend(frameon=False)
    ax.margins(y=0.12)
    fig.covidlib_data = counts
    return _finish(fig, path)


def plot_samples(
    manifest_df: pd.DataFrame,
    n_per_class: int = 4,
    path: str | os.PathLike | None = None,
    seed: int = 0,
    read: Callable[[Any], np.ndarray] | None = None,
) -> Figure:
    """Random sample images per class (rows = classes), drawn without replacement.

    Args:
        manifest_df: manifest with ``path`` and ``label`` (``patient_id`` shown when present).
        n_per_class: images per class (fewer when a class has fewer).
        path: optional PNG path.
        seed: sampling seed.
        read: image reader; defaults to ``covidlib.images.read_image``. An unreadable image is
            shown as a panel with the error, not skipped.
    """
    _require_columns(manifest_df, ["path", "label"], "plot_samples")
    if manifest_df.empty:
        raise ValueError("plot_samples: manifest is empty")
    if n_per_class < 1:
        raise ValueError(f"plot_samples: n_per_class must be >= 1, got {n_per_class}")
    if read is None:
        from covidlib.images import read_image as read
    classes = config.ordered_classes(manifest_df["label"].astype(str))
    rng = np.random.default_rng(seed)
    picks: dict[str, pd.DataFrame] = {}
    for cls in classes:
        rows = manifest_df[manifest_df["label"].astype(str) == cls]
        take = rng.choice(len(rows), size=min(n_per_class, len(rows)), replace=False)
        picks[cls] = rows.iloc[np.sort(take)]
    ncols = max(len(p) for p in picks.values())
    fig, axes = _new_figure(len(classes), ncols, figsize=(2.1 * ncols + 0.6, 2.3 * len(classes)))
    for r, cls in enumerate(classes):
        for c in range(ncols):
            ax = axes[r, c]
            if c >= len(picks[cls]):
                ax.axis("off")
                continue
            row = picks[cls].iloc[c]
            try:
                _show_gray(ax, read(row["path"]))
                caption = str(row["patient_id"]) if "patient_id" in row.index else Path(str(row["path"])).name
            except Exception as exc:  # show the failure; never drop the image silently
                ax.set(xticks=[], yticks=[])
                ax.text(0.5, 0.5, f"unreadable:\n{type(exc).__name__}", ha="center", va="center",
                        color=WRONG_COLOR, fontsize=8, transform=ax.transAxes)
                caption = Path(str(row["path"])).name
            ax.set_title(caption, fontsize=7)
            if c == 0:
                ax.set_ylabel(_name(cls), fontsize=11)
    fig.suptitle("Sample images per class")
    return _finish(fig, path)


def plot_enhancement_steps(
    steps: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike | None = None
) -> Figure:
    """Image after each enhancement step, with its intensity histogram underneath.

    Args:
        steps: ``[(name, image), ...]`` in order, e.g. ``[("original", a), ("crop", b), ...]``.
        path: optional PNG path.
    """
    steps = list(steps)
    if not steps:
        raise ValueError("plot_enhancement_steps: no steps given")
    for item in steps:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError("plot_enhancement_steps: each step must be a (name, image) pair")
        if np.asarray(item[1]).ndim not in (2, 3):
            raise ValueError(f"plot_enhancement_steps: step {item[0]!r} is not an image (shape {np.shape(item[1])})")
    n = len(steps)
    fig = Figure(figsize=(3.0 * n, 5.2), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False, gridspec_kw={"height_ratios": [3, 1.3]})
    for i, (name, img) in enumerate(steps):
        img = np.asarray(img)
        _show_gray(axes[0, i], img)
        axes[0, i].set_title(f"{name}\n{img.shape[1]}x{img.shape[0]} {img.dtype}", fontsize=9)
        shown = _to_uint8(img if img.ndim == 2 or img.shape[-1] == 1 else img.mean(axis=-1))
        hist = np.bincount(shown.ravel(), minlength=256)
        ax = axes[1, i]
        ax.fill_between(np.arange(256), hist, step="mid", color="0.35")
        ax.set_xlim(0, 255)
        ax.set_yticks([])
        ax.set_xlabel("intensity", fontsize=8)
        ax.tick_params(labelsize=7)
    return _finish(fig, path)


# --------------------------------------------------------------------------- training
_NOT_METRICS = {"epoch", "lr", "learning_rate"}


def plot_training_curves(
    history: Any, path: str | os.PathLike | None = None, title: str | None = None
) -> Figure:
    """One panel per metric, train vs validation (and the learning rate, log scale).

    Args:
        history: DataFrame (e.g. ``history.csv``), dict of lists, or a keras ``History``.
        path: optional PNG path.
        title: figure title.
    """
    if hasattr(history, "history") and isinstance(getattr(history, "history"), Mapping):
        history = history.history
    if isinstance(history, Mapping):
        try:
            history = pd.DataFrame(dict(history))
        except ValueError as exc:
            raise ValueError(f"plot_training_curves: history columns have different lengths ({exc})") from exc
    if not isinstance(history, pd.DataFrame):
        raise ValueError(f"plot_training_curves: expected a DataFrame, dict or keras History, got {type(history).__name__}")
    if history.empty:
        raise ValueError("plot_training_curves: history is empty")
    df = history
    if "epoch" in df:
        # keras' CSVLogger counts epochs from 0; show 1-based epochs like the progress bar.
        epochs = df["epoch"].to_numpy() + (1 if df["epoch"].min() == 0 else 0)
    else:
        epochs = np.arange(1, len(df) + 1)

    names = list(dict.fromkeys(col.removeprefix("val_") for col in df.columns
                               if col not in _NOT_METRICS and pd.api.types.is_numeric_dtype(df[col])))
    lr_col = next((c for c in ("learning_rate", "lr") if c in df and pd.api.types.is_numeric_dtype(df[c])), None)
    panels = names + ([lr_col] if lr_col else [])
    if not panels:
        raise ValueError(f"plot_training_curves: no numeric metric columns in {list(df.columns)}")

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _new_figure(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows))
    best = None
    if "val_loss" in df and df["val_loss"].notna().any():
        best = epochs[int(np.nanargmin(df["val_loss"].to_numpy(dtype=float)))]
    for ax, name in zip(axes.flat, panels):
        if name == lr_col:
            ax.plot(epochs, df[name], color="0.3", marker=".")
            if (df[name] > 0).all():
                ax.set_yscale("log")
            ax.set_title("learning rate")
        else:
            if name in df:
                ax.plot(epochs, df[name], marker=".", label="train")
            if f"val_{name}" in df:
                ax.plot(epochs, df[f"val_{name}"], marker=".", label="val")
            ax.set_title(name)
            ax.legend(frameon=False, fontsize=8)
        if best is not None:
            ax.axvline(best, color="0.6", ls="--", lw=0.8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    note = f" (dashed: best val_loss, epoch {best:g})" if best is not None else ""
    fig.suptitle((title or "Training curves") + note)
    return _finish(fig, path)


# --------------------------------------------------------------------------- evaluation
def _cm_array(cm: Any, classes: list[str], what: str) -> np.ndarray:
    m = np.asarray(cm, dtype=np.float64)
    k = len(classes)
    if m.shape != (k, k):
        raise ValueError(f"{what}: confusion matrix must be ({k}, {k}) for classes {classes}, got shape {m.shape}")
    if not np.all(np.isfinite(m)) or (m < 0).any():
        raise ValueError(f"{what}: confusion matrix must hold non-negative counts")
    return m


def _row_normalise(m: np.ndarray) -> np.ndarray:
    """Rows divided by their sums; a row with no true cases stays NaN (drawn blank)."""
    sums = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums > 0, m / np.where(sums > 0, sums, 1.0), np.nan)


def _draw_cm(ax, m: np.ndarray, classes: list[str], normalize: bool) -> np.ndarray:
    import seaborn as sns

    names = [_name(c) for c in classes]
    if normalize:
        data = _row_normalise(m)
        annot = np.array(
            [["" if np.isnan(data[i, j]) else f"{data[i, j]:.2f}\n({int(m[i, j])})" for j in range(len(classes))]
             for i in range(len(classes))]
        )
        title, vmax = "Row-normalised (recall per true class)", 1.0
    else:
        data, annot = m, np.vectorize(lambda v: f"{int(round(v))}")(m)
        title, vmax = "Counts", None
    sns.heatmap(data, ax=ax, annot=annot, fmt="", cmap="Blues", vmin=0.0, vmax=vmax, square=True,
                xticklabels=names, yticklabels=names, cbar=True, annot_kws={"fontsize": 9})
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.tick_params(axis="y", rotation=0)
    return data


def plot_confusion_matrix(
    cm: Any,
    classes: Sequence[str],
    path: str | os.PathLike | None = None,
    normalize: bool = False,
    title: str | None = None,
) -> Figure:
    """Confusion matrix heatmap, rows = true class, columns = predicted.

    Args:
        cm: (k, k) counts.
        classes: canonical labels in the matrix order.
        path: optional PNG path.
        normalize: draw row proportions (each row sums to 1; counts in brackets). A class with
            no true cases is left blank.
        title: figure title.

    The drawn matrix is attached as ``fig.covidlib_data``.
    """
    classes = _check_classes(classes, "plot_confusion_matrix")
    m = _cm_array(cm, classes, "plot_confusion_matrix")
    fig, axes = _new_figure(figsize=(1.3 * len(classes) + 2.8, 1.1 * len(classes) + 2.2))
    fig.covidlib_data = _draw_cm(axes[0, 0], m, classes, normalize)
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_confusion_matrices(
    cm: Any, classes: Sequence[str], path: str | os.PathLike | None = None, title: str | None = None
) -> Figure:
    """Counts and row-normalised confusion matrices side by side (``fig.covidlib_data`` = both)."""
    classes = _check_classes(classes, "plot_confusion_matrices")
    m = _cm_array(cm, classes, "plot_confusion_matrices")
    side = 1.3 * len(classes) + 2.8
    fig, axes = _new_figure(1, 2, figsize=(2 * side, 1.1 * len(classes) + 2.2))
    counts = _draw_cm(axes[0, 0], m, classes, False)
    norm = _draw_cm(axes[0, 1], m, classes, True)
    fig.covidlib_data = {"counts": counts, "normalized": norm}
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def _ci_text(auc_ci: Mapping[str, Any] | None, cls: str) -> str:
    if not auc_ci or cls not in auc_ci or auc_ci[cls] is None:
        return ""
    try:
        lo, hi = (float(v) for v in auc_ci[cls])
    except (TypeError, ValueError):
        return ""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return ""
    return f", 95% CI {lo:.3f}-{hi:.3f}"


def plot_roc_curves(
    y_true: Any,
    probs: Any,
    classes: Sequence[str],
    path: str | os.PathLike | None = None,
    auc_ci: Mapping[str, Sequence[float] | None] | None = None,
    title: str | None = None,
) -> Figure:
    """One-vs-rest ROC curve per class from probabilities.

    Args:
        y_true: true class indices into ``classes`` (or canonical label strings).
        probs: (n, k) probabilities in ``classes`` order; for a binary problem also (n,) =
            P(positive class).
        classes: canonical labels.
        path: optional PNG path.
        auc_ci: ``{class: [lo, hi]}`` 95% CI shown in the legend (``None`` values skipped).
        title: figure title.

    Binary problems draw one curve, for the positive class (``covid`` when present). A class
    with no positive or no negative case gets no curve ("AUC undefined" in the legend).
    The curves drawn are attached as ``fig.covidlib_data = {class: (fpr, tpr, auc)}``.
    """
    from sklearn.metrics import auc as _area, roc_curve

    classes = _check_classes(classes, "plot_roc_curves")
    y = _label_indices(y_true, classes, "plot_roc_curves")
    p = _probs_2d(probs, len(y), len(classes), "plot_roc_curves", classes)
    targets = [positive_index(classes)] if len(classes) == 2 else list(range(len(classes)))

    fig, axes = _new_figure(figsize=(5.6, 5.2))
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    drawn: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for i in targets:
        cls = classes[i]
        pos = y == i
        if pos.all() or not pos.any():
            ax.plot([], [], color=_class_color(cls, i), label=f"{_name(cls)} (AUC undefined: one class only)")
            continue
        fpr, tpr, _ = roc_curve(pos.astype(int), p[:, i])
        area = float(_area(fpr, tpr))
        drawn[cls] = (fpr, tpr, area)
        ax.plot(fpr, tpr, lw=2, color=_class_color(cls, i),
                label=f"{_name(cls)} (AUC {area:.3f}{_ci_text(auc_ci, cls)})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title or ("ROC" if len(targets) == 1 else "ROC, one-vs-rest"))
    fig.covidlib_data = drawn
    return _finish(fig, path)


def plot_reliability_diagram(
    y_true: Any,
    probs: Any,
    path: str | os.PathLike | None = None,
    n_bins: int = 15,
    probs_calibrated: Any = None,
    title: str | None = None,
    *,
    output: str = "probability",
) -> Figure:
    """Top-label reliability diagram (accuracy vs confidence per bin) with ECE in the legend.

    Args:
        y_true: true class indices.
        probs: (n, k) probabilities ((n,) = P(class 1) of a binary problem).
        path: optional PNG path.
        n_bins: equal-width confidence bins.
        probs_calibrated: the temperature-scaled probabilities, overlaid when given.
        title: figure title.
        output: what ``probs`` holds; ``"score"`` (the hard vote's ranking score) is refused:
            a score has no calibration to draw, and its diagram would read as a miscalibration.

    Bins and ECE come from ``covidlib.evaluate.reliability_curve`` /
    ``expected_calibration_error``. A histogram of confidences sits underneath.

    Raises:
        ValueError: bad shapes or bins, or ``output`` other than ``"probability"``.
    """
    if output != "probability":
        raise ValueError(f"plot_reliability_diagram: output {output!r} is not a probability; a "
                         "reliability diagram applies only to probabilities (the hard vote's "
                         "ranking score has none)")
    if int(n_bins) < 1:
        raise ValueError(f"plot_reliability_diagram: n_bins must be >= 1, got {n_bins}")
    n_bins = int(n_bins)
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        raise ValueError("plot_reliability_diagram: y_true must be a non-empty 1-D array of class indices")
    y = y.astype(np.int64)
    series = [("Uncalibrated", _probs_2d(probs, len(y), None, "plot_reliability_diagram"), "#1f77b4")]
    if y.min() < 0 or y.max() >= series[0][1].shape[1]:
        raise ValueError(
            f"plot_reliability_diagram: y_true holds class indices outside 0..{series[0][1].shape[1] - 1}"
        )
    if probs_calibrated is not None:
        pc = _probs_2d(probs_calibrated, len(y), series[0][1].shape[1], "plot_reliability_diagram (calibrated)")
        series.append(("Temperature-scaled", pc, "#d62728"))

    fig = Figure(figsize=(5.6, 6.4), layout="constrained")
    ax, hax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    width = 1.0 / n_bins
    drawn = {}
    for j, (name, p, color) in enumerate(series):
        curve = {k: np.asarray(v, dtype=np.float64) for k, v in reliability_curve(y, p, n_bins).items()}
        ece = float(expected_calibration_error(y, p, n_bins))
        ok = curve["bin_count"] > 0  # an empty bin has no accuracy
        bc, ba = curve["bin_confidence"][ok], curve["bin_accuracy"][ok]
        label = f"{name} (ECE {ece:.3f})"
        if j == 0:  # uncalibrated: bars and a filled histogram
            centers = np.clip(np.floor(bc * n_bins), 0, n_bins - 1) * width + width / 2
            ax.bar(centers, ba, width=width * 0.95, color=color, alpha=0.35, edgecolor=color, label=label)
            ax.plot(bc, ba, marker="o", ms=4, color=color, lw=1)
            hax.hist(p.max(axis=1), bins=edges, color=color, alpha=0.45, label=name)
        else:  # temperature-scaled: a line and an outline
            ax.plot(bc, ba, marker="s", ms=4, color=color, lw=1.8, label=label)
            hax.hist(p.max(axis=1), bins=edges, histtype="step", color=color, lw=1.4, label=name)
        drawn[name] = {"bin_confidence": bc, "bin_accuracy": ba, "bin_count": curve["bin_count"][ok], "ece": ece}
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Reliability diagram (top label)")
    hax.set_xlabel("confidence (top-label probability)")
    hax.set_ylabel("count")
    fig.covidlib_data = drawn
    return _finish(fig, path)


def plot_prediction_grid(
    images: Any,
    y_true: Any,
    y_pred: Any,
    classes: Sequence[str],
    path: str | os.PathLike | None = None,
    n: int = 25,
    seed: int = 0,
    indices: Sequence[int] | None = None,
) -> Figure:
    """Grid of test images captioned ``N=<index> | P=<predicted> | GT=<true>``.

    Images are drawn WITHOUT replacement (``default_rng(seed).choice(replace=False)``); with
    fewer than ``n`` images all of them are shown and the grid shrinks (25 -> 5x5). Captions
    are green when the prediction is right, red when wrong.

    Args:
        images: (N, H, W), (N, H, W, 1) array or a sequence of 2-D images.
        y_true: true class indices into ``classes``, length N.
        y_pred: predicted class indices, length N.
        classes: canonical labels.
        path: optional PNG path.
        n: how many images to draw.
        seed: sampling seed.
        indices: show exactly these images (no sampling), in this order.

    Returns:
        The figure; the indices shown, in grid order, are ``fig.covidlib_indices`` (np.ndarray).
    """
    classes = _check_classes(classes, "plot_prediction_grid")
    images = images if isinstance(images, np.ndarray) else list(images)
    n_images = len(images)
    if n_images == 0:
        raise ValueError("plot_prediction_grid: no images")
    yt = _label_indices(y_true, classes, "plot_prediction_grid y_true")
    yp = _label_indices(y_pred, classes, "plot_prediction_grid y_pred")
    if len(yt) != n_images or len(yp) != n_images:
        raise ValueError(
            f"plot_prediction_grid: {n_images} images but {len(yt)} true and {len(yp)} predicted labels"
        )
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64).ravel()
        if idx.size == 0:
            raise ValueError("plot_prediction_grid: indices is empty")
        if idx.min() < 0 or idx.max() >= n_images:
            raise ValueError(f"plot_prediction_grid: indices out of range for {n_images} images")
        if len(np.unique(idx)) != len(idx):
            raise ValueError("plot_prediction_grid: indices repeat an image")
    else:
        if int(n) < 1:
            raise ValueError(f"plot_prediction_grid: n must be >= 1, got {n}")
        idx = np.random.default_rng(seed).choice(n_images, size=min(int(n), n_images), replace=False)
    m = len(idx)
    ncols = math.ceil(math.sqrt(m))
    nrows = math.ceil(m / ncols)
    fig, axes = _new_figure(nrows, ncols, figsize=(2.5 * ncols, 2.6 * nrows))
    for ax in axes.flat[m:]:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx.tolist()):
        _show_gray(ax, images[i])
        ax.set_title(f"N={i} | P={_name(classes[yp[i]])} | GT={_name(classes[yt[i]])}",
                     color=RIGHT_COLOR if yt[i] == yp[i] else WRONG_COLOR, fontsize=7.5)
    n_right = int((yt[idx] == yp[idx]).sum())
    fig.suptitle(f"Test predictions: {n_right}/{m} right (green) / wrong (red)", fontsize=11)
    fig.covidlib_indices = np.asarray(idx, dtype=np.int64)
    return _finish(fig, path)


def plot_ablation(
    table: pd.DataFrame, path: str | os.PathLike | None = None, metric: str = "auc_macro"
) -> Figure:
    """Bar chart of one metric per enhancement pipeline, with 95% CI error bars.

    Args:
        table: DataFrame with ``pipeline`` and ``<metric>_mean`` (the ablation's seed mean) or
            ``<metric>``, optionally ``<metric>_lo, <metric>_hi``; when ``<metric>_diff_vs_none``
            is there too, a second panel shows the paired difference to ``none`` and the verdict.
        path: optional PNG path.
        metric: the metric to draw.
    """
    column = f"{metric}_mean" if f"{metric}_mean" in table.columns else metric
    if column not in table.columns or "pipeline" not in table.columns:
        raise ValueError(f"plot_ablation: missing column(s) ['pipeline', {metric!r}] "
                         f"(or {metric}_mean); got {list(table.columns)}")
    if table.empty:
        raise ValueError("plot_ablation: table is empty")

    def _col(name: str) -> np.ndarray:
        if name not in table.columns:
            return np.full(len(table), np.nan)
        return pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=float)

    paired = f"{metric}_diff_vs_none" in table.columns
    names = table["pipeline"].astype(str).tolist()
    fig, axes = _new_figure(ncols=2 if paired else 1,
                            figsize=(max(5.0, 0.9 * len(names) + 2.5) * (2 if paired else 1), 4.4))
    panels = [(column, f"{metric}_lo", f"{metric}_hi", f"{metric} (95% CI)")]
    if paired:
        panels.append((f"{metric}_diff_vs_none", f"{metric}_diff_lo", f"{metric}_diff_hi",
                       "paired difference to none (95% CI)"))
    for ax, (col, lo_name, hi_name, title) in zip(axes[0], panels):
        vals, lo, hi = _col(col), _col(lo_name), _col(hi_name)
        err = np.vstack([np.where(np.isfinite(lo), vals - lo, 0.0),
                         np.where(np.isfinite(hi), hi - vals, 0.0)])
        x = np.arange(len(names))
        bars = ax.bar(x, np.nan_to_num(vals), yerr=np.clip(np.nan_to_num(err), 0.0, None),
                      capsize=4, color="#1f77b4", alpha=0.85)
        ax.bar_label(bars, labels=["n/a" if not np.isfinite(v) else f"{v:.3f}" for v in vals],
                     fontsize=8, padding=2, label_type="center")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel(metric)
        finite = np.concatenate([vals[np.isfinite(vals)], hi[np.isfinite(hi)]])
        if col == column and finite.size and finite.min() >= 0 and finite.max() <= 1:
            ax.set_ylim(0, 1.05)
        if col != column:
            ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(f"Enhancement ablation: {title}")
        ax.grid(axis="y", alpha=0.3)
    return _finish(fig, path)


def plot_threshold_sweep(
    sweep: pd.DataFrame, path: str | os.PathLike | None = None, chosen: float | None = None
) -> Figure:
    """Two-phase X-ray threshold sweep: COVID sensitivity vs CT scans avoided.

    Args:
        sweep: DataFrame with ``threshold, sensitivity, ct_fraction`` (share of patients sent to
            CT), optional ``specificity``, optional boolean ``chosen`` column.
        path: optional PNG path.
        chosen: the operating threshold to mark (else the row flagged in a ``chosen`` column).
    """
    _require_columns(sweep, ["threshold", "sensitivity", "ct_fraction"], "plot_threshold_sweep")
    if sweep.empty:
        raise ValueError("plot_threshold_sweep: sweep is empty")
    df = sweep.sort_values("threshold").reset_index(drop=True)
    thr = df["threshold"].to_numpy(dtype=float)
    sens = df["sensitivity"].to_numpy(dtype=float)
    avoided = 1.0 - df["ct_fraction"].to_numpy(dtype=float)
    pick = None
    if chosen is not None:
        pick = int(np.nanargmin(np.abs(thr - float(chosen))))
    elif "chosen" in df.columns and df["chosen"].fillna(False).astype(bool).any():
        pick = int(np.flatnonzero(df["chosen"].fillna(False).astype(bool).to_numpy())[0])

    fig, axes = _new_figure(1, 2, figsize=(10.5, 4.4))
    ax, bx = axes[0, 0], axes[0, 1]
    sc = ax.scatter(100 * avoided, sens, c=thr, cmap="viridis", s=18, zorder=3)
    ax.plot(100 * avoided, sens, color="0.6", lw=1, zorder=2)
    fig.colorbar(sc, ax=ax, label="X-ray threshold")
    ax.set_xlabel("CT scans avoided (% of patients)")
    ax.set_ylabel("COVID-19 sensitivity")
    ax.set_title("Sensitivity vs CTs avoided")
    ax.grid(alpha=0.3)

    bx.plot(thr, sens, label="sensitivity", color="#d62728")
    if "specificity" in df.columns:
        bx.plot(thr, df["specificity"].to_numpy(dtype=float), label="specificity", color="#1f77b4")
    bx.plot(thr, df["ct_fraction"].to_numpy(dtype=float), label="sent to CT", color="0.3", ls="--")
    bx.set_xlabel("X-ray threshold")
    bx.set_ylim(-0.02, 1.02)
    bx.set_title("Per threshold")
    bx.grid(alpha=0.3)
    if pick is not None:
        t = thr[pick]
        lab = f"chosen t={t:.3g}: sens {sens[pick]:.3f}, {100 * avoided[pick]:.0f}% CTs avoided"
        ax.scatter([100 * avoided[pick]], [sens[pick]], marker="*", s=220, color="#d62728",
                   edgecolor="k", zorder=4, label=lab)
        ax.legend(loc="lower left", fontsize=8)
        bx.axvline(t, color="#d62728", ls=":", lw=1.2, label=f"chosen t={t:.3g}")
    bx.legend(fontsize=8, loc="best")
    fig.covidlib_chosen = None if pick is None else float(thr[pick])
    return _finish(fig, path)


# --------------------------------------------------------------------------- Grad-CAM
def plot_gradcam_grid(
    images: Any,
    heatmaps_by_model: Mapping[str, np.ndarray],
    captions: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Rows = images; columns = the original and one Grad-CAM overlay per model.

    Args:
        images: (n, H, W) array or sequence of 2-D images.
        heatmaps_by_model: ``{model name: (n, h, w) heatmaps in [0, 1]}`` (resized to each image).
        captions: one caption per row (e.g. ``"N=12 | P=COVID-19 | GT=COVID-19"``).
        path: optional PNG path.
    """
    from covidlib.explain import overlay_heatmap

    imgs = list(images)
    if not imgs:
        raise ValueError("plot_gradcam_grid: no images")
    if not heatmaps_by_model:
        raise ValueError("plot_gradcam_grid: no heatmaps given")
    n = len(imgs)
    for name, hm in heatmaps_by_model.items():
        if len(hm) != n:
            raise ValueError(f"plot_gradcam_grid: {len(hm)} heatmaps for {name!r} but {n} images")
    if captions is not None and len(captions) != n:
        raise ValueError(f"plot_gradcam_grid: {len(captions)} captions for {n} images")
    names = list(heatmaps_by_model)
    ncols = 1 + len(names)
    fig, axes = _new_figure(n, ncols, figsize=(2.4 * ncols, 2.5 * n))
    for r, img in enumerate(imgs):
        gray = _to_uint8(img)
        _show_gray(axes[r, 0], gray)
        axes[r, 0].set_title("Original" if captions is None else str(captions[r]), fontsize=8)
        for c, name in enumerate(names, start=1):
            ax = axes[r, c]
            ax.imshow(overlay_heatmap(gray, np.asarray(heatmaps_by_model[name][r])))
            ax.set(xticks=[], yticks=[])
            ax.set_title(name, fontsize=8)
    fig.suptitle("Grad-CAM")
    return _finish(fig, path)
