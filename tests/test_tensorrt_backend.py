"""Tests of medge.runtime.backends.tensorrt (TensorRTBackend, gpu_identity) and medge._tensorrt.

Three layers, because most machines that run these tests have no GPU:

1. Real TensorRT-RTX without a GPU: a real engine is built from a tiny ONNX
   graph; loading it must fail with a clear BackendUnavailable, before
   deserialising where the refusal does not need the GPU (version mismatch),
   with TensorRT's own cudaError where it does, and leave nothing allocated.
2. The backend's logic against stand-ins: ``FakeCuda`` is cuda-python's
   runtime module with host memory for "device" memory and stream capture
   that records work instead of running it; ``fake_trt`` is a TensorRT module
   whose engine computes ``y = x.reshape(n, -1) @ W.T`` through the tensor
   addresses it is given. Shapes, bindings, CUDA-graph capture / replay /
   fallback, errors, the GC pause and the release order are checked there.
3. On a GPU (marker ``gpu``, skipped with the reason elsewhere): a real engine
   against ONNX Runtime, graph replay against plain enqueue, and medge's CUDA
   preprocessing written straight into the engine's input.
"""

from __future__ import annotations

import ctypes
import enum
import gc
import logging
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import medge
from tests.conftest import skip_not_for_this_gpu
from medge import _tensorrt
from medge.errors import BackendUnavailable, CudaError, MedgeError, MissingDependency
from medge.runtime import cuda
from medge.runtime.backends.tensorrt import TensorRTBackend, gpu_identity

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:
    onnx = None


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _gpu_count() -> int:
    try:
        return cuda.device_count()
    except Exception:  # noqa: BLE001 - no cuda-python, no driver
        return 0


HAS_RTX = _has("tensorrt_rtx")
HAS_TRT = _has("tensorrt")
GPU_COUNT = _gpu_count()
REPO = Path(medge.__file__).resolve().parents[1]



def _marks(*marks):
    def apply(test):
        for mark in marks:
            test = mark(test)
        return test
    return apply


needs_rtx = _marks(
    pytest.mark.tensorrt,
    pytest.mark.skipif(onnx is None, reason="onnx is not installed"),
    pytest.mark.skipif(not HAS_RTX, reason='tensorrt_rtx not installed: pip install "medge[rtx]"'),
)
no_gpu_here = pytest.mark.skipif(GPU_COUNT > 0, reason="checks the behaviour on a machine without a usable GPU")
gpu = _marks(
    pytest.mark.gpu,
    pytest.mark.tensorrt,
    pytest.mark.skipif(GPU_COUNT == 0, reason="needs a CUDA GPU (none visible, no driver, or no cuda-python)"),
    pytest.mark.skipif(not (HAS_RTX or HAS_TRT), reason="needs tensorrt or tensorrt_rtx"),
    pytest.mark.skipif(onnx is None, reason="onnx is not installed"),
)

C, H, W, K = 3, 4, 4, 5  # the fake and the tiny real model: (N, 3, 4, 4) -> (N, 5)


# =========================================================================== stand-ins


class cudaError_t(enum.IntEnum):  # the name matters: medge.runtime.cuda formats errors of this type
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


OK = cudaError_t.cudaSuccess


class _Handle(int):
    """cudaGraph_t / cudaGraphExec_t stand-in: an int (cuda-python handles convert with int())."""


