#!/usr/bin/env python
"""Seeded DICOM mutation fuzzer for ``medge.read_dicom`` and ``medge.preprocess``.

Each case is a mutated DICOM file, a pure function of (--seed, case index):
the same pair gives the same bytes on every machine, so any finding is
reproduced with ``--only INDEX`` (and written out with ``--dump DIR``).

Seeds (every one with distinctive patient values planted, see PHI_VALUES):
medge.synthetic's CT, CR MONOCHROME1 (12 of 16 bits), enhanced multi-frame,
Explicit VR Big Endian and RLE objects, a 32 x 32 JPEG 2000, a 32 x 32
JPEG-LS and a 32 x 32 lossless JPEG object, and pydicom's greyscale test files where they are installed
(read from the wheel's own folder: ``get_testdata_files`` would go to the
network for the rest).

Mutations, one to three per case: byte and bit flips, truncation, chunk
insertion / deletion, element length-field corruption, element VR swaps
(in place in the bytes, and whole elements re-encoded with another VR),
header dimension lies (Rows, Columns, Bits Allocated / Stored, High Bit,
Pixel Representation, Samples per Pixel, Number of Frames) and compressed
frame header lies (JPEG / JPEG-LS SOF, JPEG 2000 SIZ, RLE segment table).

Each case runs ``read_dicom`` (force on for a quarter of the cases) and,
when it returns, ``preprocess`` with a small spec. Outcome classes:

- ``ok``: an image came out and preprocessed to finite values;
- a MedgeError subclass name (``DicomError``, ``PreprocessError``, ...):
  refused with medge's own error, as intended;
- ``bug:<Type>``: any other exception, or non-finite output;
- ``leak``: a planted patient value appeared in an exception message, its
  cause/context chain, a warning or a log record (counted on top of the class);
- ``timeout`` / ``crash:<exit code>`` (``--subprocess`` only): the case ran
  past ``--timeout`` or killed its worker (a codec segfault, the memory limit).

Usage::

    python tools/fuzz_dicom.py --cases 20000 --seed 1 --report fuzz.json
    python tools/fuzz_dicom.py --cases 20000 --subprocess --timeout 20 --jobs 2
    python tools/fuzz_dicom.py --seed 1 --only 1234 --dump /tmp/case
    python tools/fuzz_dicom.py --differential --cases 20000 --seed 1   # fast reader vs pydicom only

Exit status: 0 when every case is ok or a MedgeError without a leak, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import collections
import copy
import io
import json
import logging
import os
import pathlib
import platform
import sys
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

# --------------------------------------------------------------------------- planted patient values

#: The planted values. Text ones repeat a 5-letter marker, so any leaked fragment of 5 or more
#: characters contains one of its rotations (PHI_FRAGMENTS): a message that quotes a cut or shifted
#: value is caught too, not only a verbatim one.
PHI_MARKER = "PHIZQ"
PHI_VALUES = {
    "PatientName": "PHIZQPHIZQ^PHIZQPHIZQ",
    "PatientID": "PHIZQPHIZQPHIZQ",
    "PatientBirthDate": "19450317",
    "AccessionNumber": "PHIZQPHIZQ",
    "ReferringPhysicianName": "PHIZQ^PHIZQ",
    "InstitutionName": "PHIZQPHIZQPHIZQPHIZQ",
    "OperatorsName": "PHIZQ^PHIZQPHIZQ",
    "StudyDescription": "PHIZQPHIZQPHIZQPHIZQPHIZQ",
    "ImageComments": "PHIZQPHIZQPHIZQPHIZQPHIZQPHIZQ",
}
PHI_FRAGMENTS = tuple(PHI_MARKER[i:] + PHI_MARKER[:i] for i in range(len(PHI_MARKER))) + ("19450317",)


def leaked_fragments(text: str) -> list[str]:
    """The planted-value fragments found in ``text``."""
    return [fragment for fragment in PHI_FRAGMENTS if fragment in text]


def plant_phi(ds) -> None:
    for keyword, value in PHI_VALUES.items():
        setattr(ds, keyword, value)


# --------------------------------------------------------------------------- seeds

# A 32 x 32 JPEG-LS lossless codestream (16-bit container, 12 bits, CharLS 2.x via pyjpegls),
# zlib + base64: pydicom has no JPEG-LS encoder without pyjpegls.
_JPEG_LS_32 = (
    "eNoBUAGv/v/Y//cACwsAIAAgAQERAP/aAAgBAQAAAAC11zx1zxAAAAAL9tc8f93kAAAAAvfiZMmPHjxQABtg4MGDBgwSrbTJD3NirWMW"
    "tbWCmZmZokVVVVbFVVVVWSNVbbZwkkkQRJJJNEiSSTyFJJJjCSSXECqrJGqq1+qq/FVWPlVSCJ/j1/2P7eP/EL+3b/cf2af8QP6Mv8x/"
    "jD/X7/F395/iz/Hz/FX95/ij/Hr+k395/ST+3j+kX9Z/SD+3b+vv6z+vv7NP68/rP66/oy/rr/Z/XH+MP64/2f1x/i7+tv7v62/xZ/tP"
    "7v80/wq/2n93+0/xR/Mv7v5l/Sb+Zf3fzL+kn8w/u/mH9Iv5h/d/MP6QfzD+7+Xf19/Lv7v5d/X38u/u/l39efy7+7+Wf11/LP7v5Z/X"
    "X8s/u/ln9cfyz+7+Wf1x/Of3fzn9cfzX8381/QD/2eaAwbY="
)

# A 32 x 32 lossless JPEG (process 14, predictor 6, 12 bits) of medge.synthetic.ct_slice(seed=4, size=32)
# + 1024, encoded with imagecodecs' ljpeg_encode, zlib + base64: no package medge installs encodes it.
_JPEG_LOSSLESS_32 = (
    "eNoBlwRo+//Y/8QAHgABAAIBBQEBAAAAAAAAAAAABAUDAgYHCAkKAAH/wwALDAAgACABABEA/9oACAEAAAYAAPAmmi/9/bKqIyStyzwszv"
    "0/YSWrvJh83MuZ6KFEkY1sTPVXJisqqcIJ10ufA+csuIoRmqRpI7HI+ENqnTR5+H/HwU9cT9rdlnhlfTVgPD9siMLYbWmMXNMDYqOkgKkR"
    "0nrVCorlYv6RLN3kvqtKOQxh1XORVjCSGOoYWVrZpaUxf+/n5QKYok8yStIJnT8zp6x7dT6clNPSYrKtRVRs7hfbGy+ZIu/C2u6iV3N5Xc"
    "mORWvNGabYOYNjqiBFbDMhrh/sZIyv6mNs549yXpJ7wO1/tU7ee5r0F9ym8OXG+QjYmyVRdXTXN6e1CSJOTsH9KvbvyH0xprUcxTrHUnJr"
    "uS78O3Dj/sYGTDV+/n4okvhp+Xku8Xvo4J77bVR85HWSYqpfhF1D8lvUxy04F4GtusmzXR/7MC9KXPPx7dHPl+60eVu844266nr489MH1e"
    "9Tnr97aOuBt0LlRgOcyH6DeQ3QPx25E17X+ezsG/ZmGyb0Qc5Mm7HcafQf2YdfqrwyPzx/nYr2f9e/nw59txv2d6suZB5mP4F6K3MnIqzz"
    "N9nXd3qDjfqWOBXHZRvd/wAa+u7fumXSBvW9yn/A58IN/wC7SEt2S8fuBHLLu24HRepDvx/OWHLPjzxn3M7MONWZ7uI+7Jq9Qcad16pkXW"
    "dyU2I3G5+az2nhqI6RPzh2sNtT3HdG3ILTWqoOrbjXEfE6Vp/SXZai221pIc0NnMkSsXhyG0hTd1i8g5OZipIOsNIOymyJmKUbr0aemORu"
    "1UsS/C2awx322ckqLxq3909n+Vb4gB+9hXGvajktp6u40HqaPd9spqrkvyq2LpWOovOHYn57Oa3HOSiOOm7UXzW2FBt5rNZa5PLh5qfvIh"
    "N5du4JJ5Ts44zZR33Y1trpiY3F0r2A6Z78eu7inu1+RlUN9wD1P58Ox7vo6/5wLu4uW2NTX9Z3dcM4zjdu73acLvOzzJ4Kb6XrukcDdNPK"
    "DXnbR6BtD7l9xvNzgizf3mLx3t7g+xnjdvH3/wC0Oy8R0lcwZxluf5YrohluZGu98O/rtr3B4gY9gPpF5V9rXXIbuK9Jfaht36Vepjh91N"
    "c4Rgj45KByPmz1Bxn5SGQbJnNvrGt547L0vmNN/vlV5vecHsYnZE10vieQr4Xeajk5uZfSyMd1EdpO7nRlzCkoqKmPzgF5suVG8Z46+wmZ"
    "vw7eEXlq0NyjnIzUYdi/I10m48z8pkW3HUD51+TPIlummyHyI0klfDyO1Hnl6M9OcmYrF4qkk0Htr1T+fjrp5y6whDakLjlbhqqLH+YTkV"
    "wU6EfNXwM4jcddo+KfA3qw6YfPvwp15yLFM6Yla3QCk/XxV8r+QSJAu1/X91T9O3TH1OdefFHR25u4Rr4qrVOUS9wQXRUhIQzGRoZIQllr"
    "+hWweR5+loo2OndITVRiPZGNimSsch34fFhJfT8mUem5UM5X+vRUpjY0WFDqsJ2PupPZe40jVnPUSD9H61HFzkX+gP/ZuztblA=="
)

# pydicom test files worth mutating: greyscale, any transfer syntax. Colour ones are refused before
# decoding and add little.
PUBLIC_SEEDS = (
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
    "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_08.dcm",
    "JPEGLSNearLossless_16.dcm", "JPGExtended.dcm", "JPEG-lossy.dcm", "JPEG2000.dcm", "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm", "examples_overlay.dcm", "image_dfl.dcm", "rtdose.dcm", "rtdose_rle.dcm",
    "MR2_J2KI.dcm", "emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
)


@dataclass
class Seed:
    """One seed file: its bytes, its dataset, and where its structured fields are."""

    name: str
    data: bytes
    dataset: Any
    length_fields: list = field(default_factory=list)  # (offset, size in bytes, little endian, tag)
    vr_fields: list = field(default_factory=list)  # (offset of a two-letter VR, tag) (explicit VR only)
    us_fields: dict = field(default_factory=dict)  # keyword -> (offset, little endian) of a US value
    codestreams: list = field(default_factory=list)  # (kind, offset) of frame headers in the bytes


def _serialise(ds) -> bytes:
    """The dataset as a DICOM file (preamble, 'DICM', File Meta Information), else as pydicom can write it."""
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except Exception:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def _index_fields(seed: Seed) -> None:
    """Find length fields, VRs, US pixel-module values and frame headers in the seed's bytes."""
    import pydicom
    from pydicom.dataelem import RawDataElement

    ds = pydicom.dcmread(io.BytesIO(seed.data), force=True)
    us_keywords = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                   "SamplesPerPixel")

    def walk(dataset, depth=0):
        for tag in list(dataset._dict):
            raw = dataset._dict[tag]
            if isinstance(raw, RawDataElement):
                little, implicit, tell = raw.is_little_endian, raw.is_implicit_VR, raw.value_tell
                if implicit:
                    seed.length_fields.append((tell - 4, 4, little, tag))
                elif raw.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"):
                    seed.length_fields.append((tell - 4, 4, little, tag))
                    seed.vr_fields.append((tell - 8, tag))
                else:
                    seed.length_fields.append((tell - 2, 2, little, tag))
                    seed.vr_fields.append((tell - 4, tag))
                keyword = pydicom.datadict.keyword_for_tag(tag)
                if depth == 0 and keyword in us_keywords and raw.length == 2:
                    seed.us_fields[keyword] = (tell, little)
            try:
                element = dataset[tag]
            except Exception:
                continue
            if element.VR == "SQ" and depth < 3:
                for item in element.value:
                    walk(item, depth + 1)

    walk(ds.file_meta if hasattr(ds, "file_meta") else ds)
    walk(ds)
    data = seed.data
    for kind, marker in (("j2k", b"\xff\x4f\xff\x51"), ("jpeg", b"\xff\xd8\xff")):
        start = 0
        while (position := data.find(marker, start)) >= 0:
            seed.codestreams.append((kind, position))
            start = position + 1
    transfer_syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if transfer_syntax == "1.2.840.10008.1.2.5":
        # RLE frame headers: the start of each fragment (item tag FFFE,E000 + 4-byte length).
        start = data.find(b"\xe0\x7f\x10\x00")
        while start >= 0 and (position := data.find(b"\xfe\xff\x00\xe0", start + 1)) >= 0:
            if int.from_bytes(data[position + 4:position + 8], "little") >= 64:
                seed.codestreams.append(("rle", position + 8))
            start = position


