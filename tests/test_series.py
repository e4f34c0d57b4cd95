"""medge.series: DICOM series -> Volume (ordering, geometry, per-slice semantics, refused and reported stacks).

The reference is the synthetic generator's truth (positions, HU and the
sphere mask computed from the generator's own geometry), never the reader.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from medge.errors import DicomError, MedgeError  # noqa: E402
from medge.image import Image  # noqa: E402
from medge.series import (SeriesError, Volume, list_series, read_series)  # noqa: E402
from medge.synthetic import ct_volume_series, write_ct_volume_series  # noqa: E402

# Planted into headers and file names: no message, log record or repr may contain them.
PHI = ("DOE^JANE", "DOE", "PID-55512", "19510203", "ACC-4411")


def _plant_phi(datasets):
    for ds in datasets:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = PHI[0], PHI[2], PHI[3], PHI[4]
    return datasets


def _bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _hu(volume: Volume) -> np.ndarray:
    slopes = np.array([volume.frame_transform(k).rescale_slope for k in range(volume.shape[0])])
    intercepts = np.array([volume.frame_transform(k).rescale_intercept for k in range(volume.shape[0])])
    return volume.pixels * slopes[:, None, None] + intercepts[:, None, None]


def _assert_matches(volume: Volume, truth) -> None:
    assert volume.sop_instance_uids == truth.sop_instance_uids
    assert volume.frame_numbers == truth.frame_numbers
    np.testing.assert_allclose(volume.slice_positions, truth.slice_positions, atol=1e-6)
    np.testing.assert_allclose(volume.image_positions, truth.image_positions, atol=1e-6)
    np.testing.assert_allclose(volume.direction, truth.direction, atol=1e-6)
    np.testing.assert_allclose(volume.spacing, truth.spacing, rtol=1e-9)
    np.testing.assert_allclose(volume.origin, truth.image_positions[0], atol=1e-6)
    np.testing.assert_array_equal(_hu(volume), truth.hu)
    assert volume.series_instance_uid == truth.series_instance_uid
    assert volume.study_instance_uid == truth.study_instance_uid
    assert volume.frame_of_reference_uid == truth.frame_of_reference_uid


# --------------------------------------------------------------------------- ordering and sources


def test_shuffled_files_in_a_folder_are_ordered_along_the_normal(tmp_path):
    paths, truth = write_ct_volume_series(tmp_path / "series", shuffle=True, seed=3)
    (tmp_path / "series" / "labels.csv").write_text("not,dicom\n")  # skipped: not DICOM
    nested = tmp_path / "series" / "sub"
    nested.mkdir()
    paths[0].rename(nested / "moved.dcm")  # folders are searched recursively
    volume = read_series(tmp_path / "series")
    assert volume.pixels.dtype == np.int16 and volume.shape == (12, 32, 32)
    _assert_matches(volume, truth)
    assert [str(ds.SOPInstanceUID) for ds in volume.source_datasets] == list(truth.sop_instance_uids)
    assert all("PixelData" not in ds for ds in volume.source_datasets)  # headers only


def test_every_source_kind_and_order_gives_the_same_volume():
    datasets, truth = ct_volume_series(shuffle=True, seed=4)
    reference = read_series(datasets)
    for source in (list(reversed(datasets)), [_bytes(ds) for ds in datasets],
                   [memoryview(_bytes(ds)) for ds in datasets]):
        volume = read_series(source)
        _assert_matches(volume, truth)
        np.testing.assert_array_equal(volume.pixels, reference.pixels)


def test_oblique_stack_whose_normal_points_against_instance_order():
    # Row direction (0.8, 0.6, 0), column direction (0, 0, -1): the normal is (-0.6, 0.8, 0); slice order
    # follows the projection on it, whatever Instance Number or z say.
    datasets, truth = ct_volume_series(orientation=(0.8, 0.6, 0, 0, 0, -1), shuffle=True, seed=5)
    for ds in datasets:  # numbering and Slice Location that contradict the geometry are not used
        ds.InstanceNumber, ds.SliceLocation = 100 - ds.InstanceNumber, -float(ds.SliceLocation)
    _assert_matches(read_series(datasets), truth)


def test_enhanced_multiframe_is_one_series_with_frames_ordered_and_per_frame_semantics():
    datasets, truth = ct_volume_series(enhanced=True, shuffle=True, per_slice_rescale=True, seed=6)
    assert len(datasets) == 1 and datasets[0].NumberOfFrames == 12
    volume = read_series(_bytes(datasets[0]))
    _assert_matches(volume, truth)
    assert volume.frame_numbers != tuple(range(1, 13))  # the frames were stored out of order
    assert set(volume.sop_instance_uids) == {str(datasets[0].SOPInstanceUID)}
    assert [(volume.frame_transform(k).rescale_slope, volume.frame_transform(k).rescale_intercept)
            for k in range(12)] == list(truth.transforms)


def test_per_slice_rescale_and_windows_are_kept():
    datasets, truth = ct_volume_series(per_slice_rescale=True, shuffle=True, seed=7)
    volume = read_series(datasets)
    _assert_matches(volume, truth)
    frames = volume.semantics.frames
    assert len(frames) == 12 and volume.semantics.number_of_frames == 12
    assert [(f.rescale_slope, f.rescale_intercept) for f in frames] == list(truth.transforms)
    assert len({f.windows[0].center for f in frames}) == 2  # windows differ per slice too
    # Stored values are kept as stored: slope-2 slices hold half the HU + 2048 offset.
    k = next(i for i, t in enumerate(truth.transforms) if t == (2.0, -2048.0))
    np.testing.assert_array_equal(volume.pixels[k], ((truth.hu[k] + 2048) / 2).astype(np.int16))
    image = volume.as_image()
    assert isinstance(image, Image) and image.pixels.shape == (12, 32, 32)
    assert image.semantics.frame_transform(k).rescale_slope == 2.0


def test_uniform_rescale_is_shared_by_all_slices():
    volume = read_series(ct_volume_series(seed=8)[0])
    assert len(volume.semantics.frames) == 1 and volume.semantics.number_of_frames == 12


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (0.8, 0.6, 0, 0, 0, -1),
                                         (0.36, 0.48, -0.8, 0.8, -0.6, 0.0)])
def test_index_to_patient_puts_the_sphere_back(orientation):
    datasets, truth = ct_volume_series(orientation=orientation, pixel_spacing=(0.9, 0.55), slice_spacing=1.75,
                                       rows=24, columns=40, slices=10, shuffle=True, seed=9)
    volume = read_series(datasets)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1)
    points = volume.index_to_patient(index)
    # The generator's own definition of the mask: voxel centres within the sphere.
    inside = np.linalg.norm(points - truth.center_mm, axis=-1) <= truth.radius_mm
    assert truth.mask.sum() > 20
    np.testing.assert_array_equal(inside, truth.mask)
    # Corners of every slice are the slice's Image Position (Patient); the inverse maps back.
    np.testing.assert_allclose(volume.index_to_patient(np.stack([np.arange(10), np.zeros(10), np.zeros(10)], 1)),
                               truth.image_positions, atol=1e-6)
    np.testing.assert_allclose(volume.patient_to_index(points), index, atol=1e-9)
    affine = volume.affine
    np.testing.assert_allclose(affine @ np.array([2, 3, 5, 1.0]), np.append(volume.index_to_patient([2, 3, 5]), 1))
    # Pixel Spacing order: row spacing (value 1) is the step of the row index, along the column direction.
    step = volume.index_to_patient([0, 1, 0]) - volume.index_to_patient([0, 0, 0])
    np.testing.assert_allclose(step, 0.9 * truth.direction[1], atol=1e-9)


def test_single_slice_volume_takes_its_spacing_from_slice_thickness():
    volume = read_series(ct_volume_series(slices=1, slice_spacing=3.0, seed=10)[0])
    assert volume.shape[0] == 1 and volume.spacing[2] == 3.0 and not volume.issues


# --------------------------------------------------------------------------- refused (and reported) stacks


def test_several_series_are_refused_with_their_uids_and_one_can_be_picked(tmp_path):
    _, first = write_ct_volume_series(tmp_path, seed=11)
    extra, second = ct_volume_series(seed=12, slices=3)
    for i, ds in enumerate(extra):
        ds.save_as(tmp_path / f"other_{i}.dcm", enforce_file_format=True)
    with pytest.raises(SeriesError) as info:
        read_series(tmp_path)
    message = str(info.value)
    assert first.series_instance_uid in message and second.series_instance_uid in message
    assert "series_uid=" in message and "12 instance(s)" in message and "3 instance(s)" in message
    summaries = list_series(tmp_path)
    assert {s.series_instance_uid: s.instances for s in summaries} == {first.series_instance_uid: 12,
                                                                      second.series_instance_uid: 3}
    _assert_matches(read_series(tmp_path, series_uid=second.series_instance_uid), second)
    with pytest.raises(SeriesError, match="no series with Series Instance UID 1.2.3"):
        read_series(tmp_path, series_uid="1.2.3")


def test_missing_slice_is_refused_then_reported():
    datasets, truth = ct_volume_series(missing=[4], shuffle=True, seed=13)
    with pytest.raises(SeriesError) as info:
        read_series(datasets)
    message = str(info.value)
    assert "1 slice(s) missing at 40.000 mm between slices 3 and 4" in message  # 30 + 4 x 2.5 mm
    assert "policy='report'" in message
    volume = read_series(datasets, policy="report")
    assert [(i.kind, i.slices) for i in volume.issues] == [("missing", (3, 4))]
    assert volume.issues[0].positions_mm == (37.5, 42.5)
    assert volume.shape[0] == 11 and volume.spacing[2] == pytest.approx(2.5)
    np.testing.assert_allclose(volume.image_positions, truth.image_positions)


def test_duplicate_position_is_refused_then_reported():
    datasets, truth = ct_volume_series(duplicate=[6], shuffle=True, seed=14)
    with pytest.raises(SeriesError, match=r"slices 6 and 7 lie at the same position \(45.000 mm"):
        read_series(datasets)
    volume = read_series(datasets, policy="report")
    assert [(i.kind, i.slices) for i in volume.issues] == [("duplicate", (6, 7))]
    assert volume.shape[0] == 13 and volume.sop_instance_uids == truth.sop_instance_uids


def test_the_same_instance_given_twice_is_a_duplicate():
    datasets, _ = ct_volume_series(seed=15)
    with pytest.raises(SeriesError, match="was given more than once"):
        read_series(datasets + [datasets[3]])
    volume = read_series(datasets + [datasets[3]], policy="report")
    assert volume.shape[0] == 12 and [i.kind for i in volume.issues] == ["duplicate"]


def test_uneven_spacing_is_refused_and_small_deviations_pass():
    datasets, _ = ct_volume_series(offsets_mm={5: 0.5}, seed=16)  # 20% of 2.5 mm
    with pytest.raises(SeriesError) as info:
        read_series(datasets)
    assert "slices 4 and 5 are 3.000 mm apart" in str(info.value)
    volume = read_series(datasets, policy="report")
    assert [(i.kind, i.slices) for i in volume.issues] == [("uneven", (4, 5)), ("uneven", (5, 6))]
    # 0.02 mm on 2.5 mm (0.8%) is within the 1% tolerance, and refused with a tighter one.
    datasets, _ = ct_volume_series(offsets_mm={5: 0.02}, seed=16)
    assert not read_series(datasets).issues
    with pytest.raises(SeriesError, match="uneven|apart"):
        read_series(datasets, spacing_tolerance=0.005)


def test_sheared_stack_gantry_tilt_is_refused():
    datasets, _ = ct_volume_series(seed=17)
    for k, ds in enumerate(sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))):
        position = [float(v) for v in ds.ImagePositionPatient]
        position[1] += 0.2 * k  # 4.6 degrees of tilt: every slice shifted along y
        ds.ImagePositionPatient = position
    with pytest.raises(SeriesError, match="sheared"):
        read_series(datasets)
    assert [i.kind for i in read_series(datasets, policy="report").issues] == ["sheared"]


def test_orientation_mismatch_is_refused():
    datasets, _ = ct_volume_series(seed=18)
    datasets[5].ImageOrientationPatient = [1, 0, 0, 0, 0.99939, 0.0349]  # 2 degrees
    with pytest.raises(SeriesError, match="oriented differently") as info:
        read_series(datasets, policy="report")  # never a policy matter: no volume can hold both
    assert str(datasets[5].SOPInstanceUID) in str(info.value)
    # Within the tolerance (1e-4): accepted.
    datasets[5].ImageOrientationPatient = [1, 0, 0, 0, 0.99999999, 0.0001]
    assert read_series(datasets).shape[0] == 12


def test_size_mismatch_is_refused():
    datasets, truth = ct_volume_series(seed=19)
    other = ct_volume_series(seed=19, columns=24)[0][5]
    other.SOPInstanceUID = "1.2.3.4.5"
    other.ImagePositionPatient = [-12.0, -10.0, 30.0 + 12 * 2.5]  # the next position: only its size is wrong
    with pytest.raises(SeriesError, match=r"differ in size \(32 x 24, 32 x 32 rows x columns\)"):
        read_series(datasets + [other])


def test_pixel_spacing_mismatch_is_refused():
    datasets, _ = ct_volume_series(seed=20)
    datasets[2].PixelSpacing = [0.8, 0.61]
    with pytest.raises(SeriesError, match="Pixel Spacing"):
        read_series(datasets)


def test_missing_geometry_and_bad_arguments():
    datasets, _ = ct_volume_series(seed=21)
    del datasets[0].ImagePositionPatient
    with pytest.raises(SeriesError, match="has no ImagePositionPatient"):
        read_series(datasets)
    with pytest.raises(ValueError, match="policy"):
        read_series(datasets, policy="ignore")
    with pytest.raises(SeriesError, match="not DICOM"):
        read_series([b"not dicom at all"])
    with pytest.raises(SeriesError, match="no image slices"):
        read_series([])
    with pytest.raises(SeriesError, match="max_voxels"):
        read_series(ct_volume_series(seed=21)[0], max_voxels=1000)


def test_messages_logs_and_repr_carry_no_patient_values(tmp_path, caplog):
    def scenarios():
        yield lambda: ct_volume_series(missing=[2], seed=22)[0]
        yield lambda: ct_volume_series(duplicate=[2], seed=22)[0]
        yield lambda: ct_volume_series(offsets_mm={3: 1.0}, seed=22)[0]

        def orientation():
            d = ct_volume_series(seed=22)[0]
            d[1].ImageOrientationPatient = [0, 1, 0, 0, 0, 1]
            return d
        yield orientation

        def two_series():
            return ct_volume_series(seed=22)[0] + ct_volume_series(seed=23, slices=2)[0]
        yield two_series

    for make in scenarios():
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        for i, ds in enumerate(_plant_phi(make())):
            ds.save_as(folder / f"{PHI[0].replace('^', '_')}_{i}.dcm", enforce_file_format=True)
        caplog.clear()
        with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(MedgeError) as info:
                read_series(folder)
        texts = [str(info.value), caplog.text] + [str(w.message) for w in caught]
        assert isinstance(info.value, DicomError) and info.value.__cause__ is None
        for value in PHI:
            assert not any(value in text for text in texts), (value, texts)
    volume = read_series(_plant_phi(ct_volume_series(seed=24)[0]))
    assert not any(value in repr(volume) for value in PHI)


_DAMAGE = [None, "garbage", [1, 2], 0, [float("nan")] * 6, [0] * 6, 5]
_ATTRIBUTES = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
               "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "NumberOfFrames", "SOPClassUID",
               "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")


@pytest.mark.parametrize("enhanced", [False, True])
def test_damaged_headers_end_in_a_medge_error_or_a_volume(enhanced):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    import copy

    pristine, _ = ct_volume_series(enhanced=enhanced, slices=4, seed=40)
    outcomes = set()
    for keyword in _ATTRIBUTES:
        damage = list(_DAMAGE)
        if keyword.endswith("Sequence"):
            damage = [None, Sequence([]), Sequence([Dataset()]), Sequence([Dataset()] * 4)]
        for value in damage:
            datasets = copy.deepcopy(pristine)
            target = datasets[0] if enhanced else datasets[1]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns about the planted values themselves
                try:
                    if value is None:
                        if keyword in target:
                            del target[keyword]
                    else:
                        setattr(target, keyword, value)
                except Exception:  # noqa: BLE001 - pydicom refuses some assignments outright
                    continue
            try:
                read_series(datasets)
                outcomes.add("volume")
            except MedgeError:
                outcomes.add("refused")
    assert outcomes == {"volume", "refused"}


def test_a_deflated_slice_is_read_after_read_dicom_bounds_its_inflation():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    datasets, truth = ct_volume_series(seed=41, slices=3)
    datasets[1].file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    _assert_matches(read_series([datasets[0], _bytes(datasets[1]), datasets[2]]), truth)
