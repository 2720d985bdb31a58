"""Edge/cloud partitioning: `edgecc.partition(model, device=, server=, bandwidth=, rtt_ms=)` -> Partition.

The model is cut on its folded graph (import, shape inference, constant folding: every ONNX node that computes at
run time, under its ONNX name). Each node costs what the compiled whole model costs on each side (the cost model
of `edgecc.estimate` when present, else host profile timings; a fused node's time is its namesake's, the nodes it
absorbed cost nothing). The cut itself is `partition_cut.solve` (a minimum s-t cut). Both halves are cut out of
the folded graph's ONNX export with onnx-graphsurgeon and compiled for their targets, so each half is the same
subgraph as ONNX (`server.onnx` runs in onnxruntime) and as native code.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from edgecc.api import parse_shape_bindings
from edgecc.errors import EdgeccError
from edgecc.partition_cut import CutCost, CutProblem, solve

TRANSFER_DTYPES = ("float32", "float16", "int8")
FLOAT16_MAX = float(np.finfo(np.float16).max)
_PREFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmg]?)\s*(bit/s|bps|b/s|byte/s)?\s*$", re.IGNORECASE)


def parse_bandwidth(text: str | float | int) -> float:
    """'10Mbit/s', '10 Mbps', '1.5MB/s' (bytes: capital B), '800kbit/s' or a number of bits/s -> bits/s (k = 1000)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _RATE.match(str(text))
        if not match:
            raise EdgeccError(f"bad bandwidth '{text}'", where="--bandwidth",
                              hint="write e.g. 10Mbit/s, 100kbit/s, 1Gbps, 2MB/s or a number of bits per second")
        number, prefix, unit = match.groups()
        unit = unit or "bit/s"
        per_unit = 8 if unit == "B/s" or unit.lower() == "byte/s" else 1
        value = float(number) * _PREFIXES[prefix.lower()] * per_unit
    if not np.isfinite(value) or value <= 0:
        raise EdgeccError(f"bandwidth must be positive, got '{text}'", where="--bandwidth", hint="e.g. 10Mbit/s")
    return value


