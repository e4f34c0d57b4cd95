"""Class activation maps from the engine itself (issue 10.1): equal to Grad-CAM, carried by every precision,
mapped back onto the original image grid, refused for heads where they would not be the model's reasoning."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')
onnx = pytest.importorskip("onnx", reason='onnx is not installed: pip install "medge[convert]"')
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import medge  # noqa: E402
from medge.convert.explain import add_class_activation_maps  # noqa: E402
from medge.errors import ConversionError  # noqa: E402
from medge.tasks.geometry import content_region, resize_bilinear, to_image_grid  # noqa: E402


def test_cam_equals_grad_cam_computed_by_pytorch(tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0)")
    from medge.convert.export import import_model
    from medge.demo.model import DemoLesionNet

    torch.manual_seed(0)
    net = DemoLesionNet(channels=(8, 16, 32), head_channels=32).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding them is exercised
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    x = torch.rand(3, 1, 64, 64)
    imported = import_model(net, tmp_path, example_input=x.numpy(), sample_inputs=x.numpy())
    add_class_activation_maps(imported.onnx_path, tmp_path / "cam.onnx", input_size=(64, 64))
    session = ort.InferenceSession(str(tmp_path / "cam.onnx"), providers=["CPUExecutionProvider"])
    logits, cam = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert cam.shape == (3, 2, 64, 64)

    features = net.features(x)
    out = net.classifier(torch.flatten(net.pool(features), 1))
    np.testing.assert_allclose(logits, out.detach().numpy(), rtol=1e-4, atol=1e-5)
    worst = 0.0
    for c in range(2):
        (grads,) = torch.autograd.grad(out[:, c].sum(), features, retain_graph=True)
        weights = grads.mean(dim=(2, 3), keepdim=True)  # Grad-CAM's channel weights
        grad_cam = torch.relu((weights * features).sum(dim=1, keepdim=True))
        grad_cam = torch.nn.functional.interpolate(grad_cam, size=(64, 64), mode="bilinear", align_corners=False)
        expected = grad_cam[:, 0].detach().numpy()
        scale = max(float(np.abs(expected).max()), 1e-12)
        worst = max(worst, float(np.abs(cam[:, c] - expected).max()) / scale)
    assert worst < 1e-4, f"CAM differs from Grad-CAM by {worst:.2e} of the map's range"


def _two_layer_head(path: Path) -> Path:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             (("w", (4, 1, 3, 3)), ("fc1", (8, 4)), ("fc2", (2, 8)))]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "fc2"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "mlp_head", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 ["batch", 1, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_other_heads_are_refused(tmp_path):
    with pytest.raises(ConversionError, match="global average pooling followed by one linear layer"):
        add_class_activation_maps(_two_layer_head(tmp_path / "m.onnx"), tmp_path / "cam.onnx", input_size=(16, 16))


def test_mapping_back_inverts_the_letterbox():
    assert content_region(512, 256, 128, 128, "letterbox") == (0, 32, 128, 64)
    assert content_region(512, 256, 128, 128, "stretch") == (0, 0, 128, 128)
    model_grid = np.zeros((128, 128), np.float32)
    model_grid[:, 32:96] = np.linspace(0, 1, 64, dtype=np.float32)[None, :]  # content; the pad stays 0
    back = to_image_grid(model_grid, 512, 256, "letterbox")
    assert back.shape == (512, 256)
    assert back[:, 0].max() < 0.02 and back[:, -1].min() > 0.98  # the content's edges, not the pad
    np.testing.assert_allclose(resize_bilinear(np.ones((4, 4)), 9, 7), np.ones((9, 7)))


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """The demo bundle as the issue's Done-when converts it: --explain --operating-point sensitivity=0.95."""
    from medge.convert.demo import convert_demo

    return convert_demo(tmp_path_factory.mktemp("explain") / "explain.medge", engine="none", explain=True,
                        operating_point="sensitivity=0.95", log=lambda _: None)


def _nodules(labels_csv: Path) -> dict:
    """{filename: (row, column, radius) of the nodule in pixels, or None} from a demo set's labels.csv."""
    with open(labels_csv, newline="") as f:
        return {row["filename"]: (float(row["lesion_row"]), float(row["lesion_col"]), float(row["lesion_radius"]))
                if row["label"] == "1" else None for row in csv.DictReader(f)}


def _peak_inside(heatmap: np.ndarray, nodule: tuple) -> bool:
    peak_row, peak_column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return bool(np.hypot(peak_row - nodule[0], peak_column - nodule[1]) <= nodule[2])


def test_every_precision_carries_the_maps_and_the_report_measures_their_agreement(explained):
    results = explained.manifest["accuracy"]["results"]
    for r in results:
        assert r["heatmap_correlation"] is not None
        assert r["heatmap_correlation"] > (0.999 if r["precision"] == "fp32" else 0.9), r
    assert explained.manifest["task"]["heatmap_output"] == "cam"
    from medge.demo import demo_metadata

    channels, h, w = explained.manifest["explanation"]["feature_shape"]
    assert [channels, h, w] == demo_metadata()["architecture"]["feature_map"]
    assert (h, w) == (32, 32)  # cells of 4 pixels at 128 x 128: the smallest nodule (radius 3.2) holds a centre


