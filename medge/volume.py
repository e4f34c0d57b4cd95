"""Volume preprocessing: a series of stored-value slices -> a 3-D (or 2.5-D) model input, in one pass.

``VolumeSpec`` says what a volumetric model expects (VOI, target spacing or
size, interpolation, ROI crop/pad, normalisation, dtype, 2.5-D neighbours); it
round-trips through JSON like ``PreprocessSpec`` so it can live in a bundle
manifest. ``preprocess_volume`` runs it in the native core (multi-threaded
C++, or the CUDA kernel), in this order per voxel (DICOM PS3.3 C.7.6.3,
C.11.1, C.11.2; the 2-D path's maths):

stored value -> Bits Stored mask / sign extension -> the slice's Rescale
Slope/Intercept -> VOI (window LINEAR / LINEAR_EXACT / SIGMOID, or a fixed
value range) into [0, 1] -> MONOCHROME1 inversion -> resampling (trilinear or
nearest) -> crop/pad to the ROI -> (y - mean) / std -> float32 / float16.

Display values are resampled, as in the 2-D path (window first, then
interpolate). Geometry follows PyTorch's ``F.interpolate(size=...,
align_corners=False)``: the field of view is kept, output voxel ``i`` of an
axis resampled from ``n`` to ``m`` samples sits at input coordinate
``(i + 1/2) * n / m - 1/2``. With a target spacing, ``m = floor(n * spacing /
target + 1/2)`` (at least 1), so the spacing reached is ``n * spacing / m``.
The ROI crop / pad follows MONAI's ``ResizeWithPadOrCrop`` (centre crop
starting at ``m // 2 - roi // 2``, symmetric padding ``(roi - m) // 2``
before).

``to_original_grid`` maps a model's output (labels or probabilities) back onto
the series' own grid; ``resample_labels`` is the nearest-neighbour resampling
of a label map between two grids.

Axis orders: arrays and sizes are (slices, rows, columns); spacings are
(row, column, slice) in mm, the order of ``Volume.spacing`` (DICOM's Pixel
Spacing followed by the slice spacing).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from .errors import BackendUnavailable, PreprocessError, SpecError
from .image import VOI_FUNCTIONS

__all__ = [
    "VolumeSpec",
    "preprocess_volume",
    "resample_labels",
    "to_original_grid",
    "VOLUME_SPEC_SCHEMA_VERSION",
]

#: Version of the JSON form of VolumeSpec (stored in bundle manifests).
VOLUME_SPEC_SCHEMA_VERSION = 1

VOI_MODES = ("window", "range")
INTERPOLATIONS = ("trilinear", "nearest")
ROI_FITS = ("crop_or_pad", "pad")
DTYPES = ("float32", "float16")
MAX_SIDE = 16384  # per output axis (the native kMaxOutputSide)
MAX_NEIGHBOURS = 16
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class VolumeSpec:
    """What a volumetric model expects as input, and how a series becomes it.

    Attributes:
        voi: ``"window"``: the fixed ``window`` (center, width) in modality
            units with ``voi_function`` (default LINEAR); ``"range"``: the
            fixed modality-value ``value_range`` (low, high) -> [0, 1],
            clamped (MONAI ``ScaleIntensityRange(clip=True)`` with b = 0..1).
        window, voi_function, value_range: as for ``PreprocessSpec``.
        target_spacing: (row, column, slice) spacing in mm to resample to;
            or None.
        target_size: (slices, rows, columns) to resample to; or None. At most
            one of target_spacing / target_size; neither keeps the grid.
        interpolation: ``"trilinear"`` (PyTorch ``mode="trilinear",
            align_corners=False``) or ``"nearest"`` (``mode="nearest-exact"``:
            the voxel whose centre is nearest; for label-like inputs).
        roi_size: the model's input size (slices, rows, columns), or None.
        roi_fit: with a roi_size, ``"crop_or_pad"`` centre-crops larger and
            pads smaller axes to exactly the ROI (one window per volume);
            ``"pad"`` only pads smaller axes (a larger volume is then covered
            by ``medge.sliding_window.sliding_window``).
        pad_value: fill of padded voxels, in the display domain [0, 1]
            before normalisation (0 = the bottom of the window).
        mean, std: normalisation ``(y - mean) / std``.
        dtype: ``"float32"`` or ``"float16"``.
        neighbours: 2.5-D input for 2-D networks: k > 0 gives each output
            slice its k neighbours on each side as channels, shape
            ``(slices, 2k + 1, rows, columns)`` (a batch of 2-D inputs);
            beyond the first / last slice the edge slice is repeated. 0 gives
            ``(1, 1, slices, rows, columns)``.
    """

    voi: str = "window"
    window: Optional[tuple[float, float]] = None
    voi_function: Optional[str] = None
    value_range: Optional[tuple[float, float]] = None
    target_spacing: Optional[tuple[float, float, float]] = None
    target_size: Optional[tuple[int, int, int]] = None
    interpolation: str = "trilinear"
    roi_size: Optional[tuple[int, int, int]] = None
    roi_fit: str = "crop_or_pad"
    pad_value: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    dtype: str = "float32"
    neighbours: int = 0

    def __post_init__(self) -> None:
        # Plain Python values (JSON gives lists; numpy scalars are accepted), so the spec
        # hashes, compares and serialises the same however it was built.
        for name, size, kind in (("window", 2, float), ("value_range", 2, float), ("target_spacing", 3, float),
                                 ("target_size", 3, int), ("roi_size", 3, int)):
            value = getattr(self, name)
            if value is None:
                continue
            what = f"{size} {'integers' if kind is int else 'numbers'}"
            if isinstance(value, (str, bytes)):
                raise SpecError(f"{name} must be {what}, got {value!r}")
            try:
                values = tuple(value)
            except TypeError:
                raise SpecError(f"{name} must be {what}, got {value!r}") from None
            check = _is_int if kind is int else _is_number
            if len(values) != size or not all(check(v) for v in values):
                raise SpecError(f"{name} must be {what}, got {value!r}")
            try:
                object.__setattr__(self, name, tuple(kind(v) for v in values))
            except OverflowError:
                raise SpecError(f"{name} values must be finite, got {value!r}") from None
        for name in ("pad_value", "mean", "std"):
            value = getattr(self, name)
            if not _is_number(value):
                raise SpecError(f"{name} must be a number, got {value!r}")
            try:
                object.__setattr__(self, name, float(value))
            except OverflowError:
                raise SpecError(f"{name} must be finite, got {value!r}") from None
        if _is_int(self.neighbours):
            object.__setattr__(self, "neighbours", int(self.neighbours))
        if not isinstance(self.dtype, str):
            try:
                object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
            except Exception:  # noqa: BLE001 - np.dtype() of an arbitrary object raises many kinds
                raise SpecError(f"dtype must be one of {DTYPES}, got {self.dtype!r}") from None
        self._validate()

    def _validate(self) -> None:
        def one_of(name: str, choices: tuple, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if not (v is None and allow_none) and not (isinstance(v, str) and v in choices):
                raise SpecError(f"{name} must be one of {choices}{' or None' if allow_none else ''}, got {v!r}")

        one_of("voi", VOI_MODES)
        one_of("voi_function", VOI_FUNCTIONS, allow_none=True)
        if self.voi == "window":
            if self.window is None:
                raise SpecError('voi="window" needs window=(center, width) in modality units')
            center, width = self.window
            if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
                raise SpecError(f"window must be finite with width > 0, got {self.window!r}")
            if (self.voi_function or "LINEAR") == "LINEAR" and width < 1:
                raise SpecError(f"window width must be >= 1 for LINEAR (use LINEAR_EXACT), got {width!r}")
            if self.value_range is not None:
                raise SpecError('value_range is only used with voi="range"')
        else:
            if self.value_range is None:
                raise SpecError('voi="range" needs value_range=(low, high) in modality units')
            low, high = self.value_range
            if not (math.isfinite(low) and math.isfinite(high)) or not high > low or not math.isfinite(high - low):
                raise SpecError(f"value_range must be finite with high > low, got {self.value_range!r}")
            if self.window is not None or self.voi_function is not None:
                raise SpecError('window and voi_function are only used with voi="window"')
        if self.target_spacing is not None and self.target_size is not None:
            raise SpecError("give target_spacing or target_size, not both")
        if self.target_spacing is not None and not all(math.isfinite(s) and s > 0 for s in self.target_spacing):
            raise SpecError(f"target_spacing must be positive finite mm, got {self.target_spacing!r}")
        for name in ("target_size", "roi_size"):
            value = getattr(self, name)
            if value is not None and not all(1 <= v <= MAX_SIDE for v in value):
                raise SpecError(f"{name} values must be within 1..{MAX_SIDE}, got {value!r}")
        one_of("interpolation", INTERPOLATIONS)
        one_of("roi_fit", ROI_FITS)
        if not _is_int(self.neighbours) or not 0 <= self.neighbours <= MAX_NEIGHBOURS:
            raise SpecError(f"neighbours must be an integer in 0..{MAX_NEIGHBOURS}, got {self.neighbours!r}")
        one_of("dtype", DTYPES)
        for name in ("pad_value", "mean", "std"):
            value = getattr(self, name)
            if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
                raise SpecError(f"{name} must be finite within the float32 range, got {value!r}")
        if self.std == 0:
            raise SpecError("std must be non-zero")
        self._check_output_range()

    def _check_output_range(self) -> None:
        """Refuse a spec whose output can overflow to inf (the native check, csrc/prepare.cpp validate_output)."""
        half = self.dtype == "float16"
        limit = _FLOAT16_MAX if half else _FLOAT32_MAX / (1.0 + 1e-5)
        with np.errstate(over="ignore", divide="ignore"):
            inv = abs(float(np.float32(1.0) / np.float32(self.std)))
        if not math.isfinite(inv):
            raise SpecError(f"std is too small: 1 / std overflows float32, got {self.std!r}")
        mean = float(np.float32(self.mean))
        pad = float(np.float32(self.pad_value))
        for lo, hi, what in ((0.0, 1.0, "display values in [0, 1]"), (min(0.0, pad), max(1.0, pad), "pad_value")):
            diff = max(abs(lo - mean), abs(hi - mean))
            if not (diff <= _FLOAT32_MAX / (1.0 + 1e-5) and diff * inv <= limit):
                raise SpecError(
                    f"mean / std map {what} beyond the largest finite {self.dtype}: the output would be inf. "
                    "Use a larger std, a mean nearer [0, 1]" + (', or dtype="float32"' if half else "")
                )

    # -- geometry -------------------------------------------------------------------------

    def resampled_size(self, shape: Sequence[int], spacing: Optional[Sequence[float]] = None) -> tuple[int, int, int]:
        """(slices, rows, columns) after resampling a volume of ``shape`` with ``spacing`` (row, column, slice mm).

        Raises:
            PreprocessError: a target spacing without a valid input spacing, or a size beyond the limits.
        """
        shape = _check_shape(shape)
        if self.target_size is not None:
            return self.target_size
        if self.target_spacing is None:
            size = shape
        else:
            if spacing is None:
                raise PreprocessError("the spec resamples to a target spacing: pass the series' spacing "
                                      "(row, column, slice) in mm")
            spacing_dhw = _spacing_dhw(spacing)
            target_dhw = (self.target_spacing[2], self.target_spacing[0], self.target_spacing[1])
            size = tuple(max(1, int(math.floor(n * s / t + 0.5))) for n, s, t in zip(shape, spacing_dhw, target_dhw))
        if not all(1 <= v <= MAX_SIDE for v in size):
            raise PreprocessError(f"the resampled volume would be {size[0]} x {size[1]} x {size[2]}, beyond "
                                  f"{MAX_SIDE} per axis: choose a coarser target spacing")
        return tuple(int(v) for v in size)

    def roi_placement(self, resampled: Sequence[int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(output size, offset) per axis for a resampled volume: output index ``i`` shows resampled
        voxel ``i - offset`` (positive offsets pad before, negative ones crop)."""
        size, offset = [], []
        for axis, m in enumerate(resampled):
            if self.roi_size is None:
                size.append(m)
                offset.append(0)
                continue
            roi = self.roi_size[axis]
            if m < roi:  # MONAI SpatialPad(method="symmetric")
                size.append(roi)
                offset.append((roi - m) // 2)
            elif m > roi and self.roi_fit == "crop_or_pad":  # MONAI CenterSpatialCrop
                size.append(roi)
                offset.append(-(m // 2 - roi // 2))
            else:
                size.append(m)
                offset.append(0)
        return tuple(size), tuple(offset)

    def output_shape(self, shape: Sequence[int], spacing: Optional[Sequence[float]] = None) -> tuple[int, ...]:
        """Shape of ``preprocess_volume``'s result for a volume of ``shape`` (slices, rows, columns)."""
        size, _ = self.roi_placement(self.resampled_size(shape, spacing))
        if self.neighbours:
            return (size[0], 2 * self.neighbours + 1, size[1], size[2])
        return (1, 1, *size)

    # -- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict, with the schema version."""
        data: dict[str, Any] = {"schema_version": VOLUME_SPEC_SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VolumeSpec":
        """Inverse of ``to_dict``. Raises SpecError on unknown keys or versions."""
        if not isinstance(data, dict):
            raise SpecError(f"a volume preprocessing spec must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("schema_version", VOLUME_SPEC_SCHEMA_VERSION)
        if version != VOLUME_SPEC_SCHEMA_VERSION:
            raise SpecError(f"volume spec schema version {version!r} is not supported by this medge "
                            f"(supports {VOLUME_SPEC_SCHEMA_VERSION}); upgrade medge")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SpecError(f"unknown volume spec field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise SpecError(f"invalid volume spec: {exc}") from exc

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "VolumeSpec":
        """Parse JSON text from ``to_json``. Raises SpecError."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"volume spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "VolumeSpec":
        """A copy with some fields changed (validated). Raises SpecError."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise SpecError(f"unknown volume spec field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


def _check_shape(shape: Any) -> tuple[int, int, int]:
    try:
        values = tuple(shape)
    except TypeError:
        raise PreprocessError(f"a volume shape must be (slices, rows, columns), got {shape!r}") from None
    if len(values) != 3 or not all(_is_int(v) and v >= 1 for v in values):
        raise PreprocessError(f"a volume shape must be 3 positive integers (slices, rows, columns), got {shape!r}")
    return tuple(int(v) for v in values)


def _spacing_dhw(spacing: Any) -> tuple[float, float, float]:
    """(row, column, slice) mm -> per-array-axis (slice, row, column) spacing, validated."""
    try:
        values = tuple(spacing)
    except TypeError:
        values = ()
    if len(values) != 3 or not all(_is_number(v) and math.isfinite(v) and v > 0 for v in values):
        raise PreprocessError(f"spacing must be 3 positive finite numbers (row, column, slice) in mm, got {spacing!r}")
    row, col, slice_ = (float(v) for v in values)
    return slice_, row, col


# ---------------------------------------------------------------------------
# Inputs


class _SliceSemantics:
    """What preprocess_volume needs from the semantics argument, normalised."""

    def __init__(self, slopes: np.ndarray, intercepts: np.ndarray, bits_stored: Optional[int],
                 signed: Optional[bool], invert: bool) -> None:
        self.slopes = slopes
        self.intercepts = intercepts
        self.bits_stored = bits_stored
        self.signed = signed
        self.invert = invert


def _per_slice(values: Any, depth: int, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise PreprocessError(f"{name} must be a number or one number per slice") from None
    if array.ndim == 0:
        array = np.full(depth, float(array))
    if array.shape != (depth,):
        raise PreprocessError(f"{name} needs one value per slice ({depth}), got shape {array.shape}")
    return np.ascontiguousarray(array)


def _slice_semantics(semantics: Any, depth: int) -> _SliceSemantics:
    from .image import PixelSemantics

    if semantics is None:
        return _SliceSemantics(np.ones(depth), np.zeros(depth), None, None, False)
    if isinstance(semantics, PixelSemantics):
        frames = semantics.frames
        if not isinstance(frames, tuple) or len(frames) not in (1, depth):
            count = len(frames) if isinstance(frames, tuple) else "no"
            raise PreprocessError(f"the semantics carry {count} frame transforms but the volume has {depth} slices: "
                                  "give one per slice, or one for all")
        transforms = [frames[0] if len(frames) == 1 else frames[z] for z in range(depth)]
        return _from_transforms(transforms, semantics.bits_stored, semantics.pixel_representation == 1,
                                semantics.inverted)
    if isinstance(semantics, (list, tuple)) and len(semantics) == 2 and not any(
            hasattr(s, "rescale_slope") for s in semantics):  # (slopes, intercepts)
        slopes = _per_slice(semantics[0], depth, "rescale slopes")
        intercepts = _per_slice(semantics[1], depth, "rescale intercepts")
        return _SliceSemantics(slopes, intercepts, None, None, False)
    try:
        items = list(semantics)
    except TypeError:
        raise PreprocessError(
            f"cannot use {type(semantics).__name__} as slice semantics: pass a PixelSemantics, one per slice, "
            "FrameTransforms per slice, or (slopes, intercepts)") from None
    if len(items) != depth:
        raise PreprocessError(f"{len(items)} slice semantics given for {depth} slices")
    if all(isinstance(s, PixelSemantics) for s in items):
        first = items[0]
        for z, s in enumerate(items):
            if (s.bits_stored, s.pixel_representation, s.inverted) != (
                    first.bits_stored, first.pixel_representation, first.inverted):
                raise PreprocessError(
                    f"slice {z} differs from slice 0 in Bits Stored, Pixel Representation or Photometric "
                    "Interpretation: a volume needs them equal; split the series")
        return _from_transforms([s.frame_transform(0) for s in items], first.bits_stored,
                                first.pixel_representation == 1, first.inverted)
    if all(hasattr(s, "rescale_slope") and hasattr(s, "rescale_intercept") for s in items):
        return _from_transforms(items, None, None, False)
    raise PreprocessError("slice semantics must all be PixelSemantics, or all FrameTransforms, or (slopes, intercepts)")


def _from_transforms(transforms: Sequence[Any], bits_stored: Optional[int], signed: Optional[bool],
                     invert: bool) -> _SliceSemantics:
    slopes = np.empty(len(transforms))
    intercepts = np.empty(len(transforms))
    for z, t in enumerate(transforms):
        slope, intercept = t.rescale_slope, t.rescale_intercept
        if not (_is_number(slope) and _is_number(intercept)):
            raise PreprocessError(f"slice {z}: Rescale Slope/Intercept must be numbers")
        slopes[z], intercepts[z] = float(slope), float(intercept)
    return _SliceSemantics(slopes, intercepts, bits_stored, signed, invert)


def _kernel_volume(pixels: Any) -> np.ndarray:
    """A (D, H, W) array the native code reads: kernel dtype, aligned, rows contiguous (lossless conversions only)."""
    from .preprocess import _kernel_array

    if not isinstance(pixels, np.ndarray):
        try:
            pixels = np.asarray(pixels)
        except Exception:  # noqa: BLE001 - ragged lists, objects numpy cannot convert
            raise PreprocessError(f"cannot use {type(pixels).__name__} as volume pixels: pass a numpy array "
                                  "(slices, rows, columns) of stored values") from None
    if pixels.ndim != 3 or 0 in pixels.shape:
        raise PreprocessError(f"volume pixels must be a non-empty 3-D array (slices, rows, columns), got shape "
                              f"{pixels.shape}")
    d, h, w = pixels.shape
    # The 2-D path's conversions (dtype, byte order, NaN / inf refusal, alignment) on a (D*H, W) view.
    flat = _kernel_array(pixels.reshape(d * h, w), "volume")
    return flat.reshape(d, h, w)


def _native():
    from .preprocess import _native as native

    return native()


def _native_params(native, array: np.ndarray, sem: _SliceSemantics, spec: VolumeSpec, spacing: Any):
    params = native.VolumeParams()
    if array.dtype.kind != "f":
        bits = array.dtype.itemsize * 8
        params.bits_stored = bits if sem.bits_stored is None else int(sem.bits_stored)
        params.is_signed = array.dtype.kind == "i" if sem.signed is None else bool(sem.signed)
        if not 1 <= params.bits_stored <= bits:
            raise PreprocessError(f"Bits Stored {params.bits_stored} does not fit the {array.dtype} pixel container")
    params.invert = bool(sem.invert)
    if spec.voi == "window":
        params.voi_mode = native.VoiMode.window
        params.voi_function = getattr(native.VoiFunction, spec.voi_function or "LINEAR")
        params.window_center, params.window_width = spec.window
    else:
        params.voi_mode = native.VoiMode.range
        params.range_low, params.range_high = spec.value_range
    out = native.VolumeOutputParams()
    resampled = spec.resampled_size(array.shape, spacing)
    size, offset = spec.roi_placement(resampled)
    out.resampled = list(resampled)
    out.size = list(size)
    out.offset = list(offset)
    out.interpolation = getattr(native.VolumeInterpolation, spec.interpolation)
    out.neighbours = spec.neighbours
    out.pad_value = spec.pad_value
    out.mean = spec.mean
    out.std = spec.std
    out.output_type = getattr(native.OutputType, spec.dtype)
    return params, out


def _bad_slopes(sem: _SliceSemantics) -> None:
    bad = ~(np.isfinite(sem.slopes) & np.isfinite(sem.intercepts) & (sem.slopes != 0))
    if bad.any():
        z = int(np.flatnonzero(bad)[0])
        raise PreprocessError(f"slice {z}: Rescale Slope must be finite and non-zero and Rescale Intercept finite")


# ---------------------------------------------------------------------------
# Entry point


def preprocess_volume(
    pixels: Any,
    semantics: Any = None,
    spacing: Optional[Sequence[float]] = None,
    spec: Optional[VolumeSpec] = None,
    *,
    num_threads: int = 0,
    out: Any = None,
    device: str = "cpu",
    stream: Any = None,
) -> Any:
    """Preprocess a series of slices into a volumetric (or 2.5-D) model input.

    Args:
        pixels: stored values, (slices, rows, columns), any dtype the 2-D path
            takes (uint8, uint16, int16, int32, float32; int8, uint32, float16/64
            converted losslessly). An object with ``pixels``, ``semantics`` and
            ``spacing`` attributes (a ``Volume``) supplies all three.
        semantics: per-slice Modality LUT: a ``PixelSemantics`` (one frame
            transform per slice, or one for all), a sequence of
            ``PixelSemantics`` or of ``FrameTransform`` (one per slice), a pair
            ``(slopes, intercepts)`` (numbers or one per slice), or None
            (slope 1, intercept 0). ``PixelSemantics`` also give Bits Stored,
            Pixel Representation and MONOCHROME1.
        spacing: (row, column, slice) in mm; needed when the spec resamples
            to a target spacing.
        spec: the VolumeSpec.
        num_threads: CPU worker threads, 0..1024 (0 = all cores). The result
            does not depend on it.
        out: optional destination of ``spec.output_shape(...)`` and
            ``spec.dtype``: a C-contiguous writable numpy array (CPU), or any
            CUDA array (``device="cuda"``).
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
        stream: CUDA only: the stream to run on (default: medge's own, waited for).

    Returns:
        ``out``, or a new array: ``(1, 1, D, H, W)``, or ``(D, 2k + 1, H, W)``
        with ``spec.neighbours = k``. numpy on the CPU; a
        ``medge.runtime.cuda.DeviceArray`` with ``device="cuda"``.

    Raises:
        SpecError, PreprocessError: bad spec or arguments (also when memory or
            worker threads are refused).
        BackendUnavailable: CUDA requested where it is not available.
    """
    from .preprocess import _check_num_threads, _parse_device

    if isinstance(semantics, VolumeSpec) and spec is None:  # preprocess_volume(volume, spec)
        semantics, spec = None, semantics
    if hasattr(pixels, "pixels") and not isinstance(pixels, np.ndarray):  # a Volume
        volume = pixels
        pixels = volume.pixels
        if semantics is None:
            semantics = getattr(volume, "semantics", None)
        if spacing is None:
            spacing = getattr(volume, "spacing", None)
    if not isinstance(spec, VolumeSpec):
        raise PreprocessError(f"spec must be a VolumeSpec, got {type(spec).__name__}")
    device_name, device_index = _parse_device(device)
    threads = _check_num_threads(num_threads)
    array = _kernel_volume(pixels)
    sem = _slice_semantics(semantics, array.shape[0])
    _bad_slopes(sem)
    native = _native()
    params, out_params = _native_params(native, array, sem, spec, spacing)
    shape = spec.output_shape(array.shape, spacing)
    if device_name == "cuda":
        return _preprocess_volume_cuda(native, array, sem, params, out_params, shape, spec, out, stream,
                                       device_index)
    if stream is not None:
        raise PreprocessError("stream is only meaningful with device='cuda'")
    if out is None:
        try:
            out = np.empty(shape, dtype=spec.dtype)
        except (MemoryError, ValueError):
            raise PreprocessError(f"not enough memory for a {spec.dtype} output of shape {shape}: choose a "
                                  "coarser target spacing or a smaller ROI") from None
    else:
        if not isinstance(out, np.ndarray):
            raise PreprocessError(f"out must be a numpy array for device='cpu', got {type(out).__name__}")
        if out.shape != shape or out.dtype != np.dtype(spec.dtype):
            raise PreprocessError(f"out must have shape {shape} and dtype {spec.dtype}, got {out.shape} {out.dtype}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise PreprocessError("out must be a writable C-contiguous array")
        if np.may_share_memory(out, array):
            raise PreprocessError("out overlaps the input pixels; pass a separate output array")
    native.preprocess_volume_cpu(array, sem.slopes, sem.intercepts, params, out, out_params, threads)
    return out


def _preprocess_volume_cuda(native, array, sem, params, out_params, shape, spec, out, stream, device):
    if not native.cuda_compiled():
        raise BackendUnavailable("this medge build has no CUDA kernels (nvcc was not found when it was built); "
                                 "use device='cpu' or reinstall medge with the CUDA toolkit on PATH")
    if native.cuda_device_count() == 0:
        raise BackendUnavailable(f"no usable CUDA device ({native.cuda_status()}); use device='cpu'")
    if device >= native.cuda_device_count():
        raise BackendUnavailable(f"CUDA device {device} does not exist ({native.cuda_device_count()} visible)")
    from .runtime import cuda as mc

    array = np.ascontiguousarray(array)
    with mc._on_device(device):
        own_stream = mc.Stream(device=device) if stream is None else None
        handle = own_stream.handle if own_stream is not None else mc.stream_handle(stream)
        view = None
        try:
            pixels = mc.DeviceArray.from_host(array, handle, device=device)
            d, h, w = array.shape
            params.pixels_address = pixels.ptr
            params.depth, params.height, params.width = d, h, w
            params.row_stride, params.slice_stride = w, h * w
            params.pixel_type = getattr(native.PixelType, array.dtype.name)
            params.buffer_bytes = array.nbytes
            tables_host = native.volume_cuda_tables(params, sem.slopes, sem.intercepts, out_params)
            tables = mc.DeviceArray.from_host(tables_host, handle, device=device)
            if out is None:
                result = mc.DeviceArray(shape, spec.dtype, device=device)
                out_ptr, out_bytes = result.ptr, result.nbytes
            else:
                view = mc.as_device_view(out, stream=handle, require_writable=True, require_contiguous=True,
                                         dtypes=(spec.dtype,), name="out")
                if tuple(view.shape) != tuple(shape):
                    raise PreprocessError(f"out must have shape {shape}, got {tuple(view.shape)}")
                result, out_ptr, out_bytes = out, view.ptr, view.nbytes
            native.preprocess_volume_cuda(params, out_params, tables.ptr, tables.nbytes, out_ptr, out_bytes, handle)
            # The staged pixels and tables are freed when this returns: the kernel must be done with them.
            mc._synchronize(handle)
        finally:
            if view is not None:
                view.release()
            if own_stream is not None:
                own_stream.close()
    return result


# ---------------------------------------------------------------------------
# Back onto the original grid


def _grid_shape(geometry: Any, name: str) -> tuple[int, int, int]:
    if hasattr(geometry, "pixels") and not isinstance(geometry, np.ndarray):
        geometry = np.shape(geometry.pixels)
    elif hasattr(geometry, "shape") and not isinstance(geometry, (tuple, list)):
        geometry = tuple(geometry.shape)[-3:]
    try:
        return _check_shape(geometry)
    except PreprocessError:
        raise PreprocessError(f"{name} must be a (slices, rows, columns) shape or an array / Volume with one, "
                              f"got {geometry!r}") from None


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Nearest voxel centre of each output index, exact: floor((2i + 1) n_in / (2 n_out)) (PyTorch nearest-exact)."""
    i = np.arange(n_out, dtype=np.int64)
    return np.minimum((2 * i + 1) * n_in // (2 * n_out), n_in - 1)


def resample_labels(label_map: np.ndarray, from_geometry: Any, to_geometry: Any) -> np.ndarray:
    """Nearest-neighbour resampling of a label map from one grid onto another covering the same field of view.

    Every output voxel takes the label of the input voxel whose centre is
    nearest (PyTorch ``F.interpolate(mode="nearest-exact")``, exact integer
    arithmetic), so labels are never mixed or invented.

    Args:
        label_map: (..., slices, rows, columns) labels on ``from_geometry``; any dtype.
        from_geometry, to_geometry: (slices, rows, columns) shapes, or arrays /
            Volumes that have one (only the shape matters: both grids span the
            same field of view).

    Returns:
        A new array (..., *to_shape) of ``label_map``'s dtype.

    Raises:
        PreprocessError: shapes that do not match or are not 3-D.
    """
    labels = np.asarray(label_map)
    src = _grid_shape(from_geometry, "from_geometry")
    dst = _grid_shape(to_geometry, "to_geometry")
    if labels.ndim < 3 or labels.shape[-3:] != src:
        raise PreprocessError(f"label_map has shape {labels.shape} but from_geometry is {src}")
    result = labels
    for axis in range(3):
        if src[axis] != dst[axis]:
            result = np.take(result, _nearest_indices(src[axis], dst[axis]), axis=labels.ndim - 3 + axis)
    return np.array(result, copy=True) if result is labels else result


def _linear_along(array: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Half-pixel linear interpolation along one axis (PyTorch align_corners=False), in float64."""
    n_in = array.shape[axis]
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = (src - i0).astype(array.dtype if array.dtype.kind == "f" else np.float64)
    shape = [1] * array.ndim
    shape[axis] = n_out
    f = f.reshape(shape)
    return np.take(array, i0, axis=axis) * (1.0 - f) + np.take(array, i1, axis=axis) * f


def to_original_grid(
    volume: np.ndarray,
    spec: VolumeSpec,
    original_shape: Sequence[int],
    original_spacing: Optional[Sequence[float]] = None,
    *,
    mode: Optional[str] = None,
    fill: float = 0,
    compute_dtype: Any = np.float64,
) -> np.ndarray:
    """Map a model output on ``spec``'s grid back onto the series' own grid (the inverse of the geometry).

    The ROI crop / pad is undone first (voxels the crop removed get ``fill``:
    background label, probability 0), then the resampled grid is resampled
    back to ``original_shape`` over the same field of view.

    Args:
        volume: (..., D, H, W) on the model's grid, e.g. (classes, D, H, W)
            probabilities or (D, H, W) labels. A 2.5-D network's
            (D, classes, H, W) output must be transposed to (classes, D, H, W).
        spec: the VolumeSpec the input was made with.
        original_shape: the series' (slices, rows, columns).
        original_spacing: its (row, column, slice) mm (needed with a target spacing).
        mode: ``"nearest"`` (labels; default for integer and bool arrays) or
            ``"linear"`` (probabilities, logits; default for floats).
        fill: value where the model saw no data.
        compute_dtype: the float type linear interpolation computes in
            (float64 by default; float32 halves the memory of probabilities
            of a large series, what the runtime uses).

    Returns:
        A new (..., *original_shape) array of ``volume``'s dtype.

    Raises:
        PreprocessError: shapes that do not fit ``spec`` and ``original_shape``.
    """
    if not isinstance(spec, VolumeSpec):
        raise PreprocessError(f"spec must be a VolumeSpec, got {type(spec).__name__}")
    data = np.asarray(volume)
    original = _check_shape(original_shape)
    resampled = spec.resampled_size(original, original_spacing)
    size, offset = spec.roi_placement(resampled)
    if data.ndim < 3 or data.shape[-3:] != size:
        raise PreprocessError(f"volume has shape {data.shape}, but spec's output grid for this series is {size}")
    if mode is None:
        mode = "linear" if data.dtype.kind in "fc" else "nearest"
    if mode not in ("nearest", "linear"):
        raise PreprocessError(f"mode must be 'nearest' or 'linear', got {mode!r}")
    lead = data.shape[:-3]
    grid = np.full((*lead, *resampled), fill, dtype=data.dtype)
    dst, src = [], []
    for axis in range(3):
        lo = max(0, offset[axis])  # first output index that shows resampled data
        hi = min(size[axis], offset[axis] + resampled[axis])
        src.append(slice(lo, hi))
        dst.append(slice(lo - offset[axis], hi - offset[axis]))
    grid[(..., *dst)] = data[(..., *src)]
    if mode == "nearest":
        return resample_labels(grid, resampled, original)
    result = grid.astype(compute_dtype, copy=False)
    for axis in range(3):
        if resampled[axis] != original[axis]:
            result = _linear_along(result, result.ndim - 3 + axis, original[axis])
    return result.astype(data.dtype) if data.dtype.kind == "f" else result
