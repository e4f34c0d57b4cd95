"""Class activation maps computed by the engine itself, in the same run as the scores.

For a classifier whose head is global average pooling followed by one linear
layer (ResNet, DenseNet, EfficientNet, the demo), the logit of class c is

    z_c = sum_k W[c, k] * mean_ij F[k, i, j] + b_c

over the last feature map F (K channels, h x w). Grad-CAM of z_c weights each
channel by the spatial mean of dz_c/dF[k] = W[c, k] / (h w), so its map is

    ReLU(sum_k W[c, k] F[k] / (h w))

exactly: a 1x1 convolution of F with the linear layer's weights, a ReLU and a
constant scale (Zhou et al. 2016, CAM; Selvaraju et al. 2017 show Grad-CAM
reduces to it for this head). ``add_class_activation_maps`` appends that to
the FP32 graph, upsampled (bilinear, half-pixel) to the model's input size,
as a second output ``cam`` of shape (N, classes, H, W). The FP16 and INT8
graphs are made from this graph, so they carry it too, and engines compute
the map with the scores at the cost of one 1x1 convolution and a resize.

Other heads (attention pooling, several linear layers, no pooling) are
refused with a ConversionError: a map that is not the model's own reasoning
would be a plausible wrong answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConversionError

#: Name of the added graph output.
CAM_OUTPUT = "cam"
_POOLS = ("GlobalAveragePool", "ReduceMean")
_FLATTENS = ("Flatten", "Reshape", "Squeeze")


@dataclass(frozen=True)
class ExplainInfo:
    """What was added: the feature map it reads, its size, and the output's name and shape."""

    feature_map: str
    feature_shape: tuple  # (K, h, w)
    classes: int
    output: str
    output_shape: tuple  # (classes, H, W)

    def to_manifest(self) -> dict:
        return {"method": "CAM (equals Grad-CAM for global-average-pooling + linear heads)",
                "output": self.output, "output_shape": list(self.output_shape),
                "feature_map": self.feature_map, "feature_shape": list(self.feature_shape)}


