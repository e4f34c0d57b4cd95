"""medge.convert: model import, precision graphs, accuracy report, the pipeline and medge-convert."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason='onnx is not installed: pip install "medge[convert]"')
pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from medge import PreprocessSpec  # noqa: E402
from medge.convert.export import import_model, ort_session  # noqa: E402
from medge.convert.precision import make_fp16, make_int8  # noqa: E402
from medge.convert.validate import check_thresholds, evaluate, read_labels, roc_auc  # noqa: E402
from medge.errors import ConversionError  # noqa: E402

SPEC = PreprocessSpec(32, 32, voi="window", window=(-600, 1500))


def tiny_cnn_onnx(path: Path, *, batch="batch", opset=17, channels=8) -> Path:
    """conv-relu-globalavgpool-gemm, (batch, 1, 32, 32) -> (batch, 2), built with onnx.helper."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32) * 0.3, "w")
    b = numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32) * 0.1, "b")
    fc = numpy_helper.from_array(rng.standard_normal((2, channels)).astype(np.float32), "fc")
    fcb = numpy_helper.from_array(np.zeros(2, np.float32), "fcb")
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 2])],
        [w, b, fc, fcb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what opset 13-17 exporters write; onnx's newest default can be ahead of onnxruntime
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------
# Import


def test_onnx_import_checks_and_describes(tmp_path):
    imported = import_model(tiny_cnn_onnx(tmp_path / "m.onnx"), tmp_path / "work")
    assert imported.source == "onnx"
    assert imported.input.shape == ["batch", 1, 32, 32]
    assert imported.outputs[0].name == "logits"
    assert imported.opset == 17


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(batch=1), "fixed batch size"), (dict(opset=13), "opset 13")],
)
def test_onnx_import_refuses_unusable_graphs(tmp_path, kwargs, message):
    with pytest.raises(ConversionError, match=message):
        import_model(tiny_cnn_onnx(tmp_path / "m.onnx", **kwargs), tmp_path / "work")


def test_garbage_and_unknown_formats_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConversionError, match="not a valid ONNX model"):
        import_model(junk, tmp_path / "w")
    (tmp_path / "m.h5").write_bytes(b"x")
    with pytest.raises(ConversionError, match="cannot tell the model format"):
        import_model(tmp_path / "m.h5", tmp_path / "w")
    with pytest.raises(ConversionError, match="not found"):
        import_model(tmp_path / "missing.onnx", tmp_path / "w")


class TestTorchSources:
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

    def module(self):
        torch = self.torch
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2)).eval()

    def test_nn_module_export_matches_torch(self, tmp_path):
        x = np.random.default_rng(1).standard_normal((3, 1, 32, 32)).astype(np.float32)
        imported = import_model(self.module(), tmp_path, example_input=x)
        assert imported.source == "nn.Module"
        assert imported.torch_check["max_abs_error"] < 1e-4
        assert isinstance(imported.input.shape[0], str)  # dynamic batch
        session = ort_session(imported.onnx_path)
        out = session.run(None, {session.get_inputs()[0].name: np.concatenate([x] * 3)})[0]
        assert out.shape == (9, 2)  # another batch size than exported with

    def test_exported_program_and_torchscript(self, tmp_path):
        torch = self.torch
        module = self.module()
        example = torch.zeros(2, 1, 32, 32)
        program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, str(tmp_path / "m.pt2"))
        assert import_model(tmp_path / "m.pt2", tmp_path / "a").source == "torch.export"
        torch.jit.save(torch.jit.trace(module, example), str(tmp_path / "m.ts"))
        with pytest.raises(ConversionError, match="does not record its input shape"):
            import_model(tmp_path / "m.ts", tmp_path / "b")
        assert import_model(tmp_path / "m.ts", tmp_path / "c", example_input=example.numpy()).source == "torchscript"

    def test_pickled_checkpoints_are_refused(self, tmp_path):
        self.torch.save(self.module(), str(tmp_path / "m.pt"))  # a full pickle: loading it would run code
        with pytest.raises(ConversionError, match="pickled code"):
            import_model(tmp_path / "m.pt", tmp_path / "w", example_input=np.zeros((1, 1, 32, 32), np.float32))

    def test_disagreement_with_torch_is_an_error(self, tmp_path, monkeypatch):
        import medge.convert.export as export

        monkeypatch.setattr(export, "EXPORT_TOLERANCE", -1.0)  # nothing can be that close: the check must fire
        with pytest.raises(ConversionError, match="disagrees with PyTorch"):
            import_model(self.module(), tmp_path, example_input=np.ones((1, 1, 32, 32), np.float32))


