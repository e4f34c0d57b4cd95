"""CUDA objects owned from Python: streams, device and pinned buffers, device arrays, zero-copy views.

Two cuda-python packages, both imported lazily (importing this module needs
only numpy; a missing one raises ``MissingDependency`` naming the ``cuda`` extra):

- ``cuda.bindings.runtime`` (``cuda.cudart`` on cuda-python < 12.6) owns
  streams, events, ``cudaMalloc`` / ``cudaMallocHost`` buffers and copies.
  TensorRT's samples and medge's TensorRT backend (CUDA graphs) speak the same
  runtime, and the backend's tests fake exactly this module (``_RT``).
- ``cuda.core`` (>= 1.2) builds and reads DLPack capsules: exports through
  ``Buffer`` + ``StridedMemoryView.__dlpack__``, imports through
  ``StridedMemoryView.from_dlpack``, which passes the consumer's stream to the
  producer and calls the producer's deleter when the view is dropped.

Interchange, both directions:

- out: :class:`DeviceArray` exports ``__cuda_array_interface__`` (version 3) and
  DLPack (``__dlpack__`` / ``__dlpack_device__``), so torch, CuPy, numba and
  JAX take it without a copy;
- in: :func:`as_device_view` accepts anything exporting either protocol (torch,
  CuPy, numba, pycuda, JAX, a DeviceArray) and returns a :class:`DeviceView`:
  pointer, shape, byte strides, dtype and an owner that keeps the memory alive.
  The CUDA Array Interface is read here in Python: cuda.core's reader needs a
  driver for every view, refuses CAI v2 (torch) and cannot tell host pointers
  from device ones.

Stream conventions (the same in every function here): a stream argument may be
None (the legacy default stream, handle 0), an int handle, or any stream object
:func:`stream_handle` understands. Every copy is asynchronous on that stream
unless its docstring says otherwise. docs/cuda-core.md says what cuda.core
replaced here and what it could not.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import importlib
import math
import sys
import types
import weakref
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ..errors import CudaError, MissingDependency, PreprocessError

__all__ = [
    "DLDeviceType",
    "SUPPORTED_DTYPES",
    "check",
    "stream_handle",
    "device_count",
    "current_device",
    "Stream",
    "DeviceBuffer",
    "PinnedBuffer",
    "DeviceArray",
    "DeviceView",
    "as_device_view",
    "host_to_device",
    "device_to_host",
]


class DLDeviceType(enum.IntEnum):
    """DLPack device types medge deals with (values from dlpack.h)."""

    CPU = 1
    CUDA = 2
    CUDA_HOST = 3
    CUDA_MANAGED = 13


#: Device types whose memory a CUDA kernel on the owning device can address directly.
_DEVICE_ACCESSIBLE = (DLDeviceType.CUDA, DLDeviceType.CUDA_MANAGED)

#: Element types a device view may carry unless the caller narrows them (``dtypes=``).
SUPPORTED_DTYPES = tuple(
    np.dtype(t)
    for t in (
        np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
        np.int64, np.uint64, np.float16, np.float32, np.float64,
    )
)

# ---------------------------------------------------------------------------
# cuda-python, imported on first use
# ---------------------------------------------------------------------------

_RT: Any = None

# cudaError_t values that mean "there is no usable GPU here" rather than a failure.
_ERR_INSUFFICIENT_DRIVER = 35
_ERR_NO_DEVICE = 100


def _runtime(purpose: str = "CUDA memory and streams") -> Any:
    """Return cuda-python's runtime module, importing it on first use.

    Raises:
        MissingDependency: cuda-python is not installed (extra ``cuda``).
    """
    global _RT
    if _RT is None:
        try:
            from cuda.bindings import runtime as rt  # cuda-python >= 12.6 (cuda-bindings)
        except ImportError:
            try:
                from cuda import cudart as rt  # older cuda-python; same functions
            except ImportError:
                raise MissingDependency("cuda-python", "cuda", purpose) from None
        _RT = rt
    return _RT


def _error_text(err: Any) -> str:
    kind = type(err).__name__
    try:
        if kind == "cudaError_t":
            ok, text = _runtime().cudaGetErrorString(err)
        elif kind == "CUresult":
            from cuda.bindings import driver

            ok, text = driver.cuGetErrorString(err)
        else:
            return ""
        if int(ok) == 0 and text:
            return text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # the driver library itself may be missing
        pass
    return ""


def _cuda_error(err: Any, what: Optional[str]) -> CudaError:
    code = int(err)
    name = getattr(err, "name", None) or f"CUDA error {code}"
    text = _error_text(err)
    message = f"{what or 'CUDA call'} failed with {name} ({code})"
    if text:
        message += f": {text}"
    if code in (_ERR_INSUFFICIENT_DRIVER, _ERR_NO_DEVICE) and type(err).__name__ == "cudaError_t":
        message += (
            ". No usable CUDA GPU: check that the NVIDIA driver is installed and recent "
            "enough for this CUDA runtime, and that a GPU is visible (CUDA_VISIBLE_DEVICES)"
        )
    exc = CudaError(message)
    exc.code = code  # type: ignore[attr-defined]
    exc.error_name = name  # type: ignore[attr-defined]
    return exc


def check(result: Any, what: Optional[str] = None) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result, raising on failure.

    Args:
        result: what a cuda-python call returned: a tuple whose first item is a
            ``cudaError_t`` (or driver ``CUresult``), or such an error alone.
        what: the call's name, for the message (``"cudaMalloc"``).

    Returns:
        None when the call returns no value, the value when it returns one, a
        tuple of values otherwise.

    Raises:
        CudaError: the error code is not success; the message carries the error
            name and CUDA's description, the exception ``code`` and ``error_name``.
    """
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != 0:
        raise _cuda_error(err, what)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def device_count() -> int:
    """Number of CUDA devices visible to this process.

    Returns 0, rather than raising, when CUDA reports no device or no usable
    driver (``cudaErrorNoDevice``, ``cudaErrorInsufficientDriver``); call
    ``check(_runtime().cudaGetDeviceCount())`` to see that error itself.

    Raises:
        MissingDependency: cuda-python is not installed.
        CudaError: any other CUDA failure.
    """
    rt = _runtime("Counting CUDA devices")
    result = rt.cudaGetDeviceCount()
    if int(result[0]) in (_ERR_INSUFFICIENT_DRIVER, _ERR_NO_DEVICE):
        return 0
    return int(check(result, "cudaGetDeviceCount"))


