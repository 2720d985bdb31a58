"""Every compression technique through the whole pipeline: the trained digits CNN compressed (and re-fitted on its
calibration split on host and armv8) compiles and runs natively on the host, on armv8 under qemu-user and on a Cortex-M4 board under
qemu-system-arm, and exports to ONNX with dense weights that onnxruntime runs.

The reference is the compressed model in edgecc's interpreter (the same compression is deterministic); the
interpreter's ops are checked against onnxruntime elsewhere, and here the exported dense ONNX model run by
onnxruntime must agree with it too. Tolerance 1e-4 relative to the largest output: float32 kernels sum in another
order than NumPy (sparse kernels skip the zeros, the codebook decode is exact)."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest

import edgecc
from edgecc.cli import main
from test_bare_metal import _run_on_board, _semihosting_firmware

TECHNIQUES = {"prune-90": ["--prune", "0.9"], "clusters-16": ["--cluster-weights", "16"],
              "low-rank-0.9": ["--low-rank", "0.9"], "channels-30": ["--prune-channels", "0.3"]}
KWARGS = {"prune-90": dict(prune=0.9), "clusters-16": dict(cluster_weights=16), "low-rank-0.9": dict(low_rank=0.9),
          "channels-30": dict(prune_channels=0.3)}
HAVE_BOARD = shutil.which("arm-none-eabi-gcc") is not None and shutil.which("qemu-system-arm") is not None


def _data(shared_dir):
    data = shared_dir / "data"
    if not (data / "digits_cnn.onnx").is_file():
        pytest.skip(f"{data} holds no digits_cnn.onnx")
    return data / "digits_cnn.onnx", data / "digits_cnn_calib.npz", np.load(data / "digits_cnn_test.npz")["input"][:3]


def _close(got, want):
    got, want = np.asarray(got, np.float32).reshape(-1), np.asarray(want, np.float32).reshape(-1)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want)), np.max(np.abs(got - want))


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("technique", sorted(KWARGS))
def test_compressed_model_runs_on_host_armv8_and_exports(shared_dir, technique):
    model, calib, xs = _data(shared_dir)
    options = dict(opt_level=3, calibration=str(calib), **KWARGS[technique])
    reference = edgecc.compile(str(model), runtime="reference", **options)
    host = edgecc.compile(str(model), **options)
    arm = edgecc.compile(str(model), target="armv8", **options)
    exported = ort.InferenceSession(host.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
    for x in xs:
        want = reference.run([x])[0]
        _close(host.run([x])[0], want)
        _close(arm.run([x])[0], want)
        _close(exported.run(None, {"input": x})[0], want)
    assert "CodebookDecode" not in {n.op_type for n in host.to_onnx().graph.node}


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(not HAVE_BOARD, reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm "
                                           "(installed by .ci/run)")
@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_compressed_model_runs_on_cortex_m4(shared_dir, tmp_path, technique):
    model, _, xs = _data(shared_dir)
    xs[0].astype(np.float32).tofile(tmp_path / "input.bin")
    assert main([str(model), "-O3", "--target", "cortex-m4", *TECHNIQUES[technique], "-o", str(tmp_path / "model")]) == 0
    run = _run_on_board("cortex-m4", _semihosting_firmware(tmp_path, "cortex-m4"), tmp_path / "input.bin")
    got = np.array([float(v) for v in run.stdout.split()], np.float32)
    reference = edgecc.compile(str(model), runtime="reference", opt_level=3, **KWARGS[technique])
    _close(got, reference.run([xs[0]])[0])
