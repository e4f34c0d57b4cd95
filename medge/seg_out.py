"""A label map over a :class:`~medge.series.Volume` -> one DICOM Segmentation, written by highdicom.

One Segmentation per source series: its frames reference the source
instances (and frames, for an enhanced multi-frame source) they were derived
from, so a viewer lays it over the series. Each non-background label of the
bundle is one segment (segment number = label value), described by the
label's name, and by its codes when the bundle gives them (else Tissue /
Tissue, the neutral default 3D Slicer also uses), with the algorithm
identification: family Artificial Intelligence (DCM 123110), name and
version of the bundle, source "medge", and as its parameters the SHA-256 of
the bundle's manifest (which hashes every file of the bundle) and the medge
version. Every label is written, also those absent from this series: an
empty segment says the model looked and found none.

Segmentation type: BINARY by default (Segmentation Storage, what every
SEG-aware viewer and archive reads today: OHIF, 3D Slicer, dcmqi, most
PACS). ``segmentation_type="LABELMAP"`` writes the Label Map Segmentation
Storage SOP Class (DICOM 2024c, one frame per slice instead of one per slice
and segment, much smaller for many labels), which highdicom >= 0.24 writes
and reads but few viewers display yet.

UIDs are derived from what produced the result (manifest SHA-256, source
series, label map content), so writing the same result twice gives the same
SOP Instance UID and an archive keeps it once; a different label map gets a
different one.

highdicom is imported lazily (``pip install "medge[dicom-out]"``). Patient
and study attributes come from the source headers, as the Segmentation IOD
requires; none is ever part of a message or log record.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

from ._fs import atomic_write
from ._pydicom_quiet import quiet_pydicom
from .errors import DicomError, MedgeError, MissingDependency
from .series import Volume

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pydicom.dataset import Dataset

__all__ = ["write_segmentation", "SEGMENTATION_TYPES", "SEG_SERIES_NUMBER", "MANUFACTURER", "DEFAULT_CODES"]

#: Segmentation types written: BINARY (default) and LABELMAP.
SEGMENTATION_TYPES = ("BINARY", "LABELMAP")
#: Series Number of the Segmentation series (medge's result series use 99xx).
SEG_SERIES_NUMBER = 9903
#: Manufacturer written into every Segmentation.
MANUFACTURER = "medge"
#: (category, type) codes of a label given by name only: SCT Tissue / Tissue.
DEFAULT_CODES = (("85756007", "SCT", "Tissue"), ("85756007", "SCT", "Tissue"))

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_AI_FAMILY = ("123110", "DCM", "Artificial Intelligence")


def _import_highdicom():
    try:
        import highdicom
        import highdicom.seg  # noqa: F401
    except ImportError:
        raise MissingDependency("highdicom", "dicom-out", "Writing DICOM Segmentations") from None
    return highdicom


def _result_uid(*parts: object) -> str:
    """A UID under the 2.25 root derived from ``parts`` (same parts, same UID)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def write_segmentation(volume: Volume, label_map: Any, *, labels: Union[Sequence[Any], Mapping[int, Any]],
                       bundle_name: str, bundle_version: str, manifest_sha256: str,
                       out_path: Union[str, "os.PathLike[str]", None] = None,
                       out_dir: Union[str, "os.PathLike[str]", None] = None, segmentation_type: str = "BINARY",
                       series_number: int = SEG_SERIES_NUMBER, instance_number: int = 1) -> "Dataset":
    """Build (and optionally write) the DICOM Segmentation of ``label_map`` over ``volume``'s series.

    Args:
        volume: the series, as :func:`medge.series.read_series` returned it
            (its ``source_datasets`` are referenced).
        label_map: (slices, rows, columns) integer array in the Volume's slice
            order, 0 = background, value ``v`` = label ``v``; any integer dtype
            (or bool) whose values fit uint8.
        labels: the bundle's labels, indexed by label value: a sequence whose
            item 0 names the background (ignored), or a mapping value -> label.
            A label is a name, or a mapping with ``name`` and optionally
            ``category`` and ``type`` codes, each ``[value, scheme, meaning]``
            (e.g. ``["10200004", "SCT", "Liver"]``). Values 1..N must all be
            described; every one becomes a segment.
        bundle_name, bundle_version: the bundle's model name and version
            (algorithm name and version; cut to 64 characters).
        manifest_sha256: SHA-256 of the bundle's manifest, 64 hex digits.
        out_path: the file to write (its folder is created), or None.
        out_dir: instead of ``out_path``: a folder (created if missing) that
            gets ``SEG_<SOP Instance UID>.dcm``, what ``medge run
            --out-dicom DIR`` needs. Neither: build only.
        segmentation_type: ``"BINARY"`` (default) or ``"LABELMAP"``.
        series_number, instance_number: of the Segmentation.

    Returns:
        The Segmentation (a ``highdicom.seg.Segmentation``, a pydicom
        Dataset); when written, its ``filename`` is the path written.

    Raises:
        MedgeError: the label map does not match the volume, holds a value
            without a label, or the arguments are invalid.
        DicomError: the source headers cannot be referenced (no Frame of
            Reference, slices at one position, several multi-frame sources),
            or highdicom refuses them.
        MissingDependency: highdicom is not installed (extra ``dicom-out``).
    """
    hd = _import_highdicom()
    if out_path is not None and out_dir is not None:
        raise MedgeError("pass out_path (a file) or out_dir (a folder), not both")
    if not isinstance(volume, Volume):
        raise MedgeError(f"write_segmentation needs the Volume read_series returned, got {type(volume).__name__}")
    if segmentation_type not in SEGMENTATION_TYPES:
        raise MedgeError(f"segmentation_type must be one of {', '.join(SEGMENTATION_TYPES)}, got {segmentation_type!r}")
    sha = str(manifest_sha256).lower()
    if not _SHA256_RE.match(sha):
        raise MedgeError("manifest_sha256 must be the manifest's SHA-256 as 64 hexadecimal digits")
    for name, value in (("bundle_name", bundle_name), ("bundle_version", bundle_version)):
        if not isinstance(value, str) or not value.strip():
            raise MedgeError(f"{name} must be a non-empty string")
    mask = _label_map(label_map, volume.shape)
    segments = _segments(labels)
    highest = int(mask.max(initial=0))
    if highest > len(segments):
        present = sorted(int(v) for v in np.unique(mask) if v > len(segments))
        raise MedgeError(f"the label map holds value(s) {present} but labels describe only 1..{len(segments)}: "
                         "pass the bundle's labels (its task's label list)")
    source_images, pixel_array = _sources_and_frames(volume, mask)

    from pydicom.sr.coding import Code

    from . import __version__

    algorithm = hd.AlgorithmIdentificationSequence(
        name=bundle_name.strip()[:64], family=Code(*_AI_FAMILY), version=bundle_version.strip()[:64],
        source="medge", parameters={"manifest_sha256": sha, "medge": __version__})
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=Code(*category),
            segmented_property_type=Code(*kind), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for number, (name, category, kind) in enumerate(segments, start=1)
    ]
    content = hashlib.sha256(np.ascontiguousarray(mask).tobytes()).hexdigest()
    series_uid = _result_uid("medge-seg-series", sha, volume.series_instance_uid, segmentation_type)
    sop_uid = _result_uid("medge-seg", sha, volume.series_instance_uid, segmentation_type, mask.shape, content)
    with quiet_pydicom("writing a DICOM Segmentation"):
        try:
            seg = hd.seg.Segmentation(
                source_images=source_images,
                pixel_array=pixel_array,
                segmentation_type=segmentation_type,
                segment_descriptions=descriptions,
                series_instance_uid=series_uid,
                series_number=int(series_number),
                sop_instance_uid=sop_uid,
                instance_number=int(instance_number),
                manufacturer=MANUFACTURER,
                manufacturer_model_name=bundle_name.strip()[:64],
                software_versions=f"medge {__version__}",
                # The deployed algorithm is the device: its manifest hash identifies it.
                device_serial_number=sha[:16],
                content_description=f"{bundle_name.strip()} {bundle_version.strip()}"[:64],
                content_label="MEDGE",
                series_description=f"medge {bundle_name.strip()}"[:64],
            )
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            error: Optional[MedgeError] = DicomError(
                f"highdicom could not build the Segmentation of series {volume.series_instance_uid} "
                f"({type(exc).__name__}); the source headers lack or contradict what it needs (Frame of "
                "Reference, Image Position / Orientation (Patient), Pixel Spacing)")
        else:
            error = None
    if error is not None:
        raise error  # outside the except block: no chain (highdicom's and pydicom's texts can quote values)
    if out_path is not None or out_dir is not None:
        _write(seg, Path(out_path) if out_path is not None else Path(out_dir) / f"SEG_{sop_uid}.dcm")
    return seg


