"""OpenVINO backend: the fast CPU engine on x86 (``pip install "medge[openvino]"``).

OpenVINO reads the bundle's ONNX graphs from memory (the verified bytes, no
temporary file) and runs the TensorRT-placed INT8 graph (symmetric Q/DQ on
weighted ops' inputs) with int8 convolutions, which ONNX Runtime cannot: it
fuses only its own Q/DQ placement and runs the TensorRT one at about half its
FP32 speed. FP32 and FP16 graphs run too.

How it is set up, and why:

- Dynamic batch, never ``reshape``: OpenVINO 2026.4.1 segfaults compiling
  DenseNet121's ONNX-Runtime-placed INT8 graph after a reshape to a static
  batch; the dynamic graph compiles and runs. A graph whose batch axis is
  static is refused (BackendUnavailable), not reshaped.
- The compile runs first in a child process (``isolate_compile``): a native
  crash there (a segfault in a graph transformation) becomes
  BackendUnavailable, so ``load(backend="auto")`` goes on to ONNX Runtime
  instead of taking the caller's process down. A graph that compiled so is
  remembered in ``verdict_dir`` (keyed by the graph's SHA-256, OpenVINO's
  version, the CPU and the properties), so only the first load on a machine
  pays for the child (about a second, plus the compile).
- ``INFERENCE_PRECISION_HINT=f32``: on CPUs with bf16 instructions
  (AVX512_BF16, AMX) OpenVINO's default runs FP32 graphs in bfloat16 (seen:
  max logit error 0.13 on the demo). The graph's own precision is what the
  accuracy report measured, so nothing is lowered behind its back.
- ``threads`` becomes ``INFERENCE_NUM_THREADS``; one stream, latency hint
  (one synchronous request at a time, as the pipeline runs it). CPU pinning
  is off: medge runs inside someone else's process, whose reading and
  preprocessing threads must not find OpenVINO's workers bound to their cores.
  OpenVINO's TBB workers do not spin after a run (measured: about 1 ms of CPU
  in the 50 ms after an inference), unlike ONNX Runtime's defaults.
- Buffers: the input (and every output whose per-image shape is static) is a
  numpy array allocated once for ``max_batch``; per batch size an
  ``ov.Tensor`` view shares it, so OpenVINO reads the preprocessing output in
  place and writes outputs straight into the host arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ...errors import BackendUnavailable, MissingDependency
from .base import Backend, TensorInfo

_LOG = logging.getLogger("medge.runtime")

#: Properties every compiled model gets (threads are added per backend).
_PROPERTIES = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
               "ENABLE_CPU_PINNING": False}
#: Seconds the isolated compile may take before the graph is given up on.
PROBE_TIMEOUT_S = 600.0

# The isolated compile: graph bytes on stdin, properties as argv[1], the folder this process imported openvino
# from as argv[2]; compiles and runs one image of zeros. It imports openvino alone (not medge), prints one JSON
# line and exits 0; a crash shows as a signal, a failed import as a traceback without the JSON line.
_PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
data = sys.stdin.buffer.read()
import numpy as np
import openvino as ov
try:
    core = ov.Core()
    compiled = core.compile_model(core.read_model(data), "CPU", json.loads(sys.argv[1]))
    port = compiled.input(0)
    shape = [1] + [int(d.get_length()) for d in list(port.get_partial_shape())[1:]]
    compiled.create_infer_request().infer({0: np.zeros(shape, dtype=port.get_element_type().to_dtype())})
except Exception as exc:
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}))
    sys.exit(0)
print(json.dumps({"ok": True}))
"""


def _openvino():
    try:
        import openvino
    except ImportError as exc:
        raise MissingDependency("openvino", "openvino", "The OpenVINO backend") from exc
    return openvino


_CORE = None
_CORE_LOCK = threading.Lock()


