"""read_dicom's fast reader against its full (pydicom) path: identical results, or it steps aside.

The fast reader (medge.dicom._fast_read + medge._C.scan_dicom) handles uncompressed
little-endian files without functional groups and hands everything else to the full
path. For every input here both paths run and must agree exactly: the same pixels
(bytes, dtype, shape, read-only flag), PixelSemantics, Acquisition and SOP Instance
UID, or the same error class and message. Inputs: every file in pydicom's wheel
(paths, with and without force, and as bytes / bytearray / memoryview / mmap), hand-
encoded variants of what the fast reader converts or refuses (each also asserts which
reader answered, so the tests cannot pass by always falling back), and random element
streams for the native scanner (hypothesis). tests/test_fuzz_dicom.py adds mutated files.

Also here: reading ahead in reader threads (the Batcher, ``medge run``), with the same
results as reading in line.
"""

from __future__ import annotations

import mmap
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pydicom = pytest.importorskip("pydicom")

import medge.dicom as dicom  # noqa: E402
from medge.errors import MedgeError  # noqa: E402

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SCAN_OK = 0

pytestmark = pytest.mark.skipif(dicom._scanner() is None, reason="this build of medge._C has no DICOM scanner")


# --------------------------------------------------------------------------- both readers


def _outcome(read):
    try:
        image = read()
    except MedgeError as exc:
        return ("error", type(exc).__name__, str(exc))
    pixels = image.pixels
    return ("image", pixels.dtype.str, pixels.shape, pixels.tobytes(), bool(pixels.flags.writeable),
            bool(pixels.flags.aligned), image.semantics, image.acquisition, image.sop_instance_uid)


def read_both(monkeypatch, make_source, **kwargs):
    """(full path outcome, fast-enabled outcome, whether the fast reader answered)."""
    answered = []
    real = dicom._fast_read

    def spy(source, max_pixels):
        image = real(source, max_pixels)
        answered.append(image is not None)
        return image

    with monkeypatch.context() as patch:
        patch.setattr(dicom, "_FAST_READER", False)
        full = _outcome(lambda: dicom.read_dicom(make_source(), **kwargs))
    with monkeypatch.context() as patch:
        patch.setattr(dicom, "_FAST_READER", True)
        patch.setattr(dicom, "_fast_read", spy)
        fast = _outcome(lambda: dicom.read_dicom(make_source(), **kwargs))
    return full, fast, bool(answered and answered[-1])


def assert_same(full, fast, what):
    assert full[:2] == fast[:2], f"{what}: full path {full[:3]}, fast reader {fast[:3]}"
    assert full == fast, f"{what}: outcomes differ"


# --------------------------------------------------------------------------- pydicom's test files


def _pydicom_test_files():
    import pydicom.data

    folder = pathlib.Path(pydicom.data.__file__).parent / "test_files"
    return sorted(path for path in folder.rglob("*") if path.is_file())


def test_every_pydicom_test_file_reads_identically_from_every_source(monkeypatch, tmp_path):
    files = _pydicom_test_files()
    assert len(files) > 100
    fast_files = []
    for path in files:
        for force in (False, True):
            full, fast, answered = read_both(monkeypatch, lambda: str(path), force=force)
            assert_same(full, fast, f"{path.name} (force={force})")
            if answered and not force:
                fast_files.append(path)
    # Not vacuous: the uncompressed little-endian files (CT_small, MR_small, MR_small_implicit,
    # rtdose, examples_overlay...) are read by the fast reader.
    names = {path.name for path in fast_files}
    assert len(fast_files) >= 30 and {"CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm"} <= names, names
    for path in fast_files:
        data = path.read_bytes()
        sources = {"bytes": lambda: data, "bytearray": lambda: bytearray(data),
                   "memoryview": lambda: memoryview(data), "path-like": lambda: path}
        for kind, make in sources.items():
            full, fast, answered = read_both(monkeypatch, make)
            assert answered, f"{path.name} as {kind}: the fast reader stepped aside"
            assert_same(full, fast, f"{path.name} as {kind}")
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            full, fast, answered = read_both(monkeypatch, lambda: mapped)
            assert answered and full == fast, f"{path.name} as mmap"


# --------------------------------------------------------------------------- hand-encoded files


def _text(value: str, pad: bytes = b" ") -> bytes:
    raw = value.encode("latin-1")
    return raw + pad if len(raw) % 2 else raw


def _uid(value: str) -> bytes:
    return _text(value, b"\x00")


def element(tag: int, vr: bytes, value: bytes, *, implicit: bool = False, length: int | None = None) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    size = len(value) if length is None else length
    if implicit:
        return head + struct.pack("<I", size) + value
    if vr in _LONG_VRS:
        return head + vr + b"\x00\x00" + struct.pack("<I", size) + value
    return head + vr + struct.pack("<H", size) + value


