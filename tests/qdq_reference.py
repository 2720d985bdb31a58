"""onnxruntime as the reference for QDQ models: the graph as ONNX defines it (DequantizeLinear, the float op,
QuantizeLinear), with onnxruntime's QDQ fusions turned off.

Why not onnxruntime's default session: with its graph optimisations on, onnxruntime fuses DQ/op/Q into its own
integer kernels, and on x86-64 without AVX-512 VNNI (AVX2 only, e.g. Zen 3) its u8s8 kernels multiply with
`vpmaddubsw`, whose int16 pair sums saturate (onnxruntime's quantization docs warn of this and suggest
reduce_range). Those results then depend on the host CPU (the digits CNN drops from 98.8% to 77% on a Zen 3
here) and are not the ONNX semantics, which onnx.reference and edgecc follow. With fusions off the result is
the same on every host and equals onnx.reference.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def qdq_session(model) -> ort.InferenceSession:
    """An onnxruntime session running `model` (a path, bytes or a ModelProto) as written."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def float_path(model, feeds) -> np.ndarray:
    """The first output of the QDQ model as written (DQ -> float op -> Q)."""
    return qdq_session(model).run(None, feeds)[0]


def qdq_runner(model):
    """feeds -> first output of the QDQ model as written (one session, many runs)."""
    session = qdq_session(model)
    return lambda feeds: session.run(None, feeds)[0]


def reference_runner(model):
    """feeds -> first output by onnx.reference, for QOperator models (QLinearConv, QLinearMatMul): onnxruntime
    runs those on the same CPU-dependent kernels as its fused QDQ. onnx.reference (1.23) implements
    Quantize/DequantizeLinear from opset 19 on only; for int8/uint8 their opset-13 definition is the same, so
    older models are read as opset 19."""
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(model) if isinstance(model, str) else onnx.ModelProto.FromString(model.SerializeToString())
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 19:
            opset.version = 19
    evaluator = ReferenceEvaluator(model)
    return lambda feeds: evaluator.run(None, feeds)[0]
