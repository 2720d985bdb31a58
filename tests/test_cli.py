"""The `edgecc` command: outputs, and bad input that gets one clear line, exit 1, no traceback, no file."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from edgecc.cli import main
from edgecc.demo import DEMO_MODEL
from models import make_model, small_mlp, tensor_info


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 1
    lines = [l for l in err.strip().splitlines() if not l.startswith("edgecc: note")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def mlp_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(small_mlp(batch=2), path)
    return path


def test_emit_onnx_runs_in_onnxruntime(tmp_path, capsys, mlp_path):
    out = tmp_path / "build" / "mlp"
    report = tmp_path / "report.json"
    code, stdout, _ = run_cli(capsys, mlp_path, "-O3", "-o", out, "--emit", "onnx", "--report", report)
    assert code == 0, stdout
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    want = ort.InferenceSession(str(mlp_path)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out) + ".onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # same float32 ops, same order
    data = json.loads(report.read_text())
    assert data["macs"] == 2 * (4 * 8 + 8 * 3) and data["weights_bytes"] == 4 * (32 + 8 + 24 + 3)


def test_emit_ir_writes_parseable_text(tmp_path, capsys, mlp_path):
    from edgecc.ir.parser import parse_module

    out = tmp_path / "mlp"
    code, _, _ = run_cli(capsys, mlp_path, "--emit", "ir", "-o", out)
    assert code == 0
    text = (tmp_path / "mlp.eir").read_text()
    side = dict(np.load(str(out) + ".eir.npz")) if os.path.exists(str(out) + ".eir.npz") else None
    assert '"onnx.Gemm"' in text
    parse_module(text, side_arrays=side)


def test_run_prints_and_saves_outputs(tmp_path, capsys, mlp_path):
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli(capsys, "run", mlp_path, "--input", f"x={tmp_path / 'x.npy'}", "-o", tmp_path / "out.npz")
    assert code == 0, err
    want = ort.InferenceSession(str(mlp_path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["y"], want, rtol=1e-5, atol=1e-7)


def test_run_profile_lists_every_node_with_its_time(tmp_path, capsys, mlp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    code, out, err = run_cli(capsys, "run", mlp_path, "--input", f"x={tmp_path / 'x.npy'}", "--profile", "3")
    assert code == 0, err
    assert "profile" in err and "per op:" in err and "Gemm" in err


def test_run_profile_needs_host_native_code(tmp_path, capsys, mlp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    code, out, err = run_cli(capsys, "run", mlp_path, "--input", f"x={tmp_path / 'x.npy'}", "--profile",
                             "--runtime", "reference")
    assert_one_line_error(code, err, "profiling needs native code")


def test_run_with_the_reference_interpreter_says_so(tmp_path, capsys, mlp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    code, out, err = run_cli(capsys, "run", mlp_path, "--input", f"x={tmp_path / 'x.npy'}", "--runtime", "reference")
    assert code == 0 and "reference interpreter" in err and "y: float32 [2, 3]" in out


def test_run_for_armv8_under_qemu(tmp_path, capsys, mlp_path):
    import shutil

    if shutil.which("qemu-aarch64") is None or shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("needs qemu-user and gcc-aarch64-linux-gnu (installed by .ci/run)")
    x = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, _, err = run_cli(capsys, "run", mlp_path, "--target", "armv8", "--input", f"x={tmp_path / 'x.npy'}",
                           "-o", tmp_path / "out.npz")
    assert code == 0, err
    want = ort.InferenceSession(str(mlp_path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["y"], want, rtol=1e-5, atol=1e-7)


def test_demo_passes(capsys):
    code, out, _ = run_cli(capsys, "demo")
    assert code == 0 and "OK" in out


def test_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--input-shape" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["model.onnx", "--emit", "exe"])
    assert exc.value.code == 2


def test_missing_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "nope.onnx", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "nope.onnx", "no such file")
    assert not list(tmp_path.iterdir())


def test_not_onnx_and_truncated(tmp_path, capsys):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    code, _, err = run_cli(capsys, text, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "notes.onnx", "not an ONNX model")
    data = open(DEMO_MODEL, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, cut, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "cut.onnx", "truncated")
    assert not (tmp_path / "out.onnx").exists()


def test_unsupported_ops_listed_at_once(tmp_path, capsys):
    nodes = [helper.make_node("Foo", ["x"], ["a"], domain="custom"), helper.make_node("LpNormalization", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    model = make_model(nodes, [tensor_info("x", [2])], [tensor_info("y", [2])])
    model.opset_import.append(helper.make_opsetid("custom", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    code, _, err = run_cli(capsys, path, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "custom.Foo", "LpNormalization", "unsupported op")


def test_dynamic_dim_must_be_bound(tmp_path, capsys):
    path = tmp_path / "dyn.onnx"
    onnx.save(small_mlp(batch="N"), path)
    code, _, err = run_cli(capsys, path, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "dynamic dim 'N'", "--input-shape x=")
    code, _, err = run_cli(capsys, path, "-o", tmp_path / "out", "--input-shape", "x=3x4")
    assert code == 0, err


def test_attribute_out_of_range(tmp_path, capsys):
    model = make_model([helper.make_node("Concat", ["x", "x"], ["y"], name="cat", axis=3)],
                       [tensor_info("x", [2, 2])], [tensor_info("y", [4, 2])])
    path = tmp_path / "bad_axis.onnx"
    onnx.save(model, path)
    code, _, err = run_cli(capsys, path, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "cat", "Concat", "axis")


def test_external_data_outside_model_folder(tmp_path, capsys):
    model = small_mlp(batch=2)
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\0" * 128)
    folder = tmp_path / "model"
    folder.mkdir()
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    del init.float_data[:]
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value="../secret.bin")
    onnx.save(model, folder / "m.onnx")
    code, _, err = run_cli(capsys, folder / "m.onnx", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "outside the model's folder")


def test_graph_with_cycle(tmp_path, capsys):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2")]
    model = make_model(nodes, [tensor_info("x", [2])], [tensor_info("b", [2])])
    path = tmp_path / "cycle.onnx"
    onnx.save(model, path)
    code, _, err = run_cli(capsys, path, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "cycle", "n1")


def test_debug_shows_traceback(tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "nope.onnx", "--debug")
    assert code == 1 and "Traceback" in err


def test_instruments(tmp_path, capsys, mlp_path):
    code, _, err = run_cli(capsys, mlp_path, "-o", tmp_path / "o", "--time-passes", "--print-after", "fold-constants",
                           "--verify-each", "--dump-ir", tmp_path / "dump")
    assert code == 0
    assert "pass timing" in err and "IR after fold-constants" in err
    assert any(p.name.endswith("infer-shapes.eir") for p in (tmp_path / "dump").iterdir())


def test_explicit_pipeline_and_bad_pipeline(tmp_path, capsys, mlp_path):
    code, _, _ = run_cli(capsys, mlp_path, "-o", tmp_path / "o", "-p", "infer-shapes,fold-constants{max-elements=10},dce")
    assert code == 0
    code, _, err = run_cli(capsys, mlp_path, "-o", tmp_path / "o2", "-p", "fold-constants{bogus=1}")
    assert_one_line_error(code, err, "no option 'bogus'")
    assert not (tmp_path / "o2.onnx").exists()
