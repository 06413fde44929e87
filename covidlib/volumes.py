"""DICOM series and NIfTI volumes -> PNG slices (ingest step 3).

The slices are written under ``<work_dir>/converted/<data set>-<hash>/``, never into the source
(which is read-only), in the lung window of :func:`covidlib.images.read_volume`. A slice already
converted and newer than its source is reused, so a second ingest is quick and gives the same
manifest. A file that cannot be read or written goes to ``quarantine`` with a reason.

Patient ids: a DICOM series is one patient (``dcm:<folder>``), unless the PatientID tag tells
the series apart (``dcm:<PatientID>``); a NIfTI volume is one patient (``nii:<path>``). Ids given
by the layout (label file, CSV) win.

No keras / tensorflow import here.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings as _warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from covidlib import config
from covidlib import images as cimg
from covidlib.fsutil import atomic_write_bytes, slug
from covidlib.layouts import Item

__all__ = ["conversion_root", "convert_medical"]


def conversion_root(work_dir: str | os.PathLike | None, data_root: Path, items: list[Item]) -> Path:
    """The folder the slices of ``data_root`` are converted to (``work_dir/converted/...``).

    Args:
        work_dir: the user's work folder; default ``config.data_dir()``.
        data_root: the data set's folder (named in the result, with a hash of its full path).
        items: the collected files; the check below runs only when some need converting.

    Raises:
        ValueError: the converted slices would land inside the source folder.
    """
    wd = Path(work_dir).expanduser() if work_dir is not None else config.data_dir()
    digest = hashlib.sha1(str(data_root.resolve()).encode("utf-8")).hexdigest()[:8]
    conv_root = wd / "converted" / f"{slug(data_root.name)}-{digest}"
    if any(it.kind != "image" for it in items):
        src = data_root.resolve()
        dst = conv_root.resolve()
        if dst == src or src in dst.parents:
            raise ValueError(
                f"work_dir {wd} would put converted slices inside the source folder {src}; the source "
                "is read-only -- pass work_dir= somewhere else"
            )
    return conv_root


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


def convert_medical(items: list[Item], conv_root: Path, quarantine: list[dict], notes: list[str]) -> list[Item]:
    """Replace DICOM / NIfTI items by PNG slice items written under ``conv_root``.

    Plain images pass through unchanged (first, in their order); then the DICOM slices, series
    by series in body-axis order; then the NIfTI slices, volume by volume.
    """
    out = [it for it in items if it.kind == "image"]
    dicoms = [it for it in items if it.kind == "dicom"]
    niftis = [it for it in items if it.kind == "nifti"]
    if not dicoms and not niftis:
        return out
    series = _dicom_series(dicoms, quarantine)
    n_dcm_slices = _convert_dicom(series, conv_root, quarantine, notes, out)
    n_vol, n_nii_slices = _convert_nifti(niftis, conv_root, quarantine, notes, out)
    if series:
        notes.append(f"converted {len(series)} DICOM series ({n_dcm_slices} slices, lung window) to PNG "
                     f"under {conv_root}")
    if n_vol:
        notes.append(
            f"converted {n_vol} NIfTI volume(s) ({n_nii_slices} axial slices, lung window) to PNG under "
            f"{conv_root}; every slice carries its volume's label, including slices without lung"
        )
    return out


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def _dicom_series(dicoms: list[Item], quarantine: list[dict]) -> list[tuple[str, list[tuple[Item, Any]]]]:
    """DICOM files grouped by folder, then by SeriesInstanceUID: ``[(key, [(item, header)])]``.

    ``key`` is the folder relative to the data root (``<folder>/series<k>`` when a folder holds
    several series); it names the output folder and the default patient id.
    """
    by_dir: dict[Path, list[Item]] = defaultdict(list)
    for it in dicoms:
        by_dir[it.path.parent].append(it)
    series: list[tuple[str, list[tuple[Item, Any]]]] = []
    for d, its in sorted(by_dir.items()):
        groups: dict[str, list] = defaultdict(list)
        for it in its:
            try:
                ds = cimg._dcmread(it.path, stop_before_pixels=True)
            except cimg.ImageReadError as e:
                quarantine.append({"path": str(it.path), "reason": e.reason})
                continue
            groups[str(ds.get("SeriesInstanceUID", ""))].append((it, ds))
        rel_dir = Path(its[0].rel).parent.as_posix()
        for k, (uid, members) in enumerate(sorted(groups.items())):
            key = rel_dir if len(groups) == 1 else f"{rel_dir}/series{k + 1}"
            series.append((key, members))
    return series


def _use_patient_id_tag(series: list[tuple[str, list[tuple[Item, Any]]]]) -> bool:
    """Use the DICOM PatientID only when it tells series apart; anonymised sets often give every
    series the same id ("ANON"), which would glue the whole data set into one "patient"."""
    pids = [{str(ds.get("PatientID", "")).strip() for _, ds in m} for _, m in series]
    return (len(series) > 1 and all(len(p) == 1 and "" not in p for p in pids)
            and len({next(iter(p)) for p in pids}) > 1)


def _dicom_frames(it: Item, dst: Path) -> list[Path]:
    """Write one DICOM file's frame(s) as PNG (``dst``, or ``<dst stem>_f<k>.png`` for a
    multi-frame file) unless a fresh single-frame PNG exists; their paths.

    Raises:
        covidlib.images.ImageReadError, OSError: unreadable file, or a slice that cannot be written.
    """
    if _fresh(dst, it.path):
        return [dst]
    frames = cimg.read_volume(it.path)  # handles single- and multi-frame DICOM
    paths = [dst] if len(frames) == 1 else [
        dst.with_name(f"{dst.stem}_f{k:04d}.png") for k in range(len(frames))]
    for p, frame in zip(paths, frames):
        _atomic_write_png(p, frame)
    return paths


def _convert_dicom(series: list[tuple[str, list[tuple[Item, Any]]]], conv_root: Path,
                   quarantine: list[dict], notes: list[str], out: list[Item]) -> int:
    """Append one item per converted DICOM slice to ``out``; return the number of slices."""
    use_pid = _use_patient_id_tag(series)
    if use_pid:
        notes.append("DICOM: patient_id taken from the PatientID tag (it differs between series)")
    n_slices = 0
    for key, members in series:
        members.sort(key=lambda t: cimg.dicom_sort_key(t[1], t[0].path.name))
        pid = f"dcm:{str(members[0][1].get('PatientID')).strip()}" if use_pid else f"dcm:{key}"
        for idx, (it, _) in enumerate(members):
            dst = conv_root / key / f"{idx:04d}_{slug(it.path.stem)}.png"
            try:
                frame_paths = _dicom_frames(it, dst)
            except cimg.ImageReadError as e:
                quarantine.append({"path": str(it.path), "reason": e.reason})
                continue
            except OSError as e:
                quarantine.append({"path": str(it.path), "reason": f"could not write converted slice: {e}"})
                continue
            for j, fp in enumerate(frame_paths):
                n_slices += 1
                out.append(Item(fp, it.cls, f"{it.rel}#{j}" if len(frame_paths) > 1 else it.rel,
                                split=it.split, patient=it.patient or pid, source=it.source, bbox=None,
                                label=it.label))
    return n_slices


# ----------------------------------------------------------------------------------------------
# NIfTI
# ----------------------------------------------------------------------------------------------


def _nifti_slices(it: Item, vdir: Path, notes: list[str]) -> list[Path]:
    """Write one volume's axial slices as PNG (unless fresh ones exist); their paths.

    Raises:
        covidlib.images.ImageReadError, OSError: unreadable volume, or a slice that cannot be written.
    """
    existing = sorted(vdir.glob("z*.png")) if vdir.exists() else []
    if existing and _fresh(existing[0], it.path):
        return existing
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        slices = cimg.read_volume(it.path)
    for w in caught:
        notes.append(str(w.message))
    paths = []
    for z, s in enumerate(slices):
        p = vdir / f"z{z:04d}.png"
        _atomic_write_png(p, s)
        paths.append(p)
    return paths


def _convert_nifti(niftis: list[Item], conv_root: Path, quarantine: list[dict], notes: list[str],
                   out: list[Item]) -> tuple[int, int]:
    """Append one item per axial slice to ``out``; return (volumes, slices) converted."""
    n_vol = n_slices = 0
    for it in niftis:
        stem = re.sub(r"\.nii(\.gz)?$", "", it.path.name, flags=re.IGNORECASE)
        key = (Path(it.rel).parent / stem).as_posix() if "/" in it.rel else stem
        try:
            paths = _nifti_slices(it, conv_root / (key + "_nii"), notes)
        except cimg.ImageReadError as e:
            quarantine.append({"path": str(it.path), "reason": e.reason})
            continue
        except OSError as e:
            quarantine.append({"path": str(it.path), "reason": f"could not write converted slices: {e}"})
            continue
        n_vol += 1
        for z, p in enumerate(paths):
            n_slices += 1
            out.append(Item(p, it.cls, f"{it.rel}#z{z:04d}", split=it.split,
                            patient=it.patient or f"nii:{key}", source=it.source, label=it.label))
    return n_vol, n_slices
