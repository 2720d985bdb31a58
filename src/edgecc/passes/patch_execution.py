"""patch-execution: compute a CNN's high-resolution first stage tile by tile (MCUNetV2, Lin et al., NeurIPS 2021).

A CNN's peak memory sits in its first layers, where the maps are large. If the nodes from the input to a "cut"
tensor are all spatially local (convolutions, pools, elementwise ops), each tile of the cut tensor can be computed
from a window of the input: walking the stage backwards from the tile gives every value's window (receptive field
with its halo, from strides, dilations and pads). The pass emits, per tile, a Slice of the input window, the
stage's nodes on windows (pads kept only where a window touches the image border, so the numbers are those of
the whole-image computation), and Concats that put the tiles in place. The IR stays plain ops; equal-shaped tiles
share kernels. Halos are computed more than once: the extra MACs are the price (`patch_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.errors import PassError
from edgecc.ir.core import Module, Node, Value
from edgecc.ops import get
from edgecc.ops.costs import module_macs
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass

Window = tuple[int, int, int, int]
"""(h0, h1, w0, w1): rows h0..h1-1 and columns w0..w1-1 of a map (half-open)."""

WINDOWED_OPS = {("Conv", ""), ("FusedConv", "edgecc"), ("QLinearConv", ""), ("MaxPool", ""), ("AveragePool", "")}
"""Ops with a kernel window (kernel_shape, strides, dilations, pads) over the last two axes of input 0."""

WEIGHT_INPUT = {"QLinearConv": 3}
"""Where a windowed op's weight is when it is not input 1 (its shape gives the kernel when kernel_shape is absent)."""

POINTWISE_OPS = {("QLinearAdd", "edgecc"), ("QLinearMul", "edgecc"), ("QLookup", "edgecc")}
"""Integer ops that combine their computed operands position by position; their constant inputs are scales, zero
points or a lookup table, never data laid over the map."""


def _is_spatial_value(value: Value) -> bool:
    return value.type is not None and value.type.rank == 4


def _broadcasts_over_map(value: Value) -> bool:
    """A constant operand of an elementwise op that is the same at every position of an NCHW map: size 1 on the
    axes it would broadcast along H and W (its last two, right-aligned)."""
    shape = value.type.shape
    return len(shape) <= 4 and all(d == 1 for d in shape[-2:])


def unsupported_reason(node: Node) -> str | None:
    """Why `node` cannot run on windows of its maps (None: it can)."""
    opdef = get(node.op, node.domain)
    if opdef is None:
        return f"{node.label} is unknown"
    if len([v for v in node.outputs if v.uses]) > 1 or not _is_spatial_value(node.outputs[0]):
        return f"{node.label} does not produce one NCHW map"
    if (node.op, node.domain) in WINDOWED_OPS:
        attrs = opdef.complete_attrs(node.attrs, where=node.label)
        if attrs.get("auto_pad", "NOTSET") != "NOTSET":
            return f"{node.label} uses auto_pad"
        if attrs.get("ceil_mode", 0) and node.op != "MaxPool":
            return f"{node.label} uses ceil_mode"  # whether the overhang counts in an average is not padding's rule
        if len(node.outputs) > 1 and node.outputs[1].uses:
            return f"{node.label}'s indices are read"
        return None
    if node.op == "Concat" and not node.domain:
        out = node.outputs[0].type
        if node.attrs.get("axis") not in (1, -3) or any(v is None or v.is_const or v.type.rank != 4
                                                         or v.type.shape[2:] != out.shape[2:] for v in node.inputs):
            return f"{node.label} does not join computed maps along channels"
        return None
    pointwise = (node.op, node.domain) in POINTWISE_OPS
    if (opdef.kind == "elementwise" or pointwise) and len(node.outputs) == 1:
        out = node.outputs[0].type
        for value in node.inputs:
            if value is None:
                continue
            if value.is_const:
                if not pointwise and not _broadcasts_over_map(value):
                    return f"{node.label} reads a constant that varies over the map"
            elif value.type.shape != out.shape:
                return f"{node.label} broadcasts a computed operand"
        return None
    return f"{node.label}: {node.op} is not spatially local"


def _window_attrs(node: Node) -> dict:
    attrs = get(node.op, node.domain).complete_attrs(node.attrs, where=node.label)
    kernel = list(attrs["kernel_shape"]) if attrs.get("kernel_shape") else \
        list(node.inputs[WEIGHT_INPUT.get(node.op, 1)].type.shape[2:])
    return {"kernel": kernel, "strides": list(attrs.get("strides") or [1, 1]),
            "dilations": list(attrs.get("dilations") or [1, 1]), "pads": list(attrs.get("pads") or [0, 0, 0, 0])}


