"""int8 sparse kernels (backends/kernels/qsparse.py): edgecc.QGemm with its int8 B, and QLinearConv (1x1 and KxK,
strided, padded, dilated) with its W,
stored in the int8 sparse layout (ops/sparse.py `pack_int8`), against the dense int8 kernel on the same node and
edgecc's reference interpreter of it (the op's registry reference, which follows the ONNX spec and is checked against onnxruntime in
test_native_qconv.py / test_quantize_int8.py).

Tolerance: bit-exact. The sparse kernel sums the same exact integers (no overflow: |sum| < 2^31) and requantises
with the dense kernels' own code: on hosted targets qconv.QuantParams, as the dense fast kernel, so the outputs
equal the dense kernel's exactly (and the reference's within 1 near ties, as the dense kernel's:
test_native_qconv.assert_close_int); elsewhere, and past MAX_CHANNELS columns, the generic kernel's exact
requantisation, so the outputs equal the reference's exactly.
"""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc
from edgecc.backends.kernels import qsparse
from edgecc.ir.types import SparseEncoding
from edgecc.ops.sparse import int8_offset_bytes, int8_stored_bytes, pack_int8

from test_native_qconv import assert_close_int, qconv_model, qgemm_model, reference
from toolchains import needs_target, needs_tools

RNG = np.random.default_rng(23)


def sparse_qgemm(a_shape, n: int, trans_b: int, level: float = 0.9, a_dtype=np.uint8, zero_columns=(1,)):
    """test_native_qconv's QGemm with `level` of B zeroed (and whole output columns `zero_columns`)."""
    model, feeds = qgemm_model(a_shape, n, trans_b, a_dtype)
    init = next(i for i in model.graph.initializer if i.name == "b")
    w = numpy_helper.to_array(init).copy()
    w[RNG.random(w.shape) < level] = 0
    for c in zero_columns:
        (w[c] if trans_b else w[:, c])[...] = 0
    init.CopyFrom(numpy_helper.from_array(w, "b"))
    return model, feeds


@pytest.fixture
def qsparse_calls(monkeypatch):
    """The nodes the int8 sparse kernels built (so a test fails if the dense kernel quietly ran instead)."""
    calls = []
    for name in ("emit_sparse_qgemm", "emit_sparse_qlinear_conv"):
        original = getattr(qsparse, name)

        def spy(kb, original=original):
            done = original(kb)
            if done:
                calls.append(kb.node.op)
            return done

        monkeypatch.setattr(qsparse, name, spy)
    return calls


def sparse_qconv(x_shape, m: int, level: float = 0.9, kernel: int = 1, **options):
    """test_native_qconv's QLinearConv (kernel x kernel) with `level` of W zeroed (and output channel 1 entirely)."""
    model, feeds = qconv_model(x_shape, m, kernel, **options)
    init = next(i for i in model.graph.initializer if i.name == "w")
    w = numpy_helper.to_array(init).copy()
    w[RNG.random(w.shape) < level] = 0
    w[1] = 0
    init.CopyFrom(numpy_helper.from_array(w, "w"))
    return model, feeds


def sparse_against_dense(model, feeds, encoding: str) -> np.ndarray:
    """The node compiled with its weight forced to `encoding` ("csr", "block{width=4}"), checked to take it and
    to equal the dense kernel bit for bit; its output."""
    kind, _, width = encoding.partition("{")
    spec = f"-O2,encode-sparsity{{encoding={kind}" + ("," + width if width else "}")
    compiled = edgecc.compile(model, runtime="native", passes=spec, progress=False)
    assert [v.type.sparse.kind for v in compiled.module.graph.constants() if v.type.sparse is not None] == [kind]
    got = compiled.run(feeds)[0]
    dense = edgecc.compile(model, runtime="native", passes="-O2", progress=False).run(feeds)[0]
    np.testing.assert_array_equal(got, dense)
    return got


