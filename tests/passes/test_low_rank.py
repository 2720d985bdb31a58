"""low-rank against two references: onnxruntime on the original model (within the Frobenius bound implied by the
dropped singular values) and onnxruntime on the model whose weight is numpy's own rank-r truncation.

- Bound: ||x W - x W_r||_F <= ||x||_F ||W - W_r||_2 <= ||x||_F sqrt(sum of the dropped s^2); checked with a 1e-5
  relative slack for float32 rounding (plus 1e-5 of ||y||_F).
- Truncation: W_r = U_r S_r V_r^T from numpy.linalg.svd in float64; edgecc's two products equal onnxruntime's one
  product by W_r within 1e-5 of the largest output (float32 rounding of the factors and of the sums).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from compression_util import close, compile_module, initializer, ort_run, prepared, run_shared_model, \
    with_initializers
from edgecc.errors import EdgeccError
from edgecc.interpreter import run_module
from edgecc.ir.verifier import verify
from edgecc.passes import PassContext, PassManager, parse_pipeline
from edgecc.passes.low_rank import low_rank
from models import make_model, tensor_info

RNG = np.random.default_rng(9)


def decaying(k: int, n: int, rate: float = 0.8) -> np.ndarray:
    """A K x N matrix with singular values 2 * rate^i (random orthogonal factors)."""
    u, _ = np.linalg.qr(RNG.standard_normal((k, k)))
    v, _ = np.linalg.qr(RNG.standard_normal((n, n)))
    r = min(k, n)
    return (u[:, :r] * (2 * rate ** np.arange(r))) @ v[:, :r].T


def _f32(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


# (model, input shape, K x N weight as x multiplies it, how to place a K x N matrix in the initializer)
def gemm(trans_b: int, trans_a: int = 0):
    w = decaying(48, 40)
    stored = w.T if trans_b else w
    x_shape = [48, 3] if trans_a else [3, 48]
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b, transA=trans_a, alpha=0.5)
    model = make_model([node], [tensor_info("x", x_shape)], [tensor_info("y", [3, 40])],
                       [_f32("w", stored), _f32("b", RNG.standard_normal(40))])
    return model, x_shape, w, (lambda m: m.T) if trans_b else (lambda m: m)


def matmul():
    w = decaying(32, 64)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    model = make_model([node], [tensor_info("x", [2, 5, 32])], [tensor_info("y", [2, 5, 64])], [_f32("w", w)])
    return model, [2, 5, 32], w, lambda m: m


def conv1x1():
    w = decaying(40, 48)  # K = 40 input channels, N = 48 output channels
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="pw", strides=[2, 2], pads=[1, 1, 1, 1])
    model = make_model([node], [tensor_info("x", [1, 40, 7, 7])], [tensor_info("y", [1, 48, 5, 5])],
                       [_f32("w", w.T.reshape(48, 40, 1, 1)), _f32("b", RNG.standard_normal(48))])
    return model, [1, 40, 7, 7], w, lambda m: m.T.reshape(48, 40, 1, 1)


CASES = {"gemm": lambda: gemm(0), "gemm-transB": lambda: gemm(1), "gemm-transA": lambda: gemm(1, 1),
         "matmul": matmul, "conv1x1": conv1x1}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("energy", [0.9, 0.99])
def test_factorised_layer_against_onnxruntime(case, energy):
    model, x_shape, w, stored = CASES[case]()
    x = RNG.standard_normal(x_shape).astype(np.float32)
    module = prepared(model)
    (record,) = low_rank(module, energy)
    verify(module, require_types=True)

    u, s, vt = np.linalg.svd(w)
    squares = np.cumsum(s ** 2)
    rank = int(np.argmax(squares >= energy * squares[-1])) + 1
    k, n = w.shape
    assert record["skipped"] is None
    assert (record["rank"], record["full_rank"]) == (rank, min(k, n))
    assert record["energy_kept"] == pytest.approx(squares[rank - 1] / squares[-1]) and record["energy_kept"] >= energy
    assert record["bytes_before"] == k * n * 4 and record["bytes_after"] == rank * (k + n) * 4
    positions = record["macs_before"] // (k * n)
    assert record["macs_after"] == positions * rank * (k + n)
    assert len(record["nodes"]) == 2 and [n.name for n in module.graph.nodes] == record["nodes"]

    produced = run_module(module, {"x": x})[0]
    truncated = (u[:, :rank] * s[:rank]) @ vt[:rank]
    close(produced, ort_run(with_initializers(model, {"w": stored(truncated)}), {"x": x})[0], 1e-5)

    original = ort_run(model, {"x": x})[0]
    error = np.linalg.norm((produced - original).astype(np.float64))
    scale = 0.5 if case.startswith("gemm") else 1.0  # Gemm's alpha
    bound = scale * np.linalg.norm(x.astype(np.float64)) * np.sqrt(squares[-1] - squares[rank - 1])
    assert 0 < error <= bound * (1 + 1e-5) + 1e-5 * np.linalg.norm(original)


def test_native_code():
    model, x_shape, _, _ = conv1x1()
    x = RNG.standard_normal(x_shape).astype(np.float32)
    module = prepared(model)
    low_rank(module, 0.9)
    close(compile_module(module).run({"x": x})[0], run_module(module, {"x": x})[0], 1e-5)


def test_full_energy_saves_nothing():
    model, _, w, _ = gemm(1)
    module = prepared(model)
    (record,) = low_rank(module, 1.0)
    assert record["rank"] == record["full_rank"] == 40
    assert record["skipped"] == "rank 40 saves nothing (r*(K+N) = 3520 >= K*N = 1920)"
    assert record["bytes_after"] == record["bytes_before"] and record["macs_after"] == record["macs_before"]
    assert [n.op for n in module.graph.nodes] == ["Gemm"]
    np.testing.assert_array_equal(module.graph.nodes[0].inputs[1].const, initializer(model, "w"))


def test_kxk_and_grouped_convolutions_are_skipped():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv3x3", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c", "w2"], ["y"], name="dw", group=8)]
    model = make_model(nodes, [tensor_info("x", [1, 4, 6, 6])], [tensor_info("y", [1, 8, 6, 6])],
                       [_f32("w1", RNG.standard_normal((8, 4, 3, 3))), _f32("w2", RNG.standard_normal((8, 1, 1, 1)))])
    records = low_rank(prepared(model), 0.5)
    assert [r["skipped"] for r in records] == ["3x3 convolution (tucker=true factorises KxK kernels)",
                                               "grouped convolution (only group=1 1x1 convolutions are factorised)"]


def conv3x3():
    """A 3x3 Conv 24 -> 32 (stride 2, pads 1) whose weight is a Tucker-2 product of ranks 6 (in) / 8 (out) plus 1%
    noise."""
    rng = np.random.default_rng(21)
    a, _ = np.linalg.qr(rng.standard_normal((24, 6)))
    b, _ = np.linalg.qr(rng.standard_normal((32, 8)))
    w = np.einsum("rshw,nr,cs->nchw", rng.standard_normal((8, 6, 3, 3)), b, a)
    w += 0.01 * rng.standard_normal(w.shape)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1])
    model = make_model([node], [tensor_info("x", [1, 24, 9, 9])], [tensor_info("y", [1, 32, 5, 5])],
                       [_f32("w", w), _f32("b", rng.standard_normal(32))])
    return model, w.astype(np.float32).astype(np.float64)


def hosvd(w, energy):
    """numpy's own Tucker-2 truncation of a conv weight: (reconstruction, ranks, dropped squares per mode)."""
    n, c = w.shape[:2]
    result = []
    for mode in (w.reshape(n, -1), np.moveaxis(w, 1, 0).reshape(c, -1)):
        u, s, _ = np.linalg.svd(mode, full_matrices=False)
        squares = np.cumsum(s ** 2)
        r = int(np.argmax(squares >= energy * squares[-1])) + 1
        result.append((u[:, :r], r, squares[-1] - squares[r - 1]))
    (b, r_out, d_out), (a, r_in, d_in) = result
    projected = np.einsum("nchw,nr,mr,cs,ds->mdhw", w, b, b, a, a, optimize=True)  # W x_0 B B^T x_1 A A^T
    return projected, (r_in, r_out), d_in + d_out


