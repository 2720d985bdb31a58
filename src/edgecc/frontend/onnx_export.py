"""edgecc IR → ONNX, so an optimised graph opens in Netron and runs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.defs
from onnx import helper, numpy_helper

from edgecc.errors import EdgeccError
from edgecc.frontend.attributes import python_to_attribute
from edgecc.frontend.onnx_import import CANONICAL_OPSET
from edgecc.ir.core import Module, Value
from edgecc.ir.dtypes import DType
from edgecc.ops import get
from edgecc.ops.codebook import with_dense_weights
from edgecc.ops.fused import BASE_OP, PREVIOUS, activation_params, onnx_stages
from edgecc.ops.qelementwise import lookup_source
from edgecc.ops.registry import EDGECC_DOMAIN


def _node_proto(op: str, domain: str, inputs: list[str], outputs: list[str], attrs: dict, name: str) -> onnx.NodeProto:
    opdef = get(op, domain)
    proto = helper.make_node(op, inputs, outputs, name=name or None, domain=domain or None)
    proto.attribute.extend(python_to_attribute(k, v, opdef.attrs[k].kind if opdef and k in opdef.attrs else None)
                           for k, v in sorted(attrs.items()))
    return proto


class _Stage(int):
    """An expansion stage's input that is the result of stage number `int(self)` (not only the previous one)."""


def _without_zero_zero_point(data, scale, zero_point) -> list:
    """DequantizeLinear's inputs, leaving out a zero point of zeros: ONNX wants a per-axis one shaped like the scale,
    where edgecc keeps one scalar."""
    if zero_point is None or (zero_point.is_const and not np.asarray(zero_point.const).any()):
        return [data, scale]
    return [data, scale, zero_point]


def qlinear_conv_stages(inputs: list, attrs: dict) -> list[tuple[str, list, dict]] | None:
    """QLinearConv in QDQ form (DequantizeLinear of x, w and the int32 bias B, Conv, QuantizeLinear), so an int8 model
    exports in one format; None (keep QLinearConv, standard ONNX too) for a nonzero scalar zero point of per-channel
    weights, which DequantizeLinear cannot express."""
    x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp = inputs[:8]
    b = inputs[8] if len(inputs) > 8 else None
    w_inputs = _without_zero_zero_point(w, w_s, w_zp)
    if len(w_inputs) == 3 and w_s.type.size > 1 and w_zp.type.size != w_s.type.size:
        return None
    stages = [("DequantizeLinear", [x, x_s, x_zp], {}), ("DequantizeLinear", w_inputs, {"axis": 0})]
    conv_inputs = [_Stage(0), _Stage(1)]
    if b is not None:
        stages += [("Mul", [x_s, w_s], {}), ("DequantizeLinear", [b, _Stage(2)], {"axis": 0})]
        conv_inputs.append(_Stage(3))
    stages += [("Conv", conv_inputs, dict(attrs)), ("QuantizeLinear", [PREVIOUS, y_s, y_zp], {})]
    return stages


def qgemm_stages(inputs: list, attrs: dict) -> list[tuple[str, list, dict]]:
    """edgecc.QGemm as the QDQ form onnxruntime reads: DequantizeLinear of A, B and the int32 bias C (scale
    a_scale * b_scale, zero point 0), Gemm (2-D A) or MatMul + Add, QuantizeLinear to y's scale and zero point.
    The float path equals QGemm's integer definition up to float32 accumulation and rounding ties (1 step)."""
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = inputs[:8]
    c = inputs[8] if len(inputs) > 8 else None
    trans_b = int(attrs.get("transB", 0))
    b_inputs = _without_zero_zero_point(b, b_s, b_zp)
    stages = [("DequantizeLinear", [a, a_s, a_zp], {}),
              ("DequantizeLinear", b_inputs, {"axis": 0 if trans_b else 1})]
    bias = None
    if c is not None:
        stages.append(("Mul", [a_s, b_s], {}))
        stages.append(("DequantizeLinear", [c, _Stage(2)], {"axis": 0}))
        bias = _Stage(3)
    if a.type.rank == 2:
        stages.append(("Gemm", [_Stage(0), _Stage(1)] + ([bias] if bias is not None else []), {"transB": trans_b}))
    else:
        weights = _Stage(1)
        if trans_b:
            stages.append(("Transpose", [_Stage(1)], {"perm": [1, 0]}))
            weights = _Stage(len(stages) - 1)
        stages.append(("MatMul", [_Stage(0), weights], {}))
        if bias is not None:
            stages.append(("Add", [PREVIOUS, bias], {}))
    stages.append(("QuantizeLinear", [PREVIOUS, y_s, y_zp], {}))
    return stages