def current_device() -> int:
    """The calling thread's current CUDA device ordinal (``cudaGetDevice``).

    Raises:
        MissingDependency: cuda-python is not installed.
        CudaError: no usable device or driver.
    """
    return int(check(_runtime("Querying the CUDA device").cudaGetDevice(), "cudaGetDevice"))


@contextlib.contextmanager
def _on_device(device: Optional[int]):
    """Make ``device`` current for the block and restore the previous one."""
    if device is None:
        yield
        return
    rt = _runtime()
    previous = int(check(rt.cudaGetDevice(), "cudaGetDevice"))
    if previous == device:
        yield
        return
    check(rt.cudaSetDevice(device), "cudaSetDevice")
    try:
        yield
    finally:
        rt.cudaSetDevice(previous)


# ---------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------

_STREAM_KINDS = (
    "None (legacy default stream), an int handle, an object with __cuda_stream__ "
    "(cuda.core, CuPy, cuda-python handles, medge Stream), a torch.cuda.Stream, "
    "a CuPy stream or a cuda-python cudaStream_t/CUstream"
)


def stream_handle(stream: Any) -> int:
    """Normalise a stream given in any common form to its integer ``cudaStream_t``.

    Accepted: None (0, the legacy default stream); a non-negative int (1 and 2
    are the runtime's ``cudaStreamLegacy`` and ``cudaStreamPerThread``); an
    object implementing ``__cuda_stream__`` (returns ``(0, handle)``); a
    ``torch.cuda.Stream`` (``.cuda_stream``); a CuPy stream (``.ptr``); a
    cuda-python ``cudaStream_t`` / ``CUstream`` (``int(obj)``); a ctypes
    ``c_void_p``.

    Raises:
        PreprocessError: the object is not a stream in any of these forms.
    """
    if stream is None:
        return 0
    if isinstance(stream, bool):  # bool is an int subclass; True is not a stream
        raise PreprocessError(f"expected a CUDA stream, got {stream!r}; accepted: {_STREAM_KINDS}")
    if isinstance(stream, (int, np.integer)):
        handle = int(stream)
        if handle < 0:
            raise PreprocessError(f"a CUDA stream handle must be >= 0, got {handle}")
        return handle
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        # cuda.core 0.1 exposed it as a property; everything since is a method.
        value = protocol() if callable(protocol) else protocol
        if (
            not isinstance(value, tuple)
            or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) for v in value)
        ):
            raise PreprocessError(
                f"{type(stream).__name__}.__cuda_stream__() returned {value!r}; "
                "the protocol requires a (version, handle) tuple of ints"
            )
        version, handle = (int(v) for v in value)
        if version != 0:
            raise PreprocessError(
                f"{type(stream).__name__}.__cuda_stream__() reports protocol version {version}; "
                "medge understands version 0"
            )
        return stream_handle(handle)
    torch_handle = getattr(stream, "cuda_stream", None)  # torch.cuda.Stream / ExternalStream
    if isinstance(torch_handle, (int, np.integer)) and not isinstance(torch_handle, bool):
        return stream_handle(int(torch_handle))
    # CuPy streams carry .ptr; so do CuPy arrays and memory, hence the class-name test.
    cupy_handle = getattr(stream, "ptr", None)
    if type(stream).__name__.endswith("Stream") and isinstance(cupy_handle, (int, np.integer)):
        return stream_handle(int(cupy_handle))
    if type(stream).__name__ in ("cudaStream_t", "CUstream"):  # cuda-python without the protocol
        return stream_handle(int(stream))
    if isinstance(stream, ctypes.c_void_p):
        return stream_handle(stream.value or 0)
    raise PreprocessError(
        f"expected a CUDA stream, got {type(stream).__module__}.{type(stream).__qualname__}; "
        f"accepted: {_STREAM_KINDS}"
    )


def _order_after(consumer: int, producer: int) -> None:
    """Make work later enqueued on ``consumer`` wait for what is enqueued on ``producer`` now.

    Records an event on the producer stream and makes the consumer wait on it;
    the host does not block. Destroying the event right away is allowed: CUDA
    releases it once the recorded work completes.
    """
    if consumer == producer:
        return
    rt = _runtime("Ordering CUDA streams")
    event = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
    try:
        check(rt.cudaEventRecord(event, producer), "cudaEventRecord")
        check(rt.cudaStreamWaitEvent(consumer, event, 0), "cudaStreamWaitEvent")
    finally:
        rt.cudaEventDestroy(event)


def _synchronize(handle: int) -> None:
    check(_runtime("Synchronising a CUDA stream").cudaStreamSynchronize(handle), "cudaStreamSynchronize")


def _destroy_stream(destroy: Any, handle: int, _finalizing=sys.is_finalizing) -> None:
    if _finalizing():  # the driver reclaims everything at process exit
        return
    try:
        destroy(handle)
    except Exception:
        pass


class Stream:
    """An owned, non-blocking CUDA stream (``cudaStreamCreateWithFlags(cudaStreamNonBlocking)``).

    Non-blocking: work on it does not synchronise with the legacy default
    stream. Use it as a context manager, or call :meth:`close`; it is also
    destroyed when garbage-collected. Implements ``__cuda_stream__``, so torch,
    CuPy and cuda.core accept it.

    Args:
        device: device to create the stream on; None means the current device.

    Raises:
        MissingDependency: cuda-python is not installed.
        CudaError: the stream cannot be created (no device, ...).
    """

    def __init__(self, *, device: Optional[int] = None) -> None:
        rt = _runtime("Creating a CUDA stream")
        with _on_device(device):
            self.device = current_device() if device is None else int(device)
            created = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self._handle = int(created)
        self._finalizer = weakref.finalize(self, _destroy_stream, rt.cudaStreamDestroy, self._handle)
        self._finalizer.atexit = False

    @property
    def handle(self) -> int:
        """The ``cudaStream_t`` as an int."""
        if not self._finalizer.alive:
            raise ValueError("this Stream has been closed")
        return self._handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)

    def synchronize(self) -> None:
        """Block the host until all work enqueued on this stream has finished."""
        _synchronize(self.handle)

    def wait_for(self, other: Any) -> None:
        """Make later work on this stream wait for the work enqueued on ``other`` so far."""
        _order_after(self.handle, stream_handle(other))

    def close(self) -> None:
        """Wait for the stream's work, then destroy it. Closing twice is allowed."""
        if self._finalizer.alive:
            try:
                self.synchronize()
            finally:
                self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"0x{self._handle:x}"
        return f"Stream({state}, device={self.device})"


