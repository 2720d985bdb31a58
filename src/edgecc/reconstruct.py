"""Layer-wise reconstruction ("distillation without training"): after pruning, low-rank factorisation or weight
clustering, re-fit each compressed layer's remaining free parameters by least squares so that, on the calibration
data, its outputs match the ORIGINAL layer's outputs.

Why it works without training: a Conv/Gemm/MatMul output is linear in its weights, so given the layer's input as
the compressed model computes it (upstream errors included, and so compensated) and the original model's output,
the best weights under the compression's constraint are one linear solve per output channel:

- pruned or factorised weights: the non-zero weights of each output channel (zeros stay zeros, so sparsity and
  shapes are kept) and the bias;
- clustered weights (edgecc.CodebookDecode): the k codebook values shared by the whole tensor and the layer's
  biases, in one solve; the indices are first chosen again from the calibration data (`gptq_indices`), and kept
  only where that leaves a smaller output error than the k-means assignment.

Each solve is ridge-regularised towards the current weights (lambda = RIDGE x mean diagonal of the Gram matrix),
which keeps it well posed when a channel has more free weights than the calibration data pins down. Layers are
re-fitted in topological order, each on inputs recomputed after the re-fits before it.
"""

from __future__ import annotations

import numpy as np

from edgecc.interpreter import collect_values
from edgecc.ir.core import Module, Node

RIDGE = 1e-3
MAX_RESELECT = 2304
"""Inputs per output channel (C/groups x kh x kw) up to which a pruned layer's non-zeros are chosen again by
`obs_prune` (its inverses cost O(K^3) per channel); wider layers keep the magnitude mask and are only re-fitted."""
GPTQ_DAMPING = 0.01
"""Damping of the Gram matrix gptq_indices inverts, as a fraction of its mean diagonal (GPTQ's default)."""
MAX_ROWS = 40000
"""Rows (samples x output positions) a layer's least squares is solved on; more are subsampled evenly."""


def _subsample(rows: np.ndarray) -> np.ndarray:
    if rows.shape[0] <= MAX_ROWS:
        return rows
    return rows[np.linspace(0, rows.shape[0] - 1, MAX_ROWS).astype(np.int64)]