def _synthetic_seeds() -> list[tuple[str, Any]]:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, JPEGLossless, JPEGLSLossless

    from medge import synthetic

    seeds = [
        ("synthetic_ct", synthetic.ct_slice(seed=0, size=32, lesion=True)),
        ("synthetic_cr_monochrome1", synthetic.monochrome1_cr(seed=0, size=32)),
        ("synthetic_enhanced", synthetic.enhanced_multiframe(seed=0, size=16, frames=3)),
        ("synthetic_big_endian", synthetic.big_endian(seed=0, size=32)),
        ("synthetic_rle", synthetic.rle(seed=0, size=32)),
    ]
    j2k = synthetic.ct_slice(seed=1, size=32, lesion=False)
    try:
        j2k.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        seeds.append(("synthetic_j2k", j2k))
    except Exception:  # no JPEG 2000 encoder here
        pass
    jls = synthetic.ct_slice(seed=2, size=32, lesion=False)
    jls.file_meta.TransferSyntaxUID = JPEGLSLossless
    jls.BitsStored, jls.HighBit, jls.PixelRepresentation = 12, 11, 0
    jls.PixelData = encapsulate([zlib.decompress(base64.b64decode(_JPEG_LS_32))])
    jls["PixelData"].VR = "OB"
    seeds.append(("synthetic_jpeg_ls", jls))
    ljpeg = synthetic.ct_slice(seed=4, size=32, lesion=False)
    ljpeg.file_meta.TransferSyntaxUID = JPEGLossless
    ljpeg.BitsStored, ljpeg.HighBit, ljpeg.PixelRepresentation = 12, 11, 0
    ljpeg.PixelData = encapsulate([zlib.decompress(base64.b64decode(_JPEG_LOSSLESS_32))])
    ljpeg["PixelData"].VR = "OB"
    seeds.append(("synthetic_jpeg_lossless", ljpeg))
    return seeds


