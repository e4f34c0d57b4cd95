"""Never a silent wrong answer (issue 8): gates that hold at run time, the self-test at load, declared
tasks, the validated input envelope, and manifests that answer only with MedgeError."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')
onnx = pytest.importorskip("onnx", reason='onnx is not installed: pip install "medge[convert]"')
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import medge  # noqa: E402
from medge.errors import BackendUnavailable, BundleError, ConversionError, MedgeError, OutsideEnvelope  # noqa: E402


@pytest.fixture(scope="module")
def strict_bundle(tmp_path_factory):
    """The demo converted with a gate its INT8 graphs cannot meet (max abs error 0.05; they measure ~0.2-0.5)."""
    from medge.convert.demo import convert_demo

    result = convert_demo(tmp_path_factory.mktemp("strict") / "strict.medge", engine="none", max_abs_error=0.05,
                          log=lambda _: None)
    return result


def test_int8_accuracy_control_aims_at_the_conversions_top1_gate(strict_bundle):
    graphs = strict_bundle.manifest["graphs"]
    for graph in ("int8", "int8-ort"):
        control = graphs[graph]["quantization"]["accuracy_control"]
        assert control["min_top1_agreement"] == 0.99  # the default gate (only max abs error was given)
        assert control["float_layers"] == [] and control["top1_agreement"] >= 0.99, control  # agrees as calibrated


def test_a_failed_gate_is_recorded_per_graph_and_the_conversion_says_so(strict_bundle):
    verdicts = strict_bundle.manifest["gates"]["verdicts"]
    assert verdicts["fp32"]["verdict"] == "reference"
    assert verdicts["fp16"]["verdict"] == "passed"  # 0.019 <= 0.05
    for graph in ("int8", "int8-ort"):
        assert verdicts[graph]["verdict"] == "failed"
        assert any("max abs error" in reason for reason in verdicts[graph]["reasons"])
    assert strict_bundle.threshold_failures and not strict_bundle.manifest["gates"]["passed"]


def test_a_precision_that_failed_its_gates_is_never_chosen_by_default(strict_bundle, caplog):
    with medge.load(strict_bundle.bundle_path) as model:
        assert model.backend.precision != "int8" and model.backend.graph == "fp32"
        assert any("int8-ort failed its accuracy gates" in line for line in model.backend.passed_over)
        assert "passed over: " in str(model.backend) and "int8-ort failed its accuracy gates" in str(model.backend)
    # Asked for by name: refused, saying how to insist.
    with pytest.raises(BackendUnavailable, match="allow_failed_gates"):
        medge.load(strict_bundle.bundle_path, precision="int8")
    # Insisting works, with a warning in the log.
    with caplog.at_level(logging.WARNING, logger="medge.runtime"):
        with medge.load(strict_bundle.bundle_path, precision="int8", allow_failed_gates=True) as model:
            assert model.backend.precision == "int8"  # int8-ort on ONNX Runtime, int8 where OpenVINO runs
    assert any("allow_failed_gates=True" in r.getMessage() for r in caplog.records)
    with pytest.raises(MedgeError, match="needs an explicit precision"):
        medge.load(strict_bundle.bundle_path, allow_failed_gates=True)


def test_inspect_shows_each_verdict(strict_bundle, capsys):
    from medge.cli.main import main

    assert main(["inspect", str(strict_bundle.bundle_path)]) == 0
    out = capsys.readouterr().out
    assert "int8-ort  failed  (not chosen by default)" in out and "fp16      passed" in out
    assert "Envelope" in out and "modality CT" in out and "Checks    8 check vectors" in out


def test_medge_convert_exits_3_when_a_gate_fails_and_no_gates_records_ungated(tmp_path, capsys):
    from medge.cli.convert import main

    assert main(["--demo", "--engine", "none", "--max-abs-error", "0.05", "-o", str(tmp_path / "a.medge")]) == 3
    assert "accuracy gates FAILED" in capsys.readouterr().err
    assert main(["--demo", "--engine", "none", "--no-gates", "-o", str(tmp_path / "b.medge")]) == 0
    manifest = json.loads((tmp_path / "b.medge" / "manifest.json").read_text())
    assert manifest["gates"]["enabled"] is False
    assert {v["verdict"] for g, v in manifest["gates"]["verdicts"].items() if g != "fp32"} == {"ungated"}
    # INT8 accuracy control aims at the top-1 gate, so it is off with the gates.
    assert all(manifest["graphs"][g]["quantization"]["accuracy_control"] is None for g in ("int8", "int8-ort"))
    assert main(["--demo", "--engine", "none", "--no-gates", "--max-abs-error", "1", "-o",
                 str(tmp_path / "c.medge")]) == 2


def _perturb_int8(monkeypatch):
    """Make ONNX Runtime's INT8 graphs give a different answer here than at conversion (as a CPU whose
    INT8 kernels saturate would), and nothing else."""
    from medge.runtime.backends import onnxruntime as ort_backend

    original = ort_backend.OnnxRuntimeBackend.execute

    def execute(self, batch_size):
        outputs = original(self, batch_size)
        return outputs[:, ::-1].copy() if self.precision == "int8" else outputs

    monkeypatch.setattr(ort_backend.OnnxRuntimeBackend, "execute", execute)


def test_a_precision_that_fails_the_self_test_is_dropped_with_the_reason(demo_bundle, monkeypatch):
    _perturb_int8(monkeypatch)
    with medge.load(demo_bundle.bundle_path, backend="onnxruntime") as model:  # the perturbed engine
        assert model.backend.graph == "fp32"
        assert any("int8-ort on onnxruntime cpu failed the self-test" in line and "top-1 class differs" in line
                   for line in model.backend.passed_over)
    with pytest.raises(BackendUnavailable, match="failed the self-test"):
        medge.load(demo_bundle.bundle_path, backend="onnxruntime", precision="int8")


def test_inspect_self_test_runs_every_graph(demo_bundle, monkeypatch, capsys):
    from medge.cli.main import main

    assert main(["inspect", str(demo_bundle.bundle_path), "--self-test"]) == 0
    out = capsys.readouterr().out
    assert out.count("onnxruntime cpu") == len(demo_bundle.manifest["graphs"]) and "FAILED" not in out
    _perturb_int8(monkeypatch)
    assert main(["inspect", str(demo_bundle.bundle_path), "--self-test"]) == 1
    assert "int8-ort  onnxruntime cpu    gates passed        FAILED: " in capsys.readouterr().out


def test_check_vectors_have_a_clear_margin_and_cover_both_classes(demo_bundle):
    from medge.bundle import Bundle
    from medge.runtime.checks import CheckVectors
    from medge.tasks import task_from_manifest

    bundle = Bundle.open(demo_bundle.bundle_path)
    checks = CheckVectors.from_bundle(bundle)
    task = task_from_manifest(bundle.manifest)
    assert checks.source == "validation set" and len(checks.inputs) == 8
    assert set(task.predicted_indices(checks.reference).tolist()) == {0, 1}
    assert (task.margins(checks.reference) > max(checks.tolerances.values())).all()
    assert checks.inputs.shape[1:] == (1, 128, 128) and checks.inputs.dtype == np.float32


def test_a_cr_image_sent_to_the_ct_demo_fails_alone_with_a_clear_error(demo_bundle, tmp_path):
    from medge.synthetic import ct_slice, monochrome1_cr

    ct, cr = tmp_path / "ct.dcm", tmp_path / "cr.dcm"
    ct_slice(seed=5, lesion=True).save_as(ct, enforce_file_format=True)
    monochrome1_cr().save_as(cr, enforce_file_format=True)
    with medge.load(demo_bundle.bundle_path) as model:
        ok, refused, again = model.predict_each([ct, cr, ct])
        assert isinstance(refused, OutsideEnvelope)
        assert "modality CR; this model was validated on CT" in str(refused)
        assert "photometric interpretation MONOCHROME1; this model was validated on MONOCHROME2" in str(refused)
        assert ok[0].label == again[0].label and not ok[0].warnings
        with pytest.raises(OutsideEnvelope):
            model.predict(cr)
    with medge.load(demo_bundle.bundle_path, envelope="warn") as model:
        flagged = model.predict(cr)
        assert any("modality CR" in w for w in flagged.warnings)
    with medge.load(demo_bundle.bundle_path, envelope="off") as model:
        assert model.predict(cr).warnings == ()


def test_arrays_are_checked_on_their_pixels_only(demo_bundle):
    """An array carries no acquisition: its caller vouches for the modality; its size is still checked."""
    with medge.load(demo_bundle.bundle_path) as model:
        assert model.predict(np.zeros((512, 512), np.int16)).label in model.labels
        with pytest.raises(OutsideEnvelope, match="256 rows; this model was validated on 512 rows"):
            model.predict(np.zeros((256, 256), np.int16))


def test_envelope_of_a_ct_series():
    from medge.image import Acquisition, Image
    from medge.runtime.envelope import Envelope

    def image(rows=512, modality="CT", spacing=(0.7, 0.7), body="CHEST", photometric="MONOCHROME2"):
        return Image.from_array(np.zeros((rows, rows), np.int16), photometric_interpretation=photometric,
                                bits_stored=12, acquisition=Acquisition(modality, body, spacing))

    envelope = Envelope.observe([image(spacing=(0.6, 0.6)), image(spacing=(0.8, 0.8)), image(rows=256)],
                                ["validation"])
    assert envelope.rows == (256, 512) and envelope.pixel_spacing_mm == (0.6, 0.8)
    assert Envelope.from_manifest(json.loads(json.dumps(envelope.to_manifest()))) == envelope
    assert envelope.violations(image(spacing=(0.7, 0.7))) == []
    assert envelope.violations(image(spacing=(0.805, 0.805))) == []  # within the 1% slack
    assert envelope.violations(image(spacing=(1.0, 1.0))) == [
        "pixel spacing 1 x 1 mm; this model was validated on 0.6-0.8 mm"]
    assert envelope.violations(image(body=None, spacing=None)) == []  # optional attributes absent: not held
    assert envelope.violations(image(body="HEAD")) == ["body part HEAD; this model was validated on CHEST"]
    assert envelope.violations(image(modality=None)) == ["no Modality in the header; this model was validated on CT"]
    assert envelope.violations(image(rows=1024)) == ["1024 rows; this model was validated on 256-512 rows",
                                                     "1024 columns; this model was validated on 256-512 columns"]


def _unet_like_onnx(path: Path) -> Path:
    """(batch, 1, 32, 32) -> (batch, 2, 32, 32): a per-pixel two-class output, as a segmentation UNet gives."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"], pads=[1, 1, 1, 1], name="conv")], "unet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2, 32, 32])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_segmentation_network_is_refused_at_conversion(tmp_path):
    from medge.cli.convert import main
    from medge.convert.pipeline import convert
    from medge.preprocess import PreprocessSpec
    from medge.synthetic import write_ct_series

    write_ct_series(tmp_path / "val", 4, seed=3, size=64)
    unet = _unet_like_onnx(tmp_path / "unet.onnx")
    spec = PreprocessSpec(32, 32, voi="window", window=(-600, 1500))
    with pytest.raises(ConversionError, match=r"output is \(batch, 2, 32, 32\).*--task segmentation"):
        convert(unet, tmp_path / "u.medge", spec=spec, validation=tmp_path / "val", precisions=["fp32"],
                engine="none", log=lambda _: None)
    assert not (tmp_path / "u.medge").exists()
    assert main([str(unet), "--size", "32", "32", "--window", "-600", "1500", "--precision", "fp32", "--engine",
                 "none", "--val", str(tmp_path / "val"), "-o", str(tmp_path / "u.medge")]) == 2