def _input_span(node: Node, start: int, end: int, axis: int, size: int) -> tuple[int, int, int, int]:
    """Rows (or columns) `start..end-1` of the output need input `lo..hi-1` (clipped to the map) and the padding
    (before, after) that lies outside it."""
    w = _window_attrs(node)
    stride, dilation, pad = w["strides"][axis], w["dilations"][axis], w["pads"][axis]
    lo = start * stride - pad
    hi = (end - 1) * stride - pad + (w["kernel"][axis] - 1) * dilation + 1
    return max(lo, 0), min(hi, size), max(0, -lo), max(0, hi - size)


def input_window(node: Node, index: int, out: Window) -> Window:
    """The window of input `index` that output window `out` of `node` reads."""
    if (node.op, node.domain) in WINDOWED_OPS and index == 0:
        h, w = node.inputs[0].type.shape[2:]
        h0, h1, _, _ = _input_span(node, out[0], out[1], 0, h)
        w0, w1, _, _ = _input_span(node, out[2], out[3], 1, w)
        return (h0, h1, w0, w1)
    return out  # elementwise operands, channel Concat's inputs and FusedConv's residual: the same positions


def stage_of(module: Module, cut: Value) -> list[Node] | str:
    """The nodes computing `cut` from graph inputs (in graph order), or why that stage cannot be patched."""
    graph = module.graph
    if cut.producer is None or not _is_spatial_value(cut) or graph.is_output(cut):
        return f"'{cut.name}' is not an intermediate NCHW map"
    members: dict[int, Node] = {}
    stack = [cut.producer]
    while stack:
        node = stack.pop()
        if id(node) in members:
            continue
        reason = unsupported_reason(node)
        if reason:
            return reason
        members[id(node)] = node
        for value in node.inputs:
            if value is not None and value.producer is not None:
                stack.append(value.producer)
            elif value is not None and not value.is_const and not _is_spatial_value(value):
                return f"stage input '{value.name}' is not an NCHW map"
    for node in members.values():
        for value in node.outputs:
            if value is cut:
                continue
            if graph.is_output(value) or any(id(user) not in members for user in value.users):
                return f"'{value.name}' inside the stage is also read after it"
    return [n for n in graph.nodes if id(n) in members]


def split(extent: int, parts: int) -> list[tuple[int, int]]:
    """`extent` split into `parts` contiguous spans, the larger ones first (equal spans share kernels)."""
    base, extra = divmod(extent, parts)
    spans, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        spans.append((start, start + size))
        start += size
    return spans


def _union(a: Window | None, b: Window) -> Window:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


class _TileBuilder:
    """Emits the nodes of one tile of a stage."""

    def __init__(self, module: Module, stage: list[Node], cut: Value, tag: str):
        self.graph = module.graph
        self.stage = stage
        self.cut = cut
        self.tag = tag
        self.nodes: list[Node] = []

    def _slice(self, source: Value, have: Window, want: Window, name: str) -> Value:
        if have == want:
            return source
        starts = np.array([want[0] - have[0], want[2] - have[2]], dtype=np.int64)
        ends = np.array([want[1] - have[0], want[3] - have[2]], dtype=np.int64)
        shape = source.type.shape[:2] + (want[1] - want[0], want[3] - want[2])
        out = Value(self.graph.unique_name(name), source.type.with_shape(shape))
        consts = [self.graph.constant(starts, "patch_starts"), self.graph.constant(ends, "patch_ends"),
                  self.graph.constant(np.array([2, 3], dtype=np.int64), "patch_axes")]
        self.nodes.append(Node("Slice", [source, *consts], [out], name=f"{name}/slice"))
        return out

    def build(self, window: Window) -> Value:
        needed: dict[int, Window] = {self.cut._id: window}
        for node in reversed(self.stage):
            out = needed[node.outputs[0]._id]
            for index, value in enumerate(node.inputs):
                if value is not None and not value.is_const:
                    needed[value._id] = _union(needed.get(value._id), input_window(node, index, out))
        tiles: dict[int, tuple[Value, Window]] = {}

        def tile_of(value: Value, want: Window) -> Value:
            if value._id not in tiles:  # a stage input: take its window from the whole map
                full = value.type.shape[2:]
                tiles[value._id] = (value, (0, full[0], 0, full[1]))
            source, have = tiles[value._id]
            return self._slice(source, have, want, f"{value.name}_{self.tag}")

        for node in self.stage:
            result = node.outputs[0]
            out = needed[result._id]
            inputs = [v if v is None or v.is_const else tile_of(v, input_window(node, i, out))
                      for i, v in enumerate(node.inputs)]
            attrs = dict(node.attrs)
            if (node.op, node.domain) in WINDOWED_OPS:
                h, w = node.inputs[0].type.shape[2:]
                _, _, top, bottom = _input_span(node, out[0], out[1], 0, h)
                _, _, left, right = _input_span(node, out[2], out[3], 1, w)
                attrs["pads"] = [top, left, bottom, right]
                if attrs.get("ceil_mode"):  # a MaxPool's ceil-mode overhang is padding (ignored by the max)
                    attrs["ceil_mode"] = 0
            shape = result.type.shape[:2] + (out[1] - out[0], out[3] - out[2])
            value = Value(self.graph.unique_name(f"{result.name}_{self.tag}"), result.type.with_shape(shape))
            outputs = [value] + [Value(self.graph.unique_name(f"{v.name}_{self.tag}"), v.type.with_shape(
                v.type.shape[:2] + shape[2:])) for v in node.outputs[1:]]
            self.nodes.append(Node(node.op, inputs, outputs, attrs, f"{node.name}/{self.tag}", node.domain))
            tiles[result._id] = (value, out)
        return tiles[self.cut._id][0]


