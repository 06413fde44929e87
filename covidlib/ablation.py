"""Notebook 02: what is each enhancement step worth?

AICOV-CT claims that image enhancement helps. "Pipeline X beats no enhancement" is a PAIRED
question: every pipeline is tested on the same test patients, so the evidence is the difference
on those patients, not whether two separate confidence intervals overlap (overlap is neither a
test nor sensitive: two CIs can overlap while the paired difference is clearly non-zero).

The same backbone and budget are trained on each enhancement pipeline once per training seed
(run ``ablation_<modality>_<pipeline>_s<seed>``; finished runs are reused).
``RUN_DIR/enhancement_ablation.csv`` holds, per pipeline:

* the mean and SD over seeds of macro AUC, accuracy and macro F1, and the patient-bootstrap 95%
  CI of each seed-averaged metric (``<metric>_mean, _sd, _lo, _hi``);
* the paired bootstrap difference to ``none`` (``<metric>_diff_vs_none, _diff_lo, _diff_hi``):
  every replicate resamples the test PATIENTS once (images when there are no patient ids),
  scores every seed of both pipelines on that same resample and averages the per-seed
  differences (:func:`covidlib.evaluate.paired_bootstrap_diff`), so one lucky initialisation
  cannot decide;
* ``verdict_vs_none`` from the 95% CI of the macro-AUC difference (``verdict_metric``): AUC is
  threshold-free, accuracy depends on the argmax threshold and is reported next to it.

What the interval covers: sampling of test patients, for the models these seeds produced.
Training variance (another set of seeds giving other models) shows only in the ``_sd`` columns;
with a handful of seeds it cannot be bootstrapped reliably, so read a verdict whose difference
is small next to those SDs with care.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from covidlib import enhance, evaluate
from covidlib.fsutil import atomic_write_bytes
from covidlib.runner import NOTEBOOK_DEFAULT, fill_defaults

BASELINE = "none"
# AUC decides: it needs no threshold. Accuracy (argmax) is reported next to it.
VERDICT_METRIC = "auc_macro"
LEVEL_METRICS: tuple[str, ...] = ("auc_macro", "accuracy", "f1_macro")
DIFF_METRICS: tuple[str, ...] = ("auc_macro", "accuracy")
NO_DIFFERENCE = "no difference (95% CI of the paired difference contains 0)"
UNDETERMINED = "undetermined (the paired difference has no CI)"
COLUMNS: tuple[str, ...] = (
    "pipeline", "verdict_vs_none", "verdict_metric",
    *(f"{m}{s}" for m in DIFF_METRICS for s in ("_diff_vs_none", "_diff_lo", "_diff_hi")),
    *(f"{m}{s}" for m in LEVEL_METRICS for s in ("_mean", "_sd", "_lo", "_hi")),
    "n_seeds", "n_test", "n_units", "ci_unit", "n_boot",
)


def preview_steps(img: np.ndarray, pipeline: str = "crop+dct+wb+clahe",
                  modality: str = "ct") -> list[tuple[str, np.ndarray]]:
    """The image after each step of ``pipeline``, cumulatively: ``[("original", img), ...]``."""
    steps = enhance.PIPELINES.get(pipeline)
    if steps is None:
        raise ValueError(f"unknown pipeline {pipeline!r}; choose one of {list(enhance.PIPELINES)}")
    out = [("original", img)]
    for i in range(1, len(steps) + 1):
        partial = "+".join(steps[:i])
        name = partial if partial in enhance.PIPELINES else None
        out.append((steps[i - 1], enhance.enhance(img, name, modality=modality) if name else
                    _apply_prefix(img, steps[:i], modality)))
    return out


def _apply_prefix(img: np.ndarray, steps: Sequence[str], modality: str) -> np.ndarray:
    # Prefixes like "crop+dct" are not named pipelines; run the named steps one by one.
    funcs = {"crop": lambda a: enhance.crop_body(a) if modality == "ct" else enhance.crop_border(a),
             "lungcrop": lambda a: enhance.crop_lungs(a) if modality == "ct" else enhance.crop_border(a),
             "dct": enhance.dct_denoise, "wb": enhance.white_balance, "clahe": enhance.clahe}
    for s in steps:
        img = funcs[s](img)
    return img


def run_name(pipeline: str, seed: int, modality: str = "ct") -> str:
    """Name of the training run of ``pipeline`` with training seed ``seed``."""
    return f"ablation_{modality}_{pipeline.replace('+', '_')}_s{int(seed)}"


def verdict(lo: float | None, hi: float | None) -> str:
    """Verdict from the 95% CI ``[lo, hi]`` of a paired difference (pipeline minus baseline)."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return UNDETERMINED
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return NO_DIFFERENCE


