"""Accuracy and stored bytes of edgecc's compression on the trained digits models of ../shared/data.

    python tools/compress_eval.py [--models digits_mlp,digits_cnn,digits_mobilenet] [--write docs/compression-results.md]

For each model: test accuracy of the float model (onnxruntime), then edgecc with unstructured pruning at 50/80/90%
without and with the least-squares re-fit on the calibration split; weight clustering to 16 entries; low-rank at
0.95 energy; channel pruning at 30%; and pruning at 90% combined with int8. "stored" is the bytes of every weight
constant as the compiled model stores it (sparse encodings, packed indices, int8), against the float model's.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys

import numpy as np
import onnxruntime as ort

import edgecc
from edgecc.compression import stored_weight_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared"))
MODELS = ("digits_mlp", "digits_cnn", "digits_mobilenet")
BOARD = "cortex-m4"
"""Where bytes matter most: encode-sparsity stores weights in the smallest encoding modelled no slower than dense
on microcontrollers, while on vector hosts it picks the fastest (a one-row FC layer at 90% stays dense there)."""
SETTINGS = [("prune 50%", dict(prune=0.5), False), ("prune 50% + re-fit", dict(prune=0.5), True),
            ("prune 80%", dict(prune=0.8), False), ("prune 80% + re-fit", dict(prune=0.8), True),
            ("prune 90%", dict(prune=0.9), False), ("prune 90% + re-fit", dict(prune=0.9), True),
            ("prune 90% + re-fit, int8", dict(prune=0.9, quantize="int8"), True),
            ("16 clusters", dict(cluster_weights=16), False), ("16 clusters + re-fit", dict(cluster_weights=16), True),
            ("low-rank 0.95 + re-fit", dict(low_rank=0.95), True),
            ("30% of channels + re-fit", dict(prune_channels=0.3), True)]


def stored_bytes(compiled) -> int:
    return stored_weight_bytes(compiled.module)


def compressed_weights(compiled) -> tuple[int, int]:
    """(stored, float32 dense) bytes of the weights the compression changed: the sparse-encoded ones and the
    codebook-decoded ones (indices + codebook against the decoded float32 tensor)."""
    from edgecc.passes.encode_sparsity import encoded_bytes

    stored = dense = 0
    for node in compiled.module.graph.nodes:
        if node.op == "CodebookDecode":
            stored += sum(int(v.const.nbytes) for v in node.inputs)
            dense += 4 * int(np.prod(node.attrs["shape"]))
    for value in compiled.module.graph.constants():
        if value.uses and value.type is not None and value.type.sparse is not None:
            stored += encoded_bytes(value)
            dense += 4 * value.const.size
    return stored, dense


def accuracy(run, test) -> float:
    return 100.0 * float(np.mean([np.argmax(run(x)) == y for x, y in zip(test["input"], test["label"])]))


def evaluate(name: str) -> list[dict]:
    data = os.path.join(SHARED, "data")
    path, calib = os.path.join(data, f"{name}.onnx"), os.path.join(data, f"{name}_calib.npz")
    test = np.load(os.path.join(data, f"{name}_test.npz"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    dense = edgecc.compile(path, opt_level=3)
    rows = [{"model": name, "setting": "float32 (onnxruntime)",
             "accuracy": accuracy(lambda x: session.run(None, {"input": x})[0], test),
             "stored": stored_bytes(dense), "ratio": 1.0}]
    base = rows[0]["stored"]
    for label, options, refit in SETTINGS:
        extra = {"calibration": calib} if refit or options.get("quantize") else {}
        if options.get("quantize") and not refit:
            extra["reconstruct"] = False
        compiled = edgecc.compile(path, opt_level=3, **options, **extra)
        board = edgecc.compile(path, opt_level=3, target=BOARD, **options, **extra)
        report = compiled.report["compression"]
        changed, changed_dense = compressed_weights(board)
        rows.append({"model": name, "setting": label, "accuracy": accuracy(lambda x: compiled.run([x])[0], test),
                     "stored": stored_bytes(compiled), "ratio": stored_bytes(compiled) / base,
                     "board_ratio": stored_bytes(board) / base,
                     "changed_ratio": changed / changed_dense if changed_dense else None,
                     "sqnr": report.get("output_sqnr_db")})
        r = rows[-1]
        changed_text = "-" if r["changed_ratio"] is None else f"{r['changed_ratio']:.1%}"
        print(f"{name:18s} {label:28s} {r['accuracy']:6.1f}%  host {r['stored']:8,d} B ({r['ratio']:6.1%})  "
              f"{BOARD} {r['board_ratio']:6.1%}  compressed tensors {changed_text}  SQNR {r['sqnr']}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--write", metavar="FILE.md")
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(SHARED, "data")):
        print(f"compress_eval: {SHARED}/data not found", file=sys.stderr)
        return 1
    rows = [row for name in args.models.split(",") for row in evaluate(name)]
    if args.write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True).stdout.strip()
        lines = ["# Compression results (digits models, test split)", "",
                 f"Measured with `python tools/compress_eval.py --write {args.write}` at commit {commit} on "
                 f"{platform.machine()} ({os.cpu_count()} cores), Python {platform.python_version()}.",
                 "Accuracy is on the 500-image test split; \"re-fit\" uses the calibration split; \"stored\" counts "
                 "every weight constant as the compiled model stores it (encode-sparsity's choice for the host, "
                 "int8, packed codebook indices), against the float model's bytes. SQNR is the compressed model's "
                 "output against the float model's on the calibration split.", "",
                 f"\"{BOARD} / fp32\" is the same for the Cortex-M4 build, where encode-sparsity picks the smallest "
                 "encoding that is not slower; \"compressed tensors\" counts only the weights the compression changed "
                 f"(sparse-encoded or clustered, on {BOARD}) against their float32 bytes.", "",
                 f"| model | setting | accuracy % | host stored bytes | host / fp32 | {BOARD} / fp32 | "
                 "compressed tensors / fp32 | output SQNR dB |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            sqnr = "" if r.get("sqnr") is None else f"{r['sqnr']:.2f}"
            board = "" if r.get("board_ratio") is None else f"{r['board_ratio']:.1%}"
            changed = "" if r.get("changed_ratio") is None else f"{r['changed_ratio']:.1%}"
            lines.append(f"| {r['model']} | {r['setting']} | {r['accuracy']:.1f} | {r['stored']:,} | "
                         f"{r['ratio']:.1%} | {board} | {changed} | {sqnr} |")
        with open(args.write, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"compress_eval: wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
