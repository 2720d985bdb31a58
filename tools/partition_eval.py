"""Edge/cloud partitioning measured: where the minimum cut falls as the link changes, and that the split runs.

    python tools/partition_eval.py [--device rpi-zero2] [--server host] [--rtt 20ms] [--models ...]
                                   [--write docs/partitioning.md]

For each model of ../shared/models and each bandwidth (0.1, 1, 10, 100, 1000 Mbit/s): the chosen cut (tensors,
bytes), its estimated device/link/server times against all-device, all-server and the best single cut point of
the node order (what a chain-only partitioner finds); then each distinct split is built and run (the device half
as code for the device's target, under qemu-user for ARM boards; the server half on this host) and compared
with onnxruntime on the whole model (max relative error, fp32 transfer). On chain models (lenet5) the minimum cut
must equal the best cut point. Costs come from edgecc.estimate (measured host kernels; qemu instruction counts x
the board's cycles per instruction), cached by object code: rerun to reuse them. --write replaces the section
between the partition_eval markers of the file.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import onnxruntime as ort

from edgecc.partition import Planner
from edgecc.partition_cut import chain_cut_points

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared"))
MODELS = ("mobilenet_v2", "resnet18", "squeezenet1_1")
CHAIN_MODELS = ("lenet5", "mlp_mnist")
BANDWIDTHS_MBIT = (0.1, 1, 10, 100, 1000)
TRANSFER_MBIT = 10
SLOWDOWNS = (1, 10, 100, 1000, 10000, 100000)
"""Device costs scaled up so that the chain check also meets optima inside the network (a fast board and a small
model put every optimum at an end)."""
BEGIN, END = "<!-- partition_eval:begin -->", "<!-- partition_eval:end -->"


def short(name: str, width: int = 46) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def relative_error(actual, expected) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


def feeds_for(planner: Planner) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {v.name: rng.standard_normal(v.type.shape).astype(v.type.dtype.numpy) for v in planner.module.graph.inputs}


def evaluate_model(name: str, args, log) -> tuple[list[str], list[str], list[str]]:
    """(table rows, transfer-dtype rows, failed checks) for one model."""
    path = os.path.join(SHARED, "models", f"{name}.onnx")
    start = time.perf_counter()
    planner = Planner(path, args.device, args.server)
    log(f"{name}: costs in {time.perf_counter() - start:.1f} s (device {sum(planner.device_ms.values()):.2f} ms, "
        f"server {sum(planner.server_ms.values()):.2f} ms)")
    feeds = feeds_for(planner)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
    rows, failures, errors = [], [], {}
    for mbit in BANDWIDTHS_MBIT:
        problem = planner.problem(mbit * 1e6, args.rtt)
        solution = planner.plan(mbit * 1e6, args.rtt)
        chosen, device, server = solution["chosen"], solution["all_device"], solution["all_server"]
        best_point = min(chain_cut_points(problem), key=lambda c: c.total_ms)
        key = (chosen.device_nodes, tuple(chosen.up))
        if key not in errors:
            split = planner.build(mbit * 1e6, args.rtt)
            got = split.run(feeds)
            errors[key] = max(relative_error(g, e) for g, e in zip(got, expected))
            log(f"  {mbit} Mbit/s: cut {chosen.up or '-'} built and run, max relative error {errors[key]:.2e}")
        error = errors[key]
        where = ("all-device" if len(chosen.device_nodes) == len(problem.nodes) else "all-server"
                 if not chosen.device_nodes else f"{len(chosen.device_nodes)}/{len(problem.nodes)} nodes on device")
        cut = ", ".join(f"`{short(t)}`" for t in chosen.up) or "—"
        rows.append(f"| {name} | {mbit:g} | {where} | {cut} | {chosen.bytes_up:,} | {chosen.device_ms:.1f} / "
                    f"{chosen.link_ms:.1f} / {chosen.server_ms:.1f} | **{chosen.total_ms:.1f}** | {device.total_ms:.1f} | "
                    f"{server.total_ms:.1f} | {best_point.total_ms:.1f} | {error:.1e} |")
        if not chosen.total_ms <= min(device.total_ms, server.total_ms) + 1e-9:
            failures.append(f"{name} {mbit} Mbit/s: chosen {chosen.total_ms} above an end")
        if error > 1e-5:
            failures.append(f"{name} {mbit} Mbit/s: max relative error {error:.2e} > 1e-5")
        if name in CHAIN_MODELS and abs(chosen.total_ms - best_point.total_ms) > 1e-4:
            failures.append(f"{name} {mbit} Mbit/s: chain min cut {chosen.total_ms} != best cut point "
                            f"{best_point.total_ms}")
    extra = [] if name in CHAIN_MODELS else transfer_rows(name, planner, feeds, expected, args)
    return rows, extra, failures


def transfer_rows(name: str, planner: Planner, feeds, expected, args) -> list[str]:
    """The cut and its error at TRANSFER_MBIT for each transfer dtype (float16/int8 send fewer bytes, so the cut
    can move; the error is the output's, against onnxruntime)."""
    rows = []
    for dtype in ("float32", "float16", "int8"):
        chosen = planner.plan(TRANSFER_MBIT * 1e6, args.rtt, dtype)["chosen"]
        split = planner.build(TRANSFER_MBIT * 1e6, args.rtt, dtype)
        got = split.run(feeds)
        error = max(relative_error(g, e) for g, e in zip(got, expected))
        cut = ", ".join(f"`{short(t)}`" for t in chosen.up) or "—"
        rows.append(f"| {name} | {dtype} | {cut} | {chosen.bytes_up:,} | {chosen.link_ms:.1f} | "
                     f"**{chosen.total_ms:.1f}** | {error:.1e} |")
    return rows


def chain_sweep(name: str, args) -> tuple[str, list[str]]:
    """A chain model over many links and device speeds (its measured device costs x SLOWDOWNS): the minimum
    cut must equal the best cut point every time. Says how many of the optima were interior cuts."""
    planner = Planner(os.path.join(SHARED, "models", f"{name}.onnx"), args.device, args.server)
    measured = dict(planner.device_ms)
    cases = interior = 0
    failures = []
    for slowdown in SLOWDOWNS:
        planner.device_ms = {k: v * slowdown for k, v in measured.items()}
        for mbit in (0.01, 0.1, 1, 10, 100, 1000, 10000):
            for rtt in (0.0, args.rtt):
                problem = planner.problem(mbit * 1e6, rtt)
                chosen = planner.plan(mbit * 1e6, rtt)["chosen"]
                best = min(chain_cut_points(problem), key=lambda c: c.total_ms)
                cases += 1
                interior += 0 < len(chosen.device_nodes) < len(problem.nodes)
                if abs(chosen.total_ms - best.total_ms) > 1e-4:
                    failures.append(f"{name} x{slowdown} {mbit} Mbit/s rtt {rtt}: min cut {chosen.total_ms} != best "
                                    f"cut point {best.total_ms}")
    planner.device_ms = measured
    return (f"Chain check ({name}, {len(planner.module.graph.nodes)} nodes in a line): {cases} cases (device costs x"
            f"{', x'.join(str(k) for k in SLOWDOWNS)}; 0.01 to 10000 Mbit/s; rtt 0 and {args.rtt:g} ms), {interior} with the optimum inside the "
            f"network: the minimum cut equals the best cut point in {cases - len(failures)} of {cases}."), failures


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="rpi-zero2")
    parser.add_argument("--server", default="host")
    parser.add_argument("--rtt", default=20.0, type=float, help="round-trip time in ms (default 20)")
    parser.add_argument("--models", default=",".join(CHAIN_MODELS + MODELS))
    parser.add_argument("--write", metavar="FILE.md", help="replace the partition_eval section of this file")
    args = parser.parse_args()
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    lines = [BEGIN, "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()} (a shared, busy machine: "
             "host timings are noisy; re-take on a quiet one) with",
             f"`python tools/partition_eval.py --device {args.device} --server {args.server} --rtt {args.rtt:g}"
             + (f" --write {args.write}`" if args.write else "`") + ".",
             f"Device **{args.device}**, server **{args.server}**, round trip {args.rtt:g} ms, fp32 transfer. "
             "Times are estimates in ms (device / link / server); *best point* is the best single cut of the node order; "
             "*error* is the split's max relative error against onnxruntime on the whole model (random normal input).",
             "",
             "| model | Mbit/s | placement | tensors sent up | bytes up | device / link / server ms | chosen ms | "
             "all-device ms | all-server ms | best point ms | error |",
             "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|"]
    failures, notes, transfers = [], [], []
    for name in args.models.split(","):
        if name in CHAIN_MODELS:
            note, failed = chain_sweep(name, args)
            notes.append(note)
            failures += failed
        rows, extra, failed = evaluate_model(name, args, log)
        lines += rows
        transfers += extra
        failures += failed
    lines += ["", f"Transfer dtypes at {TRANSFER_MBIT} Mbit/s (rtt {args.rtt:g} ms): the cut tensors' bytes shrink, so "
              "the cut can move; the error is the output's against onnxruntime.", "",
              "| model | transfer | tensors sent up | bytes up | link ms | chosen ms | error |",
              "|---|---|---|---:|---:|---:|---:|"] + transfers
    lines += [""] + notes + ["", "Checks: " + ("all passed (chosen <= all-device and <= all-server; error <= 1e-5; chain min cut = "
                                "best cut point)." if not failures else "FAILED: " + "; ".join(failures)), "", END]
    section = "\n".join(lines)
    print(section)
    if args.write:
        from edgecc.fileio import write_atomic

        text = open(args.write).read() if os.path.exists(args.write) else f"{BEGIN}\n{END}\n"
        if BEGIN not in text or END not in text:
            text += f"\n{BEGIN}\n{END}\n"
        head, rest = text.split(BEGIN, 1)
        new = head + section + rest.split(END, 1)[1]

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(new)

        write_atomic(args.write, write)
        log(f"wrote {args.write}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
