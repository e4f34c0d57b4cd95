"""DICOM -> Image: the raw stored pixel values plus the semantics needed to interpret them.

``read_dicom`` decodes with pydicom and stops at the stored values: no Modality
LUT, no VOI, no MONOCHROME1 inversion (the fused preprocessing kernel applies
those in one pass). Uncompressed little-endian files without functional groups,
most of what a scanner sends, take a fast reader instead of pydicom (a native
header scanner, medge._C.scan_dicom, and a few value conversions: close to the
cost of reading the file); it gives exactly what the pydicom path gives and hands
every other file, and anything unusual, to that path (see "fast reader" below).
What read_dicom adds to pydicom:

- one output shape, (frames, rows, columns), in native byte order;
- the semantics: bits, Pixel Representation, polarity, Rescale Slope/Intercept
  and every window pair, per frame for enhanced multi-frame objects (Shared
  and Per-frame Functional Groups), which pydicom's ``apply_modality_lut`` /
  ``apply_voi_lut`` ignore;
- validation before decoding (pixel-count limit against decompression bombs,
  truncated data, missing decoders, and each compressed frame's own header:
  JPEG / JPEG-LS / JPEG 2000 dimensions, components and bit depth, RLE
  segment tables, frame counts, all against the DICOM header, because a
  decoder sizes its output from the codestream) and after it (shape and dtype
  must agree with the header);
- one error type, :class:`~medge.errors.DicomError`, whose messages carry
  tag keywords, numbers and UIDs of the image only, never a value that could
  identify a patient (no string read from the file is ever quoted), and which
  carries no exception chain (pydicom's messages can quote raw bytes);
- silence: pydicom's warnings and log records (which quote values from the
  file) are kept from the caller's logs while reading; one debug record on
  ``medge.dicom`` says how many there were, by category only.

Only Image Pixel, Modality LUT, VOI LUT, SOP Common and functional group
elements are accessed, so pydicom's lazy value parsing never touches patient
or study attributes directly. A damaged length can still pull them into an
element medge reads (a UID that swallows the Patient's Name), which is why
pydicom's own messages are silenced and never chained.

pydicom is imported lazily.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import mmap
import os
import re
import stat
import struct
import zlib
from typing import TYPE_CHECKING, Any, BinaryIO, Optional, Union

import numpy as np

from . import _codestream
from ._pydicom_quiet import quiet_pydicom
from .errors import DicomError, MedgeError, MissingDependency
from .image import GREYSCALE_PHOTOMETRICS, VOI_FUNCTIONS, Acquisition, FrameTransform, Image, PixelSemantics, Window

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pydicom.dataset import Dataset

__all__ = ["read_dicom", "DEFAULT_MAX_PIXELS", "DicomSource", "DECODING_PLUGINS", "decoding_plugin"]

_LOG = logging.getLogger(__name__)

#: Largest rows * columns * frames ``read_dicom`` decodes by default (2**28,
#: i.e. 512 MiB of 16-bit pixels). Checked from the header before decoding, so
#: a small compressed file that claims a huge image is refused cheaply.
DEFAULT_MAX_PIXELS = 1 << 28

DicomSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, mmap.mmap, BinaryIO, "Dataset"]

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAG_NAMES = {
    "PixelData": "Pixel Data (7FE0,0010)",
    "FloatPixelData": "Float Pixel Data (7FE0,0008)",
    "DoubleFloatPixelData": "Double Float Pixel Data (7FE0,0009)",
}
# Photometric interpretations medge may name in a message (defined terms of
# PS3.3 C.7.6.3.1.2); any other string read from a file is never quoted.
_KNOWN_PHOTOMETRICS = (
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL",
    "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB",
)
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# What to install when pydicom has no decoder for a transfer syntax
# (pydicom 3.0.x decoder plugins; see shared/notes/dicom.md).
_LIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg"
_OPENJPEG = "pip install pylibjpeg pylibjpeg-openjpeg"
_DECODER_INSTALL_HINTS = {
    "1.2.840.10008.1.2.4.50": f"{_LIBJPEG} (or: pip install pillow; or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.51": f"{_LIBJPEG} (or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.57": f"{_LIBJPEG} (or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.70": f"{_LIBJPEG} (or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.80": f"{_LIBJPEG} (or: pip install pyjpegls; or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.81": f"{_LIBJPEG} (or: pip install pyjpegls; or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.90": f"{_OPENJPEG} (or: pip install pillow; or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.91": f"{_OPENJPEG} (or: pip install pillow; or: pip install python-gdcm)",
    "1.2.840.10008.1.2.4.201": _OPENJPEG,
    "1.2.840.10008.1.2.4.202": _OPENJPEG,
    "1.2.840.10008.1.2.4.203": _OPENJPEG,
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",
}
_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
#: Uncompressed little-endian transfer syntaxes (Implicit VR, Explicit VR): pixels are read in place.
_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
_EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_ENCAPSULATION_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: first item of encapsulated data


def read_dicom(source: DicomSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, force: bool = False) -> Image:
    """Read one DICOM object into an :class:`~medge.image.Image` of raw stored values.

    Pixels are decoded by pydicom (any transfer syntax it has a decoder for;
    read_dicom names the fastest installed plugin, :data:`DECODING_PLUGINS`),
    with unused high bits masked (Pixel Representation 0) or sign-extended
    (1), and are never rescaled. Uncompressed little-endian files without
    functional groups are read by medge's fast reader, with the same result. Big-endian data comes out in native byte
    order. ``Image.pixels`` always has shape (frames, rows, columns) and dtype
    uint8, uint16, int16, int32 or float32: signed 8-bit is widened to int16,
    unsigned 32-bit becomes int32 when every value fits (else DicomError),
    Double Float Pixel Data becomes float32 when that is exact (else
    DicomError). ``PixelSemantics.bits_allocated`` describes that container.

    Semantics: Rescale Slope/Intercept (1/0 when absent), every Window
    Center/Width pair with its explanation, VOI LUT Function (LINEAR when
    absent). For enhanced multi-frame objects each frame's Pixel Value
    Transformation Sequence and Frame VOI LUT Sequence are taken from the
    Per-frame Functional Groups, else the Shared Functional Groups, else the
    top-level attributes; frames that all agree share one FrameTransform.

    Not supported yet: a Modality LUT Sequence raises DicomError (its
    table cannot be expressed as slope/intercept). A VOI LUT Sequence is
    ignored (logged as a warning): the image then has only the windows
    present, possibly none, and must be preprocessed with a fixed window or
    value range.

    Args:
        source: a path (str or os.PathLike), the file's bytes (bytes,
            bytearray, memoryview, or an ``mmap.mmap`` of the file: all of
            it, whatever its position), a binary file object, or a
            ``pydicom.Dataset`` (not modified). Pixels read from ``bytes``
            may be a read-only view of them; from a bytearray, memoryview or
            mmap they are copied (the caller may change or close those).
        max_pixels: refuse images whose header claims more than this many
            pixels (rows * columns * frames), before decoding anything.
        force: also read data without the DICOM File Meta Information
            (no preamble / 'DICM' prefix), as pydicom's ``dcmread(force=True)``.
            Off by default: with it, arbitrary bytes parse into nonsense.

    Returns:
        The Image, with ``sop_instance_uid`` set from SOP Instance UID when
        it is present and a valid UID.

    Raises:
        DicomError: the source is not readable DICOM, has no (or truncated)
            pixel data, needs a decoder that is not installed (the message
            says what to pip install), uses an unknown transfer syntax, is not
            single-sample greyscale (MONOCHROME1/2), exceeds ``max_pixels``
            (also a deflated dataset that would inflate beyond it), has a
            compressed frame whose own header disagrees with the DICOM header
            (checked before decoding), carries an invalid rescale or window,
            has a functional group of the wrong type, or decodes to an array
            that disagrees with its header. No other exception type leaves
            for any input; one that does is a bug.
        MissingDependency: pydicom is not installed.
        ValueError: ``max_pixels`` is not a positive integer.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    _import_pydicom()
    max_pixels = int(max_pixels)
    if _FAST_READER:
        # The common case (uncompressed little endian, no functional groups) without pydicom;
        # everything else, and any doubt, goes on to pydicom with what was already read.
        image = _fast_read(source, max_pixels)
        if image is not None:
            return image
    # pydicom's warnings and log records quote values from the file (a damaged UID brings the
    # patient's name along): none of them may reach the caller's logs while medge reads.
    with quiet_pydicom():
        try:
            dataset = _load_dataset(source, force, max_pixels)
            return _image_from_dataset(dataset, max_pixels)
        except MedgeError as exc:
            error = exc
    # Raised here, outside the except block, so that Python does not attach the exception being
    # handled as __context__: a pydicom exception's message can hold raw bytes of the file,
    # patient name included. What went wrong is in the message (with the original type's name).
    raise _without_chain(error)


def _without_chain(error: BaseException) -> BaseException:
    error.__cause__ = None
    error.__context__ = None
    error.__suppress_context__ = True
    return error


# --------------------------------------------------------------------------- loading


def _import_pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401 - the pixel backend, imported once here
    except ImportError as exc:
        raise MissingDependency("pydicom", None, "Reading DICOM") from exc
    return pydicom


