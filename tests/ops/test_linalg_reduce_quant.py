"""Edge cases of the linear-algebra, reduction, softmax and quantisation ops, checked against
onnx.reference.ReferenceEvaluator on one-node models (and inferred types against the reference's output).

Tolerances:
- integer, index and quantised outputs are compared exactly (the spec fixes them bit for bit, including
  round-half-to-even);
- float32: rtol 1e-5, atol 1e-6 -- edgecc and the oracle may sum in a different order (BLAS blocking,
  pairwise summation), a few ulps of difference;
- float16: rtol 4e-3, atol 1e-3 -- edgecc accumulates in float32 and rounds once, the oracle may accumulate
  in float16; a few float16 ulps (eps 9.8e-4) apart.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import TensorProto

from edgecc.errors import EdgeccError, OpAttributeError, ShapeError
from edgecc.ir.types import TensorType
from edgecc.ops.quant import quantize, requantize
from edgecc.ops.testing import run_node
from oracle import assert_matches, make_node, onnx_reference

RNG = np.random.default_rng(0)
TOLERANCE = {np.dtype(np.float32): (1e-5, 1e-6), np.dtype(np.float16): (4e-3, 1e-3)}  # see the module docstring


def check(op, inputs, *, opset=21, n_outputs=1, constant=True, **attrs):
    """Run op on inputs (None = omitted) through edgecc and the oracle; compare types and values."""
    node = make_node(op, inputs, n_outputs, **attrs)
    expected = onnx_reference(node, inputs, opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, types = run_node(node, inputs, constant_inputs=constant)
    assert len(got) == len(expected)
    for g, e, t in zip(got, expected, types):
        assert_matches(g, e, TOLERANCE)
        assert t == TensorType.of(g), (t, g.shape, g.dtype)
    return got


def ours(op, inputs, n_outputs=1, constant_inputs=False, **attrs):
    """edgecc's outputs and inferred types for op on inputs (input values known to inference if constant_inputs)."""
    return run_node(make_node(op, inputs, n_outputs, **attrs), inputs, constant_inputs=constant_inputs)


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------- linalg


@pytest.mark.parametrize("c_shape", [None, (), (1,), (5,), (4, 1), (1, 5), (4, 5)])
def test_gemm_c_broadcast(c_shape):
    c = None if c_shape is None else f32(*c_shape)
    check("Gemm", [f32(3, 4), f32(5, 3), c], transA=1, transB=1, alpha=0.5, beta=-2.0)


def test_gemm_float16_and_int32():
    check("Gemm", [f32(4, 8).astype(np.float16), f32(8, 3).astype(np.float16), f32(3).astype(np.float16)],
          alpha=2.0)
    a, b = RNG.integers(-50, 50, (3, 4)).astype(np.int32), RNG.integers(-50, 50, (4, 2)).astype(np.int32)
    check("Gemm", [a, b, np.int32([7, -7])])


def test_gemm_rejects_bad_shapes():
    with pytest.raises(ShapeError, match="inner dimensions"):
        ours("Gemm", [f32(3, 4), f32(3, 4)])
    with pytest.raises(ShapeError, match="2-D"):
        ours("Gemm", [f32(2, 3, 4), f32(4, 4)])
    with pytest.raises(ShapeError, match="broadcast"):
        ours("Gemm", [f32(3, 4), f32(4, 5), f32(4, 5)])


@pytest.mark.parametrize("a_shape,b_shape", [((4,), (4,)), ((4,), (2, 4, 3)), ((2, 3, 4), (4,)),
                                             ((2, 1, 3, 4), (5, 4, 2)), ((1, 4), (4, 1))])
def test_matmul_shapes(a_shape, b_shape):
    check("MatMul", [f32(*a_shape), f32(*b_shape)], constant=False)