def parse_duration_ms(text: str | float | int) -> float:
    """'20ms', '0.02s', '150us' or a number of milliseconds -> milliseconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)?\s*$", str(text))
        if not match:
            raise EdgeccError(f"bad round-trip time '{text}'", where="--rtt", hint="write e.g. 20ms, 0.02s or 150us")
        value = float(match.group(1)) * {"ms": 1.0, None: 1.0, "s": 1e3, "us": 1e-3}[match.group(2)]
    if not np.isfinite(value) or value < 0:
        raise EdgeccError(f"round-trip time must be >= 0, got '{text}'", where="--rtt", hint="e.g. 20ms")
    return value


def check_transfer_dtype(dtype: str) -> str:
    if dtype not in TRANSFER_DTYPES:
        raise EdgeccError(f"unknown transfer dtype '{dtype}'", where="--transfer-dtype",
                          hint=f"use one of {', '.join(TRANSFER_DTYPES)}")
    return dtype


# ----------------------------------------------------------------------------------------------- the link format
def transfer_bytes(dtype_name: str, size: int, transfer_dtype: str) -> int:
    """Bytes a tensor takes on the link: float32 tensors in the transfer dtype (int8 adds its scale and zero
    point), every other dtype as it is."""
    if dtype_name != "float32" or transfer_dtype == "float32":
        return size * np.dtype(dtype_name).itemsize
    return size * 2 if transfer_dtype == "float16" else size + 8


def encode(array: np.ndarray, transfer_dtype: str) -> dict[str, np.ndarray]:
    """One tensor as the arrays sent for it. float16 rounds to nearest (relative error <= 2^-11 in float16's
    normal range; values beyond +-65504 are refused); int8 is affine uint8 over [min(x, 0), max(x, 0)] (zero stays
    exact, absolute error <= scale / 2 per element)."""
    if array.dtype != np.float32 or transfer_dtype == "float32":
        return {"raw": np.ascontiguousarray(array)}
    if transfer_dtype == "float16":
        peak = float(np.max(np.abs(array))) if array.size else 0.0
        if peak > FLOAT16_MAX:
            raise EdgeccError(f"a cut tensor reaches {peak:g}, beyond float16's range", where="--transfer-dtype float16",
                              hint="use float32 or int8 transfer")
        return {"f16": array.astype(np.float16)}
    low = min(float(array.min()), 0.0) if array.size else 0.0
    high = max(float(array.max()), 0.0) if array.size else 0.0
    scale = (high - low) / 255.0 or 1.0
    zero_point = np.round(-low / scale)
    quantised = np.clip(np.round(array / scale) + zero_point, 0, 255).astype(np.uint8)
    return {"u8": quantised, "scale": np.array([scale, zero_point], dtype=np.float64)}


def decode(parts: Mapping[str, np.ndarray]) -> np.ndarray:
    if "raw" in parts:
        return parts["raw"]
    if "f16" in parts:
        return parts["f16"].astype(np.float32)
    scale, zero_point = (float(v) for v in parts["scale"])
    return ((parts["u8"].astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


def transfer_error_bound(parts: Mapping[str, np.ndarray]) -> float:
    """The largest absolute error the conversion can bring to one element of this tensor."""
    if "raw" in parts:
        return 0.0
    if "f16" in parts:  # half an ulp of float16, relative in the normal range, 2^-25 among subnormals
        return float(np.max(np.abs(parts["f16"].astype(np.float32)), initial=0.0)) * 2.0 ** -11 + 2.0 ** -25
    scale = float(parts["scale"][0])  # half a step, plus float32 rounding of the dequantised value
    return scale / 2.0 + 255.0 * scale * 2.0 ** -23


def pack(tensors: Mapping[str, np.ndarray], transfer_dtype: str) -> bytes:
    """The message for a dict of tensors: an .npz whose entries are `<part>:<tensor name>`."""
    arrays = {f"{part}:{name}": data for name, array in tensors.items()
              for part, data in encode(np.asarray(array), transfer_dtype).items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack(message: bytes) -> dict[str, dict[str, np.ndarray]]:
    """The encoded parts of each tensor in a message (decode() each)."""
    with np.load(io.BytesIO(message), allow_pickle=False) as data:
        tensors: dict[str, dict[str, np.ndarray]] = {}
        for key in data.files:
            part, _, name = key.partition(":")
            tensors.setdefault(name, {})[part] = data[key]
    return tensors


# ------------------------------------------------------------------------------------------------ devices, costs
def load_side(spec, role: str):
    """The Device of one side: a profile name or board file; for the server also an x86 target preset, costed as
    this machine running that preset's code."""
    from edgecc.backends.targets import PRESETS
    from edgecc.devices import load_device

    if role == "server" and isinstance(spec, str) and spec in PRESETS and spec.startswith("x86"):
        from dataclasses import replace

        return replace(load_device("host"), target=spec)
    try:
        return load_device(spec)
    except EdgeccError as exc:
        where = f"--{role}" if exc.where in (None, "--device") else exc.where  # a board file's error names its field
        raise EdgeccError(exc.message, where=where, hint=exc.hint) from None


def node_times(compiled, device) -> dict[str, float]:
    """Milliseconds per node of a compiled whole model on `device`, from edgecc.estimate (measured kernel times on
    the host, qemu instruction counts x cycles per instruction on ARM boards; cached by object code)."""
    from edgecc.estimate import estimate

    return {op.node: float(op.latency_ms) for op in estimate(compiled, device).ops}


# ---------------------------------------------------------------------------------------------------- the plan
def folded_module(model, input_shapes=None):
    """The graph the cut is taken on: imported, shapes inferred, constants folded, dead nodes removed."""
    from edgecc.frontend.onnx_import import import_model
    from edgecc.passes import PassContext, PassManager, parse_pipeline

    module = import_model(model, parse_shape_bindings(input_shapes))
    PassManager(parse_pipeline("infer-shapes,fold-constants,dce"), PassContext()).run(module)
    return module


def build_problem(module, device_ms: Mapping[str, float], server_ms: Mapping[str, float], bandwidth_bps: float,
                  rtt_ms: float, transfer_dtype: str) -> CutProblem:
    """The cut problem of a folded module: nodes in order with their times (0 for nodes a fused kernel absorbed)."""
    graph = module.graph
    nodes, node_inputs, node_outputs, tensor_bytes = {}, {}, {}, {}
    for value in graph.inputs:
        tensor_bytes[value.name] = transfer_bytes(value.type.dtype.name, value.type.size, transfer_dtype)
    for node in graph.nodes:
        nodes[node.name] = (float(device_ms.get(node.name, 0.0)), float(server_ms.get(node.name, 0.0)))
        node_inputs[node.name] = [v.name for v in node.inputs if v is not None and not v.is_const]
        node_outputs[node.name] = [v.name for v in node.outputs]
        for value in node.outputs:
            tensor_bytes[value.name] = transfer_bytes(value.type.dtype.name, value.type.size, transfer_dtype)
    if len(nodes) != len(graph.nodes):
        raise EdgeccError("node names are not unique after import", where="partition",
                          hint="give every ONNX node a distinct name")
    return CutProblem(nodes, node_inputs, node_outputs, tensor_bytes, [v.name for v in graph.inputs],
                      list(graph.output_names), bandwidth_bps, rtt_ms)


