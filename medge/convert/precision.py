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
import heapq
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

#: Accuracy control (``make_int8(min_top1_agreement=...)``): the INT8 graph must give FP32's top-1 label on at
#: least this fraction of the check images, else its most sensitive layers stay in float until it does.
DEFAULT_MIN_TOP1_AGREEMENT = 0.99
#: Accuracy control never keeps more than this fraction of the quantised layers in float: past it the graph is
#: not an INT8 graph any more, and the conversion's gates report the failure instead.
MAX_FLOAT_LAYER_FRACTION = 0.5

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
        _sort_topologically(fp16.graph)
        onnx.checker.check_model(fp16)
    except Exception as exc:
        raise ConversionError(f"converting the model to FP16 failed: {exc}") from exc
    onnx.save(fp16, str(out_path))
    kept = [n.name or n.op_type for n in fp16.graph.node
            if n.op_type != "Cast" and all(_is_float32(fp16, t) for t in n.output)]
    return {"file": Path(out_path).name, "input_dtype": "float16", "output_dtype": "float32", "float32_nodes": kept}


def _sort_topologically(graph) -> None:
    """Put ``graph``'s nodes in an order where every input is made before it is used (in place).

    ONNX Runtime's FP16 converter appends the Casts it adds for inputs that must stay float32 (Resize's scales,
    e.g. MONAI SegResNet's trilinear upsampling) at the end of the node list, after the nodes that read them,
    and ONNX requires topological order. Nodes already in order keep their relative order (stable Kahn sort).
    """
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes = list(graph.node)
    producers = {out: index for index, node in enumerate(nodes) for out in node.output}
    waiting: dict[int, set] = {}
    users: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        # Subgraph (If/Loop) bodies may read outer tensors: count those as inputs too.
        needed = set(node.input) | {name for attr in node.attribute if attr.g.node
                                    for inner in attr.g.node for name in inner.input}
        deps = {producers[name] for name in needed if name not in known and name in producers} - {index}
        waiting[index] = deps
        for dep in deps:
            users.setdefault(dep, []).append(index)
    ready = [index for index, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for user in users.get(index, ()):
            waiting[user].discard(index)
            if not waiting[user]:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        raise ConversionError("the FP16 graph has a cycle: it cannot be ordered")
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


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
    #: What accuracy control measured and did (``AccuracyControl.to_manifest()``); None when it was off.
    accuracy_control: Optional[dict] = None

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
    min_top1_agreement: Optional[float] = DEFAULT_MIN_TOP1_AGREEMENT,
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
        min_top1_agreement: accuracy control. The INT8 graph's top-1 label must equal FP32's on at least this
            fraction of the calibration images (ONNX Runtime, as the CPU backend runs it); if it does not, the
            layers whose quantised inputs lose the most signal (lowest SQNR) stay in float, as few as pass, at
            most MAX_FLOAT_LAYER_FRACTION of them, and the summary's ``accuracy_control`` says which and why.
            None: off.
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

    # Every batch the same size: ONNX Runtime's entropy and percentile calibrators stack each tensor's batches
    # into one array and fail on a ragged last one ("inhomogeneous shape", e.g. 33 images in batches of 4). The
    # largest size up to batch_size that divides the count keeps every image.
    batch_size = max(size for size in range(1, max(1, int(batch_size)) + 1) if count % size == 0)
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
        if target == "onnxruntime":
            _outputs_in_float(out_path)
        control = None
        if min_top1_agreement is not None:
            control = _accuracy_control(fp32_path, out_path, calibration, quant_input, target=min_top1_agreement,
                                        batch_size=batch_size)
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
        activation_dtype=fmt.activation_dtype, bias_dtype=fmt.bias_dtype, format=fmt, accuracy_control=control,
    )


def _outputs_in_float(path: Path) -> None:
    """Take the Q/DQ pair off each graph output of ONNX Runtime's placement: the scores leave in float.

    ONNX Runtime's quantiser quantises the network's output too, with a calibrated range: entropy calibration
    clips the largest logits (the confident ones), and a uint8 step of the output range is a coarse error on a
    score. Nothing runs after the output, so its Q/DQ buys no integer kernel; the TensorRT placement never has it.
    """
    onnx = _onnx()
    model = onnx.load(str(path))
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    changed = False
    for output in graph.output:
        dq = producers.get(output.name)
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in {i.name for i in graph.initializer}:
            continue
        readers = [n for n in graph.node if q.output[0] in n.input]
        if readers != [dq]:
            continue  # the quantised output feeds something else too: leave the pair
        float_name = q.input[0]
        for node in graph.node:  # the float tensor takes the output's name, for its producer and any reader
            node.output[:] = [output.name if name == float_name else name for name in node.output]
            node.input[:] = [output.name if name == float_name else name for name in node.input]
        graph.node.remove(q)
        graph.node.remove(dq)
        changed = True
    if changed:
        used = {name for node in graph.node for name in node.input}
        for init in [i for i in graph.initializer if i.name not in used]:
            graph.initializer.remove(init)
        onnx.save(model, str(path))


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


