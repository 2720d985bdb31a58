"""Native elementwise kernels (`edgecc.backends.kernels.elementwise`) and edgecc's float32 math library
(`edgecc.backends.mathlib`), compared with NumPy.

Two kinds of checks:

- mathlib functions are compiled alone (a loop over an array, through the same LLVM pipeline as kernels) and
  measured in float32 ulp against float64 NumPy / `math` references on random bit patterns (the whole float32
  range) and dense ranges; the bounds asserted are the ones stated in each function's docstring.
- op kernels: small ONNX models (one compile per dtype group, many nodes each) run with `runtime="native"` and
  with the NumPy reference interpreter. Tolerances:
  * integer, bool and comparison results, rounding ops, Abs/Neg/Sign/Relu/Max/Min/Where/Clip/Cast/Mod/Div
    (no rounding or the same single IEEE rounding): exact;
  * float32 transcendentals and activations: a few ulp (`ULP32` float32 ulp of the larger magnitude, plus a
    tiny absolute slack for results that cancel toward 0), since both NumPy's float32 functions and
    edgecc's approximations are within ~1-5 ulp of the true value;
  * float16 outputs: both paths compute in float32 and round once to float16, so results differ only when
    the float32 values straddle a float16 rounding boundary: at most 1 float16 ulp.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from llvmlite import ir
from onnx import TensorProto, helper, numpy_helper

import edgecc
from edgecc.backends import mathlib
from edgecc.backends.conversions import f32_to_i64_bits, i64_to_f32_bits
from edgecc.backends.llvm_driver import emit
from edgecc.backends.runtime import HostModule
from edgecc.backends.targets import resolve_target
from edgecc.errors import ShapeError, UnsupportedOpError
from edgecc.ops.elementwise import erf as erf64

RNG = np.random.default_rng(2024)
ULP32 = 8
F32 = ir.FloatType()
I64 = ir.IntType(64)
PTR = ir.PointerType()

# --------------------------------------------------------------------------------------------------------------
# Harness: one mathlib function in a loop, compiled for the host
# --------------------------------------------------------------------------------------------------------------

_HOST = resolve_target("host")
_ENGINES = []


def _compile_loop(fn, nargs: int, n: int, in_type=F32, out_type=F32):
    """A host function out[i] = fn(builder, in0[i], ...) for i < n, callable on NumPy arrays."""
    module = ir.Module(name="mathlib_test")
    module.triple = _HOST.triple
    entry = ir.Function(module, ir.FunctionType(ir.IntType(32), [PTR, PTR, PTR]), name="entry")
    b = ir.IRBuilder(entry.append_basic_block("entry"))
    ins = [b.load(b.gep(entry.args[0], [ir.Constant(I64, k)], source_etype=PTR), typ=PTR) for k in range(nargs)]
    out = b.load(entry.args[1], typ=PTR)
    head, body, done = (b.append_basic_block(s) for s in ("head", "body", "done"))
    pre = b.block
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64)
    i.add_incoming(ir.Constant(I64, 0), pre)
    b.cbranch(b.icmp_signed("<", i, ir.Constant(I64, n)), body, done)
    b.position_at_end(body)
    values = [b.load(b.gep(p, [i], source_etype=in_type), typ=in_type) for p in ins]
    b.store(fn(b, *values), b.gep(out, [i], source_etype=out_type))
    i.add_incoming(b.add(i, ir.Constant(I64, 1)), b.block)
    b.branch(head)
    b.position_at_end(done)
    b.ret(ir.Constant(ir.IntType(32), 0))
    host = HostModule(emit(str(module), _HOST, "obj"), "entry", _HOST)
    _ENGINES.append(host)
    return host


def run_math(fn, *arrays, in_dtype=np.float32, out_dtype=np.float32):
    arrays = [np.ascontiguousarray(a, dtype=in_dtype) for a in np.broadcast_arrays(*arrays)]
    n = arrays[0].size
    in_type = F32 if in_dtype == np.float32 else I64
    out_type = F32 if out_dtype == np.float32 else I64
    host = _compile_loop(fn, len(arrays), n, in_type, out_type)
    out = np.empty(arrays[0].shape, out_dtype)
    assert host(arrays, [out], np.empty(1, np.uint8)) == 0
    return out


def ulp_error(got: np.ndarray, true: np.ndarray) -> np.ndarray:
    """|got - true| in float32 ulps of the true value (subnormal spacing below); matching NaN/inf count 0."""
    got = got.astype(np.float64)
    true = np.asarray(true, np.float64)
    with np.errstate(all="ignore"):
        rounded = true.astype(np.float32)
        spacing = np.maximum(np.spacing(np.abs(rounded)).astype(np.float64), 2.0 ** -149)
        err = np.abs(got - true) / spacing
    same = (np.isnan(got) & np.isnan(true)) | (got == rounded)
    err[same] = 0
    err[np.isnan(got) != np.isnan(true)] = np.inf
    return err


def random_floats(n: int) -> np.ndarray:
    """Random bit patterns: every finite float32 binade equally likely."""
    bits = RNG.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return bits[np.isfinite(bits)]


SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.1754944e-38, 3.4028235e38,
                     -3.4028235e38, 0.5, -0.5, 1.0, -1.0, 2.0], np.float32)


def _dense(lo, hi, n=20000):
    return np.linspace(lo, hi, n, dtype=np.float64).astype(np.float32)


def _sigmoid64(x):
    return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))


_erfc64 = np.vectorize(math.erfc, otypes=[np.float64])


def _gelu64(x):
    return 0.5 * x * _erfc64(-x / math.sqrt(2))


# (function, float64 reference, inputs, max ulp = the bound stated in the docstring)
UNARY_CASES = {
    "exp": (mathlib.exp, np.exp, [random_floats(40000), _dense(-104, 89), _dense(-1, 1)], 1.05),
    "expm1": (mathlib.expm1, np.expm1, [random_floats(40000), _dense(-1, 1), _dense(-1e-4, 1e-4)], 1.8),
    "log": (mathlib.log, np.log, [np.abs(random_floats(40000)), _dense(0.5, 2), _dense(0, 1e-37)], 0.85),
    "log1p": (mathlib.log1p, np.log1p, [_dense(-1, 1), _dense(-1e-4, 1e-4), _dense(0, 1e6)], 2.4),
    "tanh": (mathlib.tanh, np.tanh, [random_floats(40000), _dense(-10, 10), _dense(0.5, 0.8)], 1.3),
    "sigmoid": (mathlib.sigmoid, _sigmoid64, [random_floats(40000), _dense(-100, 100)], 2.3),
    "softplus": (mathlib.softplus, lambda x: np.logaddexp(0, x), [random_floats(40000), _dense(-100, 100)], 2.7),
    "erf": (mathlib.erf, erf64, [random_floats(40000), _dense(-5, 5), _dense(0.7, 0.8)], 1.5),
    "erfc": (mathlib.erfc, _erfc64, [_dense(-5, 10, 8000), _dense(0.7, 2.2, 4000)], 3.0),
    "gelu": (mathlib.gelu, _gelu64, [_dense(-13.5, 13.5, 8000), _dense(-2, 2, 4000)], 5.0),
    "sin": (mathlib.sin, np.sin, [random_floats(40000), _dense(-10, 10), _dense(-1e5, 1e5), _dense(1e6, 1e9)], 1.5),
    "cos": (mathlib.cos, np.cos, [random_floats(40000), _dense(-10, 10), _dense(-1e5, 1e5), _dense(1e6, 1e9)], 1.5),
    # the cheap reduction, valid below SMALL_TRIG_LIMIT = 2^16 only
    "sin_small": (mathlib.sin_small, np.sin, [_dense(-10, 10), _dense(-65535, 65535, 60000), SPECIALS[:5]], 2.5),
    "cos_small": (mathlib.cos_small, np.cos, [_dense(-10, 10), _dense(-65535, 65535, 60000), SPECIALS[:5]], 2.5),
}


@pytest.mark.parametrize("name", sorted(UNARY_CASES))
def test_mathlib_accuracy(name):
    fn, ref, inputs, bound = UNARY_CASES[name]
    x = np.concatenate(inputs + ([] if name.endswith("_small") else [SPECIALS]))
    if name in ("log", "log1p"):
        x = x[~(x < -1)] if name == "log1p" else x
    got = run_math(fn, x)
    with np.errstate(all="ignore"):
        true = ref(x.astype(np.float64))
    err = ulp_error(got, true)
    if name in ("erfc", "gelu"):  # bounds are relative; float32 underflow (< FLT_MIN) loses precision by design
        err[np.abs(true) < 1.2e-38] = 0
    worst = int(np.argmax(err))
    assert err.max() <= bound, f"{name}({x[worst]!r}) = {got[worst]!r}, true {true[worst]!r}: {err.max():.2f} ulp"


@pytest.mark.parametrize("name, ref", [("trunc", np.trunc), ("floor", np.floor), ("ceil", np.ceil),
                                       ("round_half_even", np.round)])
def test_mathlib_rounding_is_exact(name, ref):
    x = np.concatenate([random_floats(40000), SPECIALS, _dense(-8, 8, 4001), np.float32([2.5, -2.5, 3.5, 0.49999997,
                                                                                    8388607.5, -8388609.0])])
    got = run_math(getattr(mathlib, name), x)
    want = ref(x)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), list(zip(x[~same][:5], got[~same][:5], want[~same][:5]))


@pytest.mark.parametrize("name, ref", [("fmod", np.fmod), ("mod_floor", np.mod)])
def test_mathlib_fmod_is_exact(name, ref):
    a = np.concatenate([random_floats(30000), RNG.uniform(-1e10, 1e10, 5000).astype(np.float32), SPECIALS])
    b = np.concatenate([random_floats(30000), RNG.uniform(-3, 3, 5000).astype(np.float32), SPECIALS[::-1]])
    n = min(a.size, b.size)
    a, b = a[:n], b[:n]
    got = run_math(getattr(mathlib, name), a, b)
    with np.errstate(all="ignore"):
        want = ref(a, b)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), list(zip(a[~same][:5], b[~same][:5], got[~same][:5], want[~same][:5]))


def test_mathlib_pow_accuracy_and_special_cases():
    # random bases and exponents whose result spans the float32 range
    x = np.exp(RNG.uniform(-80, 80, 30000)).astype(np.float32)
    y = (RNG.uniform(-87, 88, 30000) / np.log(x.astype(np.float64))).astype(np.float32)
    x = np.concatenate([x, RNG.uniform(0, 10, 10000).astype(np.float32),
                        RNG.uniform(-10, 10, 10000).astype(np.float32)])
    y = np.concatenate([y, RNG.uniform(-30, 30, 10000).astype(np.float32),
                        RNG.integers(-30, 30, 10000).astype(np.float32)])
    got = run_math(mathlib.pow, x, y)
    with np.errstate(all="ignore"):
        true = np.power(x.astype(np.float64), y.astype(np.float64))
    err = ulp_error(got, true)
    err[np.abs(true) < 1.2e-38] = 0
    assert err.max() <= 2.0, f"{err.max():.2f} ulp at {x[np.argmax(err)]!r} ** {y[np.argmax(err)]!r}"
    # every pair of special values: bit-identical to NumPy's powf (C99 Annex F)
    xs = np.float32([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, np.inf, -np.inf, np.nan, 1e-45, -3.0])
    ys = np.float32([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 0.5, -0.5, np.inf, -np.inf, np.nan, 1e30,
                     16777215.0, 8388609.0])
    X, Y = (a.ravel() for a in np.meshgrid(xs, ys))
    got = run_math(mathlib.pow, X, Y)
    with np.errstate(all="ignore"):
        want = np.power(X, Y)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert same.all(), list(zip(X[~same], Y[~same], got[~same], want[~same]))


def test_int64_float_conversions_without_runtime_calls():
    """The integer-only conversions used on 32-bit targets (no __aeabi_l2f / __aeabi_f2lz) match LLVM's."""
    v = np.concatenate([RNG.integers(-2 ** 63, 2 ** 63 - 1, 20000, dtype=np.int64),
                        RNG.integers(-2 ** 30, 2 ** 30, 5000, dtype=np.int64),
                        np.int64([0, 1, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 24 + 1, 2 ** 24 + 3,
                                  -(2 ** 40 + 2 ** 16 + 1)])])
    got = run_math(lambda b, x: i64_to_f32_bits(b, x), v, in_dtype=np.int64)
    np.testing.assert_array_equal(got, v.astype(np.float32))
    f = np.concatenate([RNG.uniform(-9.2e18, 9.2e18, 20000), RNG.uniform(-1e6, 1e6, 5000),
                        [0.0, -0.0, 0.5, -0.99, 1.5, -2.0 ** 63, 2.0 ** 62]]).astype(np.float32)
    got = run_math(lambda b, x: f32_to_i64_bits(b, x), f, out_dtype=np.int64)
    np.testing.assert_array_equal(got, f.astype(np.int64))


