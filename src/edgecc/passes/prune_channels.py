"""prune-channels: structured pruning that physically removes the output channels with the smallest L1 norm.

A layer's output channels flow forward through the graph until a layer reads them as input channels. Every node on
the way must keep working on fewer channels: biases, BatchNorm statistics and per-channel constants are sliced,
depthwise convolutions lose the same channels (and their groups), Flatten/Reshape into a Gemm shrink its input
features, Concat shifts the offsets of its other inputs. The whole way is planned first (`_Planner`); if any node on
it is one the pass cannot shrink exactly (a residual Add of two computed tensors, a Reshape that splits the channel
axis, a graph output...), the layer is left alone and its record says why. Nothing is changed half-way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgecc.ir.core import Graph, Module, Node, Value
from edgecc.ops.apply import opdef_of
from edgecc.ops.costs import node_macs
from edgecc.passes.base import PassContext
from edgecc.passes.infer_shapes import InferShapesPass
from edgecc.passes.prune import CompressionPass, check_fraction, layer_record, new_constant, weight_layers
from edgecc.passes.registry import register_pass

NOT_CHANNELWISE = frozenset({"QuantizeLinear", "DequantizeLinear"})
"""Elementwise ops whose per-axis parameters are not broadcast operands (an `axis` attribute says which)."""


@dataclass
class Channels:
    """Which channels of a value survive: `keep` indexes its `size` channels along `axis`."""

    axis: int
    keep: np.ndarray
    size: int

    def same(self, other: "Channels") -> bool:
        return self.axis == other.axis and self.size == other.size and np.array_equal(self.keep, other.keep)


class Refuse(Exception):
    """A node on the channels' way that the pass cannot shrink exactly (the message says why)."""


def _shape(value: Value) -> tuple[int, ...]:
    return tuple(value.type.shape)


def _prod(dims) -> int:
    return int(np.prod(dims, dtype=np.int64)) if len(dims) else 1


def _merged_keep(shape, axis: int, lo: int, hi: int, keep: np.ndarray) -> np.ndarray:
    """Input axes lo..hi-1 (channel axis among them) merged into one: the merged indices of the kept channels."""
    outer, inner = _prod(shape[lo:axis]), _prod(shape[axis + 1:hi])
    size = shape[axis]
    return ((np.arange(outer)[:, None, None] * size + keep[None, :, None]) * inner
            + np.arange(inner)[None, None, :]).ravel()


def _reshape_channels(src: tuple[int, ...], dst: tuple[int, ...], ch: Channels) -> tuple[int, Channels]:
    """Where a reshape from `src` to `dst` puts the channels: one output axis made of whole input axes with the
    channel axis outermost-but-merged (N,C,H,W -> N,C*H*W or N,C,1,1 -> N,C). Anything else splits them."""
    a = ch.axis
    for b in range(len(dst)):
        for lo in range(a + 1):
            if _prod(src[:lo]) != _prod(dst[:b]):
                continue
            for hi in range(a + 1, len(src) + 1):
                if _prod(src[lo:hi]) == dst[b] and _prod(src[hi:]) == _prod(dst[b + 1:]):
                    keep = _merged_keep(src, a, lo, hi, ch.keep)
                    return b, Channels(b, keep, dst[b])
    raise Refuse(f"reshapes {'x'.join(map(str, src))} to {'x'.join(map(str, dst))}, which splits the channel axis")


@dataclass
class Plan:
    """The edits one layer's pruning needs: new constants (node, input index, array) and attribute changes."""

    constants: list[tuple[Node, int, np.ndarray]] = field(default_factory=list)
    attrs: list[tuple[Node, str, object]] = field(default_factory=list)

    def slice_const(self, node: Node, index: int, axis: int, keep: np.ndarray) -> None:
        value = node.inputs[index]
        if value is None or not value.is_const:
            raise Refuse(f"input {index} is not a constant")
        self.constants.append((node, index, np.take(value.const, keep, axis=axis)))

    def apply(self, graph: Graph) -> None:
        for node, index, array in self.constants:
            new_constant(graph, node, index, array, "ch")
        for node, key, value in self.attrs:
            node.attrs[key] = value