def _load_dataset(source: Any, force: bool, max_pixels: int) -> "Dataset":
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.errors import InvalidDicomError

    if isinstance(source, Dataset):
        return source
    opened = None
    if isinstance(source, (bytes, bytearray, memoryview, mmap.mmap)):
        stream: Any = _bytes_stream(source)
        what = "the data"
    elif isinstance(source, (str, os.PathLike)):
        what = "the file"
        try:
            stream = opened = open(os.fspath(source), "rb")
        except OSError as exc:
            raise DicomError(f"cannot read {what}: {exc.strerror or type(exc).__name__}") from None
        except (TypeError, ValueError) as exc:  # e.g. a path with a NUL character
            raise DicomError(f"cannot read {what}: the path is invalid ({type(exc).__name__})") from None
    elif isinstance(source, (Image, np.ndarray)):
        raise DicomError(
            f"read_dicom reads DICOM, not a {type(source).__name__}: an Image or an array of stored values "
            "needs no reading (pass it to medge.preprocess directly; arrays via Image.from_array)"
        )
    elif hasattr(source, "read"):
        stream = source
        what = "the stream"
    else:
        raise DicomError(
            f"cannot read DICOM from a {type(source).__name__}: pass a path, bytes, a binary file "
            "object or a pydicom Dataset"
        )
    # File names are left out of messages on purpose: they often carry patient
    # names. The caller knows which file it passed.
    try:
        _refuse_deflate_bomb(stream, force, max_pixels, what)
        return dcmread(stream, force=force)
    except DicomError:
        raise
    except InvalidDicomError:
        raise DicomError(
            f"{what} is not DICOM: no 'DICM' prefix / File Meta Information (a bare dataset "
            "without them can be read with force=True)"
        ) from None
    except OSError as exc:
        if exc.strerror:  # the operating system's reason (permissions, I/O error), not pydicom's
            raise DicomError(f"cannot read {what}: {exc.strerror}") from None
        # pydicom raises bare OSError for data that ends where an element needs more bytes.
        raise DicomError(f"cannot parse {what} (OSError): it is truncated, damaged or not DICOM") from None
    except Exception as exc:  # pydicom raises many types on damaged input
        raise DicomError(
            f"cannot parse {what} ({type(exc).__name__}): it is damaged or not DICOM"
        ) from None
    finally:
        if opened is not None:
            opened.close()


def _bytes_stream(source: Union[bytes, bytearray, memoryview, mmap.mmap]) -> io.BytesIO:
    """A stream over the bytes of ``source``, whatever its memory layout."""
    if isinstance(source, mmap.mmap):
        try:
            return io.BytesIO(memoryview(source))  # the whole mapping (copied), wherever its position
        except (ValueError, TypeError, BufferError) as exc:  # a closed mapping
            raise DicomError(f"cannot read the data from this memory map ({type(exc).__name__})") from None
    if isinstance(source, memoryview):
        try:
            # BytesIO needs one contiguous run of bytes; tobytes() copies any layout (strided,
            # multi-byte items) in logical order. A released view raises ValueError.
            if not source.contiguous or source.ndim != 1 or source.itemsize != 1:
                source = source.tobytes()
            return io.BytesIO(source)
        except (ValueError, TypeError, BufferError) as exc:
            raise DicomError(f"cannot read the data from this memoryview ({type(exc).__name__})") from None
    return io.BytesIO(source)


_DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
#: Headroom above the largest pixel data max_pixels allows, for everything else in a deflated dataset.
_DEFLATED_HEADER_ALLOWANCE = 64 << 20


