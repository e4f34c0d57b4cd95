"""OpenVINO CPU backend: the backend contract, auto's preference and its fallback to ONNX Runtime, crash isolation,
and the accuracy report's rows per CPU engine.

Tests that run OpenVINO skip with the reason where it is not installed; those about its absence, its crashes (a
child process that dies by SIGSEGV stands in for OpenVINO) and the fallback run everywhere.
"""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys

import numpy as np
import pytest

import medge
from medge.errors import BackendUnavailable, MissingDependency

pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[runtime]"')

HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason='openvino is not installed: pip install "medge[openvino]"')
X86 = platform.machine().lower() in ("x86_64", "amd64", "x86", "i386", "i686")


def graph_bytes(bundle_path, graph):
    from medge.bundle import Bundle

    bundle = Bundle.open(bundle_path)
    return bundle.read_verified(bundle.manifest["graphs"][graph]["file"])


def _checks(demo_bundle):
    from medge.bundle import Bundle
    from medge.runtime.checks import CheckVectors

    return CheckVectors.from_bundle(Bundle.open(demo_bundle.bundle_path)).inputs


def ort_outputs(model_bytes, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.astype(np.float16 if "float16" in session.get_inputs()[0].type else np.float32)})


@pytest.fixture()
def verdicts(tmp_path, monkeypatch):
    """An empty engine cache for every load, so the isolated compile runs (and is remembered) in the test."""
    monkeypatch.setenv("MEDGE_ENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino-compiled"


# ------------------------------------------------------------------------------------------ the backend contract


@needs_openvino
@pytest.mark.parametrize("graph", ["fp32", "fp16", "int8"])
def test_backend_keeps_the_contract_and_matches_onnx_runtime(demo_bundle, graph):
    from medge.runtime.backends.openvino import OpenVINOBackend

    data = graph_bytes(demo_bundle.bundle_path, graph)
    x = _checks(demo_bundle)
    backend = OpenVINOBackend(data, precision=graph, max_batch=8, threads=1, output_names=["logits"],
                              isolate_compile=False)
    with backend:
        assert backend.name == "openvino" and backend.device == "cpu" and backend.stream is None
        assert backend.input.shape == (1, 128, 128)
        assert backend.input.dtype == (np.float16 if graph == "fp16" else np.float32)
        assert [o.name for o in backend.outputs] == ["logits"] and backend.outputs[0].shape == (2,)
        # One host buffer for max_batch; every batch size's buffer is a view of it.
        full = backend.input_buffer(8)
        assert all(np.shares_memory(backend.input_buffer(n), full) for n in range(1, 9))
        with pytest.raises(medge.MedgeError, match="outside 1..8"):
            backend.input_buffer(9)
        reference = ort_outputs(data, x)[0]
        for n in (1, 3, 8):  # dynamic batch: every size runs, none reshapes the graph
            backend.load_input(x[:n].astype(backend.input.dtype))
            out = backend.execute(n)
            assert out.dtype == np.float32 and out.shape == (n, 2)
            # fp32 / fp16 graphs run in f32 (not bf16); int8: OpenVINO's u8 kernels vs ONNX Runtime's float Q/DQ.
            tolerance = {"fp32": 1e-4, "fp16": 5e-3, "int8": 0.5}[graph]
            np.testing.assert_allclose(out, reference[:n], atol=tolerance)
            assert (out.argmax(1) == reference[:n].argmax(1)).all()
            every = backend.execute_all(n)
            assert list(every) == ["logits"] and np.array_equal(every["logits"], out)
        backend.load_input(x[:2].astype(backend.input.dtype))
        kept = backend.execute(2)
        before = kept.copy()
        backend.load_input(-x[:2].astype(backend.input.dtype))
        backend.execute(2)
        assert np.array_equal(kept, before)  # results are copies, not views of the reused output buffers
        assert "openvino" in backend.describe() and graph in backend.describe()
    backend.close()  # idempotent


@needs_openvino
def test_threads_and_precision_are_what_medge_asked_for(demo_bundle):
    from medge.runtime.backends.openvino import OpenVINOBackend

    backend = OpenVINOBackend(graph_bytes(demo_bundle.bundle_path, "fp32"), precision="fp32", max_batch=4,
                              threads=1, isolate_compile=False)
    with backend:
        compiled = backend._compiled
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32", "float32")
        assert compiled.get_property("ENABLE_CPU_PINNING") is False
        assert "1 threads" in backend.describe()


@needs_openvino
def test_a_graph_with_a_static_batch_is_refused_not_reshaped(demo_bundle, tmp_path):
    onnx = pytest.importorskip("onnx")
    from medge.runtime.backends.openvino import OpenVINOBackend

    model = onnx.load_from_string(graph_bytes(demo_bundle.bundle_path, "int8"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    static = model.SerializeToString()
    with pytest.raises(BackendUnavailable, match="static batch of 1"):
        OpenVINOBackend(static, precision="int8", max_batch=8, isolate_compile=False)
    with OpenVINOBackend(static, precision="int8", max_batch=1, isolate_compile=False) as backend:  # fits as it is
        assert backend.execute(1).shape == (1, 2)


@needs_openvino
def test_garbage_is_backend_unavailable():
    from medge.runtime.backends.openvino import OpenVINOBackend

    with pytest.raises(BackendUnavailable, match="OpenVINO cannot read"):
        OpenVINOBackend(b"not an onnx graph", precision="fp32", max_batch=1, isolate_compile=False)


# ------------------------------------------------------------------------------------------ absence and crashes


def test_missing_openvino_names_the_extra_and_auto_falls_back(demo_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError, find_spec -> None
    from medge.runtime.backends import openvino

    monkeypatch.setattr(openvino, "_CORE", None)
    with pytest.raises(MissingDependency, match=r'pip install "medge\[openvino\]"'):
        openvino.OpenVINOBackend(b"", precision="fp32", max_batch=1)
    with pytest.raises(MissingDependency, match=r"medge\[openvino\]"):
        medge.load(demo_bundle.bundle_path, backend="openvino", device="cpu")
    with medge.load(demo_bundle.bundle_path, device="cpu") as model:
        assert model.backend.name == "onnxruntime" and model.backend.graph == "int8-ort"
        assert "OpenVINO" not in model.backend.reason  # not installed: auto does not try it


def test_import_medge_does_not_import_openvino():
    code = ("import sys, medge, medge.runtime.model, medge.runtime.backends.openvino, medge.convert.validate; "
            "assert 'openvino' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_crash_while_compiling_is_backend_unavailable_and_auto_goes_on(demo_bundle, monkeypatch, verdicts):
    """A child that dies by SIGSEGV (as OpenVINO 2026.4.1 does compiling some INT8 graphs after a reshape)."""
    from medge.runtime.backends import openvino

    monkeypatch.setattr(openvino, "_PROBE", "import os, signal, sys; sys.stdin.buffer.read(); "
                                            "os.kill(os.getpid(), signal.SIGSEGV)")
    why = openvino.probe_compile(b"graph", {})
    assert "crashed" in why and "SIGSEGV" in why and "not affected" in why
    if not HAVE_OPENVINO:
        pytest.skip('the rest loads the bundle with OpenVINO: pip install "medge[openvino]"')
    with pytest.raises(BackendUnavailable, match="SIGSEGV"):
        medge.load(demo_bundle.bundle_path, backend="openvino", device="cpu")
    if not X86:
        return
    with medge.load(demo_bundle.bundle_path, device="cpu") as model:
        assert model.backend.name == "onnxruntime" and model.backend.graph == "int8-ort"
        assert any("on openvino" in line and "SIGSEGV" in line for line in model.backend.passed_over)
        assert "OpenVINO not usable" in model.backend.reason
    assert not verdicts.exists() or not list(verdicts.iterdir())  # a crash is never remembered as a success


def test_a_child_that_cannot_run_openvino_does_not_block_it(monkeypatch):
    """A frozen application's sys.executable is not Python: the compile then happens in-process, as without isolation."""
    from medge.runtime.backends import openvino

    monkeypatch.setattr(openvino, "_PROBE", "import sys; sys.exit(3)")
    assert openvino.probe_compile(b"graph", {}) is None
    monkeypatch.setattr(openvino, "_PROBE", "import json; print(json.dumps({'ok': False, 'error': 'RuntimeError: no'}))")
    assert openvino.probe_compile(b"graph", {}) == "OpenVINO cannot compile it: RuntimeError: no"


@needs_openvino
def test_a_compile_that_worked_is_remembered(demo_bundle, monkeypatch, tmp_path):
    from medge.runtime.backends import openvino

    calls = []
    real = openvino.probe_compile
    monkeypatch.setattr(openvino, "probe_compile", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = graph_bytes(demo_bundle.bundle_path, "int8")
    for _ in range(2):
        openvino.OpenVINOBackend(data, precision="int8", max_batch=2, verdict_dir=tmp_path).close()
    assert len(calls) == 1 and len(list(tmp_path.glob("*.compiled"))) == 1
    openvino.OpenVINOBackend(data, precision="int8", max_batch=2, threads=1, verdict_dir=tmp_path).close()
    assert len(calls) == 2  # other properties, another key


# ------------------------------------------------------------------------------------------ medge.load


@needs_openvino
@pytest.mark.skipif(not X86, reason="auto prefers OpenVINO on x86 CPUs only")
def test_auto_on_an_x86_cpu_runs_the_tensorrt_placed_int8_graph_on_openvino(demo_bundle, verdicts, tmp_path):
    from medge import demo

    files, _ = demo.write_demo_dicoms(tmp_path / "val", "validation", 12)
    with medge.load(demo_bundle.bundle_path, device="cpu", threads=1) as model:
        assert model.backend.name == "openvino" and model.backend.graph == "int8" and model.backend.device == "cpu"
        assert model.backend.passed_over == ()
        assert "openvino" in model.backend.description and "1 threads" in model.backend.description
        with medge.load(demo_bundle.bundle_path, backend="onnxruntime", precision="fp32") as reference:
            assert [p.label for p in model.predict_batch(files)] == [p.label for p in reference.predict_batch(files)]
    assert len(list(verdicts.glob("*.compiled"))) == 1  # the isolated compile is remembered
    with medge.load(demo_bundle.bundle_path, backend="openvino", precision="fp16") as model:
        assert model.backend.graph == "fp16" and model.spec.dtype == "float16"
    with medge.load(demo_bundle.bundle_path, backend="onnxruntime") as model:  # asked for by name: ORT
        assert model.backend.name == "onnxruntime" and model.backend.graph == "int8-ort"
    # FP32 asked for: ONNX Runtime runs it (OpenVINO's FP32 was no faster), and OpenVINO is not even tried.
    with medge.load(demo_bundle.bundle_path, device="cpu", precision="fp32") as model:
        assert model.backend.name == "onnxruntime" and model.backend.graph == "fp32"
        assert "OpenVINO" not in model.backend.reason


@needs_openvino
@pytest.mark.skipif(not X86, reason="auto prefers OpenVINO on x86 CPUs only")
def test_onnx_runtime_is_the_fallback_when_openvino_fails_its_check_vectors(demo_bundle, monkeypatch, verdicts):
    from medge.runtime.backends.openvino import OpenVINOBackend

    real = OpenVINOBackend.execute

    def flipped(self, batch_size):  # an engine that swaps the classes: every check vector's top-1 changes
        return real(self, batch_size)[:, ::-1].copy()

    monkeypatch.setattr(OpenVINOBackend, "execute", flipped)
    with medge.load(demo_bundle.bundle_path, device="cpu") as model:
        assert model.backend.name == "onnxruntime" and model.backend.graph == "int8-ort"
        failed = [line for line in model.backend.passed_over if "on openvino cpu failed the self-test" in line]
        assert [line.split(" ")[0] for line in failed] == ["int8"]  # auto gives OpenVINO its INT8 graph alone
        assert "OpenVINO not usable" in model.backend.reason
    with pytest.raises(BackendUnavailable, match="no precision of the bundle is usable on OpenVINO") as caught:
        medge.load(demo_bundle.bundle_path, backend="openvino")
    assert all(f"{graph} on openvino cpu failed the self-test" in str(caught.value) for graph in ("int8", "fp32", "fp16"))
    # Without the self-test, nothing stops the broken engine: the check vectors are what caught it.
    with medge.load(demo_bundle.bundle_path, device="cpu", self_test=False) as model:
        assert model.backend.name == "openvino"


# ------------------------------------------------------------------------------------------ the accuracy report


@needs_openvino
def test_the_accuracy_report_measures_every_graph_on_every_cpu_engine(demo_bundle):
    results = demo_bundle.report.results
    engines = {r.executed_by for r in results}
    assert engines == {"onnxruntime CPU", "openvino CPU"}
    graphs = set(demo_bundle.manifest["graphs"])
    for engine in engines:
        rows = [r for r in results if r.executed_by == engine]
        assert {r.precision for r in rows} == graphs and all(r.measured for r in rows)
        assert all(r.top1_agreement >= 0.99 for r in rows)
    reference = demo_bundle.report.result("fp32", 1)
    assert reference.executed_by == "onnxruntime CPU" and reference.max_abs_error == 0.0
    openvino_fp32 = next(r for r in results if r.executed_by == "openvino CPU" and r.precision == "fp32")
    assert openvino_fp32.max_abs_error < 1e-3  # f32, not bf16


def test_evaluate_engines_must_start_with_onnx_runtime(demo_bundle):
    from medge.convert.validate import evaluate
    from medge.errors import ConversionError

    with pytest.raises(ConversionError, match="start with onnxruntime"):
        evaluate({"fp32": "x.onnx"}, np.zeros((1, 1, 8, 8), np.float32), batch_sizes=[1], engines=["openvino"])


def test_an_engine_that_cannot_run_a_graph_leaves_it_not_measured_on_that_engine(tmp_path, monkeypatch):
    from medge.convert import validate

    if not HAVE_OPENVINO:
        pytest.skip('openvino is not installed: pip install "medge[openvino]"')
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    from medge.runtime.backends import openvino

    monkeypatch.setattr(openvino, "_PROBE", "import os, signal, sys; sys.stdin.buffer.read(); "
                                            "os.kill(os.getpid(), signal.SIGSEGV)")
    x = np.random.default_rng(0).standard_normal((6, 2, 4, 4)).astype(np.float32)
    report = validate.evaluate({"fp32": path, "fp16": path}, x, batch_sizes=[1, 4])
    rows = {(r.precision, r.executed_by, r.batch_size): r for r in report.results}
    assert len(rows) == 8
    assert all(r.measured for (_, engine, _), r in rows.items() if engine == "onnxruntime CPU")
    crashed = [r for (_, engine, _), r in rows.items() if engine == "openvino CPU"]
    assert all(not r.measured and "SIGSEGV" in r.reason for r in crashed)
