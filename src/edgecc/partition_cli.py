"""The `edgecc partition`, `edgecc serve` and `edgecc run-split` commands (docs/partitioning.md)."""

from __future__ import annotations

import argparse


def partition_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecc partition",
        description="Split a model between a device and a server at the minimum-latency cut for a link "
                    "(a minimum s-t cut of the model's graph weighted by each side's costs and the link).",
        epilog="Example: edgecc partition model.onnx --device rpi-zero2 --server x86-64 --bandwidth 10Mbit/s "
               "--rtt 20ms -o build/split")
    parser.add_argument("model", help="the ONNX model file")
    parser.add_argument("--device", required=True, help="the device: a built-in profile (edgecc estimate lists "
                        "them; e.g. rpi-zero2, host) or a board .toml/.json file")
    parser.add_argument("--server", default="x86-64", help="the server: host or an x86 target preset (default "
                        "x86-64), costed as this machine; or a device profile")
    parser.add_argument("--bandwidth", required=True, help="the uplink, e.g. 10Mbit/s, 500kbit/s, 1Gbps, 2MB/s")
    parser.add_argument("--rtt", default="0ms", help="round-trip time, paid once if anything crosses (e.g. 20ms)")
    parser.add_argument("--transfer-dtype", choices=("float32", "float16", "int8"), default="float32",
                        help="how float32 cut tensors cross the link (float16/int8 trade accuracy for bytes)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="writes DIR/device/, DIR/server/ (artifacts, server.onnx) and DIR/split.json")
    parser.add_argument("-O", dest="opt_level", type=int, choices=range(4), default=2, metavar="LEVEL",
                        help="optimisation level of both halves (default -O2)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS",
                        help="bind an input's symbolic dims (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    return parser


def cmd_partition(argv: list[str]) -> int:
    args = partition_parser().parse_args(argv)
    from edgecc.partition import parse_bandwidth, parse_duration_ms, partition

    bandwidth, rtt = parse_bandwidth(args.bandwidth), parse_duration_ms(args.rtt)  # fail before compiling
    split = partition(args.model, device=args.device, server=args.server, bandwidth=bandwidth, rtt_ms=rtt,
                      transfer_dtype=args.transfer_dtype, input_shapes=args.input_shape or None,
                      opt_level=args.opt_level, progress=False)
    split.save(args.output)
    report = split.report
    latency = report["latency_ms"]
    crossing = ", ".join(f"{c['tensor']} ({c['bytes']:,} B {c['direction']})" for c in report["cut"]) or "nothing"
    print(f"edgecc: wrote {args.output}/split.json: {report['chosen_is'].replace('_', '-')}, {report['device_nodes']} "
          f"nodes on {report['device']}, {report['server_nodes']} on {report['server']}; crossing: {crossing}; "
          f"estimated {latency['chosen']:.2f} ms (all-device {latency['all_device']:.2f} ms, all-server "
          f"{latency['all_server']:.2f} ms)")
    return 0


def cmd_serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgecc serve", description="Serve the server half of a split written by "
                                     "`edgecc partition` over TCP (a loopback demo: no authentication or encryption).")
    parser.add_argument("folder", help="the server/ folder of the split")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: any free port, printed at start)")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many requests (default: never)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    from edgecc.serve import serve

    serve(args.folder, args.host, args.port, args.requests)
    return 0


def cmd_run_split(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgecc run-split", description="Run the device half of a split written "
                                     "by `edgecc partition` and send its cut tensors to `edgecc serve` at --remote.")
    parser.add_argument("folder", help="the split folder (with split.json and device/)")
    parser.add_argument("--remote", required=True, metavar="HOST:PORT", help="where `edgecc serve` listens")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                        help="an input array (repeatable), or an .npz holding all inputs by name")
    parser.add_argument("-o", "--output", metavar="FILE.npz", help="save outputs to an .npz")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    from edgecc.cli import _load_inputs, show_outputs
    from edgecc.partition import Partition
    from edgecc.serve import parse_address

    parse_address(args.remote)  # a bad address fails before compiling
    split = Partition.load(args.folder)
    show_outputs(split.outputs, split.run(_load_inputs(args.input, split.inputs), remote=args.remote), args.output)
    return 0
