"""Stage 2 of AICOV-CT: the trained backbones vote, and the vote is the diagnosis.

Three rules, all on per-image class probabilities ``(n_images, n_classes)`` from each model
(each member's softmax, **uncalibrated**: no temperature scaling is applied before voting):

* ``hard`` — majority vote of the models' predicted classes. **Tie-break** (e.g. three models,
  three different classes): among the classes with the most votes, the one with the highest
  mean probability across the models wins.
* ``soft`` — mean probability.
* ``weighted`` — weighted mean probability, the weights chosen on the validation split
  (:func:`fit_vote_weights`), never on test.

What each rule outputs (:data:`OUTPUT_KINDS`, :func:`output_kind`) — the design of issue #11:

* ``soft`` / ``weighted`` output a **probability**: a (weighted) mean of probability vectors is a
  probability vector. Like the members' softmax it is uncalibrated; calibration (ECE, the
  reliability diagram, temperature scaling fitted on validation) applies to it.
* ``hard`` outputs a **ranking score**, ``(votes_c + mean_prob_c) / (n_models + 1)``: its arg-max
  is exactly the voted class (vote counts differ by at least 1 while mean probabilities differ by
  less than 1), and it orders images by confidence rather than by hard labels, so ROC / AUC stay
  meaningful (AUC needs only an ordering). It is **not** a probability: it is quantised by the vote
  count (three members, three classes: a unanimous vote scores at least 0.83, a 2-of-3 vote 0.56 to
  0.75, whatever the real hit rate), so ECE, reliability diagrams and temperature scaling do not
  apply and covidlib never computes them for it. Its columns are named ``score_<class>``
  (``vote:score_<class>`` in ``covidlib predict``), never ``p_<class>``.
* Every rule also reports how many members' own top class is the vote's (``votes``, for the hard
  vote the winning class's vote count; :func:`member_votes`) and that share of the members
  (``agreement``, 1.0 = unanimous).

:func:`build_ensemble_model` saves any of them as one Keras model (one input, the combined output:
the score for ``hard``, the probability otherwise) that loads and predicts on its own; the run's
``models/ensemble/config.json`` records which (``"output"``).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

import keras
from keras import layers, ops

from covidlib import evaluate

METHODS = ("hard", "soft", "weighted")
#: What :func:`combine` returns for each method: ``"probability"`` or ``"score"`` (see above).
OUTPUT_KINDS: dict[str, str] = {"hard": "score", "soft": "probability", "weighted": "probability"}
#: Column-name prefix per output kind: ``p_<class>`` / ``score_<class>`` (the evaluation's table).
OUTPUT_PREFIX: dict[str, str] = evaluate.OUTPUT_PREFIX
SCORE_DEFINITION = ("hard-vote ranking score (votes_c + mean member probability_c) / (n_members + 1): "
                    "its arg-max is the voted class and it orders images for ROC / AUC, but it is not "
                    "a probability (quantised by the vote count), so it has no calibration, ECE or "
                    "temperature")
PROBABILITY_DEFINITION = ("mean of the members' softmax probabilities (weighted for 'weighted'): a "
                          "probability, uncalibrated (no temperature scaling applied)")


def output_kind(method: str) -> str:
    """``"score"`` for the hard vote, ``"probability"`` for the soft and weighted votes.

    Raises:
        ValueError: unknown method.
    """
    if method not in OUTPUT_KINDS:
        raise ValueError(f"unknown vote method {method!r}; choose one of {list(METHODS)}")
    return OUTPUT_KINDS[method]


def _stack(probs_list: Sequence[np.ndarray]) -> np.ndarray:
    if len(probs_list) == 0:
        raise ValueError("need at least one model's probabilities to vote")
    arr = np.stack([np.asarray(p, dtype=np.float64) for p in probs_list])
    if arr.ndim != 3:
        raise ValueError("each probability array must be (n_images, n_classes)")
    return arr


def majority_vote(probs_list: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Hard majority vote with the mean-probability tie-break.

    Args:
        probs_list: one ``(n, k)`` probability array per model.

    Returns:
        ``(labels, scores)``: the voted class per image and the ``(n, k)`` ranking score described
        in the module docstring (arg-max of ``scores`` == ``labels``; not a probability).
    """
    arr = _stack(probs_list)
    n_models, _, k = arr.shape
    votes = np.eye(k)[arr.argmax(axis=2)].sum(axis=0)  # (n, k)
    scores = (votes + arr.mean(axis=0)) / (n_models + 1)
    return scores.argmax(axis=1), scores


