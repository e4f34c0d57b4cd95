"""Tests of medge.runtime.cuda: stream normalisation, zero-copy views, DLPack through cuda.core, device memory.

DLPack import goes through cuda.core's StridedMemoryView, which needs no
driver for it: test producers hand out numpy's own capsules, rewritten (with a
small ctypes view, test-only) to claim CUDA memory at a fake address that
nothing dereferences. DLPack export needs the driver (cuda.core reads the
pointer's CUDA attributes), so on the CPU only medge's decisions around it are
checked, against a stand-in; the export itself is checked on a GPU. Tests that
need a GPU carry the ``gpu`` marker and skip with a reason when none is visible.
"""

from __future__ import annotations

import ctypes
import gc
import subprocess
import sys
import textwrap
import types
import weakref

import numpy as np
import pytest

from medge.errors import CudaError, MissingDependency, PreprocessError
from medge.runtime import cuda
from medge.runtime.cuda import (
    DeviceArray,
    DeviceBuffer,
    DeviceView,
    DLDeviceType,
    as_device_view,
    stream_handle,
)

FAKE_PTR = 0x7F00_0000_1000  # a "device address" nothing ever dereferences


def _gpu_count() -> int:
    try:
        return cuda.device_count()
    except Exception:
        return 0


def _has_cuda_python() -> bool:
    try:
        cuda._runtime()
    except MissingDependency:
        return False
    return True


def _has_cuda_core() -> bool:
    try:
        cuda._core()
    except MissingDependency:
        return False
    return True


HAS_CUDA_PYTHON = _has_cuda_python()
HAS_CUDA_CORE = _has_cuda_core()
GPU_COUNT = _gpu_count()
NO_CUDA_CORE = 'cuda-core >= 1.2 is not installed (pip install "medge[cuda]")'
gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPU_COUNT == 0, reason="needs a CUDA GPU (none visible, no driver, or no cuda-python)"),
    pytest.mark.skipif(not HAS_CUDA_CORE, reason=NO_CUDA_CORE),
]
needs_cuda_python = pytest.mark.skipif(not HAS_CUDA_PYTHON, reason="cuda-python is not installed")
needs_cuda_core = pytest.mark.skipif(not HAS_CUDA_CORE, reason=NO_CUDA_CORE)


def _numpy_speaks_dlpack_1() -> bool:
    try:
        np.arange(1).__dlpack__(max_version=(1, 0))
    except TypeError:
        return False
    return True


NUMPY_DLPACK_1 = _numpy_speaks_dlpack_1()
needs_numpy_dlpack_1 = pytest.mark.skipif(
    not NUMPY_DLPACK_1, reason=f"numpy {np.__version__} predates DLPack 1.0 (max_version); needs numpy >= 2.1"
)


def _collect():
    for _ in range(3):
        gc.collect()


@pytest.fixture
def no_pointer_query(monkeypatch):
    """Fake pointers must not reach cudaPointerGetAttributes (on a GPU it would call them host memory)."""
    monkeypatch.setattr(cuda, "_pointer_attributes", lambda ptr: None)


@pytest.fixture
def stream_calls(monkeypatch):
    """Record the stream-ordering calls instead of making them."""
    calls = []
    monkeypatch.setattr(cuda, "_order_after", lambda consumer, producer: calls.append(("order", consumer, producer)))
    monkeypatch.setattr(cuda, "_synchronize", lambda handle: calls.append(("sync", handle)))
    return calls


# ---------------------------------------------------------------------------
# Test producers
# ---------------------------------------------------------------------------


class _DLTensor(ctypes.Structure):  # dlpack.h DLTensor, flattened; test-only
    _fields_ = [
        ("data", ctypes.c_void_p), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32), ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16),
        ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p), ("byte_offset", ctypes.c_uint64),
    ]


assert ctypes.sizeof(_DLTensor) == 48
_DL_TENSOR_OFFSET_VERSIONED = 32  # DLManagedTensorVersioned: version, manager_ctx, deleter, flags, dl_tensor
_PyCapsule_GetPointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


def cuda_capsule(array, max_version, device=(DLDeviceType.CUDA, 0), data=FAKE_PTR, byte_offset=0, dtype_code=None,
                 null_strides=False):
    """numpy's DLPack capsule of ``array``, rewritten to claim CUDA memory (nothing dereferences it).

    numpy's deleter only drops its reference to ``array``, so the rewrite is safe.
    """
    versioned = max_version is not None and max_version[0] >= 1
    capsule = array.__dlpack__(max_version=max_version) if versioned else array.__dlpack__()
    name = b"dltensor_versioned" if versioned else b"dltensor"
    offset = _DL_TENSOR_OFFSET_VERSIONED if versioned else 0
    tensor = _DLTensor.from_address(_PyCapsule_GetPointer(capsule, name) + offset)
    tensor.device_type, tensor.device_id = (int(v) for v in device)
    if data is not None:
        tensor.data = data
    tensor.byte_offset = byte_offset
    if dtype_code is not None:
        tensor.code = dtype_code
    if null_strides:  # legal for C-contiguous tensors (numpy allocates shape and strides with the struct)
        tensor.strides = None
    return capsule