# ---------------------------------------------------------------------------
# Precision graphs


def calibration_inputs(n=40):
    return np.random.default_rng(2).random((n, 1, 32, 32), dtype=np.float32)


def test_fp16_graph_takes_fp16_and_gives_fp32(tmp_path):
    fp32 = tiny_cnn_onnx(tmp_path / "m.onnx")
    info = make_fp16(fp32, tmp_path / "m16.onnx")
    assert (info["input_dtype"], info["output_dtype"]) == ("float16", "float32")
    model = onnx.load(str(tmp_path / "m16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert all(init.data_type != TensorProto.FLOAT for init in model.graph.initializer)


def test_int8_graph_follows_tensorrt_qdq_rules(tmp_path):
    fp32 = tiny_cnn_onnx(tmp_path / "m.onnx")
    summary = make_int8(fp32, tmp_path / "m8.onnx", calibration_inputs(), method="minmax", min_images=16)
    assert summary.images == 40 and summary.quantize_linear_nodes > 0
    model = onnx.load(str(tmp_path / "m8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        if len(node.input) > 2:
            assert inits[node.input[2]].dtype == np.int8 and not inits[node.input[2]].any()  # symmetric
    conv_weight_dq = [n for n in qdq if n.op_type == "DequantizeLinear" and inits.get(n.input[1]) is not None
                      and inits[n.input[1]].size == 8]
    assert conv_weight_dq, "conv weights must have one scale per output channel"
    assert not any(i.data_type == TensorProto.INT32 for i in model.graph.initializer)  # biases stay float
    # It runs, and stays close to FP32.
    x = calibration_inputs(8)
    ref = ort_session(fp32).run(None, {"input": x})[0]
    q = ort_session(tmp_path / "m8.onnx").run(None, {"input": x})[0]
    assert np.abs(q - ref).max() < 0.05 * np.abs(ref).max()


def test_int8_refuses_bad_calibration(tmp_path):
    fp32 = tiny_cnn_onnx(tmp_path / "m.onnx")
    with pytest.raises(ConversionError, match="only 5 calibration image"):
        make_int8(fp32, tmp_path / "q.onnx", calibration_inputs(5))
    with pytest.raises(ConversionError, match="calibration method"):
        make_int8(fp32, tmp_path / "q.onnx", calibration_inputs(), method="magic", min_images=1)
    with pytest.raises(ConversionError, match="per image but the model takes"):
        make_int8(fp32, tmp_path / "q.onnx", np.zeros((40, 1, 16, 16), np.float32), min_images=1)
    bad = calibration_inputs()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(ConversionError, match="NaN"):
        make_int8(fp32, tmp_path / "q.onnx", bad, min_images=1)


def test_onnxruntime_target_uses_its_own_placement(tmp_path):
    """The ONNX Runtime graph quantises conv outputs too (QLinearConv fusion), with uint8 activations."""
    fp32 = tiny_cnn_onnx(tmp_path / "m.onnx")
    trt = make_int8(fp32, tmp_path / "t.onnx", calibration_inputs(), min_images=16, target="tensorrt")
    ort_ = make_int8(fp32, tmp_path / "o.onnx", calibration_inputs(), min_images=16, target="onnxruntime")
    assert (trt.activation_dtype, ort_.activation_dtype) == ("int8", "uint8")

    def consumers_of_conv_output(path):
        model = onnx.load(str(path))
        conv_out = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
        return [n.op_type for n in model.graph.node if conv_out in n.input]

    assert consumers_of_conv_output(tmp_path / "t.onnx") == ["Relu"]  # TensorRT fuses bias + ReLU + requantise
    assert consumers_of_conv_output(tmp_path / "o.onnx") == ["QuantizeLinear"]
    with pytest.raises(ConversionError, match="INT8 target"):
        make_int8(fp32, tmp_path / "x.onnx", calibration_inputs(), min_images=16, target="tflite")


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_every_calibration_method_runs(tmp_path, method):
    summary = make_int8(tiny_cnn_onnx(tmp_path / "m.onnx"), tmp_path / "q.onnx", calibration_inputs(),
                        method=method, min_images=16)
    assert summary.method == method
    assert (summary.percentile is not None) == (method == "percentile")


# ---------------------------------------------------------------------------
# Metrics and the accuracy report


def test_roc_auc_equals_pairwise_definition():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(60), 1)  # many ties
    positives = rng.random(60) < 0.4
    pairs = [(p, n) for p, n in itertools.product(scores[positives], scores[~positives])]
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert roc_auc(scores, positives) == pytest.approx(expected)
    assert roc_auc(scores, np.ones(60, bool)) is None


def test_report_measures_every_precision_and_batch(tmp_path):
    fp32 = tiny_cnn_onnx(tmp_path / "m.onnx")
    make_fp16(fp32, tmp_path / "m16.onnx")
    make_int8(fp32, tmp_path / "m8.onnx", calibration_inputs(), min_images=16)
    x = calibration_inputs(20)
    labels = (np.arange(20) % 2).astype(np.int64)
    report = evaluate({"fp32": fp32, "fp16": tmp_path / "m16.onnx", "int8": tmp_path / "m8.onnx"}, x,
                      batch_sizes=[1, 4, 8], labels=labels, class_labels=["a", "b"])
    assert {(r.precision, r.batch_size) for r in report.results} == set(itertools.product(["fp32", "fp16", "int8"],
                                                                                          [1, 4, 8]))
    ref = report.result("fp32", 1)
    assert ref.max_abs_error == 0.0 and ref.auc_drop == 0.0
    for r in report.results:
        assert r.measured and r.images == 20 and 0 <= r.top1_agreement <= 1 and r.auc is not None
    assert report.result("int8", 8).max_abs_error > 0  # quantisation is visible
    assert "int8" in report.table()
    assert check_thresholds(report, max_abs_error=0.0)  # any error is > 0: a failure is reported
    assert not check_thresholds(report, max_abs_error=10.0, min_top1_agreement=0.0)


def test_unrunnable_graph_is_not_measured_not_guessed(tmp_path):
    fp32 = tiny_cnn_onnx(tmp_path / "m.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"garbage")
    report = evaluate({"fp32": fp32, "fp16": broken}, calibration_inputs(4), batch_sizes=[1])
    result = report.result("fp16", 1)
    assert not result.measured and "cannot run" in result.reason and result.max_abs_error is None


def test_labels_csv(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("filename,label\na.dcm,lesion\nb.dcm,0\n")
    assert read_labels(csv_path, [["a.dcm"], ["b.dcm"]], ["no_lesion", "lesion"]).tolist() == [1, 0]
    with pytest.raises(ConversionError, match="no label"):
        read_labels(csv_path, [["c.dcm"]], ["no_lesion", "lesion"])
    csv_path.write_text("filename,label\na.dcm,tumour\n")
    with pytest.raises(ConversionError, match="neither a class index"):
        read_labels(csv_path, [["a.dcm"]], ["no_lesion", "lesion"])
    csv_path.write_text("name,label\na.dcm,1\n")
    with pytest.raises(ConversionError, match="'filename' or 'sop_instance_uid'"):
        read_labels(csv_path, [["a.dcm"]], [])


# ---------------------------------------------------------------------------
# The pipeline and the CLI


@pytest.fixture(scope="module")
def dicom_sets(tmp_path_factory):
    from medge.synthetic import write_ct_series

    root = tmp_path_factory.mktemp("dicoms")
    write_ct_series(root / "calib", 20, seed=11, size=64)
    write_ct_series(root / "val", 12, seed=12, size=64)
    return root


def test_convert_writes_a_verified_bundle(tmp_path, dicom_sets):
    from medge.bundle import Bundle
    from medge.convert.pipeline import convert

    (dicom_sets / "calib" / "broken.dcm").write_bytes(b"DICM? no")
    result = convert(tiny_cnn_onnx(tmp_path / "m.onnx"), tmp_path / "m.medge", spec=SPEC,
                     calibration=dicom_sets / "calib", validation=dicom_sets / "val",
                     labels=dicom_sets / "val" / "labels.csv", class_labels=["no_lesion", "lesion"],
                     engine="none", min_calibration_images=16, log=lambda _: None)
    (dicom_sets / "calib" / "broken.dcm").unlink()
    bundle = Bundle.open(result.bundle_path)
    bundle.verify()
    manifest = bundle.manifest
    assert set(manifest["graphs"]) == {"fp32", "fp16", "int8", "int8-ort"}
    assert manifest["graphs"]["fp16"]["input_dtype"] == "float16"
    assert manifest["graphs"]["int8"]["target"] == "tensorrt"
    assert manifest["graphs"]["int8-ort"]["quantization"]["activation_dtype"] == "uint8"
    assert PreprocessSpec.from_dict(manifest["preprocess"]) == SPEC
    assert manifest["calibration"]["images"] == 20
    assert any("broken.dcm" in s for s in manifest["inputs_skipped"]["calibration"])
    # 4 graphs x batch 1, 4, 8, on each CPU engine installed (ONNX Runtime, and OpenVINO where present)
    results = manifest["accuracy"]["results"]
    assert {(r["precision"], r["batch_size"]) for r in results} == {
        (g, b) for g in ("fp32", "fp16", "int8", "int8-ort") for b in (1, 4, 8)}
    assert len(results) % 12 == 0
    assert manifest["profile"] == {"min": 1, "opt": 4, "max": 8}
    gates = manifest["gates"]
    assert gates["enabled"] and gates["limits"] == {"min_top1_agreement": 0.99, "max_auc_drop": 0.01,
                                                     "max_abs_error": None}  # the defaults
    assert gates["passed"] == (not result.threshold_failures)
    assert gates["verdicts"]["fp32"]["verdict"] == "reference"
    for graph in ("fp16", "int8", "int8-ort"):  # an untrained tiny CNN: each verdict follows its report rows
        rows = [r for r in manifest["accuracy"]["results"] if r["precision"] == graph]
        bad = any(r["top1_agreement"] < 0.99 or (r["auc_drop"] or 0) > 0.01 for r in rows)
        assert gates["verdicts"][graph]["verdict"] == ("failed" if bad else "passed")
        assert bool(gates["verdicts"][graph]["reasons"]) == bad
    assert manifest["task"] == {"kind": "classification", "classes": 2, "labels": ["no_lesion", "lesion"],
                                "activation": "softmax", "positive_class": None, "threshold": None,
                                "heatmap_output": None}
    assert manifest["envelope"]["modalities"] == ["CT"]
    assert manifest["envelope"]["rows"] == [64, 64] and manifest["envelope"]["images"] == 20 + 12
    assert manifest["check_vectors"]["source"] == "validation set" and manifest["check_vectors"]["count"] == 8


def test_convert_refuses_before_long_work(tmp_path, dicom_sets):
    from medge.convert.pipeline import convert

    model = tiny_cnn_onnx(tmp_path / "m.onnx")
    with pytest.raises(ConversionError, match="int8 needs calibration"):
        convert(model, tmp_path / "a.medge", spec=SPEC, engine="none")
    with pytest.raises(ConversionError, match="validated on nothing"):
        convert(model, tmp_path / "a.medge", spec=SPEC, precisions=["fp32"], engine="none")
    with pytest.raises(ConversionError, match="takes \\(1, 32, 32\\)"):
        convert(model, tmp_path / "a.medge", spec=PreprocessSpec(16, 16, voi="range", value_range=(0, 1)),
                calibration=dicom_sets / "calib", engine="none", log=lambda _: None)
    assert not (tmp_path / "a.medge").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.medge") or "tmp" in p.name]
    (tmp_path / "b.medge").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert(model, tmp_path / "b.medge", spec=SPEC, precisions=["fp32"], engine="none")


def test_cli_gate_failure_exits_3_and_user_error_exits_2(tmp_path, dicom_sets, capsys):
    from medge.cli.convert import main

    model = tiny_cnn_onnx(tmp_path / "m.onnx")
    common = [str(model), "--calib", str(dicom_sets / "calib"), "--val", str(dicom_sets / "val"),
              "--labels", str(dicom_sets / "val" / "labels.csv"), "--labels-names", "no_lesion,lesion",
              "--size", "32", "32", "--window", "-600", "1500", "--engine", "none", "--min-calibration-images", "16"]
    # An untrained tiny CNN: its AUC is near chance, so the default AUC gate is loosened to test exit 0.
    assert main([*common, "-o", str(tmp_path / "ok.medge"), "--max-auc-drop", "1", "--min-top1-agreement", "0"]) == 0
    out = capsys.readouterr().out
    assert "int8" in out and "bundle:" in out
    assert main([*common, "-o", str(tmp_path / "gate.medge"), "--max-abs-error", "0"]) == 3
    assert "accuracy gates FAILED" in capsys.readouterr().err
    assert json.loads((tmp_path / "gate.medge" / "manifest.json").read_text())["gates"]["passed"] is False
    assert main([str(model), "-o", str(tmp_path / "x.medge"), "--engine", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medge-convert: error:") and "Traceback" not in err


def test_signed_bundle_through_the_command_lines(tmp_path, dicom_sets, capsys):
    """keygen -> medge-convert --sign-key -> medge inspect --trusted-key; another key is refused."""
    pytest.importorskip("cryptography", reason='cryptography is not installed: pip install "medge[convert]"')
    from medge.cli.convert import main as convert_main
    from medge.cli.main import main as medge_main

    assert medge_main(["keygen", str(tmp_path / "k.pem"), str(tmp_path / "k.pub.pem")]) == 0
    assert medge_main(["keygen", str(tmp_path / "other.pem"), str(tmp_path / "other.pub.pem")]) == 0
    bundle = tmp_path / "signed.medge"
    assert convert_main([str(tiny_cnn_onnx(tmp_path / "m.onnx")), "--precision", "fp32", "--size", "32", "32",
                         "--window", "-600", "1500", "--engine", "none", "--sign-key", str(tmp_path / "k.pem"),
                         "--val", str(dicom_sets / "val"), "-o", str(bundle)]) == 0
    capsys.readouterr()
    assert medge_main(["inspect", str(bundle), "--trusted-key", str(tmp_path / "k.pub.pem")]) == 0
    assert "OK" in capsys.readouterr().out
    assert medge_main(["inspect", str(bundle), "--trusted-key", str(tmp_path / "other.pub.pem")]) == 2
    assert "medge: error:" in capsys.readouterr().err


def test_an_accuracy_table_whose_rows_are_all_unmeasured_still_prints():
    """The classification table took max() of no widths when no row was measured (TypeError)."""
    from medge.convert.validate import _aligned

    text = _aligned(["precision", "batch", "max|err|"], [["int8", "8", "not measured: the engine failed"]])
    assert [line.rstrip() for line in text.splitlines()] == ["precision  batch  max|err|",
                                                             "int8       8      not measured: the engine failed"]
