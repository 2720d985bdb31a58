"""Build the small CNN that `edgecc demo` compiles (src/edgecc/models/tiny_cnn.onnx).

Seeded, so re-running gives the same bytes. Architecture: Conv-BN-Relu, MaxPool, Conv-BN-Relu,
GlobalAveragePool, Flatten, Gemm, Softmax on a 1x3x32x32 input: the shape of an image classifier.
"""

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = os.path.join(os.path.dirname(__file__), "..", "src", "edgecc", "models", "tiny_cnn.onnx")


def main() -> None:
    rng = np.random.default_rng(2026)

    def init(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    def positive(name, n):
        return numpy_helper.from_array(rng.uniform(0.5, 1.5, n).astype(np.float32), name)

    inits = [
        init("w1", 8, 3, 3, 3), init("b1", 8), positive("g1", 8), init("be1", 8), init("m1", 8), positive("v1", 8),
        init("w2", 16, 8, 3, 3), positive("g2", 16), init("be2", 16), init("m2", 16), positive("v2", 16),
        init("fc_w", 10, 16), init("fc_b", 10),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["n2"], name="bn2"),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax"),
    ]
    graph = helper.make_graph(nodes, "tiny_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgecc-demo")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, OUT)
    print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
