"""Fit a RAM budget without touching numerics: memory-aware node order, in-place ops, patch-based execution.

`fit_ram` is what `max_ram=` (`--max-ram`) runs on the optimised module before code generation. The steps
cost nothing or only MACs, never accuracy, and go cheapest first: the node order and in-place elementwise ops
(free; plan-memory's defaults), then patch-based execution of the first stage (extra halo MACs: the patching
with the least overhead whose arena fits). What is left after that can only come from smaller activations
(int8), which is the budget search's business (edgecc.budgets), so the error says so.
"""

from __future__ import annotations

from edgecc.errors import BudgetError
from edgecc.ir.core import Module
from edgecc.passes.patch_execution import GRIDS, best_patch, find_value, patch
from edgecc.passes.plan_memory import plan, plan_best_order

MAX_HALO_OVERHEAD = 1.0
"""Patchings with more extra MACs than the model's own (2x the work) are not tried."""


def arena_figures(module: Module) -> dict:
    """The arena of the plain layer-by-layer plan (graph order, only views in place) and of plan-memory's
    defaults (memory-aware order, in-place elementwise ops), on copies: `module` keeps its order."""
    trial = module.clone()
    layered = plan(trial, in_place=False).arena_bytes
    best = plan_best_order(trial).arena_bytes
    return {"layer_by_layer_arena_bytes": layered, "ordered_in_place_arena_bytes": best}


def fit_ram(module: Module, max_ram_bytes: int | None, target=None, *, stack_bytes: int = 0,
            max_overhead: float = MAX_HALO_OVERHEAD) -> dict:
    """Make the planned arena plus `stack_bytes` fit `max_ram_bytes`, changing `module` as little as needed:
    (1) memory-aware order and in-place elementwise ops, (2) patch-based execution of the first stage, the fitting
    choice with the least halo MAC overhead. With `max_ram_bytes` None only (1) is applied. Returns a report:
    the arena of each step, the patching chosen (cut, grid, halo MAC overhead) and the final `arena_bytes`.
    Raises BudgetError naming the budget and the smallest arena + stack reached when nothing fits.
    `target` (a name or preset) only names the target in the error (budget "max_ram", where "--max-ram", as the
    other budgets of edgecc.budgets)."""
    report = {"max_ram_bytes": max_ram_bytes, "stack_bytes": stack_bytes, **arena_figures(module), "patch": None}
    current = plan_best_order(module)  # keeps the better order in `module`
    report["arena_bytes"] = current.arena_bytes
    if max_ram_bytes is None or current.arena_bytes + stack_bytes <= max_ram_bytes:
        report["fits"] = True
        return report
    room = max_ram_bytes - stack_bytes
    tried = best_patch(module, GRIDS, max_overhead)
    smallest = current.arena_bytes
    for choice in sorted(tried, key=lambda t: (t["halo_mac_overhead"], t["cut_bytes"], t["peak_bytes"])):
        if choice["peak_bytes"] > room:
            continue  # its lower bound already misses: no placement can fit
        arena = _patched_arena(module, choice)
        smallest = min(smallest, arena)
        if arena <= room:
            stats = patch(module, find_value(module, choice["cut"]), *choice["grid"])
            plan_best_order(module)
            report.update(arena_bytes=arena, fits=True, patch={**stats, "arena_bytes": arena})
            return report
    if tried:  # none fits: the smallest arena any patching reaches, for the message
        smallest = min(smallest, _patched_arena(module, min(tried, key=lambda t: t["peak_bytes"])))
    on = f" on target {target}" if isinstance(target, str) else ""
    raise BudgetError("max_ram", max_ram_bytes, smallest + stack_bytes, where="--max-ram",
                      hint=f"operator ordering, in-place ops and patch-based execution reached this arena{on}"
                           + (f" (+ {stack_bytes} bytes of stack)" if stack_bytes else "")
                           + "; int8 activations take a quarter of float32's bytes: add --quantize int8 "
                             "(with --calibration), or choose a board with more RAM")


STACK_ROUNDS = 3
"""Fits of the arena to the room left by the stack before giving up: the stack bound is the entry's frame plus the
largest kernel frame, and patching changes it little (smaller tiles, the same kernel shapes; the entry keeps few
values in registers across calls), so the second fit normally holds; each round uses the largest bound seen."""


def fit_ram_with_stack(module: Module, max_ram_bytes: int | None, target, build) -> tuple[Module, dict, object]:
    """`max_ram` counted as arena + stack, the stack read from the generated code by the bound the device estimate
    uses (edgecc.estimate.stack_bytes). `build(module)` generates the native code of a fitted module. The arena is
    fitted first with no stack (the stack is only known once code exists); when arena + stack is over the budget the
    fit starts again from a copy of the unfitted module with the room the stack leaves, until the code built from it
    has a stack no larger than the one it was fitted for. Returns (fitted module, report with stack_bytes and
    ram_bytes, code); raises BudgetError as fit_ram does, or naming the arena + stack reached."""
    from edgecc.estimate import stack_bytes

    unfitted = module.clone() if max_ram_bytes is not None else None
    report = fit_ram(module, max_ram_bytes, target)
    code = build(module)
    stack = stack_bytes(code)
    for _ in range(STACK_ROUNDS):
        if max_ram_bytes is None or module.memory_plan.arena_bytes + stack <= max_ram_bytes:
            arena = int(module.memory_plan.arena_bytes)
            report.update(arena_bytes=arena, stack_bytes=stack, ram_bytes=arena + stack)
            return module, report, code
        module = unfitted.clone()
        report = fit_ram(module, max_ram_bytes, target, stack_bytes=stack)
        code = build(module)
        stack = max(stack, stack_bytes(code))
    raise BudgetError("max_ram", max_ram_bytes, int(module.memory_plan.arena_bytes) + stack, where="--max-ram",
                      hint=f"the generated code's stack ({stack} bytes) kept growing as the arena was fitted to the "
                           "room it left; raise the budget or add --quantize int8 (with --calibration)")


def _patched_arena(module: Module, choice: dict) -> int:
    trial = module.clone()
    patch(trial, find_value(trial, choice["cut"]), *choice["grid"])
    return plan_best_order(trial).arena_bytes