def _public_seeds(max_bytes: int) -> list[tuple[str, Any]]:
    try:
        import pydicom
        import pydicom.data
    except ImportError:
        return []
    folder = pathlib.Path(pydicom.data.__file__).parent / "test_files"
    seeds = []
    for name in PUBLIC_SEEDS:
        path = folder / name
        if not path.is_file() or path.stat().st_size > max_bytes:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                seeds.append((f"pydicom_{name}", pydicom.dcmread(path)))
            except Exception:
                continue
    return seeds


def build_seeds(public: bool = True, max_public_bytes: int = 200_000) -> list[Seed]:
    """The seed corpus: synthetic objects, plus pydicom's test files when ``public``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        named = _synthetic_seeds() + (_public_seeds(max_public_bytes) if public else [])
        seeds = []
        for name, ds in named:
            plant_phi(ds)
            try:
                data = _serialise(ds)
            except Exception:
                continue
            seed = Seed(name, data, ds)
            _index_fields(seed)
            seeds.append(seed)
    return seeds


# --------------------------------------------------------------------------- mutations

_VRS = [vr.encode() for vr in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD",
                               "OF", "OL", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "TM", "UC", "UI", "UL", "UN",
                               "UR", "US", "UT", "XX", "\0\0")]
_INTERESTING_16 = (0, 1, 2, 7, 8, 9, 11, 12, 15, 16, 17, 24, 31, 32, 33, 63, 64, 255, 256, 511, 512, 4095, 16384,
                   32767, 32768, 65535)
_INTERESTING_32 = (0, 1, 2, 3, 4, 7, 8, 63, 64, 65, 255, 256, 4096, 65535, 65536, 0x7FFFFFFF, 0x80000000,
                   0xFFFFFFFE, 0xFFFFFFFF)


def _interesting(rng: np.random.Generator, values, old: Optional[int] = None) -> int:
    if old is not None and rng.random() < 0.3:
        return max(0, old + int(rng.choice([-2, -1, 1, 2, old, -old // 2])))
    return int(rng.choice(values))


def m_byte_flips(rng, data: bytearray, seed: Seed) -> str:
    count = int(rng.integers(1, 9))
    low = 132 if len(data) > 200 and rng.random() < 0.9 else 0
    for position in rng.integers(low, len(data), size=count):
        data[position] = int(rng.integers(0, 256))
    return f"byte_flips({count})"


def m_bit_flips(rng, data: bytearray, seed: Seed) -> str:
    count = int(rng.integers(1, 9))
    for position in rng.integers(0, len(data), size=count):
        data[position] ^= 1 << int(rng.integers(0, 8))
    return f"bit_flips({count})"


def m_truncate(rng, data: bytearray, seed: Seed) -> str:
    # Mostly near the end (inside pixel data), sometimes anywhere.
    cut = int(len(data) * (1 - rng.random() ** 3)) if rng.random() < 0.7 else int(rng.integers(0, len(data)))
    del data[cut:]
    return f"truncate({cut})"


def m_chunk(rng, data: bytearray, seed: Seed) -> str:
    position = int(rng.integers(0, len(data) + 1))
    size = int(rng.integers(1, 64))
    if rng.random() < 0.5:
        del data[position:position + size]
        return f"delete({position},{size})"
    data[position:position] = bytes(rng.integers(0, 256, size=size, dtype=np.uint8))
    return f"insert({position},{size})"


def _pick_field(rng, fields: list):
    """A field, from group 0028 onwards (pixel module, functional groups, pixel data) 60% of the time:
    a corrupted early element ends the parse before the interesting part more often than not."""
    late = [f for f in fields if f[-1] >= 0x00280000]
    pool = late if late and rng.random() < 0.6 else fields
    return pool[int(rng.integers(len(pool)))]


def m_length_field(rng, data: bytearray, seed: Seed) -> str:
    if not seed.length_fields:
        return m_byte_flips(rng, data, seed)
    offset, size, little, _ = _pick_field(rng, seed.length_fields)
    if offset + size > len(data):
        return "length_field(gone)"
    order = "little" if little else "big"
    old = int.from_bytes(data[offset:offset + size], order)
    limit = (1 << (8 * size)) - 1
    new = min(_interesting(rng, _INTERESTING_32 if size == 4 else _INTERESTING_16, old), limit)
    data[offset:offset + size] = new.to_bytes(size, order)
    return f"length_field({offset}:{old}->{new})"


def m_vr_bytes(rng, data: bytearray, seed: Seed) -> str:
    if not seed.vr_fields:
        return m_byte_flips(rng, data, seed)
    offset, _ = _pick_field(rng, seed.vr_fields)
    vr = _VRS[int(rng.integers(len(_VRS)))]
    data[offset:offset + 2] = vr
    return f"vr_bytes({offset}->{vr!r})"


def m_dimension_lie(rng, data: bytearray, seed: Seed) -> str:
    if not seed.us_fields:
        return m_byte_flips(rng, data, seed)
    keyword = sorted(seed.us_fields)[int(rng.integers(len(seed.us_fields)))]
    offset, little = seed.us_fields[keyword]
    if offset + 2 > len(data):
        return "dimension_lie(gone)"
    order = "little" if little else "big"
    old = int.from_bytes(data[offset:offset + 2], order)
    new = _interesting(rng, _INTERESTING_16, old) & 0xFFFF
    data[offset:offset + 2] = new.to_bytes(2, order)
    return f"dimension_lie({keyword}:{old}->{new})"


def m_codestream_lie(rng, data: bytearray, seed: Seed) -> str:
    if not seed.codestreams:
        return m_dimension_lie(rng, data, seed)
    kind, start = seed.codestreams[int(rng.integers(len(seed.codestreams)))]
    if kind == "jpeg":
        # First SOFn / SOF55 after SOI: patch precision, height, width or component count.
        position = start + 2
        while position + 4 <= len(data) and data[position] == 0xFF:
            marker = data[position + 1]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB, 0xF7):
                field_at, size = [(4, 1), (5, 2), (7, 2), (9, 1)][int(rng.integers(4))]
                target = position + field_at
                if target + size <= len(data):
                    value = _interesting(rng, _INTERESTING_16) & ((1 << (8 * size)) - 1)
                    data[target:target + size] = value.to_bytes(size, "big")
                    return f"codestream_lie(jpeg@{target}={value})"
                break
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
        return "codestream_lie(jpeg: no SOF)"
    if kind == "j2k":
        # SIZ fields, offsets from SOC: Xsiz 8, Ysiz 12, XOsiz 16, YOsiz 20, XTsiz 24, YTsiz 28, Csiz 40, Ssiz 42.
        field_at, size = [(8, 4), (12, 4), (16, 4), (20, 4), (24, 4), (28, 4), (40, 2), (42, 1), (43, 1)][
            int(rng.integers(9))]
        target = start + field_at
        if target + size > len(data):
            return "codestream_lie(j2k: gone)"
        values = _INTERESTING_32 if size == 4 else _INTERESTING_16
        value = _interesting(rng, values) & ((1 << (8 * size)) - 1)
        data[target:target + size] = value.to_bytes(size, "big")
        return f"codestream_lie(j2k@{field_at}={value})"
    # RLE header: the segment count or one offset.
    field_at = 4 * int(rng.integers(0, 4))
    target = start + field_at
    if target + 4 > len(data):
        return "codestream_lie(rle: gone)"
    value = _interesting(rng, _INTERESTING_32)
    data[target:target + 4] = value.to_bytes(4, "little")
    return f"codestream_lie(rle@{field_at}={value})"


def _element_swaps():
    """Whole elements re-encoded with a wrong VR / value (the dataset is re-serialised)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def item():
        inner = Dataset()
        inner.PatientName = PHI_VALUES["PatientName"]
        return Sequence([inner])

    return [
        ("PerFrameFunctionalGroupsSequence", "US", 17),
        ("PerFrameFunctionalGroupsSequence", "LO", PHI_VALUES["PatientID"]),
        ("PerFrameFunctionalGroupsSequence", "OB", b"\x01\x02\x03\x04"),
        ("SharedFunctionalGroupsSequence", "DS", "1.5"),
        ("SharedFunctionalGroupsSequence", "PN", PHI_VALUES["PatientName"]),
        ("Rows", "LO", PHI_VALUES["PatientID"]),
        ("Rows", "SQ", item()),
        ("Rows", "FD", 512.5),
        ("Columns", "SS", -5),
        ("BitsAllocated", "UL", 0xFFFFFFFF),
        ("BitsStored", "DS", "12.5"),
        ("NumberOfFrames", "LO", PHI_VALUES["PatientName"]),
        ("NumberOfFrames", "IS", "2147483647"),
        ("NumberOfFrames", "IS", "0"),
        ("NumberOfFrames", "IS", "-3"),
        ("PhotometricInterpretation", "PN", PHI_VALUES["PatientName"]),
        ("PhotometricInterpretation", "OB", b"MONOCHROME2 "),
        ("PixelData", "LO", PHI_VALUES["PatientID"]),
        ("PixelData", "SQ", item()),
        ("WindowCenter", "SQ", item()),
        ("WindowCenter", "LO", PHI_VALUES["PatientName"]),
        ("WindowWidth", "DS", ["1", "2", "3"]),
        ("WindowCenterWidthExplanation", "SQ", item()),
        ("RescaleSlope", "LO", PHI_VALUES["PatientID"]),
        ("RescaleIntercept", "SQ", item()),
        ("VOILUTFunction", "LO", PHI_VALUES["PatientID"]),
        ("ModalityLUTSequence", "LO", PHI_VALUES["PatientID"]),
        ("SOPInstanceUID", "UI", "1.2.3." + PHI_VALUES["PatientID"]),
        ("SOPClassUID", "LO", PHI_VALUES["PatientName"]),
        ("ExtendedOffsetTable", "OV", b"\x00" * 8),
        ("ExtendedOffsetTableLengths", "OV", b"\xff" * 8),
        ("SpecificCharacterSet", "CS", PHI_MARKER),
    ]


