"""lower-qdq: turn QuantizeLinear/DequantizeLinear (QDQ) patterns into the integer ops the int8 kernels run.

QDQ is how onnxruntime's quantize_static (quant_format=QDQ), PyTorch's export and edgecc's own quantize-int8 write
a quantised model: every op still computes in float between a DequantizeLinear (DQ) of its int8 inputs and a
QuantizeLinear (Q) of its result. This pass recognises the patterns whose float computation an integer op
reproduces and replaces them (all rules are rooted at the Q):

- `DQ(x) , DQ(w) [, DQ(b)] -> Conv [-> Relu|Clip] -> Q` becomes QLinearConv (any group);
- the same with Gemm (alpha = beta = 1, transA = 0, any transB), or MatMul with a 2-D constant B, optionally
  followed by `Add(DQ(int32 bias [N]))`, becomes edgecc.QGemm;
- `Q(DQ(x))` with identical parameters becomes x;
- `DQ -> MaxPool|Reshape|Flatten|Transpose|Squeeze|Unsqueeze|Identity|Concat|Slice -> Q` with identical parameters
  (a Concat input with other per-tensor parameters is first requantised by a 256-entry lookup, bit-exact)
  everywhere becomes the op on the integer data (their kernels copy bytes or, for MaxPool, compare integers);
- `DQ(a), DQ(b) -> Add|Mul [-> Relu|Clip] -> Q` becomes edgecc.QLinearAdd|QLinearMul (the activation folded as an integer clamp,
  which is exact for any output parameters because Q is monotone: Q(clip(v, lo, hi)) = clip(Q(v), Q(lo), Q(hi)));
- `DQ -> GlobalAveragePool -> Q` becomes edgecc.QLinearGlobalAveragePool;
- `DQ -> unary elementwise op -> Q` (HardSwish, Sigmoid, Tanh, LeakyRelu, Relu, Clip, Gelu, Exp, ..., or a binary
  op with a constant float32 scalar) becomes edgecc.QLookup: a 256-entry table Q(op(DQ(v))) computed now with the
  registry's references, so it is bit-exact to the float path.

Conditions (anything else stays float, which is always correct): x is int8/uint8 per tensor; w is an int8
constant (or a QuantizeLinear of a float constant, evaluated now) with zero point 0, per tensor or per output
channel; the Q is per tensor to int8/uint8; every intermediate result has this one reader.
Weights already in float (no DQ) are left alone: the pattern is gone, the op stays float.

Bias: a DQ of an int32 constant. When its scale is x_scale * w_scale (float32 product, as the integer ops
define the accumulator's unit) up to float rounding (relative 2^-20) and its zero point is 0, the integers are
used as they are. Otherwise the bias is requantised to the accumulator's unit now (round half to even): the
error is at most half a unit of x_scale * w_scale, far below one output step, and the same size as the rounding
any int32 bias already carries. A bias that does not fit int32 then leaves the pattern alone.

Activations fold only when exact: the output Q's saturation already implements them, i.e. Q(lo) <= qmin and
Q(hi) >= qmax of the output type (for Relu, lo = 0: the zero point is qmin). Otherwise the pattern stays.

QLinearAdd/Mul and QLinearGlobalAveragePool are defined as their QDQ computation; their kernels requantise in fixed
point and may land one step away at (or within float32 rounding of) a tie. QLookup is exact.

Results differ from the float path only as the integer op definitions imply: the accumulation is exact instead
of float32, and the requantisation multiplies by x_scale * w_scale / y_scale instead of dividing by y_scale, so a
value near a rounding tie may land one step away. Identity-like rewrites (Q(DQ(x)), data movement) are checked
to be exact on every value of the integer type.

Ordering: fold-constants would fold DQ(constant) into float weights and destroy the pattern, so this pass runs
before fold-constants and canonicalize (right after infer-shapes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from edgecc.ir.core import Graph, Module, Node, Value
from edgecc.ir.dtypes import DType
from edgecc.ops.apply import evaluate_node, infer_node
from edgecc.ops.qelementwise import lookup_table
from edgecc.ops.quant import quant_range, quantize
from edgecc.ops.registry import EDGECC_DOMAIN
from edgecc.ops.registry import get as get_op
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass
from edgecc.passes.rewrite import RewriteRule, apply_rules, const_of, remove_if_dead, single_reader

INT8_TYPES = (DType.int8, DType.uint8)

DATA_MOVEMENT = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                           "Concat", "Slice"})
"""Ops whose integer result is exactly the quantised float result when input and output share their parameters."""

SCALE_RTOL = 2.0 ** -20
"""Two float32 scales equal 'up to float rounding': a few ulps apart (products computed in another order)."""


@dataclass
class Quant:
    """The affine parameters of one DequantizeLinear or QuantizeLinear node, read from constants."""

    node: Node
    data: Value          # the integer side: DQ's input, Q's output
    dtype: DType
    scale: np.ndarray    # float32: shape () per tensor, [C] per axis
    zero_point: np.ndarray  # dtype's NumPy type, same shape as scale
    axis: int | None     # None per tensor

    @property
    def per_tensor(self) -> bool:
        return self.axis is None

    def same_as(self, other: "Quant") -> bool:
        """Same per-tensor scale, zero point and type (bit for bit)."""
        return (self.per_tensor and other.per_tensor and self.dtype == other.dtype
                and self.scale.tobytes() == other.scale.tobytes()
                and int(self.zero_point) == int(other.zero_point))

    def round_trips(self) -> bool:
        """Q(DQ(q)) == q for every q of the type, with the references' float32 arithmetic (so dropping a DQ -> Q
        pair, or moving integer data instead of float, is exact). Per tensor only."""
        lo, hi = quant_range(self.dtype.numpy)
        q = np.arange(lo, hi + 1, dtype=np.int64)
        real = (q - int(self.zero_point)).astype(np.float32) * self.scale
        back = quantize(real, self.scale, self.zero_point, self.dtype.numpy)
        return bool(self.scale > 0) and np.array_equal(back.astype(np.int64), q)


def _params(node: Node, data: Value, int_type: DType, rank: int) -> Quant | None:
    scale, zp = const_of(node.input(1)), const_of(node.input(2))
    if scale is None or scale.dtype != np.float32 or (node.input(2) is not None and zp is None):
        return None
    if node.attrs.get("block_size", 0) or int_type not in INT8_TYPES + (DType.int32,):
        return None
    zp = np.zeros(scale.shape, int_type.numpy) if zp is None else zp
    if scale.size == 1:
        return Quant(node, data, int_type, scale.reshape(()), zp.reshape(()), None)
    axis = node.attrs.get("axis", 1)
    return Quant(node, data, int_type, scale, zp, axis + rank if axis < 0 else axis)


def dequantized(value: Value | None) -> Quant | None:
    """The DequantizeLinear producing `value` (to float32), or None."""
    node = value.producer if value is not None else None
    if node is None or node.op != "DequantizeLinear" or node.domain or value.type.dtype != DType.float32:
        return None
    data = node.inputs[0]
    return _params(node, data, data.type.dtype, data.type.rank)


def quantizer(node: Node) -> Quant | None:
    """The parameters of a QuantizeLinear node reading float32, or None."""
    if node.op != "QuantizeLinear" or node.domain or node.inputs[0].type.dtype != DType.float32 \
            or node.attrs.get("precision", 0):  # a float16 division is not what the integer ops compute
        return None
    out = node.outputs[0]
    return _params(node, out, out.type.dtype, out.type.rank)


def output_quant(q: Node) -> Quant | str:
    """The parameters of the Q a pattern ends at, or why they do not suit an integer op's output."""
    y = quantizer(q)
    if y is None or not y.per_tensor or y.dtype not in INT8_TYPES or not y.scale > 0:
        return "the QuantizeLinear is not per tensor to int8/uint8 with constant parameters and a positive scale"
    return y


