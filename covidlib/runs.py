"""Checks on a trained model folder (``RUN_DIR/models/<NAME>/``) before anything in it is trusted.

A model folder is three files that must agree: ``model.keras`` (the network), ``labels.json``
(the name of each output, in order) and ``config.json`` (how it was trained: ``classes``,
``img_size``, the enhancement). Nothing checked that they agree, so a permuted ``labels.json``
silently renamed the outputs ("COVID-19 0.785" became "Normal 0.785"). :func:`load_model_dir`
loads a folder only when:

* ``labels.json`` is a JSON list of distinct, non-empty class names;
* ``config.json`` is a JSON object; its ``classes`` (when recorded) equal ``labels.json``, same
  order; its ``img_size`` is an integer of at least :data:`MIN_IMG_SIZE`;
* ``model.keras`` is a complete ``.keras`` archive (a truncated file is named as such, not
  "file not found"), loads in Keras safe mode, takes one ``(S, S, 1)`` image with
  ``S == img_size`` and outputs one probability per class of ``labels.json``.

:func:`member_dir` keeps an ensemble's members inside the run. Every refusal is one
:class:`ModelFolderError` (a ``ValueError``) naming the folder and the problem.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["ModelFolderError", "MIN_IMG_SIZE", "read_json", "read_labels", "read_config",
           "check_classes", "check_img_size", "check_keras_file", "check_model_io", "load_model_dir",
           "member_dir"]

#: Smallest input side a covidlib model is trained at (``train.TrainConfig`` refuses less).
MIN_IMG_SIZE = 32


class ModelFolderError(ValueError):
    """A model folder whose files are missing, damaged or disagree with each other."""


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file of a model folder.

    Raises:
        FileNotFoundError: no such file ("<path> is missing"). ModelFolderError: not readable JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{path}: not readable JSON ({exc})") from None


def read_labels(model_dir: str | os.PathLike) -> list[str]:
    """``labels.json``: a list of distinct, non-empty class names (``"abc"`` is not a list)."""
    path = Path(model_dir) / "labels.json"
    labels = read_json(path)
    names_ok = isinstance(labels, list) and all(isinstance(c, str) and c.strip() for c in labels)
    if not names_ok or not labels:
        raise ModelFolderError(f"{path} must be a JSON list of class names, got {json.dumps(labels)[:80]}")
    if len(set(labels)) != len(labels):
        raise ModelFolderError(f"{path} lists a class twice: {labels}")
    return labels


def read_config(model_dir: str | os.PathLike) -> dict:
    """``config.json`` as a dict."""
    path = Path(model_dir) / "config.json"
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ModelFolderError(f"{path} must be a JSON object, got {type(cfg).__name__}")
    return cfg


def check_classes(labels: list[str], cfg: dict, model_dir: Path) -> None:
    """labels.json must equal config.json's ``classes`` (same names, same order) when recorded."""
    trained = cfg.get("classes")
    if trained is None:  # older runs and the ensemble folder record no classes
        return
    if not isinstance(trained, list) or trained != labels:
        how = ("the same classes in another order" if isinstance(trained, list)
               and sorted(map(str, trained)) == sorted(labels) else "other classes")
        raise ModelFolderError(
            f"{model_dir}: labels.json lists {labels} but config.json says the model was trained on "
            f"{trained} ({how}); the outputs would be named wrongly. Restore labels.json from "
            "config.json's classes, or train again")


def check_img_size(cfg: dict, model_dir: Path) -> int:
    """config.json's ``img_size``: an integer >= :data:`MIN_IMG_SIZE`."""
    size = cfg.get("img_size")
    if size is None:
        raise ModelFolderError(f"{model_dir / 'config.json'} has no img_size")
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size != int(size):
        raise ModelFolderError(f"{model_dir / 'config.json'}: img_size must be an integer, got {size!r}")
    if int(size) < MIN_IMG_SIZE:
        raise ModelFolderError(f"{model_dir / 'config.json'}: img_size {int(size)} is below the smallest "
                               f"size a covidlib model is trained at ({MIN_IMG_SIZE})")
    return int(size)


def check_keras_file(path: str | os.PathLike) -> None:
    """Refuse a ``.keras`` file that is not a complete archive (Keras calls that "file not found").

    Raises:
        FileNotFoundError: no such file. ModelFolderError: truncated / damaged / not a model.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file {p} does not exist")
    try:
        with zipfile.ZipFile(p) as zf:
            names = set(zf.namelist())
            bad = zf.testzip()  # CRC of every member: a cut or damaged file fails here
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ModelFolderError(f"{p} is damaged or incomplete: not a readable .keras archive ({exc}); "
                               "restore the file or train again") from None
    if bad is not None:
        raise ModelFolderError(f"{p} is damaged: its part {bad!r} fails the checksum; restore the file "
                               "or train again")
    missing = {"config.json", "model.weights.h5"} - names
    if missing:
        raise ModelFolderError(f"{p} is not a Keras model archive (no {', '.join(sorted(missing))} inside)")


def check_model_io(model: Any, n_classes: int, img_size: int | None, where: str | os.PathLike) -> None:
    """One ``(S, S, 1)`` image in (``S == img_size`` when given), ``n_classes`` values out."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelFolderError(f"{where}: expected one image input and one output, the model has "
                               f"{len(model.inputs)} input(s) and {len(model.outputs)} output(s)")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 1:
        raise ModelFolderError(f"{where}: the model takes input {shape}; covidlib models take "
                               "grayscale images (n, S, S, 1)")
    if img_size is not None and any(s is not None and int(s) != img_size for s in shape[1:3]):
        raise ModelFolderError(f"{where}: config.json says img_size {img_size} but the model takes "
                               f"{shape[1]}x{shape[2]} images; the two files do not belong together")
    k = model.outputs[0].shape[-1]
    if k != n_classes:
        raise ModelFolderError(f"{where}: the model outputs {k} values but labels.json lists "
                               f"{n_classes} classes")


def load_model_dir(model_dir: str | os.PathLike) -> tuple[Any, list[str], dict]:
    """Load ``(model, classes, config)`` from a model folder after every check above.

    The cheap checks (JSON files, archive integrity) run before Keras loads anything.

    Raises:
        FileNotFoundError: no model.keras / labels.json / config.json.
        ModelFolderError: any disagreement or damage (also a model refused by Keras safe mode).
    """
    from covidlib.models import load_model

    d = Path(model_dir)
    if not (d / "model.keras").is_file():
        raise FileNotFoundError(f"{d} holds no trained model (model.keras); train it first")
    labels = read_labels(d)
    cfg = read_config(d)
    check_classes(labels, cfg, d)
    size = check_img_size(cfg, d)
    check_keras_file(d / "model.keras")
    try:
        model = load_model(d / "model.keras")
    except ValueError as exc:
        raise ModelFolderError(str(exc).splitlines()[0]) from exc
    check_model_io(model, len(labels), size, d)
    return model, labels, cfg


def member_dir(models_dir: str | os.PathLike, name: Any, where: str | os.PathLike) -> Path:
    """``models_dir / name`` for an ensemble member, refused unless it stays inside ``models_dir``.

    ``where`` names the config that listed the member (for the message).
    """
    models = Path(models_dir)
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ModelFolderError(f"{where} lists member {name!r}; members must be folder names under "
                               f"{models}")
    path = models / name
    if not Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(models))):
        raise ModelFolderError(f"{where} lists member {name!r}, which leads outside the run "
                               f"({os.path.realpath(path)}); members must live under {models}")
    return path
