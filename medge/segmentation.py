"""Segmenting a series: the steps conversion (accuracy report, calibration) and the runtime share.

series -> Volume                        medge.series.read_series
  -> model_input                        preprocess_volume with the bundle's VolumeSpec, (C, D, H, W) float32
  -> infer_logits                       sliding window over (D, H, W) with the network's window, windows
                                        batched through any run_batch (an ONNX Runtime session at
                                        conversion, the backend's own buffers at run time)
  -> to_label_map                       probabilities on the model grid -> the series' grid (linear,
                                        like MONAI's Invertd on probabilities) -> argmax / threshold
  -> Segmentation                       label map, per-label volumes in mL, timings

A 2-D network is run over the same (C, D, H, W) input with a window one
slice deep, so one code path covers 2-D (slice by slice, or 2.5-D with
neighbouring slices as channels) and 3-D networks, and the accuracy report
measures exactly what the runtime computes.

Why probabilities are resampled back (then argmax) rather than labels with
nearest neighbour: a label map upsampled by nearest neighbour has
staircase boundaries one model voxel wide, while the interpolated
probabilities put the boundary between model voxels where the network's
scores cross; it is also what MONAI's bundles do (Invertd on the
probabilities, then AsDiscrete), so medge's masks match the chain users
validated. The cost is K probability volumes on the original grid, computed
in float32.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .errors import ConversionError, MedgeError

_LOG = logging.getLogger("medge.segmentation")

__all__ = ["Segmentation", "model_input", "infer_logits", "window_inputs", "to_label_map", "volumes_ml",
           "read_volumes"]


@dataclass(frozen=True, eq=False)
class Segmentation:
    """A series segmented by a bundle.

    Attributes:
        label_map: uint8 (slices, rows, columns) on the series' own grid, in
            the Volume's slice order (along the slice normal); value ``v`` is
            ``labels[v]``, 0 the background.
        labels: label names by value, the background first.
        volumes_ml: label name -> volume in mL (voxel count x the voxel volume
            from the series' spacing), background left out.
        probabilities: (labels - 1 or classes, slices, rows, columns) float32
            on the series' grid when asked for (``segment(...,
            probabilities=True)``), else None.
        warnings: why the result must be read with care (outside the
            validated envelope with ``envelope="warn"``, series issues).
        timings_ms: per stage: read, preprocess, infer (the backend's time),
            sliding_window (window gathering and blending), postprocess,
            and windows, the number of windows run.
        precision, backend: what ran.
        series_instance_uid: of the series (a UID, never a patient value).
    """

    label_map: np.ndarray = field(repr=False)
    labels: tuple
    volumes_ml: dict
    probabilities: Optional[np.ndarray] = field(default=None, repr=False)
    warnings: tuple = ()
    timings_ms: dict = field(default_factory=dict)
    precision: Optional[str] = None
    backend: Optional[str] = None
    series_instance_uid: Optional[str] = None

    def to_dict(self) -> dict:
        """JSON-ready summary: series UID, grid, volumes, precision, backend, timings, warnings (no patient value)."""
        slices, rows, columns = self.label_map.shape
        return {"series_instance_uid": self.series_instance_uid, "slices": int(slices), "rows": int(rows),
                "columns": int(columns), "volumes_ml": {k: round(float(v), 4) for k, v in self.volumes_ml.items()},
                "precision": self.precision, "backend": self.backend,
                "timings_ms": {k: (int(v) if isinstance(v, (int, np.integer)) else round(float(v), 3))
                               for k, v in self.timings_ms.items()},
                "warnings": list(self.warnings)}


def model_input(volume: Any, spec: Any, *, threads: int = 0) -> np.ndarray:
    """(C, D, H, W) float32 network input of a Volume: ``preprocess_volume`` with ``spec``.

    3-D specs give one channel; 2.5-D specs (``neighbours = k``) give 2k + 1
    channels, each output slice with its neighbours (moved to the channel axis).
    """
    from .volume import preprocess_volume

    array = preprocess_volume(volume, spec=spec.replace(dtype="float32"), num_threads=threads)
    if spec.neighbours:
        return np.ascontiguousarray(array.transpose(1, 0, 2, 3))
    return array[0]


def _as_window_run(run_batch: Callable[[np.ndarray], Any], task: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A run_batch on (n, C, *window) for the sliding window: 2-D networks see (n, C, H, W) slices."""
    if task.spatial_dims == 3:
        return run_batch

    def run(windows: np.ndarray) -> np.ndarray:
        n, c = windows.shape[:2]
        out = np.asarray(run_batch(windows.reshape(n, c, *windows.shape[3:])))
        return out.reshape(out.shape[0], out.shape[1], 1, *out.shape[2:])

    return run


def infer_logits(run_batch: Callable[[np.ndarray], Any], array: np.ndarray, task: Any, batch_size: int, *,
                 window_buffer: Optional[np.ndarray] = None) -> np.ndarray:
    """(K, D, H, W) float32 logits of a whole (C, D, H, W) input: the sliding window of the task's settings.

    Logits are blended (not probabilities), as MONAI's sliding_window_inference blends the network's output.
    """
    from .sliding_window import sliding_window

    return sliding_window(_as_window_run(run_batch, task), array, task.window, overlap=task.overlap,
                          mode=task.mode, sigma_scale=task.sigma_scale, batch_size=int(batch_size),
                          window_buffer=window_buffer)


def window_inputs(array: np.ndarray, task: Any) -> np.ndarray:
    """Every window the sliding window feeds the network for a (C, D, H, W) input, (n, C, *roi) float32."""
    from .sliding_window import window_starts

    window = task.window
    pads = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(array.shape[1:], window)]
    data = np.pad(array, [(0, 0), *pads]) if any(p != (0, 0) for p in pads) else array
    starts = window_starts(data.shape[1:], window, (task.overlap,) * 3)
    windows = np.stack([data[(slice(None), *(slice(a, a + r) for a, r in zip(s, window)))] for s in starts])
    if task.spatial_dims == 2:
        windows = windows[:, :, 0]
    return np.ascontiguousarray(windows, dtype=np.float32)


