"""TensorRT and TensorRT-RTX engines from strongly typed ONNX graphs.

One module for both flavours (DESIGN.md, "TensorRT"):

- ``flavour="tensorrt"``: the ``tensorrt`` module, 10.12+ and 11.x (Jetson /
  IGX Orin, data-centre GPUs). Needs a GPU to build; the engine is for that
  GPU. A timing cache file can be reused across builds.
- ``flavour="tensorrt_rtx"``: the ``tensorrt_rtx`` module (RTX workstation
  GPUs). Builds ahead of time on the CPU, with no GPU, for a set of compute
  capabilities (the library's default set unless ``compute_capabilities`` is
  given), so conversion runs for real in CI.

Precision is not a builder setting: TensorRT 11 removed the FP16/INT8 flags
and TensorRT-RTX never had them. It lives in the ONNX graph (an FP16 graph,
or an INT8 graph with explicit QuantizeLinear/DequantizeLinear), and the
``precision`` argument is only recorded. What the engine really computes in
is read back from its layer information and counted in
``EngineInfo.layer_precisions``.

Layer information. Full TensorRT: the engine inspector
(``engine.create_engine_inspector().get_engine_information(JSON)``) on the
deserialised engine, with an execution context at the profile's opt shapes
so formats of dynamic-shape tensors are resolved. TensorRT-RTX: an inspector
exists only on a deserialised engine, and deserialising needs a GPU
(``deserialize_cuda_engine`` fails with cudaError 35 without one; there is no
inspector on the builder or the serialised plan). So on RTX the inspector is
tried, and when it cannot run the layer information comes from the builder
itself: with ``ProfilingVerbosity.DETAILED`` the RTX builder logs, at VERBOSE
severity, the finished engine's per-layer table (``Layers:`` then one line
per engine layer with its input/constant/output tensors, each with
``Datatype``) — the same per-layer facts the inspector reports, produced from
the built engine, not from the ONNX. ``<engine>.layers.json`` records which
source was used (``"source": "engine-inspector"`` or ``"builder-log"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from .._tensorrt import FLAVOURS, gc_paused
from .._tensorrt import LABELS as _LABELS
from .._tensorrt import import_flavour as _import_flavour
from .._tensorrt import make_logger as _make_logger
from .._tensorrt import summarise as _summarise
from ..errors import BackendUnavailable, ConversionError
from .._fs import atomic_write

__all__ = [
    "FLAVOURS",
    "PRECISIONS",
    "RTX_DEFAULT_COMPUTE_CAPABILITIES",
    "EngineInfo",
    "build_engine",
    "engine_cache_key",
    "layer_precisions",
    "parse_builder_layer_log",
]

_LOG = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
#: What a TensorRT-RTX engine built with no compute capability set runs on,
#: per the TensorRT-RTX docs ("CPU-Only AOT and TensorRT-RTX Engines": "By
#: default, an engine built by TensorRT-RTX can be run on GPU devices with
#: compute capability 8.0, 8.6, 8.9, and 12.0"). The builder itself reports 0
#: targets in that case, so this list is the documented default, not a value
#: read back from the engine. Turing (7.5) is opt-in only.
RTX_DEFAULT_COMPUTE_CAPABILITIES = ("8.0", "8.6", "8.9", "12.0")
_CACHE_KEY_SCHEMA = "medge-engine-cache/1"
#: Canonical data-type names, as TensorRT prints them in layer information.
_DTYPE_ORDER = ("Float", "Half", "BFloat16", "Int8")

Progress = Callable[[str], None]


@dataclass
class EngineInfo:
    """What a build produced; ``to_manifest()`` is its entry in a bundle manifest.

    Attributes:
        file: path of the serialised engine (plan).
        size_bytes: its size.
        flavour: "tensorrt" or "tensorrt_rtx".
        flavour_version: the module's ``__version__``.
        precision: the precision the ONNX graph was made in (recorded, not applied).
        profile: {"min", "opt", "max"} batch sizes of the optimization profile.
        compute_capabilities: the "major.minor" targets the engine runs on; for
            an RTX build with no explicit targets, RTX_DEFAULT_COMPUTE_CAPABILITIES.
            None when unknown (full TensorRT without cuda-python to ask the GPU).
        gpu: {"name", "compute_capability", "sm_count"} of the GPU the engine was
            built for; None when it was built without one (RTX ahead of time).
        layers_file: path of ``<engine>.layers.json``.
        layer_precisions: engine layers per data type ({"Float": 3, "Half": 0,
            "Int8": 12, ...}); see ``layer_precisions()`` for the rule.
        layer_info_source: "engine-inspector" or "builder-log" (see module doc).
        build_seconds: wall time of parse + build + write.
    """

    file: str
    size_bytes: int
    flavour: str
    flavour_version: str
    precision: str
    profile: dict
    compute_capabilities: Optional[list]
    gpu: Optional[dict]
    layers_file: str
    layer_precisions: dict
    build_seconds: float
    layer_info_source: str = "none"
    warnings: list = field(default_factory=list)

    def to_manifest(self) -> dict:
        """The bundle-manifest entry: file names relative to the engine's folder."""
        return {
            "file": Path(self.file).name,
            "precision": self.precision,
            "flavour": self.flavour,
            "flavour_version": self.flavour_version,
            "compute_capabilities": list(self.compute_capabilities) if self.compute_capabilities is not None else None,
            "gpu": dict(self.gpu) if self.gpu is not None else None,
            "profile": dict(self.profile),
            "size_bytes": int(self.size_bytes),
            "layers_file": Path(self.layers_file).name,
            "layer_precisions": dict(self.layer_precisions),
            "build_seconds": round(float(self.build_seconds), 3),
        }


