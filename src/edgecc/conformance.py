"""Selection of the ONNX backend conformance cases that fall inside edgecc's scope.

The onnx wheel ships node cases, the `light` model-zoo models (run as the `real` kind), and the `simple`,
`pytorch-converted` and `pytorch-operator` suites. edgecc runs those whose every op is in its op set and
whose every tensor (inputs, outputs, initializers, Cast targets, constants) has a supported dtype.
"""

from __future__ import annotations

import functools
import os

import onnx
from onnx import AttributeProto

from edgecc.ir.dtypes import DType
from edgecc.ops import all_ops

EDGE_OP_SET = frozenset("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv
ConvInteger ConvTranspose Cos CumSum DepthToSpace DequantizeLinear Div Dropout DynamicQuantizeLinear Einsum Elu
Equal Erf Exp Expand Flatten Floor Gather GatherElements Gelu Gemm GlobalAveragePool GlobalMaxPool Greater
GreaterOrEqual HardSigmoid HardSwish Identity InstanceNormalization LayerNormalization LeakyRelu Less LessOrEqual
Log LogSoftmax LRN MatMul MatMulInteger Max MaxPool Mean Min Mish Mod Mul Neg Not Or Pad Pow PRelu QLinearConv
QLinearMatMul QuantizeLinear Range Reciprocal ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize Round Selu Shape Sigmoid Sign Sin Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where
Xor""".split())
"""The op set edgecc commits to (issue 2)."""

SUPPORTED_ELEM_TYPES = frozenset(d.onnx for d in DType)
KINDS = ("node", "real", "simple", "pytorch-converted", "pytorch-operator")


def _tensor_types_ok(model: onnx.ModelProto) -> bool:
    graph = model.graph
    for vi in list(graph.input) + list(graph.output):
        if not vi.type.HasField("tensor_type") or vi.type.tensor_type.elem_type not in SUPPORTED_ELEM_TYPES:
            return False
    if any(init.data_type not in SUPPORTED_ELEM_TYPES for init in graph.initializer):
        return False
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "output_dtype") and attr.type == AttributeProto.INT and attr.i \
                    and attr.i not in SUPPORTED_ELEM_TYPES:
                return False
            if attr.type == AttributeProto.TENSOR and attr.t.data_type not in SUPPORTED_ELEM_TYPES:
                return False
    return True


def in_scope(model: onnx.ModelProto) -> bool:
    """True if every op is in the edge set (default domain) and every tensor has a supported dtype."""
    if any(o.domain not in ("", "ai.onnx") for o in model.opset_import):
        return False
    if any(n.domain not in ("", "ai.onnx") or n.op_type not in EDGE_OP_SET for n in model.graph.node):
        return False
    return _tensor_types_ok(model)


def _model_of(case) -> onnx.ModelProto | None:
    if case.model is not None:
        return case.model
    if case.model_dir is not None:
        return onnx.load(os.path.join(case.model_dir, "model.onnx"))
    if case.url and case.url.startswith("onnx/backend/test/data/light/"):
        root = os.path.dirname(os.path.dirname(onnx.__file__))
        return onnx.load(os.path.join(root, case.url))
    return None


@functools.lru_cache(maxsize=None)
def selected_cases() -> dict[str, tuple[str, ...]]:
    """{kind: names of in-scope test cases}."""
    from onnx.backend.test.loader import load_model_tests

    selection = {}
    for kind in KINDS:
        names = []
        for case in load_model_tests(kind=kind):
            model = _model_of(case)
            if model is not None and in_scope(model):
                names.append(case.name)
        selection[kind] = tuple(sorted(names))
    return selection


def missing_ops() -> list[str]:
    """Ops of the edge set that the registry does not define (should be empty)."""
    return sorted(EDGE_OP_SET - set(all_ops()))