def constant_data(q: Quant) -> np.ndarray | None:
    """The integer constant a DQ reads: a constant, or a QuantizeLinear of constants evaluated now (PyTorch's
    fake-quantised weights)."""
    value = const_of(q.data)
    if value is not None:
        return value
    producer = q.data.producer
    if producer is not None and producer.op == "QuantizeLinear" and not producer.domain \
            and all(v is None or v.is_const for v in producer.inputs):
        return evaluate_node(producer, [const_of(v) for v in producer.inputs])[0]
    return None


def activation_is_exact(act: Node, y: Quant) -> bool:
    """Whether Q(act(v)) == Q(v) for every v: the activation's bounds saturate in the output type."""
    lo, hi = -np.inf, np.inf
    if act.op == "Relu":
        lo = 0.0
    else:  # Clip(x, min?, max?)
        bounds = [act.input(i) for i in (1, 2)]
        if any(b is not None and not b.is_const for b in bounds):
            return False
        if bounds[0] is not None:
            lo = float(bounds[0].const)
        if bounds[1] is not None:
            hi = float(bounds[1].const)
    qmin, qmax = quant_range(y.dtype.numpy)
    q_lo, q_hi = (int(quantize(np.float32(v), y.scale, y.zero_point, y.dtype.numpy)) for v in (lo, hi))
    return q_lo <= qmin and q_hi >= qmax