def engine_cache_key(flavour: str, flavour_version: str, gpu_name: Optional[str],
                     compute_capability: Union[str, Sequence[str], None], sm_count: Optional[int],
                     model_sha256: str, precision: str,
                     profile: Union[Mapping[str, int], Sequence[int]]) -> str:
    """A stable SHA-256 hex digest naming one engine build (DESIGN.md, "Cache key").

    Two builds share a key exactly when they share flavour + version, GPU name,
    compute capability, SM count, model SHA-256, precision and optimization
    profile. An RTX engine built ahead of time for no particular GPU passes
    ``gpu_name=None, sm_count=None`` and its target list as
    ``compute_capability`` (order does not matter).

    Args:
        profile: {"min", "opt", "max"} or a (min, opt, max) sequence.

    Raises:
        ValueError: ``model_sha256`` is not 64 hex digits, or ``profile`` is not three sizes.
    """
    sha = str(model_sha256).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ValueError(f"model_sha256 must be 64 hex digits, got {model_sha256!r}")
    if isinstance(profile, Mapping):
        sizes = [profile.get("min"), profile.get("opt"), profile.get("max")]
    else:
        sizes = list(profile)
    if len(sizes) != 3 or any(s is None for s in sizes):
        raise ValueError(f"profile must be (min, opt, max) or {{'min','opt','max'}}, got {profile!r}")
    if compute_capability is None:
        cc: Any = None
    elif isinstance(compute_capability, str):
        cc = _normalise_cc(compute_capability)
    else:
        cc = sorted({_normalise_cc(c) for c in compute_capability})
    record = {
        "schema": _CACHE_KEY_SCHEMA,
        "flavour": str(flavour),
        "flavour_version": str(flavour_version),
        "gpu_name": str(gpu_name).strip() if gpu_name else None,
        "compute_capability": cc,
        "sm_count": int(sm_count) if sm_count is not None else None,
        "model_sha256": sha,
        "precision": str(precision).lower(),
        "profile": [int(s) for s in sizes],
    }
    blob = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _normalise_cc(value: Any) -> str:
    """"8.6", "86", "sm86", "SM_86", 8.6 -> "8.6"; "current" -> "current"."""
    text = str(value).strip().lower().replace("sm_", "").replace("sm", "")
    if text == "current":
        return "current"
    match = re.fullmatch(r"(\d+)\.(\d)", text) or re.fullmatch(r"(\d+)(\d)", text)
    if not match:
        raise ConversionError(f"compute capability {value!r} is not of the form '8.6'")
    return f"{int(match.group(1))}.{int(match.group(2))}"


# --------------------------------------------------------------------------- build