def _unpack(words: np.ndarray, k: int, n: int, width: int) -> np.ndarray:
    """numpy decoder of the int8 layout (the module docstring of ops/sparse.py) back to the [K, N] matrix."""
    raw = words.astype("<i4").view(np.uint8)
    blocks = -(-n // width)
    step = int8_offset_bytes(k, blocks)
    offsets = raw[:step * (blocks + 1)].view("<u2" if step == 2 else "<i4").astype(np.int64)
    records = raw[step * (blocks + 1):]
    out = np.zeros((k, blocks * width), np.int8)
    for j in range(blocks):
        for e in range(offsets[j], offsets[j + 1]):
            rec = records[e * (2 + width):(e + 1) * (2 + width)]
            out[int(rec[0]) | int(rec[1]) << 8, j * width:(j + 1) * width] = rec[2:].view(np.int8)
    return out[:, :n]


@pytest.mark.parametrize("k, n, width", [(37, 29, 1), (40, 21, 4), (300, 300, 1), (9, 13, 8)])
def test_int8_layout_round_trips_and_is_counted_exactly(k, n, width):
    matrix = RNG.integers(-127, 128, (k, n)).astype(np.int8)
    matrix[RNG.random((k, n)) < 0.9] = 0
    words = pack_int8(matrix, width)
    assert words.dtype == np.int32 and words.nbytes == int8_stored_bytes(matrix, width)
    np.testing.assert_array_equal(_unpack(words, k, n, width), matrix)
    assert int8_offset_bytes(k, -(-n // width)) == (4 if k * n > 0xFFFF and width == 1 else 2)


def test_int8_layout_is_under_8_percent_of_float32_at_90_percent():
    matrix = RNG.integers(1, 128, (256, 512)).astype(np.int8)
    matrix[RNG.random(matrix.shape) < 0.9] = 0
    fraction = int8_stored_bytes(matrix, 1) / (4 * matrix.size)
    assert 0.07 < fraction <= 0.08, fraction  # 3 bytes per nonzero (7.5%) + offsets


QGEMM_CASES = {  # (A shape, N, transB, A dtype)
    "transb_rows": ((3, 37), 29, 1, np.uint8),
    "plain_b_signed_a": ((2, 40), 21, 0, np.int8),
    "gemv_batched": ((2, 1, 64), 10, 1, np.uint8),
    "int32_offsets": ((2, 300), 240, 0, np.uint8),  # K x J > 65535 (CSR): int32 offsets
}


@pytest.mark.parametrize("encoding", ["csr", "block{width=4}", "block{width=8}"])
@pytest.mark.parametrize("case", sorted(QGEMM_CASES))
def test_sparse_qgemm_equals_dense_kernel(case, encoding, qsparse_calls):
    a_shape, n, trans_b, a_dtype = QGEMM_CASES[case]
    model, feeds = sparse_qgemm(a_shape, n, trans_b, a_dtype=a_dtype)
    got = sparse_against_dense(model, feeds, encoding)
    assert qsparse_calls, "the sparse kernel did not run"
    assert_close_int(got, reference(model, feeds))


CONV_CASES = {  # (x shape, output channels, options)
    "pointwise": ((1, 24, 9, 9), 40, {}),
    "signed_batched": ((2, 13, 5, 7), 10, dict(x_dtype=np.int8, y_dtype=np.int8)),
    "per_tensor_no_bias": ((1, 16, 4, 6), 12, dict(per_channel=False, bias=False)),
}


@pytest.mark.parametrize("encoding", ["csr", "block{width=4}", "block{width=8}"])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_sparse_pointwise_qlinear_conv_equals_dense_kernel(case, encoding, qsparse_calls):
    x_shape, m, options = CONV_CASES[case]
    model, feeds = sparse_qconv(x_shape, m, **options)
    got = sparse_against_dense(model, feeds, encoding)
    assert qsparse_calls == ["QLinearConv"]
    assert_close_int(got, reference(model, feeds))


KXK_CASES = {  # (x shape, output channels, kernel, attributes): digits_cnn / ResNet layer kinds on small maps
    "3x3_s2_padded": ((1, 16, 14, 14), 32, 3, dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "3x3_s1_padded": ((1, 8, 9, 10), 12, 3, dict(pads=[1, 1, 1, 1])),
    "dilated_signed_batched": ((2, 5, 9, 8), 8, 3, dict(dilations=[2, 2], x_dtype=np.int8, y_dtype=np.int8)),
    "1x1_s2": ((1, 8, 7, 7), 8, 1, dict(strides=[2, 2])),
    "2x2_asymmetric_pads_per_tensor": ((1, 6, 7, 7), 8, 2, dict(pads=[0, 1, 1, 0], strides=[2, 1],
                                                                 per_channel=False, bias=False)),
}


@pytest.mark.parametrize("encoding", ["csr", "block{width=4}"])
@pytest.mark.parametrize("case", sorted(KXK_CASES))
def test_sparse_kxk_qlinear_conv_equals_dense_kernel(case, encoding, qsparse_calls):
    """KxK, strided, dilated and padded convolutions: the tap walk (a tap outside the input skipped) is bit-exact to
    the dense int8 kernel, and within the one-step tolerance of onnx.reference (assert_close_int)."""
    from qdq_reference import reference_runner

    x_shape, m, k, options = KXK_CASES[case]
    model, feeds = sparse_qconv(x_shape, m, 0.85, k, **options)
    got = sparse_against_dense(model, feeds, encoding)
    assert qsparse_calls == ["QLinearConv"]
    assert_close_int(got, reference_runner(model)(feeds))


def test_kxk_blocks_must_not_straddle_taps():
    """A KxK QLinearConv whose C_out is not a multiple of V keeps its weight dense under forced blocks (a block of
    the [C_in, taps x C_out] view would mix two taps); CSR encodes it."""
    model, _ = qconv_model((1, 8, 6, 6), 6, 3)
    encodings = {}
    for spec in ("encoding=block,width=4", "encoding=csr"):
        compiled = edgecc.compile(model, runtime="reference", passes=f"-O2,encode-sparsity{{{spec}}}",
                                  progress=False)
        encodings[spec] = [v.type.sparse for v in compiled.module.graph.constants() if v.type.sparse is not None]
    assert encodings == {"encoding=block,width=4": [], "encoding=csr": [SparseEncoding("csr")]}


def test_grouped_qlinear_conv_stays_dense():
    model, _ = qconv_model((1, 8, 6, 6), 8, 3, group=2)
    compiled = edgecc.compile(model, runtime="reference", passes="-O2,encode-sparsity{encoding=csr}", progress=False)
    assert all(v.type.sparse is None for v in compiled.module.graph.constants())


def test_wide_layer_takes_the_exact_requantisation(qsparse_calls):
    """More columns than qconv.MAX_CHANNELS: the generic kernel's exact requantisation (the form microcontrollers
    use), bit-exact to the reference; also the narrower last column block (4100 = 4 x 1025)."""
    model, feeds = sparse_qgemm((2, 8), 4101, 1, level=0.8)
    compiled = edgecc.compile(model, runtime="native", passes="-O2,encode-sparsity{encoding=block,width=4}",
                              progress=False)
    got = compiled.run(feeds)[0]
    assert qsparse_calls
    np.testing.assert_array_equal(got, reference(model, feeds))
    model, feeds = sparse_qconv((1, 8, 3, 3), 4101, level=0.8)
    compiled = edgecc.compile(model, runtime="native", passes="-O2,encode-sparsity{encoding=csr}", progress=False)
    np.testing.assert_array_equal(compiled.run(feeds)[0], reference(model, feeds))
    assert qsparse_calls == ["QGemm", "QLinearConv"]


def test_cost_model_encodes_int8_on_microcontrollers_and_generic_dot4_hosts():
    model, _ = sparse_qgemm((1, 64), 128, 1)
    weights = {}
    for target in ("cortex-m4", "x86-64-v3"):
        compiled = edgecc.compile(model, target=target, opt_level=3, progress=False)
        (value,) = [n.inputs[3] for n in compiled.module.graph.nodes if n.op == "QGemm"]
        weights[target] = value.type.sparse
    assert weights["cortex-m4"] == SparseEncoding("csr") and weights["x86-64-v3"].kind == "block"


@pytest.mark.slow
@pytest.mark.parametrize("target", [pytest.param("armv8", marks=needs_target("armv8")),
                                    pytest.param("armv7", marks=needs_target("armv7"))])
def test_arm_targets_under_qemu(target):
    for case in ("transb_rows", "plain_b_signed_a"):
        a_shape, n, trans_b, a_dtype = QGEMM_CASES[case]
        model, feeds = sparse_qgemm(a_shape, n, trans_b, a_dtype=a_dtype)
        for spec in ("encoding=csr", "encoding=block,width=4"):
            compiled = edgecc.compile(model, target=target, runtime="native",
                                      passes=f"-O2,encode-sparsity{{{spec}}}", progress=False)
            dense = edgecc.compile(model, target=target, runtime="native", passes="-O2", progress=False)
            np.testing.assert_array_equal(compiled.run(feeds)[0], dense.run(feeds)[0])
    model, feeds = sparse_qconv((2, 13, 5, 7), 10, x_dtype=np.int8, y_dtype=np.int8)
    for spec in ("encoding=csr", "encoding=block,width=4"):
        compiled = edgecc.compile(model, target=target, runtime="native",
                                  passes=f"-O2,encode-sparsity{{{spec}}}", progress=False)
        dense = edgecc.compile(model, target=target, runtime="native", passes="-O2", progress=False)
        np.testing.assert_array_equal(compiled.run(feeds)[0], dense.run(feeds)[0])
    x_shape, m, k, options = KXK_CASES["3x3_s2_padded"]
    model, feeds = sparse_qconv(x_shape, m, 0.85, k, **options)
    for spec in ("encoding=csr", "encoding=block,width=4"):
        compiled = edgecc.compile(model, target=target, runtime="native",
                                  passes=f"-O2,encode-sparsity{{{spec}}}", progress=False)
        dense = edgecc.compile(model, target=target, runtime="native", passes="-O2", progress=False)
        np.testing.assert_array_equal(compiled.run(feeds)[0], dense.run(feeds)[0])
    for model, feeds in (sparse_qgemm((2, 8), 4101, 1, level=0.8), sparse_qconv((1, 8, 3, 3), 4101, level=0.8)):
        compiled = edgecc.compile(model, target=target, runtime="native",  # the exact requantisation
                                  passes="-O2,encode-sparsity{encoding=csr}", progress=False)
        np.testing.assert_array_equal(compiled.run(feeds)[0], reference(model, feeds))


@pytest.mark.slow
@needs_tools("arm-none-eabi-gcc", "qemu-system-arm")
def test_pruned_int8_mlp_on_cortex_m4(tmp_path):
    """A float 3x3 padded Conv + MLP pruned to 90% and quantised to int8 by edgecc for Cortex-M4: the QLinearConv and both
    QGemm weights take the int8 sparse layout (the microcontroller cost model), and the firmware's output under qemu-system-arm equals the
    reference interpreter's on the same compiled module (exact: integer kernels, the exact requantisation, the same
    float32 dequantisation)."""
    from test_bare_metal import _run_on_board, _semihosting_firmware

    from edgecc.cli import main

    w0 = RNG.standard_normal((16, 32, 3, 3)).astype(np.float32)  # (pruning keeps < 32 weights per channel dense)
    w1, w2 = RNG.standard_normal((64, 48)).astype(np.float32), RNG.standard_normal((48, 10)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["cr"]),
             helper.make_node("Flatten", ["cr"], ["f"]),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1"),
                               numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(RNG.standard_normal(48).astype(np.float32), "b1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((16, 1, 32, 2, 2)).astype(np.float32))
    x = RNG.standard_normal((1, 32, 2, 2)).astype(np.float32)
    x.tofile(tmp_path / "input.bin")
    options = dict(prune=0.9, quantize="int8", calibration=str(tmp_path / "calib.npz"), opt_level=3, progress=False)
    board = edgecc.compile(model, target="cortex-m4", **options)
    encoded = {n.op + str(i): n.inputs[3].type.sparse for i, n in enumerate(board.module.graph.nodes)
               if n.op in ("QGemm", "QLinearConv")}
    assert len(encoded) == 3 and all(e is not None for e in encoded.values()), encoded
    expected = edgecc.compile(model, runtime="reference", **options).run({"x": x})[0].reshape(-1)
    assert main([str(tmp_path / "m.onnx"), "-O3", "--target", "cortex-m4", "--prune", "0.9", "--quantize", "int8",
                 "--calibration", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "model")]) == 0
    run = _run_on_board("cortex-m4", _semihosting_firmware(tmp_path, "cortex-m4"), tmp_path / "input.bin")
    got = np.array([float(v) for v in run.stdout.split()], np.float32)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.shared
@pytest.mark.slow
def test_digits_mlp_pruned_int8_bytes(shared_dir):
    """Issue 6's figure: digits_mlp pruned to 90% and quantised to int8 for Cortex-M4 stores its weights in under
    10% of their float32 bytes (encode_sparsity.encoded_bytes), and quantisation keeps exactly the pruned zeros."""
    from edgecc.passes.encode_sparsity import encoded_bytes

    path, calib = shared_dir / "data" / "digits_mlp.onnx", shared_dir / "data" / "digits_mlp_calib.npz"
    if not path.is_file():
        pytest.skip(f"no {path}")
    board = edgecc.compile(str(path), opt_level=3, target="cortex-m4", prune=0.9, quantize="int8",
                           calibration=str(calib), progress=False)
    weights = [n.inputs[3] for n in board.module.graph.nodes if n.op == "QGemm"]
    assert len(weights) == 3 and all(v.type.sparse is not None for v in weights)
    assert sum(encoded_bytes(v) for v in weights) <= 0.10 * sum(4 * v.const.size for v in weights)
    pruned = edgecc.compile(str(path), opt_level=3, target="cortex-m4", prune=0.9, calibration=str(calib),
                            progress=False)
    floats = [n.inputs[1].const for n in pruned.module.graph.nodes if n.op in ("Gemm", "FusedGemm")]
    assert len(floats) == 3
    for w, q in zip(floats, (v.const for v in weights)):
        w = w if w.shape == q.shape else w.T
        np.testing.assert_array_equal(w == 0, q == 0)
