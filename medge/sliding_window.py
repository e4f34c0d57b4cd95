"""Sliding-window inference for volumes (or images) larger than a model's input.

``sliding_window`` tiles a (C, *spatial) array with windows of the model's ROI,
runs them through any batch function (a backend's ``infer``, an engine), and
blends the overlapping predictions with a constant or Gaussian importance map.
Window placement, padding, importance map and blending follow MONAI's
``sliding_window_inference`` (monai/inferers/utils.py: ``_get_scan_interval``,
``dense_patch_slices``, ``compute_importance_map``), operation for operation in
float32, so the two agree to float rounding on the same network:

- scan interval per axis: ``int(roi * (1 - overlap))`` (at least 1), or the ROI
  itself when the (padded) image equals the ROI along that axis;
- window starts ``i * interval``, the last one shifted back to end at the
  image's edge; windows in C order of their starts (first axis slowest);
- an image smaller than the ROI is padded symmetrically (``diff // 2`` before)
  and the result cropped back;
- Gaussian map: per axis ``exp(-x^2 / (2 sigma^2))`` with ``x`` the offsets
  from the window centre (``-(roi - 1) / 2 ..``), ``sigma = sigma_scale * roi``,
  their outer product, not normalised, clamped below at ``max(min, 1e-3)``;
- output = sum(prediction * map) / sum(map) over the windows covering a voxel.

numpy only (no torch): the run side never imports torch.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .errors import PreprocessError

__all__ = ["sliding_window", "importance_map", "window_starts"]

MODES = ("constant", "gaussian")
PADDING_MODES = {"constant": "constant", "replicate": "edge", "reflect": "reflect", "circular": "wrap"}


def _per_axis(value: Any, ndim: int, name: str, kind: type) -> tuple:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        values = (value,) * ndim
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise PreprocessError(f"{name} must be a number or one per spatial axis, got {value!r}") from None
    if len(values) != ndim or not all(isinstance(v, (int, float, np.integer, np.floating))
                                      and not isinstance(v, bool) for v in values):
        raise PreprocessError(f"{name} must be a number or {ndim} numbers (one per spatial axis), got {value!r}")
    if kind is int and not all(float(v).is_integer() for v in values):
        raise PreprocessError(f"{name} must be integers, got {value!r}")
    return tuple(kind(v) for v in values)


def importance_map(roi: Sequence[int], mode: str = "gaussian",
                   sigma_scale: Union[float, Sequence[float]] = 0.125) -> np.ndarray:
    """The float32 importance map of one window (MONAI ``compute_importance_map``).

    Args:
        roi: window size per spatial axis.
        mode: ``"constant"`` (all ones) or ``"gaussian"``.
        sigma_scale: Gaussian sigma as a fraction of the ROI, one value or one per axis.

    Raises:
        PreprocessError: unknown mode or bad sizes.
    """
    roi = _per_axis(roi, len(roi) if isinstance(roi, (tuple, list)) else 1, "roi", int)
    if mode not in MODES:
        raise PreprocessError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "constant":
        return np.ones(roi, dtype=np.float32)
    scales = _per_axis(sigma_scale, len(roi), "sigma_scale", float)
    if not all(math.isfinite(s) and s > 0 for s in scales):
        raise PreprocessError(f"sigma_scale must be positive, got {sigma_scale!r}")
    weights = None
    for n, scale in zip(roi, scales):
        sigma = n * scale
        # As torch.arange(-(n - 1) / 2, (n - 1) / 2 + 1) in float32, then exp(x^2 / (-2 sigma^2)) in float32.
        x = (np.arange(n, dtype=np.float64) - (n - 1) / 2.0).astype(np.float32)
        g = np.exp((x * x) / np.float32(-2.0 * sigma**2)).astype(np.float32)
        weights = g if weights is None else weights[..., None] * g
    floor = max(float(weights.min()), 1e-3)
    return np.maximum(weights, np.float32(floor)).astype(np.float32)


def window_starts(image_size: Sequence[int], roi: Sequence[int], overlap: Sequence[float]) -> list[tuple[int, ...]]:
    """Start of every window, in MONAI's order, for an image at least as large as the ROI on every axis."""
    per_axis = []
    for n, r, o in zip(image_size, roi, overlap):
        interval = r if r == n else max(1, int(r * (1 - o)))
        count = 1
        for d in range(int(math.ceil(n / interval))):
            if d * interval + r >= n:
                count = d + 1
                break
        per_axis.append([i * interval - max(i * interval + r - n, 0) for i in range(count)])
    return list(itertools.product(*per_axis))


