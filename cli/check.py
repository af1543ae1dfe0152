"""``dynamo check``: environment and profile sanity check (parse, run the core's checks, render)."""

from __future__ import annotations

import json
import os
from typing import List, Optional

import typer

from dynamo.cli.helptext import BACKEND_METAVAR, BACKEND_NAMES
from dynamo.core.errors import UsageError

SYMBOLS = {"ok": ("✓", "green"), "warn": ("⚠", "yellow"), "error": ("✗", "red"), "info": ("·", "dim")}


def check(
    profile: Optional[str] = typer.Argument(
        None, show_default=False, metavar="PROFILE",
        help="A profile file or shipped profile name: also check it against this machine (GPUs, ports, model, NATS, engine)."),
    as_json: bool = typer.Option(False, "--json", help="The same report as JSON."),
    strict: bool = typer.Option(False, "--strict", help="Treat warnings as errors (exit 1)."),
    only: Optional[List[str]] = typer.Option(
        None, "--only", metavar="SECTION",
        help="Only these sections: system, gpus, software, profile, live (repeat, or comma-separate)."),
    overrides: Optional[List[str]] = typer.Option(
        None, "--set", metavar="KEY.PATH=VALUE", help="Override a profile value, as dynamo serve --set does."),
    backend: Optional[str] = typer.Option(None, "--backend", metavar=BACKEND_METAVAR, help="Replace the profile's backend (" + BACKEND_NAMES + "), as dynamo serve --backend does."),
    assume_gpus: Optional[int] = typer.Option(
        None, "--assume-gpus", metavar="N", min=0, help="Plan the profile as if this machine had N GPUs."),
    node: Optional[str] = typer.Option(None, "--node", help="Check only this node's part of a multinode profile."),
    url: Optional[str] = typer.Option(
        None, "--url", metavar="URL",
        help="Check this OpenAI-compatible endpoint (http://host:port, with or without /v1) instead of the newest "
        "active run."),
    run: Optional[str] = typer.Option(None, "--run", metavar="RUN", help="Check this run (id, unique prefix or directory)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", metavar="KEY", envvar=["DYNAMO_API_KEY", "OPENAI_API_KEY"],
                                          show_envvar=True, help="Bearer token for --url or the run's frontend "
                                          "(its frontend.api_key)."),
    no_color: bool = typer.Option(False, "--no-color", help="Plain output."),
) -> None:
    """Check this machine, a profile and the live run: drivers, GPUs, stale engines, ports, NATS, engines.

    Sections: system, gpus, software, profile (given PROFILE) and live (the newest active
    run, or an endpoint given with --url). Every problem comes with its fix. Exit code 0
    without errors, 1 with errors (warnings too with --strict), 2 for a bad argument.
    Finishes in under 3 seconds.
    """
    try:
        code = _check(profile, as_json, strict, only, overrides, backend, assume_gpus, node, url, run, no_color,
                      api_key)
    except UsageError as exc:
        for line in str(exc).splitlines() or [str(exc)]:
            typer.secho(f"error: {line}", fg="red", err=True)
        raise typer.Exit(exc.exit_code) from None
    raise typer.Exit(code)


def _check(profile, as_json, strict, only, overrides, backend, assume_gpus, node, url, run, no_color,
           api_key=None) -> int:
    from dynamo.core.check.context import CheckOptions
    from dynamo.core.check.runner import parse_sections, run_checks

    sections = parse_sections(only)
    if url is not None:  # what cannot be an HTTP endpoint is refused before anything runs, as bench does
        from dynamo.core.bench.client import normalize_base_url

        normalize_base_url(url)
    if url and run:
        raise UsageError("--url and --run both name what to check live: give one")
    options = CheckOptions(profile=profile, overrides=tuple(overrides or ()), backend=backend,
                           assume_gpus=assume_gpus, node=node, url=url, run=run, api_key=api_key,
                           cli_startup=_startup_seconds())
    report = run_checks(options, sections, strict=strict)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        render(report, no_color)
    return report.exit_code


def _startup_seconds() -> float | None:
    """How long this process took to get here: interpreter, imports, argument parsing.

    Process age from /proc (start ticks since boot against the uptime): psutil's
    create_time is anchored on a boot time rounded to the second.
    """
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def render(report, no_color: bool = False) -> None:
    """The report grouped by section, one line per result, a fix under each problem."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(no_color=no_color, highlight=False)
    for section in report.sections:
        console.print(Text(section.title, style="bold"))
        table = Table.grid(padding=(0, 1))
        table.add_column(width=3, no_wrap=True)
        table.add_column(no_wrap=True, style="bold" if not no_color else None)
        table.add_column(overflow="fold")
        for result in section.results:
            symbol, colour = SYMBOLS[result.status]
            table.add_row(Text(" " + symbol, style=colour), result.name, Text(result.message))
            for detail in result.details[:20]:
                table.add_row("", "", Text(detail, style="dim"))
            if len(result.details) > 20:
                table.add_row("", "", Text(f"... {len(result.details) - 20} more (--json has all)", style="dim"))
            if result.fix and result.status in ("warn", "error"):
                table.add_row("", "", Text("fix: " + result.fix, style="cyan"))
        console.print(table)
        console.print()
    counts = report.counts()
    parts = []
    for status, label in (("error", "error"), ("warn", "warning"), ("ok", "ok")):
        count = counts[status]
        noun = label if count == 1 or status == "ok" else label + "s"
        parts.append(Text(f"{SYMBOLS[status][0]} {count} {noun}", style=SYMBOLS[status][1] if count else "dim"))
    line = Text(", ").join(parts)
    line.append(f" in {report.seconds:.2f}s" + (" (--strict: warnings count as errors)" if report.strict else ""))
    console.print(line)


if __name__ == "__main__":
    typer.run(check)
