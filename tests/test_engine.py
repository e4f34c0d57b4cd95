"""Tests of medge.convert.engine: real TensorRT-RTX builds on the CPU, cache keys, errors.

TensorRT-RTX builds engines ahead of time without a GPU, so FP32, FP16 and
INT8 (Q/DQ) engines of a small CNN are built for real here and their layer
information is checked: the INT8 engine must compute some layers in Int8, the
FP32 one none. Full TensorRT needs its own install and a GPU: those tests
carry the ``tensorrt`` and ``gpu`` markers and skip with the reason.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest

from medge.convert import engine as eng
from medge.convert.engine import EngineInfo, build_engine, engine_cache_key, layer_precisions, parse_builder_layer_log
from medge.errors import BackendUnavailable, ConversionError, MissingDependency

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # the cache-key, argument and missing-module tests still run
    onnx = None


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


HAS_RTX = _has("tensorrt_rtx")
HAS_TRT = _has("tensorrt")
RTX_MISSING = 'tensorrt_rtx not installed: pip install "medge[rtx]"'
TRT_MISSING = "TensorRT (full) is not installed here"


def needs_rtx(test):
    """A real TensorRT-RTX build on the CPU."""
    test = pytest.mark.skipif(onnx is None, reason="onnx is not installed")(test)
    return pytest.mark.tensorrt(pytest.mark.skipif(not HAS_RTX, reason=RTX_MISSING)(test))


def needs_full_tensorrt(test):
    """Full TensorRT builds for the GPU it runs on."""
    test = pytest.mark.skipif(onnx is None, reason="onnx is not installed")(test)
    return pytest.mark.tensorrt(pytest.mark.gpu(pytest.mark.skipif(not HAS_TRT, reason=TRT_MISSING)(test)))

# Wide enough that weights dominate the plan (kernel code is ~0.5 MB), so
# engine sizes order by precision: conv2 alone has 256*256*9 = 590k weights.
CHANNELS = 256
CLASSES = 10
HW = 32
MANIFEST_KEYS = {"file", "precision", "flavour", "flavour_version", "compute_capabilities", "gpu",
                 "profile", "size_bytes", "layers_file", "layer_precisions", "build_seconds"}


# --------------------------------------------------------------------------- ONNX models


def _weights(channels: int = CHANNELS) -> dict:
    rng = np.random.default_rng(0)
    return {
        "w1": (rng.standard_normal((channels, 3, 3, 3)) * 0.2).astype(np.float32),
        "b1": (rng.standard_normal(channels) * 0.01).astype(np.float32),
        "w2": (rng.standard_normal((channels, channels, 3, 3)) * 0.02).astype(np.float32),
        "b2": (rng.standard_normal(channels) * 0.01).astype(np.float32),
        "wf": (rng.standard_normal((CLASSES, channels)) * 0.1).astype(np.float32),
        "bf": np.zeros(CLASSES, np.float32),
    }


def _param_count(channels: int = CHANNELS) -> int:
    return sum(w.size for w in _weights(channels).values())


def _model(nodes, inits, in_type=None, out_type=None, in_shape=("N", 3, HW, HW)):
    in_type = TensorProto.FLOAT if in_type is None else in_type
    out_type = TensorProto.FLOAT if out_type is None else out_type
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("x", in_type, list(in_shape))],
        [helper.make_tensor_value_info("y", out_type, ["N", CLASSES])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="medge-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _body(x: str, w1: str, w2: str, conv2_in: str = "r1"):
    """conv-relu-conv-globalavgpool-gemm from tensor ``x``; conv2 reads ``conv2_in``."""
    return [
        helper.make_node("Conv", [x, w1, "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", [conv2_in, w2, "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]


def cnn_fp32(channels: int = CHANNELS, in_shape=("N", 3, HW, HW)):
    w = _weights(channels)
    return _model(_body("x", "w1", "w2"), [numpy_helper.from_array(v, k) for k, v in w.items()], in_shape=in_shape)


def cnn_fp16(channels: int = CHANNELS):
    """Every float tensor in float16; float16 input, the output cast back to float32."""
    w = _weights(channels)
    inits = [numpy_helper.from_array(v.astype(np.float16), k) for k, v in w.items()]
    nodes = _body("x", "w1", "w2")
    nodes[-1].output[0] = "y16"
    nodes.append(helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT, name="cast_out"))
    return _model(nodes, inits, in_type=TensorProto.FLOAT16)


def cnn_int8(channels: int = CHANNELS):
    """Explicit Q/DQ as TensorRT wants it: int8, zero point 0, per-channel weights, per-tensor activations, float biases."""
    w = _weights(channels)
    inits, nodes = [], []

    def weight_dq(name):
        weight = w[name]
        scale = (np.abs(weight).reshape(weight.shape[0], -1).max(axis=1) / 127.0).astype(np.float32)
        q = np.clip(np.round(weight / scale[:, None, None, None]), -127, 127).astype(np.int8)
        inits.extend([numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_scale"),
                      numpy_helper.from_array(np.zeros(weight.shape[0], np.int8), f"{name}_zp")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"],
                                      [f"{name}_dq"], axis=0, name=f"{name}_dequant"))

    def activation_qdq(tensor, scale):
        inits.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_scale"),
                      numpy_helper.from_array(np.array(0, np.int8), f"{tensor}_zp")])
        nodes.append(helper.make_node("QuantizeLinear", [tensor, f"{tensor}_scale", f"{tensor}_zp"],
                                      [f"{tensor}_q"], name=f"{tensor}_quant"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_q", f"{tensor}_scale", f"{tensor}_zp"],
                                      [f"{tensor}_qdq"], name=f"{tensor}_dequant"))

    weight_dq("w1")
    weight_dq("w2")
    inits.extend(numpy_helper.from_array(w[k], k) for k in ("b1", "b2", "wf", "bf"))
    activation_qdq("x", 4.0 / 127)
    body = _body("x_qdq", "w1_dq", "w2_dq", conv2_in="r1_qdq")
    nodes.extend(body[:2])
    activation_qdq("r1", 2.0 / 127)
    nodes.extend(body[2:])
    return _model(nodes, inits)


def _save(model, path):
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    if onnx is None:
        pytest.skip("onnx is not installed")
    root = tmp_path_factory.mktemp("onnx")
    return {
        "fp32": _save(cnn_fp32(), root / "cnn_fp32.onnx"),
        "fp16": _save(cnn_fp16(), root / "cnn_fp16.onnx"),
        "int8": _save(cnn_int8(), root / "cnn_int8.onnx"),
    }


@pytest.fixture(scope="module")
def rtx_engines(onnx_models, tmp_path_factory):
    if not HAS_RTX:
        pytest.skip(RTX_MISSING)
    out = tmp_path_factory.mktemp("engines")
    stages = []
    infos = {p: build_engine(path, out / f"cnn_{p}.plan", flavour="tensorrt_rtx", precision=p,
                             batch=(1, 4, 8), progress=stages.append)
             for p, path in onnx_models.items()}
    infos["_stages"] = stages
    infos["_dir"] = out
    return infos


# --------------------------------------------------------------------------- RTX builds


@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_rtx_build_writes_plan_layers_and_manifest(rtx_engines, precision):
    import tensorrt_rtx

    info = rtx_engines[precision]
    assert isinstance(info, EngineInfo)
    manifest = info.to_manifest()
    assert set(manifest) == MANIFEST_KEYS
    assert manifest["file"] == f"cnn_{precision}.plan"
    assert manifest["layers_file"] == f"cnn_{precision}.plan.layers.json"
    assert manifest["flavour"] == "tensorrt_rtx"
    assert manifest["flavour_version"] == tensorrt_rtx.__version__
    assert manifest["precision"] == precision
    assert manifest["profile"] == {"min": 1, "opt": 4, "max": 8}
    assert manifest["compute_capabilities"] == list(eng.RTX_DEFAULT_COMPUTE_CAPABILITIES)
    assert manifest["gpu"] is None  # ahead of time, for no particular GPU
    assert manifest["build_seconds"] >= 0
    json.dumps(manifest)  # serialisable as is

    plan = rtx_engines["_dir"] / manifest["file"]
    assert plan.stat().st_size == manifest["size_bytes"]
    doc = json.loads((rtx_engines["_dir"] / manifest["layers_file"]).read_text())
    assert doc["source"] in ("engine-inspector", "builder-log")
    assert doc["source"] == info.layer_info_source
    assert doc["layer_precisions"] == manifest["layer_precisions"]
    assert len(doc["layers"]) >= 3
    assert any("conv2" in " ".join(layer["metadata"]) for layer in doc["layers"])


@needs_rtx
def test_rtx_build_leaves_no_temporary_files(rtx_engines):
    names = sorted(p.name for p in rtx_engines["_dir"].iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    assert len(names) == 6  # three plans and three layer files


@needs_rtx
def test_rtx_progress_reports_stages(rtx_engines):
    assert rtx_engines["_stages"] == ["parsing", "building", "writing", "inspecting", "done"] * 3


@needs_rtx
def test_rtx_engine_sizes_order_by_precision(rtx_engines):
    sizes = {p: rtx_engines[p].size_bytes for p in ("fp32", "fp16", "int8")}
    params = _param_count()
    # Each plan holds its weights plus kernel code and metadata (under 4 MiB for this graph).
    for precision, bytes_per_weight in (("fp32", 4), ("fp16", 2), ("int8", 1)):
        assert params * bytes_per_weight < sizes[precision] < params * bytes_per_weight + (4 << 20), sizes
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"], sizes


@needs_rtx
def test_rtx_layer_information_shows_the_graph_precision(rtx_engines):
    fp32, fp16, int8 = (rtx_engines[p].layer_precisions for p in ("fp32", "fp16", "int8"))
    assert int8["Int8"] >= 2, int8  # both convolutions read Int8 activations
    assert fp32["Int8"] == 0 and fp32["Half"] == 0 and fp32["Float"] > 0, fp32
    assert fp16["Half"] > 0 and fp16["Int8"] == 0, fp16
    assert not rtx_engines["int8"].warnings


@needs_rtx
def test_rtx_int8_convolutions_use_int8_weights(rtx_engines):
    doc = json.loads(open(rtx_engines["int8"].layers_file).read())
    convs = [layer for layer in doc["layers"] if any(m.startswith("[ONNX Layer: conv") for m in layer["metadata"])
             and layer["inputs"] and layer["inputs"][0]["dtype"] == "Int8"]
    assert convs, doc["layers"]
    assert all(any(c["dtype"] == "Int8" and len(c["dims"]) == 4 for c in layer["constants"]) for layer in convs)


@needs_rtx
@pytest.mark.parametrize("targets, expected", [(["8.6", "8.9"], ["8.6", "8.9"]), (["sm120"], ["12.0"])])
def test_rtx_explicit_compute_capabilities(onnx_models, tmp_path, targets, expected):
    info = build_engine(onnx_models["int8"], tmp_path / "e.plan", flavour="tensorrt_rtx", precision="int8",
                        batch=(1, 2, 4), compute_capabilities=targets, progress=lambda s: None)
    assert info.compute_capabilities == expected
    assert info.to_manifest()["compute_capabilities"] == expected
    assert info.layer_precisions["Int8"] >= 2


@needs_rtx
def test_rtx_unknown_compute_capability_names_the_supported_ones(onnx_models, tmp_path):
    with pytest.raises(ConversionError, match=r"9\.0.*8\.6"):
        build_engine(onnx_models["fp32"], tmp_path / "e.plan", flavour="tensorrt_rtx", precision="fp32",
                     compute_capabilities=["9.0"], progress=lambda s: None)


@needs_rtx
def test_rtx_build_failure_carries_builder_errors_and_keeps_old_file(onnx_models, tmp_path):
    out = tmp_path / "e.plan"
    out.write_bytes(b"previous engine")
    # TensorRT-RTX cannot compile an FP32 GEMM for Turing: a real builder error.
    with pytest.raises(ConversionError, match="failed to build") as caught:
        build_engine(onnx_models["fp32"], out, flavour="tensorrt_rtx", precision="fp32", batch=(1, 1, 2),
                     compute_capabilities=["7.5"], progress=lambda s: None)
    assert "Error Code" in str(caught.value) or "Turing" in str(caught.value), str(caught.value)
    assert out.read_bytes() == b"previous engine"
    assert [p.name for p in tmp_path.iterdir()] == ["e.plan"]


@needs_rtx
def test_rtx_parser_failure_names_node_and_operator(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="fine_relu"),
         helper.make_node("FrobnicateTensor", ["r"], ["y"], name="mystery_node", domain="com.example")],
        "broken", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = _save(model, tmp_path / "broken.onnx")
    with pytest.raises(ConversionError) as caught:
        build_engine(path, tmp_path / "broken.plan", flavour="tensorrt_rtx", precision="fp32", progress=lambda s: None)
    message = str(caught.value)
    assert "could not parse broken.onnx" in message
    assert "mystery_node" in message and "FrobnicateTensor" in message
    assert "Plugin not found" in message or "INVALID_NODE" in message  # the parser's own description
    assert not (tmp_path / "broken.plan").exists()


@needs_rtx
def test_rtx_unreadable_onnx_is_a_conversion_error(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(ConversionError, match="could not parse garbage.onnx"):
        build_engine(path, tmp_path / "g.plan", flavour="tensorrt_rtx", precision="fp32", progress=lambda s: None)


@needs_rtx
def test_rtx_dynamic_spatial_dims_are_refused(tmp_path):
    path = _save(cnn_fp32(16, in_shape=("N", 3, "H", "W")), tmp_path / "dyn.onnx")
    with pytest.raises(ConversionError, match=r"dimensions \[2, 3\] are dynamic"):
        build_engine(path, tmp_path / "d.plan", flavour="tensorrt_rtx", precision="fp32", progress=lambda s: None)


@needs_rtx
def test_rtx_static_batch(tmp_path):
    path = _save(cnn_fp32(16, in_shape=(2, 3, HW, HW)), tmp_path / "static.onnx")
    info = build_engine(path, tmp_path / "s.plan", flavour="tensorrt_rtx", precision="fp32", progress=lambda s: None)
    assert info.profile == {"min": 2, "opt": 2, "max": 2}
    with pytest.raises(ConversionError, match="static batch of 2"):
        build_engine(path, tmp_path / "s.plan", flavour="tensorrt_rtx", precision="fp32", batch=(1, 4, 8),
                     progress=lambda s: None)


@needs_rtx
def test_rtx_ignores_timing_cache_with_a_note(onnx_models, tmp_path, caplog, capsys):
    cache = tmp_path / "timing.cache"
    with caplog.at_level(logging.INFO, logger="medge.convert.engine"):
        build_engine(onnx_models["fp16"], tmp_path / "e.plan", flavour="tensorrt_rtx", precision="fp16",
                     batch=(1, 1, 1), timing_cache_path=cache)
    assert not cache.exists()
    assert "timing_cache_path is ignored for TensorRT-RTX" in caplog.text
    assert capsys.readouterr().err == ""  # the default progress line shows on a terminal only


@needs_rtx
def test_rtx_precision_mismatch_is_logged(onnx_models, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medge.convert.engine"):
        info = build_engine(onnx_models["fp32"], tmp_path / "e.plan", flavour="tensorrt_rtx", precision="int8",
                            batch=(1, 1, 1), progress=lambda s: None)
    assert info.warnings and "no engine layer computes in Int8" in caplog.text


# --------------------------------------------------------------------------- without any TensorRT


@pytest.mark.parametrize("flavour, extra", [("tensorrt_rtx", "rtx"), ("tensorrt", "tensorrt")])
def test_missing_flavour_names_the_extra(monkeypatch, tmp_path, flavour, extra):
    monkeypatch.setitem(sys.modules, flavour, None)  # makes `import <flavour>` raise ImportError
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read: the import fails first")
    with pytest.raises(MissingDependency) as caught:
        build_engine(model, tmp_path / "e.plan", flavour=flavour, precision="fp32")
    assert caught.value.extra == extra and caught.value.module == flavour
    assert f'pip install "medge[{extra}]"' in str(caught.value)
    with pytest.raises(MissingDependency):
        eng._import_flavour(flavour)


@pytest.mark.parametrize("kwargs, match", [
    ({"flavour": "onnxruntime"}, "unknown engine flavour"),
    ({"precision": "int3"}, "unknown precision"),
    ({"batch": (4, 2, 8)}, "min <= opt <= max"),
    ({"batch": (0, 1, 1)}, "min <= opt <= max"),
    ({"batch": (1, 2)}, "min <= opt <= max"),
    ({"optimization_level": 6}, "optimization_level"),
    ({"workspace_bytes": 0}, "workspace_bytes"),
    ({"flavour": "tensorrt", "compute_capabilities": ["8.6"]}, "tensorrt_rtx only"),
])
def test_bad_arguments_fail_before_any_import(monkeypatch, tmp_path, kwargs, match):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read: the arguments are checked first")
    args = {"flavour": "tensorrt_rtx", "precision": "fp32", **kwargs}
    with pytest.raises(ConversionError, match=match):
        build_engine(model, tmp_path / "e.plan", **args)


def test_missing_onnx_file(tmp_path):
    with pytest.raises(ConversionError, match="ONNX model not found"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "e.plan", flavour="tensorrt_rtx", precision="fp32")


_SAMPLE_LOG = (
    "Layers:\n"
    "Name: __mye449_0_myl0_0, LayerType: shape_call, Inputs: [], Constants: [], Outputs: [], TacticName: , "
    "StreamId: 0, Metadata: \n"
    "Name: __myl_MulMinMaxRounCast_myl0_1, LayerType: kgen, Inputs: [ { Name: x, Dimensions: [-1,3,32,32], "
    "Strides: [3072,1024,32,1], StrideOrder: [3,2,1,0], Datatype: Float, Format: (Linear) Row major linear format }], "
    "Constants: [], Outputs: [ { Name: q_7_myl0, Dimensions: [-1,4,32,32], Strides: [4096,1,128,4], "
    "StrideOrder: [3,0,2,1], Datatype: Int8, Format: (NHWC) Channel major format }], TacticName: __myl_Mul_0xf9, "
    "StreamId: 0, Metadata: [ONNX Layer: xq_ql]\x1f[ONNX Layer: conv1]\n"
    "Name: conv1_myl0_2, LayerType: correlation, Inputs: [ { Name: q_7_myl0, Dimensions: [-1,4,32,32], "
    "Strides: [4096,1,128,4], StrideOrder: [3,0,2,1], Datatype: Int8, Format: (NHWC) Channel major format }], "
    "Constants: [ { Name: w_myl0, Dimensions: [64,4,3,3], Strides: [36,1,12,4], StrideOrder: [3,0,2,1], "
    "Datatype: Int8, Format: (NHWC) Channel major format }, { Name: s_myl0, Dimensions: [1,64,1,1], "
    "Strides: [64,1,64,64], StrideOrder: [3,0,2,1], Datatype: Float, Format: (NHWC) Channel major format }], "
    "Outputs: [ { Name: c1_myl0, Dimensions: [-1,64,32,32], Strides: [65536,1,2048,64], StrideOrder: [3,0,2,1], "
    "Datatype: Half, Format: (NHWC) Channel major format }], TacticName: __myelin_CASK_STUB, StreamId: 0, "
    "Metadata: [ONNX Layer: conv1]\n"
    "\n"
    "I/O Tensors:\n"
    " Name: x, IOMode: Input, DataType: Float, Dimensions: [-1,3,32,32], Location: Device\n"
)


def test_parse_builder_layer_log():
    layers = parse_builder_layer_log(_SAMPLE_LOG)
    assert [layer["name"] for layer in layers] == ["__mye449_0_myl0_0", "__myl_MulMinMaxRounCast_myl0_1", "conv1_myl0_2"]
    shape_call, quant, conv = layers
    assert shape_call["inputs"] == [] and shape_call["metadata"] == [] and shape_call["tactic"] == ""
    assert quant["inputs"][0] == {"name": "x", "dims": [-1, 3, 32, 32], "dtype": "Float",
                                  "format": "(Linear) Row major linear format"}
    assert quant["outputs"][0]["dtype"] == "Int8"
    assert quant["metadata"] == ["[ONNX Layer: xq_ql]", "[ONNX Layer: conv1]"]
    assert conv["type"] == "correlation" and conv["tactic"] == "__myelin_CASK_STUB"
    assert [c["dtype"] for c in conv["constants"]] == ["Int8", "Float"]
    assert conv["constants"][0]["dims"] == [64, 4, 3, 3]
    assert layer_precisions(layers) == {"Float": 1, "Half": 0, "BFloat16": 0, "Int8": 1}


def test_inspector_json_layers_are_normalised():
    raw = {"Layers": [
        {"Name": "conv", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "a", "Dimensions": [1, 64, 8, 8],
                     "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
         "Outputs": [{"Name": "b", "Dimensions": [1, 64, 8, 8], "Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "fc", "LayerType": "gemm", "Inputs": [{"Name": "b", "Datatype": "BFloat16"}], "Outputs": []},
        {"Name": "dyn", "LayerType": "NoOp", "Inputs": [{"Name": "c", "Format/Datatype": "N/A due to dynamic shapes"}]},
        "names-only layer",
    ]}
    layers = [eng._layer_from_inspector(layer) for layer in raw["Layers"]]
    assert [layer["inputs"][0]["dtype"] if layer["inputs"] else None for layer in layers] == ["Int8", "BFloat16", None, None]
    assert layers[0]["outputs"][0]["dtype"] == "Half"
    assert layer_precisions(layers) == {"Float": 0, "Half": 0, "BFloat16": 1, "Int8": 1}


# --------------------------------------------------------------------------- cache key

_SHA = "ab" * 32
_KEY_ARGS = dict(flavour="tensorrt", flavour_version="10.13.0.35", gpu_name="NVIDIA RTX A2000",
                 compute_capability="8.6", sm_count=26, model_sha256=_SHA, precision="int8",
                 profile={"min": 1, "opt": 4, "max": 8})


def test_cache_key_is_stable():
    key = engine_cache_key(**_KEY_ARGS)
    assert key == engine_cache_key(**_KEY_ARGS)
    assert len(key) == 64 and int(key, 16) >= 0
    # Equivalent spellings give the same key.
    same = dict(_KEY_ARGS, profile=(1, 4, 8), model_sha256=_SHA.upper(), precision="INT8", compute_capability="86")
    assert engine_cache_key(**same) == key
    rtx_a = engine_cache_key(**dict(_KEY_ARGS, gpu_name=None, sm_count=None, compute_capability=["8.9", "8.6"]))
    rtx_b = engine_cache_key(**dict(_KEY_ARGS, gpu_name=None, sm_count=None, compute_capability=("8.6", "8.9")))
    assert rtx_a == rtx_b
    # Pinned: a change here silently invalidates every cached engine; bump the schema on purpose.
    assert engine_cache_key(**_KEY_ARGS) == _pinned_key()


def _pinned_key() -> str:
    import hashlib

    record = {"schema": "medge-engine-cache/1", "flavour": "tensorrt", "flavour_version": "10.13.0.35",
              "gpu_name": "NVIDIA RTX A2000", "compute_capability": "8.6", "sm_count": 26, "model_sha256": _SHA,
              "precision": "int8", "profile": [1, 4, 8]}
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@pytest.mark.parametrize("field, value", [
    ("flavour", "tensorrt_rtx"), ("flavour_version", "10.13.0.36"), ("gpu_name", "NVIDIA RTX A4000"),
    ("compute_capability", "8.9"), ("sm_count", 48), ("model_sha256", "cd" * 32), ("precision", "fp16"),
    ("profile", {"min": 1, "opt": 4, "max": 16}), ("profile", (1, 8, 8)),
])
def test_cache_key_changes_with_every_field(field, value):
    assert engine_cache_key(**dict(_KEY_ARGS, **{field: value})) != engine_cache_key(**_KEY_ARGS)


@pytest.mark.parametrize("field, value", [("model_sha256", "xyz"), ("profile", (1, 2)), ("profile", {"min": 1})])
def test_cache_key_rejects_malformed_input(field, value):
    with pytest.raises(ValueError):
        engine_cache_key(**dict(_KEY_ARGS, **{field: value}))


# --------------------------------------------------------------------------- full TensorRT (GPU)


def _build_full(path, out, **kwargs):
    try:
        return build_engine(path, out, flavour="tensorrt", progress=lambda s: None, **kwargs)
    except BackendUnavailable as exc:
        pytest.skip(f"full TensorRT cannot build here: {exc}")


@needs_full_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_full_tensorrt_build_and_inspector(onnx_models, tmp_path, precision):
    info = _build_full(onnx_models[precision], tmp_path / "e.plan", precision=precision, batch=(1, 4, 8),
                       workspace_bytes=1 << 30)
    assert set(info.to_manifest()) == MANIFEST_KEYS
    assert info.layer_info_source == "engine-inspector"
    assert info.profile == {"min": 1, "opt": 4, "max": 8}
    if precision == "int8":
        assert info.layer_precisions["Int8"] > 0, info.layer_precisions
    else:
        assert info.layer_precisions["Int8"] == 0, info.layer_precisions


@needs_full_tensorrt
def test_full_tensorrt_timing_cache_is_saved_and_reused(onnx_models, tmp_path, caplog):
    cache = tmp_path / "timing.cache"
    _build_full(onnx_models["fp16"], tmp_path / "a.plan", precision="fp16", batch=(1, 2, 4), timing_cache_path=cache)
    assert cache.is_file() and cache.stat().st_size > 0
    with caplog.at_level(logging.INFO, logger="medge.convert.engine"):
        _build_full(onnx_models["fp16"], tmp_path / "b.plan", precision="fp16", batch=(1, 2, 4), timing_cache_path=cache)
    assert "reusing timing cache" in caplog.text


def test_rtx_callbacks_run_with_the_cyclic_gc_paused(onnx_models, tmp_path, monkeypatch):
    """Regression (a silent deadlock seen in a full test run): a cyclic-GC pass inside TensorRT's logger
    callback finalised another IBuilder, whose destructor took the lock createInferBuilder held. The
    invariant that prevents it: TensorRT never calls back into Python with the GC enabled, and the GC's
    previous state is restored afterwards, on failure too."""
    import gc

    pytest.importorskip("tensorrt_rtx", reason='tensorrt_rtx not installed: pip install "medge[rtx]"')
    from medge.convert import engine

    states = []
    make_logger = engine._make_logger

    def recording_logger(trt):
        logger = make_logger(trt)
        log = type(logger).log

        def recording_log(self, severity, message):
            states.append(gc.isenabled())
            return log(self, severity, message)

        type(logger).log = recording_log
        return logger

    monkeypatch.setattr(engine, "_make_logger", recording_logger)
    assert gc.isenabled()
    engine.build_engine(onnx_models["fp32"], tmp_path / "e.engine", flavour="tensorrt_rtx", precision="fp32",
                        batch=(1, 1, 2))
    assert states and not any(states), "TensorRT called back into Python with the GC enabled"
    assert gc.isenabled()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ConversionError):
        engine.build_engine(broken, tmp_path / "b.engine", flavour="tensorrt_rtx", precision="fp32")
    assert gc.isenabled()
