"""quantize-int8: post-training int8 quantisation, written as QuantizeLinear/DequantizeLinear (QDQ) pairs.

The pass only annotates: it puts Q -> DQ pairs on the activations that Conv, Gemm and MatMul (with constant
weights) read and produce, replaces their weights by DequantizeLinear of int8 constants and their bias by
DequantizeLinear of an int32 constant. The graph still computes in float, exactly as onnxruntime's QDQ format
does, so it can be exported and checked there; `lower-qdq` then turns each QDQ pattern into an integer op
(QLinearConv, edgecc.QGemm), the same road a model quantised elsewhere takes.

Choices (the ones onnxruntime's quantize_static makes, so the two can be compared):
- weights: symmetric int8 per output channel, scale = max|w| / 127 (zero channels get scale 1), zero point 0;
- activations: uint8, asymmetric, per tensor, from the calibration range (extended to include 0);
- bias: int32 in units of x_scale * w_scale, zero point 0;
- a Relu or Clip that alone reads the op's result is folded into the output range: the Q goes after it, its
  range is the activation's (lo = 0 gives zero point 0, so the uint8 clamp is the Relu);
- data-movement ops (MaxPool, Reshape, Transpose...) keep their input's range, so lower-qdq can run them on the
  uint8 data directly.

Ranges come from calibration (`PassContext.calibration_ranges`, {value name: (lo, hi)}), collected on this
same module just before the pass (edgecc.calibration.collect_ranges); `needed_ranges` names the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.errors import PassError
from edgecc.ir.core import Graph, Module, Node, Value
from edgecc.ir.dtypes import DType
from edgecc.ops.apply import infer_node
from edgecc.ops.registry import get as get_op
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass
from edgecc.passes.rewrite import const_of, single_reader

RANGE_PRESERVING = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                              "Slice"})
"""Ops whose output values are a selection of their input's: the output is quantised like the input, so lower-qdq
runs them on the integer data."""

FOLDED_ACTIVATIONS = frozenset({"Relu", "Clip"})


def _float_data(value: Value | None) -> bool:
    return value is not None and not value.is_const and value.type is not None and value.type.dtype == DType.float32


def quantisable(node: Node, keep: frozenset[str] = frozenset()) -> bool:
    """Conv, Gemm (no transA, alpha = beta = 1, vector bias) or 2-D-weight MatMul with float32 data and constant
    float32 weights (and bias)."""
    if node.name in keep or node.op not in ("Conv", "Gemm", "MatMul") or node.domain:
        return False
    weights = const_of(node.input(1))
    if not _float_data(node.input(0)):
        return False
    if weights is None or weights.dtype != np.float32:
        return False
    bias = node.input(2)
    if bias is not None and (const_of(bias) is None or const_of(bias).dtype != np.float32):
        return False
    if node.op == "Gemm":
        attrs = node.attrs
        n = weights.shape[0] if attrs.get("transB", 0) else weights.shape[1]
        return (not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
                and (bias is None or const_of(bias).size == n))
    if node.op == "MatMul":
        return weights.ndim == 2
    return True


def bias_add(graph: Graph, node: Node) -> tuple[Node, int] | None:
    """(Add, index of its constant) when a MatMul's lone reader adds a constant float32 vector over the output's
    last axis: its bias, which becomes QGemm's int32 C."""
    out = node.outputs[0]
    if node.op != "MatMul" or not single_reader(graph, out):
        return None
    add, index = out.uses[0]
    other = add.input(1 - index) if add.op == "Add" and not add.domain and len(add.inputs) == 2 else None
    n = out.type.shape[-1]
    if other is None or not other.is_const or other.const.dtype != np.float32 or other.const.size != n \
            or other.const.shape[-1:] != (n,) or add.outputs[0].type.shape != out.type.shape:
        return None
    return add, 1 - index


def quant_point(graph: Graph, node: Node) -> Value:
    """The value whose range the node's output is quantised with: a lone Relu/Clip reader's result (folded), or
    the node's own result; for a MatMul with a bias Add, the same after the Add."""
    if (bias := bias_add(graph, node)) is not None:
        node = bias[0]
    out = node.outputs[0]
    if single_reader(graph, out):
        reader = out.uses[0][0]
        if reader.op in FOLDED_ACTIVATIONS and not reader.domain and all(
                v is None or v.is_const for v in reader.inputs[1:]):
            return reader.outputs[0]
    return out


def is_qdq_pair(value: Value) -> bool:
    """True if `value` is DQ(Q(v)), a pair this pass inserted."""
    producer = value.producer
    return producer is not None and producer.op == "DequantizeLinear" and producer.inputs[0].producer is not None \
        and producer.inputs[0].producer.op == "QuantizeLinear"


def range_source(value: Value) -> Value:
    """The value a range is measured on: through range-preserving ops back to where the data was computed."""
    while value.producer is not None and not value.producer.domain:
        producer = value.producer
        if producer.op in RANGE_PRESERVING:
            value = producer.inputs[0]
        elif is_qdq_pair(value):
            value = producer.inputs[0].producer.inputs[0]
        else:
            break
    return value


