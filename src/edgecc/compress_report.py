"""`edgecc compress-report MODEL`: what compression does to each layer, as a table (bytes and MACs before and
after, sparsity / rank / clusters, the re-fit error) and, with --sweep, the size against output SQNR over a range
of settings."""

from __future__ import annotations

import argparse
import json

from edgecc.errors import EdgeccError

SWEEPABLE = {"prune": float, "prune_channels": float, "low_rank": float, "cluster_weights": int}


def parser() -> argparse.ArgumentParser:
    from edgecc.cli import _add_compile_options

    p = argparse.ArgumentParser(
        prog="edgecc compress-report",
        description="Compress a model as `edgecc MODEL --prune/--prune-channels/--low-rank/--cluster-weights` would "
                    "and report, per layer, bytes and MACs before and after and the output error (with --calibration: "
                    "each re-fitted layer's relative error and the model's output SQNR against the original).",
        epilog="Example:\n  edgecc compress-report model.onnx --prune 0.8 --calibration calib.npz --sweep "
               "prune=0.5,0.8,0.9",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("--sweep", metavar="OPTION=V1,V2,...",
                   help=f"also compress at each value of one option ({', '.join(SWEEPABLE)}) and print size "
                        "against output SQNR (needs --calibration for the SQNR)")
    p.add_argument("--json", metavar="FILE", help="also write the report (and the sweep) as JSON")
    _add_compile_options(p)
    p.set_defaults(runtime="reference")
    return p


def _sweep_values(text: str) -> tuple[str, list]:
    name, eq, values = text.partition("=")
    key = name.strip().replace("-", "_")
    if not eq or key not in SWEEPABLE:
        raise EdgeccError(f"cannot sweep '{text}'", where="--sweep",
                          hint=f"write OPTION=V1,V2 with OPTION one of {', '.join(SWEEPABLE)}, e.g. prune=0.5,0.8,0.9")
    try:
        return key, [SWEEPABLE[key](v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise EdgeccError(f"'{values}' are not {SWEEPABLE[key].__name__} values", where="--sweep") from None


def _detail(record: dict) -> str:
    if record.get("skipped"):
        return "skipped: " + record["skipped"]
    for key, label in (("sparsity", "sparsity {:.1%}"), ("rank", "rank {}"), ("clusters", "{} clusters"),
                       ("channels_after", "channels -> {}")):
        if record.get(key) is not None:
            return label.format(record[key])
    return ""


def print_report(report: dict) -> None:
    compression = report["compression"]
    refit = {r["layer"]: r for r in compression.get("reconstruction", []) if "error_after" in r}
    print(f"{'layer':32s} {'technique':16s} {'bytes before':>12s} {'after':>10s} {'MACs before':>12s} "
          f"{'after':>10s}  {'re-fit error':>14s}  detail")
    for r in compression["layers"]:
        fit = next((refit[n] for n in r.get("nodes") or [r["layer"]] if n in refit), None)
        error = f"{fit['error_before']:.3f}->{fit['error_after']:.3f}" if fit else ""
        print(f"{r['layer'][:32]:32s} {r['technique']:16s} {r['bytes_before']:12,d} {r['bytes_after']:10,d} "
              f"{r['macs_before']:12,d} {r['macs_after']:10,d}  {error:>14s}  {_detail(r)}")
    print(f"weights: {compression['weights_bytes_before']:,} B -> {compression['weights_bytes_after']:,} B stored "
          f"({compression['weights_ratio']:.1%}); MACs {compression['macs_before']:,} -> {compression['macs_after']:,}")
    for name, enc in compression.get("sparse_weights", {}).items():
        print(f"  {name}: {enc['kind']}{' ' + 'x'.join(map(str, enc['block'])) if enc['block'] else ''}, "
              f"{enc['dense_bytes']:,} -> {enc['bytes']:,} B")
    if "output_sqnr_db" in compression:
        before = compression.get("output_sqnr_db_before_refit")
        print(f"output SQNR against the original on {compression['calibration_samples']} calibration samples: "
              f"{compression['output_sqnr_db']} dB" + (f" (before the re-fit: {before} dB)" if before is not None else ""))


def cmd_compress_report(argv: list[str]) -> int:
    import edgecc
    from edgecc import compression
    from edgecc.cli import _compile_options

    args = parser().parse_args(argv)
    options = _compile_options(args)
    if not compression.requested(args.prune, args.prune_channels, args.low_rank, args.cluster_weights):
        raise EdgeccError("nothing to report: no compression option was given",
                          hint="add --prune 0.8, --prune-channels 0.3, --low-rank 0.95 or --cluster-weights 16")
    sweep = _sweep_values(args.sweep) if args.sweep else None
    compiled = edgecc.compile(args.model, **options)
    print_report(compiled.report)
    result = {"report": compiled.report["compression"]}
    if sweep is not None:
        key, values = sweep
        rows = []
        print(f"\nsweep of {key}:")
        print(f"{'value':>8s} {'stored bytes':>14s} {'ratio':>8s} {'output SQNR dB':>15s}")
        for value in values:
            entry = edgecc.compile(args.model, **dict(options, **{key: value})).report["compression"]
            rows.append({key: value, "weights_bytes_after": entry["weights_bytes_after"],
                         "weights_ratio": entry["weights_ratio"], "output_sqnr_db": entry.get("output_sqnr_db")})
            print(f"{value:>8} {entry['weights_bytes_after']:14,d} {entry['weights_ratio']:8.1%} "
                  f"{str(entry.get('output_sqnr_db', '-')):>15s}")
        result["sweep"] = rows
    if args.json:
        from edgecc.fileio import write_atomic

        def save(tmp):
            with open(tmp, "w") as f:
                json.dump(result, f, indent=2, sort_keys=True)

        write_atomic(args.json, save)
    return 0