_SWAPS: list = []


def m_element_vr_swap(rng, data: bytearray, seed: Seed) -> Optional[bytes]:
    """Returns new bytes (the seed's dataset re-encoded), or None to fall back to a byte mutation."""
    if not _SWAPS:
        _SWAPS.extend(_element_swaps())
    keyword, vr, value = _SWAPS[int(rng.integers(len(_SWAPS)))]
    ds = copy.deepcopy(seed.dataset)
    target = ds
    if keyword in ("PixelValueTransformationSequence",):
        return None
    # Functional-group elements sometimes go inside the first per-frame item, where enhanced readers look.
    if keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter") and "PerFrameFunctionalGroupsSequence" in ds \
            and rng.random() < 0.5:
        try:
            group = ds.PerFrameFunctionalGroupsSequence[0]
            target = (group.PixelValueTransformationSequence[0] if keyword.startswith("Rescale")
                      else group.FrameVOILUTSequence[0])
        except Exception:
            target = ds
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    try:
        if tag in target:
            del target[tag]
        target.add_new(tag, vr, value)
        return _serialise(ds)
    except Exception:
        return None


MUTATIONS: list[tuple[str, Callable, float]] = [
    ("byte_flips", m_byte_flips, 3.0),
    ("bit_flips", m_bit_flips, 1.0),
    ("truncate", m_truncate, 1.5),
    ("chunk", m_chunk, 1.0),
    ("length_field", m_length_field, 3.0),
    ("vr_bytes", m_vr_bytes, 1.5),
    ("dimension_lie", m_dimension_lie, 2.0),
    ("codestream_lie", m_codestream_lie, 2.0),
    ("element_vr_swap", m_element_vr_swap, 1.5),
]
_WEIGHTS = np.array([w for _, _, w in MUTATIONS]) / sum(w for _, _, w in MUTATIONS)