def test_tucker2_conv_against_onnxruntime():
    model, w = conv3x3()
    x = RNG.standard_normal((1, 24, 9, 9)).astype(np.float32)
    module = prepared(model)
    (record,) = low_rank(module, 0.995, tucker=True)  # keeps the 6 / 8 components, drops the noise
    verify(module, require_types=True)
    reconstruction, (r_in, r_out), dropped = hosvd(w, 0.995)
    assert (r_in, r_out) == (6, 8) and record["skipped"] is None
    assert record["rank"] == [6, 8] and record["full_rank"] == [24, 32]
    assert record["energy_kept"] == pytest.approx(np.sum(reconstruction ** 2) / np.sum(w ** 2), rel=1e-9)
    assert [n.op for n in module.graph.nodes] == ["Conv"] * 3 and record["nodes"][-1] == "conv"
    assert record["bytes_after"] == (24 * 6 + 6 * 8 * 9 + 8 * 32) * 4 and record["bytes_before"] == w.size * 4
    assert record["macs_after"] == 81 * 24 * 6 + 25 * (6 * 8 * 9 + 8 * 32) and record["macs_before"] == 25 * w.size

    produced = run_module(module, {"x": x})[0]
    close(produced, ort_run(with_initializers(model, {"w": reconstruction}), {"x": x})[0], 1e-5)
    close(compile_module(module).run({"x": x})[0], produced, 1e-5)
    # ||conv(x, dW)||_F <= sqrt(taps) ||x||_F ||dW||_F (each input value is in at most 9 windows), and the
    # truncated HOSVD's ||dW||_F^2 is at most the dropped squares of both unfoldings
    error = np.linalg.norm(produced - ort_run(model, {"x": x})[0])
    assert 0 < error <= 3 * np.linalg.norm(x) * np.sqrt(dropped) * (1 + 1e-5)


