"""DICOM series -> Volume: the slices of one series, ordered in patient space, with their geometry.

:func:`read_series` takes a folder, or a list of paths / bytes / pydicom
Datasets, groups the instances by Series Instance UID (an enhanced
multi-frame object is one instance of its series, each frame a slice), and
stacks the chosen series into a :class:`Volume`:

- slices are ordered along the slice normal (the cross product of the two
  direction cosines of Image Orientation (Patient)) by the projection of
  their Image Position (Patient) on it; ties by SOP Instance UID and frame,
  so the order never depends on file names or on the order given;
- orientation, pixel spacing, rows / columns and Frame of Reference must
  agree across slices, else :class:`SeriesError` (a volume cannot be stacked);
- missing, duplicated or unevenly spaced slices, and slices offset in-plane
  along the stack (gantry tilt), are refused (``policy="refuse"``, the
  default) or listed in ``Volume.issues`` (``policy="report"``);
- pixels are read by :func:`medge.read_dicom`, one instance at a time: stored
  values, never rescaled, and every slice keeps its own Rescale Slope /
  Intercept and windows (``Volume.semantics.frames``).

Tolerances, and why:

- slice spacing: a gap between neighbours may differ from the series'
  spacing by ``spacing_tolerance`` of it (default 1%). 1% of a slice moves a
  voxel by a hundredth of its size, far below what resampling to a model's
  grid resolves, while positions written with two decimals (a 0.005 mm
  rounding) still pass for slices of 0.5 mm and more;
- orientation: each direction cosine of every slice within
  ``orientation_tolerance`` (default 1e-3, about 0.06 degrees) of the
  reference slice's: 256 pixels from the rotation centre that is a quarter
  of a pixel; scanners write the cosines with six or more decimals;
- pixel spacing: equal within a relative 1e-4 (0.05 pixel across 512 columns);
- in-plane offset along the stack (shear): at most a tenth of a pixel.

Messages and log records name slice indices, positions in mm, counts, tag
keywords and UIDs only: never a file name (file names often carry patient
names) nor any other value read from a file.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from ._pydicom_quiet import quiet_pydicom
from .dicom import read_dicom
from .errors import DicomError, MedgeError, MissingDependency
from .image import Acquisition, FrameTransform, Image, PixelSemantics

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pydicom.dataset import Dataset

__all__ = [
    "read_series",
    "list_series",
    "group_series",
    "Volume",
    "SeriesIssue",
    "SeriesSummary",
    "SeriesError",
    "POLICIES",
    "DEFAULT_SPACING_TOLERANCE",
    "DEFAULT_ORIENTATION_TOLERANCE",
    "DEFAULT_MAX_VOXELS",
]

_LOG = logging.getLogger(__name__)

#: What :func:`read_series` does with missing, duplicated, unevenly spaced or sheared slices.
POLICIES = ("refuse", "report")
#: Largest relative deviation of a gap between neighbouring slices from the series' slice spacing.
DEFAULT_SPACING_TOLERANCE = 0.01
#: Largest difference of any direction cosine between slices (about 0.06 degrees).
DEFAULT_ORIENTATION_TOLERANCE = 1e-3
#: Largest number of voxels (slices x rows x columns) read into one Volume (2 GiB of int16), checked before decoding.
DEFAULT_MAX_VOXELS = 1 << 30

_PIXEL_SPACING_RTOL = 1e-4
_SHEAR_TOLERANCE_PIXELS = 0.1
_ORTHONORMAL_TOLERANCE = 1e-3
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DEFLATED = "1.2.840.10008.1.2.1.99"
# Segmentation, Label Map Segmentation, Surface Segmentation, Spatial Registration, Fiducials, Raw Data...:
# results and registrations that share the image's study but are not slices of it (medge's own SEG included).
_NON_SLICE_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.66"

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "Dataset"]


class SeriesError(DicomError):
    """A series cannot be stacked into a Volume (the message says which slices and what to do)."""


@dataclass(frozen=True)
class SeriesIssue:
    """One irregularity of a series' slice stack.

    Attributes:
        kind: ``"missing"`` (a gap of about a whole number of spacings),
            ``"duplicate"`` (two slices at one position, or one instance given
            twice), ``"uneven"`` (a gap that is no multiple of the spacing) or
            ``"sheared"`` (slices offset in-plane along the stack: gantry tilt).
        slices: indices into the Volume's slices (its order) concerned.
        positions_mm: their positions along the slice normal, in mm.
        detail: one sentence saying what is wrong (numbers and UIDs only).
    """

    kind: str
    slices: tuple[int, ...]
    positions_mm: tuple[float, ...]
    detail: str

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True)
class SeriesSummary:
    """One series found among the sources (see :func:`list_series`)."""

    series_instance_uid: str
    instances: int
    frames: int


@dataclass(frozen=True, eq=False)
class Volume:
    """The slices of one DICOM series as stored values plus the geometry to put results back.

    Index convention: ``pixels[s, r, c]`` is slice ``s``, row ``r``,
    column ``c``; :meth:`index_to_patient` takes (s, r, c) in that order.

    Attributes:
        pixels: (slices, rows, columns) stored values in native dtype (never
            rescaled, as in :class:`medge.Image`).
        semantics: PixelSemantics with ``number_of_frames == slices`` and one
            FrameTransform per slice (Rescale Slope / Intercept, windows), or
            one shared by all when every slice agrees.
        acquisition: modality, body part and pixel spacing, as read_dicom
            gives them for the first instance.
        origin: (3,) Image Position (Patient) of slice 0: the patient-space
            centre of pixel (0, 0, 0), mm.
        direction: (3, 3), rows: the row direction (Image Orientation
            (Patient) values 1-3, along which the column index grows), the
            column direction (values 4-6, along which the row index grows), and
            the slice normal (their cross product, along which the slice index
            grows).
        spacing: (row spacing, column spacing, slice spacing) in mm; row
            spacing is Pixel Spacing value 1 (between rows, along the column
            direction), column spacing value 2 (along the row direction).
        slice_positions: (slices,) position of each slice along the normal, mm.
        image_positions: (slices, 3) Image Position (Patient) of each slice, mm.
        sop_instance_uids: the instance of each slice.
        frame_numbers: the 1-based frame of each slice within its instance
            (1 for single-frame instances).
        series_instance_uid, study_instance_uid: of the series.
        frame_of_reference_uid: the patient coordinate system, or None when absent.
        issues: irregularities found (only with ``policy="report"``; empty
            means a regular grid, exactly described by origin / direction / spacing).
        source_datasets: the instances' headers (no pixel data read for
            paths and bytes), in the order their slices first appear; what a
            DICOM Segmentation references. Not shown by repr.
    """

    pixels: np.ndarray
    semantics: PixelSemantics
    acquisition: Optional[Acquisition]
    origin: np.ndarray
    direction: np.ndarray
    spacing: tuple[float, float, float]
    slice_positions: np.ndarray
    image_positions: np.ndarray
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int, ...]
    series_instance_uid: str
    study_instance_uid: Optional[str]
    frame_of_reference_uid: Optional[str]
    issues: tuple[SeriesIssue, ...] = ()
    source_datasets: tuple = field(default=(), repr=False)

    def __repr__(self) -> str:  # headers (patient attributes) are never part of the repr
        s, r, c = self.pixels.shape
        return (f"Volume({s} slices x {r} rows x {c} columns, {self.pixels.dtype}, spacing "
                f"{tuple(round(v, 6) for v in self.spacing)} mm, series {self.series_instance_uid}, "
                f"{len(self.issues)} issue(s))")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix taking (slice, row, column, 1) to (x, y, z, 1) in patient coordinates (mm)."""
        matrix = np.eye(4)
        matrix[:3, 0] = self.direction[2] * self.spacing[2]
        matrix[:3, 1] = self.direction[1] * self.spacing[0]
        matrix[:3, 2] = self.direction[0] * self.spacing[1]
        matrix[:3, 3] = self.origin
        return matrix

    def index_to_patient(self, index: Any) -> np.ndarray:
        """Patient coordinates (mm, DICOM LPS axes) of voxel index (slice, row, column).

        Follows PS3.3 C.7.6.2.1.1: origin + column * column spacing * row
        direction + row * row spacing * column direction + slice * slice
        spacing * normal. Fractional indices are allowed. With issues
        (``policy="report"``) the grid is the regular one the series should
        have had; ``image_positions`` hold the true position of every slice.

        Args:
            index: (3,) or (..., 3) array-like of (slice, row, column).

        Returns:
            float64 array of the same shape, (x, y, z) in mm.
        """
        ijk = np.asarray(index, dtype=np.float64)
        if ijk.shape[-1:] != (3,):
            raise ValueError(f"index must have shape (..., 3) = (slice, row, column), got {ijk.shape}")
        return ijk @ self.affine[:3, :3].T + self.origin

    def patient_to_index(self, point: Any) -> np.ndarray:
        """The inverse of :meth:`index_to_patient`: fractional (slice, row, column) of patient point(s) in mm."""
        xyz = np.asarray(point, dtype=np.float64)
        if xyz.shape[-1:] != (3,):
            raise ValueError(f"point must have shape (..., 3) = (x, y, z), got {xyz.shape}")
        return (xyz - self.origin) @ np.linalg.inv(self.affine[:3, :3]).T

    def frame_transform(self, slice_index: int) -> FrameTransform:
        """Rescale and windows of slice ``slice_index``."""
        return self.semantics.frame_transform(slice_index)

    def as_image(self) -> Image:
        """The slices as one multi-frame :class:`medge.Image` (a view of ``pixels``), for medge.preprocess."""
        return Image(self.pixels, self.semantics, None, self.acquisition)


