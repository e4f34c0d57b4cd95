"""How raw model outputs become scores: shared by the accuracy report (convert) and the runtime,
so both see exactly the same numbers."""

from __future__ import annotations

import numpy as np

from .errors import MedgeError

ACTIVATIONS = ("softmax", "sigmoid")


def activate(outputs: np.ndarray, activation: str) -> np.ndarray:
    """Scores from raw outputs (N, classes): softmax over classes, or elementwise sigmoid; float64."""
    x = np.asarray(outputs, dtype=np.float64)
    if activation == "softmax":
        x = x - x.max(axis=1, keepdims=True)
        e = np.exp(x)
        return e / e.sum(axis=1, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    raise MedgeError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
