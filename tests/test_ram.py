"""RAM without touching numerics: memory-aware order, in-place ops, fit_ram (patching to a budget)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import edgecc
from edgecc.api import CompiledModel, optimize
from edgecc.backends.native import generate
from edgecc.backends.targets import resolve_target
from edgecc.errors import BudgetError
from edgecc.frontend.onnx_import import import_model
from edgecc.passes import PassContext, PassManager, parse_pipeline
from edgecc.passes.plan_memory import memory_order, plan, plan_lower_bound
from edgecc.ram import fit_ram
from models import make_model, stage_cnn, tensor_info


def _onnxruntime(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _prepared(model):
    module, _ = optimize(import_model(model, {}, None), opt_level=2)
    return module


def _native(module) -> CompiledModel:
    """Code for `module` as edgecc.compile makes it after optimisation (the same final passes)."""
    PassManager(parse_pipeline("infer-shapes,fold-constants,dce,plan-memory"), PassContext()).run(module)
    return CompiledModel(module, "host", {}, generate(module, resolve_target("host"), "ram_test"))


def branches(count: int = 2):
    """`count` branches x -> wide MatMul -> narrow MatMul, summed; listed widest-first so the graph order keeps
    every wide tensor alive at once, while branch by branch keeps one."""
    rng = np.random.default_rng(3)
    inits, wide, narrow, sums = [], [], [], []
    for k in range(count):
        inits += [numpy_helper.from_array(rng.standard_normal((16, 256 + 64 * k)).astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(rng.standard_normal((256 + 64 * k, 4)).astype(np.float32), f"v{k}")]
        wide.append(helper.make_node("MatMul", ["x", f"w{k}"], [f"b{k}"]))
        narrow.append(helper.make_node("MatMul", [f"b{k}", f"v{k}"], [f"s{k}"]))
    total = "s0"
    for k in range(1, count):
        sums.append(helper.make_node("Add", [total, f"s{k}"], [f"t{k}" if k < count - 1 else "y"]))
        total = f"t{k}"
    model = make_model(wide + narrow + sums, [tensor_info("x", [2, 16])], [tensor_info("y", [2, 4])], inits)
    return model, rng.standard_normal((2, 16)).astype(np.float32)


def test_order_runs_branches_one_by_one_and_keeps_results():
    model, x = branches(2)
    module = _prepared(model)
    graph_order = plan(module.clone(), in_place=False).arena_bytes
    compiled = edgecc.compile(model)
    assert compiled.report["arena_bytes"] < graph_order
    np.testing.assert_allclose(compiled.run({"x": x})[0], _onnxruntime(model, {"x": x})[0], rtol=1e-5, atol=1e-4)


def test_order_is_the_best_of_every_topological_order():
    module = _prepared(branches(3)[0])
    graph = module.graph
    nodes = list(graph.nodes)
    best = None
    for order in nx.all_topological_sorts(graph.dependency_graph()):
        graph.nodes = [nodes[i] for i in order]
        peak = plan_lower_bound(module)
        best = peak if best is None else min(best, peak)
    graph.nodes = nodes
    graph.nodes = memory_order(module)
    assert plan_lower_bound(module) == best


def test_order_never_raises_the_arena_of_shared_models(shared_dir):
    for name in ("squeezenet1_1", "shufflenet_v2_x1_0", "lenet5"):
        module = _prepared(str(shared_dir / "models" / f"{name}.onnx"))
        before = plan(module.clone()).arena_bytes
        compiled_plan = PassManager(parse_pipeline("plan-memory"), PassContext()).run(module).memory_plan
        assert compiled_plan.arena_bytes <= before, name


def test_in_place_elementwise_ops_match_onnxruntime_on_native_code():
    """Relu, Sigmoid, Sub, Mul write over a dying operand of their own shape; the broadcast operand (the mean)
    is read at every row and must never be overwritten."""
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("ReduceMean", ["a", "axes"], ["m"], keepdims=1),
             helper.make_node("Sigmoid", ["a"], ["b"]),
             helper.make_node("Sub", ["b", "m"], ["c"]),
             helper.make_node("Mul", ["c", "c"], ["d"]),
             helper.make_node("Add", ["d", "x"], ["y"])]
    model = make_model(nodes, [tensor_info("x", [5, 33])], [tensor_info("y", [5, 33])], [axes], opset=18)
    compiled = edgecc.compile(model, opt_level=0)
    graph, memory = compiled.module.graph, compiled.module.memory_plan
    value = {v.name: v for n in graph.nodes for v in n.outputs}
    assert set(memory.in_place) == {value["b"]._id, value["c"]._id, value["d"]._id}
    assert value["m"]._id not in memory.in_place.values()
    assert memory.offset_of(value["m"]) != memory.offset_of(value["a"])
    x = np.random.default_rng(4).standard_normal((5, 33)).astype(np.float32)
    np.testing.assert_allclose(compiled.run({"x": x})[0], _onnxruntime(model, {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_fit_ram_without_budget_only_orders():
    model, _, _ = stage_cnn()
    module = _prepared(model)
    nodes = len(module.graph.nodes)
    report = fit_ram(module, None, "host")
    assert report["fits"] and report["patch"] is None and len(module.graph.nodes) == nodes
    assert report["arena_bytes"] <= report["layer_by_layer_arena_bytes"]


def test_fit_ram_patches_to_the_budget_and_keeps_results():
    model, x, expected = stage_cnn()
    module = _prepared(model)
    default = plan(module.clone(), in_place=False).arena_bytes
    report = fit_ram(module, default * 2 // 3, "host")
    assert report["patch"] is not None and report["arena_bytes"] <= default * 2 // 3
    compiled = _native(module)
    assert compiled.module.memory_plan.arena_bytes == report["arena_bytes"]
    np.testing.assert_allclose(compiled.run({"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_fit_ram_names_the_smallest_arena_when_nothing_fits():
    model, _, _ = stage_cnn()
    module = _prepared(model)
    with pytest.raises(BudgetError, match=r"--max-ram: max_ram of 1000 bytes .*smallest reachable is \d+ bytes") \
            as error:
        fit_ram(module, 1000, "cortex-m4")
    assert error.value.budget == "max_ram" and error.value.smallest > 1000
    assert "--quantize int8" in error.value.hint and "cortex-m4" in error.value.hint


@pytest.mark.slow
def test_mobilenet_v2_arena_four_times_smaller_and_exact(shared_dir):
    """Issue 7's acceptance: patching and ordering bring mobilenet_v2's arena >= 4x below the layer-by-layer
    plan, outputs within 1e-4 (relative to the largest output) of onnxruntime."""
    path = str(shared_dir / "models" / "mobilenet_v2.onnx")
    module = _prepared(path)
    default = plan(module.clone(), in_place=False).arena_bytes
    report = fit_ram(module, default // 4, "host")
    assert report["arena_bytes"] * 4 <= default
    assert report["patch"]["halo_mac_overhead"] < 0.15
    compiled = _native(module)
    x = np.load(shared_dir / "models" / "mobilenet_v2.ref.npz")["input"]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    got = compiled.run([x])[0]
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-4


def fire(axis: int = 1, reuse_input: bool = False):
    """A fire module: squeeze, then 1x1 and 3x3 expands joined by a Concat (optionally one expand also read after)."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in [("ws", (4, 8, 1, 1)), ("w1", (8, 4, 1, 1)), ("w3", (8, 4, 3, 3)), ("wo", (2, 16, 1, 1))]]
    nodes = [helper.make_node("Conv", ["x", "ws"], ["s"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["s"], ["sr"]),
             helper.make_node("Conv", ["sr", "w1"], ["e1"], kernel_shape=[1, 1]),
             helper.make_node("Conv", ["sr", "w3"], ["e3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["e3"], ["e3r"]),
             helper.make_node("Concat", ["e1", "e3r"], ["cat"], axis=axis)]
    if axis == 1:
        nodes.append(helper.make_node("Conv", ["cat", "wo"], ["o"], kernel_shape=[1, 1]))
    else:
        nodes.append(helper.make_node("ReduceMax", ["cat"], ["o"], axes=[2], keepdims=1))
    nodes.append(helper.make_node("Sigmoid", ["o"], ["y"]))
    if reuse_input:
        nodes[-1] = helper.make_node("Add", ["o", "o"], ["o2"])
        nodes += [helper.make_node("ReduceMax", ["e1"], ["t"], keepdims=1, axes=[1]),
                  helper.make_node("Mul", ["o2", "t"], ["y"])]
    model = make_model(nodes, [tensor_info("x", [1, 8, 9, 11])], [tensor_info("y", None)], inits, opset=13)
    return model, rng.standard_normal((1, 8, 9, 11)).astype(np.float32)


def test_channel_concat_is_assembled_in_place_and_matches_onnxruntime():
    model, x = fire()
    compiled = edgecc.compile(model)
    memory = compiled.module.memory_plan
    assert len(memory.assembled) == 1 and "Concat" not in compiled.native.llvm_ir  # no copy runs
    assert memory.arena_bytes < plan(compiled.module.clone(), in_place=False).arena_bytes or memory.in_place
    np.testing.assert_allclose(compiled.run({"x": x})[0], _onnxruntime(model, {"x": x})[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis, reuse", [(2, False), (1, True)])
def test_concat_is_copied_when_its_slices_are_not_runs_or_are_read_elsewhere(axis, reuse):
    model, x = fire(axis, reuse)
    compiled = edgecc.compile(model)
    assert not compiled.module.memory_plan.assembled
    np.testing.assert_allclose(compiled.run({"x": x})[0], _onnxruntime(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_max_ram_counts_the_generated_codes_stack():
    """RAM = arena + stack: a budget one byte under the unpatched arena + its stack is met by patching (fit_ram alone
    would take the unpatched arena, which fits without the stack), and the result still matches onnxruntime."""
    model, x, expected = stage_cnn()
    plain = edgecc.compile(model, target="cortex-m4", max_ram=10**7).report["ram"]
    assert plain["patch"] is None and plain["stack_bytes"] > 0
    assert plain["ram_bytes"] == plain["arena_bytes"] + plain["stack_bytes"]
    budget = plain["ram_bytes"] - 1
    assert fit_ram(_prepared(model), budget, "cortex-m4")["patch"] is None  # the arena alone fits: no patching
    compiled = edgecc.compile(model, target="cortex-m4", max_ram=budget)
    ram = compiled.report["ram"]
    assert ram["patch"] is not None and ram["ram_bytes"] <= budget
    assert ram["arena_bytes"] == compiled.module.memory_plan.arena_bytes
    np.testing.assert_allclose(_native(compiled.module.clone()).run({"x": x})[0], expected, rtol=1e-5, atol=1e-5)
