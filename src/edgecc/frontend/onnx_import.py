"""ONNX → edgecc IR.

Reads a model safely (clear errors for missing, non-ONNX or truncated files, and external data only from inside
the model's own folder), lists every unsupported op at once, lifts old opsets to the canonical opset-18 forms
with onnx's version converter, binds symbolic input dims, and turns initializers and Constant nodes into
constant values. Types of node outputs are left to the infer-shapes pass.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, external_data_helper, numpy_helper, version_converter

from edgecc.errors import ModelLoadError, ShapeError, UnsupportedOpError, VerificationError
from edgecc.frontend.attributes import attribute_to_python
from edgecc.ir.core import Graph, Module, Node, Value
from edgecc.ir.dtypes import DType
from edgecc.ir.types import TensorType
from edgecc import ops

CANONICAL_OPSET = 18
"""Models older than this are lifted to it; the op registry implements ops in their opset-18+ form."""

ONNX_DOMAINS = ("", "ai.onnx")


def read_model(source, *, label: str | None = None) -> tuple[ModelProto, str | None]:
    """Load a ModelProto from a path, bytes or proto; returns (model, folder for external data)."""
    if isinstance(source, ModelProto):
        return source, None
    if type(source).__module__.startswith("onnx_graphsurgeon"):
        import onnx_graphsurgeon as gs

        if isinstance(source, gs.Graph):
            return gs.export_onnx(source), None
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ModelLoadError("no such file", where=path, hint="check the path to the .onnx model")
    if os.path.isdir(path):
        raise ModelLoadError("is a directory, not an ONNX model file", where=path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ModelLoadError(f"cannot read: {exc.strerror}", where=path) from None
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError:
        raise ModelLoadError("not an ONNX model, or the file is truncated (protobuf parse failed)", where=path,
                             hint="re-export the model or check the download") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError("not an ONNX model (no graph found)", where=path,
                             hint="pass a .onnx file exported by a framework")
    folder = os.path.dirname(os.path.abspath(path))
    _load_external_data(model, folder, path)
    return model, folder


def _load_external_data(model: ModelProto, folder: str, path: str) -> None:
    """Load tensors stored beside the model, refusing any location outside the model's folder."""
    root = os.path.realpath(folder)
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        target = os.path.realpath(os.path.join(root, info.location))
        if os.path.isabs(info.location) or os.path.commonpath([root, target]) != root:
            raise ModelLoadError(f"external data '{info.location}' of tensor '{tensor.name}' points outside the "
                                 f"model's folder", where=path,
                                 hint="keep external data files next to the model")
        if not os.path.isfile(target):
            raise ModelLoadError(f"external data file '{info.location}' of tensor '{tensor.name}' is missing",
                                 where=path, hint="copy the data file next to the model")
        external_data_helper.load_external_data_for_tensor(tensor, root)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def default_opset(model: ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ONNX_DOMAINS:
            return entry.version
    return 1 if not model.opset_import else CANONICAL_OPSET


def check_supported(model: ModelProto, where: str) -> None:
    """Raise one error listing every op outside edgecc's op set."""
    missing = sorted({f"{n.domain + '.' if n.domain not in ONNX_DOMAINS else ''}{n.op_type}"
                      for n in model.graph.node if ops.get(n.op_type, n.domain) is None})
    if missing:
        hint = "see `edgecc ops` for the supported set, or rewrite these ops before export"
        if any(m.startswith("com.microsoft.Q") or m.startswith("com.microsoft.Dynamic") for m in missing):
            hint = ("these are onnxruntime's QOperator-format quantised ops: quantise the float model in QDQ format "
                    "instead (onnxruntime.quantization.quantize_static(..., quant_format=QuantFormat.QDQ)), which "
                    "edgecc lowers to its integer kernels; or compile the float model with --quantize int8")
        raise UnsupportedOpError(f"unsupported op(s): {', '.join(missing)}", where=where, hint=hint)


def lift_opset(model: ModelProto, where: str) -> ModelProto:
    """Lift a model older than opset 18 with onnx's version converter, then repair what it gets wrong."""
    opset = default_opset(model)
    if opset >= CANONICAL_OPSET:
        return model
    # Upsample (opset 7-9) and Resize-10 sample at asymmetric coordinates, rounding down for nearest; the
    # converter maps them to Resize with the default half_pixel mode, which moves every sample.
    legacy_resize_outputs = {n.output[0] for n in model.graph.node
                             if n.op_type == "Upsample" or (n.op_type == "Resize" and opset < 11)}
    if opset < 7:
        model = _per_channel_prelu_slopes(model)
    try:
        lifted = version_converter.convert_version(model, CANONICAL_OPSET)
    except Exception as exc:  # the converter raises plain RuntimeError/ValueError with C++ text
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot lift opset {opset} to {CANONICAL_OPSET}: {first}", where=where,
                             hint=f"re-export the model at opset {CANONICAL_OPSET} or newer") from None
    for node in lifted.graph.node:
        if node.op_type == "Resize" and node.output[0] in legacy_resize_outputs:
            keep = [a for a in node.attribute if a.name not in ("coordinate_transformation_mode", "nearest_mode")]
            del node.attribute[:]
            node.attribute.extend(keep)
            node.attribute.append(onnx.helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
            node.attribute.append(onnx.helper.make_attribute("nearest_mode", "floor"))
    return lifted


def _per_channel_prelu_slopes(model: ModelProto) -> ModelProto:
    """PRelu before opset 7 applies a 1-D slope of length C per channel (axis 1); from opset 7 on it
    broadcasts numpy-style from the right. Reshape such slopes to C x 1 x ... so the meaning survives."""
    if not any(n.op_type == "PRelu" for n in model.graph.node):
        return model
    model = ModelProto.FromString(model.SerializeToString())
    prelus = [n for n in model.graph.node if n.op_type == "PRelu"]
    listed_as_inputs = {vi.name for vi in model.graph.input}
    inits = {i.name: i for i in model.graph.initializer}
    try:
        ranks = {vi.name: len(vi.type.tensor_type.shape.dim)
                 for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    except Exception:  # shape inference is only a hint here
        ranks = {}
    ranks.update({vi.name: len(vi.type.tensor_type.shape.dim) for vi in model.graph.input})
    for node in prelus:
        x, slope = node.input[0], node.input[1]
        rank = ranks.get(x, 0)
        if slope not in inits or rank <= 2 or len(inits[slope].dims) != 1 or inits[slope].dims[0] <= 1:
            continue
        array = numpy_helper.to_array(inits[slope]).reshape((-1,) + (1,) * (rank - 2))
        new_name = f"{slope}_per_channel_{node.output[0]}"
        model.graph.initializer.append(numpy_helper.from_array(array, new_name))
        if slope in listed_as_inputs:  # IR < 4 models list initializers as graph inputs too
            model.graph.input.append(onnx.helper.make_tensor_value_info(new_name, inits[slope].data_type, array.shape))
        node.input[1] = new_name
    return model


def _value_type(vi: onnx.ValueInfoProto, bound: Mapping[str, tuple[int, ...]], where: str) -> TensorType:
    if not vi.type.HasField("tensor_type"):
        raise ModelLoadError(f"input '{vi.name}' is not a tensor", where=where)
    tt = vi.type.tensor_type
    try:
        dtype = DType.from_onnx(tt.elem_type)
    except KeyError as exc:
        raise ModelLoadError(f"input '{vi.name}': {exc.args[0]}", where=where) from None
    if vi.name in bound:
        shape = tuple(bound[vi.name])
        if tt.HasField("shape") and len(tt.shape.dim) != len(shape):
            raise ShapeError(f"--input-shape gives {len(shape)} dims for input '{vi.name}', the model has "
                             f"{len(tt.shape.dim)}", where=where)
        for dim, size in zip(tt.shape.dim, shape):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise ShapeError(f"--input-shape {vi.name}={'x'.join(map(str, shape))} conflicts with the model's "
                                 f"static dim {dim.dim_value}", where=where)
        return TensorType(dtype, shape)
    if not tt.HasField("shape"):
        raise ShapeError(f"input '{vi.name}' has unknown rank", where=where,
                         hint=f"bind it with --input-shape {vi.name}=1x3x224x224 (your dims)")
    dims = []
    for i, dim in enumerate(tt.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            dims.append(dim.dim_value)
        else:
            sym = dim.dim_param or "?"
            raise ShapeError(f"input '{vi.name}' has dynamic dim '{sym}' (axis {i})", where=where,
                             hint=f"bind it with --input-shape {vi.name}=" +
                                  "x".join(str(d.dim_value) if d.HasField('dim_value') else 'N'
                                           for d in tt.shape.dim))
    return TensorType(dtype, tuple(dims))


def import_model(source, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 constant_inputs: Mapping[str, np.ndarray] | None = None) -> Module:
    """Read an ONNX model (path, ModelProto or onnx_graphsurgeon Graph) and build an IR Module.

    `constant_inputs` specialises the model: those graph inputs become constants with the given values
    (for inputs such as Reshape shapes or TopK's k that static shapes need at compile time).
    """
    label = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<model>"
    model, _ = read_model(source)
    check_supported(model, label)
    model = lift_opset(model, label)
    check_supported(model, label)  # lifting may introduce ops of its own
    opset = max(default_opset(model), CANONICAL_OPSET)
    return _build_module(model, dict(input_shapes or {}), label, opset, dict(constant_inputs or {}))


def _build_module(model: ModelProto, input_shapes: dict, where: str, opset: int, frozen: dict) -> Module:
    onnx_graph = model.graph
    graph = Graph(onnx_graph.name or "main")
    graph.reserve_names([i.name for i in onnx_graph.initializer])
    scope: dict[str, Value] = {}

    for init in onnx_graph.initializer:
        try:
            array = numpy_helper.to_array(init)
            DType.from_numpy(array.dtype)
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"initializer '{init.name}': {exc.args[0] if exc.args else exc}", where=where) from None
        scope[init.name] = Value(init.name, const=array.copy())

    initializer_names = set(scope)
    unknown_bindings = set(input_shapes) - {vi.name for vi in onnx_graph.input}
    if unknown_bindings:
        raise ShapeError(f"--input-shape names unknown input(s) {', '.join(sorted(unknown_bindings))}", where=where,
                         hint="inputs are: " + ", ".join(vi.name for vi in onnx_graph.input
                                                          if vi.name not in initializer_names))
    for vi in onnx_graph.input:
        if vi.name in initializer_names:
            continue  # an initializer listed as input (IR < 4): treated as a constant
        expected = _value_type(vi, {**input_shapes, **{k: np.shape(v) for k, v in frozen.items()}}, where)
        if vi.name in frozen:
            array = np.asarray(frozen[vi.name])
            if array.dtype != expected.dtype.numpy:
                raise ShapeError(f"constant input '{vi.name}' has dtype {array.dtype}, the model expects "
                                 f"{expected.dtype.name}", where=where)
            scope[vi.name] = Value(vi.name, const=array)
            graph.reserve_names([vi.name])
            continue
        value = Value(vi.name, expected)
        graph.reserve_names([vi.name])
        graph.inputs.append(value)
        scope[vi.name] = value

    pending = list(onnx_graph.node)
    produced = {out for n in pending for out in n.output if out}
    node_objs: list[tuple[Node, list[str]]] = []
    used_names: set[str] = set()
    for index, proto in enumerate(pending):
        name = proto.name or f"{proto.op_type}_{index}"
        while name in used_names:
            name = f"{name}_{index}"
        used_names.add(name)
        label = f"node '{name}' ({proto.op_type})"
        opdef = ops.get(proto.op_type, proto.domain)
        attrs = {a.name: attribute_to_python(a, where=f"{where}: {label}") for a in proto.attribute}
        opdef.complete_attrs(attrs, where=f"{where}: {label}")
        for inp in proto.input:
            if inp and inp not in scope and inp not in produced:
                raise VerificationError(f"{label} reads '{inp}', which no node, input or initializer defines",
                                        where=where)
        if proto.op_type == "Constant" and opdef.foldable:
            from edgecc.ops.registry import Call

            full = opdef.complete_attrs(attrs)
            (array,) = opdef.run_reference(Call("Constant", [], full, 1, where=f"{where}: {label}"))
            graph.reserve_names([proto.output[0]])
            scope[proto.output[0]] = Value(proto.output[0], const=array)
            continue
        node = Node(proto.op_type, attrs=attrs, name=name,
                    domain="" if proto.domain in ONNX_DOMAINS else proto.domain)  # edgecc's own ops keep theirs
        for out in proto.output:
            if out:
                graph.reserve_names([out])
                value = Value(out)
                scope[out] = value
                node.append_output(value)
            else:
                node.append_output(Value(graph.unique_name(f"{name}_unused")))
        node_objs.append((node, list(proto.input)))

    for node, input_names in node_objs:
        # Trailing omitted inputs are dropped; interior ones stay as None.
        while input_names and input_names[-1] == "":
            input_names.pop()
        for inp in input_names:
            node.append_input(scope[inp] if inp else None)
        graph.nodes.append(node)

    for vi in onnx_graph.output:
        if vi.name not in scope:
            raise VerificationError(f"graph output '{vi.name}' is not produced by any node", where=where)
        graph.add_output(scope[vi.name], vi.name)

    _sort_or_report_cycle(graph, where)
    module = Module(graph, opset, name=onnx_graph.name or "model",
                    metadata={p.key: p.value for p in model.metadata_props})
    module.metadata.setdefault("producer", model.producer_name)
    return module


def _sort_or_report_cycle(graph: Graph, where: str) -> None:
    import networkx as nx

    dep = graph.dependency_graph()
    try:
        order = list(nx.lexicographical_topological_sort(dep))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(dep)
        names = [graph.nodes[a].name for a, _ in cycle]
        raise VerificationError(f"the graph has a cycle through nodes {' -> '.join(names)}", where=where,
                                hint="ONNX graphs must be acyclic; re-export the model") from None
    graph.nodes = [graph.nodes[i] for i in order]