def _refuse_deflate_bomb(stream: Any, force: bool, max_pixels: int, what: str) -> None:
    """Refuse a Deflated Explicit VR Little Endian file that inflates beyond what ``max_pixels`` allows.

    pydicom inflates the whole dataset in memory at dcmread, before any header
    is checked, and deflate compresses up to about 1000:1: a 2 MB file becomes
    2 GB. The inflated size is counted here, in bounded chunks and without
    keeping the output, and the stream is put back where it was. Anything this
    peek cannot parse is left for dcmread to report.
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        start = stream.tell()
    except Exception:  # not seekable: dcmread reads it once, nothing to peek at
        return
    try:
        read_preamble(stream, force)
        meta = _read_file_meta_info(stream)
        transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "")
    except Exception:
        transfer_syntax = ""
    try:
        if transfer_syntax.strip(" \x00") != _DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            return
        limit = max_pixels * 8 + _DEFLATED_HEADER_ALLOWANCE  # 8 bytes: Double Float Pixel Data
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = 0
        while not inflater.eof:
            pending = stream.read(1 << 20)
            if not pending:
                break
            while pending and not inflater.eof:
                try:
                    inflated += len(inflater.decompress(pending, 1 << 24))
                except zlib.error:
                    return  # damaged: dcmread says so
                if inflated > limit:
                    raise DicomError(
                        f"{what} is Deflated Explicit VR Little Endian and inflates to more than {limit} bytes, "
                        f"above what the limit of {max_pixels} pixels (max_pixels) allows; refused before "
                        "inflating it"
                    )
                pending = inflater.unconsumed_tail
    finally:
        stream.seek(start)


# --------------------------------------------------------------------------- element access


@functools.lru_cache(maxsize=None)
def _tag_of(keyword: str):
    from pydicom.datadict import tag_for_keyword
    from pydicom.tag import Tag

    return Tag(tag_for_keyword(keyword))


def _value(ds: "Dataset", keyword: str, where: str) -> Any:
    """Element value, or None when absent or empty. Parsing errors become DicomError."""
    try:
        # One lookup by tag (keywords resolved once): `keyword in ds` then `ds[keyword]` looked it up
        # twice and was the largest cost of reading a header.
        element = ds.get(_tag_of(keyword))
        if element is None:
            return None
        value = element.value
    except Exception as exc:  # lazy parsing of a damaged element
        raise DicomError(f"{where}{_tag_name(keyword)} cannot be parsed ({type(exc).__name__})") from exc
    return None if _is_empty(value) else value


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip(" \x00") == ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value) == 0  # pixel data: never copy or scan it here
    try:
        return len(value) == 0  # MultiValue, Sequence
    except TypeError:
        return False


def _tag_name(keyword: str) -> str:
    """'Number of Frames (0028,0008)' for 'NumberOfFrames': how messages name an element."""
    from pydicom.datadict import dictionary_description, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:  # pragma: no cover - only dictionary keywords are passed
        return keyword
    return f"{dictionary_description(tag)} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _as_list(value: Any) -> list:
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        return list(value)
    return [value]


def _int(ds: "Dataset", keyword: str, where: str, default: Optional[int] = None) -> int:
    value = _value(ds, keyword, where)
    if value is None:
        if default is None:
            raise DicomError(f"{where}{_tag_name(keyword)} is missing")
        return default
    values = _as_list(value)
    if len(values) != 1:
        raise DicomError(f"{where}{_tag_name(keyword)} must hold one value, it holds {len(values)}")
    try:
        if isinstance(values[0], (bytes, bytearray)) or (
            isinstance(values[0], float) and not values[0].is_integer()
        ):
            raise ValueError
        return int(values[0])
    except (TypeError, ValueError) as exc:
        raise DicomError(f"{where}{_tag_name(keyword)} is not a valid integer") from exc


def _floats(ds: "Dataset", keyword: str, where: str) -> Optional[list[float]]:
    value = _value(ds, keyword, where)
    if value is None:
        return None
    try:
        return [float(v) for v in _as_list(value)]
    except (TypeError, ValueError) as exc:
        raise DicomError(f"{where}{_tag_name(keyword)} is not a valid number") from exc


def _float(ds: "Dataset", keyword: str, where: str, default: float) -> float:
    values = _floats(ds, keyword, where)
    if values is None:
        return default
    if len(values) != 1:
        raise DicomError(f"{where}{_tag_name(keyword)} must hold one value, it holds {len(values)}")
    if not math.isfinite(values[0]):
        raise DicomError(f"{where}{_tag_name(keyword)} must be a finite number, got {values[0]!r}")
    return values[0]


def _code_string(ds: "Dataset", keyword: str, where: str) -> Optional[str]:
    value = _value(ds, keyword, where)
    if value is None:
        return None
    values = _as_list(value)
    if len(values) != 1 or not isinstance(values[0], str):
        raise DicomError(f"{where}{_tag_name(keyword)} must hold one text value")
    return values[0].strip(" \x00")


def _valid_uid(value: Any) -> Optional[str]:
    """The UID as a string when it is syntactically valid (so it may be shown), else None."""
    if value is None:
        return None
    text = str(value).strip(" \x00")
    return text if len(text) <= 64 and _UID_RE.match(text) else None


# --------------------------------------------------------------------------- header


def _pixel_keyword(ds: "Dataset") -> str:
    present = []
    for keyword in _PIXEL_KEYWORDS:
        try:
            if keyword in ds:
                present.append(keyword)
        except Exception as exc:  # pragma: no cover - containment checks do not parse
            raise DicomError(f"cannot inspect the dataset ({type(exc).__name__})") from exc
    if not present:
        kind = ""
        sop_class = _valid_uid(_value_or_none(ds, "SOPClassUID"))
        if sop_class:
            from pydicom.uid import UID

            name = UID(sop_class).name
            if name != sop_class:  # only registered SOP Class names are shown, never a raw value
                kind = f" (SOP Class {name})"
        raise DicomError(
            f"the dataset has no pixel data{kind}: no Pixel Data, Float Pixel Data or Double Float "
            "Pixel Data element (or the file is truncated before it)"
        )
    if len(present) > 1:
        raise DicomError(f"the dataset has {len(present)} pixel data elements; only one is allowed")
    return present[0]


def _value_or_none(ds: "Dataset", keyword: str) -> Any:
    try:
        return _value(ds, keyword, "")
    except DicomError:
        return None


def _transfer_syntax(ds: "Dataset", pixel_keyword: str) -> str:
    """The Transfer Syntax UID the pixel data is encoded with."""
    meta = getattr(ds, "file_meta", None)
    raw = _value(meta, "TransferSyntaxUID", "File Meta Information ") if meta is not None else None
    if raw is not None:
        uid = _valid_uid(raw)
        if uid is None:
            raise DicomError("Transfer Syntax UID (0002,0010) is not a valid UID")
        return uid
    # No transfer syntax (a bare dataset read with force=True, or one built in
    # memory). Native pixel data can still be decoded: only the byte order
    # matters, and pydicom records the one it read with.
    try:
        element = ds[pixel_keyword]
        value = element.value
    except Exception as exc:
        raise DicomError(f"{_PIXEL_TAG_NAMES[pixel_keyword]} cannot be parsed ({type(exc).__name__})") from exc
    if getattr(element, "is_undefined_length", False) or (
        isinstance(value, (bytes, bytearray)) and bytes(value[:4]) == _ENCAPSULATION_ITEM_TAG
    ):
        raise DicomError(
            "the dataset has no Transfer Syntax UID (0002,0010) and its Pixel Data is encapsulated "
            "(compressed), so its compression is unknown: set file_meta.TransferSyntaxUID"
        )
    little_endian = getattr(ds, "original_encoding", (None, None))[1]
    uid = _EXPLICIT_VR_BIG_ENDIAN if little_endian is False else _EXPLICIT_VR_LITTLE_ENDIAN
    _LOG.debug("no Transfer Syntax UID: decoding native pixel data as %s", uid)
    return uid


_Rescale = Optional[tuple[float, float]]
_Voi = Optional[tuple[tuple[Window, ...], str]]


def _transform_at(ds: Optional["Dataset"], where: str, ignored_luts: list) -> tuple[_Rescale, _Voi]:
    """(slope, intercept) and (windows, VOI function) found directly in ``ds``; None where absent.

    A VOI LUT Sequence without windows is recorded in ``ignored_luts`` (the
    caller logs it once, not once per frame).
    """
    if ds is None:
        return None, None
    if _value(ds, "ModalityLUTSequence", where) is not None:
        raise DicomError(
            f"{where}Modality LUT Sequence (0028,3000) is not supported yet: medge applies the "
            "Modality LUT as Rescale Slope/Intercept only"
        )
    rescale = None
    if _value(ds, "RescaleSlope", where) is not None or _value(ds, "RescaleIntercept", where) is not None:
        slope = _float(ds, "RescaleSlope", where, 1.0)
        intercept = _float(ds, "RescaleIntercept", where, 0.0)
        if slope == 0:
            raise DicomError(f"{where}Rescale Slope (0028,1053) is 0: every pixel would map to the intercept")
        rescale = (slope, intercept)

    centers = _floats(ds, "WindowCenter", where)
    widths = _floats(ds, "WindowWidth", where)
    function = _code_string(ds, "VOILUTFunction", where)
    has_voi_lut = _value(ds, "VOILUTSequence", where) is not None
    if centers is None and widths is None:
        if has_voi_lut:
            # Decision: a VOI LUT table is not applied (yet) and not an error
            # either: the image stays usable with a fixed window or range.
            # "No windows" is returned (not None) so that a frame's own LUT is
            # not replaced by shared or top-level windows it did not ask for.
            ignored_luts.append(where)
            return rescale, ((), "LINEAR")
        return rescale, None
    if centers is None or widths is None:
        missing = "Window Width (0028,1051)" if widths is None else "Window Center (0028,1050)"
        raise DicomError(f"{where}{missing} is missing while its counterpart is present")
    if len(centers) != len(widths):
        raise DicomError(
            f"{where}Window Center (0028,1050) has {len(centers)} value(s) but Window Width (0028,1051) "
            f"has {len(widths)}"
        )
    if function is None:
        function = "LINEAR"  # PS3.3 C.11.2.1.3: absent VOI LUT Function means LINEAR
    elif function not in VOI_FUNCTIONS:
        # The value itself is not quoted: no string from the file reaches a message.
        raise DicomError(
            f"{where}VOI LUT Function (0028,1056) has an unsupported value "
            f"(supported: {', '.join(VOI_FUNCTIONS)})"
        )
    explanations: list[Optional[str]] = [None] * len(centers)
    value = _value_or_none(ds, "WindowCenterWidthExplanation")
    if value is not None:
        texts = [str(v).strip(" \x00") or None for v in _as_list(value)]
        if len(texts) == len(centers):
            explanations = texts
    windows = tuple(Window(c, w, e) for c, w, e in zip(centers, widths, explanations))
    for index, window in enumerate(windows):
        try:
            window.validate(function)
        except DicomError as exc:
            raise DicomError(f"{where}window {index}: {exc}") from exc
    return rescale, (windows, function)


def _sequence(ds: Optional["Dataset"], keyword: str, where: str) -> Optional[list]:
    """The items of sequence ``keyword`` in ``ds`` (each a Dataset), or None when absent or empty.

    A damaged file can carry the element with another VR (text, numbers, bytes); indexing or
    measuring such a value raised TypeError out of read_dicom, so the type is checked here.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    if ds is None:
        return None
    value = _value(ds, keyword, where)
    if value is None:
        return None
    if not isinstance(value, Sequence):
        raise DicomError(f"{where}{_tag_name(keyword)} is not a sequence (wrong VR): the file is damaged")
    try:
        items = list(value)
    except Exception as exc:
        raise DicomError(f"{where}{_tag_name(keyword)} cannot be parsed ({type(exc).__name__})") from None
    if not all(isinstance(item, Dataset) for item in items):
        raise DicomError(f"{where}{_tag_name(keyword)} holds an item that is not a dataset: the file is damaged")
    return items


def _sequence_item(ds: Optional["Dataset"], keyword: str, where: str) -> Optional["Dataset"]:
    """The first item of sequence ``keyword`` in ``ds``, or None."""
    items = _sequence(ds, keyword, where)
    return items[0] if items else None


def _first(*options):
    return next((option for option in options if option is not None), None)


def _frame_transforms(ds: "Dataset", frames: int) -> tuple[FrameTransform, ...]:
    """One FrameTransform, or one per frame when an enhanced object's frames differ."""
    ignored_luts: list[str] = []
    top_rescale, top_voi = _transform_at(ds, "", ignored_luts)
    shared = _sequence_item(ds, "SharedFunctionalGroupsSequence", "")
    per_frame_seq = _sequence(ds, "PerFrameFunctionalGroupsSequence", "")
    if shared is None and per_frame_seq is None:
        transforms = [_make_transform(top_rescale, top_voi, "")]
    else:
        where = "Shared Functional Groups: "
        shared_rescale, _ = _transform_at(_sequence_item(shared, "PixelValueTransformationSequence", where),
                                          where, ignored_luts)
        _, shared_voi = _transform_at(_sequence_item(shared, "FrameVOILUTSequence", where), where, ignored_luts)
        if per_frame_seq is None:
            # Every frame has the shared (else top-level) transform: one, not a loop over frames
            # (a header may claim millions of tiny frames).
            transforms = [_make_transform(_first(shared_rescale, top_rescale), _first(shared_voi, top_voi), "")]
        else:
            if len(per_frame_seq) != frames:
                raise DicomError(
                    f"Per-frame Functional Groups Sequence (5200,9230) has {len(per_frame_seq)} item(s) for "
                    f"{frames} frame(s)"
                )
            transforms = []
            for index, item in enumerate(per_frame_seq):
                where = f"frame {index}: "
                rescale, _ = _transform_at(_sequence_item(item, "PixelValueTransformationSequence", where),
                                           where, ignored_luts)
                _, voi = _transform_at(_sequence_item(item, "FrameVOILUTSequence", where), where, ignored_luts)
                # Per-frame overrides shared; top-level is the last fallback.
                transforms.append(_make_transform(_first(rescale, shared_rescale, top_rescale),
                                                  _first(voi, shared_voi, top_voi), where))
    if ignored_luts:
        _LOG.warning(
            "VOI LUT Sequence (0028,3010) ignored (%s): medge does not apply VOI LUT tables yet; "
            "preprocess this image with a fixed window or value range",
            ", ".join(w.rstrip(": ") or "top level" for w in ignored_luts[:3])
            + (f" and {len(ignored_luts) - 3} more" if len(ignored_luts) > 3 else ""),
        )
    if all(t == transforms[0] for t in transforms):
        return (transforms[0],)
    return tuple(transforms)