# --------------------------------------------------------------------------- helpers


def _label_map(label_map: Any, shape: tuple[int, int, int]) -> np.ndarray:
    array = np.asarray(label_map)
    if array.shape != tuple(shape):
        raise MedgeError(f"the label map has shape {array.shape} but the volume is {tuple(shape)} "
                         "(slices, rows, columns): map results back to the volume's grid first")
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype.kind not in "ui":
        raise MedgeError(f"the label map must hold integer labels, got dtype {array.dtype}")
    if array.size and (int(array.min()) < 0 or int(array.max()) > 255):
        raise MedgeError("label map values must lie within 0..255 (0 = background)")
    return array.astype(np.uint8, copy=False)


def _code(value: Any, default: tuple[str, str, str], what: str) -> tuple[str, str, str]:
    if value is None:
        return default
    if (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, str) and v.strip() for v in value)):
        return tuple(v.strip() for v in value)  # type: ignore[return-value]
    raise MedgeError(f"{what} must be [code value, coding scheme, code meaning], three non-empty strings")


def _segments(labels: Any) -> list[tuple[str, tuple[str, str, str], tuple[str, str, str]]]:
    """[(name, category code, type code)] for label values 1..N."""
    if isinstance(labels, Mapping):
        try:
            described = {int(k): v for k, v in labels.items() if int(k) != 0}
        except (TypeError, ValueError):
            raise MedgeError("labels given as a mapping must be keyed by integer label values") from None
    elif isinstance(labels, (list, tuple)):
        described = {k: v for k, v in enumerate(labels) if k != 0}
    else:
        raise MedgeError(f"labels must be a sequence (index = label value, 0 = background) or a mapping, got "
                         f"{type(labels).__name__}")
    if not described:
        raise MedgeError("labels name no foreground label (value 1 and up): nothing to segment")
    count = max(described)
    gaps = [v for v in range(1, count + 1) if v not in described]
    if gaps or min(described) < 1:
        raise MedgeError(f"labels must describe every value from 1 to {count}; missing: {gaps or 'values < 1'}")
    result = []
    for value in range(1, count + 1):
        label = described[value]
        category = kind = None
        if isinstance(label, Mapping):
            name = label.get("name")
            category, kind = label.get("category"), label.get("type")
        else:
            name = label
        if not isinstance(name, str) or not name.strip():
            raise MedgeError(f"label {value} has no name")
        result.append((name.strip(), _code(category, DEFAULT_CODES[0], f"label {value}'s category"),
                       _code(kind, DEFAULT_CODES[1], f"label {value}'s type")))
    return result


