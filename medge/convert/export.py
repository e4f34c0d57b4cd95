"""Model import: ONNX, torch.export (.pt2), TorchScript or an nn.Module -> checked FP32 ONNX.

Every path ends in the same place: an FP32 ONNX graph (opset >= 17) with a
dynamic batch axis on its input, validated by onnx.checker and shape
inference, loadable by ONNX Runtime. For PyTorch sources, ONNX Runtime's
outputs are compared with PyTorch's on sample inputs before anything else
happens.

Loading never runs pickled Python code: ``.pt2`` programs are read with
``torch.export.load`` (medge's own JSON + tensor serialisation), TorchScript
with ``torch.jit.load`` (TorchScript code, not pickle), and plain
``torch.save`` checkpoints are refused (they need the model's Python class,
so pass the ``nn.Module`` through the Python API instead).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import ConversionError, MissingDependency

_LOG = logging.getLogger(__name__)

#: Lowest ONNX opset medge exports and accepts.
MIN_OPSET = 17
#: ONNX Runtime vs PyTorch: max abs error relative to the output's magnitude.
EXPORT_TOLERANCE = 1e-4


def _onnx():
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependency("onnx", "convert", "Model conversion") from exc
    return onnx


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependency("onnxruntime", "convert", "Running ONNX graphs on the CPU") from exc
    return onnxruntime


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise MissingDependency(
            "torch", "torch", "Importing a PyTorch model (install torch==2.13.0 or your version first)"
        ) from exc
    return torch


@dataclass
class TensorSpec:
    """Name, shape (None or a string for dynamic axes) and numpy dtype name of a graph input/output."""

    name: str
    shape: list
    dtype: str

    def to_manifest(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class ImportedModel:
    """The FP32 ONNX graph medge works from, and what it came from."""

    onnx_path: Path
    source: str  # "onnx", "torch.export", "torchscript", "nn.Module"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    torch_check: Optional[dict] = None  # {"max_abs_error", "relative_error", "samples"} for PyTorch sources
    notes: list[str] = field(default_factory=list)

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]


def _dtype_name(onnx, elem_type: int) -> str:
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def describe_io(model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (excluding initializers) and outputs of an ONNX ModelProto."""
    onnx = _onnx()
    initializers = {init.name for init in model.graph.initializer}

    def spec(value) -> TensorSpec:
        tt = value.type.tensor_type
        shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tt.shape.dim]
        return TensorSpec(value.name, shape, _dtype_name(onnx, tt.elem_type))

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs


def check_onnx(path: Path, spatial_dims: tuple = (2,)) -> "Any":
    """Load, check and shape-infer an ONNX file; return the (inferred) ModelProto.

    ``spatial_dims``: the input ranks accepted after (batch, channels): (2,)
    for image classifiers, (2, 3) for segmentation networks (volumes).

    Raises:
        ConversionError: the file is not a valid ONNX model, its opset is below
            MIN_OPSET, it has not exactly one input, or its batch axis is fixed.
    """
    onnx = _onnx()
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=False)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except FileNotFoundError as exc:
        raise ConversionError(f"model file not found: {path}") from exc
    except Exception as exc:  # onnx raises ValidationError, InferenceError, DecodeError...
        raise ConversionError(f"{Path(path).name} is not a valid ONNX model: {exc}") from exc
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise ConversionError(
            f"{Path(path).name} uses ONNX opset {opset}; medge needs opset {MIN_OPSET} or newer "
            "(re-export it, e.g. torch.onnx.export(..., opset_version=17))"
        )
    inputs, _ = describe_io(model)
    if len(inputs) != 1:
        raise ConversionError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); medge deploys "
            "single-input image models"
        )
    batch = inputs[0].shape[0] if inputs[0].shape else None
    if not isinstance(batch, str) and batch is not None:
        raise ConversionError(
            f"input '{inputs[0].name}' has a fixed batch size of {batch}; re-export the model with a dynamic "
            "batch axis (torch: dynamic_shapes={0: torch.export.Dim('batch')})"
        )
    if len(inputs[0].shape) - 2 not in spatial_dims or not all(isinstance(d, int) for d in inputs[0].shape[1:]):
        expected = "(batch, channels, height, width)" + (
            " or (batch, channels, depth, height, width) for 3-D networks" if 3 in spatial_dims else
            " (a 3-D network is converted with --task segmentation)")
        raise ConversionError(
            f"input '{inputs[0].name}' has shape {inputs[0].shape}; medge expects {expected} with fixed channels "
            "and spatial sizes"
        )
    if inputs[0].dtype != "float32":
        raise ConversionError(f"input '{inputs[0].name}' is {inputs[0].dtype}; medge imports FP32 models")
    return model


