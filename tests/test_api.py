"""The Python API (`edgecc.compile`, CompiledModel), the ONNX backend interface, and plugin passes."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import edgecc
import edgecc.backend
from edgecc.errors import EdgeccError, InputError, PassError
from models import make_model, small_mlp, tensor_info

PLUGIN = pathlib.Path(__file__).resolve().parents[1] / "examples" / "passes" / "remove_neutral_arithmetic.py"


def _x(shape=(2, 4), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_compile_from_proto_path_and_graphsurgeon(tmp_path):
    import onnx_graphsurgeon as gs

    model = small_mlp(batch=2)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": _x()})[0]
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for source in (model, str(path), path, gs.import_onnx(model)):
        compiled = edgecc.compile(source, opt_level=3)
        (got,) = compiled.run({"x": _x()})
        # float32 Gemm/Softmax in a different summation order than onnxruntime's MLAS: a few ulp.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert compiled.input_names == ["x"] and compiled.output_names == ["y"]


def test_run_accepts_list_and_checks_inputs():
    compiled = edgecc.compile(small_mlp(batch=2))
    (a,) = compiled.run([_x()])
    (b,) = compiled.run({"x": _x()})
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="shape"):
        compiled.run({"x": _x((3, 4))})
    with pytest.raises(InputError, match="dtype"):
        compiled.run({"x": _x().astype(np.float64)})
    with pytest.raises(InputError, match="missing"):
        compiled.run({})


def test_input_shapes_bind_symbolic_dims():
    compiled = edgecc.compile(small_mlp(batch="N"), input_shapes={"x": (5, 4)})
    assert compiled.run({"x": _x((5, 4))})[0].shape == (5, 3)
    compiled = edgecc.compile(small_mlp(batch="N"), input_shapes=["x=1x4"])
    assert compiled.module.graph.inputs[0].type.shape == (1, 4)


def test_report_fields():
    report = edgecc.compile(small_mlp(batch=2), opt_level=2).report
    for key in ("macs", "weights_bytes", "arena_bytes", "arena_lower_bound_bytes", "compile_seconds", "passes"):
        assert key in report
    assert report["macs"] == 2 * (4 * 8 + 8 * 3)
    # x (32 B) and h (64 B) are both live while fc1 runs: no order can do with less than that.
    assert report["arena_lower_bound_bytes"] >= 2 * 4 * 4 + 2 * 8 * 4
    assert {p["name"] for p in report["passes"]} >= {"infer-shapes", "fold-constants", "dce"}


def test_profile_times_every_node_and_leaves_results_unchanged():
    compiled = edgecc.compile(small_mlp(batch=2), opt_level=3)
    want = compiled.run({"x": _x()})[0]
    rows = compiled.profile({"x": _x()}, runs=3)
    assert [r["node"] for r in rows] == [n.label for n in compiled.module.graph.nodes]
    assert all(r["ms"] >= 0 for r in rows) and abs(sum(r["share"] for r in rows) - 1) < 1e-6
    np.testing.assert_array_equal(compiled.run({"x": _x()})[0], want)


def test_progress_bar_counts_passes_kernels_and_llvm(monkeypatch, capsys):
    """The bar (shown after a second, so forced here with no delay) ends at passes + nodes + 1 steps."""
    import tqdm

    import edgecc.progress

    bars = []

    class Recording(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["delay"] = 0
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    compiled = edgecc.compile(small_mlp(batch=2), opt_level=3, progress=True)
    (bar,) = bars
    steps = 1 + len(compiled.report["passes"]) + len(compiled.module.graph.nodes) + 1
    assert bar.n == bar.total == steps and "edgecc" in capsys.readouterr().err
    assert edgecc.compile(small_mlp(batch=2), progress=False) is not None and len(bars) == 1


def test_host_code_runs_without_a_c_compiler(monkeypatch):
    """With cc, host code is dlopened from a linked shared library; without, MCJIT loads the object: same results."""
    import edgecc.backends.runtime as runtime

    with_cc = edgecc.compile(small_mlp(batch=2), opt_level=3)
    assert with_cc.run({"x": _x()})[0] is not None and with_cc._runner._fn._lib is not None
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    without = edgecc.compile(small_mlp(batch=2), opt_level=3)
    np.testing.assert_array_equal(without.run({"x": _x()})[0], with_cc.run({"x": _x()})[0])
    assert without._runner._fn._engine is not None and without._runner._fn._lib is None


def test_unknown_target_and_option_are_clear():
    with pytest.raises(EdgeccError, match="needs the native runtime"):
        edgecc.compile(small_mlp(batch=2), target="cortex-m4", runtime="reference")
    with pytest.raises(EdgeccError, match="cannot run on this machine"):
        edgecc.compile(small_mlp(batch=2), target="cortex-m4").run({"x": _x()})
    with pytest.raises(EdgeccError, match="unknown target 'pdp11'"):
        edgecc.compile(small_mlp(batch=2), target="pdp11", runtime="native")
    with pytest.raises(EdgeccError, match="four parts"):
        edgecc.compile(small_mlp(batch=2), target="thumbv7em-none-eabihf", runtime="native")
    with pytest.raises(EdgeccError, match="unknown option"):
        edgecc.compile(small_mlp(batch=2), bogus=True)


def test_onnx_backend_interface():
    model = small_mlp(batch=2)
    assert edgecc.backend.supports_device("CPU") and not edgecc.backend.supports_device("CUDA")
    rep = edgecc.backend.prepare(model)
    (y,) = rep.run([_x()])
    (z,) = edgecc.backend.run_model(model, [_x()])
    np.testing.assert_array_equal(y, z)


def test_backend_specialises_on_integer_inputs():
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                       [tensor_info("x", [2, 6]), tensor_info("shape", [2], onnx.TensorProto.INT64)],
                       [tensor_info("y", None)])
    rep = edgecc.backend.prepare(model)
    x = _x((2, 6))
    assert rep.run([x, np.array([3, 4], np.int64)])[0].shape == (3, 4)
    assert rep.run([x, np.array([4, 3], np.int64)])[0].shape == (4, 3)


def test_plugin_pass_loads_and_runs():
    one = onnx.numpy_helper.from_array(np.ones((4,), np.float32), "one")
    model = make_model([helper.make_node("Mul", ["x", "one"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                       [tensor_info("x", [2, 4])], [tensor_info("y", [2, 4])], [one])
    compiled = edgecc.compile(model, passes="infer-shapes,remove-neutral-arithmetic,dce", load_pass_plugin=[str(PLUGIN)])
    assert [n.op for n in compiled.module.graph.nodes] == ["Relu"]
    assert compiled.report["passes"][1]["stats"] == {"ops-removed": 1}


def test_pass_errors_name_the_pass():
    with pytest.raises(PassError, match="unknown pass 'nope'"):
        edgecc.compile(small_mlp(batch=2), passes="infer-shapes,nope")
    with pytest.raises(PassError, match="not a valid int"):
        edgecc.compile(small_mlp(batch=2), passes="fold-constants{max-elements=lots}")


def test_pass_reference_is_current():
    """docs/passes.md is generated from the pass docstrings; regenerate with tools/gen_pass_docs.py."""
    import importlib.util

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_pass_docs", root / "tools" / "gen_pass_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (root / "docs" / "passes.md").read_text() == module.render()


def test_installed_plugin_from_entry_point_group(monkeypatch):
    """Installed packages register passes through the `edgecc.passes` entry-point group."""
    from importlib.metadata import EntryPoint

    import edgecc.passes.registry as registry

    monkeypatch.syspath_prepend(str(PLUGIN.parent))
    fake = EntryPoint("remove-neutral-arithmetic", "remove_neutral_arithmetic:RemoveNeutralArithmeticPass",
                      "edgecc.passes")
    monkeypatch.setattr(registry, "entry_points", lambda group: [fake] if group == "edgecc.passes" else [])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_PASSES", dict(registry._PASSES))
    assert registry.get_pass_class("remove-neutral-arithmetic").name == "remove-neutral-arithmetic"