# ------------------------------------------------------------------------------------------------ accuracy control
#
# What NNCF's quantize_with_accuracy_control and Polygraphy's precision debugging do, written small: NNCF would
# re-quantise the graph itself (its own Q/DQ placement, not TensorRT's or ONNX Runtime's) and Polygraphy brings a
# TensorRT-centred toolchain; here the graph is calibrated once and layers are returned to float by editing Q/DQ,
# so both placements keep their exact form and their ranges.


def _session_outputs(model, x: np.ndarray, batch_size: int, *, optimise: bool = True, names=None) -> list:
    """Outputs ``names`` (default: the first graph output) of ``model`` on ``x``, by batch, concatenated."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    names = names or [session.get_outputs()[0].name]
    return [session.run(names, {input_name: x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]


def _top1(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([out[0] for out in _session_outputs(model, x, batch_size)]).argmax(1)


def _qdq_pairs(model, float_initializers: Optional[dict] = None):
    """(producers, initializers, [(node, [(float tensor, dequantised tensor)], [weight SQNR dB])]) for every node
    that reads a DequantizeLinear output: the graph's quantised layers. Integer weights (ONNX Runtime's
    placement) get an SQNR when ``float_initializers`` has their float original (``<name>_quantized`` naming)."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    layers = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        activations, weights = [], []
        for name in node.input:
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                # An integer initializer (ONNX Runtime's placement): compared with its float original, if known.
                source = dq.input[0]
                original = (float_initializers or {}).get(source[: -len("_quantized")]) \
                    if source.endswith("_quantized") else None
                if source in initializers and original is not None and "bias" not in source.lower() \
                        and numpy_helper.to_array(initializers[source]).dtype != np.int32:
                    w = numpy_helper.to_array(original).astype(np.float64)
                    zero = (numpy_helper.to_array(initializers[dq.input[2]])
                            if len(dq.input) > 2 and dq.input[2] in initializers else None)
                    restored = _dequantize(numpy_helper.to_array(initializers[source]),
                                           numpy_helper.to_array(initializers[dq.input[1]]), zero, _axis(dq))
                    if restored.shape == w.shape:
                        weights.append(_sqnr_db(float((w**2).sum()), float(((w - restored) ** 2).sum())))
                continue
            if q.input[0] in initializers:
                weights.append(_weight_sqnr_db(q, initializers))
            else:
                activations.append((q.input[0], dq.output[0]))
        if activations or weights:
            layers.append((node, activations, weights))
    return producers, initializers, layers


def _sqnr_db(signal: float, noise: float) -> float:
    return 200.0 if noise <= 0 else float(10 * np.log10(max(signal, 1e-30) / noise))


def _axis_shape(scale: np.ndarray, ndim: int, axis: int) -> tuple:
    shape = [1] * ndim
    if scale.ndim and scale.size > 1:
        shape[axis % ndim] = scale.size
    return tuple(shape)


