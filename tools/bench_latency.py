#!/usr/bin/env python3
"""End-to-end latency of a bundle: medge's pipeline against what users write today, side by side.

For each backend that runs here (and its precisions) and each batch size:
- single caller: p50 / p90 / p99 / max latency and throughput after warm-up,
  from DICOM bytes in memory to scores, with the per-stage split (read +
  decode, preprocess, infer, postprocess);
- through ``medge.Batcher`` (one request per image) under a sweep of offered
  load (open-loop Poisson arrivals): achieved throughput and p50 / p99
  latency from submit to result.

The baseline, in the same run on the same DICOM bytes: pydicom
``dcmread`` + ``apply_modality_lut``, numpy windowing with the bundle's
window, ``torch.nn.functional.interpolate(antialias=True)``, normalisation,
PyTorch eager FP32. It runs the bundle's own architecture when it is the
demo model (with ``demo_model.pt`` when present; untrained weights time the
same).

Writes ``latency.json``, ``latency.md`` and PNG plots (latency distribution,
latency vs throughput) into ``--out``. Absolute times are for the machine
named in the output. On a GPU host, TensorRT backends appear as well.

Usage: python tools/bench_latency.py BUNDLE [--out bench/results/latency_cpu_2core] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from _machine import machine_name  # tools/_machine.py (a script's folder is on sys.path)


def percentiles(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "n": int(a.size)}


def dicom_bytes(count: int, kind: str = "validation") -> list[bytes]:
    import tempfile

    from medge import demo

    with tempfile.TemporaryDirectory() as tmp:
        files, _ = demo.write_demo_dicoms(tmp, kind, count)
        return [f.read_bytes() for f in files]


# ---------------------------------------------------------------------------- medge


class Pipeline:
    """One measured pipeline at one batch size: predict(batch_of_bytes) -> per-stage timings or None."""

    def __init__(self, name: str, batch: int, data: list[bytes], run) -> None:
        self.name, self.batch, self.run = name, batch, run
        self.batches = [data[i : i + batch] for i in range(0, len(data) - batch + 1, batch)] or [data[:batch]]
        self.latencies: list[float] = []
        self.stages: dict[str, list[float]] = {}
        self.busy_s = 0.0
        self._next = 0

    def measure_for(self, seconds: float) -> None:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            items = self.batches[self._next % len(self.batches)]
            self._next += 1
            t0 = time.perf_counter()
            stages = self.run(items)
            self.latencies.append((time.perf_counter() - t0) * 1e3)
            for key, value in (stages or {}).items():
                self.stages.setdefault(key, []).append(value)
        self.busy_s += time.perf_counter() - started

    def row(self) -> dict:
        return {"name": self.name, "batch": self.batch, "latency_ms": percentiles(self.latencies),
                "throughput_images_per_s": len(self.latencies) * self.batch / self.busy_s,
                "stages_ms_median": {k: statistics.median(v) for k, v in self.stages.items()},
                "samples": self.latencies}


def medge_runner(model):
    def run(items):
        predictions = model.predict_batch(items)
        t = predictions[0].timings_ms
        return {"read": sum(p.timings_ms["read"] for p in predictions), "preprocess": t["preprocess"],
                "infer": t["infer"], "postprocess": t["postprocess"]}

    return run


def batcher_sweep(model, data: list[bytes], max_batch: int, capacity: float, seconds: float) -> list[dict]:
    """Open-loop Poisson load at fractions of ``capacity`` (images/s), one request per image."""
    import medge

    points = []
    for fraction in (0.25, 0.5, 0.75, 0.9, 1.0, 1.2):
        rate = capacity * fraction
        rng = random.Random(1234)
        latencies: list[float] = []
        lock = threading.Lock()
        with medge.Batcher(model, max_batch=max_batch, max_delay_ms=2.0, max_queue=100_000) as batcher:
            # Warm the batcher's path.
            for f in [batcher.submit(d) for d in data[:max_batch]]:
                f.result()
            futures = []
            started = time.perf_counter()
            next_at = started
            k = 0
            while next_at - started < seconds:
                now = time.perf_counter()
                if now < next_at:
                    time.sleep(min(next_at - now, 0.002))
                    continue
                t_submit = time.perf_counter()
                future = batcher.submit(data[k % len(data)])

                def done(f, t_submit=t_submit):
                    with lock:
                        latencies.append((time.perf_counter() - t_submit) * 1e3)

                future.add_done_callback(done)
                futures.append(future)
                k += 1
                next_at += rng.expovariate(rate)
            for f in futures:
                f.exception()
            elapsed = time.perf_counter() - started
            stats = batcher.stats()
        points.append({"offered_images_per_s": rate, "achieved_images_per_s": len(futures) / elapsed,
                       "latency_ms": percentiles(latencies),
                       "batch_size_histogram": {str(k): v for k, v in stats.batch_sizes.items()}})
    return points


# ---------------------------------------------------------------------------- baseline


def make_baseline(bundle, threads: int):
    """pydicom + numpy + torch interpolate + PyTorch eager FP32, with the bundle's preprocessing parameters."""
    import pydicom
    import torch
    import torch.nn.functional as F
    from pydicom.pixels import apply_modality_lut

    from medge import PreprocessSpec, demo

    torch.set_num_threads(threads)
    spec = PreprocessSpec.from_dict(bundle.manifest["preprocess"])
    if spec.voi != "window":
        raise SystemExit("the baseline reproduces fixed-window specs (the demo's); this bundle's spec differs")
    center, width = spec.window
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    if bundle.manifest["model"]["name"] != demo.DEMO_MODEL_NAME:
        raise SystemExit("the PyTorch baseline needs the model's class: only the demo bundle is supported")
    from medge.demo.model import DemoLesionNet

    model = DemoLesionNet().eval()
    weights = demo.demo_dir() / "demo_model.pt"
    trained = weights.exists()
    if trained:
        model.load_state_dict(torch.load(weights, weights_only=True))

    def predict(batch: list[bytes]) -> np.ndarray:
        images = []
        for data in batch:
            ds = pydicom.dcmread(io.BytesIO(data))
            hu = apply_modality_lut(ds.pixel_array, ds)
            y = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)  # DICOM LINEAR window
            images.append(y.astype(np.float32))
        x = torch.from_numpy(np.stack(images))[:, None]
        x = F.interpolate(x, size=(spec.height, spec.width), mode="bilinear", antialias=True, align_corners=False)
        x = (x - mean) / std
        with torch.inference_mode():
            return torch.softmax(model(x), dim=1).numpy()

    return predict, trained