def test_tucker2_needs_savings():
    model, _ = conv3x3()
    (record,) = low_rank(prepared(model), 1.0, tucker=True)
    assert record["skipped"].startswith("ranks 24/32 save nothing")
    assert record["rank"] == [24, 32]


@pytest.mark.parametrize("bad", [0, -0.1, 1.01, float("nan"), "0.9"])
def test_bad_energy_is_a_clear_error(bad):
    with pytest.raises(EdgeccError, match="energy must be a number in \\(0, 1\\]") as info:
        low_rank(prepared(matmul()[0]), bad)
    assert info.value.where == "--low-rank"


def test_pass_in_a_pipeline():
    module = prepared(matmul()[0])
    manager = PassManager(parse_pipeline("low-rank{energy=0.9}"), PassContext(verify_each=True))
    manager.run(module)
    assert manager.history[-1].stats == {"layers-factorised": 1, "layers-skipped": 0}
    assert [n.op for n in module.graph.nodes] == ["MatMul", "MatMul"]
    module = prepared(conv3x3()[0])
    manager = PassManager(parse_pipeline("low-rank{energy=0.995,tucker=true}"), PassContext(verify_each=True))
    manager.run(module)
    assert manager.history[-1].stats == {"layers-factorised": 1, "layers-skipped": 0}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_mobilenet"])
def test_shared_digits_models(shared_dir, name):
    records, _ = run_shared_model(shared_dir, name, lambda m: low_rank(m, 0.9, tucker=name == "digits_cnn"))
    assert records
    for record in records:
        if record["skipped"] is None:
            assert record["bytes_after"] < record["bytes_before"] and record["macs_after"] < record["macs_before"]