def _conv_patches(x: np.ndarray, node: Node, weight_shape) -> tuple[np.ndarray, tuple]:
    """x [N, C, H, W] -> patches [groups, N*OH*OW, C/groups*kh*kw] in the order of the weights' flattened
    (C/groups, kh, kw) axes; plus the output layout (N, OH, OW)."""
    groups = int(node.attrs.get("group", 1))
    kh, kw = weight_shape[2:]
    strides = list(node.attrs.get("strides", [1, 1]))
    dilations = list(node.attrs.get("dilations", [1, 1]))
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    n, c = x.shape[:2]
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    eh, ew = (kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, (eh, ew), axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]  # N C OH OW kh kw
    oh, ow = windows.shape[2:4]
    cg = c // groups
    per_group = windows.reshape(n, groups, cg, oh, ow, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
    return per_group.reshape(groups, n * oh * ow, cg * kh * kw), (n, oh, ow)


def _layer_system(node: Node, x: np.ndarray, y: np.ndarray, weight_shape):
    """The layer as groups of (inputs A [rows, K], targets Y [rows, M]) with Y ~ A W_g^T + b_g, plus `view`, which
    maps a weight-shaped tensor to the per-group [M, K] matrices W_g, and `assemble`, its inverse. None if the
    layer's form is not re-fitted."""
    if node.op == "Conv" and x.ndim == 4:
        patches, (n, oh, ow) = _conv_patches(x, node, weight_shape)
        groups = patches.shape[0]
        m = weight_shape[0] // groups
        targets = y.transpose(0, 2, 3, 1).reshape(n * oh * ow, groups, m).transpose(1, 0, 2)
        return ([(patches[g], targets[g]) for g in range(groups)],
                lambda t: list(t.reshape(groups, m, -1)),
                lambda ws: np.concatenate(ws).reshape(weight_shape))
    rows = (x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
    if node.op == "Gemm" and len(weight_shape) == 2:
        if int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0 or \
                float(node.attrs.get("beta", 1.0)) != 1.0:
            return None
        if int(node.attrs.get("transB", 0)):  # B is [N, K] already
            return [rows], lambda t: [t], lambda ws: ws[0]
        return [rows], lambda t: [t.T], lambda ws: ws[0].T
    if node.op == "MatMul" and len(weight_shape) == 2:
        return [rows], lambda t: [t.T], lambda ws: ws[0].T
    return None


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays, axis=0).astype(np.float64)


def _relative_error(y: np.ndarray, estimate: np.ndarray) -> float:
    return float(np.linalg.norm(y - estimate) / max(np.linalg.norm(y), 1e-30))


def obs_prune(gram: np.ndarray, rhs: np.ndarray, count: int, fixed: np.ndarray) -> np.ndarray:
    """Which `count` of one output channel's weights to keep, chosen on the calibration data by optimal brain
    surgeon steps (Hassibi & Stork 1993; SparseGPT applies the same rule at scale): from the dense least-squares
    solution, repeatedly drop the weights whose removal costs the least output error, w_i^2 / [(X^T X)^-1]_ii,
    a fifth of the remaining excess at a time, re-solving in between. `fixed` marks columns never dropped (the
    bias). Returns the boolean mask of the weights kept (over the non-fixed columns)."""
    free = np.flatnonzero(~fixed)
    keep = np.ones(gram.shape[0], dtype=bool)
    while keep[free].sum() > count:
        active = np.flatnonzero(keep)
        inverse = np.linalg.inv(gram[np.ix_(active, active)])
        weights = inverse @ rhs[active]
        saliency = weights ** 2 / np.maximum(np.diag(inverse), 1e-30)
        saliency[fixed[active]] = np.inf
        excess = int(keep[free].sum()) - count
        drop = np.argsort(saliency, kind="stable")[:max(1, excess // 5)]
        keep[active[drop]] = False
    return keep[free]


def _refit_weights(a: np.ndarray, y: np.ndarray, w: np.ndarray, bias: np.ndarray | None, reselect: bool = False):
    """Per output channel: least squares on its non-zero weights (and bias), ridge towards the current ones; with
    `reselect`, the non-zeros are first chosen again from the calibration data (`obs_prune`)."""
    ones = np.ones((a.shape[0], 1)) if bias is not None else np.zeros((a.shape[0], 0))
    design = np.concatenate([a, ones], axis=1)
    gram = design.T @ design
    rhs = design.T @ y
    ridge = RIDGE * max(float(np.mean(np.diag(gram))), 1e-12)
    if reselect and w.shape[1] <= MAX_RESELECT:
        fixed = np.arange(design.shape[1]) >= w.shape[1]
        regularised = gram + ridge * np.eye(gram.shape[0])
        mask = np.stack([obs_prune(regularised, rhs[:, j], int(np.count_nonzero(w[j])), fixed)
                         for j in range(w.shape[0])])
        w = np.where(mask, np.where(w != 0, w, 1.0), 0.0)  # only the pattern matters: the values are solved below
    new_w, new_b = np.where(w != 0, w, 0.0).astype(np.float64), None if bias is None else bias.astype(np.float64).copy()
    for j in range(w.shape[0]):
        free = np.flatnonzero(w[j] != 0)
        if bias is not None:
            free = np.append(free, design.shape[1] - 1)
        if free.size == 0:
            continue
        current = np.append(w[j], [] if bias is None else [bias[j]])[free]
        system = gram[np.ix_(free, free)] + ridge * np.eye(free.size)
        solved = np.linalg.solve(system, rhs[free, j] + ridge * current)
        if bias is not None:
            new_b[j], solved = solved[-1], solved[:-1]
        new_w[j, free[:solved.size]] = solved
    return new_w, new_b


def _codebook_normal_equations(a: np.ndarray, y: np.ndarray, indices: np.ndarray, k: int):
    """One group's share of the codebook solve: y_j = A E_j c for each channel j (E_j the one-hot [K, k] of its
    indices), so sum_j E_j^T A^T A E_j c = sum_j E_j^T A^T y_j."""
    gram, correlation = a.T @ a, a.T @ y
    normal, rhs = np.zeros((k, k)), np.zeros(k)
    for j in range(indices.shape[0]):
        idx = indices[j]
        np.add.at(normal, (idx[:, None], idx[None, :]), gram)
        np.add.at(rhs, idx, correlation[:, j])
    return normal, rhs


def _solve_codebook(sampled, indices: list[np.ndarray], codebook: np.ndarray, biases: list):
    """The codebook values and (where the layer has one) the biases that best fit the groups' targets with the
    given indices: one joint least-squares solve, ridge towards the current values. The bias unknowns matter once
    upstream layers are compressed too: they absorb the shift in the mean of this layer's inputs."""
    k = codebook.size
    with_bias = biases[0] is not None
    channels = sum(idx.shape[0] for idx in indices) if with_bias else 0
    normal, rhs = np.zeros((k + channels, k + channels)), np.zeros(k + channels)
    current = np.concatenate([codebook.astype(np.float64)] + ([np.concatenate(biases)] if with_bias else []))
    row = k
    for (a, y), idx in zip(sampled, indices):
        n_g, r_g = _codebook_normal_equations(a, y, idx, k)
        normal[:k, :k] += n_g
        rhs[:k] += r_g
        if with_bias:
            column_sums = a.sum(axis=0)
            for j in range(idx.shape[0]):
                cross = np.bincount(idx[j], column_sums, minlength=k)
                normal[:k, row] += cross
                normal[row, :k] += cross
                normal[row, row] = a.shape[0]
                rhs[row] = y[:, j].sum()
                row += 1
    ridge = RIDGE * max(float(np.mean(np.diag(normal))), 1e-12)
    solved = np.linalg.solve(normal + ridge * np.eye(normal.shape[0]), rhs + ridge * current)
    if not with_bias:
        return solved, biases
    sizes = np.cumsum([idx.shape[0] for idx in indices])[:-1]
    return solved[:k], np.split(solved[k:], sizes)


def gptq_indices(a: np.ndarray, y: np.ndarray, codebook: np.ndarray, with_bias: bool) -> np.ndarray:
    """Each weight's codebook entry chosen on the calibration data, not by distance alone: from the least-squares
    weights of this group (inputs `a`, targets `y`), round one input column at a time to the nearest entry and
    push its rounding error onto the columns not yet rounded, weighted by the inverse Gram matrix, so the output
    error stays small (optimal brain surgeon's update as GPTQ applies it column by column, Frantar et al. 2023;
    here to a fixed non-uniform grid). A bias, when the layer has one, is the last, never rounded, column."""
    design = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1) if with_bias else a
    gram = design.T @ design
    gram += GPTQ_DAMPING * max(float(np.mean(np.diag(gram))), 1e-12) * np.eye(gram.shape[0])
    weights = np.linalg.solve(gram, design.T @ y).T
    upper = np.linalg.cholesky(np.linalg.inv(gram)).T  # inv(gram) = upper^T upper
    entries = np.sort(codebook.astype(np.float64))
    order = np.argsort(codebook.astype(np.float64), kind="stable")
    cuts = (entries[1:] + entries[:-1]) / 2
    chosen = np.empty((weights.shape[0], a.shape[1]), np.int64)
    for j in range(a.shape[1]):
        nearest = order[np.searchsorted(cuts, weights[:, j])]
        chosen[:, j] = nearest
        error = (weights[:, j] - codebook[nearest]) / upper[j, j]
        weights[:, j + 1:] -= np.outer(error, upper[j, j + 1:])
    return chosen


def _refit_codebook(sampled, indices: list[np.ndarray], codebook: np.ndarray, biases: list):
    """(codebook, per-group indices, per-group biases) of a clustered layer re-fitted on the calibration data: the
    current indices with the codebook and biases solved, or indices chosen again by `gptq_indices` and then solved,
    whichever leaves the smaller output error."""
    with_bias = biases[0] is not None

    def error(values, chosen, fitted_biases) -> float:
        return _pairs_error([(y, a @ values[idx].T + (0.0 if b is None else b))
                             for (a, y), idx, b in zip(sampled, chosen, fitted_biases)])

    best = None
    for chosen in (indices, [gptq_indices(a, y, codebook, with_bias) for a, y in sampled]):
        values, fitted_biases = _solve_codebook(sampled, chosen, codebook, biases)
        candidate = (error(values, chosen, fitted_biases), values, chosen, fitted_biases)
        if best is None or candidate[0] < best[0]:
            best = candidate
    return best[1], best[2], best[3]


def _weight_source(node: Node):
    """('dense', weight value) or ('codebook', the CodebookDecode node) or None."""
    from edgecc.passes.cluster_weights import decoder_of

    weight = node.input(1)
    if weight is None:
        return None
    if weight.is_const:
        return "dense", weight
    decode = decoder_of(node)
    if decode is not None and all(v.is_const for v in decode.inputs):
        return "codebook", decode
    return None


def _bias_value(node: Node):
    bias = node.input(2)
    return bias if bias is not None and bias.is_const and node.op in ("Conv", "Gemm") else None


def reconstruct(original: Module, compressed: Module, layers: list[str], samples: list,
                kept_channels: dict[str, list[int]] | None = None, reselect: frozenset[str] = frozenset()
                ) -> list[dict]:
    """Re-fit the named layers (node names of `compressed`, whose output values keep the original's names) in
    place; one record per layer: {"layer", "error_before", "error_after"} (relative L2 error of the layer's
    output against the original layer's on `samples`) or {"layer", "skipped": reason}. `kept_channels` names the
    original output channels a channel-pruned layer kept: its target is the original output on those. Layers in
    `reselect` (unstructured pruning) also have their non-zeros chosen again (`obs_prune`)."""
    kept_channels = kept_channels or {}
    from edgecc.passes.cluster_weights import codebook_of, indices_of, set_codebook, set_indices

    nodes = {n.name: n for n in compressed.graph.nodes}
    order = [n.name for n in compressed.graph.nodes if n.name in set(layers)]
    original_values = {v.name for v in original.graph.values()}
    targets = collect_values(original, samples, {nodes[name].outputs[0].name for name in order
                                                 if nodes[name].outputs[0].name in original_values})
    records = []
    for name in order:
        node = nodes[name]
        out = node.outputs[0].name
        source = _weight_source(node)
        if out not in targets or source is None:
            records.append({"layer": name, "skipped": "no original output or constant weights to match"})
            continue
        kind, holder = source
        if kind == "dense":
            weight = holder.const
        else:
            codebook, indices = codebook_of(holder), indices_of(holder).astype(np.int64)
            weight = codebook[indices]
        y = _stack(targets[out])
        axis = 1 if node.op == "Conv" else y.ndim - 1
        if y.shape[axis] != node.outputs[0].type.shape[axis]:
            if name not in kept_channels:
                records.append({"layer": name, "skipped": "its output channels changed and which ones stayed is "
                                                          "not known here"})
                continue
            y = np.take(y, kept_channels[name], axis=axis)
        x = _stack(collect_values(compressed, samples, {node.inputs[0].name})[node.inputs[0].name])
        system = _layer_system(node, x, y, weight.shape)
        if system is None:
            records.append({"layer": name, "skipped": f"{node.op} with these attributes is not re-fitted"})
            continue
        groups, view, assemble = system
        bias_value = _bias_value(node)
        bias = None if bias_value is None else bias_value.const.astype(np.float64)
        weights = view(weight.astype(np.float64))
        m = weights[0].shape[0]
        biases = [None if bias is None else bias[g * m:(g + 1) * m] for g in range(len(groups))]
        sampled = []
        for a, y in groups:
            both = _subsample(np.concatenate([a, y], axis=1))
            sampled.append((both[:, :a.shape[1]], both[:, a.shape[1]:]))
        before = [(y, a @ w.T + (0.0 if b is None else b)) for (a, y), w, b in zip(sampled, weights, biases)]
        if kind == "codebook":
            fitted, chosen, biases = _refit_codebook(sampled, view(indices), codebook, biases)
            weights = [fitted[idx] for idx in chosen]
            set_codebook(compressed, holder, fitted)
            assembled = assemble(chosen)
            if not np.array_equal(assembled, indices):
                set_indices(compressed, holder, assembled)
            if bias_value is not None:
                node.set_input(2, compressed.graph.constant(np.concatenate(biases).astype(np.float32),
                                                            bias_value.name))
        else:
            fits = [_refit_weights(a, y, w, b, name in reselect) for (a, y), w, b in zip(sampled, weights, biases)]
            weights, biases = [w for w, _ in fits], [b for _, b in fits]
            node.set_input(1, compressed.graph.constant(assemble(weights).astype(np.float32), holder.name))
            if bias_value is not None:
                node.set_input(2, compressed.graph.constant(np.concatenate(biases).astype(np.float32),
                                                            bias_value.name))
        after = [(y, a @ w.T + (0.0 if b is None else b)) for (a, y), w, b in zip(sampled, weights, biases)]
        records.append({"layer": name, "error_before": round(_pairs_error(before), 6),
                        "error_after": round(_pairs_error(after), 6)})
    return records


def _pairs_error(pairs) -> float:
    return _relative_error(np.concatenate([t.ravel() for t, _ in pairs]), np.concatenate([e.ravel() for _, e in pairs]))
