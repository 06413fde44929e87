"""Tests for covidlib.ablation: the paired, seed-averaged comparison of enhancement pipelines."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from covidlib import ablation
from covidlib import evaluate as ev

CT = ["covid", "cap", "normal"]


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _cases(n_pat=40, per=5, seed=0):
    """Labels, patient ids and logits of a test set: ``per`` slices for each of ``n_pat`` patients."""
    rng = np.random.default_rng(seed)
    y = np.repeat(rng.integers(0, 3, n_pat), per)
    pid = np.repeat([f"p{i:03d}" for i in range(n_pat)], per)
    z = rng.normal(size=(len(y), 3))
    z[np.arange(len(y)), y] += 0.8
    return y, pid, z


def _boost(z, y, by):
    """Logits with the true class raised by ``by`` on every image: better on every patient."""
    z = z.copy()
    z[np.arange(len(y)), y] += by
    return z


def _table(y, pid, probs, folder="/data/test", ext=".png"):
    df = pd.DataFrame({"path": [f"{folder}/{CT[c]}/{p}_{i}{ext}" for i, (c, p) in enumerate(zip(y, pid))],
                       "patient_id": pid, "label": [CT[c] for c in y]})
    for k, c in enumerate(CT):
        df[f"p_{c}"] = probs[:, k]
    return df


# ---------------------------------------------------------------- the paired bootstrap

def test_verdict_reads_the_paired_ci():
    assert ablation.verdict(0.01, 0.2) == "better"
    assert ablation.verdict(-0.2, -0.01) == "worse"
    assert ablation.verdict(-0.1, 0.1) == ablation.NO_DIFFERENCE
    assert ablation.verdict(0.0, 0.0).startswith("no difference")
    assert ablation.verdict(None, None) == ablation.UNDETERMINED
    assert ablation.verdict(float("nan"), 0.1) == ablation.UNDETERMINED


def test_identical_pipeline_has_zero_difference():
    y, pid, z = _cases()
    p = _softmax(z)
    res = ev.paired_bootstrap_diff(y, [p, p], [p, p], CT, groups=pid, n_boot=200, seed=0)
    for m in ("auc_macro", "accuracy"):
        assert res[m]["diff"] == 0.0 and res[m]["diff_ci"] == [0.0, 0.0]
        assert res[m]["a_ci"] == res[m]["b_ci"] == ev.bootstrap_ci(y, p, CT, groups=pid, n_boot=200)[m]
    table = ablation.tabulate({"none": [_table(y, pid, p)], "copy": [_table(y, pid, p)]}, CT, n_boot=200)
    row = table.set_index("pipeline").loc["copy"]
    assert row["auc_macro_diff_vs_none"] == 0.0
    assert row["auc_macro_diff_lo"] == row["auc_macro_diff_hi"] == 0.0
    assert row["verdict_vs_none"] == ablation.NO_DIFFERENCE
    assert table.set_index("pipeline").loc["none", "verdict_vs_none"] == "baseline"


def test_better_on_every_patient_is_better_although_the_cis_overlap():
    y, pid, z = _cases()
    none, better = _softmax(z), _softmax(_boost(z, y, 0.3))
    table = ablation.tabulate({"none": [_table(y, pid, none)], "crop": [_table(y, pid, better)]},
                              CT, n_boot=500).set_index("pipeline")
    crop = table.loc["crop"]
    assert crop["verdict_vs_none"] == "better" and crop["verdict_metric"] == "auc_macro"
    assert crop["auc_macro_diff_lo"] > 0 and crop["accuracy_diff_lo"] > 0
    assert crop["auc_macro_diff_lo"] <= crop["auc_macro_diff_vs_none"] <= crop["auc_macro_diff_hi"]
    # The separate 95% CIs overlap: the old CI-overlap rule would have said "no difference".
    assert crop["auc_macro_lo"] < table.loc["none", "auc_macro_hi"]
    worse = ablation.tabulate({"none": [_table(y, pid, better)], "crop": [_table(y, pid, none)]},
                              CT, n_boot=500).set_index("pipeline")
    assert worse.loc["crop", "verdict_vs_none"] == "worse"


def test_patients_not_images_are_resampled():
    # The pipeline fixes every slice of 4 of 30 patients (20 slices each) and nothing else:
    # 80 images but only 4 independent successes. Resampling images would make that look certain.
    rng = np.random.default_rng(3)
    n_pat, per = 30, 20
    y = np.repeat(rng.integers(0, 3, n_pat), per)
    pid = np.repeat([f"p{i:02d}" for i in range(n_pat)], per)
    right = np.repeat(rng.random(n_pat) < 0.5, per)
    wrong = ~right
    fixed = np.isin(pid, np.unique(pid[wrong])[:4])
    pred_b = np.where(right, y, (y + 1) % 3)
    pred_a = np.where(right | fixed, y, (y + 1) % 3)
    pa, pb = (np.eye(3)[p] * 0.6 + 0.4 / 3 for p in (pred_a, pred_b))
    by_img = ev.paired_bootstrap_diff(y, pa, pb, CT, n_boot=400, seed=0)["accuracy"]["diff_ci"]
    by_pat = ev.paired_bootstrap_diff(y, pa, pb, CT, groups=pid, n_boot=400, seed=0)["accuracy"]["diff_ci"]
    assert by_pat[1] - by_pat[0] > 2 * (by_img[1] - by_img[0])
    table = ablation.tabulate({"none": [_table(y, pid, pb)], "x": [_table(y, pid, pa)]}, CT, n_boot=400)
    assert set(table["ci_unit"]) == {"patient"} and set(table["n_units"]) == {n_pat}
    row = table.set_index("pipeline").loc["x"]
    assert [row["accuracy_diff_lo"], row["accuracy_diff_hi"]] == pytest.approx(by_pat)
    # One image per patient (or no ids): images are the units.
    ids = np.array([f"i{k}" for k in range(len(y))])
    table = ablation.tabulate({"none": [_table(y, ids, pb)], "x": [_table(y, ids, pa)]}, CT, n_boot=50)
    assert set(table["ci_unit"]) == {"image"} and set(table["n_units"]) == {len(y)}


# ---------------------------------------------------------------- the seeds dimension

def test_table_reports_seed_mean_and_sd():
    y, pid, z = _cases(seed=1)
    rng = np.random.default_rng(5)
    runs = {name: [_softmax(_boost(z, y, b) + rng.normal(0, 0.5, z.shape)) for b in boosts]
            for name, boosts in {"none": (0.0, 0.1, 0.2), "crop+wb": (0.3, 0.4, 0.5)}.items()}
    preds = {name: [_table(y, pid, p) for p in mats] for name, mats in runs.items()}
    table = ablation.tabulate(preds, CT, n_boot=300, seed=2)
    assert list(table.columns) == list(ablation.COLUMNS)
    assert list(table["pipeline"]) == ["none", "crop+wb"]
    assert set(table["n_seeds"]) == {3} and set(table["n_test"]) == {len(y)}
    for _, row in table.iterrows():
        for m in ("auc_macro", "accuracy", "f1_macro"):
            per_seed = [ev.compute_metrics(y, p, CT)[m] for p in runs[row["pipeline"]]]
            assert row[f"{m}_mean"] == pytest.approx(np.mean(per_seed))
            assert row[f"{m}_sd"] == pytest.approx(np.std(per_seed, ddof=1))
            assert row[f"{m}_lo"] <= row[f"{m}_mean"] <= row[f"{m}_hi"]
    crop = table.set_index("pipeline").loc["crop+wb"]
    expected = np.mean([ev.compute_metrics(y, a, CT)["auc_macro"] - ev.compute_metrics(y, b, CT)["auc_macro"]
                        for a, b in zip(runs["crop+wb"], runs["none"])])
    assert crop["auc_macro_diff_vs_none"] == pytest.approx(expected)
    assert table.set_index("pipeline").loc["none", "auc_macro_diff_vs_none"] == 0.0


def _hard(pred):
    """Probabilities of hard calls: 0.733 on the predicted class (AUC = mean of sens and spec)."""
    return np.eye(3)[pred] * 0.6 + 0.4 / 3


def test_one_lucky_seed_cannot_decide():
    # Seed 0 of "crop" fixes 2 misread patients per class, seed 1 breaks 2 well-read patients per
    # class (same classes, same slice counts, so its loss exactly cancels the gain), seed 2 reads
    # like "none". Alone, seed 0 looks better; averaged over the seeds there is no difference.
    rng = np.random.default_rng(11)
    n_pat, per = 60, 3
    y_pat = np.arange(n_pat) % 3
    right = rng.random(n_pat) < 0.5
    fix = np.concatenate([np.flatnonzero((y_pat == c) & ~right)[:2] for c in range(3)])
    brk = np.concatenate([np.flatnonzero((y_pat == c) & right)[:2] for c in range(3)])
    assert len(fix) == len(brk) == 6

    def table(ok):
        y = np.repeat(y_pat, per)
        pred = np.where(np.repeat(ok, per), y, (y + 1) % 3)
        return _table(y, np.repeat([f"p{i:02d}" for i in range(n_pat)], per), _hard(pred))

    lucky, unlucky = right.copy(), right.copy()
    lucky[fix], unlucky[brk] = True, False
    none = table(right)
    alone = ablation.tabulate({"none": [none], "crop": [table(lucky)]}, CT, n_boot=300)
    assert alone.set_index("pipeline").loc["crop", "verdict_vs_none"] == "better"
    seeds = ablation.tabulate({"none": [none] * 3, "crop": [table(lucky), table(unlucky), none]}, CT,
                              n_boot=300).set_index("pipeline")
    crop = seeds.loc["crop"]
    assert crop["auc_macro_diff_vs_none"] == pytest.approx(0.0, abs=1e-12)
    assert crop["auc_macro_diff_lo"] < 0 < crop["auc_macro_diff_hi"]
    assert crop["verdict_vs_none"] == ablation.NO_DIFFERENCE
    assert crop["n_seeds"] == 3 and crop["auc_macro_sd"] > 0


def test_runs_are_matched_by_image_not_by_row():
    # Enhanced copies live in another folder with a .png suffix, in another order, and one image
    # failed to enhance: rows are matched by the image's name.
    y, pid, z = _cases(n_pat=10, per=3)
    p = _softmax(z)
    none = _table(y, pid, p, folder="/data/ct/test", ext=".jpg")
    enh = _table(y, pid, p, folder="/run/enhanced/ct/crop/test").iloc[::-1].drop(index=[4])
    with pytest.warns(UserWarning, match="1 test image"):
        table = ablation.tabulate({"none": [none], "crop": [enh]}, CT, n_boot=100)
    row = table.set_index("pipeline").loc["crop"]
    assert row["n_test"] == len(y) - 1 and row["auc_macro_diff_vs_none"] == 0.0
    bad = enh.copy()
    bad["label"] = bad["label"].iloc[::-1].to_numpy()
    with pytest.raises(ValueError, match="label"):
        ablation.tabulate({"none": [none], "crop": [bad]}, CT, n_boot=10)


def test_no_baseline_gives_levels_but_no_verdict():
    y, pid, z = _cases(n_pat=12, per=2)
    table = ablation.tabulate({"crop": [_table(y, pid, _softmax(z))]}, CT, n_boot=50)
    row = table.iloc[0]
    assert row["verdict_vs_none"].startswith("n/a") and np.isnan(row["auc_macro_diff_vs_none"])
    assert row["auc_macro_lo"] <= row["auc_macro_mean"] <= row["auc_macro_hi"]


def test_run_name_and_bad_input(tmp_path):
    assert ablation.run_name("crop+wb+clahe", 2) == "ablation_ct_crop_wb_clahe_s2"
    with pytest.raises(ValueError, match="unknown pipeline"):
        ablation.run_ablation(tmp_path, ["none", "sharpen"])
    with pytest.raises(ValueError, match="seeds"):
        ablation.run_ablation(tmp_path, ["none"], seeds=[])
    with pytest.raises(ValueError, match="seeds"):
        ablation.run_ablation(tmp_path, ["none"], seeds=[1, 1])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*collapsed to one class")  # 1 epoch on 18 images
def test_run_ablation_trains_each_pipeline_per_seed(tiny_ct_manifest, tmp_path):
    from covidlib.datasets import write_manifest

    write_manifest(tiny_ct_manifest, tmp_path / "manifest.csv")
    kw = dict(backbone="SmallCNN", img_size=32, epochs=1, batch_size=9, seeds=(0, 1), n_boot=50)
    table = ablation.run_ablation(tmp_path, ["none", "crop"], **kw)
    names = sorted(d.name for d in (tmp_path / "models").iterdir())
    assert names == ["ablation_ct_crop_s0", "ablation_ct_crop_s1", "ablation_ct_none_s0", "ablation_ct_none_s1"]
    assert all((tmp_path / "models" / n / "done.json").is_file() for n in names)
    on_disk = pd.read_csv(tmp_path / "enhancement_ablation.csv", keep_default_na=False)
    assert list(on_disk.columns) == list(table.columns)
    assert list(table.columns[:2]) == ["pipeline", "backbone"] and "seeds" in table.columns
    assert list(table["pipeline"]) == ["none", "crop"] and set(table["n_seeds"]) == {2}
    assert set(table["seeds"]) == {"0 1"} and set(table["n_test"]) == {9}
    assert set(table["ci_unit"]) == {"patient"}
    assert table.loc[1, "verdict_vs_none"] in {"better", "worse", ablation.NO_DIFFERENCE, ablation.UNDETERMINED}
    # Finished runs are reused: nothing is trained again.
    stamps = {n: (tmp_path / "models" / n / "done.json").stat().st_mtime_ns for n in names}
    ablation.run_ablation(tmp_path, ["none", "crop"], **kw)
    assert stamps == {n: (tmp_path / "models" / n / "done.json").stat().st_mtime_ns for n in names}
    cfg = json.loads((tmp_path / "models" / "ablation_ct_crop_s1" / "config.json").read_text())
    assert cfg["seed"] == 1


def test_run_ablation_defaults_are_notebook_02s(monkeypatch, tmp_path):
    """Keywords left out take notebook 02's parameters (one place for every default)."""
    from covidlib import runner

    seen = {}

    def record(run_dir, pipelines, **kw):
        seen.update(pipelines=pipelines, **kw)
        raise RuntimeError("stop")  # the budget is all this test needs

    monkeypatch.setattr(ablation, "train_runs", record)
    with pytest.raises(RuntimeError, match="stop"):
        ablation.run_ablation(tmp_path)
    nb = runner.default_parameters("ablation")
    assert seen["pipelines"] == nb["ABLATION_PIPELINES"] and seen["seeds"] == nb["ABLATION_SEEDS"]
    assert (seen["backbone"], seen["img_size"], seen["epochs"], seen["batch_size"]) == (
        nb["ABLATION_BACKBONE"], nb["IMG_SIZE"], nb["ABLATION_EPOCHS"], nb["BATCH_SIZE"])
