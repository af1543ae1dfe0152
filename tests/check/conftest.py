"""Helpers for `dynamo check` tests: run the CLI for real, build situations with real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_ENGINE = REPO / "tests" / "fakes" / "fake_engine.py"


class CheckRun:
    def __init__(self, proc: subprocess.CompletedProcess, seconds: float):
        self.proc = proc
        self.code = proc.returncode
        self.seconds = seconds
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    @property
    def report(self) -> dict:
        return json.loads(self.stdout)

    def results(self, section: str | None = None, name: str | None = None) -> list[dict]:
        return [r for s in self.report["sections"] for r in s["results"]
                if (section is None or r["section"] == section) and (name is None or r["name"] == name)]

    def one(self, section: str, name: str) -> dict:
        found = self.results(section, name)
        assert len(found) == 1, f"expected one {section}/{name} result, got {found}\n{self.stdout}"
        return found[0]


def run_check(*args: str, env: dict | None = None, timeout: float = 30, cwd: Path | None = None) -> CheckRun:
    """``dynamo check ARGS`` as a user runs it (through the command module), timed."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dynamo.cli.check", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd or REPO,
    )
    return CheckRun(proc, time.monotonic() - started)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_profile(tmp: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(text))
    return path


def fake_engine_profile(tmp: Path, name: str = "checkfake", replicas: int = 2, frontend_port: int = 0) -> Path:
    """Workers are the fake engine (any program can be a worker); every port picked free."""
    command = json.dumps([sys.executable, str(FAKE_ENGINE), "--port", "{port}"])
    return write_profile(tmp, f"""\
        name: {name}
        model: {{name: fake}}
        backend: mocker
        nats: {{port: 0}}
        frontend: {{port: {frontend_port}}}
        ports: {{base: 0}}
        workers:
          w:
            replicas: {replicas}
            command: {command}
            readiness_probe: {{period: 0.1}}
            required: false
            restart: {{policy: "no"}}
        """, f"{name}.yaml")


_ORPHAN = r"""
import os, sys
exe, argv, marker = sys.argv[1], sys.argv[2:], os.environ.get("ORPHAN_MARKER")
read, write = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(read)
        os.write(write, str(os.getpid()).encode())
        os.close(write)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        env = {k: v for k, v in os.environ.items() if k not in ("ORPHAN_MARKER", "DYNAMO_RUN_ID")}
        if marker:
            env["DYNAMO_RUN_ID"] = marker
        os.execve(exe, argv, env)
    os._exit(0)
os.close(write)
os.wait()
print(os.read(read, 64).decode())
"""


def spawn_orphan(exe: str, argv: list[str], marker: str | None = None) -> int:
    """Start ``argv`` (executable ``exe``) double-forked, so that init (pid 1) becomes its parent."""
    env = {**os.environ}
    if marker:
        env["ORPHAN_MARKER"] = marker
    out = subprocess.run([sys.executable, "-c", _ORPHAN, exe, *argv], capture_output=True, text=True,
                         env=env, timeout=10, check=True)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            proc = psutil.Process(pid)
            if proc.ppid() == 1 and proc.cmdline()[:1] == argv[:1]:
                return pid
        except psutil.Error:
            pass
        time.sleep(0.02)
    raise AssertionError(f"orphan {pid} did not appear with parent pid 1")


@pytest.fixture
def orphans():
    """Start orphans with ``orphans(exe, argv, marker=None)``; every one is killed at teardown."""
    started: list[int] = []

    def start(exe: str, argv: list[str], marker: str | None = None) -> int:
        pid = spawn_orphan(exe, argv, marker)
        started.append(pid)
        return pid

    yield start
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def engine_named_vllm(tmp_path) -> str:
    """An interpreter whose process name is ``vllm``: a symlink to Python named like the engine."""
    link = tmp_path / "bin" / "vllm"
    link.parent.mkdir()
    link.symlink_to(sys.executable)
    return str(link)


SLEEP = ["-c", "import time; time.sleep(120)"]
