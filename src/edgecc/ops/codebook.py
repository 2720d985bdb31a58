"""edgecc.CodebookDecode: weights stored as a k-entry codebook and packed indices (weight sharing), decoded to the
dense tensor where they are read.

    edgecc.CodebookDecode(indices: uint8 [ceil(numel * bits / 8)], codebook: float32 [k])  shape=[...], bits=b
        y = codebook[index[i]] for i < numel, reshaped to `shape` (float32)

Element i's index sits at bit (i * bits) % 8 of byte (i * bits) // 8, little end first; bits is 1, 2, 4 or 8, so
an index never straddles two bytes, and k <= 2^bits. The cluster-weights pass writes it in front of a Conv/Gemm/
MatMul's weights. It is not foldable: folding would store the dense tensor again, which is what the op saves.
Export writes the decoded tensor back as an initializer (`with_dense_weights`).
"""

from __future__ import annotations

import numpy as np

from edgecc.errors import ShapeError
from edgecc.ir.core import Module, Value
from edgecc.ir.dtypes import DType
from edgecc.ops.common import tensor
from edgecc.ops.registry import EDGECC_DOMAIN, REQUIRED, AttrSpec, Call, op

INDEX_BITS = (1, 2, 4, 8)
"""Index widths that divide a byte: each byte holds 8 // bits whole indices."""


def bits_for(k: int) -> int:
    """The narrowest index width in INDEX_BITS that numbers k entries (1 for k <= 2)."""
    return next(b for b in INDEX_BITS if k <= 1 << b)


def packed_size(numel: int, bits: int) -> int:
    """Bytes of `numel` packed `bits`-bit indices."""
    return (numel * bits + 7) // 8


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes holding `indices` (each < 2^bits) at `bits` bits each, little end first (see the module doc)."""
    flat = np.asarray(indices, np.int64).reshape(-1)
    per = 8 // bits
    padded = np.zeros(packed_size(flat.size, bits) * per, np.uint8)
    padded[:flat.size] = flat
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8)


def decode_indices(packed: np.ndarray, bits: int, numel: int) -> np.ndarray:
    """The first `numel` indices held in `packed` (uint8 bytes, `bits` bits each), as int64."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    fields = (np.asarray(packed, np.uint8).reshape(-1, 1) >> shifts) & np.uint8((1 << bits) - 1)
    return fields.reshape(-1)[:numel].astype(np.int64)


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _infer_codebook_decode(call: Call):
    indices, codebook = call.inputs
    bits, shape = int(call.attrs["bits"]), [int(d) for d in call.attrs["shape"]]
    if bits not in INDEX_BITS:
        call.bad_attr(f"CodebookDecode bits={bits}", hint=f"use one of {', '.join(map(str, INDEX_BITS))}")
    if any(d < 0 for d in shape):
        call.bad_attr(f"CodebookDecode shape {shape} has a negative dimension")
    if codebook.dtype != DType.float32 or codebook.rank != 1 or not 1 <= codebook.size <= 1 << bits:
        call.fail(f"CodebookDecode takes a float32 codebook of 1 to {1 << bits} entries for {bits}-bit indices, got "
                  f"{codebook.dtype.name}{list(codebook.shape)}")
    expected = packed_size(_numel(shape), bits)
    if indices.dtype != DType.uint8 or indices.shape != (expected,):
        call.fail(f"CodebookDecode indices must be uint8[{expected}] ({_numel(shape)} x {bits} bits), got "
                  f"{indices.dtype.name}{list(indices.shape)}")
    return [tensor(DType.float32, tuple(shape))]


@op("CodebookDecode", infer=_infer_codebook_decode, inputs=(2, 2), domain=EDGECC_DOMAIN, foldable=False,
    attrs={"shape": AttrSpec("ints", REQUIRED), "bits": AttrSpec("int", REQUIRED)})
def codebook_decode(call: Call):
    """codebook[index] for each packed index, in `shape` (see the module docstring)."""
    packed, codebook = call.inputs
    shape = tuple(int(d) for d in call.attrs["shape"])
    index = decode_indices(packed, int(call.attrs["bits"]), _numel(shape))
    if index.size and index.max() >= codebook.size:
        raise ShapeError(f"CodebookDecode index {int(index.max())} is past the codebook's {codebook.size} entries",
                         where=call.where or "op CodebookDecode")
    return [np.asarray(codebook, np.float32)[index].reshape(shape)]


def with_dense_weights(module: Module) -> Module:
    """`module` with each CodebookDecode of constants replaced by the dense tensor it decodes (a copy; `module`
    itself when there is none), for export: ONNX readers see plain weights."""
    if not any(n.op == "CodebookDecode" and n.domain == EDGECC_DOMAIN for n in module.graph.nodes):
        return module
    module = module.clone()
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "CodebookDecode" or node.domain != EDGECC_DOMAIN or not all(v.is_const for v in node.inputs):
            continue
        call = Call(node.op, [v.const for v in node.inputs], dict(node.attrs), where=node.label)
        dense = codebook_decode(call)[0]
        out = node.outputs[0]
        graph.replace_all_uses(out, Value(out.name, const=dense))
        graph.remove_node(node)
    return module