# -- Conv / Gemm / MatMul ------------------------------------------------------------------------------------

@dataclass
class LinearMatch:
    """A matched `DQ(x), DQ(w) [, DQ(b)] -> core [-> Add(bias)] [-> act] -> Q` pattern."""

    q: Node
    y: Quant
    core: Node
    x: Quant
    w: Quant
    weights: np.ndarray
    bias: np.ndarray | None      # int32 [N] in units of x_scale * w_scale
    bias_data: Value | None      # the int32 constant the bias DQ read
    chain: list[Node]  # the float nodes the rewrite replaces, output side first


def _weight_axis(core: Node) -> int:
    """The output-channel axis of the core op's weights."""
    if core.op == "Gemm":
        return 0 if core.attrs.get("transB", 0) else 1
    return 1 if core.op == "MatMul" else 0


def _bias(value: Value, acc_scale: np.ndarray, channels: int) -> np.ndarray | str:
    """The int32 bias in units of acc_scale (x_scale * w_scale), or why it cannot be one."""
    b = dequantized(value)
    if b is None:
        return "the bias is not a DequantizeLinear of constants"
    data = constant_data(b)
    if data is None or b.dtype != DType.int32:
        return "the bias is not a constant int32 tensor"
    per_channel_ok = b.per_tensor or b.axis == data.ndim - 1
    if data.size != channels or (data.ndim > 1 and data.shape[-1] != channels) or not per_channel_ok:
        return f"the bias has shape {list(data.shape)}, not one value per output channel ({channels})"
    data = data.reshape(-1).astype(np.int64)
    b_scale = np.broadcast_to(b.scale.reshape(-1), (channels,))
    b_zp = np.broadcast_to(b.zero_point.reshape(-1).astype(np.int64), (channels,))
    target = np.broadcast_to(acc_scale.reshape(-1), (channels,))
    if not b_zp.any() and np.allclose(b_scale, target, rtol=SCALE_RTOL, atol=0.0):
        return data.astype(np.int32)
    real = (data - b_zp).astype(np.float32) * b_scale  # what the DQ gives the float op
    requantised = np.rint(real.astype(np.float64) / target.astype(np.float64))
    lo, hi = quant_range(np.int32)
    if not np.all(np.isfinite(requantised)) or requantised.min() < lo or requantised.max() > hi:
        return "the bias, requantised to x_scale * w_scale, does not fit int32"
    return requantised.astype(np.int32)


def _core_checks(core: Node) -> str | None:
    if core.domain:
        return f"{core.op} is not an ONNX op"
    if core.op == "Gemm":
        attrs = core.attrs
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return "Gemm has transA, alpha or beta set"
    if core.op == "MatMul" and core.inputs[0].type.rank < 2:
        return "MatMul of a 1-D A"
    return None


