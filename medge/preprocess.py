"""Fused DICOM preprocessing: stored values -> model input tensor, in one pass.

``PreprocessSpec`` says what the model expects (size, VOI, geometry,
normalisation, dtype); it is stored in bundle manifests so calibration,
validation and deployment see the same pixels. ``preprocess`` runs it on the
CPU (multi-threaded C++) or on a CUDA device, writing NCHW into a caller's
buffer or a new one.

Per frame, in this order (DICOM PS3.3 C.7.6.3, C.11.1, C.11.2):
stored value -> Bits Stored mask / sign extension -> Rescale Slope/Intercept
-> VOI (window LINEAR / LINEAR_EXACT / SIGMOID, or a fixed value range) into
[0, 1] -> MONOCHROME1 inversion -> resample to the model size -> (y - mean) / std
-> replicate to 1 or 3 channels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from .errors import DicomError, MedgeError, PreprocessError, SpecError
from .image import VOI_FUNCTIONS, FrameTransform, Image, PixelSemantics

__all__ = ["PreprocessSpec", "preprocess", "cuda_available", "SPEC_SCHEMA_VERSION"]

#: Version of the JSON form of PreprocessSpec (stored in bundle manifests).
SPEC_SCHEMA_VERSION = 1

VOI_MODES = ("dicom", "window", "range")
FITS = ("stretch", "letterbox")
RESAMPLES = ("bilinear", "bilinear_antialias")
DTYPES = ("float32", "float16")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


@dataclass(frozen=True)
class PreprocessSpec:
    """What a model expects as input, and how DICOM pixels become it.

    Attributes:
        height, width: model input size in pixels.
        channels: 1, or 3 (the grey value replicated; mean/std per channel).
        voi: how modality values map to [0, 1]:
            ``"dicom"``: the image's own Window Center/Width number
            ``window_index`` with its VOI LUT Function (or ``voi_function``);
            ``"window"``: the fixed ``window`` (center, width) for every image,
            e.g. a lung window the model was trained with;
            ``"range"``: the fixed modality-value ``value_range`` (low, high),
            clamped, no window.
        window_index: which window pair to use when ``voi="dicom"``.
        window: (center, width) in modality units when ``voi="window"``.
        voi_function: LINEAR, LINEAR_EXACT or SIGMOID; None means the
            header's (``voi="dicom"``) or LINEAR (``voi="window"``).
        value_range: (low, high) in modality units when ``voi="range"``.
        fit: ``"stretch"`` each axis to the output size, or ``"letterbox"``:
            keep the aspect ratio, size ``floor(side * s + 0.5)`` with
            ``s = min(H / rows, W / columns)``, centred (offset
            ``(H - h) // 2``), the rest filled with ``pad_value``.
        pad_value: letterbox fill in the display domain [0, 1], before
            normalisation (0 = black).
        resample: ``"bilinear"`` (half-pixel centres, as PyTorch
            ``align_corners=False``) or ``"bilinear_antialias"`` (triangle
            filter widened by the scale when shrinking, as torchvision
            ``antialias=True``; plain bilinear when enlarging).
        mean, std: normalisation ``(y - mean[c]) / std[c]``; one value or one
            per channel.
        dtype: output dtype, ``"float32"`` or ``"float16"``.
    """

    height: int
    width: int
    channels: int = 1
    voi: str = "dicom"
    window_index: int = 0
    window: Optional[tuple[float, float]] = None
    voi_function: Optional[str] = None
    value_range: Optional[tuple[float, float]] = None
    fit: str = "stretch"
    pad_value: float = 0.0
    resample: str = "bilinear_antialias"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # Normalise to plain Python values (JSON gives lists; numpy scalars and dtypes are
        # accepted), so to_json() always works and the fields compare and hash as tuples.
        for name in ("height", "width", "channels", "window_index"):
            value = getattr(self, name)
            if isinstance(value, np.integer):
                object.__setattr__(self, name, int(value))
        for name in ("window", "value_range", "mean", "std"):
            value = getattr(self, name)
            if value is None and name in ("window", "value_range"):
                continue
            if _is_number(value) and name in ("mean", "std"):
                value = (value,)
            what = "one number or a sequence of numbers" if name in ("mean", "std") else "a pair of numbers"
            if isinstance(value, (str, bytes)):
                raise SpecError(f"{name} must be {what}, got {value!r}")
            try:
                values = tuple(value)
            except TypeError:  # not iterable (a 0-d array says it is, then refuses)
                raise SpecError(f"{name} must be {what}, got {value!r}") from None
            if not all(_is_number(v) for v in values):
                raise SpecError(f"{name} must be a sequence of numbers, got {value!r}")
            object.__setattr__(self, name, tuple(_as_float(name, v) for v in values))
        if not _is_number(self.pad_value):
            raise SpecError(f"pad_value must be a number, got {self.pad_value!r}")
        object.__setattr__(self, "pad_value", _as_float("pad_value", self.pad_value))
        if not isinstance(self.dtype, str):
            try:
                object.__setattr__(self, "dtype", np.dtype(self.dtype).name)  # np.float16, np.dtype("float32")
            except Exception:  # noqa: BLE001 - np.dtype() of an arbitrary object raises many kinds
                raise SpecError(f"dtype must be one of {DTYPES}, got {self.dtype!r}") from None
        self._validate()

    def _validate(self) -> None:
        def positive_int(name: str, limit: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
                raise SpecError(f"{name} must be an integer in 1..{limit}, got {v!r}")

        def one_of(name: str, choices: tuple, allow_none: bool = False) -> None:
            v = getattr(self, name)
            # isinstance first: `in` would compare arrays elementwise and raise.
            if not (v is None and allow_none) and not (isinstance(v, str) and v in choices):
                extra = " or None" if allow_none else ""
                raise SpecError(f"{name} must be one of {choices}{extra}, got {v!r}")

        positive_int("height", 16384)
        positive_int("width", 16384)
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels not in (1, 3):
            raise SpecError(f"channels must be 1 or 3, got {self.channels!r}")
        one_of("voi", VOI_MODES)
        one_of("voi_function", VOI_FUNCTIONS, allow_none=True)
        if isinstance(self.window_index, bool) or not isinstance(self.window_index, int) or self.window_index < 0:
            raise SpecError(f"window_index must be a non-negative integer, got {self.window_index!r}")
        if self.voi == "window":
            if self.window is None or len(self.window) != 2:
                raise SpecError('voi="window" needs window=(center, width)')
            center, width = self.window
            function = self.voi_function or "LINEAR"
            if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
                raise SpecError(f"window must be finite with width > 0, got {self.window!r}")
            if function == "LINEAR" and width < 1:
                raise SpecError(f"window width must be >= 1 for LINEAR, got {width!r}")
        elif self.window is not None:
            raise SpecError(f'window is only used with voi="window" (voi is {self.voi!r})')
        if self.voi == "range":
            if self.value_range is None or len(self.value_range) != 2:
                raise SpecError('voi="range" needs value_range=(low, high)')
            low, high = self.value_range
            if not (math.isfinite(low) and math.isfinite(high)) or not high > low:
                raise SpecError(f"value_range must be finite with high > low, got {self.value_range!r}")
            if not math.isfinite(high - low):
                # The kernels divide by high - low; its overflow would zero the transform.
                raise SpecError(f"value_range is too wide: high - low overflows, got {self.value_range!r}")
            if self.voi_function is not None:
                raise SpecError('voi_function does not apply to voi="range"')
        elif self.value_range is not None:
            raise SpecError(f'value_range is only used with voi="range" (voi is {self.voi!r})')
        one_of("fit", FITS)
        one_of("resample", RESAMPLES)
        if not math.isfinite(self.pad_value):
            raise SpecError(f"pad_value must be finite, got {self.pad_value!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                allowed = f"1 or {self.channels} values" if self.channels > 1 else "1 value"
                raise SpecError(f"{name} needs {allowed}, got {len(values)}")
            if not all(math.isfinite(v) for v in values):
                raise SpecError(f"{name} values must be finite, got {values!r}")
        if any(v == 0 for v in self.std):
            raise SpecError(f"std values must be non-zero, got {self.std!r}")
        one_of("dtype", DTYPES)
        self._check_output_range()

    def _check_output_range(self) -> None:
        """Refuse a spec whose output can be inf (or NaN) for some input.

        Display values lie in [0, 1] (every VOI shape is clamped or a sigmoid,
        resampling weights are convex), plus ``pad_value`` where letterboxing
        pads. The kernels compute ``(y - mean) * (1 / std)`` in float32 and
        round to the output dtype; this is the same bound as the native check
        (csrc/prepare.cpp validate_output), so a valid spec never reaches it.
        """
        half = self.dtype == "float16"
        limit = _FLOAT16_MAX if half else _FLOAT32_MAX / (1.0 + 1e-5)
        largest = f"the largest finite {self.dtype} ({_FLOAT16_MAX:g})" if half else "the float32 range"
        for name in ("mean", "std", "pad_value"):
            values = getattr(self, name)
            if any(abs(v) > _FLOAT32_MAX for v in (values if isinstance(values, tuple) else (values,))):
                raise SpecError(f"{name} must be within the float32 range the kernels compute in, got {values!r}")
        with np.errstate(over="ignore", divide="ignore"):
            inv_stds = [float(np.float32(1.0) / np.float32(v)) for v in self.std]
        if not all(math.isfinite(v) for v in inv_stds):
            raise SpecError(f"std values are too small: 1 / std overflows float32, got {self.std!r}")

        pad = float(np.float32(self.pad_value))
        channels = range(self.channels)
        means = [float(np.float32(self.mean[min(c, len(self.mean) - 1)])) for c in channels]
        invs = [abs(inv_stds[min(c, len(inv_stds) - 1)]) for c in channels]

        def reach(lo: float, hi: float) -> tuple[float, float]:
            """Largest |y - mean| (a float32 intermediate) and |(y - mean) / std| over y in [lo, hi]."""
            diffs = [max(abs(lo - m), abs(hi - m)) for m in means]
            return max(diffs), max(d * inv for d, inv in zip(diffs, invs))

        float32_limit = _FLOAT32_MAX / (1.0 + 1e-5)
        diff, image_worst = reach(0.0, 1.0)
        if not diff <= float32_limit:
            raise SpecError(f"mean {self.mean!r} is too far from the display range [0, 1]: y - mean overflows "
                            "float32, so the output would be inf")
        if not image_worst <= limit:
            raise SpecError(
                f"std (with mean) maps display values in [0, 1] to magnitudes up to {image_worst:.4g}, beyond "
                f"{largest}: the output would be inf. Use a larger std or a mean nearer [0, 1]"
                + (', or dtype="float32"' if half else "")
            )
        diff, pad_worst = reach(min(0.0, pad), max(1.0, pad))
        if not (diff <= float32_limit and pad_worst <= limit):
            raise SpecError(
                f"pad_value {self.pad_value!r} is normalised to magnitude {pad_worst:.4g}, beyond {largest}: "
                "padded pixels would be inf. pad_value is a display value, normally within [0, 1]"
            )

    @property
    def output_shape_per_image(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image's output."""
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict, with the schema version."""
        data: dict[str, Any] = {"schema_version": SPEC_SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessSpec":
        """Inverse of ``to_dict``. Raises SpecError on unknown keys or versions."""
        if not isinstance(data, dict):
            raise SpecError(f"a preprocessing spec must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("schema_version", SPEC_SCHEMA_VERSION)
        if version != SPEC_SCHEMA_VERSION:
            raise SpecError(
                f"preprocessing spec schema version {version!r} is not supported by this medge "
                f"(supports {SPEC_SCHEMA_VERSION}); upgrade medge"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown preprocessing spec field(s): {', '.join(unknown)}")
        missing = sorted(name for name in ("height", "width") if name not in data)
        if missing:
            raise SpecError(f"preprocessing spec is missing {', '.join(missing)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise SpecError(f"invalid preprocessing spec: {exc}") from exc

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of ``to_dict()``."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "PreprocessSpec":
        """Parse JSON text from ``to_json``. Raises SpecError."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"preprocessing spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "PreprocessSpec":
        """A copy with some fields changed (validated). Raises SpecError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise SpecError(f"unknown preprocessing spec field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise SpecError(f"{name} values must be finite, got {value!r}") from None


def _is_number(value: Any) -> bool:
    """A real number (Python or numpy), not a bool or a string."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


# ---------------------------------------------------------------------------
# Native module access


def _native():
    try:
        from . import _C
    except ImportError as exc:  # a source checkout that was never built
        raise MedgeError(
            "medge's native module (medge._C) is not built; install medge with `pip install .` "
            f"from the source tree ({exc})"
        ) from exc
    return _C


def cuda_available() -> bool:
    """True when this build has the CUDA kernels and a CUDA device is visible. Never raises."""
    try:
        native = _native()
    except MedgeError:
        return False
    return bool(native.cuda_compiled() and native.cuda_device_count() > 0)


# ---------------------------------------------------------------------------
# Inputs -> frames

_NATIVE_DTYPES = {np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.int32, np.float32)}