def train_runs(
    run_dir: str | os.PathLike,
    pipelines: Sequence[str],
    *,
    seeds: Sequence[int],
    backbone: str,
    modality: str,
    img_size: int,
    epochs: int,
    batch_size: int,
    weights: str | None,
) -> dict[str, list[Path]]:
    """Train (or reuse) one run per pipeline and seed.

    Returns:
        ``{pipeline: [model folder per seed, in the order of seeds]}``.
    """
    from covidlib.train import train_backbone

    out: dict[str, list[Path]] = {}
    for pipeline in pipelines:  # pipeline-major: each enhanced copy is made once, then cached
        out[pipeline] = [
            train_backbone(run_dir, enhancement=pipeline, backbone=backbone, modality=modality,
                           img_size=img_size, epochs=epochs, batch_size=batch_size, seed=int(s),
                           weights=weights, name=run_name(pipeline, s, modality),
                           tensorboard=False, verbose=0).model_dir
            for s in seeds]
    return out


def load_test_predictions(
    model_dirs: Mapping[str, Sequence[str | os.PathLike]],
) -> tuple[dict[str, list[pd.DataFrame]], list[str]]:
    """Read ``predictions_test.csv`` of every run and the (shared) class order.

    Raises:
        ValueError: the runs do not share one class order.
    """
    preds: dict[str, list[pd.DataFrame]] = {}
    classes: list[str] | None = None
    for pipeline, dirs in model_dirs.items():
        for d in map(Path, dirs):
            run_classes = json.loads((d / "labels.json").read_text())
            if classes is None:
                classes = run_classes
            elif run_classes != classes:
                raise ValueError(f"{d.name} has classes {run_classes}, other runs {classes}")
            preds.setdefault(pipeline, []).append(pd.read_csv(
                d / "predictions_test.csv", dtype={"patient_id": str}, keep_default_na=False))
    if classes is None:
        raise ValueError("no ablation runs to read")
    return preds, classes


def _image_keys(paths: pd.Series) -> list[str] | None:
    """A name per test image that survives enhancement, or None when names are not unique.

    Enhanced copies mirror the source tree under another folder with a ``.png`` suffix, so the
    path relative to the images' common folder, without its last suffix, names one image in
    every run.
    """
    ps = [os.path.normpath(str(p)) for p in paths]
    if not ps:
        return []
    try:
        root = os.path.commonpath([os.path.dirname(p) for p in ps])
    except ValueError:  # absolute and relative paths mixed, or different drives
        return None
    keys = [os.path.splitext(os.path.relpath(p, root))[0] for p in ps]
    return keys if len(set(keys)) == len(keys) else None


