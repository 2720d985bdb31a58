"""Parser of the textual IR (lark grammar in grammar.lark) back into a Module."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import LarkError, UnexpectedInput, VisitError

from edgecc.errors import IRParseError
from edgecc.ir.core import Graph, Module, Node, Value
from edgecc.ir.dtypes import DType
from edgecc.ir.types import SparseEncoding, TensorType


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    path = os.path.join(os.path.dirname(__file__), "grammar.lark")
    with open(path) as f:
        return Lark(f.read(), parser="lalr", maybe_placeholders=True)


def _unquote(token: Token) -> str:
    text = str(token)
    return json.loads(text) if text.startswith('"') else text


_OMITTED = ("omitted", None)
"""An explicitly omitted optional operand (`none`), told apart from lark's placeholders for absent pieces."""


class _Literal:
    """A constant literal before its tensor type is known."""

    def __init__(self, kind: str, payload):
        self.kind, self.payload = kind, payload

    def to_array(self, ttype: TensorType, side_arrays) -> np.ndarray:
        dtype = ttype.dtype.numpy
        if self.kind == "list":
            flat = np.array(self.payload, dtype=np.float64 if dtype.kind == "f" else None)
            if flat.size != ttype.size:
                raise IRParseError(f"dense literal has {flat.size} elements, its type {ttype} needs {ttype.size}")
            return flat.astype(dtype).reshape(ttype.shape)
        if self.kind == "hex":
            data = bytes.fromhex(self.payload)
            if len(data) != ttype.nbytes:
                raise IRParseError(f"dense_hex literal has {len(data)} bytes, its type {ttype} needs {ttype.nbytes}")
            return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(ttype.shape)
        if self.kind == "external":
            if side_arrays is None or self.payload not in side_arrays:
                raise IRParseError(f"external constant '{self.payload}' not found in the side file")
            return np.asarray(side_arrays[self.payload]).astype(dtype).reshape(ttype.shape)
        raise IRParseError("this IR has elided constants (dense_elided) and cannot be parsed back",
                           hint="print it with large constants inline or external")


@v_args(inline=True)
class _ToTree(Transformer):
    def tensor_type(self, token, sparse=None):
        *dims, dtype = str(token).split("x")
        return TensorType(DType.from_short(dtype), tuple(int(d) for d in dims), sparse=sparse)

    def sparse_csr(self):
        return SparseEncoding("csr")

    def sparse_block(self, token):
        try:
            return SparseEncoding("block", tuple(int(d) for d in str(token).split("x")))
        except ValueError as exc:
            raise IRParseError(str(exc), hint="blocks are written 1xV, e.g. sparse<block 1x8>") from None

    def value_ref(self, token):
        return ("value", _unquote(token))

    def symbol(self, token):
        return ("symbol", _unquote(token))

    def number(self, token):
        text = str(token)
        if text in ("inf", "-inf", "nan"):
            return float(text)
        if any(c in text for c in ".eE"):
            return float(text)
        return int(text)

    def scalar(self, token):
        if isinstance(token, Token) and token.type in ("TRUE", "FALSE"):
            return token.type == "TRUE"
        return token

    def dense_list(self, *items):
        return _Literal("list", [] if items == (None,) else list(items))

    def dense(self, body):
        return body

    def dense_hex(self, token):
        return _Literal("hex", _unquote(token))

    def external(self, token):
        return _Literal("external", _unquote(token))

    def elided(self):
        return _Literal("elided", None)

    def string(self, token):
        return _unquote(token)

    def list(self, *items):
        return [] if items == (None,) else list(items)

    def tensor_attr(self, literal, ttype):
        return ("tensor", literal, ttype)

    def attr(self, name, value):
        return (str(name), value)

    def attr_dict(self, *attrs):
        return dict(a for a in attrs if a is not None)

    def location(self, token):
        return ("loc", _unquote(token))

    def type_or_unknown(self, item):
        return None if isinstance(item, Token) else item

    def result_types(self, *types):
        return list(types)

    def operand(self, item):
        return _OMITTED if isinstance(item, Token) and item.type == "NONE" else item

    def output(self, ref, name):
        return (ref, _unquote(name))

    def ret(self, *outputs):
        return ("return", [o for o in outputs if o is not None])

    def graph_input(self, ref, ttype):
        return ("input", ref[1], ttype)

    def constant(self, sym, literal, ttype):
        return ("const", sym[1], literal, ttype)