# --------------------------------------------------------------------------------------------------------------
# Op kernels through edgecc.compile
# --------------------------------------------------------------------------------------------------------------

ONNX_OF = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
           np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8,
           np.dtype(np.int16): TensorProto.INT16, np.dtype(np.int32): TensorProto.INT32,
           np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL}
ALL_DTYPES = [np.float32, np.float16, np.int8, np.uint8, np.int16, np.int32, np.int64, np.bool_]


def build(inputs: dict[str, np.ndarray], nodes, outputs: list[str], inits: dict | None = None, opset: int = 20):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, ONNX_OF[a.dtype], a.shape) for n, a in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in (inits or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def assert_close(name: str, got: np.ndarray, want: np.ndarray, ulps: float = 0) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape, want.shape)
    if got.dtype.kind != "f" or ulps == 0:
        same = (got == want) | (np.isnan(got) & np.isnan(want)) if got.dtype.kind == "f" else got == want
        assert np.all(same), f"{name}: {list(zip(got[~same][:4], want[~same][:4]))}"
        return
    g, w = got.astype(np.float64), want.astype(np.float64)
    if isinstance(ulps, tuple):  # (rtol, atol)
        tol = ulps[0] * np.maximum(np.abs(g), np.abs(w)) + ulps[1]
    else:
        with np.errstate(invalid="ignore"):
            if got.dtype == np.float16:  # both round the same float32-ish value once: <= 1 float16 ulp
                tol = np.spacing(np.maximum(np.abs(got), np.abs(want)).astype(np.float16)).astype(np.float64)
            else:
                tol = ulps * np.spacing(np.maximum(np.abs(got), np.abs(want))).astype(np.float64) + 1e-37
    with np.errstate(invalid="ignore"):
        bad = ~((np.abs(g - w) <= tol) | (np.isnan(g) & np.isnan(w)) | (g == w))
    assert not bad.any(), f"{name}: {list(zip(got[bad][:4], want[bad][:4]))}"