def _make_transform(rescale, voi, where: str) -> FrameTransform:
    slope, intercept = rescale if rescale is not None else (1.0, 0.0)
    windows, function = voi if voi is not None else ((), "LINEAR")
    transform = FrameTransform(rescale_slope=slope, rescale_intercept=intercept, windows=windows,
                               voi_function=function)
    try:
        transform.validate()
    except DicomError as exc:
        raise DicomError(f"{where}{exc}") from exc
    return transform


# --------------------------------------------------------------------------- decoding


def _decoder_for(transfer_syntax: str):
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(transfer_syntax)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        if uid.is_transfer_syntax:
            raise DicomError(
                f"pixel data in {uid.name} ({uid}) cannot be decoded: pydicom has no decoder for this "
                "transfer syntax; convert the file to an uncompressed, RLE or JPEG 2000 transfer syntax"
            ) from exc
        raise DicomError(
            f"unknown Transfer Syntax UID {uid}: not a transfer syntax pydicom knows (private or "
            "invalid), so the pixel data cannot be decoded"
        ) from exc
    if not decoder.is_available:
        hint = _DECODER_INSTALL_HINTS.get(str(uid), "install a pydicom decoding plugin for it")
        extra = ' (all of them: pip install "medge[codecs]")' if str(uid) in _DECODER_INSTALL_HINTS else ""
        raise DicomError(f"no decoder for {uid.name} ({uid}) pixel data is installed: {hint}{extra}")
    return decoder


def _image_from_dataset(ds: "Dataset", max_pixels: int) -> Image:
    pixel_keyword = _pixel_keyword(ds)
    transfer_syntax = _transfer_syntax(ds, pixel_keyword)

    samples = _int(ds, "SamplesPerPixel", "", default=None)
    photometric_raw = _code_string(ds, "PhotometricInterpretation", "")
    if photometric_raw is None:
        raise DicomError("Photometric Interpretation (0028,0004) is missing")
    if photometric_raw not in GREYSCALE_PHOTOMETRICS or samples != 1:
        shown = photometric_raw if photometric_raw in _KNOWN_PHOTOMETRICS else "an unknown value"
        raise DicomError(
            f"Photometric Interpretation {shown} with {samples} sample(s) per pixel is not supported: "
            "medge preprocesses single-sample greyscale images (MONOCHROME1, MONOCHROME2)"
        )
    rows = _int(ds, "Rows", "")
    columns = _int(ds, "Columns", "")
    frames = _int(ds, "NumberOfFrames", "", default=1)
    if rows < 1 or columns < 1 or frames < 1:
        raise DicomError(f"the image has no pixels: {rows} rows x {columns} columns x {frames} frame(s)")
    bits_allocated = _int(ds, "BitsAllocated", "")
    if pixel_keyword == "PixelData":
        bits_stored = _int(ds, "BitsStored", "")
        pixel_representation = _int(ds, "PixelRepresentation", "")
        if bits_allocated == 1:
            raise DicomError("Bits Allocated 1 (bit-packed pixels, e.g. a segmentation) is not supported")
        if bits_allocated not in (8, 16, 32):
            raise DicomError(f"Bits Allocated {bits_allocated} is not supported (supported: 8, 16, 32)")
        if not 1 <= bits_stored <= bits_allocated:
            raise DicomError(f"Bits Stored ({bits_stored}) must be between 1 and Bits Allocated ({bits_allocated})")
        if pixel_representation not in (0, 1):
            raise DicomError(f"Pixel Representation must be 0 or 1, got {pixel_representation}")
        expected_dtype = np.dtype(f"{'i' if pixel_representation else 'u'}{bits_allocated // 8}")
    else:
        expected_bits = 32 if pixel_keyword == "FloatPixelData" else 64
        if bits_allocated != expected_bits:
            raise DicomError(
                f"Bits Allocated is {bits_allocated} but {_PIXEL_TAG_NAMES[pixel_keyword]} requires {expected_bits}"
            )
        bits_stored, pixel_representation = bits_allocated, 0
        expected_dtype = np.dtype(f"f{bits_allocated // 8}")

    # Decompression-bomb guard: refuse before any decoder allocates the output.
    pixels_claimed = rows * columns * frames
    if pixels_claimed > max_pixels:
        raise DicomError(
            f"the header claims {frames} frame(s) of {rows} x {columns} = {pixels_claimed} pixels, above "
            f"the limit of {max_pixels} (max_pixels)"
        )

    decoder = _decoder_for(transfer_syntax)
    data = _value(ds, pixel_keyword, "")
    if data is None:
        raise DicomError(f"{_PIXEL_TAG_NAMES[pixel_keyword]} is empty")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        # Text or numbers: the element was written (or damaged) with a VR that is not OB/OW/OF/OD, or a
        # Dataset built in memory was given a bytearray (pydicom turns that into a list of numbers).
        raise DicomError(
            f"{_PIXEL_TAG_NAMES[pixel_keyword]} does not hold bytes: the file is damaged (wrong VR), or a "
            "Dataset built in memory was given something other than bytes or a memoryview"
        )
    extended_offsets = None
    if decoder.is_encapsulated:
        # Each frame's own header against the DICOM header, before a decoder trusts the former.
        extended_offsets = _extended_offsets(ds)
        _check_encapsulated_frames(data, transfer_syntax, extended_offsets, rows, columns, frames, bits_allocated)
    else:
        expected_bytes = pixels_claimed * bits_allocated // 8
        actual = len(data)
        if actual < expected_bytes:
            raise DicomError(
                f"{_PIXEL_TAG_NAMES[pixel_keyword]} is truncated: {actual} bytes, the header needs "
                f"{expected_bytes} ({frames} frame(s) of {rows} x {columns} x {bits_allocated} bits)"
            )
    # After the pixel data checks: they bound the frame count by the file's size.
    transforms = _frame_transforms(ds, frames)

    if (not decoder.is_encapsulated and pixel_keyword == "PixelData"
            and transfer_syntax in _NATIVE_LITTLE_ENDIAN and bits_allocated in (8, 16, 32)):
        # Native little-endian data needs no decoder: view the element's bytes in place (zero copy;
        # the length was checked above). pydicom's pixel_array would copy and re-shift them, the
        # largest single cost of reading a CT slice.
        array = np.frombuffer(data, dtype=expected_dtype.newbyteorder("<"), count=pixels_claimed)
        array = array.reshape(frames, rows, columns)
        # A bytearray or memoryview given in a Dataset would make the view writable: the masking
        # below must copy rather than change the caller's dataset.
        array.flags.writeable = False
        if not array.flags.aligned:
            # Bytes at an odd address (a memoryview slice put into a Dataset): the kernels read whole
            # elements, so give them an aligned copy.
            array = array.copy()
    else:
        array = _decode(decoder, ds, transfer_syntax, rows, columns, frames, bits_allocated, bits_stored,
                        pixel_representation, photometric_raw, extended_offsets)

    array = _normalise_array(array, expected_dtype, rows, columns, frames, bits_stored, pixel_representation)
    semantics = PixelSemantics(
        rows=rows,
        columns=columns,
        number_of_frames=frames,
        bits_allocated=array.dtype.itemsize * 8,
        bits_stored=min(bits_stored, array.dtype.itemsize * 8),
        pixel_representation=pixel_representation,
        photometric_interpretation=photometric_raw,
        frames=transforms,
    )
    sop_instance_uid = _valid_uid(_value_or_none(ds, "SOPInstanceUID"))
    if sop_instance_uid is None and getattr(ds, "file_meta", None) is not None:
        sop_instance_uid = _valid_uid(_value_or_none(ds.file_meta, "MediaStorageSOPInstanceUID"))
    image = Image(array, semantics, sop_instance_uid, _acquisition(ds))
    _LOG.debug(
        "read %s: %d frame(s) of %d x %d %s (bits stored %d), transfer syntax %s, %d frame transform(s)",
        sop_instance_uid or "(no SOP Instance UID)", frames, rows, columns, array.dtype, bits_stored,
        transfer_syntax, len(transforms),
    )
    return image


# Modality defined terms (PS3.3 C.7.3.1.1.1, including retired ones still met in archives) and Body Part
# Examined defined terms (PS3.16 CID 4031, the common ones). Only these are recorded in a bundle's envelope
# or named in a message: any other string read from a file could be free text, so it becomes "non-standard".
_MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DMS DG DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL IVOCT "
    "IVUS KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX REG RESP "
    "RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN "
    "TEXTUREMAP TG US VA XA XAPROTOCOL XC CD CF CP CS DF DM DS EC FA FS LP MA MS OPR ST VF".split())
_BODY_PARTS = frozenset(
    "ABDOMEN ABDOMENPELVIS ADRENAL ANKLE AORTA ARM AXILLA BACK BLADDER BRAIN BREAST BRONCHUS BUTTOCK CALCANEUS "
    "CALF CAROTID CEREBELLUM CERVIX CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS CLAVICLE COCCYX COLON "
    "CORNEA CORONARYARTERY CSPINE CTSPINE DUODENUM EAR ELBOW ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR FINGER "
    "FOOT GALLBLADDER HAND HEAD HEADNECK HEART HIP HUMERUS IAC ILEUM ILIUM JAW JEJUNUM KIDNEY KNEE LARYNX LEG "
    "LIVER LSPINE LSSPINE LUNG MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE "
    "ORBIT OVARY PANCREAS PAROTID PATELLA PELVIS PENIS PHARYNX PROSTATE RECTUM RIB SACRUM SCAPULA SCLERA SCROTUM "
    "SHOULDER SKULL SPINE SPLEEN SSPINE STERNUM STOMACH SUBMANDIBULAR TESTIS THIGH THUMB THYMUS THYROID TOE "
    "TONGUE TRACHEA TSPINE TLSPINE UPRGASTRO UTERUS VAGINA VULVA WHOLEBODY WRIST ZYGOMA".split())