def test_matmul_float16_int32_and_errors():
    check("MatMul", [f32(3, 64).astype(np.float16), f32(64, 2).astype(np.float16)])
    check("MatMul", [RNG.integers(-9, 9, (2, 3, 4), dtype=np.int32), RNG.integers(-9, 9, (4, 5), dtype=np.int32)])
    with pytest.raises(ShapeError, match="inner dimensions"):
        ours("MatMul", [f32(2, 3), f32(4, 2)])
    with pytest.raises(ShapeError, match="MatMulInteger"):
        ours("MatMul", [np.ones((2, 2), np.int8), np.ones((2, 2), np.int8)])


@pytest.mark.parametrize("equation,shapes", [
    ("ij,jk", [(2, 3), (3, 4)]),                       # implicit output: 'ik'
    ("Ab,bC", [(2, 3), (3, 4)]),                       # implicit, upper case sorts first: 'AC'
    ("ba", [(2, 3)]),                                  # implicit transpose to 'ab'
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 2)]),  # broadcast ellipsis
    ("...ii->...i", [(3, 4, 4)]),                      # batched diagonal
    ("ii", [(4, 4)]),                                  # trace, implicit scalar
    ("i,i->", [(5,), (5,)]),
    ("bij, bjk, bkl -> bil", [(2, 3, 4), (2, 4, 5), (2, 5, 2)]),
    ("ij...,jk", [(3, 4, 2), (4, 5)]),                 # implicit with ellipsis: '...ik'
])
def test_einsum(equation, shapes):
    check("Einsum", [f32(*s) for s in shapes], equation=equation, constant=False)


def test_einsum_int32_and_errors():
    check("Einsum", [RNG.integers(-5, 5, (3, 4), dtype=np.int32)], equation="ij->j")
    with pytest.raises(EdgeccError, match="operand"):
        ours("Einsum", [f32(2, 2), f32(2, 2)], equation="ij->i")
    with pytest.raises(ShapeError, match="rank"):
        ours("Einsum", [f32(2, 2)], equation="ijk->i")
    with pytest.raises(ShapeError, match="sizes"):
        ours("Einsum", [f32(2, 3), f32(4, 2)], equation="ij,jk->ik")


@pytest.mark.parametrize("dtypes", [(np.uint8, np.uint8), (np.int8, np.uint8), (np.uint8, np.int8)])
def test_matmul_integer(dtypes):
    a = RNG.integers(np.iinfo(dtypes[0]).min, np.iinfo(dtypes[0]).max, (2, 3, 4), endpoint=True).astype(dtypes[0])
    b = RNG.integers(np.iinfo(dtypes[1]).min, np.iinfo(dtypes[1]).max, (4, 5), endpoint=True).astype(dtypes[1])
    check("MatMulInteger", [a, b])
    check("MatMulInteger", [a, b, np.array(3, dtypes[0]), np.array(-1 if dtypes[1] == np.int8 else 200, dtypes[1])])
    # per-column zero point of B; per-row zero point of A in its N-D form [..., M, 1]
    check("MatMulInteger", [a, b, np.full((2, 3, 1), 5, dtypes[0]), np.arange(5).astype(dtypes[1])])


def test_matmul_integer_per_row_1d():
    """A 1-D a_zero_point is per row of a 2-D A (the spec); the oracle would broadcast it along K, so compare
    with NumPy directly."""
    a = RNG.integers(0, 255, (3, 4), dtype=np.uint8)
    b = RNG.integers(0, 255, (4, 2), dtype=np.uint8)
    zp = np.array([1, 2, 3], np.uint8)
    (y,), _ = ours("MatMulInteger", [a, b, zp])
    np.testing.assert_array_equal(y, (a.astype(np.int32) - zp[:, None]) @ b.astype(np.int32))


