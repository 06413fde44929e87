"""Notebook 02: what is each enhancement step worth?

The same backbone, seed and budget is trained on each enhancement pipeline; test metrics with
95% bootstrap CIs go into ``RUN_DIR/enhancement_ablation.csv``. A pipeline whose CI overlaps the
baseline's is reported as "no difference" — with a few hundred test images that is the honest
answer more often than not.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from covidlib import enhance, evaluate
from covidlib.fsutil import atomic_write_bytes

METRICS = ("accuracy", "f1_macro", "auc_macro")


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
             "dct": enhance.dct_denoise, "wb": enhance.white_balance, "clahe": enhance.clahe}
    for s in steps:
        img = funcs[s](img)
    return img


def compare(table: pd.DataFrame, baseline: str = "none", metric: str = "accuracy") -> list[str]:
    """Verdict per pipeline against ``baseline``: better / worse / no difference (CI overlap)."""
    if baseline not in set(table["pipeline"]):
        return ["n/a"] * len(table)
    base = table.set_index("pipeline").loc[baseline]
    verdicts = []
    for _, row in table.iterrows():
        lo, hi, blo, bhi = (row[f"{metric}_lo"], row[f"{metric}_hi"], base[f"{metric}_lo"],
                            base[f"{metric}_hi"])
        if row["pipeline"] == baseline:
            verdicts.append("baseline")
        elif any(pd.isna(v) for v in (lo, hi, blo, bhi)):
            verdicts.append("undetermined (no CI)")
        elif lo > bhi:
            verdicts.append("better")
        elif hi < blo:
            verdicts.append("worse")
        else:
            verdicts.append("no difference (95% CIs overlap)")
    return verdicts


def run_ablation(
    run_dir: str | os.PathLike,
    pipelines: Sequence[str] = ("none", "crop", "crop+wb", "crop+clahe", "crop+wb+clahe",
                                "crop+dct+wb+clahe"),
    *,
    backbone: str = "SmallCNN",
    modality: str = "ct",
    img_size: int = 64,
    epochs: int = 5,
    batch_size: int = 32,
    seed: int = 0,
    n_boot: int = 1000,
    weights: str | None = None,
) -> pd.DataFrame:
    """Train ``backbone`` once per pipeline and tabulate test metrics with 95% CIs.

    Each run is an ordinary training run named ``ablation_<pipeline>`` under ``RUN_DIR/models``
    (re-running reuses finished runs). Writes ``RUN_DIR/enhancement_ablation.csv``.
    """
    from covidlib.train import train_backbone

    run_dir = Path(run_dir)
    unknown = [p for p in pipelines if p not in enhance.PIPELINES]
    if unknown:
        raise ValueError(f"unknown pipeline(s) {unknown}; choose from {list(enhance.PIPELINES)}")
    rows = []
    for pipeline in pipelines:
        result = train_backbone(
            run_dir, enhancement=pipeline, backbone=backbone, modality=modality,
            img_size=img_size, epochs=epochs, batch_size=batch_size, seed=seed, weights=weights,
            name=f"ablation_{modality}_{pipeline.replace('+', '_')}", tensorboard=False, verbose=0)
        test = pd.read_csv(result.model_dir / "predictions_test.csv", dtype={"patient_id": str},
                           keep_default_na=False)
        val = pd.read_csv(result.model_dir / "predictions_val.csv", dtype={"patient_id": str},
                          keep_default_na=False)
        m = evaluate.evaluate_predictions(test, result.classes, val, n_boot=n_boot, seed=seed)
        row = {"pipeline": pipeline, "backbone": backbone, "n_test": len(test),
               "ci_unit": m["ci_unit"]}
        for k in METRICS:
            ci = (m["ci95"] or {}).get(k) or [None, None]
            row.update({k: m[k], f"{k}_lo": ci[0], f"{k}_hi": ci[1]})
        rows.append(row)
    table = pd.DataFrame(rows)
    table["verdict_vs_none"] = compare(table, "none", "accuracy")
    atomic_write_bytes(run_dir / "enhancement_ablation.csv", table.to_csv(index=False).encode())
    return table
