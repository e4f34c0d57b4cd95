"""The segmentation task end to end: conversion report (Dice per label and precision), gates, runtime segment()."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import medge
from medge.errors import BackendUnavailable, BundleError, ConversionError, MedgeError

from .segmentation_fixtures import ROI, SERIES, WINDOW, seg_bundle, seg_data  # noqa: F401 - fixtures

pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _fp32_graph(result):
    return result.bundle_path / result.manifest["graphs"]["fp32"]["file"]


# ---------------------------------------------------------------------- conversion


def test_the_report_gives_dice_per_label_for_every_precision_and_batch(seg_bundle):
    manifest = seg_bundle.manifest
    assert manifest["task"]["kind"] == "segmentation"
    assert manifest["task"]["labels"] == ["background", "sphere"] and manifest["task"]["roi"] == list(ROI)
    assert manifest["task"]["spatial_dims"] == 3 and manifest["task"]["overlap"] == 0.5
    assert manifest["preprocess"]["kind"] == "volume" and manifest["preprocess"]["window"] == list(WINDOW)
    assert manifest["inputs"][0]["shape"][1:] == [1, *ROI]
    report = seg_bundle.report
    assert report.kind == "segmentation" and report.images == 1  # one validation series, whole volume
    graphs = {r.precision for r in report.results}
    assert graphs == {"fp32", "fp16", "int8", "int8-ort"}
    for graph in graphs:
        assert {r.batch_size for r in report.results if r.precision == graph} == {1, 2}
    for r in report.results:
        assert r.measured and len(r.dice) == 1 and r.min_dice == r.dice[0]
        assert 0 <= r.max_probability_error <= 1 and 0 < r.voxel_agreement <= 1
    reference = report.result("fp32", 1)
    assert reference.dice == [1.0] and reference.max_abs_error == 0.0
    fp16 = [r for r in report.results if r.precision == "fp16"]
    assert min(r.min_dice for r in fp16) > 0.99 and max(r.max_probability_error for r in fp16) < 0.05
    table = report.table()
    assert "Dice sphere" in table and "min Dice" in table
    assert (seg_bundle.bundle_path / "reports" / "accuracy.txt").read_text().strip() == table.strip()
    # Every graph gated on Dice; the trained network's precisions pass the default 0.95.
    assert manifest["gates"]["limits"] == {"min_dice": 0.95, "max_probability_error": None}
    verdicts = manifest["gates"]["verdicts"]
    assert verdicts["fp32"]["verdict"] == "reference"
    assert all(verdicts[g]["verdict"] == "passed" for g in ("fp16", "int8", "int8-ort")), verdicts
    assert any("calibration: " in line and "windows of (16, 32, 32)" in line for line in seg_bundle.log)


def test_calibration_and_check_vectors_use_the_sliding_windows(seg_bundle):
    manifest = seg_bundle.manifest
    quantisation = manifest["graphs"]["int8"]["quantization"]
    # 2 series x 8 windows (16 x 32 x 32 over 24 x 48 x 48 at overlap 0.5: 2 per axis).
    assert quantisation["images"] == 16
    checks = manifest["check_vectors"]
    assert checks["count"] == 8 and checks["source"] == "validation set"
    from medge.bundle import Bundle
    from medge.runtime.checks import CheckVectors

    vectors = CheckVectors.from_bundle(Bundle.open(seg_bundle.bundle_path))
    assert vectors.inputs.shape == (8, 1, *ROI) and vectors.reference.shape == (8, 2, *ROI)
    envelope = manifest["envelope"]
    assert envelope["modalities"] == ["CT"] and envelope["rows"] == [48, 48]
    assert envelope["images"] == 3 and envelope["unit"] == "series"


def test_the_trained_unet_finds_the_sphere_in_another_series(seg_bundle, seg_data):
    root, truths = seg_data
    with medge.load(seg_bundle.bundle_path, backend="onnxruntime", precision="fp32") as model:
        volume = medge.read_series(root / "deploy" / "one")
        seg = model.segment(volume)
        again = model.segment(root / "deploy" / "one")  # a folder works the same
    truth = truths["deploy/one"]
    assert isinstance(seg, medge.Segmentation)
    assert seg.label_map.dtype == np.uint8 and seg.label_map.shape == volume.shape == truth.mask.shape
    np.testing.assert_array_equal(seg.label_map, again.label_map)
    assert _dice(seg.label_map == 1, truth.mask) > 0.8  # meaningful masks, not noise
    assert seg.labels == ("background", "sphere") and seg.precision == "fp32" and seg.backend == "onnxruntime"
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    assert seg.volumes_ml["sphere"] == pytest.approx(int((seg.label_map == 1).sum()) * voxel_ml, rel=1e-12)
    truth_ml = 4 / 3 * np.pi * truth.radius_mm**3 / 1000.0
    assert seg.volumes_ml["sphere"] == pytest.approx(truth_ml, rel=0.3)
    assert {"read", "preprocess", "infer", "sliding_window", "postprocess"} <= set(seg.timings_ms)
    assert seg.timings_ms["windows"] == 8 and seg.warnings == ()
    assert json.loads(json.dumps(seg.to_dict()))["series_instance_uid"] == truth.series_instance_uid


def test_segment_equals_the_sliding_window_over_the_fp32_graph(seg_bundle, seg_data):
    """The runtime (windows gathered into the backend's buffer) gives the conversion's reference path."""
    from medge.convert.export import ort_session
    from medge.segmentation import infer_logits, model_input, to_label_map

    root, _ = seg_data
    volume = medge.read_series(root / "deploy" / "two")
    with medge.load(seg_bundle.bundle_path, backend="onnxruntime", precision="fp32") as model:
        seg = model.segment(volume, probabilities=True, batch_size=1)
        task, spec = model.task, model.spec
    session = ort_session(_fp32_graph(seg_bundle))
    name = session.get_inputs()[0].name
    logits = infer_logits(lambda windows: session.run(None, {name: np.array(windows)})[0],
                          model_input(volume, spec), task, 2)
    label_map, probabilities, _ = to_label_map(logits, volume, spec, task, keep_probabilities=True)
    np.testing.assert_array_equal(seg.label_map, label_map)
    np.testing.assert_allclose(seg.probabilities, probabilities, atol=1e-5)


def test_a_perturbed_int8_graph_fails_its_dice_gate_and_the_runtime_falls_back(seg_bundle, seg_data, tmp_path,
                                                                                monkeypatch):
    import onnx
    from onnx import numpy_helper

    from medge.convert import pipeline
    from medge.volume import VolumeSpec

    original = pipeline.make_int8

    def perturbed(fp32_path, out_path, calibration, **kwargs):
        summary = original(fp32_path, out_path, calibration, **kwargs)
        model = onnx.load(str(out_path))
        output = model.graph.output[0].name
        producer = next(n for n in model.graph.node if output in n.output)
        producer.output[list(producer.output).index(output)] = output + "_unshifted"
        # +3 on the sphere channel's logits: whole regions flip, as a badly calibrated graph would.
        shift = numpy_helper.from_array(np.array([0.0, 3.0], np.float32).reshape(1, 2, 1, 1, 1), "sphere_shift")
        model.graph.initializer.append(shift)
        model.graph.node.append(onnx.helper.make_node("Add", [output + "_unshifted", "sphere_shift"], [output]))
        onnx.save(model, str(out_path))
        return summary

    monkeypatch.setattr(pipeline, "make_int8", perturbed)
    root, _ = seg_data
    result = pipeline.convert(_fp32_graph(seg_bundle), tmp_path / "bad.medge", task="segmentation",
                              volume_spec=VolumeSpec(voi="window", window=WINDOW), overlap=0.5,
                              calibration=root / "calib", validation=root / "val", precisions=["fp32", "int8"],
                              class_labels=["background", "sphere"], batch=(1, 1, 1), engine="none",
                              min_calibration_images=8, log=lambda _: None)
    verdicts = result.manifest["gates"]["verdicts"]
    assert verdicts["int8-ort"]["verdict"] == "failed" and verdicts["int8"]["verdict"] == "failed"
    assert any("Dice of sphere vs fp32" in line and "< 0.95" in line for line in result.threshold_failures)
    with medge.load(result.bundle_path, backend="onnxruntime") as model:
        assert model.backend.graph == "fp32"
        assert any("int8-ort failed its accuracy gates" in line and "Dice of sphere" in line
                   for line in model.backend.passed_over)
    with pytest.raises(BackendUnavailable, match="failed its accuracy gates"):
        medge.load(result.bundle_path, backend="onnxruntime", precision="int8")


def test_a_precision_whose_labels_change_fails_the_self_test(seg_bundle, monkeypatch):
    from medge.runtime.backends import onnxruntime as ort_backend

    original = ort_backend.OnnxRuntimeBackend.execute

    def execute(self, batch_size):
        outputs = original(self, batch_size)
        return outputs[:, ::-1].copy() if self.precision == "int8" else outputs  # background <-> sphere

    monkeypatch.setattr(ort_backend.OnnxRuntimeBackend, "execute", execute)
    with medge.load(seg_bundle.bundle_path, backend="onnxruntime") as model:
        assert model.backend.graph == "fp32"
        assert any("int8-ort on onnxruntime cpu failed the self-test" in line and "labels differ from FP32" in line
                   for line in model.backend.passed_over)


def test_each_task_refuses_the_other_call(seg_bundle, demo_bundle):
    with medge.load(seg_bundle.bundle_path, backend="onnxruntime") as model:
        with pytest.raises(MedgeError, match="segments series; use model.segment"):
            model.predict(np.zeros((48, 48), np.uint16))
    with medge.load(demo_bundle.bundle_path, backend="onnxruntime") as model:
        with pytest.raises(MedgeError, match="scores images; use model.predict"):
            model.segment(np.zeros((4, 4, 4)))


def test_a_volume_spec_and_a_2d_spec_go_with_their_task(seg_bundle, seg_data, tmp_path):
    from medge.convert.pipeline import convert
    from medge.preprocess import PreprocessSpec
    from medge.volume import VolumeSpec

    root, _ = seg_data
    with pytest.raises(ConversionError, match="needs volume_spec"):
        convert(_fp32_graph(seg_bundle), tmp_path / "a.medge", task="segmentation", validation=root / "val",
                spec=PreprocessSpec(32, 32, voi="window", window=WINDOW), engine="none")
    with pytest.raises(ConversionError, match="volume spec is for task='segmentation'"):
        convert(_fp32_graph(seg_bundle), tmp_path / "b.medge", spec=PreprocessSpec(32, 32, voi="window",
                window=WINDOW), volume_spec=VolumeSpec(voi="window", window=WINDOW), validation=root / "val",
                engine="none")
    with pytest.raises(ConversionError, match=r"give 16 sliding windows of \(16, 32, 32\); INT8 calibration needs at "
                                              r"least 32 \(more calibration series"):
        convert(_fp32_graph(seg_bundle), tmp_path / "d.medge", task="segmentation", overlap=0.5,
                volume_spec=VolumeSpec(voi="window", window=WINDOW), calibration=root / "calib",
                precisions=["fp32", "int8"], engine="none", log=lambda _: None)
    with pytest.raises(ConversionError, match=r"--roi \(8, 8, 8\) differs from the model's input window"):
        convert(_fp32_graph(seg_bundle), tmp_path / "c.medge", task="segmentation", roi=(8, 8, 8),
                volume_spec=VolumeSpec(voi="window", window=WINDOW), validation=root / "val", precisions=["fp32"],
                engine="none", log=lambda _: None)
    assert not any(tmp_path.iterdir())


def test_the_bundle_schema_check_wants_task_and_spec_to_agree(seg_bundle, tmp_path):
    from medge.bundle import Bundle

    copy = tmp_path / "copy.medge"
    shutil.copytree(seg_bundle.bundle_path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["preprocess"].pop("kind")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="a segmentation task needs a volume spec"):
        Bundle.open(copy)


# ---------------------------------------------------------------------- other networks


def test_a_2d_unet_runs_slice_by_slice(seg_data, tmp_path):
    """A 2-D network over a series: one slice per window; the label map is the per-slice argmax."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    nets = pytest.importorskip("monai.networks.nets", reason="monai is not installed")
    from medge.convert.export import ort_session
    from medge.convert.pipeline import convert
    from medge.segmentation import model_input
    from medge.volume import VolumeSpec

    root, _ = seg_data
    torch.manual_seed(1)
    net = nets.UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,),
                    num_res_units=0).eval()
    spec = VolumeSpec(voi="window", window=WINDOW)
    result = convert(net, tmp_path / "unet2d.medge", task="segmentation", volume_spec=spec, roi=(48, 48),
                     validation=root / "val", precisions=["fp32", "fp16"], batch=(1, 4, 8), engine="none",
                     log=lambda _: None)
    task = result.manifest["task"]
    assert task["spatial_dims"] == 2 and task["roi"] == [48, 48] and len(task["labels"]) == 3
    assert result.manifest["inputs"][0]["shape"][1:] == [1, 48, 48]
    assert {r.batch_size for r in result.report.results} == {1, 4, 8}
    assert result.report.result("fp16", 8).dice is not None
    volume = medge.read_series(root / "deploy" / "one")
    with medge.load(result.bundle_path, backend="onnxruntime", precision="fp32") as model:
        seg = model.segment(volume)
    assert seg.timings_ms["windows"] == SERIES["slices"]  # one window per slice
    session = ort_session(result.bundle_path / result.manifest["graphs"]["fp32"]["file"])
    slices = model_input(volume, spec).transpose(1, 0, 2, 3)  # (D, 1, H, W): a batch of slices
    expected = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(slices)})[0].argmax(1)
    np.testing.assert_array_equal(seg.label_map, expected)