class Planner:
    """The costs of one model on one device and server, computed once; `plan()` then solves the cut for a link
    and `build()` compiles the halves (the eval tool sweeps bandwidths with one Planner)."""

    def __init__(self, model, device="host", server="host", *, input_shapes=None, **compile_options):
        import edgecc
        from edgecc.frontend.onnx_export import export_model

        self.device = load_side(device, "device")
        self.server = load_side(server, "server")
        self.input_shapes = input_shapes
        self.options = compile_options
        self.module = folded_module(model, input_shapes)
        self.onnx = export_model(self.module)
        whole_device = edgecc.compile(model, target=self.device.target, input_shapes=input_shapes, name="whole",
                                      **compile_options)
        whole_server = edgecc.compile(model, target=self.server.target, input_shapes=input_shapes, name="whole",
                                      **compile_options)
        self.device_ms = node_times(whole_device, self.device)
        self.server_ms = node_times(whole_server, self.server)
        names = {n.name for n in self.module.graph.nodes}
        self.unmapped = {side: {n: ms for n, ms in times.items() if n not in names} for side, times in
                         (("device", self.device_ms), ("server", self.server_ms))}
        """Costed nodes the folded graph does not have (made by a pass): their time is left out of the cut."""

    def problem(self, bandwidth, rtt_ms=0.0, transfer_dtype="float32") -> CutProblem:
        return build_problem(self.module, self.device_ms, self.server_ms, parse_bandwidth(bandwidth),
                             parse_duration_ms(rtt_ms), check_transfer_dtype(transfer_dtype))

    def plan(self, bandwidth, rtt_ms=0.0, transfer_dtype="float32") -> dict[str, CutCost]:
        return solve(self.problem(bandwidth, rtt_ms, transfer_dtype))

    def build(self, bandwidth, rtt_ms=0.0, transfer_dtype="float32") -> "Partition":
        problem = self.problem(bandwidth, rtt_ms, transfer_dtype)
        solution = solve(problem)
        chosen = solution["chosen"]
        device_onnx, server_onnx = split_onnx(self.onnx, self.module, problem, chosen)
        import edgecc

        def compile_half(half, side, name):
            if half is None:
                return None
            names = {i.name for i in half.graph.input}
            shapes = {k: v for k, v in parse_shape_bindings(self.input_shapes).items() if k in names}
            return edgecc.compile(half, target=side.target, input_shapes=shapes or None, name=name, **self.options)

        report = partition_report(problem, solution, self.device, self.server, transfer_dtype, self.unmapped)
        return Partition(device_model=compile_half(device_onnx, self.device, "device"),
                         server_model=compile_half(server_onnx, self.server, "server"),
                         cut=list(chosen.up), returned=list(chosen.down), outputs=list(problem.outputs),
                         inputs=list(problem.inputs), transfer_dtype=transfer_dtype, report=report,
                         device_onnx=device_onnx, server_onnx=server_onnx)


def split_onnx(model, module, problem: CutProblem, chosen: CutCost):
    """(device half, server half) as ONNX models cut out with onnx-graphsurgeon (None for an empty half).
    Device half: graph inputs -> the crossing tensors it computes + the graph outputs it computes. Server
    half: the crossing tensors -> the graph outputs it computes."""
    import onnx
    import onnx_graphsurgeon as gs

    types = {v.name: v.type for v in module.graph.values() if not v.is_const}
    up_from_device = [t for t in chosen.up if t not in problem.inputs]
    on_device_outputs = [t for t in dict.fromkeys(problem.outputs) if t not in chosen.down and t not in problem.inputs]
    device_outputs = list(dict.fromkeys(up_from_device + on_device_outputs))

    def half(inputs: list[str] | None, outputs: list[str]):
        if not outputs:
            return None
        graph = gs.import_onnx(model)
        tensors = graph.tensors()
        missing = [n for n in (inputs or []) + outputs if n not in tensors]
        if missing:
            raise EdgeccError(f"tensor(s) {', '.join(missing)} not found in the exported graph", where="partition")

        def variable(name):
            tensor = tensors[name]
            tensor.dtype, tensor.shape = types[name].dtype.numpy, list(types[name].shape)
            return tensor

        if inputs is not None:
            graph.inputs = [variable(n) for n in inputs]
        graph.outputs = [variable(n) for n in outputs]
        graph.cleanup(remove_unused_graph_inputs=True).toposort()
        exported = gs.export_onnx(graph)
        onnx.checker.check_model(exported)
        return exported

    return half(None, device_outputs), half(list(chosen.up), list(chosen.down))


