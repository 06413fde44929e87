"""Tests for covidlib.plots: every figure renders to a PNG, and the data drawn is right."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
from matplotlib import colors as mcolors
from matplotlib import pyplot as plt

from covidlib import config, plots

MIN_PNG = 2000  # bytes: a real figure, not an empty canvas


def _png_ok(path):
    assert path.exists(), path
    assert path.stat().st_size > MIN_PNG
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture()
def manifest(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        for cls in ("covid", "cap", "normal"):
            for i in range(n):
                p = tmp_path / "img" / split / cls / f"{cls}_{split}_{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(p), rng.integers(0, 256, size=(24, 24), dtype=np.uint8))
                rows.append(dict(path=str(p), label=cls, patient_id=f"{cls}{i}", split=split, source="t", modality="ct"))
    return pd.DataFrame(rows)


def _read(p):
    img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"cannot read {p}")
    return img


def test_no_keras_at_import():
    code = "import sys, covidlib.plots, covidlib.explain; assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_class_counts(manifest, tmp_path):
    out = tmp_path / "figs" / "deep" / "counts.png"
    fig = plots.plot_class_counts(manifest, path=out)
    _png_ok(out)
    counts = fig.covidlib_data
    assert list(counts.index) == ["train", "val", "test"]
    assert list(counts.columns) == ["covid", "cap", "normal"]
    assert counts.loc["train", "covid"] == 6 and counts.loc["val", "cap"] == 2
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["COVID-19", "CAP", "Normal"]
    with pytest.raises(ValueError):
        plots.plot_class_counts(manifest.assign(label="flu"))


def test_samples(manifest, tmp_path):
    out = tmp_path / "samples.png"
    plots.plot_samples(manifest, n_per_class=3, path=out, read=_read)
    _png_ok(out)
    bad = manifest.copy()
    bad.loc[0, "path"] = str(tmp_path / "missing.png")
    fig = plots.plot_samples(bad[bad.label == "covid"].head(2), n_per_class=4, read=_read)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("unreadable" in t for t in texts)  # shown, not silently dropped


def test_enhancement_steps(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 200, size=(40, 40), dtype=np.uint8)
    b = cv2.equalizeHist(a)
    c = (a.astype(np.uint16) * 250)
    out = tmp_path / "enh.png"
    fig = plots.plot_enhancement_steps([("original", a), ("clahe", b), ("16-bit", c)], path=out)
    _png_ok(out)
    assert len(fig.axes) == 6
    with pytest.raises(ValueError):
        plots.plot_enhancement_steps([])


def test_training_curves(tmp_path):
    hist = {
        "loss": [1.0, 0.7, 0.5, 0.45],
        "val_loss": [1.1, 0.8, 0.6, 0.65],
        "accuracy": [0.4, 0.6, 0.7, 0.8],
        "val_accuracy": [0.4, 0.55, 0.65, 0.6],
        "auc": [0.5, 0.7, 0.8, 0.85],
        "val_auc": [0.5, 0.65, 0.75, 0.74],
        "learning_rate": [1e-3, 1e-3, 5e-4, 5e-4],
    }
    out = tmp_path / "curves.png"
    fig = plots.plot_training_curves(hist, path=out, title="DenseNet121")
    _png_ok(out)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["loss", "accuracy", "auc", "learning rate"]
    loss_ax = fig.axes[0]
    assert [ln.get_label() for ln in loss_ax.get_lines() if not ln.get_label().startswith("_")] == ["train", "val"]

    df = pd.DataFrame(hist).drop(columns="learning_rate").assign(epoch=range(4), lr=1e-3)
    plots.plot_training_curves(df, path=tmp_path / "c2.png")
    _png_ok(tmp_path / "c2.png")

    class FakeHistory:
        history = hist

    plots.plot_training_curves(FakeHistory())
    with pytest.raises(ValueError):
        plots.plot_training_curves({})


def _quadmesh(ax):
    return np.asarray(ax.collections[0].get_array()).reshape(3, 3)


def test_confusion_matrix_counts_and_normalised(tmp_path):
    classes = ["covid", "cap", "normal"]
    cm = np.array([[8, 1, 1], [2, 5, 3], [0, 0, 0]])
    out = tmp_path / "cm.png"
    fig = plots.plot_confusion_matrix(cm, classes, path=out)
    _png_ok(out)
    np.testing.assert_array_equal(_quadmesh(fig.axes[0]), cm)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["COVID-19", "CAP", "Normal"]

    fig = plots.plot_confusion_matrix(cm, classes, path=tmp_path / "cmn.png", normalize=True, title="t")
    _png_ok(tmp_path / "cmn.png")
    drawn = np.ma.filled(np.ma.masked_invalid(_quadmesh(fig.axes[0])), np.nan)
    np.testing.assert_allclose(np.nansum(drawn[:2], axis=1), 1.0)
    np.testing.assert_allclose(drawn[0], [0.8, 0.1, 0.1])
    assert np.isnan(drawn[2]).all()  # no true "normal" cases: blank, not a fake 0
    np.testing.assert_allclose(np.nansum(fig.covidlib_data[:2], axis=1), 1.0)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "0.80\n(8)" in texts

    with pytest.raises(ValueError, match="confusion matrix"):
        plots.plot_confusion_matrix(np.ones((2, 2)), classes)


def test_confusion_matrices_side_by_side(tmp_path):
    classes = ["covid", "non_covid"]
    cm = np.array([[30, 5], [4, 61]])
    out = tmp_path / "cms.png"
    fig = plots.plot_confusion_matrices(cm, classes, path=out, title="X-ray")
    _png_ok(out)
    np.testing.assert_array_equal(fig.covidlib_data["counts"], cm)
    np.testing.assert_allclose(fig.covidlib_data["normalized"].sum(axis=1), 1.0)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["COVID-19", "non-COVID"]


def _scores(n=120, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def test_roc_multiclass(tmp_path):
    from sklearn.metrics import roc_auc_score

    y, p = _scores()
    classes = ["covid", "cap", "normal"]
    out = tmp_path / "roc.png"
    fig = plots.plot_roc_curves(y, p, classes, path=out, auc_ci={"covid": [0.8, 0.9], "cap": None})
    _png_ok(out)
    assert set(fig.covidlib_data) == set(classes)
    for i, c in enumerate(classes):
        assert fig.covidlib_data[c][2] == pytest.approx(roc_auc_score(y == i, p[:, i]))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("COVID-19 (AUC") and "95% CI 0.800-0.900" in t for t in legend)
    assert any(t.startswith("CAP (AUC") and "CI" not in t for t in legend)
    # String labels work too.
    plots.plot_roc_curves([classes[i] for i in y], p, classes)


def test_roc_binary(tmp_path):
    y, p = _scores(k=2, seed=1)
    classes = ["covid", "non_covid"]
    out = tmp_path / "roc_bin.png"
    fig = plots.plot_roc_curves(y, p, classes, path=out, auc_ci={"covid": [0.7, 0.95]})
    _png_ok(out)
    assert list(fig.covidlib_data) == ["covid"]  # one curve, the positive class
    curves = [ln for ln in fig.axes[0].get_lines() if ln.get_label() != "chance"]
    assert len(curves) == 1
    # 1-D P(covid) gives the same curve.
    fig2 = plots.plot_roc_curves(y, p[:, 0], classes)
    assert fig2.covidlib_data["covid"][2] == pytest.approx(fig.covidlib_data["covid"][2])
    # Undefined AUC (only one class present) is reported, not a crash.
    fig3 = plots.plot_roc_curves(np.zeros(10, int), p[:10], classes)
    assert fig3.covidlib_data == {}


def test_reliability_diagram(tmp_path):
    y, p = _scores(n=300)
    t = 2.0
    pc = np.exp(np.log(p) / t)
    pc /= pc.sum(1, keepdims=True)
    out = tmp_path / "rel.png"
    fig = plots.plot_reliability_diagram(y, p, path=out, n_bins=10, probs_calibrated=pc)
    _png_ok(out)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(s.startswith("Uncalibrated (ECE") for s in legend)
    assert any(s.startswith("Temperature-scaled (ECE") for s in legend)
    d = fig.covidlib_data["Uncalibrated"]
    assert d["bin_count"].sum() == 300
    assert np.all((d["bin_accuracy"] >= 0) & (d["bin_accuracy"] <= 1))
    plots.plot_reliability_diagram(y, p)
    with pytest.raises(ValueError):
        plots.plot_reliability_diagram(y, p[:, :2])


def test_reliability_diagram_refuses_a_score(tmp_path):
    """Issue #11: the hard vote's ranking score has no calibration to draw."""
    y, p = _scores(n=50)
    out = tmp_path / "rel.png"
    with pytest.raises(ValueError, match="not a probability"):
        plots.plot_reliability_diagram(y, p, path=out, output="score")
    assert not out.exists()


