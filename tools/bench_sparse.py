"""Sparse against dense edgecc kernels, single thread: layer shapes of ../shared/models and whole pruned models.

    python tools/bench_sparse.py [--levels 0.5,0.8,0.9,0.95] [--runs 200] [--models mobilenet_v2,bert_tiny_enc]
                                 [--write docs/performance-sparse.md]

Layers: 1x1 convolutions (mobilenet_v2, squeezenet1_1, resnet18's strided downsampling), resnet18's 3x3
convolutions, and fully connected
layers (mlp_mnist, bert_tiny_enc's MatMuls with 128 rows, mobilenet_v2's classifier) as one-node models with
seeded random weights, pruned by magnitude to each level either unstructured or in 1xV blocks of outputs
(V = the host's float lanes; a block is zeroed when its L1 norm is among the smallest). Each is compiled dense
(`encode-sparsity{encoding=dense}`) and sparse (csr for unstructured, block for block pruning, forced), plus what
the cost model (`encoding=auto`) picks; times are the kernel's median cycles from CompiledModel.profile, the dense
and sparse layers profiled alternately (5 rounds) so that the load of a shared machine meets both.
Whole models: the float model, and the same model with every group-1 Conv and Gemm/MatMul weight magnitude-pruned to
90% (numpy on the ONNX initializers, unstructured or in 1xV blocks), both at -O3 with the cost model choosing the
encodings, median wall time of CompiledModel.run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench import SHARED, cpu_name

CONV_LAYERS = [  # (source, C_in, C_out, H, W, stride, kernel)
    ("mobilenet_v2", 24, 144, 56, 56, 1, 1), ("mobilenet_v2", 32, 192, 28, 28, 1, 1),
    ("mobilenet_v2", 576, 96, 14, 14, 1, 1), ("mobilenet_v2", 160, 960, 7, 7, 1, 1),
    ("mobilenet_v2", 960, 160, 7, 7, 1, 1), ("squeezenet1_1", 128, 32, 27, 27, 1, 1),
    ("squeezenet1_1", 512, 64, 13, 13, 1, 1), ("resnet18", 64, 128, 56, 56, 2, 1), ("resnet18", 256, 512, 14, 14, 2, 1),
    ("resnet18", 64, 64, 56, 56, 1, 3), ("resnet18", 128, 128, 28, 28, 1, 3), ("resnet18", 256, 256, 14, 14, 1, 3),
    ("resnet18", 512, 512, 7, 7, 1, 3), ("resnet18", 64, 128, 56, 56, 2, 3),
]
FC_LAYERS = [  # (source, M, K, N)
    ("mlp_mnist", 1, 784, 256), ("mlp_mnist", 1, 256, 128), ("mlp_mnist", 1, 128, 10),
    ("mobilenet_v2", 1, 1280, 1000), ("resnet18", 1, 512, 1000), ("shufflenet_v2_x1_0", 1, 1024, 1000),
    ("bert_tiny_enc", 128, 128, 512), ("bert_tiny_enc", 128, 512, 128),
]
"""(squeezenet1_1's classifier is a 1x1 Conv, in CONV_LAYERS' kind.)"""


def prune(matrix: np.ndarray, level: float, width: int) -> np.ndarray:
    """`matrix` [K, N] with the smallest `level` fraction of its 1 x width blocks (L1 norm) zeroed."""
    k, n = matrix.shape
    blocks = -(-n // width)
    padded = np.zeros((k, blocks * width), np.float32)
    padded[:, :n] = matrix
    norms = np.abs(padded).reshape(k, blocks, width).sum(axis=2)
    cut = np.sort(norms, axis=None)[min(norms.size - 1, int(level * norms.size))]
    keep = np.repeat(norms >= cut, width, axis=1)[:, :n]
    return np.where(keep, matrix, 0).astype(np.float32)


PROFILE_MACS = 4_000_000
"""A layer of fewer MACs is benchmarked as copies of itself (one shared weight, distinct biases so no pass merges
them) adding up to about this many: CompiledModel.profile converts the cycle counter with the wall time of the
whole call, whose ctypes overhead (about 1 us) would otherwise be counted in a one-node model's kernel time."""


