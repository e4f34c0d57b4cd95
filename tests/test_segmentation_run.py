"""``medge run`` on a segmentation bundle: one DICOM SEG and one JSON line per series, bad series skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest

import medge

from .segmentation_fixtures import seg_bundle, seg_data  # noqa: F401 - fixtures

pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')
hd = pytest.importorskip("highdicom", reason='highdicom is not installed: pip install "medge[dicom-out]"')
pydicom = pytest.importorskip("pydicom", reason="pydicom is not installed")


@pytest.fixture(scope="module")
def run_output(seg_bundle, seg_data, tmp_path_factory):
    """medge run over deploy/ (two good series and one with a missing slice), on ONNX Runtime."""
    from medge.cli.main import main

    root, _ = seg_data
    out = tmp_path_factory.mktemp("segrun")
    code = main(["run", str(seg_bundle.bundle_path), str(root / "deploy"), "--backend", "onnxruntime",
                 "--out-dicom", str(out / "seg"), "--out", str(out / "results.jsonl")])
    return code, out


def test_one_seg_per_series_read_back_with_the_in_memory_mask(run_output, seg_bundle, seg_data):
    code, out = run_output
    root, truths = seg_data
    assert code == 1  # a series failed (the gapped one); the others were segmented
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_uid = {line["series_instance_uid"]: line for line in lines}
    expected = {truths[name].series_instance_uid: name for name in ("deploy/one", "deploy/two")}
    assert set(by_uid) == set(expected)
    written = sorted((out / "seg").glob("SEG_*.dcm"))
    assert len(written) == 2 and {line["seg_file"] for line in lines} == {p.name for p in written}
    with medge.load(seg_bundle.bundle_path, backend="onnxruntime") as model:
        for uid, name in expected.items():
            line = by_uid[uid]
            volume = medge.read_series(root / name)
            in_memory = model.segment(volume)
            assert line["precision"] == in_memory.precision and line["slices"] == volume.shape[0]
            assert line["files"] == volume.shape[0]
            assert {"read", "preprocess", "infer", "postprocess"} <= set(line["timings_ms"])
            # Volumes in mL: the label map's voxel count times the voxel volume from the series' spacing.
            count = int((in_memory.label_map == 1).sum())
            assert count > 0
            assert line["volumes_ml"]["sphere"] == pytest.approx(count * float(np.prod(volume.spacing)) / 1000,
                                                                  abs=1e-4)
            path = out / "seg" / line["seg_file"]
            back = hd.seg.segread(path)  # highdicom: the mask per source instance, in the volume's slice order
            decoded = back.get_pixels_by_source_instance(list(volume.sop_instance_uids), combine_segments=True)
            np.testing.assert_array_equal(decoded, in_memory.label_map)
            ds = pydicom.dcmread(path)  # pydicom: what the object says about itself
            assert ds.Modality == "SEG" and ds.SeriesInstanceUID != uid
            assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
            segment = ds.SegmentSequence[0]
            assert int(segment.SegmentNumber) == 1 and segment.SegmentLabel == "sphere"
            assert segment.SegmentAlgorithmName == "unet3d"
            algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
            assert algorithm.AlgorithmName == "unet3d" and algorithm.AlgorithmVersion == "0.1"
            assert model.bundle.manifest_sha256 in algorithm.AlgorithmParameters


def test_the_gapped_series_is_refused_clearly_and_the_others_go_on(seg_bundle, seg_data, tmp_path, capsys):
    from medge.cli.main import main

    root, _ = seg_data
    assert main(["run", str(seg_bundle.bundle_path), str(root / "deploy"), "--backend", "onnxruntime",
                 "--out", str(tmp_path / "r.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "skipped (failed): " in err and "1 slice(s) missing" in err
    assert "medge run: 2 of 3 series segmented, 1 failed" in err
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
    # A folder of good series only: exit 0.
    assert main(["run", str(seg_bundle.bundle_path), str(root / "deploy" / "one"), "--backend", "onnxruntime",
                 "--out", str(tmp_path / "one.jsonl")]) == 0


def test_a_csv_results_file_is_refused_before_the_model_loads(seg_bundle, seg_data, tmp_path, capsys):
    from medge.cli.main import main

    root, _ = seg_data
    assert main(["run", str(seg_bundle.bundle_path), str(root / "deploy" / "one"),
                 "--out", str(tmp_path / "r.csv")]) == 2
    assert "give a .jsonl file" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_the_batcher_and_triton_export_refuse_a_segmentation_bundle_clearly(seg_bundle, tmp_path):
    """Both batch single images for classifiers; a segmentation needs whole series (model.segment, medge serve)."""
    from medge.errors import MedgeError
    from medge.runtime.batcher import BatcherError
    from medge.serve.triton import export_triton

    with medge.load(seg_bundle.bundle_path, backend="onnxruntime") as model:
        with pytest.raises(BatcherError, match="segments whole series: call model.segment"):
            medge.Batcher(model)
    with pytest.raises(MedgeError, match="task is segmentation: export-triton exports classifiers only"):
        export_triton(seg_bundle.bundle_path, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_non_finite_network_outputs_give_an_error_not_a_background_mask(seg_bundle, seg_data, monkeypatch):
    """NaN logits would threshold to background silently: segment() refuses to answer instead."""
    from medge.errors import MedgeError

    root, _ = seg_data
    with medge.load(seg_bundle.bundle_path, backend="onnxruntime", precision="fp32") as model:
        execute = model.backend_impl.execute

        def poisoned(n):
            out = np.array(execute(n), copy=True)
            out.flat[::97] = np.nan
            return out

        monkeypatch.setattr(model.backend_impl, "execute", poisoned)
        with pytest.raises(MedgeError, match="non-finite output value"):
            model.segment(root / "deploy" / "one")
