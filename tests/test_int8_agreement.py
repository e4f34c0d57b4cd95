"""Every INT8 graph medge writes means the same as FP32 under ONNX Runtime on the CPU, on any x86 CPU.

ONNX Runtime's u8*s8 kernels for x86 CPUs without VNNI add pairs of products in a saturating int16
(VPMADDUBSW); VNNI / AMX kernels do not saturate. So agreement measured on a VNNI machine says nothing about
an AVX2-only one. Three checks, from cheap to thorough:

- the demo bundle's INT8 graphs agree with FP32 (>= 99% top-1) on this machine's CPU;
- its ONNX Runtime graph records a format that cannot saturate, and its weights respect it;
- where QEMU user mode is installed (``apt-get install qemu-user``), the graph runs on an emulated AVX2 CPU
  without VNNI (``-cpu EPYC-Milan``) and gives this machine's outputs, while the 8-bit format, emulated the
  same way, visibly saturates (so the emulation is not vacuous).

MONAI DenseNet121 trained on synthetic CT (tools/int8_cpu_study.py ``trained_densenet121``, cached under
~/.cache/medge; needs monai and torch; MEDGE_DENSENET=1, marked slow): both INT8 graphs, as medge-convert
writes them (with make_int8's accuracy control), agree with FP32 on >= 99% of the validation slices on ONNX
Runtime and on OpenVINO, and the ONNX Runtime graph gives the same outputs without VNNI.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason='onnx is not installed: pip install "medge[convert]"')
pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')

import medge  # noqa: E402
from medge import demo as demo_data  # noqa: E402
from medge.bundle import Bundle  # noqa: E402
from medge.convert.export import ort_session  # noqa: E402
from medge.convert.precision import DEFAULT_ORT_INT8_FORMAT, int8_weight_extremes, make_int8  # noqa: E402

MIN_TOP1_AGREEMENT = 0.99
BATCH = 8
NO_VNNI_CPU = "EPYC-Milan"  # QEMU's AMD Zen 3 model: AVX2 + FMA, no AVX-512, no VNNI
QEMU = shutil.which("qemu-x86_64")
TOOL = Path(__file__).resolve().parents[1] / "tools" / "int8_cpu_study.py"

# Run under QEMU: the graph on the inputs, outputs saved (numpy + onnxruntime only, no medge).
_EMULATED_RUN = """
import sys, numpy as np, onnxruntime as ort
graph, inputs, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
options = ort.SessionOptions(); options.log_severity_level = 3
session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
x = np.load(inputs); name = session.get_inputs()[0].name
np.save(out, np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]))
"""


def run_graph(path, x, batch=BATCH):
    session = ort_session(Path(path))
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def run_graph_without_vnni(path, x, tmp_path, batch=BATCH):
    np.save(tmp_path / "inputs.npy", x)
    subprocess.run([QEMU, "-cpu", NO_VNNI_CPU, sys.executable, "-c", _EMULATED_RUN, str(path),
                    str(tmp_path / "inputs.npy"), str(tmp_path / "out.npy"), str(batch)],
                   check=True, capture_output=True, timeout=600)
    return np.load(tmp_path / "out.npy")


def agreement(out, reference):
    return float((out.argmax(1) == reference.argmax(1)).mean())


def demo_inputs(directory: Path, kind: str) -> np.ndarray:
    files, _ = demo_data.write_demo_dicoms(directory / kind, kind)
    return medge.preprocess([medge.read_dicom(f) for f in files], demo_data.demo_spec())


@pytest.fixture(scope="module")
def demo(demo_bundle, tmp_path_factory):
    """The session's demo bundle (tests/conftest.py), its graphs, the validation inputs and FP32 outputs."""
    bundle = Bundle.open(demo_bundle.bundle_path)
    graphs = {name: bundle.artifact_path(g["file"]) for name, g in bundle.manifest["graphs"].items()}
    x = demo_inputs(tmp_path_factory.mktemp("demo-inputs"), "validation")
    return {"result": demo_bundle, "manifest": bundle.manifest, "graphs": graphs, "x": x,
            "fp32": run_graph(graphs["fp32"], x)}


def test_demo_int8_graphs_agree_with_fp32_on_this_cpu(demo):
    int8_graphs = [name for name, g in demo["manifest"]["graphs"].items() if g["precision"] == "int8"]
    assert sorted(int8_graphs) == ["int8", "int8-ort"]
    for name in int8_graphs:
        out = run_graph(demo["graphs"][name], demo["x"])
        top1 = agreement(out, demo["fp32"])
        assert top1 >= MIN_TOP1_AGREEMENT, f"{name}: top-1 agreement {top1:.2%}, max |err| {np.abs(out - demo['fp32']).max():.3f}"
        for batch in (1, 4, 8):  # what the conversion's own report measured at the profile's batch sizes
            assert demo["result"].report.result(name, batch).top1_agreement >= MIN_TOP1_AGREEMENT


def test_demo_onnxruntime_graph_records_a_format_that_cannot_saturate(demo):
    import onnx

    quantization = demo["manifest"]["graphs"]["int8-ort"]["quantization"]
    assert quantization["format"]["name"] == DEFAULT_ORT_INT8_FORMAT
    assert quantization["format"]["x86_u8s8_saturation_free"] is True
    assert max(int8_weight_extremes(onnx.load(str(demo["graphs"]["int8-ort"]))).values()) <= 64
    assert demo["manifest"]["graphs"]["int8"]["quantization"]["format"]["activations"].startswith("int8 symmetric")


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed (apt-get install qemu-user): "
                                         "no emulated CPU without VNNI")
