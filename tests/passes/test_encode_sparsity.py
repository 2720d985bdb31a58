"""encode-sparsity: the encoding as an IR type (print, parse, clone, verify), the cost model's choices, bytes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc
from edgecc.errors import IRParseError, PassError, VerificationError
from edgecc.ir.parser import parse_module
from edgecc.ir.printer import print_module
from edgecc.ir.types import SparseEncoding
from edgecc.ir.verifier import verify
from edgecc.ops.sparse import pack
from edgecc.passes.encode_sparsity import encode_sparsity, encoded_bytes


def _model(conv_w, fc_w, fc_rows=1):
    """x -> 1x1 Conv -> Relu -> Flatten -> Gemm (fc_rows = 1) or x2 -> MatMul (fc_rows rows)."""
    c = conv_w.shape[1]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "fw"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, fc_w.shape[1]])],
                              [numpy_helper.from_array(conv_w, "cw"), numpy_helper.from_array(fc_w, "fw")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _weights(rng, level_conv, level_fc, fc_block=1):
    conv = rng.standard_normal((32, 16, 1, 1)).astype(np.float32)
    conv[rng.random(conv.shape) < level_conv] = 0
    fc = rng.standard_normal((32 * 16, 64)).astype(np.float32)
    if fc_block > 1:
        keep = np.repeat(rng.random((fc.shape[0], 64 // fc_block)) >= level_fc, fc_block, axis=1)
    else:
        keep = rng.random(fc.shape) >= level_fc
    return conv, np.where(keep, fc, 0).astype(np.float32)


def _encodings(compiled) -> dict[str, str]:
    return {n.op: str(n.inputs[1].type.sparse) for n in compiled.module.graph.nodes
            if n.op in ("FusedConv", "Conv", "Gemm", "FusedGemm")}


def test_dense_model_is_unchanged_by_o2():
    """A dense model prints the same with and without encode-sparsity at the end of -O2 (it is a no-op)."""
    rng = np.random.default_rng(0)
    model = _model(*_weights(rng, 0.0, 0.0))
    with_pass = edgecc.compile(model, opt_level=2, runtime="reference")
    without = edgecc.compile(model, runtime="reference", passes="infer-shapes,lower-qdq,canonicalize,fold-constants,"
                             "fold-batchnorm,cse,canonicalize,fold-constants,dce,fuse-epilogues")
    assert with_pass.ir_text() == without.ir_text()
    assert "sparse<" not in with_pass.ir_text()
    assert _encodings(with_pass) == {"FusedConv": "None", "Gemm": "None"}


def test_cost_model_choices_on_the_host():
    """90% unstructured zeros: the 1x1 Conv becomes CSR (positions in vectors pay off); the unstructured one-row FC
    becomes CSR on an 8-lane (AVX) host, whose sliced matrix-vector kernel pays off, and stays dense on other
    vector hosts (CSR entries fill one lane); 90% zeros in 1x8 blocks: the FC takes 1x8 blocks."""
    rng = np.random.default_rng(1)
    lanes = edgecc.backends.targets.resolve_target("host").vector_bits // 32
    compiled = edgecc.compile(_model(*_weights(rng, 0.9, 0.9)), opt_level=3, runtime="reference")
    assert _encodings(compiled)["FusedConv"] == "sparse<csr>"
    if lanes >= 4:
        assert _encodings(compiled)["Gemm"] == ("sparse<csr>" if lanes == 8 else "None")
    compiled = edgecc.compile(_model(*_weights(rng, 0.9, 0.9, fc_block=lanes)), opt_level=3, runtime="reference")
    assert _encodings(compiled)["Gemm"] == f"sparse<block 1x{lanes}>"
    stats = compiled.report["passes"] if "passes" in compiled.report else None
    assert stats is None or any("encode-sparsity" in str(p) for p in stats)


def test_scalar_target_takes_csr_for_fc():
    """Cortex-M4 has no vectors: a dense FC kernel gains nothing per MAC that CSR loses, so 90% zeros encode."""
    rng = np.random.default_rng(2)
    module = edgecc.compile(_model(*_weights(rng, 0.9, 0.9)), runtime="reference",
                            passes="infer-shapes,fold-constants").module
    records = encode_sparsity(module, "cortex-m4")
    assert [r["encoding"] for r in records] == ["sparse<csr>", "sparse<csr>"]


def test_records_and_bytes():
    """At 90% zeros the CSR weight takes <= 25% of its dense float32 bytes (values + int32 indices + offsets)."""
    rng = np.random.default_rng(3)
    module = edgecc.compile(_model(*_weights(rng, 0.9, 0.9)), runtime="reference",
                            passes="infer-shapes,fold-constants").module
    records = encode_sparsity(module, "host", encoding="csr")
    assert [r["op"] for r in records] == ["Conv", "Gemm"]
    for record in records:
        assert record["encoding"] == "sparse<csr>" and record["skipped"] is None
        assert record["bytes_after"] <= 0.25 * record["bytes_before"]
        assert 0.85 < record["sparsity"] < 0.95
    fc = module.graph.nodes[-1].inputs[1]
    nonzeros = int(np.count_nonzero(fc.const))
    assert encoded_bytes(fc) == 4 * (64 + 1 + 2 * nonzeros)  # offsets per column, then [k, value] per nonzero
    assert encoded_bytes(module.graph.nodes[0].inputs[0]) == module.graph.nodes[0].inputs[0].type.nbytes


def test_pack_layout():
    matrix = np.array([[0, 2, 0], [3, 0, 0], [0, 0, 5]], np.float32)  # [K=3, N=3]
    words = pack(matrix, 2)  # column blocks {0, 1}: rows 0 and 1; {2}: row 2
    assert words[:3].tolist() == [0, 2, 3]
    records = words[3:].reshape(-1, 3)
    assert records[:, 0].tolist() == [0, 1, 2]
    assert records[:, 1:].view(np.float32).tolist() == [[0, 2], [3, 0], [5, 0]]


def test_weight_shared_with_a_reader_without_sparse_kernel_is_skipped():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    w[rng.random(w.shape) < 0.95] = 0
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Add", ["a", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])],
                              [numpy_helper.from_array(w, "w")])
    module = edgecc.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                            runtime="reference", passes="infer-shapes").module
    (record,) = encode_sparsity(module, "host", encoding="csr")
    assert record["encoding"] == "dense" and record["skipped"]


def test_bad_encoding_option():
    with pytest.raises(PassError, match="unknown encoding"):
        edgecc.compile(_model(*_weights(np.random.default_rng(5), 0.5, 0.5)), runtime="reference",
                       passes="infer-shapes,encode-sparsity{encoding=coo}")


def test_textual_ir_round_trip_and_clone():
    rng = np.random.default_rng(6)
    compiled = edgecc.compile(_model(*_weights(rng, 0.9, 0.9)), runtime="reference",
                              passes="-O2,encode-sparsity{encoding=block,width=4}")
    text = compiled.ir_text()
    assert "tensor<16x512xf32, sparse<block 1x4>>" not in text  # Gemm's B is [512, 64]
    assert "tensor<512x64xf32, sparse<block 1x4>>" in text and "tensor<32x16x1x1xf32, sparse<block 1x4>>" in text
    module = parse_module(text)
    assert print_module(module) == text
    assert print_module(module.clone()) == text
    verify(module)
    encoded = [v for v in module.graph.constants() if v.type.sparse is not None]
    assert {v.type.sparse for v in encoded} == {SparseEncoding("block", (1, 4))}
    csr = text.replace("sparse<block 1x4>", "sparse<csr>")
    assert print_module(parse_module(csr)) == csr


def test_parse_errors_and_verifier():
    text = ('module @m {opset = 18} {\n  graph @g(%x : tensor<2x2xf32, sparse<block 2x4>>) {\n'
            '    return %x as "y"\n  }\n}\n')
    with pytest.raises(IRParseError, match="blocks are 1xV"):
        parse_module(text)
    with pytest.raises(IRParseError, match="syntax error"):
        parse_module(text.replace("sparse<block 2x4>", "sparse<coo>"))
    module = parse_module(text.replace("sparse<block 2x4>", "sparse<csr>"))
    with pytest.raises(VerificationError, match="not a constant"):
        verify(module)
    with pytest.raises(ValueError):
        SparseEncoding("csr", (1, 8))


def test_many_rows_take_csr_for_fc():
    """A MatMul with at least `lanes` rows (bert_tiny's 128) runs CSR with rows in vectors: 90% unstructured zeros
    encode (with one row the same weight stays dense, see test_cost_model_choices_on_the_host)."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 48])],
                              [numpy_helper.from_array(w, "w")])
    module = edgecc.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                            runtime="reference", passes="infer-shapes").module
    (record,) = encode_sparsity(module, "x86-64-v3")
    assert record["encoding"] == "sparse<csr>"


