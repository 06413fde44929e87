"""Predict with a trained run: every CT member model and their vote, on files or folders.

:func:`predict_paths` reads PNG / JPEG / BMP / TIFF, DICOM and NIfTI (one row per axial slice,
key ``<file>#z0012`` as in :func:`covidlib.images.iter_images`), prepares each image the way the
member was trained (the enhancement recorded in its ``config.json``, then
:func:`covidlib.arraystore.square_resize` to its ``img_size``), runs every member and combines them with
:func:`covidlib.ensemble.combine`. One row per image::

    path, prediction, vote:p_<class>... | vote:score_<class>..., vote:votes, vote:agreement,
    <NAME>:p_<class>..., [<NAME>:tta_sd], [gradcam_<NAME>..., gradcam_vote], error

What the numbers are (:func:`describe_columns`; also ``df.attrs["columns"]``, the
``<out>.columns.json`` file next to a written CSV, and a line of :func:`format_table`):

* ``<NAME>:p_<class>``: the member's softmax probability, **uncalibrated** (no temperature scaling).
* soft / weighted vote: ``vote:p_<class>``, the (weighted) mean of those: a probability, uncalibrated.
* hard vote: ``vote:score_<class>``, a **ranking score** ``(votes_c + mean p_c) / (n_members + 1)``:
  its arg-max is the voted class and it ranks images (ROC / AUC), but it is not a probability, so
  it never carries a ``p_`` name.
* ``vote:votes``: how many members' own top class is the vote's class; ``vote:agreement``: that
  divided by the number of members (1.0 = unanimous).
* with test-time augmentation (``tta=N``, :func:`predict_tta`): each member's ``p_<class>`` is the
  mean over N fixed views (:data:`TTA_TRANSFORMS`), the vote combines those means, and
  ``<NAME>:tta_sd`` is the spread across the views of the probability of the class the member
  predicts (population SD, 0..0.5). ``tta=0`` (the default) is the plain prediction.

A file that cannot be read, an image that ingestion would refuse (:func:`covidlib.images.image_problem`:
too small, blank) and a folder that cannot be listed get a row with only ``path`` and ``error``
filled: one bad file never stops the batch and is never dropped. Model folders are checked before
they are trusted (:mod:`covidlib.runs`); output paths are checked before any work
(:func:`check_outputs`). Models are loaded in Keras safe mode
(:func:`covidlib.models.load_model`): a model file holding code (a ``Lambda`` layer) is refused.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from covidlib import config
from covidlib import images as cimg
from covidlib.fsutil import atomic_write_text, slug
from covidlib.runs import ModelFolderError, load_model_dir, member_dir, read_json

__all__ = [
    "Member",
    "find_members",
    "load_members",
    "vote_settings",
    "expand_paths",
    "iter_inputs",
    "predict_paths",
    "write_predictions",
    "format_table",
    "describe_columns",
    "columns_path",
    "check_outputs",
    "TTA_TRANSFORMS",
    "tta_views",
    "predict_tta",
]

_MEMBER_NOTE = "softmax probability of member {name}, uncalibrated (no temperature scaling)"
_VOTES_NOTE = "number of members whose own top class is the vote's class"
_AGREEMENT_NOTE = "vote:votes / number of members (1.0 = unanimous)"

#: Test-time augmentation views, in this fixed order: ``tta=N`` averages the first ``N`` (N=1 is
#: the identity alone). Only transforms inside the training augmentation's range
#: (:class:`covidlib.models.RandomAffine`: horizontal flip, shifts up to 6 % of the side).
TTA_TRANSFORMS: tuple[str, ...] = (
    "identity", "hflip", "shift_right", "shift_left", "shift_down", "shift_up",
    "hflip+shift_right", "hflip+shift_left", "hflip+shift_down", "hflip+shift_up",
)
#: A TTA shift moves the image by this fraction of its side (at least 1 pixel), filling with 0
#: as the training warp does: half the training augmentation's largest shift.
TTA_SHIFT = 0.03
_TTA_SD_NOTE = ("test-time augmentation spread of member {name}: population SD, across the {n} views "
                "({views}), of its probability of the class its TTA mean predicts; 0 = views agree, "
                "at most 0.5")


@dataclass
class Member:
    """One trained model of a run, ready to predict."""

    name: str
    model_dir: Path
    model: Any
    classes: list[str]
    img_size: int
    enhancement: dict | None = None  # None: images go in as read (pipeline "none")
    config: dict = field(default_factory=dict)

    @property
    def prep_key(self) -> tuple:
        """Members with equal keys see identical input arrays."""
        return (json.dumps(self.enhancement, sort_keys=True), self.img_size)


# --------------------------------------------------------------------------- members
def find_members(run_dir: str | os.PathLike | None = None,
                 model_dirs: Sequence[str | os.PathLike] | None = None) -> dict[str, Path]:
    """Which model folders to run, by name.

    ``model_dirs`` wins when given (each a folder with ``model.keras``, or the ``.keras`` file in
    it). Otherwise the run's ensemble members (``RUN_DIR/models/ensemble/config.json``
    ``"members"``), else every ``RUN_DIR/models/<NAME>`` whose ``config.json`` says
    ``modality == "ct"``, leaving out ``ablation_*`` runs and the ensemble itself.

    Raises:
        ValueError: neither argument given, or two model folders with the same name.
        FileNotFoundError: no models folder, a listed member missing, or no CT model found.
    """
    if model_dirs:
        out: dict[str, Path] = {}
        for d in model_dirs:
            p = Path(d).expanduser()
            if p.is_file() and p.suffix == ".keras":
                p = p.parent
            if not (p / "model.keras").is_file():
                raise FileNotFoundError(f"{p} holds no trained model (model.keras)")
            if p.name in out:
                raise ValueError(f"two model folders are named {p.name!r}; names must be unique "
                                 "(they name the output columns)")
            out[p.name] = p
        return out
    if run_dir is None:
        raise ValueError("give run_dir (a trained run folder) or model_dirs")
    models = Path(run_dir).expanduser() / "models"
    if not models.is_dir():
        raise FileNotFoundError(f"{models} does not exist: train the CT models first "
                                "(`covidlib train` or notebook 03)")
    ens_cfg = models / "ensemble" / "config.json"
    if ens_cfg.is_file():
        cfg = read_json(ens_cfg)
        names = (cfg.get("members") if isinstance(cfg, dict) else None) or []
        if not isinstance(names, list):
            raise ModelFolderError(f"{ens_cfg}: 'members' must be a list of model folder names, "
                                   f"got {names!r}")
        if names:
            dirs = {n: member_dir(models, n, ens_cfg) for n in names}  # never outside the run
            missing = [n for n, d in dirs.items() if not (d / "model.keras").is_file()]
            if missing:
                raise FileNotFoundError(f"{ens_cfg} lists members {missing} that have no "
                                        f"model.keras under {models}")
            return dirs
    out = {}
    for d in sorted(p for p in models.iterdir() if p.is_dir()):
        if d.name == "ensemble" or d.name.startswith("ablation_") or not (d / "model.keras").is_file():
            continue
        cfg_path = d / "config.json"
        if cfg_path.is_file() and read_json(cfg_path).get("modality", "ct") == "ct":
            out[d.name] = d
    if not out:
        raise FileNotFoundError(f"no trained CT model under {models} (folders with model.keras and "
                                "config.json modality 'ct')")
    return out


def _enhancement(cfg: dict, where: Path) -> dict | None:
    from covidlib import enhance

    enh = cfg.get("enhancement")
    if enh in (None, "", "none"):
        return None
    if isinstance(enh, str):
        enh = enhance.pipeline_config(enh, cfg.get("modality", "ct"))
    if not isinstance(enh, dict) or "name" not in enh:
        raise ValueError(f"{where}: unrecognised 'enhancement' entry {enh!r}")
    if enh["name"] == "none":
        return None
    if enh.get("version", enhance.ENHANCE_VERSION) != enhance.ENHANCE_VERSION:
        warnings.warn(f"{where}: trained on enhancement version {enh.get('version')}, this covidlib has "
                      f"{enhance.ENHANCE_VERSION}; inputs may be prepared slightly differently",
                      UserWarning, stacklevel=3)
    return {"name": enh["name"], "modality": enh.get("modality", cfg.get("modality", "ct")),
            "params": dict(enh.get("params") or {})}


def load_members(members: dict[str, Path]) -> list[Member]:
    """Load every member (Keras safe mode) after checking its folder, and check that they agree
    on the class order.

    Each folder goes through :func:`covidlib.runs.load_model_dir`: labels.json a list of class
    names equal (same order) to config.json's ``classes``, a sane ``img_size`` equal to the
    model's input size, a complete ``model.keras``, one output per class.

    Raises:
        ValueError (:class:`covidlib.runs.ModelFolderError`): a model file holds code (refused by
            safe mode) or is damaged, labels.json / config.json / the model disagree, class
            orders differ between members.
    """
    from covidlib import ensemble  # noqa: F401 - registers VoteLayer should a member be an ensemble

    out: list[Member] = []
    for name, d in members.items():
        model, classes, cfg = load_model_dir(d)
        out.append(Member(name, d, model, list(classes), int(cfg["img_size"]),
                          _enhancement(cfg, d / "config.json"), cfg))
    orders = {m.name: m.classes for m in out}
    if len({tuple(c) for c in orders.values()}) > 1:
        shown = "; ".join(f"{n}: {c}" for n, c in orders.items())
        raise ValueError(f"the models disagree on the class order ({shown}); they cannot vote together")
    return out


def vote_settings(run_dir: str | os.PathLike | None, member_names: Sequence[str],
                  vote: str | None = None) -> tuple[str, list[float] | None]:
    """The vote method and weights: ``vote`` if given, else the run's ensemble config, else hard.

    Weights come from ``RUN_DIR/models/ensemble/config.json`` (fitted on validation) and only when
    its members are exactly ``member_names``.

    Raises:
        ValueError: unknown method, or a weighted vote with no fitted weights for these members.
    """
    from covidlib.ensemble import METHODS

    cfg: dict = {}
    if run_dir is not None:
        path = Path(run_dir).expanduser() / "models" / "ensemble" / "config.json"
        if path.is_file():
            cfg = read_json(path)
    method = vote or cfg.get("method") or "hard"
    if method not in METHODS:
        raise ValueError(f"unknown vote method {method!r}; choose one of {list(METHODS)}")
    weights = None
    if method == "weighted":
        weights = cfg.get("weights")
        if not weights or list(cfg.get("members") or []) != list(member_names):
            raise ValueError("the weighted vote needs weights fitted on validation for exactly these "
                             f"members {list(member_names)}; the run's ensemble config has "
                             f"{'none' if not weights else 'weights for ' + str(cfg.get('members'))} "
                             "(run `covidlib evaluate --vote weighted`, or use --vote soft / hard)")
        weights = [float(w) for w in weights]
    return method, weights


# --------------------------------------------------------------------------- inputs
def _is_candidate(p: Path) -> bool:
    suf = p.suffix.lower()
    if suf in config.IMAGE_EXTENSIONS or suf == ".dcm" or cimg.is_nifti_path(p):
        return True
    return suf == "" and cimg.is_dicom_file(p)


def _dicom_order(files: list[Path]) -> list[Path]:
    """DICOM slices of one folder in body-axis order (unreadable headers last, by name)."""
    headed, rest = [], []
    for p in files:
        try:
            headed.append((p, cimg._dcmread(p, stop_before_pixels=True)))
        except Exception:  # noqa: BLE001 - reported when the file itself is read
            rest.append(p)
    headed.sort(key=lambda t: cimg.dicom_sort_key(t[1], t[0].name))
    return [p for p, _ in headed] + sorted(rest)


def expand_paths(paths: Iterable[str | os.PathLike],
                 unreadable: dict[Path, str] | None = None) -> tuple[list[Path], list[Path]]:
    """Files to read, and files skipped inside folders (other types, e.g. ``.txt``).

    A path named explicitly is always read (an unreadable one becomes an error row); folders are
    walked recursively in sorted order, hidden entries skipped, DICOM slices in body-axis order.
    A sub-folder that cannot be listed (permissions) is put in the file list at its place and
    its reason in ``unreadable`` (:func:`iter_inputs` turns it into an error row); without that
    dict it is skipped with a warning, never silently.
    """
    files: list[Path] = []
    skipped: list[Path] = []

    def note(err: OSError) -> None:
        folder = Path(err.filename) if err.filename else root
        reason = f"folder could not be read ({err.strerror or err}): its images were not predicted"
        if unreadable is None:
            warnings.warn(f"{folder}: {reason}", UserWarning, stacklevel=3)
            return
        unreadable[folder] = reason
        files.append(folder)

    for raw in paths:
        root = Path(raw).expanduser()
        if not root.is_dir():
            files.append(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root, onerror=note):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            d = Path(dirpath)
            here = [d / f for f in sorted(filenames) if not f.startswith(".")]
            keep = [p for p in here if _is_candidate(p)]
            skipped.extend(p for p in here if p not in keep)
            dicoms = [p for p in keep if p.suffix.lower() in (".dcm", "")]
            files.extend(_dicom_order(dicoms) + [p for p in keep if p not in dicoms])
    return files, skipped


def _read_file(p: Path, window: str) -> list[tuple[str, np.ndarray]]:
    """``(key, 2-D image)`` for every image in one file (one per slice/frame for volumes)."""
    if not os.path.lexists(p):
        raise cimg.ImageNotFoundError(p, "file not found")
    if p.is_dir():
        raise cimg.ImageReadError(p, "is a folder")
    out = []
    for key, img in cimg.iter_images(p, window=window, errors="raise"):
        out.append((str(p) + key[len(p.name):], img))
    if not out:
        raise cimg.ImageReadError(p, "holds no image (empty volume?)")
    return out


def iter_inputs(files: Iterable[Path], window: str = "lung",
                unreadable: dict[Path, str] | None = None,
                ) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """``(key, image, None)`` per usable image, ``(key, None, reason)`` per refused one.

    ``files`` and ``unreadable`` as filled by :func:`expand_paths`. An image is refused when it
    cannot be read, or when it decodes but is no usable picture: ingestion's own check
    (:func:`covidlib.images.image_problem`: smaller than 16 px a side, blank) refuses it too, so a
    1x1 or an all-black image never gets class probabilities.
    """
    for p in files:
        if unreadable and p in unreadable:
            yield str(p), None, unreadable[p]
            continue
        try:
            items = _read_file(p, window)
        except cimg.ImageReadError as exc:
            yield str(p), None, exc.reason
            continue
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's error, not the batch's
            yield str(p), None, f"{type(exc).__name__}: {exc}"
            continue
        for key, img in items:
            problem = cimg.image_problem(img)
            yield (key, None, problem) if problem else (key, img, None)


def _prepare(img: np.ndarray, member: Member, enhanced: bool) -> np.ndarray:
    """One image as the member saw it in training: enhancement (if any), uint8, square resize."""
    from covidlib.arraystore import square_resize

    if member.enhancement is not None and not enhanced:
        from covidlib import enhance

        e = member.enhancement
        img = enhance.enhance(img, e["name"], modality=e["modality"], **e["params"])
    return square_resize(cimg.to_uint8(img), member.img_size)


# --------------------------------------------------------------------------- predicting
def _predict(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    out = [np.asarray(model.predict_on_batch(x[i:i + batch_size]), dtype=np.float64)
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def _check_tta(tta: Any) -> int:
    if isinstance(tta, bool) or not isinstance(tta, (int, np.integer)) or not 0 <= tta <= len(TTA_TRANSFORMS):
        raise ValueError(f"tta must be an int from 0 (off) to {len(TTA_TRANSFORMS)}: the first N views of "
                         f"{', '.join(TTA_TRANSFORMS)}; got {tta!r}")
    return int(tta)


def _tta_view(x: np.ndarray, name: str) -> np.ndarray:
    """One view of a batch ``(n, H, W, C)``: horizontal flip and / or a shift, zero fill."""
    out = x[:, :, ::-1] if name.startswith("hflip") else x
    shift = name.rsplit("+", 1)[-1]
    if not shift.startswith("shift_"):
        return np.ascontiguousarray(out)
    side = x.shape[2] if shift in ("shift_right", "shift_left") else x.shape[1]
    d = max(1, int(round(TTA_SHIFT * side)))
    res = np.zeros_like(x)
    if shift == "shift_right":
        res[:, :, d:] = out[:, :, :-d]
    elif shift == "shift_left":
        res[:, :, :-d] = out[:, :, d:]
    elif shift == "shift_down":
        res[:, d:] = out[:, :-d]
    else:
        res[:, :-d] = out[:, d:]
    return res


def tta_views(x: np.ndarray, n: int) -> list[np.ndarray]:
    """The first ``n`` test-time augmentation views (:data:`TTA_TRANSFORMS` order) of a batch.

    Args:
        x: ``(n_images, H, W, C)`` model inputs (raw 0..255 gray, as the models take them).
        n: number of views, 0..len(TTA_TRANSFORMS).
    """
    n = _check_tta(n)
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be a batch (n_images, H, W, C), got shape {x.shape}")
    return [_tta_view(x, name) for name in TTA_TRANSFORMS[:n]]


def predict_tta(model: Any, x: np.ndarray, n: int, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A model's class probabilities averaged over ``n`` TTA views, and their spread per image.

    Returns:
        ``(mean, sd)``: ``mean`` ``(n_images, n_classes)`` float64, the mean over the views of the
        softmax output (so still sums to 1); ``sd`` ``(n_images,)``, the population standard
        deviation across the views of the probability of the class ``mean`` predicts (in
        [0, 0.5]; 0 when every view gives that class the same probability). ``n=1`` (identity)
        gives exactly the plain prediction and ``sd`` 0.
    """
    if _check_tta(n) < 1:
        raise ValueError("predict_tta needs at least one view (n >= 1)")
    per = np.stack([_predict(model, v, batch_size) for v in tta_views(x, n)])  # (views, images, classes)
    mean = per.mean(axis=0)
    top = mean.argmax(axis=1)
    return mean, per[:, np.arange(len(top)), top].std(axis=0)