def build_engine(onnx_path: Union[str, os.PathLike], output_path: Union[str, os.PathLike], *,
                 flavour: str, precision: str, batch: Optional[Sequence[int]] = None,
                 workspace_bytes: Optional[int] = None, optimization_level: int = 3,
                 timing_cache_path: Union[str, os.PathLike, None] = None,
                 compute_capabilities: Optional[Sequence[Any]] = None,
                 progress: Optional[Progress] = None) -> EngineInfo:
    """Build a strongly typed engine from an ONNX graph and write it atomically.

    Args:
        onnx_path: the ONNX model (external data next to it is found).
        output_path: where the plan goes; ``<output_path>.layers.json`` is
            written beside it.
        flavour: "tensorrt" (10.12+ / 11.x) or "tensorrt_rtx".
        precision: "fp32", "fp16", "bf16", "int8" or "fp8": the precision the
            graph was made in. Recorded only; a warning is logged when the
            engine's layers do not show it (e.g. "int8" with no Int8 layer).
        batch: (min, opt, max) batch sizes of the optimization profile, used
            for every input whose batch (first) dimension is dynamic; the
            other dimensions come from the ONNX and must be fixed. None: the
            model's static batch, or (1, 1, 1) for a dynamic one.
        workspace_bytes: workspace memory-pool limit; None keeps the default.
        optimization_level: builder optimization level, 0-5.
        timing_cache_path: full TensorRT only: loaded when the file exists,
            saved after the build, so builds on one machine reuse timings.
            Ignored (with a logged note) for TensorRT-RTX, where a timing
            cache makes the builder query a GPU.
        compute_capabilities: TensorRT-RTX only: targets such as
            ["8.6", "8.9"] ("7.5" for Turing is opt-in; "current" builds for
            the GPU present). None: the library's ahead-of-time default, which
            needs no GPU (RTX_DEFAULT_COMPUTE_CAPABILITIES).
        progress: called with a short stage name ("parsing", "building",
            "writing", "inspecting", "done"). None draws a progress line on
            stderr when it is a terminal.

    Returns:
        EngineInfo (``to_manifest()`` gives the bundle entry).

    Raises:
        ConversionError: bad arguments, the ONNX cannot be read or parsed (the
            message names each failing node, its operator and the parser's
            description), or the build fails (with the builder's errors).
        MissingDependency: the flavour's module is not installed.
        BackendUnavailable: full TensorRT too old, or no GPU for a build that needs one.
    """
    started = time.monotonic()
    onnx_path = Path(onnx_path)
    output_path = Path(output_path)
    precision = _check_precision(precision)
    wanted_batch = _check_batch(batch)
    if not 0 <= int(optimization_level) <= 5:
        raise ConversionError(f"optimization_level must be 0-5, got {optimization_level}")
    if workspace_bytes is not None and int(workspace_bytes) <= 0:
        raise ConversionError(f"workspace_bytes must be positive, got {workspace_bytes}")
    if flavour not in FLAVOURS:
        raise ConversionError(f"unknown engine flavour {flavour!r}: use one of {', '.join(FLAVOURS)}")
    if compute_capabilities is not None and flavour != "tensorrt_rtx":
        raise ConversionError("compute_capabilities applies to tensorrt_rtx only: full TensorRT builds "
                              "for the GPU it runs on")
    if not onnx_path.is_file():
        raise ConversionError(f"ONNX model not found: {onnx_path}")

    trt = _import_flavour(flavour)
    label = f"{_LABELS[flavour]} {trt.__version__}"
    stage = _Stages(progress, f"building {_LABELS[flavour]} engine")
    builder = network = parser = config = None
    # TensorRT calls back into Python (our logger) while holding its own locks, so the cyclic GC is
    # paused for the build (medge._tensorrt explains the deadlock this prevents), and the objects
    # are released explicitly, in reverse order, before it resumes.
    with gc_paused():
        try:
            logger = _make_logger(trt)

            try:
                builder = trt.Builder(logger)
            except Exception as exc:  # pybind raises when the factory returns nullptr (no GPU for full TensorRT)
                raise BackendUnavailable(f"{label} could not create a builder: "
                                         f"{_summarise(logger.errors) or exc}") from exc
            if builder is None:
                raise BackendUnavailable(f"{label} could not create a builder: {_summarise(logger.errors) or 'no reason given'}")

            # Strongly typed: the flag on TensorRT 10.12+ (always on, and ignored, in 11);
            # TensorRT-RTX networks are strongly typed with flags 0.
            flags = 0
            strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
            if flavour == "tensorrt" and strongly_typed is not None:
                flags = 1 << int(strongly_typed)
            network = builder.create_network(flags)

            stage("parsing")
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_path)):
                raise ConversionError(_parser_message(parser, label, onnx_path, logger))
            if network.num_outputs == 0 or network.num_inputs == 0:
                # Protobuf accepts many byte strings as an (empty) ModelProto, and so does the parser.
                raise ConversionError(f"{label} could not parse {onnx_path.name}: it holds no graph inputs or outputs "
                                      f"(is it an ONNX model?)")

            config = builder.create_builder_config()
            profile = _add_profile(builder, network, config, wanted_batch, onnx_path)
            if workspace_bytes is not None:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
            config.builder_optimization_level = int(optimization_level)
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

            timing_cache = None
            gpu = None
            if flavour == "tensorrt":
                gpu = _describe_gpu()
                if timing_cache_path is not None:
                    timing_cache = _load_timing_cache(config, Path(timing_cache_path))
                targets = [gpu["compute_capability"]] if gpu else None
            else:
                if timing_cache_path is not None:
                    _LOG.info("timing_cache_path is ignored for TensorRT-RTX: a timing cache makes its builder "
                              "query a GPU, and RTX builds ahead of time without one")
                targets = _set_compute_capabilities(trt, config, compute_capabilities)
                if targets == ["current"]:
                    gpu = _describe_gpu()
                    targets = [gpu["compute_capability"]] if gpu else None

            stage("building")
            try:
                plan = builder.build_serialized_network(network, config)
            except Exception as exc:
                raise ConversionError(f"{label} failed to build an engine from {onnx_path.name}: "
                                      f"{_summarise(logger.errors) or exc}") from exc
            if plan is None:
                raise ConversionError(f"{label} failed to build an engine from {onnx_path.name}: "
                                      f"{_summarise(logger.errors) or _summarise(logger.warnings) or 'no error was logged'}")

            stage("writing")
            plan_bytes = memoryview(plan).cast("B")
            atomic_write(output_path, plan_bytes)
            if timing_cache is not None:
                _save_timing_cache(config, Path(timing_cache_path))

            stage("inspecting")
            layers_doc = _layer_information(trt, bytes(plan_bytes), logger, profile, flavour)
            counts = layer_precisions(layers_doc["layers"])
            layers_doc["layer_precisions"] = counts
            layers_doc.update(flavour=flavour, flavour_version=str(trt.__version__), precision=precision)
            layers_path = output_path.with_name(output_path.name + ".layers.json")
            atomic_write(layers_path, json.dumps(layers_doc, indent=1).encode())

            warnings = _precision_warnings(precision, counts, layers_doc["source"])
            for text in warnings:
                _LOG.warning("%s: %s", output_path.name, text)
            stage("done")
        finally:
            stage.close()
            # release now, while the GC is still paused
            parser = network = config = builder = plan = plan_bytes = timing_cache = None

    if flavour == "tensorrt_rtx" and compute_capabilities is None:
        targets = list(RTX_DEFAULT_COMPUTE_CAPABILITIES)
    return EngineInfo(
        file=str(output_path),
        size_bytes=output_path.stat().st_size,
        flavour=flavour,
        flavour_version=str(trt.__version__),
        precision=precision,
        profile=profile,
        compute_capabilities=targets,
        gpu=gpu,
        layers_file=str(layers_path),
        layer_precisions=counts,
        build_seconds=time.monotonic() - started,
        layer_info_source=layers_doc["source"],
        warnings=warnings,
    )


