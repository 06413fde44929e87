"""Data ingestion: any supported data set layout -> one manifest (``path, label, patient_id, split,
source, modality`` [+ ``xmin, ymin, xmax, ymax``]).

What :func:`ingest` does, in order:

1. **Find the layout** (or take ``layout=``): ``class_folders`` (``<root>/<class>/*``),
   ``split_folders`` (``<root>/<split>/<class>/*``), ``covidx`` (COVIDx label files), ``ucsd``
   (UCSD COVID-CT split lists) or ``csv`` (a user table with path + label).
2. **Map class names to canonical labels** through :data:`ALIASES` (case, space, ``_`` and ``-``
   insensitive). Anything unknown is an error that lists what was found -- never a guess.
3. **Convert DICOM series and NIfTI volumes** to PNG slices under ``work_dir/converted/`` (the
   source is never written to).
4. **Verify every image by decoding it** (thread pool). Unreadable, truncated, empty, blank or
   tiny files go to ``quarantine`` with a reason; they are never deleted.
5. **Patient ids** from the label file / CSV / DICOM series / NIfTI volume / ``patient_pattern``.
   Without them every image becomes its own "patient" (``img:<path>``), a loud warning is added,
   and near-duplicate images are grouped so that copies cannot straddle splits.
6. **Splits**: kept as the data set gives them (missing val / test carved out of train by
   patient), else assigned by :func:`assign_splits` (stratified by class, grouped by patient,
   seeded).

No keras / tensorflow import here.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
import warnings as _warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from covidlib import config
from covidlib.fsutil import atomic_write_bytes
from covidlib import io as cio

__all__ = [
    "ALIASES",
    "COVIDX_CT_CLASSES",
    "PATIENT_PATTERNS",
    "LAYOUTS",
    "SPLIT_ALIASES",
    "IngestResult",
    "ingest",
    "normalize_class_name",
    "resolve_label",
    "format_alias_table",
    "assign_splits",
    "write_manifest",
    "read_manifest",
    "summarize",
]

# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

#: Accepted class names -> canonical label. Matching ignores case, spaces, ``_`` and ``-``
#: (``COVID-19`` == ``covid_19`` == ``Covid 19``). "Viral Pneumonia" (the 3-class chest X-ray
#: sets) maps to ``cap``: it is non-COVID pneumonia, which is the role CAP plays in the CT sets,
#: so the X-ray and CT phases share the covid / cap / normal classes. Override with ``aliases=``
#: (e.g. ``{"Viral Pneumonia": "non_covid"}``). A binary set stays binary: "non-COVID" is
#: ``non_covid``, never ``normal``.
ALIASES: dict[str, str] = {
    # covid
    "covid": "covid",
    "COVID-19": "covid",
    "covid19": "covid",
    "SARS-CoV-2": "covid",
    "NCP": "covid",  # novel coronavirus pneumonia (CC-CCII / COVIDx CT)
    "positive": "covid",  # COVIDx CXR: positive for COVID-19
    "CT_COVID": "covid",  # UCSD COVID-CT image folder
    "COVID-19 pneumonia": "covid",
    # cap
    "cap": "cap",
    "CP": "cap",  # common pneumonia (CC-CCII / COVIDx CT)
    "pneumonia": "cap",
    "viral pneumonia": "cap",
    "bacterial pneumonia": "cap",
    "community-acquired pneumonia": "cap",
    "non-COVID pneumonia": "cap",
    "other pneumonia": "cap",
    # normal
    "normal": "normal",
    "healthy": "normal",
    "no finding": "normal",
    # non_covid
    "non-COVID": "non_covid",
    "NonCOVID": "non_covid",
    "non covid": "non_covid",
    "negative": "non_covid",
    "CT_NonCOVID": "non_covid",
    "COVID negative": "non_covid",
}

#: Numeric classes of the COVIDx CT label files.
COVIDX_CT_CLASSES: dict[str, str] = {"0": "normal", "1": "cap", "2": "covid"}

#: Named patient-id patterns for ``ingest(patient_pattern=<name>)``; group 1 is the patient id.
#: Matched against the file name (or against the path relative to the data root when the
#: pattern contains ``/``).
PATIENT_PATTERNS: dict[str, str] = {
    # COVIDx CT / CC-CCII: NCP_96_1328_0032.png -> NCP_96 (class prefix, patient, scan, slice)
    "covidx": r"^([A-Za-z]+_\d+)_",
    # covidlib.synthetic: ct_covid_p003_012.png -> ct_covid_p003
    "synthetic": r"^(.+)_\d+\.[A-Za-z]+$",
}

#: Folder names of the split layout (case-insensitive) -> split.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}

LAYOUTS: tuple[str, ...] = ("class_folders", "split_folders", "covidx", "ucsd", "csv")

_IGNORE = "ignore"
_JUNK_FILES = {".ds_store", "thumbs.db", "desktop.ini", "._.ds_store"}
# Segmentation masks are images too; inside a class folder they would become "patients".
_MASK_DIRS = {"mask", "masks", "lungmask", "lungmasks", "infectionmask", "infectionmasks",
              "segmentation", "segmentations"}
_PATH_COLS = ("path", "filepath", "file_path", "image_path", "imagepath", "image", "filename", "file")
_LABEL_COLS = ("label", "class", "diagnosis", "target", "category", "finding")
_PATIENT_COLS = ("patient_id", "patientid", "patient", "subject", "subject_id", "case", "case_id")
_SPLIT_COLS = ("split", "set", "subset", "fold_split")
_SOURCE_COLS = ("source", "dataset", "origin")
_UCSD_LIST = re.compile(r"^(train|val|valid|test)CT_(COVID|NonCOVID)\.txt$", re.IGNORECASE)
# COVIDx CT: train_COVIDx_CT-3A.txt ...; COVIDx CXR: train.txt / val.txt / test.txt
_COVIDX_FILE = re.compile(r"^(train|val|valid|validation|test)(_.*)?\.txt$", re.IGNORECASE)


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
        layout: the layout that was read (one of :data:`LAYOUTS`).
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
        lines = [f"layout: {self.layout}", format_alias_table(self.alias_table), ""]
        if len(self.manifest):
            lines.append(summarize(self.manifest).to_string())
        else:
            lines.append("(no usable images)")
        for n in self.notes:
            lines.append(f"note: {n}")
        for w in self.warnings:
            lines.append(f"WARNING: {w}")
        if self.quarantine:
            lines.append(f"quarantined {len(self.quarantine)} file(s):")
            for q in self.quarantine[:20]:
                lines.append(f"  {q['path']}: {q['reason']}")
            if len(self.quarantine) > 20:
                lines.append(f"  ... and {len(self.quarantine) - 20} more")
        return "\n".join(lines)


@dataclass
class _Item:
    """One file (or one slice of a volume) on its way to the manifest."""

    path: Path
    cls: str  # class name as found in the data
    rel: str  # path relative to the data root (posix), used for patient patterns and keys
    split: str | None = None
    patient: str | None = None
    source: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    kind: str = "image"  # image | dicom | nifti
    label: str | None = None
    group: str | None = None


# ----------------------------------------------------------------------------------------------
# Aliases
# ----------------------------------------------------------------------------------------------


def normalize_class_name(name: str) -> str:
    """Lower-case ``name`` and drop spaces, ``_`` and ``-`` (the alias matching key)."""
    return re.sub(r"[\s_\-]+", "", str(name).strip().lower())


def _alias_lookup(aliases: Mapping[str, str | None] | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    table = {normalize_class_name(k): v for k, v in ALIASES.items()}
    if extra:
        table.update({normalize_class_name(k): v for k, v in extra.items()})
    for k, v in (aliases or {}).items():
        v = _IGNORE if v is None else str(v).strip()
        if v != _IGNORE and v not in config.CANONICAL_LABELS:
            raise ValueError(
                f"aliases[{k!r}] = {v!r} is not a canonical label; use one of "
                f"{list(config.CANONICAL_LABELS)} or 'ignore'"
            )
        table[normalize_class_name(k)] = v
    return table


def resolve_label(name: str, aliases: Mapping[str, str | None] | None = None) -> str | None:
    """Canonical label for a class name, ``"ignore"`` if the user asked to skip it, else None."""
    return _alias_lookup(aliases).get(normalize_class_name(name))


def _accepted_aliases_text() -> str:
    by_label: dict[str, list[str]] = defaultdict(list)
    for k, v in ALIASES.items():
        by_label[v].append(k)
    return "\n".join(f"  {lab:<9} <- {', '.join(by_label[lab])}" for lab in config.CANONICAL_LABELS)


def format_alias_table(found: Mapping[str, str | None], counts: Mapping[str, int] | None = None) -> str:
    """The table of class names found in the data and the labels they map to.

    Args:
        found: class name as found (folder name, label-file class, CSV value) -> label
            (``None`` when unmapped).
        counts: optional number of files per class name.

    Returns:
        A printable multi-line table ``name -> label (display name)``.
    """
    if not found:
        return "(no classes found)"
    width = max(len("class (as found)"), *(len(str(k)) for k in found))
    lines = [f"{'class (as found)':<{width}}    label"]
    for name in sorted(found, key=lambda s: str(s).lower()):
        lab = found[name]
        if lab is None:
            shown = "??? (no alias)"
        elif lab == _IGNORE:
            shown = "(ignored)"
        else:
            shown = f"{lab} ({config.display_name(lab)})"
        n = f"   [{counts[name]} files]" if counts and name in counts else ""
        lines.append(f"{str(name):<{width}} -> {shown}{n}")
    return "\n".join(lines)


def _map_labels(items: list[_Item], aliases, extra=None, where: str = "") -> tuple[list[_Item], dict[str, str], list[str]]:
    table = _alias_lookup(aliases, extra)
    found: dict[str, str | None] = {}
    counts: Counter = Counter()
    for it in items:
        counts[it.cls] += 1
        found[it.cls] = table.get(normalize_class_name(it.cls))
    unmapped = sorted(k for k, v in found.items() if v is None)
    if unmapped:
        example = unmapped[0]
        raise ValueError(
            f"cannot map class name(s) {unmapped}{where} to a label; refusing to guess.\n"
            f"Classes found:\n{format_alias_table(found, counts)}\n"
            f"Accepted aliases (case, spaces, '_' and '-' are ignored):\n{_accepted_aliases_text()}\n"
            f"Pass e.g. aliases={{{example!r}: 'cap'}} to ingest() to map it, or "
            f"aliases={{{example!r}: 'ignore'}} to leave that class out."
        )
    notes = []
    kept = []
    for it in items:
        lab = found[it.cls]
        if lab == _IGNORE:
            continue
        it.label = lab
        kept.append(it)
    for name, lab in found.items():
        if lab == _IGNORE:
            notes.append(f"class {name!r} ({counts[name]} files) ignored as asked (aliases)")
    return kept, {k: v for k, v in found.items()}, notes


# ----------------------------------------------------------------------------------------------
# Layout detection and collection
# ----------------------------------------------------------------------------------------------


def _visible_dirs(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name == "__MACOSX":
            continue
        if p.is_dir():
            out.append(p)
    return out


def _scan_files(root: Path, max_depth: int, pattern: re.Pattern) -> list[Path]:
    """Files matching ``pattern`` (by name) within ``max_depth`` levels below ``root``."""
    found = []
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_file() and pattern.match(e.name):
                found.append(Path(e.path))
            elif e.is_dir(follow_symlinks=False) and depth < max_depth:
                stack.append((Path(e.path), depth + 1))
    return sorted(found)


def _is_covidx_file(p: Path) -> bool:
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                return _parse_covidx_line(parts) is not None
    except OSError:
        return False
    return False


def _csv_columns(p: Path) -> list[str]:
    try:
        with open(p, encoding="utf-8-sig", errors="replace", newline="") as f:
            header = next(csv.reader(f), [])
    except OSError:
        return []
    return [h.strip().lower() for h in header]


def _pick_col(cols: Sequence[str], names: Sequence[str]) -> str | None:
    low = {c.strip().lower(): c for c in cols}
    for n in names:
        if n in low:
            return low[n]
    return None


def _is_label_csv(p: Path) -> bool:
    cols = _csv_columns(p)
    return _pick_col(cols, _PATH_COLS) is not None and _pick_col(cols, _LABEL_COLS) is not None


def _detect_layout(root: Path) -> tuple[str, Any]:
    """(layout, detail) for a file or folder."""
    if root.is_file():
        name = root.name.lower()
        if name.endswith(".csv"):
            return "csv", root
        if name.endswith(".txt"):
            if _UCSD_LIST.match(root.name):
                return "ucsd", [root]
            if _is_covidx_file(root):
                return "covidx", [root]
        raise ValueError(
            f"{root}: a file source must be a CSV (path + label columns) or a COVIDx / UCSD label "
            "file; for a folder of images pass the folder"
        )
    covidx = [p for p in _scan_files(root, 1, _COVIDX_FILE) if _is_covidx_file(p)]
    if covidx:
        return "covidx", covidx
    ucsd = _scan_files(root, 3, _UCSD_LIST)
    if ucsd:
        return "ucsd", ucsd
    csvs = [p for p in sorted(root.glob("*.csv")) if _is_label_csv(p)]
    if csvs:
        for preferred in ("labels.csv", "manifest.csv"):
            for p in csvs:
                if p.name.lower() == preferred:
                    return "csv", p
        if len(csvs) == 1:
            return "csv", csvs[0]
        raise ValueError(
            f"{root} holds several label CSVs {[p.name for p in csvs]}; pass the one to use as source"
        )
    dirs = _visible_dirs(root)
    if any(d.name.lower() in SPLIT_ALIASES for d in dirs):
        return "split_folders", None
    if dirs:
        return "class_folders", None
    raise ValueError(
        f"{root}: no class folders, split folders, label files or CSV found. Accepted layouts: "
        "<root>/<class>/*, <root>/<split>/<class>/*, COVIDx label files, UCSD split lists, or a "
        "CSV with path + label columns (see docs/data.md)"
    )


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK_FILES


_UNREADABLE_FOLDER = "folder could not be read"


def _unreadable_folder(quarantine: list[dict], err: OSError, fallback: Path) -> None:
    """Quarantine a folder that cannot be listed: walkers skip such folders silently otherwise,
    and its images would be missing without a word."""
    reason = f"{_UNREADABLE_FOLDER} ({err.strerror or err}): its images are not in the manifest"
    quarantine.append({"path": str(err.filename or fallback), "reason": reason})


def _walk_class_folder(
    class_dir: Path, root: Path, cls: str, split: str | None, quarantine: list[dict], notes: Counter
) -> list[_Item]:
    """Every image / DICOM / NIfTI file under one class folder (recursive)."""
    items: list[_Item] = []
    for dirpath, dirnames, filenames in os.walk(
            class_dir, onerror=lambda e: _unreadable_folder(quarantine, e, class_dir)):
        d = Path(dirpath)
        keep = []
        for dn in sorted(dirnames):
            p = d / dn
            if _is_junk(dn) or dn == "__MACOSX":
                continue
            if normalize_class_name(dn) in _MASK_DIRS:
                notes[f"skipped mask folder(s) named {dn!r} (segmentation masks are not images to classify)"] += 1
                continue
            if p.is_symlink():
                notes["symlinked folders are not followed"] += 1
                continue
            if p.suffix.lower() in config.IMAGE_EXTENSIONS + (".dcm", ".nii", ".gz"):
                quarantine.append({"path": str(p), "reason": "a folder named like an image file"})
            keep.append(dn)
        dirnames[:] = keep
        for fn in sorted(filenames):
            p = d / fn
            if _is_junk(fn):
                notes["skipped hidden / system files (.DS_Store, Thumbs.db, ...)"] += 1
                continue
            rel = p.relative_to(root).as_posix()
            suf = p.suffix.lower()
            if cio.is_nifti_path(p):
                items.append(_Item(p, cls, rel, split=split, kind="nifti"))
            elif suf == ".dcm" or (suf == "" and cio.is_dicom_file(p)):
                items.append(_Item(p, cls, rel, split=split, kind="dicom"))
            elif suf in config.IMAGE_EXTENSIONS:
                items.append(_Item(p, cls, rel, split=split))
            else:
                quarantine.append(
                    {"path": str(p), "reason": f"unsupported file type {suf or '(no extension)'!r}: not an image"}
                )
    return items


def _collect_class_folders(root: Path, quarantine: list[dict], notes: Counter, split: str | None = None,
                           base: Path | None = None) -> list[_Item]:
    base = base or root
    items = []
    try:
        loose = [p for p in sorted(root.iterdir()) if p.is_file() and not _is_junk(p.name)
                 and (p.suffix.lower() in config.IMAGE_EXTENSIONS or p.suffix.lower() == ".dcm"
                      or cio.is_nifti_path(p))]
        dirs = _visible_dirs(root)
    except OSError as e:  # e.g. a split folder without read permission
        _unreadable_folder(quarantine, e, root)
        return []
    for p in loose:
        quarantine.append({"path": str(p), "reason": "image outside any class folder: its class is unknown"})
    for d in dirs:
        if d.is_symlink():
            notes["symlinked folders are not followed"] += 1
            continue
        if normalize_class_name(d.name) in _MASK_DIRS:
            notes[f"skipped mask folder(s) named {d.name!r} (segmentation masks are not images to classify)"] += 1
            continue
        got = _walk_class_folder(d, base, d.name, split, quarantine, notes)
        if not got:
            notes[f"class folder {d.relative_to(base).as_posix()!r} holds no images"] += 1
        items.extend(got)
    return items


def _collect_split_folders(root: Path, quarantine: list[dict], notes: Counter, warn: list[str]) -> list[_Item]:
    items = []
    for p in sorted(root.iterdir()):
        if p.is_file() and not _is_junk(p.name) and p.suffix.lower() in config.IMAGE_EXTENSIONS:
            quarantine.append({"path": str(p), "reason": "image outside any split/class folder: its class is unknown"})
    for d in _visible_dirs(root):
        split = SPLIT_ALIASES.get(d.name.lower())
        if split is None:
            n = sum(1 for _ in d.rglob("*") if _.is_file())
            warn.append(
                f"folder {d.name!r} ({n} files) is not a split name ({sorted(SPLIT_ALIASES)}) in a "
                "split-folder layout: its files are NOT used"
            )
            continue
        items.extend(_collect_class_folders(d, quarantine, notes, split=split, base=root))
    return items


def _index_files(root: Path, exts: Iterable[str],
                 quarantine: list[dict] | None = None) -> dict[str, list[Path]]:
    """file name -> paths, over the whole tree (one walk); unlistable folders are quarantined."""
    exts = tuple(exts)
    index: dict[str, list[Path]] = defaultdict(list)
    onerror = None if quarantine is None else (lambda e: _unreadable_folder(quarantine, e, root))
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if fn.lower().endswith(exts):
                index[fn].append(Path(dirpath) / fn)
    return index


def _pick_indexed(name: str, label_hint: str | None, index, aliases) -> tuple[Path | None, str]:
    cands = index.get(name) or index.get(Path(name).name) or []
    if not cands:
        return None, "listed in a label file but not found under the data folder"
    if len(cands) == 1:
        return cands[0], ""
    if label_hint is not None:
        # Same file name in several class folders: prefer the folder whose name maps to the label.
        table = _alias_lookup(aliases)
        same = [c for c in cands if any(table.get(normalize_class_name(a.name)) == label_hint for a in c.parents)]
        if len(same) == 1:
            return same[0], ""
    return None, f"ambiguous: {len(cands)} files named {name!r} under the data folder"


def _parse_covidx_line(parts: list[str]) -> dict | None:
    """COVIDx CT: file class xmin ymin xmax ymax. COVIDx CXR: patient file class source."""
    def num(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    if len(parts) >= 6 and all(num(x) is not None for x in parts[-4:]):
        return {"file": " ".join(parts[:-5]), "cls": parts[-5], "bbox": tuple(num(x) for x in parts[-4:]),
                "patient": None, "source": None}
    if len(parts) >= 4 and num(parts[-2]) is None:
        return {"file": " ".join(parts[1:-2]), "cls": parts[-2], "bbox": None, "patient": parts[0],
                "source": parts[-1]}
    if len(parts) == 2:
        return {"file": parts[0], "cls": parts[1], "bbox": None, "patient": None, "source": None}
    return None


def _collect_covidx(root: Path, files: list[Path], quarantine, warn: list[str], aliases) -> list[_Item]:
    base = root if root.is_dir() else root.parent
    index = _index_files(base, config.IMAGE_EXTENSIONS, quarantine)
    items = []
    numeric_map = {**COVIDX_CT_CLASSES}
    for lf in files:
        m = _COVIDX_FILE.match(lf.name)
        split = SPLIT_ALIASES.get(m.group(1).lower()) if m else None
        bad: list[int] = []
        with open(lf, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                rec = _parse_covidx_line(parts)
                if rec is None:
                    bad.append(lineno)
                    continue
                hint = _alias_lookup(aliases, numeric_map).get(normalize_class_name(rec["cls"]))
                path, why = _pick_indexed(rec["file"], hint, index, aliases)
                if path is None:
                    quarantine.append({"path": str(base / rec["file"]), "reason": f"{why} ({lf.name} line {lineno})"})
                    continue
                items.append(_Item(path, rec["cls"], path.relative_to(base).as_posix(), split=split,
                                   patient=rec["patient"], source=rec["source"], bbox=rec["bbox"]))
        if bad:
            warn.append(f"{lf.name}: {len(bad)} line(s) not in COVIDx format were skipped (first: line {bad[0]})")
    return items


def _collect_ucsd(root: Path, files: list[Path], quarantine, aliases) -> list[_Item]:
    base = root if root.is_dir() else root.parent
    # The lists usually live in Data-split/, the images in Images-processed/: search the data root.
    search = base
    if root.is_file():
        search = base.parent.parent if base.parent.parent.exists() else base
    index = _index_files(search, config.IMAGE_EXTENSIONS, quarantine)
    items = []
    for lf in files:
        m = _UCSD_LIST.match(lf.name)
        split = SPLIT_ALIASES[m.group(1).lower()]
        cls = m.group(2)
        hint = _alias_lookup(aliases).get(normalize_class_name(cls))
        with open(lf, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                name = line.strip()
                if not name:
                    continue
                path, why = _pick_indexed(name, hint, index, aliases)
                if path is None:
                    quarantine.append({"path": str(search / name), "reason": f"{why} ({lf.name} line {lineno})"})
                    continue
                items.append(_Item(path, cls, path.relative_to(search).as_posix(), split=split))
    return items


def _collect_csv(csv_path: Path, quarantine, warn: list[str], modality: str) -> list[_Item]:
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as e:
        raise ValueError(f"{csv_path}: not a readable CSV ({type(e).__name__}: {e})") from None
    cols = list(df.columns)
    pc, lc = _pick_col(cols, _PATH_COLS), _pick_col(cols, _LABEL_COLS)
    if pc is None or lc is None:
        raise ValueError(
            f"{csv_path}: needs a path column (one of {list(_PATH_COLS)}) and a label column "
            f"(one of {list(_LABEL_COLS)}); found columns {cols}"
        )
    ic, sc, oc = _pick_col(cols, _PATIENT_COLS), _pick_col(cols, _SPLIT_COLS), _pick_col(cols, _SOURCE_COLS)
    bcols = [_pick_col(cols, (b,)) for b in config.BBOX_COLUMNS]
    mc = _pick_col(cols, ("modality",))
    if mc is not None:
        other = sorted({v.strip().lower() for v in df[mc] if v.strip()} - {modality})
        if other:
            warn.append(f"{csv_path.name}: modality column holds {other} but ingest(modality={modality!r}); "
                        f"all rows are recorded as {modality!r}")
    base = csv_path.parent
    items = []
    bad_splits: Counter = Counter()
    for i, row in enumerate(df.to_dict("records")):
        raw = str(row[pc]).strip()
        rowno = i + 2  # header is line 1
        if not raw:
            quarantine.append({"path": f"{csv_path}:{rowno}", "reason": "empty path in CSV row"})
            continue
        p = Path(raw).expanduser()
        if not p.is_absolute():
            p = base / p
        cls = str(row[lc]).strip()
        if not cls:
            quarantine.append({"path": str(p), "reason": f"empty label in CSV row {rowno}"})
            continue
        split = None
        if sc is not None and str(row[sc]).strip():
            split = SPLIT_ALIASES.get(str(row[sc]).strip().lower())
            if split is None:
                bad_splits[str(row[sc]).strip()] += 1
                continue
        bbox = None
        if all(bcols):
            try:
                vals = tuple(float(row[b]) for b in bcols)
                if all(np.isfinite(vals)):
                    bbox = vals
            except ValueError:
                bbox = None
        try:
            rel = p.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            rel = p.as_posix()
        kind = "nifti" if cio.is_nifti_path(p) else ("dicom" if p.suffix.lower() == ".dcm" else "image")
        items.append(_Item(p, cls, rel, split=split,
                           patient=(str(row[ic]).strip() or None) if ic else None,
                           source=(str(row[oc]).strip() or None) if oc else None,
                           bbox=bbox, kind=kind))
    if bad_splits:
        raise ValueError(
            f"{csv_path}: unknown split value(s) {dict(bad_splits)}; use train / val / test "
            f"(accepted spellings: {sorted(SPLIT_ALIASES)}) or leave the cell empty to assign one"
        )
    return items


# ----------------------------------------------------------------------------------------------
# DICOM / NIfTI conversion
# ----------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return s or "data"


def _atomic_write_png(path: Path, img: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    atomic_write_bytes(path, buf.tobytes())


def _fresh(out: Path, src: Path) -> bool:
    try:
        return out.exists() and out.stat().st_mtime >= src.stat().st_mtime and out.stat().st_size > 0
    except OSError:
        return False


def _convert_medical(items: list[_Item], conv_root: Path, quarantine: list[dict], notes: list[str]) -> list[_Item]:
    """Replace DICOM / NIfTI items by PNG slice items written under ``conv_root``."""
    out: list[_Item] = []
    dicoms = [it for it in items if it.kind == "dicom"]
    niftis = [it for it in items if it.kind == "nifti"]
    out.extend(it for it in items if it.kind == "image")
    if not dicoms and not niftis:
        return out

    n_series = n_dcm_slices = 0
    # --- DICOM: group by folder, then by SeriesInstanceUID --------------------------------------
    by_dir: dict[Path, list[_Item]] = defaultdict(list)
    for it in dicoms:
        by_dir[it.path.parent].append(it)
    series: list[tuple[str, list[tuple[_Item, Any]]]] = []
    for d, its in sorted(by_dir.items()):
        groups: dict[str, list] = defaultdict(list)
        for it in its:
            try:
                ds = cio._dcmread(it.path, stop_before_pixels=True)
            except cio.ImageReadError as e:
                quarantine.append({"path": str(it.path), "reason": e.reason})
                continue
            groups[str(ds.get("SeriesInstanceUID", ""))].append((it, ds))
        rel_dir = Path(its[0].rel).parent.as_posix()
        for k, (uid, members) in enumerate(sorted(groups.items())):
            key = rel_dir if len(groups) == 1 else f"{rel_dir}/series{k + 1}"
            series.append((key, members))
    # Use the DICOM PatientID only when it tells series apart; anonymised sets often give every
    # series the same id ("ANON"), which would glue the whole data set into one "patient".
    pids = [{str(ds.get("PatientID", "")).strip() for _, ds in m} for _, m in series]
    use_pid = (len(series) > 1 and all(len(p) == 1 and "" not in p for p in pids)
               and len({next(iter(p)) for p in pids}) > 1)
    if use_pid:
        notes.append("DICOM: patient_id taken from the PatientID tag (it differs between series)")
    for key, members in series:
        members.sort(key=lambda t: cio.dicom_sort_key(t[1], t[0].path.name))
        n_series += 1
        pid = f"dcm:{str(members[0][1].get('PatientID')).strip()}" if use_pid else f"dcm:{key}"
        for idx, (it, _) in enumerate(members):
            dst = conv_root / key / f"{idx:04d}_{_slug(it.path.stem)}.png"
            try:
                if not _fresh(dst, it.path):
                    frames = cio.read_volume(it.path)  # handles single- and multi-frame DICOM
                    if len(frames) == 1:
                        _atomic_write_png(dst, frames[0])
                    else:
                        for f_i, fr in enumerate(frames):
                            _atomic_write_png(dst.with_name(f"{dst.stem}_f{f_i:04d}.png"), fr)
                        dst = None
                frame_paths = [dst] if dst is not None else sorted(
                    (conv_root / key).glob(f"{idx:04d}_{_slug(it.path.stem)}_f*.png"))
            except cio.ImageReadError as e:
                quarantine.append({"path": str(it.path), "reason": e.reason})
                continue
            except OSError as e:
                quarantine.append({"path": str(it.path), "reason": f"could not write converted slice: {e}"})
                continue
            for j, fp in enumerate(frame_paths):
                n_dcm_slices += 1
                out.append(_Item(fp, it.cls, f"{it.rel}#{j}" if len(frame_paths) > 1 else it.rel,
                                 split=it.split, patient=it.patient or pid, source=it.source, bbox=None,
                                 label=it.label))
    # --- NIfTI: one volume -> its axial slices -------------------------------------------------
    n_vol = n_nii_slices = 0
    for it in niftis:
        stem = re.sub(r"\.nii(\.gz)?$", "", it.path.name, flags=re.IGNORECASE)
        key = (Path(it.rel).parent / stem).as_posix() if "/" in it.rel else stem
        vdir = conv_root / (key + "_nii")
        try:
            existing = sorted(vdir.glob("z*.png")) if vdir.exists() else []
            if existing and all(_fresh(p, it.path) for p in existing[:1]):
                paths = existing
            else:
                with _warnings.catch_warnings(record=True) as caught:
                    _warnings.simplefilter("always")
                    slices = cio.read_volume(it.path)
                for w in caught:
                    notes.append(str(w.message))
                paths = []
                for z, s in enumerate(slices):
                    p = vdir / f"z{z:04d}.png"
                    _atomic_write_png(p, s)
                    paths.append(p)
        except cio.ImageReadError as e:
            quarantine.append({"path": str(it.path), "reason": e.reason})
            continue
        except OSError as e:
            quarantine.append({"path": str(it.path), "reason": f"could not write converted slices: {e}"})
            continue
        n_vol += 1
        for z, p in enumerate(paths):
            n_nii_slices += 1
            out.append(_Item(p, it.cls, f"{it.rel}#z{z:04d}", split=it.split,
                             patient=it.patient or f"nii:{key}", source=it.source, label=it.label))
    if n_series:
        notes.append(f"converted {n_series} DICOM series ({n_dcm_slices} slices, lung window) to PNG under {conv_root}")
    if n_vol:
        notes.append(
            f"converted {n_vol} NIfTI volume(s) ({n_nii_slices} axial slices, lung window) to PNG under "
            f"{conv_root}; every slice carries its volume's label, including slices without lung"
        )
    return out


# ----------------------------------------------------------------------------------------------
# Verification (decode every image)
# ----------------------------------------------------------------------------------------------


def _verify(items: list[_Item], quarantine: list[dict]) -> tuple[list[_Item], list[tuple | None]]:
    """Decode every image in a thread pool (cv2 releases the GIL); keep the good ones.

    Returns the kept items and, per kept item, ``(perceptual_hash, structure_signature)`` (None
    without covidlib.audit): the signature lets near-duplicate grouping confirm hash matches,
    since distinct CT slices are often 0-2 hash bits apart (see covidlib.audit).
    """
    try:
        from covidlib.audit import perceptual_hash, structure_signature
    except ImportError:  # audit not installed / not written yet: no near-duplicate grouping
        perceptual_hash = structure_signature = None

    def check(it: _Item):
        try:
            img = cio.read_image(it.path)
        except cio.ImageReadError as e:
            return e.reason, None
        except MemoryError:
            return "image too large to decode in memory", None
        problem = cio.image_problem(img)
        if problem:
            return problem, None
        h = (perceptual_hash(img), structure_signature(img)) if perceptual_hash is not None else None
        return None, h

    workers = max(1, min(8, (os.cpu_count() or 2) * 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
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
# Patient ids and splits
# ----------------------------------------------------------------------------------------------


def _compile_pattern(patient_pattern: str | re.Pattern) -> re.Pattern:
    if isinstance(patient_pattern, re.Pattern):
        return patient_pattern
    rx = PATIENT_PATTERNS.get(str(patient_pattern), str(patient_pattern))
    try:
        return re.compile(rx)
    except re.error as e:
        raise ValueError(
            f"patient_pattern {patient_pattern!r} is not a valid regular expression ({e}); named "
            f"patterns: {sorted(PATIENT_PATTERNS)}"
        ) from None


def _apply_pattern(items: list[_Item], rx: re.Pattern, warn: list[str], notes: list[str]) -> None:
    on_path = "/" in rx.pattern
    misses = []
    for it in items:
        target = it.rel.split("#")[0] if on_path else Path(it.rel.split("#")[0]).name
        m = rx.search(target)
        if m is None:
            misses.append(target)
            continue
        it.patient = m.group(1) if rx.groups else m.group(0)
    if items and len(misses) == len(items):
        raise ValueError(
            f"patient_pattern {rx.pattern!r} matched none of the {len(items)} files "
            f"(e.g. {misses[:3]}); it is matched against the file name, or against the path relative "
            "to the data root when it contains '/'"
        )
    if misses:
        warn.append(
            f"patient_pattern {rx.pattern!r} did not match {len(misses)} of {len(items)} files "
            f"(e.g. {misses[:3]}); those keep per-image ids"
        )
    notes.append(f"patient_id from pattern {rx.pattern!r}")


# Structure correlation that confirms a hash match when grouping images without patient ids.
_GROUP_MIN_CORRELATION = 0.9


def _dup_clusters(hashes: list) -> tuple[list[int], int, bool]:
    """Near-duplicate clusters for split grouping: (cluster ids, threshold used, still too big).

    The audit's default threshold is tuned to *report* near-duplicates; for grouping, transitive
    chains are a problem: CT slices share so much structure that at 6 bits most of a data set
    chains into one cluster, and a split cannot be stratified any more. So the threshold is lowered
    from the default until the largest cluster holds at most max(10, 2 %) of the images. Copies
    (re-encoded, resized) sit within 0-3 bits, so they still group. ``hashes`` are
    ``(hash, structure_signature)`` tuples (from :func:`_verify`), so a hash match is confirmed by
    the audit's structure correlation: without it, distinct CT slices (0-2 bits apart) were grouped
    as "copies" (even across classes) and reported as straddling given splits. The bar is
    :data:`_GROUP_MIN_CORRELATION` (0.9), below the audit's 0.95 on purpose: for grouping a missed
    copy (leakage) costs more than a spurious group; small smooth images resized scored 0.93, the most
    similar distinct slices of all of ct-mosmed 0.91 (one pair), the next ones < 0.9.
    """
    from covidlib.audit import DEFAULT_NEAR_DUP_THRESHOLD, near_duplicate_groups

    cap = max(10, int(0.02 * len(hashes)))
    clusters: list[int] = []
    for thr in range(int(DEFAULT_NEAR_DUP_THRESHOLD), -1, -1):
        clusters = near_duplicate_groups(hashes, threshold=thr, min_correlation=_GROUP_MIN_CORRELATION)
        if not clusters or max(Counter(clusters).values()) <= cap:
            return clusters, thr, False
    return clusters, 0, True


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(v, (int, float)) and 0.0 <= float(v) < 1.0):
            raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1 (train needs data), got "
                         f"{val_fraction} + {test_fraction}")


def assign_splits(
    df: pd.DataFrame,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    group_col: str = "patient_id",
    label_col: str = "label",
) -> pd.DataFrame:
    """Assign train / val / test, stratified by class and grouped by patient, reproducibly.

    A deterministic greedy: groups (patients) are shuffled with ``seed`` and taken largest first.
    First, for every class that has at least 3 groups, one group holding it is put into each of
    test and val (when their fraction > 0), so every class is present in every split when
    possible. Then each remaining group goes to the split whose per-class quota is least filled
    (the deficit ``(target - current) / target`` summed over the group's images). All images of a
    group always share one split.

    Args:
        df: rows with ``label_col`` and ``group_col``.
        seed: random seed; same seed + same data -> same splits.
        val_fraction, test_fraction: target shares of images (each in [0, 1), sum < 1).
        group_col: column holding the group (patient) id.
        label_col: column holding the class.

    Returns:
        A copy of ``df`` with a ``split`` column.

    Raises:
        ValueError: bad fractions or missing columns.
    """
    _check_fractions(val_fraction, test_fraction)
    for c in (group_col, label_col):
        if c not in df.columns:
            raise ValueError(f"assign_splits: column {c!r} missing (have {list(df.columns)})")
    out = df.copy()
    if len(out) == 0:
        out["split"] = pd.Series(dtype=str)
        return out
    groups = out[group_col].astype(str).to_numpy()
    labels = out[label_col].astype(str).to_numpy()
    classes = sorted(set(labels))
    cidx = {c: i for i, c in enumerate(classes)}
    uniq = sorted(set(groups))
    gpos = {g: i for i, g in enumerate(uniq)}
    counts = np.zeros((len(uniq), len(classes)), dtype=np.int64)
    for g, lab in zip(groups, labels):
        counts[gpos[g], cidx[lab]] += 1
    totals = counts.sum(axis=0).astype(float)
    fracs = {"train": 1.0 - val_fraction - test_fraction, "val": float(val_fraction), "test": float(test_fraction)}
    active = [s for s in ("train", "val", "test") if fracs[s] > 0]
    target = {s: fracs[s] * totals for s in active}
    current = {s: np.zeros(len(classes)) for s in active}

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    sizes = counts.sum(axis=1)
    order = order[np.argsort(-sizes[order], kind="stable")]  # largest first, seeded tie-break
    assigned: dict[int, str] = {}

    def put(gi: int, s: str) -> None:
        assigned[gi] = s
        current[s] += counts[gi]

    # Seed val/test with one group per class (rarest class first) while train keeps >= 1 group.
    for s in ("test", "val"):
        if s not in active:
            continue
        for c in sorted(range(len(classes)), key=lambda c: (counts[:, c] > 0).sum()):
            if current[s][c] > 0:
                continue
            holders = [gi for gi in order if counts[gi, c] > 0]
            if len(holders) < 3:
                continue
            free = [gi for gi in holders if gi not in assigned]
            if not free:
                continue
            put(min(free, key=lambda gi: sizes[gi]), s)  # smallest: least overshoot; ties by seed

    for gi in order:
        if gi in assigned:
            continue
        best, best_score = None, -np.inf
        for s in active:
            t = target[s]
            with np.errstate(divide="ignore", invalid="ignore"):
                deficit = np.where(t > 0, (t - current[s]) / np.where(t > 0, t, 1), -1.0)
            score = float((counts[gi] * deficit).sum()) / max(1, sizes[gi])
            if score > best_score + 1e-12:
                best, best_score = s, score
        put(gi, best)
    out["split"] = [assigned[gpos[g]] for g in groups]
    return out


def _carve(df: pd.DataFrame, from_split: str, new_split: str, fraction: float, seed: int, group_col: str) -> pd.DataFrame:
    """Move ``fraction`` of ``from_split`` (by group, stratified) into ``new_split``."""
    sub = df[df["split"] == from_split]
    if len(sub) == 0 or fraction <= 0:
        return df
    parted = assign_splits(sub, seed=seed, val_fraction=fraction, test_fraction=0.0, group_col=group_col)
    df = df.copy()
    moved = parted.index[parted["split"] == "val"]
    df.loc[moved, "split"] = new_split
    return df


# ----------------------------------------------------------------------------------------------
# Manifest I/O
# ----------------------------------------------------------------------------------------------


def _order_manifest(df: pd.DataFrame) -> pd.DataFrame:
    split_rank = {s: i for i, s in enumerate(config.SPLITS)}
    label_rank = {s: i for i, s in enumerate(config.CANONICAL_LABELS)}
    key = pd.DataFrame({
        "s": df["split"].map(split_rank).fillna(99),
        "l": df["label"].map(label_rank).fillna(99),
        "p": df["path"].astype(str),
    })
    return df.loc[key.sort_values(["s", "l", "p"], kind="stable").index].reset_index(drop=True)


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
    m = df["path"].str.strip() == ""
    if m.any():
        raise ValueError(f"{path}: empty path at {bad_rows(m)}")
    m = df["patient_id"].str.strip() == ""
    if m.any():
        raise ValueError(f"{path}: empty patient_id at {bad_rows(m)}")
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
# ingest
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
    try:
        from covidlib import download
    except ImportError:
        raise ValueError(
            f"source {s!r} is not a folder or file, not 'synthetic', and the dataset registry "
            "(covidlib.download) is not available"
        ) from None
    root = Path(download.resolve(s))
    notes.append(f"registry data set {s!r} at {root}")
    reg_aliases: dict[str, str] = {}
    get_info = getattr(download, "get_info", None)
    if get_info is not None:
        try:
            info = get_info(s)
        except Exception:  # e.g. a "kaggle:" handle outside the registry
            info = None
        if info is not None:
            # The registry knows this set's class names; None there means "not used by default".
            reg_aliases = {k: (v if v else _IGNORE) for k, v in (getattr(info, "label_map", None) or {}).items()}
            reg_mod = getattr(info, "modality", None)
            if reg_mod in config.MODALITIES and reg_mod != modality:
                warn.append(f"the registry lists {s!r} as {reg_mod!r} but ingest was called with "
                            f"modality={modality!r}")
    return root, s, notes, reg_aliases, warn


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
        patient_pattern: regex (group 1, else whole match) or a :data:`PATIENT_PATTERNS` name,
            matched against each file name (against the root-relative path if it contains ``/``).
        val_fraction, test_fraction: shares for assigned splits (and for carving a missing
            val / test split out of a given train split).
        work_dir: where DICOM / NIfTI slices are converted to (``work_dir/converted/...``);
            default ``config.data_dir()``. Never inside the source folder.
        aliases: extra / overriding ``{class name: canonical label or "ignore"}``.
        synthetic_patients: patients per class when ``source == "synthetic"`` (default 12).
        layout: force one of :data:`LAYOUTS` instead of detecting it.

    Returns:
        :class:`IngestResult`.

    Raises:
        FileNotFoundError: source path not found.
        ValueError: unknown layout / modality, unmapped class names (the message lists the
            classes found and the accepted aliases), no usable images, bad fractions or pattern.
    """
    if modality not in config.MODALITIES:
        raise ValueError(f"modality must be one of {list(config.MODALITIES)}, got {modality!r}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    _check_fractions(val_fraction, test_fraction)
    rx = _compile_pattern(patient_pattern) if patient_pattern is not None else None

    root, source_name, notes, reg_aliases, warn = _resolve_source(source, modality, seed, synthetic_patients)
    if reg_aliases:
        aliases = {**reg_aliases, **dict(aliases or {})}  # the user's aliases win
    quarantine: list[dict] = []
    note_counts: Counter = Counter()

    detected, detail = _detect_layout(root)
    lay = layout or detected
    data_root = root if root.is_dir() else root.parent
    extra_alias: dict[str, str] | None = None
    if lay == "class_folders":
        if not root.is_dir():
            raise ValueError(f"layout 'class_folders' needs a folder, got file {root}")
        items = _collect_class_folders(root, quarantine, note_counts)
    elif lay == "split_folders":
        if not root.is_dir():
            raise ValueError(f"layout 'split_folders' needs a folder, got file {root}")
        items = _collect_split_folders(root, quarantine, note_counts, warn)
    elif lay == "covidx":
        files = detail if detected == "covidx" else (
            [root] if root.is_file() else [p for p in _scan_files(root, 1, _COVIDX_FILE) if _is_covidx_file(p)])
        if not files:
            raise ValueError(f"layout 'covidx': no COVIDx label files (train_*.txt / val_*.txt / test_*.txt) in {root}")
        extra_alias = COVIDX_CT_CLASSES
        items = _collect_covidx(root, files, quarantine, warn, aliases)
    elif lay == "ucsd":
        files = detail if detected == "ucsd" else ([root] if root.is_file() else _scan_files(root, 3, _UCSD_LIST))
        if not files:
            raise ValueError(f"layout 'ucsd': no split lists (trainCT_COVID.txt, ...) under {root}")
        items = _collect_ucsd(root, files, quarantine, aliases)
    else:  # csv
        csv_path = detail if detected == "csv" else root
        if not (csv_path.is_file() and csv_path.suffix.lower() == ".csv"):
            raise ValueError(f"layout 'csv' needs a .csv file (or a folder holding one), got {root}")
        items = _collect_csv(csv_path, quarantine, warn, modality)
        data_root = csv_path.parent
        # A missing file is a quarantine entry, not a crash.
        present = []
        for it in items:
            if it.path.is_file():
                present.append(it)
            else:
                why = "broken symbolic link" if os.path.lexists(it.path) else "file not found"
                quarantine.append({"path": str(it.path), "reason": f"{why} (listed in {csv_path.name})"})
        items = present
    for msg, n in note_counts.items():
        notes.append(msg if n == 1 else f"{msg} (x{n})")
    unread = [q for q in quarantine if q["reason"].startswith(_UNREADABLE_FOLDER)]
    if unread:
        warn.append(f"{len(unread)} folder(s) could not be read (e.g. {unread[0]['path']}: "
                    f"{unread[0]['reason']}); images in them are missing from the manifest")

    if not items:
        raise ValueError(
            f"no images found in {root} (layout {lay!r}); {len(quarantine)} file(s) quarantined"
            + (f", e.g. {quarantine[0]['path']}: {quarantine[0]['reason']}" if quarantine else "")
        )
    items, alias_table, alias_notes = _map_labels(items, aliases, extra_alias)
    notes.extend(alias_notes)

    # Converted slices go outside the source, always.
    wd = Path(work_dir).expanduser() if work_dir is not None else config.data_dir()
    digest = hashlib.sha1(str(data_root.resolve()).encode("utf-8")).hexdigest()[:8]
    conv_root = wd / "converted" / f"{_slug(data_root.name)}-{digest}"
    if any(it.kind != "image" for it in items):
        src = data_root.resolve()
        dst = conv_root.resolve()
        if dst == src or src in dst.parents:
            raise ValueError(
                f"work_dir {wd} would put converted slices inside the source folder {src}; the source "
                "is read-only -- pass work_dir= somewhere else"
            )
    items = _convert_medical(items, conv_root, quarantine, notes)
    items, hashes = _verify(items, quarantine)
    if not items:
        example = f", e.g. {quarantine[0]['path']}: {quarantine[0]['reason']}" if quarantine else ""
        raise ValueError(f"no readable images in {root}: {len(quarantine)} file(s) quarantined{example}")

    # ---- patient ids -------------------------------------------------------------------------
    if rx is not None:
        _apply_pattern(items, rx, warn, notes)
    no_id = [it for it in items if not it.patient]
    for it in no_id:
        # Unique per image: the root-relative path without extension (stems repeat across classes).
        stem = it.rel if "#" in it.rel or "." not in Path(it.rel).name else it.rel.rsplit(".", 1)[0]
        it.patient = f"img:{stem}"
    dup_info = ""
    if no_id:
        no_id_ids = {id(it) for it in no_id}
        idx = [i for i, it in enumerate(items) if id(it) in no_id_ids]
        if all(hashes[i] is not None for i in idx):
            clusters, thr, capped = _dup_clusters([hashes[i] for i in idx])
            sizes = Counter(clusters)
            multi = [c for c, n in sizes.items() if n > 1]
            for i, c in zip(idx, clusters):
                items[i].group = f"dup:{c}" if sizes[c] > 1 else items[i].patient
            biggest = max(sizes.values()) if sizes else 0
            dup_info = (f" Near-duplicate images (perceptual hash within {thr} bits, confirmed by structure "
                        f"correlation) were grouped so copies "
                        f"stay in one split: {len(multi)} cluster(s) of 2+ images, largest {biggest}.")
            if capped:
                warn.append(
                    f"near-duplicate grouping: even identical perceptual hashes form a cluster of {biggest} "
                    f"of {len(idx)} images, so splits may be lopsided; give patient ids (patient_pattern=)"
                )
        else:
            dup_info = " Near-duplicate grouping was NOT possible (covidlib.audit unavailable)."
        warn.insert(0,
            f"NO PATIENT IDS for {len(no_id)} of {len(items)} images: each image counts as its own "
            "patient ('img:<path>'). Images (CT slices) of one patient can end up in train AND test, so "
            f"test scores will be optimistic (patient-level leakage).{dup_info} Pass patient_pattern= or a "
            "CSV with a patient_id column if the data set has them."
        )

    # ---- manifest frame ------------------------------------------------------------------------
    rows = []
    for it in items:
        row = {"path": str(it.path.absolute()), "label": it.label, "patient_id": str(it.patient),
               "split": it.split, "source": it.source or source_name, "modality": modality,
               "_group": it.group or str(it.patient)}
        if it.bbox is not None:
            row.update(dict(zip(config.BBOX_COLUMNS, it.bbox)))
        rows.append(row)
    df = pd.DataFrame(rows)
    has_bbox = any(it.bbox is not None for it in items)
    if has_bbox:
        for c in config.BBOX_COLUMNS:
            if c not in df.columns:
                df[c] = np.nan

    # ---- splits --------------------------------------------------------------------------------
    given = df["split"].notna()
    if given.all():
        present = set(df["split"])
        notes.append(f"splits as given by the data set: {sorted(present, key=config.SPLITS.index)}")
        if "train" in present:
            if "val" not in present and "test" not in present:
                df = assign_splits(df.drop(columns="split"), seed, val_fraction, test_fraction, group_col="_group")
                notes.append("only a train split was given: val and test were carved out of it by patient")
            elif "val" not in present:
                df = _carve(df, "train", "val", val_fraction / (1.0 - test_fraction), seed, "_group")
                notes.append("no val split was given: val was carved out of train by patient")
            elif "test" not in present:
                df = _carve(df, "train", "test", test_fraction / (1.0 - val_fraction), seed, "_group")
                notes.append("no test split was given: test was carved out of train by patient")
        else:
            warn.append(f"the given splits {sorted(present)} include no 'train' split")
    elif given.any():
        warn.append(f"{int((~given).sum())} of {len(df)} rows have no split: they were assigned by patient")
        part = assign_splits(df[~given].drop(columns="split"), seed, val_fraction, test_fraction, group_col="_group")
        df.loc[~given, "split"] = part["split"]
    else:
        df = assign_splits(df.drop(columns="split"), seed, val_fraction, test_fraction, group_col="_group")

    # ---- leakage checks on the result ------------------------------------------------------------
    real = df[~df["patient_id"].str.startswith("img:")]
    straddle = real.groupby("patient_id")["split"].nunique()
    straddle = straddle[straddle > 1]
    if len(straddle):
        warn.append(
            f"{len(straddle)} patient(s) appear in more than one split of the data set's own split "
            f"(e.g. {list(straddle.index[:3])}): patient-level leakage in the given splits"
        )
    dup_straddle = df[df["_group"].str.startswith("dup:")].groupby("_group")["split"].nunique()
    dup_straddle = dup_straddle[dup_straddle > 1]
    if len(dup_straddle):
        warn.append(
            f"{len(dup_straddle)} near-duplicate cluster(s) straddle the data set's given splits: possible "
            "copies of one image in train and val/test (the given splits are kept; inspect with the audit)"
        )
    missing = [(s, c) for s in config.SPLITS for c in sorted(set(df["label"]))
               if not ((df["split"] == s) & (df["label"] == c)).any() and (df["split"] == s).any()]
    if missing:
        warn.append(f"class(es) absent from a split (too few patients?): {missing}")
    # A whole split can end up empty too (the check above only looks at splits that exist).
    empty = [s for s, f in (("val", val_fraction), ("test", test_fraction))
             if f > 0 and not (df["split"] == s).any()]
    if empty and (df["split"] == "train").any():
        per_class = df.groupby("label")["_group"].nunique().to_dict()
        warn.append(
            f"split(s) {empty} are EMPTY: too few patients to fill them (patients per class: {per_class}; "
            "a class needs at least 3 to be put into every split). Add patients, or evaluation on "
            f"{empty} will have no data"
        )
    labs = set(df["label"])
    if {"normal", "non_covid"} <= labs:
        warn.append("both 'normal' and 'non_covid' labels are present: non-COVID includes normal, so these "
                    "classes overlap; map them deliberately with aliases=")

    df = df.drop(columns="_group")
    cols = config.MANIFEST_COLUMNS + (config.BBOX_COLUMNS if has_bbox else [])
    df = _order_manifest(df[cols])
    used = {k: v for k, v in alias_table.items()}
    return IngestResult(manifest=df, quarantine=quarantine, warnings=warn, alias_table=used,
                        layout=lay, notes=notes)


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
    import json

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
