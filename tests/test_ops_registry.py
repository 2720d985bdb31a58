"""Every op in the registry, tested from the registry, on the onnx wheel's node cases for that op.

For each op and each of its single-node cases (in edgecc's dtypes, lifted to the canonical opset):
- the NumPy reference agrees with the data the onnx wheel ships for the case (at the case's rtol/atol);
- the reference agrees with onnx.reference.ReferenceEvaluator, except where onnx.reference is known to be
  wrong (then the shipped data, computed from the spec, decides);
- shape/dtype inference agrees with the reference's outputs, with and without the inputs' values;
- a module holding the node round-trips through the textual IR: print(parse(print(m))) == print(m).
"""

from __future__ import annotations

import functools
import re
import warnings

import numpy as np
import onnx
import onnx.reference
import pytest
from onnx import numpy_helper

from edgecc.conformance import EDGE_OP_SET, in_scope
from edgecc.errors import EdgeccError
from edgecc.frontend.onnx_import import import_model, lift_opset
from edgecc.ir.parser import parse_module
from edgecc.ir.printer import print_module
from edgecc.ir.types import TensorType
from edgecc.ops import all_ops
from edgecc.ops.testing import run_node
from edgecc.passes import PassManager, parse_pipeline

ONNX_REFERENCE_WRONG = re.compile(
    r"test_batchnorm|test_maxpool_2d_same_lower|test_maxpool_.*pads|test_maxpool_2d_precomputed_same_upper|"
    r"test_convtranspose_group|test_pad_.*negative|test_resize_.*negative|test_constant_pad_negative"
)
"""Cases where onnx.reference (onnx 1.23) departs from the ONNX spec: BatchNormalization-13+ uses batch
statistics, MaxPool with asymmetric pads or SAME_LOWER, grouped ConvTranspose, Pad with negative pads,
Resize with negative axes. The spec-derived data shipped with the case decides there."""

TRAINING_ONLY = re.compile(r"test_training_dropout(?!_zero_ratio)")
"""Training-mode Dropout with ratio > 0 is random: edgecc rejects it with a clear error (checked below)."""


def _to_array(x):
    return numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)


@functools.lru_cache(maxsize=1)
def _cases_by_op() -> dict[str, list]:
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node")
    by_op: dict[str, list] = {}
    for case in cases:
        model = case.model
        if "_expanded" in case.name or len(model.graph.node) != 1 or not in_scope(model):
            continue
        by_op.setdefault(model.graph.node[0].op_type, []).append(case)
    return by_op


def _node_inputs(model: onnx.ModelProto, inputs) -> list:
    by_name = {vi.name: _to_array(x) for vi, x in zip(model.graph.input, inputs)}
    by_name.update({init.name: numpy_helper.to_array(init) for init in model.graph.initializer})
    return [by_name[name] if name else None for name in model.graph.node[0].input]


def _assert_close(actual, expected, rtol, atol, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if expected.dtype == np.bool_ or np.issubdtype(expected.dtype, np.integer):
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol,
                                   err_msg=what)


def _check_case(case) -> None:
    model = lift_opset(case.model, case.name)
    if len(model.graph.node) != 1:
        return  # lifting to opset 18 expanded the node into several: the conformance suite covers it
    node = model.graph.node[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for inputs, expected_outputs in case.data_sets:
            arrays = _node_inputs(model, inputs)
            expected = [_to_array(o) for o in expected_outputs]
            outputs, inferred = run_node(node, arrays, num_outputs=len(node.output), constant_inputs=True)
            for i, (out, exp) in enumerate(zip(outputs, expected)):
                _assert_close(out, exp, case.rtol, case.atol, f"{case.name} output {i} vs shipped data")
                assert inferred[i] == TensorType.of(out), f"{case.name} output {i}: inferred {inferred[i]}"
            if not ONNX_REFERENCE_WRONG.match(case.name):
                feeds = {vi.name: _to_array(x) for vi, x in zip(model.graph.input, inputs)}
                theirs = onnx.reference.ReferenceEvaluator(model).run(None, feeds)
                for i, (out, ref) in enumerate(zip(outputs, theirs)):
                    _assert_close(out, np.asarray(ref), case.rtol, case.atol, f"{case.name} output {i} vs onnx.reference")
            try:  # shapes that do not depend on input values must infer without them
                _, blind = run_node(node, arrays, num_outputs=len(node.output), constant_inputs=False)
                assert [t.shape for t in blind] == [o.shape for o in outputs], case.name
            except EdgeccError as exc:
                assert "compile time" in str(exc), f"{case.name}: {exc}"
    inputs, _ = case.data_sets[0]
    _check_text_roundtrip(model, {vi.name: _to_array(x) for vi, x in zip(model.graph.input, inputs)})


def _check_text_roundtrip(model: onnx.ModelProto, feeds: dict) -> None:
    try:
        module = import_model(model)
        PassManager(parse_pipeline("infer-shapes")).run(module)
    except EdgeccError as exc:
        assert "compile time" in str(exc), exc
        # axes / k / scales fed as graph inputs: specialise on their values, as the ONNX backend does
        small = {k: v for k, v in feeds.items() if v.size <= 64}
        module = import_model(model, constant_inputs=small)
        PassManager(parse_pipeline("infer-shapes")).run(module)
    text = print_module(module)
    assert print_module(parse_module(text)) == text


OPS = sorted(all_ops())


class _Case:
    """A hand-built single-node case for ops the onnx wheel has no in-scope case for; expected outputs
    come from onnx.reference (float64 einsum cases in the wheel are outside edgecc's dtypes)."""

    rtol, atol = 1e-5, 1e-6  # float32 sums in a different order than onnx.reference's

    def __init__(self, name, node, inputs):
        from onnx import helper

        graph_inputs = [helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)
                        for n, x in zip(node.input, inputs)]
        outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output]
        self.name = name
        self.model = helper.make_model(helper.make_graph([node], name, graph_inputs, outputs),
                                       opset_imports=[helper.make_opsetid("", 18)])
        expected = onnx.reference.ReferenceEvaluator(self.model).run(None, dict(zip(node.input, inputs)))
        self.data_sets = [(list(inputs), [np.asarray(e) for e in expected])]


