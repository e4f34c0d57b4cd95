"""Independent float64 numpy reference of medge's preprocessing.

Written from the DICOM standard (PS3.3 C.7.6.3, C.11.1, C.11.2; formulas as
in shared/notes/dicom.md) and from PyTorch's published resampling rules, not
from the kernels: dense weight matrices and piecewise formulas, no shared
code with csrc/.
"""

from __future__ import annotations

import math

import numpy as np


def stored_values(raw: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Container values -> stored values (PS3.3 C.7.6.3.1.1), as float64."""
    if raw.dtype.kind == "f":
        return raw.astype(np.float64)
    container_bits = raw.dtype.itemsize * 8
    unsigned = raw.astype(np.int64) % (1 << container_bits)  # the container's bit pattern
    value = unsigned % (1 << bits_stored)  # keep Bits Stored low bits
    if signed:
        value = np.where(value >= (1 << (bits_stored - 1)), value - (1 << bits_stored), value)
    return value.astype(np.float64)


def modality_lut(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return stored * slope + intercept


def voi_window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI LUT with output range [0, 1] (ymin = 0, ymax = 1)."""
    c, w = center, width
    if function == "LINEAR":
        lower = c - 0.5 - (w - 1) / 2
        upper = c - 0.5 + (w - 1) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            middle = (x - (c - 0.5)) / (w - 1) + 0.5 if w > 1 else np.zeros_like(x)
        return np.where(x <= lower, 0.0, np.where(x > upper, 1.0, middle))
    if function == "LINEAR_EXACT":
        middle = (x - c) / w + 0.5
        return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, middle))
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    raise ValueError(function)


def voi_range(x: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((x - low) / (high - low), 0.0, 1.0)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Half-pixel bilinear (PyTorch align_corners=False) as an (n_out, n_in) matrix."""
    scale = n_in / n_out
    m = np.zeros((n_out, n_in))
    for d in range(n_out):
        src = max((d + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        if i0 == n_in - 1:
            m[d, i0] = 1.0
            continue
        frac = src - i0
        m[d, i0] += 1.0 - frac
        m[d, i0 + 1] += frac
    return m


def antialias_matrix(n_in: int, n_out: int) -> np.ndarray:
    """torchvision antialias=True bilinear: triangle filter of support in/out when shrinking."""
    scale = n_in / n_out
    if scale <= 1.0:
        return bilinear_matrix(n_in, n_out)
    m = np.zeros((n_out, n_in))
    j = np.arange(n_in) + 0.5
    for d in range(n_out):
        center = (d + 0.5) * scale
        weights = np.maximum(0.0, 1.0 - np.abs(j - center) / scale)
        m[d] = weights / weights.sum()
    return m


def letterbox_region(in_h: int, in_w: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the resized image inside the output."""
    s = min(out_h / in_h, out_w / in_w)
    rh = min(max(1, int(math.floor(in_h * s + 0.5))), out_h)
    rw = min(max(1, int(math.floor(in_w * s + 0.5))), out_w)
    return (out_h - rh) // 2, (out_w - rw) // 2, rh, rw


def reference_frame(
    raw: np.ndarray,
    *,
    bits_stored: int,
    signed: bool,
    slope: float,
    intercept: float,
    voi: tuple,
    invert: bool,
    out_h: int,
    out_w: int,
    channels: int,
    fit: str,
    pad_value: float,
    resample: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> np.ndarray:
    """One frame -> (channels, out_h, out_w) float64.

    ``voi`` is ("window", center, width, function) or ("range", low, high).
    """
    x = modality_lut(stored_values(raw, bits_stored, signed), slope, intercept)
    y = voi_window(x, *voi[1:]) if voi[0] == "window" else voi_range(x, *voi[1:])
    if invert:
        y = 1.0 - y
    in_h, in_w = raw.shape
    if fit == "letterbox":
        top, left, rh, rw = letterbox_region(in_h, in_w, out_h, out_w)
    else:
        top, left, rh, rw = 0, 0, out_h, out_w
    matrix = antialias_matrix if resample == "bilinear_antialias" else bilinear_matrix
    resized = matrix(in_h, rh) @ y @ matrix(in_w, rw).T
    display = np.full((out_h, out_w), float(pad_value))
    display[top : top + rh, left : left + rw] = resized
    means = np.broadcast_to(np.asarray(mean, dtype=np.float64), (channels,))
    stds = np.broadcast_to(np.asarray(std, dtype=np.float64), (channels,))
    return (display[None] - means[:, None, None]) / stds[:, None, None]