def partition_report(problem: CutProblem, solution: dict[str, CutCost], device, server, transfer_dtype: str,
                     unmapped: dict) -> dict:
    chosen = solution["chosen"]
    which = ("all_server" if not chosen.device_nodes else "all_device" if len(chosen.device_nodes) == len(problem.nodes)
             else "min_cut")
    return {
        "device": getattr(device, "name", str(device)), "device_target": device.target,
        "server": getattr(server, "name", str(server)), "server_target": server.target,
        "bandwidth_bps": problem.bandwidth_bps, "rtt_ms": problem.rtt_ms, "transfer_dtype": transfer_dtype,
        "transfer_error": TRANSFER_ERRORS[transfer_dtype],
        "assumptions": "inputs start on the device, outputs return to the device; one round trip",
        "inputs": list(problem.inputs), "outputs": list(problem.outputs),
        "chosen_is": which,
        "latency_ms": {k: solution[k].total_ms for k in ("chosen", "all_device", "all_server")},
        "cut": [{"tensor": t, "bytes": problem.tensor_bytes[t], "direction": "up"} for t in chosen.up]
               + [{"tensor": t, "bytes": problem.tensor_bytes[t], "direction": "down"} for t in chosen.down],
        "device_nodes": len(chosen.device_nodes), "server_nodes": len(problem.nodes) - len(chosen.device_nodes),
        "solutions": {k: solution[k].as_dict() for k in ("chosen", "all_device", "all_server")},
        "cost_nodes_not_in_folded_graph": unmapped,
    }


TRANSFER_ERRORS = {
    "float32": "none: tensors cross bit for bit",
    "float16": "relative error <= 2^-11 per element (float16 rounding); values beyond +-65504 are refused",
    "int8": "absolute error <= scale/2 per element (plus float32 rounding), scale = (max(x,0) - min(x,0)) / 255 "
            "per tensor (affine uint8)",
}


