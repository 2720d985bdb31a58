"""Precision lowering as a compile step: `quantize="int8"` (post-training, from calibration data) or "fp16".

Quantisation has to see the model as the kernels will: BatchNorm folded into Conv, constants folded. So int8
runs the float clean-up pipeline first, measures activation ranges on that module (edgecc.calibration), then
inserts QDQ (quantize-int8) and lowers it to integer ops (lower-qdq). The regular -O pipeline follows.
"""

from __future__ import annotations

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.interpreter import collect_values
from edgecc.ir.core import Module
from edgecc.passes import PassContext, PassManager, parse_pipeline

MODES = ("int8", "fp16")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
PREPARE_PIPELINE = ("infer-shapes,lower-qdq,canonicalize,fold-constants,fold-batchnorm,cse,canonicalize,"
                    "fold-constants,dce")
"""What runs before calibration: the float graph as it will be quantised (BatchNorm folded, no dead code)."""


def check_options(quantize, calibration, method: str) -> None:
    if quantize is None:
        if calibration is not None:
            raise EdgeccError("calibration data was given without quantize", where="--calibration",
                              hint="add --quantize int8 (or drop --calibration)")
        return
    for mode in modes(quantize):
        if mode not in MODES:
            raise EdgeccError(f"unknown quantize mode '{mode}'", where="--quantize", hint="use int8 or fp16")
    if method not in CALIBRATION_METHODS:
        raise EdgeccError(f"unknown calibration method '{method}'", where="--calibration-method",
                          hint=f"use one of {', '.join(CALIBRATION_METHODS)}")


def modes(quantize) -> dict[str, list[str] | None]:
    """{mode: layer names, or None for every layer} of `quantize`: one mode ("int8", "fp16") for the whole model,
    or a dict {layer name: mode} (per-layer precision, as edgecc.budgets chooses it; unnamed layers stay float32)."""
    if quantize is None:
        return {}
    if not isinstance(quantize, dict):
        return {quantize: None}
    groups: dict[str, list[str]] = {}
    for layer, mode in quantize.items():
        groups.setdefault(mode, []).append(layer)
    return groups


def run_pipeline(module: Module, pipeline: str, ctx: PassContext | None = None) -> dict:
    manager = PassManager(parse_pipeline(pipeline), ctx or PassContext())
    manager.run(module)
    return {r.name: r.stats for r in manager.history}


def _keep_list(keep_fp32) -> list[str]:
    """Node names from a comma-separated string or a list."""
    if not keep_fp32:
        return []
    names = keep_fp32.split(",") if isinstance(keep_fp32, str) else list(keep_fp32)
    return [n.strip() for n in names if n.strip()]


def _check_names(module: Module, names, what: str) -> None:
    known = {n.name for n in module.graph.nodes}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise EdgeccError(f"{what} names no node called {', '.join(unknown)}", where=what,
                          hint="node names are the ONNX node names (see `edgecc MODEL --emit ir`)")


def keep_for_layers(module: Module, keep_fp32, int8_nodes: list[str]) -> list[str]:
    """keep_fp32 for per-layer int8 (`quantize={layer: "int8"}`): the given list plus every other Conv, Gemm and
    MatMul, so that only `int8_nodes` are quantised (activations between them follow quantize-int8's rules)."""
    _check_names(module, int8_nodes, "--quantize")
    chosen = frozenset(int8_nodes)
    return _keep_list(keep_fp32) + [n.name for n in module.graph.nodes
                                    if n.op in ("Conv", "Gemm", "MatMul") and n.name not in chosen]


SENSITIVITY_SAMPLES = 4
"""Calibration samples the per-layer SQNR is measured on (the interpreter runs the float and QDQ graphs on each)."""


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-quantisation-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - other)^2)."""
    noise = float(np.sum((reference.astype(np.float64) - other.astype(np.float64)) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(signal, 1e-300) / noise))


def _quantised_points(qdq: Module) -> dict[str, str]:
    """{float value name: its DQ(Q(value)) value name} for every activation quantize-int8 routed through QDQ."""
    from edgecc.passes.quantize_int8 import is_qdq_pair

    return {node.inputs[0].producer.inputs[0].name: node.outputs[0].name for node in qdq.graph.nodes
            if is_qdq_pair(node.outputs[0])}


def quantised_layers(float_module: Module, keep: frozenset[str]) -> list[tuple[str, str, str, str]]:
    """(node, op, input value, output value) of each layer quantize-int8 quantises, read on the float module with the
    pass's own rules (`quantisable`, `quant_point`: a folded Relu/Clip or MatMul bias Add moves the output point);
    values keep their names through the pass."""
    from edgecc.passes.quantize_int8 import quant_point, quantisable

    graph = float_module.graph
    return [(n.name, n.op, n.inputs[0].name, quant_point(graph, n).name) for n in graph.nodes if quantisable(n, keep)]


def layer_sensitivity(float_values: dict[str, list[np.ndarray]], qdq: Module, layers: list,
                      samples: list) -> tuple[list[dict], float]:
    """Per quantised layer: the SQNR (dB) of its quantised input and output against the float module's values
    (`float_values`, from `_collect` on the same samples); plus the model's output SQNR."""
    points = _quantised_points(qdq)
    quant_values = collect_values(qdq, samples, {points[v] for _, _, x, p in layers for v in (x, p) if v in points})

    def sqnr(name: str) -> float:
        if name not in points:
            return float("inf")
        return sqnr_db(np.concatenate([a.ravel() for a in float_values[name]]),
                       np.concatenate([a.ravel() for a in quant_values[points[name]]]))

    report = [{"node": node, "op": op, "input_sqnr_db": round(sqnr(x), 2), "sqnr_db": round(sqnr(p), 2)}
              for node, op, x, p in layers if p in points]
    output = sqnr_db(np.concatenate(float_values["<outputs>"]), np.concatenate(quant_values["<outputs>"]))
    return report, output


