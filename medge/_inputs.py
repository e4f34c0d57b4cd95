"""Which files a command reads, and every file it left out and why.

Shared by ``medge run``, ``medge preprocess`` and ``medge-convert``'s
calibration and validation folders, so every command finds the same files.
It imports no command module, so no command module needs to import another
(DESIGN.md: "shared helpers in a module none of them is imported by").

The rules (``medge run --help`` says the same):

- A file named on the command line is always tried, whatever its content
  or name, and is named as given (one that is not a regular file, or cannot
  be stat'ed, is listed as an error instead of being opened).
- A folder is searched recursively and each file in it is named by its path
  relative to that folder (``/``-separated). A regular file is taken when it
  is DICOM by its content, whatever its name (files named by UID, such as
  ``1.2.840.113619.2.55.3.4``, are common in exports):

  * ``DICM`` at byte 128: a DICOM file (PS3.10 preamble + File Meta
    Information);
  * or a bare data set (no preamble, no ``DICM``): its first element is in
    group 0002 or 0008, little endian, with a valid explicit VR or an
    implicit-VR length that fits the file. Every composite IOD carries SOP
    Class UID (0008,0016), so an image data set starts in group 0008 (0002
    when File Meta Information was written without a preamble). These files
    are read with ``force=True`` (``InputFile.bare``).

  Why a header check and not ``pydicom.dcmread``: ``dcmread(force=False)``
  refuses every file without ``DICM``, so it cannot find bare data sets, and
  ``force=True`` "parses" arbitrary bytes into nonsense (and reads the whole
  file). The check reads at most 4 KiB, decodes nothing, and never opens a
  file that is not regular; a damaged file that passes it still fails in the
  reader, where the command counts it as failed.

  A file named ``*.dcm``, ``*.dicom`` or ``*.ima`` that is not DICOM by
  content is tried anyway: its name says DICOM, so it is more likely damaged
  (a truncated or empty transfer) than foreign, and its failure is counted.

- Skipped and listed with the reason (``Inputs.skipped``):

  * not DICOM by content (a README, a thumbnail): not an error;
  * ``DICOMDIR`` (a media directory, no image; by its Media Storage SOP
    Class, whatever its name): not an error;
  * hidden folders (``.git``, ``.Trash``...) are not searched: not an error.
    Hidden files are judged by content like any other;
  * symlinks to folders are not followed (no loops, no leaving the tree;
    give the folder itself to search it): not an error. Symlinks to files
    are followed and named by the link's path;
  * not a regular file (FIFO, socket, device): never opened, since opening
    a FIFO blocks: not an error;
  * unreadable (permission denied, a broken symlink, an unreadable folder):
    an error (``Skipped.error``), because DICOM may be in it.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .errors import MedgeError

#: Files named like this are tried even when their content is not DICOM (they are likely damaged).
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: Media Storage SOP Class of a DICOMDIR (PS3.10 media directory): no image in it.
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: The first bytes read from each file: preamble, DICM and the File Meta Information.
HEAD_BYTES = 4096

#: (kind, reason) of each skip that is not an error; ``Skipped.kind`` is what the summary counts.
NOT_DICOM = ("not DICOM", "not DICOM (no DICM marker and no DICOM data set header)")
DICOMDIR = ("DICOMDIR", "DICOMDIR (a media directory, no image)")
HIDDEN_FOLDER = ("hidden folder", "hidden folder, not searched")
SYMLINK_FOLDER = ("symlinked folder", "symlink to a folder, not followed (give the folder itself to search it)")
NOT_REGULAR = ("not a regular file", "not a regular file (never opened)")
UNREADABLE = "unreadable"

_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
#: Explicit VRs with two reserved bytes and a 32-bit length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


@dataclass(frozen=True)
class InputFile:
    """One file to read.

    Attributes:
        path: where to open it.
        name: how output names it: its path relative to the folder it was
            found in, or the argument as given.
        bare: a data set without preamble / File Meta Information: read it
            with ``read_dicom(path, force=True)``.
    """

    path: Path
    name: str
    bare: bool = False


@dataclass(frozen=True)
class Skipped:
    """A file (or folder, named with a trailing ``/``) left out.

    Attributes:
        name: as ``InputFile.name``.
        kind: what the summary counts: "not DICOM", "DICOMDIR", "hidden folder",
            "symlinked folder", "not a regular file" or "unreadable".
        reason: the line shown to the user.
        error: whether it counts as a failure in the exit status (unreadable files and folders).
    """

    name: str
    kind: str
    reason: str
    error: bool = False

    @classmethod
    def of(cls, name: str, what: tuple, *, error: bool = False) -> "Skipped":
        return cls(name, what[0], what[1], error)

    @classmethod
    def unreadable(cls, name: str, why: str) -> "Skipped":
        return cls(name, UNREADABLE, f"unreadable: {why}", True)


@dataclass
class Inputs:
    """What ``collect_inputs`` found: the files to read, in order, and what it skipped."""

    files: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    @property
    def unreadable(self) -> list:
        """The skipped entries that are errors (they count in a command's exit status)."""
        return [s for s in self.skipped if s.error]

    def summary(self) -> str:
        """``"3 skipped (2 not DICOM, 1 unreadable)"``, or ``""`` when nothing was skipped."""
        if not self.skipped:
            return ""
        counts: dict = {}
        for entry in self.skipped:
            counts[entry.kind] = counts.get(entry.kind, 0) + 1
        return f"{len(self.skipped)} skipped ({', '.join(f'{n} {kind}' for kind, n in counts.items())})"


def collect_inputs(inputs: Sequence[str]) -> Inputs:
    """Find the files to read in ``inputs`` (files and folders), by the rules in this module's docstring.

    Raises:
        MedgeError: an input does not exist. (Finding no DICOM file is not an
            error here: the command decides, after listing what was skipped.)
    """
    found = Inputs()
    for name in inputs:
        path = Path(name)
        if path.is_dir():  # a symlink named on the command line is followed: the user chose it
            _walk(path, path, found)
        elif not os.path.lexists(path) or (path.is_symlink() and not path.exists()):
            raise MedgeError(f"{name}: no such file or directory")
        else:
            _explicit(path, name, found)
    return found


def is_dicom(head: bytes, size: int) -> Optional[str]:
    """``"file"`` (preamble + DICM), ``"bare"`` (a data set header at byte 0) or None, from a file's first bytes."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "file"
    if _bare_dataset_header(head, size):
        return "bare"
    return None


def read_head(path: Path) -> bytes:
    """The first ``HEAD_BYTES`` of a file (raises OSError)."""
    with open(path, "rb") as stream:
        return stream.read(HEAD_BYTES)


def describe_os_error(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return (exc.strerror or type(exc).__name__).lower()


# --------------------------------------------------------------------------- private


def _explicit(path: Path, name: str, found: Inputs) -> None:
    """A file named on the command line: always tried (it is the user's choice), unless it cannot be opened safely."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        found.skipped.append(Skipped.unreadable(name, describe_os_error(exc)))
        return
    if not stat.S_ISREG(mode):
        found.skipped.append(Skipped.of(name, NOT_REGULAR, error=True))
        return
    try:
        kind = is_dicom(read_head(path), os.stat(path).st_size)
    except OSError:
        kind = None  # the reader reports it: the file is tried
    found.files.append(InputFile(path, name, bare=kind == "bare"))


def _walk(root: Path, folder: Path, found: Inputs) -> None:
    def relative(path: str) -> str:
        return Path(path).relative_to(root).as_posix()

    try:
        with os.scandir(folder) as iterator:
            entries = sorted(iterator, key=lambda e: e.name)
    except OSError as exc:
        found.skipped.append(Skipped.unreadable(relative(str(folder)) + "/", describe_os_error(exc)))
        return
    for entry in entries:
        name = relative(entry.path)
        try:
            if entry.is_symlink():
                if not os.path.exists(entry.path):
                    found.skipped.append(Skipped.unreadable(name, "broken symlink"))
                    continue
                if entry.is_dir(follow_symlinks=True):
                    found.skipped.append(Skipped.of(name + "/", SYMLINK_FOLDER))
                    continue
            elif entry.is_dir(follow_symlinks=False):
                if entry.name.startswith("."):
                    found.skipped.append(Skipped.of(name + "/", HIDDEN_FOLDER))
                else:
                    _walk(root, Path(entry.path), found)
                continue
            info = os.stat(entry.path)  # follows a symlink to a file
            if not stat.S_ISREG(info.st_mode):
                found.skipped.append(Skipped.of(name, NOT_REGULAR))
                continue
            head = read_head(Path(entry.path))
        except OSError as exc:
            found.skipped.append(Skipped.unreadable(name, describe_os_error(exc)))
            continue
        kind = is_dicom(head, info.st_size)
        if kind == "file" and _media_storage_sop_class(head) == DICOMDIR_SOP_CLASS:
            found.skipped.append(Skipped.of(name, DICOMDIR))
        elif kind is not None or entry.name.lower().endswith(DICOM_SUFFIXES):
            found.files.append(InputFile(Path(entry.path), name, bare=kind == "bare"))
        else:
            found.skipped.append(Skipped.of(name, NOT_DICOM))


def _bare_dataset_header(head: bytes, size: int) -> bool:
    """Whether ``head`` starts with a little-endian data element of group 0002 or 0008 whose length fits the file."""
    if len(head) < 8:
        return False
    group, _element = struct.unpack_from("<HH", head, 0)
    if group not in (0x0002, 0x0008):
        return False
    vr = head[4:6]
    if vr in _LONG_VRS:
        if len(head) < 12 or head[6:8] != b"\0\0":
            return False
        length, header = struct.unpack_from("<I", head, 8)[0], 12
        if length == 0xFFFFFFFF:
            return vr in (b"SQ", b"UN")  # undefined length: only sequences (and UN holding one)
    elif vr in _VRS:
        length, header = struct.unpack_from("<H", head, 6)[0], 8
    else:  # implicit VR: a 32-bit length, no VR
        length, header = struct.unpack_from("<I", head, 4)[0], 8
    return length % 2 == 0 and header + length <= size  # values have even length (PS3.5 7.1.1)


def _media_storage_sop_class(head: bytes) -> Optional[str]:
    """(0002,0002) from the File Meta Information after DICM (always explicit VR little endian), if in ``head``."""
    pos = 132
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return None
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                return None
            length, start = struct.unpack_from("<I", head, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        if element == 0x0002:
            return head[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        if length == 0xFFFFFFFF:
            return None
        pos = start + length
    return None
