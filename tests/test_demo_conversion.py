"""medge-convert --demo end to end, with the issue's targets asserted on what was measured.

This is the CI run of the whole build side: the shipped demo model, calibration and validation DICOM sets
generated deterministically, FP32/FP16/INT8 graphs, the accuracy report at batch 1/opt/max, real
TensorRT-RTX engine builds (no GPU needed), and a bundle that verifies and detects tampering.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')
pytest.importorskip("tensorrt_rtx", reason='tensorrt_rtx is not installed: pip install "medge[rtx]"')

from medge.bundle import Bundle  # noqa: E402
from medge.errors import BundleError  # noqa: E402


@pytest.fixture(scope="module")
def demo(demo_bundle):
    return demo_bundle  # converted once per session (tests/conftest.py), with TensorRT-RTX engines here


def test_demo_meets_the_accuracy_targets(demo):
    report = demo.report
    assert report.labelled and report.images >= 100
    fp32 = report.result("fp32", 1)
    assert fp32.auc >= 0.95, f"FP32 ROC AUC {fp32.auc:.4f} on held-out synthetic slices"
    for batch in (1, 4, 8):  # 1, the profile's opt and max
        for graph in ("int8", "int8-ort"):  # the engines' graph and the ONNX Runtime one
            int8 = report.result(graph, batch)
            assert int8.measured
            assert int8.top1_agreement >= 0.98, f"{graph} top-1 agreement at batch {batch}: {int8.top1_agreement:.2%}"
            assert int8.auc_drop <= 0.01, f"{graph} AUC drop at batch {batch}: {int8.auc_drop:.4f}"
        fp16 = report.result("fp16", batch)
        assert fp16.measured and fp16.top1_agreement >= 0.98


def test_demo_engines_are_real_and_int8_is_smallest(demo):
    sizes = {e["precision"]: e["size_bytes"] for e in demo.engines}
    assert set(sizes) == {"fp32", "fp16", "int8"}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"], sizes
    layers = {e["precision"]: e["layer_precisions"] for e in demo.engines}
    assert layers["int8"].get("Int8", 0) > 0, "the INT8 engine must compute in int8"
    assert layers["fp32"].get("Int8", 0) == 0 and layers["fp16"].get("Half", 0) > 0
    for entry in demo.engines:
        assert entry["flavour"] == "tensorrt_rtx" and entry["profile"] == {"min": 1, "opt": 4, "max": 8}


def test_demo_bundle_verifies_and_any_tampered_byte_is_named(demo, tmp_path):
    import shutil

    bundle = Bundle.open(demo.bundle_path)
    bundle.verify()
    manifest = bundle.manifest
    assert manifest["model"]["name"] == "medge-demo-lesion"
    assert manifest["labels"] == ["no_lesion", "lesion"]
    assert manifest["calibration"]["images"] >= 100
    copy = tmp_path / "tampered.medge"
    shutil.copytree(demo.bundle_path, copy)
    victim = next(e["file"] for e in manifest["engines"] if e["precision"] == "int8")
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=victim.replace(".", r"\.")):
        Bundle.open(copy).verify()


def test_demo_report_is_stored_in_the_bundle(demo):
    stored = json.loads((demo.bundle_path / "reports" / "accuracy.json").read_text())
    assert stored["results"] == demo.manifest["accuracy"]["results"]