def to_label_map(logits: np.ndarray, volume: Any, spec: Any, task: Any, *,
                 keep_probabilities: bool = False) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """(label map, probabilities or None, per-label masks' voxel counts) on the series' own grid.

    Probabilities are mapped back with linear interpolation in float32 (voxels the ROI crop removed get 0:
    background), then labelled (argmax, or sigmoid threshold).
    """
    from .volume import to_original_grid

    resampled = spec.resampled_size(volume.shape, volume.spacing)
    size, offset = spec.roi_placement(resampled)
    if tuple(resampled) == tuple(volume.shape) and tuple(size) == tuple(resampled) and not any(offset):
        # The model saw the series' own grid: labels straight from the logits (argmax of the probabilities
        # is the argmax of the logits; a sigmoid threshold is a logit threshold), no probability volume.
        label_map = task.labels_of(logits, axis=0)
        back = task.probabilities(logits, axis=0) if keep_probabilities or task.activation == "sigmoid" else None
    elif task.activation == "softmax" and task.classes == 2 and not keep_probabilities:
        # Two classes: linear interpolation keeps p0 + p1 = 1, so the argmax is p1 > 1/2 (ties and voxels the
        # crop removed, filled with 0, stay background); half the resampling work of both channels.
        foreground = task.probabilities(logits, axis=0)[1]
        back = None
        label_map = (_probability_to_original_grid(foreground, spec, volume) > 0.5).view(np.uint8)
    else:
        back = to_original_grid(task.probabilities(logits, axis=0), spec, volume.shape, volume.spacing,
                                mode="linear", fill=0, compute_dtype=np.float32)
        label_map = task.labels_of(back, axis=0, probabilities=True)
    if task.activation == "sigmoid":
        counts = np.array([int(np.count_nonzero(channel >= task.threshold)) for channel in back])
    elif task.label_count <= 16:  # a comparison per label beats bincount's scattered increments
        counts = np.array([int(np.count_nonzero(label_map == v)) for v in range(1, task.label_count)])
    else:
        counts = np.bincount(label_map.ravel(), minlength=task.label_count)[1:]
    return label_map, (back if keep_probabilities else None), counts


