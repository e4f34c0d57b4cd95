"""A medge bundle as a Triton Inference Server model repository (``medge export-triton``).

When a hospital outgrows one scanner-side box, its GPU team serves models
with Triton. :func:`export_triton` turns a verified bundle into a model
repository that Triton serves as it is::

    REPO/
      README.md                     how to run it (NGC container, python-only servers, a client call)
      medge_export.json             what was exported and left out (and why), every file's SHA-256
      medge_manifest.json           the bundle's manifest.json, byte for byte (+ .sig when signed)
      M_preprocess/                 python backend: DICOM bytes (TYPE_STRING) -> the network's input
      M_preprocess_fp16/            the same for graphs that take float16
      M_postprocess/                python backend: the network's first output -> SCORES, LABEL
      M_<graph>_net_onnxruntime/    onnxruntime backend: 1/model.onnx
      M_<graph>_net_tensorrt/       tensorrt_plan: 1/model_smXY.plan per compute capability
      M_<graph>_net_medge/          python backend: the graph run by medge's own runtime
      M_<graph>/                    ensemble: DICOM -> preprocess -> onnxruntime | tensorrt -> postprocess
      M_<graph>_medge/              ensemble: DICOM -> preprocess -> medge runtime (python backend only)

``M`` is the model's name (``--name``), ``<graph>`` each exported precision
graph (fp32, fp16, int8 = TensorRT's Q/DQ placement, int8_ort = ONNX
Runtime's). Every ensemble takes ``DICOM`` (TYPE_STRING, one object per
batch row) and returns ``SCORES`` (the task's activation, float32, as
``medge.Prediction.scores``), ``LABEL`` and the bundle's raw outputs.

Why a python-backend preprocessing model and a python-backend network: the
preprocessing is medge's (its DICOM reader, its fused C++/CUDA kernel, the
envelope check), and Triton runs Python models next to native ones in one
ensemble; on GPU the preprocessed batch goes to the network as DLPack. The
``_medge`` network lets the same repository run where Triton has only the
python backend (pytriton's ``tritonserver``, CPU-only builds), with medge's
load-time self-test.

Integrity: Triton verifies nothing about model files. The bundle is verified
(every hash, and the signature with ``trusted_key``) before anything is
written; every file written is copied from verified bytes and listed with its
SHA-256 in ``medge_export.json`` (:func:`verify_export` checks them), and the
``_medge`` network re-checks its graph's hash when Triton loads it.

Also here, for tests and ``tools/bench_triton.py``: :func:`serving_environment`
(a virtual environment with pytriton's ``tritonserver`` and its python
backend), :class:`TritonServer` (that server on 127.0.0.1, free ports) and
:class:`TritonDicomClient` (DICOM bytes in, scores out, over HTTP or gRPC).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from ..errors import BundleError, MedgeError, MissingDependency

__all__ = [
    "GRAPHS",
    "KINDS",
    "TritonExport",
    "export_triton",
    "verify_export",
    "check_config",
    "ServingEnvironment",
    "serving_environment",
    "TritonServer",
    "TritonDicomClient",
]

#: The pip extra that brings Triton's client (and, in a serving environment, pytriton's server).
TRITON_EXTRA = "triton"
#: Precision graphs a bundle may hold, in the order they are exported.
GRAPHS = ("fp32", "fp16", "int8", "int8-ort")
#: Where the repository's models run.
KINDS = ("cpu", "gpu")
#: The export's own record, at the repository's root.
EXPORT_RECORD = "medge_export.json"
MANIFEST_COPY = "medge_manifest.json"
_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
_RESERVED_TENSORS = ("DICOM", "SCORES", "LABEL")


# ---------------------------------------------------------------------------
# Model configuration text (protobuf text format, what Triton reads as config.pbtxt)


class _Enum(str):
    """A protobuf enum value (written bare, not quoted)."""


def _quote(text: str) -> str:
    # C-style escapes only: both Triton's C++ parser and Python's text_format read them.
    out = []
    for byte in str(text).encode("utf-8"):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _scalar(value: Any) -> str:
    if isinstance(value, _Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _quote(value)
    raise TypeError(f"cannot write {type(value).__name__} into a model configuration")


def _pbtxt(message: dict, indent: int = 0) -> list[str]:
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if value is None:
            continue
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", *_pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:  # a repeated message (or a map): one block per entry
                lines += [f"{pad}{key} {{", *_pbtxt(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def _config_text(config: dict) -> str:
    return "\n".join(_pbtxt(config)) + "\n"


def _parameters(values: dict) -> list:
    return [{"key": key, "value": {"string_value": str(value)}} for key, value in values.items()]


def check_config(text: str) -> Any:
    """Parse ``text`` against Triton's own schema (``tritonclient.grpc.model_config_pb2.ModelConfig``).

    Returns:
        The parsed ModelConfig message.

    Raises:
        MedgeError: unknown fields, typos, wrong types (the parser's message).
        MissingDependency: tritonclient[grpc] is not installed (extra ``triton``).
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise MissingDependency("tritonclient", TRITON_EXTRA, "Checking Triton model configurations") from exc
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise MedgeError(f"not a valid Triton model configuration: {exc}") from exc
    return config


# ---------------------------------------------------------------------------
# Export


@dataclass
class TritonExport:
    """What :func:`export_triton` wrote.

    Attributes:
        repository: the model repository folder.
        ensembles: graph -> name of its ensemble through onnxruntime / tensorrt_plan (needs the NGC container).
        medge_ensembles: graph -> name of its ensemble through medge's runtime (python backend only).
        models: every model written, name -> its platform or backend.
        left_out: one line per graph or engine not exported, saying why.
        files: repository-relative path -> SHA-256, as recorded in medge_export.json.
    """

    repository: Path
    ensembles: dict
    medge_ensembles: dict
    models: dict
    left_out: list
    files: dict = field(default_factory=dict)


def _model_name(manifest: dict, name: Optional[str]) -> str:
    raw = name if name is not None else str((manifest.get("model") or {}).get("name") or "medge")
    cleaned = re.sub(r"[^A-Za-z0-9_]+", "_", raw).strip("_")
    if not cleaned or (name is not None and cleaned != name):
        raise MedgeError(f"the model name {raw!r} must be made of letters, digits and '_' (Triton model names "
                         "become folder names and URL paths)")
    return cleaned


def _dims(shape: Any, what: str) -> list:
    dims = list(shape)[1:]
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise BundleError(f"{what} has shape {shape}: Triton needs fixed sizes after the batch axis")
    return dims


def _engine_cc(entry: dict) -> Optional[str]:
    gpu = entry.get("gpu") or {}
    if gpu.get("compute_capability"):
        return str(gpu["compute_capability"])
    targets = entry.get("compute_capabilities") or []
    return str(targets[0]) if len(targets) == 1 else None


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", str(version)))


def _choose_graphs(manifest: dict, precisions: Optional[Sequence[str]], allow_failed_gates: bool,
                   left_out: list) -> list:
    from ..tasks.base import DEFAULT_CHOICE_VERDICTS

    graphs = manifest["graphs"]
    verdicts = (manifest.get("gates") or {}).get("verdicts") or {}
    if precisions:
        unknown = [p for p in precisions if p not in GRAPHS]
        if unknown:
            raise MedgeError(f"unknown precision {', '.join(unknown)}: choose from {', '.join(GRAPHS)}")
        missing = [p for p in precisions if p not in graphs]
        if missing:
            raise MedgeError(f"the bundle has no {', '.join(missing)} graph (it has {', '.join(graphs)})")
    elif allow_failed_gates:
        raise MedgeError("--allow-failed-gates needs --precision: name the precision you accept")
    wanted = [g for g in GRAPHS if g in graphs and (not precisions or g in precisions)]
    chosen = []
    for graph in wanted:
        verdict = verdicts.get(graph) or {"verdict": "not measured", "reasons": ["no verdict in the manifest"]}
        if verdict.get("verdict") in DEFAULT_CHOICE_VERDICTS:
            chosen.append(graph)
            continue
        why = ("failed its accuracy gates at conversion" if verdict.get("verdict") == "failed"
               else "was not measured at conversion")
        reasons = "; ".join(verdict.get("reasons") or [])
        why += f" ({reasons})" if reasons else ""
        if precisions and allow_failed_gates:
            left_out.append(f"{graph}: exported although it {why}: --allow-failed-gates")
            chosen.append(graph)
        elif precisions:
            raise MedgeError(f"the {graph} graph {why}; pass --allow-failed-gates to export it anyway")
        else:
            left_out.append(f"{graph}: left out: it {why} (name it with --precision and --allow-failed-gates to "
                            "export it anyway)")
    if not chosen:
        raise MedgeError("no precision of the bundle can be exported: " + " | ".join(left_out))
    return chosen


def _tensorrt_plans(manifest: dict, graph: str, left_out: list) -> Optional[dict]:
    """{"version", "plans": {cc: engine entry}} for full-TensorRT engines of ``graph``; RTX ones noted as left out."""
    if graph not in ("fp32", "fp16", "int8"):  # engines are built from the TensorRT-placed graphs only
        return None
    engines = [e for e in manifest.get("engines") or [] if isinstance(e, dict) and e.get("precision") == graph]
    for entry in engines:
        if entry.get("flavour") == "tensorrt_rtx":
            left_out.append(f"{graph}: TensorRT-RTX engine {entry.get('file')} left out: Triton's tensorrt backend "
                            "loads plans of full TensorRT only (TensorRT-RTX runs under medge.load)")
    full = [e for e in engines if e.get("flavour") == "tensorrt"]
    if not full:
        return None
    versions = sorted({str(e.get("flavour_version")) for e in full}, key=_version_key)
    version = versions[-1]
    plans: dict = {}
    for entry in full:
        cc = _engine_cc(entry)
        if str(entry.get("flavour_version")) != version:
            left_out.append(f"{graph}: TensorRT {entry.get('flavour_version')} engine {entry.get('file')} left out: "
                            f"the repository holds the TensorRT {version} plans (a server runs one TensorRT)")
        elif cc is None:
            left_out.append(f"{graph}: engine {entry.get('file')} left out: its compute capability is not recorded")
        elif cc in plans:
            left_out.append(f"{graph}: engine {entry.get('file')} left out: {plans[cc].get('file')} already serves "
                            f"compute capability {cc}")
        else:
            plans[cc] = entry
    return {"version": version, "plans": plans}


class _RepositoryWriter:
    """Writes files under a folder, hashing each as it goes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict = {}

    def write(self, relative: str, data: bytes) -> str:
        path = self.root.joinpath(*relative.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as f:
            f.write(data)
        self.files[relative] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        return relative

    def folder(self, relative: str) -> None:
        self.root.joinpath(*relative.split("/")).mkdir(parents=True, exist_ok=True)


def export_triton(bundle: Union[str, os.PathLike], repository: Union[str, os.PathLike], *,
                  precisions: Optional[Sequence[str]] = None, kind: str = "cpu", trusted_key: Any = None,
                  allow_failed_gates: bool = False, instances: int = 1, max_queue_delay_us: int = 2000,
                  threads: int = 0, name: Optional[str] = None, execution_env: Optional[str] = None,
                  overwrite: bool = False, log: Optional[Callable[[str], None]] = None) -> TritonExport:
    """Write a Triton model repository serving ``bundle`` (see the module's docstring for its layout).

    Args:
        bundle: a NAME.medge bundle.
        repository: the folder to create (it must not exist, or be empty, unless ``overwrite``).
        precisions: graphs to export (fp32, fp16, int8, int8-ort); default every graph whose accuracy gates
            passed at conversion (the others are left out, saying why).
        kind: "cpu" or "gpu": the ``instance_group`` kind of the preprocessing and network models; on
            "gpu" the ensembles use the TensorRT plans where the bundle has some, and preprocessing runs
            medge's CUDA kernel, handing its output on as DLPack.
        trusted_key: Ed25519 public key (PEM path / bytes) the bundle must be signed with.
        allow_failed_gates: with ``precisions``, export graphs that failed (or never ran) their gates.
        instances: instances of each model (``instance_group`` count).
        max_queue_delay_us: dynamic batching's ``max_queue_delay_microseconds``.
        threads: CPU threads of each instance's preprocessing and ONNX Runtime (0: all cores).
        name: model name prefix (default: the bundle's model name, '_' for other characters).
        execution_env: a packed Python environment (conda-pack tarball) recorded as EXECUTION_ENV_PATH in
            every python-backend model, e.g. ``$$TRITON_MODEL_DIRECTORY/../medge_env.tar.gz``.
        overwrite: replace an existing repository written by this function.
        log: where progress lines go (default: nowhere).

    Returns:
        TritonExport.

    Raises:
        BundleError / SignatureError: the bundle does not verify (nothing is written).
        MedgeError: a precision is unknown, absent, or failed its gates; the target exists.
    """
    from ..bundle import SIGNATURE_NAME, Bundle
    from ..preprocess import PreprocessSpec
    from ..tasks import task_from_manifest
    from .triton_models import source

    say = log or (lambda _line: None)
    if kind not in KINDS:
        raise MedgeError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    for label, value, low in (("instances", instances, 1), ("max_queue_delay_us", max_queue_delay_us, 0),
                              ("threads", threads, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise MedgeError(f"{label} must be an integer >= {low}, got {value!r}")
    repository = Path(repository)
    _check_target(repository, overwrite)

    opened = Bundle.open(bundle)
    verification = opened.verify(trusted_key=trusted_key, require_signature=trusted_key is not None)
    say(f"verified {opened.path}: {verification}")
    manifest = opened.manifest
    missing = [key for key in ("task", "graphs", "profile", "preprocess", "check_vectors") if not manifest.get(key)]
    if missing:
        raise BundleError(f"the bundle's manifest has no {', '.join(missing)}: convert the model again with this medge")
    task = task_from_manifest(manifest)
    if task.kind != "classification":
        # Triton batches requests of single images; a segmentation needs a whole series, its sliding window and
        # the way back onto the series' grid, none of which this repository layout carries yet.
        raise MedgeError(f"the bundle's task is {task.kind}: export-triton exports classifiers only; serve a "
                         "segmentation bundle with medge serve (a DICOM SEG per series) or model.segment")
    spec = PreprocessSpec.from_dict(manifest["preprocess"])
    prefix = _model_name(manifest, name)
    left_out: list = []
    graphs = _choose_graphs(manifest, precisions, allow_failed_gates, left_out)

    profile = manifest["profile"]
    max_batch = int(profile["max"])
    preferred = sorted({int(profile[k]) for k in ("opt", "max") if 1 < int(profile[k]) <= max_batch})
    batching = {"preferred_batch_size": preferred or None, "max_queue_delay_microseconds": max_queue_delay_us}
    inputs, outputs = manifest.get("inputs") or [], manifest.get("outputs") or []
    if len(inputs) != 1 or not outputs:
        raise BundleError("Triton export needs a bundle with one image input and at least one output")
    input_name = str(inputs[0]["name"])
    image_dims = list(spec.output_shape_per_image)
    output_specs = [(str(o["name"]), _dims(o["shape"], f"output {o['name']}")) for o in outputs]
    clash = [n for n in [input_name] + [n for n, _ in output_specs] if n in _RESERVED_TENSORS]
    if clash:
        raise BundleError(f"the bundle's tensor name(s) {', '.join(clash)} clash with the repository's "
                          f"{', '.join(_RESERVED_TENSORS)}")
    first_output = output_specs[0][0]
    gpu = kind == "gpu"
    instance = {"kind": _Enum("KIND_GPU" if gpu else "KIND_CPU"), "count": instances}
    cpu_instance = {"kind": _Enum("KIND_CPU"), "count": instances}
    checks = {key: opened.read_verified(manifest["check_vectors"][f"{key}_file"]) for key in ("inputs", "outputs")}
    tolerances = manifest["check_vectors"].get("tolerances") or {}
    from .. import __version__

    common_python = {"medge_version": __version__}
    if execution_env:
        common_python["EXECUTION_ENV_PATH"] = execution_env

    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{repository.name}.", suffix=".partial", dir=repository.parent))
    except OSError as exc:
        raise MedgeError(f"cannot write in {repository.parent}: {exc.strerror}") from exc
    writer = _RepositoryWriter(staging)
    models: dict = {}
    ensembles: dict = {}
    medge_ensembles: dict = {}
    configs: dict = {}

    def model(model_name: str, config: dict, files: dict, platform: str) -> str:
        config = {"name": model_name, **config}
        configs[model_name] = _config_text(config)
        writer.write(f"{model_name}/config.pbtxt", configs[model_name].encode())
        writer.folder(f"{model_name}/1")
        for relative, data in files.items():
            writer.write(f"{model_name}/1/{relative}", data)
        models[model_name] = platform
        return model_name

    def tensor(tensor_name: str, dtype: str, dims: list) -> dict:
        return {"name": tensor_name, "data_type": _Enum(dtype), "dims": dims}

    try:
        graph_outputs = [tensor(n, "TYPE_FP32", d) for n, d in output_specs]
        decision = [tensor("SCORES", "TYPE_FP32", [task.classes]), tensor("LABEL", "TYPE_STRING", [1])]
        task_json = json.dumps(task.to_manifest(), sort_keys=True)
        preprocessors: dict = {}

        def preprocessor(input_dtype: str) -> str:
            if input_dtype not in preprocessors:
                model_name = f"{prefix}_preprocess" + ("" if input_dtype == "float32" else "_fp16")
                preprocessors[input_dtype] = model(model_name, {
                    "backend": "python", "max_batch_size": max_batch,
                    "input": [tensor("DICOM", "TYPE_STRING", [1])],
                    "output": [tensor(input_name, _DTYPES[input_dtype], image_dims)],
                    "dynamic_batching": batching, "instance_group": [instance],
                    "parameters": _parameters({
                        "medge_preprocess_spec": spec.replace(dtype=input_dtype).to_json(sort_keys=True),
                        "medge_envelope": json.dumps(manifest.get("envelope"), sort_keys=True),
                        "medge_envelope_mode": "enforce", "medge_threads": threads, **common_python}),
                }, {"model.py": source("preprocess")}, "python (medge preprocessing)")
            return preprocessors[input_dtype]

        postprocessor = model(f"{prefix}_postprocess", {
            "backend": "python", "max_batch_size": max_batch,
            "input": [graph_outputs[0]], "output": decision,
            "dynamic_batching": batching, "instance_group": [cpu_instance],
            "parameters": _parameters({"medge_task": task_json, **common_python}),
        }, {"model.py": source("postprocess")}, "python (medge postprocessing)")

        for graph in graphs:
            entry = manifest["graphs"][graph]
            input_dtype = str(entry.get("input_dtype", "float32"))
            output_dtype = str(entry.get("output_dtype", "float32"))
            if input_dtype not in _DTYPES or output_dtype != "float32":
                left_out.append(f"{graph}: left out: input {input_dtype} / output {output_dtype} (the repository "
                                "serves float32 or float16 inputs and float32 outputs)")
                continue
            graph_bytes = opened.read_verified(entry["file"])
            base = f"{prefix}_{graph.replace('-', '_')}"
            network_input = tensor(input_name, _DTYPES[input_dtype], image_dims)
            pre = preprocessor(input_dtype)
            say(f"{graph}: {entry['file']} ({len(graph_bytes) / 1e6:.1f} MB)")

            onnx_model = model(f"{base}_net_onnxruntime", {
                "backend": "onnxruntime", "max_batch_size": max_batch,
                "input": [network_input], "output": graph_outputs,
                "dynamic_batching": batching, "instance_group": [instance],
                "parameters": _parameters({"intra_op_thread_count": threads}) if threads else None,
            }, {"model.onnx": graph_bytes}, "onnxruntime")

            native = onnx_model
            trt = _tensorrt_plans(manifest, graph, left_out)
            if trt and trt["plans"]:
                files = {}
                filenames = {}
                record = {"tensorrt_version": trt["version"], "plans": {}}
                for cc, engine in sorted(trt["plans"].items(), key=lambda kv: _version_key(kv[0])):
                    filename = f"model_sm{cc.replace('.', '')}.plan"
                    files[filename] = opened.read_verified(engine["file"])
                    filenames[cc] = filename
                    record["plans"][cc] = {"file": filename, "bundle_file": engine["file"], "gpu": engine.get("gpu"),
                                           "sha256": hashlib.sha256(files[filename]).hexdigest()}
                files["tensorrt.json"] = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
                trt_model = model(f"{base}_net_tensorrt", {
                    "platform": "tensorrt_plan", "max_batch_size": max_batch,
                    "input": [network_input], "output": graph_outputs,
                    "dynamic_batching": batching, "instance_group": [{"kind": _Enum("KIND_GPU"), "count": instances}],
                    "cc_model_filenames": [{"key": cc, "value": f} for cc, f in filenames.items()],
                    "parameters": _parameters({"medge_tensorrt_version": trt["version"]}),
                }, files, f"tensorrt_plan (TensorRT {trt['version']}, sm {', '.join(filenames)})")
                say(f"{graph}: TensorRT {trt['version']} plans for compute capability {', '.join(filenames)}")
                if gpu:
                    native = trt_model

            medge_model = model(f"{base}_net_medge", {
                "backend": "python", "max_batch_size": max_batch,
                "input": [network_input], "output": graph_outputs + decision,
                "dynamic_batching": batching, "instance_group": [instance],
                "parameters": _parameters({
                    "medge_graph": graph, "medge_graph_sha256": hashlib.sha256(graph_bytes).hexdigest(),
                    "medge_task": task_json, "medge_threads": threads,
                    "medge_check_tolerance": repr(float(tolerances.get(graph, 0.0))), **common_python}),
            }, {"model.py": source("network"), "model.onnx": graph_bytes, "checks_inputs.npy": checks["inputs"],
                "checks_outputs.npy": checks["outputs"]}, "python (medge runtime, ONNX Runtime)")

            ensemble_io = {"platform": "ensemble", "max_batch_size": max_batch,
                           "input": [tensor("DICOM", "TYPE_STRING", [1])], "output": decision + graph_outputs}
            read_step = {"model_name": pre, "model_version": -1, "input_map": [{"key": "DICOM", "value": "DICOM"}],
                         "output_map": [{"key": input_name, "value": input_name}]}
            network_map = {"input_map": [{"key": input_name, "value": input_name}],
                           "output_map": [{"key": n, "value": n} for n, _ in output_specs]}
            ensembles[graph] = model(base, {**ensemble_io, "ensemble_scheduling": {"step": [
                read_step, {"model_name": native, "model_version": -1, **network_map},
                {"model_name": postprocessor, "model_version": -1,
                 "input_map": [{"key": first_output, "value": first_output}],
                 "output_map": [{"key": "SCORES", "value": "SCORES"}, {"key": "LABEL", "value": "LABEL"}]},
            ]}}, {}, f"ensemble (preprocess -> {models[native].split(' ')[0]} -> postprocess)")
            medge_ensembles[graph] = model(f"{base}_medge", {**ensemble_io, "ensemble_scheduling": {"step": [
                read_step, {"model_name": medge_model, "model_version": -1, "input_map": network_map["input_map"],
                            "output_map": network_map["output_map"] + [{"key": "SCORES", "value": "SCORES"},
                                                                       {"key": "LABEL", "value": "LABEL"}]},
            ]}}, {}, "ensemble (preprocess -> medge runtime)")
        if not ensembles:
            raise MedgeError("no precision of the bundle can be exported: " + " | ".join(left_out))

        writer.write(MANIFEST_COPY, opened.manifest_bytes)
        signature = opened.path / SIGNATURE_NAME
        if signature.is_file():
            writer.write(MANIFEST_COPY + ".sig", signature.read_bytes())
        export = {
            "exported_by": f"medge {__version__}",
            "bundle": {"model": (manifest.get("model") or {}).get("name"), "version": (manifest.get("model") or
                                                                                         {}).get("version"),
                       "manifest_sha256": opened.manifest_sha256, "signed_by": verification.signed_by},
            "kind": kind, "max_batch_size": max_batch, "preferred_batch_size": preferred,
            "ensembles": ensembles, "medge_ensembles": medge_ensembles, "models": models, "left_out": left_out,
        }
        writer.write("README.md", _readme(prefix, manifest, export, kind).encode())
        export["files"] = dict(sorted(writer.files.items()))
        writer.write(EXPORT_RECORD, (json.dumps(export, indent=2, sort_keys=True) + "\n").encode())
        _move_into_place(staging, repository, overwrite)
    except OSError as exc:  # disk full, permissions: a user's problem, said in one line
        shutil.rmtree(staging, ignore_errors=True)
        raise MedgeError(f"cannot write the repository {repository}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for line in left_out:
        say(line)
    return TritonExport(repository, ensembles, medge_ensembles, models, left_out,
                        {k: v["sha256"] for k, v in export["files"].items()})


def _check_target(repository: Path, overwrite: bool) -> None:
    if not repository.parent.is_dir():
        raise MedgeError(f"{repository.parent} does not exist; create it first")
    if not os.path.lexists(repository):
        return
    if repository.is_symlink() or not repository.is_dir():
        raise MedgeError(f"{repository} exists and is not a folder; refusing to replace it")
    if not any(repository.iterdir()):
        return
    if not overwrite:
        raise MedgeError(f"{repository} exists and is not empty; pass --overwrite to replace it")
    if not (repository / EXPORT_RECORD).is_file():
        raise MedgeError(f"{repository} exists and was not written by medge export-triton (no {EXPORT_RECORD}); "
                         "refusing to replace it")


def _move_into_place(staging: Path, repository: Path, overwrite: bool) -> None:
    if os.path.lexists(repository) and any(repository.iterdir()):
        old = repository.with_name(f".{repository.name}.old-{os.getpid()}")
        os.rename(repository, old)
        try:
            os.rename(staging, repository)
        except OSError:
            os.rename(old, repository)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    if os.path.lexists(repository):
        os.rmdir(repository)
    os.rename(staging, repository)


def verify_export(repository: Union[str, os.PathLike]) -> dict:
    """Re-hash every file of an exported repository against its ``medge_export.json``.

    Returns:
        The export record.

    Raises:
        BundleError: a file is missing, changed, or not listed (model files only; Triton's own
            additions such as ``__pycache__`` are ignored).
    """
    repository = Path(repository)
    try:
        record = json.loads((repository / EXPORT_RECORD).read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{repository} has no readable {EXPORT_RECORD}: not a repository medge exported") from exc
    listed = record.get("files") or {}
    for relative, entry in listed.items():
        path = repository.joinpath(*relative.split("/"))
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            raise BundleError(f"{relative} is missing from the repository") from None
        if digest != entry.get("sha256"):
            raise BundleError(f"{relative} changed since the export (SHA-256 differs): export the bundle again")
    for path in repository.rglob("*"):
        relative = path.relative_to(repository).as_posix()
        if (path.is_file() and relative not in listed and relative != EXPORT_RECORD
                and "__pycache__" not in path.parts):
            raise BundleError(f"{relative} was not written by the export: remove it or export again")
    return record


def _readme(prefix: str, manifest: dict, export: dict, kind: str) -> str:
    model = manifest.get("model") or {}
    first = next(iter(export["ensembles"].values()))
    first_medge = next(iter(export["medge_ensembles"].values()))
    rows = "\n".join(f"| `{name}` | {what} |" for name, what in export["models"].items())
    left = "\n".join(f"- {line}" for line in export["left_out"]) or "- nothing"
    labels = ", ".join(manifest.get("labels") or []) or "unnamed classes"
    return f"""# Triton model repository for {model.get('name', prefix)} {model.get('version', '')}

Written by `medge export-triton` ({export['exported_by']}) from a verified medge bundle
(manifest SHA-256 `{export['bundle']['manifest_sha256']}`{', signed by key ' + export['bundle']['signed_by']
                                                             if export['bundle']['signed_by'] else ', unsigned'}).
Instances: {kind.upper()}. `max_batch_size` {export['max_batch_size']}, dynamic batching with preferred sizes
{export['preferred_batch_size'] or 'none'} (from the bundle's optimization profile).

Each ensemble takes `DICOM` (TYPE_STRING: one DICOM Part 10 object per batch row, as bytes) and returns
`SCORES` (float32, {labels}; the bundle's activation, as `medge.Prediction.scores`), `LABEL` (the top-1
class) and the network's raw outputs. A DICOM that cannot be read, lies outside the bundle's validated
envelope (e.g. a CR sent to a CT model) or cannot be preprocessed fails its own request with medge's
message; the other requests are answered.

| model | what |
|---|---|
{rows}

Left out:
{left}

## Integrity

Triton checks nothing about model files. `{EXPORT_RECORD}` lists every file's SHA-256;
check them before serving with:

```bash
python -c "from medge.serve.triton import verify_export; verify_export('REPO')"
```

`{MANIFEST_COPY}` is the bundle's manifest, byte for byte (with its signature when signed). The
`*_net_medge` models also check their graph's SHA-256 and run the bundle's check vectors when Triton
loads them, and refuse to load when this machine does not reproduce them.

## Run it in the NGC container (onnxruntime, tensorrt and python backends)

The python-backend models import `medge`. Either build a derived image:

```dockerfile
FROM nvcr.io/nvidia/tritonserver:24.10-py3
# medge with its ONNX Runtime extra; Triton 24.10's python backend needs numpy < 2
RUN pip install "medge[runtime]" "numpy<2"
```

```bash
docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD/REPO:/models \\
    medge-triton tritonserver --model-repository=/models
```

or ship a packed environment with the repository (conda-pack) and export with
`medge export-triton ... --execution-env '$$TRITON_MODEL_DIRECTORY/../medge_env.tar.gz'`,
which records it as `EXECUTION_ENV_PATH` in every python-backend model.

TensorRT plans (`*_net_tensorrt`) run only on the compute capabilities and the TensorRT version
recorded in their `1/tensorrt.json`: use the NGC release whose TensorRT matches. GPU preprocessing
needs medge built with CUDA and `medge[cuda]` in the image.

## Run it where only the python backend exists

The `*_medge` ensembles run the network with medge's own runtime (ONNX Runtime), so a Triton with only
the python backend (pytriton's `tritonserver`, a CPU-only build) serves them. Load just those
(their composing models load with them):

```bash
tritonserver --model-repository=REPO --model-control-mode=explicit \\
    {' '.join('--load-model=' + n for n in export['medge_ensembles'].values())}
```

## Ask it

```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("127.0.0.1:8000")
dicom = httpclient.InferInput("DICOM", [1, 1], "BYTES")
dicom.set_data_from_numpy(np.array([[open("image.dcm", "rb").read()]], dtype=object))
result = client.infer("{first}", [dicom])   # or "{first_medge}" on a python-only server
print(result.as_numpy("SCORES"), result.as_numpy("LABEL"))
```
"""


# ---------------------------------------------------------------------------
# A local Triton for tests and benchmarks (pytriton's tritonserver, python backend only)

#: What a serving environment holds: pytriton for its tritonserver binary (Triton 24.10) and python backend,
#: installed without its own dependencies (its Python API is not used); numpy < 2, which that python backend
#: needs (with numpy 2 its outputs come back empty, with no error); the client; medge's run side.
SERVING_SERVER = "nvidia-pytriton==0.7.0"
SERVING_REQUIREMENTS = ("numpy>=1.23,<2", "tritonclient[http,grpc]==2.73.0", "onnxruntime>=1.18", "pydicom>=3.0,<4")


@dataclass(frozen=True)
class ServingEnvironment:
    """A virtual environment with pytriton's tritonserver, its python backend and medge's run-side dependencies.

    Attributes:
        root: the environment's folder.
        python: its interpreter.
        site_packages: its site-packages.
        server: the ``tritonserver`` binary.
        backends: a backend folder holding ``python/`` with the stub for this Python version.
        medge_path: a folder whose ``medge`` is the medge this process imported (on the environment's
            path through ``site-packages/medge-overlay.pth``).
    """

    root: Path
    python: Path
    site_packages: Path
    server: Path
    backends: Path
    medge_path: Path

    def environ(self, base: Optional[dict] = None) -> dict:
        """Process environment for the server and for Python run in this environment.

        The python backend's stub embeds Python and takes its prefix from the first ``python3`` on
        PATH (it ignores PYTHONPATH): PATH starts with this environment's ``bin``, and the caller's
        virtual environment (whose numpy may be 2) is dropped. LD_LIBRARY_PATH: Triton's bundled
        libraries and this Python's LIBDIR (without it the stub loads the system's libpython against
        another Python's standard library). medge is found through a ``.pth`` file in site-packages.
        """
        env = dict(os.environ if base is None else base)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        libs = [str(self.site_packages / "nvidia_pytriton.libs"), libdir]
        env["LD_LIBRARY_PATH"] = ":".join(p for p in libs + [env.get("LD_LIBRARY_PATH", "")] if p)
        env["PATH"] = ":".join([str(self.python.parent), env.get("PATH", os.defpath)])
        for name in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONSTARTUP"):
            env.pop(name, None)
        return env


def _requirements_key() -> str:
    text = "\n".join((SERVING_SERVER,) + SERVING_REQUIREMENTS) + f"\npy{sys.version_info[0]}.{sys.version_info[1]}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def serving_environment(directory: Union[str, os.PathLike, None] = None, *,
                        log: Optional[Callable[[str], None]] = None) -> ServingEnvironment:
    """Create (once) or reuse a serving environment for a local Triton.

    Made with ``python -m venv`` and pip (:data:`SERVING_SERVER`, :data:`SERVING_REQUIREMENTS`), kept
    under ``directory`` (default ``$MEDGE_TRITON_ENV``, else ``~/.cache/medge/triton-env-<key>``, where
    the key changes with the requirements and the Python version); later calls reuse it. medge itself is
    not installed there: :attr:`ServingEnvironment.medge_path` points at the medge this process runs,
    compiled module included.

    Raises:
        MedgeError: the environment cannot be created (pip's last lines say why).
    """
    say = log or (lambda _line: None)
    if directory is None:
        directory = os.environ.get("MEDGE_TRITON_ENV") or Path.home() / ".cache" / "medge" / \
            f"triton-env-{_requirements_key()}"
    root = Path(directory)
    root.parent.mkdir(parents=True, exist_ok=True)
    ready = root / ".medge-ready"
    with _locked(root.with_name(root.name + ".lock")):
        if not (ready.is_file() and ready.read_text() == _requirements_key()):
            started = time.monotonic()
            say(f"creating the Triton serving environment {root} "
                f"(pip install {SERVING_SERVER} {' '.join(SERVING_REQUIREMENTS)})")
            shutil.rmtree(root, ignore_errors=True)
            _run([sys.executable, "-m", "venv", str(root)], "python -m venv")
            pip = [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            _run(pip + ["--no-deps", SERVING_SERVER], f"pip install {SERVING_SERVER}")
            _run(pip + list(SERVING_REQUIREMENTS), "pip install")
            site_packages = _site_packages(root)
            _prepare_backends(site_packages, root / "triton-backends")
            ready.write_text(_requirements_key())
            say(f"serving environment ready in {time.monotonic() - started:.0f} s")
        site_packages = _site_packages(root)
        medge_path = _medge_overlay(root / "medge-path")
        (site_packages / "medge-overlay.pth").write_text(str(medge_path) + "\n")
    return ServingEnvironment(root, root / "bin" / "python", site_packages,
                              site_packages / "pytriton" / "tritonserver" / "bin" / "tritonserver",
                              root / "triton-backends", medge_path)


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list, what: str) -> None:
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        raise MedgeError(f"{what} failed (exit status {done.returncode}) while creating the Triton serving "
                         f"environment:\n{tail}")


def _site_packages(root: Path) -> Path:
    return root / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def _prepare_backends(site_packages: Path, backends: Path) -> None:
    """pytriton ships the python backend without its stub in place: put this Python's stub beside it."""
    dist = site_packages / "pytriton" / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise MedgeError(f"pytriton has no python backend stub for Python {version}")
    shutil.rmtree(backends, ignore_errors=True)
    shutil.copytree(dist / "backends", backends, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")


def _medge_overlay(folder: Path) -> Path:
    """A folder whose ``medge`` is this process's medge, with its compiled ``_C`` inside.

    An installed medge has both; an editable install keeps the sources in the checkout and ``_C`` in
    site-packages, so the overlay links each source entry and the compiled module side by side.
    """
    from .. import _C

    package = Path(__file__).resolve().parents[1]
    native = Path(_C.__file__).resolve()
    staging = folder.with_name(folder.name + f".{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if native.parent == package:
        (staging / "medge").symlink_to(package, target_is_directory=True)
    else:
        (staging / "medge").mkdir()
        for entry in package.iterdir():
            if entry.name != "__pycache__":
                (staging / "medge" / entry.name).symlink_to(entry)
        (staging / "medge" / native.name).symlink_to(native)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(staging, folder)
    return folder


def _free_ports(count: int) -> list:
    sockets = []
    try:
        for _ in range(count):  # all held open at once, so they differ
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class TritonServer:
    """pytriton's ``tritonserver`` on 127.0.0.1 (free ports) serving a repository; a context manager.

    Args:
        repository: the model repository.
        environment: a :class:`ServingEnvironment`.
        models: load only these models (``--model-control-mode=explicit``; an ensemble brings its
            composing models); None loads every model.
        log_path: where the server's output goes (default: ``server.log`` in a new temporary folder).
        ready_timeout_s: how long to wait for the server (and every model) to be ready.
        extra_args: more ``tritonserver`` arguments.

    Attributes:
        http_url, grpc_url: ``127.0.0.1:PORT`` for tritonclient.
        metrics_url: the Prometheus endpoint.
    """

    def __init__(self, repository: Union[str, os.PathLike], environment: ServingEnvironment, *,
                 models: Optional[Sequence[str]] = None, log_path: Union[str, os.PathLike, None] = None,
                 ready_timeout_s: float = 180.0, extra_args: Sequence[str] = ()) -> None:
        self.repository = Path(repository)
        self.environment = environment
        self.models = list(models) if models is not None else None
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="medge-triton-")) / "server.log"
        self.ready_timeout_s = ready_timeout_s
        self.extra_args = list(extra_args)
        self.process: Optional[subprocess.Popen] = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        """The server's output so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> "TritonServer":
        """Start the server and wait until it is ready. Raises MedgeError with the log's tail when it is not."""
        env = self.environment
        self.http_port, self.grpc_port, self.metrics_port = _free_ports(3)
        command = [str(env.server), f"--model-repository={self.repository}", f"--backend-directory={env.backends}",
                   "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                   "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                   "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                   "--allow-metrics=true", "--allow-gpu-metrics=false", "--exit-timeout-secs=10",
                   # a prefix of our own: two servers on one machine must not share python-backend shared memory
                   f"--backend-config=python,shm-region-prefix-name=medge{os.getpid()}x{self.http_port}_"]
        if self.models is not None:
            command += ["--model-control-mode=explicit"] + [f"--load-model={m}" for m in self.models]
        command += self.extra_args
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env.environ(), start_new_session=True,
                                            # not the caller's folder: the stubs put their working folder first
                                            # on sys.path, and a source checkout there would shadow medge
                                            cwd=str(self.log_path.parent))
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MedgeError(f"tritonserver exited with status {self.process.returncode} before it was ready:\n"
                                 + self._tail())
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise MedgeError(f"tritonserver was not ready after {self.ready_timeout_s:.0f} s:\n" + self._tail())

    def _tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, timeout_s: float = 60.0) -> Optional[int]:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``); returns its exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: the stubs go with it
                process.wait()
        # A server that died (or failed to load a model) may leave python stubs in its process group.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        return process.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TritonDicomClient:
    """DICOM bytes to a medge ensemble over HTTP or gRPC (tritonclient); one client per thread.

    Args:
        url: ``HOST:PORT``.
        protocol: "http" or "grpc".
        timeout_s: per-request network timeout.

    Raises:
        MissingDependency: tritonclient is not installed (extra ``triton``).
    """

    def __init__(self, url: str, protocol: str = "http", *, timeout_s: float = 120.0) -> None:
        if protocol not in ("http", "grpc"):
            raise MedgeError(f"protocol must be http or grpc, got {protocol!r}")
        try:
            if protocol == "http":
                import tritonclient.http as client_module
            else:
                import tritonclient.grpc as client_module
            from tritonclient.utils import InferenceServerException
        except ImportError as exc:
            raise MissingDependency("tritonclient", TRITON_EXTRA, "Talking to Triton") from exc
        self.protocol = protocol
        self._module = client_module
        self._error = InferenceServerException
        if protocol == "http":
            self.client = client_module.InferenceServerClient(url, connection_timeout=timeout_s,
                                                              network_timeout=timeout_s)
        else:
            self.client = client_module.InferenceServerClient(url)
        self.timeout_s = timeout_s

    def infer(self, model: str, dicoms: Sequence[bytes]) -> dict:
        """Send ``dicoms`` as one request (one batch row each); returns {output name: array}.

        Raises:
            MedgeError: the server refused the request (its message, e.g. medge's DicomError text).
        """
        import numpy as np

        blobs = np.array([[bytes(d)] for d in dicoms], dtype=object)
        tensor = self._module.InferInput("DICOM", list(blobs.shape), "BYTES")
        tensor.set_data_from_numpy(blobs)
        try:
            if self.protocol == "grpc":
                result = self.client.infer(model, [tensor], client_timeout=self.timeout_s)
            else:
                result = self.client.infer(model, [tensor])
        except self._error as exc:
            raise MedgeError(exc.message() if callable(getattr(exc, "message", None)) else str(exc)) from None
        response = result.get_response()
        names = [o["name"] for o in response["outputs"]] if isinstance(response, dict) else \
            [o.name for o in response.outputs]
        outputs = {name: result.as_numpy(name) for name in names}
        scores = outputs.get("SCORES")
        if scores is None or scores.size == 0 or len(scores) != len(dicoms):
            raise MedgeError(f"{model} answered with empty or missing SCORES: Triton 24.10's python backend "
                             "returns empty outputs under numpy 2; run it with numpy < 2")
        return outputs

    def statistics(self, model: str) -> dict:
        """{"inference_count", "execution_count"} of ``model`` since the server started."""
        stats = self.client.get_inference_statistics(model)
        entry = stats["model_stats"][0] if isinstance(stats, dict) else stats.model_stats[0]
        if isinstance(entry, dict):
            return {"inference_count": int(entry.get("inference_count", 0)),
                    "execution_count": int(entry.get("execution_count", 0))}
        return {"inference_count": int(entry.inference_count), "execution_count": int(entry.execution_count)}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "TritonDicomClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
