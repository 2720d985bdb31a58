"""Quantisation ops: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, plus the shared helpers
(`quantize`, `requantize`, `expand_quant_param`) that other quantised ops (QLinearMatMul, ...) use.

Affine quantisation: real = scale * (q - zero_point); q = saturate(round_half_even(real / scale) + zero_point).
edgecc supports the integer quantised types int8, uint8 and int16 (and int32 as a DequantizeLinear input);
float8, int4, uint16 and the other sub-byte types are rejected with an error naming the type.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.ops.common import normalize_axis, tensor
from edgecc.ops.registry import AttrSpec, Call, op

QUANT_DTYPES = (DType.int8, DType.uint8, DType.int16)
"""Types QuantizeLinear may produce in edgecc."""


def quant_range(dtype) -> tuple[int, int]:
    """The (min, max) an integer quantised type saturates to."""
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def quantize(x: np.ndarray, scale, zero_point, dtype) -> np.ndarray:
    """saturate(round_half_even(x / scale) + zero_point) as `dtype` (an integer NumPy dtype).

    `scale` and `zero_point` (None = 0) must already broadcast against `x` (see `expand_quant_param`).
    The division runs at NumPy's promoted precision of x and scale, as the ONNX reference does; NaN maps to
    the zero point.
    """
    dtype = np.dtype(dtype)
    lo, hi = quant_range(dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.rint(np.divide(x, scale))
        q = np.where(np.isnan(q), 0, q).astype(np.float64)
    if zero_point is not None:
        q = q + np.asarray(zero_point, dtype=np.float64)
    return np.clip(q, lo, hi).astype(dtype)


def requantize(acc: np.ndarray, multiplier, zero_point, dtype) -> np.ndarray:
    """Rescale an integer accumulator: saturate(round_half_even(acc * multiplier) + zero_point) as `dtype`.

    `multiplier` is typically in_scale_a * in_scale_b / out_scale (computed at the scales' precision); the
    product is taken in float64 so the only rounding is the final round-half-to-even.
    """
    dtype = np.dtype(dtype)
    lo, hi = quant_range(dtype)
    q = np.rint(np.asarray(acc, dtype=np.float64) * np.asarray(multiplier, dtype=np.float64))
    if zero_point is not None:
        q = q + np.asarray(zero_point, dtype=np.float64)
    return np.clip(q, lo, hi).astype(dtype)


def expand_quant_param(value: np.ndarray | None, shape: tuple[int, ...], axis: int, block_size: int):
    """Make a scale/zero point broadcastable to `shape`: per-tensor (size 1) as a scalar, per-axis (1-D) as a
    vector along `axis`, blocked (same rank, `block_size` > 0) repeated `block_size` times along `axis` and
    cut to the input's length. `axis` must already be non-negative."""
    if value is None:
        return None
    value = np.asarray(value)
    if value.size == 1:  # per tensor (a single block is the same thing)
        return value.reshape(())
    if block_size:
        value = np.repeat(value, block_size, axis=axis)
        return np.take(value, np.arange(shape[axis]), axis=axis)
    dims = [1] * len(shape)
    dims[axis] = value.size
    return value.reshape(dims)


def _granularity(call: Call, x: TensorType, scale: TensorType, zero_point: TensorType | None, axis: int,
                 block_size: int, scale_name: str) -> int | None:
    """Check scale/zero-point shapes against x; returns the normalised axis (None for per-tensor)."""
    if block_size < 0:
        call.bad_attr(f"block_size {block_size} is negative", hint="use 0 (no blocking) or a positive block size")
    # A [1] scale with a scalar zero point (or the reverse) is per tensor all the same: onnxruntime writes it.
    if zero_point is not None and zero_point.shape != scale.shape and not zero_point.size == scale.size == 1:
        call.fail(f"{scale_name} has shape {list(scale.shape)} but the zero point has shape "
                  f"{list(zero_point.shape)}", hint="scale and zero point must have the same shape")
    if block_size > 0:
        if scale.rank != x.rank or x.rank == 0:
            call.fail(f"blocked quantisation needs {scale_name} of the input's rank {x.rank}, got shape "
                      f"{list(scale.shape)}", hint="give one scale per block: the input's shape with the "
                                                  "blocked axis divided by block_size (rounded up)")
        ax = normalize_axis(call, axis, x.rank)
        for i, (d, s) in enumerate(zip(x.shape, scale.shape)):
            if i != ax and d != s:
                call.fail(f"{scale_name} shape {list(scale.shape)} differs from the input shape {list(x.shape)} "
                          f"on axis {i}, which is not the blocked axis {ax}")
        d, s = x.shape[ax], scale.shape[ax]
        if s == 0 or -(-d // block_size) != s:
            call.bad_attr(f"block_size {block_size} does not fit: axis {ax} has {d} elements and {s} scales",
                          hint=f"block_size must satisfy ceil({d}/block_size) == {s}")
        return ax
    if scale.size == 1 and scale.rank <= 1:
        return None
    if scale.rank != 1:
        call.fail(f"{scale_name} has shape {list(scale.shape)}; without block_size it must be a scalar "
                  f"(per-tensor) or 1-D (per-axis)", hint="set block_size for blocked quantisation")
    ax = normalize_axis(call, axis, x.rank)
    if scale.shape[0] != x.shape[ax]:
        call.fail(f"per-axis {scale_name} has {scale.shape[0]} elements but axis {ax} of the input has "
                  f"{x.shape[ax]}", hint="give one scale per slice along `axis`, or set `axis`")
    return ax


def _onnx_name(code: int) -> str:
    return TensorProto.DataType.Name(code) if code in TensorProto.DataType.values() else str(code)


def _onnx_dtype(call: Call, code: int, what: str) -> DType:
    try:
        return DType.from_onnx(code)
    except KeyError:
        call.fail(f"{what} {_onnx_name(code)} is not supported by edgecc",
                  hint="edgecc quantises to int8, uint8 or int16 and computes in float32/float16")


# ---------------------------------------------------------------------------------------------------------------
# QuantizeLinear


def _quantize_out_dtype(call: Call, zero_point_dtype: DType | None) -> DType:
    code = call.attrs["output_dtype"]
    if zero_point_dtype is not None:
        out = zero_point_dtype
        if code and code != out.onnx:
            call.bad_attr(f"output_dtype {_onnx_name(code)} disagrees with the zero point's type {out.name}",
                          hint="drop output_dtype or make them match")
    elif code:
        out = _onnx_dtype(call, code, "quantised type")
    else:
        out = DType.uint8
    if out not in QUANT_DTYPES:
        call.fail(f"QuantizeLinear to {out.name} is not supported",
                  hint="edgecc quantises to " + ", ".join(d.name for d in QUANT_DTYPES))
    return out


def _infer_quantize(call: Call):
    x, scale = call.inputs[0], call.inputs[1]
    zp = call.input(2)
    if x.dtype not in (DType.float32, DType.float16, DType.int32):
        call.fail(f"QuantizeLinear input is {x.dtype.name}", hint="quantise a float32, float16 or int32 tensor")
    if scale.dtype not in (DType.float32, DType.float16, DType.int32):
        call.fail(f"y_scale is {scale.dtype.name}", hint="y_scale must be float32, float16 (or int32)")
    if call.attrs["precision"]:
        prec = _onnx_dtype(call, call.attrs["precision"], "precision")
        if not prec.is_float:
            call.bad_attr(f"precision {prec.name} is not a float type", hint="use FLOAT or FLOAT16")
    if call.attrs["saturate"] not in (0, 1):
        call.bad_attr(f"saturate must be 0 or 1, got {call.attrs['saturate']}")
    out = _quantize_out_dtype(call, zp.dtype if zp is not None else None)
    _granularity(call, x, scale, zp, call.attrs["axis"], call.attrs["block_size"], "y_scale")
    return [tensor(out, x.shape)]


@op("QuantizeLinear", infer=_infer_quantize, inputs=(2, 3), kind="elementwise",
    attrs={"axis": AttrSpec("int", 1), "saturate": AttrSpec("int", 1), "block_size": AttrSpec("int", 0),
           "output_dtype": AttrSpec("int", 0), "precision": AttrSpec("int", 0)})
def quantize_linear(call: Call):
    """y = saturate(round_half_even(x / y_scale) + y_zero_point), per tensor, per axis or per block.

    The output type is the zero point's (int8, uint8, int16), else `output_dtype`, else uint8. `precision`
    (an ONNX float type) sets the precision of the division; by default it is NumPy's promotion of x and
    y_scale. `saturate` only concerns float8 outputs, which edgecc does not support."""
    x, scale = call.inputs[0], call.inputs[1]
    zp = call.input(2)
    out = _quantize_out_dtype(call, DType.from_numpy(zp.dtype) if zp is not None else None)
    axis, block = call.attrs["axis"], call.attrs["block_size"]
    axis = axis + x.ndim if axis < 0 else axis
    scale = expand_quant_param(scale, x.shape, axis, block)
    zp = expand_quant_param(zp, x.shape, axis, block)
    if call.attrs["precision"]:
        prec = DType.from_onnx(call.attrs["precision"]).numpy
        x, scale = x.astype(prec), scale.astype(prec)
    return [quantize(x, scale, zp, out.numpy)]


# ---------------------------------------------------------------------------------------------------------------
# DequantizeLinear


def _dequantize_out_dtype(call: Call, scale_dtype: DType) -> DType:
    code = call.attrs["output_dtype"]
    out = _onnx_dtype(call, code, "output_dtype") if code else scale_dtype
    if not out.is_float:
        call.bad_attr(f"DequantizeLinear output_dtype {out.name} is not a float type", hint="use FLOAT or FLOAT16")
    return out


def _infer_dequantize(call: Call):
    x, scale = call.inputs[0], call.inputs[1]
    zp = call.input(2)
    if x.dtype not in (DType.int8, DType.uint8, DType.int16, DType.int32):
        call.fail(f"DequantizeLinear input is {x.dtype.name}", hint="x must be int8, uint8, int16 or int32")
    if not scale.dtype.is_float:
        call.fail(f"x_scale is {scale.dtype.name}", hint="x_scale must be float32 or float16")
    if zp is not None and zp.dtype != x.dtype:
        call.fail(f"x_zero_point is {zp.dtype.name} but x is {x.dtype.name}", hint="they must have the same type")
    out = _dequantize_out_dtype(call, scale.dtype)
    _granularity(call, x, scale, zp, call.attrs["axis"], call.attrs["block_size"], "x_scale")
    return [tensor(out, x.shape)]


@op("DequantizeLinear", infer=_infer_dequantize, inputs=(2, 3), kind="elementwise",
    attrs={"axis": AttrSpec("int", 1), "block_size": AttrSpec("int", 0), "output_dtype": AttrSpec("int", 0)})
def dequantize_linear(call: Call):
    """y = (x - x_zero_point) * x_scale, per tensor, per axis or per block; computed in float32 and given
    in `output_dtype` (default: x_scale's type)."""
    x, scale = call.inputs[0], call.inputs[1]
    zp = call.input(2)
    out = _dequantize_out_dtype(call, DType.from_numpy(scale.dtype))
    axis, block = call.attrs["axis"], call.attrs["block_size"]
    axis = axis + x.ndim if axis < 0 else axis
    scale = expand_quant_param(scale, x.shape, axis, block)
    zp = expand_quant_param(zp, x.shape, axis, block)
    dx = x.astype(np.int64) if zp is None else x.astype(np.int64) - zp.astype(np.int64)
    y = dx.astype(np.float32) * scale.astype(np.float32)
    return [y.astype(out.numpy)]


# ---------------------------------------------------------------------------------------------------------------
# DynamicQuantizeLinear


def _infer_dynamic_quantize(call: Call):
    x = call.inputs[0]
    if x.dtype != DType.float32:
        call.fail(f"DynamicQuantizeLinear input is {x.dtype.name}", hint="it takes float32; insert a Cast")
    return [tensor(DType.uint8, x.shape), tensor(DType.float32, ()), tensor(DType.uint8, ())]


@op("DynamicQuantizeLinear", infer=_infer_dynamic_quantize, outputs=(1, 3))
def dynamic_quantize_linear(call: Call):
    """Quantise a float32 tensor to uint8 with a scale and zero point computed from its range:
    y_scale = (max(0, max(x)) - min(0, min(x))) / 255 (1.0 when that range is 0, as onnxruntime does),
    y_zero_point = round_half_even(saturate(0 - min(0, min(x)) / y_scale)),
    y = saturate(round_half_even(x / y_scale) + y_zero_point). All arithmetic in float32."""
    x = call.inputs[0]
    qmin, qmax = 0, 255
    hi = np.float32(max(0.0, float(np.max(x)))) if x.size else np.float32(0)
    lo = np.float32(min(0.0, float(np.min(x)))) if x.size else np.float32(0)
    scale = np.float32(1.0) if hi == lo else np.float32(hi - lo) / np.float32(qmax - qmin)
    zp = np.rint(np.clip(np.float32(qmin) - lo / scale, qmin, qmax))
    y = quantize(x, scale, zp, np.uint8)
    return [y, np.array(scale, dtype=np.float32), np.array(zp, dtype=np.uint8)]
