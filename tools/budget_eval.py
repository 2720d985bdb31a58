"""Flash budgets on the trained digits models (issue 7's acceptance).

    python tools/budget_eval.py [--write docs/budgets.md] [--models digits_mlp,...] [--fraction 0.15]
                                [--device stm32f4] [--latency 0.6] [--validation 250 [--max-accuracy-drop 1.0]]

For each model of ../shared/data: the fp32 weight bytes (the prepared model's, BatchNorm folded, as the report
counts them), a flash budget of `fraction` of them, `edgecc.compile(..., device=, max_flash=, calibration=)`; the
flash of the result (code + weights from the object), the chosen setting per layer, the Pareto front explored, and
the test accuracy (500 images) against onnxruntime's fp32 accuracy. The compiled model's accuracy is that of its
final IR run by edgecc's interpreter (the kernels' references: Cortex-M4 code does not run on this machine). Then an
impossible budget (1 KiB) and its error. With --latency FRACTION: a latency budget of that fraction of each model's
float32 estimate instead (the section "Latency budgets" of docs/budgets-results.md). With --validation N: the flash
budgets again, the search given the first N test images (with labels) as `validation` and `max_accuracy_drop`; the
accuracy reported next to it is on the other 500 - N test images, which the search never saw (the section "Accuracy
floor" of docs/budgets-results.md).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("EDGECC_SHARED", ROOT.parent / "shared"))
MODELS = ["digits_mlp", "digits_cnn", "digits_mobilenet"]


def _commit() -> str:
    """The checkout's short commit, for the "Measured with ... at commit" lines."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout


def test_accuracy(model_path: str, module, test) -> tuple[float, float]:
    """(fp32 accuracy by onnxruntime, the compiled module's accuracy by the interpreter), in %."""
    import onnxruntime as ort

    from edgecc.budgets import accuracy

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    feeds = [{"input": x} for x in test["input"]]
    fp32 = 100.0 * float(np.mean([np.argmax(session.run(None, f)[0]) for f in feeds] == test["label"]))
    return round(fp32, 2), accuracy(module, feeds, test["label"])


def evaluate(name: str, fraction: float, device: str, validation: int | None = None,
             max_accuracy_drop: float | None = None) -> tuple[dict, str]:
    """A flash budget of `fraction` of the fp32 weights; with `validation`, the first that many test images are the
    search's labelled validation set and the accuracy is taken on the rest."""
    import edgecc
    from edgecc.budgets import front_table

    data = SHARED / "data"
    model = str(data / f"{name}.onnx")
    fp32_weights = edgecc.compile(model, device=device).report["weights_bytes"]
    budget = int(fraction * fp32_weights)
    test = dict(np.load(data / f"{name}_test.npz"))
    options = {}
    if validation is not None:
        options = {"validation": {k: v[:validation] for k, v in test.items()}, "max_accuracy_drop": max_accuracy_drop}
        test = {k: v[validation:] for k, v in test.items()}
    start = time.perf_counter()
    row = {"model": name, "fp32_weights": fp32_weights, "budget": budget}
    try:
        compiled = edgecc.compile(model, device=device, max_flash=budget, calibration=str(data / f"{name}_calib.npz"),
                                  **options)
    except edgecc.errors.BudgetError as error:
        row.update(seconds=round(time.perf_counter() - start), error=str(error))
        return row, f"### {name}\n\n`{error}`\n"
    report = compiled.report["budget"]
    fp32_acc, acc = test_accuracy(model, compiled.module, test)
    row.update(seconds=round(time.perf_counter() - start), flash=report["flash_bytes"], sqnr=report["output_sqnr_db"],
               latency=compiled.report.get("latency_ms"), fp32_accuracy=fp32_acc, accuracy=acc,
               validation_fp32=report.get("fp32_accuracy"), validation_accuracy=report["accuracy"],
               floor=report.get("accuracy_floor"), rejected=len(report.get("rejected") or ()),
               settings=report["settings"])
    settings = "\n".join(f"| {layer} | {setting} |" for layer, setting in report["settings"].items())
    text = (f"### {name}\n\nChosen settings:\n\n| layer | setting |\n|---|---|\n{settings}\n\n"
            f"Pareto front of the points explored (flash, output SQNR on calibration samples, latency on {device}):"
            f"\n\n{front_table(report)}\n")
    return row, text


