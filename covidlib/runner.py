"""The batch runner: executes the numbered notebooks in order with papermill.

``01`` builds the manifest, ``02`` runs the enhancement ablation, ``03`` trains once per CT
backbone in ``BACKBONES`` (and once more for the phase-1 X-ray model ``XRAY_BACKBONE`` when
``XRAY_DATASET`` is set), ``04`` evaluates, votes and runs the two-phase cascade. Executed copies
are saved in ``RUN_DIR/notebooks/`` next to the outputs they produced.

Defaults live in one place only: each notebook's ``parameters`` cell. The runner reads them with
``papermill.inspect_notebook`` and passes a notebook only the parameters it declares.
"""
from __future__ import annotations

import ast
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from covidlib import config

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
    from covidlib.fsutil import atomic_write_bytes

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
    """Default values of a notebook's ``parameters`` cell."""
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


def plan(params: dict[str, Any], nb_dir: Path | None = None) -> list[tuple[str, Path, dict]]:
    """The notebooks to run, in order, each with the parameters it receives.

    Returns:
        ``[(label, notebook path, parameters)]``.
    """
    nb_dir = nb_dir or notebooks_dir()
    paths = {key: nb_dir / name for key, name in NOTEBOOKS.items()}
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(f"notebook {p} not found (set COVIDLIB_NOTEBOOKS or --notebooks)")
    declared = {key: notebook_parameters(p) for key, p in paths.items()}
    unknown = set(params) - set().union(*declared.values())
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)}; the notebooks declare "
                         f"{sorted(set().union(*declared.values()))}")

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
        tune = f" + {v['FINE_TUNE_EPOCHS']} fine-tune" if v.get("WEIGHTS") and v["FINE_TUNE_EPOCHS"] else ""
        return (f"trains {v['BACKBONE']} on {v['MODALITY']}, {v['IMG_SIZE']} px, up to {v['EPOCHS']} epochs"
                f"{tune}, weights {v['WEIGHTS']}, enhancement {v['ENHANCEMENT']}")
    if label.startswith("04_"):
        return (f"evaluates {', '.join(v['BACKBONES'])} and their {v['VOTE']} vote; "
                f"phase 1 xray_{v['XRAY_BACKBONE']}")
    return f"ingests {v.get('DATASET')} (CT) and {v.get('XRAY_DATASET')} (X-ray), audits them"


def _resolve_local_paths(params: dict[str, Any]) -> dict[str, Any]:
    """Relative data paths that exist are made absolute against the user's working folder."""
    out = dict(params)
    for name in ("DATASET", "XRAY_DATASET", "EXTERNAL_DATASET", "COHORT"):
        value = out.get(name)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            out[name] = str(Path(value).expanduser().resolve())
    return out


@contextlib.contextmanager
def _stderr_to(path: Path | None):
    """Send this process's and its children's stderr (fd 2) to ``path`` while the block runs.

    Kernels inherit fd 2: TensorFlow's C++ start-up lines, IPKernelApp warnings and asyncio
    shutdown notes land in the log instead of the console. Errors are still raised and reported.
    """
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _execute(label: str, path: Path, out: Path, nb_params: dict, *, progress: bool,
             kernel_name: str | None, verbose: bool, console) -> None:
    import papermill as pm

    bar = {"desc": label, "file": console, "ncols": 90, "leave": True} if progress else False
    env = {"TF_CPP_MIN_LOG_LEVEL": "0" if verbose else "3"}
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with _stderr_to(None if verbose else out.with_suffix(".stderr.log")):
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


def summary_lines(run_dir: Path) -> list[str]:
    """A few lines of test metrics from ``evaluation.json`` (empty if there is none)."""
    path = run_dir / "evaluation.json"
    if not path.is_file():
        return []
    import json

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
        progress: bool = True, kernel_name: str | None = None, verbose: bool = False) -> Path:
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

    Raises:
        NotebookError: a cell failed (the message names the notebook, cell and exception).
    """
    params = _resolve_local_paths(dict(params or {}))
    run_dir = resolve_run_dir(params.get("RUN_DIR"))
    params["RUN_DIR"] = str(run_dir)
    steps = plan(params, nb_dir)
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"covidlib run: {len(steps)} notebooks -> {run_dir}", flush=True)
    for label, path, nb_params in steps:
        print(f"  {label}: {describe_step(label, nb_params, notebook_parameters(path))}", flush=True)
    t_start = time.perf_counter()
    for i, (label, path, nb_params) in enumerate(steps, 1):
        t0 = time.perf_counter()
        if verbose:
            print(f"[{i}/{len(steps)}] {label}: {nb_params}", flush=True)
        _execute(f"[{i}/{len(steps)}] {label}", path, out_dir / f"{label}.ipynb", nb_params,
                 progress=progress, kernel_name=kernel_name, verbose=verbose, console=sys.stdout)
        if not progress:
            print(f"[{i}/{len(steps)}] {label} done in {_clock(time.perf_counter() - t0)}", flush=True)
    print(f"done in {_clock(time.perf_counter() - t_start)}: {run_dir}", flush=True)
    for line in summary_lines(run_dir):
        print(line)
    return run_dir


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"