def match_linear(q: Node, graph: Graph) -> LinearMatch | str:
    """Match the quantised Conv/Gemm/MatMul pattern ending at Q, or say why not."""
    y = output_quant(q)
    if isinstance(y, str):
        return y
    chain: list[Node] = []
    value = q.inputs[0]
    producer = value.producer
    if producer is not None and producer.op in ("Relu", "Clip") and not producer.domain:
        if not single_reader(graph, value):
            return f"the {producer.op} result has other readers"
        if not activation_is_exact(producer, y):
            return f"the {producer.op} is not implied by the output range (it would change results)"
        chain.append(producer)
        value = producer.inputs[0]
        producer = value.producer
    bias_value = None
    if producer is not None and producer.op == "Add" and not producer.domain:
        if not single_reader(graph, value):
            return "the Add result has other readers"
        for i in (0, 1):
            mm = producer.inputs[i].producer
            other = producer.inputs[1 - i]
            if mm is not None and mm.op == "MatMul" and dequantized(other) is not None \
                    and other.type.rank <= producer.inputs[i].type.rank:  # the bias does not add dimensions
                chain.append(producer)
                bias_value, value, producer = producer.inputs[1 - i], producer.inputs[i], mm
                break
        else:
            return "the Add is not a MatMul plus a dequantised bias"
    if producer is None or producer.op not in ("Conv", "Gemm", "MatMul"):
        return "the quantised value is not computed by Conv, Gemm or MatMul"
    core = producer
    if not single_reader(graph, value):
        return f"the {core.op} result has other readers"
    reason = _core_checks(core)
    if reason:
        return reason
    chain.append(core)
    x, w = dequantized(core.inputs[0]), dequantized(core.inputs[1])
    if x is None or not x.per_tensor or x.dtype not in INT8_TYPES:
        return "the data input is not a per-tensor DequantizeLinear of int8/uint8"
    weights = constant_data(w) if w is not None else None
    if weights is None or w.dtype != DType.int8:
        return "the weights are not a DequantizeLinear of a constant int8 tensor"
    if core.op == "MatMul" and weights.ndim != 2:
        return "MatMul weights are not 2-D"
    axis = _weight_axis(core)
    if not w.per_tensor and w.axis != axis:
        return f"the weights are quantised along axis {w.axis}, not the output-channel axis {axis}"
    if w.zero_point.any():
        return "the weights have a non-zero zero point"
    channels = weights.shape[axis]
    if core.op != "MatMul":
        bias_value = core.input(2)
    bias = bias_data = None
    if bias_value is not None:
        bias = _bias(bias_value, np.float32(x.scale) * w.scale, channels)
        if isinstance(bias, str):
            return bias
        bias_data = bias_value.producer.inputs[0]
    return LinearMatch(q, y, core, x, w, weights, bias, bias_data, chain)


def _constant(graph: Graph, original: Value | None, array, dtype, name: str, shaped: bool = False) -> Value:
    """A constant input for the integer op: per tensor as a scalar, per channel as a vector (`shaped`: as it is,
    for weights and biases, whose shape the op checks even with one element); the original constant value when it
    already is exactly that (so the model's initializers are not duplicated)."""
    array = np.asarray(array, dtype)
    if not shaped:
        array = array.reshape(()) if array.size == 1 else array.reshape(-1) if array.ndim <= 1 else array
    old = const_of(original)
    if old is not None and old.dtype == array.dtype and old.shape == array.shape and np.array_equal(old, array):
        return original
    return graph.constant(array, name)


def _uniform_as_scalar(array: np.ndarray) -> np.ndarray:
    """One value when every channel has the same (symmetric weights' zero points: one byte, not one per channel)."""
    flat = np.asarray(array).reshape(-1)
    return flat[:1] if flat.size and (flat == flat[0]).all() else array


def replace_q(graph: Graph, q: Node, op: str, inputs: list[Value | None], attrs: dict, name: str,
              domain: str = "") -> Node:
    """Put `op(inputs)` where the Q node is, producing the Q's own output value (name, readers, graph outputs)."""
    out = q.outputs[0]
    new = Node(op, inputs, [out], attrs, name=name, domain=domain)
    graph.add_node(new, before=q)
    graph.remove_node(q)
    out.type = infer_node(new)[0]
    return new


