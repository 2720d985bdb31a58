"""The static memory plan: reuse by liveness, in-place views, and the figures of the report."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

import edgecc
from models import make_model, tensor_info


def _compiled(nodes, inits=()):
    model = make_model(nodes, [tensor_info("x", [4, 16])], [tensor_info("y", None)], inits)
    return edgecc.compile(model, opt_level=0), model


def test_chain_reuses_memory_of_dead_tensors():
    from edgecc.passes.plan_memory import plan

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Exp", ["b"], ["c"]), helper.make_node("Neg", ["c"], ["y"])]
    compiled, _ = _compiled(nodes)
    separate = plan(compiled.module, in_place=False)
    # a, b, c are 256 bytes each; at most two are alive at once, so c reuses a's slot.
    assert separate.unplanned_bytes == 3 * 256 and separate.lower_bound_bytes == 2 * 256
    assert separate.arena_bytes == 2 * 256
    a, b, c = (n.outputs[0] for n in compiled.module.graph.nodes[:3])
    assert separate.offset_of(a) == separate.offset_of(c) != separate.offset_of(b)
    # In place (the default), b and c are computed over a: one slot.
    planned = compiled.module.memory_plan
    assert planned.in_place == {b._id: a._id, c._id: a._id} and planned.arena_bytes == 256
    report = compiled.report
    assert (report["arena_bytes"], report["arena_lower_bound_bytes"], report["intermediates_bytes"]) == (256, 256, 768)
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_allclose(compiled.run({"x": x})[0], -np.exp(-np.maximum(x, 0)), rtol=1e-6)


def test_reshape_of_a_dying_tensor_is_in_place():
    shape = numpy_helper.from_array(np.array([8, 8], np.int64), "shape")
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Reshape", ["a", "shape"], ["r"]),
             helper.make_node("Neg", ["r"], ["y"])]
    compiled, model = _compiled(nodes, [shape])
    plan = compiled.module.memory_plan
    a, r = compiled.module.graph.nodes[0].outputs[0], compiled.module.graph.nodes[1].outputs[0]
    assert plan.aliases == {r._id: a._id} and plan.offset_of(a) == plan.offset_of(r)
    assert plan.arena_bytes == 256
    assert "Reshape" not in compiled.native.llvm_ir  # no kernel runs for the view
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_array_equal(compiled.run({"x": x})[0], -np.maximum(x, 0).reshape(8, 8))


def test_reshape_of_a_tensor_read_later_is_a_copy():
    shape = numpy_helper.from_array(np.array([8, 8], np.int64), "shape")
    flat = numpy_helper.from_array(np.array([4, 16], np.int64), "flat")
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Reshape", ["a", "shape"], ["r"]),
             helper.make_node("Neg", ["r"], ["n"]), helper.make_node("Reshape", ["n", "flat"], ["m"]),
             helper.make_node("Add", ["m", "a"], ["y"])]
    compiled, _ = _compiled(nodes, [shape, flat])
    plan = compiled.module.memory_plan
    graph = compiled.module.graph
    a, r, n, m = (graph.nodes[i].outputs[0] for i in range(4))
    assert r._id not in plan.aliases  # a is read again by the Add
    assert plan.in_place == {n._id: r._id}  # Neg computes over the copy r, which dies there
    assert plan.aliases == {m._id: r._id}  # and the Reshape of its result is a view of that buffer
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    relu = np.maximum(x, 0)
    np.testing.assert_array_equal(compiled.run({"x": x})[0], -relu + relu)