class _Run:
    """State of one predict_paths call: members, vote, output rows."""

    def __init__(self, members: list[Member], method: str, weights: list[float] | None,
                 gradcam_dir: Path | None, batch_size: int, enhanced: bool, tta: int = 0):
        self.members = members
        self.classes = members[0].classes
        self.method, self.weights = method, weights
        from covidlib.ensemble import OUTPUT_PREFIX, output_kind

        self.output = output_kind(method)
        self.vote_prefix = f"vote:{OUTPUT_PREFIX[self.output]}"  # vote:p_ or vote:score_
        self.gradcam_dir = gradcam_dir
        self.batch_size = batch_size
        self.enhanced = enhanced
        self.tta = tta
        self.rows: list[dict[str, Any]] = []
        self.cam_failed: set[str] = set()

    def _member_outputs(self, inputs: dict[tuple, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Each member's probabilities (TTA means with ``tta``) and, with ``tta``, their spread."""
        if not self.tta:
            return {m.name: _predict(m.model, inputs[m.prep_key], self.batch_size) for m in self.members}, {}
        out = {m.name: predict_tta(m.model, inputs[m.prep_key], self.tta, self.batch_size) for m in self.members}
        return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}

    def error_row(self, key: str, reason: str) -> None:
        self.rows.append({"path": key, "error": reason})

    def predict_all(self, inputs: Iterable[tuple[str, np.ndarray | None, str | None]]) -> None:
        """Rows for everything :func:`iter_inputs` yields, in input order, ``batch_size`` at a time."""
        pending: list[tuple[str, np.ndarray]] = []
        for key, img, err in inputs:
            if err is not None:
                # Readable images before it keep their place in the output order.
                self.flush(pending)
                pending = []
                self.error_row(key, err)
                continue
            pending.append((key, img))
            if len(pending) >= self.batch_size:
                self.flush(pending)
                pending = []
        self.flush(pending)

    def _prepare_chunk(self, pending: list[tuple[str, np.ndarray]]
                       ) -> tuple[list[tuple[str, str | None]], dict[tuple, np.ndarray]]:
        """``(key, error or None)`` per image in input order, and the model inputs of the good ones.

        Each image is prepared once per distinct member input (:attr:`Member.prep_key`).
        """
        from covidlib.models import check_input_scale

        by_key = {m.prep_key: m for m in self.members}
        xs: dict[tuple, list[np.ndarray]] = {pk: [] for pk in by_key}
        order: list[tuple[str, str | None]] = []
        for key, img in pending:
            try:
                prepared = {pk: _prepare(img, m, self.enhanced) for pk, m in by_key.items()}
            except Exception as exc:  # noqa: BLE001 - e.g. an enhancement step refusing this image
                order.append((key, f"could not prepare the image ({type(exc).__name__}: {exc})"))
                continue
            order.append((key, None))
            for pk, arr in prepared.items():
                xs[pk].append(arr)
        inputs: dict[tuple, np.ndarray] = {}
        if any(err is None for _, err in order):
            for pk, arrs in xs.items():
                inputs[pk] = np.stack(arrs).astype(np.float32)[..., None]
                check_input_scale(inputs[pk], where="predict batch")
        return order, inputs

    def flush(self, pending: list[tuple[str, np.ndarray]]) -> None:
        """Predict a chunk of readable images and append their rows (in input order)."""
        from covidlib.ensemble import combine, member_votes

        order, inputs = self._prepare_chunk(pending)
        keep = [k for k, e in order if e is None]
        if keep:
            probs, spread = self._member_outputs(inputs)
            member_probs = [probs[m.name] for m in self.members]
            vote = combine(member_probs, self.method, self.weights)
            winner = vote.argmax(axis=1)
            n_votes = member_votes(member_probs, winner)
            # The row numbers the good images get (Grad-CAM file names start with them).
            row_ids = [len(self.rows) + j for j, (_, err) in enumerate(order) if err is None]
            cams = self._gradcams(keep, row_ids, inputs, probs, winner) if self.gradcam_dir else {}
        i = 0
        for key, err in order:
            if err is not None:
                self.error_row(key, err)
                continue
            row: dict[str, Any] = {"path": key, "prediction": config.display_name(self.classes[winner[i]])}
            row.update({f"{self.vote_prefix}{c}": float(vote[i, j]) for j, c in enumerate(self.classes)})
            row["vote:votes"] = int(n_votes[i])
            row["vote:agreement"] = float(n_votes[i]) / len(self.members)
            for m in self.members:
                row.update({f"{m.name}:p_{c}": float(probs[m.name][i, j])
                            for j, c in enumerate(self.classes)})
                if self.tta:
                    row[f"{m.name}:tta_sd"] = float(spread[m.name][i])
            for col, files in cams.items():
                row[col] = files[i]
            row["error"] = ""
            self.rows.append(row)
            i += 1

    def _gradcams(self, keys: list[str], row_ids: list[int], inputs: dict[tuple, np.ndarray],
                  probs: dict[str, np.ndarray], winner: np.ndarray) -> dict[str, list[str]]:
        from covidlib import explain

        # The row number makes names unique when two folders hold files of the same name.
        stems = [f"{r:06d}_" + slug(k.replace("\\", "/").rsplit("/", 1)[-1], default="image", limit=60)
                 for r, k in zip(row_ids, keys)]
        out: dict[str, list[str]] = {}

        def save(label: str, images: np.ndarray, maps: np.ndarray) -> list[str]:
            files = []
            for stem, img, hm in zip(stems, images, maps):
                files.append(str(explain.save_gradcam(img[..., 0].astype(np.uint8), hm,
                                                      self.gradcam_dir / f"{stem}__{label}.png")))
            return files

        def attempt(label: str, fn) -> None:
            if label in self.cam_failed:
                out[f"gradcam_{label}"] = [""] * len(keys)
                return
            try:
                out[f"gradcam_{label}"] = fn()
            except Exception as exc:  # noqa: BLE001 - a heatmap problem must not lose the predictions
                self.cam_failed.add(label)
                warnings.warn(f"Grad-CAM for {label} failed ({type(exc).__name__}: {exc}); its "
                              "gradcam column stays empty", UserWarning, stacklevel=4)
                out[f"gradcam_{label}"] = [""] * len(keys)

        for m in self.members:
            x = inputs[m.prep_key]
            attempt(m.name, lambda m=m, x=x: save(
                m.name, x, explain.grad_cam(m.model, x, class_index=probs[m.name].argmax(axis=1),
                                            batch_size=self.batch_size)))
        # The vote's map: mean of the members' maps for the voted class. Members that were
        # prepared differently get the first member's input (resized inside grad_cam).
        x0 = inputs[self.members[0].prep_key]
        attempt("vote", lambda: save("vote", x0, explain.ensemble_grad_cam(
            [m.model for m in self.members], x0, class_index=winner)))
        return out

    def frame(self) -> pd.DataFrame:
        cols = ["path", "prediction"] + [f"{self.vote_prefix}{c}" for c in self.classes]
        cols += ["vote:votes", "vote:agreement"]
        for m in self.members:
            cols += [f"{m.name}:p_{c}" for c in self.classes]
            cols += [f"{m.name}:tta_sd"] if self.tta else []
        if self.gradcam_dir is not None:
            cols += [f"gradcam_{m.name}" for m in self.members] + ["gradcam_vote"]
        cols.append("error")
        df = pd.DataFrame(self.rows, columns=cols)
        df["error"] = df["error"].fillna("")
        df["vote:votes"] = df["vote:votes"].astype("Int64")  # unreadable rows: empty, not 2.0 / NaN
        names = [m.name for m in self.members]
        df.attrs.update({"classes": list(self.classes), "members": names, "vote": self.method,
                         "weights": self.weights, "vote_output": self.output,
                         "columns": describe_columns(self.classes, names, self.method,
                                                     gradcam=self.gradcam_dir is not None, tta=self.tta)})
        if self.tta:
            df.attrs["tta"] = {"n_views": self.tta, "views": list(TTA_TRANSFORMS[:self.tta]),
                               "shift": TTA_SHIFT}
        return df


def predict_paths(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    run_dir: str | os.PathLike | None = None,
    model_dirs: Sequence[str | os.PathLike] | None = None,
    *,
    vote: str | None = None,
    gradcam_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    window: str = "lung",
    enhanced: bool = False,
    allow_inside_input: bool = False,
    tta: int = 0,
) -> pd.DataFrame:
    """Predict every image under ``paths`` with the run's CT models and their vote.

    Args:
        paths: files and/or folders (walked recursively). PNG / JPEG / BMP / TIFF, DICOM (windowed
            with ``window``), NIfTI (one row per axial slice, key ``<file>#z0012``).
        run_dir: a trained run folder (``RUN_DIR/models/...``); see :func:`find_members`.
        model_dirs: explicit model folders instead of the run's members.
        vote: ``"hard"`` / ``"soft"`` / ``"weighted"``; None takes the run's ensemble method
            (``models/ensemble/config.json``), else ``"hard"``. See :func:`vote_settings`.
        gradcam_dir: when given, Grad-CAM overlays are written there, one PNG per image per model
            plus one for the vote (columns ``gradcam_<NAME>``, ``gradcam_vote``). Checked before
            any work (:func:`check_outputs`): not a file, not inside / around the inputs.
        batch_size: images per forward pass (also the chunk read into memory at once).
        window: CT window for DICOM / NIfTI (``covidlib.images.WINDOWS``).
        enhanced: the inputs already went through the run's enhancement pipeline (e.g.
            ``covidlib enhance``); by default each member's recorded enhancement is applied, as in
            training.
        allow_inside_input: the user asked explicitly for ``gradcam_dir`` inside the inputs.
        tta: test-time augmentation: 0 (off, the default) or N = average each member's
            probabilities over the first N views of :data:`TTA_TRANSFORMS` (identity, horizontal
            flip, shifts of :data:`TTA_SHIFT` of the side, flip + shifts); the vote combines those
            means, and a ``<NAME>:tta_sd`` column per member gives their spread
            (:func:`predict_tta`). Grad-CAM maps stay those of the identity view.

    Returns:
        One row per image: ``path``, ``prediction`` (display name of the vote's class), the vote's
        ``vote:p_<class>`` (soft / weighted: a probability) or ``vote:score_<class>`` (hard: a
        ranking score, not a probability), ``vote:votes``, ``vote:agreement``, ``<NAME>:p_<class>``
        per member (uncalibrated softmax), ``<NAME>:tta_sd`` per member with ``tta`` (placed
        after that member's probabilities), Grad-CAM file columns, ``error`` ("" when fine;
        refused inputs get a row with only ``path`` and ``error``: unreadable files, images that
        ingestion would refuse (too small, blank), folders that could not be listed).
        ``df.attrs`` holds ``classes``, ``members``, ``vote``, ``weights``, ``vote_output`` (``"probability"`` /
        ``"score"``), ``columns`` (:func:`describe_columns`), ``skipped`` (files of other types
        left out of folders) and ``inputs`` (``paths``, for :func:`write_predictions`' check);
        with ``tta`` also ``tta`` (``n_views``, ``views``, ``shift``).

    Raises:
        ValueError: model folder refused (:mod:`covidlib.runs`), class orders differ, bad vote /
            weights, ``gradcam_dir`` unsafe (:class:`covidlib.fsutil.UnsafeOutputError`).
        FileNotFoundError: no models found.
    """
    paths = _path_list(paths)
    if not paths:
        raise ValueError("no input paths given")
    tta = _check_tta(tta)
    cimg._window_bounds(window)  # a bad window is a usage error, not one error row per file
    # Output paths first: no model is loaded, no image read, for an output that cannot be used.
    _, cam_dir = check_outputs(paths, gradcam_dir=gradcam_dir, allow_inside_input=allow_inside_input)
    members = load_members(find_members(run_dir, model_dirs))
    method, weights = vote_settings(run_dir, [m.name for m in members], vote)
    if cam_dir is not None:
        cam_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(members, method, weights, cam_dir, max(1, int(batch_size)), enhanced, tta)

    unreadable: dict[Path, str] = {}
    files, skipped = expand_paths(paths, unreadable)
    run.predict_all(iter_inputs(files, window, unreadable))
    if skipped:
        warnings.warn(f"{len(skipped)} file(s) of other types inside the folders were not read "
                      f"(e.g. {skipped[0]}); see df.attrs['skipped']", UserWarning, stacklevel=2)
    df = run.frame()
    df.attrs["skipped"] = [str(p) for p in skipped]
    df.attrs["inputs"] = [str(p) for p in paths]
    return df


def _path_list(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list:
    """One path or many, as a list."""
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def check_outputs(paths: str | os.PathLike | Iterable[str | os.PathLike],
                  out: str | os.PathLike | None = None, gradcam_dir: str | os.PathLike | None = None, *,
                  allow_inside_input: bool = False) -> tuple[Path | None, Path | None]:
    """Check the predictions CSV (and its ``.columns.json``) and the Grad-CAM folder before any work.

    Refused: an output over an input, ``out`` that is a folder or a non-text file (a scan),
    ``gradcam_dir`` that is a file, outputs inside an input folder or beside an input file
    (unless ``allow_inside_input``). See :func:`covidlib.fsutil.check_output_path`.

    Returns:
        ``(out, gradcam_dir)`` with ``~`` expanded (None where not given).

    Raises:
        covidlib.fsutil.UnsafeOutputError (a ValueError), PermissionError (not writable).
    """
    from covidlib.fsutil import check_output_path

    inputs = _path_list(paths)
    kw = {"allow_inside_input": allow_inside_input}
    out_p = cam_p = None
    if out is not None:
        out_p = check_output_path(out, inputs, kind="file", what="predictions file", text=True, **kw)
        check_output_path(columns_path(out_p), inputs, kind="file", what="column notes file", text=True, **kw)
    if gradcam_dir is not None:
        cam_p = check_output_path(gradcam_dir, inputs, kind="dir", what="Grad-CAM folder", **kw)
    return out_p, cam_p


# --------------------------------------------------------------------------- output
def describe_columns(classes: Sequence[str], members: Sequence[str], method: str,
                     gradcam: bool = False, tta: int = 0) -> dict[str, str]:
    """What every column of :func:`predict_paths`' table holds, in column order.

    The hard vote's ``vote:score_<class>`` are ranking scores, never probabilities; the soft /
    weighted vote's ``vote:p_<class>`` and the members' ``<NAME>:p_<class>`` are probabilities,
    all uncalibrated. With ``tta`` (number of views) the member probabilities are TTA means and
    ``<NAME>:tta_sd`` their spread.
    """
    from covidlib.ensemble import OUTPUT_PREFIX, SCORE_DEFINITION, output_kind

    kind = output_kind(method)
    out = {"path": "input file (volumes: <file>#z<slice>)",
           "prediction": f"display name of the {method} vote's class"}
    for c in classes:
        out[f"vote:{OUTPUT_PREFIX[kind]}{c}"] = (
            f"{method} vote's score for {c}: {SCORE_DEFINITION}" if kind == "score" else
            f"{method} vote's probability of {c} ((weighted) mean of the members'), uncalibrated")
    out["vote:votes"] = _VOTES_NOTE
    out["vote:agreement"] = _AGREEMENT_NOTE
    for name in members:
        note = _MEMBER_NOTE.format(name=name)
        out.update({f"{name}:p_{c}": note + (f", mean over {tta} test-time augmentation views" if tta else "")
                    for c in classes})
        if tta:
            out[f"{name}:tta_sd"] = _TTA_SD_NOTE.format(name=name, n=tta, views=", ".join(TTA_TRANSFORMS[:tta]))
    if gradcam:
        out.update({f"gradcam_{name}": f"Grad-CAM overlay PNG of member {name}" for name in members})
        out["gradcam_vote"] = "Grad-CAM overlay PNG of the vote (mean of the members' maps)"
    out["error"] = "why the file could not be read ('' when fine)"
    return out


def columns_path(path: str | os.PathLike) -> Path:
    """The ``<csv>.columns.json`` file that :func:`write_predictions` writes next to ``path``."""
    path = Path(path).expanduser()
    return path.with_name(path.name + ".columns.json")


def _columns_doc(df: pd.DataFrame, csv_name: str) -> dict[str, Any]:
    cols = {c: d for c, d in df.attrs["columns"].items() if c in df.columns}
    return {
        "csv": csv_name,
        "vote": df.attrs.get("vote"), "vote_output": df.attrs.get("vote_output"),
        "members": df.attrs.get("members"), "weights": df.attrs.get("weights"),
        "classes": df.attrs.get("classes"),
        "probability_columns": [c for c in cols if ":p_" in c],
        "score_columns": [c for c in cols if ":score_" in c],
        "calibrated_columns": [],  # predict applies no temperature scaling
        "columns": cols,
        **({"tta": df.attrs["tta"]} if df.attrs.get("tta") else {}),
    }


def write_predictions(df: pd.DataFrame, path: str | os.PathLike, *,
                      allow_inside_input: bool = False) -> Path:
    """Write the predictions CSV atomically (temp file in the same folder, then ``os.replace``).

    When ``df`` comes from :func:`predict_paths` (``df.attrs["columns"]``), what every column
    holds (which are probabilities, which the hard vote's scores; none calibrated) is written
    next to it as ``<csv>.columns.json`` (:func:`columns_path`): a CSV header cannot say it.
    ``path`` goes through :func:`check_outputs` against ``df.attrs["inputs"]`` first: a scan,
    a folder or the inputs' own folder is never written over (check it before predicting, too).
    """
    path, _ = check_outputs(df.attrs.get("inputs") or [], out=path, allow_inside_input=allow_inside_input)
    atomic_write_text(path, df.to_csv(index=False))
    if df.attrs.get("columns"):
        atomic_write_text(columns_path(path), json.dumps(_columns_doc(df, path.name), indent=2))
    return path


def _vote_cell(r: pd.Series, vote_p: list[str], n_members: int | None) -> str:
    """The vote's confidence for the text table: its probability, or its vote count (hard)."""
    if vote_p:
        return f"p={max(float(r[c]) for c in vote_p):.3f}"
    if "vote:votes" in r and pd.notna(r["vote:votes"]):
        return f"{int(r['vote:votes'])}/{n_members if n_members else '?'} votes"
    return ""


def format_table(df: pd.DataFrame, max_rows: int = 20, width: int = 48) -> str:
    """A short text table: path, prediction, vote confidence, error (first ``max_rows`` rows).

    The confidence is the soft / weighted vote's top probability (``p=``), or for the hard vote
    its vote count (``2/3 votes``): its score is no probability to print as one. A last line says
    which columns are probabilities and that none is calibrated.
    """
    vote_p = [c for c in df.columns if c.startswith("vote:p_")]
    members = df.attrs.get("members")
    n_members = len(members) if members else None
    lines = []
    for _, r in df.head(max_rows).iterrows():
        p = str(r["path"])
        p = p if len(p) <= width else "..." + p[-(width - 3):]
        if r.get("error"):
            lines.append(f"{p:<{width}}  ERROR: {r['error']}")
        else:
            lines.append(f"{p:<{width}}  {r['prediction']:<10} {_vote_cell(r, vote_p, n_members)}")
    if len(df) > max_rows:
        lines.append(f"... {len(df) - max_rows} more row(s)")
    n_err = int((df["error"] != "").sum()) if "error" in df else 0
    counts = df.loc[df["error"] == "", "prediction"].value_counts() if len(df) else pd.Series(dtype=int)
    summary = ", ".join(f"{k}: {v}" for k, v in counts.items()) or "no prediction"
    lines.append(f"{len(df)} row(s): {summary}; {n_err} unreadable")
    if any(c.startswith("vote:score_") for c in df.columns):
        lines.append("columns: vote:score_* are the hard vote's ranking scores, NOT probabilities; "
                     "<member>:p_* are uncalibrated softmax probabilities (see <csv>.columns.json)")
    elif vote_p:
        lines.append("columns: vote:p_* and <member>:p_* are uncalibrated probabilities "
                     "(see <csv>.columns.json)")
    return "\n".join(lines)