def remove_dead(graph: Graph, nodes: list[Node]) -> None:
    """Remove each node of `nodes` (output side first) and then their DQ/Q producers, once nothing reads them."""
    for node in nodes:
        if node in graph.nodes:
            producers = [v.producer for v in node.inputs if v is not None and v.producer is not None]
            remove_if_dead(graph, node)
            if node not in graph.nodes:
                remove_dead(graph, [p for p in producers if p.op in ("DequantizeLinear", "QuantizeLinear")])


class MatchingRule(RewriteRule):
    """A rule whose check is its matcher: `match` gives what the rewrite needs, or a string saying why not."""

    roots = ("QuantizeLinear",)

    def match(self, node: Node, graph: Graph):
        raise NotImplementedError

    def check(self, node: Node, graph: Graph):
        found = self.match(node, graph)
        return found if isinstance(found, str) else None


class LowerQuantisedLinear(MatchingRule):
    """Conv -> QLinearConv; Gemm / MatMul (+ bias Add) -> edgecc.QGemm."""

    name = "lower-qdq-linear"
    match = staticmethod(match_linear)

    def rewrite(self, node: Node, graph: Graph):
        m = self.match(node, graph)
        base = m.core.name or m.core.op
        x, w, y = m.x, m.w, m.y
        x_s = _constant(graph, x.node.input(1), x.scale, np.float32, f"{base}_x_scale")
        x_zp = _constant(graph, x.node.input(2), x.zero_point, x.dtype.numpy, f"{base}_x_zero_point")
        w_s = _constant(graph, w.node.input(1), w.scale, np.float32, f"{base}_w_scale")
        w_zp = _constant(graph, w.node.input(2), _uniform_as_scalar(w.zero_point), np.int8, f"{base}_w_zero_point")
        y_s = _constant(graph, y.node.input(1), y.scale, np.float32, f"{base}_y_scale")
        y_zp = _constant(graph, y.node.input(2), y.zero_point, y.dtype.numpy, f"{base}_y_zero_point")
        weights = _constant(graph, w.data, m.weights, np.int8, f"{base}_wq", shaped=True)
        inputs = [x.data, x_s, x_zp, weights, w_s, w_zp, y_s, y_zp]
        if m.bias is not None:
            inputs.append(_constant(graph, m.bias_data, m.bias, np.int32, f"{base}_bq", shaped=True))
        if m.core.op == "Conv":
            replace_q(graph, node, "QLinearConv", inputs, dict(m.core.attrs), m.core.name)
        else:
            attrs = {"transB": int(m.core.attrs.get("transB", 0))} if m.core.op == "Gemm" else {}
            replace_q(graph, node, "QGemm", inputs, attrs, m.core.name, domain=EDGECC_DOMAIN)
        remove_dead(graph, m.chain)


# -- identity-like patterns -------------------------------------------------------------------------------------

class DropQuantDequant(RewriteRule):
    """Q(DQ(x)) with the same per-tensor parameters is x (checked exact on every value of the type)."""

    name, roots = "lower-qdq-drop-pair", ("QuantizeLinear",)

    def check(self, node: Node, graph: Graph):
        y, x = quantizer(node), dequantized(node.inputs[0])
        if y is None or x is None:
            return "not a DequantizeLinear -> QuantizeLinear pair with constant parameters"
        if not x.same_as(y) or y.dtype not in INT8_TYPES:
            return "the two have different parameters or are not per tensor"
        if not y.round_trips():
            return "Q(DQ(q)) != q for some q (degenerate scale)"
        return None

    def rewrite(self, node: Node, graph: Graph):
        dq = node.inputs[0].producer
        graph.replace_all_uses(node.outputs[0], dq.inputs[0])
        remove_dead(graph, [node])


