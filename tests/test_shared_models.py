"""The real architectures in ../shared/models, end to end.

- Import, optimise at -O0 and -O3, export back to ONNX: onnxruntime on the export gives onnxruntime's outputs on
  the original, and so does edgecc's reference interpreter (max relative error <= 1e-5).
- Native code for the host, the x86-64 presets (run in-process: this CPU has AVX-512) and armv8/armv7 (run
  under qemu-user) matches onnxruntime within 1e-4; every preset, Cortex-M included, compiles.

Errors are relative to the largest magnitude of onnxruntime's output (the models have random weights, so some
outputs are tiny; see ../shared/models/README.md). 1e-5 for the interpreter and the export: the same float32
operations up to summation order and BatchNorm folded into weights, a few ulp of the largest activation.
1e-4 for native code: vectorised sums in another order, fused multiply-adds, and edgecc's own exp/erf/tanh
(1-5 ulp), compounded through up to 60 layers.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edgecc
from edgecc.backends.targets import PRESETS, missing_host_features

MODELS = ["mlp_mnist", "lenet5", "bert_tiny_enc", "squeezenet1_1", "shufflenet_v2_x1_0", "mobilenet_v2", "resnet18"]
LARGE = {"squeezenet1_1", "shufflenet_v2_x1_0", "mobilenet_v2", "resnet18"}
REFERENCE_TOLERANCE = 1e-5
NATIVE_TOLERANCE = 1e-4


def _models(all_slow: bool = False):
    return [pytest.param(m, marks=pytest.mark.slow) if all_slow or m in LARGE else m for m in MODELS]


def _session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected)) / max(np.max(np.abs(expected)), 1e-30))


def _case(shared_dir, name):
    path = shared_dir / "models" / f"{name}.onnx"
    feeds = {"input": np.load(shared_dir / "models" / f"{name}.ref.npz")["input"]}
    (expected,) = _session(onnx.load(str(path)).SerializeToString()).run(None, feeds)
    return str(path), feeds, expected


@pytest.mark.shared
@pytest.mark.parametrize("opt_level", [0, 3])
@pytest.mark.parametrize("name", _models())
def test_import_fold_export_and_run(shared_dir, name, opt_level):
    path, feeds, expected = _case(shared_dir, name)
    compiled = edgecc.compile(path, opt_level=opt_level, runtime="reference")
    exported = compiled.to_onnx()
    onnx.checker.check_model(exported)
    (from_export,) = _session(exported.SerializeToString()).run(None, feeds)
    assert _rel_error(from_export, expected) <= REFERENCE_TOLERANCE
    (ours,) = compiled.run(feeds)
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    assert _rel_error(ours, expected) <= REFERENCE_TOLERANCE
    if opt_level == 3:
        assert compiled.report["nodes_after"] <= compiled.report["nodes_before"]
        assert "BatchNormalization" not in compiled.report["ops"]


@pytest.mark.shared
@pytest.mark.parametrize("name", _models())
def test_native_host(shared_dir, name):
    path, feeds, expected = _case(shared_dir, name)
    compiled = edgecc.compile(path, opt_level=3)
    (ours,) = compiled.run(feeds)
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    assert _rel_error(ours, expected) <= NATIVE_TOLERANCE
    report = compiled.report
    assert report["arena_bytes"] <= 1.05 * report["arena_lower_bound_bytes"]


@pytest.mark.shared
@pytest.mark.parametrize("target", ["x86-64", "x86-64-v3", "x86-64-v4", "armv8", "armv7"])
@pytest.mark.parametrize("name", _models(all_slow=True))
def test_native_presets_run(shared_dir, name, target):
    preset = PRESETS[target]
    missing = [tool for tool in (preset.qemu, preset.cc if preset.qemu else None) if tool and shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (.ci/run installs qemu-user and the cross toolchains)")
    if preset.triple.startswith("x86_64") and missing_host_features(preset):
        pytest.skip(f"this CPU lacks {', '.join(missing_host_features(preset)[:3])}... for {target}")
    path, feeds, expected = _case(shared_dir, name)
    (ours,) = edgecc.compile(path, opt_level=3, target=target).run(feeds)
    assert _rel_error(ours, expected) <= NATIVE_TOLERANCE


ALLOWED_UNDEFINED = {"memcpy", "memset", "memmove", "__aeabi_memcpy", "__aeabi_memcpy4", "__aeabi_memcpy8",
                     "__aeabi_memset", "__aeabi_memset4", "__aeabi_memset8", "__aeabi_memclr", "__aeabi_memclr4",
                     "__aeabi_memclr8", "__aeabi_memmove"}
"""The generated code may call the C library's memory functions and nothing else (no libm, no allocator)."""


@pytest.mark.shared
@pytest.mark.parametrize("target", ["armv8.2", "armv7", "cortex-m4", "cortex-m55"])
@pytest.mark.parametrize("name", _models(all_slow=True))
def test_native_presets_compile_without_libm(shared_dir, name, target, tmp_path):
    path, _, _ = _case(shared_dir, name)
    compiled = edgecc.compile(path, opt_level=3, target=target)
    obj = compiled.artifacts(str(tmp_path / "model"), "obj")[str(tmp_path / "model.o")]
    assert obj[:4] == b"\x7fELF"
    if shutil.which("nm") is None:
        pytest.skip("needs nm (binutils) to list undefined symbols")
    (tmp_path / "model.o").write_bytes(obj)
    listing = subprocess.run(["nm", "-u", str(tmp_path / "model.o")], capture_output=True, text=True, check=True)
    undefined = {line.split()[-1] for line in listing.stdout.splitlines() if line.strip()}
    assert undefined <= ALLOWED_UNDEFINED, undefined - ALLOWED_UNDEFINED
