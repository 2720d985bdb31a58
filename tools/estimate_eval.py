"""How good are edgecc's device estimates? The acceptance figures of docs/estimates.md.

    python tools/estimate_eval.py [--models a,b] [--boards rpi-zero2,a76-phone,stm32f4,...] [--rounds 5]
                                  [--write docs/estimates.md]

Host: each model of ../shared/models is compiled -O3 for the host; the estimate (the sum of the per-node median
times of the profiling entry, edgecc.estimate with refresh) is compared with the measured latency (the median of
many CompiledModel.run calls on the model's reference inputs; edgecc's code is single-threaded). Both are taken in
alternating rounds so that a busy machine's load meets both; the estimate of each round is the median per node of
its profile runs, and the figures below are medians over rounds. The check is that per-kernel timing predicts the
whole run (what it leaves out: the entry's calls, the Python call, caches warmed by the previous kernel).

ARM boards: each model compiled for the board's target and estimated (per-node guest instructions under qemu-user
x the board's cycles per instruction / clock): instruction counts, latency, energy, flash and RAM against the board.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("EDGECC_SHARED", ROOT.parent / "shared"))
MODELS = ["mlp_mnist", "lenet5", "bert_tiny_enc", "shufflenet_v2_x1_0", "squeezenet1_1", "mobilenet_v2", "resnet18"]
BOARDS = ["rpi-zero2", "a76-phone", "stm32f4", "nrf52840", "m55-board"]
TOLERANCE = 0.30


def reference_feeds(compiled, name: str) -> dict[str, np.ndarray]:
    ref = np.load(SHARED / "models" / f"{name}.ref.npz")
    return {v.name: np.ascontiguousarray(ref[v.name], dtype=v.type.dtype.numpy).reshape(v.type.shape)
            for v in compiled.module.graph.inputs}


def timed_runs(compiled, feeds, seconds: float, least: int) -> tuple[list[float], list[float]]:
    """(wall, thread CPU) milliseconds of back-to-back CompiledModel.run calls for about `seconds` (at least
    `least` calls). The CPU time leaves out the time the thread waited while preempted."""
    wall, cpu, start = [], [], time.perf_counter()
    while len(wall) < least or time.perf_counter() - start < seconds:
        t0, c0 = time.perf_counter(), time.thread_time()
        compiled.run(feeds)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    return wall, cpu


def host_row(name: str, rounds: int) -> dict:
    import edgecc
    from edgecc.estimate import estimate, unpreempted

    compiled = edgecc.compile(str(SHARED / "models" / f"{name}.onnx"), opt_level=3)
    feeds = reference_feeds(compiled, name)
    for _ in range(3):
        compiled.run(feeds)  # warm up: pages, caches
    estimates, walls, spared, cpus = [], [], [], []
    for _ in range(rounds):
        estimates.append(estimate(compiled, "host", feeds=feeds, refresh=True).latency_ms)
        wall, thread = timed_runs(compiled, feeds, 1.0, 15)
        walls += wall
        cpus += thread
        spared += [w for w, c in zip(wall, thread) if unpreempted(w, c)]
    est, run = statistics.median(estimates), statistics.median(walls)
    quiet = statistics.median(spared) if spared else float("nan")
    return {"model": name, "macs": compiled.report["macs"], "nodes": len(compiled.module.graph.nodes),
            "estimate_ms": est, "measured_ms": run, "fastest_ms": min(walls), "quiet_ms": quiet,
            "quiet_share": len(spared) / len(walls), "ratio": est / run, "ok": abs(est / run - 1) <= TOLERANCE,
            "quiet_ok": abs(est / quiet - 1) <= TOLERANCE, "cpu_ms": statistics.median(cpus),
            "cpu_ok": abs(est / statistics.median(cpus) - 1) <= TOLERANCE}


def board_row(name: str, board: str) -> dict:
    import edgecc
    from edgecc.devices import load_device
    from edgecc.estimate import estimate

    device = load_device(board)
    compiled = edgecc.compile(str(SHARED / "models" / f"{name}.onnx"), opt_level=3, target=device.target)
    est = estimate(compiled, device, feeds=reference_feeds(compiled, name))
    return {"model": name, "board": board, "macs": compiled.report["macs"], "instructions": est.instructions,
            "latency_ms": est.latency_ms, "energy_mj": est.energy_mj, "flash": est.flash_bytes, "ram": est.ram_bytes,
            "fits": est.fits, "cpi": device.cycles_per_instruction, "clock": device.clock_hz}


def host_table(rows: list[dict]) -> list[str]:
    def mark(ok):
        return "yes" if ok else "**no**"

    lines = ["| model | MACs | nodes | estimate (ms) | run, median (ms) | estimate / run | within 30% "
             "| unpreempted runs | their median (ms) | estimate / it | within 30% | thread CPU time, median (ms) "
             "| estimate / it | within 30% | fastest run (ms) |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['macs']:,} | {r['nodes']} | {r['estimate_ms']:.3f} | {r['measured_ms']:.3f} "
                     f"| {r['ratio']:.2f} | {mark(r['ok'])} | {r['quiet_share']:.0%} | {r['quiet_ms']:.3f} "
                     f"| {r['estimate_ms'] / r['quiet_ms']:.2f} | {mark(r['quiet_ok'])} | {r['cpu_ms']:.3f} "
                     f"| {r['estimate_ms'] / r['cpu_ms']:.2f} | {mark(r['cpu_ok'])} | {r['fastest_ms']:.3f} |")
    return lines


def board_table(rows: list[dict]) -> list[str]:
    def fits(r, key):
        return {True: "yes", False: "**no**"}.get(r["fits"].get(key), "no limit")

    lines = ["| model | board | MACs | guest instructions | instr/MAC | CPI | latency (ms) | energy (mJ) | flash (B) "
             "| fits flash | RAM (B) | fits RAM |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['board']} | {r['macs']:,} | {r['instructions']:,} | "
                     f"{r['instructions'] / max(r['macs'], 1):.2f} | {r['cpi']} | {r['latency_ms']:.2f} | "
                     f"{r['energy_mj']:.3f} | {r['flash']:,} | {fits(r, 'flash')} | {r['ram']:,} | {fits(r, 'ram')} |")
    return lines


def provenance() -> str:
    """arm_insncount's date and commit, and the CPU (the host figures depend on it)."""
    from arm_insncount import provenance as measured_at

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{measured_at()[:-1]} on {cpu} ({os.cpu_count()} cores; the load is given with the host table)."