@dataclass
class Case:
    index: int
    seed_name: str
    operations: list
    data: bytes
    force: bool
    spec_index: int


def make_case(seeds: list[Seed], fuzz_seed: int, index: int) -> Case:
    """Case ``index`` of the run seeded with ``fuzz_seed``: a pure function of the two (and the corpus)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values the swaps write
        return _make_case(seeds, fuzz_seed, index)


def _make_case(seeds: list[Seed], fuzz_seed: int, index: int) -> Case:
    rng = np.random.default_rng([fuzz_seed, index])
    seed = seeds[int(rng.integers(len(seeds)))]
    data = bytearray(seed.data)
    operations = []
    for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3]))):
        name, mutate, _ = MUTATIONS[int(rng.choice(len(MUTATIONS), p=_WEIGHTS))]
        if name == "element_vr_swap":
            if operations:  # re-encoding would discard earlier byte mutations: only as the first one
                name, mutate = "byte_flips", m_byte_flips
            else:
                replaced = mutate(rng, data, seed)
                if replaced is not None:
                    data = bytearray(replaced)
                    operations.append(name)
                    continue
                name, mutate = "byte_flips", m_byte_flips
        if not data:
            break
        operations.append(mutate(rng, data, seed))
    return Case(index, seed.name, operations, bytes(data), bool(rng.random() < 0.25), int(rng.integers(3)))


# --------------------------------------------------------------------------- running a case


def specs():
    from medge.preprocess import PreprocessSpec

    return (
        PreprocessSpec(height=8, width=8, voi="dicom"),
        PreprocessSpec(height=8, width=6, voi="range", value_range=(-1024.0, 3071.0), fit="letterbox"),
        PreprocessSpec(height=5, width=9, channels=3, voi="window", window=(40.0, 400.0), dtype="float16",
                       resample="bilinear"),
    )


@dataclass
class Outcome:
    index: int
    seed_name: str
    operations: list
    outcome: str
    seconds: float
    leaks: list
    detail: str = ""
    message: str = ""  # a MedgeError's message (checked for planted values like everything else)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.texts.append(f"{record.name}: {record.getMessage()}")
        except Exception as exc:  # a record whose arguments do not format is a finding too
            self.texts.append(f"{record.name}: unformattable record ({type(exc).__name__}) {record.msg!r}")


def exception_texts(exc: BaseException) -> list[str]:
    """str and repr of the exception and of everything on its __cause__ / __context__ chain."""
    texts, seen, pending = [], set(), [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts.append(f"{type(current).__name__}: {current}")
        texts.append(repr(current.args))
        pending.extend([current.__cause__, current.__context__])
    return texts


def run_case(case: Case, spec_list=None) -> Outcome:
    """Run one case in this process; capture warnings and every log record at DEBUG."""
    from medge.dicom import read_dicom
    from medge.errors import MedgeError
    from medge.preprocess import preprocess

    spec_list = spec_list or specs()
    handler = _Records()
    root = logging.getLogger()
    watched = [root, logging.getLogger("pydicom")]
    levels = [logger.level for logger in watched]
    root.addHandler(handler)
    for logger in watched:
        logger.setLevel(logging.DEBUG)
    texts: list[str] = []
    detail = message = ""
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                image = read_dicom(case.data, force=case.force)
                out = preprocess(image, spec_list[case.spec_index])
                outcome = "ok" if np.isfinite(np.asarray(out, dtype=np.float32)).all() else "bug:non-finite output"
            except MedgeError as exc:
                outcome = type(exc).__name__
                message = str(exc)[:300]
                texts += exception_texts(exc)
            except Exception as exc:  # noqa: BLE001 - any other exception is what the fuzzer looks for
                outcome = f"bug:{type(exc).__name__}"
                texts += exception_texts(exc)
                detail = "".join(traceback.format_exception(exc))[-4000:]
        texts += [f"warning {w.category.__name__}: {w.message}" for w in caught]
    finally:
        seconds = time.perf_counter() - started
        root.removeHandler(handler)
        for logger, level in zip(watched, levels):
            logger.setLevel(level)
    texts += handler.texts
    leaks = [text[:500] for text in texts if leaked_fragments(text)]
    return Outcome(case.index, case.seed_name, case.operations, outcome, seconds, leaks, detail, message)


# --------------------------------------------------------------------------- differential: fast reader vs pydicom


@dataclass
class Difference:
    index: int
    seed_name: str
    operations: list
    fast_answered: bool  # the fast reader produced the Image itself (else it handed the case to pydicom)
    same: bool
    full: str  # short descriptions of each reader's outcome
    fast: str


def _read_outcome(data: bytes, force: bool) -> tuple:
    from medge.dicom import read_dicom
    from medge.errors import MedgeError

    try:
        image = read_dicom(data, force=force)
    except MedgeError as exc:
        return ("error", type(exc).__name__, str(exc))
    except Exception as exc:  # noqa: BLE001 - reported as a difference / bug by the caller
        return ("bug", type(exc).__name__, "")
    pixels = image.pixels
    return ("image", pixels.dtype.str, pixels.shape, pixels.tobytes(), bool(pixels.flags.writeable),
            image.semantics, image.acquisition, image.sop_instance_uid)


def differential_case(case: Case) -> Difference:
    """Read the case with medge's fast reader enabled and with pydicom only: the outcomes must be equal."""
    import medge.dicom as dicom

    answered: list = []
    real, enabled = dicom._fast_read, dicom._FAST_READER

    def spy(source, max_pixels):
        image = real(source, max_pixels)
        answered.append(image is not None)
        return image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dicom._FAST_READER = False
            full = _read_outcome(case.data, case.force)
            dicom._FAST_READER, dicom._fast_read = True, spy
            fast = _read_outcome(case.data, case.force)
        finally:
            dicom._FAST_READER, dicom._fast_read = enabled, real

    def describe(outcome: tuple) -> str:
        return f"{outcome[0]} {outcome[1]} {outcome[2] if outcome[0] != 'error' else outcome[2][:120]}"

    return Difference(case.index, case.seed_name, case.operations, bool(answered and answered[-1]), full == fast,
                      describe(full), describe(fast))