def _grid_data(n_images, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_images, 16, 16), dtype=np.uint8)
    y_true = rng.integers(0, 3, size=n_images)
    y_pred = np.where(rng.random(n_images) < 0.6, y_true, (y_true + 1) % 3)
    return images, y_true, y_pred


def _titled_axes(fig):
    return [ax for ax in fig.axes if ax.get_title()]


def test_prediction_grid_captions_and_colours(tmp_path):
    classes = ["covid", "cap", "normal"]
    images, y_true, y_pred = _grid_data(60)
    out = tmp_path / "grid.png"
    fig = plots.plot_prediction_grid(images, y_true, y_pred, classes, path=out, seed=3)
    _png_ok(out)
    idx = fig.covidlib_indices
    assert len(idx) == 25 and len(set(idx.tolist())) == 25  # without replacement
    axes = _titled_axes(fig)
    assert len(axes) == 25
    assert len({ax.get_position().x0.round(3) for ax in axes}) == 5  # 5 x 5
    assert len({ax.get_position().y0.round(3) for ax in axes}) == 5
    green, red = mcolors.to_rgb("green"), mcolors.to_rgb("red")
    seen = []
    for ax, i in zip(axes, idx):
        expected = (
            f"N={i} | P={config.display_name(classes[y_pred[i]])} | GT={config.display_name(classes[y_true[i]])}"
        )
        assert ax.get_title() == expected
        assert mcolors.to_rgb(ax.title.get_color()) == (green if y_true[i] == y_pred[i] else red)
        seen.append(int(ax.get_title().split(" | ")[0][2:]))
    assert seen == idx.tolist()
    # Deterministic given the seed; exactly what rng.choice(replace=False) draws.
    np.testing.assert_array_equal(idx, np.random.default_rng(3).choice(60, size=25, replace=False))
    fig2 = plots.plot_prediction_grid(images, y_true, y_pred, classes, seed=3)
    np.testing.assert_array_equal(fig2.covidlib_indices, idx)


