"""prune-channels against onnxruntime on the ORIGINAL model with the pruned channels silenced.

Removing channel c of a layer is exactly the same as keeping it and making it output 0 everywhere its consumers
read it, when every op between the layer and its consumers maps 0 to 0. So the reference zeroes the pruned output
channels' weights and bias in the original ONNX model, and on the way every per-channel term that would make a
zero non-zero: a depthwise convolution's bias for that channel, BatchNorm's beta and mean, a per-channel Add
constant. Relu, Mul, GlobalAveragePool, ReduceMean, Flatten, Reshape and Concat keep zeros zero. The shrunk model
run by edgecc must equal that model run by onnxruntime within 1e-5 of the largest output (float32 summation order).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from compression_util import close, compile_module, init, initializer, ort_run, prepared, run_shared_model, \
    with_initializers
from edgecc.errors import EdgeccError
from edgecc.frontend.onnx_import import import_model
from edgecc.interpreter import run_module
from edgecc.ir.verifier import verify
from edgecc.ops.costs import node_macs
from edgecc.passes import PassContext, PassManager, parse_pipeline
from edgecc.passes.prune_channels import prune_channels
from models import make_model, tensor_info

X = {"x": np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)}
CONV = dict(pads=[1, 1, 1, 1])


def _model(nodes, inits, out_shape):
    return make_model(nodes, [tensor_info("x", [1, 4, 8, 8])], [tensor_info("y", out_shape)], inits)


def _pruned(records) -> dict[str, list[int]]:
    return {r["layer"]: r["pruned_channels"] for r in records if r["skipped"] is None}


def _silenced(model, zero: dict[str, tuple[int, list[int]]]):
    """`model` with initializer[name] zeroed at `indices` along `axis`, for each name: (axis, indices)."""
    arrays = {}
    for name, (axis, indices) in zero.items():
        array = arrays.get(name, initializer(model, name))
        index = [slice(None)] * array.ndim
        index[axis] = list(indices)
        array[tuple(index)] = 0
        arrays[name] = array
    return with_initializers(model, arrays)


def _weights(module) -> dict[str, tuple]:
    return {n.name: n.inputs[1].const.shape for n in module.graph.nodes if n.op in ("Conv", "Gemm", "MatMul")}


def _check(model, module, silenced, rtol=1e-5):
    verify(module, require_types=True)
    expected = ort_run(silenced, X)[0]
    close(run_module(module, X)[0], expected, rtol)
    assert not np.allclose(expected, ort_run(model, X)[0])  # the pruning did change the model


def conv_chain():
    """Conv 4->16 -> Relu -> Conv 16->8 -> Relu -> GlobalAveragePool -> Flatten -> Gemm 8->10 (graph output)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", **CONV),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    inits = [init(rng, "w1", (16, 4, 3, 3)), init(rng, "b1", (16,)), init(rng, "w2", (8, 16, 3, 3)),
             init(rng, "b2", (8,)),
             init(rng, "w3", (10, 8)), init(rng, "b3", (10,))]
    return _model(nodes, inits, [1, 10])


