"""medge.synthetic: deterministic phantoms, ground truth, and the special encodings."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from medge import synthetic  # noqa: E402
from medge.dicom import read_dicom  # noqa: E402

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def saved_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_ct_slice_is_deterministic_and_seed_dependent():
    a = synthetic.ct_slice(seed=7, size=32, lesion=True)
    b = synthetic.ct_slice(seed=7, size=32, lesion=True)
    c = synthetic.ct_slice(seed=8, size=32, lesion=True)
    assert saved_bytes(a) == saved_bytes(b)
    assert a.PixelData != c.PixelData
    assert a.SOPInstanceUID != c.SOPInstanceUID
    assert a.SOPInstanceUID != synthetic.ct_slice(seed=7, size=32, lesion=False).SOPInstanceUID
    assert a.SOPInstanceUID != synthetic.ct_slice(seed=7, size=16, lesion=True).SOPInstanceUID
    for uid in (a.SOPInstanceUID, a.StudyInstanceUID, a.SeriesInstanceUID):
        assert UID_RE.match(uid) and len(uid) <= 64


def test_ct_slice_encoding_and_synthetic_identity():
    ds = synthetic.ct_slice(seed=0, size=16, lesion=False)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
    assert (ds.RescaleSlope, ds.RescaleIntercept) == (1.0, -1024.0)
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert list(ds.WindowCenter)[0] == 40 and list(ds.WindowWidth)[0] == 400
    assert str(ds.PatientName) == "SYNTHETIC^CT" and ds.PatientIdentityRemoved == "YES"
    assert ds.PatientBirthDate == "" and ds.StudyDate == ""
    # Valid Part 10 file, readable back by pydicom.
    back = pydicom.dcmread(io.BytesIO(saved_bytes(ds)))
    np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)


def test_ct_values_are_ct_like():
    hu, truth = synthetic.ct_phantom(seed=1, size=128, lesion=True, noise_hu=0)
    assert hu.dtype == np.int16
    assert hu[0, 0] == -1000 and hu[-1, -1] == -1000  # air outside the body
    assert (hu == -850).sum() > 0.1 * hu.size  # lungs
    assert 700 <= hu.max() <= 1200  # vertebra, ribs
    assert ((hu >= 0) & (hu <= 60)).sum() > 0.1 * hu.size  # soft tissue
    row, col = (round(v) for v in truth.center)
    assert 40 <= hu[row, col] <= 80 and truth.hu == pytest.approx(hu[row, col], abs=1)


def test_lesion_is_inside_a_lung_and_only_difference():
    for seed in range(6):
        with_lesion, truth = synthetic.ct_phantom(seed=seed, size=96, lesion=True, noise_hu=0)
        without, none = synthetic.ct_phantom(seed=seed, size=96, lesion=False, noise_hu=0)
        assert truth.present and not none.present and none.center is None
        assert 0.025 * 96 <= truth.radius <= 0.05 * 96
        rows, cols = np.mgrid[:96, :96]
        distance = np.hypot(rows - truth.center[0], cols - truth.center[1])
        changed = with_lesion != without
        assert changed.any() and (distance[changed] <= truth.radius + 1.0).all()
        # Surrounded by lung: the lesion is visible against air-filled tissue.
        ring = (distance > truth.radius + 1.0) & (distance < truth.radius + 1.8)
        assert (without[ring] < -100).all()
        assert truth.side == ("left" if truth.center[1] < 48 else "right")


def test_geometry_does_not_depend_on_size():
    _, small = synthetic.ct_phantom(seed=4, size=64, lesion=True)
    _, large = synthetic.ct_phantom(seed=4, size=256, lesion=True)
    for a, b in zip(small.center, large.center):
        assert (a + 0.5) / 64 == pytest.approx((b + 0.5) / 256)
    assert small.radius / 64 == pytest.approx(large.radius / 256)


def test_ct_slice_reads_back_as_the_phantom():
    ds, truth = synthetic.ct_slice_with_truth(seed=9, size=32, lesion=True)
    hu, same = synthetic.ct_phantom(seed=9, size=32, lesion=True)
    image = read_dicom(ds)
    assert same == truth
    sem = image.semantics
    np.testing.assert_array_equal(sem.rescale_slope * image.pixels[0] + sem.rescale_intercept, hu)
    assert sem.windows == synthetic.CT_WINDOWS


def test_write_ct_series(tmp_path):
    paths = synthetic.write_ct_series(tmp_path / "a", 6, seed=3, size=16, lesion_fraction=0.5)
    assert [p.name for p in paths] == [f"ct_{i:05d}.dcm" for i in range(6)]
    with open(tmp_path / "a" / synthetic.LABELS_FILENAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["filename"] for r in rows] == [p.name for p in paths]
    assert sum(int(r["label"]) for r in rows) == 3
    datasets = [pydicom.dcmread(p) for p in paths]
    assert len({ds.SOPInstanceUID for ds in datasets}) == 6
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 7))
    for row, ds in zip(rows, datasets):
        assert row["sop_instance_uid"] == ds.SOPInstanceUID
        # Every row regenerates from its seed, label and position included.
        _, truth = synthetic.ct_phantom(seed=int(row["seed"]), size=16, lesion=row["label"] == "1")
        assert truth.present == (row["label"] == "1")
        if truth.present:
            assert float(row["lesion_row"]) == pytest.approx(truth.center[0], abs=1e-3)
            assert float(row["lesion_radius"]) == pytest.approx(truth.radius, abs=1e-3)
        else:
            assert row["lesion_row"] == row["lesion_col"] == row["lesion_radius"] == ""
    again = synthetic.write_ct_series(tmp_path / "b", 6, seed=3, size=16, lesion_fraction=0.5)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    assert (tmp_path / "b" / "labels.csv").read_bytes() == (tmp_path / "a" / "labels.csv").read_bytes()


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (1.0, 5), (0.2, 1)])
def test_write_ct_series_lesion_fraction(tmp_path, fraction, expected):
    synthetic.write_ct_series(tmp_path, 5, seed=0, size=8, lesion_fraction=fraction)
    with open(tmp_path / "labels.csv", newline="") as f:
        assert sum(int(r["label"]) for r in csv.DictReader(f)) == expected


def test_monochrome1_cr_has_junk_and_known_values():
    ds = synthetic.monochrome1_cr(seed=2, size=32)
    clean = synthetic.cr_phantom(seed=2, size=32)
    assert clean.shape == (32, 24) and clean.max() <= 4095
    assert (ds.Rows, ds.Columns) == clean.shape
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "RescaleSlope" not in ds
    words = np.frombuffer(ds.PixelData, "<u2").reshape(clean.shape)
    np.testing.assert_array_equal(words & 0x0FFF, clean)
    assert (words > 4095).mean() > 0.8
    no_junk = synthetic.monochrome1_cr(seed=2, size=32, junk_bits=False)
    np.testing.assert_array_equal(np.frombuffer(no_junk.PixelData, "<u2").reshape(clean.shape), clean)


def test_monochrome1_cr_custom_values_and_validation():
    values = np.array([[0, 1, 4095]], dtype=np.uint16)
    np.testing.assert_array_equal(read_dicom(synthetic.monochrome1_cr(values=values)).pixels[0], values)
    with pytest.raises(ValueError):
        synthetic.monochrome1_cr(values=np.array([[4096]]))


def test_enhanced_multiframe_structure():
    ds = synthetic.enhanced_multiframe(seed=0, size=16, frames=5)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1" and ds.NumberOfFrames == 5
    assert "RescaleSlope" not in ds and "WindowCenter" not in ds
    assert len(ds.PerFrameFunctionalGroupsSequence) == 5
    transforms = synthetic.enhanced_frame_transforms(5)
    assert len({(t.rescale_slope, t.rescale_intercept) for t in transforms}) == 3
    for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pvt = item.PixelValueTransformationSequence[0]
        assert (pvt.RescaleSlope, pvt.RescaleIntercept) == (transforms[index].rescale_slope,
                                                            transforms[index].rescale_intercept)
        assert ("FrameVOILUTSequence" in item) == (index % 3 != 2)
    assert "FrameVOILUTSequence" in ds.SharedFunctionalGroupsSequence[0]
    assert pydicom.dcmread(io.BytesIO(saved_bytes(ds))).pixel_array.shape == (5, 16, 16)


def test_big_endian_encoding():
    ds = synthetic.big_endian(seed=1, size=16)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"
    stored = synthetic.ct_phantom(seed=1, size=16, lesion=False)[0].astype(np.int32) + 1024
    np.testing.assert_array_equal(np.frombuffer(ds.PixelData, ">i2").reshape(16, 16), stored)
    back = pydicom.dcmread(io.BytesIO(saved_bytes(ds)))
    assert back.pixel_array.dtype == np.dtype(">i2")
    np.testing.assert_array_equal(back.pixel_array, stored)


def test_rle_encoding_round_trips_through_a_file():
    ds = synthetic.rle(seed=1, size=16)
    assert saved_bytes(ds) == saved_bytes(synthetic.rle(seed=1, size=16))  # UID not randomised
    back = pydicom.dcmread(io.BytesIO(saved_bytes(ds)))
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    stored = synthetic.ct_phantom(seed=1, size=16, lesion=False)[0].astype(np.int32) + 1024
    np.testing.assert_array_equal(back.pixel_array, stored)


def test_write_samples(tmp_path):
    paths = synthetic.write_samples(tmp_path, size=32)
    names = {p.name for p in paths}
    assert {"cr_monochrome1.dcm", "ct_enhanced_multiframe.dcm", "ct_big_endian.dcm", "ct_rle.dcm"} <= names
    assert len(paths) == 8 and paths == sorted(paths) and (tmp_path / "labels.csv").exists()
    assert all(p.suffix == ".dcm" for p in paths)
    frames = sum(read_dicom(p).number_of_frames for p in paths)
    assert frames == 10
    again = synthetic.write_samples(tmp_path / "again", size=32)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"seed": 1.5}, {"size": 4}, {"size": True}])
def test_invalid_arguments(kwargs):
    arguments = {"seed": 0, "size": 16, "lesion": False, **kwargs}
    with pytest.raises(ValueError):
        synthetic.ct_phantom(**arguments)
