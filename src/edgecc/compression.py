"""Compression as a compile step: `prune=`, `prune_channels=`, `low_rank=`, `cluster_weights=` (and, with
calibration data, layer-wise reconstruction).

Like quantisation, compression has to see the model as the kernels will (BatchNorm folded, constants folded), so
it runs the same preparation pipeline first, then the techniques in a fixed order: structured channel pruning
(changes shapes), low-rank factorisation (changes the layer count), unstructured pruning (zeros), weight
clustering (shared values, last because it re-encodes whatever values are left). With calibration data every
compressed layer is then re-fitted by least squares (edgecc.reconstruct). The -O pipeline follows; its
encode-sparsity pass stores the pruned weights sparse where the target's kernels gain from it.
"""

from __future__ import annotations

from edgecc.errors import EdgeccError
from edgecc.ir.core import Module

def requested(prune=None, prune_channels=None, low_rank=None, cluster_weights=None) -> bool:
    return any(v is not None for v in (prune, prune_channels, low_rank, cluster_weights))


def check_options(prune=None, prune_channels=None, low_rank=None, cluster_weights=None, prune_scope="layer",
                  reconstruct=None, calibration=None, tucker=False, prune_block=1) -> None:
    """Fail early, before the model is even loaded, on options that cannot work."""
    from edgecc.passes.cluster_weights import check_clusters
    from edgecc.passes.prune import SCOPES, check_fraction

    for value in per_layer(prune):
        check_fraction(value, "--prune", "sparsity")
    if prune_channels is not None:
        check_fraction(prune_channels, "--prune-channels", "channel fraction")
    for value in per_layer(low_rank):
        check_fraction(value, "--low-rank", "energy", upper_closed=True)
    for value in per_layer(cluster_weights):
        check_clusters(value)
    if prune_scope not in SCOPES:
        raise EdgeccError(f"unknown prune scope '{prune_scope}'", where="--prune-scope",
                          hint="use layer (each layer to the sparsity) or global (one threshold for all layers)")
    if reconstruct and calibration is None:
        raise EdgeccError("reconstruction needs calibration data", where="--reconstruct",
                          hint="pass --calibration DATA (inputs the layers are re-fitted on), or drop --reconstruct")
    if prune_block != 1 and prune is None:
        raise EdgeccError("--prune-block is a form of --prune", where="--prune-block", hint="add --prune 0.9")
    if tucker and low_rank is None:
        raise EdgeccError("--tucker is a form of --low-rank", where="--tucker", hint="add --low-rank 0.95")
    if reconstruct and not requested(prune, prune_channels, low_rank, cluster_weights):
        raise EdgeccError("--reconstruct re-fits compressed layers, but no compression was asked for",
                          where="--reconstruct", hint="add --prune, --prune-channels, --low-rank or --cluster-weights")


def per_layer(option) -> dict:
    """{value: layer names, or None for every layer} of an option given as one value for all layers or as a dict
    {layer name: value} (per-layer settings, as edgecc.budgets chooses them); {} when the option is not given."""
    if option is None:
        return {}
    if not isinstance(option, dict):
        return {option: None}
    groups: dict = {}
    for layer, value in option.items():
        groups.setdefault(value, []).append(layer)
    return groups


def _weight_layers(module: Module) -> dict[str, int]:
    """{node name: bytes of its constant weight inputs} for the compressible layers."""
    sizes = {}
    for node in module.graph.nodes:
        if node.op in ("Conv", "Gemm", "MatMul"):
            sizes[node.name] = sum(v.const.nbytes for v in node.inputs[1:] if v is not None and v.is_const)
    return sizes


def compress(module: Module, *, prune=None, prune_scope: str = "layer", prune_block: int = 1, prune_channels=None,
             low_rank=None, tucker: bool = False, cluster_weights=None, calibration=None, reconstruct=None) -> dict:
    """Compress `module` in place (see the module docstring); returns the report's "compression" entry: the
    techniques and options used, one record per layer and technique (bytes and MACs before/after, sparsity,
    rank, clusters, or why a layer was skipped) and, when re-fitted, each layer's output error before and after."""
    from edgecc.ops.costs import module_macs
    from edgecc.precision import PREPARE_PIPELINE, run_pipeline

    check_options(prune, prune_channels, low_rank, cluster_weights, prune_scope, reconstruct, calibration)
    run_pipeline(module, PREPARE_PIPELINE)
    original = module.clone()
    weights_before = sum(v.const.nbytes for v in module.graph.constants())
    macs_before = module_macs(module.graph)
    layers: list[dict] = []
    options: dict = {}
    if prune_channels is not None:
        from edgecc.passes.prune_channels import prune_channels as prune_channels_of

        options["prune_channels"] = float(prune_channels)
        layers += [dict(r, technique="prune-channels") for r in prune_channels_of(module, float(prune_channels))]
    if low_rank is not None:
        from edgecc.passes.low_rank import low_rank as low_rank_of

        options["low_rank"] = _option_entry(low_rank, float)
        if tucker:
            options["tucker"] = True
        for value, names in per_layer(low_rank).items():
            layers += [dict(r, technique="low-rank")
                       for r in low_rank_of(module, float(value), tucker=bool(tucker), layers=names)]
    if prune is not None:
        from edgecc.passes.prune import prune_magnitude

        options.update(prune=_option_entry(prune, float), prune_scope=prune_scope)
        if prune_block != 1:
            options["prune_block"] = int(prune_block)
        for value, names in per_layer(prune).items():
            layers += [dict(r, technique="prune") for r in prune_magnitude(module, float(value), scope=prune_scope,
                                                                            block=prune_block, layers=names)]
    if cluster_weights is not None:
        from edgecc.passes.cluster_weights import cluster_weights as cluster_weights_of

        options["cluster_weights"] = _option_entry(cluster_weights, int)
        for value, names in per_layer(cluster_weights).items():
            layers += [dict(r, technique="cluster-weights")
                       for r in cluster_weights_of(module, int(value), layers=names)]
    run_pipeline(module, "infer-shapes,dce")
    report = {"options": options, "layers": layers,
              "weights_bytes_before": int(weights_before), "macs_before": int(macs_before),
              "macs_after": int(module_macs(module.graph))}
    if calibration is not None:
        from edgecc.calibration import load_calibration

        samples = load_calibration(calibration, original)
        report["calibration_samples"] = len(samples)
        report["output_sqnr_db"] = output_sqnr(original, module, samples)
        if reconstruct is not False:
            report["reconstruction"] = _reconstruct(original, module, layers, samples)
            report["output_sqnr_db_before_refit"] = report["output_sqnr_db"]
            report["output_sqnr_db"] = output_sqnr(original, module, samples)
    return report


