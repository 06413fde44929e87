"""The batch runner: executes the numbered notebooks in order with papermill.

``01`` builds the manifest, ``02`` runs the enhancement ablation, ``03`` trains once per CT
backbone in ``BACKBONES`` (and once more for the phase-1 X-ray model ``XRAY_BACKBONE`` when
``XRAY_DATASET`` is set), ``04`` evaluates, votes and runs the two-phase cascade. Executed copies
are saved in ``RUN_DIR/notebooks/`` next to the outputs they produced. With ``parallel`` > 1,
``02`` and the ``03`` trainings run side by side, each in its own process on its own GPU or
cores (:func:`run_side_by_side`), with the results of a sequential run.

Defaults live in one place only: each notebook's ``parameters`` cell. The runner reads them with
``papermill.inspect_notebook`` and passes a notebook only the parameters it declares. Every value
is checked first (:func:`validate`: types from those defaults, ranges and choices from
:func:`rules`, a cheap look at a local data set), so a bad one fails in one line before any
notebook starts.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from covidlib import config
from covidlib.fsutil import atomic_write_bytes, stderr_to

NOTEBOOKS = {
    "data": "01_download_data.ipynb",
    "ablation": "02_enhancement_ablation.ipynb",
    "train": "03_train_backbone.ipynb",
    "evaluate": "04_two_phase_evaluation_voting.ipynb",
}


def notebooks_dir() -> Path:
    """The numbered notebooks: ``COVIDLIB_NOTEBOOKS``, else the copies shipped in the package."""
    if os.environ.get("COVIDLIB_NOTEBOOKS"):
        return Path(os.environ["COVIDLIB_NOTEBOOKS"]).expanduser()
    from importlib.resources import files

    return Path(str(files("covidlib") / "notebooks"))


def copy_notebooks(dest: str | os.PathLike, *, overwrite: bool = False) -> dict[str, list[Path]]:
    """Copy the numbered notebooks into ``dest`` for JupyterLab.

    A notebook already in ``dest`` that differs from the shipped one (a user's edited copy) is
    kept unless ``overwrite``.

    Returns:
        ``{"copied": [...], "kept": [...], "unchanged": [...]}``.
    """
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a folder")
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {"copied": [], "kept": [], "unchanged": []}
    for name in NOTEBOOKS.values():
        data = (notebooks_dir() / name).read_bytes()
        target = dest / name
        if target.exists() and target.read_bytes() == data:
            out["unchanged"].append(target)
        elif target.exists() and not overwrite:
            out["kept"].append(target)
        else:
            atomic_write_bytes(target, data)
            out["copied"].append(target)
    return out


def resolve_run_dir(run_dir: str | os.PathLike | None, name: str = "demo") -> Path:
    """``RUN_DIR`` as an absolute path; ``None`` means ``<reports>/runs/<name>``."""
    if run_dir in (None, ""):
        return (config.reports_dir() / "runs" / name).resolve()
    return Path(run_dir).expanduser().resolve()


def notebook_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """Default values of a notebook's ``parameters`` cell (a fresh copy the caller may change).

    Parsed once per file version: a run asks for notebook 03's defaults once per training.
    """
    st = os.stat(path)
    return copy.deepcopy(_parse_parameters(os.path.abspath(path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=32)
def _parse_parameters(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    import papermill as pm

    import nbformat

    params = pm.inspect_notebook(str(path))
    # papermill skips lines it cannot parse (e.g. a comment holding quotes) without failing;
    # a parameter silently missing here would silently drop a user's setting, so refuse.
    nb = nbformat.read(str(path), as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        raise ValueError(f"{path} has no cell tagged 'parameters'")
    assigned = {line.split("=", 1)[0].strip() for line in cell.source.splitlines()
                if "=" in line and not line.lstrip().startswith("#")}
    if assigned - set(params):
        raise ValueError(f"{path}: papermill could not parse parameter(s) {sorted(assigned - set(params))}")
    return {name: ast.literal_eval(p["default"]) for name, p in params.items()}


def default_parameters(step: str, nb_dir: Path | None = None) -> dict[str, Any]:
    """The defaults of one notebook (``"data"``, ``"ablation"``, ``"train"``, ``"evaluate"``).

    The CLI's sub-commands read their defaults here, so a default lives in one place only.
    """
    if step not in NOTEBOOKS:
        raise ValueError(f"unknown notebook step {step!r}; choose one of {list(NOTEBOOKS)}")
    return notebook_parameters((nb_dir or notebooks_dir()) / NOTEBOOKS[step])


class _NotebookDefault:
    """Marks a library keyword whose default is a notebook's parameter (see :func:`fill_defaults`)."""

    def __repr__(self) -> str:
        return "<the notebook's default>"


NOTEBOOK_DEFAULT = _NotebookDefault()


def fill_defaults(step: str, values: Mapping[str, Any], names: Mapping[str, str] | None = None
                  ) -> dict[str, Any]:
    """``values`` with each :data:`NOTEBOOK_DEFAULT` replaced by notebook ``step``'s parameter.

    A keyword ``n_boot`` reads the parameter ``N_BOOT`` unless ``names`` maps it elsewhere, so a
    library function and its notebook share one default.
    """
    names = names or {}
    defaults: dict[str, Any] | None = None
    out = dict(values)
    for key, value in values.items():
        if value is NOTEBOOK_DEFAULT:
            defaults = defaults if defaults is not None else default_parameters(step)
            out[key] = defaults[names.get(key, key.upper())]
    return out


def notebook_field(step: str, name: str) -> Any:
    """A dataclass field whose default is notebook ``step``'s parameter ``name`` (read when used)."""
    from dataclasses import field

    return field(default_factory=lambda: default_parameters(step)[name])


def parse_value(text: str) -> Any:
    """A ``-p NAME VALUE`` value: a Python/YAML literal when it parses, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# ----------------------------------------------------------------------------------------------
# Parameter validation: every value is checked before the first notebook starts
# ----------------------------------------------------------------------------------------------

SEED_MAX = 2**32 - 1  # numpy's seed range
# Documented as "or None" although their default is a value.
_NONE_OK = frozenset({"XRAY_DATASET"})
# The notebooks read an empty string here as None (``if XRAY_DATASET:``).
_EMPTY_IS_NONE = frozenset({"XRAY_DATASET", "EXTERNAL_DATASET", "COHORT", "RUN_DIR"})
_DATA_ACCEPTS = ("'synthetic', a registry name (covidlib download --list) or an existing folder, "
                 "CSV or label file")


@dataclass(frozen=True)
class Rule:
    """What one parameter accepts.

    Attributes:
        accepts: the accepted values in words; error messages quote it.
        ok: ``value -> True`` when accepted, ``False`` to refuse with ``accepts``, or a string
            saying why it is refused. Called only on values of the default's type unless ``typed``.
        typed: ``ok`` checks the type itself (the type of the notebook's default is not imposed).
    """

    accepts: str
    ok: Callable[[Any], bool | str] = lambda v: True
    typed: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _default_type(default: Any) -> tuple[Callable[[Any], bool], str] | None:
    """The type test and its words for a notebook default (None: the default fixes no type)."""
    if isinstance(default, bool):
        return (lambda v: isinstance(v, bool)), "True or False"
    if isinstance(default, int):
        return _is_int, "an integer"
    if isinstance(default, float):
        return _is_number, "a number"  # an int is a number too
    if isinstance(default, str):
        return (lambda v: isinstance(v, str)), "a string"
    if isinstance(default, list):
        return (lambda v: isinstance(v, list)), "a list"
    return None


def _int_min(lo: int, why: str = "") -> Rule:
    return Rule(f"an integer >= {lo}{why}", lambda v: v >= lo)


def _choice(names: Sequence[str]) -> Rule:
    return Rule(f"one of {list(names)}", lambda v: v in names)


def _string(accepts: str, ok: Callable[[str], bool | str]) -> Rule:
    """A rule for a parameter whose default is None: a string that ``ok`` accepts."""
    return Rule(accepts, lambda v: isinstance(v, str) and ok(v), typed=True)


def _distinct_list(item: Callable[[Any], bool], what: str) -> Rule:
    return Rule(f"a non-empty list of distinct {what}",
                lambda v: isinstance(v, list) and bool(v) and all(item(x) for x in v)
                and len({repr(x) for x in v}) == len(v), typed=True)


def _static_names(module: str, variable: str) -> tuple[str, ...]:
    """Keys (or items) of a literal dict / tuple of a covidlib module, read from its source.

    ``covidlib.models`` imports Keras: seconds, and TensorFlow's start-up lines on stderr. The
    names a parameter may take are literals there, so checking them needs no import.
    """
    loaded = sys.modules.get(f"covidlib.{module}")
    if loaded is None:
        try:
            spec = importlib.util.find_spec(f"covidlib.{module}")
            tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            tree = None  # no source to read (e.g. a bytecode-only install): import it below
        for node in tree.body if tree else ():
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if isinstance(target, ast.Name) and target.id == variable:
                elts = node.value.keys if isinstance(node.value, ast.Dict) else node.value.elts
                return tuple(ast.literal_eval(e) for e in elts)
        loaded = importlib.import_module(f"covidlib.{module}")  # slow, but never wrong
    return tuple(getattr(loaded, variable))


def _existing_file(v: str) -> bool | str:
    if Path(v).expanduser().is_file():
        return True
    return f"no such file (relative paths start at {Path.cwd()})"


def _run_dir_ok(v: str) -> bool | str:
    path = Path(v).expanduser().absolute()
    for p in (path, *path.parents):  # the nearest existing folder must be a folder
        if p.exists():
            return True if p.is_dir() else f"{p} is a file"
    return True


def _pattern_ok(v: str) -> bool | str:
    from covidlib.splits import PATIENT_PATTERNS

    try:
        re.compile(PATIENT_PATTERNS.get(v, v))
    except re.error as exc:
        return f"not a regular expression ({exc})"
    return True


def _is_registry_name(v: str) -> bool:
    from covidlib import download

    try:
        download.get_info(v)
        return True
    except download.UnknownDatasetError:
        return bool(re.fullmatch(r"kaggle:[\w.-]+/[\w.-]+", v.strip(), re.IGNORECASE))


def _dataset_ok(shape: bool) -> Callable[[str], bool | str]:
    """Accepts "synthetic", a registry name or an existing path (with ``shape``: >= 2 classes)."""
    def ok(v: str) -> bool | str:
        if not v.strip():
            return False
        if v.strip().lower() == "synthetic":
            return True
        path = Path(v).expanduser()
        if path.exists():
            return data_shape(path) if shape else True
        if _is_registry_name(v):
            return True
        return f"not found (relative paths start at {Path.cwd()}) and not a registry name"
    return ok


@functools.lru_cache(maxsize=1)
def rules() -> dict[str, Rule]:
    """Ranges and choices of the notebooks' parameters (types come from their defaults)."""
    from covidlib.splits import PATIENT_PATTERNS
    from covidlib.enhance import PIPELINES

    backbones = _static_names("models", "BACKBONES")
    unit = Rule("a number from 0 to 1", lambda v: 0 <= v <= 1)
    fraction = Rule("a number between 0 and 1 (both excluded)", lambda v: 0 < v < 1)
    positive = Rule("a number > 0", lambda v: v > 0)
    seed = Rule(f"an integer from 0 to {SEED_MAX}", lambda v: 0 <= v <= SEED_MAX)
    pattern = _string(f"None, a regular expression or one of {sorted(PATIENT_PATTERNS)}", _pattern_ok)
    one_backbone = _choice(backbones)
    patients = _int_min(3, " (every split needs a patient of each class)")
    return {
        "DATASET": Rule(_DATA_ACCEPTS, _dataset_ok(shape=True)),
        "XRAY_DATASET": Rule(f"None, {_DATA_ACCEPTS}", _dataset_ok(shape=True)),
        "EXTERNAL_DATASET": _string(f"None, {_DATA_ACCEPTS}", _dataset_ok(shape=False)),
        "RUN_DIR": _string("None or a folder path (new or existing)", _run_dir_ok),
        "SEED": seed, "PATIENT_PATTERN": pattern, "EXTERNAL_PATIENT_PATTERN": pattern,
        "SYNTHETIC_PATIENTS": patients, "SYNTHETIC_XRAY_PATIENTS": patients,
        "VAL_FRACTION": fraction, "TEST_FRACTION": fraction,
        "IMG_SIZE": _int_min(32), "BATCH_SIZE": _int_min(1), "N_BOOT": _int_min(1),
        "ABLATION_BACKBONE": one_backbone, "ABLATION_EPOCHS": _int_min(1),
        "ABLATION_SEEDS": _distinct_list(lambda x: _is_int(x) and 0 <= x <= SEED_MAX,
                                         f"integers from 0 to {SEED_MAX}"),
        "ABLATION_PIPELINES": _distinct_list(lambda x: x in PIPELINES, f"names from {list(PIPELINES)}"),
        "BACKBONE": one_backbone, "XRAY_BACKBONE": one_backbone,
        # plan() turns a single name into a list.
        "BACKBONES": Rule(f"a non-empty list of distinct names from {list(backbones)}", typed=True,
                          ok=lambda v: _distinct_list(lambda x: x in backbones, "").ok(
                              [v] if isinstance(v, str) else v)),
        "MODALITY": _choice(config.MODALITIES), "ENHANCEMENT": _choice(list(PIPELINES)),
        "EPOCHS": _int_min(1), "FINE_TUNE_EPOCHS": _int_min(0), "PATIENCE": _int_min(0),
        "WEIGHTS": _string("None, 'imagenet', an existing weights file or a folder of "
                           "<backbone>.weights.h5 files (covidlib pretrain --out)",
                           lambda v: v == "imagenet" or Path(v).expanduser().is_dir()
                           or _existing_file(v)),
        "PRETRAIN_EPOCHS": _int_min(0, " (0 = no self-supervised pretraining)"),
        "HEAD": _choice(_static_names("models", "HEADS")),
        "LEARNING_RATE": positive, "FINE_TUNE_LR": positive,
        "UNFREEZE": Rule("'all' or an integer >= 1", typed=True,
                         ok=lambda v: v == "all" if isinstance(v, str) else _is_int(v) and v >= 1),
        "IMBALANCE": _choice(("class_weight", "balanced_sampling", "none")),
        "VOTE": _choice(("hard", "soft", "weighted")),
        "COHORT": _string("None or an existing CSV file", _existing_file),
        "PHASE1_THRESHOLD": unit, "UNCERTAINTY_BAND": unit, "CLINICAL_FLAG_RATE": unit,
        "GRADCAM_IMAGES": _int_min(0),
        "DISTRIBUTE": _choice(("auto", "off", "mirrored", "multiworker", "jax_dataparallel")),
        "TTA_VIEWS": Rule("an integer from 0 to 10", typed=True,
                          ok=lambda v: _is_int(v) and 0 <= v <= 10),
    }


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_value(name: str, value: Any, default: Any) -> str | None:
    """Why ``name=value`` is refused, in one line naming what is accepted; None when accepted.

    Args:
        name: the parameter.
        value: the value to check.
        default: the notebook's default (sets the type, and whether None is accepted).
    """
    if value is None and (default is None or name in _NONE_OK) or value == "" and name in _EMPTY_IS_NONE:
        return None
    rule = rules().get(name)
    typed = _default_type(default)
    if rule is None and typed is None:
        return None  # a parameter no table entry knows, with a None default: anything goes
    accepts = rule.accepts if rule else f"{typed[1]} (the type of the notebook's default)"
    wrong_type = typed is not None and not (rule and rule.typed) and not typed[0](value)
    verdict = False if value is None or wrong_type else (rule.ok(value) if rule else True)
    if verdict is True:
        return None
    why = verdict if isinstance(verdict, str) else ""
    if "expected" not in why:  # every refusal says what is accepted
        why += ("; " if why else "") + f"expected {accepts}"
    return f"{name}={_shown(value)}: {why}"


def _holds_image(folder: Path) -> bool:
    """True at the first image / DICOM / NIfTI file under ``folder`` (names only, nothing decoded)."""
    from covidlib import images as cimg

    exts = config.IMAGE_EXTENSIONS + (".dcm",)
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        for fn in filenames:
            path = Path(dirpath) / fn
            if fn.startswith("."):
                continue
            if path.suffix.lower() in exts or cimg.is_nifti_path(path) or (
                    not path.suffix and cimg.is_dicom_file(path)):
                return True
    return False


def _classes_with_images(folder: Path) -> set[str]:
    """The labels (or, unmapped, the names) of the class folders of ``folder`` that hold images."""
    from covidlib.aliases import normalize_class_name, resolve_label

    found = set()
    for d in sorted(folder.iterdir()):
        if d.is_dir() and not d.is_symlink() and not d.name.startswith(".") and d.name != "__MACOSX":
            if _holds_image(d):
                found.add(resolve_label(d.name) or normalize_class_name(d.name))
    return found


def data_shape(root: Path) -> bool | str:
    """A cheap look at a local data set: True, or why it cannot be trained on.

    Class-folder and split-folder layouts need >= 2 classes holding images, a ``train`` split
    folder, and no split folder without images; label files and CSVs are left to ``ingest``.
    Nothing is decoded: one image file found per class folder is enough.
    """
    from covidlib import layouts

    try:
        layout, _ = layouts.detect_layout(root)
    except (ValueError, OSError) as exc:
        return " ".join(str(exc).replace(f"{root}: ", "", 1).split())
    try:
        if layout == "class_folders":
            classes = _classes_with_images(root)
        elif layout == "split_folders":
            splits = {d.name: _classes_with_images(d) for d in sorted(root.iterdir())
                      if d.is_dir() and d.name.lower() in layouts.SPLIT_ALIASES}
        else:
            return True  # label files and CSVs: ingest checks them
    except OSError:
        return True  # an unreadable folder: ingest quarantines it and says so
    if layout == "split_folders":
        empty = [name for name, found in splits.items() if not found]
        if empty:
            return (f"split folder(s) {empty} hold no class folder with images; fill them, or "
                    "remove them (a missing val / test split is carved out of train)")
        if not any(layouts.SPLIT_ALIASES[n.lower()] == "train" for n in splits):
            return f"split folders {sorted(splits)} but no train split folder; expected train/ (or training/)"
        classes = set().union(*splits.values())
    if len(classes) < 2:
        found = (f"only one class holds images ({sorted(classes)[0]})" if classes
                 else "no class folder holds images")
        return (f"{found}; expected at least 2 classes, laid out <root>/<class>/* or "
                "<root>/<split>/<class>/*")
    return True


def _cross_problems(v: Mapping[str, Any]) -> list[str]:
    """Problems of parameters that are fine alone but not together."""
    out = []
    val, test = v.get("VAL_FRACTION"), v.get("TEST_FRACTION")
    if _is_number(val) and _is_number(test) and 0 < val < 1 and 0 < test < 1 and val + test >= 1:
        out.append(f"VAL_FRACTION={val!r} + TEST_FRACTION={test!r}: expected a sum < 1 "
                   "(train needs the rest)")
    trained = v.get("BACKBONES")
    trained = [trained] if isinstance(trained, str) else list(trained or [])
    if v.get("XRAY_DATASET"):
        trained.append(v.get("XRAY_BACKBONE"))
    if v.get("PRETRAIN_EPOCHS") and v.get("DISTRIBUTE") == "multiworker":
        out.append(f"PRETRAIN_EPOCHS={v['PRETRAIN_EPOCHS']!r} with DISTRIBUTE='multiworker': every "
                   "worker would pretrain into the same folder; run covidlib pretrain once first "
                   "and pass WEIGHTS=<its folder>")
    if v.get("WEIGHTS") == "imagenet" and "SmallCNN" in trained:
        out.append("WEIGHTS='imagenet': SmallCNN (in BACKBONES or XRAY_BACKBONE) has no ImageNet "
                   "weights; expected None, or backbones other than SmallCNN")
    return out


def validate(params: Mapping[str, Any], declared: Mapping[str, Mapping[str, Any]]) -> None:
    """Check every parameter every notebook will receive, before any of them runs.

    Args:
        params: the user's parameters.
        declared: ``{notebook step: its parameters cell's defaults}``.

    Raises:
        ValueError: one line, every problem found, each naming the parameter, its value and
            what it accepts.
    """
    problems = [f"{name}={_shown(params[name])}: covidlib run sets it for each training notebook; "
                "set BACKBONES (CT models) or XRAY_BACKBONE instead"
                for name in ("BACKBONE", "MODALITY") if name in params]
    merged: dict[str, Any] = {}
    for defaults in declared.values():
        for name, default in defaults.items():
            if name in ("BACKBONE", "MODALITY") and name in params:
                continue
            value = params.get(name, default)
            merged.setdefault(name, value)
            problem = check_value(name, value, default)
            if problem and problem not in problems:
                problems.append(problem)
    problems += _cross_problems(merged)
    if problems:
        raise ValueError("; ".join(problems))


def plan(params: dict[str, Any], nb_dir: Path | None = None) -> list[tuple[str, Path, dict]]:
    """The notebooks to run, in order, each with the parameters it receives.

    Every parameter is checked first (:func:`validate`), so a bad value fails here, in one line,
    not in a notebook.

    Returns:
        ``[(label, notebook path, parameters)]``.

    Raises:
        ValueError: an unknown parameter, or values :func:`validate` refuses.
    """
    nb_dir = nb_dir or notebooks_dir()
    paths = {key: nb_dir / name for key, name in NOTEBOOKS.items()}
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(f"notebook {p} not found (set COVIDLIB_NOTEBOOKS or --notebooks)")
    declared = {key: notebook_parameters(p) for key, p in paths.items()}
    unknown = set(params) - set().union(*declared.values())
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown, key=str)}; the notebooks declare "
                         f"{sorted(set().union(*declared.values()))}")
    validate(params, declared)

    def value(name: str, key: str) -> Any:
        return params.get(name, declared[key].get(name))

    def only_declared(key: str, extra: dict) -> dict:
        merged = {**{k: v for k, v in params.items() if k in declared[key]}, **extra}
        return {k: v for k, v in merged.items() if k in declared[key]}

    backbones = value("BACKBONES", "evaluate")
    if isinstance(backbones, str):
        backbones = [backbones]
    steps = [("01_download_data", paths["data"], only_declared("data", {}))]
    if value("RUN_ABLATION", "ablation"):
        steps.append(("02_enhancement_ablation", paths["ablation"], only_declared("ablation", {})))
    for b in backbones:
        steps.append((f"03_train_{b}", paths["train"],
                      only_declared("train", {"BACKBONE": b, "MODALITY": "ct"})))
    if value("XRAY_DATASET", "data"):
        xb = value("XRAY_BACKBONE", "evaluate")
        steps.append((f"03_train_xray_{xb}", paths["train"],
                      only_declared("train", {"BACKBONE": xb, "MODALITY": "xray"})))
    steps.append(("04_two_phase_evaluation_voting", paths["evaluate"],
                  only_declared("evaluate", {"BACKBONES": list(backbones)})))
    return steps