def qelementwise_stages(op: str, inputs: list, attrs: dict) -> list[tuple[str, list, dict]]:
    """edgecc's integer elementwise ops as the QDQ form they are defined by: QLinearAdd/Mul as DequantizeLinear
    x2, Add/Mul, its Relu/Clip, QuantizeLinear; QLookup as DequantizeLinear, the original op (attributes and constant
    inputs from op_attrs/op_inputs), QuantizeLinear; QLinearGlobalAveragePool as DQ, GlobalAveragePool, Q."""
    if op in ("QLinearAdd", "QLinearMul"):
        a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = inputs
        stages = [("DequantizeLinear", [a, a_s, a_zp], {}), ("DequantizeLinear", [b, b_s, b_zp], {}),
                  (op[len("QLinear"):], [_Stage(0), _Stage(1)], {})]
        act = attrs.get("activation", "")
        if act == "Relu":
            stages.append(("Relu", [PREVIOUS], {}))
        elif act == "Clip":
            params = activation_params(act, attrs.get("activation_params"))
            stages.append(("Clip", [PREVIOUS, np.float32(params["min"]), np.float32(params["max"])], {}))
    elif op == "QLookup":
        if len(inputs) < 6 or any(v is None for v in inputs):
            raise EdgeccError("edgecc.QLookup without its x/y scales and zero points cannot be exported as QDQ",
                              hint="give the lookup the parameters its table was built from (lower-qdq does)")
        x, _table, x_s, x_zp, y_s, y_zp = inputs
        source_attrs, extra = lookup_source(attrs)
        stages = [("DequantizeLinear", [x, x_s, x_zp], {}),
                  (attrs["op"], [PREVIOUS] + ["" if e is None else np.float32(e) for e in extra], source_attrs)]
    else:  # QLinearGlobalAveragePool
        x, x_s, x_zp, y_s, y_zp = inputs
        stages = [("DequantizeLinear", [x, x_s, x_zp], {}), ("GlobalAveragePool", [PREVIOUS], {})]
    stages.append(("QuantizeLinear", [PREVIOUS, y_s, y_zp], {}))
    return stages


QELEMENTWISE = ("QLinearAdd", "QLinearMul", "QLookup", "QLinearGlobalAveragePool")


def _expanded(node, stages, names: dict, claim, initializers: list) -> list[onnx.NodeProto]:
    """An edgecc node as the standard ONNX ops it stands for (`stages`), so exported models run anywhere."""
    out = node.outputs[0]
    protos, results = [], []
    for k, (op, inputs, attrs) in enumerate(stages):
        names_in = []
        for v in inputs:
            if isinstance(v, _Stage):
                names_in.append(results[v])
            elif v is PREVIOUS:
                names_in.append(results[-1])
            elif isinstance(v, str):  # an absent optional input
                names_in.append(v)
            elif isinstance(v, np.ndarray | np.generic):
                # float constants take a float output's type (float16 epilogues); next to integer outputs they
                # are inputs of the float op inside a QDQ expansion and keep their own
                dtype = out.type.dtype.numpy if out.type.dtype.is_float else np.asarray(v).dtype
                const = Value(f"{out.name}_{op.lower()}_bound", const=np.asarray(v, dtype))
                initializers.append(numpy_helper.from_array(const.const, claim(const, const.name)))
                names_in.append(names[const._id])
            else:
                names_in.append(names[v._id] if v is not None else "")
        if k == len(stages) - 1:
            result = names[out._id]
        else:
            result = claim(Value(f"{out.name}_{op.lower()}"), f"{out.name}_{op.lower()}")
        protos.append(_node_proto(op, "", names_in, [result], attrs, f"{node.name}_{k}_{op.lower()}" if k else node.name))
        results.append(result)
    return protos


def _widen_stored_weights(graph, names: dict, claim) -> list[onnx.NodeProto]:
    """Casts to float for fp16-stored weights (float16 constants read by ops on float32 data, see convert-fp16):
    ONNX wants one element type per op, so each such weight is read through a Cast; returns the Cast nodes."""
    casts = []
    for value in graph.constants():
        readers = value.users
        if value.type.dtype != DType.float16 or not readers or any(
                r.inputs[0] is value or r.inputs[0].type.dtype != DType.float32 for r in readers):
            continue
        source = names[value._id]
        widened = claim(Value(f"{source}_f32"), f"{source}_f32")
        casts.append(helper.make_node("Cast", [source], [widened], name=f"cast_{source}", to=onnx.TensorProto.FLOAT))
        names[value._id] = widened  # the readers now take the widened copy
    return casts


