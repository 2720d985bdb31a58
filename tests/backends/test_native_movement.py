"""Native data-movement kernels (backends/kernels/movement.py): Transpose, Slice, Split, Pad, Tile, Expand,
DepthToSpace and SpaceToDepth as structured copy loops, checked against onnx.reference (NumPy index arithmetic for
what onnx's reference does not take: negative pads) on grids of shapes, perms, slice starts/ends/steps (negative
steps, clamped and empty ranges), splits, pads and dtypes (float32, float16, int64, bool, uint8).

The data input is a graph input; the parameters (starts, pads, repeats, ...) are initializers, compile-time
constants as these kernels need. Many cases share one model (`Batch`) compiled at -O0, so one native compile
covers them and no pass rewrites a node; several cases have the same types and differ only in their parameters,
so a kernel wrongly shared between them shows. Every output must be equal to the oracle bit for bit (moves do
not compute; NaNs included), and the generated code must hold no index table (see `Batch.check`).
"""

from __future__ import annotations

import itertools
import re
import shutil
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import edgecc
from edgecc.backends.kernels.movement import merge_dims

RNG = np.random.default_rng(11)
DTYPES = [np.float32, np.float16, np.int64, np.bool_, np.uint8]
I64_MAX, I64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def data(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        x = RNG.standard_normal(shape).astype(dtype)
        if x.size > 2:
            x.reshape(-1)[1] = np.nan  # moved as raw bits, so NaN must arrive where it belongs
        return x
    if dtype == np.bool_:
        return RNG.integers(0, 2, shape).astype(bool)
    info = np.iinfo(dtype)
    return RNG.integers(max(info.min, -(1 << 62)), min(info.max, 1 << 62), shape, endpoint=True).astype(dtype)


def ints(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def one_node(op: str, x: np.ndarray, params: list, n_outputs: int, prefix: str = "", **attrs):
    """(node, graph input of x, initializers): input 0 is x, input i >= 1 is params[i - 1] as an initializer
    (None: omitted)."""
    names = [f"{prefix}x"] + ["" if p is None else f"{prefix}p{i}" for i, p in enumerate(params, 1)]
    while names[-1] == "":
        names.pop()
    node = helper.make_node(op, names, [f"{prefix}y{j}" for j in range(n_outputs)], **attrs)
    inits = [numpy_helper.from_array(p, n) for n, p in zip(names[1:], params) if n]
    graph_input = helper.make_tensor_value_info(names[0], helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)
    return node, graph_input, inits


def model_of(nodes, inputs, inits, outputs, opset: int = 21) -> onnx.ModelProto:
    outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outs, initializer=inits),
                             opset_imports=[helper.make_opsetid("", opset)])


def onnx_reference(op: str, x: np.ndarray, params: list, n_outputs: int, **attrs) -> list[np.ndarray]:
    node, graph_input, inits = one_node(op, x, params, n_outputs, **attrs)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return ReferenceEvaluator(model_of([node], [graph_input], inits, node.output)).run(None, {"x": x})


class Batch:
    """Many one-node cases in one model: case c's names start with c{c}_."""

    def __init__(self):
        self.nodes, self.inputs, self.inits, self.feeds, self.want, self.labels = [], [], [], {}, [], []

    def add(self, label: str, op: str, x: np.ndarray, params: list = (), n_outputs: int = 1, want=None,
            **attrs) -> "Batch":
        """One case; `want` (the outputs) defaults to onnx.reference's."""
        prefix = f"c{len(self.nodes)}_"
        node, graph_input, inits = one_node(op, x, list(params), n_outputs, prefix, **attrs)
        self.nodes.append(node)
        self.inputs.append(graph_input)
        self.inits += inits
        self.feeds[graph_input.name] = x
        self.want += onnx_reference(op, x, list(params), n_outputs, **attrs) if want is None else want
        self.labels += [f"{label} output {j}" for j in range(n_outputs)]
        return self

    def check(self, target: str = "host", table_ok: bool = False) -> edgecc.CompiledModel:
        """Native outputs equal the oracle's bit for bit; without `table_ok`, the code holds no index table."""
        model = model_of(self.nodes, self.inputs, self.inits, [o for n in self.nodes for o in n.output])
        native = edgecc.compile(model, target=target, opt_level=0, runtime="native")
        assert len(native.module.graph.nodes) == len(self.nodes)
        if not table_ok:
            assert "@\"idx." not in native.native.llvm_ir and "@idx." not in native.native.llvm_ir
        got = native.run(self.feeds)
        assert len(got) == len(self.want)
        for label, g, w in zip(self.labels, got, self.want):
            w = np.asarray(w)
            assert g.dtype == w.dtype and g.shape == w.shape, (label, g.dtype, g.shape, w.dtype, w.shape)
            np.testing.assert_array_equal(g, w, err_msg=label)
        return native