def _check_precision(precision: str) -> str:
    value = str(precision).strip().lower()
    if value not in PRECISIONS:
        raise ConversionError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return value


def _check_batch(batch: Optional[Sequence[int]]) -> Optional[tuple]:
    if batch is None:
        return None
    try:
        sizes = tuple(int(b) for b in batch)
    except (TypeError, ValueError):
        raise ConversionError(f"batch must be (min, opt, max) integers, got {batch!r}") from None
    if len(sizes) != 3 or not 1 <= sizes[0] <= sizes[1] <= sizes[2]:
        raise ConversionError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch!r}")
    return sizes


class _Stages:
    """Reports build stages to a callback, or as a light stderr line on a terminal."""

    _ORDER = ("parsing", "building", "writing", "inspecting", "done")

    def __init__(self, callback: Optional[Progress], label: str) -> None:
        self.callback = callback
        self.bar = None
        if callback is None:
            from .._progress import Progress as _Bar

            self.bar = _Bar(label, total=len(self._ORDER))

    def __call__(self, name: str) -> None:
        if self.callback is not None:
            self.callback(name)
        elif self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _call(obj: Any, name: str, default: Any = "") -> Any:
    method = getattr(obj, name, None)
    if method is None:
        return default
    try:
        return method()
    except Exception:
        return default