def integer_binary(node: Node) -> bool:
    """Add/Mul of two float32 tensors: lower-qdq makes them edgecc.QLinearAdd/QLinearMul."""
    return node.op in ("Add", "Mul") and not node.domain and all(_float_data(v) for v in node.inputs)


def integer_unary(node: Node) -> bool:
    """GlobalAveragePool, or an elementwise op of one float32 tensor (other inputs constant scalars) that keeps its
    shape: lower-qdq makes them edgecc.QLinearGlobalAveragePool / a 256-entry edgecc.QLookup."""
    if node.domain or not _float_data(node.input(0)) or len(node.outputs) != 1:
        return False
    if node.op == "GlobalAveragePool":
        return True
    opdef = get_op(node.op)
    return opdef is not None and opdef.kind == "elementwise" and node.op not in ("Add", "Mul") \
        and node.outputs[0].type.shape == node.inputs[0].type.shape \
        and all(v is None or (v.is_const and v.const.size == 1) for v in node.inputs[1:])


def _float_concat(node: Node) -> bool:
    return node.op == "Concat" and not node.domain and all(_float_data(v) for v in node.inputs)


def needed_ranges(module: Module, keep: frozenset[str] = frozenset()) -> list[str]:
    """Names of the values whose calibration range quantize-int8 will read."""
    graph = module.graph
    names: dict[str, None] = {}
    for node in graph.nodes:
        if quantisable(node, keep):
            names[range_source(node.inputs[0]).name] = None
            names[range_source(quant_point(graph, node)).name] = None
        elif _float_concat(node):
            for value in node.inputs + node.outputs:
                names[range_source(value).name] = None
        elif integer_binary(node):
            for value in node.inputs + [quant_point(graph, node)]:
                names[range_source(value).name] = None
        elif integer_unary(node):
            names[range_source(node.outputs[0]).name] = None
    return list(names)


def activation_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """uint8 asymmetric scale and zero point for [lo, hi] (onnxruntime's rule, via edgecc.calibration)."""
    from edgecc.calibration import quant_params

    scale, zero_point = quant_params(lo, hi, np.uint8, symmetric=False)
    return np.float32(scale), np.uint8(zero_point)


