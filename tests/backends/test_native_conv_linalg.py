"""Native kernels of Conv, ConvTranspose, AveragePool, MaxPool, Gemm, MatMul and Einsum, compared with the NumPy
reference path (`edgecc.compile(model).run` vs `edgecc.compile(model, runtime="native").run`) on one-node cases
whose inputs (weights included) are graph inputs, so the kernels read everything at run time. Many cases share one
model (`Batch`) so that one native compile covers them; a failure names its case.

The cases aim at the kernels' code paths: register tiles with and without remainders, the runtime loop of interior
tiles and the statically masked border tiles of Conv, strided input loads (stride 2..4 through one wide load, larger
strides lane by lane), output-channel blocks with remainders, the "row" and "dot" forms of the matrix product.

Tolerances (values compared scaled by the reference's largest magnitude, since sums of many signed terms can
cancel locally):
- integers, MaxPool values and Indices: exact (wrapping integer arithmetic / selections, no rounding);
- float32: 2e-6 of the largest magnitude -- both sides accumulate in float32 but in a different order (BLAS
  blocking in the reference, register tiles and fused multiply-adds here), a few ulp of the largest partial sum;
- float16: 2e-3 of the largest magnitude -- both sides accumulate in float32 and round once to float16, so outputs
  differ by at most one float16 ulp (2^-10 relative) where the float32 results straddle a rounding boundary.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgecc

RNG = np.random.default_rng(2024)
REL_TOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float16): 2e-3}


def one_node_model(op: str, arrays: list, n_outputs: int = 1, opset: int = 21, **attrs) -> onnx.ModelProto:
    batch = Batch(opset)
    batch.add("", op, arrays, n_outputs, **attrs)
    return batch.model()


class Batch:
    """Many independent one-node cases in one model, so one native compile covers them all. Input i of case c is
    named c{c}_in{i}, its outputs c{c}_out{j}."""

    def __init__(self, opset: int = 21):
        self.opset = opset
        self.nodes, self.inputs, self.outputs, self.feeds, self.labels = [], [], [], {}, []

    def add(self, label: str, op: str, arrays: list, n_outputs: int = 1, **attrs) -> "Batch":
        prefix = f"c{len(self.nodes)}_"
        names = ["" if a is None else f"{prefix}in{i}" for i, a in enumerate(arrays)]
        while names and names[-1] == "":
            names.pop()
        outs = [f"{prefix}out{j}" for j in range(n_outputs)]
        self.nodes.append(helper.make_node(op, names, outs, **attrs))
        for name, a in zip(names, arrays):
            if name:
                self.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype),
                                                                 a.shape))
                self.feeds[name] = a
        self.outputs += [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs]
        self.labels += [f"{label or op} output {j}" for j in range(n_outputs)]
        return self

    def model(self) -> onnx.ModelProto:
        return helper.make_model(helper.make_graph(self.nodes, "g", self.inputs, self.outputs),
                                 opset_imports=[helper.make_opsetid("", self.opset)])

    def check(self, target: str = "host") -> list[np.ndarray]:
        """Native outputs equal the reference interpreter's (see the module docstring); returns them."""
        model = self.model()
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            want = edgecc.compile(model).run(self.feeds)
        native = edgecc.compile(model, target=target, runtime="native")
        assert {n.op_type for n in self.nodes} <= {n.op for n in native.module.graph.nodes}  # nothing rewritten
        got = native.run(self.feeds)
        assert len(got) == len(want) == len(self.labels)
        for label, g, w in zip(self.labels, got, want):
            assert g.dtype == w.dtype and g.shape == w.shape, (label, g.dtype, g.shape, w.dtype, w.shape)
            if g.dtype in REL_TOL and not label.startswith("MaxPool"):
                scale = float(np.max(np.abs(w.astype(np.float64)), initial=0.0)) or 1.0
                err = np.abs(g.astype(np.float64) - w.astype(np.float64))
                assert np.array_equal(np.isnan(g), np.isnan(w)), label
                assert np.nanmax(err, initial=0.0) <= REL_TOL[g.dtype] * scale, (label, np.nanmax(err) / scale)
            else:
                np.testing.assert_array_equal(g, w, err_msg=label)
        return got


def check(op: str, arrays: list, n_outputs: int = 1, opset: int = 21, **attrs) -> list[np.ndarray]:
    """One case alone."""
    return Batch(opset).add("", op, arrays, n_outputs, **attrs).check()


def rand(*shape, dtype=np.float32) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return RNG.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(max(info.min, -20), min(info.max, 20), shape, endpoint=True).astype(dtype)