def test_qlinear_matmul_per_tensor_and_per_row_col():
    a = RNG.integers(0, 255, (2, 3, 8), dtype=np.uint8)
    b = RNG.integers(-128, 127, (8, 4), dtype=np.int8)
    scalar = lambda v, t: np.array(v, t)  # noqa: E731
    check("QLinearMatMul", [a, scalar(0.02, np.float32), scalar(128, np.uint8), b, scalar(0.01, np.float32),
                            scalar(0, np.int8), scalar(0.05, np.float32), scalar(10, np.uint8)])
    check("QLinearMatMul", [a, (RNG.random((2, 3, 1)) * 0.05).astype(np.float32), np.full((2, 3, 1), 120, np.uint8),
                            b, (RNG.random((1, 4)) * 0.05).astype(np.float32), np.int8([0, 1, -1, 2]).reshape(1, 4),
                            scalar(0.03, np.float32), scalar(-3, np.int8)])


def test_qlinear_matmul_rounds_half_to_even_and_saturates():
    # acc = [1, 3, 5, 1000]; multiplier 0.5 -> 0.5, 1.5, 2.5, 500: rounds to 0, 2, 2 and saturates at 255.
    a = np.array([[1]], np.uint8)
    b = np.array([[1, 3, 5, 250]], np.uint8)
    one = np.array(1.0, np.float32)
    args = [a, np.array(0.5, np.float32), np.array(0, np.uint8), b, one, np.array(0, np.uint8), one,
            np.array(0, np.uint8)]
    got = check("QLinearMatMul", args)
    np.testing.assert_array_equal(got[0], [[0, 2, 2, 125]])
    args[1] = np.array(2.0, np.float32)
    args[3] = np.array([[1, 3, 5, 250]], np.uint8)
    np.testing.assert_array_equal(check("QLinearMatMul", args)[0], [[2, 6, 10, 255]])


def test_quant_helpers():
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 1000, -1000, np.nan], np.float32)
    np.testing.assert_array_equal(quantize(x, np.float32(1), None, np.int8), [-2, -2, 0, 0, 2, 2, 127, -128, 0])
    np.testing.assert_array_equal(quantize(x[:6], np.float32(1), np.uint8(3), np.uint8), [1, 1, 3, 3, 5, 5])
    np.testing.assert_array_equal(requantize(np.int32([5, 7, -5, 10**6]), 0.5, 0, np.int16), [2, 4, -2, 32767])


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_axes(op, axis):
    check(op, [f32(2, 3, 4) * 5], axis=axis, constant=False)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_stable_and_float16(op):
    x = np.array([[1000.0, 1001.0, 1002.0], [-1000.0, -1001.0, -np.inf]], np.float32)
    got = check(op, [x])
    assert np.all(np.isfinite(got[0][0]))
    check(op, [(f32(3, 7) * 4).astype(np.float16)])


def test_softmax_rejects_ints_and_bad_axis():
    with pytest.raises(ShapeError, match="float"):
        ours("Softmax", [np.ones((2, 2), np.int32)])
    with pytest.raises(OpAttributeError, match="axis 2"):
        ours("Softmax", [f32(2, 2)], axis=2)


# ---------------------------------------------------------------------------------------------------- reduce

REDUCE_OPS = ["ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare"]


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("axes,keepdims,noop", [(None, 1, 0), (None, 0, 0), (i64(), 1, 1), (i64(-1), 0, 0),
                                                (i64(0, 2), 1, 0), (i64(2, -3), 0, 1)])
def test_reduce(op, axes, keepdims, noop):
    x = f32(2, 3, 4)
    check(op, [x, axes], keepdims=keepdims, noop_with_empty_axes=noop)


@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reduce_empty_set(op):
    # axis 1 has no elements: identity of the reduction (0, 1, -inf, +inf; NaN for the mean)
    got = check(op, [np.zeros((2, 0, 4), np.float32), i64(1)], keepdims=1)
    assert got[0].shape == (2, 1, 4)


@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reduce_int32_and_float16(op):
    x = RNG.integers(-4, 5, (3, 4), dtype=np.int32)
    if op == "ReduceSumSquare":
        # onnx.reference returns int64 here; the spec's output type is the input's (int32).
        (y,), types = ours(op, [x, i64(1)], keepdims=0, constant_inputs=True)
        assert y.dtype == np.int32 and types[0] == TensorType.of(y)
        np.testing.assert_array_equal(y, (x * x).sum(axis=1))
    else:
        check(op, [x, i64(1)], keepdims=0)
    check(op, [f32(3, 4).astype(np.float16), i64(0)])


