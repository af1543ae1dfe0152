"""Stale engine processes: engines left behind by earlier runs, holding GPUs, memory and ports.

A process is stale when
- it carries a run's marker (``DYNAMO_RUN_ID`` in its environment) and that run is not
  running any more (its supervisor and sentinel are gone), or
- it looks like an inference engine (by process name, argv[0], or ``python -m`` module),
  its parent is pid 1 (orphaned: whatever started it exited), and no live run owns it.
  Two exceptions keep legitimate children of pid 1 out: a process in pid 1's own session
  (a container whose entrypoint script started the engine with ``&``), and a process a
  systemd service runs (its cgroup names a ``.service``).

Detection is a pure function over ``ProcessInfo`` records (``find_stale``), so tests build
the situation with real processes and check the verdict without a GPU. The GPU side is a
seam: ``gpu_memory_mb`` maps pid → MiB of GPU memory held, which the GPU section fills
from NVML's compute processes (``GpuInventory.processes``) and tests pass directly.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dynamo.core.proctree import RUN_MARKER

# Process titles and names engines run under (comm is cut to 15 characters by the kernel).
_NAME_PREFIXES = {
    "vllm": "vllm",                 # vllm serve, VLLM::EngineCore, VLLM::Worker
    "sglang": "sglang",             # sglang::scheduler_TP0, sglang::detokenizer
    "trtllm": "tensorrt_llm",       # trtllm-serve, trtllm-llmapi-launch
    "tensorrt_llm": "tensorrt_llm",
}
# ``python -m MODULE`` prefixes of engines and of our own simulated engine.
_MODULE_PREFIXES = {
    "vllm.": "vllm", "vllm": "vllm",
    "sglang.": "sglang",
    "tensorrt_llm.": "tensorrt_llm",
    "dynamo.backends.mocker": "mocker",
}
_INIT_PID = 1


@dataclass(frozen=True)
class ProcessInfo:
    """What the detection needs to know about one process."""

    pid: int
    ppid: int
    name: str
    cmdline: tuple[str, ...] = ()
    run_marker: str | None = None  # value of DYNAMO_RUN_ID in its environment
    username: str | None = None
    create_time: float = 0.0
    status: str = "running"  # psutil status; zombies hold nothing and are skipped
    session: int | None = None  # session id (getsid)
    service: str | None = None  # the systemd service running it, from its cgroup

    @property
    def command(self) -> str:
        """The command line, short: argv[0] without its directory, cut at 120 characters."""
        if not self.cmdline:
            return f"[{self.name}]"
        text = shlex.join([os.path.basename(self.cmdline[0]), *self.cmdline[1:]])
        return text if len(text) <= 120 else text[:117] + "..."


@dataclass(frozen=True)
class StaleProcess:
    info: ProcessInfo
    engine: str | None  # vllm, sglang, tensorrt_llm, mocker, or None for other leftovers of a run
    reason: str
    gpu_memory_mb: int | None = None


@dataclass
class ProcessTable:
    """A snapshot of the machine's processes, plus which runs are alive."""

    processes: list[ProcessInfo]
    live_markers: set[str] = field(default_factory=set)  # markers whose run sentinel is running
    init_session: int | None = None  # session of pid 1: its own children share it, orphans do not


def engine_of(name: str, cmdline: Iterable[str]) -> str | None:
    """The engine a process looks like, from its name, argv[0], the script it runs or ``-m`` module."""
    argv = list(cmdline)
    candidates = [name]
    if argv:
        candidates.append(os.path.basename(argv[0]))
        # python /venv/bin/vllm serve ... (a console script run by the interpreter)
        if len(argv) > 1 and os.path.basename(argv[0]).startswith("python") and not argv[1].startswith("-"):
            candidates.append(os.path.basename(argv[1]))
        if argv[0].split(" ", 1)[0] != argv[0]:  # a process title set with setproctitle
            candidates.append(argv[0].split(" ", 1)[0])
    for candidate in candidates:
        low = candidate.lower()
        for prefix, engine in _NAME_PREFIXES.items():
            if low.startswith(prefix):
                return engine
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1]
        for prefix, engine in _MODULE_PREFIXES.items():
            if module == prefix.rstrip(".") or (prefix.endswith(".") and module.startswith(prefix)):
                return engine
    return None


