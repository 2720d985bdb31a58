"""ONNX backend conformance: the onnx wheel's own cases, restricted to edgecc's op set and dtypes, run through
`edgecc.backend` by onnx's backend test runner, once per configuration below (the reference interpreter, native
code for the host, and native code for armv8 and armv7 under qemu-user). Outputs are compared with the data the
onnx wheel ships (from onnx's reference implementations, or for the light models from onnx.reference), at the
tolerances each case declares (default rtol 1e-3, atol 1e-7)."""

import re
import shutil
import warnings

import pytest

warnings.filterwarnings("ignore", category=RuntimeWarning)

import onnx.backend.test  # noqa: E402

from edgecc.backend import EdgeccBackend  # noqa: E402
from edgecc.conformance import selected_cases  # noqa: E402

_RANDOM_DROPOUT = ("training-mode Dropout with ratio > 0 draws a random mask; the expected data comes from "
                   "NumPy's seeded generator, which no compiler reproduces. edgecc rejects it with a clear error.")
KNOWN_FAILURES = {
    # name (without _cpu): why edgecc cannot match the shipped expected data.
    "test_training_dropout": _RANDOM_DROPOUT,
    "test_training_dropout_default": _RANDOM_DROPOUT,
    "test_training_dropout_default_mask": _RANDOM_DROPOUT,
    "test_training_dropout_mask": _RANDOM_DROPOUT,
}

CONFIGS = [
    # (prefix, runtime, target, marks, tools the configuration needs)
    ("Reference", "reference", "host", [], ()),
    ("Native", "native", "host", [], ()),
    ("Armv8", "native", "armv8", [pytest.mark.slow], ("qemu-aarch64", "aarch64-linux-gnu-gcc")),
    ("Armv7", "native", "armv7", [pytest.mark.slow], ("qemu-arm", "arm-linux-gnueabihf-gcc")),
]

IN_SCOPE = {f"{name}_cpu" for kind_names in selected_cases().values() for name in kind_names}
_SLOW_MODELS = re.compile(r"test_(bvlc_alexnet|densenet121|inception_v1|inception_v2|resnet50|shufflenet|squeezenet|"
                          r"vgg19|zfnet512)")


def _backend_for(runtime: str, target: str) -> type:
    class Configured(EdgeccBackend):
        @classmethod
        def prepare(cls, model, device: str = "CPU", **kwargs):
            kwargs.setdefault("runtime", runtime)
            kwargs.setdefault("target", target)
            return super().prepare(model, device, **kwargs)

    Configured.__name__ = f"EdgeccBackend_{runtime}_{target}"
    return Configured


for _prefix, _runtime, _target, _marks, _tools in CONFIGS:
    _missing = [t for t in _tools if shutil.which(t) is None]
    _runner = onnx.backend.test.BackendTest(_backend_for(_runtime, _target), __name__)
    for _name in KNOWN_FAILURES:
        _runner.xfail("^" + re.escape(_name) + "_cpu$")
    for _case_name, _case in _runner.test_cases.items():
        for _attr in [a for a in vars(_case) if a.startswith("test_")]:
            if _attr not in IN_SCOPE:
                delattr(_case, _attr)  # outside the edge op set or dtypes (or a CUDA variant): not collected
                continue
            func = getattr(_case, _attr)
            for mark in _marks:
                func = mark(func)
            if _SLOW_MODELS.match(_attr):
                func = pytest.mark.slow(func)
            if _missing:
                func = pytest.mark.skip(reason=f"{', '.join(_missing)} not installed (.ci/run installs them)")(func)
            setattr(_case, _attr, func)
        _case.__name__ = _case.__qualname__ = f"{_prefix}{_case_name}"
        globals()[f"{_prefix}{_case_name}"] = _case
