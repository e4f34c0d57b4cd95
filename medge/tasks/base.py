"""The task contract: what a model's outputs mean, asked by convert, validate and the runtime alike."""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Mapping, Optional, Sequence

import numpy as np

#: Verdicts a precision graph gets at conversion (``manifest["gates"]["verdicts"]``).
GATE_VERDICTS = ("reference", "passed", "failed", "not measured", "ungated")
#: The verdicts the runtime chooses by default; "failed" and "not measured" need allow_failed_gates.
DEFAULT_CHOICE_VERDICTS = ("reference", "passed", "ungated")


class Task(abc.ABC):
    """What a bundle's outputs mean.

    One class per task kind. Conversion builds it from the model's outputs
    (refusing outputs it cannot interpret), the manifest stores it, and the
    runtime rebuilds it from the manifest and checks the backend's outputs
    against it before the first prediction.
    """

    #: The name the manifest records (``manifest["task"]["kind"]``).
    kind: ClassVar[str]
    #: Gate limits applied when the converter is not told otherwise: name -> value (None: not applied).
    default_gates: ClassVar[Mapping[str, Optional[float]]] = {}

    @classmethod
    @abc.abstractmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> "Task":
        """Rebuild from ``manifest["task"]``; BundleError when a field is missing or of the wrong type."""

    @abc.abstractmethod
    def to_manifest(self) -> dict:
        """The manifest entry (JSON-ready), including ``kind``."""

    @abc.abstractmethod
    def check_output_shape(self, shape: Sequence[Any], error: type) -> None:
        """Raise ``error`` when an output of ``shape`` (batch axis first) cannot be this task's output."""

    @abc.abstractmethod
    def compare(self, outputs: np.ndarray, reference: np.ndarray) -> dict:
        """Agreement of ``outputs`` with the FP32 ``reference`` on the same inputs (report fields)."""

    @abc.abstractmethod
    def metrics(self, outputs: np.ndarray, labels: np.ndarray) -> dict:
        """Metrics against ground-truth ``labels`` (report fields)."""

    @abc.abstractmethod
    def gate_failures(self, result: Mapping[str, Any], limits: Mapping[str, Optional[float]]) -> list[str]:
        """Each gate in ``limits`` that ``result`` (one precision at one batch size) violates, one line each."""

    @abc.abstractmethod
    def check_failures(self, outputs: np.ndarray, reference: np.ndarray, tolerance: float) -> list[str]:
        """Why ``outputs`` do not reproduce the bundle's check vectors (empty: they do)."""

    @abc.abstractmethod
    def margins(self, reference: np.ndarray) -> np.ndarray:
        """Per reference output, how far (in output units) it is from a different answer (picks check vectors)."""

    @abc.abstractmethod
    def predicted_indices(self, outputs: np.ndarray) -> np.ndarray:
        """The answer per image that agreement is counted on (top-1 class for classification)."""
