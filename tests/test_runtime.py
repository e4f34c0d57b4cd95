"""The run side: medge.load, the prediction pipeline, the ONNX Runtime backend and medge run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[runtime]"')

import medge  # noqa: E402
from medge import demo  # noqa: E402
from medge.errors import BackendUnavailable, BundleError, DicomError, MedgeError, SignatureError  # noqa: E402


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    """The demo validation set convert_demo measured (same deterministic files), with labels."""
    directory = tmp_path_factory.mktemp("val")
    files, labels_csv = demo.write_demo_dicoms(directory, "validation")
    labels = demo.read_labels(labels_csv)
    return files, np.array([labels[f.name] for f in files])


@pytest.mark.parametrize("precision,graph", [("fp32", "fp32"), ("int8", "int8-ort"), ("fp16", "fp16")])
def test_predictions_reproduce_the_accuracy_report(demo_bundle, validation, precision, graph):
    """The same images through medge.load give the convert-time report's numbers for that graph."""
    from medge.convert.validate import classification_metrics, run_graph

    files, labels = validation
    with medge.load(demo_bundle.bundle_path, backend="onnxruntime", precision=precision) as model:
        assert model.backend.graph == graph and model.backend.name == "onnxruntime"
        predictions = model.predict_batch(files)
        assert len(predictions) == len(files)
        scores = np.stack([p.scores for p in predictions])
        # The raw graph on the same images, preprocessed the same way: identical up to float rounding.
        inputs = medge.preprocess([medge.read_dicom(f) for f in files], model.spec.replace(dtype="float32"))
        graph_file = model.bundle.artifact_path(model.manifest["graphs"][graph]["file"])
        logits = run_graph(graph_file, inputs, model.max_batch)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    report = next(r for r in demo_bundle.manifest["accuracy"]["results"]
                  if r["precision"] == graph and r["batch_size"] == model.max_batch)
    metrics = classification_metrics(logits, labels, "softmax", 1)
    assert metrics["accuracy"] == pytest.approx(report["accuracy"])
    assert metrics["auc"] == pytest.approx(report["auc"])
    assert [p.label for p in predictions] == [("no_lesion", "lesion")[i] for i in logits.argmax(1)]


def test_prediction_carries_uid_label_and_stage_timings(demo_bundle, validation):
    files, labels = validation
    with medge.load(demo_bundle.bundle_path) as model:
        prediction = model.predict(files[0])
        dataset_prediction = model.predict(__import__("pydicom").dcmread(files[0]))
        bytes_prediction = model.predict(files[0].read_bytes())
    assert prediction.label == ("no_lesion", "lesion")[labels[0]]
    assert prediction.sop_instance_uid and prediction.sop_instance_uid.startswith("2.25.")
    assert set(prediction.timings_ms) >= {"read", "preprocess", "infer", "postprocess", "batch_size"}
    np.testing.assert_array_equal(prediction.scores, dataset_prediction.scores)
    np.testing.assert_array_equal(prediction.scores, bytes_prediction.scores)
    assert abs(float(prediction.scores.sum()) - 1.0) < 1e-5


def test_a_bad_input_fails_only_itself(demo_bundle, validation, tmp_path):
    files, _ = validation
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with medge.load(demo_bundle.bundle_path) as model:
        mixed = model.predict_batch([files[0], junk, files[1], b"\x00" * 10, files[2]], return_exceptions=True)
        assert [type(r).__name__ for r in mixed] == ["Prediction", "DicomError", "Prediction", "DicomError",
                                                     "Prediction"]
        clean = model.predict_batch([files[0], files[1], files[2]])
        np.testing.assert_array_equal(np.stack([mixed[i].scores for i in (0, 2, 4)]),
                                      np.stack([p.scores for p in clean]))
        with pytest.raises(DicomError):
            model.predict(junk)
        nan_image = np.zeros((64, 64), np.float32)
        nan_image[0, 0] = np.nan
        assert isinstance(model.predict_batch([nan_image, files[0]], return_exceptions=True)[0], MedgeError)
        with pytest.raises(DicomError):
            model.predict_batch([files[0], junk])


def test_multi_frame_images_give_one_prediction_per_frame(demo_bundle, tmp_path):
    from medge.synthetic import enhanced_multiframe

    path = tmp_path / "mf.dcm"
    enhanced_multiframe(size=64, frames=3).save_as(path, enforce_file_format=True)
    # 64x64 frames lie outside the demo's validated 512x512: flagged, not refused, with envelope="warn".
    with medge.load(demo_bundle.bundle_path, envelope="warn") as model:
        (frames,) = model.predict_each([path])
        assert [p.frame for p in frames] == [0, 1, 2]
        assert all("64 rows; this model was validated on 512 rows" in " ".join(p.warnings) for p in frames)
        with pytest.raises(MedgeError, match="predict_batch"):
            model.predict(path)
        assert len(model.predict_batch([path] * 4)) == 12  # 12 frames over batches of 8


def test_tampered_bundle_or_wrong_key_is_refused_before_anything_is_deserialised(demo_bundle, tmp_path, monkeypatch):
    from medge.runtime.backends import onnxruntime as ort_backend

    constructed = []
    monkeypatch.setattr(ort_backend.OnnxRuntimeBackend, "__init__",
                        lambda self, *a, **k: constructed.append(1) or (_ for _ in ()).throw(AssertionError))
    copy = tmp_path / "t.medge"
    shutil.copytree(demo_bundle.bundle_path, copy)
    victim = copy / demo_bundle.manifest["graphs"]["int8-ort"]["file"]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0x40
    victim.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.int8-ort.onnx"):
        medge.load(copy)
    pytest.importorskip("cryptography", reason='cryptography is not installed: pip install "medge[runtime]"')
    from medge.bundle import generate_signing_key

    generate_signing_key(tmp_path / "k.pem", tmp_path / "k.pub")
    with pytest.raises(SignatureError):
        medge.load(demo_bundle.bundle_path, trusted_key=tmp_path / "k.pub")  # unsigned bundle, key required
    assert constructed == []


