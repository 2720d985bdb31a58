"""int8 convolution kernels against the float32 Conv kernels, layer by layer, on ResNet-18's and MobileNet-v2's
convolution shapes: one-node models compiled for the host, timed with the profiling entry (median of runs, single
thread). Needs a quiet machine for stable figures.

    python tools/bench_int8_layers.py [--runs 30] [--only resnet18|mobilenet_v2]
    python tools/bench_int8_layers.py --model mobilenet_v2    # every Conv of a shared model, summed

With --model, each distinct convolution shape of ../shared/models/NAME.onnx is timed once and counted as often as
it occurs: the sum is the model's convolution time in fp32 and in int8 (QLinearConv, no other op).
"""

from __future__ import annotations

import argparse

import numpy as np
from onnx import TensorProto, helper, numpy_helper

# (name, C, H, M, k, stride, pad, group)
RESNET18 = [("conv1", 3, 224, 64, 7, 2, 3, 1), ("l1.3x3", 64, 56, 64, 3, 1, 1, 1),
            ("l2.3x3s2", 64, 56, 128, 3, 2, 1, 1), ("l2.1x1s2", 64, 56, 128, 1, 2, 0, 1),
            ("l2.3x3", 128, 28, 128, 3, 1, 1, 1), ("l3.3x3s2", 128, 28, 256, 3, 2, 1, 1),
            ("l3.3x3", 256, 14, 256, 3, 1, 1, 1), ("l4.3x3s2", 256, 14, 512, 3, 2, 1, 1),
            ("l4.3x3", 512, 7, 512, 3, 1, 1, 1)]
"""Each distinct convolution shape of ResNet-18 (layer l.3x3 occurs 3-4 times in the model)."""
MOBILENET_V2 = [("first", 3, 224, 32, 3, 2, 1, 1), ("dw112", 32, 112, 32, 3, 1, 1, 32),
                ("pw112", 32, 112, 16, 1, 1, 0, 1), ("expand56", 24, 56, 144, 1, 1, 0, 1),
                ("dw56s2", 144, 56, 144, 3, 2, 1, 144), ("dw28", 192, 28, 192, 3, 1, 1, 192),
                ("project14", 384, 14, 64, 1, 1, 0, 1), ("dw7", 960, 7, 960, 3, 1, 1, 960),
                ("last1x1", 320, 7, 1280, 1, 1, 0, 1)]
LAYERS = {"resnet18": RESNET18, "mobilenet_v2": MOBILENET_V2}


def conv_models(c, h, m, k, stride, pad, group, rng, width=None, pads=None, dilation=1):
    """(float32 Conv model, QLinearConv model with constant per-channel int8 weights) of one layer."""
    width = width or h
    pads = pads or [pad] * 4
    w = rng.standard_normal((m, c // group, k, k)).astype(np.float32) * 0.1
    attrs = dict(kernel_shape=[k, k], strides=[stride] * 2, pads=pads, group=group, dilations=[dilation] * 2)
    oh = (h + pads[0] + pads[2] - dilation * (k - 1) - 1) // stride + 1
    ow = (width + pads[1] + pads[3] - dilation * (k - 1) - 1) // stride + 1
    fp = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)], "fp32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, oh, ow])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(m, np.float32), "b")])
    ws = (np.abs(w).reshape(m, -1).max(axis=1) / 127).astype(np.float32)
    wq = np.round(w / ws[:, None, None, None]).astype(np.int8)
    params = [(np.array(0.02, np.float32), "xs"), (np.array(128, np.uint8), "xz"), (wq, "wq"), (ws, "ws"),
              (np.zeros(m, np.int8), "wz"), (np.array(0.05, np.float32), "ys"), (np.array(0, np.uint8), "yz"),
              (rng.integers(-1000, 1000, m).astype(np.int32), "bq")]
    q = helper.make_graph(
        [helper.make_node("QLinearConv", ["x", "xs", "xz", "wq", "ws", "wz", "ys", "yz", "bq"], ["y"], **attrs)],
        "int8", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, c, h, width])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, m, oh, ow])],
        [numpy_helper.from_array(a, n) for a, n in params])
    opset = [helper.make_opsetid("", 18)]
    return helper.make_model(fp, opset_imports=opset), helper.make_model(q, opset_imports=opset)


def layer_ms(model, feeds, runs: int) -> float:
    import edgecc

    compiled = edgecc.compile(model, runtime="native", opt_level=3, progress=False)
    return sum(row["ms"] for row in compiled.profile(feeds, runs))


def model_convs(name: str) -> dict[tuple, int]:
    """{(C, H, W, M, k, stride, pads, group, dilation): occurrences} over the Conv nodes of a shared model."""
    import collections
    import pathlib

    import onnx

    path = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / f"{name}.onnx"
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.input)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    found = collections.Counter()
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        _, c, h, w = shapes[node.input[0]]
        m, _, k, _ = weights[node.input[1]]
        found[(c, h, w, m, k, attrs.get("strides", [1, 1])[0], tuple(attrs.get("pads", [0] * 4)),
               attrs.get("group", 1), attrs.get("dilations", [1, 1])[0])] += 1
    return dict(found)


def bench_model(name: str, runs: int) -> None:
    rng = np.random.default_rng(0)
    totals = [0.0, 0.0]
    print(f"{'C H W -> M k/s g':<30}{'count':>6}{'fp32 ms':>10}{'int8 ms':>10}{'ratio':>8}")
    for (c, h, w, m, k, stride, pads, group, dil), count in sorted(model_convs(name).items()):
        fp, q = conv_models(c, h, m, k, stride, 0, group, rng, width=w, pads=list(pads), dilation=dil)
        x = rng.standard_normal((1, c, h, w)).astype(np.float32)
        fp_ms = layer_ms(fp, {"x": x}, runs)
        q_ms = layer_ms(q, {"x": rng.integers(0, 256, x.shape).astype(np.uint8)}, runs)
        totals[0] += fp_ms * count
        totals[1] += q_ms * count
        print(f"{f'{c} {h}x{w} -> {m} {k}x{k}/{stride} g{group}':<30}{count:>6}{fp_ms:>10.3f}{q_ms:>10.3f}"
              f"{q_ms / fp_ms:>8.2f}")
    print(f"{name + ' convolutions':<36}{totals[0]:>10.3f}{totals[1]:>10.3f}{totals[1] / totals[0]:>8.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--only", choices=sorted(LAYERS))
    parser.add_argument("--model", help="time every Conv of ../shared/models/MODEL.onnx instead")
    args = parser.parse_args(argv)
    if args.model:
        bench_model(args.model, args.runs)
        return 0
    rng = np.random.default_rng(0)
    print(f"{'layer':<22}{'fp32 ms':>10}{'int8 ms':>10}{'ratio':>8}")
    for model_name, layers in LAYERS.items():
        if args.only and model_name != args.only:
            continue
        for name, c, h, m, k, stride, pad, group in layers:
            fp, q = conv_models(c, h, m, k, stride, pad, group, rng)
            x = rng.standard_normal((1, c, h, h)).astype(np.float32)
            fp_ms = layer_ms(fp, {"x": x}, args.runs)
            q_ms = layer_ms(q, {"x": rng.integers(0, 256, x.shape).astype(np.uint8)}, args.runs)
            print(f"{model_name + '.' + name:<22}{fp_ms:>10.3f}{q_ms:>10.3f}{q_ms / fp_ms:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