def patch(module: Module, cut: Value, rows: int, cols: int) -> dict:
    """Rewrite the stage computing `cut` to run in a rows x cols grid of tiles; returns {"cut", "grid",
    "cut_bytes", "macs_before", "macs_after", "halo_mac_overhead"}. Raises PassError when the stage cannot be
    patched."""
    stage = stage_of(module, cut)
    if isinstance(stage, str):
        raise PassError(f"cannot patch the stage ending at '{cut.name}': {stage}",
                        hint="choose a cut whose stage is convolutions, pools and elementwise ops only")
    height, width = cut.type.shape[2:]
    if not (1 <= rows <= height and 1 <= cols <= width):
        raise PassError(f"a {rows}x{cols} grid does not fit the {height}x{width} map '{cut.name}'")
    graph = module.graph
    macs_before = module_macs(graph)
    new_nodes: list[Node] = []
    row_values = []
    for i, (h0, h1) in enumerate(split(height, rows)):
        tiles = []
        for j, (w0, w1) in enumerate(split(width, cols)):
            builder = _TileBuilder(module, stage, cut, f"tile{i}_{j}")
            tiles.append(builder.build((h0, h1, w0, w1)))
            new_nodes += builder.nodes
        row_values.append(_concat(graph, new_nodes, tiles, 3, f"{cut.name}_row{i}"))
    whole = _concat(graph, new_nodes, row_values, 2, f"{cut.name}_patched")
    graph.replace_all_uses(cut, whole)
    members = {id(n) for n in stage}
    for node in stage:
        node.drop_inputs()
    graph.nodes = new_nodes + [n for n in graph.nodes if id(n) not in members]
    macs_after = module_macs(graph)
    overhead = round(macs_after / macs_before - 1, 4) if macs_before else 0.0
    return {"cut": cut.name, "grid": [rows, cols], "cut_bytes": cut.type.nbytes, "macs_before": macs_before,
            "macs_after": macs_after, "halo_mac_overhead": overhead}


def _concat(graph, nodes: list[Node], parts: list[Value], axis: int, name: str) -> Value:
    if len(parts) == 1:
        return parts[0]
    shape = list(parts[0].type.shape)
    shape[axis] = sum(p.type.shape[axis] for p in parts)
    out = Value(graph.unique_name(name), parts[0].type.with_shape(shape))
    nodes.append(Node("Concat", parts, [out], {"axis": axis}, name=f"{name}/concat"))
    return out


def cut_candidates(module: Module) -> list[Value]:
    """Values whose whole stage can be patched, in graph order: the possible ends of a patched stage."""
    found = []
    for node in module.graph.nodes:
        value = node.outputs[0]
        if not isinstance(stage_of(module, value), str):
            found.append(value)
    return found


def find_value(module: Module, name: str) -> Value:
    for node in module.graph.nodes:
        for value in node.outputs:
            if value.name == name:
                return value
    raise PassError(f"no value named '{name}' to cut at", hint="see the IR (--print-after-all) for value names")


GRIDS = (2, 3, 4, 5, 6, 7, 8)
"""Square grids tried when choosing: beyond 8x8 the halo MACs of MobileNet-like stages exceed the tiles' own."""