def test_conv_relu_conv_gap_gemm():
    model = conv_chain()
    module = prepared(model)
    records = prune_channels(module, 0.25)
    by_layer = {r["layer"]: r for r in records}
    assert by_layer["fc"]["skipped"].startswith("its channels reach the graph output 'y'")
    pruned = _pruned(records)
    assert len(pruned["conv1"]) == 4 and len(pruned["conv2"]) == 2
    # the pruned channels are those with the smallest L1 norms
    norms = np.abs(initializer(model, "w1")).reshape(16, -1).sum(axis=1)
    assert sorted(pruned["conv1"]) == sorted(np.argsort(norms)[:4].tolist())
    assert _weights(module) == {"conv1": (12, 4, 3, 3), "conv2": (6, 12, 3, 3), "fc": (10, 6)}
    for name, before, after in [("conv1", 16, 12), ("conv2", 8, 6), ("fc", 10, 10)]:
        record = by_layer[name]
        assert (record["channels_before"], record["channels_after"]) == (before, after)
        node = next(n for n in module.graph.nodes if n.name == name)
        assert record["bytes_after"] == node.inputs[1].const.nbytes and record["macs_after"] == node_macs(node)
    assert (by_layer["conv2"]["macs_before"], by_layer["conv2"]["macs_after"]) == (8 * 36 * 16 * 9, 6 * 36 * 12 * 9)
    assert by_layer["fc"]["bytes_before"] == 320 and by_layer["fc"]["bytes_after"] == 240
    silenced = _silenced(model, {"w1": (0, pruned["conv1"]), "b1": (0, pruned["conv1"]),
                                 "w2": (0, pruned["conv2"]), "b2": (0, pruned["conv2"])})
    _check(model, module, silenced)
    close(compile_module(module).run(X)[0], ort_run(silenced, X)[0], 1e-5)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_through_depthwise_to_the_next_conv(multiplier):
    """Conv 4->16 -> Relu -> depthwise (16 groups, 16 * multiplier outputs) -> Relu -> Conv 1x1 -> Relu ->
    ReduceMean over H, W -> Gemm. The depthwise conv loses the same channels (and groups) as conv1."""
    rng = np.random.default_rng(2)
    dw_out = 16 * multiplier
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", **CONV),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "wd", "bd"], ["d"], name="dw", group=16, **CONV),
             helper.make_node("Relu", ["d"], ["rd"]), helper.make_node("Conv", ["rd", "w3", "b3"], ["c3"], name="pw"),
             helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("ReduceMean", ["r3", "axes"], ["m"], keepdims=0),
             helper.make_node("Gemm", ["m", "w4", "b4"], ["y"], name="fc")]
    inits = [init(rng, "w1", (16, 4, 3, 3)), init(rng, "b1", (16,)), init(rng, "wd", (dw_out, 1, 3, 3)),
             init(rng, "bd", (dw_out,)), init(rng, "w3", (12, dw_out, 1, 1)), init(rng, "b3", (12,)),
             init(rng, "w4", (12, 5)), init(rng, "b4", (5,)),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    model = make_model(nodes, [tensor_info("x", [1, 4, 8, 8])], [tensor_info("y", [1, 5])], inits, opset=18)
    module = prepared(model)
    records = prune_channels(module, 0.25)
    pruned = _pruned(records)
    assert set(pruned) == {"conv1", "pw"}
    assert "grouped convolution" in next(r["skipped"] for r in records if r["layer"] == "dw")
    dw = next(n for n in module.graph.nodes if n.name == "dw")
    assert dw.attrs["group"] == 12 and _weights(module)["dw"] == (12 * multiplier, 1, 3, 3)
    assert _weights(module)["pw"] == (9, 12 * multiplier, 1, 1) and _weights(module)["fc"] == (9, 5)
    rows = [c * multiplier + j for c in pruned["conv1"] for j in range(multiplier)]
    silenced = _silenced(model, {"w1": (0, pruned["conv1"]), "b1": (0, pruned["conv1"]), "wd": (0, rows),
                                 "bd": (0, rows), "w3": (0, pruned["pw"]), "b3": (0, pruned["pw"])})
    _check(model, module, silenced)


def test_batchnorm_shrinks_with_the_conv():
    """An unfolded BatchNormalization (the module is not prepared): its four parameters lose the channels."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", **CONV),
             helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    inits = [init(rng, "w1", (10, 4, 3, 3)), init(rng, "b1", (10,)), init(rng, "g", (10,)), init(rng, "beta", (10,)),
             init(rng, "mean", (10,)), numpy_helper.from_array(rng.uniform(0.5, 2, 10).astype(np.float32), "var"),
             init(rng, "w2", (3, 10, 3, 3))]
    model = _model(nodes, inits, [1, 3, 6, 6])
    module = import_model(model)
    PassManager(parse_pipeline("infer-shapes"), PassContext()).run(module)
    records = prune_channels(module, 0.3)
    pruned = _pruned(records)["conv1"]
    assert len(pruned) == 3
    bn = next(n for n in module.graph.nodes if n.op == "BatchNormalization")
    assert all(v.const.shape == (7,) for v in bn.inputs[1:])
    silenced = _silenced(model, {"w1": (0, pruned), "b1": (0, pruned), "beta": (0, pruned), "mean": (0, pruned)})
    _check(model, module, silenced)


def test_concat_offsets_and_per_channel_constants():
    """Two convs concatenated (8 + 6 channels) -> Relu -> Mul [14,1,1] -> Add [1,14,1,1] -> PRelu [14,1,1] ->
    Conv -> Reshape to features -> MatMul."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", **CONV),
             helper.make_node("Conv", ["x", "wb", "bb"], ["b"], name="conv_b", **CONV),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1), helper.make_node("Relu", ["cat"], ["r"]),
             helper.make_node("Mul", ["r", "s"], ["m"]), helper.make_node("Add", ["t", "m"], ["t2"]),
             helper.make_node("PRelu", ["t2", "slope"], ["p"]),
             helper.make_node("Conv", ["p", "wc", "bc"], ["c"], name="conv_c", strides=[2, 2]),
             helper.make_node("Reshape", ["c", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "wm"], ["y"], name="mm")]
    inits = [init(rng, "wa", (8, 4, 3, 3)), init(rng, "ba", (8,)), init(rng, "wb", (6, 4, 3, 3)), init(rng, "bb", (6,)),
             init(rng, "s", (14, 1, 1)), init(rng, "t", (1, 14, 1, 1)), init(rng, "slope", (14, 1, 1)),
             init(rng, "wc", (5, 14, 3, 3)), init(rng, "bc", (5,)),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape"), init(rng, "wm", (45, 7))]
    model = _model(nodes, inits, [1, 7])
    module = prepared(model)
    records = prune_channels(module, 0.5)
    pruned = _pruned(records)
    assert set(pruned) == {"conv_a", "conv_b", "conv_c"}
    concat = pruned["conv_a"] + [8 + c for c in pruned["conv_b"]]
    assert _weights(module) == {"conv_a": (4, 4, 3, 3), "conv_b": (3, 4, 3, 3), "conv_c": (3, 7, 3, 3), "mm": (27, 7)}
    silenced = _silenced(model, {"wa": (0, pruned["conv_a"]), "ba": (0, pruned["conv_a"]), "wb": (0, pruned["conv_b"]),
                                 "bb": (0, pruned["conv_b"]), "t": (1, concat), "wc": (0, pruned["conv_c"]),
                                 "bc": (0, pruned["conv_c"])})
    _check(model, module, silenced)


def test_matmul_bias_gelu_matmul():
    """A transformer-style MLP on 2x5x16 tokens: MatMul 16->32 -> Add bias -> Relu -> MatMul 32->8 -> Add ->
    Softmax over the features (graph output): the hidden features shrink, the second MatMul is left alone."""
    rng = np.random.default_rng(12)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"], name="down"),
             helper.make_node("Add", ["b2", "o"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    inits = [init(rng, "w1", (16, 32)), init(rng, "b1", (32,)), init(rng, "w2", (32, 8)), init(rng, "b2", (8,))]
    model = make_model(nodes, [tensor_info("x", [2, 5, 16])], [tensor_info("y", [2, 5, 8])], inits)
    module = prepared(model)
    records = prune_channels(module, 0.25)
    reasons = {r["layer"]: r["skipped"] for r in records}
    assert reasons["up"] is None and "(Softmax) normalises across the channels" in reasons["down"]
    assert _weights(module) == {"up": (16, 24), "down": (24, 8)}
    pruned = _pruned(records)["up"]
    x = {"x": np.random.default_rng(13).standard_normal((2, 5, 16)).astype(np.float32)}
    silenced = _silenced(model, {"w1": (1, pruned), "b1": (0, pruned)})
    close(run_module(module, x)[0], ort_run(silenced, x)[0], 1e-5)


def test_residual_add_is_refused():
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", **CONV),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", **CONV),
             helper.make_node("Add", ["c2", "r1"], ["s"]), helper.make_node("Relu", ["s"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    inits = [init(rng, "w1", (8, 4, 3, 3)), init(rng, "b1", (8,)), init(rng, "w2", (8, 8, 3, 3)), init(rng, "b2", (8,)),
             init(rng, "w3", (2, 8, 1, 1))]
    model = _model(nodes, inits, [1, 2, 8, 8])
    module = prepared(model)
    records = prune_channels(module, 0.5)
    reasons = {r["layer"]: r["skipped"] for r in records}
    assert "a residual connection" in reasons["conv1"] and "a residual connection" in reasons["conv2"]
    assert "(Add)" in reasons["conv1"]
    assert reasons["conv3"].startswith("its channels reach the graph output")
    assert all(r["channels_after"] == r["channels_before"] and r["bytes_after"] == r["bytes_before"] for r in records)
    close(run_module(module, X)[0], ort_run(model, X)[0], 1e-5)


def test_channel_shuffle_reshape_is_refused():
    """Reshape 1x8xHxW -> 1x2x4xHxW splits the channel axis: conv1 is left alone, conv2 is pruned."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", **CONV),
             helper.make_node("Reshape", ["c1", "s1"], ["g"]),
             helper.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "s2"], ["u"]),
             helper.make_node("Conv", ["u", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    inits = [init(rng, "w1", (8, 4, 3, 3)), init(rng, "b1", (8,)), init(rng, "w2", (6, 8, 1, 1)), init(rng, "b2", (6,)),
             init(rng, "w3", (2, 6, 1, 1)), numpy_helper.from_array(np.array([1, 2, 4, 8, 8], np.int64), "s1"),
             numpy_helper.from_array(np.array([1, 8, 8, 8], np.int64), "s2")]
    model = _model(nodes, inits, [1, 2, 8, 8])
    module = prepared(model)
    records = prune_channels(module, 0.5)
    reasons = {r["layer"]: r["skipped"] for r in records}
    assert "splits the channel axis" in reasons["conv1"] and reasons["conv2"] is None
    pruned = _pruned(records)["conv2"]
    _check(model, module, _silenced(model, {"w2": (0, pruned), "b2": (0, pruned)}))


def test_keeps_one_channel_and_small_fractions():
    model = conv_chain()
    module = prepared(model)
    records = prune_channels(module, 0.99)
    assert {r["layer"]: r["channels_after"] for r in records} == {"conv1": 1, "conv2": 1, "fc": 10}
    verify(module, require_types=True)
    records = prune_channels(prepared(model), 0.05)
    assert records[1]["skipped"] == "0.05 of 8 channel(s) rounds to none"
    assert records[0]["channels_after"] == 15


@pytest.mark.parametrize("bad", [0, 1, -0.5, 2, float("inf"), None])
def test_bad_fraction_is_a_clear_error(bad):
    with pytest.raises(EdgeccError, match="channel fraction must be a number in \\(0, 1\\)") as info:
        prune_channels(prepared(conv_chain()), bad)
    assert info.value.where == "--prune-channels"


def test_pass_in_a_pipeline():
    module = prepared(conv_chain())
    manager = PassManager(parse_pipeline("prune-channels{fraction=0.5}"), PassContext(verify_each=True))
    manager.run(module)
    assert manager.history[-1].stats == {"layers-pruned": 2, "layers-skipped": 1}
    assert _weights(module) == {"conv1": (8, 4, 3, 3), "conv2": (4, 8, 3, 3), "fc": (10, 4)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_mobilenet"])
def test_shared_digits_models(shared_dir, name):
    records, _ = run_shared_model(shared_dir, name, lambda m: prune_channels(m, 0.3))
    done = [r for r in records if r["skipped"] is None]
    assert done and all(r["channels_after"] < r["channels_before"] for r in done)
    assert sum(r["bytes_after"] for r in records) < 0.8 * sum(r["bytes_before"] for r in records)
