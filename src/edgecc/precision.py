"""Precision lowering as a compile step: `quantize="int8"` (post-training, from calibration data) or "fp16".

Quantisation has to see the model as the kernels will: BatchNorm folded into Conv, constants folded. So int8
runs the float clean-up pipeline first, measures activation ranges on that module (edgecc.calibration), then
inserts QDQ (quantize-int8) and lowers it to integer ops (lower-qdq). The regular -O pipeline follows.
"""

from __future__ import annotations

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.ir.core import Module
from edgecc.passes import PassContext, PassManager, parse_pipeline

MODES = ("int8", "fp16")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
PREPARE_PIPELINE = ("infer-shapes,lower-qdq,canonicalize,fold-constants,fold-batchnorm,cse,canonicalize,"
                    "fold-constants,dce")
"""What runs before calibration: the float graph as it will be quantised (BatchNorm folded, no dead code)."""


def check_options(quantize: str | None, calibration, method: str) -> None:
    if quantize is None:
        if calibration is not None:
            raise EdgeccError("calibration data was given without quantize", where="--calibration",
                              hint="add --quantize int8 (or drop --calibration)")
        return
    if quantize not in MODES:
        raise EdgeccError(f"unknown quantize mode '{quantize}'", where="--quantize", hint="use int8 or fp16")
    if method not in CALIBRATION_METHODS:
        raise EdgeccError(f"unknown calibration method '{method}'", where="--calibration-method",
                          hint=f"use one of {', '.join(CALIBRATION_METHODS)}")


def _run(module: Module, pipeline: str, ctx: PassContext | None = None) -> dict:
    manager = PassManager(parse_pipeline(pipeline), ctx or PassContext())
    manager.run(module)
    return {r.name: r.stats for r in manager.history}


def _keep_list(keep_fp32) -> str:
    if not keep_fp32:
        return ""
    names = keep_fp32.split(",") if isinstance(keep_fp32, str) else list(keep_fp32)
    return ",".join(n.strip() for n in names if n.strip())


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
    points = {}
    for node in qdq.graph.nodes:
        if node.op == "DequantizeLinear" and node.inputs[0].producer is not None \
                and node.inputs[0].producer.op == "QuantizeLinear":
            points[node.inputs[0].producer.inputs[0].name] = node.outputs[0].name
    return points


def _collect(module: Module, samples: list, names: set[str]) -> dict[str, list[np.ndarray]]:
    from edgecc.interpreter import run_module

    seen: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def observe(value, array):
        if value.name in seen:
            seen[value.name].append(np.array(array, copy=True))

    outputs = [run_module(module, s, observe=observe) for s in samples]
    seen["<outputs>"] = [np.concatenate([o.ravel() for o in out]) for out in outputs]
    return seen


def layer_sensitivity(float_module: Module, qdq: Module, samples: list) -> tuple[list[dict], float]:
    """Per quantised op: the SQNR (dB) of its quantised output and of its quantised input against the float
    module's on `samples`; plus the model's output SQNR. Values keep their names through quantize-int8."""
    points = _quantised_points(qdq)
    ops = []
    for node in qdq.graph.nodes:
        if node.op in ("Conv", "Gemm", "MatMul") and all(
                v.producer is not None and v.producer.op == "DequantizeLinear" for v in node.inputs[:2]):
            x_float = node.inputs[0].producer.inputs[0].producer.inputs[0].name
            out = node.outputs[0]
            reader = out.uses[0][0] if len(out.uses) == 1 else None
            point = reader.outputs[0].name if reader is not None and reader.op in ("Relu", "Clip") \
                and reader.outputs[0].name in points else out.name
            if point in points:
                ops.append((node, x_float, point))
    float_values = _collect(float_module, samples, {x for _, x, _ in ops} | {p for _, _, p in ops})
    quant_names = {points[x] for _, x, _ in ops if x in points} | {points[p] for _, _, p in ops}
    quant_values = _collect(qdq, samples, quant_names)

    def sqnr(name: str) -> float:
        if name not in points:
            return float("inf")
        return sqnr_db(np.concatenate([a.ravel() for a in float_values[name]]),
                       np.concatenate([a.ravel() for a in quant_values[points[name]]]))

    layers = [{"node": node.name, "op": node.op, "input_sqnr_db": round(sqnr(x), 2), "sqnr_db": round(sqnr(p), 2)}
              for node, x, p in ops]
    output = sqnr_db(np.concatenate(float_values["<outputs>"]), np.concatenate(quant_values["<outputs>"]))
    return layers, output


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
    keep = _keep_list(keep_fp32)
    _run(module, PREPARE_PIPELINE)
    known = {n.name for n in module.graph.nodes}
    unknown = [n for n in keep.split(",") if n and n not in known]
    if unknown:
        raise EdgeccError(f"--keep-fp32 names no node called {', '.join(unknown)}", where="--keep-fp32",
                          hint="node names are the ONNX node names (see `edgecc MODEL --emit ir`)")
    samples = load_calibration(calibration, module)
    ranges = collect_ranges(module, samples, needed_ranges(module), method=method, progress=progress)
    probe = samples[:SENSITIVITY_SAMPLES]
    float_module = module.clone()
    kept = [n for n in keep.split(",") if n]
    while True:
        qdq = float_module.clone()
        PassManager([QuantizeInt8Pass(keep_fp32=",".join(kept))], PassContext(calibration_ranges=ranges)).run(qdq)
        layers, output_sqnr = layer_sensitivity(float_module, qdq, probe)
        if min_sqnr is None or output_sqnr >= min_sqnr or not layers:
            break
        worst = max(layers, key=lambda r: r["input_sqnr_db"] - r["sqnr_db"])
        kept.append(worst["node"])
    module.graph = qdq.graph
    stats = _run(module, "lower-qdq,dce")
    return {"mode": "int8", "calibration_samples": len(samples), "calibration_method": method, "kept_fp32": kept,
            "output_sqnr_db": round(output_sqnr, 2), "min_sqnr_db": min_sqnr, "layers": layers, "passes": stats}


def convert_fp16(module: Module, target) -> dict:
    """Store weights as float16 (after the -O pipeline, so the weights are the fused kernels' final ones); on
    targets with half-precision arithmetic (+fullfp16) run the graph in float16 too."""
    compute = "fp16" if "+fullfp16" in target.features.split(",") else "fp32"
    stats = _run(module, f"convert-fp16{{compute={compute}}}")
    return {"mode": "fp16", "compute": compute, "passes": stats}
