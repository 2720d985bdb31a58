"""The real architectures in ../shared/models: import, optimise at -O0 and -O3, export back to ONNX, and still
give onnxruntime's outputs. Also checked: edgecc's own run (reference interpreter) against onnxruntime.

Tolerance: max relative error <= 1e-5, relative to the largest magnitude of onnxruntime's output (the
models have random weights, so some outputs are tiny; see ../shared/models/README.md). Folding BatchNorm
into Conv weights and reordering float32 sums moves results by a few ulp of the largest activation, well
inside that bound.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edgecc

MODELS = ["mlp_mnist", "lenet5", "bert_tiny_enc", "squeezenet1_1", "shufflenet_v2_x1_0", "mobilenet_v2", "resnet18"]
LARGE = {"squeezenet1_1", "shufflenet_v2_x1_0", "mobilenet_v2", "resnet18"}
TOLERANCE = 1e-5


def _session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected)) / max(np.max(np.abs(expected)), 1e-30))


@pytest.mark.shared
@pytest.mark.parametrize("opt_level", [0, 3])
@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow) if m in LARGE else m for m in MODELS])
def test_shared_model(shared_dir, name, opt_level):
    path = shared_dir / "models" / f"{name}.onnx"
    ref = np.load(shared_dir / "models" / f"{name}.ref.npz")
    feeds = {"input": ref["input"]}
    original = onnx.load(str(path))
    (expected,) = _session(original.SerializeToString()).run(None, feeds)

    compiled = edgecc.compile(str(path), opt_level=opt_level)
    exported = compiled.to_onnx()
    onnx.checker.check_model(exported)
    (from_export,) = _session(exported.SerializeToString()).run(None, feeds)
    assert _rel_error(from_export, expected) <= TOLERANCE

    (ours,) = compiled.run(feeds)
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    assert _rel_error(ours, expected) <= TOLERANCE
    if opt_level == 3:
        assert compiled.report["nodes_after"] <= compiled.report["nodes_before"]
        assert "BatchNormalization" not in compiled.report["ops"]