def _qgemm_module(b: np.ndarray, trans_b: int = 1, b_zp: np.ndarray | None = None):
    """One edgecc.QGemm (uint8 A [1, K], int8 B) as an IR module with its constants."""
    n = b.shape[0] if trans_b else b.shape[1]
    k = b.shape[1] if trans_b else b.shape[0]
    params = [("a_scale", np.array(0.03, np.float32)), ("a_zp", np.array(9, np.uint8)), ("b", b),
              ("b_scale", np.full(n, 0.002, np.float32)), ("b_zp", np.zeros(n, np.int8) if b_zp is None else b_zp),
              ("y_scale", np.array(0.25, np.float32)), ("y_zp", np.array(120, np.uint8)),
              ("c", np.zeros(n, np.int32))]
    node = helper.make_node("QGemm", ["a"] + [p for p, _ in params], ["y"], domain="edgecc", transB=trans_b)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [numpy_helper.from_array(v, p) for p, v in params])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("edgecc", 1)])
    return edgecc.compile(model, runtime="reference", passes="infer-shapes").module


def _int8_sparse(rng, shape, level=0.9):
    b = rng.integers(1, 128, shape).astype(np.int8)
    b[rng.random(shape) < level] = 0
    return b


def test_int8_qgemm_encodings_by_target():
    """int8 B at 90% zeros: CSR in the int8 layout (2-byte k + 1-byte value per nonzero, uint16 offsets) on Cortex-M4,
    counted exactly; 1xV blocks on AVX2 (generic dot4, where the sparse kernel measured faster); dense with sdot."""
    rng = np.random.default_rng(7)
    b = _int8_sparse(rng, (128, 64))  # [N, K] (transB)
    module = _qgemm_module(b)
    (record,) = encode_sparsity(module, "cortex-m4")
    assert record["encoding"] == "sparse<csr>" and record["bytes_before"] == b.nbytes
    nonzeros = int(np.count_nonzero(b))
    assert record["bytes_after"] == -(-(2 * (128 + 1) + 3 * nonzeros) // 4) * 4
    assert record["bytes_after"] <= 0.09 * 4 * b.size
    (record,) = encode_sparsity(_qgemm_module(b), "armv8.2")
    assert record["encoding"] == "dense" and record["skipped"] is None
    (record,) = encode_sparsity(_qgemm_module(b), "x86-64-v3")
    assert record["encoding"].startswith("sparse<block")
    (record,) = encode_sparsity(_qgemm_module(b), "armv8.2", encoding="block", width=4)
    assert record["encoding"] == "sparse<block 1x4>"


def test_int8_qgemm_with_weight_zero_points_stays_dense():
    rng = np.random.default_rng(8)
    b = _int8_sparse(rng, (16, 32))
    (record,) = encode_sparsity(_qgemm_module(b, b_zp=np.ones(16, np.int8)), "cortex-m4")
    assert record["encoding"] == "dense" and "zero point" in record["skipped"]


def _qconv_module(w: np.ndarray, x_hw=(12, 12), **attrs):
    """One QLinearConv (uint8 X, int8 W with zero points 0, per-channel scales) as an IR module."""
    m, c = w.shape[:2]
    params = [("x_scale", np.array(0.05, np.float32)), ("x_zp", np.array(7, np.uint8)), ("w", w),
              ("w_scale", np.full(m, 0.002, np.float32)), ("w_zp", np.zeros(m, np.int8)),
              ("y_scale", np.array(0.2, np.float32)), ("y_zp", np.array(100, np.uint8)),
              ("b", np.zeros(m, np.int32))]
    node = helper.make_node("QLinearConv", ["x"] + [p for p, _ in params], ["y"], **attrs)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, c, *x_hw])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [numpy_helper.from_array(v, p) for p, v in params])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return edgecc.compile(model, runtime="reference", passes="infer-shapes").module