def describe_step(label: str, params: dict[str, Any], defaults: dict[str, Any]) -> str:
    """One line saying what a planned notebook will do, training budgets included."""
    v = {**defaults, **params}
    if label.startswith("02_"):
        if not v.get("RUN_ABLATION", True):
            return "enhancement steps shown; ablation off (RUN_ABLATION False)"
        pipes, seeds = list(v["ABLATION_PIPELINES"]), list(v["ABLATION_SEEDS"])
        return (f"trains {len(pipes) * len(seeds)} {v['ABLATION_BACKBONE']} models "
                f"({len(pipes)} pipelines x {len(seeds)} seeds), {v['IMG_SIZE']} px, "
                f"{v['ABLATION_EPOCHS']} epochs each (ABLATION_EPOCHS)")
    if label.startswith("03_"):
        pretrain = v.get("PRETRAIN_EPOCHS", 0)
        tune = (f" + {v['FINE_TUNE_EPOCHS']} fine-tune"
                if (v.get("WEIGHTS") or pretrain) and v["FINE_TUNE_EPOCHS"] else "")
        weights = (f"SimSiam-pretrained here for {pretrain} epochs" if pretrain
                   else f"weights {v['WEIGHTS']}")
        return (f"trains {v['BACKBONE']} on {v['MODALITY']}, {v['IMG_SIZE']} px, up to {v['EPOCHS']} epochs"
                f"{tune}, {weights}, enhancement {v['ENHANCEMENT']}")
    if label.startswith("04_"):
        return (f"evaluates {', '.join(v['BACKBONES'])} and their {v['VOTE']} vote; "
                f"phase 1 xray_{v['XRAY_BACKBONE']}")
    return f"ingests {v.get('DATASET')} (CT) and {v.get('XRAY_DATASET')} (X-ray), audits them"