def _defined_term(ds: "Dataset", keyword: str, terms: frozenset) -> Optional[str]:
    value = _value_or_none(ds, keyword)  # a damaged optional element is treated as absent
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip().upper()
    return value if value in terms else "non-standard"


def _spacing(ds: "Dataset") -> Optional[tuple[float, float]]:
    """(row, column) spacing in mm: Pixel Spacing, the shared/first per-frame Pixel Measures, or Imager Pixel Spacing."""
    candidates = [ds]
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            item = _sequence_item(ds, group, "")
            measures = _sequence_item(item, "PixelMeasuresSequence", "") if item is not None else None
        except DicomError:  # malformed optional groups: no spacing (the envelope treats it as absent)
            measures = None
        if measures is not None:
            candidates.append(measures)
    for source in candidates:
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            try:
                values = _floats(source, keyword, "")
            except DicomError:
                values = None
            if values and len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
                return (float(values[0]), float(values[1]))
    return None


def _acquisition(ds: "Dataset") -> Acquisition:
    """Modality, body part and spacing for the envelope check: defined terms only, never free text."""
    return Acquisition(modality=_defined_term(ds, "Modality", _MODALITIES),
                       body_part=_defined_term(ds, "BodyPartExamined", _BODY_PARTS),
                       pixel_spacing_mm=_spacing(ds))


def _decode(decoder, ds, transfer_syntax, rows, columns, frames, bits_allocated, bits_stored, pixel_representation,
            photometric_raw, extended_offsets) -> np.ndarray:
    """Decode through pydicom's decoder (compressed or big-endian data)."""
    options = {}
    attempts = [""]  # native data: no plugin to choose
    if decoder.is_encapsulated:
        # The frames the headers were checked in: pydicom would otherwise take the Extended Offset
        # Table from the dataset itself (when only one of its two elements is present: AttributeError).
        options["extended_offsets"] = extended_offsets
        # Every installed plugin, one at a time: the fastest first, then the others in pydicom's
        # own order (as pydicom does when none is named, but a plugin's panic does not end it).
        preferred = decoding_plugin(transfer_syntax, decoder)
        attempts = [preferred] if preferred else []
        attempts += [name for name in _installed_plugins(decoder) if name != preferred]
    failure = None
    for plugin in attempts:
        try:
            array, _ = decoder.as_array(
                ds,
                raw=True,  # no colour conversion; greyscale anyway
                # Override pydicom's own parsing of the header with the values
                # validated above, and never return more frames than announced.
                rows=rows, columns=columns, number_of_frames=frames, samples_per_pixel=1,
                bits_allocated=bits_allocated, bits_stored=bits_stored,
                pixel_representation=pixel_representation, photometric_interpretation=photometric_raw,
                allow_excess_frames=False, decoding_plugin=plugin, **options,
            )
            return array
        except BaseException as exc:  # plugins raise RuntimeError, ValueError, their own types...
            if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
                raise  # KeyboardInterrupt, SystemExit
            # pyo3's PanicException (pylibjpeg-rle on damaged data: "index out of bounds") is a
            # BaseException that pydicom's own plugin loop lets through: a damaged file, not a crash.
            failure = type(exc).__name__
    from pydicom.uid import UID

    raise DicomError(
        f"the {UID(transfer_syntax).name} pixel data could not be decoded ({failure}): "
        "the compressed data is damaged or inconsistent with the header"
    )


#: The pydicom decoding plugin medge asks for, per transfer syntax, fastest first: the first one
#: installed is used (tools/bench_read.py measures them; medge[codecs] installs the first of each).
#: 512 x 512 12-bit CT on a 2-core EPYC, CPU ms per frame: RLE pylibjpeg-rle 0.8 / pydicom 4.0;
#: JPEG baseline pillow 0.7 / pylibjpeg 1.9 / gdcm 1.6; JPEG lossless gdcm 5.7 / pylibjpeg 10.3;
#: JPEG-LS pyjpegls 5.0 / gdcm 6.5 / pylibjpeg 20.8; JPEG 2000 pylibjpeg 29 = pillow = gdcm (gdcm
#: in several threads); 12-bit JPEG and HTJ2K: only pylibjpeg decodes them.
DECODING_PLUGINS = {
    "1.2.840.10008.1.2.5": ("pylibjpeg", "pydicom"),  # RLE Lossless (pylibjpeg-rle)
    "1.2.840.10008.1.2.4.50": ("pillow", "pylibjpeg", "gdcm"),  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": ("pylibjpeg", "gdcm", "pillow"),  # JPEG Extended (12-bit: pylibjpeg)
    "1.2.840.10008.1.2.4.57": ("gdcm", "pylibjpeg"),  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": ("gdcm", "pylibjpeg"),  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": ("pyjpegls", "gdcm", "pylibjpeg"),  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": ("pyjpegls", "gdcm", "pylibjpeg"),  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": ("pylibjpeg", "pillow", "gdcm"),  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": ("pylibjpeg", "pillow", "gdcm"),  # JPEG 2000
    "1.2.840.10008.1.2.4.201": ("pylibjpeg",),  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": ("pylibjpeg",),  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": ("pylibjpeg",),  # HTJ2K
}


def _installed_plugins(decoder) -> list:
    """The decoder's installed plugins in the order pydicom tries them when none is named."""
    available = getattr(decoder, "_available", None)
    return list(available) if isinstance(available, dict) else list(decoder.available_plugins)


def decoding_plugin(transfer_syntax: str, decoder=None) -> str:
    """The pydicom decoding plugin read_dicom uses for ``transfer_syntax`` here ("" for pydicom's choice).

    The first of :data:`DECODING_PLUGINS` that is installed; "" when none is (or the syntax
    is not compressed), in which case pydicom tries its installed plugins in its own order.
    """
    if decoder is None:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(transfer_syntax)
        except NotImplementedError:
            return ""
    installed = decoder.available_plugins
    return next((name for name in DECODING_PLUGINS.get(str(transfer_syntax), ()) if name in installed), "")


# --------------------------------------------------------------------------- compressed frame headers

_JPEG_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                           "1.2.840.10008.1.2.4.70")
_JPEG_LS_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
_J2K_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                          "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")
_RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def _extended_offsets(ds: "Dataset") -> Optional[tuple[bytes, bytes]]:
    """The Extended Offset Table and its Lengths (7FE0,0001/0002) as raw bytes, or None when absent."""
    table = _value(ds, "ExtendedOffsetTable", "")
    lengths = _value(ds, "ExtendedOffsetTableLengths", "")
    if table is None and lengths is None:
        return None
    if not (isinstance(table, (bytes, bytearray)) and isinstance(lengths, (bytes, bytearray))
            and len(table) % 8 == 0 and len(table) == len(lengths)):
        raise DicomError(
            "Extended Offset Table (7FE0,0001) and Extended Offset Table Lengths (7FE0,0002) must both be "
            "present with the same number of 64-bit entries: the file is damaged"
        )
    return bytes(table), bytes(lengths)


def _check_encapsulated_frames(data, transfer_syntax: str, extended_offsets, rows: int, columns: int,
                               frames: int, bits_allocated: int) -> None:
    """Refuse encapsulated pixel data whose frames disagree with the DICOM header, before decoding.

    Splits the data into frames exactly as pydicom's decoder will (same helper,
    same frame count and offset tables), then reads each frame's own header:
    dimensions, components and bit depth (JPEG SOFn, JPEG-LS SOF55, JPEG 2000
    SIZ) or segment table (RLE). A decoder sizes its output from the frame, not
    from the DICOM header, so a lie there is a time and memory bomb (or a
    silently different image).
    """
    from pydicom.encaps import generate_fragmented_frames
    from pydicom.uid import UID

    name = UID(transfer_syntax).name
    try:
        # pydicom's parsers take bytes; a memoryview/bytearray Dataset value is copied once here.
        buffer = data if isinstance(data, bytes) else bytes(data)
        available = _frames_available(buffer, extended_offsets, frames)
        if available < frames:
            raise DicomError(
                f"the encapsulated {name} Pixel Data (7FE0,0010) holds at most {available} frame(s), the header "
                f"says {frames} (Number of Frames (0028,0008)): the file is truncated or damaged"
            )
        split = generate_fragmented_frames(buffer, number_of_frames=frames, extended_offsets=extended_offsets)
        found = 0
        for index, fragments in enumerate(split):
            if index == frames:
                break  # the decoder is told to return exactly `frames` frames
            _check_frame(b"".join(fragments), index, transfer_syntax, name, rows, columns, frames, bits_allocated)
            found += 1
    except DicomError:
        raise
    except Exception as exc:  # pydicom's encapsulation helpers raise ValueError, struct.error, ...
        raise DicomError(
            f"the encapsulated {name} Pixel Data (7FE0,0010) cannot be split into frames ({type(exc).__name__}): "
            "its item structure is damaged"
        ) from None
    if found < frames:
        raise DicomError(
            f"the encapsulated {name} Pixel Data (7FE0,0010) holds {found} frame(s), the header says {frames} "
            "(Number of Frames (0028,0008)): the file is truncated or damaged"
        )


