"""plan-memory: give every intermediate tensor a static offset in one arena."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from edgecc.ir.core import Module, Node, Value
from edgecc.passes.base import SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import register_pass

MEMORY_PLANNED = "memory-planned"
ALIGNMENT = 64
"""Every tensor starts on a 64-byte boundary: a cache line, and the widest vector (AVX-512)."""


@dataclass
class MemoryPlan:
    """Arena offsets of intermediate values (by value id), and the figures the report gives.

    `aliases` maps the output of an in-place view (a Reshape-like op whose input dies there) to that input: the
    two share one buffer, and no code runs for the op. `in_place` maps the output of an elementwise op computed
    into the buffer of an input that dies there (see in_place_compute): the kernel runs, reading and writing
    the same bytes."""

    offsets: dict[int, int] = field(default_factory=dict)
    arena_bytes: int = 0
    lower_bound_bytes: int = 0
    unplanned_bytes: int = 0
    aliases: dict[int, int] = field(default_factory=dict)
    in_place: dict[int, int] = field(default_factory=dict)
    assembled: dict[int, dict[int, int]] = field(default_factory=dict)
    """{Concat output id: {input id: byte offset}}: Concats whose inputs were written straight into their slice of
    the output (see concat_slices); no code runs for them."""

    def offset_of(self, value: Value) -> int:
        return self.offsets[value._id]


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def intermediates(module: Module) -> list[Value]:
    """Values that live in the arena: node outputs that are not graph outputs."""
    outputs = {v._id for v in module.graph.outputs}
    return [v for n in module.graph.nodes for v in n.outputs if v._id not in outputs]


def lifetimes(module: Module) -> dict[int, tuple[int, int]]:
    """(first step, last step) of each intermediate in the current node order."""
    life: dict[int, tuple[int, int]] = {}
    for step, node in enumerate(module.graph.nodes):
        for value in node.outputs:
            life[value._id] = (step, step)
        for value in node.inputs:
            if value is not None and value._id in life:
                life[value._id] = (life[value._id][0], step)
    return life


IN_PLACE_EXCLUDED = frozenset({"Dropout", "QuantizeLinear", "DequantizeLinear", "Identity"})
"""Elementwise ops whose kernel is not the one-read-one-write loop of kernels/elementwise.emit_elementwise (a
copy with memcpy, the quantisation kernels), or a view already (Identity)."""


def _in_place_candidates(node: Node, opdef) -> list[int]:
    """Input positions whose buffer `node` may overwrite: an elementwise op's loop reads each operand at the index
    it writes (kernels/elementwise.emit_elementwise) and only then stores, so an operand of the output's exact
    shape and element size can be overwritten; a broadcast operand (read at many indices) cannot."""
    if opdef is None or opdef.kind != "elementwise" or node.op in IN_PLACE_EXCLUDED or node.domain \
            or len(node.outputs) != 1:
        return []
    out = node.outputs[0].type
    return [i for i, v in enumerate(node.inputs) if v is not None and not v.is_const and v.type.shape == out.shape
            and v.type.dtype.itemsize == out.dtype.itemsize]


def in_place_aliases(module: Module, compute: bool = False) -> tuple[dict[int, int], dict[int, int]]:
    """({view output id: input id}, {computed output id: input id}). Views: ops whose output is their input's
    bytes (op metadata `aliases_input`). Computed (with `compute`): elementwise ops that may write over an operand
    (see _in_place_candidates). Either way the input is an intermediate read by no later node, so the output can
    take over its buffer."""
    from edgecc.ops import get

    graph = module.graph
    arena_values = {v._id for v in intermediates(module)}
    life = lifetimes(module)
    views: dict[int, int] = {}
    computed: dict[int, int] = {}
    root = {}
    for step, node in enumerate(graph.nodes):
        opdef = get(node.op, node.domain)
        out = node.outputs[0] if node.outputs else None
        if out is None or out._id not in arena_values:
            continue
        if opdef is not None and opdef.aliases_input and node.inputs and node.inputs[0] is not None:
            source = node.inputs[0]
            if source._id in arena_values and life[source._id][1] == step and source.type.nbytes == out.type.nbytes:
                views[out._id] = root[out._id] = root.get(source._id, source._id)
            continue
        if not compute:
            continue
        for index in _in_place_candidates(node, opdef):
            source = node.inputs[index]
            if source._id in arena_values and life[source._id][1] == step:
                computed[out._id] = root[out._id] = root.get(source._id, source._id)
                break
    return views, computed


def concat_slices(module: Module, root: dict[int, int]) -> dict[int, dict[int, int]]:
    """Concats that need no copy: {output id: {input id: byte offset}}. Where every dim before the axis is 1, each
    input is one contiguous run of the output's bytes, so the input's producer (and the in-place chain ending in
    it, `root` maps members to their first value) can write there directly. Only when every input is an
    intermediate read by this Concat alone (so nothing else ever sees the slice) and not itself an assembled
    Concat's output; all inputs or none, so the Concat never copies a slice onto itself."""
    graph = module.graph
    arena_values = {v._id for v in intermediates(module)}
    assembled: dict[int, dict[int, int]] = {}
    for node in graph.nodes:
        if node.op != "Concat" or node.domain or node.outputs[0]._id not in arena_values:
            continue
        out = node.outputs[0]
        axis = node.attrs.get("axis", 0) % out.type.rank
        if any(d != 1 for d in out.type.shape[:axis]):
            continue
        inputs = node.inputs
        owned = [v is not None and v._id in arena_values and len(v.uses) == 1 and root.get(v._id, v._id) not in
                 assembled for v in inputs]
        if not inputs or not all(owned) or len({v._id for v in inputs}) != len(inputs):
            continue
        offsets, offset = {}, 0
        for value in inputs:
            offsets[value._id] = offset
            offset += value.type.nbytes
        assembled[out._id] = offsets
    return assembled