def _resolve_local_paths(params: dict[str, Any]) -> dict[str, Any]:
    """Relative data paths that exist are made absolute against the user's working folder."""
    out = dict(params)
    for name in ("DATASET", "XRAY_DATASET", "EXTERNAL_DATASET", "COHORT", "WEIGHTS"):
        value = out.get(name)
        if isinstance(value, str) and value and value != "imagenet" and Path(value).expanduser().exists():
            out[name] = str(Path(value).expanduser().resolve())
    return out


def _execute(label: str, path: Path, out: Path, nb_params: dict, *, progress: bool,
             kernel_name: str | None, verbose: bool, console,
             extra_env: Mapping[str, str] | None = None) -> None:
    """Run one notebook with papermill in this process; a failed cell raises :class:`NotebookError`."""
    import papermill as pm

    bar = {"desc": label, "file": console, "ncols": 90, "leave": True} if progress else False
    env = {"TF_CPP_MIN_LOG_LEVEL": "0" if verbose else "3", **(extra_env or {})}
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # Kernels inherit fd 2: TensorFlow's C++ start-up lines, IPKernelApp warnings and
        # asyncio shutdown notes land in the log instead of the console.
        with stderr_to(None if verbose else out.with_suffix(".stderr.log")):
            # Kernels run in the user's working folder: relative paths mean what the user meant.
            pm.execute_notebook(str(path), str(out), parameters=nb_params, progress_bar=bar,
                                kernel_name=kernel_name, cwd=os.getcwd(), log_output=verbose)
    except pm.PapermillExecutionError as exc:
        raise NotebookError(f"{label}: cell {exc.exec_count} failed with {exc.ename}: "
                            f"{exc.evalue} (executed notebook: {out})") from None
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class NotebookError(RuntimeError):
    """A notebook cell failed; the message names the notebook, the cell and the exception."""


