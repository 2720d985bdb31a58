"""convert-fp16: half-precision weights, or a whole graph in half precision (`--quantize fp16`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx.defs

from edgecc.errors import EdgeccError, PassError
from edgecc.ir.core import Graph, Module, Node, Value
from edgecc.ir.dtypes import DType
from edgecc.ops.apply import infer_node, opdef_of
from edgecc.ops.fused import BASE_OP
from edgecc.ops.registry import EDGECC_DOMAIN
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.prune import selected
from edgecc.passes.registry import register_pass

F16, F32 = DType.float16, DType.float32
HALF_MAX = float(np.finfo(np.float16).max)

STORED_WEIGHT_INPUTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("", "Conv"): (1, 2), ("", "ConvTranspose"): (1, 2), ("", "Gemm"): (1, 2), ("", "MatMul"): (1,),
    (EDGECC_DOMAIN, "FusedConv"): (1, 2), (EDGECC_DOMAIN, "FusedGemm"): (1, 2), (EDGECC_DOMAIN, "FusedMatMul"): (1, 2),
}
"""Ops whose inference accepts float16 weights with float32 data (ops.conv.stored_weight_ok), and which inputs are
their weights and biases."""


def fits_half(array: np.ndarray) -> bool:
    """Every finite value stays finite in float16 (|x| <= 65504); smaller values only lose precision."""
    finite = array[np.isfinite(array)]
    return finite.size == 0 or float(np.abs(finite).max()) <= HALF_MAX


@functools.lru_cache(maxsize=None)
def _schema_types(op: str) -> tuple[tuple[str, ...], bool, frozenset[str], frozenset[str]] | None:
    """From ONNX's schema of `op`: each formal input's type string, whether the last is variadic, the type strings
    of outputs that may be float16, and the input type strings that admit float16. None for ops ONNX lacks."""
    if not onnx.defs.has(op):
        return None
    schema = onnx.defs.get_schema(op)
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def half_ok(type_str: str) -> bool:
        return "tensor(float16)" in allowed.get(type_str, {type_str})

    inputs = tuple(f.type_str for f in schema.inputs)
    variadic = bool(schema.inputs) and schema.inputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
    half_outputs = frozenset(f.type_str for f in schema.outputs if half_ok(f.type_str))
    half_inputs = frozenset(t for t in inputs if half_ok(t))
    return inputs, variadic, half_outputs, half_inputs


def input_roles(node: Node) -> tuple[set[int], set[int]]:
    """(follow, half_ok): inputs of the data's element type (that of the node's float outputs, or that the first
    input shares with others: they take the node's precision), and inputs that may be float16 at all. Read from ONNX's
    type constraints (Resize's `scales` is tensor(float) only, Reshape's `shape` int64, Clip's bounds and Equal's
    operands follow the data, Cast's input keeps its type); edgecc's own fused ops take every input in one precision
    like the ONNX op at their core."""
    n = len(node.inputs)
    if node.domain == EDGECC_DOMAIN:
        everything = set(range(n)) if node.op in BASE_OP else set()
        return everything, everything
    types = _schema_types(node.op)
    if types is None:
        return set(), set()
    formal, variadic, half_outputs, half_inputs = types
    strs = [formal[min(i, len(formal) - 1)] if (i < len(formal) or variadic) else "" for i in range(n)]
    shared_first = strs and strs[0] in half_inputs and strs.count(strs[0]) > 1
    data = set(half_outputs) | ({strs[0]} if shared_first else set())
    return {i for i, t in enumerate(strs) if t in data}, {i for i, t in enumerate(strs) if t in half_inputs}


class _Retyper:
    """Values in the other precision, made once each: float16 copies of constants, Cast nodes for the rest.
    `original` holds every value's element type before the pass."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.original = {v._id: v.type.dtype for v in graph.values()}
        self.made: dict[tuple[int, DType], Value] = {}
        self.casts = 0

    def as_dtype(self, value: Value, dtype: DType, before: Node | None) -> Value:
        """`value` in `dtype` (a float type); a Cast is inserted before `before` (None: at the end)."""
        if value.type.dtype == dtype:
            return value
        key = (value._id, dtype)
        if key not in self.made:
            name = self.graph.unique_name(f"{value.name}_{dtype.short}")
            if value.is_const:
                self.made[key] = Value(name, const=value.const.astype(dtype.numpy))
            else:
                out = Value(name, value.type.with_dtype(dtype))
                self.graph.add_node(Node("Cast", [value], [out], {"to": dtype.onnx}, name=name), before=before)
                self.casts += 1
                self.made[key] = out
        return self.made[key]


def store_weights_in_half(graph: Graph, layers=None) -> tuple[int, int]:
    """Give every float32 weight and bias of a float32 Conv/ConvTranspose/Gemm/MatMul (and their fused forms) a
    float16 copy: the kernels widen it at load (F16C vcvtph2ps, AArch64 fcvtl). Returns (tensors, bytes saved).
    Weights that do not fit in half (|w| > 65504) stay float32. `layers` (node names), when given, limits it to
    those nodes: per-layer precision, as edgecc.budgets chooses it."""
    halves: dict[int, Value] = {}
    converted = saved = 0
    for node in selected(list(graph.nodes), layers):
        positions = STORED_WEIGHT_INPUTS.get((node.domain, node.op), ())
        if not positions or node.inputs[0].type.dtype != F32:
            continue
        for i in positions:
            value = node.input(i)
            if value is None or not value.is_const or value.type.dtype != F32 or not fits_half(value.const):
                continue
            if value._id not in halves:
                halves[value._id] = Value(graph.unique_name(f"{value.name}_f16"), const=value.const.astype(np.float16))
                converted += 1
                saved += value.const.nbytes // 2
            node.set_input(i, halves[value._id])
    return converted, saved


ATTEMPTS = {"fp16": ("fp16", "fp32", "original"), "fp32": ("fp32", "original")}
"""Precisions tried for a node, by its op's fp16_policy: data inputs in float16; data inputs back in float32
(other inputs staying float16 where the op allows); every input as it was before the pass."""


def _wanted_inputs(node: Node, retyper: _Retyper, follow: set[int], half_ok: set[int], attempt: str):
    """[(value, dtype) or None] for each input under `attempt` (see ATTEMPTS); None if a constant would have to
    become float16 and does not fit."""
    wanted = []
    for i, value in enumerate(node.inputs):
        if value is None:
            wanted.append(None)
            continue
        dtype = value.type.dtype
        if dtype.is_float:
            before = retyper.original[value._id]
            if attempt == "original":
                dtype = before
            elif i in follow:
                dtype = F16 if attempt == "fp16" and before == F32 else before
            elif not (dtype == F16 and i in half_ok):
                dtype = before
        if dtype == F16 and value.is_const and value.type.dtype == F32 and not fits_half(value.const):
            return None
        wanted.append((value, dtype))
    return wanted


def _types_if(node: Node, wanted: list):
    """The node's output types if its inputs had the `wanted` types (inferred on stand-in values)."""
    stand_ins = []
    for item in wanted:
        if item is None:
            stand_ins.append(None)
            continue
        value, dtype = item
        if value.is_const:
            stand_ins.append(Value(value.name, const=value.const.astype(dtype.numpy, copy=False)))
        else:
            stand_ins.append(Value(value.name, value.type.with_dtype(dtype)))
    outs = [Value(v.name) for v in node.outputs]
    return infer_node(Node(node.op, stand_ins, outs, node.attrs, node.name, node.domain))


def run_in_half(graph: Graph) -> dict[str, int]:
    """Run every node in float16 unless its op's fp16_policy says "fp32", a constant it reads does not fit in half,
    or its inference rejects half inputs: those get their float32 inputs back through Casts. Graph inputs and
    outputs keep their types (Casts at the edges)."""
    retyper = _Retyper(graph)
    half = kept = 0
    for node in list(graph.nodes):
        if not any(v is not None and v.type.dtype.is_float for v in [*node.inputs, *node.outputs]):
            continue
        follow, half_ok = input_roles(node)
        for attempt in ATTEMPTS[opdef_of(node).fp16_policy]:
            wanted = _wanted_inputs(node, retyper, follow, half_ok, attempt)
            if wanted is None:
                continue
            try:
                types = _types_if(node, wanted)
            except EdgeccError:  # the op does not take these types: try the next attempt
                continue
            for i, item in enumerate(wanted):
                if item is not None:
                    node.set_input(i, retyper.as_dtype(item[0], item[1], node))
            for value, t in zip(node.outputs, types):
                value.type = t
            if attempt == "fp16" and any(t.dtype == F16 for t in types):
                half += 1
            else:
                kept += 1
            break
        else:  # pragma: no cover - "original" reproduces the node as it was
            raise PassError(f"{node.label} no longer infers with its own input types", where="convert-fp16")
    for j, value in enumerate(graph.outputs):
        before = retyper.original.get(value._id, value.type.dtype)
        if value.type.dtype != before:
            graph.outputs[j] = retyper.as_dtype(value, before, None)
    return {"nodes-fp16": half, "nodes-fp32": kept, "casts-inserted": retyper.casts}


@register_pass
@dataclass(frozen=True)
class ConvertFp16Pass(Pass):
    """Store weights in float16; with compute=fp16 also run the graph in it.

    compute=fp32 (default): every float32 weight and bias of Conv, ConvTranspose, Gemm, MatMul and their fused
    forms becomes a float16 constant (half the bytes); those ops take it with float32 data and compute in float32,
    widening each weight at load. Other constants stay as they are.

    compute=fp16 (targets with half arithmetic, +fullfp16): graph inputs are cast to float16 and outputs back,
    float constants become float16, and every op runs in float16 except those whose registry entry says
    fp16_policy="fp32" (long sums, normalisations, Exp; see edgecc.ops.registry.FP16_POLICIES), which get Casts
    to and from float32 around them. Which inputs follow the data's precision comes from ONNX's type constraints.
    Weights of ops left in float32 are still stored in half.

    Requires: topologically-sorted, shapes-inferred. Keeps both.

    Example: `Conv(%x : f32, %w : f32)` becomes `Conv(%x : f32, %w_f16 : f16)`.
    """

    name = "convert-fp16"
    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    changes_numerics = True

    compute: str = "fp32"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        if self.compute not in ("fp32", "fp16"):
            raise PassError(f"convert-fp16 compute={self.compute} is not fp32 or fp16",
                            hint="compute=fp16 on targets with half arithmetic (+fullfp16), else compute=fp32")
        stats = run_in_half(module.graph) if self.compute == "fp16" else {}
        converted, saved = store_weights_in_half(module.graph)
        stats.update({"weights-fp16": converted, "bytes-saved": saved})
        return PassResult(bool(converted or stats.get("casts-inserted") or stats.get("nodes-fp16")), stats)
