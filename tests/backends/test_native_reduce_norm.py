"""Native kernels of the reduction family (Reduce*, ArgMax/ArgMin, TopK, CumSum, Softmax/LogSoftmax, global
pools) and the normalisations (LayerNormalization, InstanceNormalization, BatchNormalization, LRN), compared with
the NumPy reference path on small models.

Each test builds models of up to 8 nodes (few compiles, each module small enough for LLVM to optimise quickly)
and compares every output of `runtime="native"` with the reference interpreter; NaNs must sit at the same
places. Tolerances:

- integer and bool results, indices, max/min/arg/TopK values and selections: exact (no arithmetic involved);
- float32 sums/means/norms: rtol 1e-5 + small atol. The reference sums pairwise (NumPy), the kernels sum
  sequentially in vectorised partial sums; for the <= a few hundred terms here that differs by a few ulp of the
  sum, and the atol covers sums that cancel to near zero;
- float32 exp/log (Softmax, LogSoftmax, LRN with a generic beta): rtol 1e-5 (edgecc's approximations are a few
  ulp);
- float16 outputs: accumulation is in float32 in both paths, so results differ only by the final rounding to
  float16 of values that differ by a few float32 ulp: at most 1 float16 ulp (2^-10 relative), rtol 2e-3.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc

RNG = np.random.default_rng(1234)
F32_TOL = dict(rtol=1e-5, atol=1e-5)
F16_TOL = dict(rtol=2e-3, atol=2e-3)


def make_model(inputs: dict[str, np.ndarray], nodes, outputs: list[str], inits: dict[str, np.ndarray] | None = None,
               opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for name, a in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in (inits or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def compare(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tol: dict | None = None) -> list[np.ndarray]:
    ref = edgecc.compile(model).run(feeds)
    nat = edgecc.compile(model, runtime="native").run(feeds)
    names = [o.name for o in model.graph.output]
    for name, r, n in zip(names, ref, nat):
        assert r.dtype == n.dtype and r.shape == n.shape, (name, r.dtype, n.dtype, r.shape, n.shape)
        if r.dtype.kind == "f":
            t = tol or (F16_TOL if r.dtype == np.float16 else F32_TOL)
            np.testing.assert_allclose(n.astype(np.float32), r.astype(np.float32), equal_nan=True, err_msg=name,
                                       **t)
        else:
            np.testing.assert_array_equal(n, r, err_msg=name)
    return nat


def check_nodes(inputs: dict[str, np.ndarray], nodes, inits: dict[str, np.ndarray] | None = None,
                tol: dict | None = None, per_model: int = 8) -> dict[str, np.ndarray]:
    """compare() on models of up to `per_model` of `nodes` each (every node output is a graph output); small
    modules keep LLVM's optimisation time low. Returns the native outputs by name."""
    results = {}
    for start in range(0, len(nodes), per_model):
        chunk = nodes[start:start + per_model]
        outputs = [o for node in chunk for o in node.output if o]
        used = {i for node in chunk for i in node.input}
        model = make_model(inputs, chunk, outputs, {k: v for k, v in (inits or {}).items() if k in used})
        results.update(zip(outputs, compare(model, dict(inputs), tol)))
    return results


def data(shape, dtype, low=-4, high=5) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return RNG.integers(0, 2, shape).astype(bool)
    if dtype.kind == "f":
        return RNG.standard_normal(shape).astype(dtype)
    if dtype == np.uint8:
        low = 0
    return RNG.integers(low, high, shape).astype(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Reduce*

REDUCE = ["ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare"]
AXES = [None, [], [0], [1], [2], [-1], [0, 2], [1, 2], [0, 1], [0, 1, 2]]


def reduce_nodes(ops, axes_list, keepdims=(0,)):
    """Nodes (and their axes initializers) for each op x axes x keepdims (x noop_with_empty_axes when axes is
    empty or absent). keepdims does not change a kernel's loops, only its output type."""
    nodes, inits = [], {}
    for op in ops:
        for a, axes in enumerate(axes_list):
            for keep in keepdims:
                for noop in ((0, 1) if not axes else (0,)):
                    inputs = ["x"]
                    if axes is not None:
                        inits[f"axes{a}"] = np.array(axes, np.int64)
                        inputs.append(f"axes{a}")
                    nodes.append(helper.make_node(op, inputs, [f"{op}_{a}_{keep}_{noop}"], keepdims=keep,
                                                  noop_with_empty_axes=noop))
    return nodes, inits


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64"])
def test_reduce_numeric(dtype):
    x = data((3, 4, 5), dtype)
    if dtype.startswith("int"):
        x = np.clip(x, -3, 3)  # keep ReduceProd small enough to stay exact in both paths
    nodes, inits = reduce_nodes(REDUCE, AXES, keepdims=(1,) if dtype == "float32" else (0,))
    check_nodes({"x": x}, nodes, inits)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "bool"])