# ----------------------------------------------------------------------------------------------
# Side by side (--parallel): 02 and every 03 in their own processes, 04 once they are all done
# ----------------------------------------------------------------------------------------------
#
# Same results as a sequential run, by construction. With op determinism on (training sets it),
# TensorFlow's CPU results repeat exactly for one intra-op thread count but change with it
# (Eigen / oneDNN split reductions by thread): one SmallCNN epoch at 1, 2, 3 and 4 threads gave
# four different weight sets, every count repeatable; test probabilities moved by up to 1e-4
# (MobileNetV2, 1 epoch) and 3e-4 (SmallCNN, 5 epochs). The inter-op count changed nothing. So a
# side-by-side job always gets the intra-op count a sequential run gives it: --threads T when
# set (sequential runs then use T too), else TensorFlow's default, every core. On CPU at most
# cores // T jobs run at once, each pinned to its own T cores, so they never oversubscribe
# them; without --threads that is one job at a time. On GPUs each job gets one GPU
# (CUDA_VISIBLE_DEVICES) and the CPU threads stay as in a sequential run. XLA_FLAGS is left
# alone: Keras runs on TensorFlow here and compiles with XLA only on a GPU.

_SIDE_BY_SIDE = ("02_", "03_")
_CHILD = ("import sys; sys.path.append({pkg!r}); from covidlib import runner; "
          "sys.exit(runner._job_main(sys.argv[1]))")