def _kernel_array(array: np.ndarray, where: str) -> np.ndarray:
    """A 2-D frame in a dtype and layout the kernels read, converting only when lossless.

    The result is aligned to its element size and has contiguous rows with a
    positive row stride. Misaligned arrays (``np.frombuffer`` at an odd
    offset, a float32 Pixel Data value at an offset of 2 mod 4 in a DICOM
    byte string) are copied here: the native code loads whole elements and
    refuses misaligned pointers, which keeps its vectorised loads (and the
    CUDA kernel's) free of misaligned-access undefined behaviour.
    """
    dtype = array.dtype
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
        dtype = array.dtype
    if dtype not in _NATIVE_DTYPES:
        if dtype == np.int8:
            array = array.astype(np.int16)
        elif dtype == np.bool_:
            array = array.astype(np.uint8)
        elif dtype == np.uint32:
            if array.size and int(array.max()) >= 2**31:
                raise PreprocessError(f"{where}: uint32 values >= 2**31 cannot be preprocessed exactly")
            array = array.astype(np.int32)
        elif dtype == np.float16:
            array = array.astype(np.float32)
        elif dtype == np.float64:
            if array.size and np.isfinite(array).all() and max(-float(array.min()), float(array.max())) > _FLOAT32_MAX:
                # Casting would turn these finite values into infinity.
                raise PreprocessError(f"{where}: float64 pixel values beyond the float32 range cannot be preprocessed")
            array = array.astype(np.float32)
        else:
            raise PreprocessError(
                f"{where}: pixel dtype {dtype} is not supported "
                "(uint8, uint16, int16, int32, float32; int8, uint32, float16/64 are converted)"
            )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # NaN would flow through every stage into NaN scores; infinity is no stored value either.
        raise PreprocessError(f"{where}: float pixel values contain NaN or infinity")
    item = array.itemsize
    rows_contiguous = (
        array.strides[1] == item
        and array.strides[0] > 0
        and array.strides[0] % item == 0
        and (array.shape[0] == 1 or array.strides[0] >= array.shape[1] * item)
    )
    if not rows_contiguous or not array.flags.aligned:
        # A fresh C-ordered copy: aligned, rows contiguous (also for broadcast or reversed views).
        array = array.copy(order="C")
    return array


