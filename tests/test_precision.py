"""medge.convert.precision: the INT8 formats, written as declared and recorded in the manifest.

The ONNX Runtime graph's default format must be free of u8*s8 saturation by construction (7-bit int8 weights
or uint8 weights), whatever CPU runs it; tests/test_int8_agreement.py measures what that means for accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason='onnx is not installed: pip install "medge[convert]"')
pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from medge.convert.export import ort_session  # noqa: E402
from medge.convert.precision import (  # noqa: E402
    DEFAULT_ORT_INT8_FORMAT,
    ORT_INT8_FORMATS,
    TENSORRT_INT8_FORMAT,
    _check_saturation_free,
    int8_weight_extremes,
    make_int8,
)
from medge.errors import ConversionError  # noqa: E402

CHANNELS = 8


def small_cnn(path: Path) -> Path:
    """conv-relu-conv-add(residual)-relu-globalavgpool-gemm, (batch, 1, 16, 16) -> (batch, 3)."""
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.standard_normal((CHANNELS, 1, 3, 3)).astype(np.float32) * 0.5, "w1"),
        numpy_helper.from_array(rng.standard_normal(CHANNELS).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((CHANNELS, CHANNELS, 3, 3)).astype(np.float32) * 0.2, "w2"),
        numpy_helper.from_array(rng.standard_normal(CHANNELS).astype(np.float32) * 0.1, "b2"),
        numpy_helper.from_array(rng.standard_normal((3, CHANNELS)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(3, np.float32), "fcb"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def inputs(count: int = 40) -> np.ndarray:
    return np.random.default_rng(1).random((count, 1, 16, 16), dtype=np.float32) * 2 - 1


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return small_cnn(tmp_path_factory.mktemp("precision") / "m.onnx")


def _qdq(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return inits, [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


@pytest.mark.parametrize("name", sorted(ORT_INT8_FORMATS))
def test_every_onnxruntime_format_is_written_as_declared(fp32, tmp_path, name):
    fmt = ORT_INT8_FORMATS[name]
    summary = make_int8(fp32, tmp_path / "q.onnx", inputs(), target="onnxruntime", ort_format=name, min_images=16,
                        method="minmax")
    assert summary.format == fmt and summary.activation_dtype == fmt.activation_dtype
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits, qdq = _qdq(model)
    # Activations: the QuantizeLinear nodes of computed tensors carry the activation type (and 0 when symmetric).
    act_zero_points = [inits[n.input[2]] for n in qdq if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert act_zero_points
    assert all(zp.dtype == np.dtype(fmt.activation_dtype) for zp in act_zero_points)
    if fmt.activations_symmetric:
        assert not any(zp.any() for zp in act_zero_points)
    # Weights: stored quantised (DequantizeLinear of an initializer), conv weights with one scale per channel
    # or one per tensor.
    conv_weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits
                    and inits[n.input[0]].ndim == 4]
    assert len(conv_weights) == 2
    for node in conv_weights:
        assert inits[node.input[0]].dtype == np.dtype(fmt.weight_dtype)
        assert inits[node.input[1]].size == (CHANNELS if fmt.weights_per_channel else 1)
        if fmt.weights_symmetric:
            assert not inits[node.input[2]].any()
    extremes = int8_weight_extremes(model)
    if fmt.weight_dtype == "int8":
        assert extremes and max(extremes.values()) <= (64 if fmt.weight_bits == 7 else 127)
        if fmt.weight_bits == 8:
            assert max(extremes.values()) > 64  # full range used: such graphs can saturate without VNNI
    else:
        assert not extremes
    # And it runs close to FP32.
    x = inputs(8)
    ref = ort_session(fp32).run(None, {"input": x})[0]
    out = ort_session(tmp_path / "q.onnx").run(None, {"input": x})[0]
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_default_onnxruntime_format_cannot_saturate_and_is_recorded(fp32, tmp_path):
    assert ORT_INT8_FORMATS[DEFAULT_ORT_INT8_FORMAT].u8s8_saturation_free
    summary = make_int8(fp32, tmp_path / "q.onnx", inputs(), target="onnxruntime", min_images=16)
    assert summary.format.name == DEFAULT_ORT_INT8_FORMAT
    assert max(int8_weight_extremes(onnx.load(str(tmp_path / "q.onnx"))).values(), default=0) <= 64
    manifest = json.loads(json.dumps(summary.to_manifest()))  # plain JSON
    fmt = manifest["format"]
    assert fmt["name"] == DEFAULT_ORT_INT8_FORMAT and fmt["x86_u8s8_saturation_free"] is True
    assert fmt["activations"] == "uint8 asymmetric, per-tensor"
    assert fmt["weights"] == "int8 symmetric (zero point 0), per-channel, 7-bit (reduce_range: |q| <= 64)"
    assert fmt["bias"] == "int32"
    # The flat fields earlier manifests carried stay, consistent with the format.
    assert (manifest["activation_dtype"], manifest["activations_symmetric"], manifest["weights_per_channel"],
            manifest["bias_dtype"]) == ("uint8", False, True, "int32")


def test_tensorrt_graph_keeps_its_format(fp32, tmp_path):
    summary = make_int8(fp32, tmp_path / "t.onnx", inputs(), target="tensorrt", min_images=16, method="minmax")
    assert summary.format == TENSORRT_INT8_FORMAT
    fmt = summary.to_manifest()["format"]
    assert fmt["activations"] == "int8 symmetric (zero point 0), per-tensor"
    assert fmt["weights"] == "int8 symmetric (zero point 0), per-channel" and fmt["bias"] == "float32"
    with pytest.raises(ConversionError, match="target='onnxruntime'"):
        make_int8(fp32, tmp_path / "x.onnx", inputs(), target="tensorrt", ort_format="u8u8", min_images=16)


def test_unknown_format_is_refused(fp32, tmp_path):
    with pytest.raises(ConversionError, match="INT8 format must be one of"):
        make_int8(fp32, tmp_path / "x.onnx", inputs(), target="onnxruntime", ort_format="u4s4", min_images=16)


def test_a_graph_with_8_bit_weights_fails_the_saturation_check(fp32, tmp_path):
    make_int8(fp32, tmp_path / "q.onnx", inputs(), target="onnxruntime", ort_format="u8s8", min_images=16,
              method="minmax")
    with pytest.raises(ConversionError, match="saturates ONNX Runtime's u8\\*s8 kernels"):
        _check_saturation_free(onnx.load(str(tmp_path / "q.onnx")))


def test_saturation_bound():
    """Two u8*s8 products fit VPMADDUBSW's int16 for every activation exactly when |weight| <= 64."""
    assert 2 * 255 * 64 <= np.iinfo(np.int16).max < 2 * 255 * 65
    assert -2 * 255 * 64 >= np.iinfo(np.int16).min