_STOP_WAIT_S = 60.0  # a stopped job shuts its kernel down; then it is killed


@dataclass(frozen=True)
class Slot:
    """Where one side-by-side notebook runs.

    Attributes:
        name: words for the console (``GPU 1``, ``CPUs 2-3``).
        env: variables set for the job (its GPU, its thread counts).
        cpus: the cores its process and kernel are pinned to (None: not pinned).
    """

    name: str
    env: dict[str, str]
    cpus: tuple[int, ...] | None = None


def thread_env(threads: int | None) -> dict[str, str]:
    """Variables fixing every kernel's thread counts; empty (the libraries' defaults) for None."""
    if not threads:
        return {}
    t = str(int(threads))
    # OMP_NUM_THREADS: OpenBLAS / MKL / OpenMP builds; the inter-op count only keeps the total down.
    return {"TF_NUM_INTRAOP_THREADS": t, "TF_NUM_INTEROP_THREADS": t, "OMP_NUM_THREADS": t}


def parse_gpu_list(text: str) -> list[str]:
    """GPU ids in ``nvidia-smi -L`` output: indices, or the UUIDs of a GPU's MIG slices."""
    gpus: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        gpu = re.match(r"\s*GPU (\d+):", line)
        mig = re.match(r"\s*MIG\b.*\(UUID: (MIG-[^)\s]+)\)", line)
        if gpu:
            gpus.append((gpu.group(1), []))
        elif mig and gpus:
            gpus[-1][1].append(mig.group(1))
    return [x for index, migs in gpus for x in (migs or [index])]