def copies_of(kind: str, shape) -> int:
    """How many copies of the layer one benchmark model holds (see PROFILE_MACS)."""
    _, *dims = shape
    macs = dims[0] * dims[1] * dims[2] * dims[3] * dims[5] ** 2 if kind == "conv" else int(np.prod(dims))
    return int(max(1, min(32, PROFILE_MACS // macs)))


def layer_model(kind: str, shape, level: float, width: int, rng, copies: int = 1) -> tuple[onnx.ModelProto, dict]:
    """One layer (`copies` times, reading the same input and weight) with seeded random weights pruned to `level`."""
    if kind == "conv":
        _, c, co, h, w, s, k = shape
        view = prune(rng.standard_normal((c, k * k * co)).astype(np.float32), level, width)  # [C_in, taps x C_out]
        weights = view.reshape(c, k * k, co).transpose(2, 0, 1).reshape(co, c, k, k)
        oh, ow = (h - 1) // s + 1, (w - 1) // s + 1
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[s, s], pads=[k // 2] * 4)
        x_shape, y_shape = [1, c, h, w], [1, co, oh, ow]
        bias = rng.standard_normal(co).astype(np.float32)
    else:
        _, m, k, n = shape
        weights = prune(rng.standard_normal((k, n)).astype(np.float32), level, width)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"]) if m == 1 else helper.make_node("MatMul", ["x", "w"],
                                                                                                 ["y"])
        x_shape, y_shape = [m, k], [m, n]
        bias = rng.standard_normal(n).astype(np.float32)
    nodes, inits, outputs = [], [numpy_helper.from_array(weights, "w")], []
    for copy in range(copies):
        name = f"y{copy}" if copies > 1 else "y"
        inputs = list(node.input)
        if len(inputs) > 2:
            inputs[2] = f"b{copy}"
            inits.append(numpy_helper.from_array((bias + copy).astype(np.float32), inputs[2]))
        nodes.append(helper.make_node(node.op_type, inputs, [name], name=name, **{
            a.name: helper.get_attribute_value(a) for a in node.attribute}))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, y_shape))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32)}


def compiled_layer(model, encoding: str):
    import edgecc

    return edgecc.compile(model, opt_level=3, passes=f"-O3,encode-sparsity{{encoding={encoding}}}", progress=False)