def match_movement(q: Node, graph: Graph) -> tuple[Node, list[Quant]] | str:
    """DQ -> data-movement op -> Q, all per tensor with one set of parameters (for MaxPool: a positive scale,
    so the order of integers is the order of reals)."""
    y = output_quant(q)
    if isinstance(y, str):
        return y
    op = q.inputs[0].producer
    if op is None or op.op not in DATA_MOVEMENT or op.domain:
        return "the quantised value is not computed by a data-movement op"
    if not single_reader(graph, q.inputs[0]) or any(v.uses or graph.is_output(v) for v in op.outputs[1:]):
        return f"the {op.op} results have other readers"
    data = op.inputs if op.op == "Concat" else op.inputs[:1]
    sources = [dequantized(v) for v in data]
    if op.op == "Concat" and all(s is not None and s.per_tensor and s.dtype == y.dtype for s in sources):
        pass  # inputs with other parameters are requantised to the output's by a lookup table (rewrite)
    elif any(s is None or not s.same_as(y) for s in sources):
        return f"the {op.op} inputs are not dequantised with the output's parameters"
    if not y.round_trips():
        return "Q(DQ(q)) != q for some q (degenerate scale)"
    return op, sources


def _requantised(graph: Graph, source: Quant, y: Quant, before: Node) -> Value:
    """source's integers in y's parameters: Q_y(DQ_source(v)) as a 256-entry lookup (what a Concat input
    quantised with its own range and read back through DQ -> Concat -> Q gives, bit for bit)."""
    base = f"{before.name or 'concat'}_{source.data.name}_requantised"
    table = lookup_table("Identity", {}, [], source.scale, source.zero_point, y.scale, y.zero_point)
    inputs = [source.data, graph.constant(table, f"{base}_table"),
              *_quant_inputs(graph, [(source, "x"), (y, "y")], base)]
    out = Value(graph.unique_name(base))
    node = Node("QLookup", inputs, [out], {"op": "Identity", "op_attrs": "{}", "op_inputs": "[]"}, name=base,
                domain=EDGECC_DOMAIN)
    graph.add_node(node, before=before)
    out.type = infer_node(node)[0]
    return out


class LowerDataMovement(MatchingRule):
    """Run MaxPool/Reshape/Transpose/Concat/... on the integer data instead of dequantised floats."""

    name = "lower-qdq-movement"
    match = staticmethod(match_movement)

    def rewrite(self, node: Node, graph: Graph):
        op, sources = self.match(node, graph)
        count = len(sources)
        y = output_quant(node)
        inputs = [s.data if s.same_as(y) else _requantised(graph, s, y, op) for s in sources] + list(op.inputs[count:])
        replace_q(graph, node, op.op, inputs, dict(op.attrs), op.name)
        remove_dead(graph, [op])


# -- integer elementwise ops: Add, lookup tables, GlobalAveragePool ---------------------------------------------

def _per_tensor_8bit(value: Value) -> Quant | None:
    """The per-tensor int8/uint8 DequantizeLinear producing `value` with a finite positive scale, or None."""
    x = dequantized(value)
    if x is None or not x.per_tensor or x.dtype not in INT8_TYPES or not (np.isfinite(x.scale) and x.scale > 0):
        return None
    return x


def _clamp(act: Node) -> tuple[str, list[float]] | None:
    """A Relu, or a Clip with constant (or absent) bounds, as QLinearAdd's activation attributes; else None."""
    if act.op == "Relu":
        return "Relu", []
    bounds = [act.input(i) for i in (1, 2)]
    if any(b is not None and (not b.is_const or b.type.size != 1) for b in bounds):
        return None
    lo, hi = (float(np.asarray(b.const).reshape(())) if b is not None else default
              for b, default in zip(bounds, (-np.inf, np.inf)))
    return "Clip", [lo, hi]


@dataclass
class AddMatch:
    add: Node
    a: Quant
    b: Quant
    y: Quant
    activation: tuple[str, list[float]] | None
    chain: list[Node]


