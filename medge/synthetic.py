"""Synthetic, deterministic DICOM objects: CT phantoms and the encodings public test data lacks.

Used by the tests, the ``medge demo`` sample set, benchmarks and (later) demo
model training. Everything here is a pure function of its arguments: the same
seed gives the same pixels and the same UIDs on every machine, so a labels
file written today still matches the images regenerated tomorrow.

No real person is described: patient attributes are fixed, obviously
synthetic values (PatientName ``SYNTHETIC^CT``, PatientID ``MEDGE-SYNTHETIC``,
Patient Identity Removed ``YES``).

Contents:

- :func:`ct_phantom` / :func:`ct_slice` / :func:`ct_slice_with_truth`: an
  axial chest CT slice (body, lungs, ribs, vertebra, optional lung nodule) and
  its ground truth (:class:`LesionTruth`).
- :func:`write_ct_series`: N slices plus ``labels.csv`` for training and
  validation.
- Encodings not shipped in pydicom's wheel: :func:`monochrome1_cr` (MONOCHROME1,
  12 of 16 bits stored, junk in the unused high bits), :func:`enhanced_multiframe`
  (functional groups with per-frame rescale and windows),
  :func:`big_endian` (Explicit VR Big Endian) and :func:`rle` (RLE Lossless).
- :func:`write_samples`: the demo sample set.

pydicom is imported lazily, like everywhere in medge.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from .errors import MissingDependency
from .image import FrameTransform, Window

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pydicom.dataset import Dataset

__all__ = [
    "LesionTruth",
    "ct_phantom",
    "ct_slice",
    "ct_slice_with_truth",
    "write_ct_series",
    "cr_phantom",
    "monochrome1_cr",
    "enhanced_multiframe",
    "enhanced_frame_transforms",
    "big_endian",
    "rle",
    "write_samples",
    "CT_RESCALE_INTERCEPT",
    "CT_WINDOWS",
    "LABELS_FILENAME",
]

#: Rescale Intercept of the synthetic CT slices: stored value = HU + 1024.
CT_RESCALE_INTERCEPT = -1024.0

#: Window pairs written to the synthetic CT slices (first one: soft tissue 40/400).
CT_WINDOWS = (Window(40.0, 400.0, "SOFT TISSUE"), Window(-600.0, 1500.0, "LUNG"))

#: Name of the labels file written by :func:`write_ct_series`.
LABELS_FILENAME = "labels.csv"

#: Field of view of the synthetic CT slices, in millimetres (sets Pixel Spacing).
CT_FOV_MM = 350.0

_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
_CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
_EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_RLE_LOSSLESS = "1.2.840.10008.1.2.5"

# Tissue values in HU (typical published ranges).
_AIR_HU = -1000.0
_FAT_HU = -90.0
_SOFT_TISSUE_HU = 45.0
_LUNG_HU = -850.0
_VESSEL_HU = -150.0  # small vessels are partial-volumed blood in aerated lung
_CORTICAL_BONE_HU = 1150.0
_CANCELLOUS_BONE_HU = 720.0
_RIB_HU = 950.0


@dataclass(frozen=True)
class LesionTruth:
    """Ground truth of one synthetic CT slice.

    Attributes:
        present: whether the slice contains a lung nodule (the label).
        center: (row, column) of the nodule centre in pixels (pixel centres at
            integer coordinates), or None.
        radius: nodule radius in pixels, or None.
        hu: nodule density in HU before noise, or None.
        side: ``"left"`` or ``"right"`` in image space (columns below or
            above the middle), or None.
    """

    present: bool
    center: Optional[tuple[float, float]] = None
    radius: Optional[float] = None
    hu: Optional[float] = None
    side: Optional[str] = None


# --------------------------------------------------------------------------- helpers


def _pydicom():
    """pydicom, imported on first use (medge imports without it)."""
    try:
        import pydicom
        import pydicom.dataset  # noqa: F401 - make sure the submodule is loaded
    except ImportError as exc:
        raise MissingDependency("pydicom", None, "Generating synthetic DICOM") from exc
    return pydicom


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "medge.synthetic")


def _uid(*parts: object) -> str:
    """A deterministic UID from the generator name and its arguments.

    A ``2.25.`` UID (PS3.5 B.2: the integer of a UUID) of a name-based
    (version 5) UUID, so no organisation root is needed. pydicom's
    ``generate_uid(prefix=None, ...)`` cannot be used: with ``prefix=None``
    it ignores ``entropy_srcs`` and returns a random UUID4.
    """
    name = "/".join(map(str, parts))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _content_key(values: Optional[np.ndarray]) -> str:
    """Part of a UID's name: "phantom", or a digest of caller-given pixel values."""
    if values is None:
        return "phantom"
    array = np.ascontiguousarray(values)
    return f"values:{array.dtype.str}:{array.shape}:{hashlib.sha256(array.tobytes()).hexdigest()}"


def _rng(seed: int, stream: int) -> np.random.Generator:
    # Independent streams per purpose, so that (for example) the anatomy of a
    # seed does not depend on the image size or on whether a lesion is drawn.
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([int(seed), stream])


def _check_size(size: int, minimum: int = 8) -> int:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < minimum:
        raise ValueError(f"size must be an integer >= {minimum}, got {size!r}")
    return int(size)


def _grid(size: int) -> np.ndarray:
    """Normalised coordinates of pixel centres: -1 (first edge) .. +1 (last edge)."""
    return (np.arange(size, dtype=np.float64) + 0.5) * (2.0 / size) - 1.0


