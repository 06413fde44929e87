"""Paths, defaults and canonical class names.

Kept free of heavy imports: the CLI and every other module import it first.
Paths follow the user, never the install: ``COVIDLIB_DATA`` and ``COVIDLIB_REPORTS`` when set,
else ``./data`` and ``./reports`` of the current working folder; downloads are cached in
``COVIDLIB_CACHE`` or the platform's user cache folder. Nothing is written inside the package.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable

def _user_path(variable: str, default: str) -> Path:
    # Relative values are taken against the working folder now, so a notebook kernel started
    # elsewhere still writes where the user asked.
    return Path(os.environ.get(variable) or default).expanduser().resolve()


def data_dir() -> Path:
    """Where downloaded and converted data live: ``COVIDLIB_DATA`` or ``./data``."""
    return _user_path("COVIDLIB_DATA", "data")


def reports_dir() -> Path:
    """Where runs and reports are written: ``COVIDLIB_REPORTS`` or ``./reports``."""
    return _user_path("COVIDLIB_REPORTS", "reports")


def cache_dir() -> Path:
    """Download cache: ``COVIDLIB_CACHE`` or the platform's user cache folder."""
    if os.environ.get("COVIDLIB_CACHE"):
        return _user_path("COVIDLIB_CACHE", "")
    import platformdirs

    return Path(platformdirs.user_cache_dir("covidlib"))


# Canonical labels, in the one order every model, table and figure uses.
# A binary data set stays binary: "non_covid" is not "normal".
CANONICAL_LABELS: tuple[str, ...] = ("covid", "cap", "normal", "non_covid")
DISPLAY_NAMES: dict[str, str] = {
    "covid": "COVID-19",
    "cap": "CAP",
    "normal": "Normal",
    "non_covid": "non-COVID",
}
POSITIVE_LABEL = "covid"

SPLITS: tuple[str, ...] = ("train", "val", "test")
MODALITIES: tuple[str, ...] = ("ct", "xray")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MEDICAL_EXTENSIONS: tuple[str, ...] = (".dcm", ".nii", ".nii.gz")

MANIFEST_COLUMNS: list[str] = ["path", "label", "patient_id", "split", "source", "modality"]
BBOX_COLUMNS: list[str] = ["xmin", "ymin", "xmax", "ymax"]

# The three AICOV-CT backbones, trained for stage 1 and combined in stage 2.
CT_BACKBONES: tuple[str, ...] = ("DenseNet121", "ResNet50V2", "MobileNetV2")


def ordered_classes(labels: Iterable[str]) -> list[str]:
    """Return the canonical labels present in ``labels``, in canonical order.

    Raises:
        ValueError: if a label is not canonical.
    """
    present = set(labels)
    unknown = present - set(CANONICAL_LABELS)
    if unknown:
        raise ValueError(
            f"labels {sorted(unknown)} are not canonical; expected some of {list(CANONICAL_LABELS)}"
        )
    return [c for c in CANONICAL_LABELS if c in present]


def display_name(label: str) -> str:
    """Human-readable name of a canonical label (``covid`` -> ``COVID-19``)."""
    return DISPLAY_NAMES.get(label, label)


def seed_everything(seed: int, *, deterministic_ops: bool = False) -> None:
    """Seed Python, NumPy and (when it is imported) Keras' backend: the one seeding function.

    Args:
        seed: the seed.
        deterministic_ops: also make TensorFlow's ops deterministic (process-wide; training
            sets it so a resumed run repeats an uninterrupted one).
    """
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    keras = sys.modules.get("keras")
    if keras is None:
        return
    keras.utils.set_random_seed(int(seed))
    if deterministic_ops and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.experimental.enable_op_determinism()
        except Exception:  # noqa: BLE001 - older TF: best effort
            pass