def document(host: list[dict], boards: list[dict], command: str) -> str:
    passed = sum(r["ok"] for r in host)
    lines = ["# Device estimates: how good they are", "", f"Command: `{command}`. {provenance()}", "",
             "How each figure is obtained is in docs/devices.md.", "",
             "## Host: estimate vs measured latency", "",
             "Estimate: `edgecc.estimate(model, \"host\")`, the sum over nodes of each node's median time through the "
             "profiling entry (cycle counter around every kernel). Measured: the median of back-to-back "
             "`CompiledModel.run` calls (at least 15, about a second) on the model's reference inputs. Taken in "
             "alternating rounds; each figure is the median over rounds. So the check is whether per-kernel timing "
             "predicts the whole run: the difference is the Python call and copying outputs, the entry's calls, and "
             "caches warmed or cooled by the previous kernel.", "",
             *host_table(host), "", f"{passed} of {len(host)} models within +-{TOLERANCE:.0%} of the median run, "
             f"{sum(r['quiet_ok'] for r in host)} of {len(host)} of the median unpreempted run, "
             f"{sum(r['cpu_ok'] for r in host)} of {len(host)} of the median thread CPU time. Load average when "
             f"the table was written: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. On a busy machine "
             "the OS takes the CPU away from most runs of more than a few milliseconds, and the median of all runs "
             "measures the load. A run counts as unpreempted when its thread's CPU time (`time.thread_time`) is at "
             "least 90% of its wall time (`edgecc.estimate.unpreempted`); the estimate takes its per-node medians "
             "over such runs too, or each node's fastest run when fewer than 5 of 25 were spared. The thread's CPU "
             "time leaves the waiting out of every run (it still includes caches cooled by the other jobs). On a "
             "quiet machine nearly every run is unpreempted and all columns agree. "
             "Re-take on a quiet machine.", "",
             "## ARM boards: instruction counts behind the estimates", "",
             "Per-node guest instructions under qemu (rpi-zero2: `qemu-aarch64 -cpu cortex-a53`, a76-phone: "
             "`qemu-aarch64 -cpu neoverse-n1` running armv8.2 code, stm32f4 and nrf52840: Cortex-M4 code on `qemu-arm "
             "-cpu cortex-a15`, m55-board: Helium firmware on `qemu-system-arm -M mps3-an547`), summed; latency = instructions x the board's cycles per instruction / its clock. The "
             "cycles-per-instruction factors are stated assumptions (docs/devices.md), not measurements of the "
             "boards; the instruction counts are exact for the code generated. Flash and RAM are checked against the "
             "board (stm32f4: 1 MB flash, 192 KB RAM).", "",
             *board_table(boards), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models of ../shared/models")
    parser.add_argument("--boards", default=",".join(BOARDS), help="comma-separated ARM boards ('' for none)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating estimate/measure rounds per model")
    parser.add_argument("--write", metavar="FILE.md", help="write the markdown report")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    host = []
    for name in models:
        host.append(host_row(name, args.rounds))
        r = host[-1]
        print(f"host {name}: estimate {r['estimate_ms']:.3f} ms, measured {r['measured_ms']:.3f} ms, "
              f"ratio {r['ratio']:.2f}", flush=True)
    boards = []
    for board in [b for b in args.boards.split(",") if b]:
        for name in models:
            boards.append(board_row(name, board))
            r = boards[-1]
            print(f"{board} {name}: {r['instructions']:,} instructions, {r['latency_ms']:.2f} ms", flush=True)
    print("\n".join(host_table(host) + [""] + board_table(boards)))
    if args.write:
        from edgecc.fileio import write_atomic

        command = "python tools/estimate_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)
        text = document(host, boards, command.strip())
        write_atomic(args.write, lambda tmp: pathlib.Path(tmp).write_text(text))
    return 0 if all(r["ok"] for r in host) else 1


if __name__ == "__main__":
    sys.exit(main())
