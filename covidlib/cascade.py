"""Phase 1 -> phase 2: the two-phase X-ray -> CT routing of the Omicron/Delta framework.

The seed drew this as a diagram and never coded it. Routing per patient:

* X-ray positive (P(covid) >= ``threshold``) -> CT;
* X-ray negative -> CT only when the clinical flag is set (a column of the cohort file) or the
  X-ray probability falls in the uncertainty band ``[threshold - band, threshold)``;
* otherwise stop: the patient is reported negative without a CT.

The CT decision is the CT ensemble's diagnosis (positive when its predicted class is ``covid``).
Patient-level probabilities come from slice/image predictions by mean aggregation.

When no paired X-ray + CT data exists, :func:`simulate_cohort` pairs X-ray and CT patients of the
same class. Results on such a cohort are a **simulation** and are labelled so everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidlib import config, evaluate


@dataclass(frozen=True)
class Routing:
    """Phase-1 routing parameters."""

    threshold: float = 0.5
    band: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 or not 0.0 <= self.band <= 1.0:
            raise ValueError("threshold and band must lie in [0, 1]")


def patient_table(pred_df: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Mean class probabilities per patient: ``patient_id, label, p_<class>...``.

    Raises:
        ValueError: a patient's images disagree on the label, or columns are missing.
    """
    cols = [f"p_{c}" for c in classes]
    missing = {"patient_id", "label", *cols} - set(pred_df.columns)
    if missing:
        raise ValueError(f"predictions lack columns {sorted(missing)}")
    df = pred_df.assign(patient_id=pred_df["patient_id"].astype(str))
    n_labels = df.groupby("patient_id")["label"].nunique()
    if (n_labels > 1).any():
        bad = n_labels[n_labels > 1].index[:5].tolist()
        raise ValueError(f"patients with images of different labels: {bad}")
    out = df.groupby("patient_id").agg(label=("label", "first"), **{c: (c, "mean") for c in cols})
    return out.reset_index()


def covid_probability(table: pd.DataFrame) -> np.ndarray:
    """P(covid) per row of a patient table (the positive class of both phases)."""
    col = f"p_{config.POSITIVE_LABEL}"
    if col not in table:
        raise ValueError(f"no {col} column: the model has no '{config.POSITIVE_LABEL}' class")
    return table[col].to_numpy(dtype=float)


def load_cohort(path: str | Path) -> pd.DataFrame:
    """Read a cohort CSV pairing each patient's X-ray and CT by ``patient_id``.

    Columns: ``patient_id`` (the same id in the X-ray and CT manifests) and optionally
    ``clinical_flag`` (1/true = clinician asks for a CT whatever the X-ray says); or
    ``xray_patient_id, ct_patient_id`` when the two manifests use different ids.
    """
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "patient_id" in df:
        df["xray_patient_id"] = df.get("xray_patient_id", df["patient_id"])
        df["ct_patient_id"] = df.get("ct_patient_id", df["patient_id"])
    if not {"xray_patient_id", "ct_patient_id"} <= set(df.columns):
        raise ValueError(f"{path}: a cohort needs patient_id (or xray_patient_id + ct_patient_id)")
    flag = df.get("clinical_flag", pd.Series(["0"] * len(df)))
    df["clinical_flag"] = flag.astype(str).str.strip().str.lower().isin(["1", "true", "yes", "y"])
    df["cohort_id"] = df.get("patient_id", df["xray_patient_id"])
    df["simulated"] = False
    return df[["cohort_id", "xray_patient_id", "ct_patient_id", "clinical_flag", "simulated"]]


