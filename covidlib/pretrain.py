"""Self-supervised pretraining of a registry backbone on unlabelled CT slices (``covidlib pretrain``).

Hospitals often train offline and cannot download ImageNet weights, and ImageNet features are
far from gray CT slices anyway. This module pretrains any backbone of
:data:`covidlib.models.BACKBONES` on unlabelled images (folders, or the train rows of manifests)
and writes its weights as ``<out>/<Backbone>.weights.h5``, a file ``WEIGHTS=<path>`` (or
``WEIGHTS=<folder>``) loads through the same transfer path as ImageNet weights: phase 1 trains the
head on the frozen backbone, phase 2 fine-tunes (:func:`covidlib.train.train`).

**Objective: SimSiam** (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR
2021; :mod:`covidlib.simsiam`). Why this one:

* SimCLR (Chen et al. 2020) and MoCo (He et al. 2020) need many negatives: batches of thousands or
  a queue with a momentum encoder; with the batches of 16-64 a CPU or one GPU affords at 224 px,
  SimCLR's accuracy drops sharply. BYOL (Grill et al. 2020) needs a momentum (EMA) copy of the
  encoder, twice the memory and an update outside Keras' ``fit``.
* Masked-image modelling (MAE, He et al. 2022; keras-io's MAE example) is built for vision
  transformers: the CNNs of the registry (DenseNet, ResNet, MobileNetV2) cannot drop masked
  patches, and masked convolutions (SparK, ConvNeXt V2) are not ``keras.applications`` models.
* SimSiam needs neither negatives nor a momentum encoder (the stop-gradient prevents collapse),
  reaches its accuracy from batch 64 up and stays close at smaller ones, and is one ``fit`` with
  an overridden ``compute_loss``: backend-agnostic and resumable with the public callbacks.
  Self-supervised pretraining on the target domain helped small COVID-19 CT sets (He et al. 2020,
  "Sample-efficient deep learning for COVID-19 diagnosis based on CT scans", Self-Trans; Chen et
  al. 2021, momentum-contrast few-shot COVID-19 CT) and medical imaging generally (Azizi et al.
  2021, ICCV). keras-io's SimSiam and SimCLR examples are TensorFlow-only (a ``GradientTape``
  ``train_step``); the ``compute_loss`` hook used here runs on every backend.

Recipe (:class:`PretrainConfig`): the paper's SGD (momentum 0.9, weight decay 1e-4, cosine decay),
projector of 2 layers (its CIFAR variant, for small sets) and a predictor bottleneck of a quarter
of its width; views are random resized crops (25-100 % of the area), a small rotation, a flip,
contrast / brightness jitter, blur and noise (:class:`covidlib.simsiam.ViewAugment`). The peak
learning rate is 0.1, not the paper's ``0.05 x batch / 256`` (0.006 at batch 32), which is set
for hundreds of epochs of thousands of steps: on 216 synthetic slices (210 steps of 32) the loss
reached -0.06 at 0.05, -0.14 at 0.1 and -0.29 at 0.3, none collapsing; 0.1 leaves room for
larger sets. Raise it for very few steps, lower it if ``z_std`` falls.

Collapse is watched as in the SimSiam paper: ``z_std``, the standard deviation of the
L2-normalised projector output over a batch (healthy ~ ``1/sqrt(d)``, collapsed 0), logged per
epoch and recorded; a collapsed run ends with a warning.

The saved backbone expects what a classifier feeds it: raw 0..255 gray images pass through the
backbone's own :class:`covidlib.models.BackbonePreprocess` inside the pretraining model. Its
backbone is built as for training from scratch (:func:`covidlib.models.build_backbone`, its
``bn_momentum``) and trains with batch norm in training mode; its moving statistics are then
recomputed on the un-augmented images (:func:`covidlib.simsiam.recalibrate_batchnorm`), because
the classifier runs a loaded backbone in inference mode, on images that are not SimSiam views.

Outputs, beside each other: ``<Backbone>.weights.h5`` (``backbone.save_weights``) and
``<Backbone>.pretrain.json`` (objective, configuration, data size and sources, unreadable files,
loss and ``z_std`` per epoch, Keras version); :func:`covidlib.models.resolve_weights_file` reads
it to refuse a file of another backbone or input size. While it runs, ``.<Backbone>.pretrain/``
holds the epoch backup (``save_weights`` + ``state.json``, :class:`covidlib.callbacks.
BudgetedBackupAndRestore`) and the history: the same call after a kill resumes there; a finished
identical run is reused. Decoded images are kept in an array store (``cache_dir``).

Importing this module does not import Keras (the CLI builds its parser from it).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from covidlib import config
from covidlib.runner import NOTEBOOK_DEFAULT, fill_defaults, notebook_field

if TYPE_CHECKING:
    import pandas as pd

OBJECTIVE = "simsiam"
# A run whose last-epoch z_std falls under this fraction of 1/sqrt(d) has collapsed.
COLLAPSE_FRACTION = 0.1
# Images used to recompute the batch-norm statistics after pretraining (a random sample).
RECALIBRATION_IMAGES = 2048


@dataclass
class PretrainConfig:
    """What defines a pretraining run (recorded in ``<Backbone>.pretrain.json``).

    Attributes:
        backbone: a name from :data:`covidlib.models.BACKBONES`.
        img_size: square input size; the classifier must use the same.
        epochs: passes over the images.
        batch_size: images per step (>= 2; each image gives two views).
        learning_rate: peak learning rate of SGD (momentum 0.9, cosine decay to 0).
        weight_decay: SGD weight decay.
        proj_dim: width of the projector / predictor output.
        seed: seed of the initial weights, the image order and the views.
        init_weights: start from ``None`` (random), ``"imagenet"`` or a weights file / folder.
        mixed_precision: ``"auto"`` (on with a GPU), ``"on"`` or ``"off"``.
        jit_compile: ``"auto"`` (XLA with a GPU), ``"on"`` or ``"off"``.
    """

    # The classifier loads these weights at its own size: backbone, size, batch and seed follow
    # notebook 03 (IMG_SIZE, ...); the epochs are pretraining's own (PRETRAIN_EPOCHS is 0 = off).
    backbone: str = notebook_field("train", "BACKBONE")
    img_size: int = notebook_field("train", "IMG_SIZE")
    epochs: int = 20
    batch_size: int = notebook_field("train", "BATCH_SIZE")
    learning_rate: float = 0.1
    weight_decay: float = 1e-4
    proj_dim: int = 512
    seed: int = notebook_field("train", "SEED")
    init_weights: str | None = None
    mixed_precision: str = "auto"
    jit_compile: str = "auto"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field (nothing is built or read)."""
        from covidlib.models import BACKBONES

        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {list(BACKBONES)}")
        for name, lo in (("img_size", 32), ("epochs", 1), ("batch_size", 2), ("proj_dim", 8)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and (value > 0 or name == "weight_decay" and value == 0)):
                raise ValueError(f"{name} must be a number > 0{' (or 0)' if name == 'weight_decay' else ''}, "
                                 f"got {value!r}")
        for name in ("mixed_precision", "jit_compile"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ValueError(f"{name} must be 'auto', 'on' or 'off', got {getattr(self, name)!r}")
        self._check_init_weights()

    def _check_init_weights(self) -> None:
        if self.init_weights is None:
            return
        if self.init_weights == "imagenet":
            if self.backbone == "SmallCNN":
                raise ValueError("SmallCNN has no ImageNet weights; use init_weights=None")
            return
        from covidlib.models import resolve_weights_file

        resolve_weights_file(self.init_weights, self.backbone, self.img_size)


# ----------------------------------------------------------------------------------------------
# Inputs: folders, image files, manifests (train rows)
# ----------------------------------------------------------------------------------------------


def _table_rows(df: "pd.DataFrame", where: str, base: Path | None, splits: Sequence[str] | None,
                modality: str | None, notes: list[str]) -> "pd.DataFrame":
    """The rows of a manifest-like table to pretrain on: its ``path`` column, train rows only."""
    if "path" not in df.columns:
        raise ValueError(f"{where}: no 'path' column; expected a manifest (path[, split, modality])")
    n = len(df)
    if splits is not None:
        if "split" in df.columns:
            df = df[df["split"].isin(list(splits))]
            notes.append(f"{where}: {len(df)} of {n} rows in split(s) {list(splits)}")
        else:
            notes.append(f"{where}: no 'split' column, all {n} rows used")
    if modality is not None and "modality" in df.columns:
        df = df[df["modality"] == modality]
    paths = [str(p).strip() for p in df["path"]]
    if base is not None:
        paths = [p if Path(p).is_absolute() else str(base / p) for p in paths]
    return _rows([p for p in paths if p], where)


def _rows(paths: Sequence[str], source: str) -> "pd.DataFrame":
    import pandas as pd

    return pd.DataFrame({"path": list(paths), "label": "", "split": "train",
                         "patient_id": "", "source": source})


def _folder_rows(folder: Path, work_dir: Path, unreadable: list[dict],
                 notes: list[str]) -> "pd.DataFrame":
    """Every image under ``folder``; DICOM and NIfTI become PNG slices under ``work_dir``."""
    from covidlib import images as cimg
    from covidlib.layouts import Item
    from covidlib.volumes import conversion_root, convert_medical

    items, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(f for f in filenames if not f.startswith(".")):
            p = Path(dirpath) / name
            if cimg.is_nifti_path(p):
                kind = "nifti"
            elif p.suffix.lower() == ".dcm" or (not p.suffix and cimg.is_dicom_file(p)):
                kind = "dicom"
            elif p.suffix.lower() in config.IMAGE_EXTENSIONS:
                kind = "image"
            else:
                skipped += 1
                continue
            items.append(Item(path=p, cls="unlabelled", rel=p.relative_to(folder).as_posix(), kind=kind))
    if skipped:
        notes.append(f"{folder}: skipped {skipped} file(s) that are not images")
    if any(it.kind != "image" for it in items):
        items = convert_medical(items, conversion_root(work_dir, folder, items), unreadable, notes)
    return _rows([str(it.path) for it in items], str(folder))


def collect_images(sources: Sequence[str | os.PathLike] | "pd.DataFrame", *,
                   splits: Sequence[str] | None = ("train",), modality: str | None = None,
                   work_dir: str | os.PathLike) -> tuple["pd.DataFrame", list[dict], list[str]]:
    """The unlabelled images of ``sources``, as rows an array store takes.

    Args:
        sources: folders (recursive), image files, manifest CSVs (their ``path`` column, relative
            paths against the CSV's folder), or one manifest DataFrame.
        splits: manifest rows to keep when a table has a ``split`` column (default: train only,
            so validation / test images never reach pretraining); None keeps every row.
        modality: keep only manifest rows of this modality (when the table has the column).
        work_dir: where DICOM series / NIfTI volumes are converted to PNG slices.

    Returns:
        ``(rows, unreadable, notes)``: rows ``path, label, split, patient_id, source`` (one per
        distinct path), ``[{"path", "reason"}]`` for files that could not be converted, and
        informational notes.
    """
    import pandas as pd

    unreadable: list[dict] = []
    notes: list[str] = []
    if isinstance(sources, pd.DataFrame):
        frames = [_table_rows(sources, "manifest", None, splits, modality, notes)]
    else:
        frames = []
        for src in sources:
            p = Path(src).expanduser()
            if p.is_dir():
                frames.append(_folder_rows(p, Path(work_dir), unreadable, notes))
            elif p.suffix.lower() == ".csv":
                table = pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8-sig")
                frames.append(_table_rows(table, str(p), p.resolve().parent, splits, modality, notes))
            else:
                frames.append(_rows([str(p)], str(p)))
    rows = pd.concat(frames, ignore_index=True) if frames else _rows([], "")
    rows = rows.drop_duplicates("path").reset_index(drop=True)
    return rows, unreadable, notes


def _check_sources(sources: Any) -> list[Path] | None:
    """The source paths (None for a DataFrame), each existing; ValueError / FileNotFoundError."""
    import pandas as pd

    if isinstance(sources, pd.DataFrame):
        return None
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths = [Path(s).expanduser() for s in sources]
    if not paths:
        raise ValueError("no sources given: pass folders of images or manifest CSVs")
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"source {p} does not exist (expected a folder of images, an "
                                    "image file or a manifest CSV)")
    return paths


