"""`edgecc-opt`: run a pass pipeline on textual IR and print the result (for pass tests and pass authors).

    edgecc-opt in.eir -p 'fold-constants,dce'      (reads stdin when the file is '-')
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import numpy as np

from edgecc.errors import EdgeccError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgecc-opt", description="Run edgecc passes on textual IR (.eir) and print it.",
                                epilog="Example: edgecc-opt model.eir -p 'infer-shapes,fold-constants,dce'")
    p.add_argument("input", help="an .eir file ('-' for stdin); constants in INPUT.npz are loaded when present")
    p.add_argument("-p", "--passes", default="", metavar="PIPELINE", help="comma-separated pass pipeline")
    p.add_argument("-O", dest="opt_level", type=int, choices=range(4), metavar="LEVEL", help="run the -O pipeline")
    p.add_argument("-o", "--output", metavar="FILE", help="write the IR here instead of stdout")
    p.add_argument("--load-pass-plugin", action="append", default=[], metavar="FILE.py")
    p.add_argument("--time-passes", action="store_true")
    p.add_argument("--print-after-all", action="store_true")
    p.add_argument("--print-after", action="append", default=[], metavar="NAME")
    p.add_argument("--verify-each", action="store_true")
    p.add_argument("--debug-rewrites", action="store_true")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _run(args)
    except EdgeccError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"edgecc-opt: error: {exc.one_line()}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from edgecc.api import optimize
    from edgecc.ir.parser import parse_module
    from edgecc.ir.printer import print_module
    from edgecc.ir.verifier import verify

    if args.input == "-":
        text, source, side = sys.stdin.read(), "<stdin>", None
    else:
        if not os.path.isfile(args.input):
            raise EdgeccError("no such file", where=args.input)
        with open(args.input) as f:
            text = f.read()
        source = args.input
        side = dict(np.load(args.input + ".npz")) if os.path.isfile(args.input + ".npz") else None
    module = parse_module(text, source, side)
    verify(module, where=source)
    pipeline = args.passes or (f"-O{args.opt_level}" if args.opt_level is not None else "")
    if pipeline:
        optimize(module, passes=pipeline, load_pass_plugin=args.load_pass_plugin, time_passes=args.time_passes,
                 print_after_all=args.print_after_all, print_after=args.print_after or None,
                 verify_each=args.verify_each, debug_rewrites=args.debug_rewrites)
    result = print_module(module)
    if args.output:
        from edgecc.fileio import write_atomic

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(result)

        write_atomic(args.output, write)
    else:
        sys.stdout.write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