class FakeCuda:
    """cuda-python's runtime module, for one or more fake GPUs whose memory is host memory.

    Stream capture records the work enqueued on the capturing stream (through
    :meth:`enqueue`, which the fake engine uses too) instead of running it;
    graphs replay the records.
    """

    cudaError_t = cudaError_t
    cudaStreamNonBlocking = 1
    cudaEventDisableTiming = 2
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                           cudaMemcpyDeviceToDevice=3)
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1,
                                                  cudaStreamCaptureModeRelaxed=2)

    def __init__(self, devices: int = 1, name: bytes = b"Fake RTX 6000\0\0\0", compute_capability=(8, 9)) -> None:
        self.devices, self.name = devices, name
        self.compute_capability = compute_capability
        self.current = 0
        self.memory: dict = {}  # address -> ctypes buffer, device and pinned
        self.streams: set = set()
        self.capturing: dict = {}  # stream -> list of recorded callables
        self.graphs: dict = {}  # handle -> ops
        self.execs: dict = {}
        self.events: list = []  # ("what", detail) in call order
        self.last_error = 0
        self.capture_modes: list = []
        self._next = 0x1000

    # -- devices
    def cudaGetDeviceCount(self):
        if self.devices < 0:
            return (cudaError_t.cudaErrorInsufficientDriver, 0)
        return (OK, self.devices)

    def cudaGetDevice(self):
        return (OK, self.current)

    def cudaSetDevice(self, device):
        if not 0 <= device < max(self.devices, 0):
            return (cudaError_t.cudaErrorInvalidValue,)
        self.current = device
        return (OK,)

    def cudaGetDeviceProperties(self, device):
        major, minor = self.compute_capability
        return (OK, types.SimpleNamespace(name=self.name, major=major, minor=minor, multiProcessorCount=142))

    def cudaGetErrorString(self, err):
        return (OK, f"fake {cudaError_t(err).name}".encode())

    def cudaGetLastError(self):
        err, self.last_error = self.last_error, 0
        self.events.append(("cudaGetLastError", err))
        return (cudaError_t(err),)

    # -- memory
    def _alloc(self, nbytes, kind):
        buffer = ctypes.create_string_buffer(max(int(nbytes), 1))
        address = ctypes.addressof(buffer)
        self.memory[address] = buffer
        self.events.append((kind, address))
        return (OK, address)

    def cudaMalloc(self, nbytes):
        return self._alloc(nbytes, "cudaMalloc")

    def cudaMallocHost(self, nbytes):
        return self._alloc(nbytes, "cudaMallocHost")

    def cudaFree(self, ptr):
        self.memory.pop(ptr)
        self.events.append(("cudaFree", ptr))
        return (OK,)

    def cudaFreeHost(self, ptr):
        self.memory.pop(ptr)
        self.events.append(("cudaFreeHost", ptr))
        return (OK,)

    # -- streams, events
    def cudaStreamCreateWithFlags(self, flags):
        self._next += 0x10
        self.streams.add(self._next)
        self.events.append(("cudaStreamCreate", self._next))
        return (OK, self._next)

    def cudaStreamDestroy(self, stream):
        self.streams.remove(stream)
        self.events.append(("cudaStreamDestroy", stream))
        return (OK,)

    def cudaStreamSynchronize(self, stream):
        if stream in self.capturing:
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        return (OK,)

    def cudaEventCreateWithFlags(self, flags):
        return (OK, 7)

    def cudaEventRecord(self, event, stream):
        self.events.append(("cudaEventRecord", stream))
        return (OK,)

    def cudaStreamWaitEvent(self, stream, event, flags):
        self.events.append(("cudaStreamWaitEvent", stream))
        return (OK,)

    def cudaEventDestroy(self, event):
        return (OK,)

    def enqueue(self, stream, work):
        """Run ``work`` now, or record it when ``stream`` is capturing."""
        if stream in self.capturing:
            self.capturing[stream].append(work)
        else:
            work()

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, nbytes))
        return (OK,)

    # -- graphs
    def cudaStreamBeginCapture(self, stream, mode):
        self.capture_modes.append(mode)
        self.events.append(("cudaStreamBeginCapture", stream))
        self.capturing[stream] = []
        return (OK,)

    def invalidate_capture(self, stream):
        self.capturing[stream] = None

    def cudaStreamEndCapture(self, stream):
        ops = self.capturing.pop(stream)
        if ops is None:
            self.last_error = cudaError_t.cudaErrorStreamCaptureInvalidated
            return (cudaError_t.cudaErrorStreamCaptureInvalidated, None)
        self._next += 0x10
        graph = _Handle(self._next)
        self.graphs[graph] = ops
        return (OK, graph)

    def cudaStreamIsCapturing(self, stream):
        return (OK, 1 if stream in self.capturing else 0)

    def cudaGraphInstantiate(self, graph, flags):
        self._next += 0x10
        handle = _Handle(self._next)
        self.execs[handle] = self.graphs[graph]
        return (OK, handle)

    def cudaGraphLaunch(self, handle, stream):
        self.events.append(("cudaGraphLaunch", int(handle)))
        for work in self.execs[handle]:
            work()
        return (OK,)

    def cudaGraphExecDestroy(self, handle):
        self.execs.pop(handle)
        self.events.append(("cudaGraphExecDestroy", int(handle)))
        return (OK,)

    def cudaGraphDestroy(self, graph):
        self.graphs.pop(graph)
        self.events.append(("cudaGraphDestroy", int(graph)))
        return (OK,)

    def pinned_and_device_live(self) -> int:
        return len(self.memory)


def _array_at(address: int, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    return np.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=dtype).reshape(shape)


WEIGHTS = np.random.default_rng(0).standard_normal((K, C * H * W)).astype(np.float32)


