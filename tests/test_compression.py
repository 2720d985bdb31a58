"""Compression as a compile step (edgecc.compression, edgecc.reconstruct, `edgecc compress-report`): options,
errors, the least-squares re-fit checked against numpy and onnxruntime, and the digits models end to end."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import edgecc
from edgecc.cli import main
from edgecc.errors import EdgeccError
from edgecc.frontend.onnx_import import import_model
from edgecc.ir.core import Node
from edgecc.reconstruct import _conv_patches
from models import make_model, tensor_info

RNG = np.random.default_rng(7)


def _init(name, shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def mlp(k=64, h=48, n=10) -> onnx.ModelProto:
    """x[1, k] -> Gemm(h, transB) -> Relu -> Gemm(n): big enough for min-elements, small enough to solve fast."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2")]
    inits = [_init("w1", (h, k)), _init("b1", (h,)), _init("w2", (h, n)), _init("b2", (n,))]
    return make_model(nodes, [tensor_info("x", [1, k])], [tensor_info("y", [1, n])], inits)


def cnn() -> onnx.ModelProto:
    """Conv 3x3 -> Relu -> Conv 3x3 stride 2 -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    inits = [_init("w1", (16, 3, 3, 3)), _init("b1", (16,), 0.1), _init("w2", (32, 16, 3, 3), 0.1),
             _init("b2", (32,), 0.1), _init("w3", (10, 32)), _init("b3", (10,))]
    return make_model(nodes, [tensor_info("x", [1, 3, 8, 8])], [tensor_info("y", [1, 10])], inits)


def samples(shape, count=64, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((count, *shape[1:])).astype(np.float32)[:, None]
            .reshape(count, *shape)}


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


# -- options and errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,where", [
    (dict(prune=1.0), "--prune"), (dict(prune=0.0), "--prune"), (dict(prune=-0.5), "--prune"),
    (dict(prune_channels=1.5), "--prune-channels"), (dict(low_rank=0.0), "--low-rank"),
    (dict(cluster_weights=1), "--cluster-weights"), (dict(cluster_weights=300), "--cluster-weights"),
    (dict(prune=0.5, prune_scope="model"), "--prune-scope"), (dict(prune=0.5, reconstruct=True), "--reconstruct"),
    (dict(tucker=True), "--tucker"),
])
def test_bad_options_are_clear_errors(kwargs, where):
    with pytest.raises(EdgeccError) as info:
        edgecc.compile(mlp(), runtime="reference", **kwargs)
    assert info.value.where == where, str(info.value)
    assert info.value.hint, str(info.value)


def test_cli_bad_option_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    code = main([str(path), "--prune", "1.2", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and "--prune" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_calibration_without_quantize_or_compression_is_still_an_error():
    with pytest.raises(EdgeccError, match="calibration"):
        edgecc.compile(mlp(), runtime="reference", calibration=samples((1, 64)))


# -- the re-fit ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attrs,groups", [({}, 1), ({"strides": [2, 2], "pads": [1, 0, 1, 2]}, 1),
                                          ({"dilations": [2, 1], "pads": [2, 1, 2, 1]}, 1),
                                          ({"pads": [1, 1, 1, 1]}, 4)])
def test_conv_patches_times_weights_is_onnxruntime_conv(attrs, groups):
    """The re-fit's linear system is exact: patches @ W^T + b reproduces onnxruntime's Conv."""
    x = RNG.standard_normal((2, 8, 7, 9)).astype(np.float32)
    w = RNG.standard_normal((12, 8 // groups, 3, 3)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], group=groups, **attrs)],
                       [tensor_info("x", list(x.shape))], [tensor_info("y", None)], [numpy_helper.from_array(w, "w")])
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    node = Node("Conv", attrs=dict(attrs, group=groups))
    patches, (n, oh, ow) = _conv_patches(x.astype(np.float64), node, w.shape)
    m = 12 // groups
    got = np.concatenate([patches[g] @ w[g * m:(g + 1) * m].reshape(m, -1).T for g in range(groups)], axis=1)
    np.testing.assert_allclose(got.reshape(n, oh, ow, 12).transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4)


def test_refit_of_a_pruned_gemm_is_the_masked_least_squares_solution():
    """One Gemm pruned to 80%, the only layer: its re-fit equals numpy's lstsq on each output's kept weights plus
    the bias (the ridge term, 1e-3 of the mean Gram diagonal, moves it by far less than the tolerance)."""
    model = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
                       [tensor_info("x", [1, 64])], [tensor_info("y", [1, 32])], [_init("w", (32, 64)), _init("b", (32,))])
    calib = samples((1, 64), count=400)
    compiled = edgecc.compile(model, runtime="reference", opt_level=0, prune=0.8, calibration=calib)
    (w_fit, b_fit) = [v.const for v in compiled.module.graph.nodes[0].inputs[1:]]
    w0, b0 = (numpy_helper.to_array(t) for t in model.graph.initializer)
    xs = calib["x"].reshape(-1, 64).astype(np.float64)
    ys = xs @ w0.T + b0
    assert abs((w_fit == 0).mean() - 0.8) <= 1 / w_fit.size
    for j in range(32):
        keep = np.flatnonzero(w_fit[j])
        design = np.concatenate([xs[:, keep], np.ones((xs.shape[0], 1))], axis=1)
        solution = np.linalg.lstsq(design, ys[:, j], rcond=None)[0]
        np.testing.assert_allclose(w_fit[j, keep], solution[:-1], rtol=0.02, atol=2e-3)
        np.testing.assert_allclose(b_fit[j], solution[-1], rtol=0.02, atol=2e-3)
    layer = compiled.report["compression"]["reconstruction"][0]
    assert layer["layer"] == "fc" and layer["error_after"] < layer["error_before"], layer


def test_gptq_rounding_to_a_codebook_beats_nearest_entry_on_correlated_inputs():
    """gptq_indices rounds to a fixed 4-entry grid with error feedback: with correlated inputs the output error,
    measured with numpy's best codebook for each assignment (lstsq over the k values), is below that of
    rounding each least-squares weight to its nearest entry (0.28 against 0.34 here)."""
    from edgecc.reconstruct import gptq_indices

    rng = np.random.default_rng(11)
    mixing = rng.standard_normal((24, 24)) * 0.3 + np.eye(24)
    a = rng.standard_normal((2000, 24)) @ mixing
    w = rng.standard_normal((16, 24))
    y = a @ w.T
    codebook = np.array([-1.2, -0.4, 0.4, 1.2])

    def best_error(indices):
        one_hot = np.stack([np.stack([(indices[j] == e) for e in range(4)], axis=1) for j in range(16)])
        design = np.concatenate([a @ one_hot[j] for j in range(16)])  # y_j = A E_j c, stacked over channels
        c = np.linalg.lstsq(design, y.T.reshape(-1), rcond=None)[0]
        return np.linalg.norm(design @ c - y.T.reshape(-1)) / np.linalg.norm(y)

    nearest = np.abs(w[:, :, None] - codebook).argmin(axis=2)
    chosen = gptq_indices(a, y, codebook, with_bias=False)
    assert chosen.shape == (16, 24) and chosen.min() >= 0 and chosen.max() < 4
    assert best_error(chosen) < 0.9 * best_error(nearest), (best_error(chosen), best_error(nearest))


@pytest.mark.parametrize("technique", [dict(prune=0.7), dict(cluster_weights=8), dict(low_rank=0.8),
                                       dict(low_rank=0.8, tucker=True), dict(prune_channels=0.4)])
def test_refit_brings_the_model_closer_to_the_original(technique):
    """On held-out inputs (not the calibration ones), the re-fitted model is closer to onnxruntime's run of the
    original model than the same compression without the re-fit."""
    model = cnn()
    calib = samples((1, 3, 8, 8), count=96, seed=2)
    x = np.random.default_rng(3).standard_normal((16, 1, 3, 8, 8)).astype(np.float32)
    want = np.stack([ort_run(model, xi) for xi in x])

    def error(**extra):
        compiled = edgecc.compile(model, runtime="reference", **technique, **extra)
        got = np.stack([compiled.run({"x": xi})[0] for xi in x])
        return float(np.linalg.norm(got - want) / np.linalg.norm(want)), compiled.report["compression"]

    plain, _ = error()
    fitted, report = error(calibration=calib)
    assert fitted < plain, (fitted, plain)
    refits = [r for r in report["reconstruction"] if "error_after" in r]
    assert refits and all(r["error_after"] <= r["error_before"] + 1e-9 for r in refits), refits
    assert report["output_sqnr_db"] >= report["output_sqnr_db_before_refit"], report


def test_compression_report_counts_bytes_and_layers():
    compiled = edgecc.compile(mlp(), runtime="reference", prune=0.9)
    report = compiled.report["compression"]
    assert report["options"] == {"prune": 0.9, "prune_scope": "layer"}
    pruned = [r for r in report["layers"] if r["technique"] == "prune" and not r.get("skipped")]
    assert {r["layer"] for r in pruned} == {"fc1", "fc2"}, report["layers"]
    assert report["weights_bytes_before"] == (64 * 48 + 48 + 48 * 10 + 10) * 4
    assert 0 < report["weights_bytes_after"] <= report["weights_bytes_before"]


def test_depthwise_and_narrow_first_layers_stay_dense():
    """A depthwise 3x3 conv (9 weights per channel) and a first conv on 3 channels (27) are not pruned."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="first", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["b"], name="depthwise", group=64, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "w3"], ["y"], name="pointwise")]
    inits = [_init("w1", (64, 3, 3, 3)), _init("w2", (64, 1, 3, 3)), _init("w3", (64, 64, 1, 1))]
    model = make_model(nodes, [tensor_info("x", [1, 3, 8, 8])], [tensor_info("y", [1, 64, 8, 8])], inits)
    layers = {r["layer"]: r for r in edgecc.compile(model, runtime="reference", prune=0.8).report["compression"]["layers"]}
    assert "27 weights per output channel" in layers["first"]["skipped"]
    assert "9 weights per output channel" in layers["depthwise"]["skipped"]
    assert layers["pointwise"]["skipped"] is None and abs(layers["pointwise"]["sparsity"] - 0.8) < 1e-3


