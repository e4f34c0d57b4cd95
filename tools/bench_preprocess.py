#!/usr/bin/env python3
"""Benchmark medge's fused DICOM preprocessing against what users write today.

Workload (the issue's): a batch of 512x512 int16 CT slices (synthetic, from
medge.synthetic, Rescale Intercept -1024, window 40/400) -> N x 1 x 224 x 224
float16, with LINEAR windowing and antialiased resampling. Every contender
starts from the decoded stored values (decoding is excluded from all timings)
and computes the same maths; the script checks that the outputs agree.

CPU rows, measured side by side in one run (median of --repeat runs after
--warmup):
  medge C++       medge.preprocess(device="cpu") into a preallocated buffer
  numpy           the same maths vectorised in numpy (float32, resize as two
                  matrix products with precomputed weights: a strong baseline)
  pydicom + PIL   pydicom apply_modality_lut + apply_voi_lut, then a float
                  resize (Pillow 'F' images, BILINEAR, which antialiases when
                  shrinking), normalise, cast: what most code does today

GPU rows (only where medge.cuda_available()): kernel time from CUDA events,
effective bandwidth counted as bytes read + written, next to a
device-to-device copy moving the same number of bytes (read + written) and a
chain of PyTorch GPU ops computing the same maths (where torch sees the GPU),
measured in the same run, at --gpu-batch of 512x512 -> --gpu-size. Targets
(issue 12): kernel >= 80% of the copy's bandwidth, >= 10x the PyTorch chain.

Usage: python tools/bench_preprocess.py [--gpu-only] [--json results.json] [--markdown table.md]
  --gpu-only: the GPU rows alone (no pydicom / Pillow needed; tools/gpu_check.sh uses it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np
from _machine import machine_name  # tools/_machine.py (a script's folder is on sys.path)


def median_ms(fn: Callable[[], object], repeat: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


# ---------------------------------------------------------------------------
# Baselines


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased bilinear (triangle filter, support in/out when shrinking) as a dense matrix."""
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), dtype=np.float64)
    if scale <= 1.0:
        for d in range(n_out):
            src = max((d + 0.5) * scale - 0.5, 0.0)
            i0 = min(int(src), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            frac = src - i0 if i1 != i0 else 0.0
            m[d, i0] += 1 - frac
            m[d, i1] += frac
        return m.astype(np.float32)
    j = np.arange(n_in) + 0.5
    for d in range(n_out):
        w = np.maximum(0.0, 1.0 - np.abs(j - (d + 0.5) * scale) / scale)
        m[d] = w / w.sum()
    return m.astype(np.float32)


def make_numpy_baseline(arrays, slope, intercept, center, width, out_size):
    stack = np.stack(arrays)
    wy = resize_matrix(stack.shape[1], out_size)
    wx_t = resize_matrix(stack.shape[2], out_size).T.copy()

    def run():
        x = stack.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        y = np.clip((x - np.float32(center - 0.5)) / np.float32(width - 1) + np.float32(0.5), 0.0, 1.0)
        resized = wy @ y @ wx_t
        return resized[:, None].astype(np.float16)

    return run


def make_pydicom_pil_baseline(datasets, arrays, out_size):
    from PIL import Image as PILImage
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    def window_output_range(ds):
        # pydicom's apply_windowing maps into the rescaled range of the stored values.
        bits = ds.BitsStored
        lo, hi = (0, 2**bits - 1) if ds.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        slope, intercept = float(getattr(ds, "RescaleSlope", 1)), float(getattr(ds, "RescaleIntercept", 0))
        return lo * slope + intercept, hi * slope + intercept

    ranges = [window_output_range(ds) for ds in datasets]

    def run():
        outputs = []
        for ds, arr, (lo, hi) in zip(datasets, arrays, ranges):
            hu = apply_modality_lut(arr, ds)
            windowed = apply_voi_lut(hu, ds)
            unit = ((windowed - lo) / (hi - lo)).astype(np.float32)
            resized = PILImage.fromarray(unit, mode="F").resize((out_size, out_size), PILImage.BILINEAR)
            outputs.append(np.asarray(resized))
        return np.stack(outputs)[:, None].astype(np.float16)

    return run


# ---------------------------------------------------------------------------
# GPU


def gpu_rows(batch: int, in_size: int, out_size: int, repeat: int, warmup: int) -> list[dict]:
    """Kernel and copy bandwidth, measured so that neither host overhead nor L2 hits inflate them.

    - Kernel: native launches (medge._C.preprocess_cuda with prebuilt parameters) captured once into
      a CUDA graph, one launch per rotating set, and the graph replayed between two CUDA events, so
      the binding's host time (tens of microseconds for 64 parameter sets, the order of the kernel
      itself) stays out of the GPU time; median of 5 rounds. Where capture fails, back-to-back
      launches, with the host enqueue time reported: a row whose enqueue time is not well below its
      GPU time is host-bound and says so.
    - L2: launches rotate over enough input/output sets to touch > 2x the L2 cache between reuses.
    - Copy: the same bytes (half read + half written = the kernel's read + written) with the same
      rotation and timing.
    - End-to-end: medge.preprocess() on device arrays, its own row (API latency, host included).
    """
    import time as _time

    import medge
    from medge import _C
    from medge.preprocess import _frame_params, _output_params
    from medge.runtime import cuda as mc

    rt = mc._runtime("GPU benchmark")
    rng = np.random.default_rng(0)
    host = rng.integers(-1024, 3071, size=(batch, in_size, in_size), dtype=np.int16)
    spec = medge.PreprocessSpec(out_size, out_size, voi="window", window=(40 + 1024, 400),
                                resample="bilinear_antialias", dtype="float16")
    device = mc.current_device()
    l2_bytes = mc.check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrL2CacheSize, device))
    out_bytes = batch * out_size * out_size * 2
    bytes_moved = host.nbytes + out_bytes
    sets = max(2, -(-2 * l2_bytes // bytes_moved) + 1)
    with mc.Stream() as stream:
        inputs = [mc.DeviceArray.from_host(host, stream) for _ in range(sets)]
        outputs = [mc.DeviceArray((batch, 1, out_size, out_size), np.float16) for _ in range(sets)]
        copies = [(mc.DeviceBuffer(bytes_moved // 2), mc.DeviceBuffer(bytes_moved // 2)) for _ in range(sets)]
        stream.synchronize()
        semantics = medge.Image.from_array(host[0]).semantics
        out_params = _output_params(_C, spec)
        launches = []
        for pixels, out in zip(inputs, outputs):
            params = []
            for i in range(batch):
                p = _frame_params(_C, semantics, 0, spec, f"image {i}")
                p.pixels_address = pixels.ptr + i * in_size * in_size * 2
                p.height = p.width = p.row_stride = in_size
                p.pixel_type = _C.PixelType.int16
                p.buffer_bytes = in_size * in_size * 2
                params.append(p)
            launches.append((params, out.ptr, out.nbytes))
        start = mc.check(rt.cudaEventCreate())
        stop = mc.check(rt.cudaEventCreate())

        def timed_direct(enqueue) -> tuple[float, float]:
            for i in range(warmup):
                enqueue(i)
            stream.synchronize()
            mc.check(rt.cudaEventRecord(start, stream.handle))
            host_started = _time.perf_counter()
            for i in range(repeat):
                enqueue(i)
            host_ms = (_time.perf_counter() - host_started) * 1e3 / repeat
            mc.check(rt.cudaEventRecord(stop, stream.handle))
            mc.check(rt.cudaEventSynchronize(stop))
            return mc.check(rt.cudaEventElapsedTime(start, stop)) / repeat, host_ms

        def timed(enqueue) -> tuple[float, float, str]:
            """(GPU ms per enqueue, host ms per enqueue, how): a CUDA graph of one enqueue per set, replayed."""
            for i in range(warmup):
                enqueue(i)  # also fills medge's per-device caches (occupancy) outside the capture
            stream.synchronize()
            try:
                mc.check(rt.cudaStreamBeginCapture(stream.handle,
                                                   rt.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed))
                try:
                    for i in range(sets):
                        enqueue(i)
                finally:
                    graph = mc.check(rt.cudaStreamEndCapture(stream.handle))
                graph_exec = mc.check(rt.cudaGraphInstantiate(graph, 0))
            except Exception as exc:  # noqa: BLE001 - measured without a graph instead, and said so
                rt.cudaGetLastError()
                gpu_ms, host_ms = timed_direct(enqueue)
                return gpu_ms, host_ms, f"direct launches (graph capture failed: {exc})"
            replays = max(1, -(-repeat // sets))
            for _ in range(2):
                mc.check(rt.cudaGraphLaunch(graph_exec, stream.handle))
            stream.synchronize()
            rounds = []
            for _ in range(5):
                mc.check(rt.cudaEventRecord(start, stream.handle))
                host_started = _time.perf_counter()
                for _ in range(replays):
                    mc.check(rt.cudaGraphLaunch(graph_exec, stream.handle))
                host_ms = (_time.perf_counter() - host_started) * 1e3 / (replays * sets)
                mc.check(rt.cudaEventRecord(stop, stream.handle))
                mc.check(rt.cudaEventSynchronize(stop))
                rounds.append(mc.check(rt.cudaEventElapsedTime(start, stop)) / (replays * sets))
            rt.cudaGraphExecDestroy(graph_exec)
            rt.cudaGraphDestroy(graph)
            return statistics.median(rounds), host_ms, f"CUDA graph of {sets} launches, median of 5 rounds"

        kernel_ms, kernel_host_ms, kernel_how = timed(lambda i: _C.preprocess_cuda(*launches[i % sets][:3],
                                                                                   out_params, stream.handle))
        # The same kernel under the other grid rules (MEDGE_TILED_GRID, read at each launch): which one
        # the default should be is a measurement, not a guess.
        grid_rows = []
        previous = os.environ.get("MEDGE_TILED_GRID")
        for mode in ("balanced", "tiles"):
            os.environ["MEDGE_TILED_GRID"] = mode
            try:
                ms, _, how = timed(lambda i: _C.preprocess_cuda(*launches[i % sets][:3], out_params, stream.handle))
            finally:
                if previous is None:
                    os.environ.pop("MEDGE_TILED_GRID", None)
                else:
                    os.environ["MEDGE_TILED_GRID"] = previous
            grid_rows.append((mode, ms, how))
        copy_ms, _, copy_how = timed(lambda i: mc.check(rt.cudaMemcpyAsync(
            copies[i % sets][1].ptr, copies[i % sets][0].ptr, bytes_moved // 2,
            rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle)))
        api_ms, _ = median_ms(lambda: medge.preprocess(inputs[0], spec, device="cuda", out=outputs[0]),
                              max(10, repeat // 5), warmup)
        torch_row = torch_chain_row(inputs, outputs, spec, sets, repeat, warmup, stream, rt, mc)
        mc.check(rt.cudaEventDestroy(start))
        mc.check(rt.cudaEventDestroy(stop))
    kernel_gbs = bytes_moved / kernel_ms / 1e6
    copy_gbs = bytes_moved / copy_ms / 1e6  # the copy reads and writes bytes_moved / 2 each
    host_bound = kernel_host_ms > 0.8 * kernel_ms and kernel_how.startswith("direct")
    rows = [
        {"name": f"medge CUDA kernel, batch {batch} {in_size}->{out_size} fp16"
                 + (" (HOST-BOUND: enqueue time ~ GPU time)" if host_bound else ""),
         "median_ms": kernel_ms, "gb_per_s": kernel_gbs, "fraction_of_copy": kernel_gbs / copy_gbs,
         "host_enqueue_ms": kernel_host_ms, "rotating_sets": sets, "l2_bytes": l2_bytes, "timing": kernel_how},
        {"name": f"device-to-device copy of the same {bytes_moved / 1e6:.1f} MB (read + written)",
         "median_ms": copy_ms, "gb_per_s": copy_gbs, "fraction_of_copy": 1.0, "timing": copy_how},
        {"name": f"medge.preprocess() end to end on device arrays, batch {batch} (API latency, host included)",
         "median_ms": api_ms, "gb_per_s": bytes_moved / api_ms / 1e6, "fraction_of_copy": None},
    ]
    for mode, ms, how in grid_rows:
        rows.append({"name": f"same kernel, MEDGE_TILED_GRID={mode}", "median_ms": ms,
                     "gb_per_s": bytes_moved / ms / 1e6, "fraction_of_copy": bytes_moved / ms / 1e6 / copy_gbs,
                     "timing": how})
    if torch_row is not None:
        torch_row["gb_per_s"] = bytes_moved / torch_row["median_ms"] / 1e6
        torch_row["fraction_of_copy"] = torch_row["gb_per_s"] / copy_gbs
        torch_row["speedup_of_medge"] = torch_row["median_ms"] / kernel_ms
        rows.append(torch_row)
    return rows


def torch_chain_row(inputs, outputs, spec, sets, repeat, warmup, stream, rt, mc):
    """The same maths as a chain of PyTorch GPU ops (what users write), timed like the kernel; None without
    a CUDA build of torch. Checks that it agrees with medge's output first."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    center, width = spec.window
    mean, std = float(spec.mean[0]), float(spec.std[0])
    height, width_out = spec.height, spec.width
    xs = [torch.from_dlpack(a) for a in inputs]  # zero-copy views of medge's device arrays
    torch_stream = torch.cuda.ExternalStream(stream.handle)

    def chain(x):
        y = ((x.float() - (center - 0.5)) / (width - 1) + 0.5).clamp_(0.0, 1.0)  # LINEAR window
        y = F.interpolate(y[:, None], size=(height, width_out), mode="bilinear", antialias=True, align_corners=False)
        return ((y - mean) / std).half()

    with torch.cuda.stream(torch_stream):
        reference = torch.from_dlpack(outputs[0]).float()  # medge's output of inputs[0] (written above)
        theirs = chain(xs[0]).float()
        torch_stream.synchronize()
        max_diff = float((reference - theirs).abs().max())
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for i in range(warmup):
            chain(xs[i % sets])
        start.record(torch_stream)
        for i in range(repeat):
            chain(xs[i % sets])
        stop.record(torch_stream)
        stop.synchronize()
    return {"name": f"PyTorch {torch.__version__} GPU op chain, same maths (float, clamp, interpolate antialias, "
                    "normalise, half)", "median_ms": start.elapsed_time(stop) / repeat, "max_abs_diff": max_diff}


# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="input slice size (square)")
    parser.add_argument("--out-size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="medge CPU threads (0 = all cores)")
    parser.add_argument("--gpu-batch", type=int, default=64)
    parser.add_argument("--gpu-size", type=int, default=256)
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write the table as Markdown here")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU rows (needs no pydicom / Pillow)")
    args = parser.parse_args(argv)
    if args.gpu_only:
        return gpu_only(args)

    import pydicom

    import medge
    from medge.synthetic import ct_slice

    datasets = [ct_slice(seed=i, size=args.size, lesion=i % 2 == 0) for i in range(args.batch)]
    images = [medge.read_dicom(ds) for ds in datasets]
    arrays = [ds.pixel_array for ds in datasets]  # decoded once, outside every timing
    window = images[0].semantics.windows[0]
    slope, intercept = images[0].semantics.rescale_slope, images[0].semantics.rescale_intercept
    spec = medge.PreprocessSpec(args.out_size, args.out_size, voi="dicom", resample="bilinear_antialias",
                                dtype="float16")
    out = np.empty((args.batch, 1, args.out_size, args.out_size), np.float16)

    rows = []
    medge_ms, _ = median_ms(lambda: medge.preprocess(images, spec, out=out, num_threads=args.threads),
                            args.repeat, args.warmup)
    reference = medge.preprocess(images, spec).astype(np.float64)
    rows.append({"name": "medge C++ (fused, multi-threaded)", "median_ms": medge_ms, "max_abs_diff": 0.0})

    numpy_run = make_numpy_baseline(arrays, slope, intercept, window.center, window.width, args.out_size)
    numpy_ms, _ = median_ms(numpy_run, max(5, args.repeat // 5), 1)
    rows.append({"name": "(a) numpy, same maths vectorised", "median_ms": numpy_ms,
                 "max_abs_diff": float(np.abs(numpy_run().astype(np.float64) - reference).max())})

    try:
        pil_run = make_pydicom_pil_baseline(datasets, arrays, args.out_size)
    except ImportError as exc:
        print(f"skipping (b): {exc}; install it with: pip install pillow", file=sys.stderr)
    else:
        pil_ms, _ = median_ms(pil_run, max(5, args.repeat // 5), 1)
        rows.append({"name": "(b) pydicom apply_modality_lut + apply_voi_lut + PIL resize", "median_ms": pil_ms,
                     "max_abs_diff": float(np.abs(pil_run().astype(np.float64) - reference).max())})
    for row in rows:
        row["speedup_of_medge"] = row["median_ms"] / medge_ms

    gpu = []
    if medge.cuda_available():
        gpu = gpu_rows(args.gpu_batch, args.size, args.gpu_size, args.repeat, args.warmup)
        gpu += gpu_rows(args.batch, args.size, args.out_size, args.repeat, args.warmup)
    gpu_note = "" if gpu else "no CUDA device here (medge.cuda_available() is False): GPU rows not measured"

    from medge import _C

    result = {
        "workload": f"batch {args.batch} of {args.size}x{args.size} int16 CT -> {args.batch}x1x{args.out_size}x"
                    f"{args.out_size} float16, window 40/400 LINEAR, antialiased bilinear",
        "machine": machine_name(),
        "cpu_kernel_variant": _C.cpu_kernel_variant(),
        "versions": {"medge": medge.__version__, "numpy": np.__version__, "pydicom": pydicom.__version__,
                     "python": platform.python_version(), "cuda_architectures": _C.cuda_architectures()},
        "medge_threads": args.threads or os.cpu_count(),
        "repeat": args.repeat,
        "cpu": rows,
        "gpu": gpu,
        "gpu_note": gpu_note,
    }

    lines = [f"Workload: {result['workload']}", f"Machine: {result['machine']}; medge CPU code path: {result['cpu_kernel_variant']}, "
             f"{result['medge_threads']} threads", "",
             "| CPU path | median ms | medge speed-up | max abs diff vs medge |", "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['median_ms']:.2f} | {row['speedup_of_medge']:.1f}x | "
                     f"{row['max_abs_diff']:.2g} |")
    if gpu:
        lines += ["", "| GPU path | median ms | effective GB/s (read + written) | fraction of copy |",
                  "|---|---:|---:|---:|"]
        for row in gpu:
            fraction = "-" if row["fraction_of_copy"] is None else f"{row['fraction_of_copy']:.0%}"
            lines.append(f"| {row['name']} | {row['median_ms']:.4f} | {row['gb_per_s']:.0f} | {fraction} |")
    else:
        lines += ["", f"GPU: {gpu_note}"]
    table = "\n".join(lines)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


def gpu_table(gpu: list[dict]) -> list[str]:
    lines = ["| GPU path | median ms | effective GB/s (read + written) | fraction of copy | medge speed-up |",
             "|---|---:|---:|---:|---:|"]
    for row in gpu:
        fraction = "-" if row.get("fraction_of_copy") is None else f"{row['fraction_of_copy']:.0%}"
        speedup = f"{row['speedup_of_medge']:.1f}x" if "speedup_of_medge" in row else "-"
        lines.append(f"| {row['name']} | {row['median_ms']:.4f} | {row['gb_per_s']:.0f} | {fraction} | {speedup} |")
    return lines


def gpu_only(args) -> int:
    """The GPU rows alone; exit status 1 when no CUDA device is usable (a GPU check must not pass without one)."""
    import medge
    from medge import _C

    if not medge.cuda_available():
        print(f"bench_preprocess --gpu-only: no usable CUDA device ({_C.cuda_status()})", file=sys.stderr)
        return 1
    gpu = gpu_rows(args.gpu_batch, args.size, args.gpu_size, args.repeat, args.warmup)
    kernel, copy = gpu[0], gpu[1]
    torch_row = next((r for r in gpu if r["name"].startswith("PyTorch")), None)
    targets = [f"kernel bandwidth / copy bandwidth: {kernel['fraction_of_copy']:.0%} (target >= 80%)"]
    if torch_row is not None:
        targets.append(f"kernel vs PyTorch op chain: {torch_row['speedup_of_medge']:.1f}x (target >= 10x)")
    else:
        targets.append("PyTorch op chain: not measured (no CUDA build of torch here)")
    result = {"workload": f"batch {args.gpu_batch} of {args.size}x{args.size} int16 -> {args.gpu_size}x{args.gpu_size} "
                          "float16, LINEAR window, antialiased bilinear",
              "machine": machine_name(), "cuda_architectures": _C.cuda_architectures(), "gpu": gpu,
              "targets": targets}
    table = "\n".join([f"Workload: {result['workload']}", f"Machine: {result['machine']}", ""] + gpu_table(gpu)
                      + [""] + targets)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
