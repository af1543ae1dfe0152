"""Process trees: spawn children in their own group, tied to our life; find and kill all of them.

Engines escape process groups (vLLM's EngineCore, TensorRT-LLM's MPI children), so we
(1) give each child a parent-death signal, (2) record descendants while they run, and
(3) mark every child's environment with the run's marker (its run directory's absolute path,
``DYNAMO_RUN_ID``), which descendants inherit, so a final sweep finds the ones that
double-forked into a new session.
"""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

import psutil

RUN_MARKER = "DYNAMO_RUN_ID"
PROCESS_MARKER = "DYNAMO_PROCESS"
_PR_SET_PDEATHSIG = 1

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux
    _libc = None


def die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGKILL this child when the supervisor dies."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def descendants(pid: int) -> dict[int, float]:
    """pid → create_time of every live descendant of ``pid``."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    found = {}
    for child in children:
        try:
            found[child.pid] = child.create_time()
        except psutil.Error:
            pass
    return found


def descendants_of_many(roots: list[int]) -> dict[int, dict[int, float]]:
    """Descendants of several processes from one scan of the process table (cheaper than one per root)."""
    children: dict[int, list[int]] = {}
    created: dict[int, float] = {}
    for proc in psutil.process_iter(["ppid", "create_time"]):
        info = proc.info
        if info.get("ppid") is not None:
            children.setdefault(info["ppid"], []).append(proc.pid)
            created[proc.pid] = info.get("create_time") or 0.0
    result: dict[int, dict[int, float]] = {}
    for root in roots:
        found: dict[int, float] = {}
        stack = list(children.get(root, ()))
        while stack:
            pid = stack.pop()
            if pid not in found:
                found[pid] = created.get(pid, 0.0)
                stack.extend(children.get(pid, ()))
        result[root] = found
    return result


def marked_processes(run_id: str, process: str | None = None) -> dict[int, float]:
    """Processes whose environment carries this run's marker (and, if given, this process name)."""
    needle = f"{RUN_MARKER}={run_id}".encode()
    name_needle = f"{PROCESS_MARKER}={process}".encode() if process else None
    me = os.getpid()
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        fields = environ.split(b"\0")
        if needle in fields and (name_needle is None or name_needle in fields):
            try:
                found[int(entry.name)] = psutil.Process(int(entry.name)).create_time()
            except psutil.Error:
                pass
    return found


def alive(pids: dict[int, float]) -> dict[int, float]:
    """The subset still running (same pid and start time, not a zombie)."""
    still = {}
    for pid, created in pids.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                still[pid] = created
        except psutil.Error:
            pass
    return still


def signal_all(pgid: int | None, pids: dict[int, float], sig: int) -> None:
    """Signal a process group and each listed process that is still the same process."""
    if pgid:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in alive(pids):
        try:
            if pgid and os.getpgid(pid) == pgid:
                continue  # already signalled with its group; a second signal can land after its handler is gone
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
