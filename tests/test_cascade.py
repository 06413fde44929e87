"""Tests for covidlib.cascade: patient tables, X-ray -> CT routing, summaries, cohorts."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidlib import cascade

# id: (truth_positive, xray P(covid), clinical_flag, CT decision)
PATIENTS = {
    "A": (True, 0.90, False, "covid"),    # X-ray positive -> CT -> positive
    "B": (True, 0.10, True, "covid"),     # X-ray negative, clinical flag -> CT -> rescued
    "C": (True, 0.40, False, "covid"),    # in the band [0.35, 0.5) -> uncertain -> CT -> rescued
    "D": (True, 0.20, False, "covid"),    # below the band -> stopped -> missed
    "E": (False, 0.70, False, "normal"),  # X-ray false positive, CT clears it
    "F": (False, 0.05, False, "normal"),  # stopped, true negative
    "G": (False, 0.60, False, "covid"),   # CT false positive
    "H": (False, 0.45, False, "cap"),     # uncertain, CT says CAP -> negative
}


def _tables(patients=PATIENTS):
    ids = list(patients)
    xray = pd.DataFrame({
        "patient_id": [f"x{i}" for i in ids],
        "label": ["covid" if patients[i][0] else "non_covid" for i in ids],
        "p_covid": [patients[i][1] for i in ids],
    })
    xray["p_non_covid"] = 1 - xray["p_covid"]
    ct = pd.DataFrame({
        "patient_id": [f"c{i}" for i in ids],
        "label": ["covid" if patients[i][0] else "normal" for i in ids],
        "p_covid": 0.3, "p_cap": 0.3, "p_normal": 0.4,
    })
    decision = pd.Series([patients[i][3] for i in ids], index=[f"c{i}" for i in ids])
    cohort = pd.DataFrame({
        "cohort_id": ids,
        "xray_patient_id": [f"x{i}" for i in ids],
        "ct_patient_id": [f"c{i}" for i in ids],
        "clinical_flag": [patients[i][2] for i in ids],
        "simulated": False,
    })
    return cohort, xray, ct, decision


def _routed():
    return cascade.route(*_tables()).set_index("cohort_id")


# ---------------------------------------------------------------- patient_table

def test_patient_table_means_per_patient():
    pred = pd.DataFrame({
        "path": list("abcde"),
        "patient_id": [1, 1, 1, 2, 2],
        "label": ["covid"] * 3 + ["cap"] * 2,
        "p_covid": [0.9, 0.6, 0.3, 0.1, 0.3],
        "p_cap": [0.1, 0.4, 0.7, 0.9, 0.7],
    })
    t = cascade.patient_table(pred, ["covid", "cap"]).set_index("patient_id")
    assert sorted(t.index) == ["1", "2"]  # ids become strings
    assert t.loc["1", "label"] == "covid" and t.loc["2", "label"] == "cap"
    assert t.loc["1", "p_covid"] == pytest.approx(0.6)
    assert t.loc["2", "p_cap"] == pytest.approx(0.8)


def test_patient_table_rejects_mixed_labels_and_missing_columns():
    pred = pd.DataFrame({"patient_id": ["p1", "p1"], "label": ["covid", "normal"],
                         "p_covid": [0.5, 0.5], "p_normal": [0.5, 0.5]})
    with pytest.raises(ValueError, match="p1"):
        cascade.patient_table(pred, ["covid", "normal"])
    with pytest.raises(ValueError, match="p_cap"):
        cascade.patient_table(pred, ["covid", "cap"])


# ---------------------------------------------------------------- route

def test_route_every_branch():
    r = _routed()
    assert r.loc["A", "route"] == "xray_positive" and bool(r.loc["A", "xray_positive"])
    assert r.loc["B", "route"] == "clinical_flag"
    assert r.loc["C", "route"] == "uncertain"
    assert r.loc["D", "route"] == "stopped"
    assert r.loc["H", "route"] == "uncertain"
    assert list(r["sent_to_ct"]) == [True, True, True, False, True, False, True, True]
    assert list(r["final_positive"]) == [True, True, True, False, False, False, True, False]
    assert not r.loc["D", "final_positive"]  # a stopped patient is negative whatever the CT says
    assert r.loc["C", "ct_class"] == "covid"
    assert r.loc["A", "xray_p"] == pytest.approx(0.9)
    assert list(r["truth_positive"]) == [True] * 4 + [False] * 4


def test_route_band_and_flag_priorities():
    cohort, xray, ct, decision = _tables({
        "P": (True, 0.40, True, "covid"),     # in band AND flagged: the flag is the reason
        "Q": (True, 0.30, False, "covid"),    # just below a 0.15 band -> stopped
        "R": (False, 0.50, False, "normal"),  # exactly at the threshold -> positive
    })
    r = cascade.route(cohort, xray, ct, decision).set_index("cohort_id")
    assert r.loc["P", "route"] == "clinical_flag"
    assert r.loc["Q", "route"] == "stopped"
    assert r.loc["R", "route"] == "xray_positive"
    wide = cascade.route(cohort, xray, ct, decision, cascade.Routing(0.5, 0.25)).set_index("cohort_id")
    assert wide.loc["Q", "route"] == "uncertain"
    no_band = cascade.route(cohort, xray, ct, decision, cascade.Routing(0.5, 0.0)).set_index("cohort_id")
    assert no_band.loc["Q", "route"] == "stopped"


def test_route_errors():
    cohort, xray, ct, decision = _tables()
    with pytest.raises(ValueError, match="without predictions"):
        cascade.route(cohort, xray.iloc[1:], ct, decision)
    ct_bad = ct.copy()
    ct_bad.loc[0, "label"] = "normal"  # patient A: covid X-ray, normal CT
    with pytest.raises(ValueError, match="disagree"):
        cascade.route(cohort, xray, ct_bad, decision)
    with pytest.raises(ValueError):
        cascade.Routing(threshold=1.5)


# ---------------------------------------------------------------- summarize

def test_summarize_against_hand_counts():
    routed = cascade.route(*_tables())
    s = cascade.summarize(routed, n_boot=200, seed=0)
    assert s["n_patients"] == 8 and s["n_positive"] == 4
    assert s["sensitivity"] == pytest.approx(3 / 4)  # A, B, C found; D missed
    assert s["specificity"] == pytest.approx(3 / 4)  # E, F, H cleared; G false positive
    assert s["ct_fraction"] == pytest.approx(6 / 8)
    assert s["routes"] == {"xray_positive": 3, "clinical_flag": 1, "uncertain": 2, "stopped": 2}
    assert s["phase1_missed_positives"] == 3  # B, C, D
    assert s["phase1_missed_rescued_by_ct"] == 2  # B, C
    assert s["xray_only"] == {"sensitivity": pytest.approx(1 / 4), "specificity": pytest.approx(2 / 4)}
    assert s["ct_for_all"] == {"sensitivity": pytest.approx(1.0), "specificity": pytest.approx(3 / 4)}
    assert s["simulated"] is False
    lo, hi = s["ci95"]["sensitivity"]
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0
    assert cascade.summarize(routed, n_boot=0)["ci95"] == {"sensitivity": None, "specificity": None}


def test_summarize_follows_evaluates_one_ci_rule(monkeypatch):
    from covidlib import evaluate

    # One positive among 20 patients: a resample holds it (sensitivity defined) in about
    # 1 - (19/20)^20 = 64 % of cases. Enough for "at least 10 resamples", not for the 90 % rule.
    few = {f"N{i}": (False, 0.1, False, "normal") for i in range(19)}
    cohort, xray, ct, decision = _tables({"A": PATIENTS["A"], **few})
    routed = cascade.route(cohort, xray, ct, decision)
    s = cascade.summarize(routed, n_boot=200, seed=0)
    assert s["ci_rule"] == evaluate.CI_RULE and s["ci_unit"] == "patient"
    assert s["ci95"]["sensitivity"] is None and s["ci95"]["specificity"] is not None
    monkeypatch.setattr(evaluate, "MIN_DEFINED_FRACTION", 0.5)
    assert cascade.summarize(routed, n_boot=200, seed=0)["ci95"]["sensitivity"] == [1.0, 1.0]


def test_summarize_without_negatives_gives_null_specificity():
    cohort, xray, ct, decision = _tables({k: v for k, v in PATIENTS.items() if v[0]})
    s = cascade.summarize(cascade.route(cohort, xray, ct, decision), n_boot=0)
    assert s["specificity"] is None and s["sensitivity"] == pytest.approx(3 / 4)


# ---------------------------------------------------------------- cohorts

def _patients(labels: list[str], prefix: str) -> pd.DataFrame:
    return pd.DataFrame({"patient_id": [f"{prefix}{i}" for i in range(len(labels))], "label": labels})


def test_simulate_cohort_pairs_same_status_and_is_seeded():
    xr = _patients(["covid"] * 5 + ["non_covid"] * 7, "x")
    ct = _patients(["covid"] * 3 + ["cap"] * 4 + ["normal"] * 4, "c")
    a = cascade.simulate_cohort(xr, ct, seed=3)
    b = cascade.simulate_cohort(xr, ct, seed=3)
    c = cascade.simulate_cohort(xr, ct, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a[["xray_patient_id", "ct_patient_id"]].equals(c[["xray_patient_id", "ct_patient_id"]])
    assert len(a) == 3 + 7  # min per status: 3 covid pairs, 7 non-covid pairs
    xl = xr.set_index("patient_id")["label"]
    cl = ct.set_index("patient_id")["label"]
    for x_id, c_id in zip(a["xray_patient_id"], a["ct_patient_id"]):
        assert (xl[x_id] == "covid") == (cl[c_id] == "covid")
    assert a["xray_patient_id"].is_unique and a["ct_patient_id"].is_unique
    assert a["cohort_id"].is_unique
    assert a["simulated"].all()
    assert not cascade.simulate_cohort(xr, ct, clinical_flag_rate=0.0)["clinical_flag"].any()
    assert cascade.simulate_cohort(xr, ct, clinical_flag_rate=1.0)["clinical_flag"].all()
    with pytest.raises(ValueError, match="no X-ray and CT patients"):
        cascade.simulate_cohort(_patients(["covid"], "x"), _patients(["normal"], "c"))


def test_simulated_flag_reaches_the_summary():
    xr = _patients(["covid"] * 3 + ["non_covid"] * 3, "x")
    ct = _patients(["covid"] * 3 + ["normal"] * 3, "c")
    cohort = cascade.simulate_cohort(xr, ct, seed=0, clinical_flag_rate=0.0)
    xt = xr.assign(p_covid=[0.9, 0.8, 0.2, 0.1, 0.6, 0.3])
    ctt = ct.assign(p_covid=0.5)
    decision = pd.Series(np.where(ct["label"] == "covid", "covid", "normal"), index=ct["patient_id"])
    s = cascade.summarize(cascade.route(cohort, xt, ctt, decision), n_boot=0)
    assert s["simulated"] is True


def test_load_cohort(tmp_path):
    p = tmp_path / "cohort.csv"
    p.write_text("patient_id,clinical_flag\n007,1\n8,true\n9,Yes\n10,0\n11,\n12,no\n")
    c = cascade.load_cohort(p)
    assert list(c["cohort_id"]) == ["007", "8", "9", "10", "11", "12"]  # ids stay strings
    assert list(c["xray_patient_id"]) == list(c["ct_patient_id"]) == list(c["cohort_id"])
    assert list(c["clinical_flag"]) == [True, True, True, False, False, False]
    assert not c["simulated"].any()
    p2 = tmp_path / "no_flag.csv"
    p2.write_text("patient_id\na\nb\n")
    assert not cascade.load_cohort(p2)["clinical_flag"].any()
    p3 = tmp_path / "pairs.csv"
    p3.write_text("xray_patient_id,ct_patient_id,clinical_flag\nx1,c1,1\n")
    c3 = cascade.load_cohort(p3)
    assert (c3.loc[0, "xray_patient_id"], c3.loc[0, "ct_patient_id"]) == ("x1", "c1")
    assert bool(c3.loc[0, "clinical_flag"])
    p4 = tmp_path / "bad.csv"
    p4.write_text("id,flag\n1,0\n")
    with pytest.raises(ValueError, match="patient_id"):
        cascade.load_cohort(p4)


def test_loaded_cohort_routes(tmp_path):
    cohort, xray, ct, decision = _tables()
    p = tmp_path / "c.csv"
    p.write_text("xray_patient_id,ct_patient_id,clinical_flag\nxB,cB,1\nxD,cD,0\n")
    r = cascade.route(cascade.load_cohort(p), xray, ct, decision)
    assert list(r["route"]) == ["clinical_flag", "stopped"]


# ---------------------------------------------------------------- threshold_sweep

def test_threshold_sweep_hand_tables():
    sweep = cascade.threshold_sweep(*_tables())
    assert len(sweep) == 19 and sweep["threshold"].is_monotonic_increasing
    assert (np.diff(sweep["ct_fraction"]) <= 1e-12).all()
    assert sweep["ct_fraction"].iloc[0] == 1.0  # everyone reaches CT at threshold 0.05
    at_half = sweep.set_index("threshold").loc[0.5]
    assert at_half["ct_fraction"] == pytest.approx(6 / 8)
    assert at_half["sensitivity"] == pytest.approx(3 / 4)
    assert at_half["specificity"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("seed", range(5))
def test_threshold_sweep_ct_fraction_non_increasing(seed):
    rng = np.random.default_rng(seed)
    n = 40
    patients = {f"p{i}": (bool(rng.random() < 0.5), float(rng.random()), bool(rng.random() < 0.1),
                          str(rng.choice(["covid", "cap", "normal"]))) for i in range(n)}
    sweep = cascade.threshold_sweep(*_tables(patients), band=float(rng.uniform(0, 0.3)),
                                    thresholds=np.linspace(0, 1, 41))
    assert (np.diff(sweep["ct_fraction"]) <= 1e-12).all()
    assert sweep["ct_fraction"].iloc[0] == 1.0  # threshold 0: every X-ray is positive
    flagged = np.mean([v[2] for v in patients.values()])
    assert sweep["ct_fraction"].min() >= flagged  # flagged patients always reach CT
