"""Flash budgets (edgecc.budgets): per-layer compression options, the flash measure against arm-none-eabi-size, the
search on a small model (its result checked against onnxruntime), the error paths, and the digits acceptance."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import edgecc
from edgecc import budgets
from edgecc.budgets import SETTINGS, flash_bytes, pareto_front
from edgecc.cli import main
from edgecc.errors import BudgetError, EdgeccError
from edgecc.interpreter import collect_values
from edgecc.precision import sqnr_db
from models import make_model, tensor_info
from toolchains import needs_target

RNG = np.random.default_rng(3)
TARGET = "cortex-m4"


def mlp(k=64, h=64, n=10) -> onnx.ModelProto:
    """x[1, k] -> Gemm(h) -> Relu -> Gemm(h) -> Relu -> Gemm(n): three layers of different sensitivity."""
    def init(name, shape):
        return numpy_helper.from_array((RNG.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32), name)

    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2", transB=1),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc3", transB=1)]
    inits = [init("w1", (h, k)), init("b1", (h,)), init("w2", (h, h)), init("b2", (h,)), init("w3", (n, h)),
             init("b3", (n,))]
    return make_model(nodes, [tensor_info("x", [1, k])], [tensor_info("y", [1, n])], inits)


MODEL = mlp()
CALIB = {"x": np.random.default_rng(1).standard_normal((64, 1, 64)).astype(np.float32)}


def _float_outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": v})[0] for v in x])


def _validation() -> dict:
    """Inputs labelled by onnxruntime's float model: float32 accuracy is 100%, and any flipped argmax costs 1 point."""
    x = np.random.default_rng(5).standard_normal((100, 1, 64)).astype(np.float32)
    return {"x": x, "label": np.argmax(_float_outputs(MODEL, x), axis=-1)}


VALIDATION = _validation()


def low_rank_mlp() -> onnx.ModelProto:
    """MODEL with fc2's weight of rank 8 plus a little noise: a truncated SVD saves bytes there and not elsewhere."""
    model = onnx.ModelProto()
    model.CopyFrom(MODEL)
    rng = np.random.default_rng(4)
    w2 = (rng.standard_normal((64, 8)) @ rng.standard_normal((8, 64)) / 8 + 0.01 * rng.standard_normal((64, 64)))
    for i, init in enumerate(model.graph.initializer):
        if init.name == "w2":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w2.astype(np.float32), "w2"))
    return model


@pytest.fixture(scope="module")
def fp32_flash() -> int:
    return flash_bytes(edgecc.compile(MODEL, target=TARGET, opt_level=3, optimize_for="size"))


@pytest.fixture(scope="module")
def within_half(fp32_flash):
    return fp32_flash // 2, edgecc.compile(MODEL, target=TARGET, max_flash=fp32_flash // 2, calibration=CALIB)


# -- building blocks ------------------------------------------------------------------------------------------

def test_per_layer_options_touch_only_the_named_layers():
    compiled = edgecc.compile(MODEL, runtime="reference", prune={"fc2": 0.8}, cluster_weights={"fc3": 4},
                              calibration=CALIB)
    layers = {(r["layer"], r["technique"]) for r in compiled.report["compression"]["layers"]}
    assert layers == {("fc2", "prune"), ("fc3", "cluster-weights")}
    weights = {n.name: n.input(1) for n in compiled.module.graph.nodes if n.name in ("fc1", "fc2")}
    assert np.mean(weights["fc2"].const == 0) >= 0.79 and np.mean(weights["fc1"].const == 0) == 0


def test_per_layer_option_values_are_checked():
    with pytest.raises(EdgeccError, match="sparsity"):
        edgecc.compile(MODEL, runtime="reference", prune={"fc2": 1.5})
    with pytest.raises(EdgeccError, match="clusters"):
        edgecc.compile(MODEL, runtime="reference", cluster_weights={"fc2": 1})