@pytest.mark.parametrize("op", ["gemm", "conv"])
def test_block_pruning_zeroes_whole_output_blocks_and_runs_them_sparse(op):
    """--prune-block 8: in the weight's [K, N] view (K inputs, N outputs) every 1x8 block is all zero or kept
    whole, 90% of the blocks are zero, the re-fit keeps the blocks, encode-sparsity stores them as 1x8 blocks, and
    the native sparse kernel equals onnxruntime on the same (dense, zero-filled) weights."""
    from edgecc.ops.sparse import matrix_view

    model = mlp(k=128, h=64) if op == "gemm" else cnn()
    shape = (1, 128) if op == "gemm" else (1, 3, 8, 8)
    compiled = edgecc.compile(model, prune=0.9, prune_block=8, calibration=samples(shape, count=48))
    layer = "fc1" if op == "gemm" else "conv2"
    record = next(r for r in compiled.report["compression"]["layers"] if r["layer"] == layer)
    assert record["block"] == 8 and record["skipped"] is None
    node = next(n for n in compiled.module.graph.nodes if n.name == layer)
    weight = node.inputs[1]
    assert weight.type.sparse is not None and weight.type.sparse.block == (1, 8), weight.type
    view = matrix_view(node)(weight.const)
    blocks = (view.reshape(view.shape[0], -1, 8) != 0).any(axis=2)
    assert abs(1 - blocks.mean() - 0.9) <= 1 / blocks.size, blocks.mean()
    assert ((view.reshape(view.shape[0], -1, 8) != 0).all(axis=2) == blocks).all()  # whole blocks, never parts
    dense = compiled.to_onnx()
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    want = ort_run(dense, x)
    np.testing.assert_allclose(compiled.run({"x": x})[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_block_pruning_options_are_checked():
    with pytest.raises(EdgeccError, match="per layer"):
        edgecc.compile(mlp(), runtime="reference", prune=0.8, prune_block=8, prune_scope="global")
    with pytest.raises(EdgeccError) as info:
        edgecc.compile(mlp(), runtime="reference", prune_block=8)
    assert info.value.where == "--prune-block"


# -- the command ---------------------------------------------------------------------------------------------------

def test_compress_report_prints_the_layers_and_a_sweep(tmp_path, capsys):
    path, calib, out = tmp_path / "cnn.onnx", tmp_path / "calib.npz", tmp_path / "report.json"
    onnx.save(cnn(), path)
    np.savez(calib, **samples((1, 3, 8, 8), count=32))
    code = main(["compress-report", str(path), "--prune", "0.8", "--calibration", str(calib),
                 "--sweep", "prune=0.5,0.9", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "conv2" in text and "sparsity 80.0%" in text and "output SQNR" in text and "sweep of prune" in text, text
    import json

    data = json.loads(out.read_text())
    assert [row["prune"] for row in data["sweep"]] == [0.5, 0.9]
    assert data["sweep"][0]["output_sqnr_db"] > data["sweep"][1]["output_sqnr_db"]


def test_compress_report_without_a_technique_says_what_to_add(tmp_path, capsys):
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn(), path)
    code = main(["compress-report", str(path)])
    err = capsys.readouterr().err
    assert code == 1 and "--prune" in err and len(err.strip().splitlines()) == 1, err


# -- trained models (../shared/data) ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_mobilenet"])
def test_digits_pruned_80_with_refit_stays_within_one_point(name, shared_dir):
    """The issue's acceptance: 80% unstructured pruning + reconstruction keeps test accuracy within 1 point of the
    float model (run by onnxruntime), and the re-fit is what makes it so for at least one model."""
    data = shared_dir / "data"
    if not (data / f"{name}.onnx").is_file():
        pytest.skip(f"{data} holds no {name}.onnx")
    test = np.load(data / f"{name}_test.npz")
    session = ort.InferenceSession(str(data / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    fp32 = np.mean([session.run(None, {"input": x})[0].argmax() == y for x, y in zip(test["input"], test["label"])])
    compiled = edgecc.compile(str(data / f"{name}.onnx"), opt_level=3, prune=0.8,
                              calibration=str(data / f"{name}_calib.npz"))
    ours = np.mean([compiled.run([x])[0].argmax() == y for x, y in zip(test["input"], test["label"])])
    assert ours >= fp32 - 0.01, (ours, fp32)