def evaluate_latency(name: str, fraction: float, device: str) -> dict:
    """A latency budget of `fraction` of the float32 estimate on `device` (max_latency_ms alone): the latency the
    search reached (device estimate of the compiled choice), the settings, output SQNR and test accuracy."""
    import edgecc

    data = SHARED / "data"
    model = str(data / f"{name}.onnx")
    fp32 = edgecc.compile(model, device=device).report["latency_ms"]
    row = {"model": name, "fp32_latency": fp32, "budget": fraction * fp32}
    start = time.perf_counter()
    try:
        compiled = edgecc.compile(model, device=device, max_latency_ms=fraction * fp32,
                                  calibration=str(data / f"{name}_calib.npz"))
    except edgecc.errors.BudgetError as error:
        row.update(seconds=round(time.perf_counter() - start), error=str(error))
        return row
    report = compiled.report["budget"]
    fp32_acc, acc = test_accuracy(model, compiled.module, np.load(data / f"{name}_test.npz"))
    row.update(seconds=round(time.perf_counter() - start), latency=report["latency_ms"], sqnr=report["output_sqnr_db"],
               fp32_accuracy=fp32_acc, accuracy=acc, settings=report["settings"])
    return row


def latency_section(rows: list[dict], fraction: float, device: str) -> str:
    """The "## Latency budgets" section of docs/budgets-results.md."""
    commit = _commit()
    lines = [LATENCY_HEADING, "",
             f"Measured with `python tools/budget_eval.py --latency {fraction} --models "
             f"{','.join(r['model'] for r in rows)} --write docs/budgets-results.md` at commit {commit.strip()} on "
             f"{platform.machine()} ({os.cpu_count()} cores, shared). Budget: max_latency_ms = {fraction:.0%} of the "
             f"float32 estimate on `{device}` (qemu instruction counts x CPI), no flash budget; each setting's latency "
             "per layer from one compile with every layer at it.", "",
             "| model | fp32 ms | budget ms | reached ms | output SQNR dB | fp32 acc % | acc % | settings | search s |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        head = f"| {r['model']} | {r['fp32_latency']:.3f} | {r['budget']:.3f} | "
        if "error" in r:
            lines.append(head + f"BudgetError |  |  |  | `{r['error']}` | {r['seconds']} |")
            continue
        settings = ", ".join(f"{layer}: {s}" for layer, s in r["settings"].items())
        lines.append(head + f"{r['latency']:.3f} | {r['sqnr']} | {r['fp32_accuracy']} | {r['accuracy']} | {settings} | "
                     f"{r['seconds']} |")
    return "\n".join(lines) + "\n"


LATENCY_HEADING = "## Latency budgets"
VALIDATION_HEADING = "## Accuracy floor (--validation)"
SECTIONS = (VALIDATION_HEADING, LATENCY_HEADING)
"""The sections other runs of this tool write into docs/budgets-results.md after the main table, in this order."""


def split_sections(text: str) -> tuple[str, dict[str, str]]:
    """(the main part, {heading: section}) of a results file, so that each mode replaces only its own part."""
    starts = sorted((text.find("\n" + h + "\n") + 1, h) for h in SECTIONS if "\n" + h + "\n" in text)
    parts = {h: text[at:(starts[i + 1][0] if i + 1 < len(starts) else len(text))].strip("\n")
             for i, (at, h) in enumerate(starts)}
    return (text[:starts[0][0]] if starts else text).strip("\n"), parts


def write_sections(path: str, main: str | None, parts: dict[str, str]) -> str:
    """Write `main` (None: keep the file's) and the sections of `parts` over the file's own; returns the text."""
    from edgecc.fileio import write_atomic

    file = pathlib.Path(path)
    old_main, old_parts = split_sections(file.read_text()) if file.exists() else ("", {})
    merged = {**old_parts, **parts}
    text = "\n\n".join([main.strip("\n") if main is not None else old_main]
                       + [merged[h] for h in SECTIONS if h in merged]).strip("\n") + "\n"
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text))
    return text