class FakeCudaDLPack:
    """A CUDA DLPack producer at a fake address; records what it was asked for.

    Its capsules are numpy's, of ``self.array``: each unreleased one holds a
    reference to it, which :meth:`unreleased` counts.
    """

    def __init__(self, shape=(2, 3), dtype=np.float32, device=(DLDeviceType.CUDA, 0), readonly=False,
                 old_style=False, array=None, data=FAKE_PTR, byte_offset=0, dtype_code=None):
        self.array = np.zeros(shape, dtype) if array is None else array
        if readonly:
            self.array.flags.writeable = False
        self.device, self.data, self.byte_offset, self.dtype_code = device, data, byte_offset, dtype_code
        self.calls = []
        self._refs = None  # references to self.array before the first export
        if old_style:
            self.__dlpack__ = self._old_dlpack

    def unreleased(self) -> int:
        return 0 if self._refs is None else sys.getrefcount(self.array) - self._refs

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.calls.append(dict(stream=stream, max_version=max_version))
        self._count_from_here()
        return self._capsule(max_version)

    def _old_dlpack(self, stream=None):
        self.calls.append(dict(stream=stream))
        self._count_from_here()
        return self._capsule(None)

    def _count_from_here(self):
        if self._refs is None:
            self._refs = sys.getrefcount(self.array)

    def _capsule(self, max_version):
        return cuda_capsule(self.array, max_version, self.device, self.data, self.byte_offset, self.dtype_code)


class FakeCAI:
    """Exposes only __cuda_array_interface__, as torch / CuPy / numba do."""

    def __init__(self, shape=(4, 5), typestr="<f4", ptr=FAKE_PTR, readonly=False, strides=None,
                 stream=None, version=3, **extra):
        self.__cuda_array_interface__ = dict(
            shape=shape, typestr=typestr, data=(ptr, readonly), version=version, strides=strides, **extra
        )
        if version >= 3:
            self.__cuda_array_interface__["stream"] = stream


class Owner:
    """Any weak-referenceable object."""


def fake_device_array(shape=(2, 3), dtype=np.float32, *, readonly=False, device=0):
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buffer = DeviceBuffer.from_pointer(FAKE_PTR, nbytes, device=device)
    return DeviceArray(shape, dtype, buffer=buffer, readonly=readonly)


# ---------------------------------------------------------------------------
# as_device_view: DLPack producers on CUDA (fake pointers, cuda.core reads the capsules)
# ---------------------------------------------------------------------------


@needs_cuda_core
def test_view_from_cuda_dlpack_passes_the_consumer_stream():
    producer = FakeCudaDLPack(shape=(2, 3), dtype=np.uint16, device=(DLDeviceType.CUDA, 1))
    array = producer.array
    refs = sys.getrefcount(array)
    alive = weakref.ref(producer)
    view = as_device_view(producer, stream=0x77)
    assert [c["stream"] for c in producer.calls] == [0x77]
    assert tuple(producer.calls[0]["max_version"]) >= (1, 0), "cuda.core asks for a versioned capsule"
    assert (view.ptr, view.shape, view.strides, view.dtype, view.device_id) == (FAKE_PTR, (2, 3), (6, 2), np.uint16, 1)
    assert view.stream_sync == 0x77 and not view.readonly
    del producer
    _collect()
    assert alive() is not None, "the view must keep the producer's memory alive"
    assert sys.getrefcount(array) == refs + 1, "the producer's deleter ran while the view was alive"
    view.release()
    view.release()  # idempotent
    _collect()
    assert alive() is None
    assert sys.getrefcount(array) == refs - 1, "the producer's deleter did not run"  # less the producer's reference


@needs_cuda_core
@pytest.mark.parametrize("max_version", [None, (1, 0)], ids=["legacy", "versioned"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(12, dtype=np.float32).reshape(3, 4),
        lambda: np.arange(60, dtype=np.uint16).reshape(3, 4, 5)[1:, ::2, ::-1],
        lambda: np.arange(12, dtype=np.int16).reshape(3, 4).T,
        lambda: np.array(2.5),
        lambda: np.zeros((0, 5), dtype=np.float16),
        lambda: np.array([True, False]),
    ],
    ids=["f32", "u16-negstride", "i16-T", "0d", "f16-empty", "bool"],
)
def test_dlpack_layouts_reach_the_view_unchanged(make, max_version):
    array = make()
    producer = FakeCudaDLPack(array=array, data=None, old_style=max_version is None)  # keep numpy's own pointer
    with as_device_view(producer, stream=3) as view:
        if array.size:
            assert view.ptr == array.__array_interface__["data"][0]
        assert (view.shape, view.dtype) == (array.shape, array.dtype)
        if array.size > 1:
            assert view.strides == array.strides
        assert view.is_c_contiguous == (array.flags.c_contiguous or array.size <= 1)
    assert producer.unreleased() == 0