def _frames_available(buffer: bytes, extended_offsets, frames: int) -> int:
    """How many frames the encapsulated data can hold: its offset table's entries, else its fragment count."""
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    if extended_offsets is not None:
        return len(extended_offsets[0]) // 8
    stream = io.BytesIO(buffer)
    offsets = parse_basic_offsets(stream)
    if offsets:
        return len(offsets)
    if frames == 1:
        return 1  # every fragment belongs to the one frame; an empty item list fails in the split
    return parse_fragments(stream)[0]  # without a table each frame needs at least one fragment


def _check_frame(frame: bytes, index: int, transfer_syntax: str, name: str, rows: int, columns: int,
                 frames: int, bits_allocated: int) -> None:
    where = f"frame {index} of the {name} pixel data" if frames > 1 else f"the {name} pixel data"
    try:
        if transfer_syntax == _RLE_LOSSLESS:
            segments = _codestream.rle_segment_lengths(frame)
            header = None
        elif transfer_syntax in _J2K_TRANSFER_SYNTAXES:
            header = _codestream.j2k_frame_header(frame)
        elif transfer_syntax in _JPEG_TRANSFER_SYNTAXES or transfer_syntax in _JPEG_LS_TRANSFER_SYNTAXES:
            header = _codestream.jpeg_frame_header(frame)
        else:
            # A compressed transfer syntax pydicom can decode but medge cannot check: decoding it
            # would trust its own dimensions, so it is refused rather than decoded unchecked.
            raise DicomError(
                f"{name} ({transfer_syntax}) pixel data is not supported: medge checks each compressed "
                "frame's header before decoding and cannot check this one; convert the file to an "
                "uncompressed, RLE, JPEG, JPEG-LS or JPEG 2000 transfer syntax"
            )
    except _codestream.CodestreamError as exc:
        raise DicomError(f"{where} is damaged: {exc}") from None

    if header is None:  # RLE: one segment per byte of each sample (PS3.5 G.2), and none too short to fill it
        expected = bits_allocated // 8
        if len(segments) != expected:
            raise DicomError(
                f"{where} has {len(segments)} RLE segment(s); Bits Allocated {bits_allocated} with one sample "
                f"per pixel needs {expected}"
            )
        # A two-byte replicate run decodes to at most 128 bytes (PackBits).
        shortest = 2 * -(-(rows * columns) // 128)
        for segment, length in enumerate(segments):
            if length < shortest:
                raise DicomError(
                    f"{where}: RLE segment {segment} has {length} bytes, too few to decode to {rows} x {columns} "
                    f"pixels (at least {shortest}): the data is truncated or the header's Rows/Columns are wrong"
                )
        return

    is_jpeg_ls = transfer_syntax in _JPEG_LS_TRANSFER_SYNTAXES
    if header.jpeg_ls != is_jpeg_ls:
        found = "JPEG-LS (SOF55)" if header.jpeg_ls else "JPEG (ISO/IEC 10918)"
        raise DicomError(f"{where} is a {found} codestream, which the transfer syntax does not allow")
    if (header.rows, header.columns) != (rows, columns):
        raise DicomError(
            f"{where} declares {header.rows} x {header.columns} pixels in its own header but Rows (0028,0010) x "
            f"Columns (0028,0011) say {rows} x {columns}; refused before decoding (the file is damaged or "
            "crafted: a decoder would trust the codestream)"
        )
    if header.tiles > _codestream.MAX_J2K_TILES:
        raise DicomError(
            f"{where} declares {header.tiles} tiles; the JPEG 2000 standard allows at most "
            f"{_codestream.MAX_J2K_TILES} (the file is damaged or crafted)"
        )
    if header.components != 1:
        raise DicomError(
            f"{where} declares {header.components} components but Samples per Pixel (0028,0002) is 1"
        )
    if not 1 <= header.precision <= bits_allocated:
        # Precision above Bits Stored is accepted (public JPEG 2000 files declare 16 bits for 14 stored;
        # the unused bits are masked), but not above the container.
        raise DicomError(
            f"{where} declares {header.precision} bits per sample but Bits Allocated (0028,0100) is "
            f"{bits_allocated}: the decoded values would not fit"
        )


def _normalise_array(array: np.ndarray, expected: np.dtype, rows: int, columns: int, frames: int,
                     bits_stored: int, pixel_representation: int) -> np.ndarray:
    """Check the decoded array against the header; return it (frames, rows, columns), native, masked."""
    if not isinstance(array, np.ndarray):
        raise DicomError(f"the decoder returned a {type(array).__name__}, not an array")
    if array.ndim == 2 and frames == 1:
        array = array[np.newaxis]
    if array.shape != (frames, rows, columns):
        # Guards against silent corruption: a decoder that returns fewer or
        # differently shaped pixels than the header announces.
        raise DicomError(
            f"the decoded pixel array has shape {array.shape} but the header says {frames} frame(s) of "
            f"{rows} x {columns}"
        )
    if array.dtype.kind != expected.kind or array.dtype.itemsize != expected.itemsize:
        raise DicomError(
            f"the decoded pixel array has dtype {array.dtype.newbyteorder('=')} but the header says "
            f"{expected} (Bits Allocated {expected.itemsize * 8}, Pixel Representation {pixel_representation})"
        )
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)

    if array.dtype.kind in "iu":
        container = array.dtype.itemsize * 8
        if bits_stored < container:
            if not array.flags.writeable:  # a zero-copy view of the file's bytes: mask a copy
                array = array.copy()
            # pydicom already masks / sign-extends unused high bits; doing it
            # again is idempotent and keeps the guarantee whatever the decoder.
            shift = container - bits_stored
            np.left_shift(array, shift, out=array)
            np.right_shift(array, shift, out=array)
        if array.dtype == np.int8:
            array = array.astype(np.int16)  # the kernels read no int8; widening is exact
        elif array.dtype == np.uint32:
            if bits_stored == 32 and array.size and int(array.max()) > np.iinfo(np.int32).max:
                raise DicomError(
                    "unsigned 32-bit pixel values above 2147483647 are not supported (the kernels read at "
                    "most int32)"
                )
            array = array.view(np.int32)  # every value fits: same bits, same numbers
    else:
        if array.dtype == np.float64:
            narrowed = array.astype(np.float32)
            if not np.array_equal(narrowed.astype(np.float64), array, equal_nan=True):
                raise DicomError(
                    "Double Float Pixel Data (7FE0,0009) holds values that float32 cannot represent "
                    "exactly; medge reads float pixel data as float32"
                )
            array = narrowed
        if not np.isfinite(array).all():
            raise DicomError("the float pixel data contains NaN or infinite values")
    return array


# --------------------------------------------------------------------------- fast reader
#
# Most images at the scanner are uncompressed little endian, single-frame or classic
# multi-frame, with no functional groups. For those, pydicom's parse of every element is
# most of read_dicom's time (issue 13). The fast reader:
#
# - reads the file into one buffer (paths) or takes the caller's buffer (bytes, bytearray,
#   memoryview, mmap);
# - has medge._C.scan_dicom walk the element headers (bounds-checked C++, no value is
#   converted there) and say where the elements read_dicom needs lie;
# - converts those few values here, replicating exactly what pydicom 3 and the full path
#   above make of them;
# - and hands the file to the full path (pydicom) whenever anything is outside that common
#   case or merely unusual: another transfer syntax, a structure pydicom would read
#   differently, a value that is not plainly valid, any condition the full path reports as
#   an error, a non-default pydicom configuration. It never raises DicomError itself, so
#   every error, message and log record comes from the full path as before.
#
# tests/test_reader_conformance.py proves the identity on every pydicom test file and on
# synthetic variants; tests/test_fuzz_dicom.py runs both readers on mutated files.

#: False: every read goes through pydicom (environment: MEDGE_DICOM_READER=pydicom).
_FAST_READER = os.environ.get("MEDGE_DICOM_READER", "").strip().lower() != "pydicom"