def _dequantize(data: np.ndarray, scale: np.ndarray, zero_point: Optional[np.ndarray], axis: int) -> np.ndarray:
    shape = _axis_shape(scale, data.ndim, axis)
    zero = 0 if zero_point is None else zero_point.astype(np.float64).reshape(shape)
    return ((data.astype(np.float64) - zero) * scale.astype(np.float64).reshape(shape)).astype(np.float32)


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _weight_sqnr_db(q, initializers) -> float:
    """SQNR of a float weight through its QuantizeLinear (TensorRT's placement keeps weights as float + Q/DQ)."""
    from onnx import numpy_helper

    w = numpy_helper.to_array(initializers[q.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(initializers[q.input[1]]).astype(np.float64)
    zero = numpy_helper.to_array(initializers[q.input[2]]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.int8)
    info = np.iinfo(zero.dtype)
    shape = _axis_shape(scale, w.ndim, _axis(q))
    z = zero.astype(np.float64).reshape(shape) if zero.size > 1 else float(zero)
    s = scale.reshape(shape)
    restored = (np.clip(np.rint(w / s) + z, info.min, info.max) - z) * s
    return _sqnr_db(float((w**2).sum()), float(((w - restored) ** 2).sum()))


def _layer_sensitivity(model, x: np.ndarray, batch_size: int, float_model=None) -> list[dict]:
    """Every quantised layer with the SQNR of its quantised inputs on ``x``, least SQNR (most damaged) first.

    Activation SQNR compares each tensor before its QuantizeLinear with after its DequantizeLinear, in the INT8
    graph itself (ONNX Runtime with graph optimisations off, so every Q/DQ runs as written; what
    onnxruntime.quantization.qdq_loss_debug calls the QDQ error, accumulated over batches instead of stored). Where
    the quantiser folded a ReLU into a QuantizeLinear, the tensor before it is compared after that ReLU (taken from
    ``float_model``, the graph that was quantised), so the ReLU is not counted as noise.
    """
    onnx = _onnx()
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    _, _, layers = _qdq_pairs(probe, None if float_model is None else
                              {init.name: init for init in float_model.graph.initializer})
    if float_model is not None:
        float_producers = {out: node for node in float_model.graph.node for out in node.output}
        restored: dict[str, str] = {}
        layers = [(node, [(_with_folded_activation(probe.graph, before, float_producers, restored), after)
                          for before, after in activations], weights) for node, activations, weights in layers]
    tensors = sorted({t for _, activations, _ in layers for pair in activations for t in pair})
    present = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    signal = dict.fromkeys(tensors, 0.0)
    noise = dict.fromkeys(tensors, 0.0)
    for values in _session_outputs(probe, x, batch_size, optimise=False, names=tensors):
        by_name = dict(zip(tensors, values))
        for _, activations, _ in layers:
            for before, after in activations:
                a, b = by_name[before].astype(np.float64), by_name[after].astype(np.float64)
                signal[after] += float((a * a).sum())
                noise[after] += float(((a - b) ** 2).sum())
    ranked = []
    for node, activations, weights in layers:
        sqnr = [_sqnr_db(signal[after], noise[after]) for _, after in activations] + list(weights)
        ranked.append({"node": node.name, "op": node.op_type, "input_sqnr_db": round(min(sqnr), 2)})
    return sorted(ranked, key=lambda layer: layer["input_sqnr_db"])


#: Activations ONNX Runtime's quantiser folds into the QuantizeLinear after them (a uint8 range that starts at 0
#: is a ReLU): a layer that reads the tensor before that QuantizeLinear must get the activation back.
_FOLDED_ACTIVATIONS = ("Relu", "Clip")


def _with_folded_activation(graph, tensor: str, float_producers: dict, restored: dict) -> str:
    """``tensor`` (a float tensor before a QuantizeLinear) after the ReLU / Clip the quantiser folded into that
    QuantizeLinear, if it folded one (the graph that was quantised has such a node making ``tensor``, this graph
    does not): a node is added to ``graph`` once per tensor. Otherwise ``tensor`` itself."""
    onnx = _onnx()
    folded = float_producers.get(tensor)
    maker = next((n for n in graph.node if tensor in n.output), None)
    if folded is None or folded.op_type not in _FOLDED_ACTIVATIONS or maker is None or maker.op_type == folded.op_type:
        return tensor
    if tensor not in restored:
        activation = onnx.NodeProto()
        activation.CopyFrom(folded)
        activation.name = f"{folded.name or folded.op_type}_restored_for_float"
        activation.input[0] = tensor
        activation.output[:] = [tensor + "_restored_activation"]
        graph.node.insert(list(graph.node).index(maker) + 1, activation)
        restored[tensor] = activation.output[0]
    return restored[tensor]


def _keep_in_float(model, node_names, float_model):
    """A copy of ``model`` in which the named nodes read float inputs: the tensor before each QuantizeLinear that
    feeds them (with the ReLU / Clip the quantiser folded into that QuantizeLinear, taken from ``float_model``,
    the graph that was quantised), or for an integer initializer (ONNX Runtime's placement) its float original
    from ``float_model`` (the quantiser's ``<name>_quantized`` naming), else its dequantised value. Q/DQ nodes
    and initializers left unused are removed."""
    onnx = _onnx()
    from onnx import numpy_helper

    float_initializers = {init.name: init for init in float_model.graph.initializer}
    float_producers = {out: node for node in float_model.graph.node for out in node.output}
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    graph = edited.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    restored: dict[str, str] = {}  # float tensor -> the same tensor after its folded activation, made once
    wanted = set(node_names)
    for node in list(graph.node):
        if node.name not in wanted:
            continue
        for index, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = dq.input[0]
            q = producers.get(source)
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = _with_folded_activation(graph, q.input[0], float_producers, restored)
                continue
            if source not in initializers:
                continue
            float_name = source + "_float"
            if float_name not in initializers:
                original = float_initializers.get(source[: -len("_quantized")]) if source.endswith("_quantized") else None
                if original is not None and original.data_type == onnx.TensorProto.FLOAT:
                    value = numpy_helper.to_array(original)
                else:
                    zero = (numpy_helper.to_array(initializers[dq.input[2]])
                            if len(dq.input) > 2 and dq.input[2] in initializers else None)
                    value = _dequantize(numpy_helper.to_array(initializers[source]),
                                        numpy_helper.to_array(initializers[dq.input[1]]), zero, _axis(dq))
                initializers[float_name] = numpy_helper.from_array(value.astype(np.float32), float_name)
                graph.initializer.append(initializers[float_name])
            node.input[index] = float_name
    # Drop the Q/DQ nodes nothing reads any more, then the initializers nothing reads.
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return edited


def _accuracy_control(fp32_path: Path, out_path: Path, x: np.ndarray, quant_input: Path, *, target: float,
                      batch_size: int) -> dict:
    """Keep the most sensitive layers of the INT8 graph at ``out_path`` in float until its top-1 agreement with
    FP32 on ``x`` reaches ``target`` (rewriting the file); returns the manifest record of what was done."""
    onnx = _onnx()
    if not 0.0 < target <= 1.0:
        raise ConversionError(f"min_top1_agreement must be in (0, 1], got {target}")
    fp32 = onnx.load(str(fp32_path))
    scores = fp32.graph.output[0].type.tensor_type.shape
    if len(scores.dim) != 2:
        # Top-1 agreement is a classifier's measure; a per-pixel output is judged by its task's own metrics.
        return {"min_top1_agreement": target, "skipped": f"the first output has {len(scores.dim)} axes, not "
                                                         "(batch, classes): top-1 agreement does not apply"}
    reference = _top1(fp32, x, batch_size)
    model = onnx.load(str(out_path))
    for index, node in enumerate(model.graph.node):  # unique names: layers are kept in float by name
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    before = float((_top1(model, x, batch_size) == reference).mean())
    record = {"min_top1_agreement": target, "check_images": int(len(x)),
              "check_set": "the calibration images (the conversion's gates measure the validation images)",
              "top1_agreement_before": round(before, 4), "top1_agreement": round(before, 4), "float_layers": []}
    if before >= target:
        return record
    started = time.monotonic()
    float_model = onnx.load(str(quant_input))
    ranked = _layer_sensitivity(model, x, batch_size, float_model)
    limit = max(1, int(len(ranked) * MAX_FLOAT_LAYER_FRACTION))
    tried: dict[int, float] = {}

    def agreement(count: int) -> float:
        if count not in tried:
            names = [layer["node"] for layer in ranked[:count]]
            tried[count] = float((_top1(_keep_in_float(model, names, float_model), x, batch_size)
                                  == reference).mean())
        return tried[count]

    # Grow the float set 1, 2, 4, ... layers down the ranking until the target holds, then bisect to the fewest.
    passing, count = None, 1
    while passing is None:
        count = min(count, limit)
        if agreement(count) >= target:
            passing = count
        elif count == limit:
            break
        count *= 2
    record.update({"layers_ranked": len(ranked), "ranked_by": "SQNR of the layer's quantised inputs on the check images",
                   "most_sensitive": ranked[:10]})
    if passing is None:
        record["result"] = (f"the target was not reached with up to {limit} of {len(ranked)} layers in float "
                            f"(best {max(tried.values()):.2%}); the graph stays fully quantised for the gates to judge")
        _LOG.warning("INT8 accuracy control: %s", record["result"])
        record.update({"evaluations": len(tried), "seconds": round(time.monotonic() - started, 1)})
        return record
    failing = passing // 2
    while passing - failing > 1:
        middle = (passing + failing) // 2
        if agreement(middle) >= target:
            passing = middle
        else:
            failing = middle
    kept = ranked[:passing]
    onnx.save(_keep_in_float(model, [layer["node"] for layer in kept], float_model), str(out_path))
    record.update({"top1_agreement": round(tried[passing], 4), "float_layers": kept, "evaluations": len(tried),
                   "seconds": round(time.monotonic() - started, 1),
                   "result": (f"top-1 agreement {before:.2%} < {target:.0%} fully quantised; {passing} of "
                              f"{len(ranked)} layers (lowest input SQNR first) kept in float: {tried[passing]:.2%}")})
    _LOG.info("INT8 accuracy control: %s", record["result"])
    return record
