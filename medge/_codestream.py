"""What a compressed frame says about itself, read from its headers without decoding it.

A decoder trusts the codestream, not the DICOM header around it: a 2 KB JPEG-LS
frame whose SOF55 segment claimed 16384 x 16384 made the decoder allocate
1.6 GB and run for minutes although the DICOM header said 512 x 512.
``medge.dicom`` therefore reads each frame's own dimensions, component count
and bit depth here and compares them with the header before any decoder runs.

Parsers for: JPEG (ISO/IEC 10918-1 SOFn), JPEG-LS (ISO/IEC 14495-1 SOF55),
JPEG 2000 / HTJ2K (ISO/IEC 15444-1 SIZ, bare codestream or inside a JP2 box)
and DICOM RLE (PS3.5 G.5 header). Each one only walks marker or box headers,
so its cost is bounded by the number of segments, never by the image size.

Every failure is a :class:`CodestreamError` whose message holds numbers and
marker names only (never bytes of the frame), so callers can put it in a
user-facing message as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = [
    "CodestreamError",
    "FrameHeader",
    "jpeg_frame_header",
    "j2k_frame_header",
    "rle_segment_lengths",
    "MAX_J2K_TILES",
]

#: ISO/IEC 15444-1 A.4.2: the tile index (Isot) is 16 bits, so a valid codestream has at most 65535 tiles.
#: Checked because a decoder's per-tile set-up makes millions of 1 x 1 tiles a time and memory bomb.
MAX_J2K_TILES = 65535

# JPEG (10918-1 B.1.1.3) frame markers of the non-hierarchical processes DICOM uses: baseline,
# extended, progressive and lossless, Huffman or arithmetic coded.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB}
# Hierarchical (differential) frames and the DHP segment: not valid in DICOM's JPEG transfer syntaxes.
_JPEG_HIERARCHICAL = {0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF, 0xDE}
_JPEG_LS_SOF = 0xF7  # SOF55
_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
# Markers that stand alone (no length field): TEM and RST0..RST7.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


class CodestreamError(ValueError):
    """A compressed frame's headers are missing, malformed or unsupported (message: numbers only)."""


@dataclass(frozen=True)
class FrameHeader:
    """What one compressed frame declares.

    Attributes:
        rows, columns: image size of the first (only accepted) component.
        components: number of components (samples per pixel).
        precision: bits per sample.
        is_signed: JPEG 2000 only: whether samples are signed (None elsewhere).
        tiles: JPEG 2000 only: number of tiles (1 elsewhere).
        jpeg_ls: JPEG family only: True for a JPEG-LS (SOF55) frame.
    """

    rows: int
    columns: int
    components: int
    precision: int
    is_signed: Optional[bool] = None
    tiles: int = 1
    jpeg_ls: bool = False


def _u16(data: bytes, offset: int) -> int:
    if offset + 2 > len(data):
        raise CodestreamError(f"the frame ends inside a header field at byte {offset} (truncated)")
    return (data[offset] << 8) | data[offset + 1]


def _u32(data: bytes, offset: int) -> int:
    if offset + 4 > len(data):
        raise CodestreamError(f"the frame ends inside a header field at byte {offset} (truncated)")
    return int.from_bytes(data[offset:offset + 4], "big")


