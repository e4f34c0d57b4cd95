#!/usr/bin/env python3
"""CPU inference throughput of the demo model: ONNX Runtime INT8 vs FP32 graphs vs PyTorch eager.

Measured side by side in one run, at one batch size (default 8), on inputs
made by medge's own preprocessing of the demo validation DICOMs. The graphs
are those of a bundle made by ``medge-convert --demo`` (both INT8 graphs: the
TensorRT-placed one the engines are built from, and ONNX Runtime's own) (or built here when no
bundle is given). PyTorch eager runs ``medge.demo.model.DemoLesionNet``: with
``medge/demo/demo_model.pt`` present (``tools/train_demo_model.py
--pytorch-weights``) those trained weights, otherwise the same architecture
freshly initialised. That changes no timing: a CNN's cost does not depend
on its weights' values.

Usage: python tools/bench_cpu_inference.py [--bundle demo.medge] [--batch 8] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine_name  # tools/_machine.py (a script's folder is on sys.path)


def timed(fn, repeat: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="a bundle from medge-convert --demo (default: convert now)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads for both runtimes (0 = all cores)")
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
        bundle_path = args.bundle
        if bundle_path is None:
            from medge.convert.demo import convert_demo

            bundle_path = convert_demo(Path(tmp) / "demo.medge", engine="none", log=lambda _: None).bundle_path
        bundle = Bundle.open(bundle_path)
        bundle.verify()
        graphs = {p: bundle.artifact_path(g["file"]) for p, g in bundle.manifest["graphs"].items()}
        files, _ = demo.write_demo_dicoms(Path(tmp) / "val", "validation", args.batch)
        x = medge.preprocess([medge.read_dicom(f) for f in files], demo.demo_spec())

        rows = []
        labels = {"int8-ort": "INT8 graph, ONNX Runtime's Q/DQ placement", "int8": "INT8 graph, TensorRT's Q/DQ placement",
                  "fp32": "FP32 graph"}
        for precision in ("int8-ort", "int8", "fp32"):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(graphs[precision]), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            seconds = timed(lambda: session.run(None, {name: x}), args.repeat, args.warmup)
            rows.append({"name": f"ONNX Runtime CPU, {labels[precision]}", "median_ms": seconds * 1e3})

        from medge.demo.model import DemoLesionNet

        model = DemoLesionNet().eval()
        weights = demo.demo_dir() / "demo_model.pt"
        trained = weights.exists()
        if trained:
            model.load_state_dict(torch.load(weights, weights_only=True))
        tx = torch.from_numpy(x)
        with torch.inference_mode():
            seconds = timed(lambda: model(tx), args.repeat, args.warmup)
        rows.append({"name": "PyTorch eager FP32" + ("" if trained else " (same architecture, untrained weights)"),
                     "median_ms": seconds * 1e3})

    for row in rows:
        row["images_per_s"] = args.batch / (row["median_ms"] / 1e3)
    fp32 = next(r for r in rows if "FP32 graph" in r["name"])
    for row in rows:
        row["throughput_vs_ort_fp32"] = row["images_per_s"] / fp32["images_per_s"]

    lines = [f"Demo model ({bundle.manifest['model']['name']}), batch {args.batch}, {threads} threads, "
             f"ONNX Runtime {ort.__version__}, torch {torch.__version__}", f"Machine: {machine_name()}", "",
             "| runtime | median ms / batch | images/s | throughput vs ORT FP32 |", "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['median_ms']:.2f} | {row['images_per_s']:.0f} | "
                     f"{row['throughput_vs_ort_fp32']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": args.batch, "threads": threads, "machine": machine_name(),
                                               "rows": rows}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