def match_add(q: Node, graph: Graph) -> AddMatch | str:
    """`DQ(a), DQ(b) -> Add|Mul [-> Relu|Clip] -> Q`, all per tensor 8-bit."""
    y = output_quant(q)
    if isinstance(y, str):
        return y
    value, chain, activation = q.inputs[0], [], None
    producer = value.producer
    if producer is not None and producer.op in ("Relu", "Clip") and not producer.domain:
        activation = _clamp(producer)
        if activation is None or not single_reader(graph, value):
            return f"the {producer.op} has runtime bounds or other readers"
        chain.append(producer)
        value, producer = producer.inputs[0], producer.inputs[0].producer
    if producer is None or producer.op not in ("Add", "Mul") or producer.domain:
        return "the quantised value is not computed by Add or Mul"
    if not single_reader(graph, value):
        return f"the {producer.op} result has other readers"
    a, b = (_per_tensor_8bit(v) for v in producer.inputs)
    if a is None or b is None:
        return f"the {producer.op} inputs are not both per-tensor DequantizeLinear of int8/uint8"
    return AddMatch(producer, a, b, y, activation, chain + [producer])


def match_lookup(q: Node, graph: Graph) -> tuple[Node, Quant, Quant, list] | str:
    """`DQ(x) -> elementwise op -> Q`, per tensor 8-bit, where every other input of the op is a constant float32
    scalar (so each output element is a function of the same element of x alone)."""
    y = output_quant(q)
    if isinstance(y, str):
        return y
    node = q.inputs[0].producer
    opdef = get_op(node.op, node.domain) if node is not None else None
    if opdef is None or opdef.kind != "elementwise" or node.domain:
        return "the quantised value is not computed by an elementwise op"
    x = _per_tensor_8bit(node.inputs[0])
    if x is None:
        return f"the {node.op} input is not a per-tensor DequantizeLinear of int8/uint8"
    if not single_reader(graph, q.inputs[0]) or any(v.uses or graph.is_output(v) for v in node.outputs[1:]):
        return f"the {node.op} results have other readers"
    out = node.outputs[0].type
    if out.dtype != DType.float32 or out.shape != node.inputs[0].type.shape:
        return f"the {node.op} result is not float32 of its input's shape"
    extra = []
    for v in node.inputs[1:]:
        if v is not None and (not v.is_const or v.type.size != 1 or v.type.dtype != DType.float32):
            return f"the {node.op} has an input that is not a constant float32 scalar"
        extra.append(None if v is None else float(np.asarray(v.const).reshape(())))
    return node, x, y, extra


def match_gap(q: Node, graph: Graph) -> tuple[Node, Quant, Quant] | str:
    """`DQ(x) -> GlobalAveragePool -> Q`, per tensor 8-bit."""
    y = output_quant(q)
    if isinstance(y, str):
        return y
    node = q.inputs[0].producer
    if node is None or node.op != "GlobalAveragePool" or node.domain:
        return "the quantised value is not computed by GlobalAveragePool"
    x = _per_tensor_8bit(node.inputs[0])
    if x is None:
        return "the GlobalAveragePool input is not a per-tensor DequantizeLinear of int8/uint8"
    if not single_reader(graph, q.inputs[0]):
        return "the GlobalAveragePool result has other readers"
    return node, x, y


def _quant_inputs(graph: Graph, quants: list[tuple[Quant, str]], base: str) -> list[Value]:
    """[scale, zero point] of each (Quant, prefix) as constants, reusing the model's own where they fit."""
    inputs = []
    for qp, prefix in quants:
        inputs.append(_constant(graph, qp.node.input(1), qp.scale, np.float32, f"{base}_{prefix}_scale"))
        inputs.append(_constant(graph, qp.node.input(2), qp.zero_point, qp.dtype.numpy, f"{base}_{prefix}_zero_point"))
    return inputs


class LowerQuantisedAdd(MatchingRule):
    """Add / Mul (+ Relu/Clip) -> edgecc.QLinearAdd / edgecc.QLinearMul."""

    name = "lower-qdq-add"
    match = staticmethod(match_add)

    def rewrite(self, node: Node, graph: Graph):
        m = self.match(node, graph)
        base = m.add.name or "add"
        a_p, b_p, y_p = (_quant_inputs(graph, [(qp, p)], base) for qp, p in ((m.a, "a"), (m.b, "b"), (m.y, "y")))
        attrs = {}
        if m.activation is not None:
            attrs["activation"] = m.activation[0]
            if m.activation[1]:
                attrs["activation_params"] = m.activation[1]
        replace_q(graph, node, f"QLinear{m.add.op}", [m.a.data, *a_p, m.b.data, *b_p, *y_p], attrs, m.add.name,
                  domain=EDGECC_DOMAIN)
        remove_dead(graph, m.chain)


