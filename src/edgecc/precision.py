"""Precision lowering as a compile step: `quantize="int8"` (post-training, from calibration data) or "fp16".

Quantisation has to see the model as the kernels will: BatchNorm folded into Conv, constants folded. So int8
runs the float clean-up pipeline first, measures activation ranges on that module (edgecc.calibration), then
inserts QDQ (quantize-int8) and lowers it to integer ops (lower-qdq). The regular -O pipeline follows.
"""

from __future__ import annotations

from edgecc.errors import EdgeccError
from edgecc.ir.core import Module
from edgecc.passes import PassContext, PassManager, parse_pipeline

MODES = ("int8", "fp16")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
PREPARE_PIPELINE = "infer-shapes,lower-qdq,canonicalize,fold-constants,fold-batchnorm,cse,canonicalize,fold-constants,dce"
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


def quantize_int8(module: Module, calibration, method: str = "minmax", keep_fp32=None, progress=None) -> dict:
    """Quantise `module` in place (see the module docstring); returns what was done, for the report."""
    from edgecc.calibration import collect_ranges, load_calibration
    from edgecc.passes.quantize_int8 import needed_ranges

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
    names = needed_ranges(module, frozenset(n for n in keep.split(",") if n))
    ranges = collect_ranges(module, samples, names, method=method, progress=progress)
    stats = _run(module, f"quantize-int8{{keep-fp32={keep}}},lower-qdq,dce" if keep else "quantize-int8,lower-qdq,dce",
                 PassContext(calibration_ranges=ranges))
    return {"mode": "int8", "calibration_samples": len(samples), "calibration_method": method,
            "kept_fp32": [n for n in keep.split(",") if n], "passes": stats}