def sliding_window(
    run_batch: Callable[[np.ndarray], Any],
    volume: np.ndarray,
    roi: Union[int, Sequence[int]],
    *,
    overlap: Union[float, Sequence[float]] = 0.25,
    mode: str = "gaussian",
    sigma_scale: Union[float, Sequence[float]] = 0.125,
    batch_size: int = 1,
    padding_mode: str = "constant",
    cval: float = 0.0,
    fixed_batch: bool = False,
    window_buffer: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Run a model over a large volume window by window and blend the predictions.

    Args:
        run_batch: ``f(windows) -> predictions``: windows are (n, C, *roi)
            float32 (a view of one reused buffer; copy it if you keep it),
            predictions (n, classes, *roi) array-likes (numpy, or anything
            ``np.asarray`` reads). Typically a backend's infer call.
        volume: (C, *spatial) float32, e.g. (C, D, H, W) from
            ``preprocess_volume(...)[0]`` or (C, H, W) for a 2-D image.
        roi: the model's spatial input size (one number or one per axis).
        overlap: fraction of the ROI neighbouring windows share, in [0, 1).
        mode: ``"gaussian"`` (MONAI's importance weighting) or ``"constant"``.
        sigma_scale: Gaussian sigma as a fraction of the ROI.
        batch_size: windows per ``run_batch`` call.
        padding_mode: how a volume smaller than the ROI is padded:
            ``"constant"`` (with ``cval``), ``"replicate"``, ``"reflect"``,
            ``"circular"`` (PyTorch / MONAI names).
        cval: the constant padding value.
        fixed_batch: always pass ``batch_size`` windows (the last batch filled
            with copies of its first window, their predictions dropped), for
            engines built for one batch size.
        window_buffer: optional (batch_size, C, *roi) float32 C-contiguous
            array to gather windows into (e.g. a backend's pinned input).

    Returns:
        (classes, *spatial) float32, the blended prediction on ``volume``'s grid.

    Raises:
        PreprocessError: bad arguments, or predictions of the wrong shape.
    """
    data = np.asarray(volume)
    if data.ndim < 2:
        raise PreprocessError(f"volume must be (C, *spatial), got shape {data.shape}")
    if data.dtype != np.float32:
        if data.dtype.kind not in "fiu":
            raise PreprocessError(f"volume must be numeric (float32), got {data.dtype}")
        data = data.astype(np.float32)
    ndim = data.ndim - 1
    roi = _per_axis(roi, ndim, "roi", int)
    if not all(r >= 1 for r in roi):
        raise PreprocessError(f"roi must be positive, got {roi!r}")
    overlaps = _per_axis(overlap, ndim, "overlap", float)
    if not all(0 <= o < 1 for o in overlaps):
        raise PreprocessError(f"overlap must be >= 0 and < 1, got {overlap!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise PreprocessError(f"batch_size must be a positive integer, got {batch_size!r}")
    if padding_mode not in PADDING_MODES:
        raise PreprocessError(f"padding_mode must be one of {tuple(PADDING_MODES)}, got {padding_mode!r}")
    weights = importance_map(roi, mode, sigma_scale)

    channels = data.shape[0]
    original = data.shape[1:]
    # Symmetric padding up to the ROI (MONAI: diff // 2 before, the rest after).
    pads = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(original, roi)]
    if any(p != (0, 0) for p in pads):
        kwargs = {"constant_values": cval} if padding_mode == "constant" else {}
        data = np.pad(data, [(0, 0), *pads], mode=PADDING_MODES[padding_mode], **kwargs)
    image = data.shape[1:]
    starts = window_starts(image, roi, overlaps)

    if window_buffer is None:
        buffer = np.empty((batch_size, channels, *roi), dtype=np.float32)
    else:
        buffer = window_buffer
        if (not isinstance(buffer, np.ndarray) or buffer.dtype != np.float32 or not buffer.flags.c_contiguous
                or buffer.shape != (batch_size, channels, *roi) or not buffer.flags.writeable):
            raise PreprocessError(f"window_buffer must be a writable C-contiguous float32 array of shape "
                                  f"{(batch_size, channels, *roi)}")

    output: Optional[np.ndarray] = None
    count = np.zeros(image, dtype=np.float32)
    for s in starts:  # MONAI adds the map once per window, in window order
        count[tuple(slice(a, a + r) for a, r in zip(s, roi))] += weights
    for first in range(0, len(starts), batch_size):
        group = starts[first:first + batch_size]
        n = len(group)
        for i, s in enumerate(group):
            buffer[i] = data[(slice(None), *(slice(a, a + r) for a, r in zip(s, roi)))]
        calls = batch_size if fixed_batch else n
        for i in range(n, calls):
            buffer[i] = buffer[0]
        predictions = np.asarray(run_batch(buffer[:calls]))
        if predictions.ndim != ndim + 2 or predictions.shape[0] != calls or tuple(predictions.shape[2:]) != roi:
            raise PreprocessError(
                f"run_batch returned shape {predictions.shape} for {calls} windows of {roi}: it must return "
                f"({calls}, classes, {', '.join(map(str, roi))}) (outputs at another resolution are not supported)")
        if output is None:
            output = np.zeros((predictions.shape[1], *image), dtype=np.float32)
        elif predictions.shape[1] != output.shape[0]:
            raise PreprocessError(f"run_batch returned {predictions.shape[1]} classes after {output.shape[0]}")
        for i, s in enumerate(group):
            output[(slice(None), *(slice(a, a + r) for a, r in zip(s, roi)))] += (
                predictions[i].astype(np.float32, copy=False) * weights)
    assert output is not None  # there is always at least one window
    output /= count
    if any(p != (0, 0) for p in pads):
        output = output[(slice(None), *(slice(b, b + n) for (b, _), n in zip(pads, original)))]
        output = np.ascontiguousarray(output)
    return output