def _option_entry(option, kind):
    """The report's record of an option: the value, or {layer: value} for per-layer settings."""
    return {layer: kind(v) for layer, v in option.items()} if isinstance(option, dict) else kind(option)


def output_sqnr(original: Module, module: Module, samples: list) -> float:
    """The compressed model's outputs against the original's on `samples`, in dB (as precision reports int8)."""
    import numpy as np

    from edgecc.interpreter import collect_values
    from edgecc.precision import sqnr_db

    reference = np.concatenate(collect_values(original, samples, set())["<outputs>"])
    return round(sqnr_db(reference, np.concatenate(collect_values(module, samples, set())["<outputs>"])), 2)


def _reconstruct(original: Module, module: Module, layers: list[dict], samples: list) -> list[dict]:
    from edgecc.reconstruct import reconstruct

    # the nodes that compute a compressed layer's original output (a factorised layer's first product has no
    # original output to match: it is fitted through the second)
    matchable = {v.name for v in original.graph.values()}
    present = {n.name for n in module.graph.nodes
               if n.op in ("Conv", "Gemm", "MatMul") and n.outputs[0].name in matchable}
    changed = []
    for record in layers:
        if record.get("skipped"):
            continue
        for name in record.get("nodes") or [record["layer"]]:
            if name in present and name not in changed:
                changed.append(name)
    # a layer whose input channels shrank (the consumer of a channel-pruned layer) is re-fitted too
    before = {n.name: n for n in original.graph.nodes}
    for node in module.graph.nodes:
        twin = before.get(node.name)
        if twin is not None and node.op in ("Conv", "Gemm", "MatMul") and node.name not in changed and \
                node.input(1) is not None and twin.input(1) is not None and \
                node.input(1).type.shape != twin.input(1).type.shape:
            changed.append(node.name)
    kept = {}
    for record in layers:
        if record.get("pruned_channels") and not record.get("skipped"):
            dropped = set(record["pruned_channels"])
            kept[record["layer"]] = [c for c in range(record["channels_before"]) if c not in dropped]
    # unstructured masks are chosen again on the data; block masks keep their blocks (the kernels' unit)
    pruned = frozenset(n for r in layers if r["technique"] == "prune" and not r.get("skipped")
                       and r.get("block", 1) == 1 for n in r.get("nodes") or [r["layer"]])
    return reconstruct(original, module, changed, samples, kept, reselect=pruned)


def layer_nodes(report: dict | None, layers) -> list[str]:
    """The nodes that compute `layers` after compression (from compress()'s records: a factorised layer is its
    factors, e.g. `fc_u` then `fc`), so that per-layer precision reaches every product of a layer."""
    nodes: dict[str, None] = {}
    for layer in layers:
        records = [r for r in (report or {}).get("layers", ()) if r["layer"] == layer and not r.get("skipped")]
        for name in [n for r in records for n in r.get("nodes") or ()] or [layer]:
            nodes[name] = None
    return list(nodes)


def stored_weight_bytes(module: Module) -> int:
    """Bytes of the weight constants as the compiled model stores them (encode-sparsity's encodings; int8 and
    packed codebook indices as they are)."""
    from edgecc.passes.encode_sparsity import encoded_bytes

    return sum(encoded_bytes(v) for v in module.graph.constants() if v.uses)


def finish_report(report: dict, module: Module) -> dict:
    """Complete the compression entry once the -O pipeline (and its encode-sparsity) has run: the weights' bytes as
    stored (sparse encodings, packed indices) next to the bytes before compression."""
    from edgecc.passes.encode_sparsity import encoded_bytes

    constants = [v for v in module.graph.constants() if v.uses]
    stored = stored_weight_bytes(module)
    encoded = {v.name: {"kind": v.type.sparse.kind, "block": list(v.type.sparse.block), "bytes": encoded_bytes(v),
                        "dense_bytes": int(v.const.nbytes)}
               for v in constants if v.type is not None and v.type.sparse is not None}
    before = report["weights_bytes_before"]
    return dict(report, weights_bytes_after=int(stored), weights_ratio=round(stored / max(before, 1), 4),
                sparse_weights=encoded)
