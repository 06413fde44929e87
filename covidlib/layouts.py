"""Where the images of a source are and what they are labelled (ingest step 1).

:func:`detect_layout` tells the layouts apart; :func:`collect` lists every file of the source
(images, DICOM files, NIfTI volumes) with its class name as found, and, where the layout gives
them, its split, patient id, source and bounding box:

* ``class_folders``: ``<root>/<class>/*`` (any depth below the class folder);
* ``split_folders``: ``<root>/<split>/<class>/*`` (split names as in :data:`SPLIT_ALIASES`);
* ``covidx``: COVIDx label files (``train_COVIDx_CT-3A.txt`` ..., COVIDx CXR ``train.txt`` ...);
* ``ucsd``: UCSD COVID-CT split lists (``trainCT_COVID.txt`` ...);
* ``csv``: a user table with a path and a label column (+ patient id, split, source, bbox).

Nothing is decoded here (that is :func:`covidlib.datasets.ingest`'s verification step) and
nothing is written. Files that cannot be used (unsupported type, image outside any class folder,
listed but missing, a folder that cannot be listed) go to ``quarantine`` with a reason.

No keras / tensorflow import here.
"""
from __future__ import annotations

import csv
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from covidlib import config
from covidlib import images as cimg
from covidlib.aliases import alias_lookup, normalize_class_name

__all__ = [
    "COVIDX_CT_CLASSES", "LAYOUTS", "SPLIT_ALIASES", "UNREADABLE_FOLDER", "Item", "Collected",
    "detect_layout", "collect",
]

#: Numeric classes of the COVIDx CT label files.
COVIDX_CT_CLASSES: dict[str, str] = {"0": "normal", "1": "cap", "2": "covid"}

#: Folder names of the split layout (case-insensitive) -> split.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}

LAYOUTS: tuple[str, ...] = ("class_folders", "split_folders", "covidx", "ucsd", "csv")

#: Start of the quarantine reason for a folder that could not be listed (its images are missing).
UNREADABLE_FOLDER = "folder could not be read"

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


@dataclass
class Item:
    """One file (or one slice of a volume) on its way to the manifest.

    The collectors fill what the layout knows; the later stages of ``ingest`` fill the rest
    (``label``: aliases, slices: volumes, ``patient`` / ``group``: splits).
    """

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


@dataclass
class Collected:
    """What :func:`collect` found in a source.

    Attributes:
        items: every usable file, class name as found (not yet mapped to a label).
        layout: the layout that was read (one of :data:`LAYOUTS`).
        data_root: the folder that ``Item.rel`` paths are relative to.
        extra_aliases: class names this layout defines itself (COVIDx numeric classes), or None.
        notes: informational messages (skipped junk files, mask folders, empty class folders).
    """

    items: list[Item]
    layout: str
    data_root: Path
    extra_aliases: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Layout detection
# ----------------------------------------------------------------------------------------------

def _visible_dirs(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir())
            if not p.name.startswith(".") and p.name != "__MACOSX" and p.is_dir()]


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
    """Whether the first non-empty line of ``p`` is a COVIDx label line."""
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            first = next((parts for parts in map(str.split, f) if parts), None)
    except OSError:
        return False
    return first is not None and _parse_covidx_line(first) is not None


def _pick_col(cols: Sequence[str], names: Sequence[str]) -> str | None:
    """The first of ``names`` among ``cols`` (case and surrounding spaces ignored), as spelled there."""
    low = {c.strip().lower(): c for c in cols}
    return next((low[n] for n in names if n in low), None)


def _is_label_csv(p: Path) -> bool:
    try:
        with open(p, encoding="utf-8-sig", errors="replace", newline="") as f:
            cols = next(csv.reader(f), [])
    except OSError:
        return False
    return _pick_col(cols, _PATH_COLS) is not None and _pick_col(cols, _LABEL_COLS) is not None


def detect_layout(root: Path) -> tuple[str, Any]:
    """Which of :data:`LAYOUTS` a file or folder is, without decoding anything.

    Label files and CSVs win over folders: a COVIDx / UCSD data set also holds class folders.

    Returns:
        ``(layout, detail)``: for ``covidx`` / ``ucsd`` the label files found, for ``csv`` the
        CSV to read, else None.

    Raises:
        ValueError: no layout fits (the message lists the accepted ones), or several label
            CSVs and no ``labels.csv`` / ``manifest.csv`` among them.
    """
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


# ----------------------------------------------------------------------------------------------
# Collectors: one per layout
# ----------------------------------------------------------------------------------------------


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK_FILES


def _unreadable_folder(quarantine: list[dict], err: OSError, fallback: Path) -> None:
    """Quarantine a folder that cannot be listed: walkers skip such folders silently otherwise,
    and its images would be missing without a word."""
    reason = f"{UNREADABLE_FOLDER} ({err.strerror or err}): its images are not in the manifest"
    quarantine.append({"path": str(err.filename or fallback), "reason": reason})


