#!/usr/bin/env python3
"""INT8 on x86 CPUs: which ONNX Runtime INT8 format means the same on every CPU, and what it costs.

ONNX Runtime's u8 x s8 kernels for AVX2 / AVX-512 CPUs without VNNI multiply with VPMADDUBSW, which adds two
u8*s8 products into a saturating int16; VNNI and AMX kernels accumulate in int32. So one INT8 graph can give
different answers on different CPUs. For each model this script makes every INT8 graph medge can write (the
TensorRT-placed one and ONNX Runtime's placement in every format of medge.convert.precision.ORT_INT8_FORMATS)
from one calibration, and prints, against the FP32 graph run natively here:

- top-1 agreement and max |logit error| on this machine's CPU;
- the same under a CPU without VNNI, emulated by QEMU user mode (``qemu-x86_64 -cpu EPYC-Milan``: AVX2, FMA,
  no AVX-512, no VNNI; ONNX Runtime picks its kernels from CPUID, so it runs its AVX2 u8s8 kernels there);
- the median time per batch (batch 8, interleaved rounds) on this machine, and its speed relative to FP32.

The row "u8s8 + x64quantprecision" is the 8-bit graph run with ONNX Runtime's session option
``session.x64quantprecision=1`` (u8*u8 kernels where u8*s8 would saturate): a runtime remedy, not a format.

Models:

- ``demo``: medge's demo model with the calibration and validation DICOM sets of ``medge-convert --demo``.
- ``densenet``: MONAI DenseNet121 (2-D, 1 channel, 2 classes) at 128x128 trained on the synthetic CT lesion
  task (``trained_densenet121``: slices of 256 and 512 pixels through medge.preprocess with the demo's spec;
  deterministic; cached under ~/.cache/medge), calibrated and validated on synthetic CT slices of its own seeds.
- ``densenet-random``: the same network with random weights (seed 0). Random weights give near-identical
  logits for every image (margin 0.26 +- 0.01: top-1 agreement would be meaningless), so the network is made
  decisive: BatchNorm statistics are set from 128 fitting images (one pass in training mode), and the last
  layer is replaced by a linear discriminant of the lesion label on their pooled features, scaled so the
  median |logit margin| there is 8 (the demo model's is 11). The fitting images are neither calibration nor
  validation images. (Scaling the last layer alone would not do: a label flips when the error's sign and size
  beat the margin, and scaling multiplies both.) Random features vary across images by about 1% of their
  energy, so per-tensor INT8 activations blur them on every CPU: top-1 agreement on this model measures that,
  not the CPU; the column "max|no-VNNI - here|" measures the CPU.

Every INT8 graph a bundle carries appears twice: as calibrated, and after make_int8's accuracy control (what
medge-convert writes: the layers whose quantised inputs lose most signal kept in float until top-1 agreement on
the calibration images reaches 99%); the control's record is printed under the table. The column "top-1
OpenVINO" runs FP32 and those graphs through medge's OpenVINO backend.

Timings are medians of interleaved rounds on a shared machine: trust the ratios, not the milliseconds. Times
under emulation are not measured.

Usage: python tools/int8_cpu_study.py [--models demo densenet] [--runs 200] [--emulate EPYC-Milan|none]
       [--emulate-float] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

X64_QUANT_PRECISION = "session.x64quantprecision"
RUNTIME_ROW = "u8s8 + x64quantprecision"


# ------------------------------------------------------------------------------------------------ running graphs


def session(path, config=None, threads=0):
    """A CPU session set up as medge's ONNX Runtime backend sets it (graph optimisations on, no spinning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def as_input(sess, x):
    """x in the dtype the session's input takes (the FP16 graph takes float16)."""
    return x.astype(np.float16) if sess.get_inputs()[0].type == "tensor(float16)" else x


