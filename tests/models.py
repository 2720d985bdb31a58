"""Small ONNX models the tests build themselves with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inputs, outputs, initializers=(), opset=17, name="test") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def tensor_info(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def small_mlp(batch="N") -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm -> Softmax with a symbolic batch dim (or a fixed one)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w1", (8, 4)), ("b1", (8,)), ("w2", (3, 8)), ("b2", (3,))]]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax"),
    ]
    return make_model(nodes, [tensor_info("x", [batch, 4])], [tensor_info("y", [batch, 3])], inits, name="mlp")


def stage_cnn() -> tuple:
    """A first stage with every kind of window the pass handles: a strided padded conv, a dilated depthwise conv,
    a residual Add inside the stage, an average pool without counted pads, a ceil-mode max pool, a per-channel scale, a
    fire module (1x1 and 3x3 branches joined by a channel Concat);
    then a head (global pool, Gemm) that stays whole. Odd map sizes make the tiles unequal. Returns (model, x, the
    output onnxruntime computes for x)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)

    def init(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    inits = [init("w1", (8, 3, 3, 3)), init("b1", (8,)), init("wd", (8, 1, 3, 3)), init("w2", (8, 8, 1, 1)),
             init("scale", (1, 8, 1, 1)), init("we1", (4, 8, 1, 1)), init("we3", (4, 8, 3, 3)),
             init("wf", (8, 5)), init("bf", (5,))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd"], ["d1"], kernel_shape=[3, 3], group=8, dilations=[2, 2],
                         pads=[2, 2, 2, 2]),
        helper.make_node("Clip", ["d1", "", ""], ["d2"]),
        helper.make_node("Conv", ["d2", "w2"], ["p1"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["p1", "r1"], ["s1"]),
        helper.make_node("AveragePool", ["s1"], ["a1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),
        helper.make_node("MaxPool", ["a1"], ["m1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0],
                         ceil_mode=1),
        helper.make_node("Mul", ["m1", "scale"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "we1"], ["e1"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["scaled", "we3"], ["e3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["e1", "e3"], ["cut"], axis=1),
        helper.make_node("GlobalAveragePool", ["cut"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"]),
    ]
    model = make_model(nodes, [tensor_info("x", [1, 3, 45, 39])], [tensor_info("y", [1, 5])], inits)
    x = rng.standard_normal((1, 3, 45, 39)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return model, x, session.run(None, {"x": x})[0]