def add_class_activation_maps(source: Path, target: Path, *, input_size: tuple[int, int]) -> ExplainInfo:
    """Write ``target``: the graph of ``source`` with a ``cam`` output (N, classes, H, W) added.

    Raises:
        ConversionError: the head is not global average pooling + one linear
            layer, or shapes are unknown (the message says which).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    model = onnx.load(str(source))
    graph = model.graph
    if any(o.name == CAM_OUTPUT for o in graph.output):
        raise ConversionError(f"the model already has an output named {CAM_OUTPUT!r}")
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in graph.initializer}

    def constant(name: str) -> Optional[np.ndarray]:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    unsupported = ("--explain supports classifiers whose head is global average pooling followed by one linear "
                   "layer (ResNet, DenseNet, EfficientNet); ")
    logits = graph.output[0].name
    head = producers.get(logits)
    weight, bias_node = None, None
    if head is not None and head.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
        w = constant(head.input[1])
        if w is None or attrs.get("transA", 0):
            raise ConversionError(unsupported + "the final Gemm's weights are not constant")
        weight = w if attrs.get("transB", 0) else w.T  # (classes, K)
        weight = weight * float(attrs.get("alpha", 1.0))
        pooled = head.input[0]
    elif head is not None and head.op_type == "Add":
        # MatMul + Add(bias), as some exporters write a linear layer
        matmul = next((producers.get(i) for i in head.input if producers.get(i) is not None
                       and producers[i].op_type == "MatMul"), None)
        w = constant(matmul.input[1]) if matmul is not None else None
        if w is None:
            raise ConversionError(unsupported + f"the output comes from {head.op_type}, not a linear layer")
        weight, pooled, bias_node = w.T, matmul.input[0], head
    elif head is not None and head.op_type == "MatMul":
        w = constant(head.input[1])
        if w is None:
            raise ConversionError(unsupported + "the final MatMul's weights are not constant")
        weight, pooled = w.T, head.input[0]
    else:
        found = head.op_type if head is not None else "a graph input"
        raise ConversionError(unsupported + f"the first output comes from {found}")
    del bias_node  # the bias shifts every location's logit equally: Grad-CAM ignores it, and so does CAM
    node = producers.get(pooled)
    while node is not None and node.op_type in _FLATTENS:
        pooled = node.input[0]
        node = producers.get(pooled)
    if node is None or node.op_type not in _POOLS:
        found = node.op_type if node is not None else "a graph input"
        raise ConversionError(unsupported + f"the linear layer reads {found}, not a global average pooling")
    if node.op_type == "ReduceMean":
        axes = ([helper.get_attribute_value(a) for a in node.attribute if a.name == "axes"] or
                [constant(node.input[1]) if len(node.input) > 1 else None])[0]
        if axes is None or sorted(int(a) % 4 for a in np.ravel(axes)) != [2, 3]:
            raise ConversionError(unsupported + "the mean before the linear layer is not over the spatial axes")
    feature = node.input[0]

    inferred = shape_inference.infer_shapes(model, strict_mode=False)
    shapes = {v.name: v.type.tensor_type.shape for v in (*inferred.graph.value_info, *inferred.graph.input,
                                                         *inferred.graph.output)}
    dims = shapes.get(feature)
    sizes = [d.dim_value if d.HasField("dim_value") else None for d in dims.dim] if dims is not None else []
    if len(sizes) != 4 or None in sizes[1:]:
        raise ConversionError(unsupported + f"the feature map {feature!r} has no known (N, K, h, w) shape")
    channels, h, w = sizes[1:]
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2 or weight.shape[1] != channels:
        raise ConversionError(unsupported + f"the linear layer's weights {weight.shape} do not match the "
                                            f"{channels}-channel feature map")
    classes = int(weight.shape[0])
    height, width = (int(v) for v in input_size)
    # Grad-CAM's channel weights are W / (h w): fold the scale into the 1x1 convolution.
    kernel = (weight / float(h * w)).reshape(classes, channels, 1, 1)
    prefix = "medge_cam"
    graph.initializer.extend([
        numpy_helper.from_array(kernel, f"{prefix}_weight"),
        numpy_helper.from_array(np.array([height, width], dtype=np.int64), f"{prefix}_size"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), f"{prefix}_start"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), f"{prefix}_end"),
    ])
    graph.node.extend([
        helper.make_node("Conv", [feature, f"{prefix}_weight"], [f"{prefix}_raw"], name=f"{prefix}_conv"),
        helper.make_node("Relu", [f"{prefix}_raw"], [f"{prefix}_relu"], name=f"{prefix}_relu"),
        # Output sizes (N, classes, H, W) with the batch taken from the feature map, so the batch stays dynamic.
        helper.make_node("Shape", [f"{prefix}_relu"], [f"{prefix}_shape"], name=f"{prefix}_shape"),
        helper.make_node("Slice", [f"{prefix}_shape", f"{prefix}_start", f"{prefix}_end"], [f"{prefix}_nc"],
                         name=f"{prefix}_nc"),
        helper.make_node("Concat", [f"{prefix}_nc", f"{prefix}_size"], [f"{prefix}_sizes"], axis=0,
                         name=f"{prefix}_sizes"),
        helper.make_node("Resize", [f"{prefix}_relu", "", "", f"{prefix}_sizes"], [CAM_OUTPUT], mode="linear",
                         coordinate_transformation_mode="half_pixel", name=f"{prefix}_resize"),
    ])
    batch = graph.output[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or (batch.dim_value if batch.HasField("dim_value") else "batch")
    graph.output.append(helper.make_tensor_value_info(CAM_OUTPUT, TensorProto.FLOAT,
                                                      [batch_dim, classes, height, width]))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"the graph with class activation maps does not check: {exc}") from None
    onnx.save(model, str(target))
    return ExplainInfo(feature, (channels, h, w), classes, CAM_OUTPUT, (classes, height, width))