# What the fast reader asks the scanner about, sorted by tag: (tag, VR, kind). Kind 0: its value
# is converted here, and an explicit VR must be this one (Implicit VR files are read with it,
# which is pydicom's dictionary VR); kind 1: its mere presence sends the file to the full path
# (LUT sequences, functional groups, other pixel data elements: the full path interprets or
# refuses them); kind 2: Pixel Data (OB or OW).
_FAST_ELEMENTS = (
    (0x00020003, b"UI", 0),  # Media Storage SOP Instance UID
    (0x00020010, b"UI", 0),  # Transfer Syntax UID (the scanner accepts only the two native LE ones)
    (0x00080005, b"CS", 0),  # Specific Character Set
    (0x00080018, b"UI", 0),  # SOP Instance UID
    (0x00080060, b"CS", 0),  # Modality
    (0x00180015, b"CS", 0),  # Body Part Examined
    (0x00181164, b"DS", 0),  # Imager Pixel Spacing
    (0x00280002, b"US", 0),  # Samples per Pixel
    (0x00280004, b"CS", 0),  # Photometric Interpretation
    (0x00280008, b"IS", 0),  # Number of Frames
    (0x00280010, b"US", 0),  # Rows
    (0x00280011, b"US", 0),  # Columns
    (0x00280030, b"DS", 0),  # Pixel Spacing
    (0x00280100, b"US", 0),  # Bits Allocated
    (0x00280101, b"US", 0),  # Bits Stored
    (0x00280103, b"US", 0),  # Pixel Representation
    (0x00281050, b"DS", 0),  # Window Center
    (0x00281051, b"DS", 0),  # Window Width
    (0x00281052, b"DS", 0),  # Rescale Intercept
    (0x00281053, b"DS", 0),  # Rescale Slope
    (0x00281055, b"LO", 0),  # Window Center & Width Explanation
    (0x00281056, b"CS", 0),  # VOI LUT Function
    (0x00283000, b"SQ", 1),  # Modality LUT Sequence
    (0x00283010, b"SQ", 1),  # VOI LUT Sequence
    (0x52009229, b"SQ", 1),  # Shared Functional Groups Sequence
    (0x52009230, b"SQ", 1),  # Per-frame Functional Groups Sequence
    (0x7FE00008, b"OF", 1),  # Float Pixel Data
    (0x7FE00009, b"OD", 1),  # Double Float Pixel Data
    (0x7FE00010, b"OB", 2),  # Pixel Data
)
_FAST_SPEC = b"".join(struct.pack("<I2sBx", tag, vr, kind) for tag, vr, kind in _FAST_ELEMENTS)
_FAST_INDEX = {tag: index for index, (tag, _, _) in enumerate(_FAST_ELEMENTS)}
_I_MEDIA_STORAGE_SOP_INSTANCE_UID = _FAST_INDEX[0x00020003]
_I_SPECIFIC_CHARACTER_SET = _FAST_INDEX[0x00080005]
_I_SOP_INSTANCE_UID = _FAST_INDEX[0x00080018]
_I_MODALITY = _FAST_INDEX[0x00080060]
_I_BODY_PART_EXAMINED = _FAST_INDEX[0x00180015]
_I_IMAGER_PIXEL_SPACING = _FAST_INDEX[0x00181164]
_I_SAMPLES_PER_PIXEL = _FAST_INDEX[0x00280002]
_I_PHOTOMETRIC_INTERPRETATION = _FAST_INDEX[0x00280004]
_I_NUMBER_OF_FRAMES = _FAST_INDEX[0x00280008]
_I_ROWS = _FAST_INDEX[0x00280010]
_I_COLUMNS = _FAST_INDEX[0x00280011]
_I_PIXEL_SPACING = _FAST_INDEX[0x00280030]
_I_BITS_ALLOCATED = _FAST_INDEX[0x00280100]
_I_BITS_STORED = _FAST_INDEX[0x00280101]
_I_PIXEL_REPRESENTATION = _FAST_INDEX[0x00280103]
_I_WINDOW_CENTER = _FAST_INDEX[0x00281050]
_I_WINDOW_WIDTH = _FAST_INDEX[0x00281051]
_I_RESCALE_INTERCEPT = _FAST_INDEX[0x00281052]
_I_RESCALE_SLOPE = _FAST_INDEX[0x00281053]
_I_WINDOW_EXPLANATION = _FAST_INDEX[0x00281055]
_I_VOI_LUT_FUNCTION = _FAST_INDEX[0x00281056]

# Decimal strings (DS) as Python's float() reads them identically to pydicom's DSfloat, and
# integer strings (IS); anything else (inf, nan, underscores, other white space) is left to
# pydicom.
#: (Pixel Representation, bytes per sample) -> (the dtype, the file's little-endian dtype).
_FAST_DTYPES = {(representation, size): (np.dtype(f"{'iu'[representation == 0]}{size}"),
                                         np.dtype(f"<{'iu'[representation == 0]}{size}"))
                for representation in (0, 1) for size in (1, 2, 4)}
_DS_VALUE = re.compile(rb" *[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *")
_IS_VALUE = re.compile(rb" *[0-9]{1,10}")
_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]*")


class _Fallback(Exception):
    """The fast reader hands the file to the full path (internal; never leaves this module)."""


@functools.lru_cache(maxsize=1)
def _scanner():
    """medge._C.scan_dicom, or None when this build has no scanner (every read uses pydicom)."""
    try:
        from . import _C
    except ImportError:
        return None
    return getattr(_C, "scan_dicom", None)


@functools.lru_cache(maxsize=1)
def _pydicom_defaults():
    """pydicom's default configuration objects, captured once: the fast reader replicates them only."""
    from pydicom import config, hooks
    from pydicom.charset import python_encoding
    from pydicom.datadict import _dictionary_vr_fast

    return (config, hooks.hooks, hooks.raw_element_vr, hooks.raw_element_value, frozenset(python_encoding),
            _dictionary_vr_fast)


def _pydicom_configured_as_default() -> bool:
    """True when no pydicom setting that changes how values convert differs from its default."""
    config, hooks, raw_vr, raw_value, _, _ = _pydicom_defaults()
    return (config.settings.reading_validation_mode == config.WARN and not config.use_DS_decimal
            and not config.use_DS_numpy and not config.use_IS_numpy and config.assume_implicit_vr_switch
            and config.data_element_callback is None and hooks.raw_element_vr is raw_vr
            and hooks.raw_element_value is raw_value and not hooks.raw_element_kwargs)


def _fast_read(source: Any, max_pixels: int) -> Optional[Image]:
    """The Image when the fast reader handles ``source``, else None (the full path reads it).

    Never raises for any input: whatever it cannot vouch for goes to the full path. A file it
    read and hands back is read again there (from the page cache), rather than kept twice in
    memory while pydicom parses a copy.
    """
    scan = _scanner()
    if scan is None:
        return None
    owned = False  # the buffer is ours (a path read here): its header is wiped once converted
    try:
        if isinstance(source, bytes):
            buffer = source
        elif isinstance(source, (str, os.PathLike)):
            buffer = _read_file(source)
            if buffer is None:
                return None
            owned = True
        elif isinstance(source, (bytearray, memoryview, mmap.mmap)):
            buffer = memoryview(source)
            if buffer.ndim != 1 or buffer.itemsize != 1 or not buffer.contiguous:
                return None
        else:
            return None  # a Dataset, a stream, anything else: the full path
        if not _pydicom_configured_as_default():
            return None
        status, _reason, _at, implicit, values, pixel_offset, pixel_length, undefined = scan(buffer, _FAST_SPEC)
        if status != 0:
            return None
        return _fast_image(buffer, owned, source, implicit, values, pixel_offset, pixel_length, undefined,
                           max_pixels)
    except _Fallback:
        return None
    except Exception as exc:  # noqa: BLE001 - a surprise is a fallback, never a failure (the full path decides)
        _LOG.debug("fast DICOM reader: unexpected %s, reading with pydicom", type(exc).__name__)
        return None


def _read_file(path: Any) -> Optional[np.ndarray]:
    """The whole regular file at ``path`` as a uint8 array (one allocation, one read); None to fall back."""
    try:
        with open(os.fspath(path), "rb", buffering=0) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size < 132:
                return None
            size = info.st_size
            buffer = np.empty(size, dtype=np.uint8)
            view = memoryview(buffer)
            done = 0
            while done < size:  # the read syscall runs without the GIL
                got = handle.readinto(view[done:])
                if not got:
                    return None  # the file shrank while being read: pydicom reads it again
                done += got
            return buffer
    except (OSError, ValueError, TypeError):  # the full path reports it in its own words
        return None