def _sources_and_frames(volume: Volume, mask: np.ndarray) -> tuple[list, np.ndarray]:
    """(source images, pixel array) in the correspondence highdicom expects.

    Single-frame sources: one image per slice, in the Volume's order. One
    multi-frame source: the array follows its frame order (the Volume may have
    reordered frames along the normal).
    """
    if volume.frame_of_reference_uid is None:
        raise DicomError(f"series {volume.series_instance_uid} has no Frame of Reference UID: a Segmentation "
                         "cannot be placed over it")
    duplicates = [i for i in volume.issues if i.kind == "duplicate" and len(i.slices) == 2]
    if duplicates:
        raise DicomError(f"slices {duplicates[0].slices[0]} and {duplicates[0].slices[1]} lie at one position: a "
                         "Segmentation cannot hold two frames there; read the series without the duplicate")
    by_uid = {}
    for ds in volume.source_datasets:
        by_uid[str(ds.SOPInstanceUID)] = ds
    missing = [uid for uid in dict.fromkeys(volume.sop_instance_uids) if uid not in by_uid]
    if missing:
        raise DicomError(f"the volume has no header of instance {missing[0]}: read it with medge.series.read_series")
    single_frame = all(f == 1 for f in volume.frame_numbers)
    if single_frame and len(set(volume.sop_instance_uids)) == len(volume.sop_instance_uids):
        return [by_uid[uid] for uid in volume.sop_instance_uids], mask
    instances = set(volume.sop_instance_uids)
    if len(instances) != 1:
        raise DicomError(f"the volume's slices come from {len(instances)} instances, some multi-frame: a "
                         "Segmentation references either single-frame images or one multi-frame image")
    source = by_uid[volume.sop_instance_uids[0]]
    frames = int(source.get("NumberOfFrames", 1) or 1)
    if sorted(volume.frame_numbers) != list(range(1, frames + 1)):
        raise DicomError("the volume does not hold every frame of its multi-frame source exactly once: a "
                         "Segmentation of it needs one label map frame per source frame")
    array = np.empty_like(mask)
    array[np.asarray(volume.frame_numbers) - 1] = mask
    return [source], array


def _write(seg: Any, path: Path) -> None:
    from pydicom import dcmwrite

    buffer = io.BytesIO()
    with quiet_pydicom("writing a DICOM Segmentation"):
        dcmwrite(buffer, seg, enforce_file_format=True)
    try:
        atomic_write(path, buffer.getbuffer())
    except OSError as exc:
        # The folder is named by the caller; its path is not repeated (it can hold a patient's name).
        raise MedgeError(f"cannot write the Segmentation: {exc.strerror or type(exc).__name__}") from None
    seg.filename = str(path)