def fake_trt(rt: FakeCuda, *, version="10.13.0.35", input_dtype=np.float32, profile=(1, 2, 8), static_batch=None,
             inputs=("x",), input_shape=None, fail_execute=False, fail_capture=False, deserialise_ok=True,
             validity="VALID", diagnostics=0):
    """A TensorRT module (full or RTX: the backend tells them apart by flavour name) around one fake engine."""
    log = []  # (event, gc enabled)
    m = types.SimpleNamespace(__version__=version, log=log, contexts=[], runtimes=0, configs=[])

    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self):
            pass

    ILogger.Severity = Severity
    m.ILogger = ILogger
    m.TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
    m.TensorLocation = enum.Enum("TensorLocation", "DEVICE HOST")
    m.DataType = enum.Enum("DataType", "FLOAT HALF BF16")
    m.CudaGraphStrategy = enum.Enum("CudaGraphStrategy", "DISABLED WHOLE_GRAPH_CAPTURE")
    m.EngineValidity = enum.Enum("EngineValidity", "VALID SUBOPTIMAL INVALID")
    # TensorRT-RTX 1.7's targets (its ComputeCapability enum): no 8.7 (Orin), 9.0 (Hopper) or 10.0.
    m.ComputeCapability = enum.Enum("ComputeCapability", "NONE CURRENT SM75 SM80 SM86 SM89 SM120 SM121")
    m.runtime_caches = []
    m.EngineInvalidityDiagnostics = enum.IntEnum(
        "EngineInvalidityDiagnostics",
        {"VERSION_MISMATCH": 1, "UNSUPPORTED_CC": 2, "OLD_CUDA_DRIVER": 4, "MALFORMED_ENGINE": 32})

    def nptype(dtype):
        table = {m.DataType.FLOAT: np.float32, m.DataType.HALF: np.float16}
        if dtype not in table:
            raise TypeError(f"no numpy type for {dtype}")
        return table[dtype]

    m.nptype = nptype
    in_dtype = m.DataType.HALF if np.dtype(input_dtype) == np.float16 else m.DataType.FLOAT
    batch = -1 if static_batch is None else static_batch
    in_shape = (batch, C, H, W) if input_shape is None else input_shape
    tensors = {name: (m.TensorIOMode.INPUT, in_dtype, in_shape) for name in inputs}
    tensors["y"] = (m.TensorIOMode.OUTPUT, m.DataType.FLOAT, (batch, K))
    tensors["features"] = (m.TensorIOMode.OUTPUT, m.DataType.FLOAT, (batch, 2, 3))

    def tracked(kind):
        class Tracked:
            def __del__(self):
                log.append((f"del {kind}", gc.isenabled()))
        return Tracked

    class Context(tracked("context")):
        def __init__(self, config):
            self.config = config
            self.shape = None if static_batch is None else in_shape
            self.addresses = {}
            self.calls = {"set_input_shape": 0, "execute": 0}
            m.contexts.append(self)

        def set_input_shape(self, name, shape):
            log.append(("set_input_shape", gc.isenabled()))
            self.calls["set_input_shape"] += 1
            low, high = profile[0], profile[2]
            if name not in inputs or not low <= shape[0] <= high:
                return False
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            mode, _, declared = tensors[name]
            if self.shape is None:
                return declared
            return (self.shape[0], *declared[1:])

        def set_tensor_address(self, name, address):
            self.addresses[name] = address
            return name in tensors

        def execute_async_v3(self, stream):
            log.append(("execute", gc.isenabled()))
            self.calls["execute"] += 1
            capturing = stream in rt.capturing
            if fail_execute or (fail_capture and capturing):
                if capturing:
                    rt.invalidate_capture(stream)
                m.logger.log(Severity.ERROR, "fake enqueue failure")
                return False
            n = self.shape[0]
            x_addr, y_addr, f_addr = self.addresses[inputs[0]], self.addresses["y"], self.addresses["features"]
            shape = self.shape

            def work():
                x = _array_at(x_addr, shape, input_dtype).astype(np.float32).reshape(n, -1)
                _array_at(y_addr, (n, K), np.float32)[:] = x @ WEIGHTS.T
                _array_at(f_addr, (n, 2, 3), np.float32)[:] = x[:, :6].reshape(n, 2, 3)

            rt.enqueue(stream, work)
            cache = getattr(self.config, "runtime_cache", None)
            if cache is not None:  # RTX compiles kernels for a shape on its first run (the JIT)
                cache.kernels.add(f"kernel-{n}".encode())
            return True

    class RuntimeCache(tracked("runtime cache")):
        """IRuntimeCache: "compiled kernels" that serialise as b"RTXCACHE" + names; anything else is refused."""

        def __init__(self):
            self.kernels = set()
            self.deserialised = []
            m.runtime_caches.append(self)

        def deserialize(self, blob):
            blob = bytes(blob)
            log.append(("runtime cache deserialize", gc.isenabled()))
            self.deserialised.append(blob)
            if not blob.startswith(b"RTXCACHE"):
                return False
            self.kernels |= {k for k in blob[len(b"RTXCACHE"):].split(b";") if k}
            return True

        def serialize(self):
            log.append(("runtime cache serialize", gc.isenabled()))
            return b"RTXCACHE" + b";".join(sorted(self.kernels))

    class RuntimeConfig(tracked("runtime config")):
        cuda_graph_strategy = None
        runtime_cache = None

        def create_runtime_cache(self):
            return RuntimeCache()

        def set_runtime_cache(self, cache):
            log.append(("set_runtime_cache", gc.isenabled()))
            self.runtime_cache = cache
            return True

    class Engine(tracked("engine")):
        num_io_tensors = len(tensors)

        def get_tensor_name(self, i):
            return list(tensors)[i]

        def get_tensor_mode(self, name):
            return tensors[name][0]

        def get_tensor_dtype(self, name):
            return tensors[name][1]

        def get_tensor_shape(self, name):
            return tensors[name][2]

        def get_tensor_location(self, name):
            return m.TensorLocation.DEVICE

        def get_tensor_profile_shape(self, name, index):
            return [(p, *in_shape[1:]) for p in profile]

        def create_runtime_config(self):
            config = RuntimeConfig()
            m.configs.append(config)
            return config

        def create_execution_context(self, config=None):
            log.append(("create_execution_context", gc.isenabled()))
            return Context(config)

    class Runtime(tracked("runtime")):
        def __init__(self, logger):
            m.runtimes += 1
            m.logger = logger
            log.append(("Runtime", gc.isenabled()))

        def get_engine_validity(self, plan):
            return (m.EngineValidity[validity], diagnostics)

        def deserialize_cuda_engine(self, plan):
            log.append(("deserialize", gc.isenabled()))
            if not deserialise_ok or not bytes(plan).startswith(b"FAKE"):
                m.logger.log(Severity.ERROR, "fake: the plan is not an engine")
                return None
            return Engine()

    m.Runtime = Runtime
    return m


@pytest.fixture
def fake_cuda(monkeypatch):
    rt = FakeCuda()
    monkeypatch.setattr(cuda, "_RT", rt)
    return rt


