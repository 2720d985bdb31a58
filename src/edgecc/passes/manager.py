"""The PassManager: runs passes in order, keeps IR-property bookkeeping, calls instruments, and turns any
failure into an error that names the pass and the passes before it."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgecc.errors import EdgeccError, PassError
from edgecc.ir.core import Module
from edgecc.passes.base import PROPERTY_CHECKERS, PROPERTY_PRODUCERS, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.registry import get_pass_class


@dataclass
class PassRecord:
    name: str
    changed: bool
    seconds: float
    stats: dict[str, int]


@dataclass
class PassManager:
    passes: list[Pass]
    ctx: PassContext = field(default_factory=PassContext)
    history: list[PassRecord] = field(default_factory=list)

    def run(self, module: Module, established: set[str] | None = None) -> Module:
        """Run the pipeline on `module` in place; returns it for chaining."""
        import time

        properties = set(established if established is not None else {TOPO_SORTED})
        for pass_ in self.passes:
            if pass_.name in self.ctx.disabled:
                continue
            for prop in sorted(pass_.requires - properties):
                producer = PROPERTY_PRODUCERS.get(prop)
                if producer is None:
                    raise PassError(f"pass '{pass_.name}' requires IR property '{prop}', which no earlier pass "
                                    f"established", where=self._where(pass_))
                self._run_one(get_pass_class(producer)(), module, properties, time)
            self._run_one(pass_, module, properties, time)
        for instrument in self.ctx.instruments:
            instrument.finish()
        return module

    def _run_one(self, pass_: Pass, module: Module, properties: set[str], time) -> None:
        for instrument in self.ctx.instruments:
            instrument.before(pass_, module)
        start = time.perf_counter()
        try:
            result = pass_.run(module, self.ctx)
        except EdgeccError as exc:
            exc.where = f"{self._where(pass_)}: {exc.where}" if exc.where else self._where(pass_)
            exc.args = (exc.one_line(),)
            raise
        except Exception as exc:
            raise PassError(f"internal error: {type(exc).__name__}: {exc}", where=self._where(pass_),
                            hint="rerun with --debug for a traceback and report it") from exc
        if not isinstance(result, PassResult):
            raise PassError(f"pass returned {type(result).__name__}, expected PassResult", where=self._where(pass_))
        elapsed = time.perf_counter() - start
        self.history.append(PassRecord(pass_.spelling(), result.changed, elapsed, dict(result.stats)))
        if pass_.preserves is not None:
            properties &= set(pass_.preserves)
        properties -= set(pass_.invalidates)
        if result.changed:
            properties -= {p for p in properties if p not in (pass_.preserves or properties)}
        properties |= set(pass_.establishes)
        if self.ctx.verify_each:
            for prop in sorted(properties | {TOPO_SORTED}):
                checker = PROPERTY_CHECKERS.get(prop)
                problem = checker(module) if checker else None
                if problem:
                    raise PassError(f"--verify-each: IR property '{prop}' broken: {problem}",
                                    where=self._where(pass_))
        for instrument in self.ctx.instruments:
            instrument.after(pass_, module, result)

    def _where(self, pass_: Pass) -> str:
        before = [r.name for r in self.history]
        tail = f" (after {', '.join(before[-4:])}{', ...' if len(before) > 4 else ''})" if before else ""
        return f"pass '{pass_.name}'{tail}"