@needs_cuda_core
def test_dlpack_null_strides_mean_c_contiguous():
    class NullStrides(FakeCudaDLPack):
        def _capsule(self, max_version):
            return cuda_capsule(self.array, max_version, null_strides=True)

    with as_device_view(NullStrides(shape=(3, 4, 5), dtype=np.int16), stream=3) as view:
        assert view.strides == (40, 10, 2) and view.is_c_contiguous


@needs_cuda_core
def test_dlpack_byte_offset_is_added_to_the_pointer():
    """cuda-core < 1.2 dropped DLTensor.byte_offset (hence the version floor)."""
    with as_device_view(FakeCudaDLPack(byte_offset=64), stream=3) as view:
        assert view.ptr == FAKE_PTR + 64


@needs_cuda_core
@pytest.mark.parametrize("stream, sync, sent", [(0, True, 1), (2, True, 2), (0x77, False, -1)],
                         ids=["legacy-as-1", "per-thread", "no-sync"])
def test_dlpack_stream_values_follow_the_spec(stream, sync, sent):
    producer = FakeCudaDLPack()
    with as_device_view(producer, stream=stream, sync=sync) as view:
        assert producer.calls[0]["stream"] == sent
        assert view.stream_sync == (None if sent == -1 else sent)


@needs_cuda_core
def test_dlpack_without_consumer_stream_waits_on_the_host(stream_calls):
    producer = FakeCudaDLPack()
    with as_device_view(producer) as view:
        assert producer.calls[0]["stream"] == 1
        assert stream_calls == [("sync", 1)] and view.stream_sync is None


@needs_cuda_core
def test_dlpack_producer_without_new_keywords():
    producer = FakeCudaDLPack(old_style=True)
    with as_device_view(producer, stream=5) as view:
        assert producer.calls == [dict(stream=5)] and view.shape == (2, 3)
    assert producer.unreleased() == 0


@needs_cuda_core
@needs_numpy_dlpack_1
def test_dlpack_readonly_flag_travels():
    producer = FakeCudaDLPack(readonly=True)
    with as_device_view(producer, stream=3) as view:
        assert view.readonly
    with pytest.raises(PreprocessError, match="read-only"):
        as_device_view(FakeCudaDLPack(readonly=True), stream=3, require_writable=True)


@needs_cuda_core
def test_dlpack_managed_memory_is_accepted():
    with as_device_view(FakeCudaDLPack(device=(DLDeviceType.CUDA_MANAGED, 0)), stream=3) as view:
        assert view.device_id == 0


@pytest.mark.parametrize("device, match", [((3, 0), "host memory.*pinned"), ((10, 0), "device type 10")],
                         ids=["cuda-host", "rocm"])
def test_dlpack_other_devices_are_refused(device, match):
    producer = FakeCudaDLPack(device=device)
    with pytest.raises(PreprocessError, match=match):
        as_device_view(producer, stream=3)
    assert producer.calls == []


def test_host_dlpack_producer_is_refused_before_export():
    producer = FakeCudaDLPack(device=(DLDeviceType.CPU, 0))
    with pytest.raises(PreprocessError, match="host memory.*kDLCPU"):
        as_device_view(producer)
    assert producer.calls == [], "no capsule should be made for host memory"


@needs_cuda_core
def test_dlpack_capsule_on_another_device_type_is_refused_and_released():
    class Liar(FakeCudaDLPack):  # says CUDA, hands out a CPU capsule
        def _capsule(self, max_version):
            return cuda_capsule(self.array, max_version, device=(DLDeviceType.CPU, 0))

    producer = Liar()
    with pytest.raises(PreprocessError, match="capsule says 1"):
        as_device_view(producer, stream=3)
    _collect()
    assert producer.unreleased() == 0


@needs_cuda_core
def test_dlpack_validation_failure_releases_the_tensor():
    producer = FakeCudaDLPack(dtype=np.complex64)
    alive = weakref.ref(producer)
    array = producer.array
    refs = sys.getrefcount(array) - 1  # less the producer's own reference
    with pytest.raises(PreprocessError, match="complex64"):
        as_device_view(producer, stream=3)
    with pytest.raises(PreprocessError, match="float32; expected uint16"):
        as_device_view(FakeCudaDLPack(), stream=3, dtypes=[np.uint16])
    del producer
    _collect()
    assert alive() is None
    assert sys.getrefcount(array) == refs


@needs_cuda_core
def test_dlpack_unparsable_dtype_is_refused_and_released():
    producer = FakeCudaDLPack(dtype=np.float16, dtype_code=4)  # kDLBfloat
    with pytest.raises(PreprocessError, match="bfloat16"):
        as_device_view(producer, stream=3)
    _collect()
    assert producer.unreleased() == 0


@needs_cuda_core
@pytest.mark.parametrize("returned", ["object", "consumed"])
def test_dlpack_producer_returning_no_unused_capsule_is_refused(returned):
    capsule = np.arange(3.0).__dlpack__()
    if returned == "consumed":
        np.from_dlpack(types.SimpleNamespace(__dlpack__=lambda **kw: capsule, __dlpack_device__=lambda: (1, 0)))

    class Broken(FakeCudaDLPack):
        def _capsule(self, max_version):
            return object() if returned == "object" else capsule

    with pytest.raises(PreprocessError, match="no usable DLPack tensor"):
        as_device_view(Broken(), stream=3)


