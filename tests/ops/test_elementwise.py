"""Elementwise ops (edgecc.ops.elementwise) against onnx.reference.ReferenceEvaluator, plus inference errors.

Each case builds a one-node ONNX model, runs it through onnx's reference evaluator (the oracle) and through
edgecc's registry alone (`run_node`), and checks output dtype, shape and values, and that inference (with
and without compile-time input values) predicts the output types.

Tolerances: integer and bool results must match exactly. Float32: rtol 1e-5, atol 1e-6 -- both sides compute
in float32 (edgecc's erf/Gelu in float64), so transcendental functions may differ by a few float32 ulps
(1 ulp = 1.2e-7 relative). Float16: rtol/atol 2e-3 -- edgecc computes in float32 and rounds once, the
reference often computes directly in float16, so results may differ by one or two float16 ulps (1 ulp = 9.8e-4
relative).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgecc.errors import OpAttributeError, ShapeError, UnsupportedOpError
from edgecc.ir.types import TensorType
from edgecc.ops.testing import run_node
from oracle import assert_matches, make_node, onnx_reference

OPSET = 22
RNG = np.random.default_rng(1234)

TOLERANCE = {np.dtype(np.float32): (1e-5, 1e-6), np.dtype(np.float16): (2e-3, 2e-3)}


def check(op_type, inputs, n_outputs=1, opset=OPSET, **attrs):
    """Run op_type on `inputs` (None = omitted optional input) in edgecc and in onnx.reference; compare."""
    node = make_node(op_type, inputs, n_outputs, **attrs)
    expected = onnx_reference(node, inputs, opset)
    outputs, inferred = run_node(node, inputs, constant_inputs=True)
    _, inferred_runtime = run_node(node, inputs, constant_inputs=False)
    assert len(outputs) == len(expected) == n_outputs
    for got, want, t, t_runtime in zip(outputs, expected, inferred, inferred_runtime):
        assert_matches(got, want, TOLERANCE)
        assert t == TensorType.of(got) == t_runtime
    return outputs


def ours(op_type, inputs, n_outputs=1, constant_inputs=True, **attrs):
    return run_node(make_node(op_type, inputs, n_outputs, **attrs), inputs, constant_inputs=constant_inputs)


def floats(*shape, dtype=np.float32, scale=3.0):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e-4, -1e-4, 4.0, -4.0, 30.0, -30.0], np.float32)

# --------------------------------------------------------------------------------------------------------------
# Unary
# --------------------------------------------------------------------------------------------------------------

FLOAT_UNARY = ["Abs", "Neg", "Sign", "Ceil", "Floor", "Round", "Exp", "Sin", "Cos", "Tanh", "Erf", "Relu",
               "Sigmoid", "Softsign", "HardSwish", "Reciprocal", "Elu", "Selu", "LeakyRelu", "ThresholdedRelu",
               "HardSigmoid", "Gelu"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("op_type", FLOAT_UNARY)
def test_float_unary(op_type, dtype):
    x = np.concatenate([SPECIAL, floats(40)]).astype(dtype).reshape(4, 13)
    check(op_type, [x])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("op_type", ["Log", "Sqrt"])
def test_positive_domain(op_type, dtype):
    x = np.array([0.0, 1e-3, 0.5, 1.0, 2.0, 100.0, -1.0], dtype)  # log 0 = -inf, negative -> NaN
    check(op_type, [x])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("op_type", ["Softplus", "Mish"])
def test_softplus_mish(op_type, dtype):
    check(op_type, [np.concatenate([SPECIAL[:-2], floats(20)]).astype(dtype)])


def test_softplus_large_input_does_not_overflow():
    # ln(exp(x) + 1) = x for large x; a naive evaluation overflows to inf
    (y,), _ = ours("Softplus", [np.array([100.0, -100.0], np.float32)])
    np.testing.assert_allclose(y, [100.0, 0.0], atol=1e-30)
    (y,), _ = ours("Mish", [np.array([100.0], np.float32)])
    np.testing.assert_allclose(y, [100.0])


def test_round_halves_to_even():
    check("Round", [np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.4999, -0.0], np.float32)])


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
@pytest.mark.parametrize("op_type", ["Abs", "Neg", "Sign", "Relu"])
def test_signed_integer_unary(op_type, dtype):
    info = np.iinfo(dtype)
    check(op_type, [np.array([info.min, info.min + 1, -5, -1, 0, 1, 7, info.max], dtype)])


@pytest.mark.parametrize("op_type", ["Abs", "Sign"])
def test_uint8_unary(op_type):
    check(op_type, [np.array([0, 1, 128, 255], np.uint8)])


def test_not():
    check("Not", [RNG.random((2, 3, 4)) > 0.5])


@pytest.mark.parametrize("op_type,attrs", [
    ("LeakyRelu", {"alpha": 0.2}), ("Elu", {"alpha": 0.5}), ("ThresholdedRelu", {"alpha": 0.5}),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.6}), ("Selu", {"alpha": 2.0, "gamma": 3.0}),
    ("Gelu", {"approximate": "tanh"}), ("Gelu", {"approximate": "none"}),
])
def test_activation_attributes(op_type, attrs):
    check(op_type, [floats(3, 7)], opset=max(OPSET, 20), **attrs)


def test_erf_tails():
    check("Erf", [np.array([-10.0, -3.0, -2.5, -2.4999, 2.4999, 2.5, 3.0, 6.0, np.inf, -np.inf], np.float32)])


# --------------------------------------------------------------------------------------------------------------
# PRelu, Clip
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slope_shape", [(3, 1, 1), (1,), (5,), (2, 3, 4, 5)])
def test_prelu_float(slope_shape):
    check("PRelu", [floats(2, 3, 4, 5), floats(*slope_shape, scale=0.3)])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16])
def test_prelu_other_dtypes(dtype):
    check("PRelu", [np.array([[-4, -1, 0, 3]], dtype), np.array([2, 3, 4, 5], dtype)])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint8, np.int32, np.int64])
@pytest.mark.parametrize("bounds", [(2, 9), (2, None), (None, 9), (None, None), (9, 2), (5, 5)])
def test_clip(dtype, bounds):
    x = np.arange(-4, 20, dtype=np.int64).astype(dtype).reshape(2, 3, 4)
    lo, hi = (None if b is None else np.array(b, dtype) for b in bounds)
    check("Clip", [x, lo, hi])


def test_clip_one_element_bounds():
    check("Clip", [floats(3, 4), np.array([-1.0], np.float32), np.array([1.0], np.float32)])


# --------------------------------------------------------------------------------------------------------------
# Binary arithmetic
# --------------------------------------------------------------------------------------------------------------

SHAPE_PAIRS = [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((), (2, 3)), ((1,), ())]


@pytest.mark.parametrize("shapes", SHAPE_PAIRS)
@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul", "Div"])
def test_float_arithmetic_broadcast(op_type, shapes):
    a, b = floats(*shapes[0]), floats(*shapes[1])
    if op_type == "Div":
        b = np.where(np.abs(b) < 0.1, np.float32(0.5), b).astype(np.float32)
    check(op_type, [a, b])


@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul", "Div"])
def test_float16_arithmetic(op_type):
    check(op_type, [floats(4, 5, dtype=np.float16), floats(5, dtype=np.float16) + np.float16(10)])


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64])
@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul"])
def test_integer_arithmetic_wraps(op_type, dtype):
    info = np.iinfo(dtype)
    a = np.array([info.min, info.max, info.max, 3, 100, 0], dtype)
    b = np.array([1, 1, 2, 7, 100, info.max], dtype)
    check(op_type, [a, b])


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_integer_div_truncates_toward_zero(dtype):
    a = np.array([-7, 7, -7, 7, -6, 6, 0, 1, -1, 100], dtype)
    b = np.array([2, -2, -2, 2, 3, -3, 5, -7, 7, -9], dtype)
    check("Div", [a, b])


def test_uint8_div():
    check("Div", [np.array([255, 7, 0, 200], np.uint8), np.array([2, 7, 3, 201], np.uint8)])


@pytest.mark.parametrize("fmod", [0, 1])
@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_integer_mod(dtype, fmod):
    a = np.array([-7, 7, -7, 7, -6, 6, 0, 13], dtype)
    b = np.array([3, -3, -3, 3, 3, -4, 5, 13], dtype)
    check("Mod", [a, b], opset=13, fmod=fmod)


def test_uint8_mod_broadcast():
    check("Mod", [np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5), np.array([3, 7, 9, 11, 13], np.uint8)],
          opset=13)


@pytest.mark.parametrize("fmod", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_float_mod(dtype, fmod):
    a = np.array([-4.5, 4.5, -4.5, 4.5, 0.0, -0.0, 7.25, 1e-3], dtype)
    b = np.array([2.0, -2.0, -2.0, 2.0, 3.0, -3.0, 0.5, 0.3], dtype)
    check("Mod", [a, b], opset=28, fmod=fmod)


# Pow: (base dtype, exponent dtype)
POW_CASES = [
    (np.float32, np.float32), (np.float16, np.float16), (np.float32, np.int64), (np.float32, np.int32),
    (np.float32, np.int8), (np.float32, np.uint8), (np.float16, np.int64), (np.int32, np.int32),
    (np.int64, np.int64), (np.int32, np.float32), (np.int64, np.float32), (np.int64, np.int8),
]


@pytest.mark.parametrize("base_dtype,exp_dtype", POW_CASES)
def test_pow_dtypes(base_dtype, exp_dtype):
    x = np.array([[-3, -2, -1, 0], [1, 2, 3, 5]], base_dtype)
    y = np.array([0, 1, 2, 3], exp_dtype)  # broadcast along the last axis
    check("Pow", [x, y])


def test_pow_fractional_exponent():
    check("Pow", [np.array([0.25, 1.0, 4.0, 9.0], np.float32), np.array(0.5, np.float32)])
    check("Pow", [np.array([1, 4, 9, 10], np.int32), np.array([0.5, 0.5, 1.5, 0.5], np.float32)])


def test_pow_integer_exact_beyond_float64():
    # 3^39 does not fit in a float64 mantissa; integer Pow stays exact
    (y,), _ = ours("Pow", [np.array([3], np.int64), np.array([39], np.int64)])
    assert y[0] == 3**39


# --------------------------------------------------------------------------------------------------------------
# Logic and comparisons
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1))])
@pytest.mark.parametrize("op_type", ["And", "Or", "Xor"])
def test_logic(op_type, shapes):
    check(op_type, [RNG.random(shapes[0]) > 0.5, RNG.random(shapes[1]) > 0.5])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint8, np.int16, np.int32, np.int64])
@pytest.mark.parametrize("op_type", ["Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"])
def test_comparisons(op_type, dtype):
    a = RNG.integers(0, 4, size=(2, 3, 4)).astype(dtype)
    b = RNG.integers(0, 4, size=(3, 1)).astype(dtype)
    check(op_type, [a, b])


def test_equal_bool():
    check("Equal", [np.array([True, False, True]), np.array([True, True, False])])


def test_comparisons_with_nan():
    a = np.array([np.nan, 1.0, np.nan], np.float32)
    b = np.array([np.nan, np.nan, 1.0], np.float32)
    for op_type in ["Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"]:
        check(op_type, [a, b])


# --------------------------------------------------------------------------------------------------------------
# Variadic, Where
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op_type", ["Max", "Min", "Sum", "Mean"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_variadic_float(op_type, dtype):
    check(op_type, [floats(2, 3, 4, dtype=dtype)])
    check(op_type, [floats(2, 3, 4, dtype=dtype), floats(4, dtype=dtype), floats(3, 1, dtype=dtype)])


@pytest.mark.parametrize("op_type", ["Max", "Min"])
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64])
def test_variadic_integer(op_type, dtype):
    info = np.iinfo(dtype)
    check(op_type, [np.array([info.min, 0, info.max], dtype), np.array([[1], [info.max]], dtype),
                    np.array(5, dtype)])


def test_max_min_nan_propagates():
    a = np.array([np.nan, 1.0, 2.0], np.float32)
    b = np.array([0.0, np.nan, 1.0], np.float32)
    (y,), _ = ours("Max", [a, b])
    np.testing.assert_array_equal(y, [np.nan, np.nan, 2.0])
    (y,), _ = ours("Min", [a, b])
    np.testing.assert_array_equal(y, [np.nan, np.nan, 1.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint8, np.int64, np.bool_])
def test_where(dtype):
    cond = RNG.random((2, 1, 4)) > 0.5
    x = RNG.integers(0, 9, size=(3, 4)).astype(dtype)
    y = RNG.integers(0, 9, size=(2, 3, 1)).astype(dtype)
    check("Where", [cond, x, y])


# --------------------------------------------------------------------------------------------------------------
# Cast, Identity, Dropout
# --------------------------------------------------------------------------------------------------------------

CAST_DTYPES = [np.float32, np.float16, np.int8, np.uint8, np.int16, np.int32, np.int64, np.bool_]
CAST_VALUES = {
    "float": np.array([0.0, -0.0, 0.4, 0.6, 1.5, 2.9, 100.7, 127.0], np.float64),
    "signed": np.array([-3.9, -1.5, -0.5, 0.0, 0.9, 2.5, 100.9, 127.0], np.float64),
    "integer": np.array([-128, -5, -1, 0, 1, 3, 100, 127], np.float64),
}


@pytest.mark.parametrize("to", CAST_DTYPES)
@pytest.mark.parametrize("frm", CAST_DTYPES)
def test_cast(frm, to):
    frm, to = np.dtype(frm), np.dtype(to)
    if frm.kind == "f":
        values = CAST_VALUES["float" if to.kind in "ub" else "signed"]
    else:
        values = CAST_VALUES["integer"]
    if frm == np.uint8:
        values = np.abs(values)
    x = values.astype(frm).reshape(2, 4)
    check("Cast", [x], to=helper.np_dtype_to_tensor_dtype(to))


def test_cast_integer_narrowing_keeps_low_bits():
    check("Cast", [np.array([200, 300, -129, 65535, 70000], np.int32)], to=TensorProto.INT8)
    check("Cast", [np.array([256, 257, -1, 1000], np.int64)], to=TensorProto.UINT8)
    check("Cast", [np.array([70000, -70000], np.int64)], to=TensorProto.INT16)


def test_cast_float_specials():
    x = np.array([np.inf, -np.inf, np.nan, 1e5, -1e5, 65504.0, 65520.0], np.float32)
    check("Cast", [x], to=TensorProto.FLOAT16)  # out of float16 range -> +-inf
    check("Cast", [x], to=TensorProto.BOOL)  # NaN -> True


def test_cast_saturate_and_round_mode_accepted():
    check("Cast", [floats(2, 3)], opset=25, to=TensorProto.FLOAT16, saturate=0, round_mode="nearest")


@pytest.mark.parametrize("dtype", CAST_DTYPES)
def test_identity(dtype):
    check("Identity", [np.arange(6).reshape(2, 3).astype(dtype)])


def test_dropout_inference_mode():
    x = floats(2, 3, 4)
    check("Dropout", [x])
    check("Dropout", [x], n_outputs=2)
    check("Dropout", [x, np.array(0.3, np.float32)], n_outputs=2)
    check("Dropout", [x, np.array(0.3, np.float32), np.array(False)], n_outputs=2)
    check("Dropout", [x.astype(np.float16), np.array(0.3, np.float16)], n_outputs=2, seed=3)


def test_dropout_training_with_zero_ratio_is_identity():
    check("Dropout", [floats(3, 4), np.array(0.0, np.float32), np.array(True)], n_outputs=2)


def test_dropout_training_with_nonzero_ratio_is_rejected():
    x = floats(3, 4)
    args = [x, np.array(0.5, np.float32), np.array(True)]
    with pytest.raises(UnsupportedOpError, match="training mode"):
        ours("Dropout", args, constant_inputs=True)  # rejected by inference when the values are known
    with pytest.raises(UnsupportedOpError, match="training mode"):
        ours("Dropout", args, constant_inputs=False)  # else by the reference at run time
    with pytest.raises(UnsupportedOpError, match="ratio 0.5"):
        ours("Dropout", [x, None, np.array(True)])  # an omitted ratio is 0.5


# --------------------------------------------------------------------------------------------------------------
# Inference errors
# --------------------------------------------------------------------------------------------------------------

F32 = np.zeros((2, 3), np.float32)
I32 = np.zeros((2, 3), np.int32)


@pytest.mark.parametrize("op_type,inputs,attrs,error,match", [
    ("Sqrt", [I32], {}, ShapeError, "accepts float32, float16"),
    ("Neg", [np.zeros(3, np.uint8)], {}, ShapeError, "uint8"),
    ("Not", [F32], {}, ShapeError, "accepts bool"),
    ("Add", [F32, I32], {}, ShapeError, "one dtype"),
    ("Add", [F32, np.zeros((4,), np.float32)], {}, ShapeError, "do not broadcast"),
    ("Greater", [np.zeros(2, bool), np.zeros(2, bool)], {}, ShapeError, "bool"),
    ("And", [F32, F32], {}, ShapeError, "accepts bool"),
    ("Sum", [I32, I32], {}, ShapeError, "int32"),
    ("Max", [F32, F32, I32], {}, ShapeError, "one dtype"),
    ("Where", [F32, F32, F32], {}, ShapeError, "condition"),
    ("Where", [np.zeros((2, 3), bool), F32, I32], {}, ShapeError, "one dtype"),
    ("Pow", [np.zeros(3, np.int8), np.zeros(3, np.int8)], {}, ShapeError, "base"),
    ("PRelu", [F32, np.zeros((4, 2, 3), np.float32)], {}, ShapeError, "does not broadcast to X"),
    ("Clip", [F32, np.zeros(2, np.float32), None], {}, ShapeError, "scalar"),
    ("Clip", [F32, np.zeros((), np.int32), None], {}, ShapeError, "one dtype"),
    ("Mod", [I32, I32], {"fmod": 2}, OpAttributeError, "fmod"),
    ("Gelu", [F32], {"approximate": "fast"}, OpAttributeError, "approximate"),
    ("Cast", [F32], {"to": TensorProto.DOUBLE}, OpAttributeError, "DOUBLE"),
    ("Cast", [F32], {"to": TensorProto.FLOAT16, "round_mode": "sideways"}, OpAttributeError, "round_mode"),
    ("Dropout", [F32, np.array(1.5, np.float32)], {}, OpAttributeError, "outside"),
    ("Dropout", [I32], {}, ShapeError, "data"),
])
def test_inference_errors(op_type, inputs, attrs, error, match):
    with pytest.raises(error, match=match):
        ours(op_type, inputs, **attrs)


def test_unknown_attribute_rejected():
    with pytest.raises(OpAttributeError, match="not in the schema"):
        ours("Relu", [F32], alpha=1.0)


def test_all_ops_registered_as_elementwise():
    from edgecc.ops import get

    names = ("Abs Ceil Cos Erf Exp Floor Log Neg Reciprocal Round Sign Sin Sqrt Tanh Not Relu Elu Gelu HardSigmoid "
             "HardSwish LeakyRelu Mish Selu Sigmoid Softplus Softsign ThresholdedRelu PRelu Clip Add Sub Mul Div Pow "
             "Mod And Or Xor Equal Greater GreaterOrEqual Less LessOrEqual Max Min Mean Sum Where Cast Identity "
             "Dropout").split()
    for name in names:
        opdef = get(name)
        assert opdef is not None and opdef.kind == "elementwise" and opdef.doc, name