def test_per_layer_low_rank_fp16_and_int8_touch_only_the_named_layers():
    """low_rank= and quantize= as {layer: value} dicts: fc2 factorised then int8 (both its products), fc1 float16
    weights, fc3 float32; the outputs against onnxruntime's float model."""
    model = low_rank_mlp()
    compiled = edgecc.compile(model, runtime="reference", low_rank={"fc2": 0.95},
                              quantize={"fc1": "fp16", "fc2": "int8"}, calibration=CALIB)
    records = compiled.report["compression"]["layers"]
    assert [(r["layer"], r["technique"]) for r in records] == [("fc2", "low-rank")] and not records[0]["skipped"]
    assert records[0]["rank"] <= 16
    nodes = {n.name: n for n in compiled.module.graph.nodes}
    assert nodes["fc1"].input(1).type.dtype.short == "f16"
    assert nodes["fc2_u"].op == nodes["fc2"].op == "QGemm"
    assert nodes["fc3"].input(1).type.dtype.short == "f32"
    assert compiled.report["precision"]["fp16"]["layers"] == ["fc1"]
    x = np.random.default_rng(9).standard_normal((32, 1, 64)).astype(np.float32)
    ours = np.concatenate(collect_values(compiled.module, [{"x": v} for v in x], set())["<outputs>"])
    assert sqnr_db(_float_outputs(model, x).ravel(), ours.ravel()) > 25.0  # int8 and a 1% rank residual


def test_per_layer_quantize_names_must_be_nodes():
    with pytest.raises(EdgeccError, match="--quantize.*fc9"):
        edgecc.compile(MODEL, runtime="reference", quantize={"fc9": "fp16"})
    with pytest.raises(EdgeccError, match="unknown quantize mode 'int4'"):
        edgecc.compile(MODEL, runtime="reference", quantize={"fc1": "int4"}, calibration=CALIB)


def test_candidates_offer_fp16_and_low_rank_only_where_they_save_bytes():
    from edgecc.frontend.onnx_import import import_model
    from edgecc.precision import PREPARE_PIPELINE, run_pipeline

    prepared = import_model(low_rank_mlp())
    run_pipeline(prepared, PREPARE_PIPELINE)
    probe = [{"x": v} for v in CALIB["x"][:8]]
    table = budgets._candidates(prepared, ["fc1", "fc2", "fc3"], TARGET, probe, 3)
    offered = {name: {c.setting.name: c for c in options} for name, options in table.items()}
    for name, (n, k) in {"fc1": (64, 64), "fc2": (64, 64), "fc3": (10, 64)}.items():
        fp16 = offered[name]["fp16"]
        assert fp16.bytes_delta == -(n * k + n) * 2 and fp16.sqnr_db > 50  # weights and bias in half
    assert "low rank 95%" in offered["fc2"] and offered["fc2"]["low rank 95%"].bytes_delta < -4096
    assert "low rank 95%" not in offered["fc1"]  # a random 64x64 matrix needs most of its rank


def test_optimising_for_size_takes_less_code():
    """No unrolled loops: a 3x3 convolution's kernel is smaller (Gemm kernels on Cortex-M4 are the same)."""
    weights = numpy_helper.from_array(RNG.standard_normal((16, 8, 3, 3)).astype(np.float32), "w")
    conv = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                      [tensor_info("x", [1, 8, 12, 12])], [tensor_info("y", [1, 16, 12, 12])], [weights])
    speed, size = (flash_bytes(edgecc.compile(conv, target=TARGET, opt_level=3, optimize_for=goal))
                   for goal in ("speed", "size"))
    assert size < speed


def test_pareto_front_keeps_only_undominated_points():
    points = [{"label": "a", "flash_bytes": 100, "sqnr_db": 30.0}, {"label": "b", "flash_bytes": 50, "sqnr_db": 20.0},
              {"label": "c", "flash_bytes": 120, "sqnr_db": 25.0}, {"label": "d", "flash_bytes": 50, "sqnr_db": 10.0}]
    assert [p["label"] for p in pareto_front(points)] == ["b", "a"]
    # latency counts where both points know it: a slower compiled point is kept only if better elsewhere
    timed = [{"label": "x", "flash_bytes": 100, "sqnr_db": 30.0, "latency_ms": 2.0},
             {"label": "y", "flash_bytes": 100, "sqnr_db": 30.0, "latency_ms": 1.0},
             {"label": "z", "flash_bytes": 100, "sqnr_db": 31.0, "latency_ms": None}]
    assert [p["label"] for p in pareto_front(timed)] == ["z"]
    assert [p["label"] for p in pareto_front(timed[:2])] == ["y"]