def detect_gpus() -> list[str]:
    """The GPUs side-by-side jobs are pinned to, found without importing TensorFlow.

    ``CUDA_VISIBLE_DEVICES`` when set (empty or ``-1``: none), else ``nvidia-smi -L``, else none.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = []
        for item in (x.strip() for x in visible.split(",")):
            if not item or item.startswith("-"):
                break  # CUDA ignores every id from the first invalid one on
            ids.append(item)
        return ids
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        proc = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_gpu_list(proc.stdout) if proc.returncode == 0 else []


def _cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _cpu_words(cpus: Sequence[int]) -> str:
    if len(cpus) == 1:
        return f"CPU {cpus[0]}"
    if list(cpus) == list(range(cpus[0], cpus[-1] + 1)):
        return f"CPUs {cpus[0]}-{cpus[-1]}"
    return "CPUs " + ",".join(map(str, cpus))


def job_slots(parallel: int, threads: int | None = None,
              gpus: Sequence[str] | None = None) -> list[Slot]:
    """Up to ``parallel`` slots for side-by-side notebooks; one slot means one at a time.

    Args:
        parallel: the most jobs at once.
        threads: intra-op threads per job (None: TensorFlow's default, every core).
        gpus: GPU ids (None: :func:`detect_gpus`).
    """
    gpus = detect_gpus() if gpus is None else list(gpus)
    env = thread_env(threads)
    if gpus:
        return [Slot(f"GPU {g}", {"CUDA_VISIBLE_DEVICES": g, **env}) for g in gpus[:parallel]]
    cores = _cores()
    per = threads or len(cores)
    n = max(1, min(parallel, len(cores) // per))
    if n == 1:
        return [Slot("CPU", env)]
    return [Slot(_cpu_words(c), env, tuple(c))
            for c in (cores[i * per:(i + 1) * per] for i in range(n))]


def _schedule_line(parallel: int, slots: Sequence[Slot], n_jobs: int, threads: int | None) -> str:
    """One line saying how many of the 02 / 03 notebooks run at once, and why."""
    if n_jobs < 2:
        return "--parallel: one notebook between 01 and 04, nothing to run side by side"
    if len(slots) > 1:
        per = f", {threads} thread{'s' if threads > 1 else ''} each" if threads else ""
        return (f"side by side: {n_jobs} notebooks (02/03), up to {len(slots)} at a time on "
                f"{', '.join(s.name for s in slots)}{per}; 04 once all are done")
    if slots and slots[0].name.startswith("GPU"):
        return f"--parallel {parallel}: one notebook at a time (one GPU: {slots[0].name})"
    cores, want = len(_cores()), min(parallel, n_jobs)
    if threads:
        return (f"--parallel {parallel} on CPU: one notebook at a time (--threads {threads}, "
                f"{cores} cores)")
    hint = (f"; add --threads {cores // want} to run {want} at once (same results as a sequential "
            f"run with --threads {cores // want})") if cores >= want else ""
    return (f"--parallel {parallel} on CPU: one notebook at a time, each on all {cores} cores as "
            f"in a sequential run{hint}")


def _split(steps: Sequence[tuple]) -> tuple[list, list, list]:
    """The numbered steps before, during and after the side-by-side notebooks (02 and 03)."""
    numbered = list(enumerate(steps, 1))
    side = [i for i, (n, s) in enumerate(numbered) if s[0].startswith(_SIDE_BY_SIDE)]
    if not side:
        return numbered, [], []
    return numbered[:side[0]], numbered[side[0]:side[-1] + 1], numbered[side[-1] + 1:]


def shared_enhancements(steps: Sequence[tuple[str, Path, dict]]) -> list[tuple[str, str]]:
    """``(pipeline, modality)`` enhanced-image folders that two or more of ``steps`` write.

    Two kernels enhancing into one folder at once race: each one's clean-up of stray temporary
    files can delete the other's file in flight, and that image is then left out of its
    training. :func:`run` makes these folders once, before the jobs start; the notebooks then
    find every image done. Notebook 02 enhances CT only (``run_ablation``'s default modality).
    """
    users: dict[tuple[str, str], int] = {}
    for label, path, nb_params in steps:
        v = {**notebook_parameters(path), **nb_params}
        pairs: set[tuple[str, str]] = set()
        if label.startswith("02_") and v.get("RUN_ABLATION", True):
            pairs = {(p, "ct") for p in v.get("ABLATION_PIPELINES", [])}
        elif label.startswith("03_"):
            pairs = {(v.get("ENHANCEMENT", "none"), v.get("MODALITY", "ct"))}
        for pair in pairs:
            if pair[0] != "none":
                users[pair] = users.get(pair, 0) + 1
    return sorted(pair for pair, n in users.items() if n > 1)


def _enhance_shared(run_dir: str, pairs: Sequence[Sequence[str]]) -> None:
    """Make the shared enhanced-image folders (runs in a child process: it imports Keras)."""
    from covidlib import train
    from covidlib.datasets import read_manifest

    manifest = read_manifest(Path(run_dir) / "manifest.csv")
    for pipeline, modality in pairs:
        train.enhanced_manifest(manifest, run_dir, pipeline, modality, progress=False)


def _prepare_shared(pairs: Sequence[tuple[str, str]], run_dir: Path, env: Mapping[str, str]) -> None:
    """Run :func:`_enhance_shared` in a child process and say so in one line.

    Best effort: on failure the notebooks meet the same problem themselves and report it the
    way a sequential run does (notebook, cell, exception).
    """
    if not pairs:
        return
    t0 = time.perf_counter()
    code = (f"import sys; sys.path.append({str(_package_parent())!r}); from covidlib import runner; "
            f"runner._enhance_shared({str(run_dir)!r}, {[list(p) for p in pairs]!r})")
    log = run_dir / "notebooks" / "shared_enhancement.log"
    with open(log, "ab") as out:
        rc = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd(), env={**os.environ, **env},
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT).returncode
    what = ", ".join(f"{p} ({m})" for p, m in pairs)
    state = f"done in {_clock(time.perf_counter() - t0)}" if rc == 0 else f"failed (see {log})"
    print(f"shared enhancement {what} {state}", flush=True)


def _package_parent() -> Path:
    return Path(__file__).resolve().parents[1]


@dataclass
class _Job:
    """One running side-by-side notebook."""

    name: str  # "[i/n] label", as in a sequential run's lines and errors
    proc: subprocess.Popen
    slot: Slot
    result: Path  # the child's one-line failure, as JSON
    log: Path
    t0: float


def _start_job(name: str, path: Path, out: Path, nb_params: dict, slot: Slot, work: Path, *,
               kernel_name: str | None, verbose: bool) -> _Job:
    """Start one notebook in its own process (its kernel inherits the slot's environment).

    ``work`` is a private stem: ``.spec`` passes the job (pickled: parameters keep their exact
    values and types), ``.json`` brings a failure back.
    """
    spec = {"label": name, "path": str(path), "out": str(out), "params": nb_params,
            "kernel_name": kernel_name, "verbose": verbose, "result": str(work.with_suffix(".json")),
            "cpus": list(slot.cpus) if slot.cpus else None}
    spec_path = work.with_suffix(".spec")
    spec_path.write_bytes(pickle.dumps(spec))
    log = out.with_suffix(".stderr.log")
    cmd = [sys.executable, "-c", _CHILD.format(pkg=str(_package_parent())), str(spec_path)]
    with contextlib.ExitStack() as stack:
        # Quiet: everything the job prints goes to its log; verbose: to the console, as asked.
        sink = None if verbose else stack.enter_context(open(log, "ab"))
        proc = subprocess.Popen(cmd, cwd=os.getcwd(), env={**os.environ, **slot.env},
                                stdin=subprocess.DEVNULL, stdout=sink,
                                stderr=None if verbose else subprocess.STDOUT)
    return _Job(name, proc, slot, work.with_suffix(".json"), log, time.perf_counter())


def _job_main(spec_path: str) -> int:
    """Entry point of a side-by-side notebook's process: :func:`_execute`, failures to a file.

    Returns:
        0 done, 1 failed (``result`` holds the one-line message), 130 stopped.
    """
    spec = pickle.loads(Path(spec_path).read_bytes())  # written by this package's _start_job
    # Stopped = interrupted: papermill then shuts the kernel down, so no kernel outlives its job.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if spec.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec["cpus"])  # the kernel and its workers inherit it
    try:
        _execute(spec["label"], Path(spec["path"]), Path(spec["out"]), spec["params"],
                 progress=False, kernel_name=spec["kernel_name"], verbose=spec["verbose"],
                 console=sys.stdout)
        return 0
    except KeyboardInterrupt:
        return 130
    except NotebookError as exc:
        failure = {"notebook": True, "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any other failure still reaches the user in one line
        failure = {"notebook": False, "message": f"{spec['label']}: {type(exc).__name__}: {exc}"}
    Path(spec["result"]).write_text(json.dumps(failure), encoding="utf-8")
    return 1


def _failure(job: _Job) -> RuntimeError:
    """The error a finished, failed job is reported with (one line, as in a sequential run)."""
    try:
        failure = json.loads(job.result.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return RuntimeError(f"{job.name}: its process ended with exit status {job.proc.returncode} "
                            f"(log: {job.log})")
    message = " ".join(str(failure["message"]).split())
    return NotebookError(message) if failure.get("notebook") else RuntimeError(message)


def _stop(jobs: Sequence[_Job]) -> None:
    """Stop running jobs and wait for them (each shuts its kernel down first); kill stragglers."""
    for job in jobs:
        if job.proc.poll() is None:
            job.proc.terminate()
    deadline = time.monotonic() + _STOP_WAIT_S
    for job in jobs:
        try:
            job.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            job.proc.kill()  # its kernel notices its parent is gone and exits (ipykernel)
            job.proc.wait()
        print(f"{job.name} stopped", flush=True)


def run_side_by_side(steps: Sequence[tuple[int, tuple[str, Path, dict]]], total: int,
                     slots: Sequence[Slot], out_dir: Path, *, kernel_name: str | None = None,
                     verbose: bool = False, poll_s: float = 0.2) -> None:
    """Run independent notebooks, each in its own process, up to ``len(slots)`` at a time.

    Args:
        steps: ``(number, (label, notebook, parameters))`` in plan order.
        total: the number of notebooks in the plan (for ``[i/n]``).
        slots: where jobs run (:func:`job_slots`).
        out_dir: ``RUN_DIR/notebooks``: executed copies and ``<label>.stderr.log``.

    Raises:
        NotebookError: the first failed cell, in the one line a sequential run gives; the other
            jobs are stopped and awaited first.
    """
    waiting, free, running = list(steps), list(slots), []
    with tempfile.TemporaryDirectory(prefix="covidlib-jobs-") as tmp:
        try:
            while waiting or running:
                while waiting and free:
                    i, (label, path, nb_params) = waiting.pop(0)
                    name, slot = f"[{i}/{total}] {label}", free.pop(0)
                    if verbose:
                        print(f"{name}: {nb_params}", flush=True)
                    running.append(_start_job(name, path, out_dir / f"{label}.ipynb", nb_params, slot,
                                              Path(tmp) / str(i), kernel_name=kernel_name,
                                              verbose=verbose))
                    print(f"{name} started on {slot.name}", flush=True)
                done = [job for job in running if job.proc.poll() is not None]
                if not done:
                    time.sleep(poll_s)
                for job in done:
                    running.remove(job)
                    if job.proc.returncode != 0:
                        raise _failure(job)
                    free.append(job.slot)
                    print(f"{job.name} done in {_clock(time.perf_counter() - job.t0)}", flush=True)
        finally:
            _stop(running)


def summary_lines(run_dir: Path) -> list[str]:
    """A few lines of test metrics from ``evaluation.json`` (empty if there is none)."""
    path = run_dir / "evaluation.json"
    if not path.is_file():
        return []
    ev = json.loads(path.read_text())
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"  test split, {ev.get('n_test')} images: accuracy, macro AUC"]
    blocks = list(ev.get("models", {}).items())
    if ev.get("ensemble"):
        blocks.append((f"{ev['ensemble'].get('method')} vote", ev["ensemble"]))
    for name, b in blocks:
        lines.append(f"    {name:<16} {fmt(b.get('accuracy'))}  {fmt(b.get('auc_macro'))}")
    return lines


def run(params: dict[str, Any] | None = None, *, nb_dir: Path | None = None,
        progress: bool = True, kernel_name: str | None = None, verbose: bool = False,
        parallel: int = 1, threads: int | None = None) -> Path:
    """Execute the whole notebook pipeline; return ``RUN_DIR``.

    Prints the plan (what each notebook will train), one progress line per notebook and its
    time, then a short summary. Kernel start-up noise goes to ``RUN_DIR/notebooks/*.stderr.log``
    unless ``verbose``.

    Args:
        params: notebook parameters (shared vocabulary: ``DATASET, XRAY_DATASET, RUN_DIR, SEED,
            IMG_SIZE, EPOCHS, BATCH_SIZE, BACKBONES, XRAY_BACKBONE, ENHANCEMENT, WEIGHTS``...).
        nb_dir: folder of the numbered notebooks.
        progress: show papermill's progress bar (one line per notebook).
        kernel_name: Jupyter kernel (default: the one recorded in the notebooks).
        verbose: show everything the kernels print.
        parallel: run up to this many of the notebooks between 01 and 04 (02, every 03) at
            once, each in its own process, on its own GPU or cores; 1 runs them in order.
        threads: TensorFlow / OpenMP threads of every kernel (None: the libraries' defaults).
            Results depend on it and never on ``parallel``: see the note above :class:`Slot`.

    Raises:
        ValueError: a parameter is refused (one line; nothing has run).
        NotebookError: a cell failed (the message names the notebook, cell and exception).
    """
    for flag, value in (("--parallel", parallel), ("--threads", threads)):
        if value is not None and not (_is_int(value) and value >= 1):
            raise ValueError(f"{flag} {value!r}: expected an integer >= 1")
    params = _resolve_local_paths(dict(params or {}))
    problem = check_value("RUN_DIR", params.get("RUN_DIR"), None)  # before it becomes a Path
    if problem:
        raise ValueError(problem)
    run_dir = resolve_run_dir(params.get("RUN_DIR"))
    params["RUN_DIR"] = str(run_dir)
    steps = plan(params, nb_dir)
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"covidlib run: {len(steps)} notebooks -> {run_dir}", flush=True)
    for label, path, nb_params in steps:
        print(f"  {label}: {describe_step(label, nb_params, notebook_parameters(path))}", flush=True)
    before, side, after = _split(steps)
    slots = job_slots(min(parallel, len(side)), threads) if parallel > 1 and len(side) > 1 else []
    if parallel > 1:
        print(f"  {_schedule_line(parallel, slots, len(side), threads)}", flush=True)
    env = thread_env(threads)
    in_order = functools.partial(_run_in_order, total=len(steps), out_dir=out_dir, progress=progress,
                                 kernel_name=kernel_name, verbose=verbose, env=env)
    t_start = time.perf_counter()
    if len(slots) > 1:
        in_order(before)
        _prepare_shared(shared_enhancements([step for _, step in side]), run_dir, env)
        run_side_by_side(side, len(steps), slots, out_dir, kernel_name=kernel_name, verbose=verbose)
        in_order(after)
    else:
        in_order(list(enumerate(steps, 1)))
    print(f"done in {_clock(time.perf_counter() - t_start)}: {run_dir}", flush=True)
    for line in summary_lines(run_dir):
        print(line)
    return run_dir


def _run_in_order(steps: Sequence[tuple[int, tuple[str, Path, dict]]], *, total: int, out_dir: Path,
                  progress: bool, kernel_name: str | None, verbose: bool,
                  env: Mapping[str, str]) -> None:
    """Execute numbered steps one after the other in this process (papermill's kernels)."""
    for i, (label, path, nb_params) in steps:
        t0 = time.perf_counter()
        if verbose:
            print(f"[{i}/{total}] {label}: {nb_params}", flush=True)
        _execute(f"[{i}/{total}] {label}", path, out_dir / f"{label}.ipynb", nb_params,
                 progress=progress, kernel_name=kernel_name, verbose=verbose, console=sys.stdout,
                 extra_env=env)
        if not progress:
            print(f"[{i}/{total}] {label} done in {_clock(time.perf_counter() - t0)}", flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"