def test_prediction_grid_fewer_images():
    classes = ["covid", "non_covid"]
    images, y_true, y_pred = _grid_data(7, seed=1)
    y_true, y_pred = y_true % 2, y_pred % 2
    fig = plots.plot_prediction_grid(list(images), y_true, y_pred, classes)
    idx = fig.covidlib_indices
    assert sorted(idx.tolist()) == list(range(7))
    axes = _titled_axes(fig)
    assert len(axes) == 7
    assert len(fig.axes) == 9  # 3 x 3 grid, 2 blank
    for ax in axes:
        i = int(ax.get_title().split(" | ")[0][2:])
        right = y_true[i] == y_pred[i]
        assert ax.title.get_color() == ("green" if right else "red")
        assert ax.get_title().endswith(f"GT={config.display_name(classes[y_true[i]])}")


def test_prediction_grid_indices_and_errors():
    classes = ["covid", "cap", "normal"]
    images, y_true, y_pred = _grid_data(10)
    fig = plots.plot_prediction_grid(images, y_true, y_pred, classes, indices=[4, 1, 7])
    assert fig.covidlib_indices.tolist() == [4, 1, 7]
    assert [ax.get_title().split(" | ")[0] for ax in _titled_axes(fig)] == ["N=4", "N=1", "N=7"]
    with pytest.raises(ValueError, match="repeat"):
        plots.plot_prediction_grid(images, y_true, y_pred, classes, indices=[1, 1])
    with pytest.raises(ValueError):
        plots.plot_prediction_grid(images, y_true[:5], y_pred, classes)
    with pytest.raises(ValueError):
        plots.plot_prediction_grid(images, y_true + 5, y_pred, classes)


