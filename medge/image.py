"""Image: raw stored pixel values plus the DICOM semantics needed to interpret them.

An Image never holds converted (float) pixels: the fused preprocessing kernel
applies the Modality LUT, VOI and polarity itself, so the CPU does not spend a
pass converting and the GPU receives the compact stored values (2 bytes per
pixel for CT) rather than floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .errors import DicomError


def _is_number(value: object) -> bool:
    """A real number (bool excluded): what Modality/VOI parameters must be before any arithmetic."""
    kind = type(value)
    if kind is float or kind is int:  # the common case, first (validation runs on every read)
        return True
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _is_integer(value: object) -> bool:
    if type(value) is int:
        return True
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

__all__ = ["Window", "FrameTransform", "PixelSemantics", "Acquisition", "Image", "VOI_FUNCTIONS"]

#: VOI LUT Function values medge implements (DICOM PS3.3 C.11.2.1.2/3).
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")

#: Photometric interpretations medge accepts (single-sample greyscale).
GREYSCALE_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")

#: Container dtypes the native kernels read directly.
NATIVE_PIXEL_DTYPES = (np.uint8, np.uint16, np.int16, np.int32, np.float32)


@dataclass(frozen=True)
class Window:
    """One VOI window pair (Window Center / Window Width), in modality units."""

    center: float
    width: float
    explanation: Optional[str] = None

    def validate(self, function: str = "LINEAR") -> None:
        """Raise DicomError when this window cannot be applied with ``function``."""
        if not (_is_number(self.center) and _is_number(self.width)):
            raise DicomError(
                f"Window Center/Width must be numbers, got {type(self.center).__name__}/{type(self.width).__name__}"
            )
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            raise DicomError(
                f"Window Center/Width must be finite numbers, got {self.center!r}/{self.width!r}"
            )
        if self.width <= 0:
            raise DicomError(f"Window Width must be > 0, got {self.width!r}")
        if function == "LINEAR" and self.width < 1:
            # PS3.3 C.11.2.1.2.1: for LINEAR the width shall be >= 1.
            raise DicomError(f"Window Width must be >= 1 for VOI LUT Function LINEAR, got {self.width!r}")


@dataclass(frozen=True)
class FrameTransform:
    """Modality LUT and VOI parameters of one frame.

    Single-frame images and classic multi-frame images have one transform
    shared by every frame; enhanced multi-frame images (functional groups)
    may carry one per frame.
    """

    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    windows: tuple[Window, ...] = ()
    voi_function: str = "LINEAR"

    def validate(self) -> None:
        """Raise DicomError for a slope of 0 / non-finite values or an unknown VOI function."""
        if not (_is_number(self.rescale_slope) and _is_number(self.rescale_intercept)):
            raise DicomError(
                "Rescale Slope/Intercept must be numbers, got "
                f"{type(self.rescale_slope).__name__}/{type(self.rescale_intercept).__name__}"
            )
        if not isinstance(self.windows, tuple) or not all(isinstance(w, Window) for w in self.windows):
            raise DicomError("FrameTransform.windows must be a tuple of Window")
        if not (math.isfinite(self.rescale_slope) and math.isfinite(self.rescale_intercept)):
            raise DicomError(
                "Rescale Slope/Intercept must be finite, got "
                f"{self.rescale_slope!r}/{self.rescale_intercept!r}"
            )
        if self.rescale_slope == 0:
            raise DicomError("Rescale Slope is 0: every pixel would map to the intercept")
        if self.voi_function not in VOI_FUNCTIONS:
            raise DicomError(
                f"VOI LUT Function {self.voi_function!r} is not supported "
                f"(supported: {', '.join(VOI_FUNCTIONS)})"
            )
        for window in self.windows:
            window.validate(self.voi_function)


@dataclass(frozen=True)
class PixelSemantics:
    """What the stored values mean: the pixel module attributes medge needs.

    Attributes:
        rows, columns: frame size.
        number_of_frames: frame count (1 for single-frame images).
        bits_allocated, bits_stored: container and meaningful bits; only
            ``bits_stored`` low bits are used (the kernels mask or
            sign-extend the rest).
        pixel_representation: 0 unsigned, 1 two's complement.
        photometric_interpretation: MONOCHROME1 (min is white) or MONOCHROME2.
        frames: one FrameTransform per frame, or a single one shared by all.
    """

    rows: int
    columns: int
    number_of_frames: int = 1
    bits_allocated: int = 16
    bits_stored: int = 16
    pixel_representation: int = 0
    photometric_interpretation: str = "MONOCHROME2"
    frames: tuple[FrameTransform, ...] = (FrameTransform(),)

    def frame_transform(self, index: int) -> FrameTransform:
        """The Modality/VOI parameters of frame ``index``."""
        if not 0 <= index < self.number_of_frames:
            raise IndexError(f"frame {index} out of range for {self.number_of_frames} frame(s)")
        return self.frames[index] if len(self.frames) > 1 else self.frames[0]

    # Single-frame conveniences (frame 0).
    @property
    def rescale_slope(self) -> float:
        return self.frame_transform(0).rescale_slope

    @property
    def rescale_intercept(self) -> float:
        return self.frame_transform(0).rescale_intercept

    @property
    def windows(self) -> tuple[Window, ...]:
        return self.frame_transform(0).windows

    @property
    def voi_function(self) -> str:
        return self.frame_transform(0).voi_function

    @property
    def inverted(self) -> bool:
        """True for MONOCHROME1, where the minimum value is displayed white."""
        return self.photometric_interpretation == "MONOCHROME1"

    def validate(self) -> None:
        """Raise DicomError when these semantics cannot be applied."""
        if not (type(self.rows) is int and type(self.columns) is int and type(self.number_of_frames) is int
                and type(self.bits_allocated) is int and type(self.bits_stored) is int
                and type(self.pixel_representation) is int):
            names = ("rows", "columns", "number_of_frames", "bits_allocated", "bits_stored", "pixel_representation")
            wrong = [name for name in names if not _is_integer(getattr(self, name))]
            if wrong:
                raise DicomError(f"PixelSemantics: {', '.join(wrong)} must be integers")
        if not isinstance(self.frames, tuple) or not all(isinstance(t, FrameTransform) for t in self.frames):
            raise DicomError("PixelSemantics.frames must be a tuple of FrameTransform")
        if self.photometric_interpretation not in GREYSCALE_PHOTOMETRICS:
            raise DicomError(
                f"Photometric Interpretation {self.photometric_interpretation!r} is not supported: "
                "medge preprocesses greyscale images (MONOCHROME1, MONOCHROME2)"
            )
        if self.rows <= 0 or self.columns <= 0 or self.number_of_frames <= 0:
            raise DicomError(
                f"image has no pixels: {self.rows} rows x {self.columns} columns x "
                f"{self.number_of_frames} frame(s)"
            )
        if self.pixel_representation not in (0, 1):
            raise DicomError(f"Pixel Representation must be 0 or 1, got {self.pixel_representation!r}")
        if not 1 <= self.bits_stored <= self.bits_allocated:
            raise DicomError(
                f"Bits Stored ({self.bits_stored}) must be between 1 and Bits Allocated "
                f"({self.bits_allocated})"
            )
        if len(self.frames) not in (1, self.number_of_frames):
            raise DicomError(
                f"{len(self.frames)} frame transforms given for {self.number_of_frames} frames"
            )
        for transform in self.frames:
            transform.validate()


@dataclass(frozen=True)
class Acquisition:
    """What was imaged, as far as a model's validated envelope needs it (never who).

    Attributes:
        modality: Modality (0008,0060) when it is one of the standard's defined
            terms (e.g. "CT", "CR"), "non-standard" for any other value, None when absent.
        body_part: Body Part Examined (0018,0015) when it is a defined term,
            "non-standard" for any other value, None when absent.
        pixel_spacing_mm: (row, column) spacing in mm from Pixel Spacing, the
            Pixel Measures functional group, or Imager Pixel Spacing; None when absent.
    """

    modality: Optional[str] = None
    body_part: Optional[str] = None
    pixel_spacing_mm: Optional[tuple[float, float]] = None


@dataclass(frozen=True, eq=False)
class Image:
    """Stored pixel values of one DICOM object plus their semantics.

    Attributes:
        pixels: stored values, shape ``(number_of_frames, rows, columns)``,
            native byte order, dtype uint8, uint16, int16, int32 or float32
            (never rescaled).
        semantics: PixelSemantics that say how to interpret them.
        sop_instance_uid: the SOP Instance UID when known (not identifying a
            patient, used to key results).
        acquisition: modality, body part and pixel spacing when read from
            DICOM (checked against a bundle's validated envelope); None for
            arrays, whose caller vouches for what they are.
    """

    pixels: np.ndarray
    semantics: PixelSemantics
    sop_instance_uid: Optional[str] = None
    acquisition: Optional[Acquisition] = None

    def __post_init__(self) -> None:
        pixels = self.pixels
        if not isinstance(pixels, np.ndarray):
            raise DicomError(f"Image.pixels must be a numpy array, got {type(pixels).__name__}")
        if not isinstance(self.semantics, PixelSemantics):
            raise DicomError(f"Image.semantics must be a PixelSemantics, got {type(self.semantics).__name__}")
        if pixels.ndim == 2:
            pixels = pixels[np.newaxis]
        if pixels.ndim != 3:
            raise DicomError(f"Image.pixels must have shape (frames, rows, columns), got {pixels.shape}")
        if not pixels.dtype.isnative:
            pixels = pixels.astype(pixels.dtype.newbyteorder("="))
        if not pixels.flags.aligned:
            # A view of bytes at an odd address (np.frombuffer on a sliced memoryview): the kernels
            # read whole elements, which an unaligned buffer does not guarantee; a copy is aligned.
            pixels = pixels.copy()
        object.__setattr__(self, "pixels", pixels)
        sem = self.semantics
        sem.validate()
        expected = (sem.number_of_frames, sem.rows, sem.columns)
        if pixels.shape != expected:
            raise DicomError(
                f"decoded pixel array has shape {pixels.shape} but the header says "
                f"{sem.number_of_frames} frame(s) of {sem.rows} x {sem.columns}"
            )

    @property
    def number_of_frames(self) -> int:
        return self.semantics.number_of_frames

    @classmethod
    def from_array(
        cls,
        pixels: np.ndarray,
        *,
        rescale_slope: float = 1.0,
        rescale_intercept: float = 0.0,
        windows: Sequence[tuple[float, float]] = (),
        voi_function: str = "LINEAR",
        photometric_interpretation: str = "MONOCHROME2",
        bits_stored: Optional[int] = None,
        sop_instance_uid: Optional[str] = None,
        acquisition: Optional[Acquisition] = None,
    ) -> "Image":
        """Wrap an array of stored values (2-D one frame, or 3-D frames) with semantics.

        Args:
            pixels: stored values; the dtype gives Bits Allocated and Pixel
                Representation.
            rescale_slope, rescale_intercept: Modality LUT.
            windows: (center, width) pairs in modality units.
            voi_function: LINEAR, LINEAR_EXACT or SIGMOID.
            photometric_interpretation: MONOCHROME1 or MONOCHROME2.
            bits_stored: meaningful low bits (default: all bits of the dtype).
            sop_instance_uid: optional SOP Instance UID.
            acquisition: optional modality / body part / pixel spacing, checked
                against a bundle's validated envelope when given.

        Raises:
            DicomError: when the array or parameters are unusable.
        """
        try:
            array = np.asarray(pixels)
        except Exception as exc:  # ragged lists, objects numpy cannot convert
            raise DicomError(f"pixels cannot be converted to an array ({type(exc).__name__})") from None
        if array.ndim == 2:
            array = array[np.newaxis]
        if array.ndim != 3:
            raise DicomError(f"pixels must be 2-D (rows, columns) or 3-D (frames, rows, columns), got {array.shape}")
        kind = array.dtype.kind
        if kind not in "uif":
            raise DicomError(f"pixels must be integer or float, got dtype {array.dtype}")
        bits_allocated = array.dtype.itemsize * 8
        # Arguments of the wrong type end in DicomError like every other bad input (one error path),
        # not in a TypeError or ValueError from float() / int().
        try:
            if bits_stored is not None and (isinstance(bits_stored, bool) or int(bits_stored) != bits_stored):
                raise ValueError("bits_stored is not an integer")
            transform = FrameTransform(
                rescale_slope=float(rescale_slope),
                rescale_intercept=float(rescale_intercept),
                windows=tuple(Window(float(c), float(w)) for c, w in windows),
                voi_function=voi_function,
            )
        except (TypeError, ValueError, OverflowError) as exc:
            raise DicomError(
                "Image.from_array: bits_stored must be an integer, rescale_slope and rescale_intercept numbers, "
                f"windows a sequence of (center, width) number pairs ({type(exc).__name__})"
            ) from None
        if not isinstance(photometric_interpretation, str) or not isinstance(voi_function, str):
            raise DicomError("Image.from_array: photometric_interpretation and voi_function must be strings")
        semantics = PixelSemantics(
            rows=array.shape[1],
            columns=array.shape[2],
            number_of_frames=array.shape[0],
            bits_allocated=bits_allocated,
            bits_stored=bits_allocated if bits_stored is None else int(bits_stored),
            pixel_representation=1 if kind == "i" else 0,
            photometric_interpretation=photometric_interpretation,
            frames=(transform,),
        )
        return cls(array, semantics, sop_instance_uid, acquisition)
