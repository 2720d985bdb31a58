"""The planned arena of every model of ../shared, step by step: layer by layer, memory-aware order, in-place ops,
patch-based execution; the halo MACs patching costs and the outputs' error against onnxruntime.

    python tools/ram_eval.py [--models mobilenet_v2,...] [--time ROUNDS] [--write docs/memory.md]

"layer by layer" is the plan of the -O2 graph order with only Reshape-like views in place (edgecc before this
work). Each later column adds one step to the previous. "patched" is what `-p "-O2,patch-execution"` chooses
(the least halo overhead within 2% of the smallest peak over every patchable cut and NxN grid, overhead <= 50%).
Errors are max |edgecc - onnxruntime| / max |onnxruntime| over the outputs, on native host code: the default
compile (order + in-place) and the patched one. The fit_ram table runs `edgecc.ram.fit_ram` on mobilenet_v2
at fractions of its layer-by-layer arena. Arena figures do not depend on the machine; only compile time does.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

import edgecc
from edgecc.errors import BudgetError
from edgecc.passes.plan_memory import plan, plan_best_order
from edgecc.ram import fit_ram

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared"))
MODELS = ("mobilenet_v2", "resnet18", "squeezenet1_1", "shufflenet_v2_x1_0", "bert_tiny_enc", "lenet5", "mlp_mnist",
          "digits_cnn", "digits_mobilenet", "digits_mlp")
BUDGET_FRACTIONS = (0.5, 0.25, 0.2, 0.15)


def model_path(name: str) -> str:
    folder = "data" if name.startswith("digits_") else "models"
    return os.path.join(SHARED, folder, f"{name}.onnx")


def sample_input(name: str) -> np.ndarray:
    if name.startswith("digits_"):
        return np.load(os.path.join(SHARED, "data", f"{name}_test.npz"))["input"][0]
    return np.load(os.path.join(SHARED, "models", f"{name}.ref.npz"))["input"]


def relative_error(compiled, path: str, x: np.ndarray) -> float:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})
    got = compiled.run([x])
    return max(float(np.abs(g - e).max() / max(np.abs(e).max(), 1e-30)) for g, e in zip(got, expected))


def alternating_medians(models: list, x: np.ndarray, rounds: int) -> list[float]:
    """Median wall time (ms) of each model's run, the models taking turns in every round, so a shared machine's
    load falls on all of them alike."""
    times = [[] for _ in models]
    for model in models:
        model.run([x])  # warm up
    for _ in range(rounds):
        for k, model in enumerate(models):
            start = time.perf_counter()
            model.run([x])
            times[k].append(1000 * (time.perf_counter() - start))
    return [float(np.median(t)) for t in times]


def evaluate(name: str, rounds: int = 0) -> dict:
    path = model_path(name)
    x = sample_input(name)
    module = edgecc.compile(path, runtime="reference").module  # -O2, graph order, no plan yet
    row = {"model": name, "layer_by_layer": plan(module.clone(), in_place=False).arena_bytes,
           "ordered": plan_best_order(module.clone(), in_place=False).arena_bytes,
           "in_place": plan_best_order(module.clone()).arena_bytes}
    default = edgecc.compile(path)
    row["default_error"] = relative_error(default, path, x)
    patched = edgecc.compile(path, passes="-O2,patch-execution")
    record = next(p for p in patched.report["passes"] if p["name"] == "patch-execution")
    if record["changed"]:
        row["patched"] = patched.report["arena_bytes"]
        row["grid"] = record["stats"]["tiles"]
        row["halo"] = patched.report["macs"] / default.report["macs"] - 1
        row["patched_error"] = relative_error(patched, path, x)
        if rounds:
            row["default_ms"], row["patched_ms"] = alternating_medians([default, patched], x, rounds)
    return row


def budget_rows(name: str, layer_by_layer: int) -> list[dict]:
    rows = []
    for fraction in BUDGET_FRACTIONS:
        module = edgecc.compile(model_path(name), runtime="reference").module
        budget = int(layer_by_layer * fraction)
        try:
            report = fit_ram(module, budget, "host")
            patch = report["patch"] or {}
            rows.append({"fraction": fraction, "budget": budget, "arena": report["arena_bytes"],
                         "cut": patch.get("cut", "-"), "grid": patch.get("grid"),
                         "halo": patch.get("halo_mac_overhead", 0.0)})
        except BudgetError as error:
            rows.append({"fraction": fraction, "budget": budget, "error": error.one_line()})
    return rows


BEGIN, END = "<!-- ram_eval results -->", "<!-- /ram_eval results -->"
"""The part of the doc this tool rewrites; the prose around it stays."""


def write_results(path: str, results: str) -> None:
    from edgecc.fileio import write_atomic

    text = open(path).read() if os.path.exists(path) else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"ram_eval: {path} has no '{BEGIN}' ... '{END}' section to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(f"{head}{BEGIN}\n{results}\n{END}{tail}")

    write_atomic(path, write)


def kib(n) -> str:
    return f"{n / 1024:,.1f}" if n is not None else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--write", metavar="FILE.md")
    parser.add_argument("--time", type=int, default=0, metavar="ROUNDS",
                        help="also time the default and patched native code (median of ROUNDS alternating runs)")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        row = evaluate(name, args.time)
        rows.append(row)
        print(row, file=sys.stderr)
    lines = ["| model | layer by layer (KiB) | + order | + in-place | + patching | grid | ratio | halo MACs | "
             "max rel. error (default) | max rel. error (patched) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        final = r.get("patched", r["in_place"])
        grid = f"{int(r['grid'] ** 0.5)}x{int(r['grid'] ** 0.5)}" if "grid" in r else "-"
        lines.append(f"| {r['model']} | {kib(r['layer_by_layer'])} | {kib(r['ordered'])} | {kib(r['in_place'])} | "
                     f"{kib(r.get('patched'))} | {grid} | {r['layer_by_layer'] / final:.2f}x | "
                     + (f"+{100 * r['halo']:.1f}%" if "halo" in r else "-")
                     + f" | {r['default_error']:.1e} | "
                     + (f"{r['patched_error']:.1e}" if "patched_error" in r else "-")
                     + " |")
    timed = [r for r in rows if "patched_ms" in r]
    if timed:
        lines += ["", f"Latency on this machine (median of {args.time} alternating runs, host native code; a shared "
                  "machine: re-take on a quiet one):", "",
                  "| model | default (ms) | patched (ms) | patched / default |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['default_ms']:.2f} | {r['patched_ms']:.2f} | "
                  f"{r['patched_ms'] / r['default_ms']:.2f} |" for r in timed]
    budgets = []
    mobilenet = next((r for r in rows if r["model"] == "mobilenet_v2"), None)
    if mobilenet:
        budgets = ["| budget (of layer by layer) | budget (KiB) | arena (KiB) | cut | grid | halo MACs |",
                   "|---|---:|---:|---|---:|---:|"]
        for b in budget_rows("mobilenet_v2", mobilenet["layer_by_layer"]):
            if "error" in b:
                budgets.append(f"| {b['fraction']:.0%} | {kib(b['budget'])} | BudgetError: {b['error']} | | | |")
            else:
                grid = "x".join(map(str, b["grid"])) if b["grid"] else "-"
                budgets.append(f"| {b['fraction']:.0%} | {kib(b['budget'])} | {kib(b['arena'])} | `{b['cut']}` | "
                               f"{grid} | +{100 * b['halo']:.1f}% |")
    print("\n".join(lines + [""] + budgets))
    if args.write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
        header = (f"Measured with `python tools/ram_eval.py --write {args.write}` at commit {commit} on "
                  f"{platform.machine()} ({os.cpu_count()} cores), Python {platform.python_version()}.")
        results = "\n".join([header, "", *lines, "", "fit_ram on mobilenet_v2:", "", *budgets])
        write_results(args.write, results)
        print(f"ram_eval: wrote the results into {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