def _probability_to_original_grid(probability: np.ndarray, spec: Any, volume: Any) -> np.ndarray:
    """One probability map (D, H, W) on the model's grid -> the series' grid (float32), linearly.

    The same mapping as ``to_original_grid(..., mode="linear", fill=0)`` (ROI crop / pad undone, then half-pixel
    trilinear over the same field of view), with the trilinear pass in medge's native multi-threaded volume
    resampler: a VOI range of 0..1 is the identity on probabilities, so ``preprocess_volume`` with only a target
    size is that resampling. On a 128 x 512 x 512 series it replaces three numpy passes over 33.5 M voxels.
    """
    from .volume import VolumeSpec, preprocess_volume

    resampled = tuple(spec.resampled_size(volume.shape, volume.spacing))
    size, offset = spec.roi_placement(resampled)
    grid = np.zeros(resampled, np.float32)  # voxels the crop removed: probability 0 (background)
    dst, src = [], []
    for axis in range(3):
        lo, hi = max(0, offset[axis]), min(size[axis], offset[axis] + resampled[axis])
        src.append(slice(lo, hi))
        dst.append(slice(lo - offset[axis], hi - offset[axis]))
    grid[tuple(dst)] = probability[tuple(src)]
    if resampled == tuple(volume.shape):
        return grid
    back = preprocess_volume(grid, None, None, VolumeSpec(voi="range", value_range=(0.0, 1.0),
                                                          target_size=tuple(volume.shape), interpolation="trilinear"))
    return back.reshape(volume.shape)


def volumes_ml(counts: np.ndarray, spacing: Any, labels: tuple) -> dict:
    """label name -> mL from voxel counts (labels 1..) and the (row, column, slice) spacing in mm."""
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    return {name: float(count) * voxel_mm3 / 1000.0 for name, count in zip(labels[1:], counts)}


@dataclass
class SeriesInputs:
    """Series of a conversion folder, read and preprocessed with the bundle's VolumeSpec."""

    volumes: list  # Volume
    arrays: list  # (C, D, H, W) float32
    source: str
    skipped: list = field(default_factory=list)  # "series UID: reason"

    @property
    def headers(self) -> list:
        """One Image per series (its pixel properties and acquisition), what the envelope is observed from."""
        return [v.as_image() for v in self.volumes]


def read_volumes(source: Any, spec: Any, *, what: str, log: Callable[[str], None] = lambda _: None,
                 threads: int = 0) -> SeriesInputs:
    """Every series in a folder (or file list), read with ``read_series`` and preprocessed with ``spec``.

    A series that cannot be read (gapped, damaged) is skipped and listed; the others are used.

    Raises:
        ConversionError: the source does not exist or yields no readable series.
    """
    from pathlib import Path

    from .series import list_series, read_series

    path = Path(source)
    if not path.exists():
        raise ConversionError(f"{what} source {path} does not exist")
    try:
        summaries = list_series(path)
    except MedgeError as exc:
        raise ConversionError(f"no DICOM series in the {what} folder {path}: {exc}") from None
    volumes, arrays, skipped = [], [], []
    for summary in summaries:
        uid = summary.series_instance_uid
        started = time.perf_counter()
        try:
            volume = read_series(path, series_uid=uid)
            array = model_input(volume, spec, threads=threads)
        except MedgeError as exc:
            skipped.append(f"series {uid}: {exc}")
            _LOG.warning("skipping %s series %s: %s", what, uid, exc)
            continue
        volumes.append(volume)
        arrays.append(array)
        log(f"    {what} series {uid}: {volume.shape[0]} slices of {volume.shape[1]}x{volume.shape[2]} -> "
            f"model grid {tuple(array.shape[1:])} ({(time.perf_counter() - started) * 1e3:.0f} ms)")
    if not volumes:
        raise ConversionError(f"none of the {len(summaries)} {what} series could be read:\n  "
                              + "\n  ".join(skipped[:10]))
    return SeriesInputs(volumes, arrays, str(path), skipped)