def _paint_ellipse(img: np.ndarray, coords: np.ndarray, cy: float, cx: float, ry: float, rx: float,
                   value: float) -> None:
    """Blend ``value`` into ``img`` inside an axis-aligned ellipse, anti-aliased over one pixel.

    Works on the bounding box only, so small shapes (ribs, vessels) cost little
    at 512 x 512. Coverage uses the first-order signed distance to the ellipse,
    which gives a one-pixel soft edge like a CT reconstruction's partial volume.
    """
    size = img.shape[0]
    pixel = 2.0 / size
    r0 = max(int(math.floor((cy - ry + 1.0) / pixel - 1.5)), 0)
    r1 = min(int(math.ceil((cy + ry + 1.0) / pixel + 1.5)), size)
    c0 = max(int(math.floor((cx - rx + 1.0) / pixel - 1.5)), 0)
    c1 = min(int(math.ceil((cx + rx + 1.0) / pixel + 1.5)), size)
    if r0 >= r1 or c0 >= c1:
        return
    dy = (coords[r0:r1, None] - cy) / ry
    dx = (coords[None, c0:c1] - cx) / rx
    f = np.sqrt(dy * dy + dx * dx)
    # |grad f| = sqrt((dx/rx)^2 + (dy/ry)^2) / f ; signed distance ~ (1 - f) / |grad f|
    grad = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) / np.maximum(f, 1e-12)
    distance = (1.0 - f) / np.maximum(grad, 1e-12)
    coverage = np.clip(distance / pixel + 0.5, 0.0, 1.0)
    region = img[r0:r1, c0:c1]
    region += coverage * (value - region)


def _inside_ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _base_dataset(*, sop_class: str, sop_instance: str, study: str, series: str, modality: str,
                  transfer_syntax: str, patient_name: str) -> "Dataset":
    """Patient/study/series/equipment attributes shared by every synthetic object."""
    pydicom = _pydicom()
    Dataset, FileMetaDataset = pydicom.dataset.Dataset, pydicom.dataset.FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationVersionName = "MEDGE_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    # Obviously synthetic patient: fixed values, no dates, identity-removed flag set.
    ds.PatientName = patient_name
    ds.PatientID = "MEDGE-SYNTHETIC"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom generated by medge.synthetic; no patient"
    ds.StudyInstanceUID = study
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.StudyID = "SYNTH"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "medge synthetic phantom"
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "medge synthetic"
    ds.ManufacturerModelName = "phantom"
    ds.SoftwareVersions = f"pydicom {pydicom.__version__}"
    ds.InstanceNumber = 1
    return ds