# --------------------------------------------------------------------------- isolation


def _worker(connection, seeds, fuzz_seed: int, memory_limit_mb: int) -> None:
    if memory_limit_mb:
        import resource

        limit = memory_limit_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    spec_list = specs()
    while True:
        try:
            index = connection.recv()
        except EOFError:
            return
        if index is None:
            return
        try:
            outcome = run_case(make_case(seeds, fuzz_seed, index), spec_list)
        except MemoryError:
            outcome = Outcome(index, "?", [], "bug:MemoryError (outside the case)", 0.0, [])
        connection.send(outcome)


class _Pool:
    """Worker processes that run one case at a time each; a case past the timeout kills its worker."""

    def __init__(self, jobs: int, seeds, fuzz_seed: int, timeout: float, memory_limit_mb: int) -> None:
        import multiprocessing

        self.context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.args = (seeds, fuzz_seed, memory_limit_mb)
        self.timeout = timeout
        self.workers = [self._start() for _ in range(jobs)]

    def _start(self):
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_worker, args=(child, *self.args), daemon=True)
        process.start()
        child.close()
        return {"process": process, "connection": parent, "case": None, "since": 0.0}

    def run(self, indices, on_outcome) -> None:
        from multiprocessing.connection import wait

        pending = list(indices)[::-1]
        while pending or any(w["case"] is not None for w in self.workers):
            for worker in self.workers:
                if worker["case"] is None and pending:
                    worker["case"] = pending.pop()
                    worker["since"] = time.perf_counter()
                    worker["connection"].send(worker["case"])
            busy = [w for w in self.workers if w["case"] is not None]
            ready = wait([w["connection"] for w in busy], timeout=0.5)
            now = time.perf_counter()
            for slot, worker in enumerate(self.workers):
                if worker["case"] is None:
                    continue
                index = worker["case"]
                if worker["connection"] in ready:
                    try:
                        on_outcome(worker["connection"].recv())
                        worker["case"] = None
                        continue
                    except (EOFError, OSError):
                        worker["process"].join(5)
                        code = worker["process"].exitcode
                        on_outcome(Outcome(index, "?", [], f"crash:{code}", now - worker["since"], []))
                elif now - worker["since"] > self.timeout:
                    worker["process"].kill()
                    worker["process"].join(5)
                    on_outcome(Outcome(index, "?", [], "timeout", now - worker["since"], []))
                else:
                    continue
                worker["connection"].close()
                self.workers[slot] = self._start()

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker["connection"].send(None)
            except OSError:
                pass
            worker["process"].join(5)
            if worker["process"].is_alive():
                worker["process"].kill()


