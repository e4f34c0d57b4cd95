"""``write_results``: the DICOM results of ``medge run --out-dicom DIR`` (and the files medge serve sends)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Union

from ..errors import MedgeError
from ._common import Provenance, frame_predictions, group_key, read_source, reference_header
from .overlay import DEFAULT_ALPHA, build_overlay_sc, render_overlay, write_png
from .sr import build_sr

__all__ = ["write_results", "save_dataset", "png_name"]


def save_dataset(dataset: Any, path: Union[str, os.PathLike]) -> Path:
    """Write a result object as a DICOM file (preamble, File Meta), atomically (temporary file, then rename).

    Raises:
        MedgeError: the file cannot be written.
    """
    from .._pydicom_quiet import quiet_pydicom

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with quiet_pydicom("writing a DICOM result"):
            dataset.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MedgeError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def png_name(source_uid: str, frame: int, frames: int) -> str:
    """``<source SOP Instance UID>.png``, with ``_frame<n>`` (1-based) for multi-frame sources."""
    return f"{source_uid}_frame{frame + 1}.png" if frames > 1 else f"{source_uid}.png"


def write_results(out_dir: Union[str, os.PathLike], items: Iterable[tuple[Any, Any]], bundle: Any, *,
                  overlays: bool = True, png: bool = True, alpha: float = DEFAULT_ALPHA) -> list[Path]:
    """Write the DICOM results of predictions into ``out_dir``; returns the files written.

    Layout::

        out_dir/sr/<SR SOP Instance UID>.dcm          one Comprehensive SR (TID 1500) per source series
        out_dir/overlays/<SC SOP Instance UID>.dcm    one Secondary Capture per prediction with a heatmap
        out_dir/png/<source SOP Instance UID>.png     the same overlay as PNG (``_frame<n>`` for multi-frame)

    File names are UIDs, never patient attributes. SR and overlay UIDs are
    derived from the bundle and the sources, so running again over the same
    images gives the same UIDs (an archive stores them once). Overlays and
    PNGs exist only for predictions that carry a heatmap
    (``Prediction.heatmap``: float (rows, columns) on the source grid).

    Args:
        out_dir: created if missing.
        items: (source, predictions) per image, in any order; may be a
            generator (only reduced headers are kept until the end). source: a
            pydicom Dataset, path, bytes or binary file; predictions: what
            ``Model.predict_each`` gave for it (a list of Predictions, one per
            frame; a single Prediction; or a MedgeError, skipped).
        bundle: the loaded ``medge.Model`` (preferred: its runtime is recorded),
            a ``medge.bundle.Bundle``, or the bundle path.
        overlays, png: write the Secondary Captures / the PNGs for heatmaps.
        alpha: the overlay's opacity where the map is 1.

    Raises:
        DicomError: a source cannot be read again or lacks the UIDs a reference needs.
        MedgeError: a file cannot be written; a heatmap not on the source grid.
        MissingDependency: highdicom (or Pillow) is not installed: ``pip install "medge[dicom-out]"``.
    """
    from ..dicom import read_dicom

    provenance = Provenance.of(bundle)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedgeError(f"cannot create the results folder {out}: {exc.strerror or exc}") from None
    series: dict[tuple[str, str], list] = {}
    written: list[Path] = []
    overlay_numbers: dict[tuple[str, str], int] = {}
    for source, predictions in items:
        frames = frame_predictions(predictions)
        if not frames:
            continue
        dataset = read_source(source)
        header = reference_header(dataset)
        key = group_key(header)
        series.setdefault(key, []).append((header, frames))
        with_maps = [p for p in frames if getattr(p, "heatmap", None) is not None]
        if not with_maps or not (overlays or png):
            continue
        image = read_dicom(dataset)
        count = int(header.get("NumberOfFrames", 1) or 1)
        for prediction in with_maps:
            frame = int(getattr(prediction, "frame", 0) or 0)
            rgb, scaling = render_overlay(image, prediction.heatmap, frame=frame, preprocess=provenance.preprocess,
                                          alpha=alpha)
            if overlays:
                overlay_numbers[key] = overlay_numbers.get(key, 0) + 1
                sc = build_overlay_sc(header, rgb, provenance, frame=frame, prediction=prediction, scaling=scaling,
                                      instance_number=overlay_numbers[key])
                written.append(save_dataset(sc, out / "overlays" / f"{sc.SOPInstanceUID}.dcm"))
            if png:
                written.append(write_png(out / "png" / png_name(str(header.SOPInstanceUID), frame, count), rgb))
        del image
    for entries in series.values():
        sr = build_sr(entries, provenance, instance_number=1)
        written.append(save_dataset(sr, out / "sr" / f"{sr.SOPInstanceUID}.dcm"))
    return written