def test_reduce_min_max_small_ints_and_empty_int():
    for dtype in (np.int8, np.uint8):
        x = RNG.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, (3, 5), endpoint=True).astype(dtype)
        check("ReduceMax", [x, i64(1)], opset=20)
        check("ReduceMin", [x, None], opset=20)
    (y,), _ = ours("ReduceMax", [np.zeros((0, 2), np.int32), i64(0)], constant_inputs=True)
    np.testing.assert_array_equal(y, np.full((1, 2), np.iinfo(np.int32).min))
    (y,), _ = ours("ReduceMin", [np.zeros((0, 2), np.int64), i64(0)], keepdims=0, constant_inputs=True)
    np.testing.assert_array_equal(y, np.full((2,), np.iinfo(np.int64).max))


def test_reduce_axes_must_be_constant_and_valid():
    with pytest.raises(ShapeError, match="compile time"):
        ours("ReduceSum", [f32(2, 3), i64(1)], constant_inputs=False)
    with pytest.raises(OpAttributeError, match="out of range"):
        ours("ReduceSum", [f32(2, 3), i64(2)], constant_inputs=True)
    with pytest.raises(ShapeError, match="bool"):
        ours("ReduceSum", [np.ones((2,), bool)])
    # no axes input: needs no constants
    _, types = ours("ReduceMean", [f32(2, 3)], keepdims=0)
    assert types[0].shape == ()


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("axis,keepdims,last", [(0, 1, 0), (-1, 0, 0), (1, 1, 1), (-2, 0, 1)])
def test_argmax_argmin_ties(op, axis, keepdims, last):
    x = RNG.integers(0, 3, (3, 4, 2)).astype(np.float32)  # many ties
    check(op, [x], axis=axis, keepdims=keepdims, select_last_index=last, constant=False)
    check(op, [x.astype(np.int8)], axis=axis, keepdims=keepdims, select_last_index=last)


@pytest.mark.parametrize("largest", [0, 1])
@pytest.mark.parametrize("axis", [0, -1])
def test_topk_ties_lower_index_first(largest, axis):
    x = RNG.integers(0, 4, (5, 6)).astype(np.float32)
    check("TopK", [x, i64(3)], axis=axis, largest=largest, n_outputs=2)
    check("TopK", [x.astype(np.int32), i64(x.shape[axis])], axis=axis, largest=largest, n_outputs=2)
    (v, i), _ = ours("TopK", [np.array([2, 5, 5, 2], np.float32), i64(2)], 2, largest=largest, constant_inputs=True)
    np.testing.assert_array_equal(i, [1, 2] if largest else [0, 3])


def test_topk_k_checks():
    with pytest.raises(ShapeError, match="compile time"):
        ours("TopK", [f32(3, 4), i64(2)], 2, constant_inputs=False)
    with pytest.raises(ShapeError, match="out of range"):
        ours("TopK", [f32(3, 4), i64(5)], 2, constant_inputs=True)


# ---------------------------------------------------------------------------------------------------- quant


def test_quantize_per_tensor_rounding_and_saturation():
    x = np.array([-300, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 300], np.float32)
    got = check("QuantizeLinear", [x, np.float32(1.0), np.uint8(128)])
    np.testing.assert_array_equal(got[0], [0, 126, 126, 128, 128, 130, 130, 132, 255])
    check("QuantizeLinear", [x, np.float32(0.5), np.int8(-3)])
    check("QuantizeLinear", [x, np.float32(0.25)])  # default uint8, zero point 0
    check("QuantizeLinear", [x * 100, np.float32(0.5), np.int16(7)])