def validation_section(rows: list[dict], sections: list[str], args) -> str:
    """The "## Accuracy floor (--validation)" section of docs/budgets-results.md."""
    commit = _commit()
    n = args.validation
    lines = [VALIDATION_HEADING, "",
             f"Measured with `python tools/budget_eval.py --validation {n} --max-accuracy-drop "
             f"{args.max_accuracy_drop} --models {','.join(r['model'] for r in rows)} --write docs/budgets-results.md` at commit "
             f"{commit.strip()} on {platform.machine()} ({os.cpu_count()} cores, shared). Same budgets as above "
             f"({args.fraction:.0%} of the fp32 weights, `{args.device}`); the search gets the first {n} test images "
             f"with their labels as `validation` and may lose {args.max_accuracy_drop} point(s) of accuracy on them. "
             f"Held-out accuracy is on the other {500 - n} test images (fp32: onnxruntime; budget: the compiled IR "
             "run by edgecc's interpreter).", "",
             "| model | budget | flash | validation acc % (fp32 / floor / chosen) | held-out fp32 acc % | "
             "held-out acc % | settings ruled out | settings | search s |", "|---|---:|---:|---|---:|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['budget']:,} | BudgetError |  |  |  |  | `{r['error']}` | "
                         f"{r['seconds']} |")
            continue
        settings = ", ".join(f"{layer}: {s}" for layer, s in r["settings"].items())
        lines.append(f"| {r['model']} | {r['budget']:,} | {r['flash']:,} | {r['validation_fp32']} / {r['floor']} / "
                     f"{r['validation_accuracy']} | {r['fp32_accuracy']} | {r['accuracy']} | {r['rejected']} | "
                     f"{settings} | {r['seconds']} |")
    return "\n".join(lines + ["", *[t.replace("### ", "#### ", 1) for t in sections]])


def impossible(device: str) -> str:
    import edgecc

    data = SHARED / "data"
    try:
        edgecc.compile(str(data / "digits_mlp.onnx"), device=device, max_flash="1K",
                       calibration=str(data / "digits_mlp_calib.npz"))
    except edgecc.errors.BudgetError as error:
        return str(error)
    return "(no error: the budget was met)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="FILE.md")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--fraction", type=float, default=0.15)
    parser.add_argument("--device", default="stm32f4")
    parser.add_argument("--latency", type=float, metavar="FRACTION",
                        help="instead: latency budgets of FRACTION of the fp32 estimate; --write replaces the "
                             "file's latency section (or appends it)")
    parser.add_argument("--validation", type=int, metavar="N",
                        help="instead: the flash budgets with the first N test images as the search's validation set "
                             "(accuracy on the rest); --write replaces the file's accuracy-floor section")
    parser.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS")
    args = parser.parse_args()
    if args.latency is not None:
        rows = []
        for name in args.models.split(","):
            rows.append(evaluate_latency(name, args.latency, args.device))
            print(rows[-1], file=sys.stderr)
        section = latency_section(rows, args.latency, args.device)
        if args.write:
            write_sections(args.write, None, {LATENCY_HEADING: section})
        print(section)
        return 0
    rows, sections = [], []
    for name in args.models.split(","):
        row, text = evaluate(name, args.fraction, args.device, args.validation, args.max_accuracy_drop)
        print(row, file=sys.stderr)
        rows.append(row)
        sections.append(text)
    if args.validation is not None:
        section = validation_section(rows, sections, args)
        if args.write:
            write_sections(args.write, None, {VALIDATION_HEADING: section})
        print(section)
        return 0
    error = impossible(args.device)
    commit = _commit()
    lines = ["# Flash budgets: results on the digits models", "",
             f"Measured with `python tools/budget_eval.py --write docs/budgets-results.md` at commit {commit.strip()} "
             f"on {platform.machine()} ({os.cpu_count()} cores, shared), Python {platform.python_version()}.",
             f"Budget: {args.fraction:.0%} of each model's fp32 weight bytes (BatchNorm folded), device "
             f"`{args.device}`. Flash is code + weights from the compiled object; accuracy on the 500 test images "
             "(fp32: onnxruntime; budget: the compiled IR run by edgecc's interpreter). Latency is the device "
             "estimate (qemu instruction counts x CPI). Search times were taken on a busy machine.", "",
             "| model | fp32 weights | budget | flash | within | output SQNR dB | latency ms | fp32 acc % | acc % | "
             "within 1 pt | search s |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['fp32_weights']:,} | {r['budget']:,} | BudgetError | no |  |  |  |  | "
                         f" | {r['seconds']} |")
            continue
        lines.append(f"| {r['model']} | {r['fp32_weights']:,} | {r['budget']:,} | {r['flash']:,} | "
                     f"{'yes' if r['flash'] <= r['budget'] else 'no'} | {r['sqnr']} | "
                     f"{'' if r['latency'] is None else round(r['latency'], 3)} | {r['fp32_accuracy']} | "
                     f"{r['accuracy']} | {'yes' if r['accuracy'] >= r['fp32_accuracy'] - 1.0 else 'no'} | "
                     f"{r['seconds']} |")
    lines += ["", f"Impossible budget (digits_mlp, 1 KiB): `{error}`", "", *sections]
    text = "\n".join(lines) + "\n"
    if args.write:  # the other modes' sections are kept
        write_sections(args.write, text, {})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