def _parser_message(parser: Any, label: str, onnx_path: Path, logger: Any) -> str:
    """One line per parser error: node name, operator, error code and description."""
    lines = []
    for i in range(int(parser.num_errors)):
        error = parser.get_error(i)
        node_name = _call(error, "node_name")
        operator = _call(error, "node_operator")
        index = _call(error, "node", -1)
        code = _call(error, "code", None)
        code_name = getattr(code, "name", str(code) if code is not None else "")
        if node_name or operator or (isinstance(index, int) and index >= 0):
            where = f"node '{node_name or f'#{index}'}' (operator {operator or '?'})"
        else:
            where = "the model"
        lines.append(f"  - {where}: {code_name + ': ' if code_name else ''}{_call(error, 'desc')}")
    if not lines:
        lines.append(f"  - {_summarise(logger.errors) or 'no error was reported'}")
    return (f"{label} could not parse {onnx_path.name} ({len(lines)} error{'s' if len(lines) != 1 else ''}):\n"
            + "\n".join(lines))


def _add_profile(builder: Any, network: Any, config: Any, wanted: Optional[tuple], onnx_path: Path) -> dict:
    """One optimization profile over the batch axis of every input whose batch is dynamic."""
    dynamic, static_batches = [], set()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape[1:]):
            axes = [a for a, d in enumerate(shape) if a > 0 and d < 0]
            raise ConversionError(
                f"input '{tensor.name}' of {onnx_path.name} has shape {list(shape)}: dimensions {axes} are "
                "dynamic, but medge builds profiles over the batch axis only; export the model with fixed "
                "non-batch dimensions")
        if shape and shape[0] < 0:
            dynamic.append((tensor.name, shape))
        elif shape:
            static_batches.add(shape[0])
    if not dynamic:
        if len(static_batches) > 1:
            raise ConversionError(f"{onnx_path.name}: inputs have different static batch sizes {sorted(static_batches)}")
        n = static_batches.pop() if static_batches else 1
        if wanted is not None and wanted != (n, n, n):
            raise ConversionError(f"{onnx_path.name} has a static batch of {n}: batch={wanted} cannot apply; "
                                  "export with a dynamic batch dimension")
        return {"min": n, "opt": n, "max": n}
    if wanted is None:
        wanted = (1, 1, 1)
        _LOG.info("%s has a dynamic batch and no batch range was given: building for batch 1 only",
                  onnx_path.name)
    profile = builder.create_optimization_profile()
    for name, shape in dynamic:
        rest = shape[1:]
        profile.set_shape(name, (wanted[0], *rest), (wanted[1], *rest), (wanted[2], *rest))
    config.add_optimization_profile(profile)
    return {"min": wanted[0], "opt": wanted[1], "max": wanted[2]}


# GPU families per compute capability (NVIDIA's "CUDA GPUs - Compute Capability" table), so a refused
# target names the hardware a user knows rather than a number alone.
GPU_FAMILIES = {
    "7.5": "Turing: RTX 20xx, Quadro RTX, T4",
    "8.0": "Ampere: A100, A30",
    "8.6": "Ampere: RTX 30xx, RTX A2000-A6000, A10, A40",
    "8.7": "Jetson AGX Orin / IGX Orin",
    "8.9": "Ada: RTX 40xx, RTX 2000-6000 Ada, L4, L40",
    "9.0": "Hopper: H100, H200, GH200",
    "10.0": "Blackwell: B200, GB200",
    "12.0": "Blackwell: RTX 50xx, RTX PRO Blackwell",
    "12.1": "Blackwell: DGX Spark (GB10)",
}


