"""Check vectors: a few model inputs with their FP32 outputs, carried by the bundle and re-run at load.

The accuracy report says how each precision behaved on the converting
machine. A deployment machine can differ (another CPU's INT8 kernels,
another GPU's engine tactics, a broken driver): the self-test at load runs
the chosen backend and precision on these inputs and compares with FP32. A
precision that does not reproduce them within its tolerance, or changes a
top-1 class, is dropped and the next one tried, with the reason.

Only preprocessed tensors are stored (never DICOM headers), taken from the
validation set unless the converter is given others; the manifest says which
(``manifest["check_vectors"]``). The vectors are chosen with a clear top-1
margin over every precision's measured error, so a precision within its
validated error cannot fail them and one that flips a class does.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from ..errors import BundleError

#: How many check vectors a bundle carries by default.
DEFAULT_CHECK_VECTORS = 8
# A graph's tolerance is this multiple of the largest error measured for it on the validation set...
_TOLERANCE_FACTOR = 2.0
# ... and at least this fraction of the reference outputs' magnitude: FP32 engines may use TF32 tensor
# cores and other reduction orders, which the ONNX Runtime CPU report does not see.
_TOLERANCE_FLOOR = 0.01
_ARCHIVE = {"inputs": "checks/inputs.npy", "outputs": "checks/outputs.npy"}


@dataclass
class CheckVectors:
    """Inputs (K, C, H, W), or (K, C, D, H, W) windows of 3-D networks, float32, their FP32 outputs, and the
    tolerance per graph."""

    inputs: np.ndarray
    reference: np.ndarray
    tolerances: dict
    source: str

    @classmethod
    def choose(cls, inputs: np.ndarray, reference: np.ndarray, task: Any, errors: Mapping[str, Optional[float]],
               source: str, count: int = DEFAULT_CHECK_VECTORS) -> "CheckVectors":
        """Pick ``count`` of ``inputs`` whose FP32 top-1 margin exceeds every graph's tolerance.

        Args:
            inputs, reference: candidate inputs and their FP32 outputs.
            task: the bundle's task (margins, top-1 classes).
            errors: graph -> largest max-abs error measured against FP32 (None: not measured).
            source: what the inputs are ("validation set", ...), recorded in the manifest.
        """
        floor = _TOLERANCE_FLOOR * max(1.0, float(np.abs(reference).max()))
        tolerances = {graph: max(_TOLERANCE_FACTOR * (error or 0.0), floor) for graph, error in errors.items()}
        margins = task.margins(reference)
        largest = max(tolerances.values())
        clear = np.flatnonzero(margins > largest)
        if len(clear) < count:  # not enough clear cases: the clearest ones (noted through the tolerances)
            clear = np.argsort(-margins, kind="stable")[:count]
            clear.sort()
        # Interleave the predicted classes so every class is exercised, evenly spaced within each.
        predicted = task.predicted_indices(reference[clear])
        queues = []
        for c in np.unique(predicted):
            group = clear[predicted == c]
            spots = np.unique(np.linspace(0, len(group) - 1, min(count, len(group))).round().astype(int))
            queues.append([int(i) for i in group[spots]])
        picked: list[int] = []
        while len(picked) < count and any(queues):
            for queue in queues:
                if queue and len(picked) < count:
                    picked.append(queue.pop(0))
        order = np.array(sorted(picked), dtype=np.int64)
        return cls(np.ascontiguousarray(inputs[order], dtype=np.float32),
                   np.ascontiguousarray(reference[order], dtype=np.float32), tolerances, source)

    # ------------------------------------------------------------------ bundle

    def write(self, writer: Any) -> dict:
        """Add the arrays to a BundleWriter; returns the manifest entry."""
        files = {}
        for key, array in (("inputs", self.inputs), ("outputs", self.reference)):
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            files[key] = writer.add_file(buffer.getvalue(), _ARCHIVE[key])
        return {"count": int(len(self.inputs)), "source": self.source, "inputs_file": files["inputs"],
                "outputs_file": files["outputs"],
                "tolerances": {graph: float(tolerance) for graph, tolerance in self.tolerances.items()}}

    @classmethod
    def from_bundle(cls, bundle: Any) -> "CheckVectors":
        """Read (hash-verified) from a bundle.

        Raises:
            BundleError: no check vectors, or damaged ones.
        """
        entry = bundle.manifest.get("check_vectors")
        if not isinstance(entry, dict):
            raise BundleError("the bundle carries no check vectors; convert the model again with this medge")
        tolerances = entry.get("tolerances")
        if not isinstance(tolerances, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in tolerances.values()):
            raise BundleError("the manifest's check_vectors.tolerances must map graphs to non-negative numbers")
        arrays = []
        for key in ("inputs_file", "outputs_file"):
            name = entry.get(key)
            if not isinstance(name, str):
                raise BundleError(f"the manifest's check_vectors.{key} must name a file of the bundle")
            try:
                array = np.load(io.BytesIO(bundle.read_verified(name)), allow_pickle=False)
            except ValueError as exc:
                raise BundleError(f"{name} is not a numpy array file ({type(exc).__name__})") from None
            if array.dtype != np.float32 or not np.isfinite(array).all():
                raise BundleError(f"{name} must hold finite float32 values")
            arrays.append(array)
        inputs, reference = arrays
        if inputs.ndim not in (4, 5) or len(inputs) == 0 or len(reference) != len(inputs):
            raise BundleError("the bundle's check vectors are inconsistent: inputs must be (K, C, H, W) or "
                              "(K, C, D, H, W) with one output each")
        return cls(inputs, reference, {str(k): float(v) for k, v in tolerances.items()},
                   str(entry.get("source", "")))

    # ------------------------------------------------------------------ running

    def failures(self, backend: Any, task: Any, graph: str) -> list[str]:
        """Why ``backend`` (running ``graph``) does not reproduce the check vectors (empty: it does)."""
        if tuple(self.inputs.shape[1:]) != tuple(backend.input.shape):
            return [f"the check vectors are {self.inputs.shape[1:]} per image but the graph takes "
                    f"{tuple(backend.input.shape)}"]
        outputs = []
        for start in range(0, len(self.inputs), backend.max_batch):
            chunk = self.inputs[start : start + backend.max_batch]
            backend.load_input(chunk.astype(backend.input.dtype, copy=False))
            outputs.append(np.array(backend.execute(len(chunk)), dtype=np.float32, copy=True))
        tolerance = self.tolerances.get(graph, _TOLERANCE_FLOOR * max(1.0, float(np.abs(self.reference).max())))
        return task.check_failures(np.concatenate(outputs), self.reference, tolerance)