# --------------------------------------------------------------------------- public functions


def read_series(source: Union[Source, Sequence[Source]], *, series_uid: Optional[str] = None,
                policy: str = "refuse", spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
                orientation_tolerance: float = DEFAULT_ORIENTATION_TOLERANCE,
                max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read one DICOM series into a :class:`Volume` ordered along the slice normal.

    Args:
        source: a folder (searched recursively; files that are not DICOM
            are skipped), one file, or a sequence of paths, bytes or pydicom
            Datasets. Objects that are not slices (no Rows, or a
            Segmentation / registration SOP Class) are skipped.
        series_uid: the Series Instance UID to read when the sources hold
            several series (see :func:`list_series`).
        policy: ``"refuse"`` (default): missing, duplicated, unevenly spaced
            or sheared slices raise SeriesError naming them; ``"report"``:
            the Volume is returned with them in ``issues`` (every slice
            kept, slice spacing the typical gap).
        spacing_tolerance: relative deviation allowed between a gap and the
            series' slice spacing (default 1%, see the module documentation).
        orientation_tolerance: largest difference of any direction cosine
            between slices (default 1e-3).
        max_voxels: refuse, before decoding, a series with more voxels.

    Returns:
        The Volume.

    Raises:
        SeriesError: no slices found; several series and no ``series_uid``
            (the message lists them); slices that disagree in orientation,
            pixel spacing, size, Frame of Reference or pixel encoding;
            missing geometry; irregular spacing under ``policy="refuse"``.
        DicomError: an instance cannot be read (from :func:`medge.read_dicom`).
        MissingDependency: pydicom is not installed.
        ValueError: an invalid policy or tolerance.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    for name, value in (("spacing_tolerance", spacing_tolerance), ("orientation_tolerance", orientation_tolerance)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}")
    if isinstance(max_voxels, bool) or not isinstance(max_voxels, (int, np.integer)) or max_voxels < 1:
        raise ValueError(f"max_voxels must be a positive integer, got {max_voxels!r}")
    _import_pydicom()
    instances = _instances_of_series(_headers(source), series_uid)
    try:
        return _build_volume(instances, policy, float(spacing_tolerance), float(orientation_tolerance),
                             int(max_voxels))
    except SeriesError as exc:
        error = exc
    raise _without_chain(error)


def list_series(source: Union[Source, Sequence[Source]]) -> list[SeriesSummary]:
    """The series among ``source`` (as :func:`read_series` takes it), sorted by Series Instance UID.

    Reads headers only.
    """
    _import_pydicom()
    groups = _group(_headers(source))
    return [SeriesSummary(uid, len(items), sum(_frame_count(i.header) for i in items))
            for uid, items in sorted(groups.items())]


# --------------------------------------------------------------------------- reading headers


@dataclass
class _Instance:
    source: Any  # what read_dicom is given: a path, bytes or a Dataset
    header: Any  # pydicom Dataset, pixel data not read for paths and bytes
    what: str  # how messages name it before its SOP Instance UID is known


def _import_pydicom():
    try:
        import pydicom
        import pydicom.filereader  # noqa: F401
    except ImportError as exc:
        raise MissingDependency("pydicom", None, "Reading a DICOM series") from exc
    return pydicom


def _without_chain(error: BaseException) -> BaseException:
    error.__cause__ = None
    error.__context__ = None
    error.__suppress_context__ = True
    return error


def _sources(source: Any) -> tuple[list[tuple[Any, str]], bool]:
    """([(source, how to name it)], whether it came from a folder scan)."""
    from pydicom.dataset import Dataset

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = []
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files.extend(Path(root) / name for name in sorted(names))
            # Positions in the sorted listing name the files in messages, never their names.
            return [(f, f"file {i + 1} of the folder (sorted by path)") for i, f in enumerate(files)], True
        return [(path, "the file")], False
    if isinstance(source, (bytes, bytearray, memoryview, Dataset)):
        return [(source, "the source")], False
    if isinstance(source, (list, tuple)):
        items = []
        for i, item in enumerate(source):
            if not isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview, Dataset)):
                raise SeriesError(f"source {i + 1} is a {type(item).__name__}: pass paths, bytes or pydicom Datasets")
            items.append((Path(item) if isinstance(item, (str, os.PathLike)) else item, f"source {i + 1}"))
        return items, False
    raise SeriesError(f"cannot read a series from a {type(source).__name__}: pass a folder, a file, or a list of "
                      "paths, bytes or pydicom Datasets")