def _buffers(module: Module, in_place: bool):
    """Who owns which buffer: (views, computed, assembled, life, values to place). A buffer is a value with the
    chain of values sharing it in place (views; with `in_place` computed elementwise ops) and, for a Concat
    assembled in place (with `in_place`), its inputs' chains too; `life` gives each placed value its buffer's
    (first step, last step)."""
    views, computed = in_place_aliases(module, in_place)
    root = {**views, **computed}
    assembled = concat_slices(module, root) if in_place else {}
    life = lifetimes(module)
    for member, first in root.items():
        life[first] = (min(life[first][0], life[member][0]), max(life[first][1], life[member][1]))
    inside = set()
    for out, slices in assembled.items():
        for value in slices:
            first = root.get(value, value)
            inside.add(first)
            life[out] = (min(life[out][0], life[first][0]), max(life[out][1], life[first][1]))
    values = [v for v in intermediates(module) if v._id not in root and v._id not in inside]
    return views, computed, assembled, life, values


def live_bytes_by_step(module: Module, in_place: bool = True) -> list[int]:
    """Bytes of arena buffers (aligned) alive at each step of the current order, buffers shared in place once."""
    *_, life, values = _buffers(module, in_place)
    live = [0] * max(len(module.graph.nodes), 1)
    for value in values:
        first, last = life[value._id]
        for step in range(first, last + 1):
            live[step] += _align(max(value.type.nbytes, 1))
    return live


def plan_lower_bound(module: Module, in_place: bool = True) -> int:
    """The most arena bytes alive at one step of the current order: no placement can do better."""
    return max(live_bytes_by_step(module, in_place), default=0)


ORDER_BEAM = 64
"""States kept per step by memory_order once the exact search has more (wide graphs, patched stages)."""

ORDER_WORK = 4_000_000
"""About how many (state, node) checks memory_order may spend; the beam narrows on large graphs to stay within."""

ORDER_STEPS = 40_000
"""memory_order gives up (keeps the graph order) after this many candidate steps (about half a second), reached only on
very wide graphs such as a patched stage's independent tiles, whose emitted tile-by-tile order is already good."""