def _const_axes(node: Node, index: int, rank: int) -> list[int] | None:
    value = node.input(index)
    if value is None:
        return None
    if not value.is_const:
        raise Refuse("its axes are not a constant")
    return sorted(int(a) % rank for a in np.asarray(value.const).reshape(-1))


class _Planner:
    """Follows one layer's output channels forward, node by node in graph order, collecting the edits."""

    def __init__(self, graph: Graph, start: Node, channels: Channels):
        self.graph = graph
        self.flow: dict[int, tuple[Value, Channels]] = {start.outputs[0]._id: (start.outputs[0], channels)}
        self.plan = Plan()
        self.start = start

    def run(self) -> Plan:
        nodes = self.graph.nodes
        for node in nodes[nodes.index(self.start) + 1:]:
            carried = {i: self.flow[v._id][1] for i, v in enumerate(node.inputs)
                       if v is not None and v._id in self.flow}
            if not carried:
                continue
            try:
                self.visit(node, carried)
            except Refuse as why:
                raise Refuse(f"{node.label} {why}") from None
        for value, _ in self.flow.values():
            if self.graph.is_output(value):
                raise Refuse(f"its channels reach the graph output '{value.name}' (pruning would change the "
                             "model's interface)")
        return self.plan

    def flows(self, value: Value, channels: Channels) -> None:
        self.flow[value._id] = (value, channels)

    def only_input0(self, node: Node, carried: dict[int, Channels]) -> Channels:
        if set(carried) != {0}:
            raise Refuse(f"reads the channels as input {max(carried)}, not as its data")
        for value in node.outputs[1:]:
            if value.uses or self.graph.is_output(value):
                raise Refuse(f"has its extra output '{value.name}' in use")
        return carried[0]

    # -- the nodes ----------------------------------------------------------------------------------------------
    def visit(self, node: Node, carried: dict[int, Channels]) -> None:
        if node.domain:
            raise Refuse("is not an ONNX op prune-channels knows")
        kind = opdef_of(node).kind
        handler = getattr(self, f"visit_{node.op}", None)
        if handler is not None:
            return handler(node, carried)
        if kind == "elementwise" and node.op not in NOT_CHANNELWISE:
            return self.elementwise(node, carried)
        if kind == "pool":
            ch = self.only_input0(node, carried)
            if ch.axis != 1:
                raise Refuse("pools over the channel axis")
            return self.flows(node.outputs[0], ch)
        if kind == "reduction":
            return self.reduction(node, carried)
        raise Refuse("is an op prune-channels does not shrink; the layer is left alone")

    def visit_Conv(self, node: Node, carried) -> None:
        ch = self.only_input0(node, carried)
        group = node.attrs.get("group", 1)
        if ch.axis != 1:
            raise Refuse("reads the channels on a spatial axis")
        if group == 1:
            return self.plan.slice_const(node, 1, 1, ch.keep)
        weight = node.inputs[1]
        if group != ch.size or not weight.is_const:
            raise Refuse(f"is a grouped convolution (group={group}): every group would have to lose the same "
                         "number of channels")
        multiplier = weight.const.shape[0] // group
        rows = (ch.keep[:, None] * multiplier + np.arange(multiplier)[None, :]).ravel()
        self.plan.slice_const(node, 1, 0, rows)
        if node.input(2) is not None:
            self.plan.slice_const(node, 2, 0, rows)
        self.plan.attrs.append((node, "group", int(ch.keep.size)))
        self.flows(node.outputs[0], Channels(1, rows, weight.const.shape[0]))

    def visit_Gemm(self, node: Node, carried) -> None:
        ch = self.only_input0(node, carried)
        if node.attrs.get("transA", 0) or ch.axis != 1:
            raise Refuse("reads the channels on its row axis (transA)")
        self.plan.slice_const(node, 1, 1 if node.attrs.get("transB", 0) else 0, ch.keep)

    def visit_MatMul(self, node: Node, carried) -> None:
        ch = self.only_input0(node, carried)
        if ch.axis != len(_shape(node.inputs[0])) - 1:
            raise Refuse("reads the channels on a row axis, not as features")
        weight = node.inputs[1]
        self.plan.slice_const(node, 1, max(weight.const.ndim - 2, 0) if weight.is_const else 0, ch.keep)

    def visit_BatchNormalization(self, node: Node, carried) -> None:
        ch = self.only_input0(node, carried)
        if ch.axis != 1:
            raise Refuse("normalises another axis than the channels")
        for index in range(1, 5):
            self.plan.slice_const(node, index, 0, ch.keep)
        self.flows(node.outputs[0], ch)

    def visit_InstanceNormalization(self, node: Node, carried) -> None:
        ch = self.only_input0(node, carried)
        if ch.axis != 1:
            raise Refuse("normalises another axis than the channels")
        for index in (1, 2):
            self.plan.slice_const(node, index, 0, ch.keep)
        self.flows(node.outputs[0], ch)

    def elementwise(self, node: Node, carried: dict[int, Channels]) -> None:
        """Broadcasting ops: the carried inputs must agree; every other operand is 1 (or absent) on the channel
        axis, or a constant with all the channels (sliced)."""
        out_rank = len(_shape(node.outputs[0]))
        placed = {i: Channels(c.axis + out_rank - len(_shape(node.inputs[i])), c.keep, c.size)
                  for i, c in carried.items()}
        first = next(iter(placed.values()))
        if not all(c.same(first) for c in placed.values()):
            raise Refuse("combines tensors that lose different channels")
        for value in node.outputs[1:]:
            if value.uses or self.graph.is_output(value):
                raise Refuse(f"has its extra output '{value.name}' in use")
        for index, value in enumerate(node.inputs):
            if value is None or index in carried:
                continue
            shape = _shape(value)
            aligned = first.axis - (out_rank - len(shape))
            dim = shape[aligned] if aligned >= 0 else 1
            if dim == 1:
                continue
            if value.is_const and dim == first.size:
                self.plan.slice_const(node, index, aligned, first.keep)
                continue
            raise Refuse(f"combines the channels with '{value.name}', which is not derived from this layer's "
                         "output (a residual connection: both sides would have to lose the same channels)")
        self.flows(node.outputs[0], first)

    def reduction(self, node: Node, carried) -> None:
        ch = self.only_input0(node, carried)
        rank = len(_shape(node.inputs[0]))
        if "axis" in node.attrs:  # ArgMax / ArgMin
            axes = [node.attrs["axis"] % rank]
        else:
            axes = _const_axes(node, 1, rank)
            if axes is None or not axes:
                if node.attrs.get("noop_with_empty_axes", 0):
                    return self.flows(node.outputs[0], ch)
                raise Refuse("reduces over every axis, the channels included")
        if ch.axis in axes:
            raise Refuse("reduces over the channel axis")
        axis = ch.axis if node.attrs.get("keepdims", 1) else ch.axis - sum(a < ch.axis for a in axes)
        self.flows(node.outputs[0], Channels(axis, ch.keep, ch.size))

    def reshaped(self, node: Node, carried) -> int:
        ch = self.only_input0(node, carried)
        b, moved = _reshape_channels(_shape(node.inputs[0]), _shape(node.outputs[0]), ch)
        self.flows(node.outputs[0], moved)
        return b

    def visit_Flatten(self, node: Node, carried) -> None:
        self.reshaped(node, carried)

    def visit_Squeeze(self, node: Node, carried) -> None:
        if node.input(1) is None:
            raise Refuse("has no axes (it would also drop a channel axis left with one channel)")
        self.reshaped(node, carried)

    def visit_Unsqueeze(self, node: Node, carried) -> None:
        self.reshaped(node, carried)

    def visit_Reshape(self, node: Node, carried) -> None:
        shape_value = node.input(1)
        if shape_value is None or not shape_value.is_const:
            raise Refuse("has a computed shape")
        out = list(_shape(node.outputs[0]))
        if 0 in out:
            raise Refuse("has an empty dimension")
        b = self.reshaped(node, carried)
        out[b] = int(self.flow[node.outputs[0]._id][1].keep.size)
        self.plan.constants.append((node, 1, np.array(out, dtype=np.int64)))

    def visit_Transpose(self, node: Node, carried) -> None:
        ch = self.only_input0(node, carried)
        perm = list(node.attrs.get("perm") or range(len(_shape(node.inputs[0])) - 1, -1, -1))
        self.flows(node.outputs[0], Channels(perm.index(ch.axis), ch.keep, ch.size))

    def visit_Concat(self, node: Node, carried) -> None:
        rank = len(_shape(node.outputs[0]))
        axis = node.attrs["axis"] % rank
        along = {c.axis == axis for c in carried.values()}
        if along == {False}:
            first = next(iter(carried.values()))
            if len(carried) != len(node.inputs) or not all(c.same(first) for c in carried.values()):
                raise Refuse("concatenates the channels with tensors that keep them all")
            return self.flows(node.outputs[0], first)
        if along != {True}:
            raise Refuse("concatenates inputs with the channels on different axes")
        parts, offset = [], 0
        for index, value in enumerate(node.inputs):
            size = _shape(value)[axis]
            parts.append(offset + (carried[index].keep if index in carried else np.arange(size)))
            offset += size
        self.flows(node.outputs[0], Channels(axis, np.concatenate(parts), offset))

    def visit_Softmax(self, node: Node, carried) -> None:
        ch = self.only_input0(node, carried)
        if node.attrs.get("axis", -1) % len(_shape(node.inputs[0])) == ch.axis:
            raise Refuse("normalises across the channels")
        self.flows(node.outputs[0], ch)

    visit_LogSoftmax = visit_Softmax

    def visit_LayerNormalization(self, node: Node, carried) -> None:
        ch = self.only_input0(node, carried)
        if ch.axis >= node.attrs.get("axis", -1) % len(_shape(node.inputs[0])):
            raise Refuse("normalises across the channels")
        self.flows(node.outputs[0], ch)

    def visit_Pad(self, node: Node, carried) -> None:
        ch = self.only_input0(node, carried)
        pads, rank = node.input(1), len(_shape(node.inputs[0]))
        if node.input(3) is not None or pads is None or not pads.is_const:
            raise Refuse("has computed pads or explicit axes")
        flat = np.asarray(pads.const).reshape(-1)
        if flat[ch.axis] or flat[ch.axis + rank]:
            raise Refuse("pads the channel axis")
        self.flows(node.outputs[0], ch)