def group_series(sources: Sequence[Source]) -> tuple[dict[str, list], list[tuple[int, str]]]:
    """Sources grouped by Series Instance UID, reading headers only, each source on its own.

    What ``medge run`` needs: one bad file must not stop the other series.

    Args:
        sources: paths, bytes or pydicom Datasets.

    Returns:
        ({series UID: [its sources, in the given order]}, [(index of a source that
        cannot be read, the reason)]). Objects that are not slices (a
        Segmentation, an SR, a DICOMDIR) are left out, not failed.
    """
    _import_pydicom()
    groups: dict[str, list] = {}
    failed: list[tuple[int, str]] = []
    for index, item in enumerate(sources):
        try:
            instances = _headers([item], allow_none=True)
            for instance in instances:
                uid = _uid(instance.header, "SeriesInstanceUID")
                if uid is None:
                    raise SeriesError("it has no valid Series Instance UID (0020,000E): it cannot be assigned to a "
                                      "series")
                groups.setdefault(uid, []).append(item)
        except MedgeError as exc:
            failed.append((index, str(exc)))
    return groups, failed


def _headers(source: Any, allow_none: bool = False) -> list[_Instance]:
    """Every slice-like instance among the sources, headers read (pixels not); none found is a SeriesError
    unless ``allow_none``."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.errors import InvalidDicomError

    items, from_folder = _sources(source)
    skipped = {"not DICOM": 0, "not a slice": 0}
    instances: list[_Instance] = []
    with quiet_pydicom("reading DICOM series headers"):
        for item, what in items:
            if isinstance(item, Dataset):
                header = item
            else:
                if isinstance(item, Path) and item.is_dir():
                    raise SeriesError(f"{what} is a folder: pass a folder on its own, or a list of files")
                try:
                    stream = _open(item, what)
                    try:
                        # The Transfer Syntax UID sits in the first few hundred bytes (File Meta Information).
                        # A deflated dataset is inflated whole by dcmread; read_dicom first checks that it
                        # inflates to a bounded size (a deflate bomb is refused with a DicomError).
                        if _DEFLATED.encode() in stream.read(4096):
                            try:
                                read_dicom(bytes(item) if isinstance(item, memoryview) else item)
                            except DicomError as exc:
                                raise SeriesError(f"{what}: {exc}") from None
                        stream.seek(0)
                        header = dcmread(stream, stop_before_pixels=True)
                    finally:
                        stream.close()
                except InvalidDicomError:
                    if from_folder:
                        skipped["not DICOM"] += 1
                        continue
                    raise SeriesError(f"{what} is not DICOM (no 'DICM' prefix / File Meta Information)") from None
                except MedgeError:
                    raise
                except Exception as exc:  # pydicom raises many kinds on damaged data
                    raise SeriesError(f"{what} cannot be parsed ({type(exc).__name__}): it is damaged or "
                                      "not DICOM; remove it from the series") from None
            if not _is_slice(header):
                skipped["not a slice"] += 1
                continue
            instances.append(_Instance(item, header, what))
    if any(skipped.values()):
        _LOG.debug("read_series skipped %s", ", ".join(f"{n} {k}" for k, n in skipped.items() if n))
    if not instances and not allow_none:
        found = ", ".join(f"{n} {k}" for k, n in skipped.items() if n)
        raise SeriesError("no image slices found" + (f" (skipped: {found})" if found else "")
                          + ": pass a folder or files of one image series (CT, MR, PET...)")
    return instances


def _open(item: Any, what: str):
    if isinstance(item, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(item))
    try:
        return open(item, "rb")
    except OSError as exc:
        raise SeriesError(f"cannot read {what}: {exc.strerror or type(exc).__name__}") from None
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"cannot read {what}: the path is invalid ({type(exc).__name__})") from None


def _get(ds: Any, keyword: str) -> Any:
    """Element value or None (absent, empty, or unparsable: the caller decides whether that matters)."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - lazy parsing of a damaged element
        return None
    if value is None or (isinstance(value, str) and not value.strip(" \x00")):
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and len(value) == 0:
            return None
    except Exception:  # noqa: BLE001
        return None
    return value


