"""The op registry and every op family. Importing this package registers all ops."""

from edgecc.ops import codebook, elementwise, fused, linalg, nn, qelementwise, qgemm, quant, reduce, resize, tensor  # noqa: F401  (registers ops)
from edgecc.ops.registry import REQUIRED, AttrSpec, Call, OpDef, all_ops, get, op, register

__all__ = ["REQUIRED", "AttrSpec", "Call", "OpDef", "all_ops", "get", "op", "register"]
