"""prune (unstructured magnitude pruning) against onnxruntime on the same model with the same weights zeroed.

Tolerance: 1e-5 of the largest output. edgecc (interpreter and native code) and onnxruntime compute the same float32
products; only the summation order differs (reductions of at most 4 * 9 + 16 * 9 terms here).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from compression_util import close, compile_module, init, initializer, ort_run, prepared, run_shared_model, \
    weight_initializer, with_initializers
from edgecc.errors import EdgeccError
from edgecc.interpreter import run_module
from edgecc.passes import PassContext, PassManager, parse_pipeline
from edgecc.passes.prune import prune_magnitude
from models import make_model, tensor_info

RNG = np.random.default_rng(5)
X = {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)}


def conv_gemm_matmul(scales=(0.3, 0.3, 0.3, 0.3)):
    """Conv 3x3 (576 weights) -> Relu -> Conv 1x1 (128) -> Flatten -> Gemm (transB, 288x20) -> MatMul (20x12)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", strides=[2, 2]),
             helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], name="fc", transB=1),
             helper.make_node("MatMul", ["g", "w4"], ["y"], name="mm")]
    inits = [init(rng, "w1", (16, 4, 3, 3), scales[0]), init(rng, "b1", (16,)),
             init(rng, "w2", (8, 16, 1, 1), scales[1]), init(rng, "b2", (8,)),
             init(rng, "w3", (20, 72), scales[2]), init(rng, "b3", (20,)), init(rng, "w4", (20, 12), scales[3])]
    return make_model(nodes, [tensor_info("x", [1, 4, 6, 6])], [tensor_info("y", [1, 12])], inits)


def reference_with(model, module, records):
    """onnxruntime on `model` with each pruned layer's initializer replaced by the module's pruned weights."""
    consts = {v.name: v.const for v in module.graph.constants()}
    arrays = {weight_initializer(model, r["layer"]): consts[r["weight"]] for r in records if r["skipped"] is None}
    return ort_run(with_initializers(model, arrays), X)[0]


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.93])
def test_per_layer_sparsity_and_onnxruntime(sparsity):
    model = conv_gemm_matmul()
    module = prepared(model)
    records = prune_magnitude(module, sparsity, "layer", min_elements=100, min_fan_in=0)
    by_layer = {r["layer"]: r for r in records}
    assert set(by_layer) == {"conv1", "conv2", "fc", "mm"}
    consts = {v.name: v.const for v in module.graph.constants()}
    for record in records:
        assert record["skipped"] is None
        weights = consts[record["weight"]]
        original = initializer(model, weight_initializer(model, record["layer"]))
        assert abs(record["sparsity"] - sparsity) <= 1 / weights.size
        assert record["sparsity"] == np.mean(weights == 0)
        zeroed = weights == 0
        # the zeros are the smallest magnitudes; survivors are untouched; dense bytes and MACs unchanged
        assert np.abs(original[zeroed]).max() <= np.abs(original[~zeroed]).min()
        np.testing.assert_array_equal(weights[~zeroed], original[~zeroed])
        assert record["bytes_after"] == record["bytes_before"] == original.nbytes
        assert record["macs_after"] == record["macs_before"] > 0
    expected = reference_with(model, module, records)
    close(run_module(module, X)[0], expected, 1e-5)
    # biases untouched
    assert {n.name for n in module.graph.nodes} >= {"conv1", "fc"}
    np.testing.assert_array_equal(consts[next(n for n in module.graph.nodes if n.name == "conv1").inputs[2].name],
                                  initializer(model, "b1"))


def test_native_code_matches_onnxruntime():
    model = conv_gemm_matmul()
    module = prepared(model)
    records = prune_magnitude(module, 0.8, min_elements=0, min_fan_in=0)
    expected = reference_with(model, module, records)
    close(compile_module(module).run(X)[0], expected, 1e-5)


def test_global_threshold_is_one_threshold():
    """Layers with small weights lose more under one global threshold; the per-layer scope prunes each equally."""
    model = conv_gemm_matmul(scales=(1.0, 0.3, 0.1, 0.3))
    module = prepared(model)
    records = prune_magnitude(module, 0.6, "global", min_elements=0, min_fan_in=0)
    consts = {v.name: v.const for v in module.graph.constants()}
    originals = {r["layer"]: initializer(model, weight_initializer(model, r["layer"])) for r in records}
    zeroed = np.concatenate([np.abs(originals[r["layer"]])[consts[r["weight"]] == 0] for r in records])
    kept = np.concatenate([np.abs(originals[r["layer"]])[consts[r["weight"]] != 0] for r in records])
    total = sum(o.size for o in originals.values())
    assert zeroed.max() <= kept.min()
    assert zeroed.size == round(0.6 * total)
    sparsity = {r["layer"]: r["sparsity"] for r in records}
    assert sparsity["conv1"] < 0.6 < sparsity["fc"] and not any("note" in r for r in records)
    close(run_module(module, X)[0], reference_with(model, module, records), 1e-5)

    per_layer = prepared(model)
    assert all(abs(r["sparsity"] - 0.6) <= 1 / 100 for r in prune_magnitude(per_layer, 0.6, "layer", 0, 0))