def paired_ms(dense, sparse, dense_feeds, sparse_feeds, runs: int, rounds: int = 5) -> tuple[float, float]:
    """Median kernel times of two compiled layers (per copy of the layer) profiled alternately, `rounds` times
    runs/rounds each, so a change in the machine's load meets both."""
    times: tuple[list, list] = ([], [])
    for _ in range(rounds):
        for compiled, feeds, out in ((dense, dense_feeds, times[0]), (sparse, sparse_feeds, times[1])):
            rows = compiled.profile(feeds, max(1, runs // rounds))
            out.append(sum(r["ms"] for r in rows) / len(rows))
    return statistics.median(times[0]), statistics.median(times[1])


def encoding_of(compiled) -> str:
    found = [str(v.type.sparse) for v in compiled.module.graph.constants() if v.type.sparse is not None]
    return found[0].replace("sparse<", "").rstrip(">") if found else "dense"


def bench_layers(levels, runs: int, lanes: int, only: str = ""):
    rng = np.random.default_rng(0)
    rows = []
    for kind, shapes in (("fc", FC_LAYERS), ("conv", CONV_LAYERS)):
        for shape in shapes:
            if only and not (kind == "fc" and f"{shape[0]} FC {shape[2]}->{shape[3]}".startswith(only)):
                continue
            label = (f"{shape[0]} {shape[6]}x{shape[6]} {shape[1]}->{shape[2]} @{shape[3]}x{shape[4]}" +
                     (f" s{shape[5]}" if shape[5] > 1 else "")) if kind == "conv" else \
                f"{shape[0]} FC {shape[2]}->{shape[3]} M={shape[1]}"
            copies = copies_of(kind, shape)
            model, dense_feeds = layer_model(kind, shape, 0.0, 1, rng, copies)
            dense_layer = compiled_layer(model, "dense")
            for pattern, width, forced in (("unstructured", 1, "csr"), (f"block 1x{lanes}", lanes, "block")):
                for level in levels:
                    model, feeds = layer_model(kind, shape, level, width, rng, copies)
                    dense, sparse = paired_ms(dense_layer, compiled_layer(model, forced), dense_feeds, feeds, runs)
                    auto = compiled_layer(model, "auto")
                    rows.append((label, pattern, level, dense, sparse, encoding_of(auto)))
                    print(f"| {label} | {pattern} | {level:.0%} | {dense:.4f} | {sparse:.4f} | {sparse / dense:.2f} | "
                          f"{encoding_of(auto)} |", flush=True)
    return rows


ARM_LAYERS = [("conv", ("mobilenet_v2", 576, 96, 14, 14, 1, 1)), ("conv", ("mobilenet_v2", 160, 960, 7, 7, 1, 1)),
              ("conv", ("resnet18", 128, 128, 28, 28, 1, 3)), ("fc", ("mlp_mnist", 1, 784, 256)),
              ("fc", ("bert_tiny_enc", 128, 512, 128))]


def arm_instructions(model, feeds, encoding: str, target: str) -> int:
    """Guest instructions of one run of the layer on `target` under qemu-user (tools/arm_insncount.py's driver
    and TCG plugin): exact and repeatable where wall time under qemu says nothing."""
    import tempfile

    import edgecc
    from arm_insncount import count, link

    compiled = edgecc.compile(model, target=target, passes=f"-O3,encode-sparsity{{encoding={encoding}}}",
                              progress=False)
    with tempfile.TemporaryDirectory(prefix="edgecc-sparse-") as tmp:
        exe = link(compiled, tmp)
        inputs = os.path.join(tmp, "inputs.bin")
        with open(inputs, "wb") as f:
            for value in compiled.module.graph.inputs:
                f.write(np.ascontiguousarray(feeds[value.name]).tobytes())
        return count(compiled, exe, inputs, 1) - count(compiled, exe, inputs, 0)


def bench_arm(targets: list[str], level: float) -> list[str]:
    """Instructions of the sparse kernels over the dense ones on ARM, `level` zeros, unstructured and 1x4 blocks
    (a NEON register of floats)."""
    rng = np.random.default_rng(0)
    lines = ["", f"| layer ({level:.0%} zeros) | target | dense instructions | CSR / dense (unstructured) | "
             "1x4 blocks / dense (block pruned) |", "|---|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for kind, shape in ARM_LAYERS:
        label = f"{shape[0]} {'FC' if kind == 'fc' else 'Conv'} {shape[1:]}"
        for target in targets:
            dense_model, feeds = layer_model(kind, shape, 0.0, 1, rng)
            dense = arm_instructions(dense_model, feeds, "dense", target)
            csr = arm_instructions(layer_model(kind, shape, level, 1, rng)[0], feeds, "csr", target)
            block = arm_instructions(layer_model(kind, shape, level, 4, rng)[0], feeds, "block", target)
            lines.append(f"| {label} | {target} | {dense} | {csr / dense:.2f} | {block / dense:.2f} |")
            print(lines[-1], flush=True)
    return lines


def pruned_model(path: str, level: float, width: int = 1) -> onnx.ModelProto:
    """The model with every group-1 Conv and Gemm/MatMul initializer weight magnitude-pruned to `level` (in 1 x width
    blocks of outputs of the kernels' [K, N] view, see `prune` and edgecc.ops.sparse)."""
    from edgecc.ops.sparse import _conv_view

    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if node.op_type == "Conv" and any(a.name == "group" and a.i != 1 for a in node.attribute):
            continue
        if node.op_type == "Conv":
            view = prune(_conv_view(w), level, width)  # [C_in, taps x C_out]
            pruned = view.reshape(w.shape[1], -1, w.shape[0]).transpose(2, 0, 1).reshape(w.shape)
        elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            pruned = prune(w.T, level, width).T
        else:
            pruned = prune(w, level, width)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(pruned.astype(w.dtype), node.input[1]))
    return model


def bench_model(name: str, runs: int, width: int) -> dict:
    import edgecc

    path = str(SHARED / "models" / f"{name}.onnx")
    feeds = {"input": np.load(SHARED / "models" / f"{name}.ref.npz")["input"]}
    dense = edgecc.compile(path, opt_level=3, progress=False)
    sparse = edgecc.compile(pruned_model(path, 0.9, width), opt_level=3, progress=False)
    encoded = sum(1 for v in sparse.module.graph.constants() if v.type.sparse is not None)
    times = {"dense": [], "sparse": []}
    for _ in range(3):
        dense.run(feeds), sparse.run(feeds)
    for _ in range(runs):
        for key, compiled in (("dense", dense), ("sparse", sparse)):
            t = time.perf_counter()
            compiled.run(feeds)
            times[key].append(time.perf_counter() - t)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"model": name, **ms, "encoded": encoded}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="0.5,0.8,0.9,0.95")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--models", default="mobilenet_v2,squeezenet1_1,resnet18,bert_tiny_enc,mlp_mnist")
    parser.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--arm", default="", help="also count guest instructions on these targets (armv8,armv7)")
    parser.add_argument("--write", metavar="FILE.md")
    parser.add_argument("--only", default="", metavar="'MODEL FC K->N'",
                        help="only the fully connected layers whose label starts with this (e.g. 'mlp_mnist FC'), to "
                             "re-measure a few rows after a kernel change; printed, not written")
    args = parser.parse_args()
    from edgecc.backends.targets import resolve_target

    lanes = max(1, resolve_target("host").vector_bits // 32)
    load = os.getloadavg()  # a busy machine slows long kernels most: said in the output
    levels = [float(v) for v in args.levels.split(",")]
    out = []
    if args.layers:
        out += ["| layer | pruning | sparsity | dense ms | sparse ms | sparse / dense | auto picks |",
                "|---|---|---:|---:|---:|---:|---|"]
        print("\n".join(out), flush=True)
        rows = bench_layers(levels, args.runs, lanes, args.only)
        out += [f"| {r[0]} | {r[1]} | {r[2]:.0%} | {r[3]:.4f} | {r[4]:.4f} | {r[4] / r[3]:.2f} | {r[5]} |" for r in rows]
    models = []
    if args.models:
        models = ["", "| model (group-1 Conv + FC weights pruned to 90%) | pruning | dense ms | sparse ms | sparse / dense "
                  "| layers encoded |", "|---|---|---:|---:|---:|---:|"]
        for name in args.models.split(","):
            for pattern, width in (("unstructured", 1), (f"block 1x{lanes}", lanes)):
                r = bench_model(name, max(20, args.runs // 5), width)
                models.append(f"| {name} | {pattern} | {r['dense']:.3f} | {r['sparse']:.3f} | "
                              f"{r['sparse'] / r['dense']:.2f} | {r['encoded']} |")
                print(models[-1], flush=True)
    if args.arm:
        models += bench_arm(args.arm.split(","), 0.9)
    if args.write and not args.only:
        with open(args.write, "w") as f:
            f.write(f"# Sparse kernels\n\n`python tools/bench_sparse.py --runs {args.runs} --levels {args.levels} "
                    f"--models {args.models}" + (f" --arm {args.arm}" if args.arm else "") + f"` on {cpu_name()}, one thread, host target ({lanes} float lanes). "
                    "Layer times are the kernel's median over the runs (profile entry's cycle counter); model times "
                    "the median wall time of a run. Load average (1 min) at the start and the end: "
                    f"{load[0]:.1f} and {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.\n\n" + "\n".join(out + models) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
