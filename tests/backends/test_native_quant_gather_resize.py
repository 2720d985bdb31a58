"""Native kernels of the quantisation ops (QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, MatMulInteger,
QLinearMatMul, ConvInteger, QLinearConv), Gather / GatherElements and Resize / Upsample, compared with the NumPy
reference path (`edgecc.compile(model).run` vs `edgecc.compile(model, runtime="native").run`) on one-node models.
The data input is always a graph input; parameters are graph inputs (read at run time) or initializers
(compile-time constants: Resize's scales/sizes/roi must be, Gather's indices may be) as each case says.

Tolerances:
- quantised and integer outputs, gathers and nearest resizes: exact. The kernels follow the references' float
  precision step by step (float16 steps rounded to float16, float64 where the reference promotes to it) with
  an exact round-half-to-even, and accumulate integers in wrapping int32 like the references;
- linear/cubic Resize, float32: rtol 1e-5, atol 1e-6 -- the kernel interpolates in float32, the reference in
  float64 and rounds once; a few float32 ulp;
- linear/cubic Resize, float16: atol 2e-3 (values of magnitude < 4) -- one float16 ulp where the float32 result
  straddles a float16 rounding boundary;
- linear/cubic Resize, integers: exact for the cases here (weights are dyadic, so float32 and float64 sums are
  both exact and round identically).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc

RNG = np.random.default_rng(7)


def model_of(op: str, arrays: list, consts=(), n_outputs: int = 1, opset: int = 21, **attrs) -> onnx.ModelProto:
    """One node; input i is a graph input, an initializer when i is in `consts`, omitted when None."""
    names = ["" if a is None else f"in{i}" for i, a in enumerate(arrays)]
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(op, names, [f"out{i}" for i in range(n_outputs)], **attrs)
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for i, (n, a) in enumerate(zip(names, arrays)) if n and i not in consts]
    inits = [numpy_helper.from_array(a, n) for i, (n, a) in enumerate(zip(names, arrays)) if n and i in consts]
    outputs = [helper.make_tensor_value_info(f"out{i}", TensorProto.UNDEFINED, None) for i in range(n_outputs)]
    return helper.make_model(helper.make_graph([node], "g", inputs, outputs, initializer=inits),
                             opset_imports=[helper.make_opsetid("", opset)])


def run_both(model: onnx.ModelProto, feeds: dict):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        want = edgecc.compile(model).run(feeds)
    got = edgecc.compile(model, runtime="native").run(feeds)
    return got, want


def check(op: str, arrays: list, consts=(), n_outputs: int = 1, opset: int = 21, tol=None, **attrs):
    """Native == reference (exactly, or within tol = (rtol, atol) for float outputs)."""
    model = model_of(op, arrays, consts, n_outputs, opset, **attrs)
    feeds = {f"in{i}": a for i, a in enumerate(arrays) if a is not None and i not in consts}
    got, want = run_both(model, feeds)
    assert len(got) == len(want) == n_outputs
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
        if tol is not None and g.dtype.kind == "f":
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=tol[0], atol=tol[1])
        else:
            np.testing.assert_array_equal(g, w)
    return got


def ints(shape, dtype, lo=None, hi=None):
    info = np.iinfo(dtype)
    lo = info.min if lo is None else lo
    hi = info.max if hi is None else hi
    return RNG.integers(lo, hi, shape, endpoint=True).astype(dtype)


def f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------- QuantizeLinear


def tricky_floats(n: int, scale: float) -> np.ndarray:
    """Exact ties (k + 0.5) * scale, huge values, infinities, NaN and random values."""
    ties = (np.arange(-8, 8) + 0.5) * scale
    special = np.array([np.inf, -np.inf, np.nan, 1e30, -1e30, 0.0, -0.0], np.float64)
    rest = RNG.standard_normal(max(n - ties.size - special.size, 0)) * 200 * scale
    return np.concatenate([ties, special, rest]).astype(np.float32)


@pytest.mark.parametrize("zp_dtype", [np.uint8, np.int8, np.int16])
def test_quantize_per_tensor_exact_ties_and_saturation(zp_dtype):
    x = tricky_floats(64, 0.5).reshape(4, 16)
    check("QuantizeLinear", [x, np.array(0.5, np.float32), np.array(3, zp_dtype)])


def test_quantize_without_zero_point_and_runtime_vs_constant_params():
    x = tricky_floats(40, 0.25)
    check("QuantizeLinear", [x, np.array(0.25, np.float32)])  # uint8, zero point 0
    check("QuantizeLinear", [x, np.array(0.25, np.float32), np.array(-7, np.int8)], consts=(1, 2))


def test_quantize_per_axis_and_blocked():
    x = f32(2, 5, 7, scale=30)
    scale = (RNG.random(5) + 0.1).astype(np.float32)
    check("QuantizeLinear", [x, scale, ints(5, np.int8)], axis=1)
    check("QuantizeLinear", [x, (RNG.random(7) + 0.1).astype(np.float32), ints(7, np.uint8)], axis=-1)
    blocked = (RNG.random((2, 2, 7)) + 0.1).astype(np.float32)  # axis 1: 5 elements in blocks of 3
    check("QuantizeLinear", [x, blocked, ints((2, 2, 7), np.int16)], axis=1, block_size=3)
    check("QuantizeLinear", [x, (RNG.random((2, 5, 3)) + 0.1).astype(np.float32), ints((2, 5, 3), np.uint8)],
          consts=(1, 2), axis=2, block_size=3)


def test_quantize_float16_division_and_mixed_precisions():
    with np.errstate(over="ignore"):
        x16 = tricky_floats(48, 0.75).astype(np.float16)
    check("QuantizeLinear", [x16, np.array(0.75, np.float16), np.array(1, np.int8)])  # division in float16
    check("QuantizeLinear", [x16, np.array(0.3, np.float32), np.array(1, np.uint8)])  # promoted to float32
    xi = ints(30, np.int32, -100000, 100000)
    check("QuantizeLinear", [xi, np.array(391.3, np.float32), np.array(-3, np.int16)])  # float64 division
    check("QuantizeLinear", [tricky_floats(40, 0.1), np.array(0.1, np.float32), np.array(0, np.int8)],
          opset=25, precision=TensorProto.FLOAT16)


# ----------------------------------------------------------------------------------------- DequantizeLinear


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32])
def test_dequantize_per_tensor(dtype):
    x = ints((3, 17), dtype)
    check("DequantizeLinear", [x, np.array(0.037, np.float32), ints((), dtype)])
    check("DequantizeLinear", [x, np.array(0.5, np.float16)])


def test_dequantize_per_axis_blocked_and_float16_output():
    x = ints((3, 4, 5), np.int8)
    check("DequantizeLinear", [x, (RNG.random(4) + 0.01).astype(np.float32), ints(4, np.int8)], axis=1)
    check("DequantizeLinear", [x, (RNG.random((3, 4, 2)) + 0.01).astype(np.float32), ints((3, 4, 2), np.int8)],
          consts=(1, 2), axis=-1, block_size=3)
    check("DequantizeLinear", [ints((6, 5), np.uint8), (RNG.random(5) + 0.01).astype(np.float32)],
          axis=1, output_dtype=TensorProto.FLOAT16, opset=25)


# ------------------------------------------------------------------------------------ DynamicQuantizeLinear


@pytest.mark.parametrize("case", ["mixed", "positive", "negative", "zeros", "nan"])
def test_dynamic_quantize(case):
    x = {"mixed": f32(5, 13, scale=3), "positive": np.abs(f32(40)) + 1, "negative": -np.abs(f32(7, 3)) - 2,
         "zeros": np.zeros((4, 4), np.float32), "nan": np.array([1.0, np.nan, -3.0, 7.5], np.float32)}[case]
    check("DynamicQuantizeLinear", [x], n_outputs=3)


# -------------------------------------------------------------------------------- MatMulInteger, QLinearMatMul


@pytest.mark.parametrize("a_shape,b_shape,a_zp_shape,b_zp_shape", [
    ((5, 7), (7, 9), (), ()),
    ((5, 7), (7, 9), (5,), (9,)),
    ((2, 3, 4, 6), (6, 5), (2, 3, 4, 1), None),
    ((3, 1, 4, 6), (2, 6, 5), None, (2, 1, 5)),
    ((6,), (6, 4), (), (4,)),
    ((3, 6), (6,), (3,), ()),
    ((6,), (6,), None, ()),
    ((2, 300), (300, 600), (), (600,)),  # accumulator blocks of 256 columns with a remainder
])
@pytest.mark.parametrize("dtypes", [(np.uint8, np.int8), (np.int8, np.uint8)])
def test_matmul_integer(a_shape, b_shape, a_zp_shape, b_zp_shape, dtypes):
    ta, tb = dtypes
    arrays = [ints(a_shape, ta), ints(b_shape, tb),
              None if a_zp_shape is None else ints(a_zp_shape, ta),
              None if b_zp_shape is None else ints(b_zp_shape, tb)]
    check("MatMulInteger", arrays, consts=(1, 3) if len(a_shape) == 2 else ())


def test_matmul_integer_wraps_like_int32():
    k = 40000  # 40000 * 255 * 255 > 2^31: the exact sum wraps
    check("MatMulInteger", [np.full((1, k), 255, np.uint8), np.full((k, 2), 255, np.uint8)])


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8])
def test_qlinear_matmul(scale_dtype, out_dtype):
    a, b = ints((2, 4, 8), np.uint8), ints((8, 5), np.int8)
    s = lambda shape=(): (RNG.random(shape) * 0.05 + 0.001).astype(scale_dtype)  # noqa: E731
    check("QLinearMatMul", [a, s(), ints((), np.uint8), b, s(), ints((), np.int8), s(), ints((), out_dtype)])
    a2 = ints((4, 8), np.int8)
    check("QLinearMatMul", [a2, s(4), ints(4, np.int8), b, s(5), ints(5, np.int8), s(), ints((), out_dtype)],
          consts=(1, 2, 3, 4, 5, 6, 7))


# ------------------------------------------------------------------------------------ ConvInteger, QLinearConv


@pytest.mark.parametrize("x_shape,w_shape,attrs", [
    ((1, 3, 9, 8), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1])),
    ((2, 4, 11, 10), (6, 2, 3, 2), dict(group=2, strides=[2, 3], dilations=[2, 1], pads=[2, 0, 1, 3])),
    ((1, 3, 7, 7), (3, 1, 3, 3), dict(group=3, auto_pad="SAME_UPPER", strides=[2, 2])),
    ((1, 2, 300), (3, 2, 5), dict(pads=[2, 2])),  # a 1-D row longer than the accumulator block
    ((1, 2, 4, 5, 6), (2, 2, 2, 3, 2), dict(pads=[1, 0, 1, 0, 1, 1], strides=[1, 2, 1])),
])
def test_conv_integer(x_shape, w_shape, attrs):
    x, w = ints(x_shape, np.uint8), ints(w_shape, np.int8)
    check("ConvInteger", [x, w, ints((), np.uint8), ints(w_shape[0], np.int8)], **attrs)
    check("ConvInteger", [ints(x_shape, np.int8), ints(w_shape, np.uint8)], consts=(1,), **attrs)


@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8])
def test_qlinear_conv(out_dtype):
    x, w = ints((1, 4, 8, 9), np.uint8), ints((6, 2, 3, 3), np.int8)
    xs, ys = np.array(0.02, np.float32), np.array(0.7, np.float32)
    ws = (RNG.random(6) * 0.05 + 0.001).astype(np.float32)
    bias = ints(6, np.int32, -5000, 5000)
    arrays = [x, xs, ints((), np.uint8), w, ws, ints(6, np.int8), ys, ints((), out_dtype), bias]
    check("QLinearConv", arrays, consts=(3, 4, 5, 8), group=2, pads=[1, 2, 1, 0], strides=[1, 2])
    check("QLinearConv", arrays[:8], group=2)


# ------------------------------------------------------------------------------------ Gather, GatherElements


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.bool_, np.uint8])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_runtime_indices(dtype, axis):
    data = (RNG.standard_normal((4, 5, 6)) * 10).astype(dtype)
    dim = data.shape[axis]
    idx = RNG.integers(-dim, dim, (2, 3)).astype(np.int64)
    check("Gather", [data, idx], axis=axis)
    check("Gather", [data, idx.astype(np.int32)[0]], axis=axis)


def test_gather_scalar_and_constant_indices():
    data = f32(6, 7)
    check("Gather", [data, np.array(-2, np.int64)], axis=1)  # scalar index drops the axis
    check("Gather", [data, np.array([[5, -6], [0, 3]], np.int64)], consts=(1,), axis=0)  # table path
    big = RNG.integers(-6, 6, 5000).astype(np.int64)  # > 4096: not keyed, read at run time
    check("Gather", [data, big], consts=(1,), axis=0)


def test_gathers_with_large_constant_indices_do_not_share_a_kernel():
    """Two nodes differing only in a large constant must give their own results."""
    data = f32(8, 3)
    i1 = RNG.integers(-8, 8, 5000).astype(np.int64)
    i2 = RNG.integers(-8, 8, 5000).astype(np.int64)
    nodes = [helper.make_node("Gather", ["x", "i1"], ["y1"]), helper.make_node("Gather", ["x", "i2"], ["y2"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, data.shape)],
                              [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in ("y1", "y2")],
                              initializer=[numpy_helper.from_array(i1, "i1"), numpy_helper.from_array(i2, "i2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    got, want = run_both(model, {"x": data})
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("const", [False, True])
def test_gather_elements(axis, const):
    data = ints((4, 5, 3), np.int16)
    dim = data.shape[axis]
    shape = [3, 4, 2]
    shape[axis] = 6
    idx = RNG.integers(-dim, dim, shape).astype(np.int32 if const else np.int64)
    check("GatherElements", [data, idx], consts=(1,) if const else (), axis=axis)


# ---------------------------------------------------------------------------------------------- Resize, Upsample

FLOAT_TOL = {np.dtype(np.float32): (1e-5, 1e-6), np.dtype(np.float16): (0.0, 2e-3)}


def resize(x, *, scales=None, sizes=None, roi=None, tol=None, **attrs):
    empty = np.zeros(0, np.float32)
    arrays = [x, roi if roi is not None else empty, scales if scales is not None else empty]
    if sizes is not None:
        arrays.append(np.asarray(sizes, np.int64))
    if tol is None and attrs.get("mode", "nearest") != "nearest":
        tol = FLOAT_TOL.get(x.dtype)
    return check("Resize", arrays, consts=(1, 2, 3), tol=tol, **attrs)


@pytest.mark.parametrize("nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
@pytest.mark.parametrize("coord", ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel",
                                   "half_pixel_symmetric"])
def test_resize_nearest_modes(nearest_mode, coord):
    x = f32(1, 2, 4, 5)
    resize(x, scales=np.array([1, 1, 1.5, 0.6], np.float32), nearest_mode=nearest_mode,
           coordinate_transformation_mode=coord)


@pytest.mark.parametrize("dtype", [np.uint8, np.bool_, np.float16, np.int64])
def test_resize_nearest_dtypes_sizes_axes_and_policies(dtype):
    x = (RNG.standard_normal((2, 3, 5)) * 50).astype(dtype)
    resize(x, sizes=[3, 4, 9])  # sizes on every axis
    resize(x, sizes=[7, 2], axes=[2, 0])
    resize(x, sizes=[6, 6], axes=[1, 2], keep_aspect_ratio_policy="not_larger")
    resize(x, scales=np.array([3.0], np.float32), axes=[-1])


def test_resize_nearest_crop_and_extrapolate():
    x = f32(1, 1, 6, 6)
    roi = np.array([0, 0, -0.2, 0.3, 1, 1, 0.9, 1.4], np.float32)
    resize(x, scales=np.array([1, 1, 1.4, 1.2], np.float32), roi=roi,
           coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=-7.5)
    resize(ints((1, 1, 6, 6), np.int8), sizes=[1, 1, 8, 5], roi=roi,
           coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=-7.5)


@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("coord", ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                                   "half_pixel_symmetric"])
def test_resize_interpolating_modes(mode, coord):
    x = f32(1, 2, 5, 6)
    resize(x, scales=np.array([1, 1, 2.0, 1.5], np.float32), mode=mode, coordinate_transformation_mode=coord)
    resize(x, sizes=[1, 2, 3, 4], mode=mode, coordinate_transformation_mode=coord)


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_resize_interpolating_options(mode):
    x = f32(1, 1, 9, 12)
    resize(x, scales=np.array([1, 1, 0.5, 0.4], np.float32), mode=mode, antialias=1)
    resize(x, scales=np.array([1, 1, 1.7, 0.8], np.float32), mode=mode, exclude_outside=1, cubic_coeff_a=-0.5)
    roi = np.array([0.1, -0.3, 0.8, 1.2], np.float32)
    resize(x, sizes=[5, 7], axes=[2, 3], roi=roi, mode=mode, coordinate_transformation_mode="tf_crop_and_resize",
           extrapolation_value=3.25)
    resize(f32(2, 3, 4, 5, 6), scales=np.array([1, 1, 1.5, 2, 0.5], np.float32), mode=mode)  # 3 resized axes
    resize(f32(1, 4, 4, 3), sizes=[8, 6], axes=[1, 2], mode=mode)  # channels-last: an inner axis not resized


@pytest.mark.parametrize("dtype", [np.float16, np.uint8, np.int8, np.int32])
def test_resize_interpolating_dtypes(dtype):
    x = (RNG.standard_normal((1, 2, 4, 4)) * (2 if dtype == np.float16 else 40)).astype(dtype)
    # scale 2, asymmetric: linear weights are 0, 0.5 (dyadic) -- exact in float32 and float64 alike
    resize(x, scales=np.array([1, 1, 2, 2], np.float32), mode="linear", coordinate_transformation_mode="asymmetric")
    # half_pixel: weights 0.25 / 0.75, again dyadic
    resize(x, scales=np.array([1, 1, 2, 2], np.float32), mode="linear")


def test_nearest_tables_factor_per_axis(monkeypatch):
    """Nearest resizes use one small index table per axis, not one entry per output element."""
    from edgecc.backends.kernels import resize as kernels

    def whole_table(*args):
        raise AssertionError("the output-size index table was used")

    monkeypatch.setattr(kernels, "gather_through_table", whole_table)
    roi = np.array([0, 0, -0.2, 0.3, 1, 1, 0.9, 1.4], np.float32)
    resize(f32(1, 2, 5, 6), scales=np.array([1, 1, 1.4, 0.5], np.float32), roi=roi, extrapolation_value=2.0,
           coordinate_transformation_mode="tf_crop_and_resize")
    resize(f32(2, 5, 6), sizes=[7, 2], axes=[2, 0])
    # a gather table that does not factor (a transpose) is recognised as such
    table = np.arange(6).reshape(2, 3).T.reshape(-1)
    assert kernels.factor_table(table, (2, 3), (3, 2)) is None
    assert kernels.factor_table(np.array([1, 1, 0, 0, -1, -1]), (2,), (6,)) is not None


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_resize_rank1_and_identity(mode):
    resize(f32(7), scales=np.array([1.5], np.float32), mode=mode)
    resize(ints((2, 3, 4), np.int16), scales=np.array([1, 1, 1], np.float32), mode=mode)


@pytest.mark.parametrize("opset", [9, 21])  # opset 9 is lifted to Resize; a newer model keeps Upsample
def test_upsample(opset):
    x = f32(1, 2, 3, 4)
    for mode in ("nearest", "linear"):
        check("Upsample", [x, np.array([1, 1, 2, 1.5], np.float32)], consts=(1,), opset=opset, mode=mode,
              tol=FLOAT_TOL[np.dtype(np.float32)])


def onnx_resize_cases() -> list[tuple]:
    """onnx's own Resize/Upsample backend cases (node, inputs, expected outputs, name, opset), collected by
    running the case generators with their `expect` captured (the whole node suite is slow to load)."""
    import onnx.backend.test.case.node.resize as resize_cases
    import onnx.backend.test.case.node.upsample as upsample_cases

    found = []
    for module, cls in ((resize_cases, resize_cases.Resize), (upsample_cases, upsample_cases.Upsample)):
        def expect(node, inputs, outputs, name, **kwargs):
            opsets = kwargs.get("opset_imports") or [helper.make_opsetid("", onnx.defs.get_schema(node.op_type)
                                                                          .since_version)]
            found.append((node, inputs, outputs, name, opsets[0].version))

        saved = module.expect
        module.expect = expect
        try:
            for attr in sorted(vars(cls)):
                if attr.startswith("export"):
                    getattr(cls, attr)()
        finally:
            module.expect = saved
    return found


def test_onnx_resize_cases_through_the_kernel():
    """The ONNX conformance cases of Resize/Upsample fold to constants in tools/conformance.py (their data input
    is small enough to specialise on); here only scales/sizes/roi are constants, so the kernel computes, and its
    outputs must match ONNX's expected outputs at the backend tests' tolerance (rtol 1e-3, atol 1e-7)."""
    cases = onnx_resize_cases()
    assert len(cases) >= 40
    for node, inputs, outputs, name, opset in cases:
        names = [n for n in node.input if n]
        arrays = dict(zip(names, inputs))
        vis = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
               for n, a in arrays.items()]
        graph = helper.make_graph([node], name, vis, [helper.make_tensor_value_info(node.output[0], 0, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = edgecc.compile(model, runtime="native", constant_inputs={n: arrays[n] for n in names[1:]})
        assert [n.op for n in compiled.module.graph.nodes] in (["Resize"], ["Upsample"]), name
        got = compiled.run({names[0]: arrays[names[0]]})[0]
        np.testing.assert_allclose(got, outputs[0], rtol=1e-3, atol=1e-7, err_msg=name)


def test_resize_is_fast_enough_for_a_large_tensor():
    """A 1x64x56x56 -> 112x112 bilinear resize compiles (tables per axis, not per element) and runs."""
    x = f32(1, 64, 56, 56)
    got = resize(x, scales=np.array([1, 1, 2, 2], np.float32), mode="linear")
    assert got[0].shape == (1, 64, 112, 112)


# ------------------------------------------------------------------------------------ ConstantOfShape, Range
# Their inputs are constants, so fold-constants evaluates them unless the result exceeds its max-elements bound
# (16M elements); only then do they reach code generation. The small cases compile without folding.


def run_unfolded(model: onnx.ModelProto) -> list[np.ndarray]:
    """Native outputs of an input-less model compiled without fold-constants (so every node gets a kernel)."""
    from edgecc.backends.native import generate, make_runner
    from edgecc.backends.targets import resolve_target
    from edgecc.frontend.onnx_import import import_model
    from edgecc.passes import PassContext, PassManager, parse_pipeline

    module = import_model(model)
    PassManager(parse_pipeline("infer-shapes,dce,plan-memory"), PassContext()).run(module)
    assert module.graph.nodes, "nothing left to generate code for"
    return make_runner(module, generate(module, resolve_target("host"), "m")).run([])


def reference_of(model: onnx.ModelProto) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return edgecc.compile(model).run({})


@pytest.mark.parametrize("value", [None, np.array([0], np.int8), np.array([1.5], np.float32),
                                   np.array([-3], np.int64), np.array([True]), np.array([2.5], np.float16)])
def test_constant_of_shape(value):
    attrs = {} if value is None else {"value": numpy_helper.from_array(value)}
    model = model_of("ConstantOfShape", [np.array([3, 0, 2], np.int64)], consts=(0,), **attrs)
    assert run_unfolded(model)[0].shape == (3, 0, 2)
    model = model_of("ConstantOfShape", [np.array([3, 5, 2], np.int64)], consts=(0,), **attrs)
    got, want = run_unfolded(model)[0], reference_of(model)[0]
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_constant_of_shape_too_large_to_fold():
    """The model-zoo AlexNet case: a fill beyond fold-constants' bound runs as a kernel (memset and store loop)."""
    for value in (np.array([0.0], np.float32), np.array([1.25], np.float32)):
        model = model_of("ConstantOfShape", [np.array([4097, 4096], np.int64)], consts=(0,),
                         value=numpy_helper.from_array(value))
        compiled = edgecc.compile(model, runtime="native")
        assert [n.op for n in compiled.module.graph.nodes] == ["ConstantOfShape"]
        got = compiled.run({})[0]
        assert got.shape == (4097, 4096) and np.all(got == value[0])


@pytest.mark.parametrize("dtype,start,limit,delta,stash", [
    (np.int64, 5, -20, -3, 1), (np.int32, -7, 40, 4, 1), (np.int16, 32000, 32767, 300, 1),
    (np.float32, 0.1, 7.3, 0.37, 1), (np.float16, -1.5, 30.0, 0.7, 1), (np.float16, -1.5, 30.0, 0.7, 11),
])
def test_range(dtype, start, limit, delta, stash):
    arrays = [np.array(v, dtype) for v in (start, limit, delta)]
    model = model_of("Range", arrays, consts=(0, 1, 2), stash_type=stash)
    got, want = run_unfolded(model)[0], reference_of(model)[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