def _output_channels(node: Node) -> tuple[int, int]:
    """(axis of the weight, axis of the output) that index the layer's output channels."""
    if node.op == "Conv":
        return 0, 1
    out_rank = len(_shape(node.outputs[0]))
    if node.op == "Gemm":
        return (0 if node.attrs.get("transB", 0) else 1), 1
    return 1, out_rank - 1


def _why_not_root(node: Node) -> str | None:
    weight = node.inputs[1].const
    if node.op == "Conv" and node.attrs.get("group", 1) != 1:
        return "grouped convolution: its output channels follow its input's (they shrink with the layer feeding it)"
    if node.op == "MatMul" and weight.ndim != 2:
        return f"MatMul by a {weight.ndim}-D weight (batched)"
    if node.outputs[0].type is None:
        return "output shape unknown (run infer-shapes)"
    return None


def _bias_plan(plan: Plan, node: Node, keep: np.ndarray) -> None:
    """Slice the layer's own bias: Conv B [C]; Gemm C broadcast to [M, C] (left alone where it is 1 wide)."""
    bias = node.input(2)
    if bias is None or node.op == "MatMul":
        return
    shape = bias.type.shape
    if node.op == "Conv" or (len(shape) >= 1 and shape[-1] != 1):
        if not bias.is_const:
            raise Refuse("its bias is not a constant")
        plan.slice_const(node, 2, len(shape) - 1, keep)