def compare(model, feeds, ulps: dict | float = 0):
    names = [o.name for o in model.graph.output]
    want = edgecc.compile(model).run(feeds)
    got = edgecc.compile(model, runtime="native").run(feeds)
    for name, g, w in zip(names, got, want):
        assert_close(name, g, w, ulps.get(name, 0) if isinstance(ulps, dict) else ulps)
    return dict(zip(names, got))


def float_data(shape, dtype=np.float32, specials=True):
    x = np.clip(RNG.standard_normal(shape) * 3, -10, 10).astype(np.float32)
    if specials:
        flat = x.reshape(-1)
        flat[:SPECIALS.size] = SPECIALS[:flat.size]
    with np.errstate(over="ignore"):  # +-3.4e38 become float16 infinities
        return x.astype(dtype)


UNARY_FLOAT = {  # op: (attributes, ulps allowed vs NumPy's float32)
    "Abs": ({}, 0), "Neg": ({}, 0), "Sign": ({}, 0), "Ceil": ({}, 0), "Floor": ({}, 0), "Round": ({}, 0),
    "Relu": ({}, 0), "Sqrt": ({}, 0), "Reciprocal": ({}, 0), "Exp": ({}, 4), "Log": ({}, 4), "Sin": ({}, 4),
    "Cos": ({}, 4), "Tanh": ({}, 4), "Erf": ({}, 4), "Sigmoid": ({}, 4), "Softplus": ({}, 6), "Softsign": ({}, 2),
    "Mish": ({}, ULP32), "Elu": ({"alpha": 0.7}, 4), "Selu": ({}, 4), "LeakyRelu": ({"alpha": 0.1}, 0),
    "ThresholdedRelu": ({"alpha": 0.5}, 0), "HardSigmoid": ({"alpha": 0.3, "beta": 0.4}, 1),
    "HardSwish": ({}, 1), "Gelu": ({}, ULP32),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_unary_float_ops(dtype):
    x = float_data((6, 50), dtype)
    nodes = [helper.make_node(op, ["x"], [op], **attrs) for op, (attrs, _) in UNARY_FLOAT.items()]
    nodes.append(helper.make_node("Gelu", ["x"], ["GeluTanh"], approximate="tanh"))
    ulps = {op: u for op, (_, u) in UNARY_FLOAT.items()}
    # The references lose accuracy in Gelu's negative tail: exact Gelu computes 1 + erf(x / sqrt 2) in float64
    # (relative error ~1e-16 e^(x^2/2): 2e-6 at x = -6, all of it below x = -8.3), the tanh form 1 + tanh(u)
    # in float32 (absolute error ~3e-8 |x|). The kernels avoid both cancellations: exact Gelu is checked
    # against an accurate float64 value (erfc) instead, the tanh form with an absolute slack for the reference.
    ulps["Gelu"] = (1.0, np.inf)  # checked below
    ulps["GeluTanh"] = (1e-5, 3e-7) if dtype == np.float32 else (2e-3, 3e-7)
    model = build({"x": x}, nodes, [n.output[0] for n in nodes])
    feeds = {"x": x}
    if dtype == np.float32:
        with np.errstate(all="ignore"):
            got = compare(model, feeds, ulps)
    else:
        ulps = {op: (1 if not isinstance(u, tuple) else u) for op, u in ulps.items()}
        with np.errstate(all="ignore"):
            got = compare(model, feeds, ulps)
    assert np.isnan(got["Log"][0, 4]) and np.isnan(got["Sin"][0, 2])  # log(nan), sin(inf)
    with np.errstate(all="ignore"):
        true = _gelu64(x.astype(np.float64))
    if dtype == np.float32:
        err = ulp_error(got["Gelu"], true)
        err[~np.isfinite(x) | (np.abs(true) < 1.2e-38)] = 0
        assert err.max() <= 5.0
    else:
        assert_close("Gelu", got["Gelu"], true.astype(np.float16), 1)


@pytest.mark.parametrize("scale", [100.0, 1e7])
def test_sin_cos_kernels_in_both_ranges(scale):
    """The kernel checks max |x| once: below 2^16 it uses the Cody-Waite reduction, else Payne-Hanek."""
    x = (RNG.uniform(-1, 1, (8, 40)) * scale).astype(np.float32)
    nodes = [helper.make_node("Sin", ["x"], ["s"]), helper.make_node("Cos", ["x"], ["c"])]
    got = edgecc.compile(build({"x": x}, nodes, ["s", "c"]), runtime="native").run({"x": x})
    for g, ref in zip(got, (np.sin, np.cos)):
        assert ulp_error(g, ref(x.astype(np.float64))).max() <= 2.5


def test_not_and_logic_ops():
    a = RNG.random((3, 4)) > 0.5
    b = RNG.random((4,)) > 0.5
    nodes = [helper.make_node("Not", ["a"], ["not"])] + [helper.make_node(op, ["a", "b"], [op])
                                                       for op in ("And", "Or", "Xor", "Equal")]
    compare(build({"a": a, "b": b}, nodes, ["not", "And", "Or", "Xor", "Equal"]), {"a": a, "b": b})


def _int_data(dtype, shape):
    info = np.iinfo(dtype)
    x = RNG.integers(info.min, int(info.max) + 1, shape, dtype=dtype)
    flat = x.reshape(-1)
    edges = np.array([info.min, info.max, 0, 1, -1 if info.min < 0 else 2, 7]).astype(dtype)
    flat[:min(6, flat.size)] = edges[:flat.size]
    return x


BINARY = ["Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint8, np.int16, np.int32, np.int64])
def test_binary_ops_all_dtypes_with_broadcasting(dtype):
    if np.dtype(dtype).kind == "f":
        a, b = float_data((2, 3, 12), dtype), float_data((3, 1), dtype)
        b.reshape(-1)[0] = 0
    else:
        a, b = _int_data(dtype, (2, 3, 12)), _int_data(dtype, (3, 1))
        b.reshape(-1)[1] = 0  # division and modulo by zero
        if np.dtype(dtype).kind == "i":
            b.reshape(-1)[2] = -1
    nodes = [helper.make_node(op, ["a", "b"], [op]) for op in BINARY]
    nodes += [helper.make_node("Mod", ["a", "b"], ["Mod0"], fmod=0),
              helper.make_node("Mod", ["a", "b"], ["Mod1"], fmod=1)]
    nodes += [helper.make_node("Max", ["a", "b", "a"], ["Max3"]), helper.make_node("Min", ["b"], ["Min1"])]
    if np.dtype(dtype).kind == "f":
        nodes += [helper.make_node("Sum", ["a", "b", "a"], ["Sum3"]), helper.make_node("Mean", ["a", "b"], ["Mean2"])]
    if np.dtype(dtype).kind == "f" or dtype in (np.int8, np.int16, np.int32, np.int64):
        nodes += [helper.make_node(op, ["a"], ["u" + op]) for op in ("Abs", "Neg", "Sign", "Relu")]
    if dtype == np.uint8:
        nodes += [helper.make_node(op, ["a"], ["u" + op]) for op in ("Abs", "Sign")]
    with np.errstate(all="ignore"):
        compare(build({"a": a, "b": b}, nodes, [n.output[0] for n in nodes]), {"a": a, "b": b})


def test_integer_division_edge_cases_do_not_trap():
    for dtype in (np.int8, np.int32, np.int64):
        info = np.iinfo(dtype)
        a = np.array([7, -7, 7, -7, info.min, info.min, 5, 0, info.max], dtype)
        b = np.array([2, 2, -2, -2, -1, 0, 0, 0, -1], dtype)
        nodes = [helper.make_node("Div", ["a", "b"], ["d"]), helper.make_node("Mod", ["a", "b"], ["m"]),
                 helper.make_node("Mod", ["a", "b"], ["f"], fmod=1)]
        with np.errstate(all="ignore"):
            got = compare(build({"a": a, "b": b}, nodes, ["d", "m", "f"]), {"a": a, "b": b})
        assert list(got["d"][:4]) == [3, -3, -3, 3] and got["d"][4] == info.min and got["d"][5] == 0
        assert list(got["m"][:4]) == [1, 1, -1, -1] and list(got["f"][:4]) == [1, -1, 1, -1]


def test_float_mod_and_div_special_values():
    a = np.float32([5.5, -5.5, 5.5, -5.5, 1e10, 3.0, np.inf, 1.0, 0.0, -0.0, 2.0, 1e-40])
    b = np.float32([2.0, 2.0, -2.0, -2.0, 3.0, 0.0, 1.0, np.inf, 1.0, 3.0, -np.inf, 3e-45])
    nodes = [helper.make_node("Mod", ["a", "b"], ["m0"], fmod=0), helper.make_node("Mod", ["a", "b"], ["m1"], fmod=1),
             helper.make_node("Div", ["a", "b"], ["d"])]
    with np.errstate(all="ignore"):
        compare(build({"a": a, "b": b}, nodes, ["m0", "m1", "d"]), {"a": a, "b": b})


def test_max_min_clip_propagate_nan():
    a = np.float32([1.0, np.nan, 3.0, np.nan, -np.inf, 0.5])
    b = np.float32([np.nan, 2.0, 1.0, np.nan, 0.0, 0.7])
    lo, hi = np.float32(-0.5), np.float32(0.6)
    nodes = [helper.make_node("Max", ["a", "b"], ["max"]), helper.make_node("Min", ["a", "b"], ["min"]),
             helper.make_node("Clip", ["a", "lo", "hi"], ["clip"]),
             helper.make_node("Clip", ["a", "", "hi"], ["cliphi"]),
             helper.make_node("Clip", ["a", "lo"], ["cliplo"]), helper.make_node("Clip", ["a"], ["clipnone"]),
             helper.make_node("Relu", ["a"], ["relu"])]
    feeds = {"a": a, "b": b, "lo": np.asarray(lo), "hi": np.asarray(hi)}
    got = compare(build(feeds, nodes, [n.output[0] for n in nodes]), feeds)
    assert np.isnan(got["max"][0]) and np.isnan(got["min"][1]) and np.isnan(got["clip"][1])


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64, np.float16])
def test_clip_integer_and_half(dtype):
    x = _int_data(dtype, (4, 9)) if np.dtype(dtype).kind in "iu" else float_data((4, 9), dtype)
    lo, hi = np.asarray(3, dtype), np.asarray(100, dtype)
    feeds = {"x": x, "lo": lo, "hi": hi}
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["y"]), helper.make_node("Clip", ["x", "", "hi"], ["z"])]
    compare(build(feeds, nodes, ["y", "z"]), feeds)