# -- the search -----------------------------------------------------------------------------------------------

def test_search_meets_the_budget_and_stays_close_to_onnxruntime(within_half):
    budget, compiled = within_half
    report = compiled.report["budget"]
    assert report["flash_bytes"] == flash_bytes(compiled) <= budget
    assert set(report["settings"]) == {"fc1", "fc2", "fc3"}
    assert set(report["settings"].values()) - {"fp32"}, "something had to shrink"
    assert {s.name for s in SETTINGS} >= set(report["settings"].values())
    # held-out inputs: the chosen model against onnxruntime's run of the float model
    x = np.random.default_rng(9).standard_normal((32, 1, 64)).astype(np.float32)
    session = ort.InferenceSession(MODEL.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = np.concatenate([session.run(None, {"x": v})[0] for v in x])
    ours = np.concatenate(collect_values(compiled.module, [{"x": v} for v in x], set())["<outputs>"])
    assert sqnr_db(reference.ravel(), ours.ravel()) > 15.0  # int8 / pruned / clustered layers: about 20-40 dB each on this model
    front = report["front"]
    compiled_points = [p for p in report["explored"] if p["measured"]]
    assert front and all(p["measured"] for p in front)
    assert min(p["flash_bytes"] for p in compiled_points) == front[0]["flash_bytes"]


def test_impossible_budget_names_the_smallest_reachable_flash():
    with pytest.raises(BudgetError) as info:
        edgecc.compile(MODEL, target=TARGET, max_flash="1K", calibration=CALIB)
    error = info.value
    assert error.budget == "max_flash" and error.limit == 1024 and error.smallest > 1024
    assert "smallest reachable" in str(error) and error.hint


def test_cli_impossible_budget_exits_1_with_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(MODEL, str(path))
    np.savez(tmp_path / "calib.npz", **CALIB)
    code = main([str(path), "--target", TARGET, "--max-flash", "1K", "--calibration", str(tmp_path / "calib.npz"),
                 "-o", str(tmp_path / "out" / "m")])
    err = capsys.readouterr().err
    assert code == 1 and "max_flash" in err and "smallest reachable" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("kwargs, where", [
    (dict(max_flash="10K"), "--max-flash"),                                   # no calibration data
    (dict(max_flash="10K", calibration=CALIB, quantize="int8"), "--quantize"),  # the search chooses precision
    (dict(max_flash="ten", calibration=CALIB), "--max-flash"),
    (dict(validation="v.npz"), "--validation"),                               # no budget
    (dict(max_ram="64K", max_flash="10K", calibration=CALIB, prune=0.5), "--prune"),
    (dict(max_latency_ms=1.0, calibration=CALIB), "--max-latency"),          # no device: no cost model
    (dict(max_accuracy_drop=1.0), "--max-accuracy-drop"),                     # no budget
    (dict(max_flash="10K", calibration=CALIB, max_accuracy_drop=1.0), "--max-accuracy-drop"),  # no validation
    (dict(max_flash="10K", calibration=CALIB, validation=VALIDATION, max_accuracy_drop=-1), "--max-accuracy-drop"),
])
def test_budget_option_errors_name_the_option(kwargs, where):
    with pytest.raises(EdgeccError) as info:
        edgecc.compile(MODEL, target=TARGET, **kwargs)
    assert where in str(info.value)


def test_validation_keeps_the_search_within_the_accuracy_floor(fp32_flash):
    """With labels the chosen model's validation accuracy (checked here by running its IR on the labelled inputs)
    stays within max_accuracy_drop of float32's (100% by construction); settings that alone lose more are not tried."""
    compiled = edgecc.compile(MODEL, target=TARGET, max_flash=fp32_flash // 2, calibration=CALIB,
                              validation=VALIDATION, max_accuracy_drop=1.0)
    report = compiled.report["budget"]
    feeds = [{"x": v} for v in VALIDATION["x"]]
    assert report["accuracy"] == budgets.accuracy(compiled.module, feeds, VALIDATION["label"]) >= 99.0
    assert report["fp32_accuracy"] == 100.0 and report["accuracy_floor"] == 99.0
    assert report["flash_bytes"] <= fp32_flash // 2
    assert all(c["accuracy_drop"] <= 1.0 for c in report["candidates"])
    assert any("alone it loses" in r["why"] for r in report["rejected"])
    assert "validation accuracy" in budgets.summary(report)


def test_a_budget_met_only_under_the_floor_is_a_budget_error(fp32_flash):
    """At 30% of the float32 flash the search without labels returns a model that loses 3 points on VALIDATION;
    with a 1-point floor the same budget is a BudgetError naming the floor and the smallest point within it."""
    budget = int(0.3 * fp32_flash)
    free = edgecc.compile(MODEL, target=TARGET, max_flash=budget, calibration=CALIB)
    feeds = [{"x": v} for v in VALIDATION["x"]]
    assert budgets.accuracy(free.module, feeds, VALIDATION["label"]) < 99.0
    assert free.report["budget"]["accuracy_floor"] is None
    with pytest.raises(BudgetError) as info:
        edgecc.compile(MODEL, target=TARGET, max_flash=budget, calibration=CALIB, validation=VALIDATION)
    error = info.value
    assert error.budget == "max_flash" and error.smallest > budget and error.within
    assert "within the accuracy floor of 99.0%" in str(error) and "--max-accuracy-drop" in str(error)


def test_cli_accuracy_floor_error_is_one_line(fp32_flash, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(MODEL, str(path))
    np.savez(tmp_path / "calib.npz", **CALIB)
    np.savez(tmp_path / "val.npz", **VALIDATION)
    code = main([str(path), "--target", TARGET, "--max-flash", str(int(0.3 * fp32_flash)), "--calibration",
                 str(tmp_path / "calib.npz"), "--validation", str(tmp_path / "val.npz"), "--max-accuracy-drop", "0.5",
                 "-o", str(tmp_path / "out" / "m")])
    err = capsys.readouterr().err
    assert code == 1 and "within the accuracy floor of 99.5%" in err and len(err.strip().splitlines()) == 1


def _candidate(layer, name, drop, sqnr, delta=-100):
    return budgets.Candidate(layer, budgets.Setting(name, clusters=4), delta, sqnr, accuracy_drop=drop)


def test_a_choice_under_the_floor_loses_its_worst_setting():
    worst, mild = _candidate("a", "4 clusters", 0.8, 30.0), _candidate("b", "4 clusters", 0.2, 20.0)
    candidates = {"a": [_candidate("a", "fp32", 0.0, float("inf"), 0), worst],
                  "b": [_candidate("b", "fp32", 0.0, float("inf"), 0), mild]}
    choice = {"a": worst.setting, "b": mild.setting}
    rejected: list = []
    assert budgets._ban(choice, candidates, rejected, {"label": "search round 1", "accuracy": 97.5})
    assert choice == {"a": budgets.FP32, "b": mild.setting} and worst not in candidates["a"]
    assert rejected[0]["layer"] == "a" and "97.5%" in rejected[0]["why"]
    assert budgets._reject(candidates, 0.1) == [{"layer": "b", "setting": "4 clusters",
                                                 "why": "alone it loses 0.2 points of validation accuracy"}]
    assert budgets._ban({"a": budgets.FP32, "b": budgets.FP32}, candidates, rejected, {}) is False


def test_plot_without_matplotlib_says_what_to_install(within_half, tmp_path):
    from edgecc.budgets import plot

    _, compiled = within_half
    path = tmp_path / "front.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(EdgeccError, match="matplotlib"):
            plot(compiled.report["budget"], str(path))
        assert not path.exists()
    else:
        plot(compiled.report["budget"], str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_target("armv8.2")  # the a76-phone's code is counted under qemu-aarch64 (edgecc.estimate)
def test_latency_budget_steers_the_search_to_int8_layers(monkeypatch):
    """A budget of 90% of the float32 estimate on a Cortex-A76 (sdot: int8 Gemms take fewer instructions) needs
    int8 on a layer: the search moves layers by their estimated latency, checks the choice by compiling, and keeps
    more SQNR than int8 everywhere (a layer stays float32). Settings limited to float32/int8 to keep it fast."""
    monkeypatch.setattr(budgets, "SETTINGS", tuple(s for s in budgets.SETTINGS if s.name in ("fp32", "int8")))
    model = mlp(128, 128)
    calibration = {"x": np.random.default_rng(1).standard_normal((64, 1, 128)).astype(np.float32)}
    fp32 = edgecc.compile(model, device="a76-phone").report["latency_ms"]
    compiled = edgecc.compile(model, device="a76-phone", max_latency_ms=0.9 * fp32, calibration=calibration)
    report = compiled.report["budget"]
    assert report["latency_ms"] <= 0.9 * fp32 and compiled.report["latency_ms"] <= 0.9 * fp32
    assert "int8" in report["settings"].values() and "fp32" in report["settings"].values()
    by_label = {p["label"]: p for p in report["explored"]}
    assert by_label["float32"]["latency_ms"] > 0.9 * fp32  # the budget needs the search
    assert report["output_sqnr_db"] > by_label["every layer int8"]["sqnr_db"]
    int8 = [c for c in report["candidates"] if c["setting"] == "int8"]
    assert len(int8) == 3 and all(c["latency_delta_ms"] < 0 for c in int8 if c["layer"] != "fc3")
    assert "estimated latency" in budgets.summary(report)


@needs_target("armv7")  # Cortex-M4 code is counted under qemu-arm (edgecc.estimate)
def test_impossible_latency_names_the_smallest_estimate():
    with pytest.raises(BudgetError) as info:
        edgecc.compile(MODEL, device="stm32f4", max_latency_ms=1e-6, calibration=CALIB)
    assert info.value.budget == "max_latency_ms" and info.value.smallest > 1e-6 and "ms" in str(info.value)


@needs_target("armv7")
def test_device_estimate_measures_the_code_as_built_for_size():
    """The device estimate reads the object that was built (optimised for size), not a speed build of it."""
    compiled = edgecc.compile(MODEL, device="stm32f4", optimize_for="size")
    assert compiled.report["flash_bytes"] == flash_bytes(compiled)


def test_max_ram_meets_the_arena_budget_through_the_ram_planner():
    compiled = edgecc.compile(MODEL, target=TARGET, max_ram="4K")
    assert compiled.report["ram"]["fits"] and compiled.report["arena_bytes"] <= 4096
    with pytest.raises(BudgetError, match="max-ram"):
        edgecc.compile(MODEL, target=TARGET, max_ram=64)


# -- acceptance on the trained digits models -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_mobilenet"])
def test_digits_within_15_percent_of_their_fp32_bytes_keep_accuracy(name, shared_dir):
    """issue 7: max_flash = 15% of the fp32 weight bytes; flash (weights + code) within it, test accuracy within one
    point of fp32 (onnxruntime on the 500 test images). digits_mobilenet's search takes about 3 minutes."""
    data = shared_dir / "data"
    model = str(data / f"{name}.onnx")
    fp32_weights = edgecc.compile(model, target=TARGET, runtime="native").report["weights_bytes"]
    budget = int(0.15 * fp32_weights)
    compiled = edgecc.compile(model, target=TARGET, max_flash=budget, calibration=str(data / f"{name}_calib.npz"))
    assert flash_bytes(compiled) <= budget
    test = np.load(data / f"{name}_test.npz")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = [{"input": x} for x in test["input"]]
    fp32 = np.mean([np.argmax(session.run(None, f)[0]) for f in feeds] == test["label"])
    ours = np.mean([np.argmax(o) for o in collect_values(compiled.module, feeds, set())["<outputs>"]] == test["label"])
    assert ours >= fp32 - 0.01