# ------------------------------------------------------------------------------------------------ accuracy control


def _top1(path, x):
    return ort_session(Path(path)).run(None, {"input": x})[0].argmax(1)


def _float_fed(model) -> set:
    """Names of the non-Q/DQ nodes none of whose inputs comes from a DequantizeLinear."""
    producers = {out: n for n in model.graph.node for out in n.output}
    return {n.name for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and not any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)}


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_every_layer_kept_in_float_gives_fp32(fp32, tmp_path, target):
    """The graph edit behind accuracy control: a layer 'kept in float' reads exactly FP32's inputs and weights."""
    from medge.convert.precision import _keep_in_float, _layer_sensitivity

    make_int8(fp32, tmp_path / "q.onnx", inputs(), target=target, min_images=16, min_top1_agreement=None)
    model = onnx.load(str(tmp_path / "q.onnx"))
    layers = _layer_sensitivity(model, inputs(16), 8, onnx.load(str(fp32)))
    assert {layer["op"] for layer in layers} >= {"Conv", "Gemm"}
    assert [layer["input_sqnr_db"] for layer in layers] == sorted(layer["input_sqnr_db"] for layer in layers)
    # Quantised: noise on most inputs (200 dB stands for none: a tensor already on its grid, e.g. after Flatten).
    assert sum(layer["input_sqnr_db"] < 100 for layer in layers) >= len(layers) // 2
    # The graph that was quantised (here the FP32 graph itself: no BatchNorm to fold) gives the float weights
    # (ONNX Runtime's placement stores them as integers) and the ReLUs its quantiser folded into uint8 ranges.
    everything = _keep_in_float(model, [layer["node"] for layer in layers], onnx.load(str(fp32)))
    assert not [n for n in everything.graph.node if n.op_type == "DequantizeLinear"
                and n.output[0] in {i for m in everything.graph.node for i in m.input}
                and any(n.output[0] in m.input for m in everything.graph.node if m.name in {l["node"] for l in layers})]
    onnx.save(everything, str(tmp_path / "float.onnx"))
    x = inputs(8)
    ref = ort_session(fp32).run(None, {"input": x})[0]
    out = ort_session(tmp_path / "float.onnx").run(None, {"input": x})[0]
    quantised = ort_session(tmp_path / "q.onnx").run(None, {"input": x})[0]
    assert np.abs(out - ref).max() < 1e-4 < np.abs(quantised - ref).max()


def near_tie_cnn(fp32: Path, path: Path, x: np.ndarray) -> Path:
    """The small CNN with a two-way head whose decision boundary runs through the middle of ``x``'s pooled
    features (a random direction, threshold at its median; the third class never wins), so some of ``x`` lie
    within INT8's error of the boundary."""
    model = onnx.load(str(fp32))
    probe = onnx.load(str(fp32))
    probe.graph.output.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, None))
    onnx.save(probe, str(path))
    features = ort_session(path).run(["f"], {"input": x})[0]
    direction = np.random.default_rng(5).standard_normal(features.shape[1]).astype(np.float32)
    threshold = float(np.median(features @ direction))
    for init in model.graph.initializer:
        if init.name == "fc":
            init.CopyFrom(numpy_helper.from_array(np.stack([direction, -direction, 0 * direction]), "fc"))
        elif init.name == "fcb":
            init.CopyFrom(numpy_helper.from_array(np.array([-threshold, threshold, -100], np.float32), "fcb"))
    onnx.save(model, str(path))
    return path


