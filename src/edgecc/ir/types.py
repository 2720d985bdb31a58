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


@dataclass(frozen=True)
class SparseEncoding:
    """How a constant tensor is stored: `csr` or `block` (with block shape); filled by the sparsity pass."""

    kind: str
    block: tuple[int, ...] = ()


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
        return f"tensor<{dims}{self.dtype.short}>"
