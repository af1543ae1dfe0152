"""The run directory: ``$DYNAMO_HOME/runs/<run-id>/`` with state.json, logs/ and events.log."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import psutil

from dynamo.core import proctree
from dynamo.core.errors import RunNotFound, UsageError
from dynamo.core.text import quantity

ACTIVE = ("starting", "ready", "stopping")
DEAD = "dead (supervisor gone)"  # an active state whose supervisor no longer runs: ps, stop and check say so
# What dynamo writes into a run directory before anything else: a directory holding one was a run's.
_RUN_FILES = ("plan.json", "state.json", "supervisor.lock")
LOG_MAX_BYTES = 20 * 2**20
LOG_BACKUPS = 3


def write_owner_only(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only (mode 0600, also when the file was there
    before): run files may hold secrets, the NATS token or the API key."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def dynamo_home() -> Path:
    """``$DYNAMO_HOME``, else ``.dynamo`` in the current directory."""
    return Path(os.environ.get("DYNAMO_HOME") or ".dynamo")


def new_run_id(profile_name: str) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{profile_name}-{stamp}-{secrets.token_hex(2)}"


def utc_stamp(ts: float | None = None) -> str:
    """ISO-8601 UTC with milliseconds, the prefix of every log line."""
    moment = dt.datetime.fromtimestamp(time.time() if ts is None else ts, tz=dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_stamp(text: str) -> float | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None


class RotatingLog:
    """One process's log file, each line prefixed with its UTC time, rotated by size."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.file = open(path, "ab", buffering=0)
        self.size = self.file.tell()

    def write(self, text: str, ts: float | None = None) -> None:
        data = f"{utc_stamp(ts)} {text}\n".encode("utf-8", "replace")
        if self.size + len(data) > self.max_bytes and self.size:
            self._rotate()
        self.file.write(data)
        self.size += len(data)

    def _rotate(self) -> None:
        self.file.close()
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self.file = open(self.path, "ab", buffering=0)
        self.size = 0

    def close(self) -> None:
        self.file.close()


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path).absolute()  # absolute: it goes into argv, env and ipc:// endpoints
        self.id = self.path.name
        self.logs = path / "logs"
        self.state_path = path / "state.json"
        self.events_path = path / "events.log"
        self.lock_path = path / "supervisor.lock"  # flocked by the run's supervisor while it runs

    @property
    def marker(self) -> str:
        """The value of DYNAMO_RUN_ID in every child's environment: unique on this machine."""
        return str(self.path.resolve())

    def write_state(self, state: dict[str, Any]) -> None:
        """Atomic: readers never see a half-written file. Owner-only: it holds the NATS URL, token included
        (``dynamo check`` connects with it)."""
        tmp = self.state_path.with_name(f".state.{os.getpid()}.tmp")
        write_owner_only(tmp, json.dumps(state, indent=2, default=str))
        os.replace(tmp, self.state_path)

    def read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def locked(self) -> bool:
        """Whether a process holds the supervisor's lock on this run (False when there is no lock file)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def event(self, process: str, event: str, **details: Any) -> None:
        record = {"ts": utc_stamp(), "process": process, "event": event, **details}
        with open(self.events_path, "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")

    def log(self, process: str) -> RotatingLog:
        return RotatingLog(self.logs / f"{process}.log")

    def is_active(self) -> bool:
        state = self.read_state()
        return state.get("status") in ACTIVE and pid_alive(state.get("supervisor_pid"), state.get("supervisor_started"))

    def leftovers(self) -> dict[int, float]:
        """pid → create time of this run's processes still running: those carrying its marker, and those
        its state records that are provably the recorded ones (see ``recorded_processes``)."""
        return {**recorded_processes(self.read_state()), **proctree.marked_processes(self.marker)}

    def close_dead(self, killed: int) -> dict[str, Any]:
        """Record that this run's supervisor died without stopping it (its leftovers are gone now):
        the run failed and its processes are stopped, so nothing takes it for live any more."""
        pid = self.read_state().get("supervisor_pid")
        return self._close("failed", f"its supervisor (pid {pid}) died without stopping the run"
                           + (f"; dynamo stop killed {quantity(killed, 'leftover process', 'leftover processes')}"
                              if killed else ""), killed)

    def close_killed(self, timeout: float, killed: int) -> dict[str, Any]:
        """Record that ``dynamo stop`` killed the supervisor and every process of the run after
        ``timeout`` seconds without a graceful stop: the run is stopped, not left looking live."""
        return self._close("stopped", f"killed by dynamo stop after {timeout:g}s without a graceful stop "
                           f"({quantity(killed, 'process', 'processes')} killed)", killed)

    def _close(self, status: str, reason: str, killed: int) -> dict[str, Any]:
        state = self.read_state()
        state["status"] = status
        if status == "failed":
            state["failure"] = state.get("failure") or reason
        else:
            state["note"] = reason
        state["updated_at"] = time.time()
        for proc in (state.get("processes") or {}).values():
            if proc.get("status") not in ("stopped", "exited", "failed", "pending"):
                proc["status"] = "stopped"
        self.write_state(state)
        self.event("dynamo", status, reason=reason, killed=killed)
        return state


def wait_until_ready(run: Path, process, timeout: float = 120.0) -> dict[str, Any]:
    """Poll a run's state.json until it says ready; raise RuntimeError if the supervisor exits or time runs out."""
    state_path = Path(run) / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("status") == "ready":
            return state
        if process.poll() is not None:
            raise RuntimeError(f"dynamo serve exited with {process.returncode} before it was ready")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"dynamo serve was not ready within {timeout:g}s")