def test_dlpack_without_cuda_core_names_the_extra(monkeypatch):
    monkeypatch.setattr(cuda, "_CORE", None)
    monkeypatch.setitem(sys.modules, "cuda.core", None)
    with pytest.raises(MissingDependency, match=r"cuda-core>=1\.2.*medge\[cuda\]"):
        as_device_view(FakeCudaDLPack(), stream=3)


def test_too_old_cuda_core_is_refused(monkeypatch):
    old = types.ModuleType("cuda.core")
    old.__version__ = "0.3.2"
    old.Buffer = object
    utils = types.ModuleType("cuda.core.utils")
    utils.StridedMemoryView = object
    monkeypatch.setattr(cuda, "_CORE", None)
    monkeypatch.setitem(sys.modules, "cuda.core", old)
    monkeypatch.setitem(sys.modules, "cuda.core.utils", utils)
    with pytest.raises(MissingDependency, match=r"cuda-core>=1\.2"):
        cuda._core()


# ---------------------------------------------------------------------------
# stream_handle
# ---------------------------------------------------------------------------


class ProtocolStream:
    def __init__(self, value):
        self.value = value

    def __cuda_stream__(self):
        return self.value


class PropertyProtocolStream:  # cuda.core 0.1 exposed the protocol as a property
    __cuda_stream__ = (0, 0x44)


class TorchLikeStream:
    cuda_stream = 0x1234


class Stream:  # CuPy's class name; CuPy streams carry .ptr
    ptr = 0x5678


class ndarray:  # CuPy arrays carry .ptr too, which is a data pointer, not a stream
    ptr = 0x9ABC


class cudaStream_t:  # cuda-python before the __cuda_stream__ protocol
    def __int__(self):
        return 0xDEF0


@pytest.mark.parametrize(
    "stream, expected",
    [
        (None, 0),
        (0, 0),
        (1, 1),
        (2, 2),
        (0x7F12, 0x7F12),
        (np.uint64(77), 77),
        (ProtocolStream((0, 0x42)), 0x42),
        (PropertyProtocolStream(), 0x44),
        (TorchLikeStream(), 0x1234),
        (Stream(), 0x5678),
        (cudaStream_t(), 0xDEF0),
    ],
    ids=["None", "0", "legacy", "per-thread", "int", "numpy-int", "protocol", "protocol-property",
         "torch", "cupy", "cuda-python-old"],
)
def test_stream_handle_accepts_every_protocol(stream, expected):
    assert stream_handle(stream) == expected


def test_stream_handle_ctypes_pointer():
    import ctypes

    assert stream_handle(ctypes.c_void_p(0x99)) == 0x99
    assert stream_handle(ctypes.c_void_p()) == 0


@needs_cuda_python
def test_stream_handle_cuda_python_handles():
    from cuda.bindings import runtime

    assert stream_handle(runtime.cudaStream_t(0x31)) == 0x31
    try:
        from cuda.bindings import driver
    except ImportError:
        return
    assert stream_handle(driver.CUstream(0x32)) == 0x32


@pytest.mark.parametrize(
    "bad, match",
    [
        (object(), "expected a CUDA stream"),
        (ndarray(), "expected a CUDA stream"),
        (True, "expected a CUDA stream"),
        (-1, ">= 0"),
        (1.5, "expected a CUDA stream"),
        (ProtocolStream((1, 5)), "version 1"),
        (ProtocolStream(5), r"\(version, handle\)"),
        (ProtocolStream((0, -3)), ">= 0"),
    ],
    ids=["object", "cupy-array", "bool", "negative", "float", "protocol-version", "protocol-malformed",
         "protocol-negative"],
)
def test_stream_handle_rejects_non_streams_clearly(bad, match):
    with pytest.raises(PreprocessError, match=match):
        stream_handle(bad)


# ---------------------------------------------------------------------------
# as_device_view: CUDA Array Interface (fake pointers)
# ---------------------------------------------------------------------------


def test_view_from_cuda_array_interface(no_pointer_query):
    obj = FakeCAI(shape=(4, 5), typestr="<f4")
    view = as_device_view(obj)
    assert isinstance(view, DeviceView)
    assert (view.ptr, view.shape, view.strides, view.dtype) == (FAKE_PTR, (4, 5), (20, 4), np.float32)
    assert view.owner is obj and view.device_id is None and view.stream_sync is None
    assert view.is_c_contiguous and view.nbytes == 80 and not view.readonly


def test_view_keeps_strides_and_detects_layout(no_pointer_query):
    view = as_device_view(FakeCAI(shape=(4, 5), typestr="<u2", strides=(2, 8)))
    assert view.strides == (2, 8) and not view.is_c_contiguous
    with pytest.raises(PreprocessError, match="C-contiguous"):
        as_device_view(FakeCAI(shape=(4, 5), typestr="<u2", strides=(2, 8)), require_contiguous=True)


