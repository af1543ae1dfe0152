"""``dynamo ps``, ``dynamo logs`` and ``dynamo stop``: read and control runs through their run directory."""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import re
import signal
import time
from pathlib import Path

import typer
from rich.table import Table

from dynamo.core import proctree
from dynamo.core.durations import parse_duration
from dynamo.core.errors import RunNotFound, UsageError
from dynamo.core.nats_server import redact_url
from dynamo.core.printer import Printer
from dynamo.core.rundir import (DEAD, RunDir, find_run, list_runs, parse_stamp, pid_alive, recorded_processes,
                                run_status)
from dynamo.core.text import quantity


def resolve_run(run: str | None, prefer_active: bool = True) -> RunDir:
    if run and (Path(run) / "state.json").exists():
        return RunDir(Path(run))
    if run and os.sep in run and Path(run).is_dir():
        raise RunNotFound(f"{run} is not a run directory (it has no state.json)")
    return find_run(run, prefer_active=prefer_active)


def _uptime(seconds: float | None) -> str:
    if not seconds:
        return "-"
    seconds = int(time.time() - seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def ps(run: str | None, as_json: bool, all_runs: bool) -> None:
    from dynamo.cli.app import make_console  # (cli.app imports this module)

    console = make_console()
    if all_runs:
        runs = list_runs()
        rows = [{"run": r.id, "status": run_status(s := r.read_state()), "profile": s.get("profile"),
                 "endpoint": s.get("endpoint"), "started_at": s.get("started_at"), "path": str(r.path)} for r in runs]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        # The run id (which starts with the profile's name) is what `logs`, `stop` and `check` take:
        # never cut; the other columns wrap first.
        table = Table(box=None)
        table.add_column("RUN", no_wrap=True, min_width=max((len(r["run"]) for r in rows), default=3))
        table.add_column("STATUS", overflow="fold")
        table.add_column("ENDPOINT", overflow="fold")
        table.add_column("UP", no_wrap=True)
        for row in rows:
            table.add_row(row["run"], row["status"], row["endpoint"] or "",
                          _uptime(row["started_at"]) if row["status"] in ("ready", "starting") else "-")
        console.print(table)
        return
    chosen = resolve_run(run)
    state = chosen.read_state()
    if as_json:
        shown = {**state, "nats_url": redact_url(state["nats_url"])} if state.get("nats_url") else state
        typer.echo(json.dumps({**shown, "status": run_status(state), "path": str(chosen.path)}, indent=2))
        return
    console.print(f"run [bold]{chosen.id}[/] {run_status(state)}"
                  + (f"  endpoint {state['endpoint']}" if state.get("endpoint") else "")
                  + (f"\nfailure: {state['failure']}" if state.get("failure") else ""))
    table = Table("NAME", "KIND", "STATUS", "PID", "RESTARTS", "PORTS", "GPUS", "UP", box=None)
    orphaned = run_status(state) == DEAD  # the last statuses its supervisor wrote are stale
    still = recorded_processes(state) if orphaned else {}
    for name, proc in state.get("processes", {}).items():
        ports = " ".join(f"{k}={v}" for k, v in (proc.get("ports") or {}).items())
        status = proc.get("status", "")
        if orphaned and status not in ("stopped", "exited", "failed", "pending"):
            left = [pid for pid in proc.get("descendants") or () if pid in still]
            status = ("orphaned (still running)" if proc.get("pid") in still
                      else f"gone ({quantity(len(left), 'descendant')} still running)" if left else "gone")
        up = _uptime(proc.get("started_at")) if status in ("ready", "starting", "unhealthy") else "-"
        table.add_row(name, proc.get("kind", ""), status, str(proc.get("pid") or "-"),
                      str(proc.get("restarts", 0)), ports, ",".join(map(str, proc.get("gpus") or [])) or "-", up)
    console.print(table)


# ---------------------------------------------------------------------------- logs


def _since(text: str | None) -> float | None:
    if not text:
        return None
    stamp = parse_stamp(text) or parse_stamp(text.rstrip("Z") + ".000Z")
    if stamp is not None:
        return stamp
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        raise UsageError(f"--since {text}: expected a duration (10m, 90s) or a time like 2026-01-02T15:04:05Z") from None


def _read_lines(path: Path) -> list[tuple[float, str, str]]:
    """(time, stamp, text) of every line in a log and its rotated predecessors, oldest first."""
    files = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    out: list[tuple[float, str, str]] = []
    for file in [*files, path]:
        if file.exists():
            for raw in file.read_text(errors="replace").splitlines():
                out.append(_split(raw))
    return out


def _split(raw: str) -> tuple[float, str, str]:
    stamp, _, text = raw.partition(" ")
    ts = parse_stamp(stamp)
    return (ts, stamp, text) if ts is not None else (0.0, "", raw)


def logs(run: str | None, processes: list[str], follow: bool, tail: int | None, since: str | None,
         grep: str | None, timestamps: bool, no_prefix: bool) -> None:
    try:
        chosen = resolve_run(run)
    except RunNotFound as exc:
        if run is None:
            raise
        chosen = find_run(None)  # `dynamo logs decode-0`: a process of the newest run
        processes = [run, *processes]
        if not (chosen.logs / f"{run}.log").exists():
            available = ", ".join(sorted(p.stem for p in chosen.logs.glob("*.log")))
            raise RunNotFound(f"{exc}; nor is {run!r} a process of run {chosen.id} (it has: {available})") from None
    available = sorted(p.stem for p in chosen.logs.glob("*.log"))
    for name in processes:
        if name not in available:
            raise UsageError(f"run {chosen.id} has no process {name!r}; it has: {', '.join(available)}")
    names = processes or available
    try:
        pattern = re.compile(grep) if grep else None
    except re.error as exc:
        raise UsageError(f"--grep {grep!r}: {exc}") from None
    after = _since(since)
    printer = Printer(names)

    def show(name: str, stamp: str, text: str) -> None:
        body = f"{stamp} {text}" if timestamps and stamp else text
        if no_prefix:
            printer._write(body)
        else:
            printer.output(name, body)

    def keep(ts: float, text: str) -> bool:
        return (after is None or ts >= after) and (pattern is None or pattern.search(text) is not None)

    streams = []
    for name in names:
        lines = [(ts, stamp, text, name) for ts, stamp, text in _read_lines(chosen.logs / f"{name}.log") if keep(ts, text)]
        if tail is not None:
            lines = lines[-tail:] if tail else []
        streams.append(lines)
    for ts, stamp, text, name in heapq.merge(*streams, key=lambda item: item[0]):
        show(name, stamp, text)
    if not follow:
        return
    offsets = {name: (chosen.logs / f"{name}.log").stat().st_size if (chosen.logs / f"{name}.log").exists() else 0
               for name in names}
    partial = {name: "" for name in names}
    try:
        while True:
            active = chosen.is_active()
            for name in names:
                path = chosen.logs / f"{name}.log"
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                if size < offsets[name]:
                    offsets[name] = 0  # rotated
                if size == offsets[name]:
                    continue
                with open(path, "rb") as fh:
                    fh.seek(offsets[name])
                    chunk = fh.read()
                offsets[name] += len(chunk)
                text = partial[name] + chunk.decode("utf-8", "replace")
                *complete, partial[name] = text.split("\n")
                for raw in complete:
                    ts, stamp, body = _split(raw)
                    if keep(ts, body):
                        show(name, stamp, body)
            if not active:
                state = chosen.read_state()
                typer.echo(f"run {chosen.id} is {run_status(state)}"
                           + (f": {state['failure']}" if state.get("failure") else "") + "; no more logs to follow",
                           err=True)
                return
            time.sleep(0.2)
    except KeyboardInterrupt:
        return


# ---------------------------------------------------------------------------- stop


def stop(run: str | None, timeout: float) -> int:
    chosen = resolve_run(run, prefer_active=False)  # stopping the wrong run is not undone: a prefix must be unique
    state = chosen.read_state()
    pid = state.get("supervisor_pid")
    if not pid_alive(pid, state.get("supervisor_started")):
        return _clean_up(chosen, state)
    started = time.time()
    os.kill(pid, signal.SIGTERM)
    typer.echo(f"stopping run {chosen.id} (supervisor pid {pid}) ...")
    while time.time() - started < timeout and pid_alive(pid, state.get("supervisor_started")):
        time.sleep(0.1)
    if pid_alive(pid, state.get("supervisor_started")):
        typer.secho(f"not stopped after {timeout:g}s: killing the supervisor and every process of the run"
                    if timeout else "killing the supervisor and every process of the run", fg="yellow", err=True)
        survived = _kill(chosen, pid, state.get("supervisor_started"), timeout)
        return 1 if survived or timeout else 0  # a graceful stop that had to be forced is not a clean one
    final = chosen.read_state()
    typer.echo(f"run {chosen.id} {final.get('status', 'stopped')} in {time.time() - started:.2f}s")
    return 0


def _kill(run: RunDir, pid: int, started: float | None, timeout: float) -> bool:
    """SIGKILL the supervisor, then every process of the run (the sentinel would, a moment later);
    record the run as stopped. True if anything survived."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    killed = {pid}
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        left = proctree.alive(proctree.marked_processes(run.marker))
        if not left and not pid_alive(pid, started):
            break
        proctree.signal_all(None, left, signal.SIGKILL)
        killed.update(left)
        time.sleep(0.05)
    survivors = proctree.alive(proctree.marked_processes(run.marker))
    run.close_killed(timeout, len(killed))
    if survivors:
        typer.secho(f"run {run.id}: {quantity(len(survivors), 'process', 'processes')} survived SIGKILL: "
                    f"{', '.join(map(str, sorted(survivors)))}", fg="red", err=True)
        return True
    typer.echo(f"run {run.id} killed; marked it stopped")
    return False


def _clean_up(run: RunDir, state: dict) -> int:
    """Stop a run whose supervisor is gone: kill what is left of it; a dead run is marked failed, so
    nothing (ps, check) takes it for live any more."""
    status = run_status(state)
    leftovers = run.leftovers()
    if leftovers:
        proctree.signal_all(None, leftovers, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while proctree.alive(leftovers) and time.monotonic() < deadline:
            time.sleep(0.05)
    killed = (f"killed {quantity(len(leftovers), 'leftover process', 'leftover processes')}" if leftovers
              else "nothing of it was left running")
    if status == DEAD:
        run.close_dead(len(leftovers))
        typer.echo(f"run {run.id} was {status}: {killed}; marked it failed")
    elif leftovers:
        typer.echo(f"run {run.id} is {status}: {killed}")
    else:
        typer.echo(f"run {run.id} is not running ({status})")
    return 0