def simulate_cohort(xray_patients: pd.DataFrame, ct_patients: pd.DataFrame, *, seed: int = 0,
                    clinical_flag_rate: float = 0.1) -> pd.DataFrame:
    """Pair X-ray and CT patients of the same COVID status into a SIMULATED cohort.

    Each X-ray patient is matched, without replacement, to a CT patient with the same truth
    (covid with covid; non-covid X-ray with a CT patient whose label is not covid). The cohort
    has as many patients per status as the smaller side offers. A seeded ``clinical_flag_rate``
    share of patients gets the clinical flag.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for positive in (True, False):
        xr = xray_patients[(xray_patients["label"] == config.POSITIVE_LABEL) == positive]
        ct = ct_patients[(ct_patients["label"] == config.POSITIVE_LABEL) == positive]
        n = min(len(xr), len(ct))
        xr_ids = rng.permutation(xr["patient_id"].astype(str).to_numpy())[:n]
        ct_ids = rng.permutation(ct["patient_id"].astype(str).to_numpy())[:n]
        rows += [{"cohort_id": f"sim{'P' if positive else 'N'}{i:04d}", "xray_patient_id": a,
                  "ct_patient_id": b} for i, (a, b) in enumerate(zip(xr_ids, ct_ids))]
    cohort = pd.DataFrame(rows, columns=["cohort_id", "xray_patient_id", "ct_patient_id"])
    cohort["clinical_flag"] = rng.random(len(cohort)) < clinical_flag_rate
    cohort["simulated"] = True
    if cohort.empty:
        raise ValueError("no X-ray and CT patients of the same status to pair")
    return cohort


def route(cohort: pd.DataFrame, xray_table: pd.DataFrame, ct_table: pd.DataFrame,
          ct_decision: pd.Series, routing: Routing = Routing()) -> pd.DataFrame:
    """Apply the two-phase routing to every cohort patient.

    Args:
        cohort: from :func:`load_cohort` or :func:`simulate_cohort`.
        xray_table: :func:`patient_table` of the phase-1 model's test predictions.
        ct_table: :func:`patient_table` of the CT ensemble's test predictions.
        ct_decision: the CT ensemble's predicted class per CT ``patient_id``.
        routing: threshold and uncertainty band.

    Returns:
        One row per patient: ids, ``truth_positive``, ``xray_p``, ``xray_positive``, ``route``
        (``xray_positive`` | ``clinical_flag`` | ``uncertain`` | ``stopped``), ``sent_to_ct``,
        ``ct_class``, ``final_positive``.
    """
    xr = xray_table.set_index("patient_id")
    ct = ct_table.set_index("patient_id")
    missing_x = set(cohort["xray_patient_id"]) - set(xr.index)
    missing_c = set(cohort["ct_patient_id"]) - set(ct.index)
    if missing_x or missing_c:
        raise ValueError(f"cohort patients without predictions: X-ray {sorted(missing_x)[:5]}, "
                         f"CT {sorted(missing_c)[:5]}")
    out = cohort.copy()
    xray_truth = xr.loc[out["xray_patient_id"], "label"].to_numpy() == config.POSITIVE_LABEL
    ct_truth = ct.loc[out["ct_patient_id"], "label"].to_numpy() == config.POSITIVE_LABEL
    if (xray_truth != ct_truth).any():
        raise ValueError("a cohort patient's X-ray and CT disagree on COVID status")
    out["truth_positive"] = xray_truth
    out["xray_p"] = covid_probability(xr.loc[out["xray_patient_id"]].reset_index())
    out["xray_positive"] = out["xray_p"] >= routing.threshold
    uncertain = (~out["xray_positive"]) & (out["xray_p"] >= routing.threshold - routing.band)
    out["route"] = np.select(
        [out["xray_positive"], out["clinical_flag"].astype(bool), uncertain],
        ["xray_positive", "clinical_flag", "uncertain"], default="stopped")
    out["sent_to_ct"] = out["route"] != "stopped"
    out["ct_class"] = ct_decision.reindex(out["ct_patient_id"]).to_numpy()
    out["final_positive"] = out["sent_to_ct"] & (out["ct_class"] == config.POSITIVE_LABEL)
    return out


def _rates(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity over the last axis of boolean arrays; NaN where undefined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = (pred & truth).sum(axis=-1) / truth.sum(axis=-1)
        specificity = (~pred & ~truth).sum(axis=-1) / (~truth).sum(axis=-1)
    return sensitivity, specificity


def _boot_rates(truth: np.ndarray, pred: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Sensitivity and specificity (columns) in each patient resample; NaN where undefined."""
    if len(truth) == 0:
        return np.full((n_boot, 2), np.nan)
    idx = np.random.default_rng(seed).integers(0, len(truth), size=(n_boot, len(truth)))
    return np.stack(_rates(truth[idx], pred[idx]), axis=1)


def summarize(routed: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Cascade sensitivity / specificity with patient-bootstrap 95% CIs and routing counts.

    Also reports the phase-1 X-ray alone and "CT for everyone" on the same patients, so the
    price of skipping CTs is visible. Intervals follow covidlib's one bootstrap rule
    (``evaluate.CI_RULE``, stated in the block as ``ci_rule``): null unless the rate is defined
    in at least 90 % of the resamples.
    """
    truth = routed["truth_positive"].to_numpy(bool)
    final = routed["final_positive"].to_numpy(bool)
    xray_only = routed["xray_positive"].to_numpy(bool)
    ct_all = (routed["ct_class"] == config.POSITIVE_LABEL).to_numpy(bool)
    boot = _boot_rates(truth, final, n_boot, seed) if n_boot > 0 else np.empty((0, 2))
    sens, spec = _rates(truth, final)
    missed = truth & ~xray_only
    block = {
        "n_patients": int(len(routed)),
        "n_positive": int(truth.sum()),
        "simulated": bool(routed["simulated"].any()) if "simulated" in routed else False,
        "sensitivity": _none(sens),
        "specificity": _none(spec),
        "ci95": {"sensitivity": evaluate.percentile_ci(boot[:, 0], n_boot),
                 "specificity": evaluate.percentile_ci(boot[:, 1], n_boot)},
        "ci_unit": "patient",
        "ci_rule": evaluate.CI_RULE,
        "ct_fraction": float(routed["sent_to_ct"].mean()),
        "routes": {k: int(v) for k, v in routed["route"].value_counts().items()},
        "phase1_missed_positives": int(missed.sum()),
        "phase1_missed_rescued_by_ct": int((missed & final).sum()),
        "xray_only": dict(zip(("sensitivity", "specificity"), map(_none, _rates(truth, xray_only)))),
        "ct_for_all": dict(zip(("sensitivity", "specificity"), map(_none, _rates(truth, ct_all)))),
    }
    return block


def _none(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def threshold_sweep(cohort: pd.DataFrame, xray_table: pd.DataFrame, ct_table: pd.DataFrame,
                    ct_decision: pd.Series, band: float = 0.15,
                    thresholds: np.ndarray | None = None) -> pd.DataFrame:
    """Sensitivity, specificity and share sent to CT for a range of phase-1 thresholds."""
    thresholds = np.round(np.linspace(0.05, 0.95, 19), 3) if thresholds is None else thresholds
    rows = []
    for t in thresholds:
        r = route(cohort, xray_table, ct_table, ct_decision, Routing(float(t), band))
        sens, spec = _rates(r["truth_positive"].to_numpy(bool), r["final_positive"].to_numpy(bool))
        rows.append({"threshold": float(t), "sensitivity": _none(sens), "specificity": _none(spec),
                     "ct_fraction": float(r["sent_to_ct"].mean())})
    return pd.DataFrame(rows)