def memory_order(module: Module, in_place: bool = True) -> list[Node]:
    """A topological order of the nodes with the smallest peak of live arena bytes found (Liberis & Lane 2019,
    "Neural networks on microcontrollers: saving memory at inference via operator reordering").

    Dynamic programming over the sets of nodes already run: the cost of reaching a set is the peak so far, and
    a set's live bytes depend only on the set, so keeping the best path to each set is exact. The sets of one
    size are at most (branch lengths + 1) multiplied over the parallel branches, few for CNNs' residual and
    fire/shuffle blocks; when a step has more than the beam (ORDER_BEAM, fewer on large graphs) the best ones
    are kept, which turns the search into a heuristic (abandoned for the graph order after ORDER_STEPS). An
    elementwise op whose operand dies there costs no new buffer, as in the plan (in_place)."""
    from edgecc.ops import get

    graph = module.graph
    nodes = graph.nodes
    n = len(nodes)
    if n < 3:
        return list(nodes)
    index = {id(node): i for i, node in enumerate(nodes)}
    outputs = {v._id for v in graph.outputs}
    preds = [0] * n
    size: dict[int, int] = {}
    consumers: dict[int, int] = {}  # value id -> mask of reading nodes
    for i, node in enumerate(nodes):
        for v in node.inputs:
            if v is not None and v.producer is not None and id(v.producer) in index:
                preds[i] |= 1 << index[id(v.producer)]
                consumers[v._id] = consumers.get(v._id, 0) | (1 << i)
    for node in nodes:
        for v in node.outputs:
            size[v._id] = 0 if v._id in outputs else _align(max(v.type.nbytes, 1))
    reuse = []  # per node: ids of inputs it may overwrite or view (no new buffer when one of them dies there)
    for node in nodes:
        opdef = get(node.op, node.domain)
        if opdef is not None and opdef.aliases_input and node.inputs and node.inputs[0] is not None:
            reuse.append([node.inputs[0]._id])
        elif in_place:
            reuse.append([node.inputs[i]._id for i in _in_place_candidates(node, opdef)])
        else:
            reuse.append([])
    successors = [[j for j in range(n) if preds[j] >> i & 1] for i in range(n)]
    reads = [list(dict.fromkeys(v._id for v in node.inputs if v is not None and v._id in consumers and v._id in size))
             for node in nodes]
    made = [sum(size[v._id] for v in node.outputs) for node in nodes]
    unread = [sum(size[v._id] for v in node.outputs if v._id not in consumers) for node in nodes]
    beam = max(4, min(ORDER_BEAM, ORDER_WORK // (n * n)))
    # executed mask -> (peak, live, order as (last, rest) links, nodes ready to run)
    states: dict[int, tuple] = {0: (0, 0, None, frozenset(i for i in range(n) if not preds[i]))}
    steps = 0
    for _ in range(n):
        following: dict[int, tuple] = {}
        for done, (peak, live, order, ready) in states.items():
            steps += len(ready)
            if steps > ORDER_STEPS:
                return list(nodes)
            for i in ready:
                after = done | 1 << i
                dying = [v for v in reads[i] if consumers[v] & ~after == 0]
                new = made[i]
                in_place = len(nodes[i].outputs) == 1 and any(r in dying and size[r] for r in reuse[i])
                if in_place:
                    new = 0  # the output takes over a dying operand's buffer
                during = live + new
                freed = sum(size[v] for v in dying) + unread[i] - (made[i] if in_place else 0)
                key = (max(peak, during), during - freed)
                if after not in following or key < following[after][:2]:
                    unlocked = [j for j in successors[i] if preds[j] & ~after == 0]
                    following[after] = (*key, (i, order), (ready - {i}).union(unlocked))
        if len(following) > beam:
            following = dict(sorted(following.items(), key=lambda kv: kv[1][:2])[:beam])
        states = following
    (_, _, links, _), = states.values()
    order = []
    while links is not None:
        order.append(links[0])
        links = links[1]
    return [nodes[i] for i in reversed(order)]


def _place(order: list[Value], sizes: dict[int, int], life: dict[int, tuple[int, int]]) -> tuple[dict, int]:
    """Place buffers in `order`, each at the lowest offset that overlaps no placed buffer alive at the same time
    (best fit among the gaps); returns (offsets, arena bytes)."""
    placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last)
    offsets: dict[int, int] = {}
    for value in order:
        size = sizes[value._id]
        first, last = life[value._id]
        busy = sorted((o, o + s) for o, s, f, l in placed if not (l < first or last < f))
        best, best_gap, cursor = None, None, 0
        for start, end in busy:
            gap = start - cursor
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, end)
        offset = best if best is not None else cursor
        offsets[value._id] = offset
        placed.append((offset, size, first, last))
    return offsets, max((o + s for o, s, _, _ in placed), default=0)


PLACEMENT_ORDERS = {
    "largest first": lambda size, first, last: (-size, first),
    "earliest first": lambda size, first, last: (first, -size),
    "longest-lived first": lambda size, first, last: (-(last - first), -size),
    "most byte-steps first": lambda size, first, last: (-size * (last - first + 1), first),
}
"""Greedy placement orders tried by `plan`; none is best for every graph."""

RANDOM_ORDERS = 64
"""Then, while the arena is above the lower bound, seeded random orders (alternately random within size classes
and fully random): BERT-tiny's fused residual MatMuls leave every fixed order 17% above the bound, a few random
ones reach it."""