def item(body: bytes, *, undefined: bool = True) -> bytes:
    if undefined:
        return b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + body + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    return b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body


def sequence(tag: int, items: list, *, implicit: bool = False, undefined: bool = True, vr: bytes = b"SQ") -> bytes:
    body = b"".join(items)
    if undefined:
        return element(tag, vr, body + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", implicit=implicit, length=0xFFFFFFFF)
    return element(tag, vr, body, implicit=implicit)


def part10(dataset: bytes, *, syntax: str = EXPLICIT, meta: bytes | None = None) -> bytes:
    if meta is None:
        meta = (element(0x00020001, b"OB", b"\x00\x01") + element(0x00020002, b"UI", _uid(CT_STORAGE))
                + element(0x00020003, b"UI", _uid("1.2.826.0.1.3680043.8.498.2"))
                + element(0x00020010, b"UI", _uid(syntax)) + element(0x00020012, b"UI", _uid("1.2.3.4")))
        meta = element(0x00020000, b"UL", struct.pack("<I", len(meta))) + meta
    return b"\x00" * 128 + b"DICM" + meta + dataset


PIXELS = (np.arange(64, dtype=np.int32).reshape(8, 8) * 37 - 900).astype(np.int16)


def ct(changes: dict | None = None, *, implicit: bool = False, syntax: str | None = None, pixels=PIXELS,
       extra: bytes = b"", trailing: bytes = b"") -> bytes:
    """A small CT file; ``changes`` maps tag -> (VR, value bytes), or None to leave the element out."""
    values = {
        0x00080005: (b"CS", _text("ISO_IR 100")),
        0x00080016: (b"UI", _uid(CT_STORAGE)),
        0x00080018: (b"UI", _uid("1.2.826.0.1.3680043.8.498.2")),
        0x00080060: (b"CS", _text("CT")),
        0x00100010: (b"PN", _text("PHIZQ^PHIZQ")),
        0x00180015: (b"CS", _text("CHEST")),
        0x00280002: (b"US", struct.pack("<H", 1)),
        0x00280004: (b"CS", _text("MONOCHROME2")),
        0x00280010: (b"US", struct.pack("<H", pixels.shape[-2])),
        0x00280011: (b"US", struct.pack("<H", pixels.shape[-1])),
        0x00280030: (b"DS", _text("0.5\\0.5")),
        0x00280100: (b"US", struct.pack("<H", pixels.dtype.itemsize * 8)),
        0x00280101: (b"US", struct.pack("<H", pixels.dtype.itemsize * 8)),
        0x00280102: (b"US", struct.pack("<H", pixels.dtype.itemsize * 8 - 1)),
        0x00280103: (b"US", struct.pack("<H", 1 if pixels.dtype.kind == "i" else 0)),
        0x00281050: (b"DS", _text("40\\-600")),
        0x00281051: (b"DS", _text("400\\1500")),
        0x00281052: (b"DS", _text("-1024")),
        0x00281053: (b"DS", _text("1")),
        0x00281055: (b"LO", _text("SOFT\\LUNG")),
    }
    data = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    values[0x7FE00010] = (b"OW" if pixels.dtype.itemsize > 1 else b"OB", data + b"\x00" * (len(data) % 2))
    for tag, change in (changes or {}).items():
        if change is None:
            values.pop(tag, None)
        else:
            values[tag] = change

    def encode(tag, vr, value):
        return value if vr == b"RAW" else element(tag, vr, value, implicit=implicit)  # RAW: encoded already

    body = b"".join(encode(tag, vr, value) for tag, (vr, value) in sorted(values.items()) if tag < 0x7FE00010)
    body += extra + encode(0x7FE00010, *values[0x7FE00010]) + trailing
    return part10(body, syntax=syntax or (IMPLICIT if implicit else EXPLICIT))


def _frames(count: int) -> np.ndarray:
    return np.stack([PIXELS + i for i in range(count)])


_REFERENCED = sequence(0x00081140, [item(element(0x00081150, b"UI", _uid(CT_STORAGE))
                                         + sequence(0x00081155, [item(b"")]))])
_REFERENCED_IMPLICIT = sequence(0x00081140, [item(element(0x00081150, b"UI", _uid(CT_STORAGE), implicit=True)
                                                  + sequence(0x00089215, [item(b"")], implicit=True), undefined=False)],
                                implicit=True)
_PRIVATE_IMPLICIT = (element(0x00090010, b"LO", _text("MEDGE TEST"), implicit=True)
                     + sequence(0x00091001, [item(element(0x00091001, b"LO", _text("X"), implicit=True))],
                                implicit=True))

# (name, file bytes, which reader must answer: "fast" or "full"). The full path's outcome
# (an image or an error) is what both must give.
VARIANTS = [
    ("explicit", ct(), "fast"),
    ("implicit", ct(implicit=True), "fast"),
    ("classic multi-frame", ct({0x00280008: (b"IS", _text("3"))}, pixels=_frames(3)), "fast"),
    ("number of frames with spaces", ct({0x00280008: (b"IS", _text(" 2 "))}, pixels=_frames(2)), "fast"),
    ("number of frames empty", ct({0x00280008: (b"IS", b"")}), "fast"),
    ("number of frames 1.0", ct({0x00280008: (b"IS", _text("1.0"))}), "full"),
    ("number of frames zero", ct({0x00280008: (b"IS", _text("0"))}), "full"),
    ("number of frames too many", ct({0x00280008: (b"IS", _text("2"))}), "full"),
    ("bits stored 12 unsigned, junk high bits",
     ct({0x00280101: (b"US", struct.pack("<H", 12)), 0x00280103: (b"US", struct.pack("<H", 0))},
        pixels=(PIXELS.astype(np.int32) & 0xFFFF).astype(np.uint16) | np.uint16(0xF000)), "fast"),
    ("bits stored 12 signed", ct({0x00280101: (b"US", struct.pack("<H", 12))}), "fast"),
    ("int8", ct(pixels=(PIXELS // 8).astype(np.int8)), "fast"),
    ("uint8", ct({0x00280103: (b"US", struct.pack("<H", 0))}, pixels=(PIXELS & 0xFF).astype(np.uint8)), "fast"),
    ("uint32", ct(pixels=(PIXELS.astype(np.int64) + 5000).astype(np.uint32)), "fast"),
    ("uint32 above int32", ct(pixels=np.full((8, 8), 0xFFFFFFF0, np.uint32)), "full"),
    ("int32", ct(pixels=PIXELS.astype(np.int32) * 1000), "fast"),
    ("MONOCHROME1", ct({0x00280004: (b"CS", _text("MONOCHROME1"))}), "fast"),
    ("photometric with NUL padding", ct({0x00280004: (b"CS", b"MONOCHROME2\x00")}), "fast"),
    ("RGB", ct({0x00280004: (b"CS", _text("RGB"))}), "full"),
    ("two samples", ct({0x00280002: (b"US", struct.pack("<H", 2))}), "full"),
    ("rows as two values", ct({0x00280010: (b"US", struct.pack("<HH", 8, 8))}), "full"),
    ("rows with VR SS", ct({0x00280010: (b"SS", struct.pack("<H", 8))}), "full"),
    ("bits allocated 12", ct({0x00280100: (b"US", struct.pack("<H", 12))}), "full"),
    ("bits stored 0", ct({0x00280101: (b"US", struct.pack("<H", 0))}), "full"),
    ("pixel representation 2", ct({0x00280103: (b"US", struct.pack("<H", 2))}), "full"),
    ("no rescale", ct({0x00281052: None, 0x00281053: None}), "fast"),
    ("slope only", ct({0x00281052: None, 0x00281053: (b"DS", _text("2.5"))}), "fast"),
    ("intercept only", ct({0x00281053: None}), "fast"),
    ("empty rescale", ct({0x00281052: (b"DS", b""), 0x00281053: (b"DS", b"  ")}), "fast"),
    ("decimal strings in every form",
     ct({0x00281050: (b"DS", _text(" 40\\-6E2")), 0x00281051: (b"DS", _text("4e2 \\+1500.")),
         0x00281052: (b"DS", _text("-1024.")), 0x00281053: (b"DS", _text(".5")),
         0x00280030: (b"DS", b"0.5\\0.50\x00")}), "fast"),
    ("decimal string with underscore", ct({0x00281052: (b"DS", _text("-1_024"))}), "full"),
    ("decimal string inf", ct({0x00281053: (b"DS", _text("inf"))}), "full"),
    ("slope zero", ct({0x00281053: (b"DS", _text("0"))}), "full"),
    ("slope with two values", ct({0x00281053: (b"DS", _text("1\\2"))}), "full"),
    ("window width below 1 (LINEAR)", ct({0x00281051: (b"DS", _text("0.5\\1500"))}), "full"),
    ("LINEAR_EXACT", ct({0x00281056: (b"CS", _text("LINEAR_EXACT")), 0x00281051: (b"DS", _text("0.5\\1"))}), "fast"),
    ("SIGMOID", ct({0x00281056: (b"CS", _text("SIGMOID"))}), "fast"),
    ("unknown VOI function", ct({0x00281056: (b"CS", _text("LOG"))}), "full"),
    ("unknown VOI function without windows",
     ct({0x00281056: (b"CS", _text("LOG")), 0x00281050: None, 0x00281051: None, 0x00281055: None}), "fast"),
    ("two VOI functions", ct({0x00281056: (b"CS", _text("LINEAR\\SIGMOID"))}), "full"),
    ("centers without widths", ct({0x00281051: None}), "full"),
    ("window count mismatch", ct({0x00281051: (b"DS", _text("400"))}), "full"),
    ("explanation count mismatch", ct({0x00281055: (b"LO", _text("SOFT"))}), "fast"),
    ("explanation empty", ct({0x00281055: (b"LO", b"  ")}), "fast"),
    ("explanation with an empty value", ct({0x00281055: (b"LO", _text("SOFT\\ "))}), "fast"),
    ("explanation in Latin-1", ct({0x00281055: (b"LO", _text("WEICH\\LUNGE\u00e9"))}), "full"),
    ("character set UTF-8", ct({0x00080005: (b"CS", _text("ISO_IR 192"))}), "fast"),
    ("character sets with extensions", ct({0x00080005: (b"CS", _text("\\ISO 2022 IR 100"))}), "fast"),
    ("character set unknown", ct({0x00080005: (b"CS", _text("KLINGON"))}), "full"),
    ("character set with VR LO", ct({0x00080005: (b"LO", _text("ISO_IR 100"))}), "full"),
    ("no character set", ct({0x00080005: None}), "fast"),
    ("modality in lower case", ct({0x00080060: (b"CS", _text(" ct"))}), "fast"),
    ("modality non-standard", ct({0x00080060: (b"CS", _text("PHIZQ"))}), "fast"),
    ("modality sharp s", ct({0x00080060: (b"CS", b"O\xdf")}), "fast"),
    ("body part with two values", ct({0x00180015: (b"CS", _text("CHEST\\ABDOMEN"))}), "fast"),
    ("pixel spacing with three values, imager spacing",
     ct({0x00280030: (b"DS", _text("1\\1\\1")), 0x00181164: (b"DS", _text("0.2\\0.3"))}), "fast"),
    ("pixel spacing negative", ct({0x00280030: (b"DS", _text("-1\\1"))}), "fast"),
    ("pixel spacing garbage", ct({0x00280030: (b"DS", _text("PHIZQ"))}), "full"),
    ("SOP Instance UID invalid", ct({0x00080018: (b"UI", _uid("1.2.PHIZQ"))}), "fast"),
    ("SOP Instance UID with two values", ct({0x00080018: (b"UI", _uid("1.2\\1.3"))}), "fast"),
    ("SOP Instance UID absent", ct({0x00080018: None}), "fast"),
    ("pixel data longer than needed", ct(pixels=np.zeros((9, 8), np.int16),
                                         changes={0x00280010: (b"US", struct.pack("<H", 8))}), "fast"),
    ("pixel data truncated", ct({0x00280010: (b"US", struct.pack("<H", 9))}), "full"),
    ("pixel data empty", ct({0x7FE00010: (b"OW", b"")}), "full"),
    ("pixel data VR US", ct({0x7FE00010: (b"US", PIXELS.tobytes()[:64])}), "full"),
    ("no pixel data", ct({0x7FE00010: (b"OW", b"")})[:-8], "full"),
    ("float pixel data too", ct(extra=element(0x7FE00008, b"OF", b"\x00" * 4)), "full"),
    ("modality LUT sequence", ct(extra=sequence(0x00283000, [item(b"")])), "full"),
    ("VOI LUT sequence", ct(extra=sequence(0x00283010, [item(b"")], undefined=False)), "full"),
    ("shared functional groups", ct(extra=sequence(0x52009229, [item(b"")])), "full"),
    ("undefined-length sequences, nested (explicit)", ct({0x00081140: (b"RAW", _REFERENCED)}), "fast"),
    ("undefined-length sequences, nested (implicit)",
     ct({0x00081140: (b"RAW", _REFERENCED_IMPLICIT)}, implicit=True), "fast"),
    ("private undefined-length sequence (implicit)", ct({0x00090010: (b"RAW", _PRIVATE_IMPLICIT)}, implicit=True),
     "fast"),
    ("private undefined-length value starting with a delimiter (implicit)",
     ct({0x00090010: (b"RAW", element(0x00090010, b"LO", _text("MEDGE TEST"), implicit=True)
                      + sequence(0x00091001, [], implicit=True))}, implicit=True), "full"),
    ("undefined length on a text element (implicit)",
     ct({0x00100010: (b"RAW", sequence(0x00100010, [item(b"")], implicit=True))}, implicit=True), "full"),
    ("undefined-length UN (explicit)", ct({0x00081140: (b"RAW", sequence(0x00081140, [item(b"")], vr=b"UN"))}),
     "full"),
    ("character set inside a sequence item",
     ct({0x00081140: (b"RAW", sequence(0x00081140, [item(element(0x00080005, b"CS", _text("ISO_IR 100")))]))}),
     "full"),
    ("sequence item holding a stray delimiter",
     ct({0x00081140: (b"RAW", sequence(0x00081140, [item(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")]))}), "full"),
    ("sequence with a non-item", ct({0x00081140: (b"RAW", sequence(0x00081140, [b"\x08\x00\x50\x11"]))}), "full"),
    ("defined-length items in an undefined-length sequence",
     ct({0x00081140: (b"RAW", sequence(0x00081140, [item(element(0x00081150, b"UI", _uid(CT_STORAGE)),
                                                          undefined=False)] * 3))}), "fast"),
    ("defined-length item cut inside an element",
     ct({0x00081140: (b"RAW", sequence(0x00081140, [b"\xfe\xff\x00\xe0\x06\x00\x00\x00"
                                                    + element(0x00081150, b"UI", _uid(CT_STORAGE))]))}), "full"),
    ("defined-length sequence holding garbage", ct({0x00081140: (b"SQ", b"\x01\x02\x03\x04PHIZQPHIZQ")}), "fast"),
    ("group length elements", ct({0x00080000: (b"UL", struct.pack("<I", 0)),
                                  0x00280000: (b"UL", struct.pack("<I", 0))}), "fast"),
    ("trailing padding after the pixel data", ct(trailing=element(0xFFFCFFFC, b"OB", b"\x00" * 6)), "fast"),
    ("odd-length private element: pixels at an odd address",
     ct(extra=element(0x00290010, b"LO", b"ABC")), "fast"),
    ("trailing bytes", ct(trailing=b"\x00\x00\x00"), "full"),
    ("meta without group length", part10(ct()[ct().index(b"\x08\x00\x05\x00"):], meta=(
        element(0x00020001, b"OB", b"\x00\x01") + element(0x00020010, b"UI", _uid(EXPLICIT)))), "fast"),
    ("transfer syntax padded with a space", part10(ct()[ct().index(b"\x08\x00\x05\x00"):], meta=(
        element(0x00020001, b"OB", b"\x00\x01") + element(0x00020010, b"UI", _text(EXPLICIT)))), "fast"),
    ("transfer syntax with a leading space", part10(ct()[ct().index(b"\x08\x00\x05\x00"):], meta=(
        element(0x00020001, b"OB", b"\x00\x01") + element(0x00020010, b"UI", _text(" " + EXPLICIT)))), "full"),
    ("big-endian transfer syntax", ct(syntax=BIG_ENDIAN), "full"),
    ("deflated transfer syntax", ct(syntax=DEFLATED), "full"),
    ("explicit data set labelled implicit", ct(syntax=IMPLICIT), "full"),
    ("implicit data set labelled explicit", ct(implicit=True, syntax=EXPLICIT), "full"),
    ("no DICM prefix", ct()[132:], "full"),
    ("empty", b"", "full"),
]


@pytest.mark.parametrize("name, data, reader", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_hand_encoded_variant_reads_identically(monkeypatch, name, data, reader):
    full, fast, answered = read_both(monkeypatch, lambda: data)
    assert_same(full, fast, name)
    assert answered == (reader == "fast"), f"{name}: expected the {reader} reader to answer ({full[:3]})"
    if reader == "fast":
        assert full[0] == "image", full[:3]


def test_pixel_limit_and_force_give_the_same_answers(monkeypatch):
    data = ct(pixels=_frames(4), changes={0x00280008: (b"IS", _text("4"))})
    for max_pixels in (255, 256, 257):
        full, fast, answered = read_both(monkeypatch, lambda: data, max_pixels=max_pixels)
        assert_same(full, fast, f"max_pixels={max_pixels}")
        assert answered == (max_pixels >= 256)
    full, fast, answered = read_both(monkeypatch, lambda: data, force=True)
    assert answered and full == fast


def test_memory_sources(monkeypatch, tmp_path):
    data = ct()
    shifted = bytearray(b"\x00" + data)
    path = tmp_path / "ct.dcm"
    path.write_bytes(data)
    cases = {
        "memoryview at an odd offset": lambda: memoryview(shifted)[1:],
        "read-only memoryview": lambda: memoryview(data).toreadonly(),
        "memoryview of int16 items": lambda: memoryview(np.frombuffer(data[:-(len(data) % 2) or None], np.int16)),
        "strided memoryview": lambda: memoryview(bytearray(data) * 2)[::2],
    }
    for name, make in cases.items():
        full, fast, _ = read_both(monkeypatch, make)
        assert_same(full, fast, name)
    # The caller's mutable buffer may change after the read: the Image does not.
    buffer = bytearray(data)
    image = dicom.read_dicom(buffer)
    before = image.pixels.copy()
    buffer[-PIXELS.nbytes:] = b"\xff" * PIXELS.nbytes
    assert np.array_equal(image.pixels, before) and not image.pixels.flags.writeable
    # A memory-mapped file, wherever its position; a closed one is a DicomError either way.
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        mapped.seek(100)
        full, fast, answered = read_both(monkeypatch, lambda: mapped)
        assert answered and full == fast and full[0] == "image"
    full, fast, _ = read_both(monkeypatch, lambda: mapped)
    assert full == fast and full[1] == "DicomError"
    released = memoryview(data)
    released.release()
    full, fast, _ = read_both(monkeypatch, lambda: released)
    assert full == fast and full[1] == "DicomError"


def test_missing_file_and_folder_give_the_full_paths_errors(monkeypatch, tmp_path):
    for source in (tmp_path / "absent.dcm", tmp_path, str(tmp_path) + "\x00"):
        full, fast, answered = read_both(monkeypatch, lambda: source)
        assert not answered and full == fast and full[1] == "DicomError"


def test_a_path_read_keeps_no_header_bytes_alive(tmp_path):
    path = tmp_path / "ct.dcm"
    path.write_bytes(ct())
    image = dicom.read_dicom(path)
    owner = image.pixels
    while owner.base is not None and isinstance(owner.base, np.ndarray):
        owner = owner.base
    assert owner.nbytes == path.stat().st_size  # the file's buffer: pixels viewed in place
    assert b"PHIZQ" not in owner.tobytes() and b"DICM" not in owner.tobytes()
    assert np.array_equal(image.pixels[0], PIXELS)


def test_header_cache_serves_a_series_and_stays_bounded(monkeypatch):
    monkeypatch.setattr(dicom, "_FAST_HEADERS", {})
    monkeypatch.setattr(dicom, "_FAST_HEADERS_MAX", 4)
    images = [dicom.read_dicom(ct({0x00080018: (b"UI", _uid(f"1.2.3.{i}"))}, pixels=PIXELS + i))
              for i in range(10)]
    assert [image.sop_instance_uid for image in images] == [f"1.2.3.{i}" for i in range(10)]
    assert all(image.semantics is images[0].semantics for image in images)  # one header, shared (frozen)
    assert all(np.array_equal(image.pixels[0], PIXELS + i) for i, image in enumerate(images))
    for i in range(10):
        dicom.read_dicom(ct({0x00281052: (b"DS", _text(str(-1000 - i)))}))
    assert len(dicom._FAST_HEADERS) <= 4


def test_non_default_pydicom_settings_send_every_file_to_pydicom(monkeypatch):
    from pydicom import config

    data = ct({0x00281052: (b"DS", _text("-1024.000000000001"))})  # 18 characters: invalid DS
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    full, fast, answered = read_both(monkeypatch, lambda: data)
    assert not answered and full == fast
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.WARN)
    monkeypatch.setattr(config, "use_DS_decimal", True)
    full, fast, answered = read_both(monkeypatch, lambda: data)
    assert not answered and full == fast


def test_environment_variable_turns_the_fast_reader_off():
    code = "import medge.dicom as d; print(d._FAST_READER)"
    for value, expected in (("pydicom", "False"), ("", "True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "MEDGE_DICOM_READER": value})
        assert out.stdout.strip() == expected


# --------------------------------------------------------------------------- the native scanner itself


def scan(data) -> tuple:
    return dicom._scanner()(data, dicom._FAST_SPEC)


def test_scanner_statuses():
    assert scan(ct())[0] == _SCAN_OK
    deep = b""
    for _ in range(40):
        deep = sequence(0x00081140, [item(deep)])
    assert scan(part10(deep + ct()[ct().index(b"\x08\x00\x05\x00"):]))[:2] == (6, "sequences nested too deeply")
    swapped = ct().replace(b"\x28\x00\x11\x00US", b"\x28\x00\x10\x00US", 1)  # Columns written as a second Rows
    assert scan(swapped)[0] == 8
    assert scan(ct({0x00280010: (b"SS", struct.pack("<H", 8))}))[0] == 12
    assert scan(ct(extra=sequence(0x52009230, [])))[0] == 11
    assert scan(ct()[:-1])[0] == 5
    huge = ct().replace(b"\x10\x00OW\x00\x00" + struct.pack("<I", PIXELS.nbytes),
                        b"\x10\x00OW\x00\x00" + struct.pack("<I", 0xFFFFFFFE))
    assert scan(huge)[0] == 5
    assert scan(ct(syntax=BIG_ENDIAN))[0] == 3 and scan(b"")[0] == 1
    status, reason, at, implicit, values, offset, length, undefined = scan(ct(implicit=True))
    assert status == 0 and implicit and length == PIXELS.nbytes and undefined == []
    assert values[dicom._I_ROWS] == struct.pack("<H", 8) and values[dicom._I_MODALITY] == b"CT"


def test_scanner_refuses_bad_arguments():
    with pytest.raises(BufferError):
        dicom._scanner()(memoryview(bytearray(ct()) * 2)[::2], dicom._FAST_SPEC)
    with pytest.raises(ValueError):
        dicom._scanner()(ct(), dicom._FAST_SPEC[8:16] + dicom._FAST_SPEC[:8])
    with pytest.raises(ValueError):
        dicom._scanner()(ct(), b"\x00" * 7)
    with pytest.raises(TypeError):
        dicom._scanner()(None, dicom._FAST_SPEC)


_TAGS = st.sampled_from([0x00080005, 0x00080018, 0x00080060, 0x00081140, 0x00091001, 0x00280002, 0x00280004,
                         0x00280008, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280103, 0x00281050,
                         0x00281051, 0x00281052, 0x00281053, 0x00283000, 0x52009229, 0x7FE00010, 0xFFFEE000,
                         0xFFFEE00D, 0xFFFEE0DD, 0xFFFCFFFC])
_VR_CODES = st.sampled_from([b"US", b"SS", b"CS", b"DS", b"IS", b"UI", b"LO", b"OB", b"OW", b"SQ", b"UN", b"UT",
                             b"XX", b"\x00\x00"])
_VALUES = st.sampled_from([b"", b"\x08\x00", b"\x01\x00", b"MONOCHROME2 ", b"40\\400", b"1.2.3\x00", b"PHIZQ ",
                           b"\x10\x00\x00\x00", b"\xfe\xff\x00\xe0\xff\xff\xff\xff",
                           b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"])


@st.composite
def element_streams(draw):
    """Element headers with arbitrary tags, VRs, values and length fields (undefined ones too)."""
    implicit = draw(st.booleans())
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        tag, vr, value = draw(_TAGS), draw(_VR_CODES), draw(_VALUES)
        length = draw(st.sampled_from([None, None, None, 0xFFFFFFFF, 0, 1, 0xFFFFFFFE]))
        try:
            parts.append(element(tag, vr, value, implicit=implicit, length=length))
        except struct.error:
            parts.append(element(tag, vr, value, implicit=implicit))
    if draw(st.booleans()):
        parts.append(element(0x7FE00010, b"OW", PIXELS.tobytes(), implicit=implicit))
    body = b"".join(parts)
    cut = draw(st.integers(0, len(body)))
    if draw(st.booleans()):
        body = body[:cut]
    return part10(body, syntax=IMPLICIT if implicit else EXPLICIT)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(element_streams())
def test_random_element_streams_scan_safely_and_read_identically(data):
    status = scan(data)[0]
    assert isinstance(status, int) and 0 <= status <= 12
    with pytest.MonkeyPatch.context() as monkeypatch:
        full, fast, _ = read_both(monkeypatch, lambda: data)
    assert_same(full, fast, "random element stream")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 1))
def test_random_bytes_after_the_file_meta_scan_safely_and_read_identically(tail, implicit):
    data = part10(tail, syntax=IMPLICIT if implicit else EXPLICIT)
    scan(data)
    with pytest.MonkeyPatch.context() as monkeypatch:
        full, fast, _ = read_both(monkeypatch, lambda: data)
    assert_same(full, fast, "random bytes")


# --------------------------------------------------------------------------- reading ahead (Batcher, medge run)


class _RecordingModel:
    """A model that records what it gets; ``gate`` (an Event) holds each batch until set."""

    max_batch = 2

    def __init__(self, gate=None) -> None:
        self.seen: list = []
        self.gate = gate

    def predict_each(self, items, return_exceptions=True):
        if self.gate is not None:
            assert self.gate.wait(30)
        self.seen.append(list(items))
        return [[(type(item).__name__, getattr(item, "sop_instance_uid", None))] for item in items]


def _ct_files(folder: pathlib.Path, count: int) -> list:
    paths = []
    for i in range(count):
        path = folder / f"ct{i}.dcm"
        path.write_bytes(ct({0x00080018: (b"UI", _uid(f"1.2.3.{i}"))}, pixels=PIXELS + i))
        paths.append(path)
    return paths


def test_batcher_reads_items_in_reader_threads_and_fails_only_a_bad_one(tmp_path, monkeypatch):
    import threading

    from medge.runtime import batcher as batcher_module
    from medge.runtime.batcher import Batcher

    paths = _ct_files(tmp_path, 5)
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(paths[0].read_bytes()[:600])
    threads = set()
    real = batcher_module._read

    def read(item):
        threads.add(threading.current_thread().name)
        return real(item)

    monkeypatch.setattr(batcher_module, "_read", read)
    model = _RecordingModel()
    marker = object()
    with Batcher(model, readers=2, max_delay_ms=1) as batcher:
        assert batcher.readers == 2
        futures = [batcher.submit(p) for p in paths[:2]] + [batcher.submit(damaged), batcher.submit(marker)]
        futures += [batcher.submit(paths[2].read_bytes()), batcher.submit(str(paths[3])), batcher.submit(paths[4])]
        results = [f.exception() or f.result() for f in futures]
    assert results[:2] == [("Image", "1.2.3.0"), ("Image", "1.2.3.1")]
    assert type(results[2]).__name__ == "DicomError"
    assert results[3] == ("object", None)  # not a DICOM source: handed over as submitted
    assert results[4:] == [("Image", "1.2.3.2"), ("Image", "1.2.3.3"), ("Image", "1.2.3.4")]
    assert threads and all(name.startswith("medge-batcher-reader-") for name in threads)
    assert all(type(item).__name__ in ("Image", "object") for batch in model.seen for item in batch)


def test_batcher_reads_at_most_readahead_items_ahead_and_skips_cancelled_ones(tmp_path, monkeypatch):
    import threading
    import time

    from medge.runtime import batcher as batcher_module
    from medge.runtime.batcher import Batcher

    paths = _ct_files(tmp_path, 12)
    started = []
    real = batcher_module._read
    monkeypatch.setattr(batcher_module, "_read", lambda item: (started.append(item), real(item))[1])
    gate = threading.Event()
    model = _RecordingModel(gate)
    with Batcher(model, readers=2, readahead=3, max_delay_ms=0) as batcher:
        futures = [batcher.submit(p) for p in paths]
        time.sleep(0.5)  # the first batch waits at the gate; reads run ahead of it, within bounds
        assert len(started) <= model.max_batch + 3
        assert futures[-1].cancel()  # far behind the read-ahead window: never read
        gate.set()
        results = [f.result() for f in futures[:-1]]
    assert [uid for _, uid in results] == [f"1.2.3.{i}" for i in range(11)]
    assert paths[-1] not in started and len(started) == 11


def test_batcher_in_front_of_a_medge_model_reads_ahead_by_default(demo_bundle, tmp_path):
    import medge
    from medge.demo import write_demo_dicoms
    from medge.runtime.batcher import DEFAULT_READERS, Batcher

    files, _ = write_demo_dicoms(tmp_path, "validation", 5)
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(pathlib.Path(files[0]).read_bytes()[:4000])
    with medge.load(demo_bundle.bundle_path, device="cpu") as model:
        expected = model.predict_each(list(files))
        with Batcher(model, max_delay_ms=1) as batcher:
            assert batcher.readers == DEFAULT_READERS > 0
            futures = [batcher.submit(f) for f in files] + [batcher.submit(damaged)]
            results = [f.exception() or f.result() for f in futures]
    for got, want in zip(results, expected):
        assert got.sop_instance_uid == want[0].sop_instance_uid and np.array_equal(got.scores, want[0].scores)
    assert type(results[-1]).__name__ == "DicomError"


def test_medge_run_reads_the_next_chunk_in_reader_threads(demo_bundle, tmp_path, monkeypatch, capsys):
    import json
    import threading

    from medge.cli import run_cmd
    from medge.cli.main import main
    from medge.demo import write_demo_dicoms

    folder = tmp_path / "in"
    folder.mkdir()
    files, _ = write_demo_dicoms(folder, "validation", 5)
    (folder / "damaged.dcm").write_bytes(pathlib.Path(files[0]).read_bytes()[:4000])
    threads = set()
    real = run_cmd._read

    def read(file):
        threads.add(threading.current_thread().name)
        return real(file)

    monkeypatch.setattr(run_cmd, "_read", read)
    out = tmp_path / "out.jsonl"
    assert main(["run", str(demo_bundle.bundle_path), str(folder), "--out", str(out), "--device", "cpu",
                 "--batch", "2"]) == 1  # the damaged file fails alone
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["file"] for row in rows) == sorted(pathlib.Path(f).name for f in files)
    assert "damaged.dcm (failed)" in capsys.readouterr().err
    assert threads and all(name.startswith("medge-run-reader") for name in threads)


def test_batcher_reader_arguments_are_checked():
    from medge.runtime.batcher import Batcher, BatcherError

    for kwargs in ({"readers": -1}, {"readers": 1.5}, {"readahead": 0}, {"readahead": True}):
        with pytest.raises(BatcherError):
            Batcher(_RecordingModel(), **kwargs)
    with Batcher(_RecordingModel()) as batcher:
        assert batcher.readers == 0  # any model but a medge Model gets its items as submitted
    import threading

    with Batcher(_RecordingModel(), readers=2, max_delay_ms=0, name="nothing-to-read") as batcher:
        assert batcher.submit(np.zeros((4, 4), np.int16)).result(timeout=30)[0] == "ndarray"
        # Nothing to read yet: no reader thread was started.
        assert not any(t.name.startswith("nothing-to-read-reader") for t in threading.enumerate())
