"""Independent float64 numpy reference of medge's volume preprocessing.

Written from the DICOM standard (PS3.3 C.7.6.3 stored values, C.11.1 Modality
LUT, C.11.2 VOI LUT functions), PyTorch's documented ``F.interpolate`` rules
(``mode="trilinear", align_corners=False``: source coordinate
``(dst + 0.5) * in / out - 0.5`` clamped at 0, edge value taken whole;
``mode="nearest-exact"``: ``floor((dst + 0.5) * in / out)``) and MONAI's
``ResizeWithPadOrCrop`` (``CenterSpatialCrop`` starts at ``size // 2 - roi // 2``,
``SpatialPad(method="symmetric")`` pads ``(roi - size) // 2`` before). Dense
per-axis weight matrices in float64 and exact fractions for indices; no
code shared with csrc/ or medge.volume.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def stored_values(raw: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Container values -> stored values (PS3.3 C.7.6.3.1.1), as float64."""
    if raw.dtype.kind == "f":
        return raw.astype(np.float64)
    container = raw.dtype.itemsize * 8
    unsigned = raw.astype(np.int64) % (1 << container)
    value = unsigned % (1 << bits_stored)
    if signed:
        value = np.where(value >= (1 << (bits_stored - 1)), value - (1 << bits_stored), value)
    return value.astype(np.float64)


def voi(x: np.ndarray, mode: tuple) -> np.ndarray:
    """("window", center, width, function) or ("range", low, high) -> [0, 1] (PS3.3 C.11.2.1.2 / C.11.2.1.3)."""
    if mode[0] == "range":
        low, high = mode[1], mode[2]
        return np.clip((x - low) / (high - low), 0.0, 1.0)
    _, c, w, function = mode
    if function == "LINEAR":
        below = x <= c - 0.5 - (w - 1) / 2
        above = x > c - 0.5 + (w - 1) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            middle = (x - (c - 0.5)) / (w - 1) + 0.5 if w > 1 else np.zeros_like(x)
        return np.where(below, 0.0, np.where(above, 1.0, middle))
    if function == "LINEAR_EXACT":
        return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, (x - c) / w + 0.5))
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    raise ValueError(function)


def linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's linear interpolation with align_corners=False, exact coordinates."""
    m = np.zeros((n_out, n_in))
    for d in range(n_out):
        src = Fraction(2 * d + 1, 2) * Fraction(n_in, n_out) - Fraction(1, 2)
        if src < 0:
            src = Fraction(0)
        i0 = math.floor(src)
        if i0 >= n_in - 1:
            m[d, n_in - 1] = 1.0
            continue
        frac = float(src - i0)
        m[d, i0] += 1.0 - frac
        m[d, i0 + 1] += frac
    return m


def nearest_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) selection of PyTorch's nearest-exact: floor((d + 1/2) * in / out), at most in - 1."""
    m = np.zeros((n_out, n_in))
    for d in range(n_out):
        m[d, min(n_in - 1, math.floor(Fraction(2 * d + 1, 2) * Fraction(n_in, n_out)))] = 1.0
    return m


def resampled_size(shape: tuple, spacing_rcs: tuple, target_spacing_rcs=None, target_size=None) -> tuple:
    """Sizes after resampling: round half up of n * spacing / target (spacings given as row, column, slice)."""
    if target_size is not None:
        return tuple(target_size)
    if target_spacing_rcs is None:
        return tuple(shape)
    row, col, sl = spacing_rcs
    trow, tcol, tsl = target_spacing_rcs
    return tuple(max(1, math.floor(n * s / t + 0.5)) for n, s, t in zip(shape, (sl, row, col), (tsl, trow, tcol)))


def crop_or_pad(volume: np.ndarray, roi, fit: str, pad_value: float) -> np.ndarray:
    """MONAI ResizeWithPadOrCrop (fit 'crop_or_pad') or SpatialPad only (fit 'pad') on the last three axes."""
    if roi is None:
        return volume
    for axis in range(3):
        ax = volume.ndim - 3 + axis
        n = volume.shape[ax]
        r = roi[axis]
        if n > r and fit == "crop_or_pad":
            start = n // 2 - r // 2
            volume = np.take(volume, np.arange(start, start + r), axis=ax)
        elif n < r:
            before = (r - n) // 2
            widths = [(0, 0)] * volume.ndim
            widths[ax] = (before, r - n - before)
            volume = np.pad(volume, widths, constant_values=pad_value)
    return volume


def reference_volume(
    raw: np.ndarray,
    *,
    bits_stored: int,
    signed: bool,
    slopes,
    intercepts,
    voi_mode: tuple,
    invert: bool,
    spacing=(1.0, 1.0, 1.0),
    target_spacing=None,
    target_size=None,
    interpolation: str = "trilinear",
    roi=None,
    fit: str = "crop_or_pad",
    pad_value: float = 0.0,
    mean: float = 0.0,
    std: float = 1.0,
    neighbours: int = 0,
) -> np.ndarray:
    """(D, H, W) stored values -> (1, 1, D', H', W') or (D', 2k + 1, H', W') float64."""
    depth = raw.shape[0]
    slopes = np.broadcast_to(np.asarray(slopes, dtype=np.float64), (depth,))
    intercepts = np.broadcast_to(np.asarray(intercepts, dtype=np.float64), (depth,))
    x = stored_values(raw, bits_stored, signed) * slopes[:, None, None] + intercepts[:, None, None]
    y = voi(x, voi_mode)
    if invert:
        y = 1.0 - y
    size = resampled_size(raw.shape, spacing, target_spacing, target_size)
    matrix = nearest_matrix if interpolation == "nearest" else linear_matrix
    mz, my, mx = (matrix(n, m) for n, m in zip(raw.shape, size))
    for axis, m in enumerate((mz, my, mx)):  # separable: one dense matrix per axis
        y = np.moveaxis(np.tensordot(m, y, axes=(1, axis)), 0, axis)
    y = crop_or_pad(y, roi, fit, pad_value)
    y = (y - mean) / std
    if neighbours == 0:
        return y[None, None]
    d = y.shape[0]
    index = np.clip(np.arange(d)[:, None] + np.arange(-neighbours, neighbours + 1)[None, :], 0, d - 1)
    return y[index]  # (D, 2k + 1, H, W)