@pytest.mark.parametrize("shape,labels,activation,match", [
    (["batch", 3], ["a", "b"], "softmax", "outputs 3 classes but 2 class names"),
    (["batch", 1], [], "softmax", "softmax over one class is always 1.0"),
    (["batch", 1], ["a", "b", "c"], "sigmoid", "give two class names"),
    (["batch", "classes"], [], "softmax", "class axis must have a fixed size"),
    (["batch"], [], "softmax", r"output is \(batch\)"),
])
def test_classification_outputs_must_match_the_declared_task(shape, labels, activation, match):
    from medge.tasks import ClassificationTask

    with pytest.raises(ConversionError, match=match):
        ClassificationTask.for_outputs(shape, labels=labels, activation=activation)


def test_a_bundle_without_a_declared_task_is_refused(demo_bundle, tmp_path):
    copy = tmp_path / "old.medge"
    shutil.copytree(demo_bundle.bundle_path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["task"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="has no task"):
        medge.load(copy)


_MUTATIONS = [
    ("graphs", "fp32", "precision", 5), ("graphs", "fp32", "file", 7), ("profile", "max", None, "8"),
    ("profile", "max", None, 0), ("task", "classes", None, "2"), ("task", "kind", None, "segmentation"),
    ("task", "labels", None, "no_lesion"), ("task", "activation", None, "relu"),
    ("check_vectors", "tolerances", None, [1, 2]), ("check_vectors", "inputs_file", None, 3),
    ("check_vectors", "outputs_file", None, "models/model.fp32.onnx"),
    ("envelope", "rows", None, "512"), ("envelope", "modalities", None, "CT"), ("envelope", "bits_stored", None, [True]),
    ("preprocess", "height", None, "a"), ("preprocess", "mean", None, [float(1e308)]), ("preprocess", "voi", None, 3),
    ("gates", "verdicts", None, []), ("gates", "verdicts", "fp32", {"verdict": "ok"}), ("labels", None, None, {}),
    ("graphs", "fp32", "input_dtype", 5), ("outputs", None, None, [{"name": 1}]),
    ("task", None, None, None), ("gates", None, None, "yes"), ("envelope", None, None, 12),
]


@pytest.mark.parametrize("section,key,sub,value", _MUTATIONS)
def test_a_damaged_manifest_answers_only_with_a_medge_error(demo_bundle, tmp_path, section, key, sub, value):
    """Wrong types anywhere the runtime reads: a BundleError (or SpecError) naming it, never KeyError/TypeError."""
    copy = tmp_path / "damaged.medge"
    shutil.copytree(demo_bundle.bundle_path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    if key is None:
        manifest[section] = value
    elif sub is None:
        manifest[section][key] = value
    else:
        manifest[section][key][sub] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MedgeError):
        with medge.load(copy) as model:
            model.predict(np.zeros((512, 512), np.int16))


def test_conversion_folders_are_read_by_content_like_medge_run(tmp_path):
    """A UID-named file (a common export name) is used, a README is skipped (it used to be dropped silently)."""
    from medge.convert.pipeline import load_inputs
    from medge.preprocess import PreprocessSpec
    from medge.synthetic import write_ct_series

    write_ct_series(tmp_path / "val", 3, seed=4, size=64)
    files = sorted(p for p in (tmp_path / "val").iterdir() if p.suffix == ".dcm")
    files[0].rename(tmp_path / "val" / "1.2.840.113619.2.55.3.4")
    (tmp_path / "val" / "README").write_text("not an image")
    inputs = load_inputs(tmp_path / "val", PreprocessSpec(32, 32, voi="window", window=(-600, 1500)),
                         what="validation", progress=False)
    assert len(inputs.array) == 3 and len(inputs.headers) == 3
    assert any("1.2.840.113619.2.55.3.4" in keys for keys in inputs.keys)


def test_a_dataset_without_pixel_data_is_a_dicom_error_in_preprocess():
    """It used to be iterated element by element and leak pydicom's own exceptions."""
    from pydicom.dataset import Dataset

    from medge.errors import DicomError
    from medge.preprocess import PreprocessSpec

    ds = Dataset()
    ds.Modality = "CT"
    ds.Rows = 4
    with pytest.raises(DicomError):
        medge.preprocess(ds, PreprocessSpec(8, 8, voi="range", value_range=(0, 1)))
