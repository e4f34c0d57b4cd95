"""The one contract every inference backend keeps (DESIGN.md "One backend contract").

The pipeline never branches on the backend's type. For each batch it:

1. asks ``input_buffer(n)`` for where the n preprocessed images go. That is
   a host array on CPU backends, or the engine's own device input binding on
   GPU backends;
2. preprocesses straight into it, on ``device`` and ``stream``, so nothing
   is copied in between;
3. calls ``execute(n)``, which returns the outputs on the host.

Buffers are allocated once, for ``max_batch``, when the backend loads, never
per call.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple  # per image, without the batch axis


class Backend(abc.ABC):
    """An inference engine loaded from one graph or engine file of a bundle.

    Attributes:
        name: "onnxruntime", "tensorrt" or "tensorrt_rtx".
        device: "cpu" or "cuda:N": where ``input_buffer`` lives and preprocessing runs.
        precision: the graph's precision ("fp32", "fp16", "int8").
        max_batch: the largest batch ``input_buffer`` / ``execute`` accept.
        stream: the CUDA stream preprocessing must enqueue on (None on CPU).
        input: TensorInfo of the single image input.
        outputs: TensorInfo of each output; ``execute`` returns the first.
    """

    name: str
    device: str = "cpu"
    precision: str
    max_batch: int
    stream: Any = None
    input: TensorInfo
    outputs: tuple

    @abc.abstractmethod
    def input_buffer(self, batch_size: int) -> Any:
        """The (batch_size, C, H, W) buffer of ``input.dtype`` that ``execute`` reads (a view, no allocation)."""

    @abc.abstractmethod
    def execute(self, batch_size: int) -> np.ndarray:
        """Run the first ``batch_size`` images of the input buffer; the first output, on the host, float32."""

    @abc.abstractmethod
    def execute_all(self, batch_size: int) -> dict:
        """Like ``execute``, but every output by name, on the host (scores and, e.g., class activation maps)."""

    def load_input(self, array: np.ndarray) -> None:
        """Copy a host (n, C, H, W) array of ``input.dtype`` into the input buffer (check vectors, tests).

        CPU backends assign into their host buffer; GPU backends override this
        with a copy on their stream.
        """
        self.input_buffer(len(array))[...] = array

    def describe(self) -> str:
        """One line: what runs where."""
        return f"{self.name} on {self.device}, {self.precision}, batch up to {self.max_batch}"

    @abc.abstractmethod
    def close(self) -> None:
        """Release sessions, engines and buffers. Idempotent."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_batch(self, batch_size: int) -> int:
        from ...errors import MedgeError

        batch_size = int(batch_size)
        if not 1 <= batch_size <= self.max_batch:
            raise MedgeError(f"batch size {batch_size} is outside 1..{self.max_batch} for this {self.name} backend")
        return batch_size