def align_predictions(
    predictions: Mapping[str, Sequence[pd.DataFrame]], classes: Sequence[str],
) -> tuple[pd.DataFrame, dict[str, list[np.ndarray]]]:
    """Put every run's test predictions on the same rows (same images, same order).

    Rows are matched by image name (see :func:`_image_keys`); when names are ambiguous, by
    position (then every run must hold the same number of rows). Images missing from some runs
    (e.g. a failed enhancement) are left out of the comparison, with a warning.

    Returns:
        ``(cases, probs)``: ``cases`` has ``label`` (and ``patient_id``) per common test image;
        ``probs[pipeline]`` lists one (n x K) probability matrix per seed, rows as in ``cases``.

    Raises:
        ValueError: no predictions, no common image, or runs disagreeing on an image's
            label or patient.
    """
    runs = [(p, df) for p, dfs in predictions.items() for df in dfs]
    if not runs:
        raise ValueError("no predictions to compare")
    keys = [_image_keys(df["path"]) if "path" in df.columns else None for _, df in runs]
    if all(k is not None for k in keys):
        common = set(keys[0]).intersection(*keys[1:])
        order = [k for k in keys[0] if k in common]
        frames = [df.set_axis(k, axis=0).loc[order].reset_index(drop=True)
                  for (_, df), k in zip(runs, keys)]
    elif len({len(df) for _, df in runs}) == 1:
        frames = [df.reset_index(drop=True) for _, df in runs]
    else:
        raise ValueError("cannot match test images across runs: image names are ambiguous and "
                         "the runs hold different numbers of test images")
    ref = frames[0]
    if ref.empty:
        raise ValueError("the runs share no test image")
    for (pipeline, _), fr in zip(runs, frames):
        for col in ("label", "patient_id"):
            if col in ref.columns and col in fr.columns and not (
                    fr[col].astype(str).to_numpy() == ref[col].astype(str).to_numpy()).all():
                raise ValueError(f"a run of {pipeline!r} gives the same test images another {col}")
    n_max = max(len(df) for _, df in runs)
    if n_max > len(ref):
        warnings.warn(f"{n_max - len(ref)} test image(s) are missing from some runs (failed "
                      f"enhancement?); every pipeline is compared on the {len(ref)} images all "
                      "runs have", UserWarning, stacklevel=2)
    probs: dict[str, list[np.ndarray]] = {}
    for (pipeline, _), fr in zip(runs, frames):
        probs.setdefault(pipeline, []).append(evaluate.predictions_to_arrays(fr, list(classes))[1])
    cases = ref[[c for c in ("patient_id", "label") if c in ref.columns]]
    return cases, probs


def _pipeline_row(pipeline: str, mats: list[np.ndarray], base: list[np.ndarray] | None,
                  y: np.ndarray, classes: list[str], groups: np.ndarray | None, n_boot: int,
                  seed: int) -> dict:
    """One table row: seed mean / SD, bootstrap CIs and the paired difference to the baseline."""
    per_seed = [evaluate.compute_metrics(y, p, classes) for p in mats]
    # Against itself when there is no baseline: the level CIs still come out, the diffs are NaN.
    paired = evaluate.paired_bootstrap_diff(y, mats, base if base is not None else mats, classes,
                                            groups, n_boot=n_boot, seed=seed, metrics=LEVEL_METRICS)
    row: dict = {"pipeline": pipeline, "n_seeds": len(mats)}
    for m in LEVEL_METRICS:
        v = np.array([np.nan if s[m] is None else s[m] for s in per_seed], dtype=float)
        lo, hi = paired[m]["a_ci"] or (np.nan, np.nan)
        row.update({f"{m}_mean": float(v.mean()),
                    f"{m}_sd": float(v.std(ddof=1)) if len(v) > 1 else np.nan,
                    f"{m}_lo": lo, f"{m}_hi": hi})
    for m in DIFF_METRICS:
        d = paired[m] if base is not None else {"diff": None, "diff_ci": None}
        lo, hi = d["diff_ci"] or (np.nan, np.nan)
        row.update({f"{m}_diff_vs_none": np.nan if d["diff"] is None else d["diff"],
                    f"{m}_diff_lo": lo, f"{m}_diff_hi": hi})
    if pipeline == BASELINE:
        row["verdict_vs_none"] = "baseline"
    elif base is None:
        row["verdict_vs_none"] = f"n/a (no {BASELINE!r} run to compare with)"
    else:
        row["verdict_vs_none"] = verdict(row[f"{VERDICT_METRIC}_diff_lo"],
                                         row[f"{VERDICT_METRIC}_diff_hi"])
    row["verdict_metric"] = VERDICT_METRIC
    return row


