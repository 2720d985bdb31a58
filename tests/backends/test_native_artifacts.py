"""Ahead-of-time artifacts: files, reproducibility, the C example built with make and CMake, the shared
library loaded with ctypes, and the same example cross-built for armv8 and run under qemu.

Numerics: compared with onnxruntime on the same input; the model is Mul/Add/Relu/Transpose/Concat in float32,
where every output element is one rounding of the same operations: rtol 1e-6."""

from __future__ import annotations

import ctypes
import pathlib
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.cli import main

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "c"


def _model(path: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Mul", ["x", "scale"], ["m"]), helper.make_node("Add", ["m", "bias"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Concat", ["t", "t"], ["y"], axis=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((1, 3, 5)).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.standard_normal((5,)).astype(np.float32), "bias")]
    graph = helper.make_graph(nodes, "example", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _example_input() -> np.ndarray:
    """The pattern main.c fills the input with when no file is given."""
    return ((np.arange(15) % 17 - 8) / 8.0).astype(np.float32).reshape(1, 3, 5)


def _expected(model_path) -> np.ndarray:
    return ort.InferenceSession(str(model_path)).run(None, {"x": _example_input()})[0]


def _compile(model_path, out_stem, *extra):
    assert main([str(model_path), "--runtime", "native", "-o", str(out_stem), *map(str, extra)]) == 0


def test_artifacts_are_complete_and_reproducible(tmp_path):
    model = _model(tmp_path / "m.onnx")
    _compile(model, tmp_path / "a" / "model")
    _compile(model, tmp_path / "b" / "model")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["libmodel.a", "libmodel.so", "model.h", "model.o"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    header = (tmp_path / "a" / "model.h").read_text()
    assert "int32_t model_run(const void *const *inputs, void *const *outputs, void *arena);" in header
    assert "MODEL_ARENA_BYTES" in header and '"x"' in header


def test_shared_library_runs_through_ctypes(tmp_path):
    model = _model(tmp_path / "m.onnx")
    _compile(model, tmp_path / "model")
    lib = ctypes.CDLL(str(tmp_path / "libmodel.so"))
    x = _example_input()
    y = np.empty((1, 10, 3), np.float32)
    arena = np.zeros(4096 + 64, np.uint8)
    aligned = arena[(-arena.ctypes.data) % 64:]
    ins = (ctypes.c_void_p * 1)(x.ctypes.data)
    outs = (ctypes.c_void_p * 1)(y.ctypes.data)
    assert lib.model_run(ins, outs, ctypes.c_void_p(aligned.ctypes.data)) == 0
    np.testing.assert_allclose(y, _expected(model), rtol=1e-6)


def _run_example(exe: list[str], model) -> None:
    out = subprocess.run(exe, capture_output=True, text=True, check=True).stdout
    got = np.array([float(v) for v in out.split()], np.float32).reshape(1, 10, 3)
    np.testing.assert_allclose(got, _expected(model), rtol=1e-6)


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None, reason="needs make and cc")
def test_c_example_with_make_on_host(tmp_path):
    model = _model(tmp_path / "m.onnx")
    _compile(model, tmp_path / "build" / "model")
    work = tmp_path / "example"
    shutil.copytree(EXAMPLE, work)
    subprocess.run(["make", f"MODEL_DIR={tmp_path / 'build'}"], cwd=work, check=True, capture_output=True)
    _run_example([str(work / "main")], model)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake (Debian package cmake)")
def test_c_example_with_cmake_on_host(tmp_path):
    model = _model(tmp_path / "m.onnx")
    _compile(model, tmp_path / "build" / "model")
    subprocess.run(["cmake", "-S", str(EXAMPLE), "-B", str(tmp_path / "cm"), f"-DMODEL_DIR={tmp_path / 'build'}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(tmp_path / "cm")], check=True, capture_output=True)
    _run_example([str(tmp_path / "cm" / "main")], model)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs gcc-aarch64-linux-gnu and qemu-user (installed by .ci/run)")
def test_c_example_cross_built_for_armv8_runs_under_qemu(tmp_path):
    model = _model(tmp_path / "m.onnx")
    _compile(model, tmp_path / "build" / "model", "--target", "armv8")
    work = tmp_path / "example"
    shutil.copytree(EXAMPLE, work)
    subprocess.run(["make", "CC=aarch64-linux-gnu-gcc", "LDFLAGS=-static", f"MODEL_DIR={tmp_path / 'build'}"],
                   cwd=work, check=True, capture_output=True)
    _run_example(["qemu-aarch64", "-cpu", "cortex-a53", str(work / "main")], model)