def test_demo_onnxruntime_graph_agrees_on_a_cpu_without_vnni(demo, tmp_path):
    graph = demo["graphs"]["int8-ort"]
    native = run_graph(graph, demo["x"])
    emulated = run_graph_without_vnni(graph, demo["x"], tmp_path)
    assert agreement(emulated, demo["fp32"]) >= MIN_TOP1_AGREEMENT
    # Integer sums that cannot saturate are exact on every kernel: the same outputs as here.
    np.testing.assert_allclose(emulated, native, atol=1e-3)

    # The emulation is real: ONNX Runtime's 8-bit default (u8s8) saturates there and not here.
    calibration = demo_inputs(tmp_path, "calibration")
    make_int8(demo["graphs"]["fp32"], tmp_path / "u8s8.onnx", calibration, target="onnxruntime", ort_format="u8s8",
              batch_size=4)
    native_u8s8 = run_graph(tmp_path / "u8s8.onnx", demo["x"])
    emulated_u8s8 = run_graph_without_vnni(tmp_path / "u8s8.onnx", demo["x"], tmp_path)
    assert np.abs(native_u8s8 - demo["fp32"]).max() < 1.0
    assert np.abs(emulated_u8s8 - demo["fp32"]).max() > 2.0, "the emulated CPU did not saturate: is it VNNI-less?"


def _study_tool():
    if not TOOL.is_file():
        pytest.skip(f"{TOOL} is not in this checkout")
    spec = importlib.util.spec_from_file_location("int8_cpu_study", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def densenet(tmp_path_factory):
    """MONAI DenseNet121 made decisive (tools/int8_cpu_study.py), both INT8 graphs, validation outputs."""
    import os

    if os.environ.get("MEDGE_DENSENET") != "1":
        # Calibrating and validating DenseNet121 on 2 x 128 inputs takes about 5 minutes of a 2-core CI
        # machine, a quarter of its budget; its figures are in the issue note and tools/int8_cpu_study.py.
        pytest.skip("the DenseNet121 INT8 study runs with MEDGE_DENSENET=1 (about 5 minutes on 2 cores)")
    pytest.importorskip("torch", reason='torch is not installed: pip install torch==2.13.0 "medge[torch]"')
    pytest.importorskip("monai", reason="monai is not installed: pip install monai (MONAI DenseNet121)")
    study = _study_tool()
    work = tmp_path_factory.mktemp("densenet")
    # Trained once per machine (2-6 minutes on 2 cores), then read from ~/.cache/medge.
    fp32, calibration, validation = study.densenet_model(work, calibration_count=64, validation_count=256)
    graphs, summaries = {"fp32": fp32}, {}
    for name, target in (("int8", "tensorrt"), ("int8-ort", "onnxruntime")):
        graphs[name] = work / f"model.{name}.onnx"
        summaries[name] = make_int8(fp32, graphs[name], calibration, target=target, batch_size=BATCH)
    return {"graphs": graphs, "summaries": summaries, "x": validation, "study": study,
            "outputs": {name: run_graph(g, validation) for name, g in graphs.items()}}


@pytest.mark.slow
def test_densenet121_int8_graphs_agree_with_fp32(densenet):
    reference = densenet["outputs"]["fp32"]
    labels = reference.argmax(1)
    assert 0.2 < labels.mean() < 0.8, "the trained network must give both labels on the validation slices"
    failures = []
    for name in ("int8", "int8-ort"):
        control = densenet["summaries"][name].accuracy_control
        assert control is not None and control["top1_agreement"] >= MIN_TOP1_AGREEMENT, control
        engines = {"ONNX Runtime": densenet["outputs"][name]}
        openvino = densenet["study"].openvino_outputs(densenet["graphs"][name], densenet["x"], BATCH)
        if openvino is not None:
            engines["OpenVINO"] = openvino
        for engine, out in engines.items():
            top1 = agreement(out, reference)
            if top1 < MIN_TOP1_AGREEMENT:
                failures.append(f"{name} on {engine}: top-1 agreement {top1:.2%}, max |err| "
                                f"{np.abs(out - reference).max():.3f}, float layers {len(control['float_layers'])}")
    assert not failures, "; ".join(failures)


@pytest.mark.slow
def test_densenet121_onnxruntime_graph_cannot_saturate(densenet):
    import onnx

    assert densenet["summaries"]["int8-ort"].format.u8s8_saturation_free
    assert max(int8_weight_extremes(onnx.load(str(densenet["graphs"]["int8-ort"]))).values()) <= 64


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed (apt-get install qemu-user): "
                                         "no emulated CPU without VNNI")
def test_densenet121_onnxruntime_graph_gives_the_same_outputs_without_vnni(densenet, tmp_path):
    x = densenet["x"][:16]  # about 2 s per image under emulation
    emulated = run_graph_without_vnni(densenet["graphs"]["int8-ort"], x, tmp_path)
    np.testing.assert_allclose(emulated, densenet["outputs"]["int8-ort"][:16], atol=1e-3)