# ---------------------------------------------------------------------------- report


def plots(result: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('no plots: matplotlib is not installed (pip install "medge[bench]")', file=sys.stderr)
        return []
    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in result["single_caller"]:
        samples = np.sort(row["samples"])
        ax.plot(samples, np.linspace(0, 1, len(samples)), label=f"{row['name']} (batch {row['batch']})")
    ax.set_xscale("log")
    ax.set_xlabel("latency per call (ms, log scale)")
    ax.set_ylabel("fraction of calls")
    ax.set_title(f"Latency distribution, single caller\n{result['machine']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_distribution.png", dpi=120)
    written.append("latency_distribution.png")
    plt.close(fig)
    if result["batcher"]:
        fig, ax = plt.subplots(figsize=(8, 5))
        for series in result["batcher"]:
            x = [p["achieved_images_per_s"] for p in series["points"]]
            ax.plot(x, [p["latency_ms"]["p50"] for p in series["points"]], "o-", label=f"{series['name']} p50")
            ax.plot(x, [p["latency_ms"]["p99"] for p in series["points"]], "s--", label=f"{series['name']} p99")
        ax.set_yscale("log")
        ax.set_xlabel("achieved throughput (images/s)")
        ax.set_ylabel("latency submit -> result (ms, log scale)")
        ax.set_title(f"medge.Batcher: latency vs throughput (offered load 25%..120% of capacity)\n{result['machine']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "latency_vs_throughput.png", dpi=120)
        written.append("latency_vs_throughput.png")
        plt.close(fig)
    return written


def markdown(result: dict) -> str:
    lines = [f"Bundle: {result['bundle']}; machine: {result['machine']}; {result['threads']} threads; "
             f"{result['seconds']} s per pipeline in {result['rounds']} interleaved rounds after warm-up", "",
             "| pipeline | batch | p50 ms | p90 ms | p99 ms | max ms | images/s | read ms | preprocess ms | infer ms | "
             "postprocess ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["single_caller"]:
        lat, st = row["latency_ms"], row.get("stages_ms_median", {})
        stage = [f"{st[k]:.2f}" if k in st else "-" for k in ("read", "preprocess", "infer", "postprocess")]
        lines.append(f"| {row['name']} | {row['batch']} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | "
                     f"{lat['max']:.2f} | {row['throughput_images_per_s']:.0f} | " + " | ".join(stage) + " |")
    for target in result["targets"]:
        lines.append(f"\n{target}")
    for series in result["batcher"]:
        lines += ["", f"Batcher, {series['name']} (max batch {series['max_batch']}, max delay 2 ms):", "",
                  "| offered images/s | achieved images/s | p50 ms | p99 ms | batch sizes |", "|---:|---:|---:|---:|---|"]
        for p in series["points"]:
            hist = ", ".join(f"{k}:{v}" for k, v in sorted(p["batch_size_histogram"].items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {p['offered_images_per_s']:.0f} | {p['achieved_images_per_s']:.0f} | "
                         f"{p['latency_ms']['p50']:.2f} | {p['latency_ms']['p99']:.2f} | {hist} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per pipeline (all rounds)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved measurement rounds")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--images", type=int, default=64, help="distinct DICOM slices cycled through")
    parser.add_argument("--no-batcher", action="store_true")
    args = parser.parse_args(argv)

    import medge

    threads = args.threads or os.cpu_count()
    args.out.mkdir(parents=True, exist_ok=True)
    data = dicom_bytes(args.images)
    configs = [("onnxruntime", "int8"), ("onnxruntime", "fp32")]
    if medge.cuda_available():
        configs = [("auto", None)] + configs
    result = {"bundle": str(args.bundle), "machine": machine_name(), "threads": threads, "seconds": args.seconds,
              "rounds": args.rounds, "single_caller": [], "batcher": [], "targets": []}
    models, pipelines = [], []
    for backend, precision in configs:
        try:
            model = medge.load(args.bundle, backend=backend, precision=precision, threads=threads)
        except medge.MedgeError as exc:
            print(f"skipping {backend}/{precision}: {exc}", file=sys.stderr)
            continue
        models.append(model)
        name = f"medge {model.backend.name} {model.backend.graph}"
        pipelines += [Pipeline(name, b, data, medge_runner(model)) for b in args.batch if b <= model.max_batch]
    predict, trained = make_baseline(models[0].bundle, threads)
    baseline_name = ("baseline: pydicom + numpy + torch interpolate + PyTorch eager FP32"
                     + ("" if trained else " (untrained weights)"))
    def baseline_run(items):
        predict(items)  # no per-stage timings: the baseline is one block of user code

    pipelines += [Pipeline(baseline_name, b, data, baseline_run) for b in args.batch]

    # Warm every pipeline (and the process: allocator, caches, thread pools) before measuring anything,
    # then measure in interleaved rounds, so slow drift of a shared machine hits every pipeline alike.
    for pipeline in pipelines:
        for _ in range(args.warmup):
            pipeline.run(pipeline.batches[0])
    for _ in range(args.rounds):
        for pipeline in pipelines:
            pipeline.measure_for(args.seconds / args.rounds)
    for pipeline in pipelines:
        row = pipeline.row()
        result["single_caller"].append(row)
        print(f"{row['name']} batch {row['batch']}: p50 {row['latency_ms']['p50']:.2f} ms, "
              f"{row['throughput_images_per_s']:.0f} images/s", file=sys.stderr)
    if not args.no_batcher:
        for model in models:
            name = f"medge {model.backend.name} {model.backend.graph}"
            capacity = max(r["throughput_images_per_s"] for r in result["single_caller"] if r["name"] == name)
            result["batcher"].append({"name": name, "max_batch": model.max_batch,
                                      "points": batcher_sweep(model, data, model.max_batch, capacity,
                                                              args.seconds / 2)})
    for model in models:
        model.close()

    def find(prefix, batch):
        return next((r for r in result["single_caller"] if r["name"].startswith(prefix) and r["batch"] == batch), None)

    medge_int8 = "medge onnxruntime int8-ort"
    for batch, what in ((8, "throughput"), (1, "p50")):
        ours, base = find(medge_int8, batch), find("baseline", batch)
        if ours and base:
            if what == "throughput":
                ratio = ours["throughput_images_per_s"] / base["throughput_images_per_s"]
                result["targets"].append(f"Throughput at batch 8, medge ONNX Runtime INT8 vs baseline: {ratio:.2f}x "
                                         "(target >= 3x)")
            else:
                ratio = base["latency_ms"]["p50"] / ours["latency_ms"]["p50"]
                result["targets"].append(f"p50 at batch 1, baseline / medge ONNX Runtime INT8: {ratio:.2f}x lower "
                                         "(target >= 2x)")
    result["plots"] = plots(result, args.out)
    table = markdown(result)
    print(table)
    for row in result["single_caller"]:
        row.pop("samples", None)
    (args.out / "latency.json").write_text(json.dumps(result, indent=2))
    (args.out / "latency.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