def _set_pixel_module(ds: "Dataset", *, rows: int, columns: int, bits_allocated: int, bits_stored: int,
                      pixel_representation: int, photometric: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation


def _set_windows(target: "Dataset", windows: Sequence[Window], function: Optional[str] = None) -> None:
    def one_or_many(values):
        return values[0] if len(values) == 1 else list(values)

    target.WindowCenter = one_or_many([w.center for w in windows])
    target.WindowWidth = one_or_many([w.width for w in windows])
    target.WindowCenterWidthExplanation = one_or_many([w.explanation or "" for w in windows])
    if function is not None:
        target.VOILUTFunction = function


# --------------------------------------------------------------------------- CT phantom


def ct_phantom(*, seed: int, size: int = 512, lesion: bool, noise_hu: float = 10.0) -> tuple[np.ndarray, LesionTruth]:
    """An axial chest CT slice in HU, and its ground truth.

    Anatomy (body ellipse with a fat layer, two lungs with small vessels,
    ribs, a vertebral body) is drawn from ``seed`` in normalised coordinates,
    so the same seed gives the same anatomy at every ``size``, and the same
    anatomy and noise with and without the lesion (a paired image that differs
    only by the nodule). The nodule is a round soft-tissue density (40..80 HU,
    radius 2.5..5 % of the field of view) placed entirely inside one lung.

    Args:
        seed: non-negative integer; every random choice derives from it.
        size: rows = columns, >= 8.
        lesion: draw the lung nodule.
        noise_hu: standard deviation of the additive gaussian noise (HU).

    Returns:
        (hu, truth): ``hu`` int16 (size, size) HU values (rounded),
        ``truth`` the :class:`LesionTruth`.

    Raises:
        ValueError: for a negative or non-integer seed or a size below 8.
    """
    size = _check_size(size)
    geo = _rng(seed, 0)
    coords = _grid(size)

    # Body: ellipse, slightly below the middle, wider than tall.
    cy = 0.05 + geo.uniform(-0.03, 0.03)
    cx = geo.uniform(-0.03, 0.03)
    ay = geo.uniform(0.56, 0.66)
    ax = geo.uniform(0.78, 0.88)
    fat = geo.uniform(0.04, 0.07)
    # Lungs relative to the body axes (always inside the soft tissue).
    lungs = []
    for sign in (-1.0, 1.0):
        lcy = cy - ay * geo.uniform(0.12, 0.18)
        lcx = cx + sign * ax * geo.uniform(0.42, 0.47)
        lry = ay * geo.uniform(0.56, 0.64)
        lrx = ax * geo.uniform(0.27, 0.31)
        lungs.append((lcy, lcx, lry, lrx))
    # Vertebral body behind the mediastinum.
    vr = ay * geo.uniform(0.13, 0.16)
    vcy = cy + ay * 0.93 * (1 - fat) - vr * 1.9
    vcx = cx + geo.uniform(-0.01, 0.01)
    # Ribs along the inside of the body wall.
    # (angles on the body ellipse; negative = anterior, i.e. towards row 0)
    rib_angles = math.pi * np.array([-0.80, -0.68, -0.32, -0.20, 0.08, 0.20, 0.80, 0.92])
    rib_jitter = geo.uniform(-0.05, 0.05, size=rib_angles.shape)
    # Vessels inside the lungs.
    vessels = []
    for lcy, lcx, lry, lrx in lungs:
        for _ in range(int(geo.integers(5, 9))):
            t = geo.uniform(0, 2 * math.pi)
            rho = math.sqrt(geo.uniform(0.0, 0.7))
            vessels.append((lcy + rho * lry * math.sin(t), lcx + rho * lrx * math.cos(t),
                            geo.uniform(0.005, 0.012)))
    # Lesion parameters are drawn whether or not the lesion is drawn, so that
    # the anatomy of a seed is the same both ways.
    lesion_side = int(geo.integers(0, 2))
    lesion_r = 2.0 * geo.uniform(0.025, 0.05)  # normalised units: FOV width is 2
    lesion_hu = float(geo.uniform(40.0, 80.0))
    lcy, lcx, lry, lrx = lungs[lesion_side]
    boundary = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    # Keep lung around the nodule (2 % of the FOV). Size-independent, so the
    # nodule of a seed sits at the same place at every image size.
    margin = 0.04
    for _ in range(1000):
        t = geo.uniform(0, 2 * math.pi)
        rho = math.sqrt(geo.uniform(0.0, 1.0))
        py = lcy + rho * lry * math.sin(t)
        px = lcx + rho * lrx * math.cos(t)
        ring_y = py + (lesion_r + margin) * np.sin(boundary)
        ring_x = px + (lesion_r + margin) * np.cos(boundary)
        if _inside_ellipse(ring_y, ring_x, lcy, lcx, lry, lrx).all():
            break
    else:  # pragma: no cover - the lungs are always far larger than the nodule
        raise RuntimeError("could not place the lesion inside the lung")

    img = np.full((size, size), _AIR_HU)
    _paint_ellipse(img, coords, cy, cx, ay, ax, _FAT_HU)
    _paint_ellipse(img, coords, cy, cx, ay * (1 - fat), ax * (1 - fat), _SOFT_TISSUE_HU)
    for angle, jitter in zip(rib_angles, rib_jitter):
        a = angle + jitter
        ry_, rx_ = ay * (1 - fat) * 0.9, ax * (1 - fat) * 0.9
        _paint_ellipse(img, coords, cy + ry_ * math.sin(a), cx + rx_ * math.cos(a), 0.03, 0.018, _RIB_HU)
    for l_cy, l_cx, l_ry, l_rx in lungs:
        _paint_ellipse(img, coords, l_cy, l_cx, l_ry, l_rx, _LUNG_HU)
    for v_cy, v_cx, v_r in vessels:
        _paint_ellipse(img, coords, v_cy, v_cx, v_r, v_r, _VESSEL_HU)
    _paint_ellipse(img, coords, vcy, vcx, vr, vr, _CORTICAL_BONE_HU)
    _paint_ellipse(img, coords, vcy, vcx, vr * 0.75, vr * 0.75, _CANCELLOUS_BONE_HU)

    truth = LesionTruth(present=False)
    if lesion:
        _paint_ellipse(img, coords, py, px, lesion_r, lesion_r, lesion_hu)
        to_pixel = size / 2.0
        truth = LesionTruth(
            present=True,
            center=((py + 1.0) * to_pixel - 0.5, (px + 1.0) * to_pixel - 0.5),
            radius=lesion_r * to_pixel,
            hu=lesion_hu,
            side="left" if px < 0 else "right",
        )

    if noise_hu:
        img += _rng(seed, 1).normal(0.0, float(noise_hu), size=img.shape)
    hu = np.clip(np.rint(img), -2048, 3071).astype(np.int16)
    return hu, truth


def _ct_stored(hu: np.ndarray) -> np.ndarray:
    return (hu.astype(np.int32) - int(CT_RESCALE_INTERCEPT)).astype(np.int16)


def _ct_dataset(stored: np.ndarray, *, seed: int, uid_parts: tuple) -> "Dataset":
    """CT Image Storage dataset around int16 stored values (Explicit VR Little Endian).

    ``uid_parts`` make the SOP Instance UID unique to what generated the pixels.
    """
    rows, columns = stored.shape
    ds = _base_dataset(
        sop_class=_CT_IMAGE_STORAGE,
        sop_instance=_uid(*uid_parts, "instance", seed, rows, columns),
        study=_uid(uid_parts[0], "study", seed),
        series=_uid(uid_parts[0], "series", seed),
        modality="CT",
        transfer_syntax=_EXPLICIT_VR_LITTLE_ENDIAN,
        patient_name="SYNTHETIC^CT",
    )
    ds.SeriesDescription = "synthetic chest CT phantom"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    ds.KVP = 120
    ds.AcquisitionNumber = 1
    ds.SliceThickness = 1.0
    spacing = CT_FOV_MM / columns
    ds.PixelSpacing = [spacing, spacing]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-CT_FOV_MM / 2 + spacing / 2, -CT_FOV_MM / 2 + spacing / 2, 0.0]
    ds.SliceLocation = 0.0
    # Signed 16-bit, all 16 bits stored: stored = HU + 1024 ranges from about
    # -100 (noisy air) to about 2300 (cortical bone), which 12 bits stored
    # signed (-2048..2047, i.e. up to 1023 HU) could not hold.
    _set_pixel_module(ds, rows=rows, columns=columns, bits_allocated=16, bits_stored=16,
                      pixel_representation=1, photometric="MONOCHROME2")
    ds.RescaleIntercept = CT_RESCALE_INTERCEPT
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    _set_windows(ds, CT_WINDOWS)
    ds.PixelData = stored.astype("<i2").tobytes()
    return ds


def ct_slice_with_truth(*, seed: int, size: int = 512, lesion: bool,
                        noise_hu: float = 10.0) -> tuple["Dataset", LesionTruth]:
    """A synthetic CT Image Storage dataset and its ground truth.

    Encoding: Explicit VR Little Endian, MONOCHROME2, Bits Allocated 16,
    Bits Stored 16, Pixel Representation 1 (int16), Rescale Slope 1,
    Rescale Intercept -1024 (stored = HU + 1024), windows 40/400 (soft
    tissue) and -600/1500 (lung). UIDs are derived from (seed, size, lesion).

    Args:
        seed, size, lesion, noise_hu: as :func:`ct_phantom`.

    Returns:
        (dataset, truth).

    Raises:
        ValueError: invalid seed or size.
        MissingDependency: pydicom is not installed.
    """
    hu, truth = ct_phantom(seed=seed, size=size, lesion=lesion, noise_hu=noise_hu)
    return _ct_dataset(_ct_stored(hu), seed=seed, uid_parts=("ct", lesion, noise_hu)), truth


