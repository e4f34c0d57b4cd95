"""medge.dicom_out: the SR (TID 1500) and overlay objects, read back with highdicom and pydicom.

A tiny classifier bundle (conv + pool + gemm on 32x32, from test_convert's
ONNX builder) is converted once per module from 64x64 synthetic CT slices
with labels, so its task has an operating point (threshold). Predictions are
the model's own, or made up where a test needs a heatmap (the runtime has
none yet) or several frames.

Also home of the helpers test_dicom_node shares: ``tiny_bundle``,
``planted_ct`` (a CT slice whose patient attributes are planted strings that
no log, message or unexpected attribute may carry).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')
pytest.importorskip("onnx", reason='onnx is not installed: pip install "medge[convert]"')
hd = pytest.importorskip("highdicom", reason='highdicom is not installed: pip install "medge[dicom-out]"')

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from medge.errors import DicomError, MedgeError, MissingDependency  # noqa: E402

#: Planted patient values: they may appear only in the attributes the results must copy.
PLANTED = {"PatientName": "PLANTED^SECRETNAME", "PatientID": "PLANTED-ID-4711", "PatientBirthDate": "19010203",
           "OtherPatientIDs": "PLANTED-OTHER-ID", "PatientComments": "PLANTED-COMMENT",
           "PatientAddress": "PLANTED-ADDRESS", "InstitutionName": "PLANTED-HOSPITAL",
           "AccessionNumber": "PLANTEDACC1", "IssuerOfPatientID": "PLANTED-ISSUER"}
#: What the SR / SC must copy (Patient and General Study modules); everything else planted must not appear.
REQUIRED_COPIES = {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"}
MARKER = "PLANTED"


# ---------------------------------------------------------------------------------------------- shared helpers


def build_tiny_bundle(directory: Path) -> Path:
    """A 2-class (normal, nodule) fp32 bundle validated on 16 synthetic 64x64 CT slices (threshold: Youden)."""
    from medge.convert.pipeline import convert
    from medge.preprocess import PreprocessSpec
    from medge.synthetic import write_ct_series

    from .test_convert import tiny_cnn_onnx

    directory.mkdir(parents=True, exist_ok=True)
    write_ct_series(directory / "val", 16, size=64)
    result = convert(tiny_cnn_onnx(directory / "m.onnx"), directory / "tiny.medge",
                     spec=PreprocessSpec(32, 32, voi="window", window=(40, 400)), validation=directory / "val",
                     labels=directory / "val" / "labels.csv", precisions=["fp32"], engine="none",
                     class_labels=["normal", "nodule"], operating_point="youden", name="tiny-nodule", version="3",
                     log=lambda _: None)
    return Path(result.bundle_path)


def planted_ct(seed: int, *, series: str, study: str, number: int = 1) -> "pydicom.Dataset":
    """A 64x64 synthetic CT slice with planted patient values, in the given series and study."""
    from medge.synthetic import ct_slice

    ds = ct_slice(seed=seed, size=64, lesion=bool(seed % 2))
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = number
    return ds


def clone(ds, *, number: int, series: str = None) -> "pydicom.Dataset":
    """A copy with a new SOP Instance UID (same pixels): many distinct instances without generating pixels."""
    copied = copy.deepcopy(ds)
    copied.SOPInstanceUID = generate_uid()
    copied.file_meta.MediaStorageSOPInstanceUID = copied.SOPInstanceUID
    copied.InstanceNumber = number
    if series is not None:
        copied.SeriesInstanceUID = series
    return copied


def sr_references(sr) -> list[tuple[str, int]]:
    """(referenced SOP Instance UID, frame or 0) of every IMAGE content item of an SR (its source images).

    A plain pydicom walk: parsing a 500-group SR with highdicom takes seconds;
    the tests that check the content's meaning use highdicom.
    """
    out = []

    def walk(items):
        for item in items:
            if item.get("ValueType") == "IMAGE":
                reference = item.ReferencedSOPSequence[0]
                frames = reference.get("ReferencedFrameNumber")
                frames = [0] if frames is None else ([frames] if isinstance(frames, int) else list(frames))
                out.extend((str(reference.ReferencedSOPInstanceUID), int(f)) for f in frames)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out


def _encode(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def all_text(ds) -> str:
    """Every value of a dataset (recursively) as text."""
    parts = []

    def walk(dataset):
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    walk(item)
            elif element.tag != 0x7FE00010:
                parts.append(str(element.value))

    for dataset in ([ds] if isinstance(ds, pydicom.Dataset) else list(ds)):  # a highdicom template: content items
        walk(dataset)
    return "\n".join(parts)


def assert_only_required_patient_values(ds) -> None:
    """The planted values appear only in the attributes the result must copy (and nowhere else in the tree)."""
    for keyword, value in PLANTED.items():
        if keyword in REQUIRED_COPIES:
            assert str(ds.get(keyword, "")) == value, f"{keyword} not copied"
        else:
            assert keyword not in ds, f"{keyword} was copied"
    text = all_text(ds)
    top_level_copies = sum(text.count(PLANTED[k]) for k in REQUIRED_COPIES if MARKER in PLANTED[k])
    assert text.count(MARKER) == top_level_copies, "a planted value appears outside the required attributes"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(tiny_bundle):
    import medge

    with medge.load(tiny_bundle) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def two_series():
    """Five slices of series A and three of series B, one study, planted patient values."""
    study = generate_uid()
    a, b = generate_uid(), generate_uid()
    return [planted_ct(seed, series=a if seed < 5 else b, study=study, number=seed + 1) for seed in range(8)]


def with_heatmap(prediction, heatmap):
    """A Prediction-like object carrying ``heatmap`` (the runtime's Prediction gets the field later)."""
    fields = dataclasses.asdict(prediction)
    return type("PredictionWithHeatmap", (), {**fields, "heatmap": heatmap})()


def blob(rows: int = 64, columns: int = 64, centre=(20, 40), sigma: float = 6.0) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:columns]
    return np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * sigma ** 2)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- SR


