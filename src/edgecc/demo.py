"""`edgecc demo`: the main job on a model the package ships, end to end, with its result checked."""

from __future__ import annotations

import os
import time

import numpy as np

DEMO_MODEL = os.path.join(os.path.dirname(__file__), "models", "tiny_cnn.onnx")
TOLERANCE = 1e-5
"""Max relative error allowed against onnx.reference: float32 with a different (folded) operation order."""


def run_demo() -> int:
    import onnx
    import onnx.reference

    import edgecc

    print(f"edgecc demo: compiling {os.path.basename(DEMO_MODEL)} (a small CNN shipped with edgecc) at -O3 for the host")
    compiled = edgecc.compile(DEMO_MODEL, target="host", opt_level=3)
    report = compiled.report
    print(f"  nodes {report['nodes_before']} -> {report['nodes_after']}  ops {report['ops']}")
    print(f"  {report['macs']:,} MACs, {report['weights_bytes']:,} bytes of weights, "
          f"compiled in {report['compile_seconds']:.3f} s")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    compiled.run({"input": x})  # the first call loads the code
    start = time.perf_counter()
    (probs,) = compiled.run({"input": x})
    elapsed = time.perf_counter() - start
    (expected,) = onnx.reference.ReferenceEvaluator(onnx.load(DEMO_MODEL)).run(None, {"input": x})
    error = float(np.max(np.abs(probs - expected)) / max(np.max(np.abs(expected)), 1e-30))
    ok = error <= TOLERANCE
    print(f"  ran in {elapsed * 1e3:.3f} ms as native {compiled.native.target.cpu} code "
          f"(arena {report['arena_bytes']:,} bytes)")
    print(f"  top class {int(np.argmax(probs))} (p={float(np.max(probs)):.4f}); "
          f"max relative error vs onnx.reference {error:.2e} (tolerance {TOLERANCE:.0e}): {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1
