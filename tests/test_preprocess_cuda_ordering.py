"""Stream and lifetime ordering of the CUDA path, checked on any machine with a recording fake of CUDA.

The kernel itself is checked against the reference on a GPU (test_preprocess.py, device "cuda"); these
tests pin what the Python layer must do around it, which a GPU run can easily miss: synchronise before
releasing inputs or freeing staging memory (also on errors), and only report a stream as pending when
it is the caller's.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import medge
from medge import PreprocessSpec, _preprocess_cuda
from medge.errors import CudaError
from medge.runtime import cuda as mc

SPEC = PreprocessSpec(4, 4, voi="range", value_range=(0, 100))


class Recorder:
    def __init__(self):
        self.events: list[tuple] = []

    def __call__(self, *event):
        self.events.append(event)

    def names(self):
        return [e[0] for e in self.events]


@pytest.fixture
def fake_cuda(monkeypatch):
    rec = Recorder()
    real = medge.preprocess.__globals__["_native"]()

    class Native:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def cuda_compiled():
            return True

        @staticmethod
        def cuda_device_count():
            return 1

        fail = False

        def preprocess_cuda(self, params, out_ptr, out_bytes, out_params, stream):
            rec("launch", stream, len(params))
            if self.fail:
                raise CudaError("launch failed (fake)")

    class Stream:
        def __init__(self, device=None):
            self.handle = 0x5000
            rec("stream_create")

        def synchronize(self):
            rec("sync", self.handle)

        def close(self):
            rec("stream_close")

    class DeviceBuffer:
        allocated = 0

        def __init__(self, nbytes, device=None):
            DeviceBuffer.allocated += 1
            self.ptr, self.nbytes, self.device = 0x9000 * DeviceBuffer.allocated, nbytes, device
            rec("staging_alloc", nbytes, device)

        def close(self):
            rec("staging_free", self.nbytes, self.device)

    class DeviceArray:
        def __init__(self, shape, dtype, device=None):
            self.ptr, self.shape, self.nbytes = 0xA000, shape, int(np.prod(shape)) * np.dtype(dtype).itemsize

        def mark_pending(self, stream):
            rec("mark_pending", stream)

    class View:
        def __init__(self, obj):
            self.ptr, self.shape, self.dtype = 0xB000, obj.shape, np.dtype(obj.dtype)
            self.ndim, self.nbytes = len(obj.shape), int(np.prod(obj.shape)) * self.dtype.itemsize
            self.strides = tuple(int(s) for s in np.empty(obj.shape, self.dtype).strides)

        def release(self):
            rec("release")

    monkeypatch.setattr(_preprocess_cuda, "_STAGING", _preprocess_cuda._StagingPool())  # no buffers from other tests
    monkeypatch.setattr(mc, "Stream", Stream)
    monkeypatch.setattr(mc, "DeviceBuffer", DeviceBuffer)
    monkeypatch.setattr(mc, "DeviceArray", DeviceArray)
    monkeypatch.setattr(mc, "as_device_view", lambda obj, **kw: (rec("view", kw.get("name")), View(obj))[1])
    monkeypatch.setattr(mc, "host_to_device", lambda dst, src, stream=None, nbytes=None: rec("h2d", stream))
    monkeypatch.setattr(mc, "_synchronize", lambda handle: rec("sync", handle))
    monkeypatch.setattr(mc, "_on_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(mc, "stream_handle", lambda stream: int(stream.handle if hasattr(stream, "handle") else stream))
    native = Native()
    return rec, native


class FakeDeviceImage:
    """A device array of stored values (only the protocol's presence matters to the code under test)."""

    def __init__(self, shape=(8, 8), dtype=np.uint16):
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.__cuda_array_interface__ = {"shape": shape, "typestr": self.dtype.str, "data": (0xB000, False),
                                         "version": 3, "stream": None}


def run(native, images, stream=None, out=None):
    return _preprocess_cuda.run(native, images, SPEC, out, stream, 0)


def test_host_inputs_are_staged_synchronised_then_kept_for_reuse(fake_cuda):
    rec, native = fake_cuda
    result = run(native, [np.zeros((8, 8), np.uint16)])
    names = rec.names()
    assert names.index("staging_alloc") < names.index("h2d") < names.index("launch") < names.index("sync")
    # The staging buffer goes back to medge's pool (after the synchronise that follows the launch), not to cudaFree.
    assert "staging_free" not in names
    assert names[-1] == "stream_close" and "mark_pending" not in names
    assert isinstance(result, mc.DeviceArray)


def test_device_inputs_on_medge_stream_are_released_after_the_sync(fake_cuda):
    rec, native = fake_cuda
    run(native, [FakeDeviceImage()])
    names = rec.names()
    assert names.index("launch") < names.index("sync") < names.index("release") < names.index("stream_close")
    assert "mark_pending" not in names  # medge's own stream is gone: nothing may point at it


def test_caller_stream_is_asynchronous_and_reported_pending(fake_cuda):
    rec, native = fake_cuda

    class CallerStream:
        handle = 0x7777

    caller = CallerStream()
    run(native, [FakeDeviceImage()], stream=caller)
    names = rec.names()
    assert "stream_create" not in names and "sync" not in names
    assert ("launch", 0x7777, 1) in rec.events
    assert ("mark_pending", caller) in rec.events  # the stream object itself, kept alive by the result


def test_failed_launch_still_synchronises_before_freeing_and_closes(fake_cuda):
    rec, native = fake_cuda
    native.fail = True
    with pytest.raises(CudaError, match="fake"):
        run(native, [np.zeros((8, 8), np.uint16), FakeDeviceImage()])
    names = rec.names()
    assert names.index("launch") < names.index("sync")  # before the staging buffer can be lent again
    assert names.index("launch") < names.index("release")
    assert "stream_close" in names
    assert len(_preprocess_cuda._STAGING._free[0]) == 1  # the stream finished cleanly: the buffer is reusable


def test_out_array_is_viewed_writable_and_shape_checked(fake_cuda):
    rec, native = fake_cuda
    out = FakeDeviceImage(shape=(1, 1, 4, 4), dtype=np.float32)
    assert run(native, [FakeDeviceImage()], out=out) is out
    assert ("view", "out") in rec.events
    with pytest.raises(medge.errors.PreprocessError, match="out must have shape"):
        run(native, [FakeDeviceImage(), FakeDeviceImage()], out=out)