def test_sr_per_series_reports_finding_score_threshold_and_provenance(tmp_path, model, two_series, caplog):
    from medge.dicom_out import write_results

    caplog.set_level(logging.DEBUG)
    results = model.predict_each(two_series)
    written = write_results(tmp_path / "out", list(zip(two_series, results)), model)
    srs = sorted(p for p in written if p.parent.name == "sr")
    assert len(srs) == 2 and len(written) == 2  # one SR per series; no heatmap, so no overlay or PNG
    manifest = model.manifest
    threshold = manifest["task"]["threshold"]
    by_uid = {str(ds.SOPInstanceUID): (ds, r[0]) for ds, r in zip(two_series, results)}
    seen = []
    for path in srs:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        assert ds.Modality == "SR" and ds.CompletionFlag == "PARTIAL" and ds.VerificationFlag == "UNVERIFIED"
        assert ds.StudyInstanceUID == two_series[0].StudyInstanceUID
        assert_only_required_patient_values(ds)
        document = hd.sr.srread(path)
        assert document.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        groups = document.content.get_image_measurement_groups()
        series = {by_uid[g.source_images[0].referenced_sop_instance_uid][0].SeriesInstanceUID for g in groups}
        assert len(series) == 1  # each SR holds one source series
        evidence = {item.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
                    for se in s.ReferencedSeriesSequence for item in se.ReferencedSOPSequence}
        for group in groups:
            uid = group.source_images[0].referenced_sop_instance_uid
            assert uid in evidence
            source, prediction = by_uid[uid]
            seen.append(uid)
            assert group.finding_type.meaning == prediction.label
            assert group.finding_type.scheme_designator == "99MEDGE"
            measured = {m.name.meaning: m.value for m in group.get_measurements()}
            assert measured["Score of nodule"] == pytest.approx(float(prediction.scores[1]), abs=1e-6)
            assert measured["Threshold Value"] == pytest.approx(threshold)
            assert (prediction.label == "nodule") == (float(prediction.scores[1]) >= threshold)
            text = all_text(group)
            assert f"medge bundle manifest SHA-256 {model.bundle.manifest_sha256}" in text
            assert "tiny-nodule" in text and "operating point youden" in text and model.backend.name in text
            assert "Artificial Intelligence" in text  # Algorithm Family (DCM 123110), as medge's SEG writes
        assert "tiny-nodule 3" in all_text(ds)  # the device observer's model name
    assert sorted(seen) == sorted(by_uid)  # every image exactly once
    # Deterministic UIDs: the same predictions written again give the same SR instances.
    again = write_results(tmp_path / "again", list(zip(two_series, results)), model)
    assert sorted(p.name for p in again) == sorted(p.name for p in written)
    assert MARKER not in caplog.text


