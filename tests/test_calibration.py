"""edgecc.calibration: loading calibration data, the range observers against onnxruntime's calibrators, ranges
over a real model, degenerate data, and the affine parameters against onnxruntime's compute_scale_zp."""

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgecc.api import optimize
from edgecc.calibration import (CalibrationWarning, collect_ranges, load_calibration, make_observer,
                                quant_params)
from edgecc.errors import EdgeccError, InputError
from edgecc.frontend.onnx_import import import_model
from edgecc.interpreter import run_module

ort_calibrate = pytest.importorskip("onnxruntime.quantization.calibrate")
ort_quant_utils = pytest.importorskip("onnxruntime.quantization.quant_utils")

SHAPE = [1, 3, 8, 8]


def _conv_relu_gemm() -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(4, 3x3, pad 1) -> Relu -> Flatten -> Gemm(10) -> y: the ops int8 PTQ quantises."""
    rng = np.random.default_rng(1)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.standard_normal(108).astype(np.float32))
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], rng.standard_normal(4).astype(np.float32))
    g = helper.make_tensor("g", TensorProto.FLOAT, [10, 256], (0.1 * rng.standard_normal(2560)).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu1"),
             helper.make_node("Flatten", ["relu"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "g"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [w, b, g])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _two_inputs() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["a", "b"], ["c"], name="add")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4]),
                                             helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _module(model):
    module = import_model(model, {}, None)
    optimize(module, passes="infer-shapes")
    return module


@pytest.fixture(scope="module")
def small():
    return _module(_conv_relu_gemm())


def _stack(count, seed=0, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal([count] + shape).astype(np.float32)


# --- loading --------------------------------------------------------------------------------------------------


def test_load_npz_with_and_without_the_batch_dim(small, tmp_path):
    data = _stack(5)
    np.savez(tmp_path / "calib.npz", x=data)
    np.savez(tmp_path / "unbatched.npz", x=data[:, 0])
    for path in (tmp_path / "calib.npz", str(tmp_path / "unbatched.npz")):
        samples = load_calibration(path, small)
        assert len(samples) == 5 and all(list(s) == ["x"] and s["x"].shape == tuple(SHAPE) for s in samples)
        np.testing.assert_array_equal(samples[3]["x"], data[3])


def test_load_folder_sorted_by_name(small, tmp_path):
    data = _stack(6)
    np.save(tmp_path / "b_one.npy", data[2])  # one sample
    np.save(tmp_path / "c_stack.npy", data[3:5, 0])  # a stack without the batch dim
    np.savez(tmp_path / "a_pair.npz", x=data[:2])
    np.savez(tmp_path / "d_single.npz", x=data[5])
    (tmp_path / "README.txt").write_text("not data")
    samples = load_calibration(tmp_path, small)
    np.testing.assert_array_equal(np.stack([s["x"] for s in samples]), data)


def test_load_dict_and_generator(small):
    data = _stack(4)
    assert len(load_calibration({"x": data}, small)) == 4
    samples = load_calibration(({"x": data[i]} for i in range(4)), small)
    np.testing.assert_array_equal(np.stack([s["x"] for s in samples]), data)
    # a two-input model: each sample pairs the i-th arrays
    two = _module(_two_inputs())
    a, b = np.ones((3, 1, 4), np.float32), np.zeros((3, 4), np.float32)
    samples = load_calibration({"a": a, "b": b}, two)
    assert len(samples) == 3 and samples[0]["a"].shape == samples[0]["b"].shape == (1, 4)


@pytest.mark.parametrize("data, words", [
    ({"x": np.zeros((2, 1, 3, 7, 8), np.float32)}, ["'x'", "[2, 1, 3, 7, 8]", "[1, 3, 8, 8]"]),
    ({"x": np.zeros((2, 1, 3, 8, 8))}, ["'x'", "float64", "astype(np.float32)"]),
    ({"input": np.zeros((2, 1, 3, 8, 8), np.float32)}, ["unknown input(s) input", "missing input(s) x",
                                                        "inputs are x"]),
    ({"x": np.zeros((0, 1, 3, 8, 8), np.float32)}, ["no samples"]),
    (iter(()), ["no samples"]),
    ([np.zeros(SHAPE, np.float32)], ["sample 0", "dict"]),
])
def test_load_errors_name_the_input_and_the_expected_shape(small, data, words):
    with pytest.raises(InputError) as info:
        load_calibration(data, small)
    message = str(info.value)
    assert "\n" not in message and "(" in message  # one line, with a hint
    for word in words:
        assert word in message


def test_load_errors_for_files(small, tmp_path):
    with pytest.raises(InputError, match="not found.*npz"):
        load_calibration(tmp_path / "missing.npz", small)
    with pytest.raises(InputError, match="no .npy/.npz files"):
        load_calibration(tmp_path, small)
    two = _module(_two_inputs())
    np.savez(tmp_path / "counts.npz", a=np.zeros((3, 1, 4), np.float32), b=np.zeros((2, 1, 4), np.float32))
    with pytest.raises(InputError, match=r"different sample counts \(a: 3, b: 2\)"):
        load_calibration(tmp_path / "counts.npz", two)
    np.save(tmp_path / "one.npy", np.zeros((1, 4), np.float32))
    with pytest.raises(InputError, match="one array but the model has 2 inputs"):
        load_calibration(tmp_path / "one.npy", two)


# --- observers against onnxruntime's calibrators ---------------------------------------------------------------


def _chunks():
    """Same-shaped chunks whose spread grows and shrinks, so histograms have to widen and merge."""
    rng = np.random.default_rng(7)
    scales = (1.0, 3.0, 0.5, 4.0, 2.0)
    return [(rng.standard_normal(4000) * s + 0.3).astype(np.float32) for s in scales]


def _ort_collector(method, **kw):
    options = dict(symmetric=False, num_bins=2048, num_quantized_bins=128, percentile=99.999, scenario="same")
    options.update(kw)
    return ort_calibrate.HistogramCollector(method=method, **options)


PERCENTILE = ("percentile", {}, dict(symmetric=True))  # onnxruntime's percentile default is symmetric
PERCENTILE_TWO_SIDED = ("percentile", dict(symmetric=False, percentile=99.0), dict(percentile=99.0))
ENTROPY = ("entropy", {}, dict(num_bins=128))  # onnxruntime's EntropyCalibrater default: 128 bins
ENTROPY_2048 = ("entropy", dict(num_bins=2048), {})  # TensorRT's histogram size
ENTROPY_512 = ("entropy", dict(num_bins=512, num_quantized_bins=64), dict(num_bins=512, num_quantized_bins=64))


# onnxruntime's KL search is a Python loop per bin: widened 2048-bin histograms (chunked) take it seconds, so the
# chunked entropy case uses 512 bins
@pytest.mark.parametrize("method, ours, theirs, chunked", [
    (*PERCENTILE, False), (*PERCENTILE_TWO_SIDED, False), (*ENTROPY, False), (*ENTROPY_2048, False),
    (*ENTROPY_512, False),
    (*PERCENTILE, True), (*PERCENTILE_TWO_SIDED, True), (*ENTROPY_512, True),
])
def test_histogram_observers_equal_onnxruntime_on_the_same_arrays(method, ours, theirs, chunked):
    """The same float32 arrays in both: the ranges are equal to the bit. Whole (the data fits the buffer, as
    onnxruntime collects all samples at once) and chunked (buffer_bytes=0 against onnxruntime's collector fed one
    array at a time, its CalibStridedMinMax path)."""
    chunks = _chunks()
    observer = make_observer(method, buffer_bytes=0 if chunked else 1 << 20, **ours)
    collector = _ort_collector(method, **theirs)
    for chunk in chunks:
        observer.update(chunk)
        if chunked:
            collector.collect({"t": [chunk]})
    if not chunked:
        collector.collect({"t": chunks})
    expected = collector.compute_collection_result()["t"][:2]
    assert observer.range() == (float(expected[0]), float(expected[1]))


def test_minmax_observer():
    chunks = _chunks()
    observer, symmetric = make_observer("minmax"), make_observer("minmax", symmetric=True)
    for chunk in chunks:
        observer.update(chunk)
        symmetric.update(chunk)
    lo, hi = float(min(c.min() for c in chunks)), float(max(c.max() for c in chunks))
    assert observer.range() == (lo, hi)
    assert symmetric.range() == (-max(-lo, hi), max(-lo, hi))


class _Reader(ort_calibrate.CalibrationDataReader):
    def __init__(self, samples):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)


def _ort_ranges(tmp_path, model, samples, method, extra):
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    calibrator = ort_calibrate.create_calibrator(
        path, None, augmented_model_path=str(tmp_path / "augmented.onnx"),
        calibrate_method=getattr(ort_calibrate.CalibrationMethod, method), extra_options=extra)
    calibrator.collect_data(_Reader(samples))
    return {name: tuple(float(np.asarray(v).reshape(())) for v in data.range_value)
            for name, data in calibrator.compute_data().items()}


@pytest.mark.parametrize("method, ort_method, extra, bins", [
    ("minmax", "MinMax", {}, None),
    ("percentile", "Percentile", {}, 2048),
    ("entropy", "Entropy", {"num_bins": 512}, 512),
])
def test_collect_ranges_matches_onnxruntime_calibrators(small, tmp_path, method, ort_method, extra, bins):
    """End to end on Conv -> Relu -> Gemm, edgecc's interpreter against onnxruntime's session. The activations
    differ by float32 rounding (different summation orders in Conv/Gemm, ~1e-6 relative), so minmax agrees to
    rtol 1e-5; for the histogram methods a value can land in the neighbouring bin, which can move a percentile
    or the KL minimum by a bin: they agree to 2 bin widths (the bins are range/num_bins wide)."""
    samples = load_calibration({"x": _stack(16, seed=3)}, small)
    names = ["x", "conv", "relu", "flat", "y"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime's own deprecation chatter
        expected = _ort_ranges(tmp_path, _conv_relu_gemm(), samples, ort_method, extra)
    ranges = collect_ranges(small, samples, names, method=method, progress=True, **extra)
    assert set(ranges) == set(names) and set(names) <= set(expected)
    for name in names:
        lo, hi = expected[name]
        if bins is None:
            np.testing.assert_allclose(ranges[name], (lo, hi), rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            width = 2 * max(abs(lo), abs(hi)) / bins
            np.testing.assert_allclose(ranges[name], (lo, hi), rtol=0, atol=2 * width, err_msg=name)


def test_unknown_method_and_value(small):
    with pytest.raises(EdgeccError, match="unknown calibration method 'kl'.*minmax, percentile, entropy"):
        make_observer("kl")
    with pytest.raises(EdgeccError, match="unknown value.*nope"):
        collect_ranges(small, load_calibration({"x": _stack(1)}, small), ["relu", "nope"])


def test_observe_hook_sees_inputs_and_every_node_output(small):
    feeds = {"x": _stack(1)[0]}
    seen = {}
    outputs = run_module(small, feeds, observe=lambda value, array: seen.setdefault(value.name, array.shape))
    np.testing.assert_array_equal(outputs[0], run_module(small, feeds)[0])
    assert seen == {"x": (1, 3, 8, 8), "conv": (1, 4, 8, 8), "relu": (1, 4, 8, 8), "flat": (1, 256), "y": (1, 10)}


# --- a real model -------------------------------------------------------------------------------------------------


def test_collect_ranges_on_digits_cnn(shared_dir):
    model, data = shared_dir / "data" / "digits_cnn.onnx", shared_dir / "data" / "digits_cnn_calib.npz"
    if not (model.exists() and data.exists()):
        pytest.skip(f"{model.name} or {data.name} is absent from {shared_dir / 'data'}")
    module = _module(str(model))
    samples = load_calibration(data, module)
    assert len(samples) == 297
    names = [v.name for v in module.graph.inputs] + [o.name for n in module.graph.nodes for o in n.outputs]
    for method in ("minmax", "percentile", "entropy"):
        ranges = collect_ranges(module, samples[:100], names, method=method)
        assert list(ranges) == names
        for name, (lo, hi) in ranges.items():
            assert np.isfinite([lo, hi]).all() and lo < hi, (method, name)
            scale, _ = quant_params(lo, hi)
            assert np.isfinite(scale) and scale > 0


# --- degenerate data ---------------------------------------------------------------------------------------------


def test_all_zero_and_nan_data_warn_and_give_finite_scales(small):
    relu = _module(helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu0")], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 8])]), opset_imports=[helper.make_opsetid("", 17)]))
    negative = load_calibration({"x": -np.abs(_stack(3, shape=[1, 8])) - 0.1}, relu)  # Relu gives all zeros
    for method in ("minmax", "percentile", "entropy"):
        with pytest.warns(CalibrationWarning, match=r"value 'r' \(output of node 'relu0' \(Relu\)\) is constant"):
            ranges = collect_ranges(relu, negative, ["x", "r"], method=method)
        assert ranges["r"] == (0.0, 0.0) and ranges["x"][0] < ranges["x"][1] < 0
        with pytest.warns(CalibrationWarning, match=r"value 'x' \(graph input\) is constant \(0\)"):
            ranges = collect_ranges(relu, [{"x": np.zeros((1, 8), np.float32)}], ["x"], method=method)
        assert ranges["x"] == (0.0, 0.0)
        for dtype, symmetric in ((np.uint8, False), (np.int8, True)):
            assert quant_params(0.0, 0.0, dtype, symmetric) == (np.float32(1.0), np.dtype(dtype).type(0))

    nan = _stack(3, seed=5)
    nan[1, 0, 1, 2:5] = np.nan
    nan[2, 0, 0, 0, 0] = np.inf
    for method in ("minmax", "percentile", "entropy"):
        with pytest.warns(CalibrationWarning) as record:
            ranges = collect_ranges(small, load_calibration({"x": nan}, small), ["x", "conv", "y"], method=method)
        messages = " | ".join(str(w.message) for w in record)
        assert "value 'x' (graph input): 25 of 576 calibration values are NaN/Inf" in messages
        assert "value 'conv' (output of node 'conv1' (Conv))" in messages
        for lo, hi in ranges.values():
            assert np.isfinite([lo, hi]).all()
            for dtype, symmetric in ((np.uint8, False), (np.int8, True)):
                scale, _ = quant_params(lo, hi, dtype, symmetric)
                assert np.isfinite(scale) and scale > 0

    observer = make_observer("entropy", label="value 'v'")
    observer.update(np.full(8, np.nan, np.float32))
    with pytest.warns(CalibrationWarning, match="no finite value is left"):
        assert observer.range() == (0.0, 0.0)


# --- affine parameters -------------------------------------------------------------------------------------------

RANGES = [(-1.0, 1.0), (0.0, 6.0), (-3.7, 0.2), (0.5, 2.0), (-2.0, -0.5), (0.0, 0.0), (-1e-42, 1e-42), (3.0, 3.0),
          (-0.8116815, 1.8496717), (-1e-3, 123.456)]


@pytest.mark.parametrize("lo, hi", RANGES)
@pytest.mark.parametrize("dtype, onnx_type, symmetric", [
    (np.uint8, TensorProto.UINT8, False), (np.int8, TensorProto.INT8, True), (np.int8, TensorProto.INT8, False),
    (np.uint8, TensorProto.UINT8, True),
])
def test_quant_params_equal_onnxruntime(lo, hi, dtype, onnx_type, symmetric):
    qmin, qmax = ort_quant_utils.get_qmin_qmax_for_qType(onnx_type, symmetric=symmetric)
    zero_point, scale = ort_quant_utils.compute_scale_zp(np.float32(lo), np.float32(hi), qmin, qmax, symmetric)
    ours = quant_params(lo, hi, dtype, symmetric)
    assert ours == (scale, zero_point) and ours[0].dtype == np.float32 and ours[1].dtype == np.dtype(dtype)
    assert np.isfinite(ours[0]) and ours[0] > 0


def test_quant_params_rejects_non_finite_ranges():
    with pytest.raises(EdgeccError, match="finite"):
        quant_params(0.0, float("nan"))