def test_prelu_and_where():
    x = float_data((2, 3, 4, 5))
    slope = RNG.random((3, 1, 1)).astype(np.float32)
    xi = _int_data(np.int32, (2, 3, 4, 5))
    si = RNG.integers(-3, 3, (3, 1, 1)).astype(np.int32)
    cond = RNG.random((4, 1)) > 0.5
    y = float_data((1, 5)).astype(np.float16)
    z = RNG.integers(0, 9, (3, 4, 5)).astype(np.uint8)
    feeds = {"x": x, "slope": slope, "xi": xi, "si": si, "cond": cond, "y": y, "z": z,
             "xh": float_data((2, 3, 4, 5), np.float16), "zz": np.uint8([200])}
    nodes = [helper.make_node("PRelu", ["x", "slope"], ["p"]), helper.make_node("PRelu", ["xi", "si"], ["pi"]),
             helper.make_node("Where", ["cond", "xh", "y"], ["w16"]),
             helper.make_node("Where", ["cond", "z", "zz"], ["w8"])]
    compare(build(feeds, nodes, ["p", "pi", "w16", "w8"]), feeds)


def test_pow_dtype_combinations():
    xf = np.float32([2.0, -2.0, 0.5, 9.0, 0.0, -3.0, 10.0])
    yf = np.float32([3.0, 3.0, -1.5, 0.5, -1.0, 0.5, 38.0])
    xi = np.int32([2, -2, 3, 0, 1, -1, 5])
    yi = np.int64([10, 3, -1, 0, -4, -3, 31])
    yfi = np.float32([4.0, 3.0, 0.5, 2.0, -2.0, -1.0, 1.5])
    feeds = {"xf": xf, "yf": yf, "xi": xi, "yi": yi, "yfi": yfi, "x64": xi.astype(np.int64), "y8": yi.astype(np.int8),
             "xh": xf.astype(np.float16)}
    nodes = [helper.make_node("Pow", ["xf", "yf"], ["ff"]), helper.make_node("Pow", ["xf", "yi"], ["fi"]),
             helper.make_node("Pow", ["xi", "yi"], ["ii"]), helper.make_node("Pow", ["x64", "y8"], ["i64i8"]),
             helper.make_node("Pow", ["xi", "yfi"], ["if"]), helper.make_node("Pow", ["xh", "yf"], ["hf"])]
    with np.errstate(all="ignore"):
        compare(build(feeds, nodes, [n.output[0] for n in nodes]), feeds, {"ff": 2, "fi": 2, "hf": 1})