def test_quantize_per_axis_blocked_and_attrs():
    x = f32(2, 3, 5) * 10
    check("QuantizeLinear", [x, np.float32([0.1, 0.2, 0.3]), np.int8([0, 1, -1])], axis=1)
    check("QuantizeLinear", [x, np.float32([0.1, 0.2, 0.3, 0.4, 0.5]), np.uint8([0, 1, 2, 3, 4])], axis=-1)
    # blocked along the last axis: 5 elements, block 2 -> 3 scales (last block is partial)
    scale = (RNG.random((2, 3, 3)) * 0.2 + 0.05).astype(np.float32)
    check("QuantizeLinear", [x, scale, np.zeros((2, 3, 3), np.int8)], axis=2, block_size=2)
    check("QuantizeLinear", [x, scale], axis=-1, block_size=2, output_dtype=TensorProto.INT16, opset=21)
    check("QuantizeLinear", [x.astype(np.float16), np.float16(0.1), np.int8(0)])
    check("QuantizeLinear", [x, np.float32(0.3), np.int8(0)], precision=TensorProto.FLOAT16, opset=25)
    check("QuantizeLinear", [np.int32([-1000, -3, 0, 5, 1000]), np.float32(2.0), np.int8(1)])


def test_quantize_errors():
    with pytest.raises(ShapeError, match="INT4"):
        ours("QuantizeLinear", [f32(4), np.float32(1)], output_dtype=TensorProto.INT4)
    with pytest.raises(ShapeError, match="int32"):
        ours("QuantizeLinear", [f32(4), np.float32(1)], output_dtype=TensorProto.INT32)
    with pytest.raises(OpAttributeError, match="output_dtype"):
        ours("QuantizeLinear", [f32(4), np.float32(1), np.uint8(0)], output_dtype=TensorProto.INT8)
    with pytest.raises(ShapeError, match="per-axis"):
        ours("QuantizeLinear", [f32(3, 4), np.float32([1, 2])], axis=0)
    with pytest.raises(OpAttributeError, match="block_size"):
        ours("QuantizeLinear", [f32(3, 8), np.ones((3, 4), np.float32)], axis=1, block_size=3)


def test_dequantize():
    x8 = RNG.integers(-128, 127, (2, 3, 5), dtype=np.int8)
    check("DequantizeLinear", [x8, np.float32(0.1), np.int8(-3)])
    check("DequantizeLinear", [x8, np.float32([0.1, 0.2, 0.3]), np.int8([0, 1, -1])], axis=1)
    check("DequantizeLinear", [x8.astype(np.uint8), np.float16([0.1, 0.2, 0.3, 0.4, 0.5])], axis=-1)
    scale = (RNG.random((2, 3, 3)) * 0.2).astype(np.float32)
    check("DequantizeLinear", [x8, scale, np.ones((2, 3, 3), np.int8)], axis=2, block_size=2)
    check("DequantizeLinear", [np.int32([-(2 ** 20), 0, 7]), np.float32(0.5)])
    check("DequantizeLinear", [x8.astype(np.int16), np.float32(0.01), np.int16(300)],
          output_dtype=TensorProto.FLOAT16, opset=25)
    with pytest.raises(ShapeError, match="same type"):
        ours("DequantizeLinear", [x8, np.float32(0.1), np.uint8(0)])


@pytest.mark.parametrize("x", [RNG.standard_normal((3, 4)).astype(np.float32) * 3,
                               np.array([0.5, 1.0, 2.7], np.float32),  # all positive: zero point 0
                               np.array([-0.5, -1.0, -2.7], np.float32)])  # all negative: zero point 255
def test_dynamic_quantize_linear(x):
    check("DynamicQuantizeLinear", [x], n_outputs=3, constant=False)


def test_dynamic_quantize_linear_constant_input():
    """All-zero input: the spec's scale would be 0/255; edgecc (like onnxruntime) uses scale 1.0."""
    (y, scale, zp), _ = ours("DynamicQuantizeLinear", [np.zeros(4, np.float32)], 3)
    assert scale == 1.0 and zp == 0 and not y.any()