def output_file(out: str | os.PathLike, backbone: str) -> Path:
    """The weights file ``out`` names: ``out`` itself (``*.weights.h5``) or ``out/<backbone>.weights.h5``."""
    p = Path(out).expanduser()
    if p.name.endswith(".weights.h5"):
        return p
    if p.suffix.lower() in (".h5", ".hdf5", ".keras", ".json", ".npz") or p.is_file():
        raise ValueError(f"--out {p}: expected a folder or a file name ending in .weights.h5 "
                         "(what Keras' save_weights writes)")
    return p / f"{backbone}.weights.h5"


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _build(cfg: PretrainConfig, steps: int, jit: bool):
    """The compiled SimSiam model around a fresh (or ``init_weights``) backbone."""
    import keras
    import numpy as np

    from covidlib import models, simsiam

    backbone = models.build_backbone(cfg.backbone, cfg.img_size, cfg.init_weights)
    model = simsiam.SimSiam(backbone, models.BACKBONES[cfg.backbone].preprocess, cfg.proj_dim,
                            seed=cfg.seed, name="simsiam")
    model(np.zeros((2, cfg.img_size, cfg.img_size, 1), "float32"))  # builds every layer
    schedule = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, max(1, steps * cfg.epochs))
    opt = keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=cfg.weight_decay or None)
    model.compile(optimizer=opt, jit_compile=jit)
    return model


