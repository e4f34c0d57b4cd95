"""DICOM results: a Structured Report with the findings, heatmap overlays (Secondary Capture and PNG).

Built with highdicom (``pip install "medge[dicom-out]"``), never with a
hand-written encoder. Imported only where results are written: ``import
medge`` does not import it, and importing this package does not import
highdicom (each function does, and names the extra when it is missing).

- :func:`write_results`: everything for a set of predictions into a folder
  (what ``medge run --out-dicom DIR`` calls).
- :func:`build_sr`: one Comprehensive SR (TID 1500) for images of one study.
- :func:`render_overlay`, :func:`build_overlay_sc`, :func:`write_png`: a
  heatmap blended over its source frame, as a Secondary Capture and as PNG
  (``overlay.py`` says why a Secondary Capture).
- :class:`Provenance`: the algorithm identification every object carries
  (bundle name, version, manifest SHA-256, decision rule, operating point).
- :func:`reference_header`: the reduced copy of a source header whose patient
  and study attributes the results copy (and nothing else of the source).
"""

from __future__ import annotations

from ._common import REFERENCE_ATTRIBUTES, Provenance, import_highdicom, reference_header, result_uid
from .overlay import (DEFAULT_ALPHA, SC_SOP_CLASS_UID, blend, build_overlay_sc, display_frame, normalise_heatmap,
                      render_overlay, write_png)
from .results import png_name, save_dataset, write_results
from .sr import SCHEME, SR_SOP_CLASS_UID, build_sr, label_concept



def ensure_available(purpose: str = "Writing DICOM results") -> None:
    """Raise MissingDependency (naming ``medge[dicom-out]``) now if highdicom is missing: for commands that must
    refuse before loading a model (``medge run --out-dicom``)."""
    import_highdicom(purpose)
    try:
        import PIL  # noqa: F401 - PNG overlays; a dependency of highdicom
    except ImportError:
        from ..errors import MissingDependency

        raise MissingDependency("Pillow", "dicom-out", purpose) from None


__all__ = [
    "ensure_available",
    "write_results",
    "build_sr",
    "build_overlay_sc",
    "render_overlay",
    "display_frame",
    "normalise_heatmap",
    "blend",
    "write_png",
    "save_dataset",
    "png_name",
    "Provenance",
    "reference_header",
    "result_uid",
    "label_concept",
    "REFERENCE_ATTRIBUTES",
    "SR_SOP_CLASS_UID",
    "SC_SOP_CLASS_UID",
    "SCHEME",
    "DEFAULT_ALPHA",
]