def _texts(ds: Any, keyword: str) -> Optional[list[str]]:
    """The values of a DS or UI element as text, or None when absent or empty.

    Taken from the raw bytes when pydicom has not converted the element yet:
    its per-value conversion and validation of DS and UI were most of the
    time read_series spent on headers (about 0.1 ms per element). Bytes that
    are not ASCII (which DS and UI never are) go through pydicom.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import tag_for_keyword

    try:
        element = ds.get_item(tag_for_keyword(keyword))
    except Exception:  # noqa: BLE001 - a damaged element
        return None
    if element is None:
        return None
    if isinstance(element, RawDataElement) and isinstance(element.value, (bytes, bytearray)):
        try:
            parts = [part.strip(" \x00") for part in bytes(element.value).decode("ascii").split("\\")]
        except UnicodeDecodeError:
            parts = None
        if parts is not None:
            return None if parts == [""] else parts
    from pydicom.multival import MultiValue

    value = _get(ds, keyword)
    if value is None:
        return None
    return [str(v).strip(" \x00") for v in (value if isinstance(value, (MultiValue, list, tuple)) else [value])]


def _uid(ds: Any, keyword: str) -> Optional[str]:
    values = _texts(ds, keyword)
    if values is None or len(values) != 1:
        return None
    text = values[0]
    return text if len(text) <= 64 and _UID_RE.match(text) else None


def _is_slice(ds: Any) -> bool:
    sop_class = _uid(ds, "SOPClassUID") or ""
    return _get(ds, "Rows") is not None and not sop_class.startswith(_NON_SLICE_SOP_PREFIX)


def _size(ds: Any, uid: str) -> tuple[int, int]:
    """(Rows, Columns), each one positive integer, else SeriesError."""
    size = []
    for keyword in ("Rows", "Columns"):
        value = _get(ds, keyword)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
            size.append(int(value))
        else:
            raise SeriesError(f"instance {uid}: {keyword} is missing or not one positive integer: the file is damaged")
    return size[0], size[1]


def _frame_count(ds: Any) -> int:
    value = _get(ds, "NumberOfFrames")
    try:
        return max(1, int(value)) if value is not None else 1
    except (TypeError, ValueError):
        return 1


def _group(instances: list[_Instance]) -> dict[str, list[_Instance]]:
    groups: dict[str, list[_Instance]] = {}
    for instance in instances:
        uid = _uid(instance.header, "SeriesInstanceUID")
        if uid is None:
            raise SeriesError(f"{instance.what} has no valid Series Instance UID (0020,000E): it cannot be "
                              "assigned to a series")
        groups.setdefault(uid, []).append(instance)
    return groups


def _instances_of_series(instances: list[_Instance], series_uid: Optional[str]) -> list[_Instance]:
    groups = _group(instances)
    listing = "; ".join(f"{uid} ({len(items)} instance(s), {sum(_frame_count(i.header) for i in items)} "
                        "slice(s))" for uid, items in sorted(groups.items()))
    if series_uid is not None:
        if str(series_uid) not in groups:
            raise SeriesError(f"no series with Series Instance UID {series_uid} among the sources; found: {listing}")
        return groups[str(series_uid)]
    if len(groups) > 1:
        raise SeriesError(f"the sources hold {len(groups)} series: {listing}. Pick one with "
                          "read_series(..., series_uid=UID) (medge.series.list_series lists them)")
    return next(iter(groups.values()))


# --------------------------------------------------------------------------- geometry


@dataclass
class _Slice:
    instance: int  # index into the series' instances
    uid: str
    frame: int  # 1-based
    position: np.ndarray  # Image Position (Patient)
    orientation: np.ndarray  # 6 direction cosines
    pixel_spacing: np.ndarray  # (row, column)
    along: float = 0.0  # projection on the normal


def _item(ds: Any, keyword: str) -> Any:
    value = _get(ds, keyword)
    try:
        return value[0] if value is not None and len(value) > 0 else None
    except Exception:  # noqa: BLE001 - not a sequence (a damaged file)
        return None


def _numbers(ds: Any, keyword: str, count: int, where: str, required: bool = True) -> Optional[np.ndarray]:
    texts = _texts(ds, keyword) if ds is not None else None
    if texts is None:
        if required:
            raise SeriesError(f"{where}has no {keyword}: without it the slice cannot be placed in the volume "
                              "(read single images with medge.read_dicom)")
        return None
    try:
        values = np.array([float(v) for v in texts])
    except (TypeError, ValueError):
        raise SeriesError(f"{where}{keyword} is not a list of numbers: the file is damaged") from None
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise SeriesError(f"{where}{keyword} must hold {count} finite numbers, it holds {values.size}")
    return values


def _functional(ds: Any, per_frame: Any, macro: str, keyword: str) -> tuple[Any, str]:
    """(dataset holding ``keyword``, where): the frame's functional group, else the shared one, else the top level."""
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    for group in (per_frame, shared):
        item = _item(group, macro) if group is not None else None
        if item is not None and _texts(item, keyword) is not None:
            return item, macro
    return ds, ""


