"""From the model's input grid back to the original image grid: the inverse of medge's resampling.

Preprocessing stretches an image to the model size, or letterboxes it (keeps
the aspect ratio, centres it, pads). Anything the model outputs per pixel (a
class activation map today, label maps with segmentation) is mapped back by
cropping the letterbox's content region and resampling it to the image's
rows x columns, bilinear with half-pixel centres (the convention the forward
resampling uses), so it lines up with the image a viewer shows.
"""

from __future__ import annotations

import math

import numpy as np


def content_region(rows: int, columns: int, height: int, width: int, fit: str) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image inside the model input: the whole input when stretched;
    for letterbox, the same rounding (half up) the native kernels use."""
    if fit != "letterbox":
        return 0, 0, height, width
    scale = min(height / rows, width / columns)
    content_h = min(max(1, int(math.floor(rows * scale + 0.5))), height)
    content_w = min(max(1, int(math.floor(columns * scale + 0.5))), width)
    return (height - content_h) // 2, (width - content_w) // 2, content_h, content_w


def resize_bilinear(values: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """(h, w) -> (rows, columns), bilinear with half-pixel centres and edge clamping (PyTorch's
    ``align_corners=False``), float32."""
    values = np.asarray(values, dtype=np.float32)
    h, w = values.shape

    def taps(n_out: int, n_in: int):
        centre = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        centre = np.clip(centre, 0.0, n_in - 1)
        low = np.floor(centre).astype(np.int64)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, (centre - low).astype(np.float32)

    y0, y1, fy = taps(rows, h)
    x0, x1, fx = taps(columns, w)
    top = values[y0][:, x0] * (1 - fx) + values[y0][:, x1] * fx
    bottom = values[y1][:, x0] * (1 - fx) + values[y1][:, x1] * fx
    return (top * (1 - fy)[:, None] + bottom * fy[:, None]).astype(np.float32)


def to_image_grid(values: np.ndarray, rows: int, columns: int, fit: str) -> np.ndarray:
    """A (H, W) map on the model input grid -> (rows, columns) on the original image grid."""
    height, width = values.shape
    top, left, content_h, content_w = content_region(rows, columns, height, width, fit)
    return resize_bilinear(values[top : top + content_h, left : left + content_w], rows, columns)
