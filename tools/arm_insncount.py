"""ARM code quality of the shared models: guest instructions per MAC under qemu-user, and FMAs in the hot loops.

    python tools/arm_insncount.py [--models a,b] [--targets armv8,armv7] [--check-asm] [--write docs/arm-performance.md]

Wall time under qemu says nothing about a board, but the number of guest instructions a model executes is exact
and repeatable, so it measures the generated ARM code. Each model is compiled -O3 for each target, linked
statically with a small C driver that runs the model's entry R times (R from argv, inputs from the model's
`.ref.npz`), and run under qemu-user (with the preset's -cpu) with the TCG plugin of
../shared/tools/qemu-insncount (built once into ~/.cache/edgecc/insncount). The model's instructions are
count(R=1) - count(R=0) of the same binary, so start-up, input reading and allocation cancel out.

--check-asm emits assembly for a Conv-heavy, a Gemm and a MatMul model and counts, per kernel function, the
vector FMAs that a vectorised hot loop should use: `fmla v.4s` (AArch64), `vfma.f32 q` (ARMv7 NEON) and
`vfmadd...ps %zmm` (x86-64-v4). --write always includes that check.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np

from edgecc.backends import insncount

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("EDGECC_SHARED", ROOT.parent / "shared"))
MODELS = ["mlp_mnist", "lenet5", "bert_tiny_enc", "shufflenet_v2_x1_0", "squeezenet1_1", "mobilenet_v2", "resnet18"]
TARGETS = ["armv8", "armv7"]
ASM_MODELS = ["resnet18", "mlp_mnist", "bert_tiny_enc"]
"""A Conv-heavy, a Gemm and a MatMul (transformer) model for --check-asm."""

COLUMNS = [
    ("armv8", "fmla v.4s", re.compile(r"^\s*fmla\s+v\d+\.4s\b", re.M)),
    ("armv7", "vfma.f32 q", re.compile(r"^\s*vfma\.f32\s+q\d+\b", re.M)),
    ("armv7", "vmul.f32 q", re.compile(r"^\s*vmul\.f32\s+q\d+\b", re.M)),
    ("x86-64-v4", "vfmadd*ps zmm", re.compile(r"^\s*vfmadd\w*ps\s.*%zmm\d+\s*$", re.M)),
    ("x86-64-v4", "vfmadd*ps ymm", re.compile(r"^\s*vfmadd\w*ps\s.*%ymm\d+\s*$", re.M)),
]
"""(target, name, pattern) counted per kernel: the vector FMA of each target (FMA_NAMES) and what a kernel may use
instead (NEON multiplies not fused with their adds; 256-bit FMAs where 512-bit ones were expected)."""
FMA_NAMES = {"armv8": "fmla v.4s", "armv7": "vfma.f32 q", "x86-64-v4": "vfmadd*ps zmm"}
"""The vector FMA a vectorised float32 hot loop uses on each target."""
FMA_PATTERNS = {target: pattern for target, name, pattern in COLUMNS if name == FMA_NAMES[target]}
KERNEL = re.compile(r"_(k\d+)_([A-Za-z0-9]+)_[0-9a-f]+$")


def plugin() -> str:
    """libinsncount.so, built by ../shared/tools/qemu-insncount/build.sh into the edgecc cache on first use."""
    return insncount.whole_program_plugin()


def link(compiled, folder: str) -> str:
    """The model's object linked statically with edgecc's instruction-count driver; returns the executable."""
    return insncount.link(compiled.module, compiled.native, folder)


def write_inputs(compiled, name: str, path: str) -> None:
    """The reference inputs of ../shared/models/NAME.ref.npz (zeros for any it lacks), in graph order."""
    insncount.write_inputs(compiled.module, dict(np.load(SHARED / "models" / f"{name}.ref.npz")), path)


def count(compiled, exe: str, inputs: str, reps: int) -> int:
    """Guest instructions of one run of `exe` with R=reps under qemu-user and the preset's -cpu."""
    command = insncount.qemu_command(compiled.module, compiled.native, exe, inputs, reps, plugin())
    result = subprocess.run(command, capture_output=True, text=True)
    found = re.findall(r"insns: (\d+)", result.stderr)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-400:]}")
    return int(found[-1])


def measure(name: str, target: str) -> tuple[int, int]:
    """(MACs, guest instructions of one inference) of model `name` on `target`."""
    import edgecc
    from edgecc.backends.artifacts import require_tool

    compiled = edgecc.compile(str(SHARED / "models" / f"{name}.onnx"), opt_level=3, target=target)
    require_tool(compiled.native.target.cc), require_tool(compiled.native.target.qemu)
    with tempfile.TemporaryDirectory(prefix="edgecc-insncount-") as tmp:
        exe = link(compiled, tmp)
        inputs = os.path.join(tmp, "inputs.bin")
        write_inputs(compiled, name, inputs)
        return compiled.report["macs"], count(compiled, exe, inputs, 1) - count(compiled, exe, inputs, 0)


def pattern(target: str, name: str) -> re.Pattern:
    """The pattern of column (target, name) of COLUMNS."""
    return next(p for t, n, p in COLUMNS if (t, n) == (target, name))


def kernels(asm: str) -> dict[str, str]:
    """Assembly split per global function: {"k<N>_<Op>" (or the symbol when it is no kernel): body}."""
    bodies: dict[str, list[str]] = collections.defaultdict(list)
    current = None
    for line in asm.splitlines():
        label = re.match(r"^([A-Za-z_][\w$]*):", line)
        if label:
            match = KERNEL.search(label.group(1))
            current = f"{match.group(1)}_{match.group(2)}" if match else label.group(1)
        elif current:
            bodies[current].append(line)
    return {k: "\n".join(v) for k, v in bodies.items()}