@dataclass
class Partition:
    """The two halves of a model and how to run them. `device_model`/`server_model` are None when the chosen
    cut leaves that side empty (all-server / all-device)."""

    device_model: Any
    server_model: Any
    cut: list[str]                    # tensors sent up (graph inputs among them when the server reads them)
    returned: list[str]               # graph outputs the server computes and sends back
    outputs: list[str]
    inputs: list[str]
    transfer_dtype: str
    report: dict
    device_onnx: Any = None
    server_onnx: Any = None
    last_transfer: dict = field(default_factory=dict)
    """After run(): {tensor: {"bytes", "max_abs_error", "bound"}} of the tensors that crossed."""

    def run(self, feeds: Mapping[str, np.ndarray], remote: str | None = None) -> list[np.ndarray]:
        """Run the device half here, send the cut tensors (converted to the transfer dtype) to the server half
        (in this process, or over TCP to `edgecc serve` at remote="HOST:PORT") and return the outputs in order."""
        missing, unknown = [n for n in self.inputs if n not in feeds], sorted(set(feeds) - set(self.inputs))
        if missing or unknown:
            from edgecc.errors import InputError

            raise InputError(f"missing input(s) {', '.join(missing)}" if missing else
                             f"unknown input(s) {', '.join(unknown)}", hint=f"the model's inputs are "
                             f"{', '.join(self.inputs)}")
        values = {k: np.asarray(v) for k, v in feeds.items()}
        if self.device_model is not None:
            device_feeds = {name: values[name] for name in self.device_model.input_names}
            values.update(zip(self.device_model.output_names, self.device_model.run(device_feeds)))
        if self.cut or self.returned:
            message = pack({t: values[t] for t in self.cut}, self.transfer_dtype)
            reply = self._server_call(message, remote)
            self._note_transfer(message, values)
            values.update({k: decode(parts) for k, parts in unpack(reply).items()})
        return [values[name] for name in self.outputs]

    def _server_call(self, message: bytes, remote: str | None) -> bytes:
        if remote is not None or self.server_model is None:
            if remote is None:
                raise EdgeccError("this partition has no server half loaded", where="Partition.run",
                                  hint="pass remote='HOST:PORT' of `edgecc serve SPLIT/server`")
            from edgecc.serve import request

            return request(remote, message)
        return serve_message(self.server_model, message)

    def _note_transfer(self, message: bytes, values: Mapping[str, np.ndarray]) -> None:
        self.last_transfer = {}
        for name, parts in unpack(message).items():
            sent = decode(parts)
            error = float(np.max(np.abs(sent.astype(np.float64) - values[name]), initial=0.0)) if sent.size else 0.0
            self.last_transfer[name] = {"bytes": sum(p.nbytes for p in parts.values()), "max_abs_error": error,
                                        "bound": transfer_error_bound(parts)}

    @classmethod
    def load(cls, folder: str) -> "Partition":
        """The device side of a split written by save(): device/device.onnx compiled for the device target (run
        it with remote= pointing at `edgecc serve FOLDER/server`)."""
        import edgecc

        try:
            with open(os.path.join(folder, "split.json")) as f:
                report = json.load(f)
            cut = [c["tensor"] for c in report["cut"] if c["direction"] == "up"]
            returned = [c["tensor"] for c in report["cut"] if c["direction"] == "down"]
            inputs, outputs, target = report["inputs"], report["outputs"], report["device_target"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EdgeccError(f"not a split written by `edgecc partition` ({exc})", where=folder,
                              hint="run edgecc partition MODEL ... -o DIR first") from None
        device_path = os.path.join(folder, "device", "device.onnx")
        device_model = edgecc.compile(device_path, target=target, name="device") if os.path.isfile(device_path) \
            else None
        return cls(device_model, None, cut, returned, outputs, inputs, report["transfer_dtype"], report)

    def save(self, folder: str) -> list[str]:
        """Write `folder/device/` (native artifacts, device.onnx), `folder/server/` (native artifacts, server.onnx,
        server.json for `edgecc serve`) and `folder/split.json`, all or nothing. Returns the paths."""
        from edgecc.fileio import json_bytes, write_files

        files: dict[str, bytes] = {}
        for side, compiled, half in (("device", self.device_model, self.device_onnx),
                                     ("server", self.server_model, self.server_onnx)):
            if compiled is None:
                continue
            files.update(compiled.artifacts(os.path.join(folder, side, side), "all"))
            files[os.path.join(folder, side, f"{side}.onnx")] = half.SerializeToString()
        if self.server_model is not None:
            files[os.path.join(folder, "server", "server.json")] = json_bytes({
                "inputs": self.server_model.input_names, "outputs": self.server_model.output_names,
                "target": self.server_model.target, "transfer_dtype": self.transfer_dtype})
        files[os.path.join(folder, "split.json")] = json_bytes(self.report)
        return write_files(files)


def serve_message(server_model, message: bytes, transfer_dtype: str | None = None) -> bytes:
    """The server half's side of one exchange: decode the cut tensors, run, send the outputs back (float32
    outputs go back bit for bit: they are the answer, and small)."""
    received = {name: decode(parts) for name, parts in unpack(message).items()}
    missing = [n for n in server_model.input_names if n not in received]
    if missing:
        raise EdgeccError(f"the message lacks tensor(s) {', '.join(missing)}", where="server")
    outputs = server_model.run({n: received[n] for n in server_model.input_names})
    return pack(dict(zip(server_model.output_names, outputs)), "float32")


def partition(model, device="host", server="host", bandwidth="10Mbit/s", rtt_ms=0.0, transfer_dtype="float32",
              *, input_shapes=None, **compile_options) -> Partition:
    """Split `model` between `device` (a device profile name or file, or "host") and `server` ("host" or an x86
    preset such as "x86-64") for a link of `bandwidth` ("10Mbit/s" or bits/s) and `rtt_ms` (a number of ms or
    "20ms"), sending float32 cut tensors as `transfer_dtype` (float32, float16 or int8). Other keyword
    arguments go to edgecc.compile for both halves (opt_level, ...). See docs/partitioning.md."""
    parse_bandwidth(bandwidth)
    parse_duration_ms(rtt_ms)
    check_transfer_dtype(transfer_dtype)
    planner = Planner(model, device, server, input_shapes=input_shapes, **compile_options)
    return planner.build(bandwidth, rtt_ms, transfer_dtype)
