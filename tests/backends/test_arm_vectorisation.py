"""The hot loops of Conv and Gemm kernels use the target's vector FMA: `fmla v.4s` on armv8, `vfma.f32 q` on
armv7 (NEON with VFPv4) and `vfmadd...ps` on zmm registers on x86-64-v4. Instruction counts under qemu
(tools/arm_insncount.py) say how fast ARM code is; these tests say why, from the -O3 assembly alone (no cross
toolchain or qemu needed). Kernels are found and counted by the tool's own helpers, so the tool's report and the
tests agree on what "vectorised" means."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

TOOL_PATH = pathlib.Path(__file__).resolve().parents[2] / "tools" / "arm_insncount.py"
_spec = importlib.util.spec_from_file_location("arm_insncount", TOOL_PATH)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

RNG = np.random.default_rng(7)
def _model(node, inputs: list, output_shape: list, weights: dict):
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
                              [numpy_helper.from_array(a, n) for n, a in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def conv_model():
    """Conv 8->16 channels, 3x3, pads 1, on 16x16, with bias (weights are constants, as in real models)."""
    weights = {"w": RNG.standard_normal((16, 8, 3, 3)).astype(np.float32),
               "b": RNG.standard_normal(16).astype(np.float32)}
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return _model(node, [("x", [1, 8, 16, 16])], [1, 16, 16, 16], weights)


def gemm_model():
    """Gemm 64x64 by a constant 64x64 matrix (transB, as exported Linear layers) plus bias."""
    weights = {"w": RNG.standard_normal((64, 64)).astype(np.float32),
               "b": RNG.standard_normal(64).astype(np.float32)}
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    return _model(node, [("x", [64, 64])], [64, 64], weights)


MODELS = {"Conv": conv_model, "Gemm": gemm_model}


def _op_kernels(op: str, target: str) -> dict[str, str]:
    bodies = tool.kernels(tool.assembly(MODELS[op](), target))
    found = {k: body for k, body in bodies.items() if k.endswith(f"_{op}")}
    assert found, f"no {op} kernel in the {target} assembly (functions: {sorted(bodies)})"
    return found


@pytest.mark.parametrize("op", sorted(MODELS))
@pytest.mark.parametrize("target", [
    "armv8",
    "armv7",
    "x86-64-v4",
])
def test_hot_loop_uses_the_vector_fma(op, target):
    counts = {k: len(tool.FMA_PATTERNS[target].findall(body)) for k, body in _op_kernels(op, target).items()}
    assert all(counts.values()), f"{op} kernels without `{tool.FMA_NAMES[target]}` on {target}: {counts}"