def _as_images(images: Any) -> list[Image]:
    """Normalise the accepted inputs to a list of Image."""
    if isinstance(images, (Image, np.ndarray, bytes, bytearray, memoryview, str, os.PathLike)) or _is_dataset(images):
        images = [images]
    try:
        items = iter(images)
    except TypeError:
        raise PreprocessError(
            f"cannot preprocess {type(images).__name__}: pass medge.Image, numpy arrays of stored values, "
            "DICOM paths or bytes, pydicom Datasets, or a sequence of them"
        ) from None
    result: list[Image] = []
    for item in items:
        if isinstance(item, Image):
            result.append(item)
        elif isinstance(item, np.ndarray):
            try:
                result.append(Image.from_array(item))
            except DicomError as exc:
                raise PreprocessError(str(exc)) from exc
        elif isinstance(item, (bytes, bytearray, memoryview, str, os.PathLike)) or _is_dataset(item):
            from .dicom import read_dicom

            result.append(read_dicom(item))
        else:
            raise PreprocessError(
                f"cannot preprocess {type(item).__name__}: pass medge.Image, numpy arrays of stored values, "
                "DICOM paths or bytes, or pydicom Datasets"
            )
    return result


def _is_dataset(obj: Any) -> bool:
    """Any pydicom Dataset, with or without Pixel Data (read_dicom refuses one without it, with a DicomError;
    treating it as a sequence would iterate its elements and leak pydicom's own exceptions)."""
    import sys

    pydicom_dataset = sys.modules.get("pydicom.dataset")  # a Dataset exists only if pydicom was imported
    return pydicom_dataset is not None and isinstance(obj, pydicom_dataset.Dataset)


