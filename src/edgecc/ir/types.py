"""Tensor types: element type and static shape, plus the slots later stages fill (layout, quantisation, sparsity)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from edgecc.ir.dtypes import DType


@dataclass(frozen=True)
class QuantParams:
    """Affine quantisation parameters: real = scale * (q - zero_point); per-tensor or along `axis`."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None


SPARSE_KINDS = ("csr", "block")


@dataclass(frozen=True)
class SparseEncoding:
    """How a constant weight is stored, set by the encode-sparsity pass; the constant's array stays the dense
    (zero-filled) tensor, so every reader that ignores the encoding still computes the same thing.

    The weight is seen as a matrix [K, N]: K the reduction (Gemm/MatMul B's rows, a Conv's input channels x
    taps), N the outputs (columns, output channels). `csr`: one entry per nonzero (block (1, 1)). `block`:
    `block` = (1, V), V consecutive outputs at one reduction index stored together whenever any is nonzero, V
    the target's vector lanes, so each stored block is one vector operation. Printed `sparse<csr>` and
    `sparse<block 1x8>` inside the tensor type.
    """

    kind: str
    block: tuple[int, ...] = ()

    def __post_init__(self):
        block = tuple(int(d) for d in self.block) or (1, 1)
        object.__setattr__(self, "block", block)
        if self.kind not in SPARSE_KINDS:
            raise ValueError(f"sparse encoding kind '{self.kind}' is not one of {', '.join(SPARSE_KINDS)}")
        if len(block) != 2 or block[0] != 1 or block[1] < 1 or (self.kind == "csr" and block != (1, 1)):
            raise ValueError(f"sparse {self.kind} encoding cannot have block {'x'.join(map(str, block))}: "
                             "blocks are 1xV (V >= 1), csr is 1x1")

    @property
    def width(self) -> int:
        """V: the outputs one stored entry covers."""
        return self.block[1]

    def __str__(self) -> str:
        return "sparse<csr>" if self.kind == "csr" else f"sparse<block {'x'.join(map(str, self.block))}>"


@dataclass(frozen=True)
class TensorType:
    """A ranked tensor with a fully static shape. Dims are non-negative ints."""

    dtype: DType
    shape: tuple[int, ...]
    layout: str | None = None
    quant: QuantParams | None = None
    sparse: SparseEncoding | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def with_shape(self, shape) -> "TensorType":
        return replace(self, shape=tuple(shape))

    def with_dtype(self, dtype: DType) -> "TensorType":
        return replace(self, dtype=dtype)

    @classmethod
    def of(cls, array: np.ndarray) -> "TensorType":
        return cls(DType.from_numpy(array.dtype), tuple(array.shape))

    def __str__(self) -> str:
        dims = "".join(f"{d}x" for d in self.shape)
        encoding = f", {self.sparse}" if self.sparse is not None else ""
        return f"tensor<{dims}{self.dtype.short}{encoding}>"
