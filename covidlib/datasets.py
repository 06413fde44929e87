"""Data ingestion: any supported data set layout -> one manifest (``path, label, patient_id, split,
source, modality`` [+ ``xmin, ymin, xmax, ymax``]).

What :func:`ingest` does, in order (each step lives in the module named):

1. **Find the layout** (or take ``layout=``) and list its files (:mod:`covidlib.layouts`):
   ``class_folders`` (``<root>/<class>/*``), ``split_folders`` (``<root>/<split>/<class>/*``),
   ``covidx`` (COVIDx label files), ``ucsd`` (UCSD COVID-CT split lists) or ``csv`` (a user table
   with path + label).
2. **Map class names to canonical labels** (:mod:`covidlib.aliases`, case, space, ``_`` and ``-``
   insensitive). Anything unknown is an error that lists what was found -- never a guess.
3. **Convert DICOM series and NIfTI volumes** to PNG slices under ``work_dir/converted/``
   (:mod:`covidlib.volumes`; the source is never written to).
4. **Verify every image by decoding it** (thread pool, here). Unreadable, truncated, empty, blank
   or tiny files go to ``quarantine`` with a reason; they are never deleted.
5. **Patient ids** (:mod:`covidlib.splits`) from the label file / CSV / DICOM series / NIfTI volume /
   ``patient_pattern``. Without them every image becomes its own "patient" (``img:<path>``), a
   loud warning is added, and near-duplicate images are grouped so that copies cannot straddle
   splits.
6. **Splits** (:mod:`covidlib.splits`): kept as the data set gives them (missing val / test carved
   out of train by patient), else assigned by :func:`covidlib.splits.assign_splits` (stratified by
   class, grouped by patient, seeded); then the leakage checks.

This module also reads and writes manifests (:func:`read_manifest`, :func:`write_manifest`,
:func:`save_run_manifest`) and counts them (:func:`summarize`).

No keras / tensorflow import here.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from covidlib import config
from covidlib import images as cimg
from covidlib.aliases import IGNORE, format_alias_table, map_labels
from covidlib.fsutil import atomic_write_bytes
from covidlib.layouts import LAYOUTS, Item, collect
from covidlib.splits import (GROUP_COLUMN, check_fractions, compile_patient_pattern, complete_splits,
                             leakage_warnings, set_patient_ids)
from covidlib.volumes import conversion_root, convert_medical

__all__ = [
    "IngestResult", "ingest", "write_manifest", "read_manifest", "save_run_manifest", "summarize",
]


# ----------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------


@dataclass
class IngestResult:
    """What :func:`ingest` produced.

    Attributes:
        manifest: one row per usable image (see ``docs/CONTRACTS.md``), absolute paths.
        quarantine: ``[{"path", "reason"}]`` for every file that could not be used.
        warnings: problems the user must see (missing patient ids, leakage in given splits...).
        alias_table: class name as found in the data -> canonical label (or ``"ignore"``).
        layout: the layout that was read (one of :data:`covidlib.layouts.LAYOUTS`).
        notes: informational messages (conversions, skipped junk files, carved splits).
    """

    manifest: pd.DataFrame
    quarantine: list[dict]
    warnings: list[str]
    alias_table: dict[str, str]
    layout: str
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        """Human-readable summary: layout, alias table, counts, warnings, quarantine."""
        lines = [f"layout: {self.layout}", format_alias_table(self.alias_table), "",
                 summarize(self.manifest).to_string() if len(self.manifest) else "(no usable images)"]
        lines += [f"note: {n}" for n in self.notes] + [f"WARNING: {w}" for w in self.warnings]
        if self.quarantine:
            lines.append(f"quarantined {len(self.quarantine)} file(s):")
            lines += [f"  {q['path']}: {q['reason']}" for q in self.quarantine[:20]]
            if len(self.quarantine) > 20:
                lines.append(f"  ... and {len(self.quarantine) - 20} more")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Verification (decode every image)
# ----------------------------------------------------------------------------------------------


def _verify(items: list[Item], quarantine: list[dict]) -> tuple[list[Item], list[tuple]]:
    """Decode every image in a thread pool (cv2 releases the GIL); keep the good ones.

    Returns the kept items and, per kept item, ``(perceptual_hash, structure_signature)``: the
    signature lets near-duplicate grouping confirm hash matches, since distinct CT slices are
    often 0-2 hash bits apart (see covidlib.audit).
    """
    from covidlib.audit import perceptual_hash, structure_signature

    def check(it: Item):
        try:
            img = cimg.read_image(it.path)
        except cimg.ImageReadError as e:
            return e.reason, None
        except MemoryError:
            return "image too large to decode in memory", None
        problem = cimg.image_problem(img)
        if problem:
            return problem, None
        return None, (perceptual_hash(img), structure_signature(img))

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        results = list(pool.map(check, items))
    kept, hashes = [], []
    for it, (reason, h) in zip(items, results):
        if reason is not None:
            quarantine.append({"path": str(it.path), "reason": reason})
        else:
            kept.append(it)
            hashes.append(h)
    return kept, hashes


# ----------------------------------------------------------------------------------------------
# Manifest I/O
# ----------------------------------------------------------------------------------------------


def _order_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by split and label (canonical orders), then path."""
    rank = {"split": {s: i for i, s in enumerate(config.SPLITS)},
            "label": {c: i for i, c in enumerate(config.CANONICAL_LABELS)}}

    def key(col: pd.Series) -> pd.Series:
        return col.map(rank[col.name]).fillna(99) if col.name in rank else col.astype(str)

    return df.sort_values(["split", "label", "path"], key=key).reset_index(drop=True)