def jpeg_frame_header(frame: bytes) -> FrameHeader:
    """The SOFn (JPEG) or SOF55 (JPEG-LS) frame header of one JPEG-family frame.

    Walks the marker segments from SOI to the first frame header; entropy-coded
    data is never reached (it follows SOS, which must come after the frame header).

    Raises:
        CodestreamError: no SOI, a malformed segment, a hierarchical frame, no
            frame header before SOS/EOI/the end, or a zero dimension (height
            defined later by a DNL marker, or JPEG-LS oversize dimensions in an
            LSE segment: neither is accepted).
    """
    if len(frame) < 2 or frame[0] != 0xFF or frame[1] != _SOI:
        raise CodestreamError("the frame does not start with a JPEG SOI marker (FFD8)")
    position = 2
    size = len(frame)
    while True:
        if position >= size:
            raise CodestreamError("the JPEG frame ends before its frame header (SOFn) (truncated)")
        if frame[position] != 0xFF:
            raise CodestreamError(f"expected a JPEG marker at byte {position}, found none (damaged stream)")
        # Any number of 0xFF fill bytes may precede a marker code (10918-1 B.1.1.2).
        while position < size and frame[position] == 0xFF:
            position += 1
        if position >= size:
            raise CodestreamError("the JPEG frame ends inside a marker (truncated)")
        marker = frame[position]
        marker_at = position - 1
        position += 1
        if marker in _STANDALONE:
            continue
        if marker == 0x00:
            raise CodestreamError(f"invalid JPEG marker FF00 at byte {marker_at} (damaged stream)")
        if marker == _SOI:
            raise CodestreamError(f"a second SOI marker at byte {marker_at} before any frame header")
        if marker == _EOI:
            raise CodestreamError("the JPEG frame ends (EOI) without a frame header (SOFn)")
        if marker == _SOS:
            raise CodestreamError("the JPEG scan (SOS) starts before any frame header (SOFn)")
        length = _u16(frame, position)
        if length < 2:
            raise CodestreamError(f"JPEG segment FF{marker:02X} at byte {marker_at} has length {length} (< 2)")
        if position + length > size:
            raise CodestreamError(
                f"JPEG segment FF{marker:02X} at byte {marker_at} claims {length} bytes; the frame ends "
                f"{size - position} bytes later (truncated)"
            )
        if marker in _JPEG_HIERARCHICAL:
            raise CodestreamError(
                f"hierarchical JPEG (marker FF{marker:02X}) is not valid in DICOM's JPEG transfer syntaxes"
            )
        if marker in _JPEG_SOF or marker == _JPEG_LS_SOF:
            return _jpeg_sof(frame, position, length, marker)
        position += length


def _jpeg_sof(frame: bytes, position: int, length: int, marker: int) -> FrameHeader:
    # SOF layout (10918-1 B.2.2; 14495-1 C.2.2 is the same): Lf(2) P(1) Y(2) X(2) Nf(1), then
    # three bytes per component.
    if length < 8:
        raise CodestreamError(f"the JPEG frame header FF{marker:02X} has length {length} (< 8)")
    precision = frame[position + 2]
    rows = _u16(frame, position + 3)
    columns = _u16(frame, position + 5)
    components = frame[position + 7]
    if length < 8 + 3 * components:
        raise CodestreamError(
            f"the JPEG frame header FF{marker:02X} has length {length}, too short for {components} component(s)"
        )
    if rows == 0 or columns == 0:
        raise CodestreamError(
            f"the JPEG frame header FF{marker:02X} declares {rows} x {columns}: a zero dimension (defined "
            "later in a DNL or LSE segment) is not accepted"
        )
    if components == 0:
        raise CodestreamError(f"the JPEG frame header FF{marker:02X} declares 0 components")
    return FrameHeader(rows=rows, columns=columns, components=components, precision=precision,
                       jpeg_ls=marker == _JPEG_LS_SOF)


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _j2k_codestream_offset(frame: bytes) -> tuple[int, int]:
    """(start, end) of the J2K codestream: the whole frame, or the contents of a JP2 file's jp2c box."""
    if not frame.startswith(_JP2_SIGNATURE):
        return 0, len(frame)
    # ISO/IEC 15444-1 I.4: boxes of LBox (4), TBox (4), [XLBox (8) when LBox is 1]; LBox 0 = to the end.
    position = len(_JP2_SIGNATURE)
    size = len(frame)
    while position + 8 <= size:
        box_length = _u32(frame, position)
        box_type = bytes(frame[position + 4:position + 8])
        header = 8
        if box_length == 1:
            if position + 16 > size:
                raise CodestreamError("a JP2 box's extended length is truncated")
            box_length = int.from_bytes(frame[position + 8:position + 16], "big")
            header = 16
        elif box_length == 0:
            box_length = size - position
        if box_length < header:
            raise CodestreamError(f"a JP2 box at byte {position} has length {box_length} (< {header})")
        if box_type == b"jp2c":
            return position + header, min(position + box_length, size)
        position += box_length
    raise CodestreamError("the JP2 file has no contiguous codestream box (jp2c)")


