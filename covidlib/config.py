"""Paths, defaults and canonical class names.

Kept free of heavy imports: the CLI and every other module import it first.
Paths come from the ``COVIDLIB_DATA`` and ``COVIDLIB_REPORTS`` environment variables,
falling back to ``data/`` and ``reports/`` beside the package (a source checkout).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """Where downloads and converted data live (``COVIDLIB_DATA``)."""
    return Path(os.environ.get("COVIDLIB_DATA", PROJECT_ROOT / "data")).expanduser()


def reports_dir() -> Path:
    """Where runs and reports are written (``COVIDLIB_REPORTS``)."""
    return Path(os.environ.get("COVIDLIB_REPORTS", PROJECT_ROOT / "reports")).expanduser()


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


def seed_everything(seed: int) -> None:
    """Seed Python and NumPy (and Keras when it is already imported) for a reproducible notebook."""
    import random
    import sys

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    if "keras" in sys.modules:
        sys.modules["keras"].utils.set_random_seed(seed)