def _fit(images, cfg: PretrainConfig, work: Path, verbose: int | str, extra: list | None):
    """SimSiam ``fit`` over ``images`` from the backup in ``work`` (if any); returns the model."""
    import keras

    from covidlib.callbacks import (BudgetedBackupAndRestore, read_backup, restore_backup,
                                    truncate_history)
    from covidlib.simsiam import ImageBatches
    from covidlib.train import mixed_precision_scope, precision_policy

    backup_dir = work / "backup"
    state = read_backup(backup_dir)
    mixed, jit = precision_policy(cfg)
    with mixed_precision_scope(mixed):
        config.seed_everything(cfg.seed, deterministic_ops=True)
        loader = ImageBatches(images, cfg.batch_size, seed=cfg.seed)
        model = _build(cfg, len(loader), jit)
        done = 0
        if state is not None:
            restore_backup(model, backup_dir, state)
            done = state["epoch"]
        if done < cfg.epochs and not _state_finished(state):
            truncate_history(work / "history.csv", done)
            backup = BudgetedBackupAndRestore(backup_dir)
            backup.resume_state = state
            loader.seek(done)
            # shuffle=False: the loader owns the seeded per-epoch order (exact resume).
            model.fit(loader, initial_epoch=done, epochs=cfg.epochs, verbose=verbose, shuffle=False,
                      callbacks=[keras.callbacks.CSVLogger(str(work / "history.csv"), append=True),
                                 backup, *(extra or [])])
            backup.finish()
    return model


