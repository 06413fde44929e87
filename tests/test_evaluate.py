"""Tests for covidlib.evaluate: hand-checked metrics, probability AUC, CIs, calibration, patients."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from covidlib import evaluate as ev

CT = ["covid", "cap", "normal"]


def _onehot_probs(pred, k=3, conf=0.8):
    p = np.full((len(pred), k), (1 - conf) / (k - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _noisy(n, k=3, signal=1.5, seed=0, temp=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += signal
    return y, _softmax(z / temp)


def test_hand_computed_confusion_and_rates():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0])
    m = ev.compute_metrics(y, _onehot_probs(pred), CT)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert m["accuracy"] == pytest.approx(6 / 9)
    c = m["per_class"]["covid"]  # TP=2 FN=1 FP=1 TN=5
    assert c["sensitivity"] == pytest.approx(2 / 3)
    assert c["specificity"] == pytest.approx(5 / 6)
    assert c["ppv"] == pytest.approx(2 / 3)
    assert c["npv"] == pytest.approx(5 / 6)
    assert c["f1"] == pytest.approx(2 / 3)
    assert c["support"] == 3
    n = m["per_class"]["normal"]  # TP=3 FN=1 FP=1 TN=4
    assert (n["sensitivity"], n["specificity"], n["ppv"], n["npv"]) == pytest.approx((0.75, 0.8, 0.75, 0.8))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))


def test_auc_uses_probabilities_not_hard_labels():
    y = np.array([0, 0, 1, 1])  # classes: index 1 = covid is the positive class here
    p_pos = np.array([0.1, 0.2, 0.3, 0.4])  # perfectly ranked, but all below 0.5
    probs = np.c_[1 - p_pos, p_pos]
    m = ev.compute_metrics(y, probs, ["non_covid", "covid"])
    assert m["accuracy"] == 0.5
    assert roc_auc_score(y, probs.argmax(1)) == 0.5  # what a hard-label AUC would say
    assert m["auc_macro"] == pytest.approx(1.0)
    assert m["per_class"]["covid"]["auc"] == pytest.approx(1.0)


def test_multiclass_matches_sklearn_and_perfect_random():
    y, p = _noisy(600, seed=1)
    m = ev.compute_metrics(y, p, CT)
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert m["f1_macro"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    perfect = ev.compute_metrics(y, np.eye(3)[y] * 0.9 + 0.1 / 3, CT)
    assert perfect["accuracy"] == perfect["f1_macro"] == perfect["auc_macro"] == 1.0
    rng = np.random.default_rng(2)
    rnd = ev.compute_metrics(rng.integers(0, 3, 3000), rng.dirichlet([1, 1, 1], 3000), CT)
    assert abs(rnd["auc_macro"] - 0.5) < 0.03 and abs(rnd["accuracy"] - 1 / 3) < 0.04


def test_binary_positive_class_is_covid():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    p = rng.dirichlet([1, 1], 200)
    p = p ** 2 / (p ** 2).sum(1, keepdims=True) * 0.9 + 0.05  # rows need not sum to one
    m = ev.compute_metrics(y, p, ["covid", "non_covid"])
    assert ev.positive_index(["covid", "non_covid"]) == 0
    assert ev.positive_index(["normal", "cap"]) == 1
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y == 0, p[:, 0]))
    assert set(m["per_class"]) == {"covid", "non_covid"}


def test_absent_class_gives_none_without_warnings():
    y = np.array([0, 0, 1, 1, 0])
    p = _onehot_probs(np.array([0, 1, 1, 2, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = ev.compute_metrics(y, p, CT)
        ci = ev.bootstrap_ci(y, p, CT, n_boot=50)
        empty = ev.compute_metrics(np.zeros(0, int), np.zeros((0, 3)), CT)
    normal = m["per_class"]["normal"]
    assert normal["sensitivity"] is None and normal["auc"] is None and normal["f1"] is None
    assert normal["support"] == 0 and normal["ppv"] == 0.0 and normal["specificity"] == 0.8
    # f1_macro averages over the two classes present in the truth.
    assert m["f1_macro"] == pytest.approx((m["per_class"]["covid"]["f1"] + m["per_class"]["cap"]["f1"]) / 2)
    assert m["auc_macro"] is not None
    assert set(ci) == {"accuracy", "f1_macro", "auc_macro"}
    assert empty["accuracy"] is None and empty["per_class"]["covid"]["sensitivity"] is None


def test_predictions_to_arrays_and_errors():
    df = pd.DataFrame({"label": ["cap", "covid"], "p_covid": [0.2, 0.7], "p_cap": [0.5, 0.2],
                       "p_normal": [0.3, 0.1]})
    y, p = ev.predictions_to_arrays(df, CT)
    assert y.tolist() == [1, 0] and p.shape == (2, 3) and p[0, 1] == 0.5
    with pytest.raises(ValueError, match="p_normal"):
        ev.predictions_to_arrays(df.drop(columns="p_normal"), CT)
    with pytest.raises(ValueError, match="not among"):
        ev.predictions_to_arrays(df.assign(label=["cap", "flu"]), CT)
    with pytest.raises(ValueError, match="columns"):
        ev.compute_metrics(y, p[:, :2], CT)


def test_bootstrap_contains_point_and_is_seeded():
    y, p = _noisy(2000, seed=4)
    m = ev.compute_metrics(y, p, CT)
    ci = ev.bootstrap_ci(y, p, CT, n_boot=1000, seed=0)
    for k in ("accuracy", "f1_macro", "auc_macro"):
        lo, hi = ci[k]
        assert lo <= m[k] <= hi and hi - lo < 0.1
    assert ev.bootstrap_ci(y, p, CT, n_boot=200, seed=5) == ev.bootstrap_ci(y, p, CT, n_boot=200, seed=5)
    assert ev.bootstrap_ci(y, p, CT, n_boot=200, seed=5) != ev.bootstrap_ci(y, p, CT, n_boot=200, seed=6)


def test_cluster_bootstrap_wider_for_clustered_data():
    # 30 patients x 40 slices; a patient is either read right on every slice or wrong on every slice.
    rng = np.random.default_rng(7)
    n_pat, per = 30, 40
    y = np.repeat(rng.integers(0, 3, n_pat), per)
    right = np.repeat(rng.random(n_pat) < 0.6, per)
    pred = np.where(right, y, (y + 1) % 3)
    p = _onehot_probs(pred, conf=0.7) + rng.uniform(0, 0.05, (len(y), 3))
    groups = np.repeat([f"p{i:02d}" for i in range(n_pat)], per)
    img = ev.bootstrap_ci(y, p, CT, n_boot=400, seed=0)
    pat = ev.bootstrap_ci(y, p, CT, groups=groups, n_boot=400, seed=0)
    w_img = img["accuracy"][1] - img["accuracy"][0]
    w_pat = pat["accuracy"][1] - pat["accuracy"][0]
    assert w_pat > 3 * w_img


def test_one_rule_for_resamples_where_a_metric_is_undefined(monkeypatch):
    assert ev.MIN_DEFINED_FRACTION == 0.9 and "90%" in ev.CI_RULE
    v = np.r_[np.linspace(0, 1, 89), [np.nan] * 11]
    assert ev.percentile_ci(v) is None  # 89 % defined
    assert ev.percentile_ci(np.r_[np.linspace(0, 1, 90), [None] * 10]) == pytest.approx([0.025, 0.975])
    assert ev.percentile_ci(np.linspace(0, 1, 9), n_boot=10) == pytest.approx([0.025, 0.975])
    assert ev.percentile_ci(np.linspace(0, 1, 9), n_boot=11) is None
    assert ev.percentile_ci([]) is None and ev.percentile_ci([0.5]) is None
    # One positive in 8 images: a resample holds it (AUC defined) in 1 - (7/8)^8 = 66 % of cases.
    y = np.r_[1, np.zeros(7, dtype=int)]
    p = np.c_[1 - np.linspace(0.1, 0.9, 8), np.linspace(0.1, 0.9, 8)]
    assert ev.bootstrap_ci(y, p, ["normal", "covid"], n_boot=500)["auc_macro"] is None
    monkeypatch.setattr(ev, "MIN_DEFINED_FRACTION", 0.5)  # the one constant every CI reads
    assert ev.bootstrap_ci(y, p, ["normal", "covid"], n_boot=500)["auc_macro"] is not None
    monkeypatch.undo()
    block = ev.evaluate_predictions(_pred_df(20, 3, seed=1), CT, n_boot=20)
    assert block["ci_rule"] == ev.CI_RULE


def test_paired_bootstrap_diff_inputs():
    y, p = _noisy(90, seed=8)
    q = np.roll(p, 1, axis=1)
    one = ev.paired_bootstrap_diff(y, p, q, CT, n_boot=100, seed=1, metrics=["auc_macro", "auc:cap"])
    assert one == ev.paired_bootstrap_diff(y, [p], np.stack([q]), CT, n_boot=100, seed=1,
                                           metrics=["auc_macro", "auc:cap"])
    r = one["auc_macro"]
    assert r["diff"] == pytest.approx(r["a"] - r["b"]) and r["n_defined"] == 100
    assert r["diff_ci"][0] <= r["diff"] <= r["diff_ci"][1]
    assert ev.paired_bootstrap_diff(y, p, q, CT, n_boot=0)["accuracy"]["diff_ci"] is None
    assert ev.paired_bootstrap_diff([], np.zeros((0, 3)), np.zeros((0, 3)), CT)["accuracy"]["diff"] is None
    with pytest.raises(ValueError, match="one entry per probs row"):
        ev.paired_bootstrap_diff(y, p, q[:-1], CT)
    with pytest.raises(ValueError, match="no probability matrix"):
        ev.paired_bootstrap_diff(y, p, [], CT)
    with pytest.raises(ValueError, match="groups has"):
        ev.paired_bootstrap_diff(y, p, q, CT, groups=["a"])


def test_temperature_scaling_fixes_overconfidence():
    # Calibrated logits, then sharpened by 1/0.4: over-confident on val and test alike.
    yv, pv = _noisy(1500, seed=8, signal=1.0, temp=0.4)
    yt, pt = _noisy(1500, seed=9, signal=1.0, temp=0.4)
    T = ev.fit_temperature(pv, yv)
    assert 1.8 < T < 3.5  # ~2.5 would undo the sharpening exactly
    before = ev.expected_calibration_error(yt, pt)
    after = ev.expected_calibration_error(yt, ev.apply_temperature(pt, T))
    assert after < before / 2
    curve = ev.reliability_curve(yt, pt, n_bins=10)
    assert sum(curve["bin_count"]) == 1500 and len(curve["bin_accuracy"]) == 10
    assert np.allclose(ev.apply_temperature(pt, 1.0), pt / pt.sum(1, keepdims=True))
    with pytest.raises(ValueError):
        ev.apply_temperature(pt, 0.0)


def test_ece_hand_computed():
    y = np.array([0, 1, 0, 0])
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    # 2 bins: all four confidences (0.9, 0.9, 0.6, 0.6) fall in [0.5, 1); predictions
    # 0, 0, 0, 1 are right, wrong, right, wrong -> |acc 0.5 - mean conf 0.75| = 0.25
    assert ev.expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.25)


def test_aggregation_methods_tiny():
    pids = ["a", "a", "a", "b", "b"]
    y = [0, 0, 0, 1, 1]
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55], [0.2, 0.8], [0.3, 0.7]])
    ids, yp, pm = ev.aggregate_by_patient(p, pids, y, "mean")
    assert ids.tolist() == ["a", "b"] and yp.tolist() == [0, 1]
    assert pm[0] == pytest.approx([1.75 / 3, 1.25 / 3])
    _, _, pk = ev.aggregate_by_patient(p, pids, y, "topk", k=2)
    raw = np.array([(0.9 + 0.45) / 2, (0.6 + 0.55) / 2])
    assert pk[0] == pytest.approx(raw / raw.sum())
    _, _, pf = ev.aggregate_by_patient(p, pids, y, "fraction")
    assert pf[0] == pytest.approx([1 / 3, 2 / 3]) and pf[1] == pytest.approx([0, 1])
    # threshold 0.7: only slice 1 of "a" votes
    _, _, pf7 = ev.aggregate_by_patient(p, pids, y, "fraction", threshold=0.7)
    assert pf7[0] == pytest.approx([1, 0])
    with pytest.raises(ValueError, match="different labels"):
        ev.aggregate_by_patient(p, pids, [0, 1, 0, 1, 1], "mean")
    with pytest.raises(ValueError, match="method"):
        ev.aggregate_by_patient(p, pids, y, "max")


def test_choose_aggregation_ties_to_mean_and_prefers_better():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.3, 0.7]])
    assert ev.choose_aggregation(p, ["a", "a", "b", "b"], [0, 0, 1, 1]) == "mean"  # all perfect
    # Covid patients A, D: every slice mildly covid. Non-covid C: one very confident covid
    # slice drags its mean above A's and D's; B is clear. mean (= topk with 3 slices) ranks
    # patients with AUC 0.5, slice votes ("fraction") with AUC 1.
    pids = np.repeat(["A", "B", "C", "D"], 3)
    y = np.repeat([1, 0, 0, 1], 3)
    p_cov = np.array([0.55, 0.55, 0.55, 0.0, 0.0, 0.9, 0.99, 0.4, 0.4, 0.52, 0.52, 0.52])
    probs = np.c_[1 - p_cov, p_cov]
    assert ev.choose_aggregation(probs, pids, y, classes=["non_covid", "covid"]) == "fraction"


def _pred_df(n_pat, per, seed, classes=CT):
    rng = np.random.default_rng(seed)
    y = np.repeat(rng.integers(0, len(classes), n_pat), per)
    z = rng.normal(size=(len(y), len(classes))) + np.repeat(rng.normal(size=(n_pat, len(classes))), per, 0)
    z[np.arange(len(y)), y] += 1.2
    p = _softmax(z / 0.5)
    df = pd.DataFrame({"path": [f"img{i}.png" for i in range(len(y))],
                       "patient_id": np.repeat([f"s{seed}_p{i:03d}" for i in range(n_pat)], per),
                       "label": [classes[i] for i in y]})
    for k, c in enumerate(classes):
        df[f"p_{c}"] = p[:, k]
    return df


def test_evaluate_predictions_json_round_trip():
    test_df, val_df = _pred_df(40, 5, seed=10), _pred_df(30, 5, seed=11)
    res = ev.evaluate_predictions(test_df, CT, val_df=val_df, n_boot=200)
    again = json.loads(json.dumps(res, allow_nan=False))
    assert again == res
    assert res["ci_unit"] == "patient" and res["n"] == 200
    assert set(res["ci95"]) == {"accuracy", "f1_macro", "auc_macro"}
    cal = res["calibration"]
    assert cal["temperature"] > 1 and cal["ece_after_temperature"] < cal["ece"]
    pl = res["patient_level"]
    assert pl["method"] in ev.AGGREGATION_METHODS and pl["n_patients"] == 40
    assert 0 <= pl["auc_macro"] <= 1 and len(pl["ci95"]["accuracy"]) == 2
    assert set(res["per_class"]["cap"]) >= {"sensitivity", "specificity", "ppv", "npv", "f1", "auc"}


def test_evaluate_predictions_without_patients_or_val():
    df = _pred_df(50, 1, seed=12, classes=["covid", "non_covid"]).drop(columns="patient_id")
    res = ev.evaluate_predictions(df, ["covid", "non_covid"], n_boot=100)
    json.dumps(res, allow_nan=False)
    assert res["ci_unit"] == "image" and "ci_note" in res
    assert res["calibration"]["temperature"] is None and res["calibration"]["ece_after_temperature"] is None
    assert res["patient_level"]["method"] is None


def test_per_class_auc_ci_brackets_each_class_auc():
    rng = np.random.default_rng(3)
    n, classes = 300, ["covid", "cap", "normal"]
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    point = ev.compute_metrics(y, p, classes)["per_class"]
    ci = ev.bootstrap_ci(y, p, classes, n_boot=300, seed=0, metrics=[f"auc:{c}" for c in classes])
    for c in classes:
        lo, hi = ci[f"auc:{c}"]
        assert lo < point[c]["auc"] < hi and hi - lo < 0.3
    with pytest.raises(ValueError, match="unknown metric"):
        ev.bootstrap_ci(y, p, classes, metrics=["auc:pneumonia"])


def test_score_outputs_get_auc_but_no_calibration():
    """Issue #11: a ranking score (the hard vote's) is evaluated for AUC, never calibrated."""
    test_df, val_df = _pred_df(40, 5, seed=20), _pred_df(30, 5, seed=21)
    as_score = {f"p_{c}": f"score_{c}" for c in CT}
    prob = ev.evaluate_predictions(test_df, CT, val_df=val_df, n_boot=50)
    score = ev.evaluate_predictions(test_df.rename(columns=as_score), CT,
                                    val_df=val_df.rename(columns=as_score), n_boot=50, output="score")
    assert prob["output"] == "probability" and score["output"] == "score"
    assert prob["calibrated"] is False and score["calibrated"] is False
    # Same numbers where a ranking / arg-max is all that matters.
    for key in ("accuracy", "f1_macro", "auc_macro", "confusion_matrix", "ci95"):
        assert score[key] == prob[key], key
    cal = score["calibration"]
    assert cal["applicable"] is False and "not a probability" in cal["reason"]
    assert cal["ece"] is None and cal["temperature"] is None and cal["ece_after_temperature"] is None
    assert cal["reliability"] is None
    assert prob["calibration"]["applicable"] is True and prob["calibration"]["temperature"] > 0
    json.dumps(score, allow_nan=False)
    # A score table is not read as probabilities, nor the reverse.
    with pytest.raises(ValueError, match="p_covid"):
        ev.evaluate_predictions(test_df.rename(columns=as_score), CT, n_boot=10)
    with pytest.raises(ValueError, match="score_covid"):
        ev.evaluate_predictions(test_df, CT, n_boot=10, output="score")
    with pytest.raises(ValueError, match="output must be"):
        ev.evaluate_predictions(test_df, CT, n_boot=10, output="logit")


def test_calibration_block():
    y, p = _noisy(300, seed=4, temp=0.5)
    yv, pv = _noisy(300, seed=5, temp=0.5)
    full = ev.calibration_block(y, p, yv, pv)
    assert full["applicable"] is True and full["ece"] == pytest.approx(ev.expected_calibration_error(y, p))
    assert full["temperature"] == pytest.approx(ev.fit_temperature(pv, yv))
    assert full["ece_after_temperature"] < full["ece"]
    no_val = ev.calibration_block(y, p)
    assert no_val["temperature"] is None and no_val["ece_after_temperature"] is None
    assert ev.calibration_block(y, p, yv, pv, output="score")["applicable"] is False
