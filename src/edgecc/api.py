"""The Python API: `edgecc.compile(model, ...)` -> CompiledModel.

Every CLI option has a keyword argument of the same name here; the CLI is a thin layer over this module.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from edgecc.errors import EdgeccError, PassError
from edgecc.frontend.onnx_import import import_model
from edgecc.ir.core import Module
from edgecc.ir.verifier import verify
from edgecc.ops.costs import module_macs
from edgecc.passes import PassContext, PassManager, load_pass_plugin, parse_pipeline, pipeline_for_level
from edgecc.passes.instruments import DumpIR, PrintAfter, TimePasses

EXECUTION_NOTES = {
    "reference": "runs on edgecc's NumPy reference interpreter",
    "native": "runs as native code generated with llvmlite",
}
RUNTIMES = tuple(EXECUTION_NOTES)


def parse_shape_bindings(specs: Iterable[str] | Mapping[str, Any] | None) -> dict[str, tuple[int, ...]]:
    """`["x=1x3x224x224"]` or `{"x": (1, 3, 224, 224)}` -> {"x": (1, 3, 224, 224)}."""
    if not specs:
        return {}
    if isinstance(specs, Mapping):
        return {k: tuple(int(d) for d in v) for k, v in specs.items()}
    result = {}
    for spec in specs:
        name, eq, dims = spec.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
            if not eq or not name or any(d < 0 for d in shape):
                raise ValueError
        except ValueError:
            raise EdgeccError(f"bad --input-shape '{spec}'", hint="write NAME=1x3x224x224") from None
        result[name] = shape
    return result


@dataclass
class CompiledModel:
    """A compiled model: run it, inspect it, export it."""

    module: Module
    target: str
    report: dict[str, Any] = field(default_factory=dict)
    native: Any = None
    """The generated code (edgecc.backends.native.NativeCode) when runtime='native'."""
    _runner: Any = None

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.module.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return list(self.module.graph.output_names)

    def run(self, feeds: Mapping[str, np.ndarray] | list[np.ndarray]) -> list[np.ndarray]:
        """Run on a dict name->array (or a list in input order); returns outputs in output order."""
        fast = self.__dict__.get("_fast_run")
        if fast is not None:
            outputs = fast(feeds)
            if outputs is not None:
                return outputs
        from edgecc.interpreter import check_feeds, run_module

        if self.native is None:
            return run_module(self.module, feeds)
        if self._runner is None:
            from edgecc.backends.native import make_runner

            self._runner = make_runner(self.module, self.native)
            self.__dict__["_fast_run"] = getattr(self._runner, "fast_run", None)
        return self._runner.run(check_feeds(self.module, feeds))

    def profile(self, feeds, runs: int = 20) -> list[dict]:
        """Per-node time of the native host code on `feeds` (median of `runs`): a list of
        {"node", "op", "ms", "share"} in execution order. Builds a second, instrumented entry once."""
        from edgecc.interpreter import check_feeds

        if self.native is None or not self.native.target.is_native:
            raise EdgeccError("profiling needs native code for this machine", hint="compile with --runtime native "
                              "and the host target (or an x86 preset this CPU supports)")
        if getattr(self, "_profiler", None) is None:
            from edgecc.backends.native import Profiler, generate

            self._profiler = Profiler(self.module, generate(self.module, self.native.target, self.native.name, True))
        return self._profiler.run(check_feeds(self.module, feeds), runs)

    def ir_text(self, large_constants: str = "inline") -> str:
        from edgecc.ir.printer import print_module

        return print_module(self.module, large_constants=large_constants)

    def to_onnx(self):
        from edgecc.frontend.onnx_export import export_model

        return export_model(self.module)

    def artifacts(self, stem: str, emit: str = "all") -> dict[str, bytes]:
        """The files for `-o stem`: {file name: bytes}. emit: all (object, static library, shared library
        for hosted targets, C header), obj, asm, llvm, c-header, lib, onnx or ir."""
        from edgecc.backends import artifacts as art
        from edgecc.backends.llvm_driver import emit as llvm_emit

        base = os.path.basename(stem)
        if emit == "onnx":
            return {f"{stem}.onnx": self.to_onnx().SerializeToString()}
        if emit == "ir":
            from edgecc.ir.printer import print_module

            side: dict = {}
            files = {f"{stem}.eir": print_module(self.module, large_constants="external", side_arrays=side).encode()}
            if side:
                import io

                buffer = io.BytesIO()
                np.savez(buffer, **side)
                files[f"{stem}.eir.npz"] = buffer.getvalue()
            return files
        if self.native is None:
            raise EdgeccError(f"--emit {emit} needs native code", hint="compile with --runtime native")
        code = self.native
        folder = os.path.dirname(stem)
        lib = os.path.join(folder, f"lib{base}")
        target = code.target
        if emit == "obj":
            return {f"{stem}.o": code.obj}
        if emit == "asm":
            return {f"{stem}.s": llvm_emit(code.modules, target, "asm")}
        if emit == "llvm":
            return {f"{stem}.ll": llvm_emit(code.modules, target, "llvm")}
        if emit == "c-header":
            return {f"{stem}.h": art.c_header(self.module, code.name, target).encode()}
        if emit == "lib":
            return {f"{lib}.a": art.static_library(code.obj, f"{base}.o", [code.entry_symbol])}
        if emit == "all":
            files = {f"{stem}.o": code.obj, f"{lib}.a": art.static_library(code.obj, f"{base}.o", [code.entry_symbol]),
                     f"{stem}.h": art.c_header(self.module, code.name, target).encode()}
            if target.hosted:
                files[f"{lib}.so"] = art.shared_library(code.obj, target, code.entry_symbol)
            return files
        raise EdgeccError(f"unknown --emit '{emit}'", hint="use all, obj, asm, llvm, c-header, lib, onnx or ir")


def _context(opt_level: int, target: str, options: dict[str, Any]) -> PassContext:
    instruments = []
    if options.pop("time_passes", False):
        instruments.append(TimePasses())
    if options.pop("print_after_all", False):
        instruments.append(PrintAfter())
    print_after = options.pop("print_after", None)
    if print_after:
        names = [print_after] if isinstance(print_after, str) else list(print_after)
        instruments.append(PrintAfter(frozenset(n for spec in names for n in spec.split(","))))
    dump_ir = options.pop("dump_ir", None)
    if dump_ir:
        instruments.append(DumpIR(dump_ir))
    debug_rewrites = bool(options.pop("debug_rewrites", False))
    disabled = options.pop("disable_passes", None) or ()
    if isinstance(disabled, str):
        disabled = disabled.split(",")
    return PassContext(opt_level=opt_level, target=target, disabled=frozenset(disabled), instruments=instruments,
                       verify_each=bool(options.pop("verify_each", False)), debug_rewrites=debug_rewrites,
                       log=(lambda m: print(m, file=sys.stderr)) if debug_rewrites else None)


def optimize(module: Module, *, opt_level: int = 2, passes: str | None = None, target: str = "host",
             progress=None, **options) -> tuple[Module, PassManager]:
    """Run the -O pipeline (or the explicit `passes` pipeline) over `module` in place. `progress`: a
    CompileProgress to step once per pass."""
    for plugin in options.pop("load_pass_plugin", None) or ():
        load_pass_plugin(plugin)
    ctx = _context(opt_level, target, options)
    if options:
        raise EdgeccError(f"unknown option(s): {', '.join(sorted(options))}",
                          hint="see help(edgecc.compile) for the options")
    pipeline = parse_pipeline(passes) if passes else pipeline_for_level(opt_level)
    if progress is not None:
        from edgecc.progress import PassProgress

        progress.expect(len(pipeline))
        ctx.instruments.append(PassProgress(progress))
    manager = PassManager(pipeline, ctx)
    manager.run(module)
    verify(module, where="after optimisation")
    return module, manager


def compile(model, target: str = "host", opt_level: int = 2, *, input_shapes=None, passes: str | None = None,
            constant_inputs=None, runtime: str = "native", name: str | None = None, mcpu: str | None = None,
            mattr: str | None = None, progress: bool | None = None, quantize: str | None = None, calibration=None,
            calibration_method: str = "minmax", keep_fp32=None, min_sqnr: float | None = None,
            prune: float | None = None, prune_scope: str = "layer", prune_block: int = 1,
            prune_channels: float | None = None,
            low_rank: float | None = None, tucker: bool = False, cluster_weights: int | None = None,
            reconstruct: bool | None = None, device=None, optimize_for: str | None = None, max_flash=None,
            max_latency_ms: float | None = None, max_ram=None, validation=None, max_accuracy_drop: float | None = None,
            plot: str | None = None, **options) -> CompiledModel:
    """Compile an ONNX model (a path, an onnx.ModelProto or an onnx_graphsurgeon.Graph).

    Args:
        model: the model to compile.
        target: where the code runs: "host", a preset (x86-64, x86-64-v3, x86-64-v4, armv8, armv8.2, armv7,
            cortex-m4, cortex-m55) or an LLVM triple (with mcpu/mattr).
        opt_level: 0..3, the named pipeline to run (see `edgecc passes`).
        input_shapes: binds symbolic input dims, e.g. {"input": (1, 3, 224, 224)} or ["input=1x3x224x224"].
        constant_inputs: {name: array}: specialise the model on these input values (they stop being inputs).
        runtime: "native" (default: machine code for `target` generated with llvmlite; run in-process for the
            host, under qemu-user for ARM Linux targets) or "reference" (edgecc's NumPy interpreter, host only).
        name: C symbol prefix of the generated code (`<name>_run`); default: the model's graph name.
        mcpu, mattr: CPU and features when `target` is an LLVM triple (or to override a preset's).
        passes: an explicit pipeline ("infer-shapes,fold-constants,dce") instead of the -O level's.
        progress: show a progress bar on stderr once the compile has taken a second (None: when stderr is a
            terminal).
        quantize: "int8" (post-training quantisation from `calibration`) or "fp16" (weights stored as float16),
            or per layer {layer name: "int8" | "fp16"} (unnamed layers stay float32; fp16 layers store their weights
            in half and compute in float32). Models that arrive quantised (QDQ or QLinear ops) compile to integer
            kernels without it.
        calibration: for int8: an .npz path (one array per input, samples stacked on the first axis), a folder
            of .npy/.npz files, a dict of stacked arrays, or an iterable of feed dicts.
        calibration_method: how activation ranges are taken from calibration: minmax, percentile or entropy.
        keep_fp32: node names (list or comma-separated) that stay float32 under quantize="int8".
        min_sqnr: for int8, the output SQNR (dB, on the calibration data) to reach by keeping the most sensitive
            layers in float32, one at a time. The report's "precision" entry lists every layer's SQNR.
        prune: unstructured magnitude pruning to this fraction of zero weights in each Conv/Gemm/MatMul
            (prune_scope="global": one threshold over all layers; prune_block=V: whole 1xV blocks of outputs, the
            sparse kernels' vector unit). Changes numerics; see docs/compression.md.
        prune_channels: structured pruning: remove this fraction of each layer's output channels (lowest L1 norm),
            shrinking every consumer.
        low_rank: factorise Gemm/MatMul and 1x1 Conv weights by truncated SVD keeping this fraction of their
            energy, where that saves bytes and MACs (or per layer: {layer name: energy}, as prune takes).
        tucker: with low_rank, also split KxK convolutions by Tucker-2 (1x1, a smaller KxK core, 1x1).
        cluster_weights: share each weight tensor's values through a k-entry codebook (k-means), stored as
            packed indices.
        reconstruct: re-fit compressed layers by least squares on `calibration` (default: whenever calibration
            data is given with a compression option).
        device: a board (a built-in name such as "stm32f4", a .toml/.json board file, or an edgecc.devices.Device):
            it sets the target (unless `target` names a different one: an error), and the report gains
            flash_bytes, ram_bytes, latency_ms, energy_mj and the per-op "estimate" (edgecc.estimate; it measures
            the generated code, so it adds to the compile time). Without it nothing is estimated.
        optimize_for: "speed" (default: O3, unrolled and vectorised kernels) or "size" (less code, for flash-bound
            microcontrollers: kernels shared across layer shapes; the default under a flash budget).
        max_flash: bytes (or "256K", "1M") of flash the model (weights + code) may take: each layer's precision and
            compression are chosen by a search on `calibration` (edgecc.budgets, docs/budgets.md); the report's
            "budget" entry has the chosen setting per layer and the Pareto front explored.
        max_latency_ms: the latency the device's cost model must show (needs a device's cost model).
        max_ram: bytes of RAM the planned arena may take, met without touching numerics (edgecc.ram.fit_ram:
            memory-aware order, in-place ops, patch-based execution of the first stage); the report gains "ram".
        validation: with a budget, an .npz of inputs and `label` (or a dict of such arrays): the search measures
            each candidate's accuracy on it and keeps the result within `max_accuracy_drop` of float32's.
        max_accuracy_drop: with `validation`, the points of top-1 accuracy (default 1.0) the chosen model may lose
            against the float32 model on it; BudgetError when the budget cannot be met within that.
        plot: with a budget, write the explored points and the front to this PNG (needs matplotlib).
        **options: time_passes, print_after_all, print_after, verify_each, dump_ir, debug_rewrites,
            disable_passes, load_pass_plugin (list of files).

    Returns:
        A CompiledModel with .run(feeds), .input_names, .output_names and .report.
    """
    if max_flash is not None or max_latency_ms is not None:
        return _compile_within_budget(
            model, max_flash=max_flash, max_latency_ms=max_latency_ms, max_ram=max_ram, validation=validation,
            max_accuracy_drop=max_accuracy_drop, device=device,
            plot=plot, target=target, opt_level=opt_level, calibration=calibration, optimize_for=optimize_for,
            chosen={"quantize": quantize, "prune": prune, "prune_channels": prune_channels, "low_rank": low_rank,
                    "cluster_weights": cluster_weights, "keep_fp32": keep_fp32, "min_sqnr": min_sqnr},
            input_shapes=input_shapes, passes=passes, constant_inputs=constant_inputs, runtime=runtime, name=name,
            mcpu=mcpu, mattr=mattr, progress=progress, calibration_method=calibration_method, **options)
    if max_ram is not None:
        from edgecc.devices import parse_size

        max_ram = parse_size(max_ram, "--max-ram")
    given = [o for o, v in (("--validation", validation), ("--max-accuracy-drop", max_accuracy_drop),
                            ("--plot", plot)) if v is not None]
    if given:
        raise EdgeccError("--validation, --max-accuracy-drop and --plot go with a budget", where=given[0],
                          hint="add --max-flash SIZE (or drop them)")
    start = time.perf_counter()
    if runtime not in RUNTIMES:
        raise EdgeccError(f"unknown runtime '{runtime}'", hint=f"use one of {', '.join(RUNTIMES)}")
    from edgecc.backends.targets import resolve_target

    if device is not None:
        from edgecc.devices import load_device, target_for

        device = load_device(device)
        target = target_for(device, target)
    resolved = resolve_target(target, mcpu, mattr)
    if optimize_for is not None:
        from dataclasses import replace

        from edgecc.backends.targets import OPTIMISE_FOR

        if optimize_for not in OPTIMISE_FOR:
            raise EdgeccError(f"unknown optimize-for '{optimize_for}'", where="--optimize-for",
                              hint="use speed or size")
        resolved = replace(resolved, optimise_for=optimize_for)
    if runtime == "reference" and not resolved.is_native:
        raise EdgeccError(f"target '{target}' needs the native runtime", where="--target",
                          hint="the reference interpreter runs on this machine only; add --runtime native")
    if not 0 <= int(opt_level) <= 3:
        raise PassError(f"unknown optimisation level {opt_level}", hint="use 0, 1, 2 or 3")
    from edgecc.progress import CompileProgress

    from edgecc import precision

    from edgecc import compression

    compressing = compression.requested(prune, prune_channels, low_rank, cluster_weights)
    compression.check_options(prune, prune_channels, low_rank, cluster_weights, prune_scope, reconstruct, calibration,
                              tucker, prune_block)
    precision.check_options(quantize, None if compressing else calibration, calibration_method)
    bar = CompileProgress(progress)
    precision_report = compression_report = None
    try:
        module = import_model(model, parse_shape_bindings(input_shapes), constant_inputs)
        bar.step("import")
        if compressing:
            compression_report = compression.compress(
                module, prune=prune, prune_scope=prune_scope, prune_block=prune_block, prune_channels=prune_channels,
                low_rank=low_rank,
                tucker=tucker, cluster_weights=cluster_weights, calibration=calibration, reconstruct=reconstruct)
            bar.step("compress")
        wanted = precision.modes(quantize)  # {"int8"/"fp16": layer names, None for all}
        if "int8" in wanted:
            keep = keep_fp32 if wanted["int8"] is None else precision.keep_for_layers(
                module, keep_fp32, compression.layer_nodes(compression_report, wanted["int8"]))
            precision_report = precision.quantize_int8(module, calibration, calibration_method, keep, progress,
                                                        min_sqnr)
        nodes_before = len(module.graph.nodes)
        module, manager = optimize(module, opt_level=int(opt_level), passes=passes, target=target, progress=bar,
                                   **options)
        if "fp16" in wanted:
            fp16 = precision.convert_fp16(module, resolved, None if wanted["fp16"] is None else
                                          compression.layer_nodes(compression_report, wanted["fp16"]))
            precision_report = fp16 if precision_report is None else dict(precision_report, fp16=fp16)
        native = None

        def build(fitted):
            from edgecc.backends.native import generate

            # Code generation needs every compile-time value folded and a memory plan.
            PassManager(parse_pipeline("infer-shapes,fold-constants,dce,plan-memory"),
                        PassContext(verify_each=manager.ctx.verify_each)).run(fitted)
            return generate(fitted, resolved, name or fitted.name, progress=bar)

        if max_ram is not None and runtime == "native":  # RAM = arena + the generated code's stack
            from edgecc.ram import fit_ram_with_stack

            module, ram_report, native = fit_ram_with_stack(module, max_ram, target, build)
        elif max_ram is not None:  # no code, no stack figure: the arena alone
            from edgecc.ram import fit_ram

            ram_report = fit_ram(module, max_ram, target)
        if runtime == "native" and native is None:
            native = build(module)
    finally:
        bar.close()
    report = build_report(module, manager, nodes_before, time.perf_counter() - start, target, runtime)
    if precision_report is not None:
        report["precision"] = precision_report
    if compression_report is not None:
        report["compression"] = compression.finish_report(compression_report, module)
    if max_ram is not None:
        report["ram"] = ram_report
    compiled = CompiledModel(module, target, report, native)
    if device is not None:
        from edgecc.estimate import estimate, report_fields

        if native is None:
            raise EdgeccError("a device estimate needs native code", where="--device", hint="use --runtime native")
        report.update(report_fields(estimate(compiled, device)))
    return compiled


def _compile_within_budget(model, *, max_flash, max_latency_ms, validation, max_accuracy_drop, plot, target,
                           chosen: dict, optimize_for, calibration, device, **compile_options) -> CompiledModel:
    """compile() under device budgets: the per-layer search of edgecc.budgets (which compiles the candidates)."""
    from edgecc import budgets

    given = [k for k, v in chosen.items() if v is not None]
    if given:
        option = "--" + given[0].replace("_", "-")
        raise EdgeccError("a flash or latency budget chooses precision and compression per layer itself",
                          where=option, hint=f"drop {option}, or drop the budget")
    if max_flash is not None:
        from edgecc.devices import parse_size

        max_flash = parse_size(max_flash, "--max-flash")
    if max_latency_ms is not None and device is None:
        raise EdgeccError("a latency budget needs a device's cost model", where="--max-latency",
                          hint="add --device NAME (e.g. stm32f4) or a board file")
    if device is not None:
        from edgecc.devices import load_device, target_for

        device = load_device(device)
        target = target_for(device, target)
    # flash-bound code (shared kernels, kernels/shared.py) only under a flash budget: it is slower, which a latency
    # budget alone would pay for nothing
    compile_options["optimize_for"] = optimize_for or ("size" if max_flash is not None else "speed")
    compiled, report = budgets.search(model, target=target, max_flash=max_flash, max_latency_ms=max_latency_ms,
                                      calibration=calibration, validation=validation,
                                      max_accuracy_drop=max_accuracy_drop, device=device,
                                      compile_options=compile_options)
    compiled.report["budget"] = report
    if plot is not None:
        budgets.plot(report, plot)
    return compiled


def build_report(module: Module, manager: PassManager, nodes_before: int, seconds: float, target: str,
                 runtime: str) -> dict:
    graph = module.graph
    weights = sum(v.const.nbytes for v in graph.constants())
    plan = module.memory_plan
    return {
        "model": module.name,
        "target": target,
        "runtime": runtime,
        "execution": EXECUTION_NOTES[runtime],
        "opset": module.opset,
        "nodes_before": nodes_before,
        "nodes_after": len(graph.nodes),
        "macs": module_macs(graph),
        "weights_bytes": int(weights),
        "arena_bytes": plan.arena_bytes if plan else None,
        "arena_lower_bound_bytes": plan.lower_bound_bytes if plan else arena_lower_bound(module),
        "intermediates_bytes": plan.unplanned_bytes if plan else None,
        "compile_seconds": round(seconds, 4),
        "passes": [{"name": r.name, "changed": r.changed, "seconds": round(r.seconds, 5), "stats": r.stats}
                   for r in manager.history],
        "ops": _op_histogram(module),
    }


def _op_histogram(module: Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in module.graph.nodes:
        counts[node.op] = counts.get(node.op, 0) + 1
    return dict(sorted(counts.items()))


def arena_lower_bound(module: Module) -> int:
    """Peak bytes of activations alive at once in the current node order: no memory plan for this order
    can use less (inputs and outputs included, constants excluded)."""
    graph = module.graph
    last_use: dict[int, int] = {}
    for step, node in enumerate(graph.nodes):
        for value in node.inputs:
            if value is not None and not value.is_const:
                last_use[value._id] = step
    end = len(graph.nodes)
    for value in graph.outputs:
        last_use[value._id] = end
    live = sum(v.type.nbytes for v in graph.inputs)
    peak = live
    freed_at: dict[int, int] = {}
    for value in graph.inputs:
        freed_at.setdefault(last_use.get(value._id, -1), 0)
        freed_at[last_use.get(value._id, -1)] += value.type.nbytes
    for step, node in enumerate(graph.nodes):
        for value in node.outputs:
            if value.type is not None:
                live += value.type.nbytes
                key = last_use.get(value._id, step)
                freed_at[key] = freed_at.get(key, 0) + value.type.nbytes
        peak = max(peak, live)
        live -= freed_at.pop(step, 0)
    return int(peak)