def test_int8_kxk_qlinear_conv_encodings_by_target():
    """digits_cnn's second 3x3 stride-2 int8 convolution at 90% zeros: CSR on Cortex-M4 (the smallest encoding not
    modelled slower: 3 bytes per nonzero + a uint16 offset per tap and output channel, under 12% of float32);
    dense on hosted targets (the int8 sparse convolution is not measured faster there)."""
    rng = np.random.default_rng(9)
    w = _int8_sparse(rng, (64, 32, 3, 3))
    (record,) = encode_sparsity(_qconv_module(w, strides=[2, 2], pads=[1, 1, 1, 1]), "cortex-m4")
    assert record["encoding"] == "sparse<csr>" and record["skipped"] is None
    blocks = 9 * 64
    assert record["bytes_after"] == -(-(2 * (blocks + 1) + 3 * int(np.count_nonzero(w))) // 4) * 4
    assert record["bytes_after"] <= 0.12 * 4 * w.size
    (record,) = encode_sparsity(_qconv_module(w, strides=[2, 2], pads=[1, 1, 1, 1]), "x86-64-v3")
    assert record["encoding"] == "dense"


def test_int8_kxk_cost_model_keeps_few_input_channels_dense():
    """A 3x3 convolution over one input channel (digits_cnn's first layer) at 90% zeros: the per-tap column blocks
    (INT8_BLOCK_COST per tap and block of output channels) outweigh the few MACs each saves on a microcontroller,
    so it stays dense."""
    from edgecc.passes.encode_sparsity import modelled_time

    rng = np.random.default_rng(10)
    w = _int8_sparse(rng, (16, 1, 3, 3))
    module = _qconv_module(w, pads=[1, 1, 1, 1])
    (node,) = [n for n in module.graph.nodes if n.op == "QLinearConv"]
    from edgecc.ops.sparse import weight_matrix

    assert modelled_time(node, weight_matrix(node, w), SparseEncoding("csr"), 1, hosted=False) > 1.0
    (record,) = encode_sparsity(module, "cortex-m4")
    assert record["encoding"] == "dense"
