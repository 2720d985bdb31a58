"""edgecc as an ONNX backend (onnx.backend.base.Backend), so onnx's own backend test runner drives it.

`prepare(model, target=..., runtime=...)` takes compile options; without them the environment variables
EDGECC_TARGET (default host) and EDGECC_RUNTIME (native or reference; default native) decide.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from edgecc.api import compile as compile_model
from edgecc.errors import ShapeError


class EdgeccRep(BackendRep):
    """A prepared model, compiled for static shapes.

    Models with symbolic input dims are compiled on first run with the feeds' shapes. Models whose output
    shapes depend on an input's value (a Reshape shape, TopK's k, Reduce axes, Resize scales, Range bounds
    fed as graph inputs) are specialised on the values of their small inputs: those become constants, and
    new values recompile.
    """

    SPECIALISE_MAX_ELEMENTS = 64
    """Inputs up to this size are shape parameters (axes, k, scales, bounds), not data: specialise on them."""

    def __init__(self, model: onnx.ModelProto, options: dict):
        self._model = model
        options = dict(options)
        options.setdefault("runtime", os.environ.get("EDGECC_RUNTIME", "native"))
        options.setdefault("target", os.environ.get("EDGECC_TARGET", "host"))
        self._options = options
        self._compiled = {}
        self._initializers = {i.name for i in model.graph.initializer}
        self._input_names = [vi.name for vi in model.graph.input if vi.name not in self._initializers]
        self._specialise = False
        if not self._has_symbolic_inputs():
            try:
                self._compiled[None] = compile_model(model, **options)
            except ShapeError as exc:
                if "compile time" not in str(exc):
                    raise
                self._specialise = True

    def _has_symbolic_inputs(self) -> bool:
        for vi in self._model.graph.input:
            if vi.name in self._initializers:
                continue
            shape = vi.type.tensor_type.shape
            if not vi.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in shape.dim):
                return True
        return False

    def run(self, inputs, **kwargs):
        if isinstance(inputs, dict):
            feeds = inputs
        else:
            if isinstance(inputs, np.ndarray):
                inputs = [inputs]
            feeds = dict(zip(self._input_names, inputs))
        if None in self._compiled:
            return tuple(self._compiled[None].run(feeds))
        frozen = {n: np.asarray(feeds[n]) for n in self._input_names
                  if self._specialise and np.asarray(feeds[n]).size <= self.SPECIALISE_MAX_ELEMENTS}
        key = tuple((n, tuple(np.shape(feeds[n])), frozen[n].tobytes() if n in frozen else None)
                    for n in self._input_names)
        if key not in self._compiled:
            shapes = {n: tuple(np.shape(feeds[n])) for n in self._input_names if n not in frozen}
            try:
                self._compiled[key] = compile_model(self._model, input_shapes=shapes, constant_inputs=frozen,
                                                    **self._options)
            except ShapeError as exc:
                if "compile time" not in str(exc) or self._specialise:
                    raise
                self._specialise = True
                return self.run(feeds)
        compiled = self._compiled[key]
        return tuple(compiled.run({n: v for n, v in feeds.items() if n not in frozen}))


class EdgeccBackend(Backend):
    @classmethod
    def prepare(cls, model, device: str = "CPU", **kwargs):
        if not cls.supports_device(device):
            raise RuntimeError(f"edgecc runs on CPU, not {device}")
        return EdgeccRep(model, kwargs)

    @classmethod
    def run_model(cls, model, inputs, device: str = "CPU", **kwargs):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node, inputs, device: str = "CPU", outputs_info=None, **kwargs):
        raise NotImplementedError("edgecc compiles whole models; use run_model")

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device.upper().startswith("CPU")


prepare = EdgeccBackend.prepare
run_model = EdgeccBackend.run_model
run_node = EdgeccBackend.run_node
supports_device = EdgeccBackend.supports_device
