"""Latency of edgecc native code against onnxruntime, single-threaded, side by side in one process.

    python tools/bench.py [--models mobilenet_v2,resnet18] [--runs 30] [--write docs/performance.md]

For each model of ../shared/models: compile with edgecc (-O3, host, native), open an onnxruntime session with
one intra-op thread, then alternate the two runs (warm-up first) and report median milliseconds, the ratio, and
GFLOP/s (2 FLOP per multiply-accumulate) against the peak of one core.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("EDGECC_SHARED", ROOT.parent / "shared"))
MODELS = ["mlp_mnist", "lenet5", "bert_tiny_enc", "shufflenet_v2_x1_0", "squeezenet1_1", "mobilenet_v2", "resnet18"]
PEAK_GFLOPS = 117.0
"""One core of the development machine (AMD EPYC Zen 4, ~3.66 GHz, 32 fp32 FLOP/cycle with FMA)."""


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_model(name: str, runs: int) -> dict:
    import onnxruntime as ort

    import edgecc

    path = SHARED / "models" / f"{name}.onnx"
    feeds = {"input": np.load(SHARED / "models" / f"{name}.ref.npz")["input"]}
    with tempfile.TemporaryDirectory() as cold_cache:  # compile time without edgecc's object cache
        os.environ["EDGECC_CACHE_DIR"] = cold_cache
        try:
            start = time.perf_counter()
            compiled = edgecc.compile(str(path), opt_level=3, runtime="native", progress=False)
            compile_s = time.perf_counter() - start
        finally:
            del os.environ["EDGECC_CACHE_DIR"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ours_out = compiled.run(feeds)[0]
    theirs_out = session.run(None, feeds)[0]
    error = float(np.max(np.abs(ours_out - theirs_out)) / max(np.max(np.abs(theirs_out)), 1e-30))
    ours, theirs = [], []
    for _ in range(3):
        compiled.run(feeds)
        session.run(None, feeds)
    for _ in range(runs):
        t = time.perf_counter()
        compiled.run(feeds)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        session.run(None, feeds)
        theirs.append(time.perf_counter() - t)
    macs = compiled.report["macs"]
    ms_ours, ms_theirs = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    rss_kib = standalone_peak_rss_kib(compiled, feeds)
    return {"model": name, "macs": macs, "rss_kib": rss_kib, "edgecc_ms": ms_ours, "ort_ms": ms_theirs, "ratio": ms_ours / ms_theirs,
            "gflops": 2 * macs / (ms_ours * 1e6), "compile_s": compile_s, "rel_error": error,
            "arena": compiled.report["arena_bytes"], "lower_bound": compiled.report["arena_lower_bound_bytes"]}


def standalone_peak_rss_kib(compiled, feeds) -> int | None:
    """Peak resident memory of a C program that runs the compiled model once (edgecc's test driver linked with the
    model's object; reads the input from a file, mallocs the arena and outputs): what a deployment needs, without
    Python or onnxruntime in the process. None without GNU time (Debian package `time`)."""
    from edgecc.backends.cross_runner import DRIVER, _driver_object  # noqa: F401  (the same driver as qemu runs)

    code, module = compiled.native, compiled.module
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "model.o")
        with open(obj, "wb") as f:
            f.write(code.obj)
        exe = os.path.join(tmp, "run")
        subprocess.run(["cc", "-O2", _driver_object("cc", code.target), obj, "-o", exe,
                        f"-Wl,--defsym=edgecc_entry={code.entry_symbol}"], check=True)
        types = [v.type for v in module.graph.inputs] + [v.type for v in module.graph.outputs]
        header = struct.pack(f"<IIQ{len(types)}Q", len(module.graph.inputs), len(module.graph.outputs),
                             max(module.memory_plan.arena_bytes, 1), *[t.nbytes for t in types])
        inputs = os.path.join(tmp, "in.bin")
        with open(inputs, "wb") as f:
            f.write(header + b"".join(np.ascontiguousarray(feeds[v.name]).tobytes() for v in module.graph.inputs))
        # GNU time reports its child's own peak; this process's rusage would count the pages a fork shares with it
        if not shutil.which("time") or not os.path.exists("/usr/bin/time"):
            return None
        report = os.path.join(tmp, "rss.txt")
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report, exe, inputs, os.path.join(tmp, "out.bin")],
                       check=True)
        with open(report) as f:
            return int(f.read().split()[-1])


def bench_arguments(doc: str) -> argparse.Namespace:
    """--models, --runs and --write, the options every benchmark script takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--write", metavar="FILE.md")
    return parser.parse_args()


def main() -> int:
    args = bench_arguments(__doc__)
    if not (SHARED / "models").is_dir():
        print(f"bench: {SHARED}/models not found (set EDGECC_SHARED)", file=sys.stderr)
        return 1
    rows = []
    for name in args.models.split(","):
        row = bench_model(name, args.runs)
        rows.append(row)
        print(f"{name:20s} edgecc {row['edgecc_ms']:9.3f} ms  onnxruntime {row['ort_ms']:8.3f} ms  "
              f"ratio {row['ratio']:6.2f}  {row['gflops']:6.2f} GFLOP/s  compile {row['compile_s']:.1f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        "# Performance", "",
        f"Command: `python tools/bench.py --runs {args.runs} --write docs/performance.md` at commit {commit}.",
        f"Machine: {cpu_name()}, 1 thread for both (onnxruntime intra-op threads = 1), batch 1, median of "
        f"{args.runs} alternating runs after warm-up. Peak of one core: {PEAK_GFLOPS:.0f} GFLOP/s fp32.", "",
        "| model | MACs | edgecc ms | onnxruntime ms | edgecc / ort | GFLOP/s | % of peak | max rel. error | "
        "arena / lower bound | arena KiB | peak RSS KiB | compile s (no cache) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['macs'] / 1e6:.1f} M | {r['edgecc_ms']:.3f} | {r['ort_ms']:.3f} | "
                     f"{r['ratio']:.2f} | {r['gflops']:.2f} | {100 * r['gflops'] / PEAK_GFLOPS:.1f}% | "
                     f"{r['rel_error']:.1e} | {r['arena'] / max(r['lower_bound'], 1):.3f} | {r['arena'] / 1024:.0f} | "
                     f"{r['rss_kib'] if r['rss_kib'] is not None else 'n/a'} | {r['compile_s']:.1f} |")
    ratios = [r["ratio"] for r in rows]
    geomean = float(np.exp(np.mean(np.log(ratios))))
    lines += ["", f"Geometric mean of edgecc / onnxruntime over these models: **{geomean:.2f}** "
              f"(worst {max(ratios):.2f}, {rows[ratios.index(max(ratios))]['model']}).", "",
              "Peak RSS: a C program (edgecc's test driver linked with the model's object) that reads the input, "
              "runs the model once and writes the output; its maximum resident set size as GNU time reports it. "
              "Compile time: `edgecc.compile(..., opt_level=3)` with an empty object cache (kernels are optimised "
              "by LLVM in one worker process per core).", "",
              "Where the time goes, node by node: `edgecc run MODEL --input input=x.npy --profile` (or "
              "`CompiledModel.profile(feeds)`), which reads the cycle counter around every node. ARM code quality "
              "(instructions per MAC under qemu, vector FMAs in the hot loops) is in docs/arm-performance.md.", "",
              "mlp_mnist is bound by memory bandwidth: its first layer streams 800 KB of float32 weights per "
              "inference, which onnxruntime's run (alternating with ours, with its own copy of the weights) pushes "
              "out of the 1 MB L2, so they come from L3 at about 95 GB/s: about 8.5 us of the total whatever the "
              "kernel does (the kernel alone, weights in cache, runs at 47 GFLOP/s)."]
    text = "\n".join(lines) + "\n"
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