def test_a_2d_unet_on_25d_input_sees_each_slice_with_its_neighbours(seg_data, tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    nets = pytest.importorskip("monai.networks.nets", reason="monai is not installed")
    from medge.convert.export import ort_session
    from medge.convert.pipeline import convert
    from medge.volume import VolumeSpec, preprocess_volume

    root, _ = seg_data
    torch.manual_seed(3)
    net = nets.UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(4, 8), strides=(2,),
                    num_res_units=0).eval()
    spec = VolumeSpec(voi="window", window=WINDOW, neighbours=1)
    result = convert(net, tmp_path / "unet25d.medge", task="segmentation", volume_spec=spec, roi=(48, 48),
                     validation=root / "val", precisions=["fp32"], batch=(1, 4, 4), engine="none",
                     log=lambda _: None)
    volume = medge.read_series(root / "deploy" / "two")
    with medge.load(result.bundle_path, backend="onnxruntime") as model:
        seg = model.segment(volume)
    session = ort_session(result.bundle_path / result.manifest["graphs"]["fp32"]["file"])
    slices = preprocess_volume(volume, spec=spec)  # (D, 3, H, W): each slice with the one before and after
    expected = session.run(None, {session.get_inputs()[0].name: slices})[0].argmax(1)
    np.testing.assert_array_equal(seg.label_map, expected)
    with pytest.raises(ConversionError, match=r"exported on windows of the volume spec, 3 channel\(s\)"):
        convert(nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                          num_res_units=0).eval(), tmp_path / "wrong.medge", task="segmentation", volume_spec=spec,
                roi=(48, 48), validation=root / "val", precisions=["fp32"], engine="none", log=lambda _: None)


