#!/usr/bin/env python3
"""End-to-end latency of a bundle: medge's pipeline against what users write today, side by side.

For each backend that runs here (and its precisions) and each batch size:
- single caller: p50 / p90 / p99 / max latency and throughput after warm-up,
  from DICOM bytes in memory to scores, with the per-stage split (read +
  decode, preprocess, infer, postprocess);
- through ``medge.Batcher`` (one request per image) under a sweep of offered
  load (open-loop Poisson arrivals): achieved throughput and p50 / p99
  latency from submit to result.

Backends: every one that runs here, each on the graph ``medge.load`` picks
for it: OpenVINO when installed (the TensorRT-placed INT8 graph), ONNX
Runtime INT8 (its own placement) and FP32, and on a GPU host ``auto``
(TensorRT). Every row reads DICOMs with whatever ``medge.read_dicom`` the
checkout has (its commit is printed); a per-slice reader table compares it
with pydicom (and MONAI's LoadImage) on the same slices.

The baselines, in the same run on the same DICOMs:

- demo bundle (``BUNDLE``): pydicom ``dcmread`` + ``apply_modality_lut``,
  numpy windowing with the bundle's window,
  ``torch.nn.functional.interpolate(antialias=True)``, normalisation,
  PyTorch eager FP32 on the demo's architecture (with ``demo_model.pt`` when
  present; untrained weights time the same). DICOM bytes in memory.
- ``--densenet121 DIR``: MONAI DenseNet121 (2-D, 1 channel, 224x224; trained
  on synthetic CT and converted by ``tools/bench_cpu_inference.py``'s recipe
  into DIR, reused when there) against MONAI's chain: ``LoadImage(reader="PydicomReader")``
  + ``ScaleIntensityRange`` (the bundle's window) + ``Resize`` (224x224) +
  ``NormalizeIntensity`` (the bundle's mean / std) + PyTorch eager FP32 on
  the same module. MONAI's reader returns (columns, rows); one transpose
  view puts it in the bundle's orientation. Its resampling (area) differs
  from medge's (antialiased bilinear), so the two inputs are close, not
  equal: their top-1 agreement is printed. DICOM files on disk (page cache warm),
  since LoadImage reads paths.

Each medge row also reports its top-1 agreement with the bundle's FP32 graph
on the benchmark's slices, and the accuracy report's (validation set, worst
batch size, the engine that runs it).

Writes ``latency.json``, ``latency.md`` and PNG plots (latency distribution,
latency vs throughput) into ``--out``. Absolute times are for the machine
named in the output.

Usage: python tools/bench_latency.py BUNDLE [--out bench/results/latency_cpu_2core] [--batch 1 8]
       python tools/bench_latency.py --demo [--out ...]     # converts the demo bundle now (engine none) into --out
       python tools/bench_latency.py --densenet121 DIR [--out ...]
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

# PyTorch's OpenMP workers spin at barriers by default; on a shared machine (other processes on the cores) a
# worker that lost its core stalls the others: DenseNet121 eager at batch 8 took 5.9 s with 2 threads at load
# average 4 against 0.62 s with OMP_WAIT_POLICY=PASSIVE (0.56 s with 1 thread). A fair baseline sets it, as a
# careful user would; it must be set before torch loads. ONNX Runtime (its own pool) and OpenVINO (TBB) do not
# read it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


def reader_commit() -> str:
    """The commit of the checkout medge is imported from (+ "dirty" when medge/dicom.py differs from it)."""
    import subprocess

    import medge

    root = Path(medge.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "medge/dicom.py"]).returncode
        return head + (" (medge/dicom.py modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


def make_monai_baseline(bundle, module, threads: int):
    """MONAI LoadImage + ScaleIntensityRange + Resize + NormalizeIntensity + PyTorch eager FP32 on ``module``."""
    import torch
    from monai.transforms import Compose, LoadImage, NormalizeIntensity, Resize, ScaleIntensityRange

    from medge import PreprocessSpec

    torch.set_num_threads(threads)
    spec = PreprocessSpec.from_dict(bundle.manifest["preprocess"])
    center, width = spec.window
    chain = Compose([
        LoadImage(image_only=True, ensure_channel_first=True, reader="PydicomReader"),
        ScaleIntensityRange(a_min=center - width / 2, a_max=center + width / 2, b_min=0.0, b_max=1.0, clip=True),
        Resize(spatial_size=(spec.height, spec.width)),
        NormalizeIntensity(subtrahend=spec.mean[0], divisor=spec.std[0]),
    ])
    module = module.eval()

    def predict(batch: list) -> np.ndarray:
        # MONAI's PydicomReader gives (columns, rows): a transposed view puts it in the bundle's orientation.
        x = torch.stack([chain(str(path)).as_tensor().transpose(-1, -2) for path in batch])
        with torch.inference_mode():
            return torch.softmax(module(x), dim=1).numpy()

    return predict


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
             f"{result['seconds']} s per pipeline in {result['rounds']} interleaved rounds after warm-up; "
             f"medge.read_dicom of commit {result.get('reader_commit', 'unknown')}; load average (1 min) "
             + " -> ".join(f"{v:.1f}" for v in result.get("load_average", [])) + " over the timed rounds",
             f"Versions: {result.get('versions', '-')}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
             "(PyTorch's OpenMP workers)",
             f"medge.load(device='cpu') chooses: {result.get('auto_cpu', '-')}", "",
             "| pipeline | batch | p50 ms | p90 ms | p99 ms | max ms | images/s | read ms | preprocess ms | infer ms | "
             "postprocess ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["single_caller"]:
        lat, st = row["latency_ms"], row.get("stages_ms_median", {})
        stage = [f"{st[k]:.2f}" if k in st else "-" for k in ("read", "preprocess", "infer", "postprocess")]
        lines.append(f"| {row['name']} | {row['batch']} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | "
                     f"{lat['max']:.2f} | {row['throughput_images_per_s']:.0f} | " + " | ".join(stage) + " |")
    for target in result["targets"]:
        lines.append(f"\n{target}")
    if result.get("agreement"):
        lines += ["", "Top-1 agreement with the bundle's FP32 graph:", "",
                  "| pipeline | on these slices | accuracy report (validation set, worst batch, same engine) |",
                  "|---|---:|---:|"]
        for a in result["agreement"]:
            report = "-" if a["top1_vs_fp32_report"] is None else f"{a['top1_vs_fp32_report']:.2%}"
            lines.append(f"| {a['name']} | {a['top1_vs_fp32_here']:.2%} ({a['images']}) | {report} |")
    if result.get("readers"):
        lines += ["", "DICOM read per slice (same slices, interleaved rounds, medians):", "",
                  "| reader | ms per slice |", "|---|---:|"]
        lines += [f"| {r['reader']} | {r['ms_per_slice']:.3f} |" for r in result["readers"]]
    for series in result["batcher"]:
        lines += ["", f"Batcher, {series['name']} (max batch {series['max_batch']}, max delay 2 ms):", "",
                  "| offered images/s | achieved images/s | p50 ms | p99 ms | batch sizes |", "|---:|---:|---:|---:|---|"]
        for p in series["points"]:
            hist = ", ".join(f"{k}:{v}" for k, v in sorted(p["batch_size_histogram"].items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {p['offered_images_per_s']:.0f} | {p['achieved_images_per_s']:.0f} | "
                         f"{p['latency_ms']['p50']:.2f} | {p['latency_ms']['p99']:.2f} | {hist} |")
    return "\n".join(lines)


def versions() -> str:
    """The versions of what the rows run, for the table (installed packages only)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("medge", "onnxruntime", "openvino", "torch", "monai", "pydicom", "numpy"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def reader_table(data: list, monai: bool, rounds: int = 5) -> list[dict]:
    """Median ms per slice of each DICOM reader on the same slices, in interleaved rounds."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    import medge

    def as_source(item):
        return io.BytesIO(item) if isinstance(item, bytes) else item

    readers = {
        "medge.read_dicom": lambda item: medge.read_dicom(item),
        "pydicom dcmread + pixel_array + apply_modality_lut":
            lambda item: apply_modality_lut((ds := pydicom.dcmread(as_source(item))).pixel_array, ds),
    }
    if monai:
        from monai.transforms import LoadImage

        load = LoadImage(image_only=True, ensure_channel_first=True, reader="PydicomReader")
        readers["MONAI LoadImage (PydicomReader)"] = lambda item: load(str(item))
    samples: dict = {name: [] for name in readers}
    for name, read in readers.items():
        read(data[0])
    for _ in range(rounds):
        for name, read in readers.items():
            started = time.perf_counter()
            for item in data:
                read(item)
            samples[name].append((time.perf_counter() - started) * 1e3 / len(data))
    return [{"reader": name, "ms_per_slice": statistics.median(s)} for name, s in samples.items()]


def report_agreement(bundle, graph: str, engine: str):
    """The accuracy report's worst top-1 agreement of ``graph`` on ``engine`` ("onnxruntime" / "openvino")."""
    rows = [r for r in (bundle.manifest.get("accuracy") or {}).get("results") or []
            if r.get("precision") == graph and r.get("measured") and r.get("top1_agreement") is not None
            and (r.get("executed_by") or "onnxruntime CPU").split(" ")[0] == engine]
    return min((r["top1_agreement"] for r in rows), default=None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, nargs="?", help="a demo bundle (medge-convert --demo)")
    parser.add_argument("--densenet121", type=Path, metavar="DIR",
                        help="benchmark MONAI DenseNet121 against MONAI's chain instead (bundle made in DIR)")
    parser.add_argument("--demo", action="store_true",
                        help="convert the demo model now (medge-convert --demo --engine none) into --out and use it")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per pipeline (all rounds)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved measurement rounds")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--images", type=int, default=64, help="distinct DICOM slices cycled through")
    parser.add_argument("--no-batcher", action="store_true")
    args = parser.parse_args(argv)

    import importlib.util

    import medge

    if sum((args.bundle is not None, args.densenet121 is not None, args.demo)) != 1:
        parser.error("give one of: a demo BUNDLE, --demo, --densenet121 DIR")
    threads = args.threads or os.cpu_count()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.demo:  # converted every time, so a retrained demo model is what gets measured
        from medge.convert.demo import convert_demo

        args.bundle = convert_demo(args.out / "demo.medge", engine="none", overwrite=True,
                                   log=lambda line: print(line, file=sys.stderr)).bundle_path
    module, trained = None, True
    if args.densenet121 is not None:
        from bench_cpu_inference import densenet121_bundle  # tools/ (a script's folder is on sys.path)

        from medge import demo

        args.bundle, module = densenet121_bundle(args.densenet121, log=lambda line: print(line, file=sys.stderr))
        # MONAI's LoadImage reads paths: every pipeline reads the same files (page cache warm after warm-up).
        data, _ = demo.write_demo_dicoms(args.densenet121 / "bench_dicoms", "validation", args.images)
        data = [str(f) for f in data]
    else:
        data = dicom_bytes(args.images)
    # INT8 rows run even where the graph failed its accuracy gates (allow_failed_gates), flagged in their name:
    # how fast INT8 would be is part of the answer, whether it may be used is the report's.
    configs = [("onnxruntime", "int8"), ("onnxruntime", "fp32")]
    if importlib.util.find_spec("openvino") is not None:
        configs = [("openvino", "int8")] + configs
    if medge.cuda_available():
        configs = [("auto", None)] + configs
    result = {"bundle": str(args.bundle), "machine": machine_name(), "threads": threads, "seconds": args.seconds,
              "rounds": args.rounds, "reader_commit": reader_commit(), "single_caller": [], "batcher": [],
              "targets": [], "agreement": [], "readers": [], "versions": versions()}
    with medge.load(args.bundle, device="cpu", threads=threads) as chosen:
        result["auto_cpu"] = str(chosen.backend)
    models, pipelines = [], []
    for backend, precision in configs:
        try:
            model = medge.load(args.bundle, backend=backend, precision=precision, threads=threads,
                               allow_failed_gates=precision == "int8")
        except medge.MedgeError as exc:
            print(f"skipping {backend}/{precision}: {exc}", file=sys.stderr)
            continue
        models.append(model)
        verdict = ((model.manifest["gates"].get("verdicts") or {}).get(model.backend.graph) or {}).get("verdict")
        model.bench_name = f"medge {model.backend.name} {model.backend.graph}" + (
            " (failed its gates)" if verdict == "failed" else "")
        pipelines += [Pipeline(model.bench_name, b, data, medge_runner(model)) for b in args.batch
                      if b <= model.max_batch]
    if module is not None:
        predict = make_monai_baseline(models[0].bundle, module, threads)
        baseline_name = ("baseline: MONAI LoadImage + ScaleIntensityRange + Resize + NormalizeIntensity + "
                         "PyTorch eager FP32")
    else:
        predict, trained = make_baseline(models[0].bundle, threads)
        baseline_name = ("baseline: pydicom + numpy + torch interpolate + PyTorch eager FP32"
                         + ("" if trained else " (untrained weights)"))

    # Agreement on the benchmark's own slices, against the bundle's FP32 graph (ONNX Runtime), before timing.
    fp32 = next((m for m in models if m.backend.name == "onnxruntime" and m.backend.graph == "fp32"), None)
    if fp32 is not None:
        reference = np.array([p.index for p in fp32.predict_batch(data)])
        for model in models:
            ours = np.array([p.index for p in model.predict_batch(data)])
            result["agreement"].append({
                "name": model.bench_name, "images": len(data),
                "top1_vs_fp32_here": float((ours == reference).mean()),
                "top1_vs_fp32_report": report_agreement(model.bundle, model.backend.graph, model.backend.name)})
        if module is not None or trained:  # untrained demo weights compute another function: nothing to compare
            theirs = np.concatenate([predict(data[i : i + 8]) for i in range(0, len(data), 8)]).argmax(1)
            result["agreement"].append({"name": baseline_name, "images": len(data),
                                        "top1_vs_fp32_here": float((theirs == reference).mean()),
                                        "top1_vs_fp32_report": None})
    result["readers"] = reader_table(data, monai=module is not None)

    def baseline_run(items):
        predict(items)  # no per-stage timings: the baseline is one block of user code

    pipelines += [Pipeline(baseline_name, b, data, baseline_run) for b in args.batch]

    # Warm every pipeline (and the process: allocator, caches, thread pools) before measuring anything,
    # then measure in interleaved rounds, so slow drift of a shared machine hits every pipeline alike.
    for pipeline in pipelines:
        for _ in range(args.warmup):
            pipeline.run(pipeline.batches[0])
    result["load_average"] = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for pipeline in pipelines:
            pipeline.measure_for(args.seconds / args.rounds)
    result["load_average"].append(os.getloadavg()[0])
    for pipeline in pipelines:
        row = pipeline.row()
        result["single_caller"].append(row)
        print(f"{row['name']} batch {row['batch']}: p50 {row['latency_ms']['p50']:.2f} ms, "
              f"{row['throughput_images_per_s']:.0f} images/s", file=sys.stderr)
    if not args.no_batcher:
        for model in models:
            name = model.bench_name
            capacity = max(r["throughput_images_per_s"] for r in result["single_caller"] if r["name"] == name)
            result["batcher"].append({"name": name, "max_batch": model.max_batch,
                                      "points": batcher_sweep(model, data, model.max_batch, capacity,
                                                              args.seconds / 2)})
    for model in models:
        model.close()

    def find(name, batch):
        return next((r for r in result["single_caller"] if (r["name"] == name or name == "baseline"
                                                            and r["name"].startswith("baseline")) and r["batch"] == batch),
                    None)

    target = 3 if module is not None else 6  # issue 13: DenseNet121 vs MONAI >= 3x; demo vs pydicom >= 6x
    names = list(dict.fromkeys(r["name"] for r in result["single_caller"] if r["name"].startswith("medge ")))
    for name in names:
        for batch, what in ((8, "throughput"), (1, "p50")):
            ours, base = find(name, batch), find("baseline", batch)
            if not (ours and base):
                continue
            if what == "throughput":
                ratio = ours["throughput_images_per_s"] / base["throughput_images_per_s"]
                # Throughput counts every stall; a shared machine stalls PyTorch's OpenMP workers far more than
                # medge's (seen: baseline p90 15x its p50). The ratio of medians is the steadier figure; both
                # are printed, and the target is judged on the smaller.
                median_ratio = base["latency_ms"]["p50"] / ours["latency_ms"]["p50"]
                verdict = "met" if min(ratio, median_ratio) >= target else "NOT met"
                result["targets"].append(f"Throughput at batch 8, {name} vs baseline: {ratio:.2f}x; ratio of "
                                         f"median batch times {median_ratio:.2f}x (target >= {target}x: {verdict})")
            else:
                ratio = base["latency_ms"]["p50"] / ours["latency_ms"]["p50"]
                result["targets"].append(f"p50 at batch 1, baseline / {name}: {ratio:.2f}x lower")
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