def _slices_of(index: int, ds: Any, uid: str) -> list[_Slice]:
    try:
        return _slices_of_unchecked(index, ds, uid)
    except (TypeError, AttributeError, IndexError, KeyError, ValueError):
        # Functional groups of the wrong VR or shape (a damaged file): pydicom hands back text or bytes.
        raise SeriesError(f"instance {uid}: its functional groups cannot be read (wrong type or shape): the file "
                          "is damaged") from None


def _slices_of_unchecked(index: int, ds: Any, uid: str) -> list[_Slice]:
    frames = _frame_count(ds)
    per_frame_items = _get(ds, "PerFrameFunctionalGroupsSequence")
    if frames > 1 and (per_frame_items is None or len(per_frame_items) != frames):
        raise SeriesError(f"instance {uid} has {frames} frames but no Per-frame Functional Groups for each: the "
                          "position of its frames is unknown (classic multi-frame objects are not supported)")
    result = []
    for frame in range(1, frames + 1):
        per_frame = per_frame_items[frame - 1] if per_frame_items is not None else None
        where = f"instance {uid}" + (f" frame {frame}" if frames > 1 else "") + ": "
        holder, _ = _functional(ds, per_frame, "PlanePositionSequence", "ImagePositionPatient")
        position = _numbers(holder, "ImagePositionPatient", 3, where)
        holder, _ = _functional(ds, per_frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        orientation = _numbers(holder, "ImageOrientationPatient", 6, where)
        holder, _ = _functional(ds, per_frame, "PixelMeasuresSequence", "PixelSpacing")
        spacing = _numbers(holder, "PixelSpacing", 2, where)
        if not np.all(spacing > 0):
            raise SeriesError(f"{where}PixelSpacing must be positive")
        result.append(_Slice(index, uid, frame, position, orientation, spacing))
    return result


def _fallback_slice_spacing(ds: Any) -> float:
    """Spacing Between Slices, else Slice Thickness, else 1 mm: the slice spacing of a single-slice volume."""
    per_frame = _item(ds, "PerFrameFunctionalGroupsSequence")
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        holder, _ = _functional(ds, per_frame, "PixelMeasuresSequence", keyword)
        try:
            values = _numbers(holder, keyword, 1, "", required=False)
        except SeriesError:  # a damaged optional attribute: try the next one
            values = None
        if values is not None and values[0] > 0:
            return float(abs(values[0]))
    return 1.0


def _axes(orientation: np.ndarray, uid: str) -> np.ndarray:
    row, column = orientation[:3], orientation[3:]
    lengths = (np.linalg.norm(row), np.linalg.norm(column))
    if max(abs(n - 1) for n in lengths) > _ORTHONORMAL_TOLERANCE or abs(row @ column) > _ORTHONORMAL_TOLERANCE:
        raise SeriesError(f"instance {uid}: Image Orientation (Patient) is not two orthogonal unit vectors: the "
                          "file is damaged")
    row = row / np.linalg.norm(row)
    column = column - (column @ row) * row
    column = column / np.linalg.norm(column)
    return np.stack([row, column, np.cross(row, column)])


def _spacing_issues(along: np.ndarray, tolerance: float) -> tuple[Optional[float], list[SeriesIssue]]:
    """(typical gap or None, issues) of sorted positions along the normal."""
    gaps = np.diff(along)
    if gaps.size == 0:
        return None, []
    positive = gaps[gaps > 1e-6]
    nominal = float(np.median(positive)) if positive.size else None
    issues = []
    for k, gap in enumerate(gaps):
        pair, where = (k, k + 1), (float(along[k]), float(along[k + 1]))
        if nominal is None or gap <= tolerance * nominal:
            issues.append(SeriesIssue("duplicate", pair, where,
                                      f"slices {k} and {k + 1} lie at the same position ({where[0]:.3f} mm along "
                                      "the slice normal)"))
            continue
        ratio = gap / nominal
        steps = round(ratio)
        if abs(gap - nominal) <= tolerance * nominal:
            continue
        if steps >= 2 and abs(gap - steps * nominal) <= tolerance * nominal:
            expected = [where[0] + j * gap / steps for j in range(1, steps)]
            at = ", ".join(f"{p:.3f}" for p in expected[:5]) + (", ..." if len(expected) > 5 else "")
            issues.append(SeriesIssue("missing", pair, where,
                                      f"{steps - 1} slice(s) missing at {at} mm between slices {k} and {k + 1} "
                                      f"({where[0]:.3f} and {where[1]:.3f} mm along the normal, {gap:.3f} mm apart "
                                      f"where the series' spacing is {nominal:.3f} mm)"))
        else:
            issues.append(SeriesIssue("uneven", pair, where,
                                      f"slices {k} and {k + 1} are {gap:.3f} mm apart ({where[0]:.3f} and "
                                      f"{where[1]:.3f} mm along the normal) where the series' spacing is "
                                      f"{nominal:.3f} mm (tolerance {tolerance:.2%})"))
    return nominal, issues


def _build_volume(instances: list[_Instance], policy: str, spacing_tolerance: float, orientation_tolerance: float,
                  max_voxels: int) -> Volume:
    with quiet_pydicom("reading DICOM series headers"):
        # One instance per SOP Instance UID: the same instance given twice is a duplicate.
        unique: list[_Instance] = []
        seen: dict[str, int] = {}
        repeated: list[str] = []
        for instance in instances:
            uid = _uid(instance.header, "SOPInstanceUID")
            if uid is None:
                raise SeriesError(f"{instance.what} has no valid SOP Instance UID (0008,0018): its slices could "
                                  "not be referenced")
            if uid in seen:
                repeated.append(uid)
                continue
            seen[uid] = len(unique)
            unique.append(instance)
        headers = [i.header for i in unique]
        uids = list(seen)
        series_uid = _uid(headers[0], "SeriesInstanceUID")
        slices = [s for index, ds in enumerate(headers) for s in _slices_of(index, ds, uids[index])]
        rows_columns = {_size(ds, uid) for ds, uid in zip(headers, uids)}
        frames_of_reference = {_uid(ds, "FrameOfReferenceUID") for ds in headers}
        studies = {_uid(ds, "StudyInstanceUID") for ds in headers}
        fallback_spacing = _fallback_slice_spacing(headers[0]) if len(slices) == 1 else None

    if len(rows_columns) > 1:
        sizes = ", ".join(f"{r} x {c}" for r, c in sorted(rows_columns, key=str))
        raise SeriesError(f"the slices of series {series_uid} differ in size ({sizes} rows x columns): they cannot "
                          "be stacked; pick the slices of one size (a localizer may be mixed in)")
    rows, columns = next(iter(rows_columns))
    if len(frames_of_reference) > 1:
        raise SeriesError(f"the slices of series {series_uid} have {len(frames_of_reference)} different Frame of "
                          "Reference UIDs: their positions are not in one coordinate system")
    if len(studies) > 1:
        raise SeriesError(f"the instances of series {series_uid} belong to {len(studies)} studies: the sources "
                          "are inconsistent")
    voxels = len(slices) * rows * columns
    if voxels > max_voxels:
        raise SeriesError(f"series {series_uid} has {voxels} voxels ({len(slices)} x {rows} x {columns}), more "
                          f"than max_voxels={max_voxels}: raise the limit if this is expected")

    # Reference geometry: the slice with the smallest (SOP Instance UID, frame), so that it never depends on the
    # order the sources were given in.
    reference = min(slices, key=lambda s: (s.uid, s.frame))
    axes = _axes(reference.orientation, reference.uid)
    for s in slices:
        deviation = float(np.max(np.abs(s.orientation - reference.orientation)))
        if deviation > orientation_tolerance:
            raise SeriesError(
                f"instance {s.uid}" + (f" frame {s.frame}" if s.frame > 1 else "") + " is oriented differently "
                f"from instance {reference.uid} (direction cosines differ by {deviation:.4g} > "
                f"{orientation_tolerance:g}): slices of several orientations (a localizer, a second stack) cannot "
                "form one volume; pick the slices of one orientation")
        relative = np.abs(s.pixel_spacing - reference.pixel_spacing) / reference.pixel_spacing
        if float(np.max(relative)) > _PIXEL_SPACING_RTOL:
            raise SeriesError(
                f"instance {s.uid} has Pixel Spacing {s.pixel_spacing[0]:.6g} x {s.pixel_spacing[1]:.6g} mm but "
                f"instance {reference.uid} {reference.pixel_spacing[0]:.6g} x {reference.pixel_spacing[1]:.6g} mm: "
                "slices of different spacing cannot be stacked")
        s.along = float(s.position @ axes[2])
    slices.sort(key=lambda s: (s.along, s.uid, s.frame))
    along = np.array([s.along for s in slices])
    positions = np.stack([s.position for s in slices])

    nominal, issues = _spacing_issues(along, spacing_tolerance)
    for uid in repeated:
        index = next(k for k, s in enumerate(slices) if s.uid == uid)
        issues.insert(0, SeriesIssue("duplicate", (index,), (float(along[index]),),
                                     f"instance {uid} (slice {index}) was given more than once; one copy is used"))
    # Shear: the stack must run along the normal, else the grid origin + k * spacing * normal misplaces slices.
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ axes[2], axes[2])
    limit = _SHEAR_TOLERANCE_PIXELS * float(min(reference.pixel_spacing))
    sheared = np.flatnonzero(np.linalg.norm(in_plane, axis=1) > limit)
    if sheared.size:
        worst = int(sheared[np.argmax(np.linalg.norm(in_plane[sheared], axis=1))])
        issues.append(SeriesIssue(
            "sheared", tuple(int(k) for k in sheared), tuple(float(along[k]) for k in sheared),
            f"{sheared.size} slice(s) are offset in-plane from slice 0 (slice {worst} by "
            f"{np.linalg.norm(in_plane[worst]):.3f} mm, more than a tenth of a pixel): the stack is sheared "
            "(gantry tilt), not a rectangular grid"))
    if issues and policy == "refuse":
        listing = "; ".join(i.detail for i in issues[:8]) + (f"; and {len(issues) - 8} more" if len(issues) > 8 else "")
        raise SeriesError(
            f"series {series_uid} is not a regular volume: {listing}. Fix the series (add the missing slices, "
            "remove duplicates), or pass policy='report' to get the Volume anyway with volume.issues listing "
            "these (every slice kept; its geometry is then the regular grid of the typical spacing)")

    if nominal is None:
        slice_spacing = fallback_spacing if fallback_spacing is not None else 1.0
    elif not issues:
        slice_spacing = float((along[-1] - along[0]) / (len(along) - 1))  # the mean gap: the most precise estimate
    else:
        slice_spacing = nominal

    pixels, semantics, acquisition = _read_pixels(unique, uids, slices, rows, columns)
    study_uid = next(iter(studies))
    first_seen = list(dict.fromkeys(s.instance for s in slices))
    return Volume(
        pixels=pixels,
        semantics=semantics,
        acquisition=acquisition,
        origin=positions[0].copy(),
        direction=axes,
        spacing=(float(reference.pixel_spacing[0]), float(reference.pixel_spacing[1]), float(slice_spacing)),
        slice_positions=along,
        image_positions=positions,
        sop_instance_uids=tuple(s.uid for s in slices),
        frame_numbers=tuple(s.frame for s in slices),
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        frame_of_reference_uid=next(iter(frames_of_reference)),
        issues=tuple(issues),
        source_datasets=tuple(unique[i].header for i in first_seen),
    )


