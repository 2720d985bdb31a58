"""Tensor / shape-manipulation ops (edgecc.ops.tensor) and Resize/Upsample (edgecc.ops.resize) against
onnx.reference.ReferenceEvaluator, plus inference errors and the cases where the ONNX spec and onnx.reference
disagree (checked against values derived from the spec; onnxruntime agrees with them).

Each `check` builds a one-node ONNX model, runs it through onnx's reference evaluator (the oracle) and through
edgecc's registry alone (`run_node`), and compares output dtype, shape and values, and checks that inference
predicts the output types (with input values known at compile time and, for ops whose output shape does not
depend on input values, without them).

Tolerances: everything except interpolation is pure data movement (or integer arithmetic) and must match
exactly. Resize/Upsample linear and cubic: edgecc interpolates in float64 (per-axis interpolation matrices)
and rounds once; onnx.reference's cubic weights come out a few float32 ulps off an exact float64 evaluation
(differences up to ~4e-7 on values of order 1, 3e-6 on the larger values of these tests), so float32 Resize
uses rtol 1e-5, atol 1e-5. Float16 Resize: one float16 ulp (9.8e-4 relative): rtol/atol 2e-3. CumSum float16:
edgecc accumulates in float32 and rounds once, the reference accumulates in float16; that case is compared with
a float32-accumulated expectation instead.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from edgecc.errors import OpAttributeError, ShapeError
from edgecc.ir.types import TensorType
from edgecc.ops.testing import run_node
from oracle import assert_matches, make_node, onnx_reference

OPSET = 19
RNG = np.random.default_rng(4321)
TOLERANCE = {np.dtype(np.float32): (1e-5, 1e-6), np.dtype(np.float16): (2e-3, 2e-3)}
RESIZE_ATOL = 1e-5  # onnx.reference's cubic weights are a few float32 ulps off (see the module docstring)
I64 = np.int64


def ours(op_type, inputs, n_outputs=1, constant_inputs=True, **attrs):
    return run_node(make_node(op_type, inputs, n_outputs, **attrs), inputs, constant_inputs=constant_inputs)


def check(op_type, inputs, n_outputs=1, opset=OPSET, value_free=False, atol=None, **attrs):
    """Run op_type on `inputs` (None = omitted optional input) in edgecc and in onnx.reference; compare.
    value_free: the output shape does not depend on input values, so inference must work without them."""
    node = make_node(op_type, inputs, n_outputs, **attrs)
    expected = onnx_reference(node, inputs, opset)
    outputs, inferred = run_node(node, inputs, constant_inputs=True)
    assert len(outputs) == len(expected) == n_outputs
    for got, want, t in zip(outputs, expected, inferred):
        assert_matches(got, want, TOLERANCE, atol)
        assert t == TensorType.of(got)
    if value_free:
        assert run_node(node, inputs, constant_inputs=False)[1] == inferred
    return outputs


def spec(op_type, inputs, expected, n_outputs=1, **attrs):
    """Compare with values derived from the ONNX spec (where onnx.reference is wrong)."""
    outputs, inferred = ours(op_type, inputs, n_outputs, **attrs)
    for got, want, t in zip(outputs, expected, inferred):
        assert_matches(got, want, TOLERANCE)
        assert t == TensorType.of(got)


def needs_value(op_type, inputs, n_outputs=1, **attrs):
    """Inference fails (ShapeError, naming compile time) when a shape-deciding input is only known at run time."""
    with pytest.raises(ShapeError, match="compile time"):
        ours(op_type, inputs, n_outputs, constant_inputs=False, **attrs)


def data(*shape, dtype=np.float32):
    if dtype == np.bool_:
        return RNG.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return RNG.integers(0 if dtype == np.uint8 else -100, 100, shape).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------------------------------------------
# Constants and shape queries
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attrs", [
    {"value": numpy_helper.from_array(np.arange(6, dtype=np.int8).reshape(2, 3))},
    {"value": numpy_helper.from_array(np.array([True, False]))},
    {"value_float": 2.5}, {"value_floats": [1.0, -2.0]}, {"value_int": -7}, {"value_ints": [3, 4, 5]},
])
def test_constant(attrs):
    check("Constant", [], value_free=True, **attrs)


@pytest.mark.parametrize("attrs", [{}, {"value_string": "x"}, {"value_int": 1, "value_float": 1.0},
                                   {"value": numpy_helper.from_array(np.zeros(2, np.float64))}])
def test_constant_rejects(attrs):
    with pytest.raises(OpAttributeError):
        ours("Constant", [], **attrs)


@pytest.mark.parametrize("value", [None, np.array([3], np.int32), np.array([True]), np.array([1.5], np.float16)])
@pytest.mark.parametrize("shape", [[2, 3], [], [0, 4]])
def test_constant_of_shape(value, shape):
    attrs = {} if value is None else {"value": numpy_helper.from_array(value)}
    check("ConstantOfShape", [np.array(shape, I64)], **attrs)
    needs_value("ConstantOfShape", [np.array(shape, I64)], **attrs)


@pytest.mark.parametrize("attrs", [{}, {"start": 1}, {"end": -1}, {"start": -2, "end": 3}, {"start": 1, "end": 1},
                                   {"start": -10}, {"end": 10}, {"start": 3, "end": 1}])
def test_shape(attrs):
    check("Shape", [data(2, 3, 4)], value_free=True, **attrs)


def test_shape_clamps_like_the_spec():
    # axes are clamped to [0, rank] after adding rank; onnx.reference slices the shape with Python semantics.
    spec("Shape", [data(2, 3, 4)], [np.array([], I64)], end=-5)
    spec("Shape", [data(2, 3, 4)], [np.array([], I64)], start=-4, end=-4)


@pytest.mark.parametrize("shape", [(2, 3), (), (0, 5)])
def test_size(shape):
    check("Size", [data(*shape)], value_free=True)


# --------------------------------------------------------------------------------------------------------------
# Reshapes and transposes
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, target, allowzero", [
    ((2, 3, 4), [4, -1], 0), ((2, 3, 4), [0, -1], 0), ((2, 3, 4), [0, 0, 2, 2], 0), ((1, 1), [], 0),
    ((2, 0, 4), [0, 8, 0], 1), ((2, 3, 4), [24], 1), ((6,), [-1, 1, 2], 0),
])
def test_reshape(shape, target, allowzero):
    check("Reshape", [data(*shape), np.array(target, I64)], allowzero=allowzero)


def test_reshape_errors():
    x = data(2, 3, 4)
    needs_value("Reshape", [x, np.array([4, -1], I64)])
    for target in ([5, -1], [-1, -1], [2, 3, 5], [0, 0, 0, 0]):
        with pytest.raises(ShapeError):
            ours("Reshape", [x, np.array(target, I64)])
    with pytest.raises(ShapeError, match="allowzero"):
        ours("Reshape", [x, np.array([0, -1], I64)], allowzero=1)
    with pytest.raises(ShapeError, match="int64"):
        ours("Reshape", [x, np.array([4, 6], np.float32)])


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
def test_flatten(axis):
    check("Flatten", [data(2, 3, 4, dtype=np.int16)], value_free=True, axis=axis)


def test_flatten_bad_axis():
    with pytest.raises(OpAttributeError):
        ours("Flatten", [data(2, 3)], axis=3)


@pytest.mark.parametrize("axes", [None, [0], [-1], [0, 3]])
def test_squeeze(axes):
    check("Squeeze", [data(1, 3, 4, 1, dtype=np.bool_), None if axes is None else np.array(axes, I64)])


def test_squeeze_errors():
    with pytest.raises(ShapeError, match="not 1"):
        ours("Squeeze", [data(1, 3), np.array([1], I64)])
    needs_value("Squeeze", [data(1, 3), np.array([0], I64)])
    assert ours("Squeeze", [data(1, 3)], constant_inputs=False)[1][0].shape == (3,)


@pytest.mark.parametrize("axes", [[0], [-1], [0, 4], [3, 1], [-1, -5]])
def test_unsqueeze(axes):
    check("Unsqueeze", [data(2, 3, 4), np.array(axes, I64)])


def test_unsqueeze_errors():
    with pytest.raises(OpAttributeError):
        ours("Unsqueeze", [data(2, 3), np.array([0, 0], I64)])
    with pytest.raises(OpAttributeError):
        ours("Unsqueeze", [data(2, 3), np.array([3], I64)])


@pytest.mark.parametrize("perm", [None, [0, 1, 2], [2, 0, 1], [1, 2, 0]])
def test_transpose(perm):
    attrs = {} if perm is None else {"perm": perm}
    check("Transpose", [data(2, 3, 4, dtype=np.uint8)], value_free=True, **attrs)


def test_transpose_bad_perm():
    with pytest.raises(OpAttributeError, match="permutation"):
        ours("Transpose", [data(2, 3)], perm=[0, 0])


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
@pytest.mark.parametrize("blocksize", [1, 2, 3])
def test_depth_to_space(mode, blocksize):
    b = blocksize
    check("DepthToSpace", [data(2, 2 * b * b, 3, 2)], value_free=True, blocksize=b, mode=mode)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_space_to_depth(mode):
    x = data(2, 3, 4, 6)
    check("SpaceToDepth", [x], opset=28, value_free=True, blocksize=2, mode=mode)
    y = ours("SpaceToDepth", [x], blocksize=2, mode=mode)[0][0]
    # inverse of each other, per mode
    assert_matches(ours("DepthToSpace", [y], blocksize=2, mode=mode)[0][0], x, TOLERANCE)


def test_depth_space_errors():
    with pytest.raises(ShapeError, match="divisible"):
        ours("DepthToSpace", [data(1, 6, 2, 2)], blocksize=2)
    with pytest.raises(ShapeError, match="divisible"):
        ours("SpaceToDepth", [data(1, 1, 3, 2)], blocksize=2)
    with pytest.raises(ShapeError, match="rank-4"):
        ours("DepthToSpace", [data(4, 2, 2)], blocksize=2)


# --------------------------------------------------------------------------------------------------------------
# Joining, splitting, slicing, gathering
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(axis):
    shapes = [[2, 3, 4]] * 3
    shapes = [[d if i != axis % 3 else n for i, d in enumerate(s)] for s, n in zip(shapes, (1, 0, 3))]
    check("Concat", [data(*s, dtype=np.int8) for s in shapes], value_free=True, axis=axis)


def test_concat_errors():
    with pytest.raises(ShapeError, match="differ"):
        ours("Concat", [data(2, 3), data(3, 3)], axis=1)
    with pytest.raises(ShapeError, match="dtype"):
        ours("Concat", [data(2, 3), data(2, 3, dtype=np.int32)], axis=0)


@pytest.mark.parametrize("split, n, axis", [([2, 3, 1], 3, 1), ([0, 2], 2, -1), ([6], 1, 1), (None, 3, 1),
                                            (None, 2, 0)])
def test_split_sizes_or_output_count(split, n, axis):
    x = data(4, 6, 2)
    check("Split", [x] + ([] if split is None else [np.array(split, I64)]), n, opset=13, axis=axis)


@pytest.mark.parametrize("num_outputs, dim", [(3, 6), (4, 7), (3, 7), (2, 1)])
def test_split_num_outputs(num_outputs, dim):
    check("Split", [data(2, dim)], num_outputs, opset=18, value_free=True, axis=1, num_outputs=num_outputs)


def test_split_errors():
    with pytest.raises(ShapeError, match="do not split"):
        ours("Split", [data(6), np.array([2, 2], I64)], 2)
    with pytest.raises(OpAttributeError, match="num_outputs"):
        ours("Split", [data(6)], 2, num_outputs=3)
    needs_value("Split", [data(6), np.array([2, 4], I64)], 2)


@pytest.mark.parametrize("starts, ends, axes, steps", [
    ([1, 0], [3, 10], None, None),
    ([0, 1], [-1, 1000], [0, 1], [1, 2]),
    ([-1], [-1000], [1], [-1]),
    ([2**62], [-(2**62)], [-1], [-2]),
    ([0], [2**63 - 1], [0], None),
    ([4, -2], [0, -6], [1, 0], [-3, -1]),
    ([10], [20], [1], None),
])
def test_slice(starts, ends, axes, steps):
    inputs = [data(4, 5), np.array(starts, I64), np.array(ends, I64),
              None if axes is None else np.array(axes, I64), None if steps is None else np.array(steps, I64)]
    check("Slice", inputs)


def test_slice_clamps_like_the_spec():
    # Backwards, starts clamp to [0, dim-1] and ends to [-1, dim-1] (NumPy, and onnx.reference, clamp a
    # start below the data to "before the data" and give an empty slice instead).
    x = np.arange(3, dtype=np.float32)
    spec("Slice", [x, np.array([-6], I64), np.array([-6], I64), np.array([0], I64), np.array([-3], I64)],
         [np.array([0.0], np.float32)])
    spec("Slice", [x, np.array([-5], I64), np.array([-2**63], I64), None, np.array([-1], I64)],
         [np.array([0.0], np.float32)])


def test_slice_errors():
    x = data(4, 5)
    needs_value("Slice", [x, np.array([0], I64), np.array([1], I64)])
    with pytest.raises(ShapeError, match="step"):
        ours("Slice", [x, np.array([0], I64), np.array([1], I64), None, np.array([0], I64)])
    with pytest.raises(OpAttributeError):
        ours("Slice", [x, np.array([0], I64), np.array([1], I64), np.array([2], I64)])


@pytest.mark.parametrize("indices, axis", [(np.array([0, -1, 2]), 0), (np.array(-2), 1),
                                           (np.array([[1, -3], [0, 2]]), -1), (np.zeros((0,), I64), 1)])
def test_gather(indices, axis):
    check("Gather", [data(3, 4, 3), indices.astype(np.int32 if axis == 1 else I64)], value_free=True, axis=axis)


def test_gather_out_of_bounds():
    with pytest.raises(ShapeError, match="out of bounds"):
        ours("Gather", [data(3, 4), np.array([3], I64)])
    with pytest.raises(ShapeError, match="out of bounds"):
        ours("Gather", [data(3, 4), np.array([-5], I64)], axis=1)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements(axis):
    x = data(3, 4)
    d = x.shape[axis]
    check("GatherElements", [x, RNG.integers(-d, d, (3, 4)).astype(I64)], value_free=True, axis=axis)


def test_gather_elements_smaller_indices():
    # indices may be smaller than data off the gather axis (onnx.reference cannot run this case).
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    idx = np.array([[2, -1], [0, 1]], I64)  # output shape (2, 2)
    spec("GatherElements", [x, idx], [np.array([[8.0, 9.0], [0.0, 5.0]], np.float32)], axis=0)
    with pytest.raises(ShapeError, match="do not fit"):
        ours("GatherElements", [x, np.zeros((3, 5), I64)], axis=0)


# --------------------------------------------------------------------------------------------------------------
# Broadcasting, tiling, padding
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, target", [((3, 1), [2, 1, 6]), ((3, 1), [3, 4]), ((2, 3), [1]), ((1,), [0])])
def test_expand(shape, target):
    check("Expand", [data(*shape, dtype=np.int32), np.array(target, I64)])


def test_expand_errors():
    with pytest.raises(ShapeError, match="broadcast"):
        ours("Expand", [data(2, 3), np.array([4], I64)])
    needs_value("Expand", [data(2, 3), np.array([2, 3], I64)])


@pytest.mark.parametrize("repeats", [[1, 1], [2, 3], [0, 2]])
def test_tile(repeats):
    check("Tile", [data(2, 3, dtype=np.bool_), np.array(repeats, I64)])


def test_tile_errors():
    with pytest.raises(ShapeError, match="repeats"):
        ours("Tile", [data(2, 3), np.array([2], I64)])


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("pads, axes", [([1, 2, 2, 1], None), ([0, 3, 1, 0], None), ([2, 1], [-1]),
                                        ([1, 0, 0, 2], [1, 0])])
def test_pad(mode, pads, axes):
    inputs = [data(3, 4), np.array(pads, I64)]
    if axes is not None:
        inputs += [None, np.array(axes, I64)]
    check("Pad", inputs, mode=mode)


@pytest.mark.parametrize("dtype", [np.float16, np.int8, np.bool_])
def test_pad_constant_value(dtype):
    check("Pad", [data(2, 3, dtype=dtype), np.array([1, 0, 0, 2], I64), data(dtype=dtype)])
    check("Pad", [data(2, 3, dtype=dtype), np.array([1, 0, 0, 2], I64)])


def test_pad_negative_pads_crop():
    # Negative pads remove elements; the crop comes first, then the padding of what is left (as onnxruntime
    # does; onnx.reference passes negative widths to numpy.pad and fails).
    x = np.arange(5, dtype=np.float32)
    spec("Pad", [x, np.array([-2, 1], I64)], [np.array([2, 3, 4, 0], np.float32)])
    spec("Pad", [x, np.array([-1, -1], I64)], [np.array([1, 2, 3], np.float32)])
    spec("Pad", [x, np.array([2, -3], I64)], [np.array([0, 0, 0, 1], np.float32)], mode="edge")
    spec("Pad", [x, np.array([2, -3], I64)], [np.array([0, 1, 0, 1], np.float32)], mode="wrap")
    spec("Pad", [x, np.array([-3, 2], I64)], [np.array([3, 4, 3, 4], np.float32)], mode="reflect")
    # constant mode: the output is a window of the data extended with constant_value
    spec("Pad", [x, np.array([-7, 3], I64), np.array(9, np.float32)], [np.array([9], np.float32)])
    with pytest.raises(ShapeError, match="remove more"):
        ours("Pad", [x, np.array([-4, -2], I64)])
    with pytest.raises(ShapeError, match="no elements left"):
        ours("Pad", [x, np.array([-5, 1], I64)], mode="edge")


def test_pad_errors():
    x = data(2, 3)
    needs_value("Pad", [x, np.array([1, 1, 1, 1], I64)])
    with pytest.raises(ShapeError, match="pads"):
        ours("Pad", [x, np.array([1, 1], I64)])
    with pytest.raises(OpAttributeError, match="mode"):
        ours("Pad", [x, np.array([1, 1, 1, 1], I64)], mode="symmetric")
    with pytest.raises(ShapeError, match="constant_value"):
        ours("Pad", [x, np.array([1, 1, 1, 1], I64), np.array(1, np.int32)])


# --------------------------------------------------------------------------------------------------------------
# Range, Trilu, CumSum
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("start, limit, delta, dtype", [
    (3, 9, 3, I64), (10, 4, -2, np.int32), (0, 0, 1, np.int16), (5, 1, 1, I64),
    (0.5, 3.2, 0.7, np.float32), (1.0, -2.0, -0.3, np.float32), (0.0, 10.0, 1.5, np.float16),
])
def test_range(start, limit, delta, dtype):
    check("Range", [np.array(start, dtype), np.array(limit, dtype), np.array(delta, dtype)], opset=27)


def test_range_errors():
    with pytest.raises(ShapeError, match="delta"):
        ours("Range", [np.array(0, I64), np.array(3, I64), np.array(0, I64)])
    with pytest.raises(ShapeError, match="dtype"):
        ours("Range", [np.array(0, I64), np.array(3, np.int32), np.array(1, I64)])
    with pytest.raises(ShapeError, match="does not take"):
        ours("Range", [np.array(0, np.int8), np.array(3, np.int8), np.array(1, np.int8)])
    needs_value("Range", [np.array(0, I64), np.array(3, I64), np.array(1, I64)])


@pytest.mark.parametrize("upper", [0, 1])
@pytest.mark.parametrize("k", [None, 0, 2, -1, 7, -7])
def test_trilu(upper, k):
    inputs = [data(2, 4, 5, dtype=np.int32)] + ([] if k is None else [np.array(k, I64)])
    check("Trilu", inputs, value_free=True, upper=upper)


@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("axis, dtype", [(0, np.float32), (-1, np.int32), (1, I64)])
def test_cumsum(exclusive, reverse, axis, dtype):
    check("CumSum", [data(3, 4, dtype=dtype), np.array(axis, I64)], value_free=True, exclusive=exclusive,
          reverse=reverse)


def test_cumsum_float16_accumulates_in_float32():
    x = np.full(3000, 0.1, np.float16)
    got = ours("CumSum", [x, np.array(0, I64)])[0][0]
    assert_matches(got, np.cumsum(x.astype(np.float32)).astype(np.float16), TOLERANCE)


def test_cumsum_errors():
    with pytest.raises(ShapeError, match="does not take"):
        ours("CumSum", [data(3, dtype=np.int8), np.array(0, I64)])
    with pytest.raises(OpAttributeError):
        ours("CumSum", [data(3), np.array(1, I64)])


# --------------------------------------------------------------------------------------------------------------
# Resize and Upsample
# --------------------------------------------------------------------------------------------------------------

COORDS = ["half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
          "tf_crop_and_resize"]
ROI = np.array([0, 0, 0.1, 0.25, 1, 1, 0.9, 1.2], np.float32)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("coord", COORDS)
@pytest.mark.parametrize("scales", [[1, 1, 2.0, 1.5], [1, 1, 0.5, 0.6], [1, 1, 1.0, 3.0]])
def test_resize_scales(mode, coord, scales):
    roi = ROI if coord == "tf_crop_and_resize" else None
    check("Resize", [data(1, 2, 4, 5), roi, np.array(scales, np.float32)], mode=mode, atol=RESIZE_ATOL,
          coordinate_transformation_mode=coord, extrapolation_value=-3.0)


@pytest.mark.parametrize("nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
@pytest.mark.parametrize("coord", ["half_pixel", "asymmetric", "align_corners"])
@pytest.mark.parametrize("sizes", [[1, 1, 7, 3], [1, 1, 2, 9]])
def test_resize_nearest_sizes(nearest_mode, coord, sizes):
    check("Resize", [data(1, 1, 4, 5), None, None, np.array(sizes, I64)], nearest_mode=nearest_mode,
          coordinate_transformation_mode=coord)


@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("antialias, exclude_outside", [(1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("scale", [0.3, 0.6, 2.5])
def test_resize_antialias_exclude_outside(mode, antialias, exclude_outside, scale):
    check("Resize", [data(1, 1, 8, 7), None, np.array([1, 1, scale, scale], np.float32)], mode=mode,
          atol=RESIZE_ATOL, antialias=antialias, exclude_outside=exclude_outside, cubic_coeff_a=-0.5)


@pytest.mark.parametrize("policy", ["stretch", "not_larger", "not_smaller"])
@pytest.mark.parametrize("axes", [None, [2, 3], [3, 2]])
def test_resize_sizes_policy_and_axes(policy, axes):
    sizes = [7, 9] if axes else [1, 2, 7, 9]
    attrs = {} if axes is None else {"axes": axes}
    check("Resize", [data(1, 2, 4, 6), None, None, np.array(sizes, I64)], mode="linear", atol=RESIZE_ATOL,
          keep_aspect_ratio_policy=policy, **attrs)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float16])
@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_resize_dtypes(dtype, mode):
    check("Resize", [data(1, 1, 3, 4, dtype=dtype), None, np.array([1, 1, 1.7, 0.75], np.float32)], mode=mode,
          atol=RESIZE_ATOL)


def test_resize_bool_nearest():
    # onnx.reference cannot resize bool (it asks finfo(bool)); nearest must pick what it picks for floats.
    x, scales = data(2, 3, dtype=np.bool_), np.array([2.0, 1.5], np.float32)
    want = ours("Resize", [x.astype(np.float32), None, scales])[0][0]
    spec("Resize", [x, None, scales], [want.astype(bool)])


def test_resize_negative_axes_like_positive():
    # axes count from the back like everywhere else (onnx.reference mishandles negative axes).
    x = data(1, 2, 4, 5)
    scales = np.array([2.0, 0.6], np.float32)
    want = ours("Resize", [x, None, scales], mode="cubic", axes=[2, 3])[0]
    spec("Resize", [x, None, scales], want, mode="cubic", axes=[-2, -1])


def test_resize_pytorch_half_pixel_single_output():
    # The spec maps a length-1 output to x_original = 0 (onnx.reference uses -0.5), so cubic picks x[0].
    x = np.array([1.0, 4.0, 2.0, 8.0], np.float32)
    spec("Resize", [x, None, None, np.array([1], I64)], [np.array([1.0], np.float32)], mode="cubic",
         coordinate_transformation_mode="pytorch_half_pixel")


def test_resize_errors():
    x = data(1, 1, 4, 4)
    scales = np.array([1, 1, 2, 2], np.float32)
    needs_value("Resize", [x, None, scales])
    with pytest.raises(ShapeError, match="exactly one"):
        ours("Resize", [x, None, scales, np.array([1, 1, 8, 8], I64)])
    with pytest.raises(ShapeError, match="for 4 axes"):
        ours("Resize", [x, None, np.array([2, 2], np.float32)])
    with pytest.raises(ShapeError, match="roi"):
        ours("Resize", [x, None, scales], coordinate_transformation_mode="tf_crop_and_resize")
    with pytest.raises(OpAttributeError, match="mode"):
        ours("Resize", [x, None, scales], mode="area")
    with pytest.raises(ShapeError, match="bool"):
        ours("Resize", [data(2, 2, dtype=np.bool_), None, np.array([2, 2], np.float32)], mode="linear")


@pytest.mark.parametrize("scales", [[1, 1, 2, 3], [1, 2, 1.5, 2.5]])
def test_upsample_nearest(scales):
    x = data(1, 2, 3, 4)
    if all(float(s).is_integer() for s in scales):  # onnx.reference's Upsample only handles integer scales
        check("Upsample", [x, np.array(scales, np.float32)], opset=9, mode="nearest")
    # Upsample is Resize with asymmetric coordinates, nearest rounding down
    scales = np.array(scales, np.float32)
    want = onnx_reference(make_node("Resize", [x, None, scales], coordinate_transformation_mode="asymmetric",
                                    nearest_mode="floor"), [x, None, scales], OPSET)
    spec("Upsample", [x, np.array(scales, np.float32)], want, mode="nearest")


def test_upsample_linear():
    x, scales = data(1, 1, 3, 4), np.array([1, 1, 2, 1.5], np.float32)
    want = onnx_reference(make_node("Resize", [x, None, scales], mode="linear",
                                    coordinate_transformation_mode="asymmetric"), [x, None, scales], OPSET)
    spec("Upsample", [x, scales], want, mode="linear")
    needs_value("Upsample", [x, scales], mode="linear")