def test_reduce_min_max_small_types(dtype):
    x = data((3, 4, 5), dtype)
    check_nodes({"x": x}, *reduce_nodes(["ReduceMax", "ReduceMin"], [None, [0], [1, 2], [0, 2]]))


def test_reduce_blocks_of_outputs():
    """Kept inner dims longer than one scratch block (256 lanes), with a partial last block; integer means."""
    x = data((3, 2, 600), np.float32)
    check_nodes({"x": x}, *reduce_nodes(REDUCE, [[0, 1]]))
    check_nodes({"x": x}, *reduce_nodes(["ReduceSum", "ReduceMax"], [[0], [1]]))
    xi = data((4, 300), np.int32, -100, 100)
    check_nodes({"x": xi}, *reduce_nodes(["ReduceMean", "ReduceL2", "ReduceSum"], [[0], [1]]))


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_reduce_empty_sets_give_identity():
    x = np.zeros((2, 0, 3), np.float32)
    out = check_nodes({"x": x}, *reduce_nodes(REDUCE, [[1]]))
    assert np.all(out["ReduceMax_0_0_0"] == -np.inf) and np.all(out["ReduceMin_0_0_0"] == np.inf)
    assert np.all(out["ReduceProd_0_0_0"] == 1) and np.all(out["ReduceSum_0_0_0"] == 0)
    assert np.all(np.isnan(out["ReduceMean_0_0_0"]))
    xi = np.zeros((2, 0), np.int32)
    check_nodes({"x": xi}, *reduce_nodes(["ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd"], [[1]]))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_reduce_nan_propagates(dtype):
    x = data((4, 6), dtype)
    x[1, 2] = np.nan
    x[3, 5] = -np.nan  # sign bit set
    out = check_nodes({"x": x}, *reduce_nodes(["ReduceMax", "ReduceMin"], [[0], [1], None]))
    assert np.isnan(out["ReduceMax_2_0_0"]) and np.isnan(out["ReduceMin_1_0_0"]).sum() == 2


def test_reduce_scalar_and_size_one_axes():
    x = np.array(3.5, np.float32)
    check_nodes({"x": x}, *reduce_nodes(REDUCE, [None, []]))
    x = data((1, 5, 1), np.float32)
    check_nodes({"x": x}, *reduce_nodes(REDUCE, [[0], [0, 2]]))


# ---------------------------------------------------------------------------------------------------------------
# ArgMax / ArgMin / TopK


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "uint8", "int16", "int32", "int64"])
def test_arg_reductions(dtype):
    x = data((3, 4, 5), dtype, -2, 3)  # few distinct values: many ties
    if np.dtype(dtype).kind == "f":
        x = np.round(x).astype(dtype)
        x[0, 1, 2] = np.nan
        x[2, 3, 1] = np.nan
        x[2, 0, 1] = -np.nan
        x[1, 2, :] = [-1, -0.0, 0.0, -2, -0.0]  # signed zeros are equal: ties
    nodes = []
    for op in ("ArgMax", "ArgMin"):
        for axis, keepdims in ((0, 1), (1, 0), (-1, 1)):
            for last in (0, 1):
                nodes.append(helper.make_node(op, ["x"], [f"{op}_{axis}_{last}"], axis=axis, keepdims=keepdims,
                                              select_last_index=last))
    check_nodes({"x": x}, nodes)