# ------------------------------------------------------------------------------------------------------- Conv

CONV_CASES = {
    # name: (x shape, w shape, has bias, attrs)
    "2d_pad1": ((1, 3, 10, 10), (4, 3, 3, 3), True, dict(pads=[1, 1, 1, 1])),
    "2d_nopad_nobias": ((2, 3, 7, 9), (5, 3, 3, 2), False, {}),
    "2d_wide_interior_loop": ((1, 2, 5, 150), (3, 2, 3, 3), True, dict(pads=[1, 1, 1, 1])),
    "2d_stride2_wide": ((1, 3, 23, 121), (8, 3, 7, 7), True, dict(pads=[3, 3, 3, 3], strides=[2, 2])),
    "2d_stride3": ((1, 2, 11, 40), (3, 2, 3, 3), True, dict(pads=[1, 2, 0, 1], strides=[3, 3])),
    "2d_stride5_lanewise": ((1, 2, 12, 61), (3, 2, 2, 3), True, dict(pads=[1, 1, 1, 1], strides=[2, 5])),
    "2d_dilated": ((1, 3, 12, 40), (4, 3, 3, 3), True, dict(pads=[2, 2, 2, 2], dilations=[2, 3])),
    "2d_asymmetric_pads": ((1, 3, 9, 8), (4, 3, 3, 3), True, dict(pads=[0, 2, 1, 0], strides=[2, 1])),
    "2d_many_channels_remainder": ((1, 5, 6, 6), (37, 5, 3, 3), True, dict(pads=[1, 1, 1, 1])),
    "2d_kernel_wider_than_input": ((1, 2, 4, 3), (3, 2, 3, 5), True, dict(pads=[2, 2, 2, 2])),
    "2d_pads_beyond_kernel": ((1, 1, 3, 3), (2, 1, 2, 2), True, dict(pads=[3, 3, 3, 3])),
    "2d_1x1_stride2": ((1, 16, 14, 14), (24, 16, 1, 1), False, dict(strides=[2, 2])),
    "2d_groups": ((2, 6, 8, 8), (9, 2, 3, 3), True, dict(group=3, pads=[1, 1, 1, 1])),
    "2d_depthwise": ((1, 8, 9, 33), (8, 1, 3, 3), True, dict(group=8, pads=[1, 1, 1, 1])),
    "2d_depthwise_multiplier": ((1, 4, 7, 7), (8, 1, 3, 3), True, dict(group=4, strides=[2, 2], pads=[1, 1, 1, 1])),
    "2d_same_upper": ((1, 3, 7, 8), (4, 3, 3, 4), True, dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "2d_same_lower": ((1, 3, 7, 8), (4, 3, 4, 3), True, dict(auto_pad="SAME_LOWER", strides=[1, 2])),
    "2d_valid": ((1, 3, 7, 8), (4, 3, 3, 3), True, dict(auto_pad="VALID", strides=[2, 2])),
    "1d": ((2, 3, 50), (4, 3, 5), True, dict(pads=[2, 1])),
    "1d_stride_dilation": ((1, 2, 70), (3, 2, 3), False, dict(strides=[2], dilations=[4], pads=[3, 3])),
    "3d": ((1, 2, 5, 6, 7), (3, 2, 3, 3, 3), True, dict(pads=[1, 0, 1, 1, 1, 0])),
    "3d_strided_groups": ((1, 4, 6, 7, 9), (4, 2, 2, 3, 3), True, dict(group=2, strides=[2, 1, 2],
                                                                     dilations=[1, 2, 1], pads=[1, 1, 1, 1, 1, 1])),
}


F16_CONV = ("2d_pad1", "2d_stride2_wide", "1d", "3d", "2d_groups")  # float16: same code behind widened loads


def conv_batch(dtype, names) -> Batch:
    batch = Batch()
    for name in names:
        xs, ws, has_bias, attrs = CONV_CASES[name]
        bias = rand(ws[0], dtype=dtype) if has_bias else None
        batch.add(f"Conv {name}", "Conv", [rand(*xs, dtype=dtype), rand(*ws, dtype=dtype), bias], **attrs)
    return batch


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_conv(dtype):
    conv_batch(dtype, sorted(CONV_CASES) if dtype == np.float32 else F16_CONV).check()


def test_conv_empty_input_channels_gives_bias():
    # (the NumPy reference cannot reshape the empty im2col matrix here, so the expectation is written out)
    x, w, bias = rand(1, 0, 5, 5), rand(3, 0, 3, 3), rand(3)
    model = one_node_model("Conv", [x, w, bias], pads=[1, 1, 1, 1])
    got = edgecc.compile(model, runtime="native").run({"c0_in0": x, "c0_in1": w, "c0_in2": bias})[0]
    np.testing.assert_array_equal(got, np.broadcast_to(bias.reshape(1, 3, 1, 1), (1, 3, 5, 5)))


CONV_TRANSPOSE_CASES = {
    "2d": ((1, 2, 4, 5), (2, 3, 3, 3), True, {}),
    "2d_strides_pads": ((2, 3, 5, 4), (3, 2, 3, 2), True, dict(strides=[3, 2], pads=[1, 0, 2, 1])),
    "2d_output_padding": ((1, 2, 3, 3), (2, 2, 3, 3), False, dict(strides=[3, 2], output_padding=[1, 1])),
    "2d_output_shape": ((1, 1, 3, 3), (1, 2, 3, 3), True, dict(strides=[3, 2], output_shape=[10, 8])),
    "2d_output_shape_beyond_canvas": ((1, 2, 3, 4), (2, 2, 3, 3), True, dict(strides=[3, 2], output_shape=[14, 13])),
    "2d_wide_rows_stride2": ((1, 8, 5, 70), (8, 20, 4, 4), True, dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "2d_stride_above_kernel": ((1, 3, 4, 30), (3, 2, 2, 2), True, dict(strides=[3, 4], pads=[0, 1, 1, 0])),
    "2d_stride_dilation": ((1, 2, 5, 33), (2, 3, 3, 3), False, dict(strides=[2, 2], dilations=[2, 3],
                                                                   pads=[2, 1, 0, 3])),
    "2d_same_upper": ((1, 2, 3, 4), (2, 2, 3, 3), True, dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    "2d_same_lower": ((1, 2, 3, 4), (2, 2, 3, 3), True, dict(strides=[2, 2], auto_pad="SAME_LOWER")),
    "2d_dilations_groups": ((1, 4, 4, 4), (4, 3, 2, 2), True, dict(dilations=[2, 2], group=2)),
    "1d": ((1, 3, 6), (3, 2, 4), True, dict(strides=[2])),
    "3d": ((1, 2, 3, 4, 3), (2, 2, 2, 3, 2), True, dict(strides=[1, 2, 2], pads=[0, 1, 0, 1, 0, 1])),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_conv_transpose(dtype):
    batch = Batch()
    for name, (xs, ws, has_bias, attrs) in sorted(CONV_TRANSPOSE_CASES.items()):
        if dtype == np.float32 or name in ("2d_strides_pads", "1d", "2d_wide_rows_stride2"):
            bias = rand(ws[1] * attrs.get("group", 1), dtype=dtype) if has_bias else None
            batch.add(f"ConvTranspose {name}", "ConvTranspose", [rand(*xs, dtype=dtype), rand(*ws, dtype=dtype), bias],
                      **attrs)
    batch.check()


# ------------------------------------------------------------------------------------------------------ Pools

POOL_CASES = {
    "2d": ((1, 3, 8, 9), dict(kernel_shape=[3, 3])),
    "2d_pads_strides": ((2, 2, 11, 13), dict(kernel_shape=[3, 2], strides=[2, 3], pads=[1, 0, 2, 1])),
    "2d_ceil": ((1, 2, 7, 8), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    "2d_ceil_pads": ((1, 2, 6, 6), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    "2d_dilations": ((1, 2, 9, 10), dict(kernel_shape=[2, 3], dilations=[3, 2], pads=[1, 1, 1, 1])),
    "2d_same_upper": ((1, 2, 7, 8), dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER")),
    "2d_same_lower": ((1, 2, 7, 8), dict(kernel_shape=[2, 3], strides=[2, 1], auto_pad="SAME_LOWER")),
    "2d_pads_as_large_as_kernel": ((1, 1, 3, 3), dict(kernel_shape=[2, 2], pads=[2, 2, 2, 2])),
    "2d_wide_rows": ((1, 2, 6, 100), dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    "2d_wide_rows_stride2": ((1, 2, 7, 113), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "1d": ((2, 3, 17), dict(kernel_shape=[4], strides=[3], pads=[2, 1])),
    "3d": ((1, 2, 5, 6, 7), dict(kernel_shape=[2, 3, 2], strides=[2, 1, 2], pads=[1, 1, 0, 0, 1, 1])),
    "3d_dilations_ceil": ((1, 1, 8, 8, 8), dict(kernel_shape=[2, 2, 2], dilations=[2, 2, 2], strides=[2, 2, 2],
                                                ceil_mode=1)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_average_pool(dtype):
    batch = Batch()
    for include_pad in (0, 1):
        for name, (shape, attrs) in sorted(POOL_CASES.items()):
            batch.add(f"AveragePool {name} count_include_pad={include_pad}", "AveragePool",
                      [rand(*shape, dtype=dtype)], count_include_pad=include_pad, **attrs)
    batch.check()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint8])
def test_max_pool(dtype):
    batch = Batch()
    for name, (shape, attrs) in sorted(POOL_CASES.items()):
        batch.add(f"MaxPool {name}", "MaxPool", [rand(*shape, dtype=dtype)], **attrs)
    batch.check()


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_max_pool_indices(dtype):
    batch = Batch()
    for storage_order in (0, 1):
        for name, (shape, attrs) in sorted(POOL_CASES.items()):
            x = rand(*shape, dtype=dtype)
            if dtype == np.float32:
                x = np.round(x)  # many ties: the first in row-major window order wins
            batch.add(f"MaxPool {name} storage_order={storage_order}", "MaxPool", [x], n_outputs=2,
                      storage_order=storage_order, **attrs)
    batch.check()


def test_max_pool_nan_propagates_like_numpy_maximum():
    x = rand(1, 1, 6, 6)
    x[0, 0, 1, 1] = np.nan
    x[0, 0, 4, 5] = np.nan
    got = check("MaxPool", [x], kernel_shape=[2, 2])[0]
    assert np.isnan(got).sum() == 6  # four windows hold the first NaN, two the second


# ------------------------------------------------------------------------------------------------------- Gemm

GEMM_CASES = {
    # name: (M, K, N, C shape or None, attrs)
    "plain": (3, 5, 4, None, {}),
    "vector_bias": (7, 9, 33, (33,), {}),
    "matrix_bias_alpha_beta": (20, 17, 70, (20, 70), dict(alpha=0.5, beta=-2.0)),
    "column_bias": (6, 8, 5, (6, 1), dict(beta=3.0)),
    "scalar_bias": (2, 3, 4, (), {}),
    "beta_zero_ignores_c": (4, 3, 5, (4, 5), dict(beta=0.0)),
    "transA": (9, 6, 19, (19,), dict(transA=1)),
    "transB_fc": (1, 512, 37, (37,), dict(transB=1)),
    "transB_tail": (5, 21, 6, (1, 6), dict(transB=1, alpha=1.5)),
    "transA_transB": (7, 11, 13, (7, 13), dict(transA=1, transB=1)),
    "k1": (4, 1, 6, None, dict(transB=1)),
}


def _gemm_inputs(case, dtype):
    m, k, n, c_shape, attrs = case
    a = rand(*((k, m) if attrs.get("transA") else (m, k)), dtype=dtype)
    b = rand(*((n, k) if attrs.get("transB") else (k, n)), dtype=dtype)
    c = None if c_shape is None else rand(*c_shape, dtype=dtype)
    return [a, b, c]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.int64])
def test_gemm(dtype):
    batch = Batch(opset=13 if np.dtype(dtype).kind == "i" else 21)
    for name, case in sorted(GEMM_CASES.items()):
        batch.add(f"Gemm {name}", "Gemm", _gemm_inputs(case, dtype), **case[-1])
    batch.check()


# ----------------------------------------------------------------------------------------------------- MatMul

MATMUL_CASES = {
    "2d": ((3, 4), (4, 5)),
    "2d_tiles": ((37, 29), (29, 70)),
    "1d_1d": ((17,), (17,)),
    "1d_2d": ((6,), (6, 9)),
    "2d_1d": ((9, 40), (40,)),
    "1d_3d": ((4,), (2, 4, 3)),
    "4d_1d": ((2, 3, 5, 4), (4,)),
    "batch": ((3, 5, 6), (3, 6, 7)),
    "batch_broadcast": ((2, 1, 5, 6), (3, 6, 20)),
    "batch_vs_2d": ((1, 128, 24), (24, 36)),
    "n1": ((8, 12), (12, 1)),
    "k_empty": ((3, 0), (0, 4)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.int64])
def test_matmul(dtype):
    batch = Batch()
    for name, (a_shape, b_shape) in sorted(MATMUL_CASES.items()):
        batch.add(f"MatMul {name}", "MatMul", [rand(*a_shape, dtype=dtype), rand(*b_shape, dtype=dtype)])
    batch.check()


def test_matmul_int32_wraps():
    a = np.full((2, 3), 2 ** 20, np.int32)
    b = np.full((3, 2), 2 ** 12, np.int32)
    check("MatMul", [a, b])


# ----------------------------------------------------------------------------------------------------- Einsum

EINSUM_CASES = {
    "matmul": ("ij,jk->ik", [(3, 4), (4, 5)]),
    "batch_matmul": ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    "transpose": ("ij->ji", [(3, 4)]),
    "sum_all": ("ij->", [(3, 4)]),
    "trace": ("ii", [(5, 5)]),
    "diagonal": ("ii->i", [(4, 4)]),
    "outer": ("i,j->ij", [(3,), (4,)]),
    "dot": ("i,i", [(7,)] * 2),
    "implicit": ("ba,bc", [(3, 2), (3, 4)]),
    "three_operands": ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]),
    "ellipsis": ("...ij,...jk->...ik", [(2, 3, 4), (4, 5)]),
    "ellipsis_broadcast": ("...i,...i->...", [(2, 1, 3), (4, 3)]),
    "ellipsis_middle": ("a...b->b...a", [(2, 3, 4, 5)]),
    "repeated_across_and_within": ("iij,j->i", [(3, 3, 4), (4,)]),
    "case_sensitive": ("aA,Ab->ab", [(2, 3), (3, 2)]),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.int64, np.int8, np.uint8, np.int16])
def test_einsum(dtype):
    batch = Batch()
    for name, (equation, shapes) in sorted(EINSUM_CASES.items()):
        batch.add(f"Einsum {name}", "Einsum", [rand(*shape, dtype=dtype) for shape in shapes], equation=equation)
    batch.check()


# ------------------------------------------------------------------------------------------- other vector widths


NARROW_CONV = ("2d_pad1", "2d_wide_interior_loop", "2d_stride2_wide", "2d_stride5_lanewise", "2d_dilated",
               "2d_many_channels_remainder", "2d_depthwise", "1d", "3d_strided_groups")
NARROW_TRANSPOSE = ("2d_strides_pads", "2d_wide_rows_stride2", "2d_stride_dilation", "3d")
NARROW_POOL = ("2d_pads_strides", "2d_ceil_pads", "2d_wide_rows", "2d_wide_rows_stride2", "3d_dilations_ceil")


@pytest.mark.parametrize("target", ["x86-64", "x86-64-v3"])
def test_narrower_vectors(target):
    """The tile sizes follow the target's vector width and register count: SSE2 (4 lanes, 16 registers) and AVX2
    (8 lanes, 16 registers) code runs here too, on a representative subset of the cases."""
    batch = conv_batch(np.float32, NARROW_CONV)
    for name in NARROW_TRANSPOSE:
        xs, ws, has_bias, attrs = CONV_TRANSPOSE_CASES[name]
        bias = rand(ws[1] * attrs.get("group", 1)) if has_bias else None
        batch.add(f"ConvTranspose {name}", "ConvTranspose", [rand(*xs), rand(*ws), bias], **attrs)
    for name in NARROW_POOL:
        shape, attrs = POOL_CASES[name]
        batch.add(f"AveragePool {name}", "AveragePool", [rand(*shape)], count_include_pad=1, **attrs)
        batch.add(f"MaxPool {name}", "MaxPool", [np.round(rand(*shape))], n_outputs=2, **attrs)
    for name in ("vector_bias", "matrix_bias_alpha_beta", "transB_fc", "transB_tail", "transA_transB"):
        batch.add(f"Gemm {name}", "Gemm", _gemm_inputs(GEMM_CASES[name], np.float32), **GEMM_CASES[name][-1])
    for name in ("2d_tiles", "2d_1d", "batch_broadcast"):
        a_shape, b_shape = MATMUL_CASES[name]
        batch.add(f"MatMul {name}", "MatMul", [rand(*a_shape), rand(*b_shape)])
    batch.check(target)


# ---------------------------------------------------------------------------------------------------- a model


@pytest.mark.slow
@pytest.mark.shared
def test_resnet18_native_matches_reference_and_is_fast(shared_dir):
    """ResNet-18 at 224x224 through the native kernels: within 1e-4 relative of the reference run, and fast
    (well under 2 s; about 40 ms on the unloaded development machine, onnxruntime single-threaded: 34 ms)."""
    path = shared_dir / "models" / "resnet18.onnx"
    feeds = {"input": np.load(shared_dir / "models" / "resnet18.ref.npz")["input"]}
    model = edgecc.compile(str(path), opt_level=3, runtime="native")
    got = model.run(feeds)[0]
    start = time.perf_counter()
    model.run(feeds)
    elapsed = time.perf_counter() - start
    want = edgecc.compile(str(path), opt_level=3).run(feeds)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert elapsed < 2.0, elapsed
