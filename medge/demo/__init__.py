"""The medge demo model: a small CNN that flags lung nodules on synthetic CT slices.

Package data (written by ``tools/train_demo_model.py``, never edited by hand):

- ``demo_model.onnx``: FP32 ONNX, input ``image`` (batch, 1, H, W) float32,
  output ``logits`` (batch, 2) for the labels ``["no_lesion", "lesion"]``
  (softmax for probabilities); dynamic batch axis named ``batch``.
- ``demo_model.json``: metadata: the PreprocessSpec the model was trained
  with, labels, seed ranges, held-out metrics, SHA-256 of the ONNX file.
- the PyTorch state_dict of :class:`medge.demo.model.DemoLesionNet` is not
  shipped (the ONNX file holds the trained weights); ``tools/train_demo_model.py
  --pytorch-weights demo_model.pt`` writes it, and ``demo_weights_path()`` finds
  it here when present.

Seeds (all synthetic, see :mod:`medge.synthetic`):

- training slices: ``ct_slice_with_truth(seed=s)`` for s in ``TRAIN_SEEDS``;
- held-out test slices (the metrics in the JSON): s in ``TEST_SEEDS``;
- 0..9999 (``RESERVED_SERIES_SEEDS``) are reserved for *series* seeds of
  :func:`medge.synthetic.write_ct_series` used by demos: calibration and
  validation sets (:func:`write_demo_dicoms`, ``DEMO_SERIES_SEEDS``) and the
  ``medge demo`` samples (series seed 0). A series derives its slice seeds
  as 63-bit hashes of the series seed, so they never fall in the training or
  test ranges (checked by the tests).

Only numpy and pydicom are needed here, like the rest of the run side.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

from ..errors import MedgeError
from ..preprocess import PreprocessSpec

__all__ = [
    "DEMO_MODEL_NAME",
    "LABELS",
    "TRAIN_SEEDS",
    "TEST_SEEDS",
    "RESERVED_SERIES_SEEDS",
    "DEMO_SERIES_SEEDS",
    "DEMO_DICOM_SIZE",
    "DEFAULT_COUNTS",
    "demo_dir",
    "demo_model_path",
    "demo_weights_path",
    "demo_metadata_path",
    "demo_metadata",
    "demo_spec",
    "file_sha256",
    "write_demo_dicoms",
    "read_labels",
]

DEMO_MODEL_NAME = "medge-demo-lesion"

#: Class names, in logit order.
LABELS = ("no_lesion", "lesion")

#: Slice seeds of the training set: ct_slice_with_truth(seed=s), s in this range.
TRAIN_SEEDS = range(100_000, 200_000)

#: Slice seeds of the held-out test set the JSON metrics come from.
TEST_SEEDS = range(200_000, 300_000)

#: Series seeds reserved for demo DICOM sets (write_ct_series), never used for training.
RESERVED_SERIES_SEEDS = range(0, 10_000)

#: write_ct_series series seed of each demo set.
DEMO_SERIES_SEEDS = {"calibration": 1000, "validation": 2000}

#: Rows = columns of the demo DICOMs: what a CT scanner writes and what the model was trained on.
DEMO_DICOM_SIZE = 512

#: Default number of slices of each demo set.
DEFAULT_COUNTS = {"calibration": 128, "validation": 128}

_ONNX = "demo_model.onnx"
_JSON = "demo_model.json"
_PT = "demo_model.pt"


def demo_dir() -> Path:
    """The folder holding the demo model's files."""
    return Path(__file__).resolve().parent


def _existing(name: str) -> Path:
    path = demo_dir() / name
    if not path.is_file():
        raise MedgeError(
            f"the demo model file {path} is missing; reinstall medge, or regenerate it with "
            "`python tools/train_demo_model.py` from the source tree"
        )
    return path


def demo_model_path() -> Path:
    """Path of the shipped FP32 ONNX demo model. Raises MedgeError when it is missing."""
    return _existing(_ONNX)


def demo_weights_path() -> Path:
    """Path of the PyTorch state_dict (``demo_model.pt``). Raises MedgeError when it is missing."""
    return _existing(_PT)


def demo_metadata_path() -> Path:
    """Path of ``demo_model.json``. Raises MedgeError when it is missing."""
    return _existing(_JSON)


@lru_cache(maxsize=1)
def _metadata_text() -> str:
    return demo_metadata_path().read_text(encoding="utf-8")


def demo_metadata() -> dict[str, Any]:
    """The demo model's metadata (a fresh dict on every call).

    Keys include ``name``, ``version``, ``labels``, ``activation``, ``input``,
    ``output``, ``spec`` (``PreprocessSpec.to_dict()``), ``seeds``,
    ``metrics`` (held-out test set), ``training`` and ``onnx`` (with
    ``sha256``).

    Raises:
        MedgeError: the file is missing or not valid JSON.
    """
    try:
        return json.loads(_metadata_text())
    except json.JSONDecodeError as exc:
        raise MedgeError(f"{demo_metadata_path()} is not valid JSON ({exc}); reinstall medge") from exc


def demo_spec() -> PreprocessSpec:
    """The PreprocessSpec the demo model was trained with (use it for calibration, validation, inference)."""
    return PreprocessSpec.from_dict(demo_metadata()["spec"])


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_demo_dicoms(directory: Union[str, os.PathLike], kind: str = "validation", count: int | None = None,
                      *, size: int = DEMO_DICOM_SIZE) -> tuple[list[Path], Path]:
    """Write a deterministic demo DICOM set (synthetic chest CT slices, half with a nodule).

    The same ``kind`` and ``count`` always give the same files. Calibration
    and validation sets use different reserved series seeds
    (``DEMO_SERIES_SEEDS``), so they share no slice with each other or with
    the training and test sets.

    Args:
        directory: created if missing; gets ``ct_00000.dcm``... and ``labels.csv``.
        kind: ``"calibration"`` or ``"validation"``.
        count: number of slices (default ``DEFAULT_COUNTS[kind]``).
        size: rows = columns (512 is what the model was trained on).

    Returns:
        (DICOM paths in order, path of ``labels.csv``). ``labels.csv`` has the
        columns ``filename, sop_instance_uid, label, seed, lesion_row,
        lesion_col, lesion_radius`` (label 1 = ``"lesion"``); see
        :func:`read_labels`.

    Raises:
        ValueError: unknown kind, or invalid count or size.
        MissingDependency: pydicom is not installed.
    """
    from ..synthetic import LABELS_FILENAME, write_ct_series

    if kind not in DEMO_SERIES_SEEDS:
        raise ValueError(f"kind must be one of {sorted(DEMO_SERIES_SEEDS)}, got {kind!r}")
    if count is None:
        count = DEFAULT_COUNTS[kind]
    files = write_ct_series(directory, count, seed=DEMO_SERIES_SEEDS[kind], size=size, lesion_fraction=0.5)
    return files, Path(directory) / LABELS_FILENAME


def read_labels(labels_csv: Union[str, os.PathLike]) -> dict[str, int]:
    """``labels.csv`` of a demo set -> {filename: label} (1 = lesion, 0 = no lesion)."""
    with open(labels_csv, newline="") as f:
        return {row["filename"]: int(row["label"]) for row in csv.DictReader(f)}