def write_manifest(df: pd.DataFrame, path: str | os.PathLike, relative: bool = False) -> Path:
    """Write a manifest CSV atomically (temp file in the same folder + ``os.replace``).

    Args:
        df: manifest rows (must hold the contract columns).
        path: destination ``.csv``.
        relative: write paths under the manifest's folder relative to it (portable folders).

    Returns:
        The written path.
    """
    missing = [c for c in config.MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}; needs {config.MANIFEST_COLUMNS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = df.copy()
    if relative:
        base = path.parent.resolve()

        def rel(p: str) -> str:
            try:
                return Path(p).resolve().relative_to(base).as_posix()
            except ValueError:
                return str(p)

        out["path"] = out["path"].astype(str).map(rel)
    cols = config.MANIFEST_COLUMNS + [c for c in config.BBOX_COLUMNS if c in out.columns]
    cols += [c for c in out.columns if c not in cols]
    return atomic_write_bytes(path, out[cols].to_csv(index=False).encode("utf-8"))


def read_manifest(path: str | os.PathLike, check_files: bool = False) -> pd.DataFrame:
    """Read and validate a manifest CSV; relative paths are resolved against its folder.

    Args:
        path: the manifest ``.csv``.
        check_files: also require every image file to exist.

    Returns:
        DataFrame with absolute ``path`` strings, string ids, float bbox columns (when present).

    Raises:
        FileNotFoundError: no such manifest (or a missing image with ``check_files``).
        ValueError: missing columns, non-canonical labels, unknown splits / modalities, empty paths.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as e:
        raise ValueError(f"{path}: not a readable CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in config.MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: missing manifest column(s) {missing}; a manifest needs {config.MANIFEST_COLUMNS}. "
            "For a raw table of paths and class names use covidlib.datasets.ingest(<csv>) instead."
        )

    def bad_rows(mask: pd.Series) -> str:
        rows = (np.flatnonzero(mask.to_numpy()) + 2)[:5].tolist()
        return f"CSV line(s) {rows}{' ...' if mask.sum() > 5 else ''}"

    for col, allowed in (("label", config.CANONICAL_LABELS), ("split", config.SPLITS),
                         ("modality", config.MODALITIES)):
        m = ~df[col].isin(allowed)
        if m.any():
            raise ValueError(
                f"{path}: {col} values {sorted(set(df.loc[m, col]))} are not allowed (expected one of "
                f"{list(allowed)}) at {bad_rows(m)}"
            )
    for col in ("path", "patient_id"):
        m = df[col].str.strip() == ""
        if m.any():
            raise ValueError(f"{path}: empty {col} at {bad_rows(m)}")
    base = path.parent.resolve()
    df["path"] = [str(p if Path(p).is_absolute() else (base / p)) for p in df["path"]]
    for c in config.BBOX_COLUMNS:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c].replace("", np.nan), errors="coerce")
    if check_files:
        absent = [p for p in df["path"] if not Path(p).is_file()]
        if absent:
            raise FileNotFoundError(f"{path}: {len(absent)} image file(s) missing, e.g. {absent[:3]}")
    return df


def summarize(df: pd.DataFrame, unit: str = "images") -> pd.DataFrame:
    """Counts per split x class (canonical orders), with a ``total`` row and column.

    Args:
        df: a manifest.
        unit: ``"images"`` (rows) or ``"patients"`` (distinct ``patient_id``).
    """
    if unit not in ("images", "patients"):
        raise ValueError(f"unit must be 'images' or 'patients', got {unit!r}")
    classes = config.ordered_classes(df["label"]) if len(df) else []
    splits = [s for s in config.SPLITS if s in set(df["split"])] if len(df) else []
    if unit == "images":
        tab = pd.crosstab(df["split"], df["label"]) if len(df) else pd.DataFrame()
    else:
        tab = df.groupby(["split", "label"])["patient_id"].nunique().unstack(fill_value=0) if len(df) else pd.DataFrame()
    tab = tab.reindex(index=splits, columns=classes, fill_value=0).astype(int)
    if unit == "images":
        tab["total"] = tab.sum(axis=1)
        tab.loc["total"] = tab.sum(axis=0)
    else:
        tab["total"] = df.groupby("split")["patient_id"].nunique().reindex(splits).fillna(0).astype(int) if len(df) else []
        tab.loc["total"] = [df.loc[df["label"] == c, "patient_id"].nunique() for c in classes] + [df["patient_id"].nunique()]
    tab.index.name = "split"
    tab.columns.name = "label"
    return tab


# ----------------------------------------------------------------------------------------------
# ingest, step by step
# ----------------------------------------------------------------------------------------------


def _resolve_source(source, modality: str, seed: int,
                    synthetic_patients: int | None = None) -> tuple[Path, str, list[str], dict, list[str]]:
    """(local path, source name, notes, registry aliases, warnings) for "synthetic", a registry
    name or a path."""
    notes: list[str] = []
    warn: list[str] = []
    if isinstance(source, str) and source.strip().lower() == "synthetic":
        from covidlib.synthetic import write_synthetic_dataset

        n = int(synthetic_patients or 12)
        # One folder per parameter set: two runs with different sizes never rewrite each other.
        root = config.data_dir() / "synthetic" / f"{modality}-p{n}-seed{seed}"
        csv_path = write_synthetic_dataset(root=root, modality=modality, n_patients=n, seed=seed)
        notes.append(f"synthetic {modality} phantom data set at {root} (for testing the pipeline, not medicine)")
        return Path(csv_path), "synthetic", notes, {}, warn
    p = Path(os.path.expanduser(str(source)))
    if p.exists() or os.path.lexists(p):
        if not p.exists():
            raise FileNotFoundError(f"source {source!r} is a broken link")
        return p, (p.stem if p.is_file() else p.name) or "data", notes, {}, warn
    s = str(source).strip()
    # Registry names may be Kaggle handles ("owner/slug", "kaggle:owner/slug"); anything more
    # path-like than that is a missing local path.
    looks_like_path = (isinstance(source, os.PathLike) or s.startswith(("/", ".", "~")) or "\\" in s
                       or (s.count("/") > 1 and not s.lower().startswith("kaggle:"))
                       or Path(s).suffix.lower() in (".csv", ".txt", ".gz", ".nii", ".dcm") + config.IMAGE_EXTENSIONS)
    if looks_like_path:
        raise FileNotFoundError(f"data source not found: {s}")
    from covidlib import download

    root = Path(download.resolve(s))
    notes.append(f"registry data set {s!r} at {root}")
    reg_aliases: dict[str, str] = {}
    try:
        info = download.get_info(s)
    except Exception:  # e.g. a "kaggle:" handle outside the registry
        info = None
    if info is not None:
        # The registry knows this set's class names; None there means "not used by default".
        reg_aliases = {k: (v if v else IGNORE) for k, v in (info.label_map or {}).items()}
        if info.modality in config.MODALITIES and info.modality != modality:
            warn.append(f"the registry lists {s!r} as {info.modality!r} but ingest was called with "
                        f"modality={modality!r}")
    return root, s, notes, reg_aliases, warn


def _check_arguments(modality: str, layout: str | None, val_fraction: float, test_fraction: float,
                     patient_pattern: str | re.Pattern | None) -> re.Pattern | None:
    """Refuse bad arguments before any file is read; the compiled patient pattern (or None)."""
    if modality not in config.MODALITIES:
        raise ValueError(f"modality must be one of {list(config.MODALITIES)}, got {modality!r}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    check_fractions(val_fraction, test_fraction)
    return compile_patient_pattern(patient_pattern) if patient_pattern is not None else None


def _manifest_frame(items: list[Item], source_name: str, modality: str) -> tuple[pd.DataFrame, bool]:
    """One row per item (split still None where the layout gave none) with the grouping column
    :data:`covidlib.splits.GROUP_COLUMN`; and whether any item has a bounding box."""
    rows = []
    for it in items:
        row = {"path": str(it.path.absolute()), "label": it.label, "patient_id": str(it.patient),
               "split": it.split, "source": it.source or source_name, "modality": modality,
               GROUP_COLUMN: it.group or str(it.patient)}
        if it.bbox is not None:
            row.update(dict(zip(config.BBOX_COLUMNS, it.bbox)))
        rows.append(row)
    df = pd.DataFrame(rows)
    has_bbox = any(it.bbox is not None for it in items)
    if has_bbox:
        for c in config.BBOX_COLUMNS:
            if c not in df.columns:
                df[c] = np.nan
    return df, has_bbox


def ingest(
    source: str | os.PathLike,
    *,
    modality: str = "ct",
    seed: int = 0,
    patient_pattern: str | re.Pattern | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    work_dir: str | os.PathLike | None = None,
    aliases: Mapping[str, str | None] | None = None,
    layout: str | None = None,
    synthetic_patients: int | None = None,
) -> IngestResult:
    """Read a data set in any supported layout into one verified manifest.

    Args:
        source: ``"synthetic"``, a registry name (``covidlib.download``), a data folder, a CSV
            (path + label [+ patient_id, split, source, xmin..ymax]), or a COVIDx / UCSD label file.
        modality: ``"ct"`` or ``"xray"`` (recorded in the manifest).
        seed: seed for assigned splits.
        patient_pattern: regex (group 1, else whole match) or a :data:`covidlib.splits.PATIENT_PATTERNS`
            name, matched against each file name (against the root-relative path if it contains ``/``).
        val_fraction, test_fraction: shares for assigned splits (and for carving a missing
            val / test split out of a given train split).
        work_dir: where DICOM / NIfTI slices are converted to (``work_dir/converted/...``);
            default ``config.data_dir()``. Never inside the source folder.
        aliases: extra / overriding ``{class name: canonical label or "ignore"}``.
        synthetic_patients: patients per class when ``source == "synthetic"`` (default 12).
        layout: force one of :data:`covidlib.layouts.LAYOUTS` instead of detecting it.

    Returns:
        :class:`IngestResult`.

    Raises:
        FileNotFoundError: source path not found.
        ValueError: unknown layout / modality, unmapped class names (the message lists the
            classes found and the accepted aliases), no usable images, bad fractions or pattern.
    """
    rx = _check_arguments(modality, layout, val_fraction, test_fraction, patient_pattern)
    root, source_name, notes, reg_aliases, warn = _resolve_source(source, modality, seed, synthetic_patients)
    if reg_aliases:
        aliases = {**reg_aliases, **dict(aliases or {})}  # the user's aliases win
    quarantine: list[dict] = []
    found = collect(root, layout, modality=modality, aliases=aliases, quarantine=quarantine, warn=warn)
    notes.extend(found.notes)
    if not found.items:
        raise ValueError(
            f"no images found in {root} (layout {found.layout!r}); {len(quarantine)} file(s) quarantined"
            + (f", e.g. {quarantine[0]['path']}: {quarantine[0]['reason']}" if quarantine else "")
        )
    items, alias_table, alias_notes = map_labels(found.items, aliases, found.extra_aliases)
    notes.extend(alias_notes)
    items = convert_medical(items, conversion_root(work_dir, found.data_root, items), quarantine, notes)
    items, hashes = _verify(items, quarantine)
    if not items:
        example = f", e.g. {quarantine[0]['path']}: {quarantine[0]['reason']}" if quarantine else ""
        raise ValueError(f"no readable images in {root}: {len(quarantine)} file(s) quarantined{example}")
    set_patient_ids(items, hashes, rx, warn, notes)
    df, has_bbox = _manifest_frame(items, source_name, modality)
    df = complete_splits(df, seed, val_fraction, test_fraction, warn, notes)
    warn.extend(leakage_warnings(df, val_fraction, test_fraction))
    cols = config.MANIFEST_COLUMNS + (config.BBOX_COLUMNS if has_bbox else [])
    df = _order_manifest(df.drop(columns=GROUP_COLUMN)[cols])
    return IngestResult(manifest=df, quarantine=quarantine, warnings=warn, alias_table=dict(alias_table),
                        layout=found.layout, notes=notes)


def save_run_manifest(run_dir: str | os.PathLike, results: Mapping[str, IngestResult],
                      sources: Mapping[str, Any]) -> pd.DataFrame:
    """Write the run's ``manifest.csv`` (all modalities), ``quarantine.csv`` and ``dataset.json``.

    Args:
        run_dir: the run folder.
        results: ``{modality: IngestResult}`` for the data sets ingested in this run.
        sources: what the user asked for, e.g. ``{"ct": DATASET, "xray": XRAY_DATASET}``.

    Returns:
        The combined manifest.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not results:
        raise ValueError("no data set was ingested")
    manifest = pd.concat([r.manifest for r in results.values()], ignore_index=True)
    write_manifest(manifest, run_dir / "manifest.csv")
    quarantine = pd.DataFrame([q for r in results.values() for q in r.quarantine],
                              columns=["path", "reason"])
    atomic_write_bytes(run_dir / "quarantine.csv", quarantine.to_csv(index=False).encode("utf-8"))
    meta = {k: (str(v) if v is not None else None) for k, v in sources.items()}
    meta["layouts"] = {m: r.layout for m, r in results.items()}
    atomic_write_bytes(run_dir / "dataset.json", json.dumps(meta, indent=2).encode("utf-8"))
    return manifest
