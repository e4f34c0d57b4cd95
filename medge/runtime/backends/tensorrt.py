"""TensorRT and TensorRT-RTX engines behind the backend contract (``base.Backend``).

One class for both flavours (``flavour="tensorrt"`` or ``"tensorrt_rtx"``).
Loading, in this order, so that every refusal comes before anything is
deserialised and a failure leaves nothing allocated:

1. the flavour's module is imported (MissingDependency names the extra) and
   its version must be the one the engine was built with: engines run only on
   the release that built them;
2. the GPU must exist (cuda-python; BackendUnavailable otherwise);
3. TensorRT-RTX: the GPU's compute capability must be one RTX targets at all
   (:func:`rtx_unsupported_reason`; not Hopper 9.0 or Orin 8.7, for
   instance), then ``Runtime.get_engine_validity`` checks the plan header for
   this GPU and driver (version, compute capability, driver) without
   deserialising;
4. deserialise, one execution context, inspect the IO tensors (exactly one
   image input whose non-batch dimensions are fixed, one or more outputs with
   the batch as first axis);
5. allocate once, for ``max_batch``: the device input (a
   :class:`~medge.runtime.cuda.DeviceArray`, which ``medge.preprocess`` writes
   into through ``__cuda_array_interface__``), device outputs, pinned host
   outputs, and one non-blocking stream (``backend.stream``);
6. full TensorRT with CUDA graphs: capture the graph of every batch size
   (below).

``execute(n)`` runs on that stream: sets the input shape when ``n`` changes,
binds the tensor addresses, enqueues the engine, copies the outputs to pinned
memory and waits for the stream (cuda-python >= 12.9.1 releases the GIL there).

CUDA graphs (``use_cuda_graphs=True``, the default; switchable at any time):

- full TensorRT: one graph per batch size the engine runs (the profile's min
  up to ``max_batch``), all captured at load, by trtexec's rules: one plain
  ``execute_async_v3`` and a synchronise (lazy allocations and
  shape-dependent setup happen outside the capture), then one call captured
  (thread-local capture mode) and instantiated; calls replay them with
  ``cudaGraphLaunch``. Why at load and not on each size's first use: while
  serving, other threads allocate and free device memory (preprocessing
  staging buffers, other models), and ``cudaFree`` synchronises the device,
  which invalidates a capture in progress and would switch graphs off for
  good; at load nothing of this backend is shared yet. The tensor addresses
  never change (buffers are allocated once), so a graph stays valid for the
  backend's lifetime. If a capture fails, it is ended, the CUDA error is
  cleared, a warning is logged once and the backend enqueues plainly from
  then on.
- TensorRT-RTX: its built-in capture (``IRuntimeConfig.cuda_graph_strategy =
  WHOLE_GRAPH_CAPTURE``). With dynamic shapes RTX swaps fallback kernels for
  shape-specialised ones compiled in the background, and stream capture of its
  enqueue needs engines built with ``REQUIRE_USER_ALLOCATION``; its own
  capture knows when the kernels are final, an outer one cannot.

TensorRT-RTX compiles its kernels just in time, on first inference. With
``runtime_cache`` (a :class:`~medge.runtime.engine_cache.RuntimeCacheFile`,
which ``medge.load`` takes from the engine cache) the compiled kernels are
loaded from that file before the execution context exists and written back
by ``close()`` (or ``save_runtime_cache()``), so the next process skips the
compilation.

Every call into TensorRT, destructors included, runs with the cyclic GC
paused (``medge._tensorrt.gc_paused`` explains the deadlock this prevents).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import sys
import threading
import traceback
from typing import Any, Optional, Union

import numpy as np

from ..._tensorrt import FLAVOURS, LABELS, gc_paused, import_flavour, make_logger, summarise
from ...errors import BackendUnavailable, CudaError, MedgeError
from .. import cuda as _cuda
from .base import Backend, TensorInfo

__all__ = ["TensorRTBackend", "gpu_identity", "rtx_unsupported_reason"]

_LOG = logging.getLogger(__name__)

#: cudaError_t values that mean "no usable GPU here" (mirrors medge.runtime.cuda).
_NO_GPU_ERRORS = (35, 100)

PlanBytes = Union[bytes, bytearray, memoryview]


# --------------------------------------------------------------------------- the GPU


def _code(result: Any) -> int:
    """The error code of a cuda-python result: ``(err, *values)`` or ``err`` alone."""
    return int(result[0] if isinstance(result, tuple) else result)


def _require_device(device: int, purpose: str) -> Any:
    """cuda-python's runtime module, once ``device`` is known to exist.

    Raises:
        MissingDependency: cuda-python is not installed (extra ``cuda``).
        BackendUnavailable: no driver, no GPU, or no GPU with that index.
    """
    rt = _cuda._runtime(purpose)
    result = rt.cudaGetDeviceCount()
    if _code(result) != 0:
        cause = _cuda._cuda_error(result[0], "cudaGetDeviceCount")
        raise BackendUnavailable(f"{purpose} needs a CUDA GPU, and none is usable here: {cause}")
    count = int(result[1])
    if count == 0:
        raise BackendUnavailable(f"{purpose} needs a CUDA GPU, and none is visible (check CUDA_VISIBLE_DEVICES)")
    if not 0 <= device < count:
        raise BackendUnavailable(f"CUDA device {device} does not exist: {count} visible (0..{count - 1})")
    return rt


def gpu_identity(device: int = 0) -> dict:
    """Name, compute capability and SM count of a GPU: what engine cache keys are made of.

    Args:
        device: the CUDA device ordinal.

    Returns:
        ``{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "sm_count": 132}``.

    Raises:
        MissingDependency: cuda-python is not installed (a BackendUnavailable).
        BackendUnavailable: no usable driver or GPU, or no device ``device``.
    """
    device = int(device)
    rt = _require_device(device, "Identifying the GPU")
    try:
        props = _cuda.check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    except CudaError as exc:
        raise BackendUnavailable(f"cannot read the properties of CUDA device {device}: {exc}") from exc
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return {"name": str(name).strip(), "compute_capability": f"{int(props.major)}.{int(props.minor)}",
            "sm_count": int(props.multiProcessorCount)}


def rtx_unsupported_reason(trt: Any, gpu: dict) -> Optional[str]:
    """Why TensorRT-RTX cannot run on ``gpu`` at all, or None when its compute capability is one RTX targets.

    TensorRT-RTX builds only for the compute capabilities in its
    ``ComputeCapability`` enum (1.7: 7.5, 8.0, 8.6, 8.9, 12.0, 12.1): on any
    other GPU (Hopper 9.0, Jetson Orin 8.7, ...) no engine it makes can run, so
    callers refuse before building or deserialising anything.

    Args:
        trt: the ``tensorrt_rtx`` module.
        gpu: ``gpu_identity(device)``.

    Returns:
        A message naming the GPU, RTX's targets and what to use instead; None
        when RTX targets this GPU.
    """
    from ...convert.engine import GPU_FAMILIES, describe_targets, rtx_supported_targets

    targets = rtx_supported_targets(trt)
    cc = str(gpu["compute_capability"])
    if cc in targets:
        return None
    family = f", {GPU_FAMILIES[cc]}" if cc in GPU_FAMILIES else ""
    return (f"TensorRT-RTX {trt.__version__} cannot run on {gpu['name']} (compute capability {cc}{family}): it "
            f"targets {describe_targets(targets)} only. On this GPU use full TensorRT (pip install "
            "\"medge[tensorrt]\", backend=\"tensorrt\") or ONNX Runtime (backend=\"onnxruntime\")")


@contextlib.contextmanager
def _maybe_on_device(device: Optional[int]):
    """``device`` current for the block when CUDA can be asked at all (cleanup must not fail on that)."""
    if device is None:
        yield
        return
    try:
        switch = _cuda._on_device(device)
        switch.__enter__()
    except Exception:  # no cuda-python or no driver: nothing on a device can be left to release
        yield
        return
    try:
        yield
    finally:
        switch.__exit__(None, None, None)


def _quietly(action, *args) -> None:
    """Cleanup that must not mask the error being handled or stop the rest of the cleanup."""
    try:
        action(*args)
    except Exception as exc:  # noqa: BLE001
        _LOG.debug("cleanup step %s failed: %s", getattr(action, "__name__", action), exc)


# --------------------------------------------------------------------------- the backend


class TensorRTBackend(Backend):
    """A TensorRT or TensorRT-RTX engine on one GPU, with buffers allocated once.

    Args:
        engine: the serialised engine (plan). Engines are executable: pass bytes
            whose hash was verified (``Bundle.read_verified``) or that came from
            the verified engine cache.
        flavour: "tensorrt" or "tensorrt_rtx".
        precision: the engine's precision, as recorded ("fp32", "fp16", "int8").
        max_batch: the largest batch ``input_buffer`` / ``execute`` accept
            (usually the optimization profile's max); must be within the
            engine's profile (or equal its static batch). Batches smaller than
            the profile's min run padded to the min; the extra rows are ignored.
        flavour_version: the module version the engine was built with
            (the manifest's ``flavour_version``). Checked before anything is
            deserialised; None skips the check (TensorRT then refuses a
            foreign plan itself, less clearly).
        device: CUDA device ordinal.
        use_cuda_graphs: replay CUDA graphs (see the module doc); the
            ``use_cuda_graphs`` attribute switches it later.
        runtime_cache: TensorRT-RTX only (ignored for full TensorRT): the
            :class:`~medge.runtime.engine_cache.RuntimeCacheFile` of this
            engine on this GPU, loaded before the execution context is made
            and saved by ``close()``; None keeps compiled kernels in memory only.

    Attributes (beyond ``Backend``'s):
        device_index: the CUDA device ordinal.
        flavour_version: the installed module's version.
        gpu: ``gpu_identity(device_index)``.
        stream: the backend's :class:`~medge.runtime.cuda.Stream`; enqueue the
            preprocessing that fills ``input_buffer`` on it.

    Raises:
        MissingDependency: the flavour's module or cuda-python is not installed.
        BackendUnavailable: version mismatch, no GPU, a GPU TensorRT-RTX does
            not target, an engine this GPU or driver cannot run (or that fails
            its first run at load), or an engine shape medge does not run
            (several inputs, dynamic non-batch dimensions, host tensors).
        MedgeError: bad arguments (empty plan, max_batch outside the profile).
    """

    def __init__(self, engine: PlanBytes, *, flavour: str, precision: str, max_batch: int,
                 flavour_version: Optional[str] = None, device: int = 0, use_cuda_graphs: bool = True,
                 runtime_cache: Any = None) -> None:
        # Every resource attribute exists before anything can fail, so close() can run from any point.
        self._lock = threading.RLock()
        self._closed = False
        self._trt: Any = None
        self._rt: Any = None
        self._logger: Any = None
        self._trt_runtime: Any = None
        self._engine: Any = None
        self._runtime_config: Any = None
        self._runtime_cache: Any = None  # RTX's IRuntimeCache: outlives every context made with it
        self._runtime_cache_file: Any = runtime_cache
        self._runtime_cache_digest: Optional[str] = None  # of the blob last loaded or saved: unchanged is not rewritten
        self._context: Any = None
        self._graphs: dict = {}  # run batch -> (cudaGraph_t, cudaGraphExec_t)
        self._graph_failure: Optional[str] = None
        self._input_buffer: Any = None
        self._output_buffers: list = []
        self._pinned: list = []
        self._host: list = []
        self._addresses: list = []
        self._current_batch: Optional[int] = None
        self._last_view: Any = None
        self.stream: Any = None
        self.gpu: Optional[dict] = None
        self.flavour_version: Optional[str] = None
        self.device_index: Optional[int] = None

        if flavour not in FLAVOURS:
            raise MedgeError(f"unknown engine flavour {flavour!r}: use one of {', '.join(FLAVOURS)}")
        self.name = flavour
        self._label = LABELS[flavour]
        self.precision = str(precision).lower()
        if isinstance(device, bool) or not isinstance(device, (int, np.integer)) or int(device) < 0:
            raise MedgeError(f"device must be a CUDA device ordinal (0, 1, ...), got {device!r}")
        self.device_index = int(device)
        self.device = f"cuda:{self.device_index}"
        if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)) or int(max_batch) < 1:
            raise MedgeError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.max_batch = int(max_batch)
        self._use_cuda_graphs = bool(use_cuda_graphs)
        if not isinstance(engine, (bytes, bytearray, memoryview)):
            raise MedgeError(f"engine must be the plan's bytes, got {type(engine).__name__}")
        plan = memoryview(engine).cast("B") if isinstance(engine, memoryview) else engine
        if len(plan) == 0:
            raise MedgeError("the engine plan is empty")
        try:
            self._load(plan, flavour_version)
        except BaseException as exc:
            # The failed load's frames still hold TensorRT objects (locals); the traceback would keep them
            # alive past close() and release them later, with the GC running. Drop them first.
            with gc_paused():
                traceback.clear_frames(exc.__traceback__)
            self.close()
            raise

    # -- loading -----------------------------------------------------------------

    def _load(self, plan: PlanBytes, flavour_version: Optional[str]) -> None:
        trt = import_flavour(self.name, "Running a {label} engine")
        self._trt = trt
        self.flavour_version = str(trt.__version__)
        if flavour_version is None:
            _LOG.debug("no flavour_version given: %s will check the plan itself", self._label)
        elif str(flavour_version).strip() != self.flavour_version:
            raise BackendUnavailable(
                f"this engine was built with {self._label} {flavour_version}, but {self._label} "
                f"{self.flavour_version} is installed: {self._label} engines run only on the release that built "
                f"them. Rebuild the engine with {self._label} {self.flavour_version} (medge-convert, or let "
                f"medge.load build it into the engine cache), or install {self._label} {flavour_version}")
        self._rt = _require_device(self.device_index, f"Running a {self._label} engine")
        with _cuda._on_device(self.device_index):
            self.gpu = gpu_identity(self.device_index)
            if self.name == "tensorrt_rtx":
                refusal = rtx_unsupported_reason(trt, self.gpu)
                if refusal is not None:
                    raise BackendUnavailable(refusal)
            with gc_paused():
                self._logger = make_logger(trt, warning_level=logging.WARNING, log=_LOG)
                self._trt_runtime = trt.Runtime(self._logger)
                if self._trt_runtime is None:
                    raise BackendUnavailable(f"{self._label} {self.flavour_version} could not create a runtime: "
                                             f"{summarise(self._logger.errors) or 'no reason given'}")
                if self.name == "tensorrt_rtx":
                    self._check_validity(plan)
                self._logger.clear()
                try:
                    self._engine = self._trt_runtime.deserialize_cuda_engine(plan)
                except Exception as exc:
                    raise BackendUnavailable(self._deserialise_message(str(exc))) from exc
                if self._engine is None:
                    raise BackendUnavailable(self._deserialise_message())
                self._create_context()
                self._inspect_io()
            self.stream = _cuda.Stream(device=self.device_index)
            self._allocate()
            try:
                self._capture_all()
            except CudaError as exc:  # the warm-up run failed: this engine cannot run here, so say it at load
                raise BackendUnavailable(f"the engine failed its first run on {self.device} ({self.gpu['name']}) "
                                         f"at load: {exc}") from exc

    def _deserialise_message(self, detail: str = "") -> str:
        errors = summarise(self._logger.errors) or detail or "no reason was logged"
        message = (f"{self._label} {self.flavour_version} could not deserialise the engine on "
                   f"{self.gpu['name']} (compute capability {self.gpu['compute_capability']}): {errors}")
        if any(f"cudaError {code}" in errors for code in _NO_GPU_ERRORS):
            message += ". No usable CUDA GPU: check the NVIDIA driver and CUDA_VISIBLE_DEVICES"
        return message

    def _check_validity(self, plan: PlanBytes) -> None:
        """TensorRT-RTX's header check (version, compute capability, driver) before deserialising."""
        check = getattr(self._trt_runtime, "get_engine_validity", None)
        if check is None:
            return
        try:
            validity, diagnostics = check(plan)
        except Exception as exc:  # an older binding: deserialising will tell
            _LOG.debug("get_engine_validity is unusable: %s", exc)
            return
        name = getattr(validity, "name", str(validity))
        reasons = _validity_reasons(self._trt, int(diagnostics))
        if name == "INVALID" and not reasons:
            # Seen without a usable GPU (INVALID, no flag set): no reason to give, so let deserialising
            # decide and report TensorRT's own error.
            _LOG.debug("%s reports the engine as invalid without a reason; deserialising anyway", self._label)
            return
        if name == "INVALID":
            raise BackendUnavailable(
                f"{self._label} {self.flavour_version} cannot run this engine on {self.gpu['name']} "
                f"(compute capability {self.gpu['compute_capability']}): "
                f"{', '.join(reasons) or 'the engine header is not valid here'}. Rebuild the engine for this "
                "GPU and TensorRT-RTX version")
        if name == "SUBOPTIMAL":
            _LOG.warning("%s reports this engine as suboptimal on %s: %s", self._label, self.gpu["name"],
                         ", ".join(reasons) or "no reason given")

    def _create_context(self) -> None:
        """The execution context; on RTX with the built-in CUDA-graph strategy set as wanted. GC paused."""
        trt = self._trt
        self._logger.clear()
        # No TensorRT object in a local variable: a traceback would keep it alive (see __init__).
        if self.name == "tensorrt_rtx" and hasattr(self._engine, "create_runtime_config"):
            self._runtime_config = self._engine.create_runtime_config()
            strategy = getattr(trt, "CudaGraphStrategy", None)
            if strategy is not None:
                self._runtime_config.cuda_graph_strategy = (strategy.WHOLE_GRAPH_CAPTURE if self._use_cuda_graphs
                                                            else strategy.DISABLED)
            if self._runtime_cache_file is not None:
                self._attach_runtime_cache()
            self._context = self._engine.create_execution_context(self._runtime_config)
        else:
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailable(f"{self._label} could not create an execution context (out of GPU memory?): "
                                     f"{summarise(self._logger.errors) or 'no reason given'}")
        self._current_batch = None

    def _attach_runtime_cache(self) -> None:
        """Give the runtime config RTX's runtime cache, filled from the file once. GC paused.

        A cache that cannot be made, read or attached costs compile time, never
        inference: it is logged and the context is made without it.
        """
        try:
            if self._runtime_cache is None:
                self._runtime_cache = self._runtime_config.create_runtime_cache()
                blob = self._runtime_cache_file.load()
                if blob is not None:
                    if self._runtime_cache.deserialize(blob):
                        self._runtime_cache_digest = hashlib.sha256(blob).hexdigest()
                        _LOG.debug("%s runtime cache %s loaded (%d bytes)", self._label,
                                   self._runtime_cache_file, len(blob))
                    else:
                        self._runtime_cache_file.discard(
                            f"{self._label} {self.flavour_version} did not accept it on {self.gpu['name']} (made "
                            "with another GPU, driver or TensorRT-RTX version?)")
            if not self._runtime_config.set_runtime_cache(self._runtime_cache):
                raise MedgeError(summarise(self._logger.errors) or "set_runtime_cache returned False")
        except Exception as exc:  # noqa: BLE001 - see the docstring
            _LOG.warning("%s: the runtime cache %s is not used (%s); kernels are compiled on first use",
                         self._label, self._runtime_cache_file, exc)
            self._runtime_cache = None

    def save_runtime_cache(self) -> bool:
        """Write TensorRT-RTX's compiled kernels to the runtime cache file now (``close()`` does it too).

        Returns:
            True when the file was written; False without a runtime cache, or
            when nothing changed since it was loaded or last saved.

        Raises:
            EngineCacheNotWritable: the cache folder cannot be written.
        """
        with self._lock:
            self._ensure_open()
            with _cuda._on_device(self.device_index):
                return self._save_runtime_cache()

    def _save_runtime_cache(self) -> bool:
        """``save_runtime_cache`` without the checks: under the lock, device current."""
        if self._runtime_cache is None or self._runtime_cache_file is None:
            return False
        with gc_paused():
            serialised = self._runtime_cache.serialize()
            blob = bytes(memoryview(serialised).cast("B")) if serialised is not None else b""
            serialised = None
        digest = hashlib.sha256(blob).hexdigest()
        if not blob or digest == self._runtime_cache_digest:
            return False
        self._runtime_cache_file.save(blob)
        self._runtime_cache_digest = digest
        _LOG.debug("%s runtime cache %s saved (%d bytes)", self._label, self._runtime_cache_file, len(blob))
        return True

    def _tensor_dtype(self, name: str) -> np.dtype:
        dtype = self._engine.get_tensor_dtype(name)
        try:
            return np.dtype(self._trt.nptype(dtype))
        except (TypeError, KeyError, ValueError):
            raise BackendUnavailable(f"engine tensor '{name}' has data type {getattr(dtype, 'name', dtype)}, which "
                                     "medge cannot exchange with numpy") from None

    def _inspect_io(self) -> None:
        trt, engine = self._trt, self._engine
        names = [engine.get_tensor_name(i) for i in range(int(engine.num_io_tensors))]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1:
            raise BackendUnavailable(f"medge runs engines with exactly one image input; this one has {len(inputs)}: "
                                     f"{', '.join(inputs) or 'none'}")
        if not outputs:
            raise BackendUnavailable("the engine has no output tensor")
        location = getattr(trt, "TensorLocation", None)
        for name in names:
            if location is not None and hasattr(engine, "get_tensor_location"):
                if engine.get_tensor_location(name) != location.DEVICE:
                    raise BackendUnavailable(f"engine tensor '{name}' lives in host memory (a shape tensor): "
                                             "medge runs engines whose inputs and outputs are device tensors")
        name = inputs[0]
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        if len(shape) < 2 or any(d < 0 for d in shape[1:]):
            raise BackendUnavailable(f"engine input '{name}' has shape {list(shape)}: medge needs a batch axis first "
                                     "and fixed other dimensions")
        if shape[0] < 0:
            low, _, high = (tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, 0))
            self._static_batch = None
            self._batch_min, batch_max = max(1, low[0]), high[0]
        else:
            self._static_batch = self._batch_min = batch_max = shape[0]
        if self.max_batch > batch_max:
            raise MedgeError(f"max_batch {self.max_batch} is larger than this engine allows "
                             f"({'static batch' if self._static_batch else 'optimization profile up to'} {batch_max}): "
                             "lower max_batch or rebuild the engine with a larger batch range")
        self.input = TensorInfo(name, self._tensor_dtype(name), shape[1:])
        self._max_run = self._run_batch(self.max_batch)

        if self._static_batch is None:
            self._set_shape(self._max_run)
        infos = []
        for out in outputs:
            declared = tuple(int(d) for d in engine.get_tensor_shape(out))
            resolved = tuple(int(d) for d in self._context.get_tensor_shape(out))
            batch_first = declared and declared[0] == (-1 if self._static_batch is None else self._static_batch)
            if not batch_first or not resolved or resolved[0] != self._max_run or any(d < 0 for d in resolved):
                raise BackendUnavailable(f"engine output '{out}' has shape {list(declared)}: medge needs the batch as "
                                         "its first axis and fixed other dimensions")
            infos.append(TensorInfo(out, self._tensor_dtype(out), resolved[1:]))
        self.outputs = tuple(infos)

    def _allocate(self) -> None:
        """Device input, device outputs, pinned host outputs: once, for the largest batch that runs."""
        rows = self._max_run
        per_image = math.prod(self.input.shape) * self.input.dtype.itemsize
        self._input_buffer = _cuda.DeviceBuffer(rows * per_image, device=self.device_index)
        addresses = [(self.input.name, self._input_buffer.ptr)]
        for info in self.outputs:
            nbytes = rows * math.prod(info.shape) * info.dtype.itemsize
            buffer = _cuda.DeviceBuffer(nbytes, device=self.device_index)
            self._output_buffers.append(buffer)
            pinned = _cuda.PinnedBuffer(nbytes)
            self._pinned.append(pinned)
            self._host.append(pinned.array(info.dtype, (rows, *info.shape)))
            addresses.append((info.name, buffer.ptr))
        self._addresses = addresses

    # -- the contract ---------------------------------------------------------------

    def input_buffer(self, batch_size: int) -> _cuda.DeviceArray:
        """The engine's device input, viewed as (batch_size, C, H, W) of ``input.dtype`` (no allocation).

        Write it on ``stream`` (``medge.preprocess(..., device="cuda", out=view,
        stream=backend.stream)``); a write on another stream is ordered before
        the next ``execute`` through the view's pending stream.
        """
        n = self._check_batch(batch_size)
        with self._lock:
            self._ensure_open()
            view = _cuda.DeviceArray((n, *self.input.shape), self.input.dtype, buffer=self._input_buffer, offset=0)
            self._last_view = view
            return view

    def load_input(self, array: np.ndarray) -> None:
        """Copy a host (n, C, H, W) array into the engine's device input, ordered on ``stream``."""
        array = np.ascontiguousarray(array, dtype=self.input.dtype)
        self.input_buffer(len(array)).copy_from_host(array, self.stream)

    def execute(self, batch_size: int) -> np.ndarray:
        """Run the first ``batch_size`` images of the input buffer; the first output's rows, float32, on the host.

        Raises:
            MedgeError: batch size outside 1..max_batch, or the backend is closed.
            CudaError: TensorRT or CUDA failed to run the engine.
        """
        n = self._check_batch(batch_size)
        with self._lock:
            self._run(n)
            return np.array(self._host[0][:n], dtype=np.float32)

    def execute_all(self, batch_size: int) -> dict:
        """Like :meth:`execute`, but every output, by name, each in its own dtype (copies)."""
        n = self._check_batch(batch_size)
        with self._lock:
            self._run(n)
            return {info.name: np.array(host[:n]) for info, host in zip(self.outputs, self._host)}

    def _run(self, n: int) -> None:
        self._ensure_open()
        run = self._run_batch(n)
        handle = self.stream.handle
        with _cuda._on_device(self.device_index):
            view = self._last_view
            pending = view.pending_stream if view is not None else None
            if pending is not None and pending != handle:
                _cuda._order_after(handle, pending)  # the input was written on another stream
            if run != self._current_batch:
                self._set_shape(run)
            self._bind()
            self._enqueue(run)
            rt = self._rt
            for info, device_buffer, host in zip(self.outputs, self._output_buffers, self._host):
                nbytes = n * math.prod(info.shape) * info.dtype.itemsize
                _cuda.check(rt.cudaMemcpyAsync(host.ctypes.data, device_buffer.ptr, nbytes,
                                               rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, handle),
                            "cudaMemcpyAsync(device to host)")
            self.stream.synchronize()

    def _run_batch(self, n: int) -> int:
        """The batch the engine runs for ``n`` images: the static batch, or at least the profile's min."""
        if self._static_batch is not None:
            return self._static_batch
        return max(n, self._batch_min)

    def _set_shape(self, run: int) -> None:
        if self._static_batch is not None:
            self._current_batch = run
            return
        self._logger.clear()
        with gc_paused():
            ok = self._context.set_input_shape(self.input.name, (run, *self.input.shape))
        if not ok:
            raise CudaError(f"{self._label} refused input shape {[run, *self.input.shape]}: "
                            f"{summarise(self._logger.errors) or 'set_input_shape returned False'}")
        self._current_batch = run

    def _bind(self) -> None:
        with gc_paused():
            for name, address in self._addresses:
                if not self._context.set_tensor_address(name, address):
                    raise CudaError(f"{self._label} refused the address of tensor '{name}': "
                                    f"{summarise(self._logger.errors) or 'set_tensor_address returned False'}")

    def _enqueue(self, run: int) -> None:
        if self._manual_graphs():
            graph = self._graphs.get(run)  # every size was captured at load; never here, while serving
            if graph is not None:
                _cuda.check(self._rt.cudaGraphLaunch(graph[1], self.stream.handle), "cudaGraphLaunch")
                return
        self._execute_plain(run)

    def _execute_plain(self, run: int) -> None:
        self._logger.clear()
        with gc_paused():
            ok = self._context.execute_async_v3(self.stream.handle)
        if not ok:
            raise CudaError(f"{self._label} could not run a batch of {run}: "
                            f"{summarise(self._logger.errors) or 'execute_async_v3 returned False'}")

    # -- CUDA graphs ------------------------------------------------------------------

    def _manual_graphs(self) -> bool:
        return self._use_cuda_graphs and self.name == "tensorrt" and self._graph_failure is None

    def _run_batches(self) -> range:
        """Every batch the engine runs for 1..max_batch images (see ``_run_batch``)."""
        if self._static_batch is not None:
            return range(self._static_batch, self._static_batch + 1)
        return range(self._batch_min, self._max_run + 1)

    def _capture_all(self) -> None:
        """Capture the graph of every batch size now (the module doc says why not lazily); device current.

        Stops at the first failed capture, which switches graphs off for this
        backend (``_capture``). Raises CudaError when the engine's warm-up run
        itself fails.
        """
        if not self._manual_graphs():
            return
        self._bind()
        for run in self._run_batches():
            if run in self._graphs:
                continue
            if run != self._current_batch:
                self._set_shape(run)
            if self._capture(run) is None:
                return

    def _capture(self, run: int) -> Optional[tuple]:
        """Capture and instantiate the graph of one enqueue at batch ``run`` (trtexec's rules); None on failure."""
        rt, handle = self._rt, self.stream.handle
        capturable = getattr(self._context, "is_stream_capturable", None)
        if capturable is not None and not capturable(handle):
            self._graph_failed(f"{self._label} reports this execution context as not stream-capturable")
            return None
        # Outside the capture: lazy allocations, shape-dependent setup, first-run work.
        self._execute_plain(run)
        self.stream.synchronize()
        graph = executable = None
        reason = None
        try:
            begun = rt.cudaStreamBeginCapture(handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
            if _code(begun) != 0:
                reason = str(_cuda._cuda_error(begun[0] if isinstance(begun, tuple) else begun,
                                               "cudaStreamBeginCapture"))
            else:
                ok = False
                self._logger.clear()
                try:
                    with gc_paused():
                        ok = self._context.execute_async_v3(handle)
                finally:
                    ended = rt.cudaStreamEndCapture(handle)  # always ends the capture, also on an exception
                    graph = ended[1] if _code(ended) == 0 else None
                if not ok:
                    reason = ("execute_async_v3 failed while capturing: "
                              f"{summarise(self._logger.errors) or 'it returned False'}")
                elif _code(ended) != 0:
                    reason = str(_cuda._cuda_error(ended[0], "cudaStreamEndCapture"))
                elif graph is None or not int(graph):
                    reason = "cudaStreamEndCapture returned no graph"
                else:
                    made = rt.cudaGraphInstantiate(graph, 0)
                    if _code(made) != 0:
                        reason = str(_cuda._cuda_error(made[0], "cudaGraphInstantiate"))
                    else:
                        executable = made[1]
        except Exception as exc:  # noqa: BLE001 - any failure here means: no graphs, plain enqueue
            reason = f"{type(exc).__name__}: {exc}"
        if reason is None:
            self._graphs[run] = (graph, executable)
            return self._graphs[run]
        if graph is not None and int(graph):
            _quietly(rt.cudaGraphDestroy, graph)
        self._end_stray_capture()
        self._graph_failed(reason)
        return None

    def _end_stray_capture(self) -> None:
        """Leave the stream out of capture mode and clear the error a failed capture left behind."""
        rt, handle = self._rt, self.stream.handle
        try:
            status = rt.cudaStreamIsCapturing(handle)
            if _code(status) == 0 and int(status[1]) != 0:  # active or invalidated
                ended = rt.cudaStreamEndCapture(handle)
                if _code(ended) == 0 and ended[1] is not None and int(ended[1]):
                    rt.cudaGraphDestroy(ended[1])
        except Exception as exc:  # noqa: BLE001
            _LOG.debug("could not check the stream's capture status: %s", exc)
        _quietly(rt.cudaGetLastError)  # failed capture calls set the last error; later checks must not see it

    def _graph_failed(self, reason: str) -> None:
        self._graph_failure = reason
        _LOG.warning("%s: CUDA graph capture failed on %s, so this backend enqueues without graphs from now on: %s",
                     self._label, self.device, reason)

    def _destroy_graphs(self) -> None:
        graphs, self._graphs = self._graphs, {}
        rt = self._rt
        for graph, executable in graphs.values():
            _quietly(rt.cudaGraphExecDestroy, executable)
            _quietly(rt.cudaGraphDestroy, graph)

    @property
    def use_cuda_graphs(self) -> bool:
        """Whether CUDA graphs are wanted; settable (waits for the stream, drops or rebuilds what depends on it)."""
        return self._use_cuda_graphs

    @use_cuda_graphs.setter
    def use_cuda_graphs(self, value: bool) -> None:
        value = bool(value)
        with self._lock:
            if value == self._use_cuda_graphs:
                return
            self._ensure_open()
            with _cuda._on_device(self.device_index):
                self.stream.synchronize()
                self._use_cuda_graphs = value
                if self.name == "tensorrt_rtx":
                    # The strategy is read when a context is created: replace the context (the runtime
                    # cache object is kept and attached to the new config).
                    with gc_paused():
                        self._context = self._runtime_config = None
                        self._create_context()
                elif not value:
                    self._destroy_graphs()
                else:
                    self._capture_all()

    @property
    def cuda_graphs(self) -> str:
        """How enqueues run now: "replayed per batch size", "TensorRT-RTX built-in", "off" or "off: <why>"."""
        if not self._use_cuda_graphs:
            return "off"
        if self.name == "tensorrt_rtx":
            return "TensorRT-RTX built-in"
        if self._graph_failure is not None:
            return f"off: capture failed ({self._graph_failure})"
        return "replayed per batch size"

    # -- lifetime -------------------------------------------------------------------

    def describe(self) -> str:
        gpu = self.gpu or {}
        where = f"{self.device} ({gpu.get('name', '?')}, compute capability {gpu.get('compute_capability', '?')}, " \
                f"{gpu.get('sm_count', '?')} SMs)"
        return (f"{self._label} {self.flavour_version} on {where}, {self.precision}, batch up to {self.max_batch}, "
                f"CUDA graphs {self.cuda_graphs}")

    def _ensure_open(self) -> None:
        if self._closed:
            raise MedgeError(f"this {self._label} backend has been closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release, in reverse order: graphs, context, engine, runtime, buffers, stream. Idempotent."""
        lock = getattr(self, "_lock", None)
        if lock is None:  # __init__ did not get far enough to own anything
            return
        with lock:
            if self._closed:
                return
            self._closed = True
            with _maybe_on_device(self.device_index):
                if self.stream is not None:
                    _quietly(self.stream.synchronize)  # nothing may still run on what is released below
                self._close_runtime_cache()
                if self._rt is not None:
                    self._destroy_graphs()
                with gc_paused():  # TensorRT destructors log: no GC pass inside them
                    self._context = None
                    self._runtime_config = None
                    self._runtime_cache = None  # after every context that used it
                    self._engine = None
                    self._trt_runtime = None
                    self._logger = None
                self._last_view = None
                self._host = []
                if self._input_buffer is not None:
                    _quietly(self._input_buffer.close)
                    self._input_buffer = None
                for buffer in self._output_buffers + self._pinned:
                    _quietly(buffer.close)
                self._output_buffers, self._pinned, self._addresses = [], [], []
                if self.stream is not None:
                    _quietly(self.stream.close)
                    self.stream = None

    def _close_runtime_cache(self) -> None:
        """Save the compiled kernels on the way out; a failure costs the next process compile time, no more."""
        try:
            self._save_runtime_cache()
        except Exception as exc:  # noqa: BLE001
            _LOG.warning("%s: could not save the runtime cache %s (%s); the next process compiles its kernels "
                         "again", self._label, self._runtime_cache_file, exc)

    def __del__(self) -> None:
        if sys.is_finalizing():  # the driver reclaims everything at exit
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.describe()
        return f"TensorRTBackend({state})"


def _validity_reasons(trt: Any, diagnostics: int) -> list:
    """Names of the bits set in a TensorRT-RTX ``EngineInvalidityDiagnostics`` mask, as sentences."""
    texts = {
        "VERSION_MISMATCH": "it was built with another TensorRT-RTX version",
        "UNSUPPORTED_CC": "it was not built for this GPU's compute capability",
        "OLD_CUDA_DRIVER": "the NVIDIA driver is too old for it",
        "OLD_CUDA_RUNTIME": "the CUDA runtime is too old for it",
        "INSUFFICIENT_GPU_MEMORY": "the GPU has too little memory for it",
        "MALFORMED_ENGINE": "the plan is malformed",
        "CUDA_ERROR": "a CUDA error occurred while checking it (no usable GPU or driver?)",
    }
    members = getattr(getattr(trt, "EngineInvalidityDiagnostics", None), "__members__", {})
    reasons, known = [], 0
    for name, member in members.items():
        bit = int(member)
        if bit and diagnostics & bit:
            reasons.append(texts.get(name, name.lower().replace("_", " ")))
            known |= bit
    if diagnostics & ~known:
        reasons.append(f"diagnostic flags 0x{diagnostics & ~known:x}")
    return reasons