def _state_finished(state: dict | None) -> bool:
    """Whether a backup's ``state.json`` says the run had finished."""
    return bool(state and state.get("finished"))


def _recalibration_batches(images, batch_size: int, seed: int) -> Iterable:
    import numpy as np

    n = len(images)
    pick = np.sort(np.random.default_rng(seed).permutation(n)[:RECALIBRATION_IMAGES])
    for i in range(0, len(pick), batch_size):
        part = pick[i:i + batch_size]
        if len(part) >= 2 or i == 0:
            yield np.asarray(images[part])[..., None]


# ----------------------------------------------------------------------------------------------
# The run: check, collect, reuse / resume, train, save
# ----------------------------------------------------------------------------------------------


def _history(work: Path) -> list[dict]:
    import pandas as pd

    path = work / "history.csv"
    if not path.is_file():
        return []
    h = pd.read_csv(path)
    keep = [c for c in ("epoch", "loss", "z_std", "learning_rate") if c in h]
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
            for row in h[keep].to_dict("records")]


def _record(cfg: PretrainConfig, rows: "pd.DataFrame", sources: list[Path] | None,
            splits: Sequence[str] | None, modality: str | None) -> dict:
    """What makes two pretraining runs the same: objective, configuration, data."""
    from covidlib.arraystore import manifest_fingerprint

    return json.loads(json.dumps({
        "objective": OBJECTIVE, **asdict(cfg), "data_sha1": manifest_fingerprint(rows),
        "n_files": int(len(rows)), "sources": [str(s) for s in sources] if sources else ["manifest"],
        "splits": list(splits) if splits is not None else None, "modality": modality,
    }, default=str))  # as read back from the JSON it is compared with


