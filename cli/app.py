"""The ``dynamo`` command line: thin commands that parse, call the core and render."""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

import typer

from dynamo.cli.helptext import BACKEND_METAVAR, BACKEND_NAMES, readable_metavars, reflow_help
from dynamo.core.errors import UsageError
from dynamo.core.text import quantity

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    name="dynamo",
    help="Launch, supervise and benchmark distributed LLM inference from one YAML profile.\n\n"
    "Start here: dynamo serve profiles/agg.yaml --backend mocker",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"dynamo {version('dynamo-launcher')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("dynamo (not installed: pip install -e .)")
        raise typer.Exit()


@app.callback()
def _main(
    _: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                           help="Print the version and exit."),
) -> None:
    """Launch, supervise and benchmark distributed LLM inference from one YAML profile."""


profile_app = typer.Typer(help="Validate profiles and print their JSON Schema.", no_args_is_help=True)
app.add_typer(profile_app, name="profile")


def fail(message: str, code: int = 2) -> None:
    """Print one clear error (no traceback) and exit."""
    lines = message.splitlines() or [message]
    typer.secho(f"error: {lines[0]}", fg="red", err=True)
    for line in lines[1:]:
        typer.secho(f"error: {line}", fg="red", err=True)
    raise typer.Exit(code)


WIDE_COLUMNS = 200


def make_console(stderr: bool = False, **kwargs) -> Console:
    """The rich console commands print through.

    Off a terminal (a pipe, a file, CI) rich assumes 80 columns and cuts table cells, run ids and
    numbers to fit, with an ellipsis; there the console is WIDE_COLUMNS wide instead, so nothing a
    user copies or reads is cut ($COLUMNS, when set, still decides).
    """
    from rich.console import Console

    console = Console(stderr=stderr, **kwargs)
    if "width" not in kwargs and not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = WIDE_COLUMNS
    return console


def write_output(text: str, output: Path | None) -> None:
    """``text`` to ``--output`` (a clear error if it cannot be written), else to stdout."""
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        fail(f"--output {output}: cannot write: {exc.strerror or exc}")
    typer.echo(f"wrote {output}", err=True)


