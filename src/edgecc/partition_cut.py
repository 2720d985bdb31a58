"""Where to cut a model between a device and a server: a minimum s-t cut of its DAG (DADS, Hu et al., INFOCOM 2019).

The problem is pure data (node times on each side, tensor sizes, the link), so it can be solved and checked
against brute force without compiling anything. Assumptions, stated once:
- the device runs a part closed under predecessors, sends the tensors that cross, and the server runs the rest
  (one round trip: nothing goes back to the device to be computed there);
- graph inputs start on the device, graph outputs are needed back on the device;
- a tensor consumed by several server nodes is sent once (an auxiliary flow node per tensor);
- the link costs bytes * 8 / bandwidth per crossing tensor, plus the round-trip time once if anything crosses.
The round-trip time is not additive, so the cut is solved without it and then compared with all-device (the only
solution where nothing crosses): the answer is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

SOURCE, SINK = "\0device", "\0server"
NS_PER_MS = 1_000_000  # flow capacities are integer nanoseconds: networkx's max-flow is exact on integers


@dataclass
class CutProblem:
    """A model's DAG with costs. `nodes` in topological order: name -> (device_ms, server_ms)."""

    nodes: dict[str, tuple[float, float]]
    node_inputs: dict[str, list[str]]       # node -> the non-constant tensors it reads
    node_outputs: dict[str, list[str]]
    tensor_bytes: dict[str, int]            # bytes on the link (after any transfer conversion)
    inputs: list[str]                       # graph inputs (on the device)
    outputs: list[str]                      # graph outputs (needed on the device)
    bandwidth_bps: float
    rtt_ms: float = 0.0

    def link_ms(self, tensor: str) -> float:
        return self.tensor_bytes[tensor] * 8.0 / self.bandwidth_bps * 1e3

    def producers(self) -> dict[str, str]:
        return {t: n for n, outs in self.node_outputs.items() for t in outs}

    def consumers(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for node, ins in self.node_inputs.items():
            for tensor in dict.fromkeys(ins):
                result.setdefault(tensor, []).append(node)
        return result


@dataclass
class CutCost:
    """One solution: the nodes on the device, the tensors that cross (up, then outputs coming back) and times."""

    device_nodes: frozenset[str]
    up: list[str]
    down: list[str]
    device_ms: float
    link_ms: float
    server_ms: float
    bytes_up: int = 0
    bytes_down: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def total_ms(self) -> float:
        return self.device_ms + self.link_ms + self.server_ms

    def as_dict(self) -> dict:
        return {"device_ms": self.device_ms, "link_ms": self.link_ms, "server_ms": self.server_ms,
                "total_ms": self.total_ms, "crossing_up": self.up, "crossing_down": self.down,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}


def evaluate(problem: CutProblem, device_nodes) -> CutCost:
    """The cost of running `device_nodes` on the device and the rest on the server (checks the split is valid)."""
    device = frozenset(device_nodes)
    unknown = device - problem.nodes.keys()
    if unknown:
        raise ValueError(f"unknown nodes {sorted(unknown)}")
    producers = problem.producers()
    for node in device:
        for tensor in problem.node_inputs[node]:
            if producers.get(tensor, node) not in device:
                raise ValueError(f"{node} on the device reads {tensor} computed on the server")
    consumers = problem.consumers()
    on_device = lambda tensor: tensor in problem.inputs or producers.get(tensor) in device  # noqa: E731
    up = [t for t in problem.tensor_bytes if on_device(t) and any(c not in device for c in consumers.get(t, ()))]
    down = [t for t in dict.fromkeys(problem.outputs) if not on_device(t)]
    crossing = up + down
    link = sum(problem.link_ms(t) for t in crossing) + (problem.rtt_ms if crossing else 0.0)
    return CutCost(device, up, down,
                   device_ms=sum(problem.nodes[n][0] for n in device),
                   link_ms=link,
                   server_ms=sum(cost[1] for n, cost in problem.nodes.items() if n not in device),
                   bytes_up=sum(problem.tensor_bytes[t] for t in up),
                   bytes_down=sum(problem.tensor_bytes[t] for t in down))


def _ns(ms: float) -> int:
    return int(round(ms * NS_PER_MS))


def flow_graph(problem: CutProblem) -> nx.DiGraph:
    """The DADS flow graph: source side = device. Edges without a capacity are infinite."""
    graph = nx.DiGraph()
    graph.add_nodes_from((SOURCE, SINK))
    outputs = set(problem.outputs)
    for node, (device_ms, server_ms) in problem.nodes.items():
        back = sum(problem.link_ms(t) for t in dict.fromkeys(problem.node_outputs[node]) if t in outputs)
        graph.add_edge(SOURCE, node, capacity=_ns(server_ms + back))  # cut when the node runs on the server
        graph.add_edge(node, SINK, capacity=_ns(device_ms))           # cut when it runs on the device
    producers = problem.producers()
    for tensor, readers in problem.consumers().items():
        producer = producers.get(tensor, SOURCE if tensor in problem.inputs else None)
        if producer is None:
            raise ValueError(f"tensor {tensor} has no producer and is not a graph input")
        aux = ("\0send", tensor)
        graph.add_edge(producer, aux, capacity=_ns(problem.link_ms(tensor)))  # cut when sent
        for reader in readers:
            graph.add_edge(aux, reader)
            if producer != SOURCE:
                graph.add_edge(reader, producer)  # a reader on the device forces its producer there too
    return graph


def solve(problem: CutProblem) -> dict[str, CutCost]:
    """{"chosen", "all_device", "all_server", "min_cut"}: the chosen cut is the cheaper of the minimum cut
    (plus the round trip) and all-device, so it is never worse than either end."""
    if not problem.nodes:
        raise ValueError("the model has no nodes to place")
    _, (device_side, _) = nx.minimum_cut(flow_graph(problem), SOURCE, SINK)
    cut = evaluate(problem, (n for n in problem.nodes if n in device_side))
    all_device = evaluate(problem, problem.nodes)
    all_server = evaluate(problem, ())
    chosen = min((cut, all_device, all_server), key=lambda c: c.total_ms)
    return {"chosen": chosen, "all_device": all_device, "all_server": all_server, "min_cut": cut}


def chain_cut_points(problem: CutProblem) -> list[CutCost]:
    """Every split of the node order into a device prefix and a server suffix (the brute force on chains)."""
    order = list(problem.nodes)
    return [evaluate(problem, order[:k]) for k in range(len(order) + 1)]
