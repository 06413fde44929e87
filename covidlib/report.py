"""Notebook 04 / ``covidlib evaluate``: metrics per model, the vote, the two-phase cascade, figures.

Reads the saved predictions of each trained run (never re-runs a model for metrics), writes
``RUN_DIR/evaluation.json``, ``RUN_DIR/results.md`` and ``RUN_DIR/figures/*.png``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from covidlib import cascade, config, ensemble, evaluate, plots
from covidlib.fsutil import atomic_write_text


@dataclass
class RunEvaluation:
    """What :func:`evaluate_run` produced."""

    run_dir: Path
    evaluation: dict
    figures: dict[str, Path] = field(default_factory=dict)


def load_predictions(model_dir: Path) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """Class order, val and test predictions of one trained run."""
    if not (model_dir / "labels.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} holds no trained run; run notebook 03 (or `covidlib train`) first")
    classes = json.loads((model_dir / "labels.json").read_text())
    read = lambda s: pd.read_csv(model_dir / f"predictions_{s}.csv", dtype={"patient_id": str},
                                 keep_default_na=False)
    return classes, read("val"), read("test")


def _probs(df: pd.DataFrame, classes: list[str]) -> np.ndarray:
    return df[[f"p_{c}" for c in classes]].to_numpy(dtype=float)


def _with_probs(df: pd.DataFrame, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    out = df[["path", "patient_id", "label"]].copy()
    for j, c in enumerate(classes):
        out[f"p_{c}"] = probs[:, j]
    return out


def evaluate_run(
    run_dir: str | os.PathLike,
    backbones: Sequence[str] = config.CT_BACKBONES,
    *,
    xray_backbone: str | None = "MobileNetV2",
    vote: str = "hard",
    cohort: str | os.PathLike | None = None,
    phase1_threshold: float = 0.5,
    uncertainty_band: float = 0.15,
    clinical_flag_rate: float = 0.1,
    n_boot: int = 1000,
    seed: int = 0,
    gradcam_images: int = 4,
    save_ensemble: bool = True,
    external_dataset: str | os.PathLike | None = None,
    patient_pattern: str | None = None,
) -> RunEvaluation:
    """Evaluate every CT backbone, their vote and the two-phase cascade of one run.

    Args:
        run_dir: the run folder (``models/<NAME>/`` inside).
        backbones: the CT runs that vote (names under ``models/``).
        xray_backbone: phase-1 model (run ``xray_<name>``); ``None`` or missing skips phase 2.
        vote: ``"hard"`` | ``"soft"`` | ``"weighted"`` (weights fitted on validation).
        cohort: CSV pairing X-ray and CT by patient; ``None`` -> a labelled simulated pairing.
        phase1_threshold: X-ray P(covid) at or above which a patient goes to CT.
        uncertainty_band: X-ray negatives within this distance below the threshold go to CT too.
        clinical_flag_rate: share of simulated patients with the clinical flag.
        n_boot: bootstrap resamples for the CIs.
        seed: seed of the bootstrap, the simulated cohort and the figure sampling.
        gradcam_images: test images shown with Grad-CAM overlays (0 to skip).
        save_ensemble: also save the vote as one Keras model in ``models/ensemble/``.
        external_dataset: another data set (any ``DATASET`` value) to evaluate the trained CT
            models and their vote on, every image of it; see :func:`external_validation`.
        patient_pattern: patient-id regex for ``external_dataset``.
    """
    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    if vote not in ensemble.METHODS:
        raise ValueError(f"VOTE must be one of {list(ensemble.METHODS)}, got {vote!r}")
    backbones = list(backbones)
    if not backbones:
        raise ValueError("BACKBONES is empty: nothing to evaluate")
    figures: dict[str, Path] = {}
    models_block: dict[str, Any] = {}
    val_probs, test_probs = [], []
    classes: list[str] | None = None
    base_val = base_test = None
    for name in backbones:
        cls, val, test = load_predictions(run_dir / "models" / name)
        if classes is None:
            classes, base_val, base_test = cls, val, test
        elif cls != classes:
            raise ValueError(f"{name} was trained on classes {cls}, others on {classes}")
        # Align rows by image path: every run predicts the same split of the same manifest.
        test = test.set_index("path").loc[base_test["path"]].reset_index()
        val = val.set_index("path").loc[base_val["path"]].reset_index()
        models_block[name] = evaluate.evaluate_predictions(test, classes, val, n_boot=n_boot, seed=seed)
        val_probs.append(_probs(val, classes))
        test_probs.append(_probs(test, classes))
        y_t, p_t = evaluate.predictions_to_arrays(test, classes)
        figures[f"cm_{name}"] = fig_dir / f"confusion_{name}.png"
        plots.plot_confusion_matrices(np.array(models_block[name]["confusion_matrix"]), classes,
                                      figures[f"cm_{name}"], title=name)
        figures[f"roc_{name}"] = fig_dir / f"roc_{name}.png"
        plots.plot_roc_curves(y_t, p_t, classes, figures[f"roc_{name}"],
                              auc_ci=models_block[name]["ci95_auc_per_class"], title=name)
        figures[f"reliability_{name}"] = fig_dir / f"reliability_{name}.png"
        temp = models_block[name]["calibration"].get("temperature")
        plots.plot_reliability_diagram(
            y_t, p_t, figures[f"reliability_{name}"],
            probs_calibrated=evaluate.apply_temperature(p_t, temp) if temp else None, title=name)
    assert classes is not None and base_test is not None and base_val is not None

    weights = None
    if vote == "weighted":
        y_val, _ = evaluate.predictions_to_arrays(base_val, classes)
        weights = ensemble.fit_vote_weights(val_probs, y_val)
    vote_val = _with_probs(base_val, ensemble.combine(val_probs, vote, weights), classes)
    vote_test = _with_probs(base_test, ensemble.combine(test_probs, vote, weights), classes)
    ens_block = {"method": vote, "members": backbones, "weights": weights,
                 **evaluate.evaluate_predictions(vote_test, classes, vote_val, n_boot=n_boot, seed=seed)}
    if vote == "hard":
        ens_block["tie_break"] = "tied classes: highest mean probability across the models"
    vote_test.to_csv(run_dir / "predictions_test_vote.csv", index=False)
    y_v, p_v = evaluate.predictions_to_arrays(vote_test, classes)
    figures["cm_vote"] = fig_dir / "confusion_vote.png"
    plots.plot_confusion_matrices(np.array(ens_block["confusion_matrix"]), classes,
                                  figures["cm_vote"], title=f"{vote} vote")
    figures["roc_vote"] = fig_dir / "roc_vote.png"
    plots.plot_roc_curves(y_v, p_v, classes, figures["roc_vote"],
                          auc_ci=ens_block["ci95_auc_per_class"], title=f"{vote} vote")
    figures["reliability_vote"] = fig_dir / "reliability_vote.png"
    temp = ens_block["calibration"].get("temperature")
    plots.plot_reliability_diagram(
        y_v, p_v, figures["reliability_vote"],
        probs_calibrated=evaluate.apply_temperature(p_v, temp) if temp else None,
        title=f"{vote} vote")

    img_size = json.loads((run_dir / "models" / backbones[0] / "config.json").read_text())["img_size"]
    from covidlib.data import read_resized

    images = np.stack([read_resized(p, img_size) for p in vote_test["path"]]) if len(vote_test) else None
    if images is not None:
        figures["grid_vote"] = fig_dir / "test_grid_vote.png"
        plots.plot_prediction_grid(images, y_v, p_v.argmax(axis=1), classes, figures["grid_vote"],
                                   seed=seed)

    if (save_ensemble or gradcam_images) and images is not None:
        from covidlib.train import load_run, save_model_atomic

        members = {name: load_run(run_dir / "models" / name)[0] for name in backbones}
        if gradcam_images:
            from covidlib import explain

            rng = np.random.default_rng(seed)
            pick = np.sort(rng.choice(len(images), size=min(gradcam_images, len(images)),
                                      replace=False))
            x = images[pick][..., None].astype("float32")
            cls_idx = p_v[pick].argmax(axis=1)
            heat = {name: explain.grad_cam(m, x, class_index=cls_idx) for name, m in members.items()}
            heat["vote"] = explain.ensemble_grad_cam(list(members.values()), x, class_index=cls_idx)
            captions = [f"N={i} | P={config.display_name(classes[p])} | "
                        f"GT={config.display_name(classes[t])}"
                        for i, p, t in zip(pick, cls_idx, y_v[pick])]
            figures["gradcam"] = fig_dir / "gradcam.png"
            plots.plot_gradcam_grid(images[pick], heat, captions, figures["gradcam"])
        if save_ensemble:
            model = ensemble.build_ensemble_model(members, vote, weights)
            save_model_atomic(model, run_dir / "models" / "ensemble" / "model.keras")
            atomic_write_text(run_dir / "models" / "ensemble" / "labels.json", json.dumps(classes))
            atomic_write_text(run_dir / "models" / "ensemble" / "config.json",
                         json.dumps({"method": vote, "members": backbones, "weights": weights,
                                     "img_size": img_size}, indent=2))

    evaluation: dict[str, Any] = {
        "dataset": _dataset_name(run_dir),
        "classes": classes,
        "n_test": int(len(base_test)),
        "models": models_block,
        "ensemble": ens_block,
        "two_phase": _two_phase(run_dir, xray_backbone, classes, vote_test, cohort, phase1_threshold,
                                uncertainty_band, clinical_flag_rate, n_boot, seed, figures),
    }
    if external_dataset:
        evaluation["external_validation"] = external_validation(
            run_dir, external_dataset, backbones, vote=vote, weights=weights,
            patient_pattern=patient_pattern, n_boot=n_boot, seed=seed, figures=figures)
    evaluation = evaluate.to_jsonable(evaluation)
    atomic_write_text(run_dir / "evaluation.json", json.dumps(evaluation, indent=2))
    atomic_write_text(run_dir / "results.md", results_markdown(evaluation, figures, run_dir))
    return RunEvaluation(run_dir, evaluation, figures)


def external_validation(run_dir: str | os.PathLike, dataset: str | os.PathLike,
                        backbones: Sequence[str], *, vote: str = "hard",
                        weights: Sequence[float] | None = None, patient_pattern: str | None = None,
                        n_boot: int = 1000, seed: int = 0, figures: dict | None = None) -> dict:
    """Evaluate the run's CT models and their vote on every image of another data set.

    Labels go through the same alias table as training data. When the external classes are a
    subset of the trained ones, metrics are computed on the trained classes; otherwise, if both
    have ``covid``, the task becomes COVID-19 vs the rest (P(covid) against 1 - P(covid)), and
    the report says which mapping was used. The models are not retrained or recalibrated.
    """
    from covidlib import datasets, predict

    run_dir = Path(run_dir)
    ingested = datasets.ingest(dataset, modality="ct", seed=seed, patient_pattern=patient_pattern,
                               work_dir=run_dir / "external")
    ext = ingested.manifest
    preds = predict.predict_paths(list(ext["path"]),
                                  model_dirs=[run_dir / "models" / b for b in backbones],
                                  vote=vote)
    classes = list(preds.attrs["classes"])
    ok = preds[preds["error"] == ""].merge(ext[["path", "label", "patient_id"]].astype(str),
                                           on="path", how="inner")
    ext_classes = config.ordered_classes(ext["label"].unique())
    if set(ext_classes) <= set(classes):
        mapping, eval_classes = "same classes", classes
    elif config.POSITIVE_LABEL in classes and config.POSITIVE_LABEL in ext_classes:
        mapping, eval_classes = "COVID-19 vs rest (classes differ)", [config.POSITIVE_LABEL, "non_covid"]
    else:
        raise ValueError(f"external classes {ext_classes} cannot be compared with trained {classes}")

    def table(prefix: str) -> pd.DataFrame:
        probs = ok[[f"{prefix}:p_{c}" for c in classes]].to_numpy(dtype=float)
        label = ok["label"]
        if eval_classes != classes:
            pc = probs[:, classes.index(config.POSITIVE_LABEL)]
            probs = np.stack([pc, 1.0 - pc], axis=1)
            label = np.where(label == config.POSITIVE_LABEL, config.POSITIVE_LABEL, "non_covid")
        out = pd.DataFrame({"path": ok["path"], "patient_id": ok["patient_id"], "label": label})
        return _with_probs(out, probs, eval_classes)

    blocks = {name: evaluate.evaluate_predictions(table(name), eval_classes, n_boot=n_boot, seed=seed)
              for name in list(backbones) + ["vote"]}
    if figures is not None:
        y, p = evaluate.predictions_to_arrays(table("vote"), eval_classes)
        figures["external_roc_vote"] = run_dir / "figures" / "external_roc_vote.png"
        plots.plot_roc_curves(y, p, eval_classes, figures["external_roc_vote"],
                              auc_ci=blocks["vote"]["ci95_auc_per_class"], title="external: vote")
    return {"dataset": str(dataset), "n_images": int(len(ok)),
            "n_unreadable": int((preds["error"] != "").sum()) + len(ingested.quarantine),
            "classes": eval_classes, "mapping": mapping, "models": blocks,
            "warnings": ingested.warnings}


def _dataset_name(run_dir: Path) -> str:
    meta = run_dir / "dataset.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        return str(info.get("ct", info))
    return "unknown"


def _two_phase(run_dir: Path, xray_backbone: str | None, classes: list[str],
               vote_test: pd.DataFrame, cohort_path, threshold: float, band: float,
               flag_rate: float, n_boot: int, seed: int, figures: dict) -> dict:
    xdir = run_dir / "models" / f"xray_{xray_backbone}" if xray_backbone else None
    if xdir is None or not (xdir / "labels.json").is_file():
        return {"skipped": True, "reason": "no phase-1 X-ray model in this run "
                "(set XRAY_DATASET and train XRAY_BACKBONE)"}
    if config.POSITIVE_LABEL not in classes:
        return {"skipped": True, "reason": "the CT models have no 'covid' class"}
    xclasses, xval, xtest = load_predictions(xdir)
    phase1 = evaluate.evaluate_predictions(xtest, xclasses, xval, n_boot=n_boot, seed=seed)
    xray_table = cascade.patient_table(xtest, xclasses)
    ct_table = cascade.patient_table(vote_test, classes)
    ct_decision = pd.Series(
        np.array(classes)[ct_table[[f"p_{c}" for c in classes]].to_numpy().argmax(axis=1)],
        index=ct_table["patient_id"])
    if cohort_path:
        cohort = cascade.load_cohort(cohort_path)
    else:
        cohort = cascade.simulate_cohort(xray_table, ct_table, seed=seed,
                                         clinical_flag_rate=flag_rate)
    routing = cascade.Routing(threshold, band)
    routed = cascade.route(cohort, xray_table, ct_table, ct_decision, routing)
    routed.to_csv(run_dir / "two_phase_patients.csv", index=False)
    sweep = cascade.threshold_sweep(cohort, xray_table, ct_table, ct_decision, band)
    sweep.to_csv(run_dir / "two_phase_sweep.csv", index=False)
    figures["threshold_sweep"] = run_dir / "figures" / "two_phase_threshold_sweep.png"
    plots.plot_threshold_sweep(sweep, figures["threshold_sweep"], chosen=threshold)
    yx, px = evaluate.predictions_to_arrays(xtest, xclasses)
    figures["cm_xray"] = run_dir / "figures" / f"confusion_xray_{xray_backbone}.png"
    plots.plot_confusion_matrices(np.array(phase1["confusion_matrix"]), xclasses,
                                  figures["cm_xray"], title=f"phase 1: X-ray {xray_backbone}")
    figures["roc_xray"] = run_dir / "figures" / f"roc_xray_{xray_backbone}.png"
    plots.plot_roc_curves(yx, px, xclasses, figures["roc_xray"], auc_ci=phase1["ci95_auc_per_class"],
                          title=f"phase 1: X-ray {xray_backbone}")
    return {
        "phase1_model": f"xray_{xray_backbone}",
        "phase1": phase1,
        "routing": {"threshold": threshold, "uncertainty_band": band,
                    "rule": "X-ray positive -> CT; X-ray negative -> CT if clinical flag or "
                            "P(covid) in [threshold - band, threshold); otherwise stop"},
        "cohort": "simulated: X-ray and CT patients of the same COVID status paired at random"
                  if not cohort_path else str(cohort_path),
        **cascade.summarize(routed, n_boot=n_boot, seed=seed),
    }


def _data_caveats(run_dir: Path, limit: int = 4) -> list[str]:
    """The audit's first warnings per modality: what a reader must know before trusting numbers."""
    path = run_dir / "data_audit.json"
    if not path.is_file():
        return []
    audit = json.loads(path.read_text())
    per_mod = audit.get("modalities", {"all": audit})
    out = []
    for mod, rep in per_mod.items():
        warns = rep.get("warnings") or []
        out += [f"[{mod}] {w}" for w in warns[:limit]]
        if len(warns) > limit:
            out.append(f"[{mod}] ... and {len(warns) - limit} more in data_audit.json")
    return out


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ci(block: dict, key: str) -> str:
    ci = (block.get("ci95") or {}).get(key)
    return "" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def results_markdown(ev: dict, figures: dict[str, Path], run_dir: Path) -> str:
    """A readable summary of ``evaluation.json`` (figures linked relative to ``run_dir``)."""
    lines = [
        "# covidlib results", "",
        "> Research use only. Not a medical device; not for clinical decisions.", "",
        f"- data set: `{ev['dataset']}`; classes: {', '.join(map(config.display_name, ev['classes']))}; "
        f"test images: {ev['n_test']}", "",
        "## Stage 1: each backbone, and stage 2: the vote (test split)", "",
        "| model | accuracy [95% CI] | macro F1 [95% CI] | macro AUC [95% CI] | ECE | patient-level AUC |",
        "|---|---|---|---|---|---|",
    ]
    rows = list(ev["models"].items()) + [(f"**{ev['ensemble']['method']} vote**", ev["ensemble"])]
    for name, b in rows:
        lines.append(
            f"| {name} | {_fmt(b['accuracy'])}{_ci(b, 'accuracy')} | {_fmt(b['f1_macro'])}"
            f"{_ci(b, 'f1_macro')} | {_fmt(b['auc_macro'])}{_ci(b, 'auc_macro')} | "
            f"{_fmt(b['calibration']['ece'])} | {_fmt((b.get('patient_level') or {}).get('auc_macro'))} |")
    unit = ev["ensemble"].get("ci_unit", "image")
    lines += ["", f"CIs: bootstrap over {unit}s. AUC from probabilities (one-vs-rest, macro).", ""]
    tp = ev["two_phase"]
    lines += ["## Two-phase X-ray -> CT", ""]
    if tp.get("skipped"):
        lines.append(f"Skipped: {tp['reason']}.")
    else:
        lines += [
            f"- cohort: {tp['cohort']} ({tp['n_patients']} patients, {tp['n_positive']} COVID-19)",
            f"- routing: {tp['routing']['rule']} (threshold {tp['routing']['threshold']}, "
            f"band {tp['routing']['uncertainty_band']})",
            f"- cascade sensitivity {_fmt(tp['sensitivity'])}{_ci(tp, 'sensitivity')}, "
            f"specificity {_fmt(tp['specificity'])}{_ci(tp, 'specificity')}",
            f"- sent to CT: {tp['ct_fraction']:.1%}; positives missed by phase 1: "
            f"{tp['phase1_missed_positives']} (rescued by CT: {tp['phase1_missed_rescued_by_ct']})",
            f"- X-ray alone: sensitivity {_fmt(tp['xray_only']['sensitivity'])}, specificity "
            f"{_fmt(tp['xray_only']['specificity'])}; CT for all: sensitivity "
            f"{_fmt(tp['ct_for_all']['sensitivity'])}, specificity {_fmt(tp['ct_for_all']['specificity'])}",
        ]
    caveats = _data_caveats(run_dir)
    if caveats:
        lines += ["", "## Data caveats (from data_audit.json)", ""] + [f"- {c}" for c in caveats]
    ext = ev.get("external_validation")
    if ext:
        lines += ["", "## External validation", "",
                  f"Trained models evaluated, unchanged, on `{ext['dataset']}` ({ext['n_images']} "
                  f"images; mapping: {ext['mapping']}).", "",
                  "| model | accuracy [95% CI] | macro AUC [95% CI] |", "|---|---|---|"]
        for name, b in ext["models"].items():
            lines.append(f"| {name} | {_fmt(b['accuracy'])}{_ci(b, 'accuracy')} | "
                         f"{_fmt(b['auc_macro'])}{_ci(b, 'auc_macro')} |")
    lines += ["", "## Figures", ""]
    for key, path in figures.items():
        rel = os.path.relpath(path, run_dir)
        lines.append(f"![{key}]({rel})")
    return "\n".join(lines) + "\n"