def test_pow_constant_exponents():
    x = float_data((5, 20))
    nodes, inits = [], {}
    for k, e in enumerate([2.0, 3.0, 0.5, -1.0, 1.0, 2.5]):
        inits[f"e{k}"] = np.float32(e)
        nodes.append(helper.make_node("Pow", ["x", f"e{k}"], [f"p{k}"]))
    with np.errstate(all="ignore"):
        compare(build({"x": x}, nodes, [n.output[0] for n in nodes], inits), {"x": x}, 2)


def test_cast_every_pair():
    values = np.float32([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 3.7, -3.7, 100.0, 127.0, 128.0, 255.0, 300.0, -129.0,
                         65504.0, 70000.0, 1e9, -1e9, 0.5, 1e-8])
    nodes, feeds, outs = [], {}, []
    for src in ALL_DTYPES:
        name = f"in_{np.dtype(src).name}"
        if src is np.float16:  # no float16 infinities: int32/int64 of inf is undefined (INT_MIN on x86)
            feeds[name] = np.clip(values, -65504, 65504).astype(np.float16)
        elif src is np.float32:
            feeds[name] = values
        else:
            feeds[name] = values.astype(np.int64).astype(src) if src is not np.bool_ else values != 0
        for dst in ALL_DTYPES:
            out = f"{np.dtype(src).name}_to_{np.dtype(dst).name}"
            nodes.append(helper.make_node("Cast", [name], [out], to=ONNX_OF[np.dtype(dst)]))
            outs.append(out)
    with np.errstate(all="ignore"):
        compare(build(feeds, nodes, outs), feeds)


