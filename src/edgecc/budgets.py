"""Flash and latency budgets: a search over per-layer precision and compression settings.

`edgecc.compile(..., max_flash=...)` starts from a size, not from a list of passes. Each weight layer can take one
of a few settings (SETTINGS: float32, float16 weights, int8, pruning then int8, low rank (float, or then int8), a
16/4/2-entry codebook); a setting's cost is the change of the stored weight bytes it causes, measured by compressing
and quantising that one layer and running the -O3 pipeline for the target (encode-sparsity's encodings, counted by
compression.stored_weight_bytes: the same functions the compiled model's bytes come from), and its loss the model's
output SQNR on calibration samples when only that layer takes it (after the layer-wise re-fit). The search is
greedy, in the spirit of HAQ/AMC but without training: from all-float32 it repeatedly takes the move (one layer to
a smaller setting) with the most bytes saved per unit of added output noise (noise powers of independent layers
add), until the estimated flash fits. The estimate is then checked by compiling the choice and reading the
object's real flash (weights + code: int8 and codebook kernels add code the estimate does not know about); when it
is over, the greedy continues towards the choice's estimate less the overshoot. Every compiled point and every greedy step is kept, and the report lists the Pareto front
of flash, latency (when a device's cost model gives it) and SQNR/accuracy over the compiled points (the greedy's
estimated steps are listed with them in "explored", but an estimate does not push a compiled point off the front).

A latency budget steers the search the same way: each setting's latency cost on a layer comes from the device
estimate (edgecc.estimate's per-op figures) of one compile with every layer at that setting, the layer's nodes (the
layer's own and its `<layer>_*` helpers such as a codebook decode) against the same nodes of the float32 compile;
the greedy then takes the moves with the most milliseconds saved per added noise until the estimated latency fits,
and the compiled choice is checked (the Quantize/Dequantize nodes between layers of different precision are not in
any layer's cost, so the goal is lowered by the overshoot as for flash). Which settings are faster is the board's
business: on the Cortex-M4 boards int8 kernels are slower than float32 and only 90%-pruned int8 layers are faster.

With labelled `validation` data accuracy steers too, but does not replace SQNR in the ranking: top-1 accuracy on a
few hundred samples moves in steps of several tenths of a point, most single-layer changes show no change at all,
and accuracy losses do not add the way noise powers do. So each candidate's accuracy drop (that layer alone, on the
validation set) rules out the settings that alone lose more than `max_accuracy_drop`; every compiled choice is
checked against the floor (float32's validation accuracy minus `max_accuracy_drop`); a choice under it loses its
setting that loses the most alone (accuracy, then noise), that layer goes back to float32 and the greedy chooses
again. The refinement keeps a point only if it is within the floor and more accurate (then higher SQNR).

When even the smallest (or, under a latency budget alone, the fastest) setting of every layer does not fit,
BudgetError names the budget, the smallest flash or latency reached (compiled, not estimated; within the accuracy
floor when there is one) and what to try.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from edgecc.errors import BudgetError, EdgeccError
from edgecc.ir.core import Module


@dataclass(frozen=True)
class Setting:
    """One layer's precision/compression: `prune` (fraction of zero weights) or `rank` (low-rank factorisation
    keeping that fraction of the weight's energy; Tucker-2 for KxK convolutions), then int8 or float16 weights; or a
    `clusters`-entry codebook (clustered weights stay float: they are no longer constants int8 could quantise)."""

    name: str
    prune: float | None = None
    clusters: int | None = None
    int8: bool = False
    fp16: bool = False
    rank: float | None = None


FP32 = Setting("fp32")
SETTINGS = (FP32, Setting("fp16", fp16=True), Setting("int8", int8=True),
            Setting("prune 80% + int8", prune=0.8, int8=True), Setting("prune 90% + int8", prune=0.9, int8=True),
            Setting("low rank 95%", rank=0.95), Setting("low rank 90% + int8", rank=0.9, int8=True),
            Setting("16 clusters", clusters=16), Setting("4 clusters", clusters=4), Setting("2 clusters", clusters=2),
            Setting("16 clusters + fp16 bias", clusters=16, fp16=True),
            Setting("4 clusters + fp16 bias", clusters=4, fp16=True),
            Setting("2 clusters + fp16 bias", clusters=2, fp16=True))
"""The per-layer candidates. fp16 halves the float bytes (weights widened at load, float32 arithmetic); int8 is
about a quarter of them plus per-channel scales and int32 biases; pruned int8 weights are stored sparse where
encode-sparsity finds it smaller and not slower (QGemm, 1x1 QLinearConv on microcontrollers); low rank stores
r (K + N) instead of K N weights where the rank keeping that energy is small enough (only there is it a candidate);
codebooks store 4, 2 or 1 bits per weight (docs/compression-results.md), and with "fp16 bias" the layer's float32
bias in half as well: at 2 bits per weight the biases are a large share of a clustered model (digits_mobilenet's
834 float32 biases are 3,336 bytes, 23% of its 15% budget), and half of them costs about 5e-4 relative error."""

PROBE_SAMPLES = 48
"""Calibration samples each candidate's SQNR is measured on (and its single layer re-fitted on): enough to rank
settings, few enough that the interpreter runs each candidate in about a second on the digits models."""

MAX_ROUNDS = 8
"""Compiles of a greedy choice before the search gives up refining and tries the smallest setting everywhere."""

DEFAULT_ACCURACY_DROP = 1.0
"""Points of validation accuracy below float32 a budget search may lose when `validation` is given and
`max_accuracy_drop` is not."""


@dataclass
class Candidate:
    layer: str
    setting: Setting
    bytes_delta: int      # stored weight bytes, this setting minus float32 (negative: saves)
    sqnr_db: float        # the model's output SQNR with only this layer changed
    latency_delta_ms: float = 0.0  # the layer's estimated latency, this setting minus float32 (latency budgets)
    accuracy_drop: float | None = None  # validation accuracy lost with only this layer changed (points)

    @property
    def noise(self) -> float:
        """Output noise power relative to the signal (what adds up over layers)."""
        return 0.0 if math.isinf(self.sqnr_db) else 10.0 ** (-self.sqnr_db / 10.0)


def search(model, *, target: str = "cortex-m4", max_flash: int | None = None, max_latency_ms: float | None = None,
           calibration=None, validation=None, max_accuracy_drop: float | None = None, device=None,
           compile_options: dict | None = None, log=None) -> tuple:
    """Compile `model` within `max_flash` bytes (weights + code) and `max_latency_ms` (needs `device`'s cost model)
    and, with labelled `validation` data, within `max_accuracy_drop` points of the float32 accuracy on it;
    returns (CompiledModel, budget report). Raises BudgetError when no setting fits."""
    import edgecc
    from edgecc.calibration import load_calibration
    from edgecc.frontend.onnx_import import import_model
    from edgecc.precision import PREPARE_PIPELINE, run_pipeline

    if calibration is None:
        raise EdgeccError("a flash or latency budget needs calibration data", where="--max-flash",
                          hint="pass --calibration DATA.npz: each layer's sensitivity is measured on it, and "
                               "compressed layers are re-fitted on it")
    max_accuracy_drop = check_accuracy_drop(max_accuracy_drop, validation)
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
        uses_data = args["prune"] or args["cluster_weights"] or args["low_rank"] or \
            "int8" in (args["quantize"] or {}).values()
        compiled = edgecc.compile(model, target=target, device=device, calibration=calibration if uses_data else None,
                                  **options, **args)
        point = _measure(compiled, choice, label, prepared, probe, labelled, device)
        points.append(point)
        say(f"{label}: flash {point['flash_bytes']} bytes, output SQNR {point['sqnr_db']} dB"
            + ("" if point["accuracy"] is None else f", accuracy {point['accuracy']}%"))
        return compiled, point

    baseline, base_point = build({}, "float32")
    floor = None if labelled is None else round(base_point["accuracy"] - max_accuracy_drop, 2)

    def fits(point: dict) -> bool:
        return _fits(point, max_flash, max_latency_ms, floor)

    def report(point, choice, candidates=(), rejected=()) -> dict:
        return _report(point, choice, points, list(candidates), max_flash, max_latency_ms,
                       {"fp32_accuracy": base_point["accuracy"], "max_accuracy_drop": max_accuracy_drop,
                        "accuracy_floor": floor, "rejected": list(rejected)})

    if fits(base_point):
        return baseline, report(base_point, {})
    layers = _layers(prepared)
    say(f"measuring {len(layers)} layers x {len(SETTINGS) - 1} settings on {len(probe)} calibration samples"
        + ("" if labelled is None else f" and {len(labelled[0])} validation samples"))
    candidates = _candidates(prepared, layers, target, probe, options["opt_level"], labelled)
    rejected = _reject(candidates, max_accuracy_drop) if labelled is not None else []
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
    banned = False  # the last compile was under the accuracy floor and a layer's setting was taken away
    for round_ in range(MAX_ROUNDS):
        if max_flash is None and not steer_latency:
            break
        moved = banned
        if max_flash is not None:
            moved |= _greedy(choice, candidates, "bytes_delta", base_point, goal, points)
        if steer_latency:
            moved |= _greedy(choice, candidates, "latency_delta_ms", base_point, latency_goal, points)
        if not moved and round_ > 0:
            break  # the goals moved but nothing cheaper is left: the last compile stands
        compiled, point = build(choice, f"search round {round_ + 1}")
        if fits(point) or not moved:
            break
        # what the estimate missed (kernel code; the Quantize/Dequantize between layers) is taken off the goal, so
        # the next round's estimate lands under it by that much (the last estimate may already be under the old goal)
        if max_flash is not None and point["flash_bytes"] > max_flash:
            goal = max_flash - (point["flash_bytes"]
                                - _estimate(_chosen(choice, candidates), base_point, "bytes_delta"))
        if steer_latency and point["latency_ms"] > max_latency_ms:
            latency_goal = max_latency_ms - (point["latency_ms"] - _estimate(_chosen(choice, candidates), base_point,
                                                                             "latency_delta_ms"))
        banned = floor is not None and point["accuracy"] < floor and _ban(choice, candidates, rejected, point)
        if floor is not None and point["accuracy"] < floor and not banned:
            break  # every layer is back at float32 as far as accuracy goes: nothing left to try
    if not fits(point):
        cost = "bytes_delta" if max_flash is not None or not steer_latency else "latency_delta_ms"
        smallest = {name: min(candidates[name], key=lambda c: getattr(c, cost)).setting for name in layers}
        if smallest != choice:
            compiled, point = build(smallest, ("smallest" if cost == "bytes_delta" else "fastest")
                                    + " setting of every layer")
            choice = smallest
        if not fits(point):
            raise _error(points, max_flash, max_latency_ms, floor)
    if max_flash is not None and point["flash_bytes"] < max_flash:
        # the greedy steps are coarse: spend the bytes left on the layers that lose the most, and keep it if it fits
        better = dict(choice)
        if _upgrade(better, candidates, max_flash - point["flash_bytes"]):
            trial, trial_point = build(better, "refined with the bytes left")
            if fits(trial_point) and _quality(trial_point) > _quality(point):
                compiled, point, choice = trial, trial_point, better
    return compiled, report(point, choice, [c for cs in candidates.values() for c in cs], rejected)


def check_accuracy_drop(max_accuracy_drop, validation) -> float | None:
    """The accuracy tolerance in points: DEFAULT_ACCURACY_DROP when validation data is given without one; None
    without validation data (nothing to measure accuracy on: the search then minimises output noise only)."""
    if validation is None:
        if max_accuracy_drop is not None:
            raise EdgeccError("--max-accuracy-drop needs labelled data to measure accuracy on",
                              where="--max-accuracy-drop", hint="add --validation DATA.npz (inputs and `label`)")
        return None
    if max_accuracy_drop is None:
        return DEFAULT_ACCURACY_DROP
    ok = isinstance(max_accuracy_drop, (int, float)) and not isinstance(max_accuracy_drop, bool)
    if not ok or not math.isfinite(max_accuracy_drop) or not 0 <= max_accuracy_drop <= 100:
        raise EdgeccError(f"the accuracy drop must be a number of points in [0, 100], got {max_accuracy_drop!r}",
                          where="--max-accuracy-drop", hint="e.g. --max-accuracy-drop 1.0 (one point of top-1 "
                                                            "accuracy below float32)")
    return float(max_accuracy_drop)


def _quality(point: dict) -> tuple:
    """What the refinement improves: validation accuracy first where known (the floor's measure), then SQNR."""
    return (point["accuracy"] if point["accuracy"] is not None else 0.0, point["sqnr_db"])


def _layers(module: Module) -> list[str]:
    from edgecc.passes.prune import weight_layers

    return [n.name for n in weight_layers(module.graph)]


def _compile_args(choice: dict[str, Setting]) -> dict:
    """edgecc.compile's per-layer options for `choice` (layers it does not name, or names as fp32, stay float32)."""
    prune = {name: s.prune for name, s in choice.items() if s.prune is not None}
    clusters = {name: s.clusters for name, s in choice.items() if s.clusters is not None}
    rank = {name: s.rank for name, s in choice.items() if s.rank is not None}
    quantize = {name: "int8" if s.int8 else "fp16" for name, s in choice.items() if s.int8 or s.fp16}
    return {"prune": prune or None, "cluster_weights": clusters or None, "low_rank": rank or None,
            "tucker": bool(rank), "quantize": quantize or None}


def _apply(prepared: Module, choice: dict[str, Setting], samples: list, target: str, opt_level: int) -> Module:
    """A copy of the prepared float module with `choice` applied as edgecc.compile applies it: compressed and
    re-fitted, int8 layers quantised, the -O pipeline for `target` (encode-sparsity's encodings), fp16 weights."""
    from edgecc import compression, precision
    from edgecc.api import optimize

    module = prepared.clone()
    args = _compile_args(choice)
    done = None
    if args["prune"] or args["cluster_weights"] or args["low_rank"]:
        done = compression.compress(module, prune=args["prune"], cluster_weights=args["cluster_weights"],
                                    low_rank=args["low_rank"], tucker=args["tucker"], calibration=samples)
    wanted = precision.modes(args["quantize"])
    if "int8" in wanted:
        precision.quantize_int8(module, samples, keep_fp32=precision.keep_for_layers(
            module, None, compression.layer_nodes(done, wanted["int8"])))
    module, _ = optimize(module, opt_level=opt_level, target=target)
    if "fp16" in wanted:
        precision.convert_fp16(module, None, compression.layer_nodes(done, wanted["fp16"]))
    return module


def _candidates(prepared: Module, layers: list[str], target: str, probe: list, opt_level: int, labelled=None
                ) -> dict[str, list[Candidate]]:
    """Each layer's settings with their stored weight bytes (against float32, counted by
    compression.stored_weight_bytes) and output SQNR when only that layer takes them, and with `labelled` data the
    accuracy points lost; settings that save nothing on this layer (skipped as too small, dense anyway, a rank too
    high to pay) are left out."""
    from edgecc.compression import output_sqnr, stored_weight_bytes

    float32 = _apply(prepared, {}, probe, target, opt_level)
    base = stored_weight_bytes(float32)
    base_accuracy = None if labelled is None else accuracy(float32, *labelled)
    table: dict[str, list[Candidate]] = {}
    for name in layers:
        table[name] = [Candidate(name, FP32, 0, float("inf"), accuracy_drop=None if labelled is None else 0.0)]
        for setting in SETTINGS[1:]:
            module = _apply(prepared, {name: setting}, probe, target, opt_level)
            delta = stored_weight_bytes(module) - base
            if delta < 0:
                drop = None if labelled is None else round(base_accuracy - accuracy(module, *labelled), 2)
                table[name].append(Candidate(name, setting, delta, output_sqnr(prepared, module, probe),
                                             accuracy_drop=drop))
    return table


def _reject(candidates: dict[str, list[Candidate]], tolerance: float) -> list[dict]:
    """Take out the settings that alone lose more validation accuracy than `tolerance`: no choice containing them
    is likely to stay within the floor (accuracy losses rarely cancel). Returns what was taken out and why."""
    rejected = []
    for name, options in candidates.items():
        for c in [c for c in options if c.accuracy_drop is not None and c.accuracy_drop > tolerance]:
            options.remove(c)
            rejected.append({"layer": name, "setting": c.setting.name,
                             "why": f"alone it loses {c.accuracy_drop} points of validation accuracy"})
    return rejected


def _ban(choice: dict[str, Setting], candidates: dict[str, list[Candidate]], rejected: list, point: dict) -> bool:
    """A compiled choice fell under the accuracy floor: take away the chosen setting that loses the most on its own
    (validation accuracy, then output noise), put its layer back to float32 and let the greedy choose again."""
    chosen = list(_chosen({name: s for name, s in choice.items() if s != FP32}, candidates).values())
    if not chosen:
        return False
    worst = max(chosen, key=lambda c: (c.accuracy_drop or 0.0, c.noise))
    candidates[worst.layer].remove(worst)
    choice[worst.layer] = FP32
    rejected.append({"layer": worst.layer, "setting": worst.setting.name,
                     "why": f"'{point['label']}' had {point['accuracy']}% validation accuracy, under the floor"})
    return True


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


def _chosen(choice: dict[str, Setting], candidates: dict[str, list[Candidate]]) -> dict[str, Candidate]:
    """Each layer's candidate for the setting `choice` gives it."""
    return {name: next(c for c in candidates[name] if c.setting == s) for name, s in choice.items()}


def _estimate(current: dict[str, Candidate], base: dict, cost: str) -> float:
    """The flash bytes ("bytes_delta") or latency ("latency_delta_ms") of the layers' `current` candidates as they
    predict it from the float32 point `base`."""
    start = base["flash_bytes"] if cost == "bytes_delta" else base["latency_ms"]
    return start + sum(getattr(c, cost) for c in current.values())


def _greedy(choice: dict[str, Setting], candidates: dict[str, list[Candidate]], cost: str, base: dict, goal,
            points: list) -> bool:
    """Move layers to settings that cost less by `cost` ("bytes_delta": flash, "latency_delta_ms": latency), most
    saved per added noise first, until the estimate (from the float32 point `base`) is at most `goal` (or nothing
    cheaper is left); `choice` is updated in place. Returns whether anything moved."""
    current = _chosen(choice, candidates)
    moved = False
    while True:
        if _estimate(current, base, cost) <= goal:
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
        latency = None if base["latency_ms"] is None else round(_estimate(current, base, "latency_delta_ms"), 4)
        points.append({"label": f"estimate: {best.layer} -> {best.setting.name}", "measured": False,
                       "flash_bytes": int(_estimate(current, base, "bytes_delta")),
                       "sqnr_db": round(-10 * math.log10(noise), 2) if noise > 0 else float("inf"),
                       "latency_ms": latency if cost == "latency_delta_ms" else None, "accuracy": None})


def _upgrade(choice: dict[str, Setting], candidates: dict[str, list[Candidate]], slack: int) -> bool:
    """Move layers to settings that lose less, most noise removed per byte first, within `slack` estimated bytes;
    `choice` is updated in place. Returns whether anything moved."""
    current = _chosen(choice, candidates)
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


def _fits(point: dict, max_flash, max_latency_ms, floor: float | None = None) -> bool:
    if max_flash is not None and point["flash_bytes"] > max_flash:
        return False
    if floor is not None and point["accuracy"] < floor:
        return False
    return max_latency_ms is None or point["latency_ms"] is None or point["latency_ms"] <= max_latency_ms


def _error(points: list[dict], max_flash, max_latency_ms, floor: float | None = None) -> BudgetError:
    """The budget that failed, with the smallest value any compiled point reached (within the accuracy floor when
    there is one: the float32 point always is)."""
    measured = [p for p in points if p["measured"]]
    compiled = [p for p in measured if floor is None or p["accuracy"] >= floor]
    within = None if floor is None else f"within the accuracy floor of {floor}%"

    def anyway(key: str, unit: str) -> str:
        """Under a floor: the smallest point below it, so the user sees what the floor costs."""
        if floor is None:
            return ""
        below = [q for q in measured if q["accuracy"] < floor and q[key] is not None]
        if not below:
            return ("; settings that alone lose more than the allowed drop were not tried: allow a larger drop "
                    "(--max-accuracy-drop) or raise the budget")
        p = min(below, key=lambda q: q[key])
        return (f"; under the floor the smallest compiled was {p[key]:g} {unit} at {p['accuracy']}%: raise the "
                "budget or allow a larger drop (--max-accuracy-drop)")

    smallest = min(compiled, key=lambda p: p["flash_bytes"])
    if max_flash is not None and smallest["flash_bytes"] > max_flash:
        return BudgetError("max_flash", max_flash, smallest["flash_bytes"], where="--max-flash", within=within,
                           hint=f"the kernels' code alone is {smallest['code_bytes']} bytes there; raise the budget to "
                                "at least the smallest reachable, use a board with more flash, or a smaller model "
                                f"(fewer or equal-shaped layers){anyway('flash_bytes', 'bytes')}")
    timed = [p["latency_ms"] for p in compiled if p["latency_ms"] is not None]
    if max_latency_ms is None or not timed:  # the flash budget is met by some point, but not within the floor
        return BudgetError("max_flash", max_flash, smallest["flash_bytes"], where="--max-accuracy-drop",
                           within=within, hint="no compiled point met the budget and the accuracy floor together"
                                               f"{anyway('flash_bytes', 'bytes')}")
    return BudgetError("max_latency_ms", max_latency_ms, min(timed), unit="ms", where="--max-latency", within=within,
                       hint="no per-layer setting the search tried is fast enough on this board (its compiled "
                            "points are in the report's explored list); raise the budget, pick a faster board "
                            f"(--device), or a smaller model{anyway('latency_ms', 'ms')}")


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


def _report(point: dict, choice: dict[str, Setting], points: list, candidates: list, max_flash, max_latency_ms,
            accuracy_entries: dict) -> dict:
    return {"max_flash": max_flash, "max_latency_ms": max_latency_ms, "flash_bytes": point["flash_bytes"],
            "latency_ms": point["latency_ms"], "output_sqnr_db": point["sqnr_db"], "accuracy": point["accuracy"],
            **accuracy_entries, "settings": {name: s.name for name, s in choice.items()},
            "candidates": [{"layer": c.layer, "setting": c.setting.name, "bytes_delta": c.bytes_delta,
                            "sqnr_db": c.sqnr_db, "latency_delta_ms": c.latency_delta_ms,
                            "accuracy_drop": c.accuracy_drop} for c in candidates],
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
    if report.get("accuracy_floor") is not None:
        lines.append(f"edgecc: validation accuracy {report['accuracy']}% (float32 {report['fp32_accuracy']}%, floor "
                     f"{report['accuracy_floor']}%)")
    lines += [f"  {layer}: {setting}" for layer, setting in report["settings"].items()]
    return "\n".join(lines + ["Pareto front of the points explored:", front_table(report)])