def weight_params(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along `axis`: (int8 weights, float32 scales). An all-zero channel gets scale 1."""
    other = tuple(i for i in range(weights.ndim) if i != axis)
    absmax = np.max(np.abs(weights.astype(np.float64)), axis=other) if other else np.abs(weights.astype(np.float64))
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    shape = [1] * weights.ndim
    shape[axis] = -1
    q = np.clip(np.rint(weights.astype(np.float64) / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


class _Inserter:
    """Adds Q/DQ nodes to a graph, sharing one Q -> DQ per quantised activation."""

    def __init__(self, graph: Graph, ranges: dict[str, tuple[float, float]]):
        self.graph = graph
        self.ranges = ranges
        self._dq_of: dict[int, Value] = {}  # float value id -> its DQ(Q(value))
        self.count = 0

    def _node(self, op: str, inputs: list, name: str, before: Node | None, attrs: dict | None = None) -> Value:
        out = Value(self.graph.unique_name(name))
        node = Node(op, inputs, [out], attrs or {}, name=out.name)
        self.graph.add_node(node, before=before)
        out.type = infer_node(node)[0]
        self.count += 1
        return out

    def params(self, value: Value) -> tuple[np.float32, np.uint8]:
        source = range_source(value)
        if source.name not in self.ranges:
            raise PassError(f"no calibration range for value '{source.name}'",
                            hint="collect ranges with edgecc.calibration.collect_ranges(module, samples, "
                                 "needed_ranges(module)) on this module")
        lo, hi = self.ranges[source.name]
        return activation_params(lo, hi)

    def _after_producer(self, value: Value) -> Node | None:
        """Where a value's Q/DQ go: right after its producer (first for graph inputs), so every reader, earlier or
        later than the quantised one, comes after the DQ; None means at the end."""
        nodes = self.graph.nodes
        if value.producer is None:
            return nodes[0] if nodes else None
        after = nodes.index(value.producer) + 1
        return nodes[after] if after < len(nodes) else None

    def dequantised(self, value: Value) -> Value:
        """DQ(Q(value)), shared: every reader of the value, and the graph output, reads the DQ (as in onnxruntime's
        QDQ models): one precision per tensor, and integer readers downstream (a residual Add) see quantised
        operands."""
        if value.producer is not None and value.producer.op == "DequantizeLinear":
            return value
        if value._id not in self._dq_of:
            scale, zero_point = self.params(value)
            s, z = self.graph.constant(scale, "scale"), self.graph.constant(zero_point, "zero_point")
            readers = list(value.uses)
            was_output = [i for i, v in enumerate(self.graph.outputs) if v is value]
            before = self._after_producer(value)
            q = self._node("QuantizeLinear", [value, s, z], f"{value.name}_q", before)
            dq = self._node("DequantizeLinear", [q, s, z], f"{value.name}_dq", before)
            for reader, index in readers:
                reader.set_input(index, dq)
            for i in was_output:
                self.graph.outputs[i] = dq
            self._dq_of[value._id] = dq
        return self._dq_of[value._id]

    def weights(self, node: Node, index: int, q: np.ndarray, scale: np.ndarray, axis: int) -> None:
        zeros = np.zeros(scale.shape, np.int8)
        dq = self._node("DequantizeLinear", [self.graph.constant(q, f"{node.name}_wq"),
                                             self.graph.constant(scale, "w_scale"),
                                             self.graph.constant(zeros, "w_zero_point")],
                        f"{node.name}_w_dq", node, {"axis": axis})
        node.set_input(index, dq)

    def bias(self, node: Node, index: int, bias: np.ndarray, scale: np.ndarray) -> None:
        q = np.clip(np.rint(bias.astype(np.float64).reshape(-1) / scale.astype(np.float64)),
                    -2**31, 2**31 - 1).astype(np.int32)
        dq = self._node("DequantizeLinear", [self.graph.constant(q, f"{node.name}_bq"),
                                             self.graph.constant(scale, "b_scale"),
                                             self.graph.constant(np.zeros(scale.shape, np.int32), "b_zero_point")],
                        f"{node.name}_b_dq", node, {"axis": 0})
        node.set_input(index, dq)


def _weight_axis(node: Node) -> int:
    """The output-channel axis of the node's weights."""
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1 if node.op == "MatMul" else 0


@register_pass
@dataclass(frozen=True)
class QuantizeInt8Pass(Pass):
    """Insert int8 QDQ for Conv/Gemm/MatMul from calibration ranges (post-training quantisation).

    Needs `PassContext.calibration_ranges` ({value: (lo, hi)}, from edgecc.calibration on this module): the
    compile options quantize="int8", calibration=DATA set it. Nodes named in `keep-fp32` (comma-separated) stay
    float. Weights become symmetric per-channel int8, biases int32, activations uint8 per tensor; a lone
    Relu/Clip after the op is folded into its output range. Run lower-qdq afterwards for integer kernels.

    Requires: topologically-sorted, shapes-inferred. Keeps both.

    Example: `Conv(x, W, b) -> Relu` becomes `DQ(Q(x)) -> Conv(DQ(Wq), DQ(bq)) -> Relu -> Q -> DQ`.
    """

    name = "quantize-int8"
    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    keep_fp32: str = ""

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        ranges = getattr(ctx, "calibration_ranges", None)
        if ranges is None:
            raise PassError("quantize-int8 needs calibration ranges",
                            hint="compile with quantize='int8' and calibration=DATA (CLI: --quantize int8 "
                                 "--calibration DATA)")
        keep = frozenset(n for n in self.keep_fp32.split(",") if n)
        graph = module.graph
        inserter = _Inserter(graph, ranges)
        quantised = 0
        biases = set()  # the bias Adds of quantised MatMuls (their constant becomes an int32 DequantizeLinear)
        for node in list(graph.nodes):
            if node._id in biases:
                continue
            if node.op in RANGE_PRESERVING and not node.domain and is_qdq_pair(node.inputs[0]):
                for out in node.outputs:  # the selection keeps its input's parameters: lower-qdq makes it integer
                    inserter.dequantised(out)
                continue
            if _float_concat(node) and all(range_source(v).name in inserter.ranges for v in node.inputs):
                for index, value in enumerate(node.inputs):
                    node.set_input(index, inserter.dequantised(value))
                inserter.dequantised(node.outputs[0])
                continue
            if integer_binary(node) and node.name not in keep:
                for index, value in enumerate(node.inputs):
                    node.set_input(index, inserter.dequantised(value))
                inserter.dequantised(quant_point(graph, node))
                continue
            if integer_unary(node) and node.name not in keep and is_qdq_pair(node.inputs[0]):
                inserter.dequantised(node.outputs[0])
                continue
            if not quantisable(node, keep):
                continue
            point = quant_point(graph, node)
            x_dq = inserter.dequantised(node.inputs[0])
            node.set_input(0, x_dq)
            x_scale = x_dq.producer.inputs[1].const
            axis = _weight_axis(node)
            w_q, w_scale = weight_params(node.inputs[1].const, axis)
            bias = const_of(node.input(2))
            inserter.weights(node, 1, w_q, w_scale, axis)
            if bias is not None:
                inserter.bias(node, 2, bias, np.float32(x_scale) * w_scale)
            if (matmul_bias := bias_add(graph, node)) is not None:
                add, index = matmul_bias
                inserter.bias(add, index, add.inputs[index].const, np.float32(x_scale) * w_scale)
                biases.add(add._id)
            inserter.dequantised(point)
            quantised += 1
        return PassResult(quantised > 0, {"ops-quantised": quantised, "qdq-nodes-added": inserter.count})
