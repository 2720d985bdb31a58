"""edgecc.CodebookDecode (ops/codebook.py): y[i] = codebook[index i], the indices packed `bits` to a field, 8 / bits
fields to a byte. Runs just before the layer reading the weights, into the arena.

Each step reads one byte and writes its 8 / bits floats (shift, mask, load the entry, store), the codebook read
through its pointer so same-shaped layers share the kernel. Where fewer than 2^bits entries exist an index is
clamped to the last one, so a corrupt index cannot read past the codebook (the packer never writes one).
"""

from __future__ import annotations

from llvmlite import ir

from edgecc.backends.codegen import F32, I8, I64, KernelBuilder
from edgecc.backends.kernels import lowering
from edgecc.errors import EdgeccError


def _entry(kb: KernelBuilder, codebook, entries: int, byte: ir.Value, field: int, bits: int) -> ir.Value:
    """codebook[field `field` of `byte`] as an f32."""
    b = kb.b
    index = byte
    if bits < 8:
        shifted = b.lshr(byte, ir.Constant(I8, field * bits)) if field else byte
        index = b.and_(shifted, ir.Constant(I8, (1 << bits) - 1))
    index = b.zext(index, I64)
    if entries < 1 << bits:
        last = kb.i64(entries - 1)
        index = b.select(b.icmp_unsigned(">", index, last), last, index)
    return b.load(b.gep(codebook.ptr, [index], inbounds=True, source_etype=F32), typ=F32)


def _decode_byte(kb: KernelBuilder, packed, codebook, out, byte_index: ir.Value, fields: int, bits: int) -> None:
    """out[byte_index * 8 / bits + f] for the first `fields` fields of packed[byte_index]."""
    b = kb.b
    byte = b.load(b.gep(packed.ptr, [byte_index], inbounds=True, source_etype=I8), typ=I8)
    first = b.mul(byte_index, kb.i64(8 // bits))
    for f in range(fields):
        value = _entry(kb, codebook, codebook.size, byte, f, bits)
        b.store(value, b.gep(out.ptr, [b.add(first, kb.i64(f))], inbounds=True, source_etype=F32))


@lowering("CodebookDecode")
def lower_codebook_decode(kb: KernelBuilder) -> None:
    packed, codebook = kb.inputs
    out = kb.outputs[0]
    bits = int(kb.attrs["bits"])
    if bits not in (1, 2, 4, 8) or codebook.size == 0:
        raise EdgeccError(f"CodebookDecode with {bits}-bit indices and {codebook.size} entries has no kernel")
    per = 8 // bits
    whole, rest = divmod(out.size, per)
    with kb.loop(whole, "byte") as i:
        _decode_byte(kb, packed, codebook, out, i, per, bits)
    if rest:
        _decode_byte(kb, packed, codebook, out, kb.i64(whole), rest, bits)