def ct_slice(*, seed: int, size: int = 512, lesion: bool, noise_hu: float = 10.0) -> "Dataset":
    """A synthetic CT slice as a pydicom Dataset (see :func:`ct_slice_with_truth`)."""
    return ct_slice_with_truth(seed=seed, size=size, lesion=lesion, noise_hu=noise_hu)[0]


def _series_seeds(seed: int, count: int) -> list[int]:
    # 63-bit seeds from one SeedSequence: distinct for all practical counts and
    # never overlapping with another series' seeds by construction of i.
    state = np.random.SeedSequence([int(seed), 0x5E12E5]).generate_state(count, np.uint64)
    return [int(s >> np.uint64(1)) for s in state]


def write_ct_series(directory: Union[str, os.PathLike], count: int, *, seed: int = 0, size: int = 512,
                    lesion_fraction: float = 0.5) -> list[Path]:
    """Write ``count`` synthetic CT slices and ``labels.csv`` into ``directory``.

    Exactly ``round(count * lesion_fraction)`` slices carry a nodule, at
    positions chosen from ``seed``. Each slice has its own seed (listed in the
    CSV, so any slice can be regenerated with :func:`ct_slice_with_truth`);
    all share one Study and Series Instance UID and are numbered by Instance
    Number. File names (``ct_00000.dcm``...) do not reveal the label.

    ``labels.csv`` columns: ``filename, sop_instance_uid, label`` (1 = nodule),
    ``seed, lesion_row, lesion_col, lesion_radius`` (pixels; empty without a
    nodule).

    Args:
        directory: created if missing.
        count: number of slices (>= 1).
        seed: series seed.
        size: rows = columns of every slice.
        lesion_fraction: fraction of slices with a nodule, 0..1.

    Returns:
        The paths of the DICOM files, in order.

    Raises:
        ValueError: invalid count, fraction, seed or size.
    """
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if not 0.0 <= float(lesion_fraction) <= 1.0:
        raise ValueError(f"lesion_fraction must be within 0..1, got {lesion_fraction!r}")
    _check_size(size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n_lesion = int(round(count * float(lesion_fraction)))
    with_lesion = np.zeros(count, dtype=bool)
    with_lesion[_rng(seed, 2).permutation(count)[:n_lesion]] = True
    study = _uid("ct-series", "study", seed)
    series = _uid("ct-series", "series", seed, size)

    paths: list[Path] = []
    rows = []
    for index, slice_seed in enumerate(_series_seeds(seed, count)):
        lesion = bool(with_lesion[index])
        ds, truth = ct_slice_with_truth(seed=slice_seed, size=size, lesion=lesion)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = index + 1
        path = directory / f"ct_{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        rows.append({
            "filename": path.name,
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "label": int(truth.present),
            "seed": slice_seed,
            "lesion_row": f"{truth.center[0]:.3f}" if truth.present else "",
            "lesion_col": f"{truth.center[1]:.3f}" if truth.present else "",
            "lesion_radius": f"{truth.radius:.3f}" if truth.present else "",
        })
    with open(directory / LABELS_FILENAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return paths


# --------------------------------------------------------------------------- other encodings


def cr_phantom(*, seed: int = 0, size: int = 64) -> np.ndarray:
    """A chest-radiograph-like image of 12-bit stored values for MONOCHROME1.

    Shape (size, size * 3 // 4): deliberately not square, so row/column mix-ups
    show. MONOCHROME1 means low values display white: direct exposure (air)
    is high (~3700), lungs ~2800, soft tissue ~1800, bone (spine, ribs) low.

    Returns:
        uint16 array with every value in 0..4095.
    """
    size = _check_size(size)
    rng = _rng(seed, 3)
    rows, columns = size, max(size * 3 // 4, 1)
    y = _grid(rows)[:, None]
    x = ((np.arange(columns) + 0.5) * (2.0 / columns) - 1.0)[None, :]
    img = np.full((rows, columns), 3700.0)
    body = ((x / 0.85) ** 2 + (y / 1.3) ** 2) <= 1.0
    img[body] = 1800.0
    for sign in (-1.0, 1.0):
        lung = ((x - sign * 0.42) / 0.3) ** 2 + ((y + 0.05) / 0.7) ** 2 <= 1.0
        img = np.where(lung, 2800.0 + 150.0 * y, img)
    spine = np.abs(x) < 0.08
    img[spine & body] = 900.0
    for k in range(6):  # ribs: bright (low-valued) bands across the lungs
        band = np.abs(y - (-0.6 + 0.22 * k) - 0.08 * np.abs(x)) < 0.025
        img[band & body] -= 700.0
    img += rng.normal(0.0, 40.0, size=img.shape)
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def monochrome1_cr(*, seed: int = 0, size: int = 64, values: Optional[np.ndarray] = None,
                   junk_bits: bool = True) -> "Dataset":
    """A CR Image Storage dataset: MONOCHROME1, uint16 with 12 of 16 bits stored.

    Bits Allocated 16, Bits Stored 12, High Bit 11, Pixel Representation 0,
    no Rescale Slope/Intercept (so the defaults 1/0 apply), one window
    2048/4096. With ``junk_bits`` the unused top 4 bits of every stored word
    hold random values (PS3.5 8.1.1 says readers must ignore them), so a
    reader that does not mask sees values up to 65535.

    Args:
        seed: selects the phantom and the junk.
        size: rows; columns are ``size * 3 // 4``.
        values: 2-D uint16 array of 12-bit stored values to encode instead of
            :func:`cr_phantom` (then ``size`` is ignored).
        junk_bits: put random data in bits 12..15.

    Returns:
        The dataset; the clean stored values are ``values`` (or
        ``cr_phantom(seed=seed, size=size)``).

    Raises:
        ValueError: ``values`` not 2-D or outside 0..4095.
    """
    clean = cr_phantom(seed=seed, size=size) if values is None else np.asarray(values)
    if clean.ndim != 2 or clean.size == 0:
        raise ValueError(f"values must be a non-empty 2-D array, got shape {clean.shape}")
    if clean.min() < 0 or clean.max() > 4095:
        raise ValueError("values must be 12-bit stored values (0..4095)")
    clean = clean.astype(np.uint16)
    rows, columns = clean.shape
    ds = _base_dataset(
        sop_class=_CR_IMAGE_STORAGE,
        sop_instance=_uid("cr", "instance", seed, rows, columns, junk_bits, _content_key(values)),
        study=_uid("cr", "study", seed),
        series=_uid("cr", "series", seed),
        modality="CR",
        transfer_syntax=_EXPLICIT_VR_LITTLE_ENDIAN,
        patient_name="SYNTHETIC^CR",
    )
    ds.SeriesDescription = "synthetic chest radiograph phantom"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImagerPixelSpacing = [0.2, 0.2]
    _set_pixel_module(ds, rows=rows, columns=columns, bits_allocated=16, bits_stored=12,
                      pixel_representation=0, photometric="MONOCHROME1")
    _set_windows(ds, [Window(2048.0, 4096.0, "FULL RANGE")])
    words = clean.copy()
    if junk_bits:
        junk = _rng(seed, 4).integers(0, 16, size=clean.shape, dtype=np.uint16)
        words |= junk << np.uint16(12)
    ds.PixelData = words.astype("<u2").tobytes()
    return ds


def enhanced_frame_transforms(frames: int = 3) -> tuple[FrameTransform, ...]:
    """The per-frame Modality LUT / VOI that :func:`enhanced_multiframe` encodes.

    Frame ``i`` uses pattern ``i % 3``: (slope 1, intercept -1024, window
    40/400 LINEAR, per-frame), (slope 2, intercept -2048, window -600/1500
    LINEAR_EXACT, per-frame), (slope 0.5, intercept -512, no per-frame window:
    the Shared Functional Groups window 50/350 SIGMOID applies).
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames!r}")
    patterns = (
        FrameTransform(1.0, -1024.0, (Window(40.0, 400.0, "SOFT TISSUE"),), "LINEAR"),
        FrameTransform(2.0, -2048.0, (Window(-600.0, 1500.0, "LUNG"),), "LINEAR_EXACT"),
        FrameTransform(0.5, -512.0, (Window(50.0, 350.0, "SHARED"),), "SIGMOID"),
    )
    return tuple(patterns[i % 3] for i in range(frames))


def enhanced_multiframe(*, seed: int = 0, size: int = 64, frames: int = 3) -> "Dataset":
    """An Enhanced CT Image Storage dataset whose frames differ in rescale and window.

    Frame ``i`` is the :func:`ct_phantom` of seed ``seed + i`` (no lesion),
    encoded with the transform ``enhanced_frame_transforms(frames)[i]``:
    stored = round((HU - intercept) / slope), int16, Bits Stored 16. Rescale
    sits in each frame's Pixel Value Transformation Sequence; windows in each
    frame's Frame VOI LUT Sequence, except frames ``i % 3 == 2``, which have
    none and fall back to the Shared Functional Groups' Frame VOI LUT Sequence.
    (The standard puts a functional group macro either in the shared or in
    the per-frame sequence; files in the wild mix them, and this exercises a
    reader's per-frame -> shared -> top-level fallback.) There is no top-level
    Rescale or Window, as in real enhanced objects.

    Not a complete Enhanced CT IOD (no dimension module, few CT-specific
    macros); enough for pydicom and medge.

    Args:
        seed: phantom seed of frame 0.
        size: rows = columns.
        frames: number of frames (>= 3 recommended, to have all three patterns).

    Returns:
        The dataset.
    """
    Dataset = _pydicom().dataset.Dataset
    size = _check_size(size)
    transforms = enhanced_frame_transforms(frames)
    stored = np.empty((frames, size, size), dtype=np.int16)
    for i, t in enumerate(transforms):
        hu, _ = ct_phantom(seed=seed + i, size=size, lesion=False)
        stored[i] = np.clip(np.rint((hu - t.rescale_intercept) / t.rescale_slope), -32768, 32767)

    ds = _base_dataset(
        sop_class=_ENHANCED_CT_IMAGE_STORAGE,
        sop_instance=_uid("enhanced", "instance", seed, size, frames),
        study=_uid("enhanced", "study", seed),
        series=_uid("enhanced", "series", seed),
        modality="CT",
        transfer_syntax=_EXPLICIT_VR_LITTLE_ENDIAN,
        patient_name="SYNTHETIC^CT",
    )
    ds.SeriesDescription = "synthetic enhanced CT phantom"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = frames
    _set_pixel_module(ds, rows=size, columns=size, bits_allocated=16, bits_stored=16,
                      pixel_representation=1, photometric="MONOCHROME2")
    spacing = CT_FOV_MM / size

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [spacing, spacing]
    measures.SliceThickness = 1.0
    shared.PixelMeasuresSequence = [measures]
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = [orientation]
    shared_voi = Dataset()
    _set_windows(shared_voi, enhanced_frame_transforms(3)[2].windows, "SIGMOID")
    shared.FrameVOILUTSequence = [shared_voi]
    ds.SharedFunctionalGroupsSequence = [shared]

    per_frame = []
    for i, t in enumerate(transforms):
        item = Dataset()
        content = Dataset()
        content.InStackPositionNumber = i + 1
        content.FrameAcquisitionNumber = 1
        item.FrameContentSequence = [content]
        position = Dataset()
        position.ImagePositionPatient = [-CT_FOV_MM / 2, -CT_FOV_MM / 2, float(i)]
        item.PlanePositionSequence = [position]
        pvt = Dataset()
        pvt.RescaleSlope = t.rescale_slope
        pvt.RescaleIntercept = t.rescale_intercept
        pvt.RescaleType = "HU"
        item.PixelValueTransformationSequence = [pvt]
        if i % 3 != 2:
            voi = Dataset()
            _set_windows(voi, t.windows, t.voi_function)
            item.FrameVOILUTSequence = [voi]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = stored.astype("<i2").tobytes()
    return ds


def big_endian(*, seed: int = 0, size: int = 64, values: Optional[np.ndarray] = None) -> "Dataset":
    """A CT slice encoded as Explicit VR Big Endian (1.2.840.10008.1.2.2), int16 signed.

    Same attributes as :func:`ct_slice` (no lesion); the Pixel Data bytes are
    big-endian, so pydicom decodes it to a ``>i2`` array.

    Args:
        seed, size: phantom, as :func:`ct_phantom`.
        values: 2-D int16-compatible stored values to encode instead (then
            ``size`` is ignored).

    Returns:
        The dataset; the stored values are ``values`` or
        ``ct_phantom(seed=seed, size=size, lesion=False)[0] + 1024``.
    """
    if values is None:
        stored = _ct_stored(ct_phantom(seed=seed, size=size, lesion=False)[0])
    else:
        stored = np.asarray(values)
        if stored.ndim != 2 or stored.size == 0:
            raise ValueError(f"values must be a non-empty 2-D array, got shape {stored.shape}")
        if stored.min() < -32768 or stored.max() > 32767:
            raise ValueError("values must fit int16")
        stored = stored.astype(np.int16)
    ds = _ct_dataset(stored, seed=seed, uid_parts=("big-endian", _content_key(values)))
    ds.file_meta.TransferSyntaxUID = _EXPLICIT_VR_BIG_ENDIAN
    ds.PixelData = stored.astype(">i2").tobytes()
    return ds


def rle(*, seed: int = 0, size: int = 64) -> "Dataset":
    """A CT slice (as :func:`ct_slice`, no lesion) compressed with RLE Lossless.

    Compressed with pydicom's own RLE encoder, so no extra package is needed.
    The decoded stored values are ``ct_phantom(seed=seed, size=size,
    lesion=False)[0] + 1024``.
    """
    hu, _ = ct_phantom(seed=seed, size=size, lesion=False)
    ds = _ct_dataset(_ct_stored(hu), seed=seed, uid_parts=("rle",))
    # Our UID is already unique to this content and deterministic; pydicom
    # would otherwise replace it with a random one.
    ds.compress(_RLE_LOSSLESS, encoding_plugin="pydicom", generate_instance_uid=False)
    return ds


def write_samples(directory: Union[str, os.PathLike], *, size: int = 512, ct_count: int = 4) -> list[Path]:
    """Write the demo sample set: CT slices (+ ``labels.csv``) and one file per special encoding.

    Files: ``ct_00000.dcm``... (``ct_count`` slices, half with a nodule, from
    :func:`write_ct_series` with seed 0), ``cr_monochrome1.dcm``,
    ``ct_enhanced_multiframe.dcm`` (3 frames), ``ct_big_endian.dcm``,
    ``ct_rle.dcm``.

    Args:
        directory: created if missing.
        size: CT size (the CR has ``size`` rows).
        ct_count: number of plain CT slices.

    Returns:
        The DICOM paths (``labels.csv`` is not included), sorted.
    """
    directory = Path(directory)
    paths = write_ct_series(directory, ct_count, seed=0, size=size, lesion_fraction=0.5)
    special = {
        "cr_monochrome1.dcm": monochrome1_cr(seed=0, size=size),
        "ct_enhanced_multiframe.dcm": enhanced_multiframe(seed=0, size=size, frames=3),
        "ct_big_endian.dcm": big_endian(seed=0, size=size),
        "ct_rle.dcm": rle(seed=0, size=size),
    }
    for name, ds in special.items():
        path = directory / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return sorted(paths)


# --------------------------------------------------------------------------- CT volume series (known geometry)


#: Rescale patterns of :func:`ct_volume_series` with ``per_slice_rescale=True``: slice ``k`` uses ``k % 3``.
VOLUME_RESCALES = ((1.0, -1024.0), (2.0, -2048.0), (0.5, -512.0))

# HU of the synthetic volume: air, a body cylinder, a spherical "organ/lesion".
_VOLUME_AIR_HU = -1000.0
_VOLUME_BODY_HU = 40.0
_VOLUME_SPHERE_HU = 120.0


@dataclass(frozen=True, eq=False)
class VolumeTruth:
    """What :func:`ct_volume_series` wrote, in the order a reader should recover (ascending along the normal).

    One entry per written slice (frame), duplicates included, sorted by
    position along the slice normal, then by SOP Instance UID.

    Attributes:
        direction: 3x3, rows: row direction (Image Orientation (Patient)
            values 1-3, the way the column index grows), column direction
            (values 4-6, the way the row index grows), normal (their cross product).
        spacing: (row spacing, column spacing, nominal slice spacing) in mm;
            row spacing is Pixel Spacing value 1 (between rows, along the column direction).
        image_positions: (slices, 3) Image Position (Patient) of each slice, mm.
        slice_positions: (slices,) projection of each position on the normal, mm.
        sop_instance_uids, frame_numbers: the instance (and 1-based frame) of each slice.
        transforms: (slope, intercept) of each slice.
        hu: (slices, rows, columns) float64 HU of each slice (what rescaled stored values give exactly).
        mask: (slices, rows, columns) bool: pixel centres inside the sphere.
        center_mm, radius_mm: the sphere in patient coordinates.
        series_instance_uid, study_instance_uid, frame_of_reference_uid.
    """

    direction: np.ndarray
    spacing: tuple[float, float, float]
    image_positions: np.ndarray
    slice_positions: np.ndarray
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int, ...]
    transforms: tuple[tuple[float, float], ...]
    hu: np.ndarray
    mask: np.ndarray
    center_mm: np.ndarray
    radius_mm: float
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str


def _volume_slice(position: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, rows: int, columns: int,
                  pixel_spacing: tuple[float, float], body_center: np.ndarray, body_radius: float,
                  center: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(HU, sphere mask) of one slice: pixel (r, c) lies at position + c*dc*row_dir + r*dr*col_dir (PS3.3 C.7.6.2.1.1)."""
    r = np.arange(rows, dtype=np.float64)[:, None, None]
    c = np.arange(columns, dtype=np.float64)[None, :, None]
    points = position + c * pixel_spacing[1] * row_dir + r * pixel_spacing[0] * col_dir  # (rows, columns, 3)
    normal = np.cross(row_dir, col_dir)
    # The body: a cylinder along the normal (distance from its axis, ignoring the normal component).
    offset = points - body_center
    radial = offset - (offset @ normal)[..., None] * normal
    body = np.sqrt((radial * radial).sum(-1)) <= body_radius
    mask = np.sqrt(((points - center) ** 2).sum(-1)) <= radius
    hu = np.full((rows, columns), _VOLUME_AIR_HU)
    hu[body] = _VOLUME_BODY_HU
    hu[mask] = _VOLUME_SPHERE_HU
    return hu, mask


def ct_volume_series(*, seed: int = 0, slices: int = 12, rows: int = 32, columns: int = 32,
                     pixel_spacing: tuple[float, float] = (0.8, 0.6), slice_spacing: float = 2.5,
                     orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                     origin: Sequence[float] = (-12.0, -10.0, 30.0),
                     sphere_center_mm: Optional[Sequence[float]] = None, sphere_radius_mm: Optional[float] = None,
                     missing: Sequence[int] = (), duplicate: Sequence[int] = (),
                     offsets_mm: Optional[dict] = None, shuffle: bool = False,
                     per_slice_rescale: bool = False, enhanced: bool = False) -> tuple[list["Dataset"], VolumeTruth]:
    """A CT series with known geometry and a known spherical "organ/lesion", for series -> volume tests.

    The nominal grid has ``slices`` slices; slice ``k`` lies at ``origin + k *
    slice_spacing * normal`` (normal = row direction x column direction)
    plus ``offsets_mm.get(k, 0)`` along the normal. Pixels: air (-1000 HU)
    outside a body cylinder (40 HU) along the normal, and a sphere (120 HU)
    whose voxels (pixel centres within ``sphere_radius_mm`` of
    ``sphere_center_mm``) are ``VolumeTruth.mask``. Stored values are int16
    with Rescale Slope/Intercept 1/-1024, or, with ``per_slice_rescale``,
    slice ``k`` uses ``VOLUME_RESCALES[k % 3]`` (the HU are the same; the
    stored values differ) and a window that differs per pattern.

    Args:
        seed: sets the UIDs (and the file order when shuffled).
        slices, rows, columns: nominal grid size (each >= 1; rows, columns >= 4).
        pixel_spacing: (row spacing, column spacing) in mm, as Pixel Spacing.
        slice_spacing: nominal distance between slices along the normal, mm (> 0).
        orientation: Image Orientation (Patient), six direction cosines (normalised here).
        origin: Image Position (Patient) of nominal slice 0, mm.
        sphere_center_mm: default: the centre of the nominal grid.
        sphere_radius_mm: default: 0.3 x the smallest extent of the nominal grid.
        missing: nominal slice indices left out (a gap).
        duplicate: nominal slice indices written twice (same position and
            pixels, a second SOP Instance UID).
        offsets_mm: nominal index -> displacement along the normal (uneven spacing).
        shuffle: return the datasets (or, with ``enhanced``, the frames) in a seeded random order.
        per_slice_rescale: vary Rescale Slope/Intercept and window per slice.
        enhanced: one Enhanced CT Image object holding every slice as a frame
            (Per-frame Plane Position and Pixel Value Transformation, Shared
            Plane Orientation and Pixel Measures) instead of one CT Image per slice.

    Returns:
        (datasets in file order, truth in reading order).

    Raises:
        ValueError: invalid arguments.
        MissingDependency: pydicom is not installed.
    """
    pydicom = _pydicom()
    Dataset = pydicom.dataset.Dataset
    for name, value, minimum in (("slices", slices, 1), ("rows", rows, 4), ("columns", columns, 4)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not (len(pixel_spacing) == 2 and all(float(v) > 0 for v in pixel_spacing)) or not float(slice_spacing) > 0:
        raise ValueError("pixel_spacing must be two positive numbers and slice_spacing positive")
    cosines = np.asarray(orientation, dtype=np.float64)
    if cosines.shape != (6,):
        raise ValueError("orientation must be six direction cosines")
    row_dir = cosines[:3] / np.linalg.norm(cosines[:3])
    col_dir = cosines[3:] - (cosines[3:] @ row_dir) * row_dir
    col_dir /= np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    origin_v = np.asarray(origin, dtype=np.float64)
    offsets_mm = dict(offsets_mm or {})
    spacing = (float(pixel_spacing[0]), float(pixel_spacing[1]))
    extent = np.array([(rows - 1) * spacing[0], (columns - 1) * spacing[1], (slices - 1) * float(slice_spacing)])
    grid_center = (origin_v + extent[1] / 2 * row_dir + extent[0] / 2 * col_dir
                   + extent[2] / 2 * normal)
    center = grid_center if sphere_center_mm is None else np.asarray(sphere_center_mm, dtype=np.float64)
    radius = 0.3 * float(min(e for e in extent if e > 0) if any(extent > 0) else 1.0) \
        if sphere_radius_mm is None else float(sphere_radius_mm)
    body_radius = 0.45 * float(min(extent[0], extent[1]))

    study = _uid("volume", "study", seed)
    series = _uid("volume", "series", seed, enhanced)
    frame_of_reference = _uid("volume", "frame-of-reference", seed)

    # (nominal index, copy) of every written slice, in nominal order.
    written = [(k, 0) for k in range(slices) if k not in set(missing)]
    written += [(k, 1) for k in duplicate if k not in set(missing)]
    written.sort()
    entries = []
    for k, copy in written:
        position = origin_v + (k * float(slice_spacing) + float(offsets_mm.get(k, 0.0))) * normal
        hu, mask = _volume_slice(position, row_dir, col_dir, rows, columns, spacing, grid_center, body_radius,
                                 center, radius)
        slope, intercept = VOLUME_RESCALES[k % 3] if per_slice_rescale else VOLUME_RESCALES[0]
        stored = np.rint((hu - intercept) / slope).astype(np.int16)
        entries.append({"k": k, "copy": copy, "position": position, "hu": stored * slope + intercept, "mask": mask,
                        "stored": stored, "slope": slope, "intercept": intercept,
                        "window": CT_WINDOWS[k % 2] if per_slice_rescale else CT_WINDOWS[0]})
    order = list(range(len(entries)))
    if shuffle:
        order = [int(i) for i in _rng(seed, 7).permutation(len(entries))]
        if order == sorted(order) and len(order) > 1:  # a shuffle that changed nothing tests nothing
            order = order[::-1]

    def base(sop_class: str, sop_instance: str) -> "Dataset":
        ds = _base_dataset(sop_class=sop_class, sop_instance=sop_instance, study=study, series=series,
                           modality="CT", transfer_syntax=_EXPLICIT_VR_LITTLE_ENDIAN, patient_name="SYNTHETIC^CT")
        ds.SeriesDescription = "synthetic CT volume"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.BodyPartExamined = "CHEST"
        _set_pixel_module(ds, rows=rows, columns=columns, bits_allocated=16, bits_stored=16,
                          pixel_representation=1, photometric="MONOCHROME2")
        return ds

    datasets: list["Dataset"] = []
    if not enhanced:
        for e in entries:
            ds = base(_CT_IMAGE_STORAGE, _uid("volume", "instance", seed, e["k"], e["copy"]))
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.InstanceNumber = e["k"] + 1
            ds.SliceThickness = float(slice_spacing)
            ds.PixelSpacing = list(spacing)
            ds.ImageOrientationPatient = [float(v) for v in np.concatenate([row_dir, col_dir])]
            ds.ImagePositionPatient = [float(v) for v in e["position"]]
            ds.SliceLocation = float(e["position"] @ normal)
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = e["slope"], e["intercept"], "HU"
            _set_windows(ds, (e["window"],))
            ds.PixelData = e["stored"].astype("<i2").tobytes()
            e["uid"], e["frame"] = str(ds.SOPInstanceUID), 1
            datasets.append(ds)
        datasets = [datasets[i] for i in order]
    else:
        uid = _uid("volume", "enhanced-instance", seed)
        ds = base(_ENHANCED_CT_IMAGE_STORAGE, uid)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", "NONE"]
        ds.NumberOfFrames = len(entries)
        shared = Dataset()
        measures = Dataset()
        measures.PixelSpacing = list(spacing)
        measures.SliceThickness = float(slice_spacing)
        shared.PixelMeasuresSequence = [measures]
        plane = Dataset()
        plane.ImageOrientationPatient = [float(v) for v in np.concatenate([row_dir, col_dir])]
        shared.PlaneOrientationSequence = [plane]
        ds.SharedFunctionalGroupsSequence = [shared]
        per_frame = []
        for frame, i in enumerate(order, start=1):
            e = entries[i]
            item = Dataset()
            content = Dataset()
            content.FrameAcquisitionNumber = 1
            item.FrameContentSequence = [content]
            position = Dataset()
            position.ImagePositionPatient = [float(v) for v in e["position"]]
            item.PlanePositionSequence = [position]
            pvt = Dataset()
            pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = e["slope"], e["intercept"], "HU"
            item.PixelValueTransformationSequence = [pvt]
            voi = Dataset()
            _set_windows(voi, (e["window"],), "LINEAR")
            item.FrameVOILUTSequence = [voi]
            per_frame.append(item)
            e["uid"], e["frame"] = uid, frame
        ds.PerFrameFunctionalGroupsSequence = per_frame
        ds.PixelData = np.stack([entries[i]["stored"] for i in order]).astype("<i2").tobytes()
        datasets = [ds]

    # Reading order: along the normal, ties (duplicates) by SOP Instance UID then frame.
    entries.sort(key=lambda e: (float(e["position"] @ normal), e["uid"], e["frame"]))
    truth = VolumeTruth(
        direction=np.stack([row_dir, col_dir, normal]),
        spacing=(spacing[0], spacing[1], float(slice_spacing)),
        image_positions=np.stack([e["position"] for e in entries]),
        slice_positions=np.array([float(e["position"] @ normal) for e in entries]),
        sop_instance_uids=tuple(e["uid"] for e in entries),
        frame_numbers=tuple(e["frame"] for e in entries),
        transforms=tuple((e["slope"], e["intercept"]) for e in entries),
        hu=np.stack([e["hu"] for e in entries]),
        mask=np.stack([e["mask"] for e in entries]),
        center_mm=center,
        radius_mm=radius,
        series_instance_uid=series,
        study_instance_uid=study,
        frame_of_reference_uid=frame_of_reference,
    )
    return datasets, truth


def write_ct_volume_series(directory: Union[str, os.PathLike], **kwargs) -> tuple[list[Path], VolumeTruth]:
    """Write :func:`ct_volume_series` (same keyword arguments) into ``directory``, one file per dataset.

    File names (``vol_00000.dcm``...) follow the returned (possibly shuffled)
    order, so a sorted directory listing is not the slice order either.

    Returns:
        (paths in file order, truth).
    """
    datasets, truth = ct_volume_series(**kwargs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = directory / f"vol_{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, truth


__all__ += ["VolumeTruth", "VOLUME_RESCALES", "ct_volume_series", "write_ct_volume_series"]
