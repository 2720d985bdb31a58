"""What the compression pass tests share: small ONNX models, onnxruntime as the reference, prepared modules."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import edgecc
from edgecc import precision
from edgecc.frontend.onnx_export import export_model
from edgecc.frontend.onnx_import import import_model
from edgecc.interpreter import run_module
from edgecc.ir.core import Module
from edgecc.passes import PassContext, PassManager, parse_pipeline


def init(rng, name, shape, scale=0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def prepared(model) -> Module:
    """The module compression sees: imported, then edgecc.precision.PREPARE_PIPELINE."""
    module = import_model(model)
    PassManager(parse_pipeline(precision.PREPARE_PIPELINE), PassContext()).run(module)
    return module


def with_initializers(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `arrays` hold the given values instead."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name in arrays:
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(arrays[tensor.name], dtype=np.float32), tensor.name))
    return copy


def weight_initializer(model: onnx.ModelProto, node_name: str, index: int = 1) -> str:
    return next(n.input[index] for n in model.graph.node if n.name == node_name)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).copy()


def close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    """|actual - expected| <= rtol * max|expected| everywhere (float32 summation order may differ)."""
    scale = max(float(np.abs(expected).max()), 1e-30)
    error = float(np.abs(actual.astype(np.float64) - expected).max())
    assert error <= rtol * scale, f"max error {error:.3g} > {rtol:g} * {scale:.3g}"


def compile_module(module: Module):
    """edgecc's native code for a module (exported and compiled like a user's model)."""
    return edgecc.compile(export_model(module))


def run_shared_model(shared_dir, name: str, compress) -> tuple[list[dict], np.ndarray]:
    """Prepare ../shared/data/<name>.onnx, apply `compress(module) -> records`, compile it natively and run the
    first test sample; returns the records and the output after checking it is finite, shaped as the original's, and
    equal (1e-4 of the largest output) to edgecc's interpreter and to onnxruntime on the exported module."""
    path = shared_dir / "data" / f"{name}.onnx"
    module = prepared(str(path))
    records = compress(module)
    sample = np.load(shared_dir / "data" / f"{name}_test.npz")["input"][0]
    expected = ort_run(onnx.load(str(path)), {"input": sample})[0]
    output = compile_module(module).run({"input": sample})[0]
    assert output.shape == expected.shape and np.isfinite(output).all()
    reference = run_module(module, {"input": sample})[0]
    close(output, reference, 1e-4)
    close(ort_run(export_model(module), {"input": sample})[0], reference, 1e-4)  # exports as a valid ONNX model
    return records, output