def test_sr_refuses_nothing_to_report_and_mixed_studies(model, two_series):
    from medge.dicom_out import build_sr, reference_header

    with pytest.raises(MedgeError, match="no prediction"):
        build_sr([(reference_header(two_series[0]), DicomError("x"))], model)
    other = copy.deepcopy(two_series[1])
    other.StudyInstanceUID = generate_uid()
    prediction = model.predict(two_series[0])
    with pytest.raises(MedgeError, match="2 studies"):
        build_sr([(reference_header(two_series[0]), prediction), (reference_header(other), prediction)], model)


def test_multiclass_reports_the_predicted_class_score_without_threshold(two_series):
    """A 3-class softmax task: the finding's own score, no threshold (argmax); unsafe labels get CLASSk codes."""
    from medge.dicom_out import build_sr, reference_header
    from medge.runtime.model import Prediction

    class FakeBundle:
        manifest = {"model": {"name": "three", "version": "1"}, "preprocess": None,
                    "task": {"kind": "classification", "classes": 3, "labels": ["a", "b c / long label name!", "c"],
                             "activation": "softmax", "positive_class": None, "threshold": None}}
        manifest_sha256 = "ab" * 32

    prediction = Prediction(scores=np.array([0.1, 0.7, 0.2], np.float32), label="b c / long label name!", index=1)
    sr = build_sr([(reference_header(two_series[0]), [prediction])], FakeBundle())
    (group,) = hd.sr.srread(io.BytesIO(_encode(sr))).content.get_image_measurement_groups()
    assert group.finding_type.value == "CLASS1" and group.finding_type.meaning == "b c / long label name!"
    measured = {m.name.meaning: m.value for m in group.get_measurements()}
    assert measured == {"Score of b c / long label name!": pytest.approx(0.7)}
    assert "decision: the class with the highest softmax score" in all_text(group)


def test_multiframe_groups_reference_their_frames(tiny_bundle, tmp_path):
    from medge.dicom_out import write_results
    from medge.runtime.model import Prediction
    from medge.synthetic import enhanced_multiframe

    ds = enhanced_multiframe(frames=3, size=64)
    predictions = [with_heatmap(Prediction(scores=np.array([0.4, 0.6], np.float32), label="nodule", index=1,
                                           sop_instance_uid=str(ds.SOPInstanceUID), frame=f), blob() * (f + 1))
                   for f in range(3)]
    written = write_results(tmp_path, [(ds, predictions)], tiny_bundle)
    (sr,) = [p for p in written if p.parent.name == "sr"]
    assert sorted(sr_references(pydicom.dcmread(sr))) == [(str(ds.SOPInstanceUID), f) for f in (1, 2, 3)]
    pngs = sorted(p.name for p in written if p.suffix == ".png")
    assert pngs == [f"{ds.SOPInstanceUID}_frame{f}.png" for f in (1, 2, 3)]
    overlays = [pydicom.dcmread(p) for p in written if p.parent.name == "overlays"]
    assert sorted(o.SourceImageSequence[0].ReferencedFrameNumber for o in overlays) == [1, 2, 3]
    assert len({o.SOPInstanceUID for o in overlays}) == 3