def _frame_params(native, semantics: PixelSemantics, frame: int, spec: PreprocessSpec, where: str):
    """ImageParams (everything but memory) of one frame under ``spec``."""
    transform: FrameTransform = semantics.frame_transform(frame)
    params = native.ImageParams()
    params.bits_stored = semantics.bits_stored
    params.is_signed = semantics.pixel_representation == 1
    params.rescale_slope = transform.rescale_slope
    params.rescale_intercept = transform.rescale_intercept
    params.invert = semantics.inverted
    if spec.voi == "range":
        params.voi_mode = native.VoiMode.range
        params.range_low, params.range_high = spec.value_range
        return params
    if spec.voi == "window":
        center, width = spec.window
        function = spec.voi_function or "LINEAR"
    else:
        if spec.window_index >= len(transform.windows):
            have = len(transform.windows)
            raise DicomError(
                f"{where} has {have} Window Center/Width pair(s) but the spec asks for window "
                f"{spec.window_index}; use voi='window' with a fixed window or voi='range'"
                if have
                else f"{where} has no Window Center/Width; preprocess it with voi='window' (a fixed "
                "window) or voi='range' (a fixed value range)"
            )
        window = transform.windows[spec.window_index]
        center, width = window.center, window.width
        function = spec.voi_function or transform.voi_function
    params.voi_mode = native.VoiMode.window
    params.voi_function = getattr(native.VoiFunction, function)
    params.window_center = float(center)
    params.window_width = float(width)
    return params