def plan(module: Module, in_place: bool = True) -> MemoryPlan:
    """Greedy placement (see _place) in each of PLACEMENT_ORDERS, keeping the smallest arena. A buffer is a
    value, or a chain of values sharing it in place (views and, with `in_place`, elementwise ops over a dying
    operand: see in_place_aliases, and Concats assembled in their inputs' producers: see concat_slices), alive
    from the first's definition to the last one's last use."""
    views, computed, assembled, life, values = _buffers(module, in_place)
    aliases = {**views, **computed}
    everything = intermediates(module)
    sizes = {v._id: _align(max(v.type.nbytes, 1)) for v in values}
    lower_bound = plan_lower_bound(module, in_place)

    def random_orders():
        rng = random.Random(0)  # seeded: the same model always gets the same plan
        for attempt in range(RANDOM_ORDERS):
            shuffled = list(values)
            rng.shuffle(shuffled)
            yield sorted(shuffled, key=lambda v: -sizes[v._id]) if attempt % 2 == 0 else shuffled

    best = None
    fixed = (sorted(values, key=lambda v: (*key(sizes[v._id], *life[v._id]), v._id))
             for key in PLACEMENT_ORDERS.values())
    for order in itertools.chain(fixed, random_orders()):
        candidate = _place(order, sizes, life)
        if best is None or candidate[1] < best[1]:
            best = candidate
        if best[1] <= lower_bound:
            break  # no order can do better
    offsets, arena = best
    for out, slices in assembled.items():
        for value, offset in slices.items():
            offsets[aliases.get(value, value)] = offsets[out] + offset
    for member, root in aliases.items():
        offsets[member] = offsets[root]
    unplanned = sum(_align(max(v.type.nbytes, 1)) for v in everything)
    return MemoryPlan(offsets, arena, lower_bound, unplanned, views, computed, assembled)


def plan_best_order(module: Module, reorder: bool = True, in_place: bool = True) -> MemoryPlan:
    """The plan of the current node order, or (with `reorder`) of memory_order's order when its arena is smaller;
    the module keeps the order whose plan is returned, so ordering never raises the arena."""
    current = plan(module, in_place)
    if not reorder:
        return current
    original = list(module.graph.nodes)
    ordered = memory_order(module, in_place)
    if all(a is b for a, b in zip(ordered, original)):
        return current  # the graph order is already the one found
    module.graph.nodes = ordered
    reordered = plan(module, in_place)
    if reordered.arena_bytes < current.arena_bytes:
        return reordered
    module.graph.nodes = original
    return current


@register_pass
@dataclass(frozen=True)
class PlanMemoryPass(Pass):
    """Assign each intermediate tensor an offset in one arena, reusing memory of tensors no longer alive.

    First the node order: with `reorder` (default), the topological order with the smallest peak of live
    intermediates is searched (dynamic programming over the sets of nodes run, exact for the few parallel
    branches of CNN blocks, a beam on wide graphs; Liberis & Lane 2019) and kept when its arena is smaller.
    Liveness comes from that order. Ops whose output is their input's bytes (Reshape, Flatten, Squeeze,
    Unsqueeze, Identity) work in place when their input dies there: output and input share one buffer and the op
    costs nothing at run time. With `in-place` (default), an elementwise op (Relu, Clip, Add, Mul, ...) whose
    operand of the output's shape and element size dies there writes its result over that operand (its kernel
    reads and writes the same index; broadcast operands never). A Concat whose inputs are each one contiguous run
    of its output (every dim before the axis is 1, as for channels at batch 1) and read by it alone is assembled
    in place: each input's producer writes straight into its slice, and the Concat runs no code. Buffers are
    placed at the lowest offset that overlaps no placed buffer alive at the same time (64-byte aligned), in a few
    greedy orders (largest first, earliest first, ...), then seeded random ones until the lower bound is reached,
    keeping the smallest arena.
    Graph inputs and outputs live in the caller's buffers, constants in the object's read-only data. The plan
    goes to `module.memory_plan`, with the arena size, the sum of all intermediates (what no planning costs) and
    the lower bound of this order (the most bytes alive at one step).

    Requires: topologically-sorted, shapes-inferred. Establishes: memory-planned (any later change to the
    graph invalidates it).

    Example: a chain a -> Neg -> b -> Exp -> c needs one slot: b and c are computed in place.
    """

    name = "plan-memory"
    requires = frozenset({TOPO_SORTED, SHAPES_INFERRED})
    establishes = frozenset({MEMORY_PLANNED})
    preserves = frozenset({TOPO_SORTED, SHAPES_INFERRED, MEMORY_PLANNED})
    reorder: bool = True
    in_place: bool = True

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        result = plan_best_order(module, self.reorder, self.in_place)
        module.memory_plan = result
        return PassResult(True, {"arena-bytes": result.arena_bytes, "lower-bound-bytes": result.lower_bound_bytes,
                                 "unplanned-bytes": result.unplanned_bytes,
                                 "in-place-ops": len(result.in_place) + len(result.aliases)})
