"""The CUDA path of medge.preprocess (private; see preprocess.preprocess).

Host images are staged into a device buffer (pageable copies, so the host
arrays are free as soon as the call returns); device arrays are read in place.
The kernel writes straight into the caller's output (any CUDA array) or a new
DeviceArray.

Staging buffers are kept between calls (``_STAGING``): allocated once per
device, grown geometrically when a larger batch arrives, and lent to one call
at a time. Allocating and freeing one per call would put a ``cudaMalloc`` /
``cudaFree`` into every call, and ``cudaFree`` synchronises the whole device,
which breaks a CUDA graph that another thread is capturing at that moment.
A call with host images waits for its stream before it returns the buffer, and
an error found by that wait (a fault inside the kernel) is raised as
CudaError rather than surfacing later in someone else's CUDA call.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .errors import BackendUnavailable, CudaError, PreprocessError
from .image import PixelSemantics
from .preprocess import PreprocessSpec, _as_images, _frame_params, _host_frames, _kernel_array, _output_params

_KERNEL_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")
_STAGING_ALIGNMENT = 256  # bytes: keeps every staged frame's start aligned for coalesced loads
_ROW_ALIGNMENT = 16  # bytes: staged rows are padded to this so the kernel can use 16-byte vector loads
_STAGING_MIN_BYTES = 1 << 20  # first allocation on a device; later ones at least double


class _StagingPool:
    """Device buffers for staging host images, reused across calls.

    ``acquire`` lends a buffer of at least ``nbytes`` on ``device`` to one call; ``release``
    takes it back once the call's stream has finished with it. Concurrent calls (other threads,
    other streams) get distinct buffers, so none overwrites another's staged images; the pool
    holds at most as many buffers per device as calls ever ran at once. A buffer too small is
    replaced by one at least twice its size, so a growing workload frees and allocates
    O(log size) times, not once per call. ``discard`` drops a buffer whose stream state is
    unknown (the stream reported an error).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list] = {}

    def acquire(self, mc, device: int, nbytes: int):
        with self._lock:
            free = self._free.setdefault(device, [])
            fitting = [b for b in free if b.nbytes >= nbytes]
            if fitting:
                buffer = min(fitting, key=lambda b: b.nbytes)
                free.remove(buffer)
                return buffer
            smaller = free.pop() if free else None
        size = max(nbytes, _STAGING_MIN_BYTES, 2 * smaller.nbytes if smaller is not None else 0)
        size = -(-size // _STAGING_MIN_BYTES) * _STAGING_MIN_BYTES
        if smaller is not None:
            smaller.close()  # growth only: rare by construction
        return mc.DeviceBuffer(size, device=device)

    def release(self, device: int, buffer) -> None:
        with self._lock:
            self._free.setdefault(device, []).append(buffer)

    @staticmethod
    def discard(buffer) -> None:
        _quietly(buffer.close)

    def clear(self) -> None:
        """Free every idle buffer (tests; a process that is done with the GPU)."""
        with self._lock:
            buffers = [b for free in self._free.values() for b in free]
            self._free.clear()
        for buffer in buffers:
            _quietly(buffer.close)


_STAGING = _StagingPool()


def _is_device_array(obj: Any) -> bool:
    if hasattr(obj, "__cuda_array_interface__"):
        try:
            obj.__cuda_array_interface__  # torch CPU tensors raise here
            return True
        except (AttributeError, RuntimeError):
            return False
    if hasattr(obj, "__dlpack_device__"):
        try:
            return int(obj.__dlpack_device__()[0]) in (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
        except Exception:  # noqa: BLE001 - a foreign object's protocol failure means "not a device array"
            return False
    return False


def _staged_rows(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``array`` whose rows are padded to a multiple of 16 bytes.

    The kernel loads 16 bytes at a time from rows that start on a 16-byte boundary, and one
    element at a time otherwise; staging is the one place where medge chooses the layout.
    """
    height, width = array.shape
    pitch = -(-width * array.itemsize // _ROW_ALIGNMENT) * _ROW_ALIGNMENT // array.itemsize
    if pitch == width:
        return np.ascontiguousarray(array)
    padded = np.zeros((height, pitch), array.dtype)
    padded[:, :width] = array
    return padded


def _device_semantics(shape: tuple[int, ...], dtype: np.dtype) -> PixelSemantics:
    """Default semantics of a raw device array of stored values (as Image.from_array)."""
    frames = 1 if len(shape) == 2 else shape[0]
    bits = dtype.itemsize * 8
    return PixelSemantics(
        rows=shape[-2], columns=shape[-1], number_of_frames=frames, bits_allocated=bits, bits_stored=bits,
        pixel_representation=1 if dtype.kind == "i" else 0,
    )


def run(native, images: Any, spec: PreprocessSpec, out: Any, stream: Any, device: int):
    if not native.cuda_compiled():
        raise BackendUnavailable(
            "this medge build has no CUDA kernels (nvcc was not found when it was built); use device='cpu' "
            "or reinstall medge with the CUDA toolkit on PATH"
        )
    if native.cuda_device_count() == 0:
        raise BackendUnavailable(f"no usable CUDA device ({native.cuda_status()}); use device='cpu'")
    if device < 0 or device >= native.cuda_device_count():
        raise BackendUnavailable(f"CUDA device {device} does not exist ({native.cuda_device_count()} visible)")
    from .runtime import cuda as mc

    with mc._on_device(device):
        own_stream = mc.Stream(device=device) if stream is None else None
        handle = own_stream.handle if own_stream is not None else mc.stream_handle(stream)
        views: list = []
        try:
            result = _run_on_stream(native, mc, images, spec, out, handle, device, views, stream)
            if own_stream is not None:
                own_stream.synchronize()  # the result is complete when we return
        finally:
            if own_stream is not None:
                _quietly(own_stream.synchronize)  # on errors too: nothing may still read what we release
            # Views are released only after the stream reached them (own stream). With the caller's
            # stream the call is asynchronous: the caller keeps its arrays alive until its stream has
            # consumed them, as for any stream-ordered API.
            for view in views:
                view.release()
            if own_stream is not None:
                _quietly(own_stream.close)
    return result


def _quietly(action) -> None:
    """Cleanup that must not mask the exception being handled."""
    try:
        action()
    except Exception:  # noqa: BLE001 - reported by the primary error, if any
        pass


def _run_on_stream(native, mc, images: Any, spec: PreprocessSpec, out: Any, handle: int, device: int, views: list,
                   caller_stream: Any):
    items = images if isinstance(images, (list, tuple)) else [images]
    params: list = []
    host: list[tuple[int, np.ndarray]] = []  # (index into params, frame as staged) to stage
    widths: dict[int, int] = {}  # index into params -> frame width (the staged rows may be padded)
    for index, item in enumerate(items):
        if _is_device_array(item):
            view = mc.as_device_view(item, stream=handle, dtypes=_KERNEL_DTYPES, name=f"image {index}")
            views.append(view)
            if view.ndim not in (2, 3):
                raise PreprocessError(f"image {index}: device arrays must be 2-D or 3-D, got shape {view.shape}")
            itemsize = view.dtype.itemsize
            rows = view.shape[-2]
            if view.strides[-1] != itemsize or (rows > 1 and (view.strides[-2] % itemsize
                                                              or view.strides[-2] < view.shape[-1] * itemsize)):
                raise PreprocessError(f"image {index}: device array rows must be contiguous")
            semantics = _device_semantics(view.shape, view.dtype)
            frame_stride = view.strides[0] if view.ndim == 3 else 0
            for frame in range(semantics.number_of_frames):
                p = _frame_params(native, semantics, frame, spec, f"image {index}")
                p.pixels_address = view.ptr + frame * frame_stride
                p.height, p.width = view.shape[-2], view.shape[-1]
                p.row_stride = view.strides[-2] // itemsize if rows > 1 else view.shape[-1]
                p.pixel_type = getattr(native.PixelType, view.dtype.name)
                p.buffer_bytes = ((p.height - 1) * p.row_stride + p.width) * itemsize
                params.append(p)
        else:
            for image in _as_images([item]):
                arrays, frame_params = _host_frames(native, [image], spec)
                for array, p in zip(arrays, frame_params):
                    array = _kernel_array(array, f"image {index}")
                    widths[len(params)] = array.shape[1]
                    host.append((len(params), _staged_rows(array)))
                    params.append(p)

    staging = None
    try:
        if host:
            offsets, total = [], 0
            for _, array in host:
                offsets.append(total)
                total += -(-array.nbytes // _STAGING_ALIGNMENT) * _STAGING_ALIGNMENT
            staging = _STAGING.acquire(mc, device, total)
            for (slot, array), offset in zip(host, offsets):
                mc.host_to_device(staging.ptr + offset, array, stream=handle)
                p = params[slot]
                p.pixels_address = staging.ptr + offset
                p.height = array.shape[0]
                p.row_stride = array.shape[1]  # elements, padding included (see _staged_rows)
                p.pixel_type = getattr(native.PixelType, array.dtype.name)
                p.buffer_bytes = array.nbytes
                p.width = widths[slot]

        shape = (len(params), *spec.output_shape_per_image)
        if out is None:
            result = mc.DeviceArray(shape, spec.dtype, device=device)
            out_ptr, out_bytes = result.ptr, result.nbytes
        else:
            view = mc.as_device_view(out, stream=handle, require_writable=True, require_contiguous=True,
                                     dtypes=(spec.dtype,), name="out")
            views.append(view)
            if tuple(view.shape) != shape:
                raise PreprocessError(f"out must have shape {shape}, got {tuple(view.shape)}")
            result, out_ptr, out_bytes = out, view.ptr, view.nbytes

        native.preprocess_cuda(params, out_ptr, out_bytes, _output_params(native, spec), handle)
    except BaseException:
        if staging is not None:
            # The staged frames must outlive every kernel that reads them (also when a later launch
            # failed); the error in flight is the one to report.
            try:
                mc._synchronize(handle)
            except Exception:  # noqa: BLE001 - the stream's state is unknown: never lend this buffer again
                _STAGING.discard(staging)
            else:
                _STAGING.release(device, staging)
        raise
    if staging is not None:
        # Host images make the call synchronous: the buffer goes back to the pool only once the kernel
        # has read it. A failure here is the kernel's own (an illegal address, say): raise it now,
        # instead of leaving a sticky error for the next CUDA call (TensorRT's, typically) to trip on.
        try:
            mc._synchronize(handle)
        except CudaError as exc:
            _STAGING.discard(staging)
            raise CudaError(f"the preprocessing kernel failed on the GPU: {exc}") from exc
        except BaseException:
            _STAGING.discard(staging)
            raise
        _STAGING.release(device, staging)
    if caller_stream is not None and isinstance(result, mc.DeviceArray) and staging is None:
        # Asynchronous on the caller's stream: consumers of the result must order after it. Recorded
        # with the caller's stream object, which the array keeps alive. (Work on a stream medge owns is
        # synchronised before return, so such results have nothing pending.)
        result.mark_pending(caller_stream)
    return result
