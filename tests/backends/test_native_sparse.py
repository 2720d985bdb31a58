"""Sparse kernels (Gemm/MatMul with an encoded B, 1x1 Conv with an encoded W) against onnxruntime on the same ONNX
model, whose weights are the dense, zero-filled arrays.

Tolerance: 1e-5 of the output's largest magnitude. The sparse kernels add only the nonzero products, in increasing
k, with fused multiply-adds; onnxruntime sums all K products in its own order. Both are float32 sums of at most a
few hundred terms here, whose rounding differs by a few ulps of the largest partial sum (~K * 2^-24 relative in the
worst case, ~3e-6 for K = 37 at most 1e-5 for these sizes); any indexing error is of the order of the output itself.
"""

from __future__ import annotations

import shutil
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc
from edgecc.backends.kernels import sparse as sparse_kernels
from toolchains import missing_tools, skip_unless_runnable

RTOL = 1e-5


def _model(nodes, inputs, output_shape, inits, opset=18):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _sparse(rng, shape, level, zero_columns=(), axis=-1):
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < level] = 0
    for c in zero_columns:
        if c < w.shape[axis]:
            np.moveaxis(w, axis, 0)[c] = 0
    return w


def gemm_case(rng, m=3, k=37, n=29, trans_b=0, activation="Relu", level=0.8, zero=False, trans_a=0):
    shape = (n, k) if trans_b else (k, n)
    w = np.zeros(shape, np.float32) if zero else _sparse(rng, shape, level, zero_columns=(0, 9, 10, 11, 12, 13, 14, 15),
                                                         axis=0 if trans_b else 1)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g" if activation else "y"], transA=trans_a, transB=trans_b,
                              alpha=0.5)]
    if activation:
        nodes.append(helper.make_node(activation, ["g"], ["y"]))
    x_shape = [k, m] if trans_a else [m, k]
    model = _model(nodes, [("x", x_shape)], [m, n], {"w": w, "b": rng.standard_normal(n).astype(np.float32)})
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32)}


def matmul_case(rng, batch=(2, 5), k=16, n=21, level=0.9):
    w = _sparse(rng, (k, n), level, zero_columns=(3,))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["s"]),
             helper.make_node("Add", ["s", "r"], ["y"])]
    model = _model(nodes, [("x", [*batch, k]), ("r", [*batch, n])], [*batch, n],
                   {"w": w, "b": rng.standard_normal(n).astype(np.float32)})
    return model, {"x": rng.standard_normal((*batch, k)).astype(np.float32),
                   "r": rng.standard_normal((*batch, n)).astype(np.float32)}


def conv_case(rng, c=19, co=13, h=5, w=7, stride=1, level=0.7, residual=True, activation="Clip", batch=1):
    weights = _sparse(rng, (co, c, 1, 1), level, zero_columns=(2,), axis=0)
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[stride, stride])]
    inputs = [("x", [batch, c, h, w])]
    feeds = {"x": rng.standard_normal((batch, c, h, w)).astype(np.float32)}
    last = "c"
    if residual:
        nodes.append(helper.make_node("Add", ["c", "r"], ["a"]))
        inputs.append(("r", [batch, co, oh, ow]))
        feeds["r"] = rng.standard_normal((batch, co, oh, ow)).astype(np.float32)
        last = "a"
    inits = {"w": weights, "b": rng.standard_normal(co).astype(np.float32)}
    if activation == "Clip":
        inits.update(lo=np.array(-0.5, np.float32), hi=np.array(1.5, np.float32))
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["y"]))
    else:
        nodes[-1].output[0] = "y"
    return _model(nodes, inputs, [batch, co, oh, ow], inits), feeds


