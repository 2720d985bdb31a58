"""The reference interpreter: runs an IR module node by node with the op registry's NumPy references.

It is the execution path until native code exists, and afterwards the oracle that native kernels are
checked against in edgecc's own tests (themselves checked against onnx.reference and onnxruntime).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from edgecc.errors import InputError
from edgecc.ir.core import Module, Value
from edgecc.ops.apply import evaluate_node


def check_feeds(module: Module, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Validate inputs against the module's input types; returns arrays in input order."""
    graph = module.graph
    names = [v.name for v in graph.inputs]
    if isinstance(feeds, Mapping):
        unknown = sorted(set(feeds) - set(names))
        missing = [n for n in names if n not in feeds]
        if unknown:
            raise InputError(f"unknown input(s) {', '.join(unknown)}", hint=f"the model's inputs are {', '.join(names)}")
        if missing:
            raise InputError(f"missing input(s) {', '.join(missing)}", hint=f"the model's inputs are {', '.join(names)}")
        arrays = [feeds[n] for n in names]
    else:
        arrays = list(feeds)
        if len(arrays) != len(names):
            raise InputError(f"expected {len(names)} input(s) ({', '.join(names)}), got {len(arrays)}")
    result = []
    for value, array in zip(graph.inputs, arrays):
        array = np.asarray(array)
        expected = value.type
        if array.dtype != expected.dtype.numpy:
            raise InputError(f"input '{value.name}' has dtype {array.dtype}, the model expects {expected.dtype.name}",
                             hint=f"convert with .astype(np.{expected.dtype.numpy.name})")
        if tuple(array.shape) != expected.shape:
            raise InputError(f"input '{value.name}' has shape {list(array.shape)}, the model expects "
                             f"{list(expected.shape)}", hint="recompile with --input-shape to change it")
        result.append(array)
    return result


def run_module(module: Module, feeds, *, observe: Callable[[Value, np.ndarray], None] | None = None
               ) -> list[np.ndarray]:
    """Evaluate the module on `feeds` (dict or list in input order); returns outputs in output order.

    `observe(value, array)`, if given, sees every graph input and every node output as it is computed (before
    intermediates are freed): how calibration measures activation ranges without keeping them all.
    """
    graph = module.graph
    env: dict[int, np.ndarray] = {}
    for value, array in zip(graph.inputs, check_feeds(module, feeds)):
        env[value._id] = array
        if observe is not None:
            observe(value, array)
    remaining_uses: dict[int, int] = {}
    for node in graph.nodes:
        for value in node.inputs:
            if value is not None and not value.is_const:
                remaining_uses[value._id] = remaining_uses.get(value._id, 0) + 1
    keep = {v._id for v in graph.outputs}
    for node in graph.nodes:
        arrays = [None if v is None else (v.const if v.is_const else env[v._id]) for v in node.inputs]
        results = evaluate_node(node, arrays)
        for value, array in zip(node.outputs, results):
            env[value._id] = array
            if observe is not None:
                observe(value, array)
        for value in node.inputs:  # free intermediates as soon as their last reader ran
            if value is not None and not value.is_const:
                remaining_uses[value._id] -= 1
                if remaining_uses[value._id] == 0 and value._id not in keep and value._id in env:
                    del env[value._id]
    outputs = []
    for value in graph.outputs:
        outputs.append(value.const if value.is_const else env[value._id])
    return [np.asarray(o) for o in outputs]


def collect_values(module: Module, samples: Sequence, names: set[str]) -> dict[str, list[np.ndarray]]:
    """Run the module on each sample, keeping copies of the named values (one array per sample) and, under
    "<outputs>", the outputs of each sample flattened into one vector: what sensitivity and reconstruction
    compare between a float model and its quantised or compressed version."""
    seen: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def observe(value, array):
        if value.name in seen:
            seen[value.name].append(np.array(array, copy=True))

    outputs = [run_module(module, s, observe=observe) for s in samples]
    seen["<outputs>"] = [np.concatenate([o.ravel() for o in out]) for out in outputs]
    return seen
