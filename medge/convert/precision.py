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
    own placement, Q/DQ around every quantisable op, which its CPU provider
    fuses into QLinearConv / QGemm kernels. Its number format is one of
    ``ORT_INT8_FORMATS`` (default ``DEFAULT_ORT_INT8_FORMAT``), chosen so the
    graph means the same on every x86 CPU: ONNX Runtime's u8 x s8 kernels
    for AVX2 / AVX-512 CPUs without VNNI (VPMADDUBSW) add two u8*s8 products
    in a saturating int16, so 8-bit weights give wrong sums there and right
    ones on VNNI / AMX CPUs (the demo's 8-bit graph: max logit error 0.44 on
    a VNNI CPU, 4.88 on an AVX2 one; int8 activations do not help, x86 runs
    them as uint8). With 7-bit weights (``reduce_range``, |q| <= 64) two
    products stay within int16 (2 * 255 * 64 = 32640 <= 32767), so no CPU
    can saturate, and the graph gives the same outputs on every CPU; the
    check after quantisation holds every written graph to that. Formats and
    their measurements: ``tools/int8_cpu_study.py``.
    The TensorRT-placed graph needs no such care on the CPU: ONNX Runtime
    fuses no integer kernel from that placement and runs it in float.
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


@dataclass(frozen=True)
class Int8Format:
    """How an INT8 graph stores numbers: activation and weight types, symmetry, granularity, weight bits.

    Recorded in the bundle manifest (``describe()``), so a reader knows which kernels can run the graph
    exactly.
    """

    name: str
    activation_dtype: str  # "int8" | "uint8"
    activations_symmetric: bool
    weight_dtype: str  # "int8" | "uint8"
    weights_symmetric: bool
    weights_per_channel: bool
    weight_bits: int  # 8, or 7 with ONNX Runtime's reduce_range (int8 weights in [-64, 64])
    bias_dtype: str  # "float32" (TensorRT) | "int32" (ONNX Runtime)

    @property
    def u8s8_saturation_free(self) -> bool:
        """True when x86 u8*s8 kernels without VNNI cannot saturate on this graph.

        ONNX Runtime on x86 runs int8 activations as uint8 (it shifts them by 128), so every int8 weight
        meets a value in 0..255; two such products fit int16 only when |weight| <= 64. uint8 weights go
        to the u8*u8 kernels, which widen to int16 before multiplying and never saturate.
        """
        return self.weight_dtype == "uint8" or self.weight_bits <= 7

    def describe(self) -> dict:
        sym = lambda symmetric: "symmetric (zero point 0)" if symmetric else "asymmetric"  # noqa: E731
        weights = (f"{self.weight_dtype} {sym(self.weights_symmetric)}, "
                   f"{'per-channel' if self.weights_per_channel else 'per-tensor'}")
        if self.weight_bits < 8:
            weights += f", {self.weight_bits}-bit (reduce_range: |q| <= 64)"
        return {
            "name": self.name,
            "activations": f"{self.activation_dtype} {sym(self.activations_symmetric)}, per-tensor",
            "weights": weights,
            "bias": self.bias_dtype,
            "x86_u8s8_saturation_free": self.u8s8_saturation_free,
        }


#: The TensorRT-placed graph's format (TensorRT needs zero point 0 and int8; biases stay float).
TENSORRT_INT8_FORMAT = Int8Format("s8s8-symmetric", "int8", True, "int8", True, True, 8, "float32")

#: Formats ONNX Runtime's CPU provider fuses (its own Q/DQ placement), measured by tools/int8_cpu_study.py.
#: Names: activation x weight types, then the weight options.
ORT_INT8_FORMATS = {f.name: f for f in (
    Int8Format("u8s8", "uint8", False, "int8", True, True, 8, "int32"),  # ONNX Runtime's defaults
    Int8Format("u8s8-7bit", "uint8", False, "int8", True, True, 7, "int32"),
    Int8Format("u8s8-7bit-per-tensor", "uint8", False, "int8", True, False, 7, "int32"),
    Int8Format("u8u8", "uint8", False, "uint8", False, True, 8, "int32"),
    Int8Format("u8u8-per-tensor", "uint8", False, "uint8", False, False, 8, "int32"),
    Int8Format("s8s8", "int8", True, "int8", True, True, 8, "int32"),
    Int8Format("s8s8-7bit", "int8", True, "int8", True, True, 7, "int32"),
)}