def _skip_folder(p: Path, notes: Counter) -> bool:
    """Mask folders and symlinked folders are not read; a note says so."""
    if normalize_class_name(p.name) in _MASK_DIRS:
        notes[f"skipped mask folder(s) named {p.name!r} (segmentation masks are not images to classify)"] += 1
        return True
    if p.is_symlink():
        notes["symlinked folders are not followed"] += 1
        return True
    return False


def _walk_class_folder(
    class_dir: Path, root: Path, cls: str, split: str | None, quarantine: list[dict], notes: Counter
) -> list[Item]:
    """Every image / DICOM / NIfTI file under one class folder (recursive)."""
    items: list[Item] = []
    for dirpath, dirnames, filenames in os.walk(
            class_dir, onerror=lambda e: _unreadable_folder(quarantine, e, class_dir)):
        d = Path(dirpath)
        keep = []
        for dn in sorted(dirnames):
            p = d / dn
            if _is_junk(dn) or dn == "__MACOSX" or _skip_folder(p, notes):
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
            if cimg.is_nifti_path(p):
                items.append(Item(p, cls, rel, split=split, kind="nifti"))
            elif suf == ".dcm" or (suf == "" and cimg.is_dicom_file(p)):
                items.append(Item(p, cls, rel, split=split, kind="dicom"))
            elif suf in config.IMAGE_EXTENSIONS:
                items.append(Item(p, cls, rel, split=split))
            else:
                quarantine.append(
                    {"path": str(p), "reason": f"unsupported file type {suf or '(no extension)'!r}: not an image"}
                )
    return items


def _collect_class_folders(root: Path, quarantine: list[dict], notes: Counter, split: str | None = None,
                           base: Path | None = None) -> list[Item]:
    base = base or root
    items = []
    try:
        loose = [p for p in sorted(root.iterdir()) if p.is_file() and not _is_junk(p.name)
                 and (p.suffix.lower() in config.IMAGE_EXTENSIONS or p.suffix.lower() == ".dcm"
                      or cimg.is_nifti_path(p))]
        dirs = _visible_dirs(root)
    except OSError as e:  # e.g. a split folder without read permission
        _unreadable_folder(quarantine, e, root)
        return []
    for p in loose:
        quarantine.append({"path": str(p), "reason": "image outside any class folder: its class is unknown"})
    for d in dirs:
        if _skip_folder(d, notes):
            continue
        got = _walk_class_folder(d, base, d.name, split, quarantine, notes)
        if not got:
            notes[f"class folder {d.relative_to(base).as_posix()!r} holds no images"] += 1
        items.extend(got)
    return items


def _collect_split_folders(root: Path, quarantine: list[dict], notes: Counter, warn: list[str]) -> list[Item]:
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
        table = alias_lookup(aliases)
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


def _collect_covidx(root: Path, files: list[Path], quarantine, warn: list[str], aliases) -> list[Item]:
    base = root if root.is_dir() else root.parent
    index = _index_files(base, config.IMAGE_EXTENSIONS, quarantine)
    items = []
    table = alias_lookup(aliases, COVIDX_CT_CLASSES)
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
                hint = table.get(normalize_class_name(rec["cls"]))
                path, why = _pick_indexed(rec["file"], hint, index, aliases)
                if path is None:
                    quarantine.append({"path": str(base / rec["file"]), "reason": f"{why} ({lf.name} line {lineno})"})
                    continue
                items.append(Item(path, rec["cls"], path.relative_to(base).as_posix(), split=split,
                                   patient=rec["patient"], source=rec["source"], bbox=rec["bbox"]))
        if bad:
            warn.append(f"{lf.name}: {len(bad)} line(s) not in COVIDx format were skipped (first: line {bad[0]})")
    return items


