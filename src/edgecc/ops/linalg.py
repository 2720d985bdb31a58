"""Linear algebra: Gemm, MatMul, Einsum, the integer/quantised matmuls (MatMulInteger, QLinearMatMul), and
Softmax/LogSoftmax.

float16 products and sums are computed in float32 and rounded back once. 8-bit matmuls accumulate exactly
(in float64, which is exact for any realistic K since each product is below 2^16) and wrap to int32.
"""

from __future__ import annotations

import numpy as np

from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc.ops.common import normalize_axis, require_float, tensor
from edgecc.ops.conv import stored_weight_ok
from edgecc.ops.quant import requantize
from edgecc.ops.registry import AttrSpec, Call, op

_MATMUL_TYPES = (DType.float32, DType.float16, DType.int32, DType.int64)
_INT8 = (DType.int8, DType.uint8)


def _wide(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _same_dtype(call: Call, types, allowed, stored_weights: bool = False) -> DType:
    """The operands' common dtype. With `stored_weights`, operands after the first may be float16 while the first
    is float32 (fp16-stored weights, see conv.stored_weight_ok); the op then computes in float32."""
    present = [t for t in types if t is not None]
    if stored_weights and all(stored_weight_ok(present[0].dtype, t.dtype) for t in present[1:]):
        present = present[:1]
    dtypes = {t.dtype for t in present}
    if len(dtypes) > 1:
        call.fail(f"{call.op} inputs have different dtypes: {', '.join(sorted(d.name for d in dtypes))}",
                  hint="insert a Cast so the operands agree")
    dtype = present[0].dtype
    if dtype not in allowed:
        call.fail(f"{call.op} does not take {dtype.name}",
                  hint="supported: " + ", ".join(d.name for d in allowed)
                  + ("; use MatMulInteger/QLinearMatMul for 8-bit operands" if dtype in _INT8 else ""))
    return dtype


def matmul_shape(call: Call, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape of numpy.matmul(a, b): 1-D operands are promoted and the extra dim dropped, batch dims
    broadcast."""
    if len(a) == 0 or len(b) == 0:
        call.fail(f"{call.op} operands must have rank >= 1, got shapes {list(a)} and {list(b)}")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        call.fail(f"{call.op} inner dimensions differ: {list(a)} @ {list(b)} ({a2[-1]} vs {b2[-2]})",
                  hint="the last dim of A must equal the second-to-last dim of B")
    try:
        batch = tuple(np.broadcast_shapes(a2[:-2], b2[:-2]))
    except ValueError:
        call.fail(f"{call.op} batch dimensions {list(a2[:-2])} and {list(b2[:-2])} do not broadcast")
    shape = batch + (a2[-2], b2[-1])
    if len(a) == 1:
        shape = shape[:-2] + shape[-1:]
    if len(b) == 1:
        shape = shape[:-1]
    return shape


# ---------------------------------------------------------------------------------------------------------------
# Gemm


def _infer_gemm(call: Call):
    a, b = call.inputs[0], call.inputs[1]
    c = call.input(2)
    dtype = _same_dtype(call, [a, b, c], _MATMUL_TYPES, stored_weights=True)
    if a.rank != 2 or b.rank != 2:
        call.fail(f"Gemm needs 2-D A and B, got shapes {list(a.shape)} and {list(b.shape)}",
                  hint="use MatMul for other ranks, or Flatten/Reshape first")
    for name in ("transA", "transB"):
        if call.attrs[name] not in (0, 1):
            call.bad_attr(f"{name} must be 0 or 1, got {call.attrs[name]}")
    m, ka = a.shape[::-1] if call.attrs["transA"] else a.shape
    kb, n = b.shape[::-1] if call.attrs["transB"] else b.shape
    if ka != kb:
        call.fail(f"Gemm inner dimensions differ: op(A) is {[m, ka]} and op(B) is {[kb, n]}",
                  hint="check transA/transB")
    if c is not None:
        if c.rank > 2 or any(cd not in (1, od) for cd, od in zip(c.shape[::-1], (n, m))):
            call.fail(f"Gemm C of shape {list(c.shape)} does not broadcast to the output [{m}, {n}]",
                      hint="C must broadcast unidirectionally to [M, N]")
    return [tensor(dtype, (m, n))]


@op("Gemm", infer=_infer_gemm, inputs=(2, 3),
    attrs={"alpha": AttrSpec("float", 1.0), "beta": AttrSpec("float", 1.0), "transA": AttrSpec("int", 0),
           "transB": AttrSpec("int", 0)})
def gemm(call: Call):
    """Y = alpha * op(A) @ op(B) + beta * C, op() transposing when transA/transB is set; C (optional)
    broadcasts to [M, N]. Integer Gemm with alpha = beta = 1 wraps; other alphas/betas go through float64."""
    a, b = call.inputs[0], call.inputs[1]
    c = call.input(2)
    alpha, beta = call.attrs["alpha"], call.attrs["beta"]
    dtype = a.dtype
    a, b = _wide(a), _wide(b)
    if call.attrs["transA"]:
        a = a.T
    if call.attrs["transB"]:
        b = b.T
    y = a @ b
    if dtype.kind == "f":
        alpha, beta = np.float32(alpha), np.float32(beta)
        if alpha != 1:
            y = alpha * y
        if c is not None and beta != 0:
            y = y + (beta * _wide(c) if beta != 1 else _wide(c))
    else:
        exact = alpha == 1 and beta == 1
        if not exact:
            y = alpha * y.astype(np.float64)
        if c is not None and beta != 0:
            y = y + (c if exact else beta * c.astype(np.float64))
    return [np.broadcast_to(y, (a.shape[0], b.shape[1])).astype(dtype)]


# ---------------------------------------------------------------------------------------------------------------
# MatMul


def _infer_matmul(call: Call):
    a, b = call.inputs
    dtype = _same_dtype(call, [a, b], _MATMUL_TYPES, stored_weights=True)
    return [tensor(dtype, matmul_shape(call, a.shape, b.shape))]


@op("MatMul", infer=_infer_matmul, inputs=(2, 2))
def matmul(call: Call):
    """numpy.matmul(A, B): 1-D operands are promoted to matrices and the added dim removed; batch dims
    broadcast. Integers wrap."""
    a, b = call.inputs
    return [np.matmul(_wide(a), _wide(b)).astype(a.dtype, copy=False)]


# ---------------------------------------------------------------------------------------------------------------
# Einsum


def parse_einsum(call: Call, equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """Split an einsum equation into per-operand terms and the output term (explicit or implicit form).
    Ellipses become '.'; letters are case-sensitive."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        call.fail(f"Einsum equation '{equation}' has {len(terms)} operand terms but the node has "
                  f"{len(ranks)} inputs")
    parsed = []
    for i, term in enumerate(terms + ([rhs] if arrow else [])):
        if term.count("...") > 1 or term.replace("...", "").count(".") or \
                not all(ch.isascii() and ch.isalpha() for ch in term.replace("...", "")):
            call.bad_attr(f"Einsum term '{term}' in '{equation}' is malformed",
                          hint="use letters a-z, A-Z and at most one '...' per term")
        parsed.append(term.replace("...", "."))
    inputs, output = parsed[: len(terms)], parsed[len(terms):]
    for term, rank in zip(inputs, ranks):
        letters = len(term.replace(".", ""))
        if ("." in term and letters > rank) or ("." not in term and letters != rank):
            call.fail(f"Einsum term '{term.replace('.', '...')}' does not match an operand of rank {rank}")
    if output:
        out = output[0]
        if len(set(out)) != len(out):
            call.bad_attr(f"Einsum output term '{rhs}' repeats a label")
        used = set("".join(inputs))
        missing = sorted(set(out) - used - {"."})
        if missing:
            call.bad_attr(f"Einsum output labels {missing} appear in no input term")
        if "." in out and not any("." in t for t in inputs):
            call.bad_attr("Einsum output has '...' but no input does")
    else:
        counts = {}
        for ch in "".join(inputs).replace(".", ""):
            counts[ch] = counts.get(ch, 0) + 1
        out = ("." if any("." in t for t in inputs) else "") + "".join(
            sorted(ch for ch, n in counts.items() if n == 1))
    return inputs, out


def _einsum_shape(call: Call, terms: list[str], out: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    dims: dict[str, int] = {}
    ellipsis_shapes = []
    for term, shape in zip(terms, shapes):
        n_ell = len(shape) - len(term.replace(".", ""))
        pos = 0
        for ch in term:
            if ch == ".":
                ellipsis_shapes.append(shape[pos:pos + n_ell])
                pos += n_ell
                continue
            d = shape[pos]
            pos += 1
            if dims.get(ch, 1) != 1 and d != 1 and dims[ch] != d:
                call.fail(f"Einsum label '{ch}' has sizes {dims[ch]} and {d}")
            dims[ch] = d if ch not in dims or dims[ch] == 1 else dims[ch]
    try:
        ell = tuple(np.broadcast_shapes(*ellipsis_shapes)) if ellipsis_shapes else ()
    except ValueError:
        call.fail(f"Einsum '...' dimensions {[list(s) for s in ellipsis_shapes]} do not broadcast")
    shape = []
    for ch in out:
        shape.extend(ell if ch == "." else (dims[ch],))
    return tuple(shape)


def _infer_einsum(call: Call):
    dtype = _same_dtype(call, call.inputs, (DType.float32, DType.float16, DType.int8, DType.uint8, DType.int16,
                                            DType.int32, DType.int64))
    terms, out = parse_einsum(call, call.attrs["equation"], [t.rank for t in call.inputs])
    return [tensor(dtype, _einsum_shape(call, terms, out, [t.shape for t in call.inputs]))]


@op("Einsum", infer=_infer_einsum, inputs=(1, -1), attrs={"equation": AttrSpec("string")})
def einsum(call: Call):
    """Einstein summation given by `equation` (explicit 'ab,bc->ac' or implicit form, where the output holds
    the labels used once, sorted by ASCII code, after any '...'). Products are summed over absent labels."""
    terms, out = parse_einsum(call, call.attrs["equation"], [x.ndim for x in call.inputs])
    spec = ",".join(t.replace(".", "...") for t in terms) + "->" + out.replace(".", "...")
    dtype = call.inputs[0].dtype
    operands = [_wide(x) for x in call.inputs]
    y = np.einsum(spec, *operands, optimize=len(operands) > 1)
    return [np.asarray(y).astype(dtype, copy=False)]


# ---------------------------------------------------------------------------------------------------------------
# MatMulInteger and QLinearMatMul


def _zero_point_shape_ok(zp: TensorType, x: TensorType, per: str) -> bool:
    """Scalar, or per-row (A: [..., M, 1] or [M] for 2-D) / per-column (B: [..., 1, N] or [N] for 2-D)."""
    if zp.size == 1 and zp.rank <= 1:
        return True
    if x.rank < 2:
        return False
    if per == "row":
        if zp.rank == 1:
            return x.rank == 2 and zp.shape[0] == x.shape[0]
        return zp.rank == x.rank and zp.shape[-1] == 1 and zp.shape[-2] == x.shape[-2] \
            and all(z in (1, d) for z, d in zip(zp.shape[:-2], x.shape[:-2]))
    if zp.rank == 1:
        return x.rank == 2 and zp.shape[0] == x.shape[1]
    return zp.rank == x.rank and zp.shape[-2] == 1 and zp.shape[-1] == x.shape[-1] \
        and all(z in (1, d) for z, d in zip(zp.shape[:-2], x.shape[:-2]))


def _row_param(p: np.ndarray | None, a: np.ndarray):
    """A per-row scale/zero point as an array broadcasting against A (1-D [M] becomes [M, 1])."""
    if p is None:
        return None
    p = np.asarray(p)
    if p.size == 1 and p.ndim <= 1:
        return p.reshape(())
    return p.reshape(-1, 1) if p.ndim == 1 else p


def _col_param(p: np.ndarray | None):
    if p is None:
        return None
    p = np.asarray(p)
    return p.reshape(()) if p.size == 1 and p.ndim <= 1 else p


def _int_matmul(a: np.ndarray, a_zp, b: np.ndarray, b_zp) -> np.ndarray:
    """(A - a_zp) @ (B - b_zp) exactly, wrapped to int32. Uses a float64 BLAS matmul: every product of 8-bit
    differences is below 2^17, so sums are exact for K < 2^36."""
    da = a.astype(np.int32) if a_zp is None else a.astype(np.int32) - _row_param(a_zp, a).astype(np.int32)
    db = b.astype(np.int32) if b_zp is None else b.astype(np.int32) - _col_param(b_zp).astype(np.int32)
    acc = np.matmul(da.astype(np.float64), db.astype(np.float64))
    return acc.astype(np.int64).astype(np.int32)


def _check_int_operand(call: Call, t: TensorType, zp: TensorType | None, name: str, per: str) -> None:
    if t.dtype not in _INT8:
        call.fail(f"{call.op} input {name} is {t.dtype.name}", hint="it takes int8 or uint8")
    if zp is not None:
        if zp.dtype != t.dtype:
            call.fail(f"{name} zero point is {zp.dtype.name} but {name} is {t.dtype.name}",
                      hint="they must have the same type")
        if not _zero_point_shape_ok(zp, t, per):
            call.fail(f"{name} zero point/scale shape {list(zp.shape)} is neither a scalar nor per-{per} for "
                      f"{name} of shape {list(t.shape)}",
                      hint="per-row: [M] for 2-D A or [..., M, 1]; per-column: [N] for 2-D B or [..., 1, N]")


def _infer_matmul_integer(call: Call):
    a, b = call.inputs[0], call.inputs[1]
    _check_int_operand(call, a, call.input(2), "A", "row")
    _check_int_operand(call, b, call.input(3), "B", "column")
    return [tensor(DType.int32, matmul_shape(call, a.shape, b.shape))]


@op("MatMulInteger", infer=_infer_matmul_integer, inputs=(2, 4))
def matmul_integer(call: Call):
    """(A - a_zero_point) @ (B - b_zero_point) with numpy.matmul semantics, int32 result (wrapping). Zero
    points are scalars, per-row for A ([M] or [..., M, 1]) or per-column for B ([N] or [..., 1, N])."""
    a, b = call.inputs[0], call.inputs[1]
    return [_int_matmul(a, call.input(2), b, call.input(3))]


def _infer_qlinear_matmul(call: Call):
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = call.inputs
    _check_int_operand(call, a, a_zp, "a", "row")
    _check_int_operand(call, b, b_zp, "b", "column")
    for name, s, zp in (("a", a_s, a_zp), ("b", b_s, b_zp), ("y", y_s, y_zp)):
        if not s.dtype.is_float:
            call.fail(f"{name}_scale is {s.dtype.name}", hint="scales must be float32 or float16")
        if s.shape != zp.shape:
            call.fail(f"{name}_scale has shape {list(s.shape)} but {name}_zero_point has {list(zp.shape)}",
                      hint="scale and zero point must have the same shape")
    if len({a_s.dtype, b_s.dtype, y_s.dtype}) > 1:
        call.fail("QLinearMatMul scales have different dtypes", hint="give all scales the same float type")
    if y_zp.dtype not in _INT8:
        call.fail(f"y_zero_point is {y_zp.dtype.name}", hint="the output type must be int8 or uint8")
    shape = matmul_shape(call, a.shape, b.shape)
    if y_s.size != 1 or y_s.rank > 1:
        try:
            if tuple(np.broadcast_shapes(y_s.shape, shape)) != shape:
                raise ValueError
        except ValueError:
            call.fail(f"y_scale shape {list(y_s.shape)} does not broadcast to the output {list(shape)}",
                      hint="use a scalar output scale")
    return [tensor(y_zp.dtype, shape)]


@op("QLinearMatMul", infer=_infer_qlinear_matmul, inputs=(8, 8))
def qlinear_matmul(call: Call):
    """Quantised matmul: y = saturate(round_half_even((a - a_zp) @ (b - b_zp) * a_scale * b_scale / y_scale)
    + y_zp), typed as y_zero_point. Scales/zero points are per tensor, per row for a, per column for b."""
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = call.inputs
    acc = _int_matmul(a, a_zp, b, b_zp)
    multiplier = _row_param(a_s, a) * _col_param(b_s) / _col_param(y_s)
    return [requantize(acc, multiplier, _col_param(y_zp), y_zp.dtype)]


# ---------------------------------------------------------------------------------------------------------------
# Softmax and LogSoftmax


def _infer_softmax(call: Call):
    require_float(call)
    x = call.inputs[0]
    normalize_axis(call, call.attrs["axis"], x.rank)
    return [x]


def _shifted(call: Call):
    x = call.inputs[0]
    axis = call.attrs["axis"] + x.ndim if call.attrs["axis"] < 0 else call.attrs["axis"]
    w = _wide(x)
    with np.errstate(invalid="ignore"):
        return x.dtype, axis, w - np.max(w, axis=axis, keepdims=True)


@op("Softmax", infer=_infer_softmax, attrs={"axis": AttrSpec("int", -1)}, fp16_policy="fp32")
def softmax(call: Call):
    """exp(x) / sum(exp(x)) along `axis` (opset 13+: that single axis), computed as exp(x - max) for
    stability."""
    dtype, axis, s = _shifted(call)
    e = np.exp(s)
    return [(e / np.sum(e, axis=axis, keepdims=True)).astype(dtype, copy=False)]


@op("LogSoftmax", infer=_infer_softmax, attrs={"axis": AttrSpec("int", -1)}, fp16_policy="fp32")
def log_softmax(call: Call):
    """x - log(sum(exp(x))) along `axis` (opset 13+), computed as (x - max) - log(sum(exp(x - max)))."""
    dtype, axis, s = _shifted(call)
    with np.errstate(divide="ignore"):
        return [(s - np.log(np.sum(np.exp(s), axis=axis, keepdims=True))).astype(dtype, copy=False)]