def assembly(model, target: str) -> str:
    """-O3 assembly of `model` (a path or an onnx.ModelProto) for `target`."""
    import edgecc

    compiled = edgecc.compile(model, opt_level=3, target=target)
    with tempfile.TemporaryDirectory() as tmp:
        (text,) = compiled.artifacts(os.path.join(tmp, "model"), emit="asm").values()
    return text.decode()


def fma_counts(name: str) -> dict[str, dict[str, int]]:
    """{kernel: {"<target> <column>": count}} of the COLUMNS patterns in the assembly of model `name`."""
    table: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for target in FMA_PATTERNS:
        for kernel, body in kernels(assembly(str(SHARED / "models" / f"{name}.onnx"), target)).items():
            for column in (c for c in COLUMNS if c[0] == target):
                table[kernel][f"{target} {column[1]}"] = len(column[2].findall(body))
    return table


def asm_section(names: list[str]) -> list[str]:
    """Markdown tables of FMA counts per Conv/Gemm/MatMul kernel, one per model."""
    columns = [f"{target} {name}" for target, name, _ in COLUMNS]
    lines = ["## Hot loops: vector FMAs per kernel", "",
             "Counted in the -O3 assembly (`compiled.artifacts(stem, emit=\"asm\")`) of each Conv, Gemm and MatMul "
             "(plain or fused) kernel (kernels are shared by nodes of the same signature). The expected vector FMAs are `fmla v.4s` "
             "(armv8), `vfma.f32 q` (armv7) and `vfmadd*ps` on zmm (x86-64-v4). `armv7 vmul.f32 q` counts NEON "
             "multiplies: a kernel with those and no `vfma.f32 q` is vectorised but its multiply-adds are not "
             "fused. `x86-64-v4 vfmadd*ps ymm` counts 256-bit FMAs, half the preset's vector width. "
             "tests/backends/test_arm_vectorisation.py checks the same forms on one small Conv and one Gemm.", ""]
    for name in names:
        table = {k: v for k, v in fma_counts(name).items() if re.search(r"_(Fused)?(Conv|Gemm|MatMul)$", k)}
        lines += [f"### {name}", "", "| kernel | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        lines += [f"| {k} | " + " | ".join(str(row.get(c, 0)) for c in columns) + " |"
                  for k, row in sorted(table.items(), key=lambda kv: int(kv[0].split("_")[0][1:]))]
        lines.append("")
    return lines


def insn_section(rows: list[tuple[str, int, dict[str, int]]], targets: list[str]) -> list[str]:
    header = "| model | MACs | " + " | ".join(f"{t} instructions | {t} instr/MAC" for t in targets) + " |"
    lines = [header, "|---|---:|" + "---:|---:|" * len(targets)]
    for name, macs, counts in rows:
        cells = " | ".join(f"{counts[t]:,} | {counts[t] / macs:.2f}" for t in targets)
        lines.append(f"| {name} | {macs:,} | {cells} |")
    return lines


def provenance() -> str:
    """The date and the commit of the edgecc measured (`-dirty` when its tracked files differ from it)."""
    import edgecc

    tree = pathlib.Path(edgecc.__file__).resolve().parents[2]
    commit = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return f"Measured {datetime.date.today().isoformat()} at commit {commit}."


def document(rows, targets: list[str], asm_lines: list[str], command: str) -> str:
    intro = ["# ARM code quality", "",
             f"Command: `{command}`. {provenance()}", "",
             "Guest instructions of one inference, counted under qemu-user (armv8: `qemu-aarch64 -cpu cortex-a53`, "
             "armv7: `qemu-arm -cpu cortex-a15`, as the presets say) by the TCG plugin of "
             "../shared/tools/qemu-insncount: count(R=1) - count(R=0) of the same statically linked binary, inputs "
             "from each model's `.ref.npz`. Exact and repeatable, unlike wall time under qemu. MACs are "
             "`compiled.report[\"macs\"]`; a vectorised 4-lane float32 FMA loop needs at least 0.25 instructions "
             "per MAC.", ""]
    return "\n".join(intro + insn_section(rows, targets) + [""] + asm_lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models of ../shared/models")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated hosted ARM presets")
    parser.add_argument("--check-asm", action="store_true", help="count vector FMAs per kernel of --asm-models")
    parser.add_argument("--asm-models", default=",".join(ASM_MODELS), help="models for --check-asm")
    parser.add_argument("--write", metavar="FILE.md", help="write the markdown report (includes --check-asm)")
    args = parser.parse_args(argv)
    models, targets = args.models.split(","), args.targets.split(",")
    from edgecc.backends.targets import PRESETS

    unrunnable = [t for t in targets if t not in PRESETS or not PRESETS[t].qemu]
    if unrunnable:
        parser.error(f"--targets: {', '.join(unrunnable)} do not run under qemu-user; use armv8, armv8.2 or armv7")
    rows = []
    for name in models:
        counts = {}
        for target in targets:
            macs, counts[target] = measure(name, target)
            print(f"{name} {target}: {counts[target]:,} instructions, {counts[target] / macs:.2f} per MAC", flush=True)
        rows.append((name, macs, counts))
    asm_lines = asm_section(args.asm_models.split(",")) if args.check_asm or args.write else []
    print("\n".join(insn_section(rows, targets) + [""] + asm_lines))
    if args.write:
        command = "python tools/arm_insncount.py " + " ".join(sys.argv[1:] if argv is None else argv)
        pathlib.Path(args.write).write_text(document(rows, targets, asm_lines, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
