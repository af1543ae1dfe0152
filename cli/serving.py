"""``dynamo serve``: load, plan, check, then supervise in the foreground or detached."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

from dynamo.core.errors import UsageError
from dynamo.core.gpus import detect_inventory
from dynamo.core.plan import Plan, build_plan, check_engine_argvs, check_executables, check_ports
from dynamo.core.profile import load_profile
from dynamo.core.rundir import RunDir, check_run_dir, dynamo_home, link_run, new_run_id, write_owner_only
from dynamo.core.signals import StopSignals, say
from dynamo.core.text import quantity


def serve(profile: str, overrides: list[str], backend: str | None, dry_run: bool, as_json: bool,
          assume_gpus: int | None, node: str | None, detach: bool, run_dir: Path | None, no_color: bool,
          replica: int | None = None) -> int:
    if as_json and not dry_run:
        raise UsageError("--json goes with --dry-run (dynamo ps --json shows a running plan)")
    loaded = load_profile(profile, overrides, backend=backend)
    plan = build_plan(loaded, detect_inventory(assume_gpus), node=node, replica=replica)
    check_engine_argvs(plan, loaded)
    if dry_run:
        if as_json:
            typer.echo(plan.redacted().model_dump_json(indent=2))
        else:
            typer.echo(render_plan(plan.redacted()))
        return 0
    if run_dir:
        check_run_dir(run_dir)
    check_executables(plan)
    check_ports(plan)
    run = RunDir(run_dir) if run_dir else RunDir(dynamo_home() / "runs" / new_run_id(plan.profile))
    try:
        run.logs.mkdir(parents=True, exist_ok=True)
        lock = _claim(run)
        if run_dir:
            link_run(run)  # ps, logs, stop and check find it by id too
        # the detached supervisor starts from this file, secrets included: readable by its owner only
        write_owner_only(run.path / "plan.json", plan.model_dump_json(indent=2))
    except OSError as exc:
        setting = "--run-dir" if run_dir else f"DYNAMO_HOME ({dynamo_home()})"
        raise UsageError(f"cannot write the run directory {run.path}: {exc.strerror or exc}"
                         f"{f' ({exc.filename})' if exc.filename and str(exc.filename) != str(run.path) else ''}; "
                         f"choose a writable {setting}") from None
    if detach:
        for note in plan_notes(plan):
            typer.echo(f"note: {note}", err=True)
        return _detach(run, plan, lock)
    from dynamo.core.printer import Printer
    from dynamo.core.supervisor import run_plan

    names = [p.name for p in plan.processes]
    printer = Printer(names, colour=False if no_color else None)
    count = len(plan.processes)
    printer.system(f"run {run.id}: {quantity(count, 'process', 'processes')}, logs in {run.logs}")
    for note in plan_notes(plan):
        printer.system(f"note: {note}")
    return run_plan(plan, run, printer)


def plan_notes(plan: Plan) -> list[str]:
    """The plan's notes (flags dropped for this engine, ...), each once: a group's replicas share theirs."""
    notes = dict.fromkeys(plan.notes)
    for proc in plan.processes:
        for note in proc.notes:
            notes.setdefault(f"workers.{proc.group}: {note}" if proc.kind == "worker" else f"{proc.name}: {note}")
    return list(notes)


def _claim(run: RunDir) -> int:
    """Lock the run directory for this run's supervisor (held until it exits): one per directory."""
    fd = os.open(run.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = run.read_state().get("supervisor_pid")
        raise UsageError(f"{run.path} is in use by a running supervisor{f' (pid {pid})' if pid else ''}: "
                         f"stop it with `dynamo stop {run.path}` or choose another --run-dir") from None
    run.state_path.unlink(missing_ok=True)  # a previous run's state must not be taken for this one's
    return fd


def _detach(run: RunDir, plan: Plan, lock: int) -> int:
    """Start the supervisor in its own session; return once it reports ready (or failed)."""
    console = open(run.path / "supervisor.log", "ab")
    child = subprocess.Popen(
        [sys.executable, "-m", "dynamo.cli.supervise", str(run.path)],
        stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "NO_COLOR": "1"}, pass_fds=(lock,),  # the lock goes with the supervisor
    )
    console.close()
    os.close(lock)
    with _StartupSignals(run, child) as signals:
        code = _wait_ready(run, plan, child, signals)
        if signals.received is None:
            return code
        child.wait()  # the supervisor stops the run (a second signal: at once)
    name = signal.Signals(signals.received).name
    say(f"run {run.id} stopped: interrupted by {name} while starting; its logs: dynamo logs {_run_ref(run)}")
    return 128 + signals.received


