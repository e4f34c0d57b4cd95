"""medge.seg_out: DICOM Segmentation of a label map over a series, read back with highdicom and pydicom."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from medge.errors import DicomError, MedgeError, MissingDependency  # noqa: E402
from medge.series import read_series  # noqa: E402
from medge.synthetic import ct_volume_series, write_ct_volume_series  # noqa: E402

SHA = "0123456789abcdef" * 4
LABELS = ["background", "lesion", "corner"]
PHI = ("DOE^JANE", "PID-55512", "19510203")


def _label_map(truth) -> np.ndarray:
    """The sphere as label 1, a corner block as label 2 on every other slice."""
    label_map = truth.mask.astype(np.uint8)
    label_map[::2, :3, :5] = 2
    return label_map


def _write(volume, label_map, tmp_path, **kwargs):
    from medge.seg_out import write_segmentation

    options = dict(labels=LABELS, bundle_name="demo-seg", bundle_version="1.2.0", manifest_sha256=SHA,
                   out_dir=tmp_path)
    options.update(kwargs)
    return write_segmentation(volume, label_map, **options)


@pytest.fixture
def hd():
    return pytest.importorskip("highdicom")


@pytest.mark.parametrize("segmentation_type", ["BINARY", "LABELMAP"])
def test_segmentation_round_trip_over_single_frame_slices(hd, tmp_path, segmentation_type, caplog):
    paths, truth = write_ct_volume_series(tmp_path / "ct", shuffle=True, seed=30)
    for path in paths:  # planted patient values: copied into the SEG (the IOD needs them), never logged
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI
        ds.save_as(path, enforce_file_format=True)
    volume = read_series(tmp_path / "ct")
    label_map = _label_map(truth)
    with caplog.at_level(logging.DEBUG):
        seg = _write(volume, label_map, tmp_path / "out", segmentation_type=segmentation_type)
    assert not any(value in caplog.text for value in PHI)
    assert seg.filename.startswith(str(tmp_path / "out")) and seg.filename.endswith(f"SEG_{seg.SOPInstanceUID}.dcm")

    # highdicom: the decoded label map, per source instance in the volume's order, equals the one written.
    back = hd.seg.segread(seg.filename)
    decoded = back.get_pixels_by_source_instance(list(volume.sop_instance_uids), combine_segments=True)
    np.testing.assert_array_equal(decoded, label_map)
    assert back.segmentation_type.value == segmentation_type

    # pydicom: what the object says about itself.
    ds = pydicom.dcmread(seg.filename)
    assert ds.SOPClassUID == ("1.2.840.10008.5.1.4.1.1.66.7" if segmentation_type == "LABELMAP"
                              else "1.2.840.10008.5.1.4.1.1.66.4")
    assert ds.Modality == "SEG" and ds.SegmentationType == segmentation_type
    assert ds.StudyInstanceUID == truth.study_instance_uid
    assert ds.FrameOfReferenceUID == truth.frame_of_reference_uid
    assert str(ds.PatientName) == PHI[0] and ds.PatientID == PHI[1]  # same patient as the source, by the IOD
    segments = {int(s.SegmentNumber): s for s in ds.SegmentSequence if int(s.SegmentNumber) > 0}
    assert {n: s.SegmentLabel for n, s in segments.items()} == {1: "lesion", 2: "corner"}
    for segment in segments.values():
        assert segment.SegmentAlgorithmType == "AUTOMATIC" and segment.SegmentAlgorithmName == "demo-seg"
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("85756007", "SCT")
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "demo-seg" and algorithm.AlgorithmVersion == "1.2.0"
        assert algorithm.AlgorithmSource == "medge"
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator, family.CodeMeaning) == (
            "123110", "DCM", "Artificial Intelligence")
        assert f"manifest_sha256={SHA}" in algorithm.AlgorithmParameters
    assert ds.ContentDescription == "demo-seg 1.2.0" and ds.Manufacturer == "medge"
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == truth.series_instance_uid
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == set(
        truth.sop_instance_uids)
    # Each frame names the source slice it lies on.
    for frame in ds.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        k = volume.sop_instance_uids.index(source.ReferencedSOPInstanceUID)
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   volume.image_positions[k], atol=1e-4)

    # A SEG in the series folder is not a slice: read_series skips it.
    (tmp_path / "ct" / "seg.dcm").write_bytes((tmp_path / "out" / seg.filename.split("/")[-1]).read_bytes())
    assert read_series(tmp_path / "ct").sop_instance_uids == volume.sop_instance_uids


def test_segmentation_over_an_enhanced_multiframe_source_follows_its_frame_order(hd, tmp_path):
    datasets, truth = ct_volume_series(enhanced=True, shuffle=True, seed=31)
    path = tmp_path / "enhanced.dcm"
    datasets[0].save_as(path, enforce_file_format=True)
    volume = read_series(path)
    assert volume.frame_numbers != tuple(range(1, 13))
    label_map = _label_map(truth)
    seg = _write(volume, label_map, None, out_path=tmp_path / "seg.dcm")
    assert seg.filename == str(tmp_path / "seg.dcm")
    back = hd.seg.segread(seg.filename)
    decoded = back.get_pixels_by_source_frame(volume.sop_instance_uids[0], list(volume.frame_numbers),
                                              combine_segments=True)
    np.testing.assert_array_equal(decoded, label_map)


def test_every_label_is_a_segment_and_uids_follow_the_content(hd, tmp_path):
    datasets, truth = ct_volume_series(seed=32)
    volume = read_series(datasets)
    only_lesion = truth.mask.astype(np.uint8)  # label 2 absent from this series: still described
    first = _write(volume, only_lesion, None)
    assert [int(s.SegmentNumber) for s in first.SegmentSequence] == [1, 2]
    again = _write(volume, only_lesion, None)
    assert again.SOPInstanceUID == first.SOPInstanceUID and again.SeriesInstanceUID == first.SeriesInstanceUID
    other = _write(volume, _label_map(truth), None)
    assert other.SOPInstanceUID != first.SOPInstanceUID and other.SeriesInstanceUID == first.SeriesInstanceUID
    # Nothing found at all: a valid, empty segmentation.
    empty = _write(volume, np.zeros(volume.shape, np.uint8), None, out_path=tmp_path / "empty.dcm")
    decoded = hd.seg.segread(empty.filename).get_pixels_by_source_instance(
        list(volume.sop_instance_uids), combine_segments=True)
    assert decoded.shape == volume.shape and not decoded.any()


def test_labels_with_codes_and_as_a_mapping(hd):
    volume = read_series(ct_volume_series(seed=33)[0])
    labels = {1: {"name": "liver", "category": ["91723000", "SCT", "Anatomical Structure"],
                  "type": ["10200004", "SCT", "Liver"]}}
    seg = _write(volume, np.zeros(volume.shape, bool), None, labels=labels)
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "liver"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"


def test_invalid_requests_are_medge_errors(hd):
    datasets, truth = ct_volume_series(seed=34)
    volume = read_series(datasets)
    good = truth.mask.astype(np.uint8)
    cases = [
        (dict(label_map=good[:-1]), "shape"),
        (dict(label_map=good * 3), r"value\(s\) \[3\] but labels describe only 1..2"),
        (dict(label_map=good.astype(np.float32)), "integer labels"),
        (dict(manifest_sha256="abc"), "64 hexadecimal"),
        (dict(labels={1: "a", 3: "b"}), "missing: \\[2\\]"),
        (dict(labels=["background"]), "no foreground label"),
        (dict(segmentation_type="FRACTIONAL"), "BINARY, LABELMAP"),
        (dict(bundle_name=""), "bundle_name"),
        (dict(out_path="a.dcm", out_dir="b"), "not both"),
    ]
    for change, pattern in cases:
        options = dict(label_map=good)
        options.update(change)
        with pytest.raises(MedgeError, match=pattern):
            _write(volume, options.pop("label_map"), None, **options)
    with pytest.raises(MedgeError, match="Volume"):
        _write(good, good, None)


def test_volumes_a_segmentation_cannot_reference_are_refused(hd):
    datasets, truth = ct_volume_series(duplicate=[3], seed=35)
    volume = read_series(datasets, policy="report")
    with pytest.raises(DicomError, match="one position"):
        _write(volume, np.zeros(volume.shape, np.uint8), None)
    datasets, truth = ct_volume_series(seed=36)
    for ds in datasets:
        del ds.FrameOfReferenceUID
    volume = read_series(datasets)
    with pytest.raises(DicomError, match="Frame of Reference"):
        _write(volume, np.zeros(volume.shape, np.uint8), None)


def test_missing_highdicom_names_the_extra(monkeypatch):
    from medge.seg_out import write_segmentation

    volume = read_series(ct_volume_series(seed=37)[0])
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(MissingDependency, match=r'pip install "medge\[dicom-out\]"'):
        write_segmentation(volume, np.zeros(volume.shape, np.uint8), labels=LABELS, bundle_name="x",
                           bundle_version="1", manifest_sha256=SHA)