def test_view_uses_device_from_pointer_attributes(monkeypatch):
    monkeypatch.setattr(cuda, "_pointer_attributes", lambda ptr: (cuda._MEMORY_DEVICE, 3))
    assert as_device_view(FakeCAI()).device_id == 3


@pytest.mark.parametrize("memory_type", [0, 1], ids=["unregistered", "pinned"])
def test_host_pointer_behind_cai_is_refused(monkeypatch, memory_type):
    monkeypatch.setattr(cuda, "_pointer_attributes", lambda ptr: (memory_type, 0))
    with pytest.raises(PreprocessError, match="host memory"):
        as_device_view(FakeCAI(), name="input 'image'")


def test_numpy_array_is_refused_as_host_memory():
    with pytest.raises(PreprocessError, match=r"input 'image' is in host memory \(numpy.ndarray"):
        as_device_view(np.zeros((2, 2), np.float32), name="input 'image'")


def test_other_objects_are_refused_clearly():
    with pytest.raises(PreprocessError, match="__cuda_array_interface__ or DLPack"):
        as_device_view(object())
    with pytest.raises(PreprocessError, match="host memory"):
        as_device_view([1.0, 2.0])


@pytest.mark.parametrize(
    "typestr, dtypes, match",
    [
        ("<c8", None, "dtype complex64"),
        ("<f2", [np.float32], "dtype float16; expected float32"),
        (">f4", None, "native byte order"),
        ("|V8", None, "dtype"),
    ],
)
def test_unsupported_dtypes_are_refused(no_pointer_query, typestr, dtypes, match):
    with pytest.raises(PreprocessError, match=match):
        as_device_view(FakeCAI(typestr=typestr), dtypes=dtypes)


def test_readonly_output_is_refused(no_pointer_query):
    obj = FakeCAI(readonly=True)
    assert as_device_view(obj).readonly
    with pytest.raises(PreprocessError, match="read-only.*output"):
        as_device_view(obj, require_writable=True, name="output 'scores'")


def test_masked_and_malformed_interfaces_are_refused(no_pointer_query):
    with pytest.raises(PreprocessError, match="masked"):
        as_device_view(FakeCAI(mask=FakeCAI()))
    bad = FakeCAI()
    del bad.__cuda_array_interface__["data"]
    with pytest.raises(PreprocessError, match="malformed"):
        as_device_view(bad)


def test_cai_without_pending_work_needs_no_synchronisation(no_pointer_query, stream_calls):
    view = as_device_view(FakeCAI(stream=None), stream=9)
    assert stream_calls == [] and view.stream_sync is None


def test_cai_stream_orders_the_consumer_stream(no_pointer_query, stream_calls):
    view = as_device_view(FakeCAI(stream=5), stream=9)
    assert stream_calls == [("order", 9, 5)]
    assert view.stream_sync == 9


def test_cai_stream_without_consumer_stream_waits_on_the_host(no_pointer_query, stream_calls):
    view = as_device_view(FakeCAI(stream=5))
    assert stream_calls == [("sync", 5)]
    assert view.stream_sync is None


def test_cai_sync_can_be_skipped(no_pointer_query, stream_calls):
    view = as_device_view(FakeCAI(stream=5), stream=9, sync=False)
    assert stream_calls == [] and view.stream_sync == 5


def test_cai_version_2_is_ordered_after_the_legacy_default_stream(no_pointer_query, stream_calls):
    """CAI v2 (torch) carries no stream: order conservatively after the legacy default stream."""
    view = as_device_view(FakeCAI(version=2))
    assert stream_calls == [("sync", 1)] and view.stream_sync is None
    stream_calls.clear()
    view = as_device_view(FakeCAI(version=2), stream=0x55)
    assert stream_calls == [("order", 0x55, 1)] and view.stream_sync == 0x55
    stream_calls.clear()
    as_device_view(FakeCAI(version=2), sync=False)
    assert stream_calls == []


@needs_cuda_core
def test_dlpack_is_preferred_over_cai_when_both_are_offered(no_pointer_query):
    """torch and CuPy offer both; DLPack's __dlpack__(stream=...) carries the producer's ordering."""

    class Both(FakeCudaDLPack):
        __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<u2", "data": (FAKE_PTR, False), "version": 2}

    producer = Both(shape=(2, 3), dtype=np.uint16, device=(DLDeviceType.CUDA, 0))
    view = as_device_view(producer, stream=0x77)
    assert [c["stream"] for c in producer.calls] == [0x77]
    assert isinstance(view.owner, cuda._core().StridedMemoryView)
    view.release()


# ---------------------------------------------------------------------------
# DeviceArray exports (wrapped fake pointer, no GPU needed)
# ---------------------------------------------------------------------------


def test_device_array_cuda_array_interface():
    array = fake_device_array((2, 3), np.float16)
    assert array.__cuda_array_interface__ == {
        "shape": (2, 3), "typestr": "<f2", "data": (FAKE_PTR, False), "version": 3, "strides": None, "stream": None,
    }
    assert fake_device_array(readonly=True).__cuda_array_interface__["data"] == (FAKE_PTR, True)


