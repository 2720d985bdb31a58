"""edgecc as an ONNX backend (onnx.backend.base.Backend), so onnx's own backend test runner drives it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from edgecc.api import compile as compile_model


class EdgeccRep(BackendRep):
    """A prepared model. Models with symbolic input dims are compiled on first run, with the feeds' shapes."""

    def __init__(self, model: onnx.ModelProto, options: dict):
        self._model = model
        self._options = options
        self._compiled = {}
        self._initializers = {i.name for i in model.graph.initializer}
        self._input_names = [vi.name for vi in model.graph.input if vi.name not in self._initializers]
        if not self._has_symbolic_inputs():
            self._compiled[None] = compile_model(model, **options)

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
            compiled = self._compiled[None]
        else:
            key = tuple((n, tuple(np.shape(feeds[n]))) for n in self._input_names)
            if key not in self._compiled:
                shapes = {n: s for n, s in key}
                self._compiled[key] = compile_model(self._model, input_shapes=shapes, **self._options)
            compiled = self._compiled[key]
        return tuple(compiled.run(feeds))


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