def _extra_cases() -> dict[str, list]:
    from onnx import helper

    rng = np.random.default_rng(0)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def einsum(name, equation, *inputs):
        names = [f"x{i}" for i in range(len(inputs))]
        return _Case(name, helper.make_node("Einsum", names, ["y"], equation=equation), list(inputs))

    return {"Einsum": [
        einsum("einsum_matmul", "ij,jk->ik", f32(3, 4), f32(4, 5)),
        einsum("einsum_batch_matmul", "bij,bjk->bik", f32(2, 3, 4), f32(2, 4, 5)),
        einsum("einsum_transpose", "ij->ji", f32(3, 4)),
        einsum("einsum_sum", "ij->i", f32(3, 4)),
        einsum("einsum_diagonal", "ii->i", f32(4, 4)),
        einsum("einsum_outer_implicit", "i,j", f32(3), f32(5)),
        einsum("einsum_ellipsis", "...ij,...jk->...ik", f32(2, 3, 4), f32(2, 4, 2)),
    ]}


def test_registry_covers_the_edge_op_set():
    assert sorted(EDGE_OP_SET - set(OPS)) == []


@pytest.mark.parametrize("op_name", OPS)
def test_op_against_references(op_name):
    cases = [c for c in _cases_by_op().get(op_name, []) if not TRAINING_ONLY.match(c.name)]
    cases = cases or _extra_cases().get(op_name, [])
    if not cases:
        pytest.skip(f"the onnx wheel has no in-scope single-node case for {op_name}; see tests/ops/")
    for case in cases:
        _check_case(case)


@pytest.mark.parametrize("op_name", ["Dropout"])
def test_training_mode_is_rejected_clearly(op_name):
    cases = [c for c in _cases_by_op()[op_name] if TRAINING_ONLY.match(c.name)]
    assert cases
    for case in cases:
        node = case.model.graph.node[0]
        inputs, _ = case.data_sets[0]
        with pytest.raises(EdgeccError, match="training"):
            run_node(node, _node_inputs(case.model, inputs), num_outputs=len(node.output), constant_inputs=True)


@pytest.mark.parametrize("op_name", OPS)
def test_op_attributes_match_onnx_schema(op_name):
    """Our schema lists the attributes ONNX defines for the op at the newest opset, with the same defaults."""
    opdef = all_ops()[op_name]
    schema = onnx.defs.get_schema(op_name, onnx.defs.onnx_opset_version())
    assert set(opdef.attrs) >= set(schema.attributes), f"missing: {set(schema.attributes) - set(opdef.attrs)}"
    for name, attr in schema.attributes.items():
        if attr.default_value.type == 0 or not attr.default_value.name:
            continue
        from edgecc.frontend.attributes import attribute_to_python

        theirs = attribute_to_python(attr.default_value)
        ours = opdef.attrs[name].default
        if isinstance(theirs, np.ndarray):
            np.testing.assert_array_equal(np.asarray(ours), theirs)
        elif isinstance(theirs, float):  # ONNX stores float attributes as float32
            assert np.float32(ours) == np.float32(theirs), f"{op_name}.{name}: default {ours!r}, ONNX says {theirs!r}"
        else:
            assert ours == theirs, f"{op_name}.{name}: default {ours!r}, ONNX says {theirs!r}"