def test_a_3d_segresnet_converts_with_its_report(seg_data, tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    nets = pytest.importorskip("monai.networks.nets", reason="monai is not installed")
    from medge.convert.pipeline import convert
    from medge.volume import VolumeSpec

    root, _ = seg_data
    torch.manual_seed(2)
    net = nets.SegResNet(spatial_dims=3, init_filters=4, in_channels=1, out_channels=2, blocks_down=(1, 1),
                         blocks_up=(1,), norm=("group", {"num_groups": 2})).eval()  # MONAI's default
    # upsampling: trilinear Resize, whose FP16 graph ONNX Runtime's converter left out of topological order
    result = convert(net, tmp_path / "segresnet.medge", task="segmentation",
                     volume_spec=VolumeSpec(voi="window", window=WINDOW, target_spacing=(1.6, 1.2, 2.5)),
                     roi=(8, 16, 16), validation=root / "val", precisions=["fp32", "fp16"], batch=(1, 2, 2),
                     engine="none", gates=False, log=lambda _: None)
    assert result.manifest["preprocess"]["target_spacing"] == [1.6, 1.2, 2.5]
    fp16 = result.report.result("fp16", 2)
    assert fp16.measured and fp16.max_probability_error < 0.05
    assert result.manifest["gates"]["verdicts"]["fp16"]["verdict"] == "ungated"
    volume = medge.read_series(root / "deploy" / "two")
    with medge.load(result.bundle_path, backend="onnxruntime", precision="fp16") as model:
        seg = model.segment(volume)
    # Resampled to half the rows and columns, segmented, and mapped back onto the series' own grid.
    assert seg.label_map.shape == volume.shape and seg.precision == "fp16"


def test_a_3d_engine_builds_with_a_5d_profile(seg_bundle, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed (the rtx extra)")
    from medge.convert.engine import build_engine

    info = build_engine(_fp32_graph(seg_bundle), tmp_path / "unet3d.engine", flavour="tensorrt_rtx",
                        precision="fp32", batch=(1, 2, 2), compute_capabilities=["8.9"])
    assert info.size_bytes > 0 and (tmp_path / "unet3d.engine").stat().st_size == info.size_bytes
    assert info.profile == {"min": 1, "opt": 2, "max": 2}


def test_medge_convert_segmentation_and_inspect(seg_bundle, seg_data, tmp_path, capsys):
    from medge.cli.convert import main as convert_main
    from medge.cli.main import main

    root, _ = seg_data
    out = tmp_path / "cli.medge"
    assert convert_main([str(_fp32_graph(seg_bundle)), "--task", "segmentation", "--window", "40", "400",
                         "--overlap", "0.5", "--labels-names", "background,sphere", "--val", str(root / "val"),
                         "--precision", "fp32,fp16", "--batch", "1:2:2", "--engine", "none", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "validation series, whole volumes through the sliding window" in printed and "Dice sphere" in printed
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Preprocess  volume (series -> network grid)" in printed and "sliding window 16 x 32 x 32" in printed
    assert "Dice sphere" in printed
    assert convert_main([str(_fp32_graph(seg_bundle)), "--task", "segmentation", "--size", "32", "32", "--window",
                         "40", "400", "--val", str(root / "val"), "-o", str(tmp_path / "x.medge")]) == 2
    assert "--spec / --size describe 2-D classifier inputs" in capsys.readouterr().err


# ---------------------------------------------------------------------- the task on its own (numpy only)


def test_softmax_and_sigmoid_labels_masks_and_dice():
    from medge.tasks import SegmentationTask

    rng = np.random.default_rng(5)
    logits = rng.standard_normal((2, 3, 4, 5, 6)).astype(np.float32)
    logits[0, 1, 0, 0, 0] = logits[0, 0, 0, 0, 0]  # a tie: the first class wins, as numpy's argmax
    softmax = SegmentationTask.for_outputs(["batch", 3, 4, 5, 6], ["batch", 1, 4, 5, 6])
    assert softmax.labels == ("background", "class1", "class2") and softmax.window == (4, 5, 6)
    np.testing.assert_array_equal(softmax.labels_of(logits), logits.argmax(1))
    sigmoid = SegmentationTask.for_outputs(["batch", 3, 4, 5, 6], ["batch", 1, 4, 5, 6], activation="sigmoid",
                                           threshold=0.6, labels=["a", "b", "c"])
    assert sigmoid.labels == ("background", "a", "b", "c") and sigmoid.label_count == 4
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected = np.where(p.max(1) >= 0.6, p.argmax(1) + 1, 0)
    np.testing.assert_array_equal(sigmoid.labels_of(logits), expected)
    np.testing.assert_array_equal(sigmoid.masks(logits), np.moveaxis(p >= 0.6, 1, 0))
    same = sigmoid.compare(logits, logits)
    assert same["dice"] == [1.0, 1.0, 1.0] and same["voxel_agreement"] == 1.0 and same["max_abs_error"] == 0.0
    shifted = logits.copy()
    shifted[:, 2] += 5.0  # the third channel (label "c") above the threshold almost everywhere
    result = sigmoid.compare(shifted, logits)
    assert result["dice"][:2] == [1.0, 1.0] and result["dice"][2] < 0.95 and result["min_dice"] == result["dice"][2]
    assert sigmoid.gate_failures(result, {"min_dice": 0.95}) == [
        f"Dice of c vs fp32 {result['dice'][2]:.4f} < 0.95"]
    assert any("labels differ from FP32" in f for f in sigmoid.check_failures(shifted, logits, 1.0))
    assert sigmoid.check_failures(logits + 1e-4, logits, 1e-3) == []
    empty = SegmentationTask.for_outputs(["batch", 2, 4, 4], ["batch", 1, 4, 4])
    background = np.stack([np.ones((1, 4, 4)), np.zeros((1, 4, 4))], axis=1).astype(np.float32)
    assert empty.compare(background, background)["dice"] == [None]  # absent from both: not gated


@pytest.mark.parametrize("kwargs,match", [
    (dict(output=["batch", 2, 8, 8, 8], inp=["batch", 1, 8, 8, 4]), "does not cover its input"),
    (dict(output=["batch", 2, 64], inp=["batch", 1, 64]), r"output is \(batch, 2, 64\)"),
    (dict(output=["batch", 1, 8, 8], inp=["batch", 1, 8, 8]), "use --activation sigmoid"),
    (dict(output=["batch", 3, 8, 8], inp=["batch", 1, 8, 8], labels=["a", "b"]), "need 3 label names"),
    (dict(output=["batch", 2, 8, 8], inp=["batch", 1, 8, 8], overlap=1.0), "overlap must be in"),
])
def test_segmentation_outputs_that_do_not_fit_are_refused(kwargs, match):
    from medge.tasks import SegmentationTask

    output, inp = kwargs.pop("output"), kwargs.pop("inp")
    with pytest.raises(ConversionError, match=match):
        SegmentationTask.for_outputs(output, inp, **kwargs)


@pytest.mark.parametrize("roi_fit, roi", [("crop_or_pad", (6, 20, 9)), ("pad", (4, 8, 8)), ("crop_or_pad", None)])
def test_the_native_way_back_equals_to_original_grid(roi_fit, roi):
    """segment()'s two-class way back (the native trilinear resampler) is to_original_grid's linear mapping."""
    from types import SimpleNamespace

    from medge.segmentation import _probability_to_original_grid
    from medge.volume import VolumeSpec, to_original_grid

    volume = SimpleNamespace(shape=(7, 30, 13), spacing=(0.8, 1.1, 2.5))
    spec = VolumeSpec(voi="range", value_range=(0, 1), target_spacing=(1.5, 1.0, 2.0), roi_size=roi, roi_fit=roi_fit)
    size, _ = spec.roi_placement(spec.resampled_size(volume.shape, volume.spacing))
    probability = np.random.default_rng(3).random(size, dtype=np.float32)
    expected = to_original_grid(probability, spec, volume.shape, volume.spacing, mode="linear", fill=0)
    got = _probability_to_original_grid(probability, spec, volume)
    assert got.shape == volume.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
