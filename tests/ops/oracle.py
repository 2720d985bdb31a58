"""The oracle of the op tests: a one-node ONNX model run by onnx.reference.ReferenceEvaluator, and the comparison
of edgecc's outputs with it.

A plain module, not a package: pytest puts the folder of the test file it imports (tests/ops) on sys.path, so
the tests here import it as `oracle`. Each test module keeps its own tolerance table and the reasons for it.
"""

from __future__ import annotations

import warnings

import numpy as np
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator


def make_node(op_type, inputs, n_outputs=1, **attrs):
    """A node for `inputs` (None = omitted optional input): input i is named in{i}, an omitted one "" (trailing
    omitted ones are left out); output i is out{i}."""
    names = ["" if x is None else f"in{i}" for i, x in enumerate(inputs)]
    while names and names[-1] == "":
        names.pop()
    return helper.make_node(op_type, names, [f"out{i}" for i in range(n_outputs)], **attrs)


def onnx_reference(node, inputs, opset):
    """The outputs of onnx.reference for `node` alone (default domain at `opset`); `inputs` line up with
    node.input, and an input with an empty name (or None) is omitted. The evaluator's warnings and NumPy
    floating-point errors are silenced."""
    given = [(name, x) for name, x in zip(node.input, inputs) if name and x is not None]
    graph_inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)
                    for name, x in given]
    graph_outputs = [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in node.output]
    model = helper.make_model(helper.make_graph([node], "g", graph_inputs, graph_outputs),
                              opset_imports=[helper.make_opsetid("", opset)])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ReferenceEvaluator(model).run(None, dict(given))


def assert_matches(got, want, tolerance_table, atol=None):
    """`got` has `want`'s dtype and shape, and its values: within (rtol, atol) = tolerance_table[dtype] (compared
    in float32) for the dtypes in the table, exactly for all others. `atol` raises the table's atol (never
    lowers it) for this comparison."""
    want = np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    if got.dtype in tolerance_table:
        rtol, table_atol = tolerance_table[got.dtype]
        atol = max(table_atol, atol or 0.0)
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=rtol, atol=atol)
    else:
        np.testing.assert_array_equal(got, want)