# --------------------------------------------------------------------------- pixels


def _read_pixels(instances: list[_Instance], uids: list[str], slices: list[_Slice], rows: int,
                 columns: int) -> tuple[np.ndarray, PixelSemantics, Optional[Acquisition]]:
    """Stored values and per-slice transforms, one instance decoded at a time (read_dicom)."""
    where: dict[int, list[tuple[int, int]]] = {}  # instance -> [(frame, slice index)]
    for k, s in enumerate(slices):
        where.setdefault(s.instance, []).append((s.frame, k))
    pixels: Optional[np.ndarray] = None
    transforms: list[Optional[FrameTransform]] = [None] * len(slices)
    first: Optional[PixelSemantics] = None
    acquisition: Optional[Acquisition] = None
    bits_stored = 0
    for index in sorted(where, key=lambda i: min(k for _, k in where[i])):
        source = instances[index].source
        try:
            image = read_dicom(bytes(source) if isinstance(source, memoryview) else source)
        except MissingDependency:
            raise
        except DicomError as exc:
            raise SeriesError(f"instance {uids[index]} of the series cannot be read: {exc}") from None
        sem = image.semantics
        if (sem.rows, sem.columns) != (rows, columns) or sem.number_of_frames != _frame_count(instances[index].header):
            raise SeriesError(f"instance {uids[index]} decodes to {sem.number_of_frames} x {sem.rows} x {sem.columns} "
                              "but its header says otherwise: the file changed while reading or is damaged")
        if first is None:
            first, acquisition = sem, image.acquisition
            pixels = np.empty((len(slices), rows, columns), dtype=image.pixels.dtype)
        elif (sem.pixel_representation, sem.photometric_interpretation, image.pixels.dtype) != (
                first.pixel_representation, first.photometric_interpretation, pixels.dtype):
            raise SeriesError(
                f"instance {uids[index]} stores its pixels differently from instance {uids[slices[0].instance]} "
                f"({image.pixels.dtype} {sem.photometric_interpretation} vs {pixels.dtype} "
                f"{first.photometric_interpretation}): the slices cannot share one volume")
        bits_stored = max(bits_stored, sem.bits_stored)
        for frame, k in where[index]:
            pixels[k] = image.pixels[frame - 1]
            transforms[k] = sem.frame_transform(frame - 1)
    assert pixels is not None and first is not None
    frames = tuple(transforms)  # type: ignore[arg-type]
    if all(t == frames[0] for t in frames):
        frames = frames[:1]
    # Values were masked / sign-extended per instance already; the widest Bits Stored describes them all.
    semantics = PixelSemantics(rows=rows, columns=columns, number_of_frames=len(slices),
                               bits_allocated=first.bits_allocated, bits_stored=bits_stored,
                               pixel_representation=first.pixel_representation,
                               photometric_interpretation=first.photometric_interpretation, frames=frames)
    return pixels, semantics, acquisition