def kxk_case(rng, c=6, co=16, h=9, w=11, kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1),
             level=0.8, residual=False, batch=1):
    weights = _sparse(rng, (co, c, *kernel), level, zero_columns=(1,), axis=0)
    oh, ow = ((h + pads[0] + pads[2] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1,
              (w + pads[1] + pads[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if residual else "y"], strides=list(strides),
                              pads=list(pads), dilations=list(dilations))]
    inputs = [("x", [batch, c, h, w])]
    feeds = {"x": rng.standard_normal((batch, c, h, w)).astype(np.float32)}
    if residual:
        nodes += [helper.make_node("Add", ["c", "r"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
        inputs.append(("r", [batch, co, oh, ow]))
        feeds["r"] = rng.standard_normal((batch, co, oh, ow)).astype(np.float32)
    inits = {"w": weights, "b": rng.standard_normal(co).astype(np.float32)}
    return _model(nodes, inputs, [batch, co, oh, ow], inits), feeds


def _check(model: onnx.ModelProto, feeds, encoding: str, width: int = 0, target: str = "host"):
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    spec = f"encode-sparsity{{encoding={encoding}" + (f",width={width}" if width else "") + "}"
    compiled = edgecc.compile(model, target=target, passes=f"-O2,{spec}", progress=False)
    encoded = [v.type.sparse for v in compiled.module.graph.constants() if v.type.sparse is not None]
    assert len(encoded) == 1 and encoded[0].kind == encoding
    got = compiled.run(feeds)[0]
    scale = max(float(np.max(np.abs(reference))), 1e-30)
    assert np.max(np.abs(got - reference)) <= RTOL * scale
    return compiled


@pytest.fixture
def sparse_calls(monkeypatch):
    """Counts the sparse kernels built (so a test fails if the dense kernel quietly ran instead)."""
    calls = []
    original = sparse_kernels.sparse_weights

    def spy(kb):
        found = original(kb)
        if found is not None:
            calls.append(kb.node.op)
        return found

    monkeypatch.setattr(sparse_kernels, "sparse_weights", spy)
    import edgecc.backends.kernels.linalg as linalg

    monkeypatch.setattr(linalg, "sparse_weights", spy)
    return calls


ENCODINGS = [("csr", 0), ("block", 4), ("block", 8), ("block", 16)]


@pytest.mark.parametrize("encoding, width", ENCODINGS)
@pytest.mark.parametrize("case", ["gemm", "gemm_transb_m1", "gemm_plain", "gemm_rows_transa", "matmul_batched",
                                  "matmul_rows", "conv", "conv_s2_batch", "conv_plain_wide", "conv3x3", "conv3x3_s2",
                                  "conv5x3_dilated", "conv1x1_padded", "conv3x3_wide"])
def test_sparse_kernels_match_onnxruntime(case, encoding, width, sparse_calls):
    rng = np.random.default_rng(zlib.crc32(f"{case} {encoding} {width}".encode()))
    model, feeds = {
        "gemm": lambda: gemm_case(rng),
        "gemm_transb_m1": lambda: gemm_case(rng, m=1, k=64, n=20, trans_b=1, activation="Sigmoid", level=0.95),
        "gemm_plain": lambda: gemm_case(rng, m=6, k=5, n=3, activation="", level=0.5),
        "gemm_rows_transa": lambda: gemm_case(rng, m=19, k=23, n=37, trans_a=1, level=0.9),
        "matmul_batched": lambda: matmul_case(rng),
        "matmul_rows": lambda: matmul_case(rng, batch=(1, 77), k=43, n=45, level=0.85),
        "conv": lambda: conv_case(rng),
        "conv_s2_batch": lambda: conv_case(rng, c=8, co=10, h=9, w=11, stride=2, residual=False, activation="", batch=2),
        "conv_plain_wide": lambda: conv_case(rng, c=24, co=36, h=9, w=13, level=0.9, residual=False, activation=""),
        "conv3x3": lambda: kxk_case(rng, residual=True),
        "conv3x3_s2": lambda: kxk_case(rng, h=10, w=13, strides=(2, 2), batch=2),
        "conv5x3_dilated": lambda: kxk_case(rng, kernel=(5, 3), dilations=(2, 2), pads=(3, 0, 1, 2), h=12, w=10),
        "conv1x1_padded": lambda: kxk_case(rng, kernel=(1, 1), pads=(1, 2, 0, 1), co=10),
        "conv3x3_wide": lambda: kxk_case(rng, c=5, co=32, h=5, w=45, level=0.7),
    }[case]()
    _check(model, feeds, encoding, width)
    assert sparse_calls, "the sparse kernel did not run"


def _unslice(words: np.ndarray, k: int, n: int, lanes: int) -> np.ndarray:
    """numpy decoder of ops.sparse.pack_sliced back to the [K, N] matrix (padding slots hold 0.0); k is a uint8 when
    K <= 256, else a uint16."""
    index_bytes = 1 if k <= 256 else 2
    slices = -(-n // lanes)
    steps, columns = words[:slices + 1], words[slices + 1:slices + 1 + slices * lanes]
    body = words[slices + 1 + slices * lanes:].view(np.uint8).reshape(-1, (4 + index_bytes) * lanes)
    values = body[:, :4 * lanes].copy().view(np.float32)
    ks = body[:, 4 * lanes:].copy().view("<u2" if index_bytes == 2 else "u1")
    out = np.zeros((k, slices * lanes), np.float32)
    for s in range(slices):
        for t in range(steps[s], steps[s + 1]):
            for j in range(lanes):
                out[ks[t, j], columns[s * lanes + j]] += values[t, j]
    return out[:, :n]


@pytest.mark.parametrize("k, step_bytes", [(300, 96), (256, 80)])
def test_sliced_layout_round_trips(k, step_bytes):
    """The sliced layout holds every nonzero once, in its column (sorted into slices of 16 by count); padding
    slots are 0.0 at a k the column reads anyway; a few columns past a multiple of 16 and empty columns; uint16 k
    past K = 256 (6 bytes per slot), uint8 k up to K = 256 (5 bytes), the last row of A included."""
    from edgecc.ops.sparse import SLICE_LANES, pack_sliced

    rng = np.random.default_rng(31)
    w = _sparse(rng, (k, 37), 0.9, zero_columns=(0, 5, 36))
    w[k - 1, 1] = 2.5
    words = pack_sliced(w, SLICE_LANES)
    np.testing.assert_array_equal(_unslice(words, k, 37, SLICE_LANES), w)
    assert words.dtype == np.int32
    slices = 3
    assert (words.size - (slices + 1 + slices * SLICE_LANES)) * 4 == words[slices] * step_bytes


@pytest.mark.skipif(edgecc.backends.targets.resolve_target("host").vector_bits != 256,
                    reason="the sliced matrix-vector kernel is for 8-lane (AVX) hosts")
@pytest.mark.parametrize("m, k, n, trans_b", [(1, 300, 37, 1), (1, 256, 40, 0), (1, 16, 5, 0), (7, 45, 70, 0)])
def test_sliced_matrix_vector_kernel_matches_onnxruntime(monkeypatch, m, k, n, trans_b):
    """CSR products with fewer rows than the 8 lanes take the sliced kernel: k past 255 (uint16 indices), K = 256
    (uint8 indices up to 255), fewer columns than a slice, 7 rows, empty columns; fused activation, alpha and
    bias."""
    calls = []
    original = sparse_kernels.emit_sliced_rows
    monkeypatch.setattr(sparse_kernels, "emit_sliced_rows", lambda kb, *args: calls.append(1) or original(kb, *args))
    monkeypatch.setattr(sparse_kernels, "permuted_product", lambda *args: False)  # (it takes cached K = 8i weights)
    rng = np.random.default_rng(zlib.crc32(f"sliced {m} {k} {n}".encode()))
    _check(*gemm_case(rng, m=m, k=k, n=n, trans_b=trans_b, level=0.9), "csr")
    assert calls, "the sliced kernel did not run"


def _unpermute(words: np.ndarray, k: int, n: int) -> np.ndarray:
    """numpy decoder of ops.sparse.pack_permuted back to the [K, N] matrix (padding slots add 0.0)."""
    from edgecc.ops.sparse import (PERMUTED_LANES as lanes, PERMUTED_OVERFLOW_GROUP, PERMUTED_RUN_SLICES,
                                   PERMUTED_UNIT_WORDS, permuted_main_words)

    slices, chunks = -(-n // lanes), k // lanes
    first = words[:slices + 1]
    assert (np.diff(first) % PERMUTED_OVERFLOW_GROUP == 0).all()
    at = -(-(slices + 1) // lanes) * lanes
    out = np.zeros((k, slices * lanes), np.float32)

    def add(rows, s, values):
        np.add.at(out, (rows, s * lanes + np.arange(lanes)), values.view(np.float32))

    for s0 in range(0, slices, PERMUTED_RUN_SLICES):
        run = range(s0, min(s0 + PERMUTED_RUN_SLICES, slices))
        for c in range(chunks):
            record = words[at:at + permuted_main_words(len(run))]
            at += record.size
            index = record[:lanes].view(np.uint32)
            for i, s in enumerate(run):
                for step in range(2):
                    add(c * lanes + (index >> 6 * i + 3 * step & 7), s,
                        record[lanes * (1 + 2 * i + step):lanes * (2 + 2 * i + step)])
    units = words[at:].reshape(-1, PERMUTED_UNIT_WORDS)
    assert len(units) == first[-1]
    for s in range(slices):
        for unit in units[first[s]:first[s + 1]]:
            index = unit[:lanes].view(np.uint32)
            for step in range(2):
                add(int(index[0] >> 6) + (index >> 3 * step & 7), s, unit[lanes * (1 + step):lanes * (2 + step)])
    return out[:, :n]


@pytest.mark.parametrize("k, n", [(256, 37), (8, 3), (64, 16), (40, 24)])
def test_permuted_layout_round_trips(k, n):
    """The permuted layout holds every nonzero once, in its column and row; padding slots add 0.0; columns past a
    multiple of 8, empty columns, a column full in one chunk (8 steps: 3 overflow units of one block), an odd slice
    count (the last main run of one slice)."""
    from edgecc.ops.sparse import pack_permuted, permuted_words

    rng = np.random.default_rng(k + n)
    w = _sparse(rng, (k, n), 0.9, zero_columns=(0, n - 1))
    w[:8, 1] = np.arange(1, 9)
    words = pack_permuted(w)
    assert words.dtype == np.int32 and words.size == permuted_words(w)
    np.testing.assert_array_equal(_unpermute(words, k, n), w)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_permuted(w[:k - 1])


@pytest.mark.skipif(edgecc.backends.targets.resolve_target("host").vector_bits != 256,
                    reason="the permuted matrix-vector kernel is for 8-lane (AVX2) hosts")
@pytest.mark.parametrize("m, k, n, trans_b", [(1, 256, 40, 0), (1, 16, 5, 0), (3, 64, 13, 1), (1, 128, 10, 0),
                                              (1, 40, 24, 0), (1, 24, 17, 0)])
def test_permuted_matrix_vector_kernel_matches_onnxruntime(monkeypatch, m, k, n, trans_b):
    """CSR products with few rows, K a multiple of 8 and a cached weight take the permuted kernel: fewer columns than
    a slice, columns past a multiple of 8, 3 rows, transposed B; fused activation, alpha and bias."""
    calls = []
    original = sparse_kernels.emit_permuted_rows
    monkeypatch.setattr(sparse_kernels, "emit_permuted_rows", lambda kb, *args: calls.append(1) or original(kb, *args))
    rng = np.random.default_rng(zlib.crc32(f"permuted {m} {k} {n}".encode()))
    _check(*gemm_case(rng, m=m, k=k, n=n, trans_b=trans_b, level=0.9), "csr")
    assert calls, "the permuted kernel did not run"


def test_all_zero_weight(sparse_calls):
    rng = np.random.default_rng(1)
    model, feeds = gemm_case(rng, zero=True, activation="")
    _check(model, feeds, "block", 8)
    model, feeds = gemm_case(rng, zero=True, activation="")
    _check(model, feeds, "csr")
    assert len(sparse_calls) == 2


def test_same_shaped_layers_share_one_sparse_kernel():
    """The pattern is data: two 1x1 convolutions of one shape but different zeros compile to one kernel."""
    rng = np.random.default_rng(2)
    w1, w2 = _sparse(rng, (8, 8, 1, 1), 0.8), _sparse(rng, (8, 8, 1, 1), 0.8)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"]), helper.make_node("Conv", ["h", "w2"], ["y"])]
    model = _model(nodes, [("x", [1, 8, 6, 6])], [1, 8, 6, 6], {"w1": w1, "w2": w2})
    compiled = _check_two(model, {"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)})
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (text,) = compiled.artifacts(os.path.join(tmp, "m"), emit="llvm").values()
    assert len(set(__import__("re").findall(r"define[^@]*@(\w+_k\d+_Conv_\w+)", text.decode()))) == 1


def _check_two(model, feeds):
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    compiled = edgecc.compile(model, passes="-O2,encode-sparsity{encoding=csr}", progress=False)
    assert sum(v.type.sparse is not None for v in compiled.module.graph.constants()) == 2
    got = compiled.run(feeds)[0]
    assert np.max(np.abs(got - reference)) <= RTOL * np.max(np.abs(reference))
    return compiled


@pytest.mark.slow
@pytest.mark.parametrize("target", ["armv7", "armv8"])
def test_arm_targets_under_qemu(target):
    skip_unless_runnable(target)
    rng = np.random.default_rng(3)
    for encoding, width in [("csr", 0), ("block", 4), ("block", 8)]:
        for model, feeds in (gemm_case(rng), matmul_case(rng), matmul_case(rng, batch=(1, 21), k=9, n=11), conv_case(rng),
                             kxk_case(rng, residual=True), kxk_case(rng, h=10, w=13, strides=(2, 2)),
                             conv_case(rng, c=8, co=10, h=9, w=11, stride=2, residual=False, activation="")):
            _check(model, feeds, encoding, width, target=target)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                    reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm (installed by .ci/run)")
@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m55"])
def test_pruned_model_on_cortex_m(tmp_path, target):
    """A strided 1x1 Conv + Gemm model with 90% zeros at -O3 for Cortex-M (scalar M4, MVE M55; no stack scratch
    there, so no band): the cost model encodes the Conv, and the firmware's output under qemu-system-arm matches
    onnxruntime."""
    from test_bare_metal import _run_on_board, _semihosting_firmware

    from edgecc.cli import main

    rng = np.random.default_rng(4)
    w1 = _sparse(rng, (16, 8, 1, 1), 0.9)
    w2 = _sparse(rng, (16 * 25, 10), 0.9)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], strides=[2, 2]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "w2"], ["y"])]
    model = _model(nodes, [("x", [1, 8, 9, 9])], [1, 10], {"w1": w1, "b1": rng.standard_normal(16).astype(np.float32),
                                                             "w2": w2})
    onnx.save(model, tmp_path / "m.onnx")
    x = rng.standard_normal((1, 8, 9, 9)).astype(np.float32)
    x.tofile(tmp_path / "input.bin")
    compiled = edgecc.compile(model, target=target, opt_level=3, runtime="native", progress=False)
    encoded = {n.op: n.inputs[1].type.sparse for n in compiled.module.graph.nodes if n.op in ("FusedConv", "Gemm")}
    assert encoded["FusedConv"] is not None
    assert main([str(tmp_path / "m.onnx"), "-O3", "--target", target, "-o", str(tmp_path / "model")]) == 0
    run = _run_on_board(target, _semihosting_firmware(tmp_path, target), tmp_path / "input.bin")
    got = np.array([float(v) for v in run.stdout.split()], np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0].reshape(-1)
    assert np.max(np.abs(got - expected)) <= RTOL * np.max(np.abs(expected))


def _pruned_model(path, level: float) -> onnx.ModelProto:
    """The ONNX model with every group-1 Conv and Gemm/MatMul initializer magnitude-pruned to `level` (numpy)."""
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in inits and \
                not any(a.name == "group" and a.i != 1 for a in node.attribute):
            w = numpy_helper.to_array(inits[node.input[1]])
            w = np.where(np.abs(w) > np.quantile(np.abs(w), level), w, 0).astype(w.dtype)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    return model


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_mobilenet"])
def test_pruned_digits_models_host_and_armv8(shared_dir, name):
    """The trained digits models with 90% of their group-1 Conv/FC weights zeroed, at -O3 (the cost model picks the
    encodings; digits_mlp's one-row layers stay dense but on AVX hosts) and with every such layer forced to CSR, on the host and armv8
    under qemu, against onnxruntime on the same pruned model: max error <= 1e-4 of the largest logit (the bound of
    the native shared-model tests; whole models chain a few layers)."""
    path = shared_dir / "data" / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"no {path}")
    model = _pruned_model(path, 0.9)
    x = np.load(shared_dir / "data" / f"{name}_test.npz")["input"][:1].reshape(
        [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    feeds = {model.graph.input[0].name: x}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    targets = ["host"] + ([] if missing_tools("armv8") else ["armv8"])
    for target in targets:
        for passes in ("-O3", "-O3,encode-sparsity{encoding=csr}"):
            compiled = edgecc.compile(model, target=target, passes=passes, runtime="native", progress=False)
            encoded = sum(v.type.sparse is not None for v in compiled.module.graph.constants())
            sliced = edgecc.backends.targets.resolve_target(target).vector_bits == 256  # (AVX: sliced kernel)
            assert encoded if passes != "-O3" or name != "digits_mlp" or sliced else not encoded, (target, passes)
            got = compiled.run(feeds)[0]
            assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected)), (target, passes)
