"""edgecc.QGemm: the quantised matrix product with an int32 bias that ONNX lacks (QLinearMatMul has no bias).

    edgecc.QGemm(A, a_scale, a_zero_point, B, b_scale, b_zero_point, y_scale, y_zero_point, C?)  transB=0|1

A is (u)int8 [..., M, K] with a per-tensor scale/zero point. B is int8 [K, N] (transB=0) or [N, K] (transB=1)
with a scalar or per-column ([N]) scale and zero point. C is an optional int32 bias [N] in units of
a_scale * b_scale (as QLinearConv's B). Like QLinearConv:

    acc = (A - a_zp) @ (B - b_zp) + C                       (int32)
    y   = saturate(rint(acc * (a_scale * b_scale / y_scale)) + y_zp)   in y_zero_point's dtype (float32 steps)

Gemm and MatMul with constant weights lower to it from QDQ form (lower-qdq); export writes it back as
DequantizeLinear/MatMul/Add/QuantizeLinear.
"""

from __future__ import annotations

import numpy as np

from edgecc.ir.dtypes import DType
from edgecc.ops.common import tensor
from edgecc.ops.linalg import _int_matmul
from edgecc.ops.quant import requantize
from edgecc.ops.registry import EDGECC_DOMAIN, AttrSpec, Call, op

_INT8 = (DType.int8, DType.uint8)


def _b_matrix(b: np.ndarray, trans_b: int) -> np.ndarray:
    return b.T if trans_b else b


def _infer_qgemm(call: Call):
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = (call.input(i) for i in range(8))
    c = call.input(8)
    for t, name in ((a, "A"), (b, "B"), (a_zp, "a_zero_point"), (b_zp, "b_zero_point"), (y_zp, "y_zero_point")):
        if t is None or t.dtype not in _INT8:
            call.fail(f"QGemm input {name} is {'missing' if t is None else t.dtype.name}", hint="it takes int8 or uint8")
    for t, name in ((a_s, "a_scale"), (b_s, "b_scale"), (y_s, "y_scale")):
        if t is None or t.dtype != DType.float32:
            call.fail(f"QGemm input {name} must be float32")
    if a.rank < 2 or b.rank != 2:
        call.fail(f"QGemm takes A of rank >= 2 and a 2-D B, got {list(a.shape)} and {list(b.shape)}")
    k, n = (b.shape[1], b.shape[0]) if call.attrs["transB"] else b.shape
    if a.shape[-1] != k:
        call.fail(f"QGemm inner dimensions differ: A {list(a.shape)}, B {list(b.shape)} (transB={call.attrs['transB']})")
    for t, name in ((a_s, "a_scale"), (a_zp, "a_zero_point"), (y_s, "y_scale"), (y_zp, "y_zero_point")):
        if t.size != 1:
            call.fail(f"QGemm {name} must be a scalar (per-tensor), got shape {list(t.shape)}")
    for t, name in ((b_s, "b_scale"), (b_zp, "b_zero_point")):
        if t.size != 1 and t.shape != (n,):
            call.fail(f"QGemm {name} has shape {list(t.shape)}, expected a scalar or [{n}] (one per column)")
    if b_zp.dtype != b.dtype:
        call.fail(f"b_zero_point is {b_zp.dtype.name} but B is {b.dtype.name}")
    if a_zp.dtype != a.dtype:
        call.fail(f"a_zero_point is {a_zp.dtype.name} but A is {a.dtype.name}")
    if c is not None and (c.dtype != DType.int32 or c.shape != (n,)):
        call.fail(f"QGemm bias C must be int32[{n}], got {c.dtype.name}{list(c.shape)}")
    return [tensor(y_zp.dtype, (*a.shape[:-1], n))]


@op("QGemm", infer=_infer_qgemm, inputs=(8, 9), domain=EDGECC_DOMAIN, attrs={"transB": AttrSpec("int", 0)})
def qgemm(call: Call):
    """Quantised A @ B (+ int32 bias C), requantised to y's scale and zero point (see the module docstring)."""
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = (call.input(i) for i in range(8))
    bm = _b_matrix(b, call.attrs["transB"])
    b_zp = np.asarray(b_zp)
    acc = _int_matmul(a, np.asarray(a_zp).reshape(()), bm, b_zp.reshape(()) if b_zp.size == 1 else b_zp)
    c = call.input(8)
    if c is not None:
        acc = acc + c.astype(np.int32)
    multiplier = (np.float32(np.asarray(a_s).reshape(())) * np.asarray(b_s, np.float32).reshape(-1)
                  / np.float32(np.asarray(y_s).reshape(())))
    multiplier = multiplier.reshape(()) if multiplier.size == 1 else multiplier
    return [requantize(acc, multiplier, np.asarray(y_zp).reshape(()), y_zp.dtype)]
