#!/usr/bin/env python3
"""Throughput and latency through Triton against in-process medge, on the same DICOM files, in one run.

For 1, 8 and 32 concurrent clients (each sends one DICOM object per request
and waits for its answer, closed loop):

- Triton: the bundle exported with ``medge export-triton``, served by the
  ``tritonserver`` of nvidia-pytriton on 127.0.0.1 (python backend only, so
  the ``_medge`` ensemble: DICOM bytes -> medge preprocessing -> medge's
  runtime, with dynamic batching), one tritonclient per client thread;
- in-process: ``medge.load`` + ``medge.Batcher`` (the same max batch and a
  max delay equal to Triton's queue delay), one thread per client.

Reported per row: requests per second (median of interleaved rounds), p50
and p99 latency over every request of the rounds (from sending the bytes to
having the scores). The two run alternately, level by level, in one process,
after a warm-up of each; the 1-minute load average before and after is
printed, because a busy machine moves every number. Absolute times are for the machine named in
the output; the ratio is what carries over.

The script re-runs itself inside the Triton serving environment
(``medge.serve.triton.serving_environment``: a virtual environment with
numpy < 2, made once and cached), so the in-process side runs with the same
numpy and onnxruntime as the server.

Usage: python tools/bench_triton.py [BUNDLE] [--precision int8-ort] [--clients 1 8 32] [--requests 256]
       [--protocol http|grpc] [--out bench/results/triton_cpu_2core]
(no BUNDLE: the demo bundle is converted into a temporary folder first)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

_INNER = "MEDGE_BENCH_TRITON_INNER"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", help="bundle to serve (default: convert the demo bundle)")
    parser.add_argument("--precision", default="int8-ort", choices=["fp32", "fp16", "int8", "int8-ort"],
                        help="graph to serve (default: int8-ort, the fastest on a CPU)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=512, help="requests per level, side and round (default: 512)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; req/s is their median, p50/p99 over every request (default: 3)")
    parser.add_argument("--files", type=int, default=32, help="distinct demo DICOM files (default: 32)")
    parser.add_argument("--protocol", default="http", choices=["http", "grpc"], help="Triton client protocol")
    parser.add_argument("--queue-delay-us", type=int, default=2000,
                        help="Triton's max_queue_delay_microseconds and the Batcher's max_delay_ms (default 2000)")
    parser.add_argument("--out", help="folder for triton.json and triton.md")
    parser.add_argument("--env", help="serving environment folder (default: medge's cache)")
    return parser.parse_args(argv)


def percentile(samples, q):
    import numpy as np

    return float(np.percentile(np.asarray(samples), q))


def closed_loop(clients: int, total: int, payloads: list, make_call) -> dict:
    """``clients`` threads share ``total`` requests; each thread: call, wait, next. Returns rate and latencies."""
    latencies: list = [[] for _ in range(clients)]
    errors: list = []
    counter = iter(range(total))
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker(k: int) -> None:
        call = make_call()
        barrier.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            started = time.perf_counter()
            try:
                call(payloads[i % len(payloads)])
            except Exception as exc:  # noqa: BLE001 - reported, and the run is refused below
                errors.append(repr(exc))
                break
            latencies[k].append((time.perf_counter() - started) * 1e3)
        closer = getattr(call, "close", None)
        if closer:
            closer()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, first: {errors[0]}")
    flat = [x for per in latencies for x in per]
    return {"clients": clients, "requests": len(flat), "throughput_rps": len(flat) / wall,
            "p50_ms": percentile(flat, 50), "p99_ms": percentile(flat, 99), "latencies_ms": flat}


class _TritonCall:
    def __init__(self, url, protocol, model):
        from medge.serve.triton import TritonDicomClient

        self.client = TritonDicomClient(url, protocol)
        self.model = model

    def __call__(self, payload):
        return self.client.infer(self.model, [payload])

    def close(self):
        self.client.close()


def inner(args: argparse.Namespace) -> None:
    import medge
    from _machine import machine_name  # tools/_machine.py
    from medge.demo import write_demo_dicoms
    from medge.serve.triton import TritonServer, export_triton, serving_environment

    env = serving_environment(args.env)
    work = Path(tempfile.mkdtemp(prefix="medge-bench-triton-"))
    export = export_triton(args.bundle, work / "repo", precisions=[args.precision],
                           max_queue_delay_us=args.queue_delay_us)
    files, _ = write_demo_dicoms(work / "dicoms", "validation", args.files)
    payloads = [f.read_bytes() for f in files]
    ensemble = export.medge_ensembles[args.precision]
    precision = "int8" if args.precision.startswith("int8") else args.precision
    rows = []
    with TritonServer(export.repository, env, models=[ensemble], log_path=work / "server.log") as server, \
            medge.load(args.bundle, backend="onnxruntime", device="cpu", precision=precision) as model, \
            medge.Batcher(model, max_delay_ms=args.queue_delay_us / 1000) as batcher:
        if model.backend.graph != args.precision:
            raise SystemExit(f"medge.load chose the {model.backend.graph} graph, not {args.precision}")

        def triton_call():
            return _TritonCall(server.http_url if args.protocol == "http" else server.grpc_url, args.protocol,
                               ensemble)

        def medge_call():
            return lambda payload: batcher.submit(payload).result()

        for make in (triton_call, medge_call):  # warm-up: first loads, thread pools, caches
            closed_loop(max(args.clients), max(args.clients) * 2, payloads, make)
        sides = [("Triton (ensemble, dynamic batching)", triton_call),
                 ("medge.load + Batcher (in-process)", medge_call)]
        runs: dict = {}
        load_before = os.getloadavg()[0]
        for round_index in range(args.rounds):  # interleaved, order alternating: drift hits both sides alike
            for clients in args.clients:
                for side, make in (sides if round_index % 2 == 0 else sides[::-1]):
                    result = closed_loop(clients, args.requests, payloads, make)
                    runs.setdefault((side, clients), []).append(result)
                    print(f"round {round_index + 1}: {side:38s} {clients:3d} clients: "
                          f"{result['throughput_rps']:7.1f} req/s, p50 {result['p50_ms']:7.1f} ms, "
                          f"p99 {result['p99_ms']:7.1f} ms", flush=True)
        load_after = os.getloadavg()[0]
        for clients in args.clients:
            for side, _ in sides:
                results = runs[(side, clients)]
                latencies = [x for r in results for x in r.pop("latencies_ms")]
                rows.append({"side": side, "clients": clients, "requests": len(latencies),
                             "throughput_rps": statistics.median(r["throughput_rps"] for r in results),
                             "throughput_rps_rounds": [r["throughput_rps"] for r in results],
                             "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)})
    import numpy
    import onnxruntime

    machine = machine_name()
    header = (f"{machine}; graph {args.precision}, {args.requests} requests per row and round over {args.files} "
              f"demo CT slices (512x512), {args.protocol}; Triton 24.10 (pytriton 0.7.0 tritonserver, python backend), "
              f"max batch {model.max_batch}, queue delay {args.queue_delay_us} us; numpy {numpy.__version__}, "
              f"onnxruntime {onnxruntime.__version__}; {args.rounds} interleaved rounds (req/s: median of rounds); "
              f"1-min load average {load_before:.1f} before, {load_after:.1f} after")
    lines = [header, "", "| path | clients | req/s | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['side']} | {r['clients']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
              for r in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "triton.json").write_text(json.dumps({"machine": machine, "header": header, "rows": rows}, indent=2)
                                         + "\n")
        (out / "triton.md").write_text(table + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    if os.environ.get(_INNER):
        inner(args)
        return
    from medge.serve.triton import serving_environment

    if args.bundle is None:
        from medge.convert.demo import convert_demo

        args.bundle = str(convert_demo(Path(tempfile.mkdtemp(prefix="medge-bench-")) / "demo.medge", engine="none",
                                       log=lambda _: None).bundle_path)
    env = serving_environment(args.env, log=print)
    argv_inner = [str(env.python), os.path.abspath(__file__), args.bundle, "--precision", args.precision,
                  "--clients", *map(str, args.clients), "--requests", str(args.requests), "--rounds", str(args.rounds),
                  "--files", str(args.files),
                  "--protocol", args.protocol, "--queue-delay-us", str(args.queue_delay_us)]
    argv_inner += ["--out", args.out] if args.out else []
    argv_inner += ["--env", args.env] if args.env else []
    environ = env.environ()
    environ[_INNER] = "1"
    os.execve(str(env.python), argv_inner, environ)


if __name__ == "__main__":
    sys.exit(main())