def test_cast_float_to_int_never_poison():
    """NaN, infinities and out-of-range values (undefined in the reference) give defined, saturated values."""
    x = np.float32([np.nan, np.inf, -np.inf, 3e9, -3e9, 1e20, -1e20, 2.0 ** 31, 42.9])
    feeds = {"x": x}
    nodes = [helper.make_node("Cast", ["x"], ["i32"], to=TensorProto.INT32),
             helper.make_node("Cast", ["x"], ["i64"], to=TensorProto.INT64)]
    got = edgecc.compile(build(feeds, nodes, ["i32", "i64"]), runtime="native").run(feeds)
    i32, i64 = (np.iinfo(np.int32), np.iinfo(np.int64))
    assert list(got[0]) == [0, i32.max, i32.min, i32.max, i32.min, i32.max, i32.min, i32.max, 42]
    assert list(got[1][:3]) == [0, i64.max, i64.min] and got[1][3] == 3_000_000_000
    assert got[1][-1] == 42


def test_broadcast_loops_are_coalesced_and_correct():
    a = float_data((2, 3, 4, 5), specials=False)
    shapes = [(1, 3, 1, 1), (5,), (2, 1, 4, 1), (3, 4, 1), ()]
    feeds = {"a": a}
    nodes = []
    for k, s in enumerate(shapes):
        feeds[f"b{k}"] = float_data(s, specials=False)
        nodes.append(helper.make_node("Add", ["a", f"b{k}"], [f"y{k}"]))
    model = build(feeds, nodes, [n.output[0] for n in nodes])
    got = compare(model, feeds)
    for k in range(len(shapes)):
        np.testing.assert_array_equal(got[f"y{k}"], a + feeds[f"b{k}"])
    text = edgecc.compile(model, runtime="native").native.llvm_ir
    assert "llvm.exp" not in text


