"""Precision variants as strongly typed ONNX graphs: FP16, and INT8 with explicit Q/DQ.

TensorRT 11 and TensorRT-RTX take precision from the graph, not from builder
flags, so each precision is its own ONNX file:

- FP16: every float tensor and weight in float16, except the graph output,
  which stays float32. The input is float16 so the preprocessing kernel can
  write fp16 straight into the engine's input binding; the output is cast
  back to float32 (free at the end of the graph) so scores leave the
  network at full precision for softmax and thresholds.
- INT8 comes as two graphs from the same calibration data, each with the
  Q/DQ placement its runtime fuses (measured on the demo model, 2-core CPU:
  ONNX Runtime runs the TensorRT-placed graph 2x slower than FP32, its own
  placement 1.75x faster):
  - ``target="tensorrt"`` (the engines' source): QuantizeLinear/DequantizeLinear pairs as TensorRT requires them:
  symmetric int8 (zero point 0), per-channel weights, per-tensor
  activations, biases left in float (an int32 bias DequantizeLinear is
  rejected by TensorRT's parser). Activation ranges are calibrated on
  inputs produced by medge's own preprocessing with the bundle's
  PreprocessSpec, so calibration sees exactly the deployment's pixels. The
  same graph runs on ONNX Runtime's CPU provider, so INT8 accuracy can be
  measured on any machine.
  - ``target="onnxruntime"`` (the ONNX Runtime CPU backend): ONNX Runtime's
    own placement, Q/DQ around every quantisable op with uint8 asymmetric
    activations and int8 per-channel weights, which its CPU provider fuses
    into QLinearConv / QGemm (U8S8) kernels.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .._progress import Progress
from ..errors import ConversionError, MissingDependency
from .export import _onnx

_LOG = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT8_TARGETS = ("tensorrt", "onnxruntime")
#: Q/DQ goes on the inputs of these ops only (TensorRT's recommended placement): weighted ops and
#: residual adds. Quantising ReLU as well would put a Q/DQ pair between each Conv and its ReLU,
#: which keeps TensorRT from fusing bias + ReLU + requantisation into the int8 convolution.
QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")
#: Fewer calibration images than this give activation ranges that generalise poorly.
DEFAULT_MIN_CALIBRATION_IMAGES = 32
DEFAULT_PERCENTILE = 99.999


def make_fp16(fp32_path: Path, out_path: Path) -> dict:
    """Write the FP16 graph of ``fp32_path`` to ``out_path``.

    Returns:
        {"file", "input_dtype": "float16", "output_dtype": "float32", "float32_nodes": [...]}:
        what the graph takes and gives, and which nodes the converter kept in
        float32 for accuracy.

    Raises:
        ConversionError: the conversion or the check of its result fails.
    """
    onnx = _onnx()
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise MissingDependency("onnxruntime", "convert", "Making the FP16 graph") from exc
    model = onnx.load(str(fp32_path))
    outputs = [o.name for o in model.graph.output]
    try:
        fp16 = convert_float_to_float16(model, keep_io_types=outputs)
        onnx.checker.check_model(fp16)
    except Exception as exc:
        raise ConversionError(f"converting the model to FP16 failed: {exc}") from exc
    onnx.save(fp16, str(out_path))
    kept = [n.name or n.op_type for n in fp16.graph.node
            if n.op_type != "Cast" and all(_is_float32(fp16, t) for t in n.output)]
    return {"file": Path(out_path).name, "input_dtype": "float16", "output_dtype": "float32", "float32_nodes": kept}


def _is_float32(model, tensor_name: str) -> bool:
    onnx = _onnx()
    for value in list(model.graph.value_info) + list(model.graph.output):
        if value.name == tensor_name:
            return value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    return False


@dataclass
class CalibrationSummary:
    """What INT8 calibration saw and produced (stored in the bundle manifest)."""

    method: str
    images: int
    batch_size: int
    batches: int
    percentile: Optional[float]
    seconds: float
    quantized_tensors: int
    quantize_linear_nodes: int
    target: str = "tensorrt"
    weights_per_channel: bool = True
    activations_symmetric: bool = True
    activation_dtype: str = "int8"
    bias_dtype: str = "float32"
    source: str = ""

    def to_manifest(self) -> dict:
        return asdict(self)


def make_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    *,
    method: str = "entropy",
    batch_size: int = 8,
    percentile: float = DEFAULT_PERCENTILE,
    min_images: int = DEFAULT_MIN_CALIBRATION_IMAGES,
    source: str = "",
    target: str = "tensorrt",
    progress: Optional[bool] = None,
) -> CalibrationSummary:
    """Calibrate and write the INT8 Q/DQ graph of ``fp32_path``.

    Args:
        fp32_path: the checked FP32 ONNX graph.
        out_path: where the INT8 graph goes.
        calibration: (N, C, H, W) float32 model inputs, produced by medge's
            preprocessing with the bundle's PreprocessSpec.
        method: "minmax", "entropy" (KL divergence) or "percentile".
        batch_size: images per calibration batch.
        percentile: for method "percentile".
        min_images: refuse fewer calibration images than this.
        source: where the images came from (recorded in the summary).
        target: "tensorrt" (Q/DQ as TensorRT fuses it) or "onnxruntime"
            (as ONNX Runtime's CPU provider fuses it); see the module docstring.
        progress: progress line on stderr (None: when stderr is a terminal).

    Returns:
        CalibrationSummary.

    Raises:
        ConversionError: unknown method, too few images, wrong input shape,
            or quantisation failure.
    """
    if target not in INT8_TARGETS:
        raise ConversionError(f"INT8 target must be one of {', '.join(INT8_TARGETS)}, got {target!r}")
    if method not in CALIBRATION_METHODS:
        raise ConversionError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    count = calibration.shape[0] if calibration.ndim == 4 else 0
    if calibration.ndim != 4:
        raise ConversionError(f"calibration inputs must be (N, C, H, W), got shape {calibration.shape}")
    if count < min_images:
        raise ConversionError(
            f"only {count} calibration image(s); INT8 calibration needs at least {min_images} images that look "
            "like deployment data (more DICOMs in the calibration folder, or lower --min-calibration-images "
            "knowingly)"
        )
    if not np.isfinite(calibration).all():
        raise ConversionError("calibration inputs contain NaN or infinity")
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise MissingDependency("onnxruntime", "convert", "INT8 calibration") from exc

    onnx = _onnx()
    model = onnx.load(str(fp32_path))
    input_name = model.graph.input[0].name
    expected = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    if list(calibration.shape[1:]) != expected:
        raise ConversionError(
            f"calibration inputs have shape {calibration.shape[1:]} per image but the model takes {tuple(expected)}: "
            "check the preprocessing spec"
        )

    batches = [calibration[i : i + batch_size] for i in range(0, count, batch_size)]
    bar = Progress(f"calibrating INT8 for {target} ({method})", len(batches), enabled=progress)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._iter = iter(batches)

        def get_next(self):
            batch = next(self._iter, None)
            if batch is None:
                return None
            bar.update()
            return {input_name: batch}

        def rewind(self) -> None:
            self._iter = iter(batches)

    started = time.monotonic()
    out_path = Path(out_path)
    prepared = out_path.with_name(out_path.stem + ".prep.onnx")
    try:
        # ONNX Runtime's pre-processing folds BatchNorm into Conv and simplifies the graph, so Q/DQ
        # lands where TensorRT fuses it.
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quant_input = prepared
        except Exception:  # noqa: BLE001 - an optimisation, the raw graph quantises too
            _LOG.warning("ONNX Runtime quantisation pre-processing failed; quantising the graph as exported",
                         exc_info=True)
            quant_input = fp32_path
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        if target == "tensorrt":
            op_types, activation_type = list(QUANTIZED_OP_TYPES), QuantType.QInt8
            extra = {
                "ActivationSymmetric": True,  # TensorRT: zero point 0
                "WeightSymmetric": True,
                "QuantizeBias": False,  # TensorRT's parser rejects int32 bias DequantizeLinear
                "AddQDQPairToWeight": True,  # weights as float + Q/DQ: TensorRT folds them into int8 kernels
                "DedicatedQDQPair": False,
                # No Q/DQ on the outputs of weighted ops: the float output flows through bias/ReLU and is
                # quantised at the next weighted op's input, so TensorRT fuses conv + bias + ReLU +
                # requantise, and the logits leave the network in float.
                "OpTypesToExcludeOutputQuantization": ["Conv", "ConvTranspose", "Gemm", "MatMul"],
            }
        else:
            # ONNX Runtime's own defaults (every quantisable op, asymmetric uint8 activations, int8
            # weights, int32 biases): the pattern its CPU provider fuses into U8S8 QLinearConv / QGemm.
            op_types, activation_type, extra = None, QuantType.QUInt8, {}
        if method == "percentile":
            extra["CalibPercentile"] = float(percentile)
        chatter = io.StringIO()  # ONNX Runtime's calibrator prints to stdout; keep it for the debug log
        with contextlib.redirect_stdout(chatter):
            quantize_static(
                str(quant_input), str(out_path), _Reader(),
                op_types_to_quantize=op_types,
                quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
                activation_type=activation_type, weight_type=QuantType.QInt8,
                calibrate_method=methods[method], extra_options=extra,
            )
        _LOG.debug("onnxruntime quantisation output:\n%s", chatter.getvalue())
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"INT8 quantisation failed: {type(exc).__name__}: {exc}") from exc
    finally:
        bar.close()
        prepared.unlink(missing_ok=True)
    seconds = time.monotonic() - started

    quantized = onnx.load(str(out_path))
    q_nodes = [n for n in quantized.graph.node if n.op_type == "QuantizeLinear"]
    if target == "tensorrt":
        _check_tensorrt_qdq(quantized)
    return CalibrationSummary(
        method=method, images=count, batch_size=batch_size, batches=len(batches),
        percentile=float(percentile) if method == "percentile" else None, seconds=round(seconds, 3),
        quantized_tensors=len({n.input[0] for n in q_nodes}), quantize_linear_nodes=len(q_nodes), source=source,
        target=target, activations_symmetric=target == "tensorrt",
        activation_dtype="int8" if target == "tensorrt" else "uint8",
        bias_dtype="float32" if target == "tensorrt" else "int32",
    )


def _check_tensorrt_qdq(model) -> None:
    """The Q/DQ graph must follow TensorRT's rules; a violation is a medge bug, reported clearly."""
    onnx = _onnx()
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) > 2 and node.input[2] in initializers:
            zero_point = numpy_helper.to_array(initializers[node.input[2]])
            if zero_point.dtype != np.int8 or np.any(zero_point != 0):
                raise ConversionError(f"Q/DQ node {node.name} has a non-symmetric int8 zero point (TensorRT needs 0)")
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            data = initializers[node.input[0]]
            if data.data_type == onnx.TensorProto.INT32:
                raise ConversionError(f"{node.name} dequantises an int32 tensor (a quantised bias), which TensorRT rejects")
