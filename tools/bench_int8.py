"""int8 latency: edgecc int8 against edgecc fp32 and onnxruntime's int8 QDQ model, single thread, one process.

    python tools/bench_int8.py [--models resnet18,mobilenet_v2] [--runs 30] [--write docs/performance-int8.md]

Models of ../shared/models are calibrated on 8 random inputs and timed on their .ref.npz input; the digits_* models
of ../shared/data (e.g. --models digits_cnn,digits_mobilenet) on their real calibration set and first test image.
Both quantised models (edgecc's and onnxruntime's quantize_static QDQ: minmax, per-channel int8 weights, uint8
activations) see the same calibration. The three engines run alternately (warm-up first); medians in ms.
--write replaces (or adds) this machine's section of the file, named by its CPU, and keeps the others.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from bench import SHARED, bench_arguments, cpu_name
from edgecc.precision import sqnr_db
from quant_eval import _session, ort_quantized


def model_inputs(name: str) -> tuple[str, dict, np.ndarray]:
    """(model path, feeds, calibration samples) of a shared model or a digits_* model of ../shared/data."""
    if name.startswith("digits_"):
        data = SHARED / "data"
        calib = np.load(data / f"{name}_calib.npz")["input"]
        return str(data / f"{name}.onnx"), {"input": np.load(data / f"{name}_test.npz")["input"][0]}, calib
    feeds = {"input": np.load(SHARED / "models" / f"{name}.ref.npz")["input"]}
    rng = np.random.default_rng(0)
    calib = np.stack([rng.standard_normal(feeds["input"].shape).astype(np.float32) for _ in range(8)])
    return str(SHARED / "models" / f"{name}.onnx"), feeds, calib


def bench_model(name: str, runs: int) -> dict:
    import edgecc

    path, feeds, calib = model_inputs(name)
    fp32 = edgecc.compile(path, opt_level=3, progress=False)
    int8 = edgecc.compile(path, opt_level=3, progress=False, quantize="int8", calibration={"input": calib})
    ort_int8 = _session(ort_quantized(path, "input", calib))
    engines = {"fp32": lambda: fp32.run(feeds), "int8": lambda: int8.run(feeds),
               "ort_int8": lambda: ort_int8.run(None, feeds)}
    times = {k: [] for k in engines}
    for _ in range(3):
        for run in engines.values():
            run()
    for _ in range(runs):
        for key, run in engines.items():
            t = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    reference = _session(path).run(None, feeds)[0]
    return {"model": name, **ms, "ratio_own": ms["int8"] / ms["fp32"], "ratio_ort": ms["int8"] / ms["ort_int8"],
            "sqnr": sqnr_db(reference, int8.run(feeds)[0]), "ops": int8.report["ops"]}


def host_int8_form() -> str:
    """What the host's int8 kernels multiply with (qconv.Dot4), for the section title."""
    from edgecc.backends.kernels.qconv import MADD, dot4_form
    from edgecc.backends.targets import resolve_target

    target = resolve_target("host")
    kind, lanes_, _ = dot4_form(target)
    if kind == "vnni":
        return f"VNNI, vpdpbusd {32 * lanes_}-bit"
    madd = MADD.get(target.vector_bits)
    if target.triple.startswith("x86_64") and madd and madd[1] in target.features.split(","):
        return f"no VNNI, pmaddwd {target.vector_bits}-bit"
    return kind


def write_section(path: str, title: str, section: str) -> None:
    """Replace the `title` section (up to the next "## ") of the Markdown file at path, or append it."""
    import pathlib
    import re

    file = pathlib.Path(path)
    text = file.read_text() if file.exists() else "# int8 performance\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    file.write_text(text)


def main() -> int:
    args = bench_arguments(__doc__)
    rows = ["| model | edgecc fp32 ms | edgecc int8 ms | onnxruntime int8 QDQ ms | int8 / own fp32 | int8 / ORT int8 "
            "| output SQNR dB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.models.split(","):
        r = bench_model(name, args.runs)
        rows.append(f"| {name} | {r['fp32']:.3f} | {r['int8']:.3f} | {r['ort_int8']:.3f} | {r['ratio_own']:.2f} | "
                    f"{r['ratio_ort']:.2f} | {r['sqnr']:.1f} |")
        print(rows[-1], flush=True)
    if args.write:
        title = f"## {cpu_name()} ({host_int8_form()})"
        section = (f"{title}\n\n`python tools/bench_int8.py --runs {args.runs} --models {args.models}`, one thread, "
                   "median of the runs, engines alternating in one process.\n\n" + "\n".join(rows) + "\n")
        write_section(args.write, title, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