def _output_params(native, spec: PreprocessSpec):
    out = native.OutputParams()
    out.height = spec.height
    out.width = spec.width
    out.channels = spec.channels
    out.fit = getattr(native.Fit, spec.fit)
    out.pad_value = spec.pad_value
    out.resample = getattr(native.Resample, spec.resample)
    out.mean = list(spec.mean)
    out.std = list(spec.std)
    out.output_type = getattr(native.OutputType, spec.dtype)
    return out


def _host_frames(native, images: Sequence[Image], spec: PreprocessSpec):
    arrays, params = [], []
    for index, image in enumerate(images):
        for frame in range(image.number_of_frames):
            where = f"image {index}" + (f" frame {frame}" if image.number_of_frames > 1 else "")
            arrays.append(_kernel_array(image.pixels[frame], where))
            params.append(_frame_params(native, image.semantics, frame, spec, where))
    return arrays, params


# ---------------------------------------------------------------------------
# Entry point


def preprocess(
    images: Any,
    spec: PreprocessSpec,
    device: str = "cpu",
    out: Any = None,
    stream: Any = None,
    num_threads: int = 0,
) -> Any:
    """Preprocess images into an NCHW batch for a model.

    Every frame of every image becomes one batch entry, in order.

    Args:
        images: one or a sequence of ``medge.Image``, numpy arrays of stored
            values (2-D one frame or 3-D frames; slope 1, intercept 0,
            MONOCHROME2, no window), DICOM paths / bytes / pydicom Datasets
            (read with ``read_dicom``). With ``device="cuda"``, device arrays
            (``__cuda_array_interface__`` or DLPack) of stored values are
            accepted too and are read in place.
        spec: the PreprocessSpec.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"`` for device N).
        out: optional destination of shape (N, C, H, W) and ``spec.dtype``:
            a C-contiguous writable numpy array for CPU; any device array
            (torch, CuPy, pycuda, ...) for CUDA, written in place.
        stream: CUDA only: the stream to enqueue on (int handle, torch/CuPy
            stream, cuda-python stream or any ``__cuda_stream__`` object).
            With a stream and only device inputs, the call is asynchronous
            on it: inputs must stay alive and unchanged until the stream gets
            there, and a returned DeviceArray reports the stream as pending
            (``__cuda_array_interface__`` / DLPack order consumers after it).
            Host inputs are staged through a temporary device buffer, so the
            call then waits for the stream. Without a stream, medge uses its
            own and returns only when the result is complete.
        num_threads: CPU only: worker threads, 0..1024 (0 = all cores).

    Returns:
        ``out`` when given; else a new numpy array (CPU) or a
        ``medge.runtime.cuda.DeviceArray`` (CUDA, exposing
        ``__cuda_array_interface__`` and DLPack).

    Raises:
        SpecError, PreprocessError: bad arguments; PreprocessError also when
            the system refuses the memory or the worker threads the call needs.
        DicomError: an image's semantics cannot be applied under ``spec``.
        BackendUnavailable: CUDA requested where it is not available.

    Every failure is a ``MedgeError``; anything else escaping is a bug.
    """
    if not isinstance(spec, PreprocessSpec):
        raise PreprocessError(f"spec must be a PreprocessSpec, got {type(spec).__name__}")
    device_name, device_index = _parse_device(device)
    threads = _check_num_threads(num_threads)
    native = _native()
    if device_name == "cpu":
        if stream is not None:
            raise PreprocessError("stream is only meaningful with device='cuda'")
        return _preprocess_cpu(native, _as_images(images), spec, out, threads)
    from . import _preprocess_cuda

    return _preprocess_cuda.run(native, images, spec, out, stream, device_index)