def member_votes(probs_list: Sequence[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """How many members' own top class is ``labels`` (the vote's class), per image, ``(n,)`` ints.

    For the hard vote this is the winning class's vote count; divided by the number of members it
    is the vote's agreement. A member's top class is its first maximal probability, as in
    :func:`majority_vote` and :class:`VoteLayer`.
    """
    arr = _stack(probs_list)
    labels = np.asarray(labels)
    if labels.shape != arr.shape[1:2]:
        raise ValueError(f"labels must hold one class per image ({arr.shape[1]}), got {labels.shape}")
    return (arr.argmax(axis=2) == labels[None, :]).sum(axis=0).astype(np.int64)


def soft_vote(probs_list: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted (or plain) mean of the models' probabilities, ``(n, k)``."""
    arr = _stack(probs_list)
    w = np.ones(len(arr)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(arr),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(arr)} non-negative numbers with a positive sum")
    return np.tensordot(w / w.sum(), arr, axes=1)


def fit_vote_weights(val_probs_list: Sequence[np.ndarray], y_val: np.ndarray,
                     step: float = 0.1) -> list[float]:
    """Choose soft-vote weights on the validation split by minimising its log-loss.

    A grid over the simplex (``step`` apart) is small for three models (66 points) and cannot
    overfit the way free continuous weights would on a few hundred validation images. Ties go
    to the most uniform weights.
    """
    arr = _stack(val_probs_list)
    y = np.asarray(y_val, dtype=np.int64)
    m = len(arr)
    ticks = int(round(1 / step))
    best_key, best_w = (np.inf, np.inf), [1.0 / m] * m
    for combo in itertools.product(range(ticks + 1), repeat=m):
        if sum(combo) != ticks:
            continue
        w = np.array(combo, dtype=np.float64) / ticks
        p = np.tensordot(w, arr, axes=1)
        nll = -np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)))
        key = (round(nll, 12), np.abs(w - 1.0 / m).sum())  # then the most uniform weights
        if key < best_key:
            best_key, best_w = key, w.tolist()
    return [float(v) for v in best_w]


def combine(probs_list: Sequence[np.ndarray], method: str = "hard",
            weights: Sequence[float] | None = None) -> np.ndarray:
    """The ensemble's ``(n, k)`` output for ``method`` (arg-max = the diagnosis).

    A ranking score for ``"hard"``, an (uncalibrated) probability for ``"soft"`` / ``"weighted"``:
    see :func:`output_kind`. Name its columns with ``OUTPUT_PREFIX[output_kind(method)]``.
    """
    if method == "hard":
        return majority_vote(probs_list)[1]
    if method == "soft":
        return soft_vote(probs_list)
    if method == "weighted":
        if weights is None:
            raise ValueError("the weighted vote needs weights (fit them on validation)")
        return soft_vote(probs_list, weights)
    raise ValueError(f"unknown vote method {method!r}; choose one of {list(METHODS)}")


@keras.saving.register_keras_serializable(package="covidlib")
class VoteLayer(layers.Layer):
    """Combines the members' probabilities inside a Keras model (same rules as :func:`combine`).

    The output is the hard vote's ranking score or the soft / weighted vote's probability
    (:attr:`output_kind`).
    """

    def __init__(self, method: str = "hard", weights: Sequence[float] | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"unknown vote method {method!r}")
        self.method = method
        self.vote_weights = None if weights is None else [float(w) for w in weights]

    def call(self, inputs):
        stacked = ops.stack([ops.cast(p, "float32") for p in inputs], axis=0)  # (m, n, k)
        m = len(inputs)
        if self.method == "hard":
            # One vote per member for its first maximal class (argmax's tie rule), built from
            # equal + cumsum: argmax on floats lowers to BitwiseAnd under TensorFlow, which the
            # builtin TFLite runtime lacks, and this layer must export.
            is_max = ops.cast(ops.equal(stacked, ops.max(stacked, axis=-1, keepdims=True)), "float32")
            first = is_max * ops.cast(ops.equal(ops.cumsum(is_max, axis=-1), 1.0), "float32")
            votes = ops.sum(first, axis=0)
            return (votes + ops.mean(stacked, axis=0)) / (m + 1)
        w = [1.0] * m if self.method == "soft" or self.vote_weights is None else self.vote_weights
        total = float(sum(w))
        w_t = ops.reshape(ops.convert_to_tensor([v / total for v in w], dtype="float32"), (m, 1, 1))
        return ops.sum(stacked * w_t, axis=0)

    @property
    def output_kind(self) -> str:
        """``"score"`` (hard vote) or ``"probability"`` (soft / weighted)."""
        return output_kind(self.method)

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    def get_config(self) -> dict:
        return {**super().get_config(), "method": self.method, "weights": self.vote_weights}


def build_ensemble_model(models: dict[str, keras.Model] | Sequence[keras.Model],
                         method: str = "hard", weights: Sequence[float] | None = None) -> keras.Model:
    """One Keras model: a single image input, every member applied, combined by :class:`VoteLayer`.

    Members must share input shape and class order (check ``labels.json`` before calling). The
    model outputs what :func:`combine` does: for ``"hard"`` the ranking score, not a probability;
    record ``output_kind(method)`` next to the saved model (``config.json`` ``"output"``).
    """
    members = dict(models) if isinstance(models, dict) else {
        f"member{i}": m for i, m in enumerate(models)}
    if not members:
        raise ValueError("an ensemble needs at least one model")
    shapes = {tuple(m.input_shape[1:]) for m in members.values()}
    outs = {m.output_shape[-1] for m in members.values()}
    if len(shapes) != 1 or len(outs) != 1:
        raise ValueError(f"members disagree on input shape {shapes} or class count {outs}")
    if method == "weighted" and (weights is None or len(weights) != len(members)):
        raise ValueError("the weighted vote needs one weight per member")
    inp = keras.Input(shapes.pop(), name="image")
    member_outputs = []
    for name, model in members.items():
        model.name = name  # layer names must be unique inside the ensemble
        member_outputs.append(model(inp))
    out = VoteLayer(method, weights, name="vote")(member_outputs)
    return keras.Model(inp, out, name=f"ensemble_{method}")