#: The ONNX Runtime graph's format: saturation-free on every x86 CPU by construction, and the fastest such
#: format measured (tools/int8_cpu_study.py, 2-core Xeon with AMX, ONNX Runtime 1.32, batch 8; emulated
#: AVX2 without VNNI: qemu EPYC-Milan). Demo model: 8-bit u8s8 agrees 100% here but 99.2% (max logit error
#: 4.88) without VNNI; u8s8-7bit 100% (0.39) on both, the same outputs, at the speed of u8s8 (1.5-3x FP32).
#: u8u8 is exact too but runs at FP32's speed; s8s8 saturates worse (x86 runs int8 activations as uint8);
#: per-tensor 7-bit weights are no faster and less accurate; ONNX Runtime's session option
#: session.x64quantprecision=1 fixes the 8-bit graph at FP32's speed and fails to load DenseNet121's.
DEFAULT_ORT_INT8_FORMAT = "u8s8-7bit"

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
    format: Int8Format = TENSORRT_INT8_FORMAT

    def to_manifest(self) -> dict:
        """Plain JSON; ``format`` in words: {"name", "activations", "weights", "bias", "x86_u8s8_saturation_free"}."""
        data = asdict(self)
        data["format"] = self.format.describe()
        return data


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
    ort_format: Optional[str] = None,
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
        ort_format: for target "onnxruntime", a name in ORT_INT8_FORMATS (None: DEFAULT_ORT_INT8_FORMAT).
        progress: progress line on stderr (None: when stderr is a terminal).

    Returns:
        CalibrationSummary.

    Raises:
        ConversionError: unknown method, too few images, wrong input shape,
            or quantisation failure.
    """
    if target not in INT8_TARGETS:
        raise ConversionError(f"INT8 target must be one of {', '.join(INT8_TARGETS)}, got {target!r}")
    if target == "tensorrt":
        if ort_format is not None:
            raise ConversionError("ort_format applies to the ONNX Runtime graph (target='onnxruntime') only")
        fmt = TENSORRT_INT8_FORMAT
    else:
        name = DEFAULT_ORT_INT8_FORMAT if ort_format is None else ort_format
        if name not in ORT_INT8_FORMATS:
            raise ConversionError(f"ONNX Runtime INT8 format must be one of {', '.join(ORT_INT8_FORMATS)}, got {name!r}")
        fmt = ORT_INT8_FORMATS[name]
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
        qtypes = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        if target == "tensorrt":
            op_types = list(QUANTIZED_OP_TYPES)
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
            # ONNX Runtime's own placement (every quantisable op, int32 biases), in the format asked for.
            op_types = None
            extra = {"ActivationSymmetric": fmt.activations_symmetric, "WeightSymmetric": fmt.weights_symmetric}
        if method == "percentile":
            extra["CalibPercentile"] = float(percentile)
        chatter = io.StringIO()  # ONNX Runtime's calibrator prints to stdout; keep it for the debug log
        with contextlib.redirect_stdout(chatter):
            quantize_static(
                str(quant_input), str(out_path), _Reader(),
                op_types_to_quantize=op_types,
                quant_format=QuantFormat.QDQ, per_channel=fmt.weights_per_channel,
                reduce_range=fmt.weight_bits < 8,  # ONNX Runtime: int8 weights in [-64, 64], uint8 in [0, 127]
                activation_type=qtypes[fmt.activation_dtype], weight_type=qtypes[fmt.weight_dtype],
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
    if fmt.u8s8_saturation_free:
        _check_saturation_free(quantized)
    return CalibrationSummary(
        method=method, images=count, batch_size=batch_size, batches=len(batches),
        percentile=float(percentile) if method == "percentile" else None, seconds=round(seconds, 3),
        quantized_tensors=len({n.input[0] for n in q_nodes}), quantize_linear_nodes=len(q_nodes), source=source,
        target=target, weights_per_channel=fmt.weights_per_channel, activations_symmetric=fmt.activations_symmetric,
        activation_dtype=fmt.activation_dtype, bias_dtype=fmt.bias_dtype, format=fmt,
    )


def int8_weight_extremes(model) -> dict[str, int]:
    """Largest |q| of every int8 weight a DequantizeLinear reads from an initializer, by initializer name.

    Weights whose largest |q| is above 64 can saturate ONNX Runtime's u8*s8 kernels on x86 CPUs without VNNI.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    extremes = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            data = numpy_helper.to_array(initializers[node.input[0]])
            if data.dtype == np.int8 and data.size:
                extremes[node.input[0]] = int(np.abs(data.astype(np.int16)).max())
    return extremes


def _check_saturation_free(model) -> None:
    """A graph written as saturation-free must be: no int8 weight outside [-64, 64] (a medge or ONNX Runtime bug)."""
    wide = {name: q for name, q in int8_weight_extremes(model).items() if q > 64}
    if wide:
        raise ConversionError(
            f"INT8 weights {sorted(wide)} use more than 7 bits (largest |q| {max(wide.values())}), which saturates "
            "ONNX Runtime's u8*s8 kernels on x86 CPUs without VNNI; the quantiser ignored reduce_range")


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