# ---------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------


def _free_device_memory(rt: Any, ptr: int, device: int, _finalizing=sys.is_finalizing) -> None:
    """Finalizer of DeviceBuffer: free on the owning device, never raise."""
    if _finalizing():  # calling into CUDA during interpreter teardown is unsafe; exit frees it
        return
    try:
        ok, previous = rt.cudaGetDevice()
        switch = int(ok) == 0 and previous != device
        if switch:
            rt.cudaSetDevice(device)
        rt.cudaFree(ptr)
        if switch:
            rt.cudaSetDevice(previous)
    except Exception:
        pass


def _free_host_memory(free_host: Any, ptr: int, _finalizing=sys.is_finalizing) -> None:
    if _finalizing():
        return
    try:
        free_host(ptr)
    except Exception:
        pass


class DeviceBuffer:
    """``nbytes`` of device memory from ``cudaMalloc``, freed by :meth:`close` or garbage collection.

    Freeing never raises and is skipped during interpreter shutdown, when the
    driver reclaims the memory itself. A zero-byte buffer allocates nothing
    (``ptr`` is 0).

    Args:
        nbytes: size in bytes (>= 0).
        device: device ordinal; None means the current device.

    Raises:
        MissingDependency: cuda-python is not installed.
        CudaError: the allocation fails (out of memory, no device).
    """

    def __init__(self, nbytes: int, device: Optional[int] = None) -> None:
        nbytes = int(nbytes)
        if nbytes < 0:
            raise PreprocessError(f"a buffer size must be >= 0, got {nbytes}")
        self.nbytes = nbytes
        self._ptr = 0
        self._finalizer = None
        self._owner: object = None
        self._closed = False
        if nbytes == 0:
            if device is None:
                try:
                    device = current_device()
                except (MissingDependency, CudaError):
                    device = 0
            self.device = int(device)
            return
        rt = _runtime("Allocating GPU memory")
        with _on_device(device):
            self.device = current_device() if device is None else int(device)
            # nothing may fail between the allocation and the finalizer that frees it
            self._ptr = int(check(rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)"))
        self._finalizer = weakref.finalize(self, _free_device_memory, rt, self._ptr, self.device)
        self._finalizer.atexit = False

    @classmethod
    def from_pointer(cls, ptr: int, nbytes: int, device: int, owner: object = None) -> "DeviceBuffer":
        """Wrap device memory allocated elsewhere, without taking ownership.

        ``owner`` (the object that frees the memory) is kept alive until
        :meth:`close`, which frees nothing. Needs no CUDA call.
        """
        self = cls.__new__(cls)
        self.nbytes = int(nbytes)
        if self.nbytes < 0:
            raise PreprocessError(f"a buffer size must be >= 0, got {self.nbytes}")
        self._ptr = int(ptr)
        self.device = int(device)
        self._finalizer = None
        self._owner = owner
        self._closed = False
        return self

    @property
    def owns_memory(self) -> bool:
        """True when this buffer allocated its memory (and frees it)."""
        return self._finalizer is not None

    @property
    def ptr(self) -> int:
        """Device address of the first byte."""
        if self.closed:
            raise ValueError("this DeviceBuffer has been closed")
        return self._ptr

    @property
    def closed(self) -> bool:
        return self._closed or (self._finalizer is not None and not self._finalizer.alive)

    def close(self) -> None:
        """Free the memory now (``cudaFree`` synchronises the device). Arrays and exports on it become invalid."""
        self._closed = True
        self._owner = None
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "DeviceBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "closed" if self.closed else f"0x{self._ptr:x}"
        return f"DeviceBuffer({self.nbytes} bytes, device={self.device}, {where})"


class _HostView:
    """Carries ``__array_interface__`` for numpy and keeps the buffer it points into alive."""

    __slots__ = ("__array_interface__", "_keep")

    def __init__(self, ptr: int, shape: tuple, dtype: np.dtype, keep: object) -> None:
        self.__array_interface__ = {
            "data": (ptr, False),
            "shape": shape,
            "typestr": dtype.str,
            "version": 3,
        }
        self._keep = keep


class PinnedBuffer:
    """``nbytes`` of page-locked host memory from ``cudaMallocHost``.

    Copies between pinned memory and the GPU are truly asynchronous (and
    faster): keep the memory unchanged until the stream has reached the copy.
    Numpy views from :meth:`array` keep the buffer alive, but :meth:`close`
    frees it regardless.

    Raises:
        MissingDependency: cuda-python is not installed.
        CudaError: the allocation fails.
    """

    def __init__(self, nbytes: int) -> None:
        nbytes = int(nbytes)
        if nbytes < 0:
            raise PreprocessError(f"a buffer size must be >= 0, got {nbytes}")
        self.nbytes = nbytes
        self._ptr = 0
        self._finalizer = None
        if nbytes:
            rt = _runtime("Allocating pinned host memory")
            self._ptr = int(check(rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes} bytes)"))
            self._finalizer = weakref.finalize(self, _free_host_memory, rt.cudaFreeHost, self._ptr)
            self._finalizer.atexit = False

    @property
    def ptr(self) -> int:
        if self.closed:
            raise ValueError("this PinnedBuffer has been closed")
        return self._ptr

    @property
    def closed(self) -> bool:
        return self._finalizer is not None and not self._finalizer.alive

    def array(self, dtype: Any = np.uint8, shape: Optional[Sequence[int]] = None, offset: int = 0) -> np.ndarray:
        """A writable numpy view of the buffer (no copy).

        Args:
            dtype: element type.
            shape: view shape; None means as many elements as fit after ``offset``.
            offset: byte offset of the first element (a multiple of the item size).

        Raises:
            PreprocessError: the view does not fit in the buffer or is misaligned.
        """
        dtype = np.dtype(dtype)
        if offset < 0 or offset % dtype.itemsize:
            raise PreprocessError(f"offset {offset} is not a non-negative multiple of {dtype} itemsize")
        if shape is None:
            shape = ((self.nbytes - offset) // dtype.itemsize,)
        shape = _as_shape(shape)
        need = offset + math.prod(shape) * dtype.itemsize
        if need > self.nbytes:
            raise PreprocessError(
                f"a {dtype} view of shape {shape} at offset {offset} needs {need} bytes; "
                f"the pinned buffer has {self.nbytes}"
            )
        ptr = self.ptr + offset if self.nbytes else 0
        return np.asarray(_HostView(ptr, shape, dtype, self))

    def close(self) -> None:
        """Free the memory now; numpy views of it become invalid."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "PinnedBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "closed" if self.closed else f"0x{self._ptr:x}"
        return f"PinnedBuffer({self.nbytes} bytes, {where})"


# ---------------------------------------------------------------------------
# Copies
# ---------------------------------------------------------------------------


def _as_ptr(obj: Any) -> int:
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return int(obj)
    ptr = getattr(obj, "ptr", None)
    if isinstance(ptr, (int, np.integer)) and not isinstance(ptr, bool):
        return int(ptr)
    raise PreprocessError(f"expected a device address (int, DeviceBuffer, DeviceArray), got {type(obj).__name__}")


def _host_block(array: Any, nbytes: Optional[int], writable: bool, role: str) -> tuple[int, int]:
    if not isinstance(array, np.ndarray):
        raise PreprocessError(f"{role} must be a numpy.ndarray, got {type(array).__name__}")
    if not array.flags.c_contiguous:
        raise PreprocessError(f"{role} must be C-contiguous (use numpy.ascontiguousarray)")
    if writable and not array.flags.writeable:
        raise PreprocessError(f"{role} is read-only")
    nbytes = array.nbytes if nbytes is None else int(nbytes)
    if nbytes < 0 or nbytes > array.nbytes:
        raise PreprocessError(f"cannot copy {nbytes} bytes: the {role} array holds {array.nbytes}")
    return array.ctypes.data, nbytes


def host_to_device(dst_ptr: Any, src: np.ndarray, nbytes: Optional[int] = None, stream: Any = None) -> None:
    """Enqueue a copy of ``nbytes`` (default all) of host array ``src`` to device address ``dst_ptr``.

    Asynchronous on ``stream``. From pageable memory CUDA stages the data
    before returning, so ``src`` may be reused at once; from pinned memory
    (:class:`PinnedBuffer`) keep ``src`` unchanged until the stream gets there.

    Args:
        dst_ptr: int address, or a DeviceBuffer / DeviceArray.
        src: C-contiguous numpy array.
        nbytes: bytes to copy; None means ``src.nbytes``.
        stream: see :func:`stream_handle`.

    Raises:
        PreprocessError: bad arguments. CudaError: the copy cannot be enqueued.
    """
    src_ptr, nbytes = _host_block(src, nbytes, writable=False, role="source")
    dst = _as_ptr(dst_ptr)
    handle = stream_handle(stream)
    if nbytes == 0:
        return
    rt = _runtime("Copying to the GPU")
    check(
        rt.cudaMemcpyAsync(dst, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, handle),
        "cudaMemcpyAsync(host to device)",
    )


def device_to_host(dst: np.ndarray, src_ptr: Any, nbytes: Optional[int] = None, stream: Any = None) -> None:
    """Enqueue a copy of ``nbytes`` (default ``dst.nbytes``) from device address ``src_ptr`` into ``dst``.

    Into pageable memory CUDA returns only when the copy is done; into pinned
    memory it returns at once: synchronise ``stream`` before reading ``dst``.

    Raises:
        PreprocessError: bad arguments. CudaError: the copy cannot be enqueued.
    """
    dst_ptr, nbytes = _host_block(dst, nbytes, writable=True, role="destination")
    src = _as_ptr(src_ptr)
    handle = stream_handle(stream)
    if nbytes == 0:
        return
    rt = _runtime("Copying from the GPU")
    check(
        rt.cudaMemcpyAsync(dst_ptr, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, handle),
        "cudaMemcpyAsync(device to host)",
    )


# ---------------------------------------------------------------------------
# DLPack, through cuda.core
# ---------------------------------------------------------------------------

_CORE: Any = None
_CORE_MIN = (1, 2)  # 1.2.0: StridedMemoryView.from_dlpack adds DLTensor.byte_offset to ptr


def _core(purpose: str = "DLPack exchange") -> Any:
    """Return cuda.core's ``Buffer`` and ``StridedMemoryView``, importing them on first use.

    Raises:
        MissingDependency: cuda-core >= 1.2 is not installed (extra ``cuda``).
    """
    global _CORE
    if _CORE is None:
        try:
            core = importlib.import_module("cuda.core")
            StridedMemoryView = importlib.import_module("cuda.core.utils").StridedMemoryView
            version = tuple(int(part) for part in core.__version__.split(".")[:2])
        except (ImportError, AttributeError, ValueError):
            version = None
        if version is None or version < _CORE_MIN:
            raise MissingDependency("cuda-core>=%d.%d" % _CORE_MIN, "cuda", purpose) from None
        _CORE = types.SimpleNamespace(Buffer=core.Buffer, StridedMemoryView=StridedMemoryView)
    return _CORE


def _wants_versioned(max_version: Any) -> bool:
    """DLPack 1.x capsule iff the consumer passed max_version with major >= 1."""
    if max_version is None:
        return False
    try:
        major = int(max_version[0])
    except (TypeError, IndexError, ValueError):
        raise TypeError(f"max_version must be a (major, minor) tuple, got {max_version!r}") from None
    return major >= 1


def _export_dlpack(array: "DeviceArray", versioned: bool) -> object:
    """DLPack capsule of a non-empty device array, built by cuda.core.

    ``Buffer.from_handle(..., owner=array)`` keeps the array alive until the
    consumer calls the deleter; the device type and ordinal come from the
    pointer's CUDA attributes (kDLCUDA for ``cudaMalloc`` memory).
    """
    core = _core("Exporting a DeviceArray through DLPack")
    buffer = core.Buffer.from_handle(array.ptr, array.nbytes, owner=array)
    view = core.StridedMemoryView.from_buffer(buffer, array.shape, dtype=array.dtype, is_readonly=array.readonly)
    return view.__dlpack__(max_version=(1, 0) if versioned else None)


# ---------------------------------------------------------------------------
# Device arrays
# ---------------------------------------------------------------------------


def _as_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    out = tuple(int(d) for d in shape)
    if any(d < 0 for d in out):
        raise PreprocessError(f"shape {out} has a negative dimension")
    return out


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _check_array_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise PreprocessError(
            f"dtype {dtype} is not supported on the GPU here; supported: "
            + ", ".join(str(d) for d in SUPPORTED_DTYPES)
        )
    return dtype


class DeviceArray:
    """A minimal C-contiguous n-d array in device memory.

    Owns a :class:`DeviceBuffer`, or views part of one (``buffer=``,
    ``offset=``; several arrays can share one allocation). Exchanges data with
    other libraries without copies through ``__cuda_array_interface__`` (v3) and
    ``__dlpack__``.

    Stream semantics: the array remembers the stream on which work writing it
    may still be pending (``pending_stream``, set by :meth:`copy_from_host` and
    :meth:`mark_pending`). CAI exports report it as ``stream`` (None once
    :meth:`synchronize` or :meth:`to_host` has waited for it); ``__dlpack__``
    makes the consumer's stream wait on it with an event.

    Args:
        shape: dimensions.
        dtype: element type (one of SUPPORTED_DTYPES).
        buffer: existing DeviceBuffer to view; None allocates a new one.
        offset: byte offset into ``buffer`` (a multiple of the item size).
        device: device for a new allocation; None means the current device.
        readonly: exports say the data must not be written.

    Raises:
        PreprocessError: bad shape/dtype, or the view does not fit the buffer.
        MissingDependency, CudaError: allocation needs cuda-python and a GPU.
    """

    def __init__(
        self,
        shape: Any,
        dtype: Any,
        *,
        buffer: Optional[DeviceBuffer] = None,
        offset: int = 0,
        device: Optional[int] = None,
        readonly: bool = False,
    ) -> None:
        self.shape = _as_shape(shape)
        self.dtype = _check_array_dtype(dtype)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        offset = int(offset)
        if buffer is None:
            if offset:
                raise PreprocessError("offset needs an existing buffer")
            buffer = DeviceBuffer(self.nbytes, device=device)
        else:
            if not isinstance(buffer, DeviceBuffer):
                raise PreprocessError(f"buffer must be a DeviceBuffer, got {type(buffer).__name__}")
            if device is not None and int(device) != buffer.device:
                raise PreprocessError(f"buffer is on device {buffer.device}, not {device}")
            if offset < 0 or offset % self.dtype.itemsize:
                raise PreprocessError(f"offset {offset} is not a non-negative multiple of {self.dtype.itemsize}")
            if offset + self.nbytes > buffer.nbytes:
                raise PreprocessError(
                    f"a {self.dtype} array of shape {self.shape} at offset {offset} needs "
                    f"{offset + self.nbytes} bytes; the buffer has {buffer.nbytes}"
                )
        self.buffer = buffer
        self.offset = offset
        self.readonly = bool(readonly)
        self._pending: Optional[int] = None
        self._pending_ref: Any = None  # keeps a Stream object alive while work on it is pending

    @classmethod
    def from_host(cls, array: Any, stream: Any = None, *, device: Optional[int] = None) -> "DeviceArray":
        """Allocate a device array like ``array`` and enqueue the copy on ``stream``."""
        array = np.asarray(array)
        out = cls(array.shape, array.dtype, device=device)
        out.copy_from_host(array, stream)
        return out

    # -- layout ---------------------------------------------------------------

    @property
    def ptr(self) -> int:
        """Device address of element 0 (0 for an empty array)."""
        return self.buffer.ptr + self.offset if self.nbytes else 0

    @property
    def device(self) -> int:
        return self.buffer.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def strides(self) -> tuple[int, ...]:
        """Byte strides (always C-contiguous)."""
        return _c_strides(self.shape, self.dtype.itemsize)

    # -- stream tracking --------------------------------------------------------

    @property
    def pending_stream(self) -> Optional[int]:
        """Handle of the stream on which writes to this array may still be running, or None."""
        return self._pending

    def mark_pending(self, stream: Any) -> None:
        """Record that work on ``stream`` (a kernel, an engine) writes this array.

        If another stream was pending, ``stream`` is first made to wait on it, so
        that one stream is enough to synchronise with everything (the CAI v3
        producer rule).
        """
        handle = stream_handle(stream)
        if self._pending is not None and self._pending != handle:
            _order_after(handle, self._pending)
        self._pending = handle
        self._pending_ref = stream if not isinstance(stream, (int, np.integer)) else None

    def synchronize(self) -> None:
        """Block until pending writes have finished; afterwards exports report no stream."""
        if self._pending is not None:
            _synchronize(self._pending)
            self._pending = self._pending_ref = None

    # -- copies -------------------------------------------------------------------

    def copy_from_host(self, array: Any, stream: Any = None) -> None:
        """Enqueue a copy of host ``array`` (same shape and dtype) into this array on ``stream``.

        Raises:
            PreprocessError: shape/dtype mismatch, or this array is read-only.
        """
        if self.readonly:
            raise PreprocessError("cannot copy into a read-only DeviceArray")
        array = np.asarray(array)
        if array.shape != self.shape or array.dtype != self.dtype:
            raise PreprocessError(
                f"host array {array.dtype}{list(array.shape)} does not match device array "
                f"{self.dtype}{list(self.shape)}"
            )
        array = np.ascontiguousarray(array)
        handle = stream_handle(stream)
        if self._pending is not None and self._pending != handle:
            _order_after(handle, self._pending)  # do not overwrite data still being written/read
        host_to_device(self.ptr, array, array.nbytes, handle)
        if self.nbytes:
            self._pending = handle
            self._pending_ref = stream if not isinstance(stream, (int, np.integer)) else None

    def to_host(self, stream: Any = None, *, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Copy to a host array and wait for it.

        Args:
            stream: stream for the copy; None means the pending stream if there
                is one, else the legacy default stream. A different stream is
                first made to wait on the pending one.
            out: C-contiguous writable array of the same shape and dtype to fill
                (pinned memory makes the copy faster).

        Returns:
            ``out`` or a new array, with the data (the stream has been synchronised).
        """
        if stream is None and self._pending is not None:
            handle = self._pending
        else:
            handle = stream_handle(stream)
            if self._pending is not None and self._pending != handle:
                _order_after(handle, self._pending)
        if out is None:
            out = np.empty(self.shape, self.dtype)
        elif not isinstance(out, np.ndarray) or out.shape != self.shape or out.dtype != self.dtype:
            raise PreprocessError(f"out must be a numpy array of {self.dtype}{list(self.shape)}")
        if self.nbytes:
            device_to_host(out, self.ptr, self.nbytes, handle)
            _synchronize(handle)
            # ``handle`` ran after the pending stream's work, so that work is done too.
            self._pending = self._pending_ref = None
        return out

    # -- interchange --------------------------------------------------------------

    @property
    def __cuda_array_interface__(self) -> dict:
        """CUDA Array Interface v3; ``stream`` is the pending stream (None when nothing is pending).

        A pending legacy default stream (handle 0) is reported as 1, since the
        protocol disallows 0.
        """
        stream = self._pending
        if stream == 0:
            stream = 1
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ptr, self.readonly),
            "version": 3,
            "strides": None,
            "stream": stream,
        }

    def __dlpack_device__(self) -> tuple[DLDeviceType, int]:
        return (DLDeviceType.CUDA, self.device)

    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Optional[tuple[int, int]] = None,
        dl_device: Optional[tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> object:
        """Export as a DLPack capsule (Python array API semantics).

        Args:
            stream: the consumer's stream: None (legacy default), 1 (legacy
                default), 2 (per-thread default), another handle, or -1 (do not
                synchronise). 0 is ambiguous and rejected, as the spec says. The
                consumer's stream is made to wait on the pending one (an event;
                the host does not block).
            max_version: the consumer's highest DLPack version; >= (1, 0) gets a
                versioned capsule, None or (0, x) the legacy one.
            dl_device: ``(kDLCPU, 0)`` exports a host copy (unless copy=False),
                as numpy's own capsule; ``(kDLCUDA, self.device)`` is the
                default; anything else raises.
            copy: True exports a fresh device copy; False forbids copies.

        Raises:
            BufferError: the request cannot be met without breaking ``copy``, is
                not supported, or the array is empty (cuda.core exports no
                NULL pointer).
            MissingDependency: cuda-core is not installed.
        """
        versioned = _wants_versioned(max_version)
        if dl_device is not None:
            want_type, want_id = int(dl_device[0]), int(dl_device[1])
            if want_type == DLDeviceType.CPU:
                if copy is False:
                    raise BufferError("this array is in GPU memory: exporting it to the CPU needs a copy (copy=False)")
                host = self.to_host()
                return host.__dlpack__(max_version=max_version) if versioned else host.__dlpack__()
            if (want_type, want_id) != (DLDeviceType.CUDA, self.device):
                raise BufferError(
                    f"cannot export to DLPack device {(want_type, want_id)}: the array is on "
                    f"{(int(DLDeviceType.CUDA), self.device)}"
                )
        if self.readonly and not copy and not versioned:
            raise BufferError(
                "cannot export a read-only array as a legacy (unversioned) DLPack capsule, which cannot "
                "signal read-only; the consumer must ask for max_version >= (1, 0)"
            )
        if not self.nbytes:
            raise BufferError(
                f"an empty DeviceArray (shape {self.shape}) has no device memory to export through DLPack"
            )
        if stream is None:
            consumer: Optional[int] = 0  # "producer must assume the legacy default stream"
        elif isinstance(stream, (int, np.integer)) and not isinstance(stream, bool) and int(stream) == -1:
            consumer = None
        elif isinstance(stream, (int, np.integer)) and not isinstance(stream, bool) and int(stream) == 0:
            raise BufferError(
                "stream=0 is disallowed by DLPack for CUDA (ambiguous); pass 1 for the legacy default stream"
            )
        else:
            consumer = stream_handle(stream)
        if consumer is not None and self._pending is not None:
            _order_after(consumer, self._pending)

        source: DeviceArray = self
        if copy:
            source = DeviceArray(self.shape, self.dtype, device=self.device)
            copy_stream = consumer if consumer is not None else (self._pending or 0)
            rt = _runtime("Copying on the GPU")
            check(
                rt.cudaMemcpyAsync(source.ptr, self.ptr, self.nbytes,
                                   rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, copy_stream),
                "cudaMemcpyAsync(device to device)",
            )
            if consumer is None:  # consumer asked for no synchronisation: hand over finished data
                _synchronize(copy_stream)
        return _export_dlpack(source, versioned)

    def __repr__(self) -> str:
        return (
            f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device={self.device}, "
            f"ptr=0x{self.buffer._ptr + self.offset:x}{', readonly' if self.readonly else ''})"
        )


# ---------------------------------------------------------------------------
# Views of foreign device memory
# ---------------------------------------------------------------------------


class DeviceView:
    """A borrowed view of device memory from another library (see :func:`as_device_view`).

    Attributes:
        ptr: device address of element 0.
        shape: dimensions.
        strides: strides in bytes.
        dtype: numpy dtype.
        device_id: CUDA device ordinal, or None when it could not be determined
            (CUDA Array Interface without cuda-python or without a driver).
        owner: keeps the memory alive: the source object (CAI) or cuda.core's
            ``StridedMemoryView`` of the consumed capsule (DLPack), which calls
            the producer's deleter once it is dropped.
        stream_sync: the stream handle on which the data is safe to use, i.e.
            the one ordered after the producer's pending work; None when it is
            safe on any stream (nothing pending, or the host waited).
        readonly: the producer marked the data read-only.
    """

    __slots__ = ("ptr", "shape", "strides", "dtype", "device_id", "owner", "stream_sync", "readonly")

    def __init__(self, ptr, shape, strides, dtype, device_id, owner, stream_sync, readonly=False) -> None:
        self.ptr = int(ptr)
        self.shape = tuple(shape)
        self.strides = tuple(strides)
        self.dtype = np.dtype(dtype)
        self.device_id = device_id
        self.owner = owner
        self.stream_sync = stream_sync
        self.readonly = bool(readonly)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def is_c_contiguous(self) -> bool:
        if self.size <= 1:
            return True
        return all(
            stride == expected
            for dim, stride, expected in zip(self.shape, self.strides, _c_strides(self.shape, self.dtype.itemsize))
            if dim != 1
        )

    def release(self) -> None:
        """Drop the owner reference; for DLPack that calls the producer's deleter (unless you hold ``owner``)."""
        self.owner = None

    def __enter__(self) -> "DeviceView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"DeviceView(ptr=0x{self.ptr:x}, shape={self.shape}, strides={self.strides}, dtype={self.dtype}, "
            f"device_id={self.device_id}, stream_sync={self.stream_sync})"
        )


def _describe(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}".replace("builtins.", "")


def _host_memory_error(name: str, obj: Any, how: str) -> PreprocessError:
    return PreprocessError(
        f"{name} is in host memory ({_describe(obj)}, {how}) but device memory is expected: copy it "
        "to the GPU first (medge.runtime.cuda.DeviceArray.from_host, or .cuda() / cupy.asarray in "
        "your framework), or pass it to the CPU code path"
    )


def _pointer_attributes(ptr: int) -> Optional[tuple[int, int]]:
    """``(cudaMemoryType, device)`` of ``ptr``, or None when CUDA cannot tell (no cuda-python/driver)."""
    if not ptr:
        return None
    try:
        rt = _runtime()
    except MissingDependency:
        return None
    result = rt.cudaPointerGetAttributes(ptr)
    if int(result[0]) != 0:
        rt.cudaGetLastError()  # do not leave a sticky-looking error for later launch checks
        return None
    attrs = result[1]
    return int(attrs.type), int(attrs.device)


_MEMORY_UNREGISTERED, _MEMORY_HOST, _MEMORY_DEVICE, _MEMORY_MANAGED = 0, 1, 2, 3


def _validate_view(view: DeviceView, name: str, require_writable: bool, require_contiguous: bool,
                   dtypes: Optional[Iterable[Any]]) -> None:
    allowed = SUPPORTED_DTYPES if dtypes is None else tuple(np.dtype(d) for d in dtypes)
    if view.dtype not in allowed:
        raise PreprocessError(
            f"{name} has dtype {view.dtype}; expected " + ", ".join(str(d) for d in allowed)
        )
    if require_writable and view.readonly:
        raise PreprocessError(f"{name} is read-only but is used as an output: pass a writable array")
    if require_contiguous and not view.is_c_contiguous:
        raise PreprocessError(
            f"{name} is not C-contiguous (shape {view.shape}, byte strides {view.strides}): "
            "make it contiguous first (.contiguous() in torch, cupy.ascontiguousarray)"
        )


# cudaStreamLegacy: the legacy default stream, which synchronises with blocking streams.
_LEGACY_DEFAULT_STREAM = 1


def _dlpack_cuda_device(obj: Any) -> bool:
    """True when ``obj`` exports DLPack on a CUDA device (kDLCUDA or kDLCUDAManaged)."""
    if not (hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__")):
        return False
    try:
        return int(obj.__dlpack_device__()[0]) in (int(DLDeviceType.CUDA), int(DLDeviceType.CUDA_MANAGED))
    except Exception:  # noqa: BLE001 - a failing protocol method means "not usable through DLPack"
        return False


def _view_from_cai(obj: Any, cai: Any, name: str, consumer: Optional[int], sync: bool) -> DeviceView:
    if not isinstance(cai, dict):
        raise PreprocessError(f"{name}: __cuda_array_interface__ of {_describe(obj)} is not a dict")
    try:
        shape = tuple(int(d) for d in cai["shape"])
        typestr = cai["typestr"]
        ptr, readonly = cai["data"]
        ptr = int(ptr or 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise PreprocessError(f"{name}: malformed __cuda_array_interface__ ({exc!r})") from None
    if cai.get("mask") is not None:
        raise PreprocessError(f"{name}: masked CUDA arrays are not supported")
    try:
        dtype = np.dtype(typestr)
    except TypeError:
        raise PreprocessError(f"{name}: unknown typestr {typestr!r} in __cuda_array_interface__") from None
    if not dtype.isnative:
        raise PreprocessError(f"{name}: dtype {typestr!r} is not in native byte order")
    strides = cai.get("strides")
    strides = _c_strides(shape, dtype.itemsize) if strides is None else tuple(int(s) for s in strides)
    if len(strides) != len(shape):
        raise PreprocessError(f"{name}: strides {strides} do not match shape {shape}")

    device_id = None
    attributes = _pointer_attributes(ptr)
    if attributes is not None:
        memory_type, device_id = attributes
        if memory_type in (_MEMORY_UNREGISTERED, _MEMORY_HOST):
            raise _host_memory_error(name, obj, "its __cuda_array_interface__ pointer is host memory")

    # CAI v3 synchronisation (numba-cuda docs, "Synchronization"): ``stream`` names the
    # stream with pending producer work. None: nothing to do. Otherwise the consumer's
    # stream waits on an event recorded there, or, with no consumer stream, the host
    # waits. 0 is disallowed by the spec; it is read as the legacy default stream.
    version = int(cai.get("version", 0))
    producer = cai.get("stream") if version >= 3 else None
    if version < 3 and sync:
        # No stream information (CAI v2, e.g. torch): order after the legacy default stream,
        # where such producers' work goes unless they say otherwise. Work on other producer
        # streams is not covered: as_device_view prefers DLPack for objects that offer it.
        producer = _LEGACY_DEFAULT_STREAM
    stream_sync: Optional[int] = None
    if producer is not None and sync:
        producer = int(producer)
        if consumer is None:
            _synchronize(producer)
        else:
            _order_after(consumer, producer)
            stream_sync = consumer
    elif producer is not None:
        stream_sync = int(producer)  # the caller opted out: tell it where the data is safe
    return DeviceView(ptr, shape, strides, dtype, device_id, obj, stream_sync, bool(readonly))


def _view_from_dlpack(obj: Any, name: str, consumer: Optional[int], sync: bool) -> DeviceView:
    try:
        device_type, _ = (int(v) for v in obj.__dlpack_device__())
    except Exception as exc:
        raise PreprocessError(f"{name}: __dlpack_device__() of {_describe(obj)} failed: {exc}") from exc
    if device_type in (DLDeviceType.CPU, DLDeviceType.CUDA_HOST):
        kind = "DLPack device kDLCPU" if device_type == DLDeviceType.CPU else "DLPack device kDLCUDAHost (pinned)"
        raise _host_memory_error(name, obj, kind)
    if device_type not in _DEVICE_ACCESSIBLE:
        raise PreprocessError(
            f"{name} is on DLPack device type {device_type}; medge needs CUDA device memory "
            f"(kDLCUDA={int(DLDeviceType.CUDA)} or kDLCUDAManaged={int(DLDeviceType.CUDA_MANAGED)})"
        )
    # DLPack stream semantics: the consumer names its stream and the producer orders
    # its pending work before it. 0 is disallowed (ambiguous), so the legacy default
    # stream is passed as 1; -1 asks the producer not to synchronise.
    if not sync:
        dl_stream: int = -1
    elif consumer is None:
        dl_stream = 1
    else:
        dl_stream = 1 if consumer == 0 else consumer
    core = _core(f"Reading {name} through DLPack")
    smv = None
    try:
        # cuda.core calls obj.__dlpack__(stream=dl_stream, max_version=(1, x)), retries without
        # max_version for older producers, and calls the producer's deleter when smv is dropped.
        smv = core.StridedMemoryView.from_dlpack(obj, dl_stream)
        shape, counts, dtype = tuple(smv.shape), smv.strides, np.dtype(smv.dtype)
        capsule_device = int(smv.__dlpack_device__()[0])
    except (BufferError, TypeError, ValueError, NotImplementedError, AssertionError) as exc:
        # AssertionError is cuda.core's answer when __dlpack__ returns no unused capsule.
        smv = None  # releases the tensor now, not when this traceback goes
        raise PreprocessError(
            f"{name}: {_describe(obj)}.__dlpack__ gave no usable DLPack tensor ({type(exc).__name__}: {exc})"
        ) from None
    try:
        if capsule_device != device_type:
            raise PreprocessError(
                f"{name}: __dlpack_device__ says device type {device_type} but the capsule says {capsule_device}"
            )
        stream_sync: Optional[int] = None if dl_stream == -1 else dl_stream
        if sync and consumer is None:
            _synchronize(1)  # no consumer stream: wait on the host so any stream may use the data
            stream_sync = None
    except BaseException:
        smv = None
        raise
    strides = _c_strides(shape, dtype.itemsize) if counts is None else tuple(c * dtype.itemsize for c in counts)
    return DeviceView(smv.ptr, shape, strides, dtype, smv.device_id, smv, stream_sync, smv.readonly)


def as_device_view(
    obj: Any,
    *,
    stream: Any = None,
    require_writable: bool = False,
    require_contiguous: bool = False,
    dtypes: Optional[Iterable[Any]] = None,
    sync: bool = True,
    name: str = "array",
) -> DeviceView:
    """View CUDA device memory exported by another library, without copying.

    Tries ``__cuda_array_interface__`` first (torch, CuPy, numba, pycuda,
    DeviceArray), then ``__dlpack__`` / ``__dlpack_device__`` (JAX, ...).

    Synchronisation (``sync=True``, the default): with a ``stream`` given, that
    stream is ordered after the producer's pending work (CAI: an event recorded
    on the producer's ``stream`` entry and waited on by yours; DLPack: your
    stream is passed to ``__dlpack__`` and the producer orders itself before
    it); the host does not block and ``stream_sync`` is your stream. With no
    ``stream``, the host waits for the producer's pending work (``stream_sync``
    None): correct for any stream, at the cost of a blocking wait.
    ``sync=False`` skips all of this (the CAI/DLPack "user knows best" option):
    ``stream_sync`` then reports the producer's stream, if any.

    Args:
        obj: the array.
        stream: the stream you will use the memory on (see :func:`stream_handle`).
        require_writable: refuse read-only arrays (for outputs).
        require_contiguous: refuse non-C-contiguous layouts.
        dtypes: accepted dtypes; None means SUPPORTED_DTYPES.
        sync: follow the protocols' stream synchronisation (see above).
        name: what to call the array in error messages ("input 'image'").

    Returns:
        A :class:`DeviceView`; call ``release()`` (or use ``with``) when done,
        which matters for DLPack producers.

    Raises:
        PreprocessError: host memory, an unsupported device or dtype, a
            read-only output, a non-contiguous layout when required, or an
            object exporting neither protocol.
        MissingDependency: synchronisation is needed but cuda-python is
            missing, or a DLPack producer is read without cuda-core.
        CudaError: a CUDA call failed.
    """
    consumer = None if stream is None else stream_handle(stream)
    if isinstance(obj, DeviceView):
        view = obj
    else:
        try:
            cai = obj.__cuda_array_interface__  # torch raises AttributeError for CPU tensors
        except AttributeError:
            cai = None
        # CAI v3 says where producer work is pending; DLPack's __dlpack__(stream=...) orders it
        # before our stream; CAI v2 (torch) can express neither, so DLPack is preferred over it.
        cai_has_streams = isinstance(cai, dict) and int(cai.get("version", 0) or 0) >= 3
        if cai is not None and cai_has_streams:
            view = _view_from_cai(obj, cai, name, consumer, sync)
        elif _dlpack_cuda_device(obj):
            view = _view_from_dlpack(obj, name, consumer, sync)
        elif cai is not None:
            view = _view_from_cai(obj, cai, name, consumer, sync)
        elif hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
            view = _view_from_dlpack(obj, name, consumer, sync)
        elif (
            isinstance(obj, (np.ndarray, np.generic, list, tuple, memoryview, bytes, bytearray))
            or hasattr(obj, "__array_interface__")
            or hasattr(obj, "__array__")
        ):
            raise _host_memory_error(name, obj, "no __cuda_array_interface__ or CUDA DLPack export")
        else:
            raise PreprocessError(
                f"{name} must be a CUDA array exporting __cuda_array_interface__ or DLPack "
                f"(torch, CuPy, numba, JAX, medge DeviceArray); got {_describe(obj)}"
            )
    try:
        _validate_view(view, name, require_writable, require_contiguous, dtypes)
    except BaseException:
        if view is not obj:
            view.release()
        raise
    return view