def tabulate(predictions: Mapping[str, Sequence[pd.DataFrame]], classes: Sequence[str], *,
             n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The ablation table (columns :data:`COLUMNS`, see the module docstring) from test predictions.

    Args:
        predictions: ``{pipeline: [predictions_test table per training seed]}``; the paired
            differences need a ``"none"`` entry.
        classes: class order of the ``p_<class>`` columns.
        n_boot: bootstrap replicates.
        seed: bootstrap seed (the same resamples for every pipeline).
    """
    classes = list(classes)
    cases, probs = align_predictions(predictions, classes)
    y = cases["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    groups, ci_unit = evaluate.bootstrap_groups(cases)
    base = probs.get(BASELINE)
    rows = [_pipeline_row(p, mats, base, y, classes, groups, n_boot, seed) for p, mats in probs.items()]
    table = pd.DataFrame(rows)
    table["n_test"] = len(y)
    table["n_units"] = len(np.unique(groups)) if groups is not None else len(y)
    table["ci_unit"] = ci_unit
    table["n_boot"] = int(n_boot)
    return table[list(COLUMNS)]


def run_ablation(
    run_dir: str | os.PathLike,
    pipelines: Sequence[str] = NOTEBOOK_DEFAULT,
    *,
    backbone: str = NOTEBOOK_DEFAULT,
    modality: str = "ct",
    img_size: int = NOTEBOOK_DEFAULT,
    epochs: int = NOTEBOOK_DEFAULT,
    batch_size: int = NOTEBOOK_DEFAULT,
    seeds: Sequence[int] = NOTEBOOK_DEFAULT,
    n_boot: int = NOTEBOOK_DEFAULT,
    boot_seed: int = 0,
    weights: str | None = None,
) -> pd.DataFrame:
    """Train ``backbone`` once per pipeline and seed, and tabulate the paired comparison.

    Each run is an ordinary training run named :func:`run_name` (``ablation_ct_crop_wb_s1``)
    under ``RUN_DIR/models``; re-running reuses finished runs. Writes the table (see
    :func:`tabulate`, plus ``backbone`` and ``seeds`` columns) atomically to
    ``RUN_DIR/enhancement_ablation.csv``.

    Args:
        run_dir: run folder holding ``manifest.csv``.
        pipelines: enhancement pipelines; include ``"none"`` for the verdicts.
        backbone, modality, img_size, epochs, batch_size, weights: the training budget, the
            same for every run.
        seeds: training seeds; each pipeline is trained once per seed.
        n_boot: bootstrap replicates.
        boot_seed: bootstrap seed.

    Keywords left out take notebook 02's parameters (``ABLATION_PIPELINES``,
    ``ABLATION_BACKBONE``, ``IMG_SIZE``, ``ABLATION_EPOCHS``, ``BATCH_SIZE``, ``ABLATION_SEEDS``,
    ``N_BOOT``), so the library and the notebook share one default.

    Raises:
        ValueError: unknown or repeated pipelines, or no / repeated seeds.
    """
    kw = fill_defaults("ablation", dict(pipelines=pipelines, backbone=backbone, img_size=img_size,
                                        epochs=epochs, batch_size=batch_size, seeds=seeds,
                                        n_boot=n_boot),
                       {k: f"ABLATION_{k.upper()}" for k in ("pipelines", "backbone", "epochs", "seeds")})
    backbone, img_size, epochs = kw["backbone"], kw["img_size"], kw["epochs"]
    batch_size, n_boot = kw["batch_size"], kw["n_boot"]
    pipelines, seeds = list(kw["pipelines"]), [int(s) for s in kw["seeds"]]
    unknown = [p for p in pipelines if p not in enhance.PIPELINES]
    if unknown:
        raise ValueError(f"unknown pipeline(s) {unknown}; choose from {list(enhance.PIPELINES)}")
    if len(set(pipelines)) != len(pipelines) or not pipelines:
        raise ValueError(f"pipelines must be distinct and not empty, got {pipelines}")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and not empty, got {seeds}")
    run_dir = Path(run_dir)
    dirs = train_runs(run_dir, pipelines, seeds=seeds, backbone=backbone, modality=modality,
                      img_size=img_size, epochs=epochs, batch_size=batch_size, weights=weights)
    preds, classes = load_test_predictions(dirs)
    table = tabulate(preds, classes, n_boot=n_boot, seed=boot_seed)
    table.insert(1, "backbone", backbone)
    table.insert(table.columns.get_loc("n_seeds") + 1, "seeds", " ".join(map(str, seeds)))
    atomic_write_bytes(run_dir / "enhancement_ablation.csv", table.to_csv(index=False).encode())
    return table