def test_device_array_reports_its_pending_stream():
    array = fake_device_array()
    array.mark_pending(0x55)
    assert array.__cuda_array_interface__["stream"] == 0x55
    legacy = fake_device_array()
    legacy.mark_pending(None)  # legacy default stream: 0 is disallowed in CAI, so 1
    assert legacy.__cuda_array_interface__["stream"] == 1


@pytest.fixture
def exports(monkeypatch):
    """Stand in for cuda.core's capsule builder (it needs a driver): record the request, return a capsule."""
    calls = []

    def export(array, versioned):
        calls.append((array, versioned))
        return cuda_capsule(np.zeros(array.shape, array.dtype), (1, 0) if versioned else None,
                            device=(DLDeviceType.CUDA, array.device), data=array.ptr)

    monkeypatch.setattr(cuda, "_export_dlpack", export)
    return calls


def test_device_array_dlpack_export_asks_for_the_consumers_version(exports):
    array = fake_device_array((4, 2), np.int32, device=1)
    assert array.__dlpack_device__() == (DLDeviceType.CUDA, 1)
    array.__dlpack__(stream=-1)
    array.__dlpack__(stream=-1, max_version=(0, 8))
    array.__dlpack__(stream=-1, max_version=(1, 0))
    array.__dlpack__(stream=-1, max_version=[2, 1])
    assert exports == [(array, False), (array, False), (array, True), (array, True)]
    with pytest.raises(TypeError, match="max_version"):
        array.__dlpack__(stream=-1, max_version=3)


@needs_cuda_core
def test_device_array_dlpack_export_reads_back_through_cuda_core(exports):
    array = fake_device_array((4, 2), np.int32, device=1)

    class DLPackOnly:
        def __dlpack__(self, **kw):
            return array.__dlpack__(**kw)

        def __dlpack_device__(self):
            return array.__dlpack_device__()

    with as_device_view(DLPackOnly(), stream=5) as view:
        assert (view.ptr, view.shape, view.strides, view.dtype) == (FAKE_PTR, (4, 2), (8, 4), np.int32)
        assert view.device_id == 1


def test_device_array_dlpack_readonly_needs_a_versioned_capsule(exports):
    array = fake_device_array(readonly=True)
    with pytest.raises(BufferError, match="read-only"):
        array.__dlpack__(stream=-1)
    assert exports == []
    array.__dlpack__(stream=-1, max_version=(1, 0))
    assert exports == [(array, True)]


def test_empty_device_array_is_not_exported_through_dlpack(exports):
    with pytest.raises(BufferError, match="empty"):
        DeviceArray((0, 3), np.float32, device=0).__dlpack__()
    assert exports == []


def test_device_array_dlpack_refusals():
    array = fake_device_array()
    with pytest.raises(BufferError, match="stream=0"):
        array.__dlpack__(stream=0)
    with pytest.raises(BufferError, match="device"):
        array.__dlpack__(stream=-1, dl_device=(DLDeviceType.CUDA, 5))
    with pytest.raises(BufferError, match="needs a copy"):
        array.__dlpack__(dl_device=(DLDeviceType.CPU, 0), copy=False)


def test_device_array_dlpack_orders_the_consumer_stream(stream_calls, exports):
    array = fake_device_array()
    array.mark_pending(7)
    array.__dlpack__(stream=9)
    array.__dlpack__(stream=-1)
    array.__dlpack__()  # None: the legacy default stream
    assert stream_calls == [("order", 9, 7), ("order", 0, 7)]


def test_device_array_through_as_device_view(no_pointer_query, stream_calls):
    array = fake_device_array((3,), np.float32)
    array.mark_pending(7)
    view = as_device_view(array, stream=7)
    assert view.owner is array and view.ptr == FAKE_PTR and view.stream_sync == 7
    assert stream_calls == [("order", 7, 7)]  # same stream: _order_after makes no CUDA call


def test_device_array_validation():
    buffer = DeviceBuffer.from_pointer(FAKE_PTR, 64, device=0)
    DeviceArray((4, 4), np.float32, buffer=buffer)
    DeviceArray((2,), np.float64, buffer=buffer, offset=48)
    with pytest.raises(PreprocessError, match="needs 72 bytes"):
        DeviceArray((3,), np.float64, buffer=buffer, offset=48)
    with pytest.raises(PreprocessError, match="multiple"):
        DeviceArray((2,), np.float32, buffer=buffer, offset=2)
    with pytest.raises(PreprocessError, match="not supported"):
        DeviceArray((2,), np.complex64, buffer=buffer)
    with pytest.raises(PreprocessError, match="negative"):
        DeviceArray((2, -1), np.float32, buffer=buffer)
    array = DeviceArray((4,), np.float32, buffer=buffer)
    with pytest.raises(PreprocessError, match="does not match"):
        array.copy_from_host(np.zeros(4, np.float64))
    with pytest.raises(PreprocessError, match="read-only"):
        DeviceArray((4,), np.float32, buffer=buffer, readonly=True).copy_from_host(np.zeros(4, np.float32))