def j2k_frame_header(frame: bytes) -> FrameHeader:
    """The SIZ marker segment of a JPEG 2000 (or HTJ2K) frame, bare or wrapped in JP2 boxes.

    Raises:
        CodestreamError: no SOC/SIZ at the start of the codestream, or a
            truncated or inconsistent SIZ (ISO/IEC 15444-1 A.5.1). The tile
            count is returned, not checked: compare it with MAX_J2K_TILES.
    """
    start, end = _j2k_codestream_offset(frame)
    codestream = frame[start:end]
    if codestream[:2] != b"\xff\x4f":
        raise CodestreamError("the frame does not start with a JPEG 2000 SOC marker (FF4F)")
    if codestream[2:4] != b"\xff\x51":
        raise CodestreamError("the JPEG 2000 codestream has no SIZ marker (FF51) right after SOC")
    # SIZ: Lsiz(2) Rsiz(2) Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz (4 each) Csiz(2), then
    # Ssiz, XRsiz, YRsiz (1 each) per component; offsets below count from the SIZ marker.
    length = _u16(codestream, 4)
    components = _u16(codestream, 40)
    if length != 38 + 3 * components or 4 + length > len(codestream):
        raise CodestreamError(
            f"the JPEG 2000 SIZ segment is inconsistent or truncated (length {length}, {components} component(s))"
        )
    xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz = (_u32(codestream, 8 + 4 * i) for i in range(8))
    if components == 0:
        raise CodestreamError("the JPEG 2000 SIZ segment declares 0 components")
    if not (xosiz < xsiz and yosiz < ysiz and xtsiz > 0 and ytsiz > 0 and xtosiz <= xosiz and ytosiz <= yosiz
            and xtsiz + xtosiz > xosiz and ytsiz + ytosiz > yosiz):
        raise CodestreamError("the JPEG 2000 SIZ segment has an impossible image, offset or tile geometry")
    ssiz, xrsiz, yrsiz = codestream[42], codestream[43], codestream[44]
    if xrsiz == 0 or yrsiz == 0:
        raise CodestreamError("the JPEG 2000 SIZ segment has a component subsampling factor of 0")
    precision = (ssiz & 0x7F) + 1
    if precision > 38:
        raise CodestreamError(f"the JPEG 2000 SIZ segment declares {precision} bits per sample (at most 38)")
    # Checked by the caller after the dimensions (a size lie is the more useful message).
    tiles = -(-(xsiz - xtosiz) // xtsiz) * -(-(ysiz - ytosiz) // ytsiz)
    # Size of component 0 on the reference grid (15444-1 B.2): ceil(Xsiz/XRsiz) - ceil(XOsiz/XRsiz).
    columns = -(-xsiz // xrsiz) - -(-xosiz // xrsiz)
    rows = -(-ysiz // yrsiz) - -(-yosiz // yrsiz)
    return FrameHeader(rows=rows, columns=columns, components=components, precision=precision,
                       is_signed=bool(ssiz & 0x80), tiles=tiles)


def rle_segment_lengths(frame: bytes) -> list[int]:
    """The byte length of each segment of one DICOM RLE frame (PS3.5 G.5 header).

    Raises:
        CodestreamError: a header shorter than 64 bytes, 0 or more than 15
            segments, a first offset other than 64, or offsets that do not
            increase or point past the end of the frame.
    """
    if len(frame) < 64:
        raise CodestreamError(f"the RLE frame is {len(frame)} bytes, shorter than its 64-byte header")
    count = int.from_bytes(frame[0:4], "little")
    if not 1 <= count <= 15:
        raise CodestreamError(f"the RLE header declares {count} segments (1 to 15 allowed)")
    offsets = [int.from_bytes(frame[4 + 4 * i:8 + 4 * i], "little") for i in range(count)]
    if offsets[0] != 64:
        raise CodestreamError(f"the first RLE segment starts at byte {offsets[0]}, not 64")
    ends = offsets[1:] + [len(frame)]
    for index, (start, stop) in enumerate(zip(offsets, ends)):
        if not start < stop <= len(frame):
            raise CodestreamError(
                f"RLE segment {index} spans bytes {start} to {stop} of a {len(frame)}-byte frame (offsets must "
                "increase and stay inside the frame)"
            )
    return [stop - start for start, stop in zip(offsets, ends)]