# --------------------------------------------------------------------------- command line


def is_failure(outcome: Outcome) -> bool:
    return bool(outcome.leaks) or outcome.outcome.startswith(("bug:", "timeout", "crash:"))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20000, help="number of cases (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="fuzz seed (default 0)")
    parser.add_argument("--start", type=int, default=0, help="first case index (default 0)")
    parser.add_argument("--only", type=int, action="append", help="run only this case index (repeatable)")
    parser.add_argument("--subprocess", action="store_true",
                        help="run cases in worker processes, with --timeout and --memory-limit-mb per case")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes with --subprocess (default 1)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per case with --subprocess")
    parser.add_argument("--memory-limit-mb", type=int, default=4096,
                        help="address-space limit per worker with --subprocess (0: none; default 4096)")
    parser.add_argument("--no-public", action="store_true", help="synthetic seeds only (not pydicom's test files)")
    parser.add_argument("--max-public-bytes", type=int, default=2_000_000,
                        help="skip pydicom test files larger than this (default 2000000)")
    parser.add_argument("--report", type=pathlib.Path, help="write a JSON report here")
    parser.add_argument("--dump", type=pathlib.Path, help="write the failing (or --only) cases' bytes here")
    parser.add_argument("--differential", action="store_true",
                        help="instead: read each case with read_dicom's fast reader and with pydicom only; any "
                             "difference in the outcome (image, semantics, error class or message) is a failure")
    args = parser.parse_args(argv)

    seeds = build_seeds(public=not args.no_public, max_public_bytes=args.max_public_bytes)
    indices = args.only or range(args.start, args.start + args.cases)
    if args.differential:
        return _main_differential(args, seeds, indices)
    counts: collections.Counter = collections.Counter()
    failures: list[Outcome] = []
    durations: list[tuple[float, int, str]] = []
    leaks = 0
    started = time.perf_counter()
    done = 0

    def record(outcome: Outcome) -> None:
        nonlocal leaks, done
        done += 1
        counts[outcome.outcome] += 1
        leaks += bool(outcome.leaks)
        durations.append((outcome.seconds, outcome.index, outcome.outcome))
        if is_failure(outcome):
            failures.append(outcome)
        if done % 1000 == 0:
            print(f"  {done} cases, {time.perf_counter() - started:.0f} s, failures {len(failures)}", file=sys.stderr)

    if args.subprocess:
        pool = _Pool(max(1, args.jobs), seeds, args.seed, args.timeout, args.memory_limit_mb)
        try:
            pool.run(indices, record)
        finally:
            pool.close()
    else:
        spec_list = specs()
        for index in indices:
            record(run_case(make_case(seeds, args.seed, index), spec_list))
    elapsed = time.perf_counter() - started

    # Fill in seed and operations for outcomes reported by a killed worker.
    for outcome in failures:
        if outcome.seed_name == "?":
            case = make_case(seeds, args.seed, outcome.index)
            outcome.seed_name, outcome.operations = case.seed_name, case.operations
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for index in ([f.index for f in failures] if not args.only else args.only):
            (args.dump / f"case_{args.seed}_{index}.dcm").write_bytes(make_case(seeds, args.seed, index).data)

    classes = collections.Counter()
    for name, n in counts.items():
        classes["ok" if name == "ok" else "bug" if name.startswith(("bug:", "timeout", "crash:")) else
                "MedgeError"] += n
    durations.sort(reverse=True)
    times = np.array([d for d, _, _ in durations]) if durations else np.zeros(1)
    print(f"medge DICOM fuzz: seed {args.seed}, {done} cases, {elapsed:.1f} s ({done / max(elapsed, 1e-9):.0f} "
          f"cases/s), {'subprocess x' + str(args.jobs) if args.subprocess else 'in-process'}, "
          f"{len(seeds)} seeds, {platform.node()} ({os.cpu_count()} CPUs)")
    print(f"  by class: {dict(sorted(classes.items()))}, cases with a planted value leaked: {leaks}")
    for name, n in counts.most_common():
        print(f"    {name:32s} {n}")
    print(f"  per case: median {np.median(times) * 1e3:.2f} ms, p99 {np.percentile(times, 99) * 1e3:.1f} ms, "
          f"max {times.max() * 1e3:.0f} ms (case {durations[0][1] if durations else '-'})")
    for outcome in failures[:20]:
        print(f"  FAIL case {outcome.index} ({outcome.seed_name}, {outcome.operations}): {outcome.outcome}"
              + (f", leaks: {outcome.leaks[:2]}" if outcome.leaks else ""))
        if outcome.detail:
            print("    " + outcome.detail.strip().splitlines()[-1])
    if args.report:
        report = {
            "seed": args.seed, "cases": done, "seconds": round(elapsed, 2), "mode": "subprocess" if args.subprocess
            else "in-process", "jobs": args.jobs, "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
            "python": platform.python_version(), "seeds": [s.name for s in seeds],
            "classes": dict(classes), "outcomes": dict(counts), "cases_with_leaks": leaks,
            "per_case_ms": {"median": float(np.median(times) * 1e3), "p99": float(np.percentile(times, 99) * 1e3),
                            "max": float(times.max() * 1e3)},
            "slowest": [{"index": i, "ms": round(d * 1e3, 1), "outcome": o} for d, i, o in durations[:10]],
            "failures": [outcome.__dict__ for outcome in failures],
        }
        args.report.write_text(json.dumps(report, indent=1))
    return 1 if failures else 0


def _main_differential(args, seeds, indices) -> int:
    started = time.perf_counter()
    differences = [differential_case(make_case(seeds, args.seed, index)) for index in indices]
    elapsed = time.perf_counter() - started
    failures = [d for d in differences if not d.same]
    answered = sum(d.fast_answered for d in differences)
    print(f"medge DICOM differential fuzz: seed {args.seed}, {len(differences)} cases, {elapsed:.1f} s, "
          f"{platform.node()} ({os.cpu_count()} CPUs)")
    print(f"  fast reader answered {answered}, handed to pydicom {len(differences) - answered}, "
          f"different outcomes {len(failures)}")
    for d in failures[:20]:
        print(f"  DIFF case {d.index} ({d.seed_name}, {d.operations}):\n    pydicom: {d.full}\n    fast:    {d.fast}")
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for d in failures:
            (args.dump / f"case_{args.seed}_{d.index}.dcm").write_bytes(make_case(seeds, args.seed, d.index).data)
    if args.report:
        args.report.write_text(json.dumps({
            "seed": args.seed, "cases": len(differences), "seconds": round(elapsed, 2), "fast_answered": answered,
            "differences": [d.__dict__ for d in failures]}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