def test_arg_reductions_long_rows():
    x = data((2, 300, 7), np.float32)
    nodes = [helper.make_node("ArgMax", ["x"], ["a"], axis=2), helper.make_node("ArgMin", ["x"], ["b"], axis=0),
             helper.make_node("ArgMax", ["x"], ["c"], axis=1, select_last_index=1)]
    check_nodes({"x": x}, nodes)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64", "uint8", "int8"])
def test_topk(dtype):
    x = data((3, 6, 5), dtype, -3, 4)
    if np.dtype(dtype).kind == "f":
        x = np.round(x * 2).astype(dtype)  # ties
        x[1, 2, 3] = np.nan
        x[1, 4, 3] = np.nan
        x[0, 0, 0] = np.nan
    nodes, inits = [], {}
    for axis, ks in ((1, (0, 3, 6)), (-1, (1, 5)), (0, (2,))):
        for k in ks:
            inits[f"k{k}"] = np.array([k], np.int64)
            for largest in (0, 1):
                nodes.append(helper.make_node("TopK", ["x", f"k{k}"], [f"v_{axis}_{k}_{largest}",
                                                                      f"i_{axis}_{k}_{largest}"],
                                              axis=axis, largest=largest, sorted=1))
    check_nodes({"x": x}, nodes, inits)


def test_topk_long_rows():
    """The heap path on longer rows: random, ascending and descending rows with many ties and a few NaNs."""
    x = np.round(RNG.standard_normal((5, 301)) * 3).astype(np.float32)
    x[1] = np.arange(301)
    x[2] = -np.arange(301)
    x[3, ::7] = np.nan
    nodes, inits = [], {}
    for k in (1, 17, 150, 301):
        inits[f"k{k}"] = np.array([k], np.int64)
        for largest in (0, 1):
            nodes.append(helper.make_node("TopK", ["x", f"k{k}"], [f"v{k}_{largest}", f"i{k}_{largest}"],
                                          largest=largest))
    inits["k4"] = np.array([4], np.int64)
    nodes.append(helper.make_node("TopK", ["x", "k4"], ["v_axis0", "i_axis0"], axis=0, largest=0))
    check_nodes({"x": x}, nodes, inits)


# ---------------------------------------------------------------------------------------------------------------
# CumSum


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64"])
def test_cumsum(dtype):
    x = data((3, 4, 5), dtype)
    nodes, inits = [], {}
    for axis in (0, 1, -1):
        inits[f"ax{axis}"] = np.array(axis, np.int64)
        for exclusive in (0, 1):
            for reverse in (0, 1):
                nodes.append(helper.make_node("CumSum", ["x", f"ax{axis}"], [f"c_{axis}_{exclusive}_{reverse}"],
                                              exclusive=exclusive, reverse=reverse))
    check_nodes({"x": x}, nodes, inits)


def test_cumsum_axis_must_be_constant():
    x = data((3, 4), np.float32)
    model = make_model({"x": x, "axis": np.array(0, np.int64)},
                       [helper.make_node("CumSum", ["x", "axis"], ["y"])], ["y"])
    with pytest.raises(edgecc.errors.EdgeccError, match="compile time"):
        edgecc.compile(model, runtime="native")


# ---------------------------------------------------------------------------------------------------------------
# Softmax / LogSoftmax


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_softmax(dtype):
    x = (data((3, 4, 300), dtype) * 4).astype(dtype)
    x[1, 2, :] += 1000  # stability: large values must not overflow
    x[2, 1, 5] = -np.inf
    x[0, 3, 7] = np.nan  # its row (along each axis) becomes NaN
    nodes = [helper.make_node(op, ["x"], [f"{op}_{axis}"], axis=axis)
             for op in ("Softmax", "LogSoftmax") for axis in (0, 1, -1)]
    # exp/log are a few ulp; the sums differ in order (pairwise vs vectorised sequential)
    tol = F16_TOL if dtype == "float16" else dict(rtol=1e-5, atol=2e-6)
    out = check_nodes({"x": x}, nodes, tol=tol)
    assert np.isnan(out["Softmax_-1"][0, 3]).all() and not np.isnan(out["Softmax_-1"][0, 2]).any()
    assert np.isnan(out["LogSoftmax_0"][:, 3, 7]).all() and np.isnan(out["Softmax_-1"]).sum() == 300