def test_dropout_inference_and_training_mode():
    x = float_data((3, 7), specials=False)
    feeds = {"x": x}
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"]), helper.make_node("Dropout", ["x", "r"], ["z"])]
    got = compare(build(feeds, nodes, ["y", "mask", "z"], {"r": np.float32(0.3)}), feeds)
    assert got["mask"].all() and np.array_equal(got["y"], x)
    # training mode with ratio 0 is the identity; with ratio > 0 it is random and rejected at compile time
    zero = build(feeds, [helper.make_node("Dropout", ["x", "r", "t"], ["y", "mask"])], ["y", "mask"],
                 {"r": np.float32(0.0), "t": np.bool_(True)})
    compare(zero, feeds)
    random = build(feeds, [helper.make_node("Dropout", ["x", "r", "t"], ["y"])], ["y"],
                   {"r": np.float32(0.5), "t": np.bool_(True)})
    with pytest.raises(UnsupportedOpError, match="training mode"):
        edgecc.compile(random, runtime="native")
    # a training_mode that is a graph input must be known at compile time (the ONNX backend then specialises)
    feeds_t = {"x": x, "t": np.bool_(False)}
    unknown = build(feeds_t, [helper.make_node("Dropout", ["x", "r", "t"], ["y"])], ["y"], {"r": np.float32(0.5)})
    with pytest.raises(ShapeError, match="compile time"):
        edgecc.compile(unknown, runtime="native")