def test_wrapped_buffer_keeps_its_owner_and_frees_nothing():
    owner = Owner()
    alive = weakref.ref(owner)
    buffer = DeviceBuffer.from_pointer(FAKE_PTR, 16, device=0, owner=owner)
    del owner
    _collect()
    assert alive() is not None and not buffer.owns_memory
    buffer.close()
    _collect()
    assert alive() is None and buffer.closed
    with pytest.raises(ValueError, match="closed"):
        _ = buffer.ptr


def test_empty_device_array_needs_no_gpu():
    array = DeviceArray((0, 3), np.float32, device=0)
    assert array.ptr == 0 and array.__cuda_array_interface__["data"] == (0, False)
    assert array.to_host().shape == (0, 3)
    array.copy_from_host(np.zeros((0, 3), np.float32))


# ---------------------------------------------------------------------------
# check(), errors, and working without cuda-python / without a driver
# ---------------------------------------------------------------------------


def test_check_unpacks_results():
    assert cuda.check((0,)) is None
    assert cuda.check((0, 5)) == 5
    assert cuda.check((0, 1, 2)) == (1, 2)
    assert cuda.check(0) is None
    with pytest.raises(CudaError, match="cudaFoo failed with CUDA error 2") as info:
        cuda.check((2, None), "cudaFoo")
    assert info.value.code == 2