def _install(monkeypatch, rt, flavour="tensorrt", **kwargs):
    if flavour == "tensorrt_rtx":
        kwargs.setdefault("version", "1.7.1.116")
    module = fake_trt(rt, **kwargs)
    monkeypatch.setitem(sys.modules, flavour, module)
    return module


def _backend(flavour="tensorrt", max_batch=8, **kwargs):
    kwargs.setdefault("flavour_version", sys.modules[flavour].__version__)
    return TensorRTBackend(b"FAKE plan", flavour=flavour, precision="fp32", max_batch=max_batch, **kwargs)


def _fill(backend, n, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, C, H, W)).astype(backend.input.dtype)
    backend.input_buffer(n).copy_from_host(x, backend.stream)
    return x


def _reference(x):
    return x.astype(np.float32).reshape(len(x), -1) @ WEIGHTS.T


# =========================================================================== medge._tensorrt


def test_gc_paused_nests_and_restores_on_errors():
    assert gc.isenabled()
    with _tensorrt.gc_paused():
        assert not gc.isenabled()
        with _tensorrt.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled(), "the inner block re-enabled the GC inside the outer one"
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        with _tensorrt.gc_paused():
            1 / 0
    assert gc.isenabled()
    gc.disable()
    try:
        with _tensorrt.gc_paused():
            pass
        assert not gc.isenabled(), "a GC the caller had disabled was enabled"
    finally:
        gc.enable()


def test_gc_paused_across_threads():
    """Thread A leaving must not re-enable the GC while thread B is still inside a TensorRT call."""
    import threading

    inside, leave, seen = threading.Event(), threading.Event(), []

    def other():
        with _tensorrt.gc_paused():
            inside.set()
            leave.wait(10)
            seen.append(gc.isenabled())

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(10)
    with _tensorrt.gc_paused():
        pass
    seen.append(gc.isenabled())
    leave.set()
    thread.join()
    assert seen == [False, False] and gc.isenabled()


def test_engine_module_uses_the_shared_helpers():
    from medge.convert import engine

    assert engine._import_flavour is _tensorrt.import_flavour
    assert engine._make_logger is _tensorrt.make_logger
    assert engine.FLAVOURS == _tensorrt.FLAVOURS


@pytest.mark.parametrize("flavour, extra", [("tensorrt_rtx", "rtx"), ("tensorrt", "tensorrt")])
def test_import_flavour_names_the_extra_and_the_purpose(monkeypatch, flavour, extra):
    monkeypatch.setitem(sys.modules, flavour, None)
    with pytest.raises(MissingDependency) as caught:
        _tensorrt.import_flavour(flavour, "Running a {label} engine")
    assert caught.value.extra == extra
    assert str(caught.value).startswith(f"Running a {_tensorrt.LABELS[flavour]} engine needs")


def test_old_full_tensorrt_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(BackendUnavailable, match="8.6.1 is too old"):
        _tensorrt.import_flavour("tensorrt")


def test_logger_records_and_caps(monkeypatch, caplog):
    trt = fake_trt(FakeCuda())
    logger = _tensorrt.make_logger(trt, warning_level=logging.WARNING)
    with caplog.at_level(logging.DEBUG, logger="medge._tensorrt"):
        for i in range(250):
            logger.log(trt.ILogger.Severity.ERROR, f"error {i}")
        logger.log(trt.ILogger.Severity.WARNING, "careful")
        logger.log(trt.ILogger.Severity.VERBOSE, "Layers:\nName: conv")
    assert len(logger.errors) == 200 and logger.errors[-1] == "error 249"
    assert logger.warnings == ["careful"] and logger.layer_tables == ["Layers:\nName: conv"]
    assert any(r.levelno == logging.WARNING and "careful" in r.getMessage() for r in caplog.records)
    logger.clear()
    assert logger.errors == [] and logger.warnings == []
    assert _tensorrt.summarise(["a", " ", "b"] + ["c"] * 12) == "a; b; c; c; c; c; c; c; c; c; ... and 4 more"


# =========================================================================== without any GPU, for real


@no_gpu_here
def test_gpu_identity_without_a_gpu():
    with pytest.raises(BackendUnavailable) as caught:
        gpu_identity()
    text = str(caught.value)
    assert "cuda-python" in text or "GPU" in text, text


def test_gpu_identity_reads_the_properties(fake_cuda):
    assert gpu_identity(0) == {"name": "Fake RTX 6000", "compute_capability": "8.9", "sm_count": 142}
    with pytest.raises(BackendUnavailable, match="CUDA device 3 does not exist: 1 visible"):
        gpu_identity(3)
    fake_cuda.devices = 0
    with pytest.raises(BackendUnavailable, match="none is visible"):
        gpu_identity()
    fake_cuda.devices = -1  # the driver is missing
    with pytest.raises(BackendUnavailable, match="cudaErrorInsufficientDriver.*No usable CUDA GPU"):
        gpu_identity()


