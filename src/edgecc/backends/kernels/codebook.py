"""edgecc.CodebookDecode (ops/codebook.py): y[i] = codebook[index i], the indices packed `bits` to a field, 8 / bits
fields to a byte. Runs just before the layer reading the weights, into the arena.

With indices of at most 4 bits (at most 16 entries) the codebook fits in registers and a register permute looks up
a whole vector of entries at once (`TablePermute`): on x86 with AVX2 two vpermps over the table's ymm halves and a
blend on bit 3 (8 floats in about 5 instructions; AVX-512 machines take this path too: a zmm vpermps would need a
machine to test it on), on AArch64 tbl over the table's 64 bytes (16 floats in 22 instructions with the index
arithmetic, against 48 for the byte loop). Otherwise, and for the last elements, each step reads one byte and writes
its 8 / bits floats (shift, mask, load the entry, store).

The codebook is read through its pointer, so same-shaped layers share the kernel. Where fewer than 2^bits entries
exist an index is clamped to the last one (the register table repeats it), so a corrupt index cannot read past the
codebook (the packer never writes one).
"""

from __future__ import annotations

import math

from llvmlite import ir

from edgecc.backends.codegen import F32, I8, I32, I64, Buffer, KernelBuilder
from edgecc.backends.kernels import lowering
from edgecc.backends.kernels.conv import i32_vector, intrinsic
from edgecc.errors import EdgeccError

TABLE_ENTRIES = 16
"""Entries a register table holds: indices of 4 bits or fewer."""


def _entry(kb: KernelBuilder, codebook: Buffer, byte: ir.Value, field: int, bits: int) -> ir.Value:
    """codebook[field `field` of `byte`] as an f32."""
    b = kb.b
    index = byte
    if bits < 8:
        shifted = b.lshr(byte, ir.Constant(I8, field * bits)) if field else byte
        index = b.and_(shifted, ir.Constant(I8, (1 << bits) - 1))
    index = b.zext(index, I64)
    if codebook.size < 1 << bits:
        last = kb.i64(codebook.size - 1)
        index = b.select(b.icmp_unsigned(">", index, last), last, index)
    return b.load(b.gep(codebook.ptr, [index], inbounds=True, source_etype=F32), typ=F32)