def test_generated_code_calls_no_libm():
    """Every float op's kernel is straight-line code: no calls but LLVM intrinsics that lower inline, on the
    host and on 32-bit ARM (where 64-bit conversions are emulated: only int64 division needs libgcc)."""
    x = float_data((64,), specials=False)
    ops = [op for op in UNARY_FLOAT] + ["Gelu"]
    nodes = [helper.make_node(op, ["x"], [f"o{k}"]) for k, op in enumerate(ops)]
    nodes += [helper.make_node("Pow", ["x", "x"], ["pow"]), helper.make_node("Mod", ["x", "x"], ["mod"], fmod=1),
              helper.make_node("Cast", ["x"], ["c64"], to=TensorProto.INT64),
              helper.make_node("Cast", ["c64"], ["back"], to=TensorProto.FLOAT)]
    model = build({"x": x}, nodes, [n.output[0] for n in nodes])
    import re

    for target in ("host", "armv7", "cortex-m4"):
        code = edgecc.compile(model, runtime="native", target=target).native
        declared = set(re.findall(r"declare [^@]*@\"?([\w.]+)", code.llvm_ir))
        kernels = {name for name in declared if name.startswith(f"{code.name}_k")}  # the entry module declares them
        assert all(name.startswith("llvm.") for name in declared - kernels), declared
        for name in ("exp", "log", "pow", "sin", "cos", "floor", "ceil", "round", "trunc", "rint", "fmod"):
            assert f"llvm.{name}." not in code.llvm_ir
        if target != "host":
            asm = emit(code.modules, code.target, "asm").decode()
            defined = set(re.findall(r"^([_A-Za-z][\w.]*):", asm, re.M))  # kernels called by the entry
            called = set(re.findall(r"\bbl[x]?\s+([_A-Za-z][\w.]*)", asm)) - defined
            assert called <= {"memcpy", "memset", "__aeabi_memcpy", "__aeabi_memset", "__aeabi_memclr"}, called