def test_ablation(tmp_path):
    table = pd.DataFrame(
        {
            "pipeline": ["none", "crop", "crop+wb", "crop+wb+clahe"],
            "accuracy": [0.81, 0.84, 0.85, 0.88],
            "accuracy_lo": [0.76, 0.79, 0.80, 0.84],
            "accuracy_hi": [0.86, 0.89, 0.90, 0.92],
        }
    )
    out = tmp_path / "abl.png"
    plots.plot_ablation(table, path=out, metric="accuracy")
    _png_ok(out)
    plots.plot_ablation(table[["pipeline", "accuracy"]], metric="accuracy")  # no CI: bars only
    with pytest.raises(ValueError, match="f1_macro"):
        plots.plot_ablation(table, metric="f1_macro")


def test_ablation_table_with_seeds_and_paired_difference(tmp_path):
    """The ablation's own table: seed means and the paired difference to none in a second panel."""
    table = pd.DataFrame({
        "pipeline": ["none", "crop+wb+clahe"], "auc_macro_mean": [0.80, 0.86],
        "auc_macro_lo": [0.7, 0.78], "auc_macro_hi": [0.88, 0.92],
        "auc_macro_diff_vs_none": [0.0, 0.06], "auc_macro_diff_lo": [0.0, 0.01],
        "auc_macro_diff_hi": [0.0, 0.1]})
    fig = plots.plot_ablation(table, path=tmp_path / "abl2.png")
    _png_ok(tmp_path / "abl2.png")
    assert len(fig.axes) == 2


def test_threshold_sweep(tmp_path):
    thr = np.linspace(0.05, 0.95, 19)
    sweep = pd.DataFrame(
        {"threshold": thr, "sensitivity": 1 - thr**3, "ct_fraction": 1 - thr * 0.8, "specificity": thr}
    )
    out = tmp_path / "sweep.png"
    fig = plots.plot_threshold_sweep(sweep, path=out, chosen=0.31)
    _png_ok(out)
    assert fig.covidlib_chosen == pytest.approx(0.3)
    fig = plots.plot_threshold_sweep(sweep.assign(chosen=thr == thr[4]))
    assert fig.covidlib_chosen == pytest.approx(thr[4])
    assert plots.plot_threshold_sweep(sweep.drop(columns="specificity")).covidlib_chosen is None


def test_gradcam_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    hm = {"DenseNet121": rng.random((3, 8, 8)), "Ensemble": rng.random((3, 32, 32))}
    out = tmp_path / "cams.png"
    fig = plots.plot_gradcam_grid(images, hm, captions=["a", "b", "c"], path=out)
    _png_ok(out)
    assert len(fig.axes) == 9
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "DenseNet121", "Ensemble"]
    with pytest.raises(ValueError):
        plots.plot_gradcam_grid(images, {"m": rng.random((2, 8, 8))})