def _decode_byte(kb: KernelBuilder, packed: Buffer, codebook: Buffer, out: Buffer, byte_index: ir.Value,
                 fields: int, bits: int) -> None:
    """out[byte_index * 8 / bits + f] for the first `fields` fields of packed[byte_index]."""
    b = kb.b
    byte = b.load(b.gep(packed.ptr, [byte_index], inbounds=True, source_etype=I8), typ=I8)
    first = b.mul(byte_index, kb.i64(8 // bits))
    for f in range(fields):
        b.store(_entry(kb, codebook, byte, f, bits), b.gep(out.ptr, [b.add(first, kb.i64(f))], inbounds=True,
                                                          source_etype=F32))


class TablePermute:
    """The codebook (at most 16 entries, the last repeated up to 16) in registers, looked up `width` floats at a time
    by a permute; `kind` is None on targets without one (the byte loop then does everything)."""

    def __init__(self, kb: KernelBuilder, bits: int):
        self.kb = kb
        features = set(kb.target.features.split(","))
        triple = kb.target.triple
        if bits > 4:
            self.kind, self.width = None, 1
        elif triple.startswith("x86_64") and "+avx2" in features:
            self.kind, self.width = "avx2", 8
        elif triple.startswith(("aarch64", "arm64")):
            self.kind, self.width = "tbl", 4
        else:
            self.kind, self.width = None, 1
        self.parts: list[ir.Value] = []
        self.entries = TABLE_ENTRIES

    def load_table(self, codebook: Buffer) -> None:
        """The table registers: 16 entries (index e reads entry min(e, k - 1)) as two <8 x f32> (AVX2) or four
        <16 x i8> (tbl)."""
        b = self.kb.b
        self.entries = codebook.size
        table = ir.Constant(ir.VectorType(F32, TABLE_ENTRIES), ir.Undefined)
        for e in range(TABLE_ENTRIES):
            entry = b.load(b.gep(codebook.ptr, [self.kb.i64(min(e, codebook.size - 1))], inbounds=True,
                                 source_etype=F32), typ=F32)
            table = b.insert_element(table, entry, ir.Constant(I32, e))
        if self.kind == "avx2":
            self.parts = [b.shuffle_vector(table, table, i32_vector(range(h, h + 8))) for h in (0, 8)]
        else:
            self.parts = [b.bitcast(b.shuffle_vector(table, table, i32_vector(range(q, q + 4))), ir.VectorType(I8, 16))
                          for q in range(0, 16, 4)]

    def lookup(self, index: ir.Value, first: int) -> ir.Value:
        """table[index[first + j]] for j < width: `index` holds entry numbers below 16, as i32 lanes on x86 and
        as bytes for tbl."""
        b = self.kb.b
        vf, vi = ir.VectorType(F32, self.width), ir.VectorType(I32, self.width)
        if self.kind == "tbl":  # lane j's float is table bytes 4e..4e+3, e = index[first + j // 4]
            v16 = ir.VectorType(I8, 16)
            spread = b.shuffle_vector(index, index, i32_vector([first + j // 4 for j in range(16)]))
            offsets = ir.Constant(v16, [ir.Constant(I8, j % 4) for j in range(16)])
            byte_index = b.or_(b.shl(spread, ir.Constant(v16, [ir.Constant(I8, 2)] * 16)), offsets)
            tbl4 = intrinsic(self.kb, "llvm.aarch64.neon.tbl4.v16i8", v16, [v16] * 5)
            return b.bitcast(b.call(tbl4, [*self.parts, byte_index]), vf)
        part = b.shuffle_vector(index, index, i32_vector(range(first, first + self.width)))
        permps = intrinsic(self.kb, "llvm.x86.avx2.permps", vf, [vf, vi])
        low = b.call(permps, [self.parts[0], part])
        if self.entries <= 8:  # the low half already repeats the last entry up to 8 (and vpermps reads 3 bits)
            return low
        high = b.call(permps, [self.parts[1], part])
        return b.select(b.icmp_unsigned(">", part, i32_vector([7] * 8)), high, low)

    def run(self, packed: Buffer, codebook: Buffer, out: Buffer, bits: int) -> int:
        """Decode whole steps of lcm(width, 8 / bits) elements (at least 16 for tbl: one index vector serves four
        lookups); returns how many packed bytes were done."""
        if self.kind is None:
            return 0
        per = 8 // bits
        step = math.lcm(16 if self.kind == "tbl" else self.width, per)
        steps = out.size // step
        if not steps:
            return 0
        self.load_table(codebook)
        b, kb = self.kb.b, self.kb
        nbytes = step // per
        lane = I8 if self.kind == "tbl" else I32

        def lanes(values) -> ir.Constant:
            return ir.Constant(ir.VectorType(lane, step), [ir.Constant(lane, v) for v in values])

        with kb.loop(steps, "step") as s:
            load = b.load(b.gep(packed.ptr, [b.mul(s, kb.i64(nbytes))], inbounds=True, source_etype=I8),
                          typ=ir.VectorType(I8, nbytes))
            load.align = 1
            spread = b.shuffle_vector(load, load, i32_vector([i // per for i in range(step)]))
            if lane is not I8:
                spread = b.zext(spread, ir.VectorType(lane, step))
            index = b.and_(b.lshr(spread, lanes([(i % per) * bits for i in range(step)])),
                           lanes([(1 << bits) - 1] * step))
            first = b.mul(s, kb.i64(step))
            for c in range(0, step, self.width):
                store = b.store(self.lookup(index, c), b.gep(out.ptr, [b.add(first, kb.i64(c))], inbounds=True,
                                                             source_etype=F32))
                store.align = 4
        return steps * nbytes


@lowering("CodebookDecode")
def lower_codebook_decode(kb: KernelBuilder) -> None:
    packed, codebook = kb.inputs
    out = kb.outputs[0]
    bits = int(kb.attrs["bits"])
    if bits not in (1, 2, 4, 8) or codebook.size == 0:
        raise EdgeccError(f"CodebookDecode with {bits}-bit indices and {codebook.size} entries has no kernel")
    per = 8 // bits
    done = TablePermute(kb, bits).run(packed, codebook, out, bits)
    whole, rest = divmod(out.size, per)
    with kb.loop(whole, "byte", start=done) as i:
        _decode_byte(kb, packed, codebook, out, i, per, bits)
    if rest:
        _decode_byte(kb, packed, codebook, out, kb.i64(whole), rest, bits)