def pid_alive(pid: int | None, create_time: float | None = None) -> bool:
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run_status(state: dict[str, Any]) -> str:
    """A run's status as every command shows it: the state's, or ``DEAD`` when the state says the
    run is active but its supervisor is gone (killed: its last statuses are stale)."""
    status = state.get("status", "unknown")
    if status in ACTIVE and not pid_alive(state.get("supervisor_pid"), state.get("supervisor_started")):
        return DEAD
    return status


def recorded_processes(state: dict[str, Any]) -> dict[int, float]:
    """pid → create time of the processes a run's state records (each process and its descendants)
    that still run and are the same processes, not a reused pid: a process started when the state
    says it did; a descendant (its start time is not recorded) in its process's session, started
    after it and before the state was last written. Only this user's (nothing else can be signalled)."""
    me = os.getuid()
    updated = state.get("updated_at") or time.time()
    found: dict[int, float] = {}
    for proc in (state.get("processes") or {}).values():
        started = proc.get("started_at")
        if not started:
            continue
        candidates = [(proc.get("pid"), True), *((pid, False) for pid in proc.get("descendants") or ())]
        for pid, own in candidates:
            try:
                info = psutil.Process(pid)
                created = info.create_time()
                if info.uids().real != me or info.status() == psutil.STATUS_ZOMBIE:
                    continue
            except (psutil.Error, TypeError, ValueError):
                continue
            if own:
                ours = abs(created - started) <= 2.0
            else:
                ours = started - 1.0 <= created <= updated + 1.0 and _session(pid) == proc.get("pid")
            if ours:
                found[pid] = created
    return found


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def check_run_dir(path: Path) -> None:
    """Refuse a ``--run-dir`` that would mix a run's files with other files: it must be new, empty
    or a previous run's directory."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--run-dir {path}: not a directory")
    if not path.is_dir() or any((path / name).exists() for name in _RUN_FILES):
        return
    entries = sorted(p.name for p in path.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise UsageError(f"--run-dir {path} is not empty and is not a dynamo run directory (it holds {shown}); "
                         "a run writes plan.json, state.json, logs/ and nats/ there: give a new or empty directory")


def link_run(run: RunDir, home: Path | None = None) -> None:
    """Make a run kept outside ``$DYNAMO_HOME/runs`` (``--run-dir``) findable there, by id and among
    all runs, with a symlink ``runs/<id>`` to it (links to directories since deleted are removed).
    Best effort: the run works without it."""
    root = (home or dynamo_home()) / "runs"
    link = root / run.id
    try:
        if run.path.parent.resolve() == root.resolve():
            return
        root.mkdir(parents=True, exist_ok=True)
        for entry in root.iterdir():
            if entry.is_symlink() and not entry.exists():
                entry.unlink(missing_ok=True)
        if link.is_symlink():
            if RunDir(link.resolve()).is_active():
                return  # another live run of this name keeps it; this one is reachable by its path
            link.unlink()  # an earlier, finished run elsewhere under the same name
        elif link.exists():
            return  # a run of this name lives in the home itself; this one is reachable by its path
        link.symlink_to(run.path, target_is_directory=True)
    except OSError:
        pass


def list_runs(home: Path | None = None) -> list[RunDir]:
    """All runs (those kept elsewhere through their link, see ``link_run``), newest first."""
    root = (home or dynamo_home()) / "runs"
    if not root.is_dir():
        return []
    runs = [RunDir(p.resolve() if p.is_symlink() else p) for p in root.iterdir() if (p / "state.json").exists()]
    return sorted(runs, key=lambda r: r.read_state().get("started_at", 0), reverse=True)


def find_run(run_id: str | None, home: Path | None = None, active_only: bool = False,
             prefer_active: bool = True) -> RunDir:
    """The run named ``run_id`` (a unique prefix is enough; with ``prefer_active``, also a prefix
    that only one active run has), or the newest active run."""
    runs = list_runs(home)
    where = (home or dynamo_home()) / "runs"
    if run_id:
        matches = [r for r in runs if r.id == run_id] or [r for r in runs if r.id.startswith(run_id)]
        if not matches:
            raise RunNotFound(f"no run {run_id!r} under {where}; for a run kept elsewhere (serve --run-dir), "
                              "give its directory")
        live = [r for r in matches if r.is_active()]
        if len(matches) > 1 and (len(live) != 1 or not prefer_active):
            raise RunNotFound(f"{run_id!r} matches {len(matches)} runs"
                              + (f", {len(live)} of them active: {', '.join(r.id for r in live)}" if live
                                 else f": {', '.join(r.id for r in matches)}")
                              + "; give more of the id")
        return live[0] if len(matches) > 1 else matches[0]
    active = [r for r in runs if r.is_active()]
    if active:
        return active[0]
    if runs and not active_only:
        return runs[0]
    raise RunNotFound(f"no active run under {where} (DYNAMO_HOME={os.environ.get('DYNAMO_HOME', '.dynamo')}); "
                      "start one with dynamo serve, or give the directory of a run kept elsewhere (serve --run-dir)")