#: More CPU threads than this never help (0 means all cores); it also keeps the value a C int.
_MAX_THREADS = 1024


def _parse_device(device: Any) -> tuple[str, int]:
    """("cpu", 0) or ("cuda", N) from "cpu", "cuda" or "cuda:N" (or anything whose str() is one)."""
    name, sep, index = str(device).partition(":")
    if name == "cpu" and (not sep or index == "0"):
        return "cpu", 0
    if name == "cuda" and (not sep or (index.isascii() and index.isdigit())):
        return "cuda", int(index or 0)
    raise PreprocessError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _check_num_threads(num_threads: Any) -> int:
    if isinstance(num_threads, (bool, np.bool_)) or not isinstance(num_threads, (int, np.integer)) \
            or not 0 <= num_threads <= _MAX_THREADS:
        raise PreprocessError(f"num_threads must be an integer in 0..{_MAX_THREADS} (0 = all cores), got {num_threads!r}")
    return int(num_threads)


def _preprocess_cpu(native, images: Sequence[Image], spec: PreprocessSpec, out: Any, num_threads: int):
    if out is not None and not isinstance(out, np.ndarray):
        raise PreprocessError(
            f"out must be a numpy array for device='cpu', got {type(out).__name__} "
            "(device arrays need device='cuda')"
        )
    try:
        arrays, params = _host_frames(native, images, spec)
        if len(arrays) > native.MAX_BATCH:
            raise PreprocessError(
                f"{len(arrays)} frames in one call; at most {native.MAX_BATCH} are preprocessed at once: "
                "split the batch"
            )
        shape = (len(arrays), *spec.output_shape_per_image)
        if out is None:
            try:
                out = np.empty(shape, dtype=spec.dtype)
            except ValueError as exc:  # numpy's "array is too big": a size it cannot even represent
                raise MemoryError(str(exc)) from exc
        elif any(np.may_share_memory(out, array) for array in arrays):
            # The kernels read every input while writing the output: overlapping memory gives a wrong answer.
            raise PreprocessError("out overlaps an input image's memory; pass a separate output array")
    except MemoryError as exc:
        raise PreprocessError(
            f"not enough memory to preprocess {len(images)} image(s) into {spec.dtype} outputs of "
            f"{spec.channels} x {spec.height} x {spec.width}: preprocess fewer images at a time"
        ) from exc
    native.preprocess_cpu(arrays, params, out, _output_params(native, spec), num_threads)
    return out