def rtx_supported_targets(trt: Any) -> list[str]:
    """The "major.minor" compute capabilities this TensorRT-RTX can build for (its ComputeCapability enum)."""
    members = trt.ComputeCapability.__members__
    return [f"{int(m[2:-1])}.{m[-1]}" for m in members if re.fullmatch(r"SM\d+", m)]


def describe_targets(targets: Sequence[str]) -> str:
    """'8.6 (Ampere: RTX 30xx, ...), 8.9 (...)' for messages."""
    return ", ".join(f"{cc} ({GPU_FAMILIES[cc]})" if cc in GPU_FAMILIES else cc for cc in targets)


def check_rtx_targets(wanted: Optional[Sequence[Any]]) -> Optional[list[str]]:
    """Refuse TensorRT-RTX targets it cannot build for, before any data is generated or validated.

    Returns the normalised targets (None: the library's default set).

    Raises:
        ConversionError: an unknown or unsupported target (naming the GPUs RTX can target).
        MissingDependency: tensorrt_rtx is not installed.
    """
    if wanted is None:
        return None
    from .._tensorrt import import_flavour

    trt = import_flavour("tensorrt_rtx", "Building TensorRT-RTX engines")
    return [name for name, _ in _rtx_target_enums(trt, wanted)]


def _rtx_target_enums(trt: Any, wanted: Sequence[Any]) -> list[tuple[str, Any]]:
    if isinstance(wanted, (str, bytes)):
        wanted = [wanted]
    names = []
    for value in wanted:
        cc = _normalise_cc(value)
        if cc not in names:
            names.append(cc)
    if not names:
        raise ConversionError("compute_capabilities is empty: give at least one, or None for the default")
    if "current" in names and len(names) > 1:
        raise ConversionError("compute capability 'current' must be the only target")
    members = trt.ComputeCapability.__members__
    enums = []
    for cc in names:
        member = "CURRENT" if cc == "current" else "SM" + cc.replace(".", "")
        if member not in members:
            family = f" ({GPU_FAMILIES[cc]})" if cc in GPU_FAMILIES else ""
            raise ConversionError(
                f"TensorRT-RTX {trt.__version__} cannot build for compute capability {cc}{family}. It targets "
                f"{describe_targets(rtx_supported_targets(trt))} (or 'current'); for other GPUs build with "
                "full TensorRT (--engine tensorrt) on that GPU")
        enums.append((cc, members[member]))
    return enums


def _set_compute_capabilities(trt: Any, config: Any, wanted: Optional[Sequence[Any]]) -> Optional[list]:
    """Set RTX targets; returns them as "major.minor" strings (None: library default)."""
    if wanted is None:
        return None
    enums = _rtx_target_enums(trt, wanted)
    config.num_compute_capabilities = len(enums)
    for index, (name, value) in enumerate(enums):
        if not config.set_compute_capability(value, index):
            raise ConversionError(f"TensorRT-RTX rejected compute capability {name}")
    return [name for name, _ in enums]


def _describe_gpu() -> Optional[dict]:
    """Name, compute capability and SM count of the current GPU, or None if none can be asked."""
    try:
        from ..runtime import cuda

        rt = cuda._runtime("Describing the GPU")
        if cuda.device_count() < 1:
            return None
        props = cuda.check(rt.cudaGetDeviceProperties(cuda.current_device()), "cudaGetDeviceProperties")
        name = props.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        return {"name": str(name), "compute_capability": f"{props.major}.{props.minor}",
                "sm_count": int(props.multiProcessorCount)}
    except Exception as exc:  # no cuda-python, no driver: the build may still go on (RTX)
        _LOG.debug("cannot describe the GPU: %s", exc)
        return None