def run_all(sess, x, batch):
    name, x = sess.get_inputs()[0].name, as_input(sess, x)
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def worker(job_path: str) -> int:
    """Run the graphs of a job file on the inputs and save their outputs (run under QEMU by the study)."""
    job = json.loads(Path(job_path).read_text())
    x = np.load(job["inputs"])
    for item in job["graphs"]:
        started = time.monotonic()
        np.save(item["out"], run_all(session(item["graph"], item.get("config")), x, job["batch"]))
        print(f"  emulated {item['label']}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return 0


def emulated_outputs(graphs, x, batch, cpu, work: Path) -> dict:
    """Outputs of each (label, graph, config) under ``qemu-x86_64 -cpu <cpu>``; {} when QEMU is missing."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or not graphs:
        return {}
    np.save(work / "emulated_inputs.npy", x)
    job = {"inputs": str(work / "emulated_inputs.npy"), "batch": batch,
           "graphs": [{"label": label, "graph": str(graph), "config": config, "out": str(work / f"emu{i}.npy")}
                      for i, (label, graph, config) in enumerate(graphs)]}
    (work / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([qemu, "-cpu", cpu, sys.executable, str(Path(__file__).resolve()), "--worker",
                    str(work / "job.json")], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=None if os.environ.get("STUDY_VERBOSE") else subprocess.DEVNULL)
    return {item["label"]: np.load(item["out"]) for item in job["graphs"]}


def timings(sessions: dict, x_batch, runs: int, warmup: int = 5) -> dict:
    """Median seconds per run of each session, in interleaved rounds (one run of each per round)."""
    feeds = {label: {s.get_inputs()[0].name: as_input(s, x_batch)} for label, s in sessions.items()}
    for _ in range(warmup):
        for label, s in sessions.items():
            s.run(None, feeds[label])
    samples = {label: [] for label in sessions}
    for _ in range(runs):
        for label, s in sessions.items():
            started = time.perf_counter()
            s.run(None, feeds[label])
            samples[label].append(time.perf_counter() - started)
    return {label: statistics.median(v) for label, v in samples.items()}


# ------------------------------------------------------------------------------------------------ models


def demo_model(work: Path):
    """(fp32 ONNX path, calibration inputs, validation inputs) of medge-convert --demo."""
    import medge
    from medge import demo

    sets = {}
    for kind in ("calibration", "validation"):
        files, _ = demo.write_demo_dicoms(work / kind, kind)
        sets[kind] = medge.preprocess([medge.read_dicom(f) for f in files], demo.demo_spec())
    return demo.demo_model_path(), sets["calibration"], sets["validation"]


def synthetic_ct(first_seed: int, count: int, size: int = 256):
    """(N, 1, 128, 128) float32 inputs of synthetic CT slices (half with a nodule) and their labels."""
    import medge
    from medge.demo import demo_spec
    from medge.synthetic import ct_slice_with_truth

    slices, labels = [], []
    for i in range(count):
        ds, truth = ct_slice_with_truth(seed=first_seed + i, size=size, lesion=bool(i % 2))
        slices.append(ds)
        labels.append(int(truth.present))
    return medge.preprocess(slices, demo_spec()).astype(np.float32), np.array(labels)


def decisive_densenet121(calibration, labels, *, seed: int = 0, median_margin: float = 8.0):
    """MONAI DenseNet121 with random weights, made decisive (see the module docstring)."""
    import torch
    from monai.networks.nets import DenseNet121

    torch.manual_seed(seed)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration images
    x = torch.from_numpy(np.ascontiguousarray(calibration))
    net.train()
    with torch.no_grad():
        for i in range(0, len(x), 16):
            net(x[i : i + 16])
    net.eval()
    pooled = {}
    hook = net.class_layers.flatten.register_forward_hook(lambda _m, _i, out: pooled.__setitem__("f", out))
    features = []
    with torch.no_grad():
        for i in range(0, len(x), 16):
            net(x[i : i + 16])
            features.append(pooled["f"].double().numpy())
    hook.remove()
    f = np.concatenate(features)
    # Linear discriminant of the label: shrunk covariance, threshold halfway between the class means.
    cov = np.cov(f.T)
    cov += 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov))
    w = np.linalg.solve(cov, f[labels == 1].mean(0) - f[labels == 0].mean(0))
    projected = f @ w
    threshold = (projected[labels == 1].mean() + projected[labels == 0].mean()) / 2
    scale = median_margin / np.median(np.abs(projected - threshold))
    out = net.class_layers.out
    with torch.no_grad():  # logits (-m/2, +m/2) with m = scale * (w . features - threshold)
        out.weight.copy_(torch.from_numpy(np.stack([-w, w]) * scale / 2).float())
        out.bias.copy_(torch.tensor([threshold * scale / 2, -threshold * scale / 2], dtype=torch.float32))
    return net


#: The trained DenseNet121 recipe (``trained_densenet121``). Seeds 500000+ are nobody else's: the demo trains on
#: 100000+, tests on 200000+, and this study calibrates on 900000+ and validates on 910000+.
TRAIN_FIRST_SEED = 500_000
TRAIN_IMAGES = 512
TRAIN_EPOCHS = 2
TRAIN_BATCH = 16
TRAIN_MAX_LR = 2e-3
TRAIN_THREADS = 1
TRAIN_RECIPE_VERSION = 1


def training_set(count: int, size: int, first_seed: int = TRAIN_FIRST_SEED):
    """(count, 1, size, size) inputs and labels: synthetic CT slices of 256 and 512 pixels (alternating, so the
    network sees both acquisition sizes it meets), half with a nodule, through medge.preprocess (demo spec)."""
    import medge
    from medge.demo import demo_spec
    from medge.synthetic import ct_slice_with_truth

    spec = demo_spec().replace(height=size, width=size)
    x = np.empty((count, 1, size, size), np.float32)
    labels = np.empty(count, np.int64)
    for start in range(0, count, 64):
        chunk = []
        for i in range(start, min(count, start + 64)):
            ds, truth = ct_slice_with_truth(seed=first_seed + i, size=256 if i % 4 < 2 else 512, lesion=bool(i % 2))
            chunk.append(ds)
            labels[i] = int(truth.present)
        x[start : start + len(chunk)] = medge.preprocess(chunk, spec)
    return x, labels


def trained_densenet121(size: int = 128, *, cache: Path | None = None, log=None):
    """MONAI DenseNet121 (2-D, 1 channel, 2 classes) trained on the synthetic CT lesion task, as users deploy one.

    Deterministic (seeded data order and weights, TRAIN_THREADS threads): TRAIN_IMAGES * TRAIN_EPOCHS image
    passes on one thread at 128x128: 510 s measured on the shared 2-vCPU VM at load average 6-9. The weights
    are cached under ``~/.cache/medge`` (generated here, never downloaded), keyed by the recipe and input size.

    Returns:
        (module in eval mode, {"held_out_accuracy", "seconds", ...} recorded when it was trained).
    """
    import torch
    from monai.networks.nets import DenseNet121

    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    cache = Path(cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medge")
    stem = f"densenet121-ct-lesion-{size}px-v{TRAIN_RECIPE_VERSION}-torch{torch.__version__.split('+')[0]}"
    weights, record = cache / f"{stem}.pt", cache / f"{stem}.json"
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    if weights.exists() and record.exists():
        net.load_state_dict(torch.load(weights, weights_only=True))
        return net.eval(), json.loads(record.read_text())

    # Deterministic: seeded weights and data order, a fixed thread count. Not
    # torch.use_deterministic_algorithms(True): on CPU it made one DenseNet121 training step 25x slower
    # (73 s against ~3 s at batch 32, 128x128, torch 2.13, on a loaded 2-core machine). Two training runs are
    # expected, not checked, to give the same weights; the cache makes every later run use the same ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        started = time.monotonic()
        x, y = training_set(TRAIN_IMAGES, size)
        held_x, held_y = training_set(256, size, first_seed=TRAIN_FIRST_SEED + TRAIN_IMAGES)
        torch.manual_seed(0)
        net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
        steps = TRAIN_EPOCHS * (TRAIN_IMAGES // TRAIN_BATCH)
        optimiser = torch.optim.AdamW(net.parameters(), lr=TRAIN_MAX_LR, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=TRAIN_MAX_LR, total_steps=steps)
        order = torch.Generator().manual_seed(0)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        for epoch in range(TRAIN_EPOCHS):
            net.train()
            perm = torch.randperm(len(tx), generator=order)
            losses = []
            for i in range(0, len(tx) - TRAIN_BATCH + 1, TRAIN_BATCH):
                idx = perm[i : i + TRAIN_BATCH]
                optimiser.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(tx[idx]), ty[idx])
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(loss.item())
            net.eval()
            with torch.no_grad():
                held = torch.cat([net(torch.from_numpy(held_x[i : i + 64])) for i in range(0, len(held_x), 64)])
            accuracy = float((held.argmax(1).numpy() == held_y).mean())
            say(f"DenseNet121 {size}px epoch {epoch + 1}/{TRAIN_EPOCHS}: loss {np.mean(losses):.4f}, "
                f"held-out accuracy {accuracy:.2%} ({time.monotonic() - started:.0f} s)")
        net.eval()
        info = {"recipe_version": TRAIN_RECIPE_VERSION, "size": size, "images": TRAIN_IMAGES,
                "epochs": TRAIN_EPOCHS, "held_out_images": len(held_x), "held_out_accuracy": accuracy,
                "seconds": round(time.monotonic() - started, 1), "torch": torch.__version__}
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), weights)
        record.write_text(json.dumps(info, indent=1))
        return net, info
    finally:
        torch.set_num_threads(threads)


def densenet_model(work: Path, calibration_count: int = 128, validation_count: int = 256, *, trained: bool = True):
    """(fp32 ONNX path, calibration inputs, validation inputs) of DenseNet121 at 128x128: trained
    (``trained_densenet121``) or random weights made decisive (``decisive_densenet121``)."""
    from medge.convert.export import import_model

    calibration, _ = synthetic_ct(900_000, calibration_count)
    validation, _ = synthetic_ct(910_000, validation_count)
    if trained:
        net = trained_densenet121(128)[0]
    else:  # the head is fitted on images of its own, so calibration images are as new to it as validation ones
        fitting, labels = synthetic_ct(920_000, 128)
        net = decisive_densenet121(fitting, labels)
    imported = import_model(net, work / "densenet", example_input=calibration[:2], sample_inputs=calibration[:4])
    return imported.onnx_path, calibration, validation


# ------------------------------------------------------------------------------------------------ the study

#: Fused ops of ONNX Runtime's CPU provider that run an integer GEMM (u8*s8 / u8*u8 kernels).
INTEGER_GEMM_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                    "DynamicQuantizeMatMul", "QAttention", "ConvInteger")
TENSORRT_ROW = "int8 (TensorRT-placed)"
CONTROL = " + accuracy control"


def openvino_outputs(graph: Path, x, batch: int):
    """Outputs of the graph on OpenVINO through medge's backend (as medge.load runs it); None without OpenVINO or
    when it cannot compile the graph."""
    from medge.errors import MedgeError
    from medge.runtime.backends import openvino as ov_backend

    if not ov_backend.available():
        return None
    try:
        backend = ov_backend.OpenVINOBackend(Path(graph).read_bytes(), precision=Path(graph).stem, max_batch=batch)
    except MedgeError as exc:
        print(f"  OpenVINO cannot run {Path(graph).name}: {exc}", file=sys.stderr, flush=True)
        return None
    try:
        out = []
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch]
            backend.input_buffer(len(chunk))[...] = chunk.astype(backend.input.dtype)
            out.append(backend.execute(len(chunk)).copy())
        return np.concatenate(out)
    finally:
        backend.close()


def integer_gemm_ops(path, config=None) -> int:
    """How many nodes of the graph ONNX Runtime runs with integer GEMM kernels after its optimisations."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return sum(n.op_type in INTEGER_GEMM_OPS for n in onnx.load(options.optimized_model_filepath).graph.node)


def study(name, fp32_path, calibration, validation, formats, args, work: Path, emulate_images: int) -> dict:
    from medge.convert.precision import DEFAULT_ORT_INT8_FORMAT, ORT_INT8_FORMATS, make_fp16, make_int8

    work.mkdir(parents=True, exist_ok=True)
    # label -> (graph, session config, Int8Format or None)
    rows = {"fp32": (Path(fp32_path), None, None)}
    make_fp16(fp32_path, work / "fp16.onnx")
    rows["fp16"] = (work / "fp16.onnx", None, None)
    started = time.monotonic()
    controls = {}
    # Each INT8 graph the bundle carries twice: as calibrated ("before") and after make_int8's accuracy control
    # (what medge-convert writes); the other formats as calibrated, for comparison.
    summary = make_int8(fp32_path, work / "int8.onnx", calibration, target="tensorrt", batch_size=args.batch,
                        min_top1_agreement=None)
    rows[TENSORRT_ROW] = (work / "int8.onnx", None, summary.format)
    summary = make_int8(fp32_path, work / "int8.control.onnx", calibration, target="tensorrt", batch_size=args.batch)
    rows[TENSORRT_ROW + CONTROL] = (work / "int8.control.onnx", None, summary.format)
    controls[TENSORRT_ROW + CONTROL] = summary.accuracy_control
    for fmt in formats:
        path = work / f"int8-ort.{fmt}.onnx"
        summary = make_int8(fp32_path, path, calibration, target="onnxruntime", ort_format=fmt, batch_size=args.batch,
                            min_top1_agreement=None)
        rows[fmt] = (path, None, summary.format)
        if fmt == "u8s8":
            rows[RUNTIME_ROW] = (path, {X64_QUANT_PRECISION: "1"}, summary.format)
        if fmt == DEFAULT_ORT_INT8_FORMAT:
            path = work / f"int8-ort.{fmt}.control.onnx"
            summary = make_int8(fp32_path, path, calibration, target="onnxruntime", ort_format=fmt,
                                batch_size=args.batch)
            rows[fmt + CONTROL] = (path, None, summary.format)
            controls[fmt + CONTROL] = summary.accuracy_control
    print(f"[{name}] INT8 graphs in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    sessions, failures = {}, {}
    for label, (graph, config, _) in rows.items():
        try:
            sessions[label] = session(graph, config)
        except Exception as exc:  # noqa: BLE001 - a graph ONNX Runtime cannot load is a result too
            failures[label] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
            print(f"[{name}] {label}: ONNX Runtime cannot load it: {failures[label]}", file=sys.stderr, flush=True)
    native = {label: run_all(s, validation, args.batch) for label, s in sessions.items()}
    reference = native["fp32"]
    margins = np.abs(reference[:, 1] - reference[:, 0]) if reference.shape[1] == 2 else None

    def compare(out, ref=reference):
        return {"top1": float((out.argmax(1) == ref[: len(out)].argmax(1)).mean()),
                "max_abs_err": float(np.abs(out - ref[: len(out)]).max())}

    emulated = {}
    if args.emulate != "none":
        # Graphs that ONNX Runtime runs with integer GEMM kernels, the only ones a CPU's kernels can change.
        todo = [(label, graph, config) for label, (graph, config, fmt) in rows.items() if label in sessions
                and (args.emulate_float or integer_gemm_ops(graph, config) > 0)]
        started = time.monotonic()
        outputs = emulated_outputs(todo, validation[:emulate_images], args.batch, args.emulate, work)
        emulated = {label: {**compare(out), "images": len(out),
                            "top1_here_same_images": compare(native[label][: len(out)])["top1"],
                            "max_diff_vs_here": float(np.abs(out - native[label][: len(out)]).max())}
                    for label, out in outputs.items()}
        print(f"[{name}] emulated {len(outputs)} graphs in {time.monotonic() - started:.0f} s", file=sys.stderr,
              flush=True)

    # OpenVINO (what auto prefers on x86) on FP32 and the graphs a bundle carries.
    openvino = {}
    if not args.no_openvino:
        started = time.monotonic()
        for label, (graph, config, fmt) in rows.items():
            if label == "fp32" or label.startswith(TENSORRT_ROW) or label.startswith(DEFAULT_ORT_INT8_FORMAT):
                out = openvino_outputs(graph, validation, args.batch)
                if out is not None:
                    openvino[label] = compare(out)
        print(f"[{name}] OpenVINO ran {len(openvino)} graphs in {time.monotonic() - started:.0f} s", file=sys.stderr,
              flush=True)

    started = time.monotonic()
    speed = timings(sessions, np.ascontiguousarray(validation[: args.batch]), args.runs)
    print(f"[{name}] timed in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    results = []
    for label, (graph, config, fmt) in rows.items():
        entry = {"option": label, "format": fmt.describe() if fmt else None, "session_config": config,
                 "chosen": label == DEFAULT_ORT_INT8_FORMAT}
        if label in failures:
            results.append({**entry, "error": failures[label]})
            continue
        results.append({
            **entry, "integer_gemm_ops": integer_gemm_ops(graph, config),
            "native": compare(native[label]), "emulated": emulated.get(label), "openvino": openvino.get(label),
            "accuracy_control": controls.get(label),
            "ms_per_batch": speed[label] * 1e3, "speed_vs_fp32": speed["fp32"] / speed[label],
        })
    return {"model": name, "validation_images": len(validation), "calibration_images": len(calibration),
            "batch": args.batch, "runs": args.runs, "emulated_cpu": args.emulate if emulated else None,
            "emulated_images": min(emulate_images, len(validation)) if emulated else 0,
            "fp32_margin_percentiles": None if margins is None else
            {p: float(np.percentile(margins, p)) for p in (1, 5, 50)},
            "results": results, "formats": {k: v.describe() for k, v in ORT_INT8_FORMATS.items()}}


def table(result: dict) -> str:
    emu = result["emulated_cpu"]
    lines = [f"{result['model']}: {result['validation_images']} validation images "
             f"({result['emulated_images']} emulated), {result['calibration_images']} calibration images, "
             f"batch {result['batch']}, median of {result['runs']} interleaved runs"]
    if result["fp32_margin_percentiles"]:
        m = result["fp32_margin_percentiles"]
        lines.append(f"FP32 |logit margin| percentiles 1 / 5 / 50: {m[1]:.2f} / {m[5]:.2f} / {m[50]:.2f}")
    head = ["option", "int GEMM ops", "top-1 here", "max|err| here", "top-1 OpenVINO", f"top-1 {emu or 'no-VNNI'}",
            f"max|err| {emu or 'no-VNNI'}", "max|no-VNNI - here|", "ms/batch", "vs FP32"]
    body, failed = [], []
    for r in result["results"]:
        name = r["option"] + (" (chosen)" if r["chosen"] else "")
        if "error" in r:
            body.append([name, "-", "-", "-", "-", "-", "-", "-", "-", "fails to load"])
            failed.append(f"{r['option']}: ONNX Runtime cannot load it ({r['error']})")
            continue
        e = r["emulated"]
        if e and e["images"] < result["validation_images"]:  # the same images here, for comparison
            emulated_top1 = f"{e['top1']:.2%} (here {e['top1_here_same_images']:.2%})"
        else:
            emulated_top1 = f"{e['top1']:.2%}" if e else "-"
        body.append([name, str(r["integer_gemm_ops"]), f"{r['native']['top1']:.2%}",
                     f"{r['native']['max_abs_err']:.3f}",
                     f"{r['openvino']['top1']:.2%}" if r.get("openvino") else "-", emulated_top1,
                     f"{e['max_abs_err']:.3f}" if e else "-", f"{e['max_diff_vs_here']:.3g}" if e else "-",
                     f"{r['ms_per_batch']:.2f}", f"{r['speed_vs_fp32']:.2f}x"])
    widths = [max(len(head[i]), *(len(row[i]) for row in body)) for i in range(len(head))]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in body]
    for r in result["results"]:
        control = r.get("accuracy_control")
        if control:
            lines.append(f"{r['option']}: on {control['check_images']} calibration images "
                         f"{control['top1_agreement_before']:.2%} -> {control['top1_agreement']:.2%}; "
                         f"{control.get('result', 'no layer kept in float')}")
            for layer in control["float_layers"]:
                lines.append(f"    kept in float: {layer['node']} ({layer['op']}, input SQNR {layer['input_sqnr_db']} dB)")
            if control.get("most_sensitive") and not control["float_layers"]:
                lines.append("    least SQNR: " + ", ".join(f"{l['node']} {l['input_sqnr_db']} dB"
                                                         for l in control["most_sensitive"][:5]))
    if emu:
        lines.append(f"Graphs with no integer GEMM op run in float on every CPU and are not emulated "
                     f"(--emulate-float does).")
    return "\n".join(lines + failed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["demo", "densenet"],
                        choices=["demo", "densenet", "densenet-random"],
                        help="densenet: trained on synthetic CT (trained_densenet121, cached); densenet-random: "
                             "random weights made decisive")
    parser.add_argument("--formats", nargs="+", help="ONNX Runtime INT8 formats (default: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per graph")
    parser.add_argument("--emulate", default="EPYC-Milan",
                        help="QEMU CPU model without VNNI for the emulated columns ('none' to skip)")
    parser.add_argument("--emulate-images", type=int, default=0,
                        help="validation images run under emulation (default: all for the demo, 64 for DenseNet, "
                             "whose INT8 graphs take about 2 s per image there)")
    parser.add_argument("--emulate-float", action="store_true",
                        help="emulate FP32 and the TensorRT-placed graph too (slow: minutes per graph)")
    parser.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO column")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="write the graphs here and keep them (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import machine_name

    from medge.convert.precision import ORT_INT8_FORMATS

    formats = args.formats or list(ORT_INT8_FORMATS)
    if args.emulate != "none" and shutil.which("qemu-x86_64") is None:
        print("qemu-x86_64 not found (apt-get install qemu-user): no emulated columns", file=sys.stderr)
        args.emulate = "none"
    import onnxruntime

    print(f"machine: {machine_name()}; onnxruntime {onnxruntime.__version__}")
    if args.emulate != "none":
        print(f"emulated: qemu-x86_64 -cpu {args.emulate} (AVX2 without VNNI: ONNX Runtime's VPMADDUBSW kernels)")
    results = []
    with tempfile.TemporaryDirectory(prefix="int8-study-") as tmp:
        work = args.keep or Path(tmp)
        for name in args.models:
            if name == "demo":
                fp32, calibration, validation = demo_model(work / "demo")
            else:
                fp32, calibration, validation = densenet_model(work / name, trained=name == "densenet")
            emulate_images = args.emulate_images or (64 if name.startswith("densenet") else len(validation))
            result = study(name, fp32, calibration, validation, formats, args, work / f"{name}-graphs",
                           emulate_images)
            results.append(result)
            print()
            print(table(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_name(), "onnxruntime": onnxruntime.__version__,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