def quantize_int8(module: Module, calibration, method: str = "minmax", keep_fp32=None, progress=None,
                  min_sqnr: float | None = None) -> dict:
    """Quantise `module` in place (see the module docstring); returns what was done, for the report.

    With `min_sqnr` (dB), the layers whose quantisation loses the most signal (input SQNR minus output SQNR) stay
    float32, one at a time, until the model's output SQNR on the calibration data reaches it."""
    from edgecc.calibration import collect_ranges, load_calibration
    from edgecc.passes.quantize_int8 import QuantizeInt8Pass, needed_ranges

    if calibration is None:
        raise EdgeccError("--quantize int8 needs calibration data", where="--calibration",
                          hint="pass --calibration DATA.npz (one array per input, samples stacked on the first "
                               "axis), a folder of .npy/.npz files, or in Python an iterable of feed dicts")
    kept = _keep_list(keep_fp32)
    run_pipeline(module, PREPARE_PIPELINE)
    known = {n.name for n in module.graph.nodes}
    unknown = [n for n in kept if n not in known]
    if unknown:
        raise EdgeccError(f"--keep-fp32 names no node called {', '.join(unknown)}", where="--keep-fp32",
                          hint="node names are the ONNX node names (see `edgecc MODEL --emit ir`)")
    samples = load_calibration(calibration, module)
    ranges = collect_ranges(module, samples, needed_ranges(module), method=method, progress=progress)
    probe = samples[:SENSITIVITY_SAMPLES]
    float_module = module.clone()
    # falling back only removes layers, so the float values of the first round serve every round
    first = quantised_layers(float_module, frozenset(kept))
    float_values = collect_values(float_module, probe, {v for _, _, x, p in first for v in (x, p)})
    while True:
        qdq = float_module.clone()
        PassManager([QuantizeInt8Pass(keep_fp32=",".join(kept))], PassContext(calibration_ranges=ranges)).run(qdq)
        layers, output_sqnr = layer_sensitivity(float_values, qdq, quantised_layers(float_module, frozenset(kept)),
                                                probe)
        if min_sqnr is None or output_sqnr >= min_sqnr or not layers:
            break
        worst = max(layers, key=lambda r: r["input_sqnr_db"] - r["sqnr_db"])
        kept.append(worst["node"])
    module.graph = qdq.graph
    stats = run_pipeline(module, "lower-qdq,dce")
    return {"mode": "int8", "calibration_samples": len(samples), "calibration_method": method, "kept_fp32": kept,
            "output_sqnr_db": round(output_sqnr, 2), "min_sqnr_db": min_sqnr, "layers": layers, "passes": stats}


def convert_fp16(module: Module, target, layers: list[str] | None = None) -> dict:
    """Store weights as float16 (after the -O pipeline, so the weights are the fused kernels' final ones); on
    targets with half-precision arithmetic (+fullfp16) run the graph in float16 too. With `layers` (node names),
    only those layers' weights are stored in half and everything computes in float32: per-layer precision."""
    if layers is not None:
        from edgecc.passes.convert_fp16 import store_weights_in_half

        _check_names(module, layers, "--quantize")
        converted, saved = store_weights_in_half(module.graph, layers)
        return {"mode": "fp16", "compute": "fp32", "layers": list(layers),
                "passes": {"convert-fp16": {"weights-fp16": converted, "bytes-saved": saved}}}
    compute = "fp16" if "+fullfp16" in target.features.split(",") else "fp32"
    stats = run_pipeline(module, f"convert-fp16{{compute={compute}}}")
    return {"mode": "fp16", "compute": compute, "passes": stats}