# Targets above what plain INT8 gives this toy on images near its boundary (98.5% and 89%, asserted below) that
# one or two float layers reach; its 5-6 layers allow at most 2-3 in float (MAX_FLOAT_LAYER_FRACTION).
@pytest.mark.parametrize("target, min_top1", [("tensorrt", 0.99), ("onnxruntime", 0.97)])
def test_accuracy_control_keeps_the_most_sensitive_layers_in_float_until_the_target_holds(fp32, tmp_path, target,
                                                                                          min_top1):
    x = inputs(400)
    fp32 = near_tie_cnn(fp32, tmp_path / "near_tie.onnx", x)
    plain = make_int8(fp32, tmp_path / "plain.onnx", x, target=target, min_images=16, method="minmax",
                      min_top1_agreement=None)
    assert plain.accuracy_control is None
    reference = _top1(fp32, x)
    before = float((_top1(tmp_path / "plain.onnx", x) == reference).mean())
    assert before < min_top1, "the fixture must make INT8 miss the target for this test to mean anything"

    summary = make_int8(fp32, tmp_path / "q.onnx", x, target=target, min_images=16, method="minmax",
                        min_top1_agreement=min_top1)
    control = json.loads(json.dumps(summary.to_manifest()))["accuracy_control"]
    assert control["top1_agreement_before"] == pytest.approx(before, abs=1e-4)
    assert control["top1_agreement"] >= min_top1 and control["check_images"] == 400
    kept = control["float_layers"]
    assert 1 <= len(kept) <= control["layers_ranked"] // 2 and "not reached" not in control["result"]
    # The most sensitive first: the kept layers are the head of the SQNR ranking.
    assert kept == control["most_sensitive"][: len(kept)]
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert {layer["node"] for layer in kept} <= _float_fed(model)
    assert float((_top1(tmp_path / "q.onnx", x) == reference).mean()) == pytest.approx(control["top1_agreement"])
    # The rest stays quantised, in the declared format.
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    if summary.format.u8s8_saturation_free:
        assert max(int8_weight_extremes(model).values(), default=0) <= 64


def test_accuracy_control_is_quiet_when_int8_already_agrees(fp32, tmp_path):
    summary = make_int8(fp32, tmp_path / "q.onnx", inputs(), target="tensorrt", min_images=16,
                        min_top1_agreement=0.5)
    assert summary.accuracy_control["float_layers"] == [] and summary.accuracy_control["top1_agreement"] >= 0.5
    with pytest.raises(ConversionError, match="min_top1_agreement"):
        make_int8(fp32, tmp_path / "x.onnx", inputs(), target="tensorrt", min_images=16, min_top1_agreement=1.5)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_a_count_that_is_not_a_multiple_of_the_batch_calibrates(fp32, tmp_path, method):
    """33 images in batches of 4 made ONNX Runtime's histogram calibrators fail on the ragged last batch
    ("inhomogeneous shape"); every image is still used, in equal batches."""
    summary = make_int8(fp32, tmp_path / "q.onnx", inputs(33), target="tensorrt", min_images=16, method=method,
                        batch_size=4)
    assert summary.images == 33
    assert summary.batch_size == 3 and summary.batches == 11
    assert _qdq(onnx.load(str(tmp_path / "q.onnx")))[1], "the graph was quantised"


def test_fp16_of_a_graph_with_a_resize_is_in_topological_order(tmp_path):
    """ONNX Runtime's FP16 converter appends the Cast it keeps for Resize's float32 scales after the Resize
    (MONAI SegResNet's trilinear upsampling): the graph failed ONNX's check. make_fp16 orders it again."""
    from medge.convert.precision import make_fp16

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 1, 3, 3, 3)).astype(np.float32),
                                     "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 6),
        helper.make_node("Constant", [], ["scales"],
                         value=numpy_helper.from_array(np.array([1, 1, 2, 2, 2], np.float32))),
        helper.make_node("Resize", ["c", "", "scales"], ["y"], mode="linear"),
    ]
    graph = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 16, 16])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    make_fp16(tmp_path / "m.onnx", tmp_path / "m16.onnx")
    fp16 = onnx.load(str(tmp_path / "m16.onnx"))
    made = {i.name for i in fp16.graph.input} | {i.name for i in fp16.graph.initializer} | {""}
    for node in fp16.graph.node:
        assert set(node.input) <= made, f"{node.op_type} reads a tensor made after it"
        made |= set(node.output)
    x = np.random.default_rng(1).random((1, 1, 4, 8, 8), dtype=np.float32)
    ref = ort_session(tmp_path / "m.onnx").run(None, {"x": x})[0]
    got = ort_session(tmp_path / "m16.onnx").run(None, {"x": x.astype(np.float16)})[0]
    assert got.shape == ref.shape and np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