class _FastHeader:
    """What a header's values mean, independent of the pixels and of the SOP Instance UID.

    Immutable once built (its semantics and acquisition are frozen dataclasses), so one
    instance serves every slice of a series whose headers hold the same values.
    """

    __slots__ = ("semantics", "acquisition", "frames", "rows", "columns", "count", "expected_bytes",
                 "bits_stored", "pixel_representation", "dtype", "stored_dtype")

    def __init__(self, values: tuple) -> None:
        samples = _fast_us(values[_I_SAMPLES_PER_PIXEL])
        photometric = _fast_code_string(values[_I_PHOTOMETRIC_INTERPRETATION])
        if photometric not in GREYSCALE_PHOTOMETRICS or samples != 1:
            raise _Fallback
        rows = _fast_us(values[_I_ROWS])
        columns = _fast_us(values[_I_COLUMNS])
        frames = _fast_is(values[_I_NUMBER_OF_FRAMES])
        bits_allocated = _fast_us(values[_I_BITS_ALLOCATED])
        bits_stored = _fast_us(values[_I_BITS_STORED])
        pixel_representation = _fast_us(values[_I_PIXEL_REPRESENTATION])
        if frames is None:
            frames = 1
        if (rows < 1 or columns < 1 or frames < 1 or bits_allocated not in (8, 16, 32)
                or not 1 <= bits_stored <= bits_allocated or pixel_representation not in (0, 1)):
            raise _Fallback
        charset = values[_I_SPECIFIC_CHARACTER_SET]
        if charset is not None:
            # pydicom converts it while reading; only its own terms are known to do so quietly.
            encodings = _pydicom_defaults()[4]
            if not all(name in encodings for name in charset.decode("latin-1").rstrip(" \x00").split("\\")):
                raise _Fallback
        # The container _normalise_array leaves: int8 widened to int16, uint32 viewed as int32.
        container = 16 if (bits_allocated, pixel_representation) == (8, 1) else bits_allocated
        self.semantics = PixelSemantics(rows=rows, columns=columns, number_of_frames=frames,
                                        bits_allocated=container, bits_stored=min(bits_stored, container),
                                        pixel_representation=pixel_representation,
                                        photometric_interpretation=photometric, frames=(_fast_transform(values),))
        try:
            # The transform and each window against its VOI function, as the full path checks them.
            self.semantics.validate()
        except DicomError:
            raise _Fallback from None
        self.acquisition = Acquisition(modality=_fast_defined_term(values[_I_MODALITY], _MODALITIES),
                                       body_part=_fast_defined_term(values[_I_BODY_PART_EXAMINED], _BODY_PARTS),
                                       pixel_spacing_mm=_fast_spacing(values))
        self.frames, self.rows, self.columns = frames, rows, columns
        self.count = rows * columns * frames
        self.expected_bytes = self.count * (bits_allocated // 8)
        self.bits_stored = bits_stored
        self.pixel_representation = pixel_representation
        self.dtype, self.stored_dtype = _FAST_DTYPES[pixel_representation, bits_allocated // 8]


#: Header values (all but the SOP Instance UIDs) -> their _FastHeader. Bounded: cleared when full.
_FAST_HEADERS: dict = {}
_FAST_HEADERS_MAX = 256


def _fast_image(buffer, owned: bool, source: Any, implicit: bool, values: tuple, pixel_offset: int,
                pixel_length: int, undefined: list, max_pixels: int) -> Image:
    if undefined:
        dictionary_vr = _pydicom_defaults()[5]
        for tag, starts_with_item in undefined:
            # The scanner read an undefined-length element as a sequence; pydicom does the same only
            # when its dictionary says SQ, or for an unknown tag whose value starts with an item.
            try:
                if dictionary_vr(tag) != "SQ":
                    raise _Fallback
            except KeyError:
                if not starts_with_item:
                    raise _Fallback from None
    key = values[1:_I_SOP_INSTANCE_UID] + values[_I_SOP_INSTANCE_UID + 1:]
    header = _FAST_HEADERS.get(key)
    if header is None:
        header = _FastHeader(values)
        if len(_FAST_HEADERS) >= _FAST_HEADERS_MAX:
            _FAST_HEADERS.clear()
        _FAST_HEADERS[key] = header
    count = header.count
    expected_bytes = header.expected_bytes
    if count > max_pixels or pixel_offset < 0 or pixel_length == 0 or pixel_length < expected_bytes:
        raise _Fallback

    sop_instance_uid = _fast_uid(values[_I_SOP_INSTANCE_UID])
    if sop_instance_uid is None:
        sop_instance_uid = _fast_uid(values[_I_MEDIA_STORAGE_SOP_INSTANCE_UID])
    frames, rows, columns = header.frames, header.rows, header.columns
    array = np.frombuffer(buffer, dtype=header.stored_dtype, count=count,
                          offset=pixel_offset).reshape(frames, rows, columns)
    if not owned and not isinstance(source, bytes):
        # The caller's bytearray, memoryview or mapping can change or close later: the Image
        # keeps its own copy of the pixels, as the full path does.
        array = array.copy()
    flags = array.flags
    if not flags.aligned:
        # Bytes at an address the dtype does not divide (a file whose pixel data starts at an odd
        # offset): the kernels read whole elements. The full path's pixels come from a separate,
        # aligned bytes object; both hand out read-only arrays.
        array = array.copy()
        flags = array.flags
    flags.writeable = False
    try:
        array = _normalise_array(array, header.dtype, rows, columns, frames, header.bits_stored,
                                 header.pixel_representation)
        image = Image(array, header.semantics, sop_instance_uid, header.acquisition)
    except DicomError:
        raise _Fallback from None
    if owned and np.may_share_memory(array, buffer):
        # The pixels are a view of the file's buffer: blank everything else in it (the header
        # holds the patient's name), so the Image keeps no patient attribute alive.
        buffer[:pixel_offset] = 0
        buffer[pixel_offset + expected_bytes:] = 0
    _LOG.debug(
        "read %s: %d frame(s) of %d x %d %s (bits stored %d), transfer syntax %s, %d frame transform(s)",
        sop_instance_uid or "(no SOP Instance UID)", frames, rows, columns, array.dtype, header.bits_stored,
        _NATIVE_LITTLE_ENDIAN[0] if implicit else _NATIVE_LITTLE_ENDIAN[1], 1,
    )
    return image


# Each converter below gives what the full path's accessor (_int, _floats, _code_string,
# _valid_uid, _defined_term) gives for the same element as pydicom 3 converts it, or raises
# _Fallback where that accessor would raise DicomError or where the value is not plainly valid.


def _fast_us(value: Optional[bytes]) -> int:
    if value is None or len(value) != 2:  # absent (required here), empty or several values
        raise _Fallback
    return value[0] | (value[1] << 8)


def _fast_is(value: Optional[bytes]) -> Optional[int]:
    if value is None:
        return None
    text = value.rstrip(b" \x00")  # pydicom's multi_string
    if not text:
        return None  # empty: absent
    if not _IS_VALUE.fullmatch(text):
        raise _Fallback
    return int(text)


def _fast_floats(value: Optional[bytes]) -> Optional[list]:
    if value is None:
        return None
    text = value.strip().rstrip(b" \x00")  # convert_DS_string, then multi_string
    if not text:
        return None
    numbers = []
    for piece in text.split(b"\\"):
        if not _DS_VALUE.fullmatch(piece):
            raise _Fallback
        numbers.append(float(piece))
    return numbers


def _fast_one_float(values: Optional[list], default: float) -> float:
    if values is None:
        return default
    if len(values) != 1 or not math.isfinite(values[0]):
        raise _Fallback
    return values[0]


def _fast_cs(value: Optional[bytes]) -> Any:
    """pydicom's value of a CS element: None when empty, a str, or a list for several values."""
    if value is None:
        return None
    text = value.decode("latin-1").rstrip(" \x00")  # convert_string -> multi_string
    if "\\" in text:
        return text.split("\\")
    return None if not text.strip(" \x00") else text


def _fast_code_string(value: Optional[bytes]) -> Optional[str]:
    text = _fast_cs(value)
    if text is None:
        return None
    if not isinstance(text, str):
        raise _Fallback
    return text.strip(" \x00")


def _fast_defined_term(value: Optional[bytes], terms: frozenset) -> Optional[str]:
    text = _fast_cs(value)
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.strip().upper()
    return text if text in terms else "non-standard"


def _fast_uid(value: Optional[bytes]) -> Optional[str]:
    if value is None:
        return None
    text = value.decode("latin-1").rstrip("\x00 ")  # convert_UI -> multi_string -> UID(val.strip())
    if "\\" in text:
        return None  # several values: never a valid UID
    return _valid_uid(text.strip())


def _fast_spacing(values: tuple) -> Optional[tuple[float, float]]:
    for index in (_I_PIXEL_SPACING, _I_IMAGER_PIXEL_SPACING):
        spacing = _fast_floats(values[index])
        if spacing and len(spacing) == 2 and all(math.isfinite(v) and v > 0 for v in spacing):
            return (float(spacing[0]), float(spacing[1]))
    return None


def _fast_transform(values: tuple) -> FrameTransform:
    """The one FrameTransform of an image without functional groups (_transform_at + _make_transform).

    Not validated here: the Image validates it (and each window against the function).
    """
    slope = _fast_floats(values[_I_RESCALE_SLOPE])
    intercept = _fast_floats(values[_I_RESCALE_INTERCEPT])
    centers = _fast_floats(values[_I_WINDOW_CENTER])
    widths = _fast_floats(values[_I_WINDOW_WIDTH])
    function = _fast_code_string(values[_I_VOI_LUT_FUNCTION])
    windows: tuple = ()
    if centers is not None or widths is not None:
        if centers is None or widths is None or len(centers) != len(widths):
            raise _Fallback
        if function is None:
            function = "LINEAR"
        explanations: list = [None] * len(centers)
        text = values[_I_WINDOW_EXPLANATION]
        if text is not None:
            texts = _fast_explanations(text)
            if texts is not None and len(texts) == len(centers):
                explanations = texts
        windows = tuple(Window(c, w, e) for c, w, e in zip(centers, widths, explanations))
    else:
        function = "LINEAR"
    return FrameTransform(rescale_slope=_fast_one_float(slope, 1.0), rescale_intercept=_fast_one_float(intercept, 0.0),
                          windows=windows, voi_function=function)


def _fast_explanations(value: bytes) -> Optional[list]:
    """Window Center & Width Explanation (LO) as the full path reads it; None when it is empty."""
    if not _PRINTABLE_ASCII.fullmatch(value):
        # Text in another character set: pydicom's decoding (escape sequences, replacements) is
        # not replicated here.
        raise _Fallback
    parts = [part.rstrip("\x00 ") for part in value.decode("ascii").split("\\")]  # convert_text
    if len(parts) == 1 and not parts[0].strip(" \x00"):
        return None
    return [part.strip(" \x00") or None for part in parts]