def prune_channels(module: Module, fraction: float) -> list[dict]:
    """Remove round(fraction * C) output channels (smallest L1 norm of their weights, ties by position) of every
    Conv (group=1) / Gemm / MatMul layer, in place, shrinking everything downstream; one record per layer.

    Layers are visited in graph order, so a layer's input channels may already have shrunk when its own turn
    comes. At least one channel stays. A layer whose channels cannot be removed exactly is left as it is with
    "skipped": "<why>". Records: "channels_before"/"channels_after", "pruned_channels" (original indices), bytes
    and MACs (of the layer's weight and node, measured before the first and after the last change)."""
    fraction = check_fraction(fraction, "--prune-channels", "channel fraction")
    graph = module.graph
    layers = weight_layers(graph)
    records = []
    for node in layers:
        w_axis, _ = _output_channels(node)
        size = int(node.inputs[1].const.shape[w_axis])
        records.append(layer_record(node, channels_before=size, channels_after=size, pruned_channels=[]))
    for node, record in zip(layers, records):
        reason = _why_not_root(node)
        if reason is None:
            reason = _prune_layer(module, node, fraction, record)
        record["skipped"] = reason
    for node, record in zip(layers, records):
        w_axis, _ = _output_channels(node)
        record.update(weight=node.inputs[1].name, bytes_after=int(node.inputs[1].const.nbytes),
                      macs_after=int(node_macs(node)), channels_after=int(node.inputs[1].const.shape[w_axis]))
    return records