def best_patch(module: Module, grids=GRIDS, max_overhead: float | None = None, cut: str = "") -> list[dict]:
    """Every (cut, NxN grid) worth trying, each patched on a copy of `module`: the patch stats plus "peak_bytes"
    (the most arena bytes alive at one step, in place as plan-memory computes); sorted by peak, then halo MAC
    overhead. Only cuts whose stage holds a step at the current peak can lower it (or only `cut`, when named:
    PassError if its stage cannot be patched); for each cut, grids stop growing once the overhead passes
    `max_overhead` (it grows with the grid). `module` is not changed."""
    from edgecc.passes.plan_memory import live_bytes_by_step, plan_lower_bound

    if cut:
        named = find_value(module, cut)
        reason = stage_of(module, named)
        if isinstance(reason, str):
            raise PassError(f"cannot patch the stage ending at '{cut}': {reason}")
        candidates = [named]
    else:
        live = live_bytes_by_step(module)
        peak = max(live, default=0)
        at_peak = {id(module.graph.nodes[step]) for step, size in enumerate(live) if size == peak}
        candidates = [v for v in cut_candidates(module) if any(id(n) in at_peak for n in stage_of(module, v))]
    tried = []
    for value in candidates:
        for n in grids:
            if n > min(value.type.shape[2:]):
                break
            trial = module.clone()
            stats = patch(trial, find_value(trial, value.name), n, n)
            if max_overhead is not None and stats["halo_mac_overhead"] > max_overhead:
                break
            stats["peak_bytes"] = plan_lower_bound(trial)
            tried.append(stats)
    tried.sort(key=lambda s: (s["peak_bytes"], s["halo_mac_overhead"]))
    return tried


PEAK_SLACK = 0.02
"""`choose` takes the least halo overhead among the trials within 2% of the smallest peak: a deeper cut that saves
a few kilobytes more often costs several times the MACs (MobileNetV2: 1.302 MB at +48% vs 1.305 MB at +6%)."""


def choose(module: Module, tried: list[dict]) -> dict | None:
    """The trial to apply: by increasing halo overhead (then smaller cut tensor, whose Concat is cheaper), the
    first among those within PEAK_SLACK of the smallest peak whose planned arena is too; the peak is a lower
    bound that placement does not always reach (a cut after a wide depthwise output: +8%). Each trial checked is
    planned on a copy; usually the first or second one is taken."""
    from edgecc.passes.plan_memory import plan

    if not tried:
        return None
    limit = min(t["peak_bytes"] for t in tried) * (1 + PEAK_SLACK)
    near = sorted((t for t in tried if t["peak_bytes"] <= limit),
                  key=lambda t: (t["halo_mac_overhead"], t["cut_bytes"], t["peak_bytes"]))
    best = None
    for trial in near:
        copy = module.clone()
        patch(copy, find_value(copy, trial["cut"]), *trial["grid"])
        arena = plan(copy).arena_bytes
        if best is None or arena < best[0]:
            best = (arena, trial)
        if arena <= limit:
            break
    return best[1]


@register_pass
@dataclass(frozen=True)
class PatchExecutionPass(Pass):
    """Compute the high-resolution first stage of a CNN tile by tile, so its large maps never exist whole
    (patch-based inference, MCUNetV2).

    The stage is every node from the graph input to a cut tensor; it must hold only convolutions (float or
    QLinearConv), pools, elementwise ops (and the integer Add/Mul/lookup) and channel Concats on NCHW maps, and
    nothing inside it may be read after it. For each tile of an NxN grid over the cut tensor, the pass walks the
    stage backwards to find the window of every value (the receptive field with its halo) and emits a Slice of
    the input window, the stage's nodes on those windows (pads kept only at the image border, so results equal
    the whole-image computation) and Concats that assemble the cut tensor. Halo positions are computed by more
    than one tile: the stats give the extra MACs.

    Options: `cut` (a value name; default: among all patchable cuts and grids 2x2..8x8, the least halo overhead
    whose planned arena is within 2% of the smallest peak of live intermediates), `tiles` (N for an NxN grid;
    0 = choose), `max-overhead` (largest halo MAC overhead accepted when choosing, a fraction; default 0.5).

    Example: `-p "-O2,patch-execution{tiles=4}"`.
    """

    name = "patch-execution"
    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    cut: str = ""
    tiles: int = 0
    max_overhead: float = 0.5

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        if self.tiles < 0:
            raise PassError(f"tiles={self.tiles} must be >= 1 (or 0 to choose)", where=self.name)
        if self.cut and self.tiles:
            stats = patch(module, find_value(module, self.cut), self.tiles, self.tiles)
        else:
            best = choose(module, best_patch(module, (self.tiles,) if self.tiles else GRIDS, self.max_overhead,
                                             self.cut))
            if best is None and self.cut:
                raise PassError(f"every grid over the stage ending at '{self.cut}' costs more than "
                                f"max-overhead={self.max_overhead} in halo MACs", where=self.name,
                                hint="raise max-overhead, or give tiles=N")
            if best is None:
                return PassResult(False, {"tiles": 0})  # nothing lowers the peak within max-overhead
            stats = patch(module, find_value(module, best["cut"]), *best["grid"])
        return PassResult(True, {"tiles": stats["grid"][0] * stats["grid"][1],
                                 "halo-mac-overhead-permille": round(1000 * stats["halo_mac_overhead"])})
