"""Shared fixtures: run the CLI for real, start runs in the background, always clean up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAKE_ENGINE = REPO / "tests" / "fakes" / "fake_engine.py"


def dynamo(*args: str, env: dict | None = None, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``dynamo ARGS`` as a user would and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "dynamo.cli.app", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd,
    )


def marked(marker: str) -> list[int]:
    """Processes of a run, found by the marker (its run directory) in their environment."""
    from dynamo.core.proctree import marked_processes

    return sorted(marked_processes(marker))


def fake_profile(tmp: Path, *, replicas: int = 2, engine_args: str = "", restart: str = "", extra: str = "",
                 name: str = "fake") -> Path:
    """A profile whose workers are the fake engine, on free ports only."""
    args = ", ".join(f'"{a}"' for a in engine_args.split()) if engine_args else ""
    command = f'[{json.dumps(sys.executable)}, {json.dumps(str(FAKE_ENGINE))}, --port, "{{port}}"{", " + args if args else ""}]'
    text = textwrap.dedent(f"""\
        name: {name}
        model: {{name: fake}}
        backend: mocker
        nats: {{port: 0}}
        frontend: {{port: 0}}
        ports: {{base: 0}}
        workers:
          w:
            replicas: {replicas}
            command: {command}
            readiness_probe: {{period: 0.1}}
        """)
    if restart:
        text += f"restart: {restart}\n"
    text += extra
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


class Run:
    """A ``dynamo serve`` started in the background by a test."""

    def __init__(self, proc: subprocess.Popen, run_dir: Path, output: Path):
        self.proc = proc
        self.dir = run_dir
        self.output = output

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def marker(self) -> str:
        return str(self.dir.resolve())

    def state(self) -> dict:
        try:
            return json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def events(self) -> list[dict]:
        path = self.dir / "events.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def freeze_until_replaced(self, name: str, timeout: float) -> int:
        """SIGSTOP process ``name`` (alive but silent) and wait until the supervisor has a new one
        ready in its place; the frozen one is resumed (or found gone) in any case. Its pid."""
        frozen = self.state()["processes"][name]["pid"]
        os.kill(frozen, signal.SIGSTOP)
        try:
            self.wait_for(lambda: self.state()["processes"][name]["pid"] not in (frozen, None)
                          and self.state()["processes"][name]["status"] == "ready", timeout, f"{name} replaced")
        finally:
            try:
                os.kill(frozen, signal.SIGCONT)
            except ProcessLookupError:
                pass
        return frozen

    def wait_for(self, predicate, timeout: float = 30, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None and not predicate():
                raise AssertionError(f"dynamo serve exited ({self.proc.returncode}) before {what}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.text()[-4000:]}")

    def wait_ready(self, timeout: float = 30) -> dict:
        self.wait_for(lambda: self.state().get("status") == "ready", timeout, "ready")
        return self.state()

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dynamo serve did not exit within {timeout}s:\n{self.text()[-4000:]}") from None


@pytest.fixture
def serve(tmp_path):
    """Start ``dynamo serve PROFILE ...`` in the background; everything is killed at teardown."""
    started: list[Run] = []

    def start(profile: Path | str, *args: str, env: dict | None = None) -> Run:
        run_dir = tmp_path / f"run{len(started)}"
        output = tmp_path / f"serve{len(started)}.out"
        with open(output, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dynamo.cli.app", "serve", str(profile), "--run-dir", str(run_dir),
                 "--no-color", *args],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "DYNAMO_HOME": str(tmp_path / "home"), **(env or {})},
            )
        run = Run(proc, run_dir, output)
        started.append(run)
        return run

    yield start
    for run in started:
        kill_run(run)


def kill_run(run: Run) -> None:
    """SIGKILL a test's ``dynamo serve`` (its process group) and every process of its run."""
    if run.proc.poll() is None:
        try:
            os.killpg(run.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        run.proc.wait(10)
    deadline = time.monotonic() + 5
    while marked(run.marker) and time.monotonic() < deadline:
        for pid in marked(run.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


# A NATS port answers a TCP connection with its INFO line before the client says anything: the
# case of --url pointing at the run's NATS port instead of the frontend.
NATS_GREETING = (b'INFO {"server_id":"NTEST","version":"2.10.0","proto":1,"host":"127.0.0.1","port":4222,'
                 b'"max_payload":1048576}\r\n')


@pytest.fixture
def nats_like_server():
    """``http://127.0.0.1:PORT`` of a server that greets like nats-server (not HTTP); stopped at teardown."""
    import socketserver
    import threading

    class Greeter(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(NATS_GREETING)
            self.request.settimeout(5)
            try:
                while self.request.recv(4096):
                    pass
            except OSError:
                pass

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Greeter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