class LowerLookup(MatchingRule):
    """A unary elementwise op between DQ and Q -> edgecc.QLookup with its table computed now."""

    name = "lower-qdq-lookup"
    match = staticmethod(match_lookup)

    def rewrite(self, node: Node, graph: Graph):
        op, x, y, extra = self.match(node, graph)
        base = op.name or op.op.lower()
        attrs = {k: _jsonable(v) for k, v in op.attrs.items()}
        table = lookup_table(op.op, attrs, [None if e is None else np.float32(e) for e in extra],
                             x.scale, x.zero_point, y.scale, y.zero_point)
        new_attrs = {"op": op.op, "op_attrs": json.dumps(attrs, sort_keys=True), "op_inputs": json.dumps(extra)}
        inputs = [x.data, graph.constant(table, f"{base}_table"), *_quant_inputs(graph, [(x, "x"), (y, "y")], base)]
        replace_q(graph, node, "QLookup", inputs, new_attrs, op.name, domain=EDGECC_DOMAIN)
        remove_dead(graph, [op])


def _jsonable(value):
    """An attribute value as plain Python (JSON) data."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class LowerGlobalAveragePool(MatchingRule):
    """GlobalAveragePool -> edgecc.QLinearGlobalAveragePool."""

    name = "lower-qdq-gap"
    match = staticmethod(match_gap)

    def rewrite(self, node: Node, graph: Graph):
        op, x, y = self.match(node, graph)
        inputs = [x.data, *_quant_inputs(graph, [(x, "x"), (y, "y")], op.name or "gap")]
        replace_q(graph, node, "QLinearGlobalAveragePool", inputs, {}, op.name, domain=EDGECC_DOMAIN)
        remove_dead(graph, [op])


@register_pass
@dataclass(frozen=True)
class LowerQdqPass(Pass):
    """Lower QuantizeLinear/DequantizeLinear patterns to integer ops (QLinearConv, edgecc.QGemm, integer data
    movement, edgecc.QLinearAdd/QLinearMul, edgecc.QLinearGlobalAveragePool, edgecc.QLookup for unary elementwise ops) and
    drop redundant Q(DQ(x)) pairs.

    A Relu/Clip between the op and its Q folds only when exact: the Q's saturation implies it (Q(lo) <= qmin and
    Q(hi) >= qmax of the output type; for Relu, the zero point is qmin); otherwise the pattern stays float.
    A bias DQ whose scale is not x_scale * w_scale is requantised to int32 at compile time (error at most half an
    accumulator unit). Anything not matched keeps its correct float DQ -> op -> Q path. Run it before
    fold-constants/canonicalize, which would fold DQ(constant weights) into floats.

    Requires: topologically-sorted, shapes-inferred. Keeps both.

    Example: `DQ(xq) , DQ(wq) , DQ(bq) -> Conv -> Relu -> Q` becomes `QLinearConv(xq, .., wq, .., bq)`.
    """

    name = "lower-qdq"
    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        rules = [LowerQuantisedLinear(), DropQuantDequant(), LowerDataMovement(), LowerQuantisedAdd(),
                 LowerGlobalAveragePool(), LowerLookup()]
        fired = apply_rules(module.graph, rules, ctx)
        stats = {"ops-lowered": fired.get(rules[0].name, 0), "pairs-dropped": fired.get(rules[1].name, 0),
                 "movement-lowered": fired.get(rules[2].name, 0), "adds-lowered": fired.get(rules[3].name, 0),
                 "pools-lowered": fired.get(rules[4].name, 0), "lookups-made": fired.get(rules[5].name, 0)}
        return PassResult(bool(fired), stats)