def ort_session(path: Path, *, threads: int = 0):
    """A CPU ONNX Runtime session (graph optimisations on)."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's Fail / InvalidGraph / NotImplemented
        raise ConversionError(f"ONNX Runtime cannot load {Path(path).name}: {exc}") from exc


def import_model(
    model: Any,
    workdir: Path,
    *,
    example_input: Optional[np.ndarray] = None,
    sample_inputs: Optional[np.ndarray] = None,
    opset: int = 18,
    spatial_dims: tuple = (2,),
) -> ImportedModel:
    """Turn ``model`` into a checked FP32 ONNX file in ``workdir``.

    Args:
        model: path to ``.onnx``, ``.pt2`` (torch.export) or TorchScript
            (``.pt``/``.ts``/``.torchscript``), or a ``torch.nn.Module``.
        workdir: where ``model.fp32.onnx`` is written.
        example_input: (N, C, H, W) float32 array; needed for an nn.Module or
            a TorchScript model (their input shape is not recorded).
        sample_inputs: inputs for the ONNX Runtime vs PyTorch comparison
            (defaults to ``example_input``).
        opset: ONNX opset for PyTorch exports (>= 17).
        spatial_dims: input ranks accepted after (batch, channels): (2,) for
            classifiers; (2, 3) for segmentation (3-D networks take volumes).

    Returns:
        ImportedModel.

    Raises:
        ConversionError: the model cannot be loaded, exported or checked, or
            ONNX Runtime disagrees with PyTorch by more than 1e-4 relative.
        MissingDependency: onnx / onnxruntime / torch missing (names the extra).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / "model.fp32.onnx"
    if opset < MIN_OPSET:
        raise ConversionError(f"opset {opset} is below the minimum {MIN_OPSET}")

    module, source = None, None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise ConversionError(f"model file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            target.write_bytes(path.read_bytes())
            source = "onnx"
        elif suffix == ".pt2":
            module, source = _load_exported_program(path), "torch.export"
        elif suffix in (".pt", ".pth", ".ts", ".torchscript", ".jit"):
            module, source = _load_torchscript(path), "torchscript"
        else:
            raise ConversionError(
                f"cannot tell the model format of {path.name}: use .onnx, .pt2 (torch.export) or a TorchScript "
                "file (.pt, .ts); for an nn.Module use the Python API"
            )
    else:
        torch = _torch()
        if not isinstance(model, torch.nn.Module):
            raise ConversionError(f"cannot convert a {type(model).__name__}: pass a path or a torch.nn.Module")
        module, source = model, "nn.Module"

    torch_check = None
    if module is not None:
        example = _example_for(module, source, example_input, spatial_dims)
        _export_torch(module, example, target, opset)
        samples = sample_inputs if sample_inputs is not None else example
        torch_check = compare_with_torch(module, target, samples)

    proto = check_onnx(target, spatial_dims)
    inputs, outputs = describe_io(proto)
    opset_used = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    ort_session(target)  # must load in ONNX Runtime before anything else
    return ImportedModel(target, source, inputs, outputs, opset_used, torch_check)


def _load_exported_program(path: Path):
    torch = _torch()
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ConversionError(f"cannot load {path.name} as a torch.export program: {exc}") from exc
    return program


def _load_torchscript(path: Path):
    torch = _torch()
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise ConversionError(
            f"cannot load {path.name} as TorchScript ({exc}); plain torch.save checkpoints are not accepted "
            "because loading them runs pickled code: export with torch.export.save (.pt2) or torch.jit.save, "
            "or pass the nn.Module to medge.convert.convert()"
        ) from exc


def _example_for(module, source: str, example_input: Optional[np.ndarray], spatial_dims: tuple = (2,)):
    torch = _torch()
    if example_input is not None:
        array = np.asarray(example_input, dtype=np.float32)
        if array.ndim - 2 not in spatial_dims:
            raise ConversionError(f"example_input must be (N, C, H, W)" + (" or (N, C, D, H, W)" if 3 in spatial_dims
                                                                           else "") + f", got shape {array.shape}")
        return torch.from_numpy(np.ascontiguousarray(array))
    if source == "torch.export":
        # The program records its input shapes; use them with batch 2 so the batch axis stays symbolic.
        signature = module.graph_signature
        weights = set(signature.inputs_to_parameters) | set(signature.inputs_to_buffers)
        placeholders = [n for n in module.graph.nodes if n.op == "placeholder" and n.name not in weights]
        if placeholders and "val" in placeholders[0].meta:
            shape = [int(d) for d in placeholders[0].meta["val"].shape[1:]]
            return torch.zeros([2, *shape], dtype=torch.float32)  # batch 2 keeps the batch axis symbolic
    raise ConversionError(
        f"a {source} model does not record its input shape: give an example input (--input-shape C H W on the "
        "command line, example_input= in Python)"
    )


def _runnable(module):
    """An ExportedProgram runs through .module(); modules and TorchScript run as they are."""
    return module.module() if module.__class__.__name__ == "ExportedProgram" else module


def _export_torch(module, example, target: Path, opset: int) -> None:
    torch = _torch()
    runnable = _runnable(module)
    if module.__class__.__name__ != "ExportedProgram":
        runnable.eval()  # an ExportedProgram was captured as it is; its module() refuses eval()
    attempts = [
        # The dynamo exporter (torch.export based, the maintained path) first ...
        # external_data=False: one self-contained file (the bundle hashes files; models here are far below 2 GB).
        ("dynamo", dict(dynamo=True, external_data=False,
                        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))),
        # ... the TorchScript exporter as a fallback (TorchScript modules, older graphs).
        ("torchscript", dict(dynamo=False, input_names=["input"], dynamic_axes={"input": {0: "batch"}})),
    ]
    errors = []
    for name, kwargs in attempts:
        try:
            with torch.no_grad():
                torch.onnx.export(runnable, (example,), str(target), opset_version=opset, **kwargs)
            return
        except Exception as exc:  # exporter failures come in many types
            errors.append(f"{name} exporter: {type(exc).__name__}: {str(exc)[:2000]}")
            _LOG.debug("ONNX export with the %s exporter failed", name, exc_info=True)
    raise ConversionError("PyTorch -> ONNX export failed:\n  " + "\n  ".join(errors))


