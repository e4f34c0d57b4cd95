"""The GPU path made right before it meets a GPU (issue 12, part 1), on this CPU machine.

Each test reproduces one finding with the stand-ins of ``test_tensorrt_backend``
(``FakeCuda``: cuda-python's runtime with host memory; ``fake_trt``: a TensorRT
module) where a GPU would be needed:

- TensorRT-RTX on a GPU it cannot target (Hopper 9.0, Orin 8.7) is refused
  before any build, naming the GPU and RTX's targets, as BackendUnavailable, so
  ``backend="auto"`` goes on to the next backend;
- engine-cache builds target the GPU's own compute capability and run on the
  requested device (the previous device is current again afterwards);
- full TensorRT captures the CUDA graph of every batch size at load, never
  lazily while serving;
- TensorRT-RTX's runtime cache (its JIT-compiled kernels) is kept beside the
  engine cache, loaded when present, and discarded when corrupt;
- ``MEDGE_EXPECT_GPU=1`` turns the skip of any test marked ``gpu`` into a failure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from medge.errors import BackendUnavailable
from medge.runtime import cuda
from medge.runtime.backends.tensorrt import TensorRTBackend

from .test_tensorrt_backend import C, H, W, FakeCuda, _backend, _fill, _install, _reference, fake_trt  # noqa: F401

H100 = (b"NVIDIA H100 80GB HBM3\0", (9, 0))
ORIN = (b"Orin\0", (8, 7))
T4 = (b"Tesla T4\0", (7, 5))
RTX_4090 = (b"NVIDIA GeForce RTX 4090\0", (8, 9))
GRAPH_BYTES = b"the fp32 graph (never parsed: build_engine is replaced here)"


def _gpu(monkeypatch, which, devices=1) -> FakeCuda:
    name, cc = which
    rt = FakeCuda(devices=devices, name=name, compute_capability=cc)
    monkeypatch.setattr(cuda, "_RT", rt)
    return rt


def _bundle(engines=()):
    """What ``_load_tensorrt`` reads of a bundle: manifest, file hashes, verified bytes."""
    contents = {"model.onnx": GRAPH_BYTES}
    entries = []
    for entry, plan in engines:
        contents[entry["file"]] = plan
        entries.append(entry)
    manifest = {"graphs": {"fp32": {"file": "model.onnx", "precision": "fp32"}},
                "gates": {"verdicts": {"fp32": {"verdict": "reference"}}},
                "profile": {"min": 1, "opt": 2, "max": 8}, "engines": entries}
    files = {name: types.SimpleNamespace(sha256=hashlib.sha256(data).hexdigest()) for name, data in contents.items()}
    return types.SimpleNamespace(manifest=manifest, files=files, read_verified=lambda name: contents[name])


def _selection(bundle):
    from medge.runtime.model import _Selection

    return _Selection(bundle.manifest, None, False, None, None)


def _load_rtx(bundle, cache_dir, device=0, use_cuda_graphs=True):
    from medge.runtime.model import _load_tensorrt

    return _load_tensorrt(bundle, "tensorrt_rtx", device, _selection(bundle), 8, cache_dir, use_cuda_graphs)


class _Builds:
    """Stands in for ``medge.convert.engine.build_engine``: records each call and the device current during it."""

    def __init__(self, rt: FakeCuda, plan: bytes = b"FAKE plan built here") -> None:
        self.rt, self.plan, self.calls = rt, plan, []

    def __call__(self, onnx_path, output_path, **kwargs):
        self.calls.append({"onnx": Path(onnx_path).read_bytes(), "device": self.rt.current, **kwargs})
        Path(output_path).write_bytes(self.plan)
        return types.SimpleNamespace(file=str(output_path))


@pytest.fixture
def builds(monkeypatch):
    """Replace build_engine; the test gives it the FakeCuda (``builds.rt = ...``) before loading."""
    import medge.convert.engine as engine

    recorder = _Builds(None)
    monkeypatch.setattr(engine, "build_engine", recorder)
    return recorder


def _no_builds(monkeypatch):
    import medge.convert.engine as engine

    def forbidden(*args, **kwargs):
        raise AssertionError("an engine was built for a GPU TensorRT-RTX cannot target")

    monkeypatch.setattr(engine, "build_engine", forbidden)


# =========================================================================== RTX on a GPU it cannot target


@pytest.mark.parametrize("which, family", [(H100, "Hopper"), (ORIN, "Orin")])
def test_rtx_on_a_gpu_it_cannot_target_is_refused_before_any_build(monkeypatch, tmp_path, which, family):
    _gpu(monkeypatch, which)
    _install(monkeypatch, cuda._RT, flavour="tensorrt_rtx")
    _no_builds(monkeypatch)
    with pytest.raises(BackendUnavailable) as caught:
        _load_rtx(_bundle(), tmp_path)
    text = str(caught.value)
    name = which[0].rstrip(b"\0").decode()
    cc = f"{which[1][0]}.{which[1][1]}"
    assert name in text and f"compute capability {cc}" in text and family in text, text
    assert "8.6 (Ampere" in text and "8.9 (Ada" in text and "12.0 (Blackwell" in text, text  # what RTX targets
    assert "tensorrt" in text.lower() and "onnxruntime" in text.lower(), text  # what to do instead
    assert list(tmp_path.iterdir()) == [], "the engine cache was touched"


def test_rtx_backend_refuses_a_gpu_it_cannot_target_before_creating_a_runtime(monkeypatch):
    rt = _gpu(monkeypatch, H100)
    trt = _install(monkeypatch, rt, flavour="tensorrt_rtx")
    with pytest.raises(BackendUnavailable, match=r"NVIDIA H100 80GB HBM3 \(compute capability 9.0"):
        _backend("tensorrt_rtx")
    assert trt.runtimes == 0 and rt.memory == {} and rt.streams == set()


def test_rtx_unsupported_reason_names_the_gpu_or_is_none(monkeypatch):
    """What the gpu_engine fixture (and tests/test_runtime.py's GPU test) skip with on such a GPU."""
    from medge.runtime.backends.tensorrt import rtx_unsupported_reason

    trt = fake_trt(FakeCuda(), version="1.7.1.116")
    assert rtx_unsupported_reason(trt, {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}) is None
    assert rtx_unsupported_reason(trt, {"name": "Tesla T4", "compute_capability": "7.5"}) is None  # opt-in target
    text = rtx_unsupported_reason(trt, {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    assert text.startswith("TensorRT-RTX 1.7.1.116 cannot run on NVIDIA H100 80GB HBM3 (compute capability 9.0, "
                           "Hopper"), text


def test_auto_goes_on_to_a_cpu_engine_on_a_gpu_rtx_cannot_target(demo_bundle, monkeypatch, tmp_path):
    import medge
    from medge import _C

    _gpu(monkeypatch, H100)
    _install(monkeypatch, cuda._RT, flavour="tensorrt_rtx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # full TensorRT not installed
    monkeypatch.setattr(_C, "cuda_compiled", lambda: True)
    monkeypatch.setattr(_C, "cuda_device_count", lambda: 1)
    _no_builds(monkeypatch)
    with medge.load(demo_bundle.bundle_path, engine_cache=tmp_path) as model:
        # ONNX Runtime (this CPU wheel has no CUDA provider) or OpenVINO where it is installed on x86: a CPU
        # engine either way, and the reason names why the GPU's engine flavour was refused.
        assert model.backend.name in ("onnxruntime", "openvino"), model.backend.name
        reason = model.backend.reason
    assert "H100" in reason and "compute capability 9.0" in reason and "8.9 (Ada" in reason, reason
    with pytest.raises(BackendUnavailable, match="cannot run on NVIDIA H100 80GB HBM3"):
        medge.load(demo_bundle.bundle_path, backend="tensorrt_rtx", engine_cache=tmp_path)
    # No TensorRT engine was built or cached (OpenVINO, when it ran, keeps its own compiled-model cache there).
    assert [p.name for p in tmp_path.iterdir() if p.name != "openvino-compiled"] == []


# =========================================================================== engine-cache builds


def test_cache_builds_target_the_gpus_own_compute_capability_on_the_requested_device(monkeypatch, tmp_path, builds):
    rt = _gpu(monkeypatch, T4, devices=2)  # 7.5 is not in RTX's default targets: the bundle has no engine for it
    builds.rt = rt
    _install(monkeypatch, rt, flavour="tensorrt_rtx")
    default_engine = ({"file": "model.engine", "flavour": "tensorrt_rtx", "flavour_version": "1.7.1.116",
                       "precision": "fp32", "compute_capabilities": ["8.0", "8.6", "8.9", "12.0"], "gpu": None},
                      b"FAKE bundled plan")
    bundle = _bundle([default_engine])
    impl, choice = _load_rtx(bundle, tmp_path, device=1)
    with impl:
        assert impl.device == "cuda:1" and "built from the fp32 graph into the engine cache" in choice.reason
    assert len(builds.calls) == 1
    call = builds.calls[0]
    assert call["compute_capabilities"] == ["7.5"], "the cache build ignored the GPU's compute capability"
    assert call["device"] == 1, "the engine for cuda:1 was built with cuda:0 current"
    assert call["onnx"] == GRAPH_BYTES and call["flavour"] == "tensorrt_rtx"
    assert rt.current == 0, "the build did not restore the previous device"
    impl, _ = _load_rtx(bundle, tmp_path, device=1)  # a hit: no second build
    impl.close()
    assert len(builds.calls) == 1


# =========================================================================== CUDA graphs at load


@pytest.mark.parametrize("profile, sizes", [((1, 2, 8), list(range(1, 9))), ((4, 4, 8), [4, 5, 6, 7, 8])])
def test_cuda_graphs_of_every_batch_size_are_captured_at_load(monkeypatch, profile, sizes):
    rt = FakeCuda()
    monkeypatch.setattr(cuda, "_RT", rt)
    trt = _install(monkeypatch, rt, profile=profile)
    with _backend() as backend:
        assert sorted(backend._graphs) == sizes
        captures = [e for e in rt.events if e[0] == "cudaStreamBeginCapture"]
        assert len(captures) == len(sizes)
        loaded = len(rt.events)
        executed = trt.contexts[0].calls["execute"]
        for n in (3, 1, 8, 5, 3):
            x = _fill(backend, n, seed=n)
            np.testing.assert_allclose(backend.execute(n), _reference(x), rtol=1e-6, atol=1e-6)
        served = rt.events[loaded:]
        # Serving only replays: no capture (which other threads' cudaFree could invalidate), no enqueue.
        assert not [e for e in served if e[0] == "cudaStreamBeginCapture"]
        assert len([e for e in served if e[0] == "cudaGraphLaunch"]) == 5
        assert trt.contexts[0].calls["execute"] == executed
        # Switched off and on again: all sizes captured at once, again.
        backend.use_cuda_graphs = False
        backend.use_cuda_graphs = True
        assert sorted(backend._graphs) == sizes
        again = rt.events[loaded:]
        assert len([e for e in again if e[0] == "cudaStreamBeginCapture"]) == len(sizes)


def test_an_engine_that_cannot_run_fails_at_load_and_releases_everything(monkeypatch):
    rt = FakeCuda()
    monkeypatch.setattr(cuda, "_RT", rt)
    _install(monkeypatch, rt, fail_execute=True)
    with pytest.raises(BackendUnavailable, match="failed its first run on cuda:0 .* at load: .*fake enqueue failure"):
        _backend()
    assert rt.memory == {} and rt.streams == set() and rt.capturing == {}


# =========================================================================== RTX runtime cache


def _run_once(impl, n=3):
    x = _fill(impl, n, seed=n)
    np.testing.assert_allclose(impl.execute(n), _reference(x), rtol=1e-6, atol=1e-6)


def _runtime_cache_files(folder: Path) -> list:
    return sorted(folder.glob("*.rtxcache"))


def test_rtx_runtime_cache_is_kept_beside_the_engine_cache(monkeypatch, tmp_path, builds):
    rt = _gpu(monkeypatch, RTX_4090)
    builds.rt = rt
    trt = _install(monkeypatch, rt, flavour="tensorrt_rtx")
    bundle = _bundle()
    impl, _ = _load_rtx(bundle, tmp_path)
    first = trt.runtime_caches[-1]
    assert trt.configs[-1].runtime_cache is first, "the runtime config has no runtime cache"
    assert first.deserialised == [], "nothing was stored yet"
    _run_once(impl, 3)
    impl.close()
    files = _runtime_cache_files(tmp_path)
    assert len(files) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert files[0].name.split(".")[0] == next(tmp_path.glob("*.engine")).name.split(".")[0], "not the engine's key"

    # The next process: the compiled kernels are there before the first inference.
    impl, _ = _load_rtx(bundle, tmp_path)
    second = trt.runtime_caches[-1]
    assert second is not first and second.deserialised == [b"RTXCACHEkernel-3"]
    assert b"kernel-3" in second.kernels
    order = [what for what, _ in trt.log]
    last_context = len(order) - 1 - order[::-1].index("create_execution_context")
    assert "set_runtime_cache" in order[:last_context], "the cache was attached after the context was created"
    _run_once(impl, 5)
    impl.close()
    impl, _ = _load_rtx(bundle, tmp_path)
    assert trt.runtime_caches[-1].deserialised == [b"RTXCACHEkernel-3;kernel-5"]
    impl.close()
    assert len(builds.calls) == 1


def test_a_bundled_rtx_engine_gets_a_runtime_cache_too(monkeypatch, tmp_path, builds):
    rt = _gpu(monkeypatch, RTX_4090)
    builds.rt = rt
    trt = _install(monkeypatch, rt, flavour="tensorrt_rtx")
    entry = {"file": "model.engine", "flavour": "tensorrt_rtx", "flavour_version": "1.7.1.116", "precision": "fp32",
             "compute_capabilities": ["8.0", "8.6", "8.9", "12.0"], "gpu": None}
    bundle = _bundle([(entry, b"FAKE bundled plan")])
    impl, choice = _load_rtx(bundle, tmp_path)
    assert "bundled engine" in choice.reason and builds.calls == []
    _run_once(impl, 2)
    impl.close()
    assert len(_runtime_cache_files(tmp_path)) == 1
    impl, _ = _load_rtx(bundle, tmp_path)
    assert trt.runtime_caches[-1].deserialised == [b"RTXCACHEkernel-2"]
    impl.close()


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "not ours", "rejected by TensorRT-RTX"])
def test_a_corrupt_rtx_runtime_cache_is_discarded(monkeypatch, tmp_path, builds, caplog, damage):
    rt = _gpu(monkeypatch, RTX_4090)
    builds.rt = rt
    trt = _install(monkeypatch, rt, flavour="tensorrt_rtx")
    bundle = _bundle()
    impl, _ = _load_rtx(bundle, tmp_path)
    _run_once(impl, 3)
    impl.close()
    (path,) = _runtime_cache_files(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip a byte":
        data[-3] ^= 0x40
    elif damage == "truncate":
        del data[-4:]
    elif damage == "not ours":
        data = bytearray(b"RTXCACHEkernel-3")
    else:  # a well-formed file whose blob TensorRT-RTX refuses (another driver, say)
        from medge.runtime.engine_cache import RuntimeCacheFile

        original = RuntimeCacheFile.load
        monkeypatch.setattr(RuntimeCacheFile, "load", lambda self: b"NOT A CACHE" if original(self) else None)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="medge"):
        impl, _ = _load_rtx(bundle, tmp_path)
    fresh = trt.runtime_caches[-1]
    assert fresh.kernels == set(), "a damaged runtime cache was used"
    if damage == "rejected by TensorRT-RTX":
        assert fresh.deserialised == [b"NOT A CACHE"]
    else:
        assert fresh.deserialised == [], "damaged bytes reached TensorRT-RTX"
    assert "runtime cache" in caplog.text and "discarded" in caplog.text, caplog.text
    assert _runtime_cache_files(tmp_path) == [], "the damaged file was kept"
    _run_once(impl, 4)
    impl.close()
    assert len(_runtime_cache_files(tmp_path)) == 1  # written again, whole


def test_runtime_cache_write_failure_is_a_warning_not_an_error(monkeypatch, tmp_path, builds, caplog):
    rt = _gpu(monkeypatch, RTX_4090)
    builds.rt = rt
    _install(monkeypatch, rt, flavour="tensorrt_rtx")
    impl, _ = _load_rtx(_bundle(), tmp_path)
    _run_once(impl, 2)
    import medge.runtime.engine_cache as engine_cache

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(engine_cache, "atomic_write", refuse)
    with caplog.at_level(logging.WARNING, logger="medge"):
        impl.close()
    assert impl.closed and "runtime cache" in caplog.text and "Permission denied" in caplog.text


# =========================================================================== MEDGE_EXPECT_GPU


def test_expect_gpu_turns_gpu_skips_into_failures(tmp_path):
    conftest = Path(__file__).with_name("conftest.py").read_text()
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "pytest.ini").write_text(textwrap.dedent("""\
        [pytest]
        addopts = --strict-markers -p no:cacheprovider
        markers =
            gpu: needs a CUDA device
        """))
    (tmp_path / "test_probe.py").write_text(textwrap.dedent("""\
        import pytest

        @pytest.fixture
        def device():
            pytest.skip("fixture: no CUDA device")

        @pytest.mark.gpu
        @pytest.mark.skipif(True, reason="marker: the driver is older than the CUDA 13 runtime")
        def test_gpu_skipif():
            pass

        @pytest.mark.gpu
        def test_gpu_skip_in_body():
            pytest.skip("body: no CUDA device")

        @pytest.mark.gpu
        def test_gpu_skip_in_fixture(device):
            pass

        @pytest.mark.gpu
        def test_gpu_passes():
            pass

        @pytest.mark.gpu
        def test_flavour_cannot_target_this_gpu():
            pytest.skip("not for this GPU: TensorRT-RTX cannot target compute capability 9.0")

        def test_cpu_skip():
            pytest.skip("not a GPU test")
        """))

    def run(**env):
        environment = {k: v for k, v in os.environ.items() if k != "MEDGE_EXPECT_GPU"}
        environment.update(env)
        done = subprocess.run([sys.executable, "-m", "pytest", "-rA", "-q", str(tmp_path)], cwd=tmp_path,
                              env=environment, capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout + done.stderr

    code, out = run()
    assert code == 0 and "1 passed, 5 skipped" in out, out
    code, out = run(MEDGE_EXPECT_GPU="0")
    assert code == 0 and "1 passed, 5 skipped" in out, out

    # The GPU is there but the installed flavour cannot target it: an allowed skip, not a failure.
    code, out = run(MEDGE_EXPECT_GPU="1")
    assert code == 1 and "3 failed, 1 passed, 2 skipped" in out, out
    for name, reason in (("test_gpu_skipif", "marker: the driver is older than the CUDA 13 runtime"),
                         ("test_gpu_skip_in_body", "body: no CUDA device"),
                         ("test_gpu_skip_in_fixture", "fixture: no CUDA device")):
        assert f"FAILED test_probe.py::{name}" in out, out
        assert reason in out, out
    assert "MEDGE_EXPECT_GPU=1" in out, out
    assert "SKIPPED" in out and "not a GPU test" in out, out
