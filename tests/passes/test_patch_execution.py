"""patch-execution: a CNN's first stage computed tile by tile equals the whole-image computation (onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest

import edgecc
from edgecc.api import optimize
from edgecc.errors import PassError
from edgecc.frontend.onnx_import import import_model
from edgecc.passes.patch_execution import cut_candidates, find_value, patch, split, stage_of
from models import stage_cnn

TOLERANCE = 1e-5
"""float32: a tile runs the same kernels on the same numbers in the same order as the whole map, except where a
kernel's vector blocking of a row differs with the row's width, which can reorder one sum (a few ulps)."""


@pytest.mark.parametrize("pipeline", ["-O0,patch-execution{cut=cut,tiles=3}",
                                      "-O0,patch-execution{cut=cut,max-overhead=2}",
                                      "-O2,patch-execution{tiles=2}", "-O2,patch-execution"])
def test_patched_stage_matches_onnxruntime(pipeline):
    model, x, expected = stage_cnn()
    whole = edgecc.compile(model)
    patched = edgecc.compile(model, passes=pipeline)
    ops = patched.report["ops"]
    assert ops.get("Slice", 0) >= 4 and ops.get("Concat", 0) >= 1  # really tiled
    assert patched.report["macs"] > whole.report["macs"]  # halos are computed twice
    assert patched.report["arena_bytes"] < whole.report["arena_bytes"]
    np.testing.assert_allclose(patched.run({"x": x})[0], expected, rtol=TOLERANCE, atol=TOLERANCE)


def test_tiles_walk_the_windows_backwards():
    model, _, _ = stage_cnn()
    module, _ = optimize(import_model(model, {}, None), passes="infer-shapes")
    cut = find_value(module, "cut")
    assert [n.op for n in stage_of(module, cut)][-3:] == ["Conv", "Conv", "Concat"]
    assert [v.name for v in cut_candidates(module)][-1] == "cut"  # the head (global pool) is not local
    stats = patch(module, cut, 2, 3)
    assert stats["grid"] == [2, 3] and stats["halo_mac_overhead"] > 0
    convs = [n for n in module.graph.nodes if n.op == "Conv" and list(n.attrs.get("strides", ())) == [2, 2]]
    assert sum(n.op == "Concat" and n.attrs["axis"] == 1 for n in module.graph.nodes) == 6  # one per tile
    assert len(convs) == 6
    # pads survive only at the image border: the top-left tile pads top and left, the bottom-right bottom and right
    assert convs[0].attrs["pads"] == [1, 1, 0, 0] and convs[-1].attrs["pads"][:2] == [0, 0]


def test_stage_with_a_value_read_after_it_is_refused():
    model, _, _ = stage_cnn()
    module, _ = optimize(import_model(model, {}, None), passes="infer-shapes")
    # r1 is inside the stage of p1 and read after it (by the residual Add)
    assert isinstance(stage_of(module, find_value(module, "p1")), str)
    with pytest.raises(PassError, match="cannot patch the stage ending at 'g'"):
        patch(module, find_value(module, "g"), 2, 2)
    with pytest.raises(PassError, match="grid does not fit"):
        patch(module, find_value(module, "cut"), 50, 2)


def test_split_is_even_with_larger_spans_first():
    assert split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.slow
def test_int8_stage_is_patched_without_changing_a_bit(shared_dir):
    """QLinearConv, the integer residual Add and the lookup activations run on windows too. The integer kernels'
    results are exact functions of their window's bytes (fixed-point requantisation), so the patched model must
    equal the unpatched one bit for bit; the unpatched int8 model is checked against the references elsewhere
    (tests/test_quantize_int8.py, tools/quant_eval.py)."""
    data = shared_dir / "data"
    options = dict(quantize="int8", calibration=str(data / "digits_mobilenet_calib.npz"))
    model = str(data / "digits_mobilenet.onnx")
    whole = edgecc.compile(model, **options)
    patched = edgecc.compile(model, passes="-O2,patch-execution{tiles=2}", **options)
    assert patched.report["ops"]["QLinearConv"] > whole.report["ops"]["QLinearConv"]
    assert patched.report["ops"].get("QLinearAdd", 0) > whole.report["ops"].get("QLinearAdd", 0)
    assert patched.report["arena_bytes"] < whole.report["arena_bytes"]
    x = np.load(data / "digits_mobilenet_test.npz")["input"][:8]
    for sample in x:
        np.testing.assert_array_equal(patched.run([sample])[0], whole.run([sample])[0])


@pytest.mark.parametrize("options, message", [("tiles=-1", "tiles=-1 must be >= 1"),
                                              ("cut=nope", "no value named 'nope'"),
                                              ("cut=y", "cannot patch the stage ending at 'y'"),
                                              ("cut=cut,max-overhead=0.01", "costs more than max-overhead")])
def test_bad_options_are_named(options, message):
    model, _, _ = stage_cnn()
    with pytest.raises(PassError, match=message):
        edgecc.compile(model, opt_level=0, passes=f"-O0,patch-execution{{{options}}}", runtime="reference")