def test_envelope_warning_is_flagged_in_the_sr(model, two_series):
    from medge.dicom_out import build_sr, reference_header

    prediction = dataclasses.replace(model.predict(two_series[0]), warnings=("outside the validated envelope: x",))
    sr = build_sr([(reference_header(two_series[0]), prediction)], model)
    (group,) = hd.sr.srread(io.BytesIO(_encode(sr))).content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations(hd.sr.CodedConcept("ENVELOPE", "99MEDGE", "x"))
    assert evaluation.name.meaning == "Input within the validated envelope" and evaluation.value.meaning == "No"


# ---------------------------------------------------------------------------------------------- overlays


def test_overlay_secondary_capture_and_png_show_the_map_over_the_source(tmp_path, model, two_series, caplog):
    from PIL import Image as PILImage

    from medge.dicom_out import write_results

    caplog.set_level(logging.DEBUG)
    source = two_series[0]
    prediction = model.predict(source)
    heat = blob(centre=(20, 40))
    written = write_results(tmp_path, [(source, [with_heatmap(prediction, heat)])], model)
    (sc_path,) = [p for p in written if p.parent.name == "overlays"]
    (png_path,) = [p for p in written if p.suffix == ".png"]
    assert png_path.name == f"{source.SOPInstanceUID}.png"
    sc = pydicom.dcmread(sc_path)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.Modality == "OT"
    assert sc.PhotometricInterpretation == "RGB" and (sc.Rows, sc.Columns) == (64, 64) and sc.BitsAllocated == 8
    assert list(sc.ImageType[:2]) == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "NO"
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.SeriesInstanceUID != source.SeriesInstanceUID
    reference = sc.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert list(sc.PatientOrientation) == ["L", "P"]  # from the axial Image Orientation (Patient)
    assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in source.PixelSpacing]
    assert "not for primary diagnosis" in sc.DerivationDescription
    assert "finding " + prediction.label in sc.ImageComments
    assert_only_required_patient_values(sc)
    rgb = sc.pixel_array
    png = np.asarray(PILImage.open(png_path).convert("RGB"))
    np.testing.assert_array_equal(rgb, png)
    hot, cold = rgb[20, 40].astype(int), rgb[60, 2].astype(int)
    assert hot[0] > hot[2] + 60  # red where the map is 1
    assert abs(cold[0] - cold[1]) <= 1 and abs(cold[1] - cold[2]) <= 1  # grey where it is 0
    assert MARKER not in caplog.text


def test_overlay_grey_is_the_models_window():
    """Outside the map, the overlay's grey is the source through the bundle's own VOI (what the model saw)."""
    from medge import read_dicom
    from medge.dicom_out import blend, display_frame
    from medge.synthetic import ct_slice

    image = read_dicom(ct_slice(seed=3, size=64, lesion=True))
    spec = {"height": 32, "width": 32, "voi": "window", "window": [40, 400]}
    grey = display_frame(image, 0, spec)
    hu = image.pixels[0].astype(np.float64) - 1024.0
    expected = np.clip((hu - (40 - 0.5)) / 399 + 0.5, 0, 1)  # DICOM LINEAR window 40/400 (PS3.3 C.11.2.1.2.1)
    np.testing.assert_allclose(grey, expected, atol=2e-3)
    rgb = blend(grey, np.zeros_like(grey))
    np.testing.assert_array_equal(rgb[..., 0], np.rint(grey * 255).astype(np.uint8))


def test_heatmap_scaling_and_shape_checks():
    from medge.dicom_out import normalise_heatmap

    inside = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    values, how = normalise_heatmap(inside, (64, 64))
    np.testing.assert_array_equal(values, inside)
    assert "as they are" in how
    values, how = normalise_heatmap(inside * 10 - 3, (64, 64))
    assert values.min() == 0.0 and values.max() == pytest.approx(1.0) and "-3..7" in how
    values, _ = normalise_heatmap(np.full((64, 64), np.nan, np.float32), (64, 64))
    assert not values.any()
    with pytest.raises(MedgeError, match="original image grid"):
        normalise_heatmap(np.zeros((32, 32)), (64, 64))


