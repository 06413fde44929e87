"""Notebook 04 / ``covidlib evaluate``: metrics per model, the vote, the two-phase cascade, figures.

Reads the saved predictions of each trained run (never re-runs a model for metrics), writes
``RUN_DIR/evaluation.json``, ``RUN_DIR/results.md``, ``RUN_DIR/predictions_test_vote.csv`` and
``RUN_DIR/figures/*.png``.

What is a probability (see :mod:`covidlib.ensemble`): every backbone's ``p_<class>`` (softmax,
uncalibrated) and the soft / weighted vote's ``p_<class>`` get ECE, a reliability diagram and a
temperature fitted on validation; the hard vote's ``score_<class>`` is a ranking score: its block
says ``"output": "score"`` and ``"calibration": {"applicable": false, "reason": ...}``, it gets
no reliability diagram, and results.md shows its ECE as ``n/a (score)``. Every metrics block says
``"output"`` and ``"calibrated": false`` (metrics of the raw outputs).
``predictions_test_vote.csv``: ``path, patient_id, label``, ``p_<class>`` (soft / weighted) or
``score_<class>`` (hard), ``votes`` (members whose top class is the vote's), ``agreement``
(``votes`` / members).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from covidlib import cascade, config, ensemble, evaluate, plots
from covidlib.fsutil import atomic_write_text
from covidlib.runner import NOTEBOOK_DEFAULT, fill_defaults


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


def _with_outputs(df: pd.DataFrame, values: np.ndarray, classes: list[str],
                  prefix: str = "p_") -> pd.DataFrame:
    """``path, patient_id, label`` of ``df`` and ``<prefix><class>`` columns holding ``values``."""
    out = df[["path", "patient_id", "label"]].copy()
    for j, c in enumerate(classes):
        out[f"{prefix}{c}"] = values[:, j]
    return out


def _vote_table(base: pd.DataFrame, member_probs: list[np.ndarray], method: str,
                weights: Sequence[float] | None, classes: list[str]) -> pd.DataFrame:
    """The vote per image: ``p_<class>`` (soft / weighted) or ``score_<class>`` (hard), ``votes``
    (members whose top class is the vote's) and ``agreement`` (``votes`` / members)."""
    combined = ensemble.combine(member_probs, method, weights)
    out = _with_outputs(base, combined, classes,
                        ensemble.OUTPUT_PREFIX[ensemble.output_kind(method)])
    votes = ensemble.member_votes(member_probs, combined.argmax(axis=1))
    out["votes"] = votes
    out["agreement"] = votes / len(member_probs)
    return out


@dataclass
class _Members:
    """The CT backbones' aligned predictions (rows in the first backbone's order) and metrics."""

    classes: list[str]
    base_val: pd.DataFrame
    base_test: pd.DataFrame
    val_probs: list[np.ndarray]
    test_probs: list[np.ndarray]
    blocks: dict[str, Any]


def _output_figures(fig_dir: Path, key: str, title: str, y: np.ndarray, values: np.ndarray,
                    classes: list[str], block: dict, figures: dict[str, Path]) -> None:
    """Confusion matrix and ROC of one output."""
    figures[f"cm_{key}"] = fig_dir / f"confusion_{key}.png"
    plots.plot_confusion_matrices(np.array(block["confusion_matrix"]), classes, figures[f"cm_{key}"],
                                  title=title)
    figures[f"roc_{key}"] = fig_dir / f"roc_{key}.png"
    plots.plot_roc_curves(y, values, classes, figures[f"roc_{key}"],
                          auc_ci=block["ci95_auc_per_class"], title=title)


def _reliability_figure(fig_dir: Path, key: str, title: str, y: np.ndarray, values: np.ndarray,
                        block: dict, figures: dict[str, Path]) -> None:
    """The reliability diagram of one output, only if it is a probability."""
    rel = fig_dir / f"reliability_{key}.png"
    cal = block["calibration"]
    if not cal.get("applicable", True):
        # A diagram left by an earlier soft-vote evaluation would be read as this output's.
        rel.unlink(missing_ok=True)
        return
    figures[f"reliability_{key}"] = rel
    temp = cal.get("temperature")
    plots.plot_reliability_diagram(
        y, values, rel, probs_calibrated=evaluate.apply_temperature(values, temp) if temp else None,
        title=title)


def load_members(run_dir: str | os.PathLike, backbones: Sequence[str]) -> _Members:
    """The CT backbones' saved val / test predictions, rows aligned by image path."""
    val_probs, test_probs = [], []
    classes: list[str] | None = None
    base_val = base_test = None
    for name in backbones:
        cls, val, test = load_predictions(Path(run_dir) / "models" / name)
        if classes is None:
            classes, base_val, base_test = cls, val, test
        elif cls != classes:
            raise ValueError(f"{name} was trained on classes {cls}, others on {classes}")
        # Every run predicts the same split of the same manifest, possibly in another order.
        test = test.set_index("path").loc[base_test["path"]].reset_index()
        val = val.set_index("path").loc[base_val["path"]].reset_index()
        val_probs.append(_probs(val, classes))
        test_probs.append(_probs(test, classes))
    if classes is None:
        raise ValueError("BACKBONES is empty: nothing to evaluate")
    return _Members(classes, base_val, base_test, val_probs, test_probs, {})


def metrics_table(blocks: dict[str, dict]) -> pd.DataFrame:
    """One row per output: accuracy, macro F1 and macro AUC with 95% CIs, ECE, output kind."""
    rows = []
    for name, b in blocks.items():
        ci = b.get("ci95") or {}
        cal = b.get("calibration") or {}
        rows.append({"model": name, "output": b.get("output", "probability"),
                     **{k: b.get(k) for k in ("accuracy", "f1_macro", "auc_macro")},
                     **{f"{k}_ci95": ci.get(k) for k in ("accuracy", "auc_macro")},
                     "ece": cal.get("ece") if cal.get("applicable", True) else None})
    return pd.DataFrame(rows)


@dataclass
class RunReport:
    """Notebook 04, step by step: each method is one cell and adds to ``evaluation`` / ``figures``.

    Order: :meth:`member_metrics` -> :meth:`vote` -> :meth:`two_phase` -> :meth:`calibration`
    -> :meth:`figures_and_grid` -> :meth:`gradcam` -> (:meth:`external`) -> :meth:`write`.
    :func:`evaluate_run` runs them all (``covidlib evaluate``).
    """

    run_dir: Path
    backbones: list[str]
    vote_method: str = "hard"
    n_boot: int = 1000
    seed: int = 0
    evaluation: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.backbones = list(self.backbones)
        if self.vote_method not in ensemble.METHODS:
            raise ValueError(f"VOTE must be one of {list(ensemble.METHODS)}, got {self.vote_method!r}")
        self.members = load_members(self.run_dir, self.backbones)
        self.classes = self.members.classes
        self.weights: list[float] | None = None
        self.vote_test: pd.DataFrame | None = None
        self.evaluation.update({"dataset": _dataset_name(self.run_dir), "classes": self.classes,
                                "n_test": int(len(self.members.base_test))})

    @property
    def fig_dir(self) -> Path:
        return self.run_dir / "figures"

    def member_metrics(self) -> pd.DataFrame:
        """Each backbone on the test split (uncalibrated softmax probabilities, patient CIs)."""
        m = self.members
        for name, val_p, test_p in zip(self.backbones, m.val_probs, m.test_probs):
            m.blocks[name] = evaluate.evaluate_predictions(
                _with_outputs(m.base_test, test_p, self.classes), self.classes,
                _with_outputs(m.base_val, val_p, self.classes), n_boot=self.n_boot, seed=self.seed)
        self.evaluation["models"] = m.blocks
        return metrics_table(m.blocks)

    def vote(self) -> pd.DataFrame:
        """Stage 2: the vote's block and ``predictions_test_vote.csv`` (weights fitted on val)."""
        m = self.members
        if self.vote_method == "weighted":
            y_val, _ = evaluate.predictions_to_arrays(m.base_val, self.classes)
            self.weights = ensemble.fit_vote_weights(m.val_probs, y_val)
        self.evaluation["ensemble"], self.vote_test = _evaluate_vote(
            self.run_dir, m, self.backbones, self.vote_method, self.weights, self.n_boot, self.seed)
        return metrics_table({f"{self.vote_method} vote": self.evaluation["ensemble"]})

    def tta(self, n_views: int = 4) -> pd.DataFrame:
        """Optional: members and vote again with test-time augmentation, next to the plain ones.

        Re-runs the saved models on val / test (:func:`covidlib.evaluate.evaluate_tta`); the
        block goes to ``evaluation["tta"]``. Columns as :func:`metrics_table`, plus the mean
        spread ``tta_sd_mean`` and ``auc_diff_vs_plain`` (TTA minus plain macro AUC, paired
        bootstrap CI in ``auc_diff_ci95``).
        """
        ev = evaluate.evaluate_tta(self.run_dir, self.backbones, n_views, vote=self.vote_method,
                                   n_boot=self.n_boot, seed=self.seed)
        self.evaluation["tta"] = ev
        blocks = {f"{name} (TTA)": b for name, b in ev["models"].items()}
        if ev["ensemble"] is not None:
            blocks[f"{self.vote_method} vote (TTA)"] = ev["ensemble"]
        table = metrics_table(blocks)
        diffs = [(b.get("vs_plain") or {}).get("auc_macro") or {} for b in blocks.values()]
        table["tta_sd_mean"] = [b.get("tta_sd_mean") for b in blocks.values()]
        table["auc_diff_vs_plain"] = [d.get("diff") for d in diffs]
        table["auc_diff_ci95"] = [d.get("diff_ci") for d in diffs]
        return table

    def two_phase(self, xray_backbone: str | None, *, cohort: str | os.PathLike | None = None,
                  threshold: float = 0.5, band: float = 0.15, flag_rate: float = 0.1) -> dict:
        """Phase 1 (X-ray) routes patients to phase 2 (the CT vote); see :mod:`covidlib.cascade`."""
        self.evaluation["two_phase"] = _two_phase(
            self.run_dir, xray_backbone, self.classes, self._need_vote(), self.vote_method, cohort,
            threshold, band, flag_rate, self.n_boot, self.seed, self.figures)
        return self.evaluation["two_phase"]

    def calibration(self) -> pd.DataFrame:
        """ECE before / after temperature scaling and reliability diagrams, probabilities only."""
        rows = []
        for key, (title, y, values, block) in self._outputs().items():
            _reliability_figure(self.fig_dir, key, title, y, values, block, self.figures)
            cal = block["calibration"]
            rows.append({"model": key, "output": block.get("output", "probability"),
                         "ece": cal.get("ece"), "temperature": cal.get("temperature"),
                         "ece_after_temperature": cal.get("ece_after_temperature"),
                         "note": cal.get("reason") or cal.get("note")})
        return pd.DataFrame(rows)

    def figures_and_grid(self) -> dict[str, Path]:
        """Confusion matrices and ROC curves of every output, and the vote's 5x5 test grid."""
        for key, (title, y, values, block) in self._outputs().items():
            _output_figures(self.fig_dir, key, title, y, values, self.classes, block, self.figures)
        images = self._test_images
        if images is not None:
            _, y, values, _ = self._outputs()["vote"]
            self.figures["grid_vote"] = self.fig_dir / "test_grid_vote.png"
            plots.plot_prediction_grid(images, y, values.argmax(axis=1), self.classes,
                                       self.figures["grid_vote"], seed=self.seed)
        return self.figures

    def gradcam(self, n_images: int = 4) -> Path | None:
        """Grad-CAM of every member and of the vote on ``n_images`` test images (the figure), and
        how much of it lies in the lung field on up to 64 of them (``gradcam_lung_share``)."""
        images = self._test_images
        if not n_images or images is None:
            return None
        _, y, values, _ = self._outputs()["vote"]
        predicted = values.argmax(axis=1)
        self.figures["gradcam"] = self.fig_dir / "gradcam.png"
        pick = _pick(len(images), n_images, self.seed)
        heat = _heatmaps(self._member_models, images[pick], predicted[pick])
        captions = [f"N={i} | P={config.display_name(self.classes[p])} | "
                    f"GT={config.display_name(self.classes[t])}"
                    for i, p, t in zip(pick, predicted[pick], y[pick])]
        plots.plot_gradcam_grid(images[pick], heat, captions, self.figures["gradcam"])
        self.evaluation["gradcam_lung_share"] = _lung_shares(self._member_models, images, predicted,
                                                             self.seed)
        return self.figures["gradcam"]

    def external(self, dataset: str | os.PathLike, patient_pattern: str | None = None) -> dict:
        """The trained models and their vote, unchanged, on another data set."""
        self.evaluation["external_validation"] = external_validation(
            self.run_dir, dataset, self.backbones, vote=self.vote_method, weights=self.weights,
            patient_pattern=patient_pattern, n_boot=self.n_boot, seed=self.seed, figures=self.figures)
        return self.evaluation["external_validation"]

    def write(self, save_ensemble: bool = True) -> RunEvaluation:
        """``evaluation.json``, ``results.md`` and (optionally) the vote as one Keras model."""
        if save_ensemble and len(self.members.base_test):
            _save_ensemble(self.run_dir, self._member_models, self.vote_method, self.weights,
                           self.classes, self._img_size)
        self.evaluation.setdefault("two_phase", {"skipped": True, "reason": "not evaluated"})
        evaluation = evaluate.to_jsonable(self.evaluation)
        atomic_write_text(self.run_dir / "evaluation.json", json.dumps(evaluation, indent=2))
        atomic_write_text(self.run_dir / "results.md",
                          results_markdown(evaluation, self.figures, self.run_dir))
        return RunEvaluation(self.run_dir, evaluation, self.figures)

    # -- shared pieces ---------------------------------------------------------------------------
    def _need_vote(self) -> pd.DataFrame:
        if self.vote_test is None:
            raise RuntimeError("run the vote step first (RunReport.vote)")
        return self.vote_test

    def _outputs(self) -> dict[str, tuple[str, np.ndarray, np.ndarray, dict]]:
        """Per output key: (title, y_test, values, metrics block); members then the vote."""
        y, _ = evaluate.predictions_to_arrays(self.members.base_test, self.classes)
        out = {name: (name, y, p, self.members.blocks[name])
               for name, p in zip(self.backbones, self.members.test_probs)}
        kind = ensemble.output_kind(self.vote_method)
        values = self._need_vote()[[f"{ensemble.OUTPUT_PREFIX[kind]}{c}" for c in self.classes]]
        title = f"{self.vote_method} vote" + (" (ranking score)" if kind == "score" else "")
        out["vote"] = (title, y, values.to_numpy(dtype=float), self.evaluation["ensemble"])
        return out

    @functools.cached_property
    def _img_size(self) -> int:
        """The input size the CT backbones were trained at (the first one's ``config.json``)."""
        cfg = self.run_dir / "models" / self.backbones[0] / "config.json"
        return int(json.loads(cfg.read_text())["img_size"])

    @functools.cached_property
    def _test_images(self) -> np.ndarray | None:
        """The test images as the models see them (read once, for the grid and Grad-CAM)."""
        if not len(self.members.base_test):
            return None
        from covidlib.arraystore import read_resized

        return np.stack([read_resized(p, self._img_size) for p in self.members.base_test["path"]])

    @functools.cached_property
    def _member_models(self) -> dict[str, Any]:
        """The CT backbones' Keras models (loaded once, for Grad-CAM and the saved ensemble)."""
        from covidlib.train import load_run

        return {name: load_run(self.run_dir / "models" / name)[0] for name in self.backbones}


def _evaluate_vote(run_dir: Path, members: _Members, names: list[str], method: str,
                   weights: list[float] | None, n_boot: int, seed: int) -> tuple[dict, pd.DataFrame]:
    """The vote's metrics block and ``predictions_test_vote.csv``; a score for the hard vote."""
    classes = members.classes
    kind = ensemble.output_kind(method)
    vote_val = _vote_table(members.base_val, members.val_probs, method, weights, classes)
    vote_test = _vote_table(members.base_test, members.test_probs, method, weights, classes)
    n_members = len(members.test_probs)
    block = {"method": method, "members": names, "weights": weights,
             **evaluate.evaluate_predictions(vote_test, classes, vote_val, n_boot=n_boot, seed=seed,
                                             output=kind),
             "definition": (ensemble.SCORE_DEFINITION if kind == "score"
                            else ensemble.PROBABILITY_DEFINITION),
             "agreement": {
                 "mean": float(vote_test["agreement"].mean()) if len(vote_test) else None,
                 "unanimous": float((vote_test["votes"] == n_members).mean()) if len(vote_test) else None,
                 "note": "votes: members whose own top class is the vote's; agreement: votes / members"}}
    if method == "hard":
        block["tie_break"] = "tied classes: highest mean probability across the models"
    atomic_write_text(run_dir / "predictions_test_vote.csv", vote_test.to_csv(index=False))
    return block, vote_test


def _save_ensemble(run_dir: Path, models: dict[str, Any], method: str,
                   weights: list[float] | None, classes: list[str], img_size: int) -> None:
    """``models/ensemble/``: the vote as one Keras model, and what its output is."""
    from covidlib.train import save_model_atomic

    ens_dir = run_dir / "models" / "ensemble"
    kind = ensemble.output_kind(method)
    model = ensemble.build_ensemble_model(models, method, weights)
    save_model_atomic(model, ens_dir / "model.keras")
    atomic_write_text(ens_dir / "labels.json", json.dumps(classes))
    atomic_write_text(ens_dir / "config.json", json.dumps(
        {"method": method, "members": list(models), "weights": weights, "img_size": img_size,
         "output": kind, "calibrated": False,
         "output_definition": (ensemble.SCORE_DEFINITION if kind == "score"
                               else ensemble.PROBABILITY_DEFINITION)}, indent=2))


# Test images whose Grad-CAMs are measured against the lung field: enough for a stable mean,
# few enough to keep notebook 04 short on a CPU.
_LUNG_SHARE_IMAGES = 64


def _pick(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` of ``n`` indices drawn with ``seed``, sorted (all of them when ``k >= n``)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))


def _lung_shares(models: dict[str, Any], images: np.ndarray, predicted: np.ndarray, seed: int) -> dict:
    """``explain.lung_share`` of every member and of the vote on up to _LUNG_SHARE_IMAGES images."""
    from covidlib import explain

    pick = _pick(len(images), _LUNG_SHARE_IMAGES, seed)
    heat = _heatmaps(models, images[pick], predicted[pick])
    grids = {name: explain.cam_grid(m) for name, m in models.items()}
    # The vote averages its members' upsampled maps: as coarse as the coarsest of them.
    grids["vote"] = min(grids.values(), key=lambda g: g[0] * g[1])
    return {name: explain.lung_share(images[pick], h, grids[name]) for name, h in heat.items()}


def _heatmaps(models: dict[str, Any], images: np.ndarray, cls_idx: np.ndarray) -> dict[str, np.ndarray]:
    """Grad-CAM of every member and of the vote for the vote's class of each image."""
    from covidlib import explain

    x = images[..., None].astype("float32")
    heat = {name: explain.grad_cam(m, x, class_index=cls_idx) for name, m in models.items()}
    heat["vote"] = explain.ensemble_grad_cam(list(models.values()), x, class_index=cls_idx)
    return heat


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    backbones: Sequence[str],
    xray_backbone: str | None,
    vote: str = NOTEBOOK_DEFAULT,
    cohort: str | os.PathLike | None = NOTEBOOK_DEFAULT,
    phase1_threshold: float = NOTEBOOK_DEFAULT,
    uncertainty_band: float = NOTEBOOK_DEFAULT,
    clinical_flag_rate: float = NOTEBOOK_DEFAULT,
    n_boot: int = NOTEBOOK_DEFAULT,
    seed: int = NOTEBOOK_DEFAULT,
    gradcam_images: int = NOTEBOOK_DEFAULT,
    save_ensemble: bool = True,
    external_dataset: str | os.PathLike | None = NOTEBOOK_DEFAULT,
    patient_pattern: str | None = NOTEBOOK_DEFAULT,
) -> RunEvaluation:
    """Every step of :class:`RunReport` in order (``covidlib evaluate``; notebook 04 runs them
    one cell each).

    ``backbones`` and ``xray_backbone`` are required; every other keyword left out takes notebook
    04's parameter value (``n_boot`` -> ``N_BOOT``, ``patient_pattern`` ->
    ``EXTERNAL_PATIENT_PATTERN``), so the library, the CLI and the notebook cannot disagree.

    Args:
        run_dir: the run folder (``models/<NAME>/`` inside).
        backbones: the CT runs that vote (names under ``models/``).
        xray_backbone: phase-1 model (run ``xray_<name>``); ``None`` or missing skips phase 2.
        vote: ``"hard"`` | ``"soft"`` | ``"weighted"`` (weights fitted on validation). The hard
            vote's output is a ranking score (AUC, no calibration); see :mod:`covidlib.ensemble`.
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
    kw = fill_defaults("evaluate", dict(
        vote=vote, cohort=cohort, phase1_threshold=phase1_threshold,
        uncertainty_band=uncertainty_band, clinical_flag_rate=clinical_flag_rate, n_boot=n_boot,
        seed=seed, gradcam_images=gradcam_images, external_dataset=external_dataset,
        patient_pattern=patient_pattern), {"patient_pattern": "EXTERNAL_PATIENT_PATTERN"})
    rep = RunReport(Path(run_dir), list(backbones), kw["vote"], kw["n_boot"], kw["seed"])
    rep.member_metrics()
    rep.vote()
    rep.two_phase(xray_backbone, cohort=kw["cohort"], threshold=kw["phase1_threshold"],
                  band=kw["uncertainty_band"], flag_rate=kw["clinical_flag_rate"])
    rep.calibration()
    rep.figures_and_grid()
    rep.gradcam(kw["gradcam_images"])
    if kw["external_dataset"]:
        rep.external(kw["external_dataset"], kw["patient_pattern"])
    return rep.write(save_ensemble=save_ensemble)


def external_validation(run_dir: str | os.PathLike, dataset: str | os.PathLike,
                        backbones: Sequence[str], *, vote: str = "hard",
                        weights: Sequence[float] | None = None, patient_pattern: str | None = None,
                        n_boot: int = 1000, seed: int = 0, figures: dict | None = None) -> dict:
    """Evaluate the run's CT models and their vote on every image of another data set.

    Labels go through the same alias table as training data. When the external classes are a
    subset of the trained ones, metrics are computed on the trained classes; otherwise, if both
    have ``covid``, the task becomes COVID-19 vs the rest (P(covid) against 1 - P(covid); for
    the hard vote its covid score against 1 - that score, still only a ranking), and the report
    says which mapping was used. The models are not retrained or recalibrated. The vote is
    combined here from the members' probabilities with ``weights`` (those fitted on the run's
    validation split for ``"weighted"``), exactly as in :func:`evaluate_run`.
    """
    from covidlib import datasets, predict

    run_dir = Path(run_dir)
    kind = ensemble.output_kind(vote)
    ingested = datasets.ingest(dataset, modality="ct", seed=seed, patient_pattern=patient_pattern,
                               work_dir=run_dir / "external")
    ext = ingested.manifest
    # predict's own vote column is not used (it could not know this evaluation's weights).
    preds = predict.predict_paths(list(ext["path"]),
                                  model_dirs=[run_dir / "models" / b for b in backbones],
                                  vote="soft")
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

    outputs = {b: ok[[f"{b}:p_{c}" for c in classes]].to_numpy(dtype=float) for b in backbones}
    outputs["vote"] = ensemble.combine(list(outputs.values()), vote, weights)

    def table(name: str, prefix: str) -> pd.DataFrame:
        values, label = outputs[name], ok["label"]
        if eval_classes != classes:
            pc = values[:, classes.index(config.POSITIVE_LABEL)]
            values = np.stack([pc, 1.0 - pc], axis=1)
            label = np.where(label == config.POSITIVE_LABEL, config.POSITIVE_LABEL, "non_covid")
        out = pd.DataFrame({"path": ok["path"], "patient_id": ok["patient_id"], "label": label})
        return _with_outputs(out, values, eval_classes, prefix)

    blocks = {name: evaluate.evaluate_predictions(table(name, "p_"), eval_classes, n_boot=n_boot,
                                                  seed=seed) for name in backbones}
    vote_table = table("vote", ensemble.OUTPUT_PREFIX[kind])
    blocks["vote"] = {"method": vote, **evaluate.evaluate_predictions(
        vote_table, eval_classes, n_boot=n_boot, seed=seed, output=kind)}
    if figures is not None:
        y = vote_table["label"].map({c: i for i, c in enumerate(eval_classes)}).to_numpy()
        values = vote_table[[f"{ensemble.OUTPUT_PREFIX[kind]}{c}" for c in eval_classes]].to_numpy()
        figures["external_roc_vote"] = run_dir / "figures" / "external_roc_vote.png"
        plots.plot_roc_curves(y, values, eval_classes, figures["external_roc_vote"],
                              auc_ci=blocks["vote"]["ci95_auc_per_class"],
                              title=f"external: {vote} vote")
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


def _patient_decision(vote_test: pd.DataFrame, classes: list[str], method: str) -> pd.Series:
    """The CT vote's class per patient: arg-max of the mean of its images' vote output."""
    cols = [f"{ensemble.OUTPUT_PREFIX[ensemble.output_kind(method)]}{c}" for c in classes]
    mean = vote_test.assign(patient_id=vote_test["patient_id"].astype(str)).groupby("patient_id")[cols].mean()
    return pd.Series(np.array(classes)[mean.to_numpy().argmax(axis=1)], index=mean.index)


def _two_phase(run_dir: Path, xray_backbone: str | None, classes: list[str],
               vote_test: pd.DataFrame, vote: str, cohort_path, threshold: float, band: float,
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
    # The cascade needs only each CT patient's label from this table; the CT decision is the
    # vote's, from its own output columns (a hard vote's are scores, not p_ probabilities).
    ct_table = cascade.patient_table(vote_test, [])
    ct_decision = _patient_decision(vote_test, classes, vote)
    if cohort_path:
        cohort = cascade.load_cohort(cohort_path)
    else:
        cohort = cascade.simulate_cohort(xray_table, ct_table, seed=seed,
                                         clinical_flag_rate=flag_rate)
    routing = cascade.Routing(threshold, band)
    routed = cascade.route(cohort, xray_table, ct_table, ct_decision, routing)
    atomic_write_text(run_dir / "two_phase_patients.csv", routed.to_csv(index=False))
    sweep = cascade.threshold_sweep(cohort, xray_table, ct_table, ct_decision, band)
    atomic_write_text(run_dir / "two_phase_sweep.csv", sweep.to_csv(index=False))
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
        "ct_decision": f"{vote} vote: arg-max of the patient's mean vote {ensemble.output_kind(vote)} "
                       "over its CT images",
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


def _ece(block: dict) -> str:
    """The ECE cell: the uncalibrated probabilities' ECE, or why there is none (a score)."""
    cal = block.get("calibration") or {}
    if cal.get("applicable") is False:
        return "n/a (score)"
    return _fmt(cal.get("ece"))


def _output_note(ens: dict) -> list[str]:
    """Which columns are probabilities, which are scores, and that none is calibrated."""
    lines = ["- outputs: each backbone's `p_<class>` is its softmax probability, uncalibrated; ECE "
             "is theirs before temperature scaling (`calibration.ece_after_temperature` in "
             "evaluation.json: after a temperature fitted on validation). No metric here uses a "
             "temperature-scaled output."]
    if ens.get("calibration", {}).get("applicable") is False:
        lines.append(f"- the {ens['method']} vote outputs a **ranking score**, not a probability "
                     "(`score_<class>` = (votes + mean probability) / (members + 1)): its AUC ranks "
                     "images by it; ECE, reliability diagram and temperature do not apply. Its "
                     "`votes` / `agreement` say how many members voted for its class.")
    else:
        lines.append(f"- the {ens['method']} vote outputs a probability (`p_<class>`, mean of the "
                     "members' probabilities), uncalibrated like theirs.")
    return lines


def _two_phase_lines(tp: dict) -> list[str]:
    lines = ["## Two-phase X-ray -> CT", ""]
    if tp.get("skipped"):
        return lines + [f"Skipped: {tp['reason']}."]
    return lines + [
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


def _lung_share_lines(shares: dict | None) -> list[str]:
    if not shares:
        return []
    lines = ["", "## Where the Grad-CAMs look", "",
             "Share of each Grad-CAM's sum inside the lung field (classical mask, "
             "`covidlib.lungs.find_lungs`), mean over the test images where a lung field was found; "
             "a heatmap spread evenly over the image would score the lung area, and the lung field "
             "itself, as coarse as the model's last feature map, the ceiling. Where the ceiling is "
             "close to the lung area, the heatmaps are too coarse to say where the model looks.", "",
             "| model | Grad-CAM in the lungs | lung area | ceiling | images (with a lung field / drawn) |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {_fmt(b['cam_in_lungs'])} | {_fmt(b['lung_area'])} | {_fmt(b['ceiling'])} | "
              f"{b['n_lung_field']} / {b['n_images']} |" for name, b in shares.items()]
    return lines


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
    ens = ev["ensemble"]
    rows = list(ev["models"].items()) + [(f"**{ens['method']} vote**", ens)]
    for name, b in rows:
        lines.append(
            f"| {name} | {_fmt(b['accuracy'])}{_ci(b, 'accuracy')} | {_fmt(b['f1_macro'])}"
            f"{_ci(b, 'f1_macro')} | {_fmt(b['auc_macro'])}{_ci(b, 'auc_macro')} | "
            f"{_ece(b)} | {_fmt((b.get('patient_level') or {}).get('auc_macro'))} |")
    unit = ens.get("ci_unit", "image")
    auc_from = ("probabilities; the hard vote's from its ranking score"
                if (ens.get("calibration") or {}).get("applicable") is False else "probabilities")
    lines += ["", f"CIs: bootstrap over {unit}s. AUC from {auc_from} (one-vs-rest, macro).", ""]
    lines += _output_note(ens) + [""]
    lines += _two_phase_lines(ev["two_phase"])
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
            shown = f"{name} ({b['output']})" if b.get("output") == "score" else name
            lines.append(f"| {shown} | {_fmt(b['accuracy'])}{_ci(b, 'accuracy')} | "
                         f"{_fmt(b['auc_macro'])}{_ci(b, 'auc_macro')} |")
    lines += _lung_share_lines(ev.get("gradcam_lung_share"))
    lines += ["", "## Figures", ""]
    for key, path in figures.items():
        rel = os.path.relpath(path, run_dir)
        lines.append(f"![{key}]({rel})")
    return "\n".join(lines) + "\n"