def _collect_ucsd(root: Path, files: list[Path], quarantine, aliases) -> list[Item]:
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
        hint = alias_lookup(aliases).get(normalize_class_name(cls))
        with open(lf, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                name = line.strip()
                if not name:
                    continue
                path, why = _pick_indexed(name, hint, index, aliases)
                if path is None:
                    quarantine.append({"path": str(search / name), "reason": f"{why} ({lf.name} line {lineno})"})
                    continue
                items.append(Item(path, cls, path.relative_to(search).as_posix(), split=split))
    return items


def _collect_csv(csv_path: Path, quarantine, warn: list[str], modality: str) -> list[Item]:
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as e:
        raise ValueError(f"{csv_path}: not a readable CSV ({type(e).__name__}: {e})") from None
    df = df.apply(lambda col: col.str.strip())  # every cell is a string (dtype=str)
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
        other = sorted({v.lower() for v in df[mc] if v} - {modality})
        if other:
            warn.append(f"{csv_path.name}: modality column holds {other} but ingest(modality={modality!r}); "
                        f"all rows are recorded as {modality!r}")
    base = csv_path.parent
    items = []
    bad_splits: Counter = Counter()
    for rowno, row in enumerate(df.to_dict("records"), start=2):  # the header is line 1
        if not row[pc]:
            quarantine.append({"path": f"{csv_path}:{rowno}", "reason": "empty path in CSV row"})
            continue
        p = Path(row[pc]).expanduser()
        if not p.is_absolute():
            p = base / p
        if not row[lc]:
            quarantine.append({"path": str(p), "reason": f"empty label in CSV row {rowno}"})
            continue
        split = SPLIT_ALIASES.get(row[sc].lower()) if sc and row[sc] else None
        if sc and row[sc] and split is None:
            bad_splits[row[sc]] += 1
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
        kind = "nifti" if cimg.is_nifti_path(p) else ("dicom" if p.suffix.lower() == ".dcm" else "image")
        items.append(Item(p, row[lc], rel, split=split, patient=(row[ic] or None) if ic else None,
                          source=(row[oc] or None) if oc else None, bbox=bbox, kind=kind))
    if bad_splits:
        raise ValueError(
            f"{csv_path}: unknown split value(s) {dict(bad_splits)}; use train / val / test "
            f"(accepted spellings: {sorted(SPLIT_ALIASES)}) or leave the cell empty to assign one"
        )
    return items


# ----------------------------------------------------------------------------------------------
# collect: the layout's collector
# ----------------------------------------------------------------------------------------------


def _label_files(root: Path, lay: str, detected: str, detail: Any) -> list[Path]:
    """The COVIDx / UCSD label files of a source (found again when the layout was forced)."""
    if lay == "covidx":
        files = detail if detected == "covidx" else (
            [root] if root.is_file() else [p for p in _scan_files(root, 1, _COVIDX_FILE) if _is_covidx_file(p)])
        if not files:
            raise ValueError(f"layout 'covidx': no COVIDx label files (train_*.txt / val_*.txt / test_*.txt) in {root}")
        return files
    files = detail if detected == "ucsd" else ([root] if root.is_file() else _scan_files(root, 3, _UCSD_LIST))
    if not files:
        raise ValueError(f"layout 'ucsd': no split lists (trainCT_COVID.txt, ...) under {root}")
    return files


def _present_files(items: list[Item], csv_path: Path, quarantine: list[dict]) -> list[Item]:
    """The CSV rows whose file exists: a missing file is a quarantine entry, not a crash."""
    present = []
    for it in items:
        if it.path.is_file():
            present.append(it)
        else:
            why = "broken symbolic link" if os.path.lexists(it.path) else "file not found"
            quarantine.append({"path": str(it.path), "reason": f"{why} (listed in {csv_path.name})"})
    return present


def collect(root: Path, layout: str | None, *, modality: str, aliases: Mapping[str, str | None] | None,
            quarantine: list[dict], warn: list[str]) -> Collected:
    """Every file of a source, read with its layout (detected, or ``layout`` when given).

    Args:
        root: the data folder, CSV or label file.
        layout: one of :data:`LAYOUTS` to force, or None to use the detected one.
        modality: ``"ct"`` or ``"xray"`` (a CSV's own modality column is checked against it).
        aliases: the user's class aliases (they pick between same-named files in label layouts).
        quarantine: unusable files are appended here.
        warn: problems the user must see are appended here.

    Raises:
        ValueError: no layout fits, or the forced layout does not fit the source.
    """
    detected, detail = detect_layout(root)
    lay = layout or detected
    data_root = root if root.is_dir() else root.parent
    note_counts: Counter = Counter()
    extra_aliases: dict[str, str] | None = None
    if lay in ("class_folders", "split_folders") and not root.is_dir():
        raise ValueError(f"layout {lay!r} needs a folder, got file {root}")
    if lay == "class_folders":
        items = _collect_class_folders(root, quarantine, note_counts)
    elif lay == "split_folders":
        items = _collect_split_folders(root, quarantine, note_counts, warn)
    elif lay == "covidx":
        extra_aliases = COVIDX_CT_CLASSES
        items = _collect_covidx(root, _label_files(root, lay, detected, detail), quarantine, warn, aliases)
    elif lay == "ucsd":
        items = _collect_ucsd(root, _label_files(root, lay, detected, detail), quarantine, aliases)
    else:  # csv
        csv_path = detail if detected == "csv" else root
        if not (csv_path.is_file() and csv_path.suffix.lower() == ".csv"):
            raise ValueError(f"layout 'csv' needs a .csv file (or a folder holding one), got {root}")
        items = _present_files(_collect_csv(csv_path, quarantine, warn, modality), csv_path, quarantine)
        data_root = csv_path.parent
    notes = [msg if n == 1 else f"{msg} (x{n})" for msg, n in note_counts.items()]
    unread = [q for q in quarantine if q["reason"].startswith(UNREADABLE_FOLDER)]
    if unread:
        warn.append(f"{len(unread)} folder(s) could not be read (e.g. {unread[0]['path']}: "
                    f"{unread[0]['reason']}); images in them are missing from the manifest")
    return Collected(items=items, layout=lay, data_root=data_root, extra_aliases=extra_aliases, notes=notes)
