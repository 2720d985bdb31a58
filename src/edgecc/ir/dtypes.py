"""Element types of edgecc tensors, with their NumPy, ONNX and textual-IR spellings in one table."""

from __future__ import annotations

import enum

import numpy as np
from onnx import TensorProto


class DType(enum.Enum):
    """A tensor element type. `value` is the short name used by the textual IR (`f32`, `i64`, ...)."""

    float32 = "f32"
    float16 = "f16"
    int8 = "i8"
    uint8 = "u8"
    int16 = "i16"
    int32 = "i32"
    int64 = "i64"
    bool = "i1"

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(_TO_NUMPY[self])

    @property
    def onnx(self) -> int:
        return _TO_ONNX[self]

    @property
    def short(self) -> str:
        return self.value

    @property
    def is_float(self) -> bool:
        return self in (DType.float32, DType.float16)

    @property
    def is_integer(self) -> bool:
        return self in (DType.int8, DType.uint8, DType.int16, DType.int32, DType.int64)

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @classmethod
    def from_numpy(cls, dtype) -> "DType":
        key = np.dtype(dtype)
        for member, np_name in _TO_NUMPY.items():
            if np.dtype(np_name) == key:
                return member
        raise KeyError(f"dtype {key} is not supported by edgecc (supported: {supported_names()})")

    @classmethod
    def from_onnx(cls, elem_type: int) -> "DType":
        for member, code in _TO_ONNX.items():
            if code == elem_type:
                return member
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else str(elem_type)
        raise KeyError(f"ONNX element type {name} is not supported by edgecc (supported: {supported_names()})")

    @classmethod
    def from_short(cls, short: str) -> "DType":
        return cls(short)


_TO_NUMPY = {
    DType.float32: "float32",
    DType.float16: "float16",
    DType.int8: "int8",
    DType.uint8: "uint8",
    DType.int16: "int16",
    DType.int32: "int32",
    DType.int64: "int64",
    DType.bool: "bool",
}

_TO_ONNX = {
    DType.float32: TensorProto.FLOAT,
    DType.float16: TensorProto.FLOAT16,
    DType.int8: TensorProto.INT8,
    DType.uint8: TensorProto.UINT8,
    DType.int16: TensorProto.INT16,
    DType.int32: TensorProto.INT32,
    DType.int64: TensorProto.INT64,
    DType.bool: TensorProto.BOOL,
}


def supported_names() -> str:
    return ", ".join(d.name for d in DType)


def onnx_to_numpy(elem_type: int) -> np.dtype:
    """NumPy dtype of an ONNX element type (used by Cast-like attributes holding ONNX codes)."""
    return DType.from_onnx(elem_type).numpy
