"""The `edgecc` command: compile a model, run it, or show the demo.

    edgecc MODEL.onnx [-O0..-O3] [--target T] [-o OUT] [--emit onnx|ir] [-p PIPELINE] [--report FILE.json]
    edgecc run MODEL.onnx --input NAME=FILE.npy [-o outputs.npz]
    edgecc compress-report MODEL.onnx --prune 0.8 [--calibration DATA] [--sweep prune=0.5,0.8,0.9]
    edgecc estimate MODEL.onnx --device stm32f4|board.toml [--json FILE.json]
    edgecc partition MODEL.onnx --device D --bandwidth 10Mbit/s [--rtt 20ms] -o build/split
    edgecc serve build/split/server --port P | edgecc run-split build/split --remote HOST:P --input FILE.npy
    edgecc demo
    edgecc ops | edgecc passes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import numpy as np

from edgecc.errors import EdgeccError

SUBCOMMANDS = ("run", "demo", "ops", "passes", "compress-report", "estimate", "partition", "serve", "run-split")
NOTE = ("note: this run used edgecc's NumPy reference interpreter (--runtime reference); "
        "--runtime native generates machine code")


def _add_compile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-O", dest="opt_level", type=int, choices=range(4), default=2, metavar="LEVEL",
                        help="optimisation level 0-3 (-O0 ... -O3; default -O2); `edgecc passes` lists each pipeline")
    parser.add_argument("--target", default=None,
                        help="where the code runs: host (default, or $EDGECC_TARGET), x86-64, x86-64-v3, x86-64-v4, "
                             "armv8 (aarch64), armv8.2, armv7, cortex-m4, cortex-m55, or an LLVM triple")
    parser.add_argument("--device", metavar="NAME|FILE",
                        help="the board: stm32f4, nrf52840, m55-board, rpi-zero2, a76-phone, host, or a .toml/.json "
                             "board file; sets --target and adds flash/RAM/latency/energy estimates to the report "
                             "(docs/devices.md)")
    parser.add_argument("--mcpu", help="CPU name when --target is a triple (or to override a preset's)")
    parser.add_argument("--mattr", help="CPU features, e.g. +neon,+dotprod")
    parser.add_argument("--runtime", choices=("native", "reference"), default="native",
                        help="native: machine code generated with llvmlite for --target (default); reference: "
                             "edgecc's NumPy interpreter (host only), the oracle native code is tested against")
    parser.add_argument("-p", "--passes", metavar="PIPELINE",
                        help="explicit pass pipeline instead of the -O level's, e.g. 'infer-shapes,fold-constants,dce'")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS",
                        help="bind an input's symbolic dims, e.g. --input-shape input=1x3x224x224 (repeatable)")
    parser.add_argument("--load-pass-plugin", action="append", default=[], metavar="FILE.py",
                        help="import a Python file that registers passes with @edgecc.passes.register_pass")
    parser.add_argument("--disable-pass", action="append", default=[], metavar="NAME", help="skip a pass by name")
    parser.add_argument("--time-passes", action="store_true", help="print the time each pass took (stderr)")
    parser.add_argument("--print-after-all", action="store_true", help="print the IR after every pass (stderr)")
    parser.add_argument("--print-after", action="append", default=[], metavar="NAME",
                        help="print the IR after the named pass (stderr; repeatable)")
    parser.add_argument("--verify-each", action="store_true", help="check IR invariants after every pass")
    parser.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pass to DIR/NN-pass.eir")
    parser.add_argument("--debug-rewrites", action="store_true", help="say why each rewrite rule did or did not apply")
    parser.add_argument("--progress", dest="progress", action="store_true", default=None,
                        help="show a progress bar once compiling takes over a second (default: when stderr is a "
                             "terminal)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="never show the progress bar")
    parser.add_argument("--quantize", choices=("int8", "fp16"),
                        help="lower precision: int8 (post-training quantisation, needs --calibration) or fp16 "
                             "(weights stored as float16). Quantised ONNX models (QDQ/QLinear) need no flag")
    parser.add_argument("--calibration", metavar="DATA",
                        help="calibration inputs for --quantize int8 and for re-fitting compressed layers: an .npz with "
                             "one array per input name, samples stacked on the first axis, or a folder of .npy/.npz "
                             "files")
    parser.add_argument("--calibration-method", choices=("minmax", "percentile", "entropy"), default="minmax",
                        help="how activation ranges are taken from the calibration data (default minmax)")
    parser.add_argument("--keep-fp32", metavar="NODE,...", help="node names that stay float32 under --quantize int8")
    parser.add_argument("--min-sqnr", type=float, metavar="DB",
                        help="with --quantize int8: keep the most sensitive layers in float32 until the output SQNR "
                             "on the calibration data reaches DB (per-layer SQNR is in --report)")
    _add_compression_options(parser)
    _add_budget_options(parser)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")


def _add_budget_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("device budgets (a search over per-layer settings; see docs/budgets.md)")
    group.add_argument("--max-flash", metavar="SIZE",
                       help="flash the model may take (weights + code), e.g. 64K or 1M: each layer's precision and "
                            "compression are chosen on --calibration data")
    group.add_argument("--max-latency", dest="max_latency_ms", type=float, metavar="MS",
                       help="latency the device's cost model must show")
    group.add_argument("--max-ram", metavar="SIZE", help="RAM (arena + stack) the model may take")
    group.add_argument("--validation", metavar="DATA.npz",
                       help="with a budget: inputs and `label`; the search measures accuracy on them and keeps it "
                            "within --max-accuracy-drop of float32's")
    group.add_argument("--max-accuracy-drop", type=float, metavar="POINTS",
                       help="with --validation: top-1 accuracy points the chosen model may lose (default 1.0)")
    group.add_argument("--plot", metavar="FILE.png", help="with a budget: draw the explored points and the front")
    group.add_argument("--optimize-for", choices=("speed", "size"), default=None,
                       help="kernel code: speed (default) or size (less flash; the default under --max-flash)")


def _add_compression_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compression (opt-in: these change numerics; see docs/compression.md)")
    group.add_argument("--prune", type=float, metavar="FRACTION",
                       help="unstructured magnitude pruning: zero this fraction of each Conv/Gemm/MatMul's weights "
                            "(e.g. 0.8); the -O2/-O3 pipelines then store them sparse where that is faster")
    group.add_argument("--prune-scope", choices=("layer", "global"), default="layer",
                       help="layer: each layer to the fraction (default); global: one magnitude threshold for all")
    group.add_argument("--prune-block", type=int, default=1, metavar="V",
                       help="prune whole 1xV blocks of outputs (V = the target's float lanes, e.g. 8 on AVX2, 4 on "
                            "NEON): what makes one-row FC layers faster sparse (default 1: single weights)")
    group.add_argument("--prune-channels", type=float, metavar="FRACTION",
                       help="structured pruning: remove this fraction of each layer's output channels (lowest L1 "
                            "norm) and shrink every consumer")
    group.add_argument("--low-rank", type=float, metavar="ENERGY",
                       help="factorise Gemm/MatMul and 1x1 Conv weights by truncated SVD keeping this fraction of "
                            "their energy (e.g. 0.95), where that saves bytes and MACs")
    group.add_argument("--tucker", action="store_true",
                       help="with --low-rank: also split KxK convolutions by Tucker-2 (1x1, smaller KxK core, 1x1)")
    group.add_argument("--cluster-weights", type=int, metavar="K",
                       help="weight sharing: a K-entry codebook per weight tensor (k-means), stored as packed indices")
    group.add_argument("--reconstruct", dest="reconstruct", action="store_true", default=None,
                       help="re-fit compressed layers by least squares on --calibration (default when both are given)")
    group.add_argument("--no-reconstruct", dest="reconstruct", action="store_false",
                       help="do not re-fit compressed layers even with --calibration")


def _compile_options(args) -> dict:
    import os as _os

    return dict(target=args.target or _os.environ.get("EDGECC_TARGET", "host"), mcpu=args.mcpu, mattr=args.mattr,
                runtime=args.runtime, opt_level=args.opt_level, passes=args.passes, input_shapes=args.input_shape,
                load_pass_plugin=args.load_pass_plugin, disable_passes=args.disable_pass,
                time_passes=args.time_passes, print_after_all=args.print_after_all,
                print_after=args.print_after or None, verify_each=args.verify_each, dump_ir=args.dump_ir,
                debug_rewrites=args.debug_rewrites, progress=args.progress, quantize=args.quantize,
                calibration=args.calibration, calibration_method=args.calibration_method, keep_fp32=args.keep_fp32,
                min_sqnr=args.min_sqnr, prune=args.prune, prune_scope=args.prune_scope, prune_block=args.prune_block,
                prune_channels=args.prune_channels, low_rank=args.low_rank, tucker=args.tucker,
                cluster_weights=args.cluster_weights,
                reconstruct=args.reconstruct, device=args.device, max_flash=args.max_flash,
                max_latency_ms=args.max_latency_ms, max_ram=args.max_ram, validation=args.validation,
                max_accuracy_drop=args.max_accuracy_drop, plot=args.plot,
                optimize_for=args.optimize_for)


def compile_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecc",
        description="edgecc: an ahead-of-time compiler for trained neural networks (ONNX in).\n\n"
                    "Other commands: `edgecc run MODEL --input NAME=FILE.npy`, `edgecc compress-report MODEL`, "
                    "`edgecc estimate MODEL --device D`, `edgecc partition MODEL --device D --bandwidth B`, "
                    "`edgecc serve`, `edgecc run-split`, `edgecc demo`, `edgecc ops`, `edgecc passes` "
                    "(each has --help).",
        epilog="Examples:\n  edgecc model.onnx -O3 --target armv8 -o build/model      (model.o, libmodel.a, libmodel.so, "
               "model.h)\n  edgecc model.onnx -O3 --emit onnx -o build/model.opt --report build/report.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the ONNX model file")
    parser.add_argument("-o", "--output", metavar="OUT",
                        help="output path stem: -o build/model writes build/model.o, build/libmodel.a, "
                             "build/libmodel.so, build/model.h (native), or build/model.onnx / .eir")
    parser.add_argument("--emit", choices=("all", "obj", "asm", "llvm", "c-header", "lib", "onnx", "ir"), default=None,
                        help="what to write: all native artifacts (default with --runtime native), obj, asm, llvm, "
                             "c-header, lib, the optimised model as onnx (default otherwise), or edgecc's textual ir")
    parser.add_argument("--report", metavar="FILE.json", help="write the compile report (MACs, bytes, passes) as JSON")
    _add_compile_options(parser)
    return parser


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgecc run", description="Compile a model and run it on inputs from .npy files "
                                     "(in-process for the host, under qemu-user for ARM Linux targets).")
    parser.add_argument("model", help="the ONNX model file")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                        help="an input array (repeatable); a .npz may hold all inputs by name: --input FILE.npz")
    parser.add_argument("-o", "--output", metavar="FILE.npz", help="save outputs to an .npz instead of printing")
    parser.add_argument("--profile", type=int, nargs="?", const=20, metavar="RUNS",
                        help="also time each node of the native host code (median of RUNS runs, default 20) and "
                             "print the nodes by time (stderr)")
    _add_compile_options(parser)
    return parser


def print_profile(rows: list[dict], limit: int = 25) -> None:
    """The slowest nodes first, then the time per op type."""
    total = sum(r["ms"] for r in rows) or 1.0
    print(f"edgecc: profile, {total:.3f} ms in {len(rows)} nodes (slowest first)", file=sys.stderr)
    for r in sorted(rows, key=lambda r: -r["ms"])[:limit]:
        print(f"  {r['ms']:9.4f} ms {100 * r['share']:5.1f}%  {r['node']}", file=sys.stderr)
    by_op: dict[str, float] = {}
    for r in rows:
        by_op[r["op"]] = by_op.get(r["op"], 0.0) + r["ms"]
    print("  per op: " + ", ".join(f"{op} {ms:.3f} ms" for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])),
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv and argv[0] in SUBCOMMANDS:
            from edgecc.compress_report import cmd_compress_report
            from edgecc.partition_cli import cmd_partition, cmd_run_split, cmd_serve

            return {"run": cmd_run, "demo": cmd_demo, "ops": cmd_ops, "passes": cmd_passes,
                    "compress-report": cmd_compress_report, "estimate": cmd_estimate, "partition": cmd_partition,
                    "serve": cmd_serve, "run-split": cmd_run_split}[argv[0]](argv[1:])
        return cmd_compile(argv)
    except EdgeccError as exc:
        if debug:
            traceback.print_exc()
        print(f"edgecc: error: {exc.one_line()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgecc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an edgecc bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"edgecc: internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)", file=sys.stderr)
        return 1


def _output_stem(args) -> str:
    if args.output:
        stem = args.output
        for suffix in (".onnx", ".eir", ".o", ".h"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        return stem
    return os.path.join("build", os.path.splitext(os.path.basename(args.model))[0])


def cmd_compile(argv: list[str]) -> int:
    args = compile_parser().parse_args(argv)
    import edgecc
    from edgecc.backends.emitter import symbol_name

    stem = _output_stem(args)
    emit = args.emit or ("all" if args.runtime == "native" else "onnx")
    compiled = edgecc.compile(args.model, name=symbol_name(os.path.basename(stem)), **_compile_options(args))
    files = compiled.artifacts(stem, emit)
    from edgecc.fileio import json_bytes, write_files

    if args.report:
        files[args.report] = json_bytes(compiled.report)
    paths = write_files(files)
    report = compiled.report
    arena = f", arena {report['arena_bytes']:,} B" if report.get("arena_bytes") is not None else ""
    print(f"edgecc: wrote {', '.join(p for p in paths if p != args.report)} ({report['nodes_before']} -> "
          f"{report['nodes_after']} nodes, {report['macs'] / 1e6:.1f} M MACs, "
          f"{report['weights_bytes'] / 1024:.1f} KiB weights{arena}, {report['compile_seconds']:.2f} s)")
    if args.runtime == "reference":
        print(f"edgecc: {NOTE}", file=sys.stderr)
    if "budget" in report:
        from edgecc.budgets import summary

        print(summary(report["budget"]))
    if "estimate" in report:
        print(f"edgecc: on {report['device']}: {_estimate_summary(report['estimate'])}")
    return 0


def _estimate_summary(est: dict) -> str:
    def of(value, limit):
        return f"{value:,} B" + ("" if limit is None else f" of {limit:,}")

    device = est["device"]
    return (f"flash {of(est['flash_bytes'], device['flash_bytes'])}, RAM {of(est['ram_bytes'], device['ram_bytes'])}, "
            f"{est['latency_ms']:.3f} ms, {est['energy_mj']:.4f} mJ (estimated; edgecc estimate shows each op)")


def _load_inputs(specs: list[str], input_names: list[str]) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq:
            name, path = "", spec
        if not os.path.isfile(path):
            raise EdgeccError("no such input file", where=path, hint="--input NAME=FILE.npy")
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise EdgeccError(f"cannot read as .npy/.npz: {exc}", where=path) from None
        if isinstance(data, np.lib.npyio.NpzFile):
            feeds.update({k: data[k] for k in data.files if not name or k == name})
        else:
            if not name:
                if len(input_names) != 1:
                    raise EdgeccError(f"{path}: which input is this? the model has {', '.join(input_names)}",
                                      hint="write --input NAME=FILE.npy")
                name = input_names[0]
            feeds[name] = data
    return feeds


def cmd_run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    import edgecc

    compiled = edgecc.compile(args.model, **_compile_options(args))
    feeds = _load_inputs(args.input, compiled.input_names)
    outputs = compiled.run(feeds)
    if args.profile:
        print_profile(compiled.profile(feeds, runs=args.profile))
    if args.runtime == "reference":
        print(f"edgecc: {NOTE}", file=sys.stderr)
    show_outputs(compiled.output_names, outputs, args.output)
    return 0


def show_outputs(names: list[str], outputs: list[np.ndarray], path: str | None) -> None:
    """Save outputs to an .npz at `path` (all or nothing), or print them."""
    if path:
        from edgecc.fileio import write_atomic

        def save(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **dict(zip(names, outputs)))

        write_atomic(path, save)
        print(f"edgecc: wrote {len(outputs)} output(s) to {path}")
    else:
        with np.printoptions(precision=5, threshold=20, edgeitems=3):
            for name, array in zip(names, outputs):
                print(f"{name}: {array.dtype} {list(array.shape)}\n{array}")


def cmd_estimate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgecc estimate",
                                     description="Compile a model for a device and print what it costs there, per op "
                                                 "and in total: MACs, bytes, cycles, latency, energy, flash and RAM "
                                                 "(docs/devices.md says how each figure is obtained).")
    parser.add_argument("model", help="the ONNX model file")
    parser.add_argument("--json", metavar="FILE.json", help="also write the estimate as JSON")
    _add_compile_options(parser)
    args = parser.parse_args(argv)
    if not args.device:
        parser.error("--device is required: a built-in board (stm32f4, nrf52840, m55-board, rpi-zero2, a76-phone, "
                     "host) or a board file")
    import edgecc

    compiled = edgecc.compile(args.model, **_compile_options(args))
    from edgecc.estimate import table

    print(table(compiled.report["estimate"]))
    if args.json:
        from edgecc.fileio import write_atomic

        def save(tmp):
            with open(tmp, "w") as f:
                json.dump(compiled.report["estimate"], f, indent=2)
                f.write("\n")

        write_atomic(args.json, save)
        print(f"edgecc: wrote {args.json}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgecc demo",
                                     description="Compile the small CNN shipped with edgecc at -O3 to native code for the "
                                                 "host, run it, and check the result against onnx's reference implementation.")
    parser.add_argument("--debug", action="store_true")
    parser.parse_args(argv)
    from edgecc.demo import run_demo

    return run_demo()


def cmd_ops(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="edgecc ops", description="List the ops edgecc supports.").parse_args(argv)
    from edgecc.ops import all_ops

    ops = all_ops()
    print(f"{len(ops)} ops (ai.onnx domain, opset 6 to {_max_opset()}):")
    print(" ".join(ops))
    return 0


def cmd_passes(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="edgecc passes", description="List passes and the -O pipelines.").parse_args(argv)
    from edgecc.passes import OPT_PIPELINES, all_passes

    for name, cls in all_passes().items():
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"  {name:18s} {summary}")
    print()
    for level, pipeline in OPT_PIPELINES.items():
        print(f"  -O{level}: {pipeline}")
    return 0


def _max_opset() -> int:
    import onnx.defs

    return onnx.defs.onnx_opset_version()


if __name__ == "__main__":
    sys.exit(main())
