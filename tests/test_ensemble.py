"""Tests for covidlib.ensemble: vote rules, weight fitting and the saved ensemble model."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import keras  # a hard dependency: a broken install must fail, not skip

from covidlib import ensemble, models  # noqa: E402

S = 32


def _onehotish(labels, k=3, p=0.8):
    """Rows putting ``p`` on the given class and the rest evenly on the others."""
    out = np.full((len(labels), k), (1 - p) / (k - 1))
    out[np.arange(len(labels)), labels] = p
    return out


def _random_probs(rng, n, k):
    return rng.dirichlet(np.ones(k), size=n)


def test_majority_vote_clear_majority():
    a = _onehotish([0, 1, 2, 2])
    b = _onehotish([0, 1, 1, 2])
    c = _onehotish([1, 2, 1, 0], p=0.99)  # very confident, but outvoted
    labels, scores = ensemble.majority_vote([a, b, c])
    assert list(labels) == [0, 1, 1, 2]
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)


def test_three_way_tie_goes_to_highest_mean_probability():
    a = np.array([[0.50, 0.30, 0.20]])  # votes covid
    b = np.array([[0.10, 0.45, 0.45 - 1e-9]])  # votes cap
    c = np.array([[0.05, 0.35, 0.60]])  # votes normal
    # mean = [0.217, 0.367, 0.417]: normal wins although covid had the most confident vote-winner
    labels, scores = ensemble.majority_vote([a, b, c])
    assert labels[0] == 2
    np.testing.assert_allclose(scores[0], (1 + np.mean([a, b, c], axis=0)[0]) / 4)
    c2 = np.array([[0.25, 0.35, 0.40]])  # still votes normal, but now mean cap 0.367 > normal 0.35
    assert ensemble.majority_vote([a, b, c2])[0][0] == 1


def test_two_two_tie_among_four_models():
    a, b = _onehotish([0], p=0.9), _onehotish([0], p=0.5)
    c, d = _onehotish([1], p=0.6), _onehotish([1], p=0.6)
    # votes 2-2; mean covid = (0.9+0.5+0.2+0.2)/4 = 0.45 > cap (0.05+0.25+0.6+0.6)/4 = 0.375
    assert ensemble.majority_vote([a, b, c, d])[0][0] == 0


@pytest.mark.parametrize("seed", range(30))
def test_vote_scores_argmax_equals_labels_property(seed):
    rng = np.random.default_rng(seed)
    m, n, k = rng.integers(1, 6), 50, rng.integers(2, 5)
    probs = [_random_probs(rng, n, k) for _ in range(m)]
    labels, scores = ensemble.majority_vote(probs)
    np.testing.assert_array_equal(scores.argmax(axis=1), labels)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)
    # The rule itself: winner has the most votes, and the highest mean among the tied.
    votes = np.stack([np.bincount(np.stack(probs)[:, i].argmax(axis=1), minlength=k)
                      for i in range(n)])
    mean = np.mean(probs, axis=0)
    for i in range(n):
        tied = np.flatnonzero(votes[i] == votes[i].max())
        assert labels[i] == tied[np.argmax(mean[i, tied])]


def test_soft_and_weighted_vote():
    rng = np.random.default_rng(1)
    probs = [_random_probs(rng, 20, 3) for _ in range(3)]
    np.testing.assert_allclose(ensemble.soft_vote(probs), np.mean(probs, axis=0))
    np.testing.assert_allclose(ensemble.combine(probs, "soft"), np.mean(probs, axis=0))
    w = [2.0, 1.0, 1.0]
    want = 0.5 * probs[0] + 0.25 * probs[1] + 0.25 * probs[2]
    np.testing.assert_allclose(ensemble.soft_vote(probs, w), want)
    np.testing.assert_allclose(ensemble.combine(probs, "weighted", w), want)
    np.testing.assert_allclose(ensemble.soft_vote(probs, [0, 1, 0]), probs[1])
    np.testing.assert_allclose(ensemble.combine(probs, "hard"), ensemble.majority_vote(probs)[1])


def test_vote_input_errors():
    p = [np.full((2, 3), 1 / 3)] * 2
    with pytest.raises(ValueError, match="non-negative"):
        ensemble.soft_vote(p, [1.0, -1.0])
    with pytest.raises(ValueError, match="non-negative"):
        ensemble.soft_vote(p, [0.0, 0.0])
    with pytest.raises(ValueError):
        ensemble.soft_vote(p, [1.0])
    with pytest.raises(ValueError, match="needs weights"):
        ensemble.combine(p, "weighted")
    with pytest.raises(ValueError, match="unknown vote method"):
        ensemble.combine(p, "median")
    with pytest.raises(ValueError, match="at least one"):
        ensemble.majority_vote([])


def test_fit_vote_weights_prefers_the_good_model():
    rng = np.random.default_rng(0)
    n, k = 200, 3
    y = rng.integers(0, k, n)
    perfect = _onehotish(y, k, p=0.98)
    noise1, noise2 = _random_probs(rng, n, k), _random_probs(rng, n, k)
    w = ensemble.fit_vote_weights([noise1, perfect, noise2], y)
    assert sum(w) == pytest.approx(1.0)
    assert w[1] >= 0.8 and w[1] == max(w)
    # Identical models: every weighting ties, and the most uniform grid point (0.3/0.3/0.4 with
    # step 0.1; 1/3 is not on the grid) is kept, not the first or a corner.
    same = ensemble.fit_vote_weights([perfect, perfect, perfect], y)
    assert sorted(same) == pytest.approx([0.3, 0.3, 0.4])
    assert ensemble.fit_vote_weights([perfect, perfect], y) == pytest.approx([0.5, 0.5])


def _member(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    m = models.build_model("SmallCNN", 3, S)
    dense = m.get_layer("predictions")
    kernel, bias = dense.get_weights()
    # Confident, seed-dependent outputs so the three members really disagree.
    dense.set_weights([kernel * 40.0, bias + np.random.default_rng(seed).normal(0, 1, bias.shape)])
    return m


@pytest.fixture(scope="module")
def members():
    return {name: _member(i) for i, name in enumerate(["DenseNet121", "ResNet50V2", "MobileNetV2"])}


@pytest.mark.parametrize("method,weights", [("hard", None), ("soft", None),
                                            ("weighted", [0.6, 0.3, 0.1])])
def test_ensemble_model_saves_loads_and_matches_combine(members, tmp_path, method, weights):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(12, S, S, 1)).astype("float32")
    member_probs = [np.asarray(m(x, training=False)) for m in members.values()]
    assert len({tuple(p.argmax(axis=1)) for p in member_probs}) > 1  # they disagree somewhere
    model = ensemble.build_ensemble_model(members, method, weights)
    path = tmp_path / f"ens_{method}.keras"
    model.save(path)
    loaded = models.load_model(path)  # safe mode
    got = np.asarray(loaded(x, training=False))
    want = ensemble.combine(member_probs, method, weights)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))


def test_build_ensemble_model_rejects_mismatches():
    keras.utils.set_random_seed(0)
    a = models.build_model("SmallCNN", 3, S, augment=False)
    b = models.build_model("SmallCNN", 2, S, augment=False)
    with pytest.raises(ValueError, match="disagree"):
        ensemble.build_ensemble_model([a, b])
    with pytest.raises(ValueError, match="one weight per member"):
        ensemble.build_ensemble_model([a], "weighted", [0.5, 0.5])
    with pytest.raises(ValueError, match="at least one"):
        ensemble.build_ensemble_model([])


def test_output_kinds_hard_is_a_score_soft_and_weighted_are_probabilities(members):
    """Issue #11: what each rule outputs is recorded, so nothing calibrates the hard vote's score."""
    assert ensemble.output_kind("hard") == "score"
    assert ensemble.output_kind("soft") == ensemble.output_kind("weighted") == "probability"
    assert ensemble.OUTPUT_PREFIX == {"probability": "p_", "score": "score_"}
    with pytest.raises(ValueError, match="unknown vote method"):
        ensemble.output_kind("median")
    model = ensemble.build_ensemble_model(members, "hard")
    assert model.get_layer("vote").output_kind == "score"
    # Why it is no probability: with 3 members and 3 classes a unanimous vote scores >= 0.83
    # however unsure the members are.
    unsure = [np.array([[0.34, 0.33, 0.33]])] * 3
    assert ensemble.combine(unsure, "hard")[0, 0] >= 0.83 > ensemble.combine(unsure, "soft")[0, 0]


def test_member_votes_counts_agreement_with_the_vote():
    a = _onehotish([0, 1, 2, 2])
    b = _onehotish([0, 1, 1, 2])
    c = _onehotish([1, 2, 1, 0], p=0.99)
    labels, _ = ensemble.majority_vote([a, b, c])
    np.testing.assert_array_equal(ensemble.member_votes([a, b, c], labels), [2, 2, 2, 2])
    np.testing.assert_array_equal(ensemble.member_votes([a, b, c], np.array([0, 0, 0, 0])),
                                  [2, 0, 0, 1])
    with pytest.raises(ValueError, match="one class per image"):
        ensemble.member_votes([a, b], np.array([0, 1]))