def compare_with_torch(module, onnx_path: Path, samples) -> dict:
    """Run PyTorch and ONNX Runtime on the same inputs; raise if they disagree beyond EXPORT_TOLERANCE."""
    torch = _torch()
    array = samples.numpy() if hasattr(samples, "numpy") else np.asarray(samples, dtype=np.float32)
    array = np.ascontiguousarray(array, dtype=np.float32)
    runnable = _runnable(module)
    with torch.no_grad():
        expected = runnable(torch.from_numpy(array))
    if isinstance(expected, (tuple, list)):
        expected = expected[0]
    expected = expected.detach().cpu().numpy().astype(np.float64)
    session = ort_session(onnx_path)
    got = session.run(None, {session.get_inputs()[0].name: array})[0].astype(np.float64)
    if got.shape != expected.shape:
        raise ConversionError(f"ONNX output shape {got.shape} differs from PyTorch's {expected.shape}")
    max_abs = float(np.abs(got - expected).max()) if got.size else 0.0
    scale = max(float(np.abs(expected).max()), 1e-12)
    relative = max_abs / scale
    result = {"max_abs_error": max_abs, "relative_error": relative, "samples": int(array.shape[0])}
    if not relative <= EXPORT_TOLERANCE:
        raise ConversionError(
            f"ONNX Runtime disagrees with PyTorch on {array.shape[0]} sample input(s): max abs error {max_abs:.3g} "
            f"({relative:.3g} of the output range, limit {EXPORT_TOLERANCE:g})"
        )
    return result


__all__: Sequence[str] = ["ImportedModel", "TensorSpec", "import_model", "check_onnx", "ort_session",
                          "compare_with_torch", "describe_io", "MIN_OPSET"]
