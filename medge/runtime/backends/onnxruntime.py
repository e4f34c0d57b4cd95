"""ONNX Runtime backend: the fallback everywhere (CUDA execution provider when present, else CPU).

Input and output buffers live on the host and are allocated once for the
profile's max batch. Inputs go in through IOBinding, so ONNX Runtime reads
the preprocessing output in place and writes outputs into a preallocated
array: no per-call allocation on either side.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...errors import BackendUnavailable, MissingDependency
from .base import Backend, TensorInfo

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependency("onnxruntime", "runtime", "The ONNX Runtime backend") from exc
    return onnxruntime


class OnnxRuntimeBackend(Backend):
    """Runs one ONNX graph of a bundle with ONNX Runtime.

    Args:
        model_bytes: the graph (already hash-verified from the bundle).
        precision: the graph's precision, for reporting.
        max_batch: the largest batch to allocate for.
        providers: ONNX Runtime execution providers in order of preference;
            None: CUDA when this onnxruntime build has it, else CPU.
        threads: intra-op threads (0: ONNX Runtime's default, all cores).
    """

    name = "onnxruntime"

    def __init__(self, model_bytes: bytes, *, precision: str, max_batch: int,
                 providers: Optional[list[str]] = None, threads: int = 0, device_id: int = 0) -> None:
        ort = _onnxruntime()
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
                else ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendUnavailable(f"ONNX Runtime here has no {', '.join(missing)} (available: {', '.join(available)})")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        # ONNX Runtime's worker threads spin after each run by default. In a pipeline, reading and
        # preprocessing run right after inference, and spinning workers take CPU from them: on the
        # 2-core reference machine the read stage ran ~40% slower. So they sleep.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        provider_options = [{"device_id": int(device_id)} if p == "CUDAExecutionProvider" else {} for p in providers]
        try:
            self._session = ort.InferenceSession(model_bytes, options, providers=providers,
                                                 provider_options=provider_options)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail / InvalidGraph types
            raise BackendUnavailable(f"ONNX Runtime cannot load the {precision} graph: {exc}") from exc
        self.providers = self._session.get_providers()
        self.precision = precision
        self.max_batch = int(max_batch)
        self.device = "cpu"  # buffers are host memory whichever provider runs the graph
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise BackendUnavailable(f"the {precision} graph has {len(inputs)} inputs; medge runs single-input models")
        meta = inputs[0]
        dtype = np.dtype(_ORT_TYPES.get(meta.type, np.float32))
        self.input = TensorInfo(meta.name, dtype, tuple(meta.shape[1:]))
        self.outputs = tuple(TensorInfo(o.name, np.dtype(_ORT_TYPES.get(o.type, np.float32)), tuple(o.shape[1:]))
                             for o in self._session.get_outputs())
        self._input = np.zeros((self.max_batch, *self.input.shape), dtype=dtype)
        self._output_names = [o.name for o in self.outputs]
        self._binding = self._session.io_binding()
        self._closed = False

    def input_buffer(self, batch_size: int) -> np.ndarray:
        return self._input[: self._check_batch(batch_size)]

    def execute(self, batch_size: int) -> np.ndarray:
        return np.asarray(self._run(batch_size)[0], dtype=np.float32)

    def execute_all(self, batch_size: int) -> dict:
        """Like :meth:`execute`, but every output, by name, float32 (e.g. scores and class activation maps)."""
        return {name: np.asarray(value, dtype=np.float32)
                for name, value in zip(self._output_names, self._run(batch_size))}

    def _run(self, batch_size: int) -> list:
        n = self._check_batch(batch_size)
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input(self.input.name, self._input[:n])
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def describe(self) -> str:
        return f"onnxruntime ({', '.join(self.providers)}), {self.precision}, batch up to {self.max_batch}"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._binding = None
            self._session = None

    @staticmethod
    def has_cuda() -> bool:
        try:
            return "CUDAExecutionProvider" in _onnxruntime().get_available_providers()
        except MissingDependency:
            return False