def _finished(out_file: Path, record: dict) -> bool:
    from covidlib.models import pretrain_meta_path

    meta_path = pretrain_meta_path(out_file)
    if not (out_file.is_file() and meta_path.is_file()):
        return False
    try:
        return json.loads(meta_path.read_text(encoding="utf-8")).get("record") == record
    except (OSError, ValueError):
        return False


def _prepare_work(work: Path, record: dict) -> None:
    """Keep ``work`` (a resumable backup of this very run) or start it afresh."""
    from covidlib.fsutil import atomic_write_text

    saved = work / "record.json"
    try:
        same = json.loads(saved.read_text(encoding="utf-8")) == record
    except (OSError, ValueError):
        same = False
    if not same and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not same:
        atomic_write_text(saved, json.dumps(record, indent=2))


def _report_unreadable(unreadable: list[dict], n_total: int) -> None:
    if not unreadable:
        return
    first = "; ".join(f"{u['path']}: {u['reason']}" for u in unreadable[:3])
    warnings.warn(f"pretraining: {len(unreadable)} of {n_total} file(s) could not be read and are "
                  f"left out (listed in the .pretrain.json): {first}"
                  f"{' ...' if len(unreadable) > 3 else ''}", UserWarning, stacklevel=3)


def _check_request(cfg: PretrainConfig, sources: Any, out: str | os.PathLike,
                   splits: Sequence[str] | None, modality: str | None,
                   allow_inside_input: bool) -> tuple[list[Path] | None, Path]:
    """Every argument checked before any image is read; returns the sources and the weights file."""
    from covidlib.fsutil import check_output_path

    cfg.validate()
    if splits is not None:
        splits = [splits] if isinstance(splits, str) else list(splits)
        bad = [s for s in splits if s not in config.SPLITS]
        if bad or not splits:
            raise ValueError(f"splits must be a non-empty list from {list(config.SPLITS)} or None, "
                             f"got {splits!r}")
    if modality is not None and modality not in config.MODALITIES:
        raise ValueError(f"modality must be one of {list(config.MODALITIES)} or None, got {modality!r}")
    paths = _check_sources(sources)
    out_file = output_file(out, cfg.backbone)
    # Folders and image files are protected; a manifest CSV only against being overwritten
    # (a run folder holds the manifest and, beside it, the pretrain/ folder).
    protected = [p for p in paths or [] if p.suffix.lower() != ".csv"]
    check_output_path(out_file, protected, kind="file", what="--out",
                      allow_inside_input=allow_inside_input)
    return paths, out_file