def user_errors(func: Callable) -> Callable:
    """Render UsageError subclasses as one message with exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UsageError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper


# ---------------------------------------------------------------------------- serve

ProfileArg = typer.Argument(..., help="A profile file, or the name of a shipped profile (agg, disagg, ...).",
                            show_default=False)
SetOpt = typer.Option(None, "--set", metavar="KEY.PATH=VALUE",
                      help="Override a profile value, e.g. --set frontend.port=8080 --set workers.decode.replicas=2.")
BackendOpt = typer.Option(None, "--backend", metavar=BACKEND_METAVAR, help="Replace the profile's backend (" + BACKEND_NAMES + "): mocker runs any profile on a CPU.")


@app.command()
@user_errors
def serve(
    profile: str = ProfileArg,
    overrides: Optional[List[str]] = SetOpt,
    backend: Optional[str] = BackendOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (every process, argv, env, GPUs, ports, probes) and exit."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: the plan as JSON."),
    assume_gpus: Optional[int] = typer.Option(None, "--assume-gpus", metavar="N", min=0,
                                              help="Plan as if this machine had N GPUs (ids 0..N-1) instead of asking NVML."),
    node: Optional[str] = typer.Option(None, "--node", help="Start only this node's components (multinode profiles)."),
    replica: Optional[int] = typer.Option(None, "--replica", min=0, help="With --node: start only this replica of the "
                                          "node's worker groups (one Kubernetes pod each; see dynamo render k8s)."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Return once everything is ready; print the endpoint."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", metavar="DIR", help="Directory for this run's state and logs "
                                           "(default $DYNAMO_HOME/runs/<run-id>, DYNAMO_HOME defaults to ./.dynamo)."),
    no_color: bool = typer.Option(False, "--no-color", help="Plain console output."),
) -> None:
    """Plan a profile, start every process in order and supervise them until Ctrl-C.

    Order: nats, router, workers, frontend; each stage starts once the one before it is
    ready. Ctrl-C (or dynamo stop) stops them in reverse order. Exit code 0 when stopped on
    request, 1 when a required component failed, 2 for a bad profile or flag.
    """
    from dynamo.cli import serving

    code = serving.serve(profile, overrides or [], backend, dry_run, as_json, assume_gpus, node, detach,
                         run_dir, no_color, replica)
    raise typer.Exit(code)


# ---------------------------------------------------------------------------- ps / logs / stop

RunArg = typer.Argument(None, help="Run id (a unique prefix is enough) or run directory; default: the newest active "
                        "run, else the newest run.",
                        show_default=False)


@app.command()
@user_errors
def ps(
    run: Optional[str] = RunArg,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    all_runs: bool = typer.Option(False, "--all", "-a", help="List every run instead of one run's processes."),
) -> None:
    """Show the processes of a run: status, pid, restarts, ports, GPUs, uptime."""
    from dynamo.cli import runs

    runs.ps(run, as_json, all_runs)


@app.command()
@user_errors
def logs(
    run: Optional[str] = RunArg,
    processes: Optional[List[str]] = typer.Argument(None, metavar="PROCESS", help="Only these processes (e.g. frontend decode-0).",
                                                     show_default=False),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the run stops."),
    tail: Optional[int] = typer.Option(None, "--tail", "-n", min=0, help="Only the last N lines of each process."),
    since: Optional[str] = typer.Option(None, "--since", metavar="WHEN", help="Only lines newer than this: 10m, 90s, 2h or an ISO time."),
    grep: Optional[str] = typer.Option(None, "--grep", "-g", metavar="REGEX", help="Only lines matching this regular expression."),
    timestamps: bool = typer.Option(False, "--timestamps", "-t", help="Show each line's UTC time."),
    no_prefix: bool = typer.Option(False, "--no-prefix", help="Do not prefix lines with the process name."),
) -> None:
    """Print the logs of a run, merged in time order with `name |` prefixes.

    The first argument is a run unless it names a process of the newest active run:
    `dynamo logs decode-0 -f` works.
    """
    from dynamo.cli import runs

    runs.logs(run, processes or [], follow, tail, since, grep, timestamps, no_prefix)


def _seconds(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter(f"expected a number of seconds >= 0, got {value:g}")
    return value


@app.command()
@user_errors
def stop(
    run: Optional[str] = RunArg,
    timeout: float = typer.Option(120.0, "--timeout", metavar="SECONDS", callback=_seconds,
                                  help="Seconds to wait for a graceful stop before killing everything (0: kill now)."),
) -> None:
    """Stop a run as Ctrl-C would: reverse order, grace periods, then SIGKILL.

    Exit 0 when it stopped (or, with --timeout 0, was killed as asked); 1 when a graceful stop
    had to be forced after --timeout, or a process survived SIGKILL.
    """
    from dynamo.cli import runs

    raise typer.Exit(runs.stop(run, timeout))


# ---------------------------------------------------------------------------- check

from dynamo.cli import check as _check  # noqa: E402  (its heavy imports happen inside the command)

app.command("check")(_check.check)

from dynamo.cli import bench as _bench  # noqa: E402
from dynamo.cli.render import render_app  # noqa: E402

app.add_typer(_bench.app, name="bench")

app.add_typer(render_app, name="render")


# ---------------------------------------------------------------------------- profile


_PLENTY_OF_GPUS = 4096  # validation plans for the profile's needs, not this machine's


@profile_app.command("validate")
@user_errors
def profile_validate(
    files: List[str] = typer.Argument(..., metavar="PROFILE", help="Profile files or shipped profile names."),
    overrides: Optional[List[str]] = SetOpt,
    backend: Optional[str] = BackendOpt,
) -> None:
    """Check profiles: YAML, types, unknown keys, variables, and each worker's engine arguments.

    The arguments are checked as `dynamo serve` would (by the engine's own parser when it is
    installed), planned for enough GPUs: whether this machine has them is `dynamo check`'s
    question. Every file is checked and every problem reported; exit 2 if any is invalid.
    """
    from dynamo.core.gpus import assumed_inventory
    from dynamo.core.plan import build_plan, check_engine_argvs
    from dynamo.core.profile import load_profile

    failed = False
    for name in files:
        loaded = None
        try:
            loaded = load_profile(name, overrides or [], backend=backend)
            check_engine_argvs(build_plan(loaded, assumed_inventory(_PLENTY_OF_GPUS)), loaded)
        except UsageError as exc:
            failed = True
            for line in str(exc).splitlines():
                # the loader's messages and a key's place name the file (or the --set); the rest get it here
                named = loaded is None or line.startswith((loaded.sources.file, "--set "))
                typer.secho(f"error: {line}" if named else f"error: {loaded.path}: {line}", fg="red", err=True)
            continue
        p = loaded.profile
        groups = len(p.workers)
        replicas = sum(g.replicas for g in p.workers.values())
        typer.echo(f"{loaded.path}: ok ({p.name}: backend {p.backend}, "
                   f"{quantity(groups, 'worker group')}, {quantity(replicas, 'worker')})")
    if failed:
        raise typer.Exit(2)


@profile_app.command("schema")
def profile_schema(
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE", help="Write to this file instead of stdout."),
) -> None:
    """Print the JSON Schema of profiles (for editors; committed as profiles/schema.json)."""
    from dynamo.core.profile import profile_json_schema

    write_output(json.dumps(profile_json_schema(), indent=2) + "\n", output)


@profile_app.command("list")
def profile_list() -> None:
    """List the shipped profiles (usable by name: dynamo serve agg)."""
    from rich.table import Table

    from dynamo.core.profile import SHIPPED_PROFILES_DIR

    table = Table(box=None, show_header=False, pad_edge=False)  # descriptions wrap at the terminal's width
    table.add_column(no_wrap=True)
    table.add_column()
    for path in sorted(SHIPPED_PROFILES_DIR.glob("*.yaml")):
        table.add_row(path.stem, _first_sentence(path.read_text()))
    console = make_console()
    with console.capture() as captured:
        console.print(table)
    typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))  # no padding for grep and awk


def _first_sentence(text: str) -> str:
    """The first sentence of a profile's leading comment, which may run over several lines."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    comment = " ".join(lines)
    end = re.search(r"[.!?](\s|$)", comment)
    return comment[: end.start() + 1] if end else comment


reflow_help(app)


def main() -> None:
    from typer.main import get_command

    command = get_command(app)
    readable_metavars(command)
    command()


if __name__ == "__main__":
    main()