def test_patient_orientation_from_headers():
    from pydicom.dataset import Dataset

    from medge.dicom_out._common import patient_orientation

    ds = Dataset()
    assert patient_orientation(ds) is None
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal: rows towards posterior, columns towards feet
    assert patient_orientation(ds) == ("P", "F")
    ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
    assert patient_orientation(ds) == ("R", "A")
    ds.PatientOrientation = ["A", "FR"]  # CR / DX: taken as given (first letter each)
    assert patient_orientation(ds) == ("A", "F")


def test_overlay_without_orientation_leaves_it_empty(model, two_series):
    from medge.dicom_out import build_overlay_sc, reference_header

    source = copy.deepcopy(two_series[0])
    del source.ImageOrientationPatient
    sc = build_overlay_sc(reference_header(source), np.zeros((64, 64, 3), np.uint8), model)
    assert "PatientOrientation" in sc and not sc.PatientOrientation


# ---------------------------------------------------------------------------------------------- inputs, errors


def test_write_results_reads_paths_and_bytes_and_skips_failures(tmp_path, model, two_series):
    from medge.dicom_out import write_results

    paths = []
    for i, ds in enumerate(two_series[:3]):
        path = tmp_path / f"in{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    results = model.predict_each([str(p) for p in paths])
    items = [(str(paths[0]), results[0]), (paths[1].read_bytes(), results[1][0]), (paths[2], DicomError("bad"))]
    written = write_results(tmp_path / "out", items, model)
    (sr,) = written
    assert sorted(uid for uid, _ in sr_references(pydicom.dcmread(sr))) == sorted(
        str(ds.SOPInstanceUID) for ds in two_series[:2])


def test_source_without_uids_is_a_dicom_error(tmp_path, model, two_series):
    from medge.dicom_out import write_results

    source = copy.deepcopy(two_series[0])
    del source.SeriesInstanceUID
    with pytest.raises(DicomError, match="SeriesInstanceUID"):
        write_results(tmp_path, [(source, model.predict(two_series[0]))], model)


def test_deidentified_source_gives_deidentified_results(tmp_path, model):
    from medge.dicom_out import write_results
    from medge.synthetic import ct_slice

    source = ct_slice(seed=1, size=64, lesion=False)  # Patient Identity Removed YES
    prediction = model.predict(source)
    written = write_results(tmp_path, [(source, [with_heatmap(prediction, blob())])], model, png=False)
    assert len(written) == 2
    for path in written:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod == source.DeidentificationMethod


def test_provenance_from_model_bundle_and_path(tiny_bundle, model):
    from medge.bundle import Bundle
    from medge.dicom_out import Provenance

    from_model, from_bundle, from_path = (Provenance.of(model), Provenance.of(Bundle.open(tiny_bundle)),
                                          Provenance.of(tiny_bundle))
    assert from_model.manifest_sha256 == from_bundle.manifest_sha256 == from_path.manifest_sha256
    assert (from_model.name, from_model.version) == ("tiny-nodule", "3")
    assert from_model.runtime.startswith(model.backend.name) and from_path.runtime is None
    assert from_model.threshold() == pytest.approx(model.manifest["task"]["threshold"])
    with pytest.raises(MedgeError, match="bundle that produced them"):
        Provenance.of(42)


def test_missing_highdicom_names_the_extra(monkeypatch, model, two_series):
    import sys

    from medge.dicom_out import build_sr, reference_header

    from medge.dicom_out import ensure_available

    ensure_available()
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(MissingDependency, match=r'medge\[dicom-out\]'):
        build_sr([(reference_header(two_series[0]), model.predict(two_series[0]))], model)
    with pytest.raises(MissingDependency, match=r'medge\[dicom-out\]'):
        ensure_available()