def pretrain_backbone(sources: Sequence[str | os.PathLike] | "pd.DataFrame", out: str | os.PathLike, *,
                      splits: Sequence[str] | None = ("train",), modality: str | None = None,
                      cache_dir: str | os.PathLike | None = None, overwrite: bool = False,
                      verbose: int | str = "auto", callbacks: list | None = None,
                      allow_inside_input: bool = False, **config_kwargs: Any) -> Path:
    """Pretrain a backbone with SimSiam on unlabelled images; write its weights file.

    Re-running the same request on the same data returns the finished file without training; a
    run killed part-way resumes from its last epoch backup. Every argument is checked before any
    image is read.

    Args:
        sources: folders of images (recursive; DICOM / NIfTI converted to slices), image files,
            manifest CSVs, or a manifest DataFrame (see :func:`collect_images`).
        out: the weights file (``*.weights.h5``) or a folder (then ``<folder>/<backbone>.weights.h5``).
        splits: manifest splits to use (default train only); None uses every row.
        modality: keep only manifest rows of this modality.
        cache_dir: where decoded images (and converted volumes) are kept; default
            ``<out folder>/.pretrain-cache``.
        overwrite: pretrain again even if a finished identical run exists, and replace a file at
            ``out`` that ``covidlib pretrain`` did not write.
        verbose: Keras ``fit`` verbosity (``"auto"``/1: a progress bar; 2: one line an epoch).
        callbacks: more Keras callbacks for ``fit``.
        allow_inside_input: allow ``out`` inside an input folder.
        **config_kwargs: fields of :class:`PretrainConfig` (``backbone``, ``img_size``, ``epochs``...).

    Returns:
        The weights file; ``<stem>.pretrain.json`` lies beside it.

    Raises:
        ValueError: a bad argument, no images, or an ``out`` file of another origin.
        FileNotFoundError: a source does not exist.
    """
    from covidlib.arraystore import build_store

    cfg = PretrainConfig(**config_kwargs)
    paths, out_file = _check_request(cfg, sources, out, splits, modality, allow_inside_input)
    splits = [splits] if isinstance(splits, str) else (list(splits) if splits is not None else None)
    cache = Path(cache_dir).expanduser() if cache_dir else out_file.parent / ".pretrain-cache"
    rows, unreadable, notes = collect_images(paths if paths is not None else sources, splits=splits,
                                             modality=modality, work_dir=cache)
    if rows.empty:
        raise ValueError(f"no images to pretrain on in {[str(p) for p in paths or ['the manifest']]}"
                         + (f" ({'; '.join(notes)})" if notes else ""))
    record = _record(cfg, rows, paths, splits, modality)
    if not overwrite and _finished(out_file, record):
        return out_file
    _check_replace(out_file, overwrite)
    with warnings.catch_warnings():  # reported below, with the conversion failures
        warnings.filterwarnings("ignore", "[0-9]+ of [0-9]+ images could not be decoded", UserWarning)
        store = build_store(rows, cfg.img_size, cache, progress=verbose not in (0, "0", False))
    _report_unreadable(unreadable + list(store.params.get("failed") or []), len(rows) + len(unreadable))
    unreadable = unreadable + list(store.params.get("failed") or [])
    if len(store.images) < 2:
        raise ValueError(f"only {len(store.images)} readable image(s): pretraining needs at least 2")
    work = out_file.parent / f".{out_file.name[:-len('.weights.h5')]}.pretrain"
    _prepare_work(work, record)
    model = _fit(store.images, cfg, work, verbose, callbacks)
    meta = {"record": record, "unreadable": unreadable, "notes": notes,
            "n_images": int(len(store.images))}
    _save(model, cfg, store.images, out_file, work, meta)
    shutil.rmtree(work, ignore_errors=True)  # a finished run resumes nothing
    return out_file


def _check_replace(out_file: Path, overwrite: bool) -> None:
    from covidlib.models import pretrain_meta_path

    if out_file.exists() and not overwrite and not pretrain_meta_path(out_file).is_file():
        raise ValueError(f"{out_file} exists and was not written by covidlib pretrain (no "
                         f"{pretrain_meta_path(out_file).name} beside it); refusing to replace it "
                         "(pass overwrite=True / --overwrite)")


def _save(model, cfg: PretrainConfig, images, out_file: Path, work: Path, meta: dict) -> None:
    """Recalibrate batch norm, then write the ``.pretrain.json`` and the backbone's weights."""
    import keras

    from covidlib import models, simsiam
    from covidlib.callbacks import save_weights_atomic
    from covidlib.fsutil import atomic_write_text

    history = _history(work)
    healthy = 1.0 / math.sqrt(cfg.proj_dim)
    last_std = history[-1].get("z_std") if history else None
    collapsed = last_std is not None and last_std < COLLAPSE_FRACTION * healthy
    if collapsed:
        warnings.warn(f"SimSiam collapsed: the last epoch's z_std {last_std:.4f} is below "
                      f"{COLLAPSE_FRACTION} x 1/sqrt({cfg.proj_dim}) = {COLLAPSE_FRACTION * healthy:.4f}; "
                      "the features are near-constant. Lower the learning rate or raise the batch size.",
                      UserWarning, stacklevel=3)
    n_recal = simsiam.recalibrate_batchnorm(
        model.backbone, models.BACKBONES[cfg.backbone].preprocess,
        _recalibration_batches(images, cfg.batch_size, cfg.seed))
    meta = {"objective": OBJECTIVE, "backbone": cfg.backbone, "img_size": cfg.img_size,
            "preprocess": models.BACKBONES[cfg.backbone].preprocess, "weights_file": out_file.name,
            "epochs": cfg.epochs, **meta, "history": history, "z_std_healthy": healthy,
            "collapsed": bool(collapsed), "batchnorm_recalibrated_on": int(n_recal),
            "keras_version": keras.__version__, "backend": keras.backend.backend()}
    # Old weights out first, the record next, the weights last: a kill in between never leaves a
    # record beside weights it does not describe (the backup is still there to finish from).
    out_file.unlink(missing_ok=True)
    atomic_write_text(models.pretrain_meta_path(out_file), json.dumps(meta, indent=2, default=str))
    save_weights_atomic(model.backbone, out_file)


