#!/usr/bin/env python3
"""CPU inference throughput: medge's ONNX Runtime and OpenVINO backends on every graph vs PyTorch eager.

Measured side by side in one run, at one batch size (default 8), on inputs made by medge's own preprocessing of
the demo validation DICOMs, in interleaved rounds (one call of each row per round; medians). Each row runs
through medge's own backend classes, set up as ``medge.load`` sets them up (ONNX Runtime: graph optimisations
on, workers that do not spin; OpenVINO: dynamic batch, f32 inference precision, no pinning), with the same
thread count. Per row: median ms per batch, images/s, speed relative to ONNX Runtime FP32, and top-1 agreement
and max |error| against the FP32 graph on ONNX Runtime over all the inputs.

Models (``--model``):

- ``demo``: the graphs of a bundle made by ``medge-convert --demo`` (``--bundle``, or converted now). PyTorch
  eager runs ``medge.demo.model.DemoLesionNet`` with ``medge/demo/demo_model.pt`` when present
  (``tools/train_demo_model.py --pytorch-weights``), else the same architecture untrained (a CNN's cost does not
  depend on its weights' values).
- ``densenet121``: MONAI DenseNet121 (2-D, 1 channel, 2 classes) trained on the synthetic CT lesion task
  at 128x128 (``tools/int8_cpu_study.py`` ``trained_densenet121``: deterministic, minutes of CPU, cached under
  ~/.cache/medge; 224x224 training would take 3x as long), run at ``--size`` (default 224, as the issue's
  baseline: a fully convolutional network with global pooling takes any size, and its cost is what is timed),
  converted with ``engine="none"`` into ``--work`` (reused when there) with medge-convert's defaults (gates,
  INT8 accuracy control) on the demo's calibration and validation slices. PyTorch eager runs that same module.
  Needs monai and torch.

Usage: python tools/bench_cpu_inference.py [--model demo|densenet121] [--bundle demo.medge] [--work DIR]
       [--batch 8] [--rounds 50] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
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

DENSENET_NAME = "densenet121-lesion"
DENSENET_SIZE = 224
DENSENET_TRAIN_SIZE = 128
#: Calibration images for the DenseNet bundle: ONNX Runtime's calibrator keeps every intermediate output of
#: every image in memory (DenseNet121 at 224x224: ~0.1 GB per image per graph), so 128 ran out of 23 GB.
DENSENET_CALIBRATION = 48


# ------------------------------------------------------------------------------------------------ models


def densenet_spec(size: int = DENSENET_SIZE):
    from medge import demo

    return demo.demo_spec().replace(height=size, width=size)


def densenet121_bundle(work: Path, log=print, size: int = DENSENET_SIZE):
    """(bundle path, torch module) of the trained MONAI DenseNet121, converted into ``work`` (reused when there).

    The module is rebuilt from ``work/densenet121.pt`` so PyTorch eager runs the bundle's own weights.
    """
    import torch
    from monai.networks.nets import DenseNet121

    import medge
    from medge import demo

    work = Path(work)
    bundle_path, weights = work / f"{DENSENET_NAME}.medge", work / "densenet121.pt"
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    if bundle_path.exists() and weights.exists():
        from medge.bundle import Bundle

        bundle = Bundle.open(bundle_path)
        bundle.verify()
        if bundle.manifest["preprocess"]["height"] != size:
            raise SystemExit(f"{bundle_path} takes {bundle.manifest['preprocess']['height']}x"
                             f"{bundle.manifest['preprocess']['width']} images, not {size}x{size}: use another folder")
        net.load_state_dict(torch.load(weights, weights_only=True))
        return bundle_path, net.eval()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from int8_cpu_study import trained_densenet121

    from medge.convert.pipeline import convert

    spec = densenet_spec(size)
    data = work / "data"
    calib_files, _ = demo.write_demo_dicoms(data / "calibration", "calibration", DENSENET_CALIBRATION)
    _, val_csv = demo.write_demo_dicoms(data / "validation", "validation")
    calibration = medge.preprocess([medge.read_dicom(f) for f in calib_files], spec)
    net, info = trained_densenet121(DENSENET_TRAIN_SIZE, log=log)
    log(f"DenseNet121 trained at {DENSENET_TRAIN_SIZE}x{DENSENET_TRAIN_SIZE}: held-out accuracy "
        f"{info['held_out_accuracy']:.2%} ({info['held_out_images']} slices); run at {size}x{size}")
    started = time.monotonic()
    torch.save(net.state_dict(), weights)
    convert(net, bundle_path, spec=spec, calibration=data / "calibration", validation=data / "validation",
            labels=val_csv, name=DENSENET_NAME, class_labels=list(demo.LABELS), activation="softmax",
            positive_class="lesion", example_input=calibration[:2], engine="none", overwrite=True,
            min_calibration_images=min(32, DENSENET_CALIBRATION), log=log)
    log(f"DenseNet121 bundle converted in {time.monotonic() - started:.0f} s: {bundle_path}")
    return bundle_path, net


def demo_torch_module():
    """(DemoLesionNet, trained?)."""
    import torch

    from medge import demo
    from medge.demo.model import DemoLesionNet

    model = DemoLesionNet().eval()
    weights = demo.demo_dir() / "demo_model.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model, weights.exists()


# ------------------------------------------------------------------------------------------------ running


def backends(bundle, batch: int, threads: int) -> dict:
    """label -> (medge backend, graph) for every graph on every CPU engine installed."""
    from medge.errors import BackendUnavailable
    from medge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    graphs = bundle.manifest["graphs"]
    made = {}
    for graph in graphs:
        data = bundle.read_verified(graphs[graph]["file"])
        made[f"ONNX Runtime, {graph}"] = (OnnxRuntimeBackend(data, precision=graph, max_batch=batch,
                                                             providers=["CPUExecutionProvider"], threads=threads), graph)
    if importlib.util.find_spec("openvino") is not None:
        from medge.runtime.backends.openvino import OpenVINOBackend

        for graph in graphs:
            try:
                made[f"OpenVINO, {graph}"] = (OpenVINOBackend(bundle.read_verified(graphs[graph]["file"]),
                                                              precision=graph, max_batch=batch, threads=threads), graph)
            except BackendUnavailable as exc:
                print(f"OpenVINO, {graph}: not run ({exc})", file=sys.stderr)
    return made


def run_all(backend, x: np.ndarray, batch: int) -> np.ndarray:
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        backend.load_input(chunk.astype(backend.input.dtype))
        out.append(backend.execute(len(chunk)))
    return np.concatenate(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["demo", "densenet121"], default="demo")
    parser.add_argument("--bundle", type=Path, help="demo: a bundle from medge-convert --demo (default: convert now)")
    parser.add_argument("--work", type=Path, help="densenet121: folder for its bundle and weights (reused)")
    parser.add_argument("--size", type=int, default=DENSENET_SIZE, help="densenet121: input rows = columns")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=64, help="validation slices preprocessed (agreement, inputs)")
    parser.add_argument("--rounds", type=int, default=50, help="interleaved timing rounds (one call per row each)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="threads for every engine (0 = all cores)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    import medge
    from medge import demo
    from medge.bundle import Bundle

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "demo":
            bundle_path = args.bundle
            if bundle_path is None:
                from medge.convert.demo import convert_demo

                bundle_path = convert_demo(Path(tmp) / "demo.medge", engine="none", log=lambda _: None).bundle_path
            module, trained = demo_torch_module()
            eager = "PyTorch eager FP32" + ("" if trained else " (same architecture, untrained weights)")
        else:
            bundle_path, module = densenet121_bundle(args.work or Path(tmp) / "densenet",
                                                     log=lambda line: print(line, file=sys.stderr), size=args.size)
            eager = "PyTorch eager FP32 (the same MONAI DenseNet121)"
        bundle = Bundle.open(bundle_path)
        bundle.verify()
        spec = medge.PreprocessSpec.from_dict(bundle.manifest["preprocess"])
        files, _ = demo.write_demo_dicoms(Path(tmp) / "val", "validation", max(args.images, args.batch))
        x = medge.preprocess([medge.read_dicom(f) for f in files], spec)

        made = backends(bundle, args.batch, threads)
        reference = run_all(made["ONNX Runtime, fp32"][0], x, args.batch)
        tx = torch.from_numpy(x)

        def eager_call(batch_x):
            with torch.inference_mode():
                return module(batch_x).numpy()

        calls, quality = {}, {}
        for label, (backend, graph) in made.items():
            out = run_all(backend, x, args.batch)
            quality[label] = (float((out.argmax(1) == reference.argmax(1)).mean()), float(np.abs(out - reference).max()))
            backend.load_input(x[: args.batch].astype(backend.input.dtype))
            calls[label] = (lambda b=backend: b.execute(args.batch))
        eager_out = np.concatenate([eager_call(tx[i : i + args.batch]) for i in range(0, len(x), args.batch)])
        quality[eager] = (float((eager_out.argmax(1) == reference.argmax(1)).mean()),
                          float(np.abs(eager_out - reference).max()))
        calls[eager] = lambda: eager_call(tx[: args.batch])

        for call in calls.values():
            for _ in range(args.warmup):
                call()
        samples = {label: [] for label in calls}
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for label, call in calls.items():
                started = time.perf_counter()
                call()
                samples[label].append(time.perf_counter() - started)
        load_after = os.getloadavg()
        for backend, _ in made.values():
            backend.close()

    rows = [{"name": label, "median_ms": statistics.median(s) * 1e3, "top1_vs_fp32": quality[label][0],
             "max_abs_error_vs_fp32": quality[label][1]} for label, s in samples.items()]
    for row in rows:
        row["images_per_s"] = args.batch / (row["median_ms"] / 1e3)
    base = next(r for r in rows if r["name"] == "ONNX Runtime, fp32")
    for row in rows:
        row["throughput_vs_ort_fp32"] = row["images_per_s"] / base["images_per_s"]

    versions = [f"ONNX Runtime {ort.__version__}", f"torch {torch.__version__}"]
    if importlib.util.find_spec("openvino") is not None:
        import openvino

        versions.insert(1, f"OpenVINO {openvino.get_version().split('-')[0]}")
    lines = [f"{bundle.manifest['model']['name']}, batch {args.batch}, {threads} threads, {', '.join(versions)}; "
             f"median of {args.rounds} interleaved rounds; agreement on {len(x)} validation slices",
             f"Machine: {machine_name()}; load average (1 min) {load_before[0]:.1f} before timing, "
             f"{load_after[0]:.1f} after; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (PyTorch's OpenMP)", "",
             "| engine, graph | median ms / batch | images/s | vs ORT FP32 | top-1 vs FP32 | max abs err |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['median_ms']:.2f} | {row['images_per_s']:.0f} | "
                     f"{row['throughput_vs_ort_fp32']:.2f}x | {row['top1_vs_fp32']:.2%} | "
                     f"{row['max_abs_error_vs_fp32']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "batch": args.batch, "threads": threads,
                                               "machine": machine_name(), "rounds": args.rounds, "rows": rows,
                                               "load_average": [load_before[0], load_after[0]]},
                                              indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