@needs_cuda_python
def test_check_names_cuda_errors():
    rt = cuda._runtime()
    assert cuda.check((rt.cudaError_t.cudaSuccess, 7)) == 7
    with pytest.raises(CudaError, match=r"cudaMalloc failed with cudaErrorMemoryAllocation \(2\): out of memory"):
        cuda.check((rt.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")


@needs_cuda_python
def test_device_count_never_raises_for_a_missing_gpu():
    assert cuda.device_count() >= 0


@pytest.mark.skipif(not HAS_CUDA_PYTHON or GPU_COUNT, reason="needs cuda-python on a machine without a usable GPU")
def test_gpu_calls_fail_with_a_clear_error_without_a_gpu():
    with pytest.raises(CudaError, match="No usable CUDA GPU"):
        DeviceBuffer(16)


def test_module_works_without_cuda_python():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["cuda"] = None  # make "import cuda..." fail
        import numpy as np
        from medge.errors import MissingDependency
        from medge.runtime import cuda
        assert cuda.stream_handle(None) == 0
        buffer = cuda.DeviceBuffer.from_pointer(0x7F0000001000, 24, device=0)
        array = cuda.DeviceArray((2, 3), np.float32, buffer=buffer)
        with cuda.as_device_view(array) as view:  # CAI v3, nothing pending: no CUDA call
            assert view.ptr == array.ptr and view.device_id is None

        class CudaDLPack:
            def __dlpack_device__(self):
                return (2, 0)

            def __dlpack__(self, **kw):
                raise AssertionError("not reached")

        calls = [
            (cuda.device_count, 'cuda-python'),
            (lambda: cuda.DeviceBuffer(8), 'cuda-python'),
            (lambda: cuda.Stream(), 'cuda-python'),
            (lambda: cuda.as_device_view(CudaDLPack(), stream=3), 'cuda-core'),
            (lambda: array.__dlpack__(stream=-1), 'cuda-core'),
        ]
        for call, package in calls:
            try:
                call()
            except MissingDependency as exc:
                assert 'medge[cuda]' in str(exc) and package in str(exc), exc
            else:
                raise AssertionError("expected MissingDependency")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---------------------------------------------------------------------------
# Real GPU
# ---------------------------------------------------------------------------


@pytest.fixture
def stream():
    with cuda.Stream() as s:
        yield s


class TestOnGPU:
    pytestmark = gpu

    def test_device_queries(self):
        assert cuda.device_count() >= 1
        assert 0 <= cuda.current_device() < cuda.device_count()

    def test_stream_lifecycle(self):
        s = cuda.Stream()
        assert s.handle not in (0, 1, 2)
        assert stream_handle(s) == s.handle == s.__cuda_stream__()[1]
        s.synchronize()
        s.close()
        s.close()
        assert s.closed
        with pytest.raises(ValueError, match="closed"):
            _ = s.handle

    @pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float16, np.float32, np.float64])
    def test_round_trip(self, stream, dtype):
        host = (np.arange(3 * 5 * 7) % 251).astype(dtype).reshape(3, 5, 7)
        array = DeviceArray.from_host(host, stream)
        assert array.pending_stream == stream.handle
        assert array.__cuda_array_interface__["stream"] == stream.handle
        np.testing.assert_array_equal(array.to_host(), host)
        assert array.pending_stream is None
        assert array.__cuda_array_interface__["stream"] is None

    def test_round_trip_through_pinned_memory(self, stream):
        host = np.random.default_rng(0).random((64, 64), dtype=np.float32)
        pinned = cuda.PinnedBuffer(host.nbytes)
        staging = pinned.array(np.float32, host.shape)
        staging[...] = host
        array = DeviceArray(host.shape, np.float32)
        array.copy_from_host(staging, stream)
        out = cuda.PinnedBuffer(host.nbytes)
        result = array.to_host(stream, out=out.array(np.float32, host.shape))
        np.testing.assert_array_equal(result, host)
        pinned.close()
        out.close()

    def test_raw_copies_and_buffers(self, stream):
        host = np.arange(100, dtype=np.int32)
        with DeviceBuffer(host.nbytes, device=cuda.current_device()) as buffer:
            cuda.host_to_device(buffer, host, stream=stream)
            back = np.empty_like(host)
            cuda.device_to_host(back, buffer.ptr, stream=stream)
            stream.synchronize()
            np.testing.assert_array_equal(back, host)
            half = np.zeros(50, np.int32)
            cuda.device_to_host(half, buffer.ptr + 200, stream=stream)
            stream.synchronize()
            np.testing.assert_array_equal(half, host[50:])
        assert buffer.closed

    def test_buffer_freed_by_garbage_collection(self):
        rt = cuda._runtime()
        free_before = cuda.check(rt.cudaMemGetInfo())[0]
        buffers = [DeviceBuffer(64 << 20) for _ in range(4)]
        del buffers
        _collect()
        free_after = cuda.check(rt.cudaMemGetInfo())[0]
        assert free_after >= free_before - (16 << 20)

    def test_dlpack_view_of_our_array(self, stream):
        host = np.arange(12, dtype=np.float32).reshape(3, 4)
        array = DeviceArray.from_host(host, stream)

        class DLPackOnly:  # hide the CUDA Array Interface to force the DLPack path
            def __dlpack__(self, **kw):
                return array.__dlpack__(**kw)

            def __dlpack_device__(self):
                return array.__dlpack_device__()

        with cuda.Stream() as other:
            with as_device_view(DLPackOnly(), stream=other, require_writable=True) as view:
                assert view.ptr == array.ptr and view.stream_sync == other.handle
                back = np.empty_like(host)
                cuda.device_to_host(back, view.ptr, stream=other)
                other.synchronize()
                np.testing.assert_array_equal(back, host)

    @needs_numpy_dlpack_1
    def test_numpy_gets_a_host_copy_through_dlpack(self, stream):
        host = np.arange(6, dtype=np.int16)
        array = DeviceArray.from_host(host, stream)
        np.testing.assert_array_equal(np.from_dlpack(array, device="cpu"), host)

    def test_dlpack_copy_true_makes_a_device_copy(self, stream):
        host = np.arange(6, dtype=np.float32)
        array = DeviceArray.from_host(host, stream)

        class Copying:
            def __dlpack__(self, **kw):
                return array.__dlpack__(copy=True, **kw)

            def __dlpack_device__(self):
                return array.__dlpack_device__()

        with as_device_view(Copying(), stream=stream) as view:
            assert view.ptr != array.ptr and view.device_id == array.device
            back = np.empty_like(host)
            cuda.device_to_host(back, view.ptr, stream=stream)
            stream.synchronize()
            np.testing.assert_array_equal(back, host)

    def test_dlpack_export_through_cuda_core(self, stream):
        """cuda.core builds the capsule: device from the pointer, layout and read-only flag from the array."""
        core = cuda._core()
        array = DeviceArray.from_host(np.arange(12, dtype=np.int16).reshape(3, 4), stream)
        readonly = DeviceArray((3, 4), np.int16, buffer=array.buffer, readonly=True)
        for source, max_version in [(array, None), (array, (1, 0)), (readonly, (1, 0))]:
            capsule = source.__dlpack__(stream=stream.handle, max_version=max_version)
            holder = types.SimpleNamespace(__dlpack__=lambda capsule=capsule, **kw: capsule,
                                           __dlpack_device__=source.__dlpack_device__)
            smv = core.StridedMemoryView.from_dlpack(holder, -1)
            assert smv.__dlpack_device__() == (DLDeviceType.CUDA, array.device)
            assert (smv.ptr, tuple(smv.shape), smv.dtype) == (array.ptr, (3, 4), np.int16)
            assert smv.strides in (None, (4, 1)) and smv.readonly == source.readonly
            del smv, holder, capsule

    def test_dlpack_export_keeps_the_array_alive(self):
        array = DeviceArray((16,), np.float32)
        alive = weakref.ref(array)
        capsule = array.__dlpack__(stream=-1)
        del array
        _collect()
        assert alive() is not None
        del capsule
        _collect()
        assert alive() is None

    def test_cai_view_of_device_memory_knows_its_device(self, stream):
        array = DeviceArray((4,), np.float32)
        view = as_device_view(array)
        assert view.device_id == array.device

    def test_host_pointer_behind_cai_is_refused_by_cuda(self):
        host = np.zeros(4, np.float32)
        with pytest.raises(PreprocessError, match="host memory"):
            as_device_view(FakeCAI(shape=(4,), ptr=host.ctypes.data))

    def test_pending_work_on_two_streams(self, stream):
        host = np.arange(1000, dtype=np.float32)
        array = DeviceArray.from_host(host, stream)
        with cuda.Stream() as other:
            array.mark_pending(other)  # other now waits on stream's copy
            assert array.pending_stream == other.handle
            np.testing.assert_array_equal(array.to_host(), host)
