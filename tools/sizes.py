"""Code, weight and RAM sizes of the shared models on the Cortex-M presets, linked into firmware.

    python tools/sizes.py [--write docs/sizes.md]

Each model is compiled -O3 for cortex-m4 and cortex-m55, linked with examples/c/main.c by arm-none-eabi-gcc
(newlib, --specs=nosys.specs) and measured with arm-none-eabi-size. `text` holds code and weights (flash); the
arena is the RAM the caller provides (main.c keeps it in .bss).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("EDGECC_SHARED", ROOT.parent / "shared"))
MODELS = ["mlp_mnist", "lenet5", "bert_tiny_enc", "shufflenet_v2_x1_0", "squeezenet1_1", "mobilenet_v2", "resnet18"]
FLAGS = {"cortex-m4": ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"],
         "cortex-m55": ["-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard"]}


def size_of(path: str) -> tuple[int, int, int]:
    out = subprocess.run(["arm-none-eabi-size", path], capture_output=True, text=True, check=True).stdout
    text, data, bss = (int(v) for v in out.splitlines()[1].split()[:3])
    return text, data, bss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="FILE.md")
    args = parser.parse_args()
    import edgecc

    lines = ["# Sizes on Cortex-M", "",
             "Command: `python tools/sizes.py --write docs/sizes.md`. Each shared model compiled -O3, linked with "
             "examples/c/main.c by arm-none-eabi-gcc 12 (newlib nosys), measured by arm-none-eabi-size. "
             "Weights are float32 (precision and compression passes come later). \"code + index tables\" includes the "
             "compile-time index tables of data-movement kernels (Transpose, Slice, Split: 4 bytes per moved "
             "element), which dominate for shufflenet and bert; specialised kernels will replace them.", "",
             "| model | target | model.o text (code + weights) | weights | code + index tables | arena (RAM) | firmware text | firmware bss |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            for target, flags in FLAGS.items():
                compiled = edgecc.compile(str(SHARED / "models" / f"{name}.onnx"), opt_level=3, target=target,
                                          name="model")
                stem = os.path.join(tmp, f"{name}-{target}", "model")
                os.makedirs(os.path.dirname(stem))
                for path, data in compiled.artifacts(stem, "all").items():
                    with open(path, "wb") as f:
                        f.write(data)
                firmware = stem + ".elf"
                subprocess.run(["arm-none-eabi-gcc", *flags, "--specs=nosys.specs", "-O2",
                                f"-I{os.path.dirname(stem)}", str(ROOT / "examples" / "c" / "main.c"),
                                os.path.join(os.path.dirname(stem), "libmodel.a"), "-o", firmware],
                               check=True, capture_output=True)
                text, data, _ = size_of(stem + ".o")
                fw_text, _, fw_bss = size_of(firmware)
                weights = compiled.report["weights_bytes"]
                row = (f"| {name} | {target} | {text + data:,} | {weights:,} | {text + data - weights:,} | "
                       f"{compiled.report['arena_bytes']:,} | {fw_text:,} | {fw_bss:,} |")
                print(row, flush=True)
                lines.append(row)
    text = "\n".join(lines) + "\n"
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
