"""IR core, verifier, and the textual form: print(parse(t)) == t, exact constants, clear parse errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgecc.errors import IRParseError, VerificationError
from edgecc.ir import Builder, DType, Graph, Module, Node, TensorType, Value
from edgecc.ir.parser import parse_module
from edgecc.ir.printer import print_module
from edgecc.ir.verifier import verify

DTYPES = [d.numpy for d in DType]


def _module_with_constant(array: np.ndarray) -> Module:
    graph = Graph("main")
    x = graph.add_input("x", TensorType.of(array))
    c = graph.constant(array, "c")
    out = Value("y", TensorType.of(array))
    graph.add_node(Node("Add", [x, c], [out], name="add"))
    graph.add_output(out, "y")
    return Module(graph, 18, name="m")


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)))
def test_constants_round_trip_exactly(array):
    text = print_module(_module_with_constant(array))
    parsed = parse_module(text)
    (node,) = parsed.graph.nodes
    back = node.inputs[1].const
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes() or (np.isnan(array).any() and np.array_equal(back, array, equal_nan=True))
    assert print_module(parsed) == text


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
                       st.one_of(st.integers(-2**62, 2**62), st.floats(width=32, allow_nan=False),
                                 st.text(max_size=8), st.lists(st.integers(-100, 100), max_size=4),
                                 st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=3)),
                       max_size=4))
def test_attributes_round_trip(attrs):
    module = _module_with_constant(np.zeros(2, np.float32))
    module.graph.nodes[0].attrs = attrs
    text = print_module(module)
    assert parse_module(text).graph.nodes[0].attrs == attrs
    assert print_module(parse_module(text)) == text


def test_large_constants_external_side_file():
    array = np.arange(100, dtype=np.float32)
    side: dict = {}
    text = print_module(_module_with_constant(array), large_constants="external", side_arrays=side)
    assert 'external<"c0">' in text and list(side) == ["c0"]
    np.testing.assert_array_equal(parse_module(text, side_arrays=side).graph.nodes[0].inputs[1].const, array)
    elided = print_module(_module_with_constant(array), large_constants="elide")
    with pytest.raises(IRParseError, match="elided"):
        parse_module(elided)


def test_parse_errors_name_the_line():
    with pytest.raises(IRParseError, match="line 2"):
        parse_module("module @m {opset = 18} {\n  graph @main( {\n")
    with pytest.raises(IRParseError, match="used before it is defined"):
        parse_module('module @m {opset = 18} {\n graph @g(%x : tensor<2xf32>) {\n %0 = "onnx.Relu"(%y)\n return %0 as "o"\n }\n}\n')


def test_verifier_catches_bad_order_and_cycles():
    module = _module_with_constant(np.zeros(2, np.float32))
    graph = module.graph
    add = graph.nodes[0]
    relu_out = Value("r", TensorType(DType.float32, (2,)))
    relu = Node("Relu", [add.outputs[0]], [relu_out])
    graph.nodes.insert(0, relu)  # reads add's output before add runs
    with pytest.raises(VerificationError, match="before it is defined"):
        verify(module)
    graph.topological_sort()
    verify(module)


def test_use_lists_follow_edits():
    module = _module_with_constant(np.ones(3, np.float32))
    graph = module.graph
    x = graph.inputs[0]
    add = graph.nodes[0]
    assert x.uses == [(add, 0)]
    other = graph.constant(np.zeros(3, np.float32))
    add.set_input(0, other)
    assert x.uses == [] and other.uses == [(add, 0)]


def test_builder_builds_a_runnable_module():
    from edgecc.interpreter import run_module
    from edgecc.passes import PassManager, parse_pipeline

    b = Builder()
    x = b.input("x", DType.float32, (2, 3))
    scale = b.constant(np.full((3,), 2.0, np.float32), "scale")
    _, second = b.op("Split", b.op("Mul", x, scale), b.constant(np.array([1, 2], np.int64)), num_outputs=2, axis=1)
    b.output(b.op("Relu", second), "y")
    module = b.module()
    PassManager(parse_pipeline("infer-shapes")).run(module)
    verify(module, require_types=True)
    data = np.arange(-3, 3, dtype=np.float32).reshape(2, 3)
    (y,) = run_module(module, {"x": data})
    np.testing.assert_array_equal(y, np.maximum(data[:, 1:] * 2, 0))


def test_clone_is_independent_and_deep_graphs_clone():
    from edgecc.interpreter import run_module

    b = Builder()
    x = b.input("x", DType.float32, (4,))
    y = x
    for _ in range(3000):  # deeper than Python's recursion limit: copy.deepcopy fails here
        y = b.op("Relu", y)
    b.output(y, "y")
    module = b.module()
    copy = module.clone()
    assert print_module(copy) == print_module(module)
    copy.graph.remove_node(copy.graph.nodes[-1])
    assert len(module.graph.nodes) == 3000 and len(copy.graph.nodes) == 2999
    data = np.array([-1, 0, 1, 2], np.float32)
    np.testing.assert_array_equal(run_module(module, {"x": data})[0], np.maximum(data, 0))
