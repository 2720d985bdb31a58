"""The edgecc.CodebookDecode kernel (backends/kernels/codebook.py) and clustered models in native code.

The decode is checked exactly against numpy's own bit unpacking (np.unpackbits, little bit order) and a table
lookup; clustered Conv/Gemm/MatMul models against onnxruntime on the same ONNX model with the decoded weights as
plain initializers (rtol 1e-5: float32 sums in another order). Host here; armv8/armv7 under qemu-user and a
Cortex-M4 board under qemu-system-arm in the slow tests.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc
from edgecc.ops.codebook import pack_indices
from edgecc.passes.cluster_weights import codebook_of, decoder_of
from toolchains import skip_unless_runnable

RNG = np.random.default_rng(17)
RTOL = 1e-5
CLUSTER = "infer-shapes,fold-batchnorm,cluster-weights{clusters=16},fold-constants,dce,fuse-epilogues"


def unpacked(packed: np.ndarray, bits: int, numel: int) -> np.ndarray:
    """Indices from numpy's bit unpacking: field i is bits i*bits.. of the little-endian bit stream."""
    stream = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")[: numel * bits].reshape(numel, bits)
    return stream.astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))


def decode_model(shape, bits: int, entries: int, packed: np.ndarray | None = None):
    """x + CodebookDecode(packed, codebook): a random codebook of `entries` and random indices below it."""
    numel = int(np.prod(shape))
    codebook = RNG.standard_normal(entries).astype(np.float32)
    if packed is None:
        packed = pack_indices(RNG.integers(0, entries, numel), bits)
    nodes = [helper.make_node("CodebookDecode", ["idx", "cb"], ["w"], domain="edgecc", shape=list(shape), bits=bits),
             helper.make_node("Add", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "decode", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(packed, "idx"), numpy_helper.from_array(codebook, "cb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("edgecc", 1)])
    x = RNG.standard_normal(shape).astype(np.float32)
    return model, x, x + codebook[np.minimum(unpacked(packed, bits, numel), entries - 1)].reshape(shape)


CASES = [((3, 5, 7), 1, 2), ((4, 9), 2, 3), ((2, 33), 2, 4), ((5, 5, 3), 4, 16), ((101,), 4, 11), ((17, 16), 8, 256),
         ((9,), 8, 200), ((7, 64), 4, 16)]
"""(shape, bits, entries): sizes with a partial last byte, codebooks shorter than 2^bits, sizes below one vector
step (the byte loop alone) and above (register permutes, then the byte loop for the rest)."""


@pytest.mark.parametrize("target", ["host", "x86-64"])  # the AVX2 permutes here; the byte loop alone on SSE2
@pytest.mark.parametrize("shape, bits, entries", CASES)
def test_decode_on_the_host(shape, bits, entries, target):
    model, x, expected = decode_model(shape, bits, entries)
    np.testing.assert_array_equal(edgecc.compile(model, target=target).run([x])[0], expected)


def test_out_of_range_indices_are_clamped_to_the_codebook():
    """The packer never writes an index past the codebook; the kernel still reads within it (the last entry)."""
    model, x, expected = decode_model((8, 8), 4, 5, packed=np.full(32, 0xF3, np.uint8))
    np.testing.assert_array_equal(edgecc.compile(model).run([x])[0], expected)


def clustered_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """Conv 3x3 (+ BatchNorm, folded before clustering) -> Relu -> depthwise Conv (multiplier 2) -> Flatten -> Gemm
    -> MatMul, each layer with at least 256 weights."""
    f32 = lambda *s: RNG.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"w1": f32(16, 4, 3, 3) * 0.3, "g": f32(16) * 0.1 + 1, "b": f32(16) * 0.1, "m": f32(16) * 0.1,
             "v": np.abs(f32(16)) + 0.5, "w2": f32(32, 1, 3, 3) * 0.3, "w3": f32(32, 32 * 36) * 0.05, "c3": f32(32),
             "w4": f32(32, 24) * 0.2}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=16, name="dw"),
             helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "c3"], ["g3"], transB=1, name="fc"),
             helper.make_node("MatMul", ["g3", "w4"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "clustered", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), f32(1, 4, 12, 12)


def dense_expected(model: onnx.ModelProto, compiled, x: np.ndarray) -> np.ndarray:
    """onnxruntime on `model` with the clustered layers' weights replaced by their independently decoded tensors
    (the decoded Conv weights are the BatchNorm-folded ones: the folded bias replaces the BatchNorm)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    layers = {n.name: n for n in model.graph.node}
    for node in compiled.module.graph.nodes:
        decode = decoder_of(node)
        if decode is None:
            continue
        shape = tuple(decode.attrs["shape"])
        weights = codebook_of(decode)[unpacked(decode.inputs[0].const, decode.attrs["bits"], int(np.prod(shape)))]
        name = f"{node.name}_dense"
        model.graph.initializer.append(numpy_helper.from_array(weights.reshape(shape), name))
        layers[node.name].input[1] = name
        if node.name == "conv1":  # BatchNorm was folded into these weights: the folded bias, no BatchNorm
            model.graph.initializer.append(numpy_helper.from_array(node.inputs[2].const, "conv1_bias"))
            layers["conv1"].input.append("conv1_bias")
            layers["relu1"].input[0] = "c1"
            model.graph.node.remove(layers["bn1"])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def check_clustered(target: str = "host") -> None:
    model, x = clustered_model()
    compiled = edgecc.compile(model, target=target, passes=CLUSTER)
    assert compiled.report["ops"].get("CodebookDecode") == 4, compiled.report["ops"]  # conv1, dw, fc, out
    expected = dense_expected(model, compiled, x)
    np.testing.assert_allclose(compiled.run([x])[0], expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_clustered_model_on_the_host():
    check_clustered()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["armv7", "armv8"])
def test_arm_targets_under_qemu(target):
    skip_unless_runnable(target)
    for shape, bits, entries in CASES:
        model, x, expected = decode_model(shape, bits, entries)
        np.testing.assert_array_equal(edgecc.compile(model, target=target).run([x])[0], expected)
    check_clustered(target)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                    reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm (installed by .ci/run)")
def test_clustered_model_on_cortex_m4(tmp_path):
    from test_bare_metal import run_on_cortex_m4

    model, x = clustered_model()
    got = run_on_cortex_m4(tmp_path, model, x, "-p", CLUSTER)
    expected = dense_expected(model, edgecc.compile(model, passes=CLUSTER, runtime="reference"), x).reshape(-1)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


@pytest.mark.parametrize("target, instruction", [("x86-64-v3", r"\bvperm(ps|d)\s+%ymm"),
                                                 ("armv8", r"\btbl\s+v\d+\.16b, \{ v\d+\.16b, v\d+\.16b, v\d+\.16b, v\d+\.16b \}")])
def test_4_bit_indices_are_looked_up_by_register_permutes(target, instruction):
    import re

    from test_native_qconv import _kernel_asm

    model, _, _ = decode_model((64, 64), 4, 16)
    assert re.search(instruction, _kernel_asm(model, target, "CodebookDecode"))