def find_stale(
    table: ProcessTable,
    run_is_active: Callable[[str], bool],
    gpu_memory_mb: Mapping[int, int] | None = None,
    exclude: Iterable[int] = (),
) -> list[StaleProcess]:
    """The stale processes in ``table``; ``run_is_active(marker)`` says whether a run still lives."""
    gpu_memory_mb = gpu_memory_mb or {}
    skip = set(exclude)
    verdicts: dict[str, bool] = {}
    stale: list[StaleProcess] = []
    for proc in table.processes:
        if proc.pid in skip or proc.status == "zombie":
            continue
        engine = engine_of(proc.name, proc.cmdline)
        memory = gpu_memory_mb.get(proc.pid)
        if proc.run_marker:
            marker = proc.run_marker
            if marker not in verdicts:
                verdicts[marker] = marker in table.live_markers or run_is_active(marker)
            if not verdicts[marker]:
                stale.append(StaleProcess(proc, engine, f"left over from run {marker}, which is no longer running",
                                          memory))
            continue
        if engine and proc.ppid == _INIT_PID and not _child_of_init(proc, table):
            stale.append(StaleProcess(proc, engine, "orphaned: its parent exited (parent pid 1) and no dynamo run "
                                      "owns it", memory))
    return stale


def _child_of_init(proc: ProcessInfo, table: ProcessTable) -> bool:
    """pid 1 started it on purpose: an entrypoint script's job, or a systemd service."""
    if proc.service:
        return True
    return proc.session is not None and table.init_session is not None and proc.session == table.init_session


def scan_processes() -> ProcessTable:
    """Every visible process, with run markers read from /proc/PID/environ where allowed."""
    import psutil

    me = os.getpid()
    processes: list[ProcessInfo] = []
    live: set[str] = set()
    for proc in psutil.process_iter(["pid", "ppid", "name", "cmdline", "username", "create_time", "status"]):
        info = proc.info
        if info["pid"] == me:
            continue
        cmdline = tuple(info.get("cmdline") or ())
        if "dynamo.core.sentinel" in cmdline and cmdline[-1] != "dynamo.core.sentinel":
            live.add(cmdline[-1])  # a run's sentinel lives exactly as long as its supervisor
        ppid = info.get("ppid") or 0
        processes.append(ProcessInfo(
            pid=info["pid"], ppid=ppid, name=info.get("name") or "", cmdline=cmdline,
            run_marker=run_marker_of(info["pid"]), username=info.get("username"),
            create_time=info.get("create_time") or 0.0, status=info.get("status") or "running",
            session=_session(info["pid"]) if ppid == _INIT_PID else None,
            service=_service(info["pid"]) if ppid == _INIT_PID else None,
        ))
    return ProcessTable(processes, live, _session(_INIT_PID))


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _service(pid: int) -> str | None:
    """The systemd service whose cgroup holds the process (``vllm.service``), if any."""
    try:
        cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in cgroups.splitlines():
        path = line.rpartition(":")[2]
        for part in path.split("/"):
            if part.endswith(".service") and not part.startswith("user@"):
                return part
    return None


def run_marker_of(pid: int) -> str | None:
    """The run marker (DYNAMO_RUN_ID) in a process's environment, if readable."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    needle = f"{RUN_MARKER}=".encode()
    for entry in environ.split(b"\0"):
        if entry.startswith(needle):
            return entry[len(needle):].decode("utf-8", "replace")
    return None


def run_dir_of(marker: str, home: Path | None = None):
    """The RunDir a marker names: the run directory itself (current markers) or a run id."""
    from dynamo.core.rundir import RunDir, list_runs

    path = Path(marker)
    if path.is_absolute():
        return RunDir(path) if (path / "state.json").exists() else None
    for run in list_runs(home):
        if run.id == marker:
            return run
    return None


def run_is_active(marker: str, home: Path | None = None) -> bool:
    run = run_dir_of(marker, home)
    return run is not None and run.is_active()


def fix_for(stale: list[StaleProcess], home: Path | None = None) -> str:
    """The command that frees these processes."""
    stops: list[str] = []
    pids: list[int] = []
    for item in stale:
        run = run_dir_of(item.info.run_marker, home) if item.info.run_marker else None
        if run is not None:
            command = f"dynamo stop {run.path}"
            if command not in stops:
                stops.append(command)
        else:
            pids.append(item.info.pid)
    parts = list(stops)
    if pids:
        listed = " ".join(map(str, sorted(pids)))
        parts.append(f"kill {listed} unless someone means them to run (kill -9 {listed} if they ignore it)")
    return "; ".join(parts)


def ancestors(pid: int) -> set[int]:
    """This process and its ancestors: never flag the check itself or what started it."""
    import psutil

    found = {pid}
    try:
        for parent in psutil.Process(pid).parents():
            found.add(parent.pid)
    except psutil.Error:
        pass
    return found
