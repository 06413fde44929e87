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
import os
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
    """The numbered notebooks: ``COVIDLIB_NOTEBOOKS`` or ``notebooks/`` of the checkout."""
    return Path(os.environ.get("COVIDLIB_NOTEBOOKS", config.PROJECT_ROOT / "notebooks"))


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


def run(params: dict[str, Any] | None = None, *, nb_dir: Path | None = None,
        progress: bool = True, kernel_name: str | None = None) -> Path:
    """Execute the whole notebook pipeline; return ``RUN_DIR``.

    Args:
        params: notebook parameters (shared vocabulary: ``DATASET, XRAY_DATASET, RUN_DIR, SEED,
            IMG_SIZE, EPOCHS, BATCH_SIZE, BACKBONES, XRAY_BACKBONE, ENHANCEMENT, WEIGHTS``...).
        nb_dir: folder of the numbered notebooks.
        progress: show papermill's progress bar.
        kernel_name: Jupyter kernel (default: the one recorded in the notebooks).
    """
    import papermill as pm

    params = dict(params or {})
    run_dir = resolve_run_dir(params.get("RUN_DIR"))
    params["RUN_DIR"] = str(run_dir)
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    for label, path, nb_params in plan(params, nb_dir):
        print(f"[covidlib run] {label}: {nb_params}", flush=True)
        pm.execute_notebook(
            str(path), str(out_dir / f"{label}.ipynb"), parameters=nb_params,
            progress_bar=progress, kernel_name=kernel_name, cwd=str(path.parent),
        )
    return run_dir