def _load_timing_cache(config: Any, path: Path) -> Any:
    data = b""
    if path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        _LOG.warning("timing cache %s does not match this GPU or TensorRT version; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    elif data:
        _LOG.info("reusing timing cache %s (%d bytes)", path, len(data))
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    atomic_write(path, memoryview(cache.serialize()).cast("B"))


def _layer_information(trt: Any, plan: bytes, logger: Any, profile: dict, flavour: str) -> dict:
    """Layer information from the engine inspector, else from the builder's layer table."""
    inspected = _inspect_engine(trt, plan, logger, profile)
    if inspected is not None:
        raw = json.loads(inspected)
        layers = [_layer_from_inspector(layer) for layer in raw.get("Layers", [])]
        typed = any(t.get("dtype") for layer in layers for t in layer["inputs"])
        if typed or not logger.layer_tables:
            return {"source": "engine-inspector", "layers": layers, "raw": raw}
        # The inspector ran but gave no data types (e.g. formats unresolved): the builder's table has them.
        _LOG.debug("engine inspector reported no data types; using the builder's layer table")
    if logger.layer_tables:
        text = logger.layer_tables[-1]
        return {"source": "builder-log", "layers": parse_builder_layer_log(text), "raw": text}
    _LOG.warning("no layer information: the engine inspector could not run (no GPU?) and the %s builder "
                 "logged no layer table", _LABELS[flavour])
    return {"source": "none", "layers": [], "raw": None}


def _inspect_engine(trt: Any, plan: bytes, logger: Any, profile: dict) -> Optional[str]:
    """Engine-inspector JSON of a deserialised engine, or None where that cannot run (no GPU)."""
    logger.quiet = True
    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            return None
        inspector = engine.create_engine_inspector()
        try:
            # With dynamic shapes, formats resolve only for a context with its shapes set.
            context = engine.create_execution_context()
            if context is not None:
                for i in range(engine.num_io_tensors):
                    name = engine.get_tensor_name(i)
                    if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                        shape = list(engine.get_tensor_shape(name))
                        if shape and shape[0] < 0:
                            shape[0] = profile["opt"]
                        context.set_input_shape(name, shape)
                inspector.execution_context = context
        except Exception as exc:
            _LOG.debug("engine inspector without an execution context: %s", exc)
        return inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    except Exception as exc:
        _LOG.debug("engine inspector unavailable: %s", exc)
        return None
    finally:
        logger.quiet = False


_LAYER_LINE = re.compile(
    r"^Name: (?P<name>.*?), LayerType: (?P<type>.*?), Inputs: \[(?P<inputs>.*?)\]"
    r"(?:, Constants: \[(?P<constants>.*?)\])?, Outputs: \[(?P<outputs>.*?)\]"
    r"(?:, TacticName:\s?(?P<tactic>.*?))?(?:, StreamId:\s?(?P<stream>-?\d+))?(?:, Metadata:\s?(?P<metadata>.*))?$")
_TENSOR = re.compile(
    r"\{ Name: (?P<name>.*?), Dimensions: \[(?P<dims>[^\]]*)\].*?, Datatype: (?P<dtype>[^,]*?)"
    r"(?:, Format: (?P<format>.*?))? \}")


def parse_builder_layer_log(text: str) -> list:
    """Parse the engine layer table a builder logs with ProfilingVerbosity.DETAILED.

    The table is one VERBOSE message: ``Layers:`` then a line per engine
    layer (``Name: ..., LayerType: ..., Inputs: [ { Name: ..., Dimensions:
    [...], ..., Datatype: Int8, Format: ... }], Constants: [...], Outputs:
    [...], TacticName: ..., StreamId: 0, Metadata: [ONNX Layer: conv1]``),
    a blank line and the I/O tensor table, which is not parsed.

    Returns:
        [{"name", "type", "inputs", "constants", "outputs", "tactic",
        "metadata"}], each tensor {"name", "dims", "dtype", "format"}.
    """
    layers = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line == "Layers:":
            continue
        if not line.startswith("Name: "):
            if layers:  # the I/O tensor section follows the layers
                break
            continue
        match = _LAYER_LINE.match(line)
        if match is None:
            _LOG.debug("unparsed layer line: %s", line[:200])
            continue
        layers.append({
            "name": match["name"],
            "type": match["type"],
            "inputs": _tensors(match["inputs"]),
            "constants": _tensors(match["constants"] or ""),
            "outputs": _tensors(match["outputs"]),
            "tactic": (match["tactic"] or "").strip(),
            "metadata": _metadata(match["metadata"]),
        })
    return layers


def _metadata(text: Optional[str]) -> list:
    """Layer metadata ("[ONNX Layer: conv1]" items, which TensorRT separates with \\x1f) as a list."""
    return [item.strip() for item in re.split(r"\x1f|\n", text or "") if item.strip()]


def _tensors(text: str) -> list:
    out = []
    for match in _TENSOR.finditer(text):
        dims = [int(d) for d in match["dims"].split(",") if d.strip().lstrip("-").isdigit()]
        out.append({"name": match["name"], "dims": dims, "dtype": _canonical_dtype(match["dtype"]),
                    "format": (match["format"] or "").strip()})
    return out


def _layer_from_inspector(layer: Any) -> dict:
    """An inspector JSON layer in the same shape as parse_builder_layer_log's."""
    if isinstance(layer, str):  # LAYER_NAMES_ONLY verbosity
        return {"name": layer, "type": "", "inputs": [], "constants": [], "outputs": [], "tactic": "", "metadata": []}

    def tensors(items: Any) -> list:
        result = []
        for t in items or []:
            if not isinstance(t, Mapping):
                continue
            dtype_text = t.get("Datatype") or t.get("Format/Datatype") or ""
            result.append({"name": t.get("Name", ""), "dims": list(t.get("Dimensions", []) or []),
                           "dtype": _canonical_dtype(str(dtype_text)),
                           "format": str(t.get("Format") or t.get("Format/Datatype") or "")})
        return result

    return {
        "name": str(layer.get("Name", "")),
        "type": str(layer.get("LayerType", "")),
        "inputs": tensors(layer.get("Inputs")),
        "constants": tensors(layer.get("Constants")),
        "outputs": tensors(layer.get("Outputs")),
        "tactic": str(layer.get("TacticName", layer.get("TacticValue", ""))),
        "metadata": _metadata(str(layer.get("Metadata", ""))),
    }


def _canonical_dtype(text: str) -> Optional[str]:
    """TensorRT's data-type spellings ("Float", "Row major linear FP16 format", "Int8") -> one name."""
    t = text.strip().lower()
    if not t or t.startswith("n/a"):
        return None
    for needle, name in (("bfloat16", "BFloat16"), ("bf16", "BFloat16"), ("uint8", "UInt8"),
                         ("int64", "Int64"), ("int32", "Int32"), ("int8", "Int8"), ("int4", "Int4"),
                         ("fp8", "FP8"), ("fp4", "FP4"), ("e8m0", "E8M0"), ("fp16", "Half"), ("half", "Half"),
                         ("fp32", "Float"), ("float", "Float"), ("bool", "Bool")):
        if needle in t:
            return name
    return text.strip()


def layer_precisions(layers: Iterable[Mapping[str, Any]]) -> dict:
    """Count engine layers per compute data type.

    Rule: a layer computes in the data type of its first input tensor (an
    INT8 convolution reads Int8 activations; the kernels that quantize Float
    activations to Int8 count as Float). Layers without input tensors (shape
    calls) are not counted. "Float", "Half", "BFloat16" and "Int8" are always
    present, possibly 0.
    """
    counts = {name: 0 for name in _DTYPE_ORDER}
    for layer in layers:
        inputs = [t for t in layer.get("inputs", []) if t.get("dtype")]
        if not inputs:
            continue
        dtype = inputs[0]["dtype"]
        counts[dtype] = counts.get(dtype, 0) + 1
    return counts


def _precision_warnings(precision: str, counts: Mapping[str, int], source: str) -> list:
    if source == "none":
        return ["no layer information, so the engine's precision could not be checked"]
    expected = {"int8": "Int8", "fp16": "Half", "bf16": "BFloat16", "fp8": "FP8"}.get(precision)
    if expected and not counts.get(expected):
        return [f"precision {precision} was recorded but no engine layer computes in {expected} "
                f"(layers per type: {dict(counts)}): is the ONNX graph really {precision}?"]
    return []