def test_tensorrt_request_without_a_gpu_says_why(demo_bundle):
    if medge.cuda_available():
        pytest.skip("a CUDA device is present: this checks the message given without one")
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        medge.load(demo_bundle.bundle_path, backend="tensorrt_rtx")
    with medge.load(demo_bundle.bundle_path, backend="auto") as model:
        # A CPU engine (OpenVINO where installed, else ONNX Runtime), saying why TensorRT was not used.
        assert model.backend.name in ("onnxruntime", "openvino") and "no CUDA device" in model.backend.reason


def test_memory_stays_flat_over_20000_predictions(demo_bundle, validation):
    """Buffers are allocated once: resident memory after 20,000 predictions stays within a small bound."""
    import resource

    files, _ = validation
    images = [medge.read_dicom(f) for f in files[:8]]

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    with medge.load(demo_bundle.bundle_path) as model:
        for _ in range(100):  # warm-up: allocator pools, ORT arenas
            model.predict_batch(images)
        before = rss_mb()
        for _ in range(2500):  # 2,500 batches of 8 = 20,000 predictions
            model.predict_batch(images)
        grown = rss_mb() - before
    assert grown < 16.0, f"resident memory grew by {grown:.1f} MB over 20,000 predictions"


def test_medge_run_writes_one_line_per_image_and_reports_failures(demo_bundle, validation, tmp_path, capsys):
    from medge.cli.main import main

    files, labels = validation
    folder = tmp_path / "in"
    folder.mkdir()
    for f in files[:5]:
        shutil.copy(f, folder / f.name)
    (folder / "broken.dcm").write_bytes(b"junk")
    out = tmp_path / "results.jsonl"
    assert main(["run", str(demo_bundle.bundle_path), str(folder), "--out", str(out), "--batch", "4"]) == 1
    err = capsys.readouterr().err
    assert "skipped broken.dcm" in err and "5 of 6 files predicted, 1 failed" in err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["file"] for line in lines] == [f.name for f in files[:5]]
    assert all(line["sop_instance_uid"].startswith("2.25.") for line in lines)
    assert [line["label"] for line in lines] == [("no_lesion", "lesion")[v] for v in labels[:5]]
    assert "PatientName" not in out.read_text() and "SYNTHETIC" not in out.read_text()
    csv_out = tmp_path / "r.csv"
    assert main(["run", str(demo_bundle.bundle_path), str(files[0]), "--out", str(csv_out)]) == 0
    assert csv_out.read_text().splitlines()[0] == "sop_instance_uid,file,frame,label,score_no_lesion,score_lesion,warnings"


def test_batcher_over_a_real_model_keeps_multi_frame_images_together(demo_bundle, validation, tmp_path):
    """Through medge.Batcher: single-frame items resolve to their Prediction, a 3-frame one to a list of 3,
    a bad one fails alone; all equal serial predict."""
    from medge.synthetic import enhanced_multiframe

    files, _ = validation
    multi = tmp_path / "mf.dcm"
    enhanced_multiframe(size=64, frames=3).save_as(multi, enforce_file_format=True)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"junk")
    with medge.load(demo_bundle.bundle_path, envelope="warn") as model:  # 64x64 frames: flagged, not refused
        serial = [model.predict(f) for f in files[:6]]
        with medge.Batcher(model, max_delay_ms=5) as batcher:
            futures = [batcher.submit(item) for item in [*files[:3], multi, junk, *files[3:6]]]
            results = [f.exception() or f.result() for f in futures]
    assert isinstance(results[3], list) and [p.frame for p in results[3]] == [0, 1, 2]
    assert isinstance(results[4], DicomError)
    single = [r for i, r in enumerate(results) if i not in (3, 4)]
    np.testing.assert_allclose(np.stack([p.scores for p in single]), np.stack([p.scores for p in serial]), atol=1e-6)


@pytest.mark.gpu
def test_tensorrt_rtx_engines_give_the_accuracy_reports_numbers(demo_bundle, validation):
    """On a GPU where TensorRT-RTX runs: the bundled engines reproduce the report (INT8 and FP16 rows)."""
    if not medge.cuda_available():
        pytest.skip(f"no CUDA device ({medge._C.cuda_status()})")
    tensorrt_rtx = pytest.importorskip("tensorrt_rtx", reason='tensorrt_rtx is not installed: pip install "medge[rtx]"')
    from tests.conftest import skip_not_for_this_gpu
    from medge.convert.validate import classification_metrics
    from medge.runtime.backends.tensorrt import gpu_identity, rtx_unsupported_reason

    reason = rtx_unsupported_reason(tensorrt_rtx, gpu_identity(0))
    if reason:
        skip_not_for_this_gpu(reason)  # e.g. an H100/H200: RTX engines cannot run there

    files, labels = validation
    for precision in ("int8", "fp16", "fp32"):
        with medge.load(demo_bundle.bundle_path, backend="tensorrt_rtx", precision=precision) as model:
            scores = np.stack([p.scores for p in model.predict_batch(files)])
        report = next(r for r in demo_bundle.manifest["accuracy"]["results"]
                      if r["precision"] == precision and r["batch_size"] == 8)
        metrics = classification_metrics(np.log(np.clip(scores, 1e-12, 1)), labels, "softmax", 1)
        assert metrics["accuracy"] >= report["accuracy"] - 0.01
        assert metrics["auc"] >= report["auc"] - 0.01