# --------------------------------------------------------------------------------------------------- Transpose

TRANSPOSE_SHAPES = [(2, 3, 4), (3, 1, 5), (2, 3, 4, 5), (1, 5, 1, 7)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_transpose(dtype):
    """Every perm of rank 3 and 4 (identity, adjacent dims that stay adjacent, innermost dim moved or not, unit
    dims), the default (reversed) perm, rank 1 and 5, and the channel shuffle of shufflenet."""
    batch = Batch()
    for shape in TRANSPOSE_SHAPES:
        x = data(shape, dtype)
        for perm in itertools.permutations(range(len(shape))):
            batch.add(f"Transpose {shape} {perm}", "Transpose", x, perm=list(perm))
        batch.add(f"Transpose {shape} default perm", "Transpose", x)
    batch.add("Transpose rank 1", "Transpose", data((7,), dtype), perm=[0])
    batch.add("Transpose rank 0", "Transpose", data((), dtype))
    shuffle = data((1, 2, 6, 5, 3), dtype)
    batch.add("channel shuffle", "Transpose", shuffle, perm=[0, 2, 1, 3, 4])
    batch.add("rank 5 mixed", "Transpose", shuffle, perm=[4, 1, 3, 0, 2])
    batch.add("empty", "Transpose", data((2, 0, 3), dtype), perm=[2, 0, 1])
    batch.check()


BLOCK_TRANSPOSES = [  # (shape, perm): 2-D transposes within, sides over one register block, with remainders
    ((2, 19, 21), (0, 2, 1)), ((2, 19, 21), (2, 1, 0)), ((2, 19, 21), (1, 2, 0)), ((2, 19, 21), (2, 0, 1)),
    ((16, 16), (1, 0)), ((8, 4), (1, 0)), ((4, 8), (1, 0)), ((1, 20, 2, 17), (0, 2, 3, 1)),
    ((1, 17, 3, 20), (0, 3, 1, 2)), ((9, 3, 12), (2, 1, 0)), ((3, 7), (1, 0)),
]


@pytest.mark.parametrize("target", ["host", "x86-64", "x86-64-v3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_transpose_blocks(dtype, target):
    """Transposes whose innermost output dim is strided in the input while another dim is contiguous there:
    square blocks transposed in vector registers (as many lanes as the target has for the element size, 4 to 8)
    with remainder strips, for 128-, 256- and 512-bit (host here) vectors."""
    batch = Batch()
    for shape, perm in BLOCK_TRANSPOSES:
        batch.add(f"Transpose {shape} {perm}", "Transpose", data(shape, dtype), perm=list(perm))
    native = batch.check(target)
    lanes = native.native.target.vector_bits // (8 * np.dtype(dtype).itemsize)
    assert ("shufflevector" in native.native.llvm_ir) == (lanes >= 4)


def test_channel_shuffle_copies_rows():
    """shufflenet's [1,2,58,28,28] perm [0,2,1,3,4]: the 28*28 block is contiguous on both sides, so the kernel is
    58 x 2 copies of 3136-byte rows: memcpy calls, no element loop, no table."""
    x = data((1, 2, 58, 28, 28), np.float32)
    native = Batch().add("channel shuffle", "Transpose", x, perm=[0, 2, 1, 3, 4]).check()
    (text,) = native.native.modules[1:]  # the one kernel's module
    kernel = text[text.index("define void"):]
    kernel = kernel[:kernel.index("\n}\n")]
    assert re.search(r'call void @"?llvm\.memcpy[\w.]*"?\(ptr %"?[\w.]+"?, ptr %"?[\w.]+"?, i64 3136,', kernel)
    assert re.findall(r"\bd(\d+)\.head:", kernel) == ["0", "1"]  # the 58 x 2 loops, no per-element loop


def test_merge_dims():
    """Unit dims go; a dim merges into the one before it when they stay adjacent in every operand."""
    # channel shuffle, output order: (1, 58, 2, 28, 28); output strides, input strides
    shape = (1, 58, 2, 28, 28)
    assert merge_dims(shape, (91_000, 1568, 784, 28, 1), (91_000, 784, 45_472, 28, 1)) == \
        [(58, [1568, 784]), (2, [784, 45_472]), (784, [1, 1])]
    assert merge_dims((2, 3, 4), (12, 4, 1), (12, 4, 1)) == [(24, [1, 1])]
    assert merge_dims((3, 4), (4, 1), (0, 1)) == [(3, [4, 0]), (4, [1, 1])]
    assert merge_dims((3, 4), (4, 1), (-4, -1)) == [(12, [1, -1])]
    assert merge_dims((1, 1), (1, 1), (1, 1)) == []
    assert merge_dims((3, 0), (1, 1), (1, 1)) is None


# ------------------------------------------------------------------------------------------------------- Slice

SLICE_RANGES = [  # (start, end, step) on one axis
    (0, I64_MAX, 1), (1, -1, 1), (-100, 100, 1), (2, 3, 1), (1, I64_MAX, 2), (-3, -1, 2), (0, 100, 3),
    (-1, I64_MIN, -1), (4, -100, -1), (100, -100, -2), (-2, 0, -3), (3, 1, -1),
    (3, 1, 1), (2, 2, -1), (100, 200, 1), (-1, 100, -1),  # empty
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_slice(dtype):
    """Each range on each axis of a 3-D input (alone, axes given, negative or omitted), random combinations on
    all axes, and slices keeping the innermost dim whole (row copies) or stepping through it."""
    shape = (5, 4, 6)
    x = data(shape, dtype)
    batch = Batch()
    for axis in range(3):
        for start, end, step in SLICE_RANGES:
            batch.add(f"Slice axis {axis} {start}:{end}:{step}", "Slice", x,
                      [ints(start), ints(end), ints(axis - 3 if axis % 2 else axis), ints(step)])
    for k in range(12):
        picks = [SLICE_RANGES[i] for i in RNG.choice(12, 3)]  # the non-empty ranges
        axes = list(RNG.permutation(3))
        params = [ints(*[picks[a][0] for a in axes]), ints(*[picks[a][1] for a in axes]), ints(*axes),
                  ints(*[picks[a][2] for a in axes])]
        batch.add(f"Slice combination {k} {picks} axes {axes}", "Slice", x, params)
    # backwards from before the start: the spec (and onnxruntime) clamp start to 0 and end to -1, so element 0
    # remains; onnx.reference slices like NumPy (x[-200:-100:-1], empty), hence the explicit result
    batch.add("Slice backwards from before the start", "Slice", x, [ints(-200), ints(-100), ints(1), ints(-1)],
              want=[x[:, :1]])
    batch.add("Slice default axes and steps", "Slice", x, [ints(1, -3), ints(4, 100)])
    batch.add("Slice channels", "Slice", data((1, 8, 3, 3), dtype), [ints(4), ints(8), ints(1)])
    batch.add("Slice rows, reversed columns", "Slice", x, [ints(1, -1), ints(3, I64_MIN), ints(1, 2), ints(1, -1)])
    batch.check()


# ------------------------------------------------------------------------------------------------------- Split

@pytest.mark.parametrize("dtype", DTYPES)
def test_split(dtype):
    """Explicit sizes (zero-size parts included) and equal parts (the last one smaller), on every axis."""
    x = data((4, 6, 5), dtype)
    batch = Batch()
    for axis in range(-3, 3):
        dim = x.shape[axis]
        batch.add(f"Split axis {axis} equal", "Split", x, [], n_outputs=2 if dim % 2 == 0 else 1, axis=axis)
        batch.add(f"Split axis {axis} uneven", "Split", x, [], n_outputs=3, axis=axis, num_outputs=3)
        sizes = ints(1, 0, dim - 1)
        batch.add(f"Split axis {axis} sizes {sizes}", "Split", x, [sizes], n_outputs=3, axis=axis)
    batch.add("Split channels", "Split", data((1, 8, 3, 3), dtype), [ints(3, 5)], n_outputs=2, axis=1)
    batch.check()


# --------------------------------------------------------------------------------------------------------- Pad

def pad_by_indices(x: np.ndarray, pads, value, axes=None) -> np.ndarray:
    """Constant Pad by index arithmetic: out[i] = x[i - begin] where that is inside x, else value (negative
    pads crop, even past the data)."""
    rank = x.ndim
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[len(axes) + i]
    out_shape = [d + b + e for d, b, e in zip(x.shape, begin, end)]
    src = [idx - b for idx, b in zip(np.indices(out_shape), begin)]
    inside = np.ones(out_shape, bool)
    for s, d in zip(src, x.shape):
        inside &= (s >= 0) & (s < d)
    picked = x[tuple(np.clip(s, 0, max(d - 1, 0)) for s, d in zip(src, x.shape))] if x.size else \
        np.zeros(out_shape, x.dtype)
    return np.where(inside, picked, np.asarray(value, x.dtype))


PADS = [  # (pads, axes or None)
    ([0, 1, 2, 1, 0, 3], None), ([1, 1, 1, 1, 1, 1], None), ([0, 0, 0, 0, 0, 2], None), ([2, 0, 0, 0, 0, 0], None),
    ([0, 0, 0, 0, 0, 0], None), ([3, 2], [-1]), ([1, 0, 0, 2], [0, 2]),
    ([-1, 1, 0, 0, -2, 2], None), ([0, -1, -2, 0, 0, -1], None),  # crops
    ([0, 0, -7, 0, 0, 9], None), ([-4, 0, 0, 5, 0, 0], None),  # crops past the data: fill only
]


def pad_values(dtype) -> list:
    """Fill values: the default, one whose bytes are all equal (memset), one whose bytes differ (store loop)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return [None, np.array(True)]
    if dtype.kind == "f":
        return [None, np.array(-1.5, dtype), np.array(np.inf, dtype)]
    return [None, np.array(-1).astype(dtype), np.array(0x1234 if dtype.itemsize > 1 else 7, dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_pad_constant(dtype):
    x = data((3, 4, 5), dtype)
    batch = Batch()
    for (pads, axes), value in itertools.product(PADS, pad_values(dtype)):
        params = [ints(*pads), value, None if axes is None else ints(*axes)]
        want = [pad_by_indices(x, pads, 0 if value is None else value, axes)]
        batch.add(f"Pad {pads} axes {axes} value {value}", "Pad", x, params, want=want)
    batch.add("Pad NCHW spatial", "Pad", data((1, 2, 3, 3), dtype), [ints(0, 0, 1, 1, 0, 0, 1, 1)])
    batch.add("Pad empty input", "Pad", data((2, 0, 3), dtype), [ints(0, 1, 0, 0, 1, 0)],
              want=[np.zeros((2, 2, 3), dtype)])
    batch.check()


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_pad_other_modes_keep_the_table(dtype):
    """edge, reflect and wrap go through the compile-time index table."""
    x = data((3, 4, 5), dtype)
    batch = Batch()
    for mode, pads in itertools.product(("edge", "reflect", "wrap"), ([0, 1, 2, 1, 0, 3], [1, 2, 0, 2, 1, 4])):
        batch.add(f"Pad {mode} {pads}", "Pad", x, [ints(*pads)], mode=mode)
    batch.check(table_ok=True)


# ------------------------------------------------------------------------------------------------ Tile, Expand

@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_expand(dtype):
    batch = Batch()
    x = data((2, 3, 4), dtype)
    for repeats in ([1, 1, 1], [2, 1, 1], [1, 1, 3], [3, 2, 2], [1, 0, 2], [2, 3, 1]):
        batch.add(f"Tile {repeats}", "Tile", x, [ints(*repeats)])
    batch.add("Tile rank 1", "Tile", data((5,), dtype), [ints(4)])
    for in_shape, shape in [((3, 1), (2, 3, 4)), ((1, 4), (3, 1)), ((2, 3, 4), (2, 3, 4)), ((1,), (5, 1, 7)),
                            ((2, 1, 4), (1, 3, 1)), ((3, 1, 1), (3, 5, 6)), ((), (2, 3)), ((1, 3, 1), (2, 3, 2)),
                            ((4, 1), (4, 0))]:
        batch.add(f"Expand {in_shape} to {shape}", "Expand", data(in_shape, dtype), [ints(*shape)])
    batch.check()


# -------------------------------------------------------------------------------------- DepthToSpace and back

@pytest.mark.parametrize("dtype", DTYPES)
def test_depth_space(dtype):
    batch = Batch()
    for mode, (shape, b) in itertools.product(("DCR", "CRD"), [((1, 8, 2, 3), 2), ((2, 18, 2, 2), 3),
                                                                  ((1, 4, 1, 1), 2), ((1, 3, 2, 2), 1)]):
        batch.add(f"DepthToSpace {mode} {shape} {b}", "DepthToSpace", data(shape, dtype), blocksize=b, mode=mode)
    for shape, b in [((1, 2, 4, 6), 2), ((2, 3, 6, 3), 3), ((1, 1, 2, 2), 2)]:
        batch.add(f"SpaceToDepth {shape} {b}", "SpaceToDepth", data(shape, dtype), blocksize=b)
        # SpaceToDepth's CRD mode is not in onnx's reference: the inverse of DepthToSpace CRD
        x = data(shape, dtype)
        n, c, h, w = shape
        crd = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 1, 3, 5, 2, 4).reshape(n, c * b * b, h // b, w // b)
        batch.add(f"SpaceToDepth CRD {shape} {b}", "SpaceToDepth", x, want=[crd], blocksize=b, mode="CRD")
    batch.check()


# ------------------------------------------------------------------------------------------------ ARM targets

ARM_TOOLS = {"armv8": ("qemu-aarch64", "aarch64-linux-gnu-gcc"), "armv7": ("qemu-arm", "arm-linux-gnueabihf-gcc")}


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(ARM_TOOLS))
def test_arm(target):
    """One case of each kernel shape, under qemu-user."""
    missing = [t for t in ARM_TOOLS[target] if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (.ci/run installs them)")
    x = data((2, 3, 4, 5), np.float32)
    h = data((2, 3, 4, 5), np.float16)
    batch = Batch()
    batch.add("Transpose rows", "Transpose", x, perm=[1, 0, 2, 3])
    batch.add("Transpose elements", "Transpose", h, perm=[0, 3, 1, 2])
    for dtype in (np.float32, np.float16, np.uint8):
        for shape, perm in BLOCK_TRANSPOSES[:4]:
            batch.add(f"Transpose blocks {dtype.__name__} {shape} {perm}", "Transpose", data(shape, dtype),
                      perm=list(perm))
    batch.add("Slice", "Slice", x, [ints(1, -1, 4), ints(3, I64_MIN, 0), ints(1, 2, 3), ints(1, -2, -1)])
    batch.add("Split", "Split", h, [ints(1, 3)], n_outputs=2, axis=2)
    batch.add("Pad", "Pad", x, [ints(0, 1, -1, 2, 1, 0, 2, -1), np.array(2.5, np.float32)],
              want=[pad_by_indices(x, [0, 1, -1, 2, 1, 0, 2, -1], 2.5)])
    batch.add("Tile", "Tile", h, [ints(1, 2, 1, 2)])
    batch.add("Expand", "Expand", data((3, 1), np.int64), [ints(2, 3, 4)])
    batch.add("DepthToSpace", "DepthToSpace", data((1, 8, 2, 3), np.uint8), blocksize=2, mode="CRD")
    batch.check(target)