def _prune_layer(module: Module, node: Node, fraction: float, record: dict) -> str | None:
    graph = module.graph
    weight = node.inputs[1].const
    w_axis, out_axis = _output_channels(node)
    size = weight.shape[w_axis]
    drop = min(round(fraction * size), size - 1)
    if drop == 0:
        return f"{fraction:g} of {size} channel(s) rounds to none"
    norms = np.abs(np.moveaxis(weight, w_axis, 0)).reshape(size, -1).astype(np.float64).sum(axis=1)
    order = np.argsort(norms, kind="stable")
    keep = np.sort(order[drop:])
    try:
        plan = _Planner(graph, node, Channels(out_axis, keep, size)).run()
        plan.slice_const(node, 1, w_axis, keep)
        _bias_plan(plan, node, keep)
    except Refuse as why:
        return str(why)
    plan.apply(graph)
    InferShapesPass().run(module, PassContext())
    record["pruned_channels"] = sorted(int(c) for c in order[:drop])
    return None


@register_pass
@dataclass(frozen=True)
class PruneChannelsPass(CompressionPass):
    """Structured pruning: remove each layer's output channels with the smallest L1 norm, physically.

    For every Conv (group=1) / Gemm / MatMul in graph order, round(fraction * C) output channels go (at least one
    stays), and every consumer shrinks with them: the bias, the next Conv's input channels (through depthwise
    convolutions, which lose the same channels and groups, to their consumers), Gemm/MatMul input features (also
    through Flatten/Reshape), BatchNormalization/InstanceNormalization parameters, per-channel constants of
    elementwise ops, pools, reductions over other axes, Transpose, Concat (offsets). A layer whose channels reach a
    graph output, a residual Add/Mul with another computed tensor, a Reshape that splits the channel axis or an op
    the pass does not know is left alone (the record says why). Changes numerics; opt-in only (`--prune-channels`).

    Requires: topologically-sorted, shapes-inferred. Keeps both (types re-inferred after each layer).
    Options: `fraction` (default 0.3, in (0, 1)).

    Example: `Conv(W:16x8x3x3) -> Relu -> Conv(W:32x16x3x3)` at 0.25 becomes `Conv(12x8x3x3) -> Relu ->
    Conv(32x12x3x3)`.
    """

    name = "prune-channels"
    done_stat = "layers-pruned"

    fraction: float = 0.3

    def compress(self, module: Module) -> list[dict]:
        return prune_channels(module, self.fraction)
