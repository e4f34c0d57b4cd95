"""``Model.segment``: a series through a segmentation bundle, on the loaded backend's own buffers.

read (read_series) -> envelope check (the series' pixel properties and
acquisition, as for an image) -> preprocess_volume (CPU threads) -> sliding
window whose windows are gathered straight into the backend's input buffer
(host backends with the graph's dtype; others get a copy per batch) ->
probabilities back onto the series' grid -> label map and volumes in mL.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..errors import MedgeError
from ..segmentation import Segmentation, infer_logits, model_input, to_label_map, volumes_ml


def segment(model: Any, source: Any, *, probabilities: bool = False, threads: int = 0,
            batch_size: Any = None) -> Segmentation:
    """See :meth:`medge.runtime.model.Model.segment`."""
    from ..series import Volume, read_series

    task = model.task
    timings: dict = {}
    started = time.perf_counter()
    volume = source if isinstance(source, Volume) else read_series(source)
    warnings = tuple(model.envelope_check(volume.as_image()))  # OutsideEnvelope when enforcing
    warnings += tuple(f"series irregularity ({issue.kind}): {issue}" for issue in volume.issues)
    timings["read"] = (time.perf_counter() - started) * 1e3

    started = time.perf_counter()
    array = model_input(volume, model.spec, threads=threads)
    if array.shape[0] != model.backend_impl.input.shape[0]:
        raise MedgeError(f"the series preprocesses to {array.shape[0]} channel(s) but the graph takes "
                         f"{model.backend_impl.input.shape[0]}: the bundle is inconsistent")
    timings["preprocess"] = (time.perf_counter() - started) * 1e3

    backend = model.backend_impl
    batch = max(1, min(int(task.sw_batch if batch_size is None else batch_size), backend.max_batch))
    infer_seconds = [0.0, 0]
    buffer = _host_window_buffer(backend, batch, task)

    def run_batch(windows: np.ndarray) -> np.ndarray:
        n = len(windows)
        if buffer is None:  # the windows were gathered elsewhere: into the backend's buffer now
            backend.load_input(np.ascontiguousarray(windows, dtype=backend.input.dtype))
        tick = time.perf_counter()
        out = backend.execute(n)
        infer_seconds[0] += time.perf_counter() - tick
        infer_seconds[1] += n
        return out

    started = time.perf_counter()
    logits = infer_logits(run_batch, array, task, batch, window_buffer=buffer)
    total_ms = (time.perf_counter() - started) * 1e3
    timings["infer"] = infer_seconds[0] * 1e3
    timings["sliding_window"] = total_ms - timings["infer"]
    timings["windows"] = infer_seconds[1]

    bad = logits.size - int(np.count_nonzero(np.isfinite(logits)))
    if bad:
        # NaN compares false with every threshold and argmax takes it as a maximum: the mask would silently be
        # background (or one label) exactly where the network failed. No segmentation is better than that one.
        raise MedgeError(f"the network gave {bad} non-finite output value(s) of {logits.size} on this series "
                         f"({model.backend.name}, {model.backend.precision}): no segmentation is given; check the "
                         "bundle with medge inspect --self-test, or choose another precision")
    started = time.perf_counter()
    label_map, probs, counts = to_label_map(logits, volume, model.spec, task, keep_probabilities=probabilities)
    timings["postprocess"] = (time.perf_counter() - started) * 1e3
    return Segmentation(label_map=label_map, labels=tuple(task.labels),
                        volumes_ml=volumes_ml(counts, volume.spacing, tuple(task.labels)), probabilities=probs,
                        warnings=warnings, timings_ms=timings, precision=model.backend.precision,
                        backend=model.backend.name, series_instance_uid=volume.series_instance_uid)


def _host_window_buffer(backend: Any, batch: int, task: Any):
    """The backend's own float32 host input buffer as the sliding window's (batch, C, *window) gather buffer,
    so windows are written once, where the backend reads them; None when it is on a device or not float32."""
    if backend.device != "cpu" or np.dtype(backend.input.dtype) != np.float32:
        return None
    host = backend.input_buffer(batch)
    if not isinstance(host, np.ndarray) or not host.flags.c_contiguous or not host.flags.writeable:
        return None
    return host.reshape(batch, host.shape[1], *task.window)