class _StartupSignals(StopSignals):
    """SIGINT, SIGTERM and SIGHUP while ``serve --detach`` waits for the run to be ready.

    The first one stops the run being started (SIGTERM to its supervisor, which stops what it
    started, in order); a second makes the supervisor kill everything at once. SIGHUP (the
    terminal closed) also drops what would still be printed to that terminal.
    """

    def __init__(self, run: RunDir, child: subprocess.Popen):
        super().__init__()
        self.run, self.child = run, child
        self.received: int | None = None

    def on_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.child.send_signal(signal.SIGTERM)
        if self.received is None:
            self.received = signum
            say(f"{signal.Signals(signum).name}: stopping run {self.run.id} (again to kill it at once)")


def _wait_ready(run: RunDir, plan: Plan, child: subprocess.Popen, signals: _StartupSignals) -> int:
    while signals.received is None:
        state = run.read_state()
        status = state.get("status")
        if status == "ready":
            typer.echo(f"run {run.id} is ready")
            if plan.endpoint:
                typer.echo(f"endpoint: {plan.endpoint}")
            ref = _run_ref(run)
            typer.echo(f"logs:     dynamo logs {ref} -f")
            typer.echo(f"stop:     dynamo stop {ref}")
            return 0
        if status in ("failed", "stopped") or child.poll() is not None:
            child.wait()
            typer.secho(f"run {run.id} did not become ready: {state.get('failure') or status or 'supervisor exited'}",
                        fg="red", err=True)
            tail = (run.path / "supervisor.log").read_text(errors="replace").splitlines()[-15:]
            for line in tail:
                typer.echo(f"  {line}", err=True)
            return child.returncode or 1  # 2 when the run failed on bad input
        time.sleep(0.1)
    return 128 + signals.received


def _run_ref(run: RunDir) -> str:
    """How to name the run in a command: its id when it lives in a $DYNAMO_HOME/runs that was set, else
    its absolute directory, which works from any directory (the default home, ./.dynamo, does not)."""
    named = os.environ.get("DYNAMO_HOME") and run.path.absolute().parent == (dynamo_home() / "runs").absolute()
    return run.id if named else str(run.path.absolute())


def render_plan(plan: Plan) -> str:
    """The dry-run text: every process with argv, added env, GPUs, ports, probe and dependencies."""
    lines = [
        f"Plan for {plan.profile} (backend {plan.backend}, model {plan.model}): "
        f"{quantity(len(plan.processes), 'process', 'processes')}"
        + (f", endpoint {plan.endpoint}" if plan.endpoint else ""),
        f"GPUs: {plan.gpu_inventory}",
        f"NATS: {plan.nats_url}",
        "{run_dir} is the run directory, created at start ($DYNAMO_HOME/runs/<run-id>).",
        *(f"Note: {note}" for note in plan.notes),
    ]
    for proc in plan.processes:
        lines.append("")
        head = f"{proc.name}  [{proc.kind}"
        head += f", role {proc.role}" if proc.role else ""
        head += f", node {proc.node}]"
        lines.append(head)
        lines.append(f"  argv:     {shlex.join(proc.argv)}")
        if proc.env:
            lines.append(f"  env:      {' '.join(f'{k}={shlex.quote(v)}' for k, v in proc.env.items())}")
        if proc.gpus or proc.kind == "worker":
            lines.append(f"  gpus:     {','.join(map(str, proc.gpus)) or 'none'}")
        if proc.ports:
            lines.append(f"  ports:    {' '.join(f'{k}={v}' for k, v in proc.ports.items())}")
        lines.append(f"  ready:    {proc.readiness_probe.describe()}")
        if proc.depends_on:
            lines.append(f"  after:    {', '.join(proc.depends_on)}")
        policy = proc.restart
        lines.append(f"  restart:  {policy.policy}, max {policy.max_restarts}, backoff {policy.backoff.initial:g}s"
                     f"..{policy.backoff.max:g}s; stop grace {proc.grace_period:g}s")
        for note in proc.notes:
            lines.append(f"  note:     {note}")
    return "\n".join(lines)


def load_plan(run: RunDir) -> Plan:
    return Plan.model_validate(json.loads((run.path / "plan.json").read_text()))