def read_record(weights_file: str | os.PathLike) -> dict:
    """The ``.pretrain.json`` beside a pretrained weights file (FileNotFoundError when absent)."""
    from covidlib.models import pretrain_meta_path

    path = pretrain_meta_path(weights_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {weights_file} was not written by covidlib pretrain")
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# Notebook 03's step (the command line is cli.cmd_pretrain)
# ----------------------------------------------------------------------------------------------


def pretrain_for_run(run_dir: str | os.PathLike, *, backbone: str, modality: str = "ct",
                     enhancement: str = NOTEBOOK_DEFAULT, img_size: int = NOTEBOOK_DEFAULT,
                     epochs: int = NOTEBOOK_DEFAULT, batch_size: int = NOTEBOOK_DEFAULT,
                     seed: int = NOTEBOOK_DEFAULT, weights: str | None = None,
                     verbose: int | str = 2) -> str | None:
    """Notebook 03's pretraining step: the ``WEIGHTS`` its training then uses.

    Arguments not given take notebook 03's parameters (``ENHANCEMENT``, ``IMG_SIZE``,
    ``PRETRAIN_EPOCHS``, ``BATCH_SIZE``, ``SEED``), as its training does.
    With ``epochs`` 0, returns ``weights`` unchanged (no pretraining). Otherwise pretrains
    ``backbone`` on the run's training images of ``modality`` -- the train split of
    ``RUN_DIR/manifest.csv`` only, enhanced as the classifier will see them, labels unused --
    starting from ``weights`` (None, ``"imagenet"`` or a file), into ``RUN_DIR/pretrain/``
    (X-ray: ``RUN_DIR/pretrain/xray/``), and returns that folder. Reused when already done.
    """
    kw = fill_defaults("train", dict(enhancement=enhancement, img_size=img_size, epochs=epochs,
                                     batch_size=batch_size, seed=seed), {"epochs": "PRETRAIN_EPOCHS"})
    enhancement, img_size, epochs, batch_size, seed = kw.values()
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"PRETRAIN_EPOCHS must be an integer >= 0, got {epochs!r}")
    if epochs == 0:
        print("pretraining off (PRETRAIN_EPOCHS 0): training starts from WEIGHTS", weights)
        return weights
    from covidlib import train
    from covidlib.datasets import read_manifest

    run_dir = Path(run_dir)
    PretrainConfig(backbone=backbone, img_size=img_size, epochs=epochs, batch_size=batch_size,
                   seed=seed, init_weights=weights).validate()
    path = run_dir / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run notebook 01 (or `covidlib run`) first")
    rows, _ = train.enhanced_manifest(read_manifest(path), run_dir, enhancement, modality)
    out_dir = run_dir / "pretrain" / ("xray" if modality == "xray" else "")
    out = pretrain_backbone(rows, out_dir, splits=["train"], modality=modality,
                            cache_dir=run_dir / "cache", verbose=verbose, backbone=backbone,
                            img_size=img_size, epochs=epochs, batch_size=batch_size, seed=seed,
                            init_weights=weights)
    rec = read_record(out)
    last = rec["history"][-1] if rec.get("history") else {}
    print(f"pretrained {backbone} (SimSiam, {rec['n_images']} unlabelled train images, {epochs} "
          f"epochs): loss {last.get('loss', float('nan')):.3f}, z_std {last.get('z_std', float('nan')):.4f} "
          f"(healthy ~{rec['z_std_healthy']:.4f}) -> {out}")
    return str(out_dir.resolve())
