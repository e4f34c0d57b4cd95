"""Heatmaps a person can see: blended into a Secondary Capture (any viewer) and a PNG (no viewer).

Why a Secondary Capture with the map blended in, and not a presentation
state or another object:

- a Grayscale Softcopy Presentation State can only draw 1-bit overlays and
  vector graphics over the image: a continuous map would have to be cut into
  contours, losing what it is;
- a Blending Softcopy Presentation State blends two stored images, but needs
  the map stored as an image of its own (a Parametric Map) and a viewer that
  implements blending, which few PACS viewers and almost no web viewers do;
- a Segmentation (fractional) is displayed as an overlay by some viewers, but
  says "this region is a structure", which a class activation map is not;
- a Secondary Capture (RGB) is shown by every viewer and PACS as it is, in the
  source's study, next to the source series.

So the overlay is an ``SC Image`` (Secondary Capture Image Storage, RGB, 8
bits) in its own series: the source frame through the model's own window
(what the model saw) in grey, with the map in colour (blue -> red, "jet")
blended with an opacity proportional to the map value (0 transparent, 1 at
``alpha``). Image Type DERIVED\\SECONDARY, Burned In Annotation NO (no text is
drawn into the pixels), the source referenced in Source Image Sequence, and
the Derivation Description and Image Comments say what the colours are and
that the image is not for primary diagnosis. Its pixels are the source's
grid, so it lines up with the source image.

Map values: used as they are when they lie within [0, 1]; otherwise scaled
to [0, 1] by their own minimum and maximum (stated in Image Comments).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import MedgeError, MissingDependency
from ._common import (MANUFACTURER, OVERLAY_SERIES_NUMBER, Provenance, group_key, import_highdicom,
                      patient_orientation, result_uid)

__all__ = ["normalise_heatmap", "display_frame", "blend", "render_overlay", "build_overlay_sc", "write_png",
           "SC_SOP_CLASS_UID", "DEFAULT_ALPHA"]

#: Secondary Capture Image Storage.
SC_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.7"
#: Opacity of the colour where the map is 1.
DEFAULT_ALPHA = 0.5


def normalise_heatmap(heatmap: Any, shape: tuple[int, int]) -> tuple[np.ndarray, str]:
    """(map in [0, 1] float32, how it was scaled). Non-finite values count as 0.

    Raises:
        MedgeError: the map is not 2-D with ``shape`` (the source image's rows, columns).
    """
    values = np.asarray(heatmap, dtype=np.float32)
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]
    if values.shape != tuple(shape):
        raise MedgeError(f"the heatmap is {values.shape} but the image is {tuple(shape)}: a heatmap must lie on "
                         "the original image grid (rows, columns)")
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return values, "map values shown as they are (0-1)"
    if high > low:
        return (values - low) / (high - low), f"map scaled from its own range {low:.4g}..{high:.4g} to 0-1"
    return np.zeros_like(values), "constant map"


def display_frame(image: Any, frame: int = 0, preprocess: Optional[dict] = None) -> np.ndarray:
    """One frame of a ``medge.Image`` as display grey in [0, 1] on its own grid (rows, columns).

    Through the bundle's own VOI (``preprocess``: the manifest's spec, at the
    image's size, one channel, no normalisation): the grey the model saw.
    When that cannot be applied (no spec, or a spec that needs a window the
    image lacks), the frame's own value range.
    """
    from ..preprocess import PreprocessSpec, preprocess as run_preprocess

    sem = image.semantics
    rows, columns = int(sem.rows), int(sem.columns)
    if preprocess:
        try:
            spec = PreprocessSpec.from_dict(preprocess).replace(
                height=rows, width=columns, channels=1, fit="stretch", mean=(0.0,), std=(1.0,), dtype="float32")
            from ..runtime.model import _single_frame

            out = run_preprocess(_single_frame(image, frame), spec, device="cpu")
            array = out if isinstance(out, np.ndarray) else out.to_host()
            return np.clip(np.asarray(array, dtype=np.float32).reshape(rows, columns), 0.0, 1.0)
        except MedgeError:
            pass
    values = image.pixels[frame].astype(np.float32)
    low, high = float(values.min()), float(values.max())
    grey = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if sem.photometric_interpretation == "MONOCHROME1":
        grey = 1.0 - grey
    return grey


def _jet(values: np.ndarray) -> np.ndarray:
    """(..., 3) float colours of the classic jet map (blue, cyan, yellow, red) for values in [0, 1]."""
    x = values[..., None]
    return np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0], dtype=np.float32)), 0.0, 1.0)


def blend(grey: np.ndarray, heatmap01: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """RGB uint8 (rows, columns, 3): ``grey`` (0-1) with the map in colour, opacity ``alpha * map``."""
    weight = (float(alpha) * heatmap01)[..., None]
    rgb = grey[..., None] * (1.0 - weight) + _jet(heatmap01) * weight
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def render_overlay(image: Any, heatmap: Any, *, frame: int = 0, preprocess: Optional[dict] = None,
                   alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, str]:
    """(RGB uint8 (rows, columns, 3), how the map was scaled) for one frame of ``image``."""
    sem = image.semantics
    values, scaling = normalise_heatmap(heatmap, (int(sem.rows), int(sem.columns)))
    return blend(display_frame(image, frame, preprocess), values, alpha), scaling


def overlay_series_uid(provenance: Provenance, header: Any) -> str:
    study, series = group_key(header)
    return result_uid("medge-overlay-series", provenance.manifest_sha256, study, series)


def build_overlay_sc(header: Any, rgb: np.ndarray, provenance: Any, *, frame: int = 0, prediction: Any = None,
                     scaling: str = "", instance_number: int = 1) -> Any:
    """A Secondary Capture (RGB) of ``rgb`` in the source's study, referencing the source image (and frame).

    Args:
        header: the source's reference header (``reference_header``).
        rgb: (rows, columns, 3) uint8, e.g. from ``render_overlay``.
        provenance: Provenance, Model, Bundle or bundle path.
        frame: the source frame (0-based).
        prediction: its Prediction, for the finding named in Image Comments.
        scaling: how the map was scaled (``render_overlay``'s second value).
        instance_number: Instance Number within the overlay series.

    Returns:
        ``highdicom.sc.SCImage``; SOP Instance UID derived from the bundle, source and frame.

    Raises:
        MissingDependency: highdicom is not installed (``medge[dicom-out]``).
    """
    hd = import_highdicom("Writing DICOM overlays")
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian

    from .._pydicom_quiet import quiet_pydicom

    provenance = Provenance.of(provenance)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    source = str(header.SOPInstanceUID)
    orientation = patient_orientation(header)
    with quiet_pydicom("writing a DICOM overlay"):
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=overlay_series_uid(provenance, header), series_number=OVERLAY_SERIES_NUMBER,
            sop_instance_uid=result_uid("medge-overlay", provenance.manifest_sha256, source, frame),
            instance_number=int(instance_number), manufacturer=MANUFACTURER,
            # highdicom requires an orientation for PATIENT; without one in the source it is emptied below.
            patient_orientation=orientation or ("L", "P"), transfer_syntax_uid=ExplicitVRLittleEndian)
        if orientation is None:
            sc.PatientOrientation = ""  # Type 2: unknown, rather than a made-up direction
        # The identity-removal flags of a de-identified source hold for what is derived from it.
        for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "PixelSpacing", "ImagerPixelSpacing",
                        "Laterality", "ImageLaterality", "BodyPartExamined"):
            if keyword in header and keyword not in sc:
                sc[keyword] = header[keyword]
        reference = Dataset()
        reference.ReferencedSOPClassUID = header.SOPClassUID
        reference.ReferencedSOPInstanceUID = source
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            reference.ReferencedFrameNumber = frame + 1
        sc.SourceImageSequence = [reference]
        sc.BurnedInAnnotation = "NO"
        sc.SeriesDescription = f"medge {provenance.name} heatmap"[:64]
        sc.DerivationDescription = (f"class activation map of {provenance.name} {provenance.version} blended over the "
                                    f"source image (model's window); not for primary diagnosis")[:1024]
        finding = ""
        if prediction is not None and getattr(prediction, "label", None):
            finding = f"finding {prediction.label}; "
        sc.ImageComments = (f"{finding}colour = map value (blue low, red high), opacity proportional to it; "
                            f"{scaling}; bundle manifest SHA-256 {provenance.manifest_sha256}")[:10240]
    return sc


def write_png(path: Union[str, os.PathLike], rgb: np.ndarray) -> Path:
    """Write an RGB uint8 array as PNG (atomically); no metadata beyond the pixels.

    Raises:
        MissingDependency: Pillow is not installed (``medge[dicom-out]``, through highdicom).
        MedgeError: the file cannot be written.
    """
    try:
        from PIL import Image as PILImage
    except ImportError:
        raise MissingDependency("Pillow", "dicom-out", "Writing PNG overlays") from None
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        PILImage.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MedgeError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
