"""Run the sections of `dynamo check` concurrently, within one time budget.

Each section runs in a daemon thread: the probes block in libraries (NVML, psutil, /proc,
sockets, child interpreters), and a daemon thread is the one thing that can be abandoned
when a call hangs (NVML can, on a wedged driver) without delaying the exit. A section that
misses the deadline keeps the results it already produced and gets one error line saying
it did not finish.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from importlib import import_module

from dynamo.core.check.context import CheckContext, CheckOptions
from dynamo.core.check.model import SECTIONS, CheckReport, CheckResult, Results, SectionReport, apply_strict
from dynamo.core.errors import UsageError

# The whole check must finish in under 3 s: the interpreter, typer and the imports take
# 0.3 s on an idle 2-core machine (up to 0.8 s on a busy one), rendering and exit ~0.1 s.
DEFAULT_BUDGET = 2.0

SectionFn = Callable[[CheckContext, Results], None]


def _lazy(module: str) -> SectionFn:
    """A section whose module is imported in its own thread, overlapping the other sections' waits."""

    def run(ctx: CheckContext, out: Results) -> None:
        import_module(f"dynamo.core.check.{module}").run(ctx, out)

    return run


def default_sections() -> dict[str, SectionFn]:
    return {name: _lazy(name) for name in ("system", "gpus", "software", "profile", "live")}


def parse_sections(only: Iterable[str] | None) -> list[str]:
    """``--only`` values (repeatable, comma-separated) as section names; UsageError for unknown ones."""
    if not only:
        return list(SECTIONS)
    chosen: list[str] = []
    for value in only:
        for name in value.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name == "gpu":
                name = "gpus"
            if name not in SECTIONS:
                raise UsageError(f"--only {name}: unknown section; choose from {', '.join(SECTIONS)}")
            if name not in chosen:
                chosen.append(name)
    return [name for name in SECTIONS if name in chosen]


class _SectionThread(threading.Thread):
    def __init__(self, name: str, fn: SectionFn, ctx: CheckContext):
        super().__init__(name=f"check-{name}", daemon=True)
        self.fn = fn
        self.ctx = ctx
        self.results = Results(name)
        self.usage_error: UsageError | None = None
        self.started_at = 0.0
        self.seconds = 0.0

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            self.fn(self.ctx, self.results)
        except UsageError as exc:
            self.usage_error = exc
        except Exception as exc:  # a bug in a probe must not hide what the other sections found
            self.results.error("internal error", f"this section crashed: {type(exc).__name__}: {exc}",
                               "please report it with the details", details=traceback.format_exc().splitlines())
        finally:
            self.seconds = time.monotonic() - self.started_at


def run_checks(
    options: CheckOptions,
    sections: Iterable[str] | None = None,
    strict: bool = False,
    budget: float = DEFAULT_BUDGET,
    registry: Mapping[str, SectionFn] | None = None,
) -> CheckReport:
    """Run the chosen sections concurrently; return the report. Raises UsageError (exit 2)."""
    started = time.monotonic()
    ctx = CheckContext(options)
    ctx.started = started
    ctx.deadline = started + budget
    registry = registry or default_sections()
    names = list(sections) if sections is not None else list(registry)
    threads = [_SectionThread(name, registry[name], ctx) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, ctx.deadline - time.monotonic()))
    for thread in threads:
        if thread.usage_error is not None:
            raise thread.usage_error
    reports = []
    for thread in threads:
        results = thread.results.snapshot()
        finished = not thread.is_alive()
        seconds = thread.seconds if finished else time.monotonic() - thread.started_at
        section = thread.results.section
        if not finished:
            results.append(CheckResult(
                section, "timeout", "error",
                f"this section did not finish within the check's {budget:g}s budget; its remaining checks were skipped",
                f"run dynamo check --only {section} to see what hangs (NVML on a wedged driver, an unreachable host)"))
        reports.append(SectionReport(section, SECTIONS.get(section, section), results, seconds, finished))
    report = CheckReport(reports, time.monotonic() - started, strict, _context(options, ctx))
    if strict:
        apply_strict(report.results)
    return report


def _context(options: CheckOptions, ctx: CheckContext) -> dict:
    data = {"profile": options.profile, "assume_gpus": ctx.assume_gpus, "url": options.url, "run": options.run}
    return {k: v for k, v in data.items() if v is not None}
