"""The shipped demo model (medge/demo/): files, integrity, metadata, and that it works.

Fast: no training. The model itself is made by tools/train_demo_model.py.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")

import medge  # noqa: E402
from medge import demo  # noqa: E402
from medge.preprocess import PreprocessSpec  # noqa: E402

VALIDATION_COUNT = 16


@pytest.fixture(scope="module")
def metadata() -> dict:
    return demo.demo_metadata()


@pytest.fixture(scope="module")
def validation_set(tmp_path_factory):
    """A few demo validation DICOMs, preprocessed with demo_spec(), and their stored labels."""
    directory = tmp_path_factory.mktemp("demo-validation")
    files, labels_csv = demo.write_demo_dicoms(directory, "validation", count=VALIDATION_COUNT)
    labels = demo.read_labels(labels_csv)
    x = medge.preprocess([medge.read_dicom(f) for f in files], demo.demo_spec())
    y = np.array([labels[f.name] for f in files])
    return x, y, labels_csv


@pytest.fixture(scope="module")
def ort_logits(validation_set):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(demo.demo_model_path()), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": validation_set[0]})[0]


def test_files_match_their_recorded_sha256(metadata):
    assert metadata["onnx"]["sha256"] == demo.file_sha256(demo.demo_model_path())
    assert metadata["onnx"]["bytes"] == demo.demo_model_path().stat().st_size
    if metadata.get("weights") and (demo.demo_dir() / metadata["weights"]["file"]).exists():
        assert metadata["weights"]["sha256"] == demo.file_sha256(demo.demo_weights_path())


def test_onnx_passes_checker_and_has_the_documented_io(metadata):
    onnx = pytest.importorskip("onnx")
    path = demo.demo_model_path()
    assert path.stat().st_size < 5_000_000  # small enough to ship inside the wheel
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    assert all(init.data_location != onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17

    def io(values):
        return {v.name: (v.type.tensor_type.elem_type,
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values}

    spec = demo.demo_spec()
    assert io(model.graph.input) == {"image": (onnx.TensorProto.FLOAT, ["batch", *spec.output_shape_per_image])}
    assert io(model.graph.output) == {"logits": (onnx.TensorProto.FLOAT, ["batch", len(demo.LABELS)])}
    assert metadata["input"]["shape"] == ["batch", *spec.output_shape_per_image]


def test_metadata_describes_the_model(metadata):
    assert metadata["name"] == demo.DEMO_MODEL_NAME == "medge-demo-lesion"
    assert metadata["labels"] == list(demo.LABELS) == ["no_lesion", "lesion"]
    assert metadata["activation"] == "softmax"
    test = metadata["metrics"]["test"]
    assert test["count"] >= 200 and test["auc"] >= 0.95
    for key in ("accuracy", "sensitivity", "specificity"):
        assert 0.0 <= test[key] <= 1.0
    assert metadata["training"]["deterministic_algorithms"] is True
    seeds = metadata["seeds"]
    train, held_out = seeds["train_slice_seeds"], seeds["test_slice_seeds"]
    assert demo.TRAIN_SEEDS.start <= train[0] <= train[1] < demo.TRAIN_SEEDS.stop
    assert demo.TEST_SEEDS.start <= held_out[0] <= held_out[1] < demo.TEST_SEEDS.stop
    assert seeds["demo_series_seeds"] == demo.DEMO_SERIES_SEEDS
    assert all(s in demo.RESERVED_SERIES_SEEDS for s in demo.DEMO_SERIES_SEEDS.values())


def test_spec_round_trips_through_preprocess_spec(metadata):
    spec = demo.demo_spec()
    assert spec.to_dict() == metadata["spec"]
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    # What the model was trained on: a fixed lung window, antialiased down-sampling, float32.
    assert (spec.voi, spec.window, spec.resample, spec.dtype, spec.channels) == (
        "window", (-600.0, 1500.0), "bilinear_antialias", "float32", 1)


def test_demo_sets_are_deterministic_and_disjoint_from_training(tmp_path, validation_set):
    files_a, csv_a = demo.write_demo_dicoms(tmp_path / "a", "calibration", count=4)
    files_b, csv_b = demo.write_demo_dicoms(tmp_path / "b", "calibration", count=4)
    assert [f.read_bytes() for f in files_a] == [f.read_bytes() for f in files_b]
    assert csv_a.read_text() == csv_b.read_text() and csv_a.name == "labels.csv"

    def seeds(labels_csv: Path) -> set[int]:
        with open(labels_csv, newline="") as f:
            return {int(row["seed"]) for row in csv.DictReader(f)}

    calibration, validation = seeds(csv_a), seeds(validation_set[2])
    assert not calibration & validation
    for seed in calibration | validation:
        assert seed not in demo.TRAIN_SEEDS and seed not in demo.TEST_SEEDS
    with pytest.raises(ValueError, match="kind"):
        demo.write_demo_dicoms(tmp_path / "c", "training", count=1)


def test_onnxruntime_classifies_demo_validation_dicoms(validation_set, ort_logits):
    _, labels, _ = validation_set
    assert ort_logits.shape == (VALIDATION_COUNT, 2) and ort_logits.dtype == np.float32
    assert 0 < labels.sum() < len(labels)
    correct = (ort_logits.argmax(axis=1) == labels).mean()
    assert correct >= 0.9, f"only {correct:.0%} of the demo validation slices classified correctly"


def test_pytorch_weights_reproduce_the_onnx_outputs(validation_set, ort_logits):
    torch = pytest.importorskip("torch", reason="the PyTorch import path needs torch")
    from medge.demo.model import DemoLesionNet

    if not (demo.demo_dir() / "demo_model.pt").exists():
        pytest.skip("demo_model.pt is not shipped (the package carries the ONNX model); "
                    "tools/train_demo_model.py --pytorch-weights medge/demo/demo_model.pt writes it")
    model = DemoLesionNet()
    model.load_state_dict(torch.load(demo.demo_weights_path(), weights_only=True))
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(validation_set[0])).numpy()
    np.testing.assert_allclose(logits, ort_logits, rtol=0, atol=1e-4)


def test_importing_the_demo_package_does_not_import_torch():
    # The run side never imports torch: the metadata helpers must work without it.
    code = ("import sys, medge.demo as d; d.demo_spec(); d.demo_model_path(); "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=60)
