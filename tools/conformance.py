"""Run the ONNX backend conformance cases in edgecc's scope and report pass rates per suite and configuration.

    python tools/conformance.py [--configs native:host,native:armv8,native:armv7,reference:host]
                                [--write docs/conformance.md] [-k SUBSTRING]

Same cases and checks as tests/test_conformance.py (onnx's own runner through edgecc.backend). A configuration is
RUNTIME:TARGET; EDGECC_RUNTIME / EDGECC_TARGET give the default single configuration.
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

from edgecc.backend import EdgeccBackend
from edgecc.conformance import selected_cases

KIND_OF_CATEGORY = {"OnnxBackendNodeModelTest": "node", "OnnxBackendRealModelTest": "real (light model zoo)",
                    "OnnxBackendSimpleModelTest": "simple", "OnnxBackendPyTorchConvertedModelTest": "pytorch-converted",
                    "OnnxBackendPyTorchOperatorModelTest": "pytorch-operator"}


def backend_for(runtime: str, target: str) -> type:
    class Configured(EdgeccBackend):
        @classmethod
        def prepare(cls, model, device: str = "CPU", **kwargs):
            return super().prepare(model, device, **{"runtime": runtime, "target": target, **kwargs})

    return Configured


def run_config(runtime: str, target: str, substring: str | None):
    in_scope = {f"{n}_cpu" for names in selected_cases().values() for n in names}
    runner = onnx.backend.test.BackendTest(backend_for(runtime, target), __name__)
    results = collections.defaultdict(lambda: [0, 0])
    failures = []
    start = time.perf_counter()
    for category, case in sorted(runner.test_cases.items()):
        for name in sorted(a for a in vars(case) if a.startswith("test_")):
            if name not in in_scope or (substring and substring not in name):
                continue
            result = unittest.TestResult()
            case(name).run(result)
            kind = KIND_OF_CATEGORY.get(category, category)
            results[kind][0] += 1
            problems = result.failures + result.errors
            if problems:
                failures.append((kind, name[: -len("_cpu")], problems[0][1].strip().splitlines()[-1][:160]))
            else:
                results[kind][1] += 1
    return results, failures, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = f"{os.environ.get('EDGECC_RUNTIME', 'native')}:{os.environ.get('EDGECC_TARGET', 'host')}"
    parser.add_argument("--configs", default=default, help=f"comma-separated RUNTIME:TARGET (default {default})")
    parser.add_argument("--write", metavar="FILE.md", help="write the report as Markdown")
    parser.add_argument("-k", dest="substring", help="only cases whose name contains this")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    configs = [tuple(c.split(":", 1)) for c in args.configs.split(",")]
    runs = {}
    for runtime, target in configs:
        runs[(runtime, target)] = run_config(runtime, target, args.substring)
        results, failures, seconds = runs[(runtime, target)]
        total, passed = sum(r[0] for r in results.values()), sum(r[1] for r in results.values())
        print(f"{runtime}:{target}: {passed}/{total} passed ({100 * passed / max(total, 1):.2f}%) in {seconds:.0f} s",
              flush=True)
    kinds = sorted({k for results, _, _ in runs.values() for k in results})
    header = "| suite | cases | " + " | ".join(f"{r} {t}" for r, t in configs) + " |"
    lines = [
        "# ONNX backend conformance", "",
        f"onnx {onnx.__version__} backend test cases in edgecc's scope (every op in the edge op set, every tensor in "
        "edgecc's dtypes), run by onnx's own backend test runner through `edgecc.backend`, outputs compared at each "
        "case's tolerance. Native code for the host runs in-process, for armv8/armv7 under qemu-user "
        "(`-cpu cortex-a53` / `-cpu cortex-a15`).", "",
        f"Command: `python tools/conformance.py --configs {args.configs} --write docs/conformance.md` "
        "(development machine: 2-core AMD EPYC Zen 4; seconds per configuration below).", "",
        header, "|---|---:|" + "---:|" * len(configs),
    ]
    for kind in kinds:
        count = max(runs[c][0][kind][0] for c in configs)
        cells = [f"{runs[c][0][kind][1]} ({100 * runs[c][0][kind][1] / max(count, 1):.1f}%)" for c in configs]
        lines.append(f"| {kind} | {count} | " + " | ".join(cells) + " |")
    totals = []
    for c in configs:
        results = runs[c][0]
        total, passed = sum(r[0] for r in results.values()), sum(r[1] for r in results.values())
        totals.append(f"**{passed} ({100 * passed / max(total, 1):.2f}%)**")
    count = max(sum(r[0] for r in runs[c][0].values()) for c in configs)
    lines.append(f"| **all** | **{count}** | " + " | ".join(totals) + " |")
    lines.append("| seconds | | " + " | ".join(f"{runs[c][2]:.0f}" for c in configs) + " |")
    lines += ["", "## Failing cases", ""]
    for c in configs:
        lines.append(f"{c[0]} {c[1]}:")
        lines += [f"- `{name}` ({kind}): {msg}" for kind, name, msg in runs[c][1]] or ["- none"]
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    return 0 if all(not runs[c][1] for c in configs) else 1


if __name__ == "__main__":
    sys.exit(main())