def test_the_heatmap_peaks_inside_the_nodule_on_lesion_slices(explained, tmp_path):
    """The whole demo validation set (128 slices, 64 with a nodule of radius 13-25 pixels at 512 x 512): the
    argmax of Prediction.heatmap lies inside the nodule the generator drew. The demo's last feature map has
    cells of 16 pixels at 512, so a peak on the right cell is inside even the smallest nodule. Measured when the
    model was trained (demo_model.json, metrics.localisation; FP32 on ONNX Runtime): 64/64 inside, in-lesion
    heat 5.3x the map's mean (median; min 4.3). The thresholds leave room for the engine's precision and a
    retrained model, not for one that does not localise: the previous demo network (4x4 map) had 1/64 inside
    and ratios of 2.2-2.6."""
    from medge.demo import DEFAULT_COUNTS, write_demo_dicoms

    files, labels_csv = write_demo_dicoms(tmp_path / "val", "validation")
    assert len(files) == DEFAULT_COUNTS["validation"]
    nodules = _nodules(labels_csv)
    inside, ratios, decided_lesion = [], [], []
    rows, columns = np.mgrid[:512, :512]
    with medge.load(explained.bundle_path) as model:
        for path, prediction in zip(files, model.predict_batch(files)):
            assert prediction.heatmap.shape == (512, 512) and prediction.heatmap.dtype == np.float32
            nodule = nodules[path.name]
            if nodule is None:
                continue
            decided_lesion.append(prediction.label == "lesion")  # the map then explains the lesion class
            inside.append(_peak_inside(prediction.heatmap, nodule))
            disc = np.hypot(rows - nodule[0], columns - nodule[1]) <= nodule[2]
            ratios.append(float(prediction.heatmap[disc].mean() / max(float(prediction.heatmap.mean()), 1e-12)))
    assert len(inside) == DEFAULT_COUNTS["validation"] // 2
    assert np.mean(decided_lesion) >= 0.95
    assert np.mean(inside) >= 0.9, f"peak inside the nodule on {sum(inside)}/{len(inside)} lesion slices"
    assert np.median(ratios) >= 3.5 and np.mean(np.array(ratios) >= 3.0) >= 0.95, sorted(ratios)[:8]


def test_medge_run_on_the_sample_series_writes_sr_and_overlays_that_read_back(explained, tmp_path, capsys):
    """The issue's Done-when: the bundle converted with --explain --operating-point sensitivity=0.95 runs
    `medge run --out-dicom` on the `medge demo` sample series; pydicom and highdicom read the SR and the overlays
    back, the SR carries the chosen threshold, and the heatmap peaks inside the nodule on its lesion slices."""
    hd = pytest.importorskip("highdicom", reason='highdicom is not installed: pip install "medge[dicom-out]"')
    import pydicom

    from medge.cli.main import main
    from medge.synthetic import write_samples

    write_samples(tmp_path / "in")
    series = sorted((tmp_path / "in").glob("ct_0*.dcm"))  # the CT series; the other samples are encodings
    nodules = _nodules(tmp_path / "in" / "labels.csv")
    assert len(series) == 4 and sum(nodules[f.name] is not None for f in series) == 2
    threshold = explained.manifest["task"]["threshold"]
    assert explained.manifest["operating_point"]["target"] == "sensitivity" and 0.0 < threshold < 1.0
    out = tmp_path / "dicom"
    assert main(["run", str(explained.bundle_path), *map(str, series), "--out", str(tmp_path / "r.jsonl"),
                 "--out-dicom", str(out)]) == 0
    assert "DICOM result file(s)" in capsys.readouterr().err
    srs, overlays = sorted((out / "sr").glob("*.dcm")), sorted((out / "overlays").glob("*.dcm"))
    assert len(srs) == 1 and len(overlays) == len(series) and len(list((out / "png").glob("*.png"))) == len(series)
    sr = pydicom.dcmread(srs[0])
    assert sr.Modality == "SR" and sr.ContentSequence
    groups = hd.sr.srread(srs[0]).content.get_image_measurement_groups()
    assert len(groups) == len(series)
    for group in groups:
        measured = {m.name.meaning: m.value for m in group.get_measurements()}
        assert measured["Threshold Value"] == pytest.approx(threshold)
    source_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series}
    for path in overlays:
        overlay = pydicom.dcmread(path)
        assert overlay.PhotometricInterpretation == "RGB" and overlay.pixel_array.shape == (512, 512, 3)
        image = hd.imread(path)
        assert image.SOPInstanceUID == overlay.SOPInstanceUID
        assert {str(item.ReferencedSOPInstanceUID) for item in overlay.SourceImageSequence} <= source_uids
    with medge.load(explained.bundle_path) as model:
        predictions = model.predict_batch(series)
    for path, prediction in zip(series, predictions):
        if nodules[path.name] is not None:
            assert prediction.label == "lesion" and _peak_inside(prediction.heatmap, nodules[path.name]), path.name