def parse_module(text: str, source: str = "<ir>", side_arrays=None) -> Module:
    """Parse IR text. `side_arrays` maps keys of `external<"key">` constants to arrays."""
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as exc:
        raise IRParseError(f"syntax error at line {exc.line}, column {exc.column}: "
                           f"{exc.get_context(text).strip().splitlines()[0]!r}", where=source) from None
    except LarkError as exc:
        raise IRParseError(f"cannot parse: {exc}", where=source) from None
    try:
        tree = _ToTree().transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, IRParseError):
            exc.orig_exc.where = source
            raise exc.orig_exc from None
        raise
    return _Builder(source, side_arrays).build(tree.children[0])


class _Builder:
    def __init__(self, source: str, side_arrays):
        self.source = source
        self.side_arrays = side_arrays

    def fail(self, message: str):
        raise IRParseError(message, where=self.source)

    def build(self, module_tree) -> Module:
        sym, attrs, *rest = module_tree.children
        graph_tree = rest[-1]
        constants: dict[str, Value] = {}
        for item in rest[:-1]:
            _, name, literal, ttype = item
            try:
                array = literal.to_array(ttype, self.side_arrays)
            except IRParseError as exc:
                exc.where = f"{self.source}: @{name}"
                raise
            constants[name] = Value(name, const=array)
            if ttype.sparse is not None:
                constants[name].type = ttype
        graph = self._graph(graph_tree, constants)
        opset = attrs.get("opset")
        if not isinstance(opset, int):
            self.fail("module needs an integer opset attribute: module @m {opset = 18} { ... }")
        return Module(graph, opset, name=sym[1])

    def _graph(self, tree, constants) -> Graph:
        sym, *items = tree.children
        graph = Graph(sym[1])
        scope: dict[str, Value] = {}
        index = 0
        while index < len(items) and (items[index] is None or (isinstance(items[index], tuple)
                                                                  and items[index][0] == "input")):
            item = items[index]
            if item is not None:
                _, name, ttype = item
                scope[name] = graph.add_input(name, ttype)
            index += 1
        for item in items[index:]:
            if isinstance(item, tuple) and item[0] == "return":
                for ref, out_name in item[1]:
                    graph.add_output(self._lookup(ref, scope, constants), out_name)
                continue
            self._node(item, graph, scope, constants)
        return graph

    def _lookup(self, ref, scope, constants) -> Value:
        kind, name = ref
        table = scope if kind == "value" else constants
        if name not in table:
            sigil = "%" if kind == "value" else "@"
            self.fail(f"{sigil}{name} is used before it is defined")
        return table[name]

    def _node(self, tree, graph, scope, constants) -> None:
        children = list(tree.children)
        results, rest = [], []
        for child in children:
            if isinstance(child, tuple) and child[0] == "value" and not rest:
                results.append(child[1])
            else:
                rest.append(child)
        op_token, *rest = rest
        full = str(op_token)[1:-1]
        domain, _, op = full.rpartition(".")
        domain = "" if domain in ("onnx", "ai.onnx") else domain
        operands, attrs, types, name = [], {}, None, ""
        for child in rest:
            if isinstance(child, dict):
                attrs = {k: self._attr_value(v) for k, v in child.items()}
            elif isinstance(child, list):
                types = child
            elif isinstance(child, tuple) and child[0] == "loc":
                name = child[1]
            elif child is _OMITTED:
                operands.append(None)
            elif isinstance(child, tuple):
                operands.append(self._lookup(child, scope, constants))
        node = Node(op, operands, [], attrs, name=name, domain=domain)
        for i, result in enumerate(results):
            if result in scope:
                self.fail(f"%{result} is defined twice")
            value = Value(result, types[i] if types and i < len(types) else None)
            graph.reserve_names([result])
            node.append_output(value)
            scope[result] = value
        graph.add_node(node)

    def _attr_value(self, value):
        if isinstance(value, tuple) and value and value[0] == "tensor":
            return value[1].to_array(value[2], self.side_arrays)
        if isinstance(value, list):
            return [self._attr_value(v) for v in value]
        return value
