"""Run the ONNX backend conformance cases in edgecc's scope and report the pass rate per suite.

    python tools/conformance.py [--write docs/conformance.md] [-k SUBSTRING]

Same cases and checks as tests/test_conformance.py (onnx's own runner through edgecc.backend).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import unittest
import warnings

import onnx
import onnx.backend.test

import edgecc.backend
from edgecc.conformance import selected_cases

KIND_OF_CATEGORY = {"OnnxBackendNodeModelTest": "node", "OnnxBackendRealModelTest": "real (light model zoo)",
                    "OnnxBackendSimpleModelTest": "simple", "OnnxBackendPyTorchConvertedModelTest": "pytorch-converted",
                    "OnnxBackendPyTorchOperatorModelTest": "pytorch-operator"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="FILE.md", help="write the report as Markdown")
    parser.add_argument("-k", dest="substring", help="only cases whose name contains this")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    in_scope = {f"{n}_cpu" for names in selected_cases().values() for n in names}
    runner = onnx.backend.test.BackendTest(edgecc.backend, __name__)
    results = collections.defaultdict(lambda: [0, 0])
    failures = []
    start = time.perf_counter()
    for category, case in sorted(runner.test_cases.items()):
        for name in sorted(a for a in vars(case) if a.startswith("test_")):
            if name not in in_scope or (args.substring and args.substring not in name):
                continue
            result = unittest.TestResult()
            case(name).run(result)
            kind = KIND_OF_CATEGORY.get(category, category)
            results[kind][0] += 1
            problems = result.failures + result.errors
            if problems:
                message = problems[0][1].strip().splitlines()[-1]
                failures.append((kind, name[: -len("_cpu")], message[:160]))
            else:
                results[kind][1] += 1
    total = sum(r[0] for r in results.values())
    passed = sum(r[1] for r in results.values())
    lines = [
        "# ONNX backend conformance", "",
        f"onnx {onnx.__version__} backend test cases in edgecc's scope (every op in the edge op set, every tensor in "
        "edgecc's dtypes), run by onnx's own backend test runner through `edgecc.backend`, outputs compared at each "
        "case's tolerance. Command: `python tools/conformance.py --write docs/conformance.md` "
        f"({time.perf_counter() - start:.0f} s on the development machine: 2-core AMD EPYC Zen 4).", "",
        "| suite | cases | passed | rate |", "|---|---:|---:|---:|",
    ]
    for kind, (count, ok) in sorted(results.items()):
        lines.append(f"| {kind} | {count} | {ok} | {100 * ok / max(count, 1):.1f}% |")
    lines.append(f"| **all** | **{total}** | **{passed}** | **{100 * passed / max(total, 1):.2f}%** |")
    lines += ["", "## Failing cases", ""]
    lines += [f"- `{name}` ({kind}): {msg}" for kind, name, msg in failures] or ["None."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