# ---------------------------------------------------------------------------------------------------------------
# Normalisations


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layer_norm(dtype):
    x = (data((2, 3, 4, 5), dtype) * 3 + 1).astype(dtype)
    nodes, inits = [], {}
    for axis in (-1, 1, 0):
        shape = x.shape[axis:]
        inits[f"s{axis}"] = data(shape, dtype)
        inits[f"b{axis}"] = data(shape, dtype)
        nodes.append(helper.make_node("LayerNormalization", ["x", f"s{axis}", f"b{axis}"],
                                      [f"y{axis}", f"m{axis}", f"v{axis}"], axis=axis, epsilon=1e-3))
    # only Y and InvStdDev, no bias; scale broadcasting over leading dims and a broadcast size-1 inner dim
    inits["s_small"] = data((1, 5), dtype)
    nodes.append(helper.make_node("LayerNormalization", ["x", "s_small"], ["y_nb", "", "v_nb"], axis=2))
    inits["s_full"] = data((2, 3, 4, 5), dtype)
    inits["b_full"] = data((3, 1, 5), dtype)
    nodes.append(helper.make_node("LayerNormalization", ["x", "s_full", "b_full"], ["y_full"], axis=-2))
    check_nodes({"x": x}, nodes, inits)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_instance_and_batch_norm(dtype):
    x = (data((2, 3, 4, 5), dtype) * 2 + 0.5).astype(dtype)
    c = x.shape[1]
    inits = {"scale": data((c,), dtype), "bias": data((c,), dtype), "mean": data((c,), dtype),
             "var": (np.abs(data((c,), dtype)) + 0.5).astype(dtype)}
    params = ["x", "scale", "bias", "mean", "var"]
    nodes = [
        helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["inst"], epsilon=1e-3),
        helper.make_node("BatchNormalization", params, ["bn"], epsilon=1e-3),
        helper.make_node("BatchNormalization", params, ["bt", "rm", "rv"], training_mode=1, momentum=0.8),
        helper.make_node("BatchNormalization", params, ["bt1"], training_mode=1),
    ]
    check_nodes({"x": x}, nodes, inits)


def test_batch_norm_low_ranks():
    for shape in ((4, 3), (6,)):
        x = data(shape, np.float32)
        c = shape[1] if len(shape) > 1 else 1
        inits = {"scale": data((c,), np.float32), "bias": data((c,), np.float32), "mean": data((c,), np.float32),
                 "var": np.abs(data((c,), np.float32)) + 0.5}
        params = ["x", "scale", "bias", "mean", "var"]
        nodes = [helper.make_node("BatchNormalization", params, ["bn"]),
                 helper.make_node("BatchNormalization", params, ["bt", "rm", "rv"], training_mode=1)]
        check_nodes({"x": x}, nodes, inits)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_global_pools_and_lrn(dtype):
    x = data((2, 5, 3, 300), dtype)
    x[1, 2, 0, 7] = np.nan
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["avg"]),
             helper.make_node("GlobalMaxPool", ["x"], ["max"]),
             helper.make_node("LRN", ["x"], ["lrn3"], size=3),
             helper.make_node("LRN", ["x"], ["lrn4"], size=4, alpha=0.01, beta=0.6, bias=2.0),
             helper.make_node("LRN", ["x"], ["lrn1"], size=1, beta=0.5)]
    out = check_nodes({"x": x}, nodes)
    assert np.isnan(out["max"][1, 2]) and np.isnan(out["lrn3"][1, 1:4, 0, 7]).all()
    x2 = data((3, 4), dtype)
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["avg"]), helper.make_node("GlobalMaxPool", ["x"], ["max"]),
             helper.make_node("LRN", ["x"], ["lrn"], size=5)]
    check_nodes({"x": x2}, nodes)