def _core():
    """One ov.Core per process (creating one loads the CPU plugin: ~0.3 s)."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = _openvino().Core()
        return _CORE


def available() -> bool:
    """Is OpenVINO installed (without importing it)?"""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def cpu_name() -> str:
    try:
        return str(_core().get_property("CPU", "FULL_DEVICE_NAME"))
    except Exception:  # noqa: BLE001 - a name for messages only
        return "CPU"


def probe_compile(model_bytes: bytes, properties: dict, *, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """Compile (and run one image of zeros) in a child process; why it failed, or None when it worked.

    Returns None too when the child could not run OpenVINO at all (a frozen
    application whose ``sys.executable`` is not Python): the caller then
    compiles in its own process, as it would without isolation.
    """
    import importlib.util

    spec = importlib.util.find_spec("openvino")
    where = str(Path(spec.origin).resolve().parent.parent) if spec is not None and spec.origin else ""
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(properties), where], input=model_bytes,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"compiling it took longer than {timeout:.0f} s (in a child process)"
    except OSError as exc:
        _LOG.info("medge: OpenVINO compile not isolated (cannot start %s: %s)", sys.executable, exc)
        return None
    if done.returncode < 0:
        import signal

        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return f"OpenVINO crashed compiling it ({name}, in a child process; medge's process was not affected)"
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    try:
        verdict = json.loads(lines[-1]) if lines else None
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict):
        _LOG.info("medge: OpenVINO compile not isolated (the child process exited %d: %s)", done.returncode,
                  done.stderr.decode(errors="replace").strip()[-300:])
        return None
    return None if verdict.get("ok") else f"OpenVINO cannot compile it: {verdict.get('error')}"


class OpenVINOBackend(Backend):
    """Runs one ONNX graph of a bundle with OpenVINO on the CPU.

    Args:
        model_bytes: the graph (already hash-verified from the bundle).
        precision: the graph's precision, for reporting.
        max_batch: the largest batch to allocate for.
        threads: inference threads (0: OpenVINO's default, one per core).
        output_names: the graph's output names in order (the manifest's), to
            name outputs as ONNX does when OpenVINO keeps several names.
        isolate_compile: compile once in a child process first, so a crash
            in OpenVINO is a BackendUnavailable instead of the end of this
            process (costs a Python start and a second compile).
        verdict_dir: where graphs that compiled in the child are remembered
            (None: nowhere; every load isolates again).

    Raises:
        MissingDependency: openvino is not installed (names the extra).
        BackendUnavailable: OpenVINO cannot read, compile or run the graph
            here, or its batch axis is static.
    """

    name = "openvino"

    def __init__(self, model_bytes: bytes, *, precision: str, max_batch: int, threads: int = 0,
                 output_names: Optional[Sequence[str]] = None, isolate_compile: bool = True,
                 verdict_dir: Union[str, os.PathLike, None] = None) -> None:
        ov = _openvino()
        core = _core()
        self.precision = precision
        self.max_batch = int(max_batch)
        self.device = "cpu"
        self.threads = int(threads)
        self._closed = True
        properties = dict(_PROPERTIES)
        if self.threads:
            properties["INFERENCE_NUM_THREADS"] = self.threads
        try:
            model = core.read_model(model_bytes)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError / its own types
            raise BackendUnavailable(f"OpenVINO cannot read the {precision} graph: {_first_line(exc)}") from None
        if len(model.inputs) != 1:
            raise BackendUnavailable(f"the {precision} graph has {len(model.inputs)} inputs; medge runs single-input "
                                     "models")
        shape = model.inputs[0].get_partial_shape()
        if shape.rank.is_dynamic or len(shape) < 2 or any(d.is_dynamic for d in list(shape)[1:]):
            raise BackendUnavailable(f"the {precision} graph's input shape {shape} is not static per image")
        if shape[0].is_static and shape[0].get_length() < self.max_batch:
            # Reshaping would be the way round, and is what crashes OpenVINO 2026.4.1 on some INT8 graphs.
            raise BackendUnavailable(f"the {precision} graph has a static batch of {shape[0].get_length()}; "
                                     "medge does not reshape graphs for OpenVINO (dynamic batch needed)")
        names = [_port_name(port, result, output_names, i)
                 for i, (port, result) in enumerate(zip(model.outputs, model.get_results()))]
        self.version = ov.get_version().split("-")[0]
        self.cpu = cpu_name()
        if isolate_compile:
            _isolated_compile(model_bytes, properties, precision, self.version, self.cpu, verdict_dir)
        try:
            self._compiled = core.compile_model(model, "CPU", properties)
            self._request = self._compiled.create_infer_request()
        except Exception as exc:  # noqa: BLE001
            raise BackendUnavailable(f"OpenVINO cannot compile the {precision} graph: {_first_line(exc)}") from None
        port = self._compiled.input(0)
        dtype = np.dtype(port.get_element_type().to_dtype())
        self.input = TensorInfo(model.inputs[0].get_any_name(), dtype,
                                tuple(int(d.get_length()) for d in list(shape)[1:]))
        outputs, buffers = [], []
        for name, out in zip(names, self._compiled.outputs):
            dims = list(out.get_partial_shape())[1:]
            static = all(d.is_static for d in dims)
            per_image = tuple(int(d.get_length()) if d.is_static else -1 for d in dims)
            outputs.append(TensorInfo(name, np.dtype(np.float32), per_image))
            buffers.append(np.zeros((self.max_batch, *per_image), dtype=out.get_element_type().to_dtype())
                           if static else None)
        self.outputs = tuple(outputs)
        self._input = np.zeros((self.max_batch, *self.input.shape), dtype=dtype)
        self._outputs = buffers
        # Per batch size, tensors sharing the host buffers (made once; no allocation per call).
        self._input_tensors = [ov.Tensor(self._input[:n], shared_memory=True) for n in range(1, self.max_batch + 1)]
        self._output_tensors = [[None if b is None else ov.Tensor(b[:n], shared_memory=True) for b in buffers]
                                for n in range(1, self.max_batch + 1)]
        self._closed = False

    def input_buffer(self, batch_size: int) -> np.ndarray:
        return self._input[: self._check_batch(batch_size)]

    def _run(self, batch_size: int) -> int:
        n = self._check_batch(batch_size)
        request = self._request
        request.set_input_tensor(self._input_tensors[n - 1])
        for i, tensor in enumerate(self._output_tensors[n - 1]):
            if tensor is not None:
                request.set_output_tensor(i, tensor)
        request.infer()  # releases the GIL while it runs
        return n

    def _output(self, i: int, n: int) -> np.ndarray:
        # A copy: the host buffers are overwritten by the next call, and callers keep results.
        source = self._outputs[i][:n] if self._outputs[i] is not None else self._request.get_output_tensor(i).data
        return np.array(source, dtype=np.float32, copy=True)

    def execute(self, batch_size: int) -> np.ndarray:
        return self._output(0, self._run(batch_size))

    def execute_all(self, batch_size: int) -> dict:
        n = self._run(batch_size)
        return {info.name: self._output(i, n) for i, info in enumerate(self.outputs)}

    def describe(self) -> str:
        threads = f"{self.threads} threads" if self.threads else "all cores"
        return f"openvino {self.version} ({self.cpu}, {threads}), {self.precision}, batch up to {self.max_batch}"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._input_tensors = self._output_tensors = None
            self._request = None
            self._compiled = None


def _isolated_compile(model_bytes: bytes, properties: dict, precision: str, version: str, cpu: str,
                      verdict_dir: Union[str, os.PathLike, None]) -> None:
    """probe_compile, unless ``verdict_dir`` remembers this graph compiling here; raises BackendUnavailable."""
    marker = None
    if verdict_dir is not None:
        key = hashlib.sha256(json.dumps({"graph": hashlib.sha256(model_bytes).hexdigest(), "openvino": version,
                                         "cpu": cpu, "properties": properties}, sort_keys=True).encode()).hexdigest()
        marker = Path(verdict_dir).expanduser() / f"{key}.compiled"
        if marker.is_file():
            return
    why = probe_compile(model_bytes, properties)
    if why is not None:
        raise BackendUnavailable(f"the {precision} graph: {why}")
    if marker is not None:
        from ..._fs import atomic_write

        try:
            atomic_write(marker, b"compiled in a child process without crashing\n")
        except OSError as exc:  # a read-only cache only costs the next load another child process
            _LOG.debug("medge: cannot remember the OpenVINO compile in %s: %s", marker.parent, exc)


def _port_name(port, result, expected: Optional[Sequence[str]], index: int) -> str:
    """The ONNX name of an output: the manifest's when given, else the one OpenVINO's result node is named after."""
    names = set(port.get_names())
    if expected is not None and index < len(expected) and expected[index] in names:
        return expected[index]
    friendly = result.get_friendly_name().split("/sink_port")[0]
    if friendly in names or not names:
        return friendly
    return sorted(names)[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]
