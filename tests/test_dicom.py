"""medge.dicom.read_dicom: raw stored values and semantics, checked against pydicom.

Public files come from pydicom's wheel (``get_testdata_file(..., download=False)``:
never the network); encodings the wheel lacks come from medge.synthetic with
known values. Bad input must always end in DicomError with a message that
names no patient attribute value.
"""

from __future__ import annotations

import io
import logging
import pathlib
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pydicom = pytest.importorskip("pydicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_modality_lut, get_decoder  # noqa: E402
from pydicom.pixels.decoders.base import Decoder  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, RLELossless  # noqa: E402

from medge import synthetic  # noqa: E402
from medge.dicom import DEFAULT_MAX_PIXELS, read_dicom  # noqa: E402
from medge.errors import DicomError, MedgeError  # noqa: E402
from medge.image import FrameTransform, Window  # noqa: E402


def public_file(name: str) -> str:
    """Path of a file shipped in pydicom's wheel; skip (never download) when absent."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not in this pydicom installation (downloading is disabled in tests)")
    return path


def decoder_installed(ds: Dataset) -> bool:
    return get_decoder(ds.file_meta.TransferSyntaxUID).is_available


def make_dataset(pixels: np.ndarray, *, bits_stored=None, photometric="MONOCHROME2", **attrs) -> Dataset:
    """A minimal single- or multi-frame greyscale dataset (Explicit VR Little Endian) around ``pixels``."""
    pixels = np.asarray(pixels)
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    if pixels.dtype.kind == "f":
        keyword = "FloatPixelData" if pixels.dtype.itemsize == 4 else "DoubleFloatPixelData"
        setattr(ds, keyword, pixels.astype(pixels.dtype.newbyteorder("<")).tobytes())
    else:
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def small_ct(**attrs) -> Dataset:
    ds = synthetic.ct_slice(seed=1, size=16, lesion=False)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def header_windows(ds: Dataset) -> list[tuple[float, float]]:
    if "WindowCenter" not in ds:
        return []
    centers = ds.WindowCenter if isinstance(ds.WindowCenter, pydicom.multival.MultiValue) else [ds.WindowCenter]
    widths = ds.WindowWidth if isinstance(ds.WindowWidth, pydicom.multival.MultiValue) else [ds.WindowWidth]
    return [(float(c), float(w)) for c, w in zip(centers, widths)]


# --------------------------------------------------------------------------- agreement with pydicom

PUBLIC_FILES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_RLE.dcm",
    "MR_small_padded.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPGExtended.dcm",
    "JPEG2000.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "examples_overlay.dcm",
    "image_dfl.dcm",
    "rtdose.dcm",
    "rtdose_expb.dcm",
    "rtdose_rle.dcm",
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # MR_small_padded: pydicom warns about the padding
@pytest.mark.parametrize("name", PUBLIC_FILES)
def test_public_file_matches_pydicom(name):
    path = public_file(name)
    ds = pydicom.dcmread(path)
    if not decoder_installed(ds):
        pytest.skip(f"no decoder installed for {ds.file_meta.TransferSyntaxUID.name} "
                    "(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)")
    image = read_dicom(path)
    expected = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)

    assert image.pixels.shape == (frames, ds.Rows, ds.Columns)
    assert image.pixels.dtype.isnative
    assert image.pixels.dtype.kind == ("i" if ds.PixelRepresentation else "u") or (
        expected.dtype.kind == "u" and expected.dtype.itemsize == 4 and image.pixels.dtype == np.int32
    )
    np.testing.assert_array_equal(image.pixels, expected.reshape(image.pixels.shape))

    sem = image.semantics
    assert (sem.rows, sem.columns, sem.number_of_frames) == (ds.Rows, ds.Columns, frames)
    assert sem.bits_stored == ds.BitsStored
    assert sem.pixel_representation == ds.PixelRepresentation
    assert sem.photometric_interpretation == ds.PhotometricInterpretation
    assert len(sem.frames) == 1
    # The Modality LUT our semantics describe is pydicom's.
    for index in range(frames):
        modality = apply_modality_lut(image.pixels[index], ds)
        np.testing.assert_allclose(sem.rescale_slope * image.pixels[index].astype(np.float64)
                                   + sem.rescale_intercept, modality, rtol=0, atol=1e-9)
    assert [(w.center, w.width) for w in sem.windows] == header_windows(ds)
    assert sem.voi_function == ds.get("VOILUTFunction", "LINEAR")
    assert image.sop_instance_uid == ds.SOPInstanceUID


def test_ct_small_rescale_and_signed_values():
    image = read_dicom(public_file("CT_small.dcm"))
    assert image.pixels.dtype == np.int16
    assert image.semantics.rescale_slope == 1.0
    assert image.semantics.rescale_intercept == -1024.0


def test_examples_overlay_has_both_windows_with_explanations():
    image = read_dicom(public_file("examples_overlay.dcm"))
    assert image.pixels.dtype == np.uint16
    assert image.semantics.bits_stored == 12
    assert image.pixels.max() < 4096
    assert image.semantics.windows == (Window(450.0, 790.0, "WINDOW1"), Window(200.0, 443.0, "WINDOW2"))


def test_693_j2ki_signed_14_bits():
    path = public_file("693_J2KI.dcm")
    if not decoder_installed(pydicom.dcmread(path, stop_before_pixels=True)):
        pytest.skip("no JPEG 2000 decoder installed (pip install pylibjpeg pylibjpeg-openjpeg)")
    image = read_dicom(path)
    assert image.semantics.bits_stored == 14 and image.semantics.pixel_representation == 1
    assert -(1 << 13) <= image.pixels.min() and image.pixels.max() < (1 << 13)
    assert image.semantics.windows[0] == Window(40.0, 100.0)


def test_big_endian_public_file_is_native_and_equal_to_little_endian():
    big = read_dicom(public_file("MR_small_bigendian.dcm"))
    little = read_dicom(public_file("MR_small.dcm"))
    assert pydicom.dcmread(public_file("MR_small_bigendian.dcm")).pixel_array.dtype == np.dtype(">i2")
    assert big.pixels.dtype == np.dtype("int16") and big.pixels.dtype.isnative
    np.testing.assert_array_equal(big.pixels, little.pixels)
    assert big.semantics == little.semantics


def test_unsigned_32_bit_becomes_int32():
    image = read_dicom(public_file("rtdose.dcm"))
    assert image.pixels.dtype == np.int32 and image.pixels.shape == (15, 10, 10)
    assert image.semantics.bits_allocated == 32 and image.semantics.pixel_representation == 0


def test_every_source_type_gives_the_same_image(tmp_path):
    path = public_file("MR_small.dcm")
    data = pathlib.Path(path).read_bytes()
    ds = pydicom.dcmread(path)
    before = ds.PixelData
    reference = read_dicom(path)
    with open(path, "rb") as f:
        from_file = read_dicom(f)
    sources = [pathlib.Path(path), data, bytearray(data), memoryview(data), io.BytesIO(data), ds]
    for image in [from_file] + [read_dicom(s) for s in sources]:
        np.testing.assert_array_equal(image.pixels, reference.pixels)
        assert image.semantics == reference.semantics
        assert image.sop_instance_uid == reference.sop_instance_uid
    assert ds.PixelData is before  # the caller's Dataset is not modified
    assert getattr(ds, "_pixel_array", None) is None  # nor given a decoded-array cache


# --------------------------------------------------------------------------- synthetic encodings


def test_monochrome1_junk_high_bits_are_masked():
    clean = synthetic.cr_phantom(seed=3, size=32)
    ds = synthetic.monochrome1_cr(seed=3, size=32)
    words = np.frombuffer(ds.PixelData, "<u2").reshape(clean.shape)
    assert (words >> 12).any(), "the generator must put junk in the unused bits"
    image = read_dicom(ds)
    np.testing.assert_array_equal(image.pixels[0], clean)
    assert image.semantics.inverted and image.semantics.photometric_interpretation == "MONOCHROME1"
    assert (image.semantics.bits_allocated, image.semantics.bits_stored) == (16, 12)
    assert (image.semantics.rescale_slope, image.semantics.rescale_intercept) == (1.0, 0.0)  # absent -> 1/0
    assert image.semantics.windows == (Window(2048.0, 4096.0, "FULL RANGE"),)
    # pydicom 3 masks the unused bits too (documented in the report).
    np.testing.assert_array_equal(ds.pixel_array, clean)


def test_reader_masks_even_when_the_decoder_does_not(monkeypatch):
    ds = synthetic.monochrome1_cr(seed=4, size=16)
    words = np.frombuffer(ds.PixelData, "<u2").reshape(ds.Rows, ds.Columns).copy()

    def unmasked(self, src, **kwargs):
        return words.copy(), {}

    monkeypatch.setattr(Decoder, "as_array", unmasked)
    image = read_dicom(ds)
    np.testing.assert_array_equal(image.pixels[0], words & 0x0FFF)


def test_signed_bits_stored_are_sign_extended(monkeypatch):
    values = np.array([[-2048, -1, 0, 2047]], dtype=np.int16)
    junk = (values.view(np.uint16) & 0x0FFF) | 0x5000  # bit 11 is the sign; 12..15 junk
    ds = make_dataset(junk.view(np.int16), bits_stored=12)
    np.testing.assert_array_equal(read_dicom(ds).pixels[0], values)

    monkeypatch.setattr(Decoder, "as_array", lambda self, src, **kw: (junk.view(np.int16).copy(), {}))
    np.testing.assert_array_equal(read_dicom(ds).pixels[0], values)


def test_enhanced_multiframe_per_frame_and_shared_groups():
    ds = synthetic.enhanced_multiframe(seed=2, size=16, frames=4)
    image = read_dicom(ds)
    expected = synthetic.enhanced_frame_transforms(4)
    assert image.semantics.frames == expected
    assert image.semantics.frame_transform(2).windows == (Window(50.0, 350.0, "SHARED"),)  # shared fallback
    assert image.semantics.frame_transform(2).voi_function == "SIGMOID"
    for index, transform in enumerate(expected):
        hu = transform.rescale_slope * image.pixels[index].astype(np.float64) + transform.rescale_intercept
        phantom, _ = synthetic.ct_phantom(seed=2 + index, size=16, lesion=False)
        assert np.abs(hu - phantom).max() <= transform.rescale_slope / 2 + 1e-9


def test_enhanced_top_level_fallback_and_single_transform():
    ds = synthetic.enhanced_multiframe(seed=0, size=8, frames=3)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PixelValueTransformationSequence
        if "FrameVOILUTSequence" in item:
            del item.FrameVOILUTSequence
    ds.RescaleSlope, ds.RescaleIntercept = 3.0, -7.0
    image = read_dicom(ds)
    assert image.semantics.frames == (
        FrameTransform(3.0, -7.0, (Window(50.0, 350.0, "SHARED"),), "SIGMOID"),
    )


def test_enhanced_per_frame_count_must_match():
    ds = synthetic.enhanced_multiframe(seed=0, size=8, frames=3)
    ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[:2]
    with pytest.raises(DicomError, match=r"2 item\(s\) for 3 frame\(s\)"):
        read_dicom(ds)


def test_enhanced_bad_window_names_the_frame():
    ds = synthetic.enhanced_multiframe(seed=0, size=8, frames=3)
    ds.PerFrameFunctionalGroupsSequence[1].FrameVOILUTSequence[0].WindowWidth = 0
    with pytest.raises(DicomError, match="frame 1"):
        read_dicom(ds)


def test_big_endian_synthetic_comes_out_native():
    values = np.array([[-32768, -2, -1, 0], [1, 255, 256, 32767]], dtype=np.int16)
    ds = synthetic.big_endian(values=values)
    assert ds.pixel_array.dtype == np.dtype(">i2")
    image = read_dicom(ds)
    assert image.pixels.dtype == np.int16 and image.pixels.dtype.isnative
    np.testing.assert_array_equal(image.pixels[0], values)


def test_big_endian_file_round_trip(tmp_path):
    path = tmp_path / "be.dcm"
    synthetic.big_endian(seed=5, size=16).save_as(path, enforce_file_format=True)
    expected = synthetic.ct_phantom(seed=5, size=16, lesion=False)[0].astype(np.int32) + 1024
    np.testing.assert_array_equal(read_dicom(path).pixels[0], expected)


def test_rle_round_trip():
    ds = synthetic.rle(seed=6, size=16)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    image = read_dicom(ds)
    expected = synthetic.ct_phantom(seed=6, size=16, lesion=False)[0].astype(np.int32) + 1024
    np.testing.assert_array_equal(image.pixels[0], expected)
    assert image.semantics.rescale_intercept == -1024.0


def test_float_pixel_data():
    values = np.linspace(-1.5, 2.5, 12, dtype=np.float32).reshape(3, 4)
    image = read_dicom(make_dataset(values))
    assert image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.pixels[0], values)


def test_double_float_pixel_data_exact_in_float32_is_accepted():
    values = np.array([[0.5, -2.0], [1024.25, 3.0]], dtype=np.float64)
    image = read_dicom(make_dataset(values))
    assert image.pixels.dtype == np.float32 and image.semantics.bits_allocated == 32
    np.testing.assert_array_equal(image.pixels[0], values)


def test_double_float_pixel_data_not_exact_is_refused():
    with pytest.raises(DicomError, match="float32 cannot represent"):
        read_dicom(make_dataset(np.array([[0.1, 0.2]], dtype=np.float64)))


def test_float_pixel_data_with_nan_is_refused():
    with pytest.raises(DicomError, match="NaN"):
        read_dicom(make_dataset(np.array([[0.0, np.nan]], dtype=np.float32)))


def test_signed_8_bit_is_widened_to_int16():
    values = np.array([[-128, -1, 0, 127]], dtype=np.int8)
    image = read_dicom(make_dataset(values))
    assert image.pixels.dtype == np.int16 and image.semantics.bits_allocated == 16
    assert image.semantics.bits_stored == 8 and image.semantics.pixel_representation == 1
    np.testing.assert_array_equal(image.pixels[0], values)


def test_unsigned_32_bit_beyond_int32_is_refused():
    with pytest.raises(DicomError, match="2147483647"):
        read_dicom(make_dataset(np.array([[0, 2**31]], dtype=np.uint32)))


def test_unsigned_32_bit_with_31_bits_stored_fits():
    values = np.array([[0, 2**31 - 1]], dtype=np.uint32)
    image = read_dicom(make_dataset(values | np.uint32(2**31), bits_stored=31))  # junk in bit 31
    assert image.pixels.dtype == np.int32
    np.testing.assert_array_equal(image.pixels[0], values)


def test_dataset_without_transfer_syntax_native_little_endian():
    values = np.arange(12, dtype=np.int16).reshape(3, 4) - 6
    ds = make_dataset(values)
    del ds.file_meta
    np.testing.assert_array_equal(read_dicom(ds).pixels[0], values)


def test_dataset_without_transfer_syntax_encapsulated_is_refused():
    ds = synthetic.rle(seed=0, size=8)
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(DicomError, match="encapsulated"):
        read_dicom(ds)


@pytest.mark.parametrize("little_endian", [True, False])
def test_force_reads_a_bare_dataset(little_endian):
    values = np.array([[-300, 2], [515, 7]], dtype=np.int16)
    ds = make_dataset(values)
    del ds.file_meta
    ds.PixelData = values.astype("<i2" if little_endian else ">i2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=little_endian, little_endian=little_endian)  # no preamble, no meta
    data = buffer.getvalue()
    with pytest.raises(DicomError, match="force=True"):
        read_dicom(data)
    image = read_dicom(data, force=True)
    assert image.pixels.dtype.isnative
    np.testing.assert_array_equal(image.pixels[0], values)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_sop_instance_uid():
    ds = small_ct()
    assert read_dicom(ds).sop_instance_uid == ds.SOPInstanceUID
    del ds.SOPInstanceUID
    assert read_dicom(ds).sop_instance_uid == ds.file_meta.MediaStorageSOPInstanceUID
    ds.file_meta.MediaStorageSOPInstanceUID = "not a uid"
    assert read_dicom(ds).sop_instance_uid is None


# --------------------------------------------------------------------------- VOI LUT / Modality LUT sequences


def _lut_item(**attrs) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.LUTData = [0, 100, 200, 300]
    for keyword, value in attrs.items():
        setattr(item, keyword, value)
    return item


def test_modality_lut_sequence_is_refused():
    ds = small_ct()
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.ModalityLUTSequence = [_lut_item(ModalityLUTType="HU")]
    with pytest.raises(DicomError, match="Modality LUT Sequence .* not supported yet"):
        read_dicom(ds)


def test_voi_lut_sequence_without_windows_gives_no_windows_and_a_warning(caplog):
    ds = small_ct()
    del ds.WindowCenter, ds.WindowWidth, ds.WindowCenterWidthExplanation
    ds.VOILUTSequence = [_lut_item()]
    with caplog.at_level(logging.WARNING, logger="medge.dicom"):
        image = read_dicom(ds)
    assert image.semantics.windows == ()
    assert "VOI LUT Sequence (0028,3010) ignored" in caplog.text


def test_per_frame_voi_lut_sequence_is_not_replaced_by_shared_windows(caplog):
    ds = synthetic.enhanced_multiframe(seed=0, size=8, frames=3)
    voi = ds.PerFrameFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    del voi.WindowCenter, voi.WindowWidth, voi.WindowCenterWidthExplanation, voi.VOILUTFunction
    voi.VOILUTSequence = [_lut_item()]
    with caplog.at_level(logging.WARNING, logger="medge.dicom"):
        image = read_dicom(ds)
    assert image.semantics.frame_transform(0).windows == ()
    assert image.semantics.frame_transform(2).windows == (Window(50.0, 350.0, "SHARED"),)
    assert caplog.text.count("VOI LUT Sequence") == 1 and "frame 0" in caplog.text


def test_voi_lut_sequence_with_windows_uses_the_windows():
    ds = small_ct()
    ds.VOILUTSequence = [_lut_item()]
    assert read_dicom(ds).semantics.windows == synthetic.CT_WINDOWS


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("data", [b"", b"hello, not dicom", bytes(200), b"\0" * 128 + b"DICM" + bytes(range(256)) * 4])
def test_not_dicom(data):
    with pytest.raises(DicomError):
        read_dicom(data)


def test_paths_that_cannot_be_read(tmp_path):
    with pytest.raises(DicomError, match="No such file"):
        read_dicom(tmp_path / "missing.dcm")
    with pytest.raises(DicomError, match="cannot read the file"):
        read_dicom(tmp_path)


def test_unsupported_source_type():
    with pytest.raises(DicomError, match="cannot read DICOM from a int"):
        read_dicom(42)


@pytest.mark.parametrize("name", ["reportsi.dcm", "rtplan.dcm"])
def test_no_pixel_data(name):
    with pytest.raises(DicomError, match="no pixel data"):
        read_dicom(public_file(name))


def test_two_pixel_data_elements():
    ds = small_ct()
    ds.FloatPixelData = np.zeros(256, np.float32).tobytes()
    with pytest.raises(DicomError, match="2 pixel data elements"):
        read_dicom(ds)


def test_truncated_public_file():
    with pytest.raises(DicomError, match=r"truncated: 8130 bytes, the header needs 8192"):
        read_dicom(public_file("MR_truncated.dcm"))


def test_truncated_multiframe():
    ds = synthetic.enhanced_multiframe(seed=0, size=8, frames=3)
    ds.PixelData = ds.PixelData[: 8 * 8 * 2 * 2]
    with pytest.raises(DicomError, match="truncated"):
        read_dicom(ds)


TS_PACKAGES = [
    ("MR_small_jp2klossless.dcm", "pylibjpeg-openjpeg"),
    ("693_J2KI.dcm", "pylibjpeg-openjpeg"),
    ("MR_small_jpeg_ls_lossless.dcm", "pylibjpeg-libjpeg"),
    ("JPGExtended.dcm", "pylibjpeg-libjpeg"),
]


@pytest.mark.parametrize("name, package", TS_PACKAGES)
def test_missing_decoder_names_the_package(monkeypatch, name, package):
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: not self.is_encapsulated))
    with pytest.raises(DicomError, match=f"no decoder .* is installed: pip install pylibjpeg {package}"):
        read_dicom(public_file(name))


def test_missing_decoder_for_real_where_one_is_missing():
    ds = pydicom.dcmread(public_file("MR_small_jpeg_ls_lossless.dcm"))
    if decoder_installed(ds):
        pytest.skip("a JPEG-LS decoder is installed here; the monkeypatched test covers the message")
    with pytest.raises(DicomError, match="pip install pylibjpeg pylibjpeg-libjpeg"):
        read_dicom(ds)


def test_damaged_compressed_stream():
    ds = pydicom.dcmread(public_file("MR_small_RLE.dcm"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    with pytest.raises(DicomError, match="could not be decoded"):
        read_dicom(ds)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("uid, message", [
    ("1.2.3.4.5", "unknown Transfer Syntax UID 1.2.3.4.5"),
    ("1.2.840.10008.1.2.4.100", r"MPEG2 .* cannot be decoded"),
    ("not-a-uid", "not a valid UID"),
])
def test_transfer_syntax_without_decoder(uid, message):
    ds = small_ct()
    ds.file_meta.TransferSyntaxUID = uid
    with pytest.raises(DicomError, match=message):
        read_dicom(ds)


@pytest.mark.parametrize("name, shown", [
    ("examples_rgb_color.dcm", "RGB"),
    ("examples_palette.dcm", "PALETTE COLOR"),
    ("SC_ybr_full_422_uncompressed.dcm", "YBR_FULL_422"),
])
def test_colour_images_are_refused(name, shown):
    with pytest.raises(DicomError, match=f"Photometric Interpretation {shown} .* not supported"):
        read_dicom(public_file(name))


def test_multi_sample_monochrome_is_refused():
    ds = small_ct(SamplesPerPixel=3)
    with pytest.raises(DicomError, match="3 sample"):
        read_dicom(ds)


@pytest.mark.parametrize("attrs, message", [
    ({"BitsAllocated": 1}, "Bits Allocated 1"),
    ({"BitsAllocated": 12}, "Bits Allocated 12"),
    ({"BitsStored": 17}, "Bits Stored"),
    ({"PixelRepresentation": 2}, "Pixel Representation"),
    ({"Rows": 0}, "no pixels"),
    ({"NumberOfFrames": 0}, "no pixels"),
    ({"NumberOfFrames": 3}, "truncated"),
])
def test_bad_pixel_module(attrs, message):
    with pytest.raises(DicomError, match=message):
        read_dicom(small_ct(**attrs))


@pytest.mark.parametrize("keyword", ["Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
                                     "SamplesPerPixel", "PhotometricInterpretation"])
def test_missing_pixel_module_element(keyword):
    ds = small_ct()
    delattr(ds, keyword)
    with pytest.raises(DicomError, match="is missing"):
        read_dicom(ds)


@pytest.mark.parametrize("attrs, message", [
    ({"WindowCenter": 40, "WindowWidth": 0}, "Window Width must be > 0"),
    ({"WindowCenter": [40, 10], "WindowWidth": [400, -10]}, "window 1: Window Width must be > 0"),
    ({"WindowCenter": 40, "WindowWidth": 0.5}, ">= 1 for VOI LUT Function LINEAR"),
    ({"WindowCenter": 40, "WindowWidth": float("nan")}, "finite"),
    ({"WindowCenter": float("inf"), "WindowWidth": 400}, "finite"),
    ({"WindowWidth": [400, 1500, 10]}, "has 2 value"),
    ({"VOILUTFunction": "SQUARE"}, "unsupported value"),
    ({"RescaleSlope": 0}, "Rescale Slope .* is 0"),
    ({"RescaleSlope": float("nan")}, "finite"),
    ({"RescaleIntercept": float("inf")}, "finite"),
    ({"RescaleSlope": [1, 2]}, "must hold one value"),
])
def test_bad_rescale_or_window(attrs, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the nan/inf DS values as it stores them
        ds = small_ct(**attrs)
    with pytest.raises(DicomError, match=message):
        read_dicom(ds)


def test_window_center_without_width():
    ds = small_ct()
    del ds.WindowWidth
    with pytest.raises(DicomError, match="Window Width .* is missing"):
        read_dicom(ds)


def test_linear_exact_allows_width_below_one():
    ds = small_ct(WindowCenter=0, WindowWidth=0.5, VOILUTFunction="LINEAR_EXACT", WindowCenterWidthExplanation="")
    assert read_dicom(ds).semantics.windows == (Window(0.0, 0.5),)


def test_max_pixels_checked_from_the_header():
    ds = small_ct()
    assert read_dicom(ds, max_pixels=16 * 16).pixels.size == 256
    with pytest.raises(DicomError, match="above the limit of 255"):
        read_dicom(ds, max_pixels=255)
    with pytest.raises(ValueError):
        read_dicom(ds, max_pixels=0)


def test_decompression_bomb_refused_before_decoding(monkeypatch):
    ds = synthetic.rle(seed=0, size=8)
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000

    def must_not_decode(self, *args, **kwargs):
        raise AssertionError("decoded a bomb")

    monkeypatch.setattr(Decoder, "as_array", must_not_decode)
    with pytest.raises(DicomError, match=f"limit of {DEFAULT_MAX_PIXELS}"):
        read_dicom(ds)


@pytest.mark.parametrize("bad", ["shape", "dtype", "itemsize"])
def test_decoded_array_must_agree_with_the_header(monkeypatch, bad):
    # RLE goes through a decoder (native little-endian data is viewed in place, without one).
    ds = synthetic.rle(seed=0, size=16)
    good = ds.pixel_array
    wrong = {"shape": good[:8], "dtype": good.view(np.uint16), "itemsize": good.astype(np.int32)}[bad]
    monkeypatch.setattr(Decoder, "as_array", lambda self, src, **kw: (wrong, {}))
    with pytest.raises(DicomError, match=bad if bad != "itemsize" else "dtype"):
        read_dicom(ds)


# --------------------------------------------------------------------------- decoding plugins


def test_read_dicom_asks_pydicom_for_the_fastest_installed_plugin(monkeypatch):
    from medge import dicom

    ds = synthetic.rle(seed=0, size=16)
    installed = get_decoder(RLELossless).available_plugins
    expected = "pylibjpeg" if "pylibjpeg" in installed else "pydicom"
    assert dicom.decoding_plugin(RLELossless) == expected
    assert dicom.decoding_plugin(ExplicitVRLittleEndian) == ""  # native: pydicom has nothing to choose
    asked = []
    real = Decoder.as_array

    def spy(self, src, **kwargs):
        asked.append(kwargs.get("decoding_plugin"))
        return real(self, src, **kwargs)

    monkeypatch.setattr(Decoder, "as_array", spy)
    image = read_dicom(ds)
    assert asked == [expected]
    assert np.array_equal(image.pixels[0], ds.pixel_array)


def test_a_failing_or_panicking_plugin_hands_over_to_the_next(monkeypatch):
    class PanicException(BaseException):  # what pyo3 raises (pylibjpeg-rle on some damaged data)
        pass

    def panics(src, runner):
        raise PanicException("index out of bounds: the len is 128 but the index is 129")

    ds = synthetic.rle(seed=0, size=16)
    decoder = get_decoder(RLELossless)
    names = list(decoder._available)
    from medge import dicom

    monkeypatch.setitem(decoder._available, dicom.decoding_plugin(RLELossless), panics)
    if len(names) > 1:  # the other plugin decodes it
        assert np.array_equal(read_dicom(ds).pixels[0], pydicom.pixels.pixel_array(ds, decoding_plugin="pydicom"))
    for name in names:
        monkeypatch.setitem(decoder._available, name, panics)
    with pytest.raises(DicomError, match=r"could not be decoded \(PanicException\)") as info:
        read_dicom(ds)
    assert info.value.__context__ is None and "index out of bounds" not in str(info.value)

    def interrupted(src, runner):
        raise KeyboardInterrupt

    monkeypatch.setitem(decoder._available, names[0], interrupted)
    with pytest.raises(KeyboardInterrupt):
        read_dicom(ds)


# --------------------------------------------------------------------------- robustness and privacy


@pytest.mark.parametrize("make", [
    lambda: synthetic.ct_slice(seed=0, size=8, lesion=False),
    lambda: synthetic.rle(seed=0, size=8),
    lambda: synthetic.enhanced_multiframe(seed=0, size=8, frames=3),
], ids=["native", "rle", "enhanced"])
def test_damaged_files_never_leak_other_exceptions(make):
    """Truncations and random byte changes: an Image or a DicomError, never another exception."""
    buffer = io.BytesIO()
    make().save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    rng = np.random.default_rng(0)
    candidates = [data[:cut] for cut in range(0, len(data), 11)]
    for _ in range(300):
        damaged = bytearray(data)
        for position in rng.integers(128, len(data), size=int(rng.integers(1, 4))):
            damaged[position] = int(rng.integers(0, 256))
        candidates.append(bytes(damaged))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for candidate in candidates:
            for force in (False, True):
                try:
                    read_dicom(candidate, force=force)
                except DicomError:
                    pass


PHI = ("DOE^JOHN", "DOE", "JOHN", "PID-7734512", "19450317", "ACC-99812", "Dr^Who")


def _with_phi(ds: Dataset) -> Dataset:
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "PID-7734512"
    ds.PatientBirthDate = "19450317"
    ds.AccessionNumber = "ACC-99812"
    ds.ReferringPhysicianName = "Dr^Who"
    return ds


def _phi_failures():
    def photometric(ds):
        ds.PhotometricInterpretation = "DOE JOHN"

    def voi_function(ds):
        ds.VOILUTFunction = "DOE"

    def explanation_and_zero_width(ds):
        ds.WindowCenterWidthExplanation = ["DOE^JOHN", "PID-7734512"]
        ds.WindowWidth = [0, 1500]

    def transfer_syntax(ds):
        ds.file_meta.TransferSyntaxUID = "DOE^JOHN"

    def truncated(ds):
        ds.PixelData = ds.PixelData[:10]

    def frames_text(ds):
        ds.add_new(0x00280008, "LO", "PID-7734512")  # Number of Frames holding text (wrong VR)

    def sop_class(ds):
        del ds.PixelData
        ds.SOPClassUID = "19450317"

    return [photometric, voi_function, explanation_and_zero_width, transfer_syntax, truncated, frames_text, sop_class]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("damage", _phi_failures(), ids=lambda f: f.__name__)
def test_messages_and_logs_never_contain_patient_values(damage, caplog):
    ds = _with_phi(small_ct())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        damage(ds)
    sources = [ds]
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
        sources.append(buffer.getvalue())
    except ValueError:  # pydicom cannot write an invalid transfer syntax: test the Dataset only
        pass
    for source in sources:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="medge"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(MedgeError) as info:
                read_dicom(source)
        message = str(info.value)
        for value in PHI:
            assert value not in message, f"{value!r} leaked into: {message}"
            assert value not in caplog.text, f"{value!r} leaked into the log: {caplog.text}"


def test_successful_read_logs_no_patient_values(caplog):
    with caplog.at_level(logging.DEBUG, logger="medge"):
        read_dicom(_with_phi(small_ct()))
    assert caplog.text and not any(value in caplog.text for value in PHI)


_FINITE = st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: float(f"{v:.6g}"))  # DS holds 16 characters
_WIDTH = st.floats(1, 1e5).map(lambda v: float(f"{v:.6g}"))


@settings(max_examples=40, deadline=None)
@given(slope=_FINITE.filter(lambda v: v != 0), intercept=_FINITE,
       windows=st.lists(st.tuples(_FINITE, _WIDTH), min_size=0, max_size=3))
def test_rescale_and_windows_round_trip(slope, intercept, windows):
    ds = make_dataset(np.zeros((2, 2), np.int16), RescaleSlope=slope, RescaleIntercept=intercept)
    if windows:
        ds.WindowCenter = [c for c, _ in windows]
        ds.WindowWidth = [w for _, w in windows]
    sem = read_dicom(ds).semantics
    assert (sem.rescale_slope, sem.rescale_intercept) == (slope, intercept)
    assert [(w.center, w.width) for w in sem.windows] == windows


def test_modules_import_without_pydicom():
    """medge.dicom and medge.synthetic import pydicom lazily and name it when it is missing."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pydicom'] = None\n"
        "import medge.dicom, medge.synthetic\n"
        "from medge.errors import MissingDependency\n"
        "calls = (lambda: medge.dicom.read_dicom(b'x'),\n"
        "         lambda: medge.synthetic.ct_slice(seed=0, size=8, lesion=False))\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except MissingDependency as exc:\n"
        "        assert 'pydicom' in str(exc)\n"
        "    else:\n"
        "        raise AssertionError('no MissingDependency')\n"
        "print(medge.synthetic.ct_phantom(seed=0, size=8, lesion=False)[0].shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "(8, 8)" in result.stdout


def test_native_little_endian_pixels_are_read_in_place():
    """Uncompressed little-endian data is viewed in place (zero copy, read-only) and equals pydicom's decode;
    junk high bits still come out masked (on a copy)."""
    ds = synthetic.ct_slice(seed=2, size=32, lesion=True)
    image = read_dicom(ds)
    np.testing.assert_array_equal(image.pixels[0], ds.pixel_array)
    assert not image.pixels.flags.writeable
    assert np.shares_memory(image.pixels, np.frombuffer(ds.PixelData, np.uint8))
    cr = synthetic.monochrome1_cr(seed=0, size=32)  # 12 bits stored, junk in the top 4
    masked = read_dicom(cr).pixels
    assert int(masked.max()) < 4096 and not np.shares_memory(masked, np.frombuffer(cr.PixelData, np.uint8))


# --------------------------------------------------------------------------- issue 8: bounded, PHI-free input paths

import base64  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

from pydicom.encaps import encapsulate, generate_frames  # noqa: E402
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless  # noqa: E402

from medge import _pydicom_quiet  # noqa: E402
from medge.image import Image, PixelSemantics  # noqa: E402

# A real JPEG-LS lossless codestream of a 512 x 512 image (CharLS 2.x through pyjpegls, which is not
# a medge dependency), zlib + base64: stored value = 1000 * (row // 128) + 300 * (column // 256),
# 12-bit precision, SOF55 at byte 2.
_JPEG_LS_512 = (
    "eNr7f+P/dwZuHiYGJgZGRkGG/7cYOBgZGYDgf/1fBaY9HAotihwdHR2dKpM8VSZ5rYKA9f/rccACDllGdgaFAxwJLAZMEow8DD1ocAajAVMC"
    "ywHOBmEGNQYfdO4GpgPcDDqkUw/YGSwYD/AxFDA3yNCOI8HAbo/T5zBYw8DaT1BRBc9/2jqVzpwG9vkE/VzHcI2gmvrG8/8YhlHIGDA/J+zn"
    "hlUElfx3TP/PMHySywGe/zcBxN+I/w=="
)


def _jpeg_ls_512_pattern() -> np.ndarray:
    rows, columns = np.mgrid[0:512, 0:512]
    return (1000 * (rows // 128) + 300 * (columns // 256)).astype(np.uint16)


def _encapsulated(codestream: bytes, transfer_syntax, *, rows=512, columns=512, bits_allocated=16, bits_stored=12,
                  pixel_representation=0) -> Dataset:
    """A greyscale dataset (with planted patient values) whose one frame is ``codestream``."""
    ds = make_dataset(np.zeros((1, 1), np.uint16))
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    return _with_phi(ds)


def _must_not_decode(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a decoder was called on a frame whose header disagrees with the DICOM header")

    monkeypatch.setattr(Decoder, "as_array", refuse)


def _file_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _sof55_claiming(rows: int, columns: int) -> bytes:
    codestream = bytearray(zlib.decompress(base64.b64decode(_JPEG_LS_512)))
    assert codestream[2:4] == b"\xff\xf7"  # SOF55: length (2), precision (1), rows (2), columns (2)
    codestream[7:9] = rows.to_bytes(2, "big")
    codestream[9:11] = columns.to_bytes(2, "big")
    return bytes(codestream)


def test_real_jpeg_ls_512_decodes():
    """The honest codestream reads (so the refusals below are about the lie, not the stream)."""
    ds = _encapsulated(_sof55_claiming(512, 512), JPEGLSLossless)
    if not decoder_installed(ds):
        pytest.skip("no JPEG-LS decoder installed")
    np.testing.assert_array_equal(read_dicom(_file_bytes(ds)).pixels[0], _jpeg_ls_512_pattern())


def test_jpeg_ls_frame_claiming_16384_squared_is_refused_before_decoding(monkeypatch):
    """Issue 8: a 2 KB JPEG-LS file whose SOF55 claims 16384 x 16384 (header: 512 x 512) took 258 s and 1.6 GB."""
    data = _file_bytes(_encapsulated(_sof55_claiming(16384, 16384), JPEGLSLossless))
    assert len(data) < 2048
    _must_not_decode(monkeypatch)
    started = time.perf_counter()
    with pytest.raises(DicomError, match=r"declares 16384 x 16384 pixels .* say 512 x 512; refused before decoding"):
        read_dicom(data)
    assert time.perf_counter() - started < 5  # sanity bound only: refusing reads ~100 header bytes


def _j2k_codestream(size: int = 32) -> tuple[bytes, np.ndarray]:
    """A real JPEG 2000 lossless codestream of a synthetic CT slice (pylibjpeg-openjpeg's encoder), and its pixels."""
    ds = synthetic.ct_slice(seed=1, size=size, lesion=False)
    pixels = read_dicom(ds).pixels[0].copy()
    try:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    except Exception as exc:  # no encoder here
        pytest.skip(f"no JPEG 2000 encoder ({type(exc).__name__})")
    return next(generate_frames(ds.PixelData, number_of_frames=1)), pixels


def _jp2(codestream: bytes, rows: int, columns: int) -> bytes:
    """``codestream`` wrapped in a JP2 file (signature, ftyp, jp2h with ihdr and greyscale colr, jp2c)."""
    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    header = box(b"ihdr", struct.pack(">IIHBBBB", rows, columns, 1, 15, 7, 0, 0))
    header += box(b"colr", bytes([1, 0, 0]) + struct.pack(">I", 17))
    return (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + box(b"ftyp", b"jp2 \0\0\0\0jp2 ") + box(b"jp2h", header)
            + box(b"jp2c", codestream))


def _siz_claiming(codestream: bytes, rows: int, columns: int) -> bytes:
    lied = bytearray(codestream)
    assert lied[:4] == b"\xff\x4f\xff\x51"  # SOC, SIZ; Xsiz at 8, Ysiz at 12 (XOsiz/YOsiz are 0 here)
    lied[8:12] = columns.to_bytes(4, "big")
    lied[12:16] = rows.to_bytes(4, "big")
    return bytes(lied)


@pytest.mark.parametrize("wrap", [False, True], ids=["codestream", "jp2"])
def test_jpeg_2000_frame_claiming_16384_squared_is_refused_before_decoding(monkeypatch, wrap):
    """Issue 8: a crafted JPEG 2000 file took 62 s and 3.1 GB; its SIZ is checked first, bare or inside JP2 boxes."""
    codestream, pixels = _j2k_codestream(32)
    honest = _jp2(codestream, 32, 32) if wrap else codestream
    ds = _encapsulated(honest, JPEG2000Lossless, rows=32, columns=32, bits_stored=16, pixel_representation=1)
    np.testing.assert_array_equal(read_dicom(_file_bytes(ds)).pixels[0], pixels)

    lie = _siz_claiming(codestream, 16384, 16384)
    ds.PixelData = encapsulate([_jp2(lie, 32, 32) if wrap else lie])
    data = _file_bytes(ds)
    _must_not_decode(monkeypatch)
    started = time.perf_counter()
    with pytest.raises(DicomError, match=r"declares 16384 x 16384 pixels .* say 32 x 32; refused before decoding"):
        read_dicom(data)
    assert time.perf_counter() - started < 5  # sanity bound only


def test_jpeg_2000_tile_bomb_is_refused(monkeypatch):
    """Millions of 1 x 1 tiles: the standard allows at most 65535; a decoder's per-tile set-up is the bomb."""
    codestream, _ = _j2k_codestream(32)
    lied = bytearray(_siz_claiming(codestream, 4096, 4096))
    lied[24:32] = struct.pack(">II", 1, 1)  # XTsiz, YTsiz
    ds = _encapsulated(bytes(lied), JPEG2000Lossless, rows=4096, columns=4096, bits_stored=16)
    _must_not_decode(monkeypatch)
    with pytest.raises(DicomError, match="16777216 tiles; the JPEG 2000 standard allows at most 65535"):
        read_dicom(ds)


@pytest.mark.parametrize("offset, value, message", [
    (6, 20, "declares 20 bits per sample but Bits Allocated .* is 8"),  # precision above the container
    (11, 3, "too short for 3 component"),  # Nf 3 in a one-component header
    (7, 0, "zero dimension"),  # height 0 (defined later by DNL): refused
], ids=["precision", "components", "dnl"])
def test_jpeg_ls_header_lies_other_than_size(monkeypatch, offset, value, message):
    codestream = bytearray(zlib.decompress(base64.b64decode(_JPEG_LS_512)))
    codestream[offset:offset + (2 if offset == 7 else 1)] = value.to_bytes(2 if offset == 7 else 1, "big")
    ds = _encapsulated(bytes(codestream), JPEGLSLossless, bits_allocated=8, bits_stored=8)
    _must_not_decode(monkeypatch)
    with pytest.raises(DicomError, match=message):
        read_dicom(ds)


def test_jpeg_frame_dimensions_checked_against_the_header(monkeypatch):
    """JPEG (10918) SOFn: the public 12-bit JPGExtended file with its SOF height changed from 1024 to 16384."""
    ds = pydicom.dcmread(public_file("JPGExtended.dcm"))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = frame.find(b"\xff\xc1")
    assert sof > 0 and int.from_bytes(frame[sof + 5:sof + 7], "big") == 1024
    frame[sof + 5:sof + 7] = (16384).to_bytes(2, "big")
    ds.PixelData = encapsulate([bytes(frame)])
    _must_not_decode(monkeypatch)
    with pytest.raises(DicomError, match=r"declares 16384 x 256 pixels .* say 1024 x 256"):
        read_dicom(ds)


def test_jpeg_ls_stream_under_a_jpeg_transfer_syntax_is_refused(monkeypatch):
    ds = _encapsulated(_sof55_claiming(512, 512), JPEGLosslessSV1)
    _must_not_decode(monkeypatch)
    with pytest.raises(DicomError, match=r"is a JPEG-LS \(SOF55\) codestream, which the transfer syntax does not allow"):
        read_dicom(ds)


def _rle_frame(ds: Dataset) -> bytearray:
    return bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))


@pytest.mark.parametrize("lie, message", [
    ("segments", r"has 3 RLE segment\(s\); Bits Allocated 16 with one sample per pixel needs 2"),
    ("offset", r"RLE segment 0 spans bytes 64 to 5120 of a \d+-byte frame \(offsets must increase"),
    ("first_offset", "the first RLE segment starts at byte 60, not 64"),
    ("bits_allocated", r"has 2 RLE segment\(s\); Bits Allocated 8 with one sample per pixel needs 1"),
    ("rows", "too few to decode to 4096 x 16 pixels"),
])
def test_rle_header_checked_against_the_dicom_header(monkeypatch, lie, message):
    ds = synthetic.rle(seed=0, size=16)
    frame = _rle_frame(ds)
    if lie == "segments":
        frame[0:4] = struct.pack("<I", 3)
        frame[12:16] = struct.pack("<I", len(frame) - 1)
    elif lie == "offset":
        frame[8:12] = struct.pack("<I", 10 * len(frame))
    elif lie == "first_offset":
        frame[4:8] = struct.pack("<I", 60)
    elif lie == "bits_allocated":
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    elif lie == "rows":
        ds.Rows = 4096
    ds.PixelData = encapsulate([bytes(frame)])
    _must_not_decode(monkeypatch)
    with pytest.raises(DicomError, match=message):
        read_dicom(ds)


def test_encapsulated_frame_count_checked_before_decoding(monkeypatch):
    ds = pydicom.dcmread(public_file("rtdose_rle.dcm"))
    assert int(ds.NumberOfFrames) == 15
    ds.NumberOfFrames = 16
    _must_not_decode(monkeypatch)
    with pytest.raises(DicomError, match=r"holds at most 15 frame\(s\), the header says 16"):
        read_dicom(ds)


def test_each_frame_of_a_multiframe_object_is_checked(monkeypatch):
    """Only the last frame lies: every frame's header is read, not just the first."""
    ds = pydicom.dcmread(public_file("rtdose_rle.dcm"))
    frames = list(generate_frames(ds.PixelData, number_of_frames=15))
    last = bytearray(frames[-1])
    last[0:4] = struct.pack("<I", 2)  # 32-bit samples need 4 segments
    ds.PixelData = encapsulate(frames[:-1] + [bytes(last)])
    _must_not_decode(monkeypatch)
    with pytest.raises(DicomError, match=r"frame 14 of the RLE Lossless pixel data has 2 RLE segment\(s\)"):
        read_dicom(ds)


def test_extended_offset_table_half_present_is_a_dicom_error():
    """pydicom's decoder raised AttributeError for an Extended Offset Table without its Lengths."""
    ds = synthetic.rle(seed=0, size=16)
    ds.ExtendedOffsetTable = struct.pack("<Q", 0)
    with pytest.raises(DicomError, match="Extended Offset Table .* must both be present"):
        read_dicom(ds)


def _deflated_file(ds: Dataset) -> bytes:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return _file_bytes(ds)


def test_deflate_bomb_is_refused_before_inflating(monkeypatch):
    """pydicom inflates a Deflated Explicit VR Little Endian dataset whole at dcmread; deflate reaches ~1000:1."""
    ds = small_ct()
    ds.add_new(0x00091010, "OB", bytes(4 << 20))  # 4 MiB of zeros: a ~4 KB file once deflated
    data = _deflated_file(ds)
    assert len(data) < 16 << 10
    monkeypatch.setattr("medge.dicom._DEFLATED_HEADER_ALLOWANCE", 1 << 20)  # keep the test small
    with pytest.raises(DicomError, match="Deflated Explicit VR Little Endian and inflates to more than"):
        read_dicom(data, max_pixels=16 * 16)
    # Under the limit the same file reads, from bytes, a path or a stream.
    monkeypatch.setattr("medge.dicom._DEFLATED_HEADER_ALLOWANCE", 8 << 20)
    assert read_dicom(io.BytesIO(data), max_pixels=16 * 16).pixels.shape == (1, 16, 16)


# --------------------------------------------------------------------------- issue 8: privacy


def _corrupt_uid_length(data: bytes, tag: bytes, new_length: int) -> bytes:
    """The file with the explicit-VR UI element ``tag`` claiming ``new_length`` bytes (it swallows what follows)."""
    position = data.index(tag + b"UI")
    return data[:position + 6] + struct.pack("<H", new_length) + data[position + 8:]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def test_corrupted_uid_length_warnings_never_reach_the_logs():
    """Issue 8: a UID whose length swallows the next elements made pydicom warn (UserWarning and its logger)
    with the patient's name and ID in the text; medge run printed both."""
    ds = _with_phi(small_ct())
    data = _corrupt_uid_length(_file_bytes(ds), b"\x08\x00\x16\x00", 400)  # SOP Class UID (0008,0016)
    root, pydicom_logger = logging.getLogger(), logging.getLogger("pydicom")
    on_root, on_pydicom = _Collect(), _Collect()  # pydicom.config.debug() puts a handler on its own logger
    levels = root.level, pydicom_logger.level
    root.addHandler(on_root)
    pydicom_logger.addHandler(on_pydicom)
    root.setLevel(logging.DEBUG)
    pydicom_logger.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                read_dicom(data)
            except DicomError as exc:
                texts = [str(exc)]
            else:
                texts = []
    finally:
        root.removeHandler(on_root)
        pydicom_logger.removeHandler(on_pydicom)
        root.setLevel(levels[0])
        pydicom_logger.setLevel(levels[1])
    texts += [str(w.message) for w in caught] + on_root.messages + on_pydicom.messages
    assert not [t for t in texts if any(value in t for value in PHI)], texts
    assert not caught and not on_pydicom.messages
    # What is left: one fixed record in medge's words, naming only the category.
    medge_records = [m for m in on_root.messages if "pydicom reported" in m]
    assert medge_records and "warning (UserWarning)" in medge_records[0], on_root.messages


def test_a_dicom_error_carries_no_exception_chain():
    """Issue 8: DicomError kept pydicom's exception as __cause__, whose message can hold raw bytes (the name)."""
    ds = _with_phi(small_ct())
    ds.add_new(0x00280010, "LO", "DOE^JOHN")  # Rows holding the patient's name
    with pytest.raises(DicomError) as info:
        read_dicom(ds)
    error = info.value
    assert error.__cause__ is None and error.__context__ is None
    assert "Rows (0028,0010) is not a valid integer" in str(error)
    for data in (_file_bytes(ds)[:-40], b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x00DOE^JOHN"):
        with pytest.raises(DicomError) as info:
            read_dicom(data)
        assert info.value.__cause__ is None and info.value.__context__ is None


@pytest.mark.parametrize("keyword, vr, value", [
    ("PerFrameFunctionalGroupsSequence", "US", 17),
    ("PerFrameFunctionalGroupsSequence", "LO", "DOE^JOHN"),
    ("PerFrameFunctionalGroupsSequence", "OB", b"\x01\x02\x03"),
    ("SharedFunctionalGroupsSequence", "DS", "1.5"),
])
def test_functional_groups_with_the_wrong_vr_are_a_dicom_error(keyword, vr, value):
    """Issue 8: a Per-frame Functional Groups Sequence with the wrong VR escaped read_dicom as TypeError."""
    ds = _with_phi(synthetic.enhanced_multiframe(seed=0, size=8, frames=3))
    del ds[keyword]
    ds.add_new(pydicom.datadict.tag_for_keyword(keyword), vr, value)
    for source in (ds, _file_bytes(ds)):
        with pytest.raises(DicomError, match="is not a sequence") as info:
            read_dicom(source)
        assert not any(v in str(info.value) for v in PHI)


def test_shared_functional_groups_alone_give_one_transform_without_a_loop_over_frames(monkeypatch):
    """A header may claim millions of tiny frames: without per-frame groups the transform is built once."""
    import medge.dicom

    frames = 200_000
    ds = make_dataset(np.zeros((frames, 1, 1), np.uint8))
    shared = Dataset()
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -5
    ds.SharedFunctionalGroupsSequence = [shared]
    calls = []
    original = medge.dicom._make_transform
    monkeypatch.setattr(medge.dicom, "_make_transform", lambda *a: calls.append(1) or original(*a))
    semantics = read_dicom(ds).semantics
    assert (semantics.rescale_slope, semantics.rescale_intercept, len(semantics.frames)) == (2.0, -5.0, 1)
    assert len(calls) == 1


# --------------------------------------------------------------------------- issue 8: sources and alignment


def test_bytes_at_odd_addresses_and_any_memoryview_layout_read_the_same():
    ds = synthetic.ct_slice(seed=3, size=16, lesion=False)
    data = _file_bytes(ds)
    expected = read_dicom(data).pixels
    padded = np.frombuffer(b"\0" + data, np.uint8)
    interleaved = np.zeros(2 * len(data), np.uint8)
    interleaved[::2] = np.frombuffer(data, np.uint8)
    even = data + b"\0" * (len(data) % 2)
    sources = [
        memoryview(b"\0" + data)[1:],  # odd address
        memoryview(padded)[1:],  # numpy-backed view at an odd address
        memoryview(interleaved)[::2],  # strided: not contiguous
        memoryview(np.frombuffer(even, "<u2")),  # two-byte items
        bytearray(data),
    ]
    for source in sources:
        image = read_dicom(source)
        np.testing.assert_array_equal(image.pixels[:, :, :], expected)
        assert image.pixels.flags.aligned


def test_a_released_memoryview_is_a_dicom_error():
    view = memoryview(b"DICM")
    view.release()
    with pytest.raises(DicomError, match="memoryview"):
        read_dicom(view)


def test_pixel_data_given_as_an_unaligned_memoryview_comes_out_aligned_and_unmodified():
    cr = synthetic.monochrome1_cr(seed=0, size=16)  # junk in the high bits: reading masks them
    stored = bytes(cr.PixelData)
    backing = bytearray(b"\0" + stored)
    cr.PixelData = memoryview(backing)[1:]
    image = read_dicom(cr)
    assert image.pixels.flags.aligned and int(image.pixels.max()) < 4096
    assert bytes(backing[1:]) == stored  # masking happened on a copy, not in the caller's buffer


def test_pixel_data_that_is_not_bytes_is_a_dicom_error():
    ds = small_ct()
    ds.PixelData = bytearray(ds.PixelData)  # pydicom stores a bytearray as a list of numbers
    with pytest.raises(DicomError, match="does not hold bytes"):
        read_dicom(ds)


@pytest.mark.parametrize("source", [
    np.zeros((4, 4), np.uint16),
    Image.from_array(np.zeros((4, 4), np.uint16)),
], ids=["array", "Image"])
def test_an_image_or_array_is_refused_with_a_pointer_to_preprocess(source):
    with pytest.raises(DicomError, match="needs no reading"):
        read_dicom(source)


@pytest.mark.parametrize("kwargs", [
    {"bits_stored": "12"}, {"bits_stored": 3.5}, {"rescale_slope": "x"}, {"windows": [(1,)]}, {"windows": 5},
    {"rescale_slope": 10**400},
])
def test_image_from_array_with_wrong_argument_types_is_a_dicom_error(kwargs):
    with pytest.raises(DicomError):
        Image.from_array(np.zeros((2, 2), np.int16), **kwargs)


@pytest.mark.parametrize("semantics", [
    None, "MONOCHROME2", PixelSemantics(rows="2", columns=2), PixelSemantics(rows=2, columns=2, frames=[None]),
    PixelSemantics(rows=2, columns=2, frames=(FrameTransform(rescale_slope="1"),)),
    PixelSemantics(rows=2, columns=2, frames=(FrameTransform(windows=((40, 400),)),)),
])
def test_image_with_malformed_semantics_is_a_dicom_error(semantics):
    with pytest.raises(DicomError):
        Image(np.zeros((1, 2, 2), np.uint16), semantics)


def test_unaligned_image_pixels_are_copied_aligned():
    raw = np.frombuffer(memoryview(bytes(9))[1:], np.uint16).reshape(1, 2, 2)
    assert not raw.flags.aligned
    assert Image(raw, PixelSemantics(rows=2, columns=2)).pixels.flags.aligned


# --------------------------------------------------------------------------- issue 8: the quiet context itself


def test_quiet_pydicom_is_per_thread_and_restores_global_state():
    """Reads in several threads at once swallow their own pydicom warnings only; another thread's warning still
    reaches the caller's record, and the warnings filters / hook are as before once every read is done."""
    filters_before, hook_before = list(warnings.filters), warnings.showwarning
    data = _corrupt_uid_length(_file_bytes(_with_phi(small_ct())), b"\x08\x00\x16\x00", 400)
    start = threading.Barrier(5)
    errors = []

    def read_many():
        start.wait()
        for _ in range(20):
            try:
                read_dicom(data)
            except DicomError:
                pass
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=read_many) for _ in range(4)]
        for thread in threads:
            thread.start()
        start.wait()
        for _ in range(50):
            warnings.warn("an unrelated warning from the main thread", RuntimeWarning)
        for thread in threads:
            thread.join()
        assert not errors
        texts = [str(w.message) for w in caught]
        assert texts.count("an unrelated warning from the main thread") == 50
        assert not [t for t in texts if any(value in t for value in PHI)]
    assert warnings.filters == filters_before and warnings.showwarning is hook_before
    assert not _pydicom_quiet._active_threads and _pydicom_quiet._depth == 0
    assert not logging.getLogger("pydicom").filters
