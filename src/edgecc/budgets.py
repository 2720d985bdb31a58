"""Flash and latency budgets: a search over per-layer precision and compression settings.

`edgecc.compile(..., max_flash=...)` starts from a size, not from a list of passes. Each weight layer can take one
of a few settings (SETTINGS: float32, int8, pruning then int8, a 16/4/2-entry codebook); a setting's cost is the
change of the stored weight bytes it causes, measured by compressing and quantising that one layer and running the
-O3 pipeline for the target (encode-sparsity's encodings, counted by compression.stored_weight_bytes: the same
functions the compiled model's bytes come from), and its loss the model's output SQNR on calibration samples when
only that layer takes it (after the layer-wise re-fit). The search is greedy, in the spirit of HAQ/AMC but without
training: from all-float32 it repeatedly takes the move (one layer to a smaller setting) with the most bytes saved
per unit of added output noise (noise powers of independent layers add), until the estimated flash fits. The
estimate is then checked by compiling the choice and reading the object's real flash (weights + code: int8 and
codebook kernels add code the estimate does not know about); when it is over, the greedy continues towards a target
lowered by the overshoot. Every compiled point and every greedy step is kept, and the report lists the Pareto front
of flash, latency (when a device's cost model gives it) and SQNR/accuracy over the compiled points (the greedy's
estimated steps are listed with them in "explored", but an estimate does not push a compiled point off the front).

A latency budget steers the search the same way: each setting's latency cost on a layer comes from the device
estimate (edgecc.estimate's per-op figures) of one compile with every layer at that setting, the layer's nodes (the
layer's own and its `<layer>_*` helpers such as a codebook decode) against the same nodes of the float32 compile;
the greedy then takes the moves with the most milliseconds saved per added noise until the estimated latency fits,
and the compiled choice is checked (the Quantize/Dequantize nodes between layers of different precision are not in
any layer's cost, so the goal is lowered by the overshoot as for flash). Which settings are faster is the board's
business: on the Cortex-M4 boards int8 kernels are slower than float32 and only 90%-pruned int8 layers are faster.

When even the smallest (or, under a latency budget alone, the fastest) setting of every layer does not fit,
BudgetError names the budget, the smallest flash or latency reached (compiled, not estimated) and what to try.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from edgecc.errors import BudgetError, EdgeccError
from edgecc.ir.core import Module


@dataclass(frozen=True)
class Setting:
    """One layer's precision/compression: `prune` (fraction of zero weights) then int8, or a `clusters`-entry
    codebook (clustered weights stay float: they are no longer constants int8 could quantise)."""

    name: str
    prune: float | None = None
    clusters: int | None = None
    int8: bool = False


FP32 = Setting("fp32")
SETTINGS = (FP32, Setting("int8", int8=True), Setting("prune 80% + int8", prune=0.8, int8=True),
            Setting("prune 90% + int8", prune=0.9, int8=True), Setting("16 clusters", clusters=16),
            Setting("4 clusters", clusters=4), Setting("2 clusters", clusters=2))
"""The per-layer candidates. int8 is about a quarter of the float bytes plus per-channel scales and int32 biases;
pruned int8 weights are stored sparse where encode-sparsity finds it smaller and not slower (QGemm, 1x1 QLinearConv
on microcontrollers); codebooks store 4, 2 or 1 bits per weight (docs/compression-results.md)."""

PROBE_SAMPLES = 48
"""Calibration samples each candidate's SQNR is measured on (and its single layer re-fitted on): enough to rank
settings, few enough that the interpreter runs each candidate in about a second on the digits models."""

MAX_ROUNDS = 6
"""Compiles of a greedy choice before the search gives up refining and tries the smallest setting everywhere."""


@dataclass
class Candidate:
    layer: str
    setting: Setting
    bytes_delta: int      # stored weight bytes, this setting minus float32 (negative: saves)
    sqnr_db: float        # the model's output SQNR with only this layer changed
    latency_delta_ms: float = 0.0  # the layer's estimated latency, this setting minus float32 (latency budgets)

    @property
    def noise(self) -> float:
        """Output noise power relative to the signal (what adds up over layers)."""
        return 0.0 if math.isinf(self.sqnr_db) else 10.0 ** (-self.sqnr_db / 10.0)


def search(model, *, target: str = "cortex-m4", max_flash: int | None = None, max_latency_ms: float | None = None,
           calibration=None, validation=None, device=None, compile_options: dict | None = None,
           log=None) -> tuple:
    """Compile `model` within `max_flash` bytes (weights + code) and `max_latency_ms` (needs `device`'s cost model);
    returns (CompiledModel, budget report). Raises BudgetError when no setting fits."""
    import edgecc
    from edgecc.calibration import load_calibration
    from edgecc.frontend.onnx_import import import_model
    from edgecc.precision import PREPARE_PIPELINE, run_pipeline

    if calibration is None:
        raise EdgeccError("a flash or latency budget needs calibration data", where="--max-flash",
                          hint="pass --calibration DATA.npz: each layer's sensitivity is measured on it, and "
                               "compressed layers are re-fitted on it")
    options = dict(compile_options or {})
    options.setdefault("opt_level", 3)
    options.setdefault("optimize_for", "size")
    say = log or (lambda message: None)
    from edgecc.api import parse_shape_bindings

    prepared = import_model(model, parse_shape_bindings(options.get("input_shapes")), options.get("constant_inputs"))
    run_pipeline(prepared, PREPARE_PIPELINE)
    samples = load_calibration(calibration, prepared)
    probe = samples[:PROBE_SAMPLES]
    labelled = _validation_set(validation, prepared) if validation is not None else None

    points: list[dict] = []

    def build(choice: dict[str, Setting], label: str) -> tuple:
        args = _compile_args(choice)
        uses_data = "quantize" in args or args["prune"] or args["cluster_weights"]
        compiled = edgecc.compile(model, target=target, device=device, calibration=calibration if uses_data else None,
                                  **options, **args)
        point = _measure(compiled, choice, label, prepared, probe, labelled, device)
        points.append(point)
        say(f"{label}: flash {point['flash_bytes']} bytes, output SQNR {point['sqnr_db']} dB")
        return compiled, point

    baseline, base_point = build({}, "float32")
    if _fits(base_point, max_flash, max_latency_ms):
        return baseline, _report(base_point, {}, points, [], max_flash, max_latency_ms)
    layers = _layers(prepared)
    say(f"measuring {len(layers)} layers x {len(SETTINGS) - 1} settings on {len(probe)} calibration samples")
    candidates = _candidates(prepared, layers, target, probe, options["opt_level"])
    choice = {name: FP32 for name in layers}
    goal = base_point["flash_bytes"] if max_flash is None else max_flash
    steer_latency = max_latency_ms is not None and base_point["latency_ms"] is not None
    if steer_latency:
        say("estimating each setting's latency per layer on the device")
        _latency_costs(candidates, baseline, lambda setting: build(
            {name: setting if any(c.setting == setting for c in candidates[name]) else FP32 for name in layers},
            f"every layer {setting.name}")[0])
    latency_goal = max_latency_ms
    compiled, point = baseline, base_point
    for round_ in range(MAX_ROUNDS):
        if max_flash is None and not steer_latency:
            break
        moved = False
        if max_flash is not None:
            moved |= _greedy(choice, candidates, "bytes_delta", base_point, goal, points)
        if steer_latency:
            moved |= _greedy(choice, candidates, "latency_delta_ms", base_point, latency_goal, points)
        if not moved and round_ > 0:
            break  # the goals moved but nothing cheaper is left: the last compile stands
        compiled, point = build(choice, f"search round {round_ + 1}")
        if _fits(point, max_flash, max_latency_ms) or not moved:
            break
        if max_flash is not None and point["flash_bytes"] > max_flash:
            goal -= point["flash_bytes"] - max_flash  # what the estimate missed (kernel code), taken off the goal
        if steer_latency and point["latency_ms"] > max_latency_ms:
            latency_goal -= point["latency_ms"] - max_latency_ms  # the Quantize/Dequantize between layers
    if not _fits(point, max_flash, max_latency_ms):
        cost = "bytes_delta" if max_flash is not None or not steer_latency else "latency_delta_ms"
        smallest = {name: min(candidates[name], key=lambda c: getattr(c, cost)).setting for name in layers}
        if smallest != choice:
            compiled, point = build(smallest, ("smallest" if cost == "bytes_delta" else "fastest")
                                    + " setting of every layer")
            choice = smallest
        if not _fits(point, max_flash, max_latency_ms):
            raise _error(points, max_flash, max_latency_ms)
    if max_flash is not None and point["flash_bytes"] < max_flash:
        # the greedy steps are coarse: spend the bytes left on the layers that lose the most, and keep it if it fits
        better = dict(choice)
        if _upgrade(better, candidates, max_flash - point["flash_bytes"]):
            trial, trial_point = build(better, "refined with the bytes left")
            if _fits(trial_point, max_flash, max_latency_ms) and trial_point["sqnr_db"] > point["sqnr_db"]:
                compiled, point, choice = trial, trial_point, better
    return compiled, _report(point, choice, points, [c for cs in candidates.values() for c in cs], max_flash,
                             max_latency_ms)


def _layers(module: Module) -> list[str]:
    from edgecc.passes.prune import weight_layers

    return [n.name for n in weight_layers(module.graph)]


def _compile_args(choice: dict[str, Setting]) -> dict:
    """edgecc.compile's per-layer options for `choice` (which names every weight layer: the ones not int8 are
    kept float32)."""
    prune = {name: s.prune for name, s in choice.items() if s.prune is not None}
    clusters = {name: s.clusters for name, s in choice.items() if s.clusters is not None}
    int8 = {name for name, s in choice.items() if s.int8}
    args: dict = {"prune": prune or None, "cluster_weights": clusters or None}
    if int8:
        args.update(quantize="int8", keep_fp32=sorted(name for name in choice if name not in int8))
    return args


def _apply(prepared: Module, choice: dict[str, Setting], samples: list) -> Module:
    """A copy of the prepared float module with `choice` applied (compressed, re-fitted, quantised), before -O."""
    from edgecc import compression, precision

    module = prepared.clone()
    args = _compile_args(choice)
    if args["prune"] or args["cluster_weights"]:
        compression.compress(module, prune=args["prune"], cluster_weights=args["cluster_weights"],
                             calibration=samples)
    if "quantize" in args:
        precision.quantize_int8(module, samples, keep_fp32=args["keep_fp32"])
    return module


def _stored_bytes(module: Module, target: str, opt_level: int) -> int:
    """Weight bytes as the compiled model stores them: the -O pipeline for `target` (with its encode-sparsity),
    counted by compression.stored_weight_bytes."""
    from edgecc.api import optimize
    from edgecc.compression import stored_weight_bytes

    module, _ = optimize(module.clone(), opt_level=opt_level, target=target)
    return stored_weight_bytes(module)


def _candidates(prepared: Module, layers: list[str], target: str, probe: list, opt_level: int
                ) -> dict[str, list[Candidate]]:
    """Each layer's settings with their bytes (against float32) and output SQNR when only that layer takes them;
    settings that save nothing on this layer (skipped as too small, dense anyway) are left out."""
    from edgecc.compression import output_sqnr

    base = _stored_bytes(prepared, target, opt_level)
    table: dict[str, list[Candidate]] = {}
    for name in layers:
        table[name] = [Candidate(name, FP32, 0, float("inf"))]
        for setting in SETTINGS[1:]:
            module = _apply(prepared, {**{other: FP32 for other in layers}, name: setting}, probe)
            delta = _stored_bytes(module, target, opt_level) - base
            if delta < 0:
                table[name].append(Candidate(name, setting, delta, output_sqnr(prepared, module, probe)))
    return table


def _latency_costs(candidates: dict[str, list[Candidate]], baseline, compile_all) -> None:
    """Fill each candidate's latency_delta_ms from device estimates: `compile_all(setting)` compiles the model with
    every layer that has `setting` at it (one compile per setting); a layer's latency is the estimate of its nodes
    (edgecc.estimate's per-op figures), compared with the same nodes of the float32 `baseline`."""
    def per_layer(compiled) -> dict[str, float]:
        ops = compiled.report["estimate"]["ops"]
        return {name: sum(o["latency_ms"] for o in ops if o["node"] == name or o["node"].startswith(name + "_"))
                for name in candidates}

    float32 = per_layer(baseline)
    settings = [s for s in SETTINGS[1:] if any(c.setting == s for cs in candidates.values() for c in cs)]
    for setting in settings:
        layer_ms = per_layer(compile_all(setting))
        for name, options in candidates.items():
            for i, c in enumerate(options):
                if c.setting == setting:
                    options[i] = replace(c, latency_delta_ms=layer_ms[name] - float32[name])


def _greedy(choice: dict[str, Setting], candidates: dict[str, list[Candidate]], cost: str, base: dict, goal,
            points: list) -> bool:
    """Move layers to settings that cost less by `cost` ("bytes_delta": flash, "latency_delta_ms": latency), most
    saved per added noise first, until the estimate (from the float32 point `base`) is at most `goal` (or nothing
    cheaper is left); `choice` is updated in place. Returns whether anything moved."""
    start = base["flash_bytes"] if cost == "bytes_delta" else base["latency_ms"]
    current = {name: next(c for c in candidates[name] if c.setting == s) for name, s in choice.items()}
    moved = False
    while True:
        if start + sum(getattr(c, cost) for c in current.values()) <= goal:
            return moved
        best, best_score = None, -math.inf
        for name, now in current.items():
            for option in candidates[name]:
                saved = getattr(now, cost) - getattr(option, cost)
                if saved <= 0:
                    continue
                added = option.noise - now.noise
                score = math.inf if added <= 0 else saved / added
                if score > best_score or (score == best_score and best is not None and saved >
                                          getattr(current[best.layer], cost) - getattr(best, cost)):
                    best, best_score = option, score
        if best is None:
            return moved
        current[best.layer] = best
        choice[best.layer] = best.setting
        moved = True
        noise = sum(c.noise for c in current.values())
        latency = None if base["latency_ms"] is None else round(
            base["latency_ms"] + sum(c.latency_delta_ms for c in current.values()), 4)
        points.append({"label": f"estimate: {best.layer} -> {best.setting.name}", "measured": False,
                       "flash_bytes": int(base["flash_bytes"] + sum(c.bytes_delta for c in current.values())),
                       "sqnr_db": round(-10 * math.log10(noise), 2) if noise > 0 else float("inf"),
                       "latency_ms": latency if cost == "latency_delta_ms" else None, "accuracy": None})


def _upgrade(choice: dict[str, Setting], candidates: dict[str, list[Candidate]], slack: int) -> bool:
    """Move layers to settings that lose less, most noise removed per byte first, within `slack` estimated bytes;
    `choice` is updated in place. Returns whether anything moved."""
    current = {name: next(c for c in candidates[name] if c.setting == s) for name, s in choice.items()}
    moved = False
    while True:
        best, best_score = None, 0.0
        for name, now in current.items():
            for option in candidates[name]:
                cost, gain = option.bytes_delta - now.bytes_delta, now.noise - option.noise
                if gain > 0 and cost <= slack and gain / max(cost, 1) > best_score:
                    best, best_score = option, gain / max(cost, 1)
        if best is None:
            return moved
        slack -= best.bytes_delta - current[best.layer].bytes_delta
        current[best.layer] = best
        choice[best.layer] = best.setting
        moved = True


def _measure(compiled, choice: dict[str, Setting], label: str, prepared: Module, probe: list, labelled,
             device) -> dict:
    """A compiled point: flash (weights + code), output SQNR against the float model (interpreter, on the probe
    samples), validation accuracy when labels were given, latency when a device's cost model is at hand."""
    from edgecc.compression import output_sqnr

    code, weights = flash_parts(compiled)
    point = {"label": label, "measured": True, "flash_bytes": code + weights, "code_bytes": code,
             "sqnr_db": output_sqnr(prepared, compiled.module, probe) if choice else float("inf"),
             "latency_ms": None, "accuracy": None,
             "settings": {name: s.name for name, s in choice.items() if s != FP32}}
    if device is not None:
        point["latency_ms"] = float(compiled.report["latency_ms"])  # unrounded: the budget check reads it
    if labelled is not None:
        point["accuracy"] = accuracy(compiled.module, *labelled)
    return point


def flash_bytes(compiled) -> int:
    """Flash of the compiled model: code plus read-only data (the weights as stored)."""
    return sum(flash_parts(compiled))


def flash_parts(compiled) -> tuple[int, int]:
    """(code, weights) bytes of the compiled model, read from the object's sections as the device estimate counts
    them (edgecc.estimate.object_sizes)."""
    from edgecc.estimate import object_sizes

    if compiled.native is None:
        raise EdgeccError("a flash budget needs native code", where="--max-flash", hint="use --runtime native")
    code, weights = object_sizes(compiled.native.obj)
    return int(code), int(weights)


def _validation_set(validation, module: Module) -> tuple[list, np.ndarray]:
    """(feeds, labels) from an .npz with the model's input(s) and `label`."""
    from edgecc.calibration import load_calibration

    if not isinstance(validation, dict):
        try:
            with np.load(validation) as data:
                validation = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise EdgeccError(f"cannot read validation data: {exc}", where="--validation",
                              hint="an .npz with the inputs stacked on a leading axis and int labels in 'label'") from None
    if "label" not in validation:
        raise EdgeccError("validation data has no 'label' array", where="--validation",
                          hint="add the class of each sample as an int array named label")
    labels = np.asarray(validation["label"]).reshape(-1)
    feeds = load_calibration({k: v for k, v in validation.items() if k != "label"}, module)
    if len(feeds) != labels.size:
        raise EdgeccError(f"{len(feeds)} validation samples but {labels.size} labels", where="--validation")
    return feeds, labels


def accuracy(module: Module, feeds: list, labels: np.ndarray) -> float:
    """Top-1 accuracy (%) of `module` (run by the interpreter: the compiled module's own references) on `feeds`."""
    from edgecc.interpreter import collect_values

    outputs = collect_values(module, feeds, set())["<outputs>"]
    predicted = np.array([int(np.argmax(o)) for o in outputs])
    return round(100.0 * float(np.mean(predicted == labels)), 2)


def _fits(point: dict, max_flash, max_latency_ms) -> bool:
    if max_flash is not None and point["flash_bytes"] > max_flash:
        return False
    return max_latency_ms is None or point["latency_ms"] is None or point["latency_ms"] <= max_latency_ms


def _error(points: list[dict], max_flash, max_latency_ms) -> BudgetError:
    """The budget that failed, with the smallest value any compiled point reached."""
    compiled = [p for p in points if p["measured"]]
    smallest = min(compiled, key=lambda p: p["flash_bytes"])
    if max_flash is not None and smallest["flash_bytes"] > max_flash:
        return BudgetError("max_flash", max_flash, smallest["flash_bytes"], where="--max-flash",
                           hint=f"the kernels' code alone is {smallest['code_bytes']} bytes there; raise the budget to "
                                "at least the smallest reachable, use a board with more flash, or a smaller model "
                                "(fewer or equal-shaped layers)")
    fastest = min(p["latency_ms"] for p in compiled if p["latency_ms"] is not None)
    return BudgetError("max_latency_ms", max_latency_ms, fastest, unit="ms", where="--max-latency",
                       hint="no per-layer setting the search tried is fast enough on this board (its compiled "
                            "points are in the report's explored list); raise the budget, pick a faster board "
                            "(--device), or a smaller model")


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats: smaller flash, higher SQNR, and lower latency / higher accuracy where both
    points know them (estimated steps have no latency or accuracy)."""
    def axes(p):
        return {"flash": p["flash_bytes"], "sqnr": -p["sqnr_db"],
                "latency": p.get("latency_ms"), "accuracy": None if p.get("accuracy") is None else -p["accuracy"]}

    def beats(q, p):
        a, b = axes(q), axes(p)
        shared = [k for k in a if a[k] is not None and b[k] is not None]
        return all(a[k] <= b[k] for k in shared) and any(a[k] < b[k] for k in shared)

    return sorted((p for p in points if not any(beats(q, p) for q in points)), key=lambda p: p["flash_bytes"])


def _report(point: dict, choice: dict[str, Setting], points: list, candidates: list, max_flash, max_latency_ms
            ) -> dict:
    return {"max_flash": max_flash, "max_latency_ms": max_latency_ms, "flash_bytes": point["flash_bytes"],
            "latency_ms": point["latency_ms"], "output_sqnr_db": point["sqnr_db"], "accuracy": point["accuracy"],
            "settings": {name: s.name for name, s in choice.items()},
            "candidates": [{"layer": c.layer, "setting": c.setting.name, "bytes_delta": c.bytes_delta,
                            "sqnr_db": c.sqnr_db, "latency_delta_ms": c.latency_delta_ms} for c in candidates],
            "explored": points, "front": pareto_front([p for p in points if p["measured"]])}


def front_table(report: dict) -> str:
    """The Pareto front of the compiled points as a Markdown table."""
    lines = ["| point | flash bytes | output SQNR dB | latency ms | accuracy % |", "|---|---:|---:|---:|---:|"]
    for p in report["front"]:
        lines.append(f"| {p['label']}{'' if p['measured'] else ' (estimated)'} | {p['flash_bytes']:,} | "
                     f"{p['sqnr_db']} | {'' if p['latency_ms'] is None else format(p['latency_ms'], '.4g')} | "
                     f"{'' if p['accuracy'] is None else p['accuracy']} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Draw the explored points and the front (flash against SQNR) to a PNG; needs matplotlib (the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgeccError("--plot needs matplotlib", where="--plot",
                          hint="pip install 'edgecc[plot]' (or matplotlib), or drop --plot") from None
    from edgecc.fileio import write_atomic

    figure, axis = plt.subplots(figsize=(6, 4))
    for measured, marker in ((False, "."), (True, "o")):
        shown = [p for p in report["explored"] if p["measured"] == measured and math.isfinite(p["sqnr_db"])]
        axis.scatter([p["flash_bytes"] for p in shown], [p["sqnr_db"] for p in shown], marker=marker,
                     label="compiled" if measured else "estimated")
    front = [p for p in report["front"] if math.isfinite(p["sqnr_db"])]
    axis.plot([p["flash_bytes"] for p in front], [p["sqnr_db"] for p in front], "k--", label="Pareto front")
    if report["max_flash"] is not None:
        axis.axvline(report["max_flash"], color="r", label="max_flash")
    axis.set_xlabel("flash bytes (weights + code)")
    axis.set_ylabel("output SQNR dB")
    axis.legend()
    try:
        write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(figure)


def summary(report: dict) -> str:
    """What the CLI prints under a budget: the flash reached, each layer's setting, the front."""
    lines = [f"edgecc: flash {report['flash_bytes']:,} B (budget {report['max_flash']:,} B), output SQNR "
             f"{report['output_sqnr_db']} dB on the calibration data" if report["max_flash"] is not None else
             f"edgecc: flash {report['flash_bytes']:,} B"]
    if report["max_latency_ms"] is not None:
        lines.append(f"edgecc: estimated latency {report['latency_ms']:.4g} ms (budget {report['max_latency_ms']:.4g} ms),"
                     f" output SQNR {report['output_sqnr_db']} dB on the calibration data")
    lines += [f"  {layer}: {setting}" for layer, setting in report["settings"].items()]
    return "\n".join(lines + ["Pareto front of the points explored:", front_table(report)])