def test_global_keeps_one_weight_per_output_channel():
    model = conv_gemm_matmul(scales=(1.0, 1e-3, 1.0, 1.0))
    module = prepared(model)
    records = prune_magnitude(module, 0.7, "global", min_elements=0, min_fan_in=0)
    conv2 = next(r for r in records if r["layer"] == "conv2")
    weights = next(v.const for v in module.graph.constants() if v.name == conv2["weight"])
    original = initializer(model, "w2")
    assert (weights != 0).reshape(8, -1).sum(axis=1).tolist() == [1] * 8
    np.testing.assert_array_equal(np.abs(weights).reshape(8, -1).max(axis=1),
                                  np.abs(original).reshape(8, -1).max(axis=1))
    assert "8 output channel(s)" in conv2["note"]
    assert all("note" not in r for r in records if r["layer"] != "conv2")


def test_min_elements_skips_small_layers():
    model = conv_gemm_matmul()
    module = prepared(model)
    records = prune_magnitude(module, 0.8)  # default min_elements=256: conv2 (128) and mm (240) are skipped
    skipped = {r["layer"]: r["skipped"] for r in records if r["skipped"]}
    assert skipped == {"conv2": "128 weights < min-elements 256", "mm": "240 weights < min-elements 256"}
    consts = {v.name: v.const for v in module.graph.constants()}
    for record in records:
        if record["skipped"]:
            assert record["sparsity"] == 0.0
            np.testing.assert_array_equal(consts[record["weight"]],
                                          initializer(model, weight_initializer(model, record["layer"])))


def test_min_fan_in_keeps_depthwise_and_narrow_layers_dense():
    """A depthwise conv (9 weights per output channel, 576 in all) and a 3x3 conv on 2 channels (18 per channel)
    are left dense by default; the 3x3 conv on 16 channels (144 per channel) is pruned."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="first", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["b"], name="dw", group=64, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "w3"], ["y"], name="conv", pads=[1, 1, 1, 1], group=4)]
    inits = [init(rng, "w1", (64, 2, 3, 3)), init(rng, "w2", (64, 1, 3, 3)), init(rng, "w3", (8, 16, 3, 3))]
    model = make_model(nodes, [tensor_info("x", [1, 2, 5, 5])], [tensor_info("y", [1, 8, 5, 5])], inits)
    records = prune_magnitude(prepared(model), 0.5)
    assert [r["skipped"] for r in records] == [
        "18 weights per output channel (< 32: depthwise or first layer); kept dense, as in Elsen et al. 2019",
        "9 weights per output channel (< 32: depthwise or first layer); kept dense, as in Elsen et al. 2019", None]
    assert [r["sparsity"] for r in records] == [0.0, 0.0, 0.5]
    assert [r["skipped"] for r in prune_magnitude(prepared(model), 0.5, min_fan_in=0)] == [None, None, None]
    with pytest.raises(EdgeccError, match="min-fan-in must be a non-negative integer") as info:
        prune_magnitude(prepared(model), 0.5, min_fan_in=-3)
    assert info.value.where == "--prune-min-fan-in"


def test_ties_and_shared_weights_are_deterministic():
    """Equal magnitudes are zeroed in position order; a weight two MatMuls share is pruned once and shared."""
    w = np.tile(np.array([1, -1, 2, -2], np.float32), 100).reshape(20, 20)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="b")]
    model = make_model(nodes, [tensor_info("x", [2, 20])], [tensor_info("y", [2, 20])],
                       [numpy_helper.from_array(w, "w")])
    module = prepared(model)
    records = prune_magnitude(module, 0.25, min_elements=0, min_fan_in=0)
    assert records[0]["weight"] == records[1]["weight"]
    a, b = (n for n in module.graph.nodes if n.op == "MatMul")
    assert a.inputs[1] is b.inputs[1]
    pruned = a.inputs[1].const.ravel()
    magnitude_one = np.flatnonzero(np.abs(w.ravel()) == 1)
    assert np.flatnonzero(pruned == 0).tolist() == magnitude_one[:100].tolist()


@pytest.mark.parametrize("bad", [0, 1, 1.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity_is_a_clear_error(bad):
    module = prepared(conv_gemm_matmul())
    with pytest.raises(EdgeccError, match="sparsity must be a number in \\(0, 1\\)") as info:
        prune_magnitude(module, bad)
    assert info.value.where == "--prune" and info.value.hint


def test_bad_scope_and_min_elements():
    module = prepared(conv_gemm_matmul())
    with pytest.raises(EdgeccError, match="unknown pruning scope 'net'"):
        prune_magnitude(module, 0.5, "net")
    with pytest.raises(EdgeccError, match="min-elements"):
        prune_magnitude(module, 0.5, min_elements=-1)


def test_pass_in_a_pipeline():
    model = conv_gemm_matmul()
    module = prepared(model)
    pipeline = "prune{sparsity=0.7,scope=global,min-elements=200,min-fan-in=0}"
    manager = PassManager(parse_pipeline(pipeline), PassContext())
    manager.run(module)
    assert manager.history[-1].stats == {"layers-pruned": 3, "layers-skipped": 1}
    assert manager.history[-1].changed
    zeros = sum(int((v.const == 0).sum()) for v in module.graph.constants() if v.name.endswith("_pruned"))
    assert zeros == round(0.7 * (576 + 1440 + 240))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_mobilenet"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_shared_digits_models(shared_dir, name, scope):
    records, _ = run_shared_model(shared_dir, name, lambda m: prune_magnitude(m, 0.8, scope))
    done = [r for r in records if r["skipped"] is None]
    assert done
    if scope == "layer":
        assert all(abs(r["sparsity"] - 0.8) <= 1 / (r["bytes_before"] // 4) for r in done)