def test_importing_the_run_side_needs_no_optional_package():
    code = (
        "import sys\n"
        "for name in ('tensorrt', 'tensorrt_rtx', 'cuda', 'cuda.bindings', 'onnx', 'onnxruntime', 'torch'):\n"
        "    sys.modules[name] = None\n"
        "import medge._tensorrt, medge.runtime.engine_cache, medge.runtime.backends.tensorrt as t\n"
        "from medge.errors import MissingDependency\n"
        "try:\n"
        "    t.TensorRTBackend(b'plan', flavour='tensorrt_rtx', precision='fp16', max_batch=4)\n"
        "except MissingDependency as exc:\n"
        "    print('refused:', exc.extra)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refused: rtx"


def _tiny_onnx(path: Path, *, batch_dim="N") -> Path:
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "w"], ["y"], transB=1, name="fc")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, C, H, W])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, K])],
        [numpy_helper.from_array(WEIGHTS, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="medge-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def rtx_plan(tmp_path_factory):
    if onnx is None or not HAS_RTX:
        pytest.skip("needs onnx and tensorrt_rtx")
    from medge.convert.engine import build_engine

    root = tmp_path_factory.mktemp("rtx")
    info = build_engine(_tiny_onnx(root / "tiny.onnx"), root / "tiny.engine", flavour="tensorrt_rtx",
                        precision="fp32", batch=(1, 2, 4), progress=lambda stage: None)
    return Path(info.file).read_bytes(), info


@needs_rtx
@no_gpu_here
def test_real_rtx_engine_without_a_gpu_is_backend_unavailable(rtx_plan):
    plan, info = rtx_plan
    assert gc.isenabled()
    with pytest.raises(BackendUnavailable) as caught:
        TensorRTBackend(plan, flavour="tensorrt_rtx", flavour_version=info.flavour_version, precision="fp32",
                        max_batch=4)
    text = str(caught.value)
    assert "cuda-python" in text or "GPU" in text, text
    assert gc.isenabled()


@needs_rtx
def test_real_rtx_version_mismatch_is_refused_before_deserialising(rtx_plan, monkeypatch):
    import tensorrt_rtx

    plan, info = rtx_plan

    def forbidden(*args, **kwargs):
        raise AssertionError("a Runtime was created for an engine of another version")

    monkeypatch.setattr(tensorrt_rtx, "Runtime", forbidden)
    with pytest.raises(BackendUnavailable) as caught:
        TensorRTBackend(plan, flavour="tensorrt_rtx", flavour_version="1.0.0.1", precision="fp32", max_batch=4)
    text = str(caught.value)
    assert "built with TensorRT-RTX 1.0.0.1" in text and f"TensorRT-RTX {tensorrt_rtx.__version__} is installed" in text
    assert "Rebuild the engine" in text


@needs_rtx
@no_gpu_here
def test_real_rtx_deserialise_failure_leaves_nothing_behind(rtx_plan, fake_cuda):
    """cuda-python says there is a GPU (the stand-in), TensorRT-RTX's own CUDA finds no driver: a clear refusal."""
    plan, info = rtx_plan
    created = []

    class Probe(TensorRTBackend):
        def __init__(self, *args, **kwargs):
            created.append(self)
            super().__init__(*args, **kwargs)

    with pytest.raises(BackendUnavailable) as caught:
        Probe(plan, flavour="tensorrt_rtx", flavour_version=info.flavour_version, precision="fp32", max_batch=4)
    text = str(caught.value)
    assert "could not deserialise the engine on Fake RTX 6000" in text and "cudaError 35" in text, text
    assert "No usable CUDA GPU" in text
    for probe in created:
        assert probe.closed and probe._engine is None and probe._trt_runtime is None and probe.stream is None
    assert fake_cuda.memory == {} and fake_cuda.streams == set()
    assert gc.isenabled()


# =========================================================================== the logic, on stand-ins


def test_execute_matches_the_reference_at_every_batch_size(fake_cuda, monkeypatch):
    trt = _install(monkeypatch, fake_cuda)
    with _backend(use_cuda_graphs=False) as backend:
        assert backend.input.name == "x" and backend.input.shape == (C, H, W) and backend.input.dtype == np.float32
        assert [o.name for o in backend.outputs] == ["y", "features"]
        assert backend.outputs[0].shape == (K,) and backend.outputs[1].shape == (2, 3)
        assert backend.device == "cuda:0" and backend.name == "tensorrt" and backend.max_batch == 8
        for n in (1, 3, 8, 3):
            x = _fill(backend, n, seed=n)
            y = backend.execute(n)
            assert y.dtype == np.float32 and y.shape == (n, K)
            np.testing.assert_allclose(y, _reference(x), rtol=1e-6, atol=1e-6)
        context = trt.contexts[0]
        # 8 at load (output shapes), then 1, 3, 8, 3: the shape is set only when it changes
        assert context.calls["set_input_shape"] == 5
        everything = backend.execute_all(2)
        assert set(everything) == {"y", "features"} and everything["features"].shape == (2, 2, 3)


def test_fp16_input_buffer(fake_cuda, monkeypatch):
    _install(monkeypatch, fake_cuda, input_dtype=np.float16)
    with _backend(use_cuda_graphs=False) as backend:
        view = backend.input_buffer(4)
        assert isinstance(view, cuda.DeviceArray)
        assert view.dtype == np.float16 and view.shape == (4, C, H, W)
        assert view.__cuda_array_interface__["typestr"] == "<f2"
        x = _fill(backend, 4)
        np.testing.assert_allclose(backend.execute(4), _reference(x), rtol=1e-5, atol=1e-5)


def test_input_buffer_is_a_view_of_one_allocation(fake_cuda, monkeypatch):
    _install(monkeypatch, fake_cuda)
    with _backend() as backend:
        mallocs = sum(1 for e in fake_cuda.events if e[0] == "cudaMalloc")
        views = [backend.input_buffer(n) for n in (1, 5, 8)]
        assert len({v.ptr for v in views}) == 1 and views[0].buffer is views[2].buffer
        assert [v.shape[0] for v in views] == [1, 5, 8]
        assert sum(1 for e in fake_cuda.events if e[0] == "cudaMalloc") == mallocs, "input_buffer allocated"
        for bad in (0, 9, -1):
            with pytest.raises(MedgeError, match="outside 1..8"):
                backend.input_buffer(bad)
            with pytest.raises(MedgeError, match="outside 1..8"):
                backend.execute(bad)


def test_input_written_on_another_stream_is_ordered_before_the_engine(fake_cuda, monkeypatch):
    _install(monkeypatch, fake_cuda)
    with _backend(use_cuda_graphs=False) as backend:
        other = cuda.Stream()
        view = backend.input_buffer(2)
        view.copy_from_host(np.zeros((2, C, H, W), np.float32), other)
        before = len(fake_cuda.events)
        backend.execute(2)
        assert ("cudaStreamWaitEvent", backend.stream.handle) in fake_cuda.events[before:]
        assert ("cudaEventRecord", other.handle) in fake_cuda.events[before:]
        other.close()


def test_cuda_graphs_capture_once_per_batch_size_and_replay(fake_cuda, monkeypatch):
    trt = _install(monkeypatch, fake_cuda)
    with _backend() as graphs, _backend(use_cuda_graphs=False) as plain:
        assert graphs.cuda_graphs == "replayed per batch size" and plain.cuda_graphs == "off"
        context = trt.contexts[0]
        # at load, per size 1..8: one plain warm-up run and one captured call
        assert sorted(graphs._graphs) == list(range(1, 9)) and context.calls["execute"] == 16
        assert fake_cuda.capture_modes == [1] * 8  # cudaStreamCaptureModeThreadLocal, as NVIDIA's own samples
        for n in (2, 2, 5, 2, 5):
            x = _fill(graphs, n, seed=n)
            _fill(plain, n, seed=n)
            assert np.array_equal(graphs.execute(n), plain.execute(n))
            np.testing.assert_allclose(graphs.execute(n), _reference(x), rtol=1e-6, atol=1e-6)
        assert context.calls["execute"] == 16  # every call was a replay
        launches = [e for e in fake_cuda.events if e[0] == "cudaGraphLaunch"]
        assert len(launches) == 10
        graphs.use_cuda_graphs = False
        assert graphs._graphs == {} and len(fake_cuda.execs) == 0 and graphs.cuda_graphs == "off"
        x = _fill(graphs, 3)
        np.testing.assert_allclose(graphs.execute(3), _reference(x), rtol=1e-6, atol=1e-6)
        assert context.calls["execute"] == 17
        graphs.use_cuda_graphs = True
        assert sorted(graphs._graphs) == list(range(1, 9))
        x = _fill(graphs, 3)
        np.testing.assert_allclose(graphs.execute(3), _reference(x), rtol=1e-6, atol=1e-6)


def test_a_failed_capture_falls_back_to_plain_enqueue_and_says_so_once(fake_cuda, monkeypatch, caplog):
    trt = _install(monkeypatch, fake_cuda, fail_capture=True)
    with caplog.at_level(logging.WARNING, logger="medge.runtime.backends.tensorrt"):
        with _backend() as backend:
            for n in (2, 3, 2):
                x = _fill(backend, n, seed=n)
                np.testing.assert_allclose(backend.execute(n), _reference(x), rtol=1e-6, atol=1e-6)
            assert backend.cuda_graphs.startswith("off: capture failed")
            assert "fake enqueue failure" in backend.cuda_graphs
            assert "graphs" in backend.describe() and "capture failed" in backend.describe()
    warnings = [r for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert len(warnings) == 1
    assert fake_cuda.capturing == {} and fake_cuda.graphs == {} and fake_cuda.execs == {}
    assert ("cudaGetLastError", cudaError_t.cudaErrorStreamCaptureInvalidated) in fake_cuda.events
    # at load: a warm-up and a failed capture for the first size (no further sizes tried), then plain runs only
    assert trt.contexts[0].calls["execute"] == 2 + 3


def test_rtx_uses_its_built_in_graphs(fake_cuda, monkeypatch):
    trt = _install(monkeypatch, fake_cuda, flavour="tensorrt_rtx")
    with _backend("tensorrt_rtx") as backend:
        assert trt.configs[0].cuda_graph_strategy == trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        assert trt.contexts[0].config is trt.configs[0]
        x = _fill(backend, 3)
        np.testing.assert_allclose(backend.execute(3), _reference(x), rtol=1e-6, atol=1e-6)
        assert fake_cuda.capture_modes == [] and backend.cuda_graphs == "TensorRT-RTX built-in"
        backend.use_cuda_graphs = False
        assert len(trt.contexts) == 2 and trt.contexts[1].config.cuda_graph_strategy == trt.CudaGraphStrategy.DISABLED
        x = _fill(backend, 2)
        np.testing.assert_allclose(backend.execute(2), _reference(x), rtol=1e-6, atol=1e-6)
        assert "TensorRT-RTX 1.7.1.116" in backend.describe()


def test_execute_failure_is_a_cuda_error_with_tensorrts_words(fake_cuda, monkeypatch):
    _install(monkeypatch, fake_cuda, fail_execute=True)
    with _backend(use_cuda_graphs=False) as backend:
        _fill(backend, 2)
        with pytest.raises(CudaError, match="could not run a batch of 2: fake enqueue failure"):
            backend.execute(2)


def test_batches_below_the_profile_min_run_padded(fake_cuda, monkeypatch):
    trt = _install(monkeypatch, fake_cuda, profile=(4, 4, 8))
    with _backend(use_cuda_graphs=False) as backend:
        x = _fill(backend, 1)
        y = backend.execute(1)
        assert y.shape == (1, K)
        np.testing.assert_allclose(y, _reference(x), rtol=1e-6, atol=1e-6)
        assert trt.contexts[0].shape[0] == 4


def test_static_batch_engine(fake_cuda, monkeypatch):
    trt = _install(monkeypatch, fake_cuda, static_batch=4)
    with _backend(max_batch=4, use_cuda_graphs=False) as backend:
        x = _fill(backend, 3)
        np.testing.assert_allclose(backend.execute(3), _reference(x), rtol=1e-6, atol=1e-6)
        assert trt.contexts[0].calls["set_input_shape"] == 0
    with pytest.raises(MedgeError, match="max_batch 8 is larger than this engine allows \\(static batch 4\\)"):
        _backend(max_batch=8)


def test_tensorrt_calls_run_with_the_gc_paused_and_release_in_reverse_order(fake_cuda, monkeypatch):
    trt = _install(monkeypatch, fake_cuda)
    backend = _backend()
    _fill(backend, 2)
    backend.execute(2)
    backend.execute(2)
    events_before_close = len(fake_cuda.events)
    trt.contexts.clear()  # the stand-in's own references: the backend's must be the last ones
    backend.close()
    assert all(not enabled for _, enabled in trt.log), trt.log
    assert gc.isenabled()
    deleted = [what for what, _ in trt.log if what.startswith("del ")]
    assert deleted == ["del context", "del engine", "del runtime"]
    order = [e[0] for e in fake_cuda.events[events_before_close:]]
    assert order.index("cudaGraphExecDestroy") < order.index("cudaFree")
    assert order.index("cudaFreeHost") < order.index("cudaStreamDestroy")
    assert order[-1] == "cudaStreamDestroy"
    assert fake_cuda.memory == {} and fake_cuda.streams == set() and fake_cuda.execs == {}
    backend.close()  # idempotent
    with pytest.raises(MedgeError, match="closed"):
        backend.execute(1)
    with pytest.raises(MedgeError, match="closed"):
        backend.input_buffer(1)
    assert "closed" in repr(backend)


def test_describe_names_the_gpu_and_the_graph_state(fake_cuda, monkeypatch):
    _install(monkeypatch, fake_cuda)
    with _backend() as backend:
        text = backend.describe()
    assert text.startswith("TensorRT 10.13.0.35 on cuda:0 (Fake RTX 6000, compute capability 8.9, 142 SMs)")
    assert "fp32, batch up to 8, CUDA graphs replayed per batch size" in text


def test_version_mismatch_is_refused_before_a_runtime_exists(fake_cuda, monkeypatch):
    trt = _install(monkeypatch, fake_cuda)
    with pytest.raises(BackendUnavailable, match="built with TensorRT 10.12.0.36, but TensorRT 10.13.0.35"):
        _backend(flavour_version="10.12.0.36")
    assert trt.runtimes == 0 and fake_cuda.memory == {}


def test_no_gpu_is_refused_before_a_runtime_exists(fake_cuda, monkeypatch):
    trt = _install(monkeypatch, fake_cuda)
    fake_cuda.devices = 0
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU, and none is visible"):
        _backend()
    fake_cuda.devices = 1
    with pytest.raises(BackendUnavailable, match="CUDA device 2 does not exist"):
        _backend(device=2)
    assert trt.runtimes == 0


def test_rtx_header_check_refuses_with_the_reasons(fake_cuda, monkeypatch):
    trt = _install(monkeypatch, fake_cuda, flavour="tensorrt_rtx", validity="INVALID", diagnostics=2 | 4 | 64)
    with pytest.raises(BackendUnavailable) as caught:
        _backend("tensorrt_rtx")
    text = str(caught.value)
    assert "not built for this GPU's compute capability" in text and "driver is too old" in text
    assert "diagnostic flags 0x40" in text and "Fake RTX 6000" in text
    assert not any(what == "deserialize" for what, _ in trt.log)


def test_rtx_invalid_without_a_reason_lets_tensorrt_decide(fake_cuda, monkeypatch):
    trt = _install(monkeypatch, fake_cuda, flavour="tensorrt_rtx", validity="INVALID", diagnostics=0)
    _backend("tensorrt_rtx").close()
    assert any(what == "deserialize" for what, _ in trt.log)


def test_rtx_suboptimal_engine_loads_with_a_warning(fake_cuda, monkeypatch, caplog):
    _install(monkeypatch, fake_cuda, flavour="tensorrt_rtx", validity="SUBOPTIMAL", diagnostics=0)
    with caplog.at_level(logging.WARNING, logger="medge.runtime.backends.tensorrt"):
        _backend("tensorrt_rtx").close()
    assert "suboptimal" in caplog.text


@pytest.mark.parametrize("options, error, match", [
    ({"deserialise_ok": False}, BackendUnavailable, "could not deserialise the engine on Fake RTX 6000 \\(compute "
                                                    "capability 8.9\\): fake: the plan is not an engine"),
    ({"inputs": ("x", "mask")}, BackendUnavailable, "exactly one image input; this one has 2: x, mask"),
    ({"input_shape": (-1, C, -1, -1)}, BackendUnavailable, "fixed other dimensions"),
    ({"profile": (1, 2, 4)}, MedgeError, "max_batch 8 is larger than this engine allows \\(optimization profile up "
                                         "to 4\\)"),
])
def test_load_failures_release_everything(fake_cuda, monkeypatch, options, error, match):
    trt = _install(monkeypatch, fake_cuda, **options)
    with pytest.raises(error, match=match):
        _backend()
    assert fake_cuda.memory == {} and fake_cuda.streams == set()
    gc.collect()
    assert all(not enabled for what, enabled in trt.log if what.startswith("del ")), trt.log
    assert gc.isenabled()


@pytest.mark.parametrize("kwargs, match", [
    ({"flavour": "onnxruntime"}, "unknown engine flavour"),
    ({"max_batch": 0}, "max_batch must be a positive integer"),
    ({"max_batch": True}, "max_batch must be a positive integer"),
    ({"device": -1}, "device must be a CUDA device ordinal"),
    ({"engine": b""}, "the engine plan is empty"),
    ({"engine": "plan.engine"}, "must be the plan's bytes"),
])
def test_bad_arguments(kwargs, match):
    args = {"engine": b"FAKE", "flavour": "tensorrt_rtx", "precision": "fp16", "max_batch": 4, **kwargs}
    engine = args.pop("engine")
    with pytest.raises(MedgeError, match=match):
        TensorRTBackend(engine, **args)


# =========================================================================== on a GPU


def _gpu_flavour():
    return "tensorrt" if HAS_TRT else "tensorrt_rtx"


@pytest.fixture(scope="module")
def gpu_engine(tmp_path_factory):
    """A real fp32 engine of the tiny model for this GPU, and the ONNX it came from."""
    if GPU_COUNT == 0 or not (HAS_RTX or HAS_TRT) or onnx is None:
        pytest.skip("needs a CUDA GPU, onnx and tensorrt or tensorrt_rtx")
    from medge.convert.engine import build_engine

    flavour = _gpu_flavour()
    if flavour == "tensorrt_rtx":
        import tensorrt_rtx

        from medge.runtime.backends.tensorrt import rtx_unsupported_reason

        # e.g. an H100 (9.0) with only TensorRT-RTX installed: nothing RTX builds can run there
        reason = rtx_unsupported_reason(tensorrt_rtx, gpu_identity(0))
        if reason is not None:
            skip_not_for_this_gpu(reason)
    root = tmp_path_factory.mktemp("gpu")
    model = _tiny_onnx(root / "tiny.onnx")
    extra = {"compute_capabilities": ["current"]} if flavour == "tensorrt_rtx" else {}
    info = build_engine(model, root / "tiny.engine", flavour=flavour, precision="fp32", batch=(1, 4, 8),
                        progress=lambda stage: None, **extra)
    return Path(info.file).read_bytes(), info, model


def _gpu_backend(gpu_engine, **kwargs):
    plan, info, _ = gpu_engine
    try:
        return TensorRTBackend(plan, flavour=info.flavour, flavour_version=info.flavour_version, precision="fp32",
                               max_batch=8, **kwargs)
    except BackendUnavailable as exc:
        if "compute capability" in str(exc):
            pytest.skip(f"{info.flavour} does not run on this GPU: {exc}")
        raise


@gpu
def test_gpu_execute_matches_onnxruntime(gpu_engine):
    ort = pytest.importorskip("onnxruntime")
    _, _, model = gpu_engine
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with _gpu_backend(gpu_engine) as backend:
        for n in (1, 3, 8):
            x = np.random.default_rng(n).standard_normal((n, C, H, W)).astype(np.float32)
            backend.input_buffer(n).copy_from_host(x, backend.stream)
            expected = session.run(None, {"x": x})[0]
            np.testing.assert_allclose(backend.execute(n), expected, rtol=1e-4, atol=1e-4)


@gpu
def test_gpu_graph_replay_equals_plain_enqueue(gpu_engine):
    with _gpu_backend(gpu_engine, use_cuda_graphs=True) as graphs, \
            _gpu_backend(gpu_engine, use_cuda_graphs=False) as plain:
        for n in (2, 2, 7, 2):
            x = np.random.default_rng(n).standard_normal((n, C, H, W)).astype(np.float32)
            graphs.input_buffer(n).copy_from_host(x, graphs.stream)
            plain.input_buffer(n).copy_from_host(x, plain.stream)
            assert np.array_equal(graphs.execute(n), plain.execute(n))
        assert "failed" not in graphs.cuda_graphs, graphs.cuda_graphs


@gpu
def test_gpu_preprocess_writes_straight_into_the_engine_input(gpu_engine):
    from medge import _C
    from medge.preprocess import PreprocessSpec, preprocess

    if not _C.cuda_compiled():
        pytest.skip("this medge build has no CUDA kernels (nvcc was missing when it was built)")
    spec = PreprocessSpec(height=H, width=W, channels=C, voi="range", value_range=(0.0, 4095.0),
                          mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 4096, (37, 29), dtype=np.uint16) for _ in range(3)]
    expected_input = preprocess(images, spec, device="cpu")
    with _gpu_backend(gpu_engine) as backend:
        view = backend.input_buffer(3)
        preprocess(images, spec, device=backend.device, out=view, stream=backend.stream)
        y = backend.execute(3)
        np.testing.assert_allclose(view.to_host(backend.stream), expected_input, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, _reference(expected_input), rtol=1e-4, atol=1e-4)