def _opset_for(module: Module, nodes: list[onnx.NodeProto]) -> int:
    """The model's opset (at least the canonical 18), raised to the newest op used (Gelu, formed by
    fuse-epilogues, exists from opset 20)."""
    opset = max(module.opset, CANONICAL_OPSET)
    for node in nodes:
        if not node.domain and not onnx.defs.has(node.op_type, opset):
            opset = max(opset, onnx.defs.get_schema(node.op_type).since_version)
    return opset


def export_model(module: Module) -> onnx.ModelProto:
    """Build a ModelProto with the module's graph; opset is the module's (at least the canonical 18). Weights shared
    through a codebook (edgecc.CodebookDecode) are written dense."""
    module = with_dense_weights(module)
    graph = module.graph
    names: dict[int, str] = {}
    taken: set[str] = set()

    def claim(value: Value, preferred: str) -> str:
        name = preferred
        i = 1
        while name in taken:
            name = f"{preferred}_{i}"
            i += 1
        taken.add(name)
        names[value._id] = name
        return name

    # Graph inputs and outputs keep their user-visible names; everything else keeps its IR name if free.
    taken.update(v.name for v in graph.inputs)
    for value in graph.inputs:
        names[value._id] = value.name
    output_slots = {}
    for value, out_name in zip(graph.outputs, graph.output_names):
        producer_ok = value.producer is not None and value._id not in output_slots and value._id not in names
        if producer_ok and out_name not in taken:
            output_slots[value._id] = out_name
            taken.add(out_name)
            names[value._id] = out_name
    taken.update(graph.output_names)

    initializers, nodes = [], []
    for value in graph.constants():
        claim(value, value.name or "const")
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(value.const), names[value._id]))
    nodes.extend(_widen_stored_weights(graph, names, claim))
    for node in graph.nodes:
        for value in node.outputs:
            if value._id not in names:
                claim(value, value.name or "v")
        if node.domain == EDGECC_DOMAIN and node.op in BASE_OP:
            nodes.extend(_expanded(node, onnx_stages(node.op, node.inputs, node.attrs), names, claim, initializers))
            continue
        if not node.domain and node.op == "QLinearConv":
            stages = qlinear_conv_stages(node.inputs, node.attrs)
            if stages is not None:
                nodes.extend(_expanded(node, stages, names, claim, initializers))
                continue
        if node.domain == EDGECC_DOMAIN and node.op == "QGemm":
            nodes.extend(_expanded(node, qgemm_stages(node.inputs, node.attrs), names, claim, initializers))
            continue
        if node.domain == EDGECC_DOMAIN and node.op in QELEMENTWISE:
            stages = qelementwise_stages(node.op, node.inputs, node.attrs)
            nodes.extend(_expanded(node, stages, names, claim, initializers))
            continue
        nodes.append(_node_proto(node.op, node.domain, [names[v._id] if v is not None else "" for v in node.inputs],
                                 [names[v._id] for v in node.outputs], node.attrs, node.name))
    # Outputs that are inputs, constants, or repeated need an Identity to carry their own name.
    for value, out_name in zip(graph.outputs, graph.output_names):
        if names.get(value._id) != out_name:
            nodes.append(helper.make_node("Identity", [names[value._id]], [out_name], name=f"output_{out_name}"))

    def info(name: str, value: Value):
        return helper.make_tensor_value_info(name, value.type.dtype.onnx, list(value.type.shape))

    inputs = [info(v.name, v) for v in graph.inputs]
    outputs = [info(n, v) for v, n in zip(graph.outputs, graph.output_names)]
    value_info = [info(names[v._id], v) for n in graph.nodes for v in n.outputs
                  if v.type is not None and names[v._id] not in graph.output_names]
    onnx_graph = helper.make_graph(nodes, graph.name, inputs, outputs, initializers, value_info=value_info)
    model = helper.make_model(onnx_graph, producer_name="edgecc",
                              opset_imports=[helper.make_opsetid("", _opset_for(module, nodes))])
    model.ir_version = min(model.ir_version, 10)
    for key, val in sorted(module.metadata.items()):
        if key != "producer":
            model.metadata_props.add(key=key, value=str(val))
    return model
