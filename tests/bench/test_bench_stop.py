"""Stopping ``dynamo bench`` early, and what ``--profile`` leaves behind.

SIGINT, SIGTERM and SIGHUP (the terminal closed) stop the load within about a second and, with
--profile, stop the served run (supervisor, nats-server, mockers, frontend): nothing is left running.
What was measured is kept: the finished load points and the finished requests of the current one,
marked interrupted. The temporary run directory of --profile is removed unless the run failed (then
its logs are kept and named).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from dynamo.core.proctree import marked_processes
from tests.conftest import dynamo

PROFILE = """\
name: benchstop
model: {name: bench-model}
backend: mocker
nats: {port: 0}
frontend: {host: 127.0.0.1, port: 0}
ports: {base: 0}
router: {mode: round_robin}
workers:
  decode: {role: agg, replicas: 1, args: {speedup-ratio: 0.2}}
"""


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DYNAMO_API_KEY", "OPENAI_API_KEY", "COLUMNS")}
    # mkdtemp puts the served run's temporary directory here, where the test can look for it
    return {**env, "TMPDIR": str(tmp_path), "DYNAMO_HOME": str(tmp_path / "home")}


class Bench:
    """``dynamo bench ARGS`` started in the background; killed with everything it served at teardown.

    The served run's directory is the one ``dynamo-bench-run-*`` in ``tmp_path`` (TMPDIR): found
    without parsing output, so the teardown finds it even when the output is not what a test expects.
    """

    def __init__(self, tmp_path: Path, *args: str, background_job: bool = False, nohup: bool = False):
        self.tmp_path = tmp_path
        self.err_path = tmp_path / "bench.err"
        self.out_path = tmp_path / "bench.out"
        argv = [sys.executable, "-m", "dynamo.cli.app", "bench", *args, "--no-progress"]
        if background_job:  # `dynamo bench ... &` in a script: the shell starts it with SIGINT ignored
            argv = ["sh", "-c", "trap '' INT; exec \"$@\"", "sh", *argv]
        if nohup:  # `nohup dynamo bench ...`: started with SIGHUP ignored, to outlive the terminal
            argv = ["sh", "-c", "trap '' HUP; exec \"$@\"", "sh", *argv]
        with open(self.err_path, "wb") as err, open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=_env(tmp_path), cwd=tmp_path, start_new_session=True)
        self.pids: set[int] = set()

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def run_dirs(self) -> list[Path]:
        return _leftover_dirs(self.tmp_path)

    def state(self, timeout: float = 60, ready: bool = True) -> dict:
        """The served run's state once it is ready (or, with ready=False, once its supervisor runs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"bench exited {self.proc.returncode}:\n{self.stderr()}"
            for run_dir in self.run_dirs():
                try:
                    state = json.loads((run_dir / "state.json").read_text())
                except (OSError, ValueError):
                    continue
                self.pids.add(state["supervisor_pid"])
                self.pids |= {p["pid"] for p in state.get("processes", {}).values() if p.get("pid")}
                if not ready or state.get("status") == "ready":
                    return state
            time.sleep(0.05)
        raise AssertionError(f"the served run was not ready after {timeout}s:\n{self.stderr()}")

    def signal_and_wait(self, sig: int, timeout: float) -> float:
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"bench still running {timeout}s after {sig!r}:\n{self.stderr()}") from None
        return time.monotonic() - started

    def _run_processes(self) -> set[int]:
        return {*self.pids, *(pid for d in self.run_dirs() for pid in marked_processes(str(d.resolve())))}

    def left_running(self) -> list[int]:
        """Processes of the served run still alive (waits a little for the last ones to exit)."""
        deadline = time.monotonic() + 3
        while True:
            alive = sorted(pid for pid in self._run_processes() if psutil.pid_exists(pid)
                           and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in self._run_processes():  # the supervisor first: its sentinel then kills the rest too
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def start_bench(tmp_path):
    started: list[Bench] = []

    def start(*args: str, background_job: bool = False) -> Bench:
        started.append(Bench(tmp_path, *args, background_job=background_job))
        return started[-1]

    yield start
    for bench in started:
        bench.kill()


def _in_flight(endpoint: str) -> float:
    text = urllib.request.urlopen(endpoint + "/metrics", timeout=2).read().decode()
    found = re.search(r"^dynamo_frontend_inflight_requests (\S+)", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _wait_for_load(endpoint: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _in_flight(endpoint) < 1:
        assert time.monotonic() < deadline, "the load never started"
        time.sleep(0.1)


def _leftover_dirs(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("dynamo-bench-run-*"))


@pytest.mark.slow
@pytest.mark.parametrize("sig, background_job", [(signal.SIGTERM, False), (signal.SIGINT, False),
                                                 (signal.SIGINT, True), (signal.SIGHUP, False)],
                         ids=["SIGTERM", "SIGINT", "SIGINT-background-job", "SIGHUP"])
def test_a_signal_stops_the_load_and_the_served_run(start_bench, tmp_path, sig, background_job):
    profile = tmp_path / "benchstop.yaml"
    profile.write_text(textwrap.dedent(PROFILE))
    bench = start_bench("--profile", str(profile), "-c", "4", "--duration", "120s", "--input-len", "16",
                        "--output-len", "16", background_job=background_job)
    endpoint = bench.state()["endpoint"]
    _wait_for_load(endpoint)
    _wait_for_answered(endpoint, 3 + 12)  # the readiness and calibration requests, then 12 of the load
    took = bench.signal_and_wait(sig, timeout=15)
    err = bench.stderr()
    assert bench.proc.returncode == 128 + sig, err
    assert f"error: interrupted by {sig.name}" in err and "Traceback" not in err, err
    assert bench.left_running() == [], err
    assert took < 8, f"{took:.1f}s to stop the load and the served run:\n{err}"
    assert _leftover_dirs(tmp_path) == [], err
    # what the point measured before the signal is printed, marked as partial
    out = bench.stdout()
    assert "dynamo bench: c4 (interrupted: partial)" in out, out
    requests = re.search(r"^Requests +(\d+) sent: (\d+) ok", out, re.MULTILINE)
    assert requests and int(requests.group(2)) >= 8, out
    assert "0 of 1 load point completed, and what c4 measured before it was cut short is kept" in err, err


def _wait_for_answered(endpoint: str, count: int, timeout: float = 30) -> None:
    """Until the frontend has counted ``count`` requests (dynamo_frontend_requests_total, all labels)."""
    deadline = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(endpoint + "/metrics", timeout=2).read().decode()
        done = sum(float(v) for v in re.findall(r"^dynamo_frontend_requests_total\{[^}]*\} (\S+)", text, re.MULTILINE))
        if done >= count:
            return
        assert time.monotonic() < deadline, f"only {done:g} requests answered"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_signal_while_the_profile_starts_stops_what_was_started(start_bench, tmp_path):
    profile = _fake_engine_profile(tmp_path, "slowstart", ["--ready-after", "60"], "readiness_probe: {period: 0.1}")
    bench = start_bench("--profile", str(profile), "-n", "2")
    deadline = time.monotonic() + 30
    while not bench.state(ready=False).get("processes", {}).get("w-0", {}).get("pid"):  # the worker is starting
        assert time.monotonic() < deadline, bench.stderr()
        time.sleep(0.05)
    bench.signal_and_wait(signal.SIGTERM, timeout=15)
    err = bench.stderr()
    assert bench.proc.returncode == 143 and "interrupted by SIGTERM" in err, err
    assert bench.left_running() == [], err
    assert _leftover_dirs(tmp_path) == [], err


@pytest.mark.slow
def test_a_finished_profile_run_leaves_no_directory_behind(tmp_path):
    profile = tmp_path / "benchstop.yaml"
    profile.write_text(textwrap.dedent(PROFILE).replace("speedup-ratio: 0.2", "speedup-ratio: 0"))
    proc = subprocess.run([sys.executable, "-m", "dynamo.cli.app", "bench", "--profile", str(profile), "-n", "3",
                           "--input-len", "8", "--output-len", "4", "--json"], capture_output=True, text=True,
                          env=_env(tmp_path), cwd=tmp_path, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["points"][0]["summary"]["completed"] == 3
    assert _leftover_dirs(tmp_path) == [], proc.stderr
    assert not any((tmp_path / "home" / "runs").iterdir()), "a link to the removed run directory is left"


@pytest.mark.slow
def test_a_failed_profile_run_keeps_its_logs_and_says_where(tmp_path):
    profile = _fake_engine_profile(tmp_path, "crash", ["--exit-at-once", "3"], restart="max_restarts: 0")
    proc = subprocess.run([sys.executable, "-m", "dynamo.cli.app", "bench", "--profile", str(profile), "-n", "2"],
                          capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    kept = _leftover_dirs(tmp_path)
    assert len(kept) == 1 and (kept[0] / "logs").is_dir(), proc.stderr
    assert f"the served run's logs are in {kept[0] / 'logs'}" in proc.stderr
    assert "warning:" not in proc.stderr


def test_a_taken_port_is_one_clear_error(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        profile = tmp_path / "taken.yaml"
        profile.write_text(textwrap.dedent(PROFILE).replace("frontend: {host: 127.0.0.1, port: 0}",
                                                            f"frontend: {{host: 127.0.0.1, port: {port}}}"))
        proc = subprocess.run([sys.executable, "-m", "dynamo.cli.app", "bench", "--profile", str(profile), "-n", "2"],
                              capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=60,
                              stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert f"error: port {port} (frontend http) is already in use" in proc.stderr
    assert "error: error:" not in proc.stderr and "warning:" not in proc.stderr, proc.stderr
    assert _leftover_dirs(tmp_path) == []


@pytest.mark.parametrize("sig, background_job", [(signal.SIGTERM, False), (signal.SIGINT, False),
                                                 (signal.SIGINT, True), (signal.SIGHUP, False)],
                         ids=["SIGTERM", "SIGINT", "SIGINT-background-job", "SIGHUP"])
def test_a_signal_stops_the_load_on_a_url_at_once(fake_server, tmp_path, sig, background_job):
    log = tmp_path / "requests.jsonl"
    url = fake_server("--itl-ms", "20", "--log", str(log))
    bench = Bench(tmp_path, "--url", url, "-c", "4", "--duration", "120s", "--input-len", "8", "--output-len", "50",
                  background_job=background_job)
    try:
        deadline = time.monotonic() + 30
        while not log.exists() or len(log.read_text().splitlines()) < 8:
            assert time.monotonic() < deadline and bench.proc.poll() is None, bench.stderr()
            time.sleep(0.05)
        took = bench.signal_and_wait(sig, timeout=10)
        assert bench.proc.returncode == 128 + sig, bench.stderr()
        assert f"error: interrupted by {sig.name}" in bench.stderr(), bench.stderr()
        assert took < 3, f"{took:.1f}s to stop the load"
        sent = len(log.read_text().splitlines())
        time.sleep(0.5)
        assert len(log.read_text().splitlines()) == sent  # nothing keeps sending
    finally:
        bench.kill()


def _wait_for_lines(log: Path, count: int, bench: Bench, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not log.exists() or len(log.read_text().splitlines()) < count:
        assert time.monotonic() < deadline and bench.proc.poll() is None, bench.stderr()
        time.sleep(0.02)


def test_an_interrupted_sweep_keeps_the_finished_points_and_the_partial_one(fake_server, tmp_path):
    # each request takes about 1 s (50 tokens, 20 ms apart): c1 sends 4 one after the other, then c2 two
    # pairs; the signal comes while c2's second pair is in flight, its first pair done
    log = tmp_path / "requests.jsonl"
    url = fake_server("--itl-ms", "20", "--log", str(log))
    out = tmp_path / "out"
    bench = Bench(tmp_path, "--url", url, "-c", "1,2,4", "-n", "4", "--input-len", "8", "--output-len", "50",
                  "-o", str(out), "--no-plots")
    try:
        _wait_for_lines(log, 3 + 4 + 4, bench)  # readiness and calibration, c1, then c2's second pair sent
        bench.signal_and_wait(signal.SIGINT, timeout=10)
        err, stdout = bench.stderr(), bench.stdout()
        assert bench.proc.returncode == 130, err
        assert ("error: interrupted by SIGINT before the benchmark finished: 1 of 3 load points completed, and what "
                f"c2 measured before it was cut short is kept, marked interrupted; results in {out}") in err, err
        doc = json.loads((out / "results.json").read_text())
        assert doc["interrupted"] == {"signal": "SIGINT", "load_points_planned": 3, "load_points_completed": 1}
        c1, c2 = (p["summary"] for p in doc["points"])
        assert (c1["interrupted"], c1["completed"], c1["cancelled"]) == (False, 4, 0)
        assert (c2["interrupted"], c2["completed"], c2["cancelled"]) == (True, 2, 2), c2
        assert len((out / "requests-c2.jsonl").read_text().splitlines()) == 2
        assert "interrupted" in (out / "summary.csv").read_text().splitlines()[0]
        assert "dynamo bench: c2 (interrupted: partial)" in stdout and "4 sent: 2 ok, 0 failed, 2 cancelled" in stdout
        assert "│ c2*" in stdout and "* interrupted: partial results" in stdout, stdout
        compared = dynamo("bench", "compare", str(out), str(out), env={"TERMINAL_WIDTH": "200"})
        assert compared.returncode == 0, compared.stderr
        assert "c2 (A and B interrupted: partial): A = " in compared.stdout and "c1: A = " in compared.stdout
        data = json.loads(dynamo("bench", "compare", str(out), str(out), "--json").stdout)
        assert [p["interrupted"] for p in data["points"]] == [[], ["A", "B"]]
    finally:
        bench.kill()


def test_a_sighup_ignored_at_start_stays_ignored(fake_server, tmp_path):
    # `nohup dynamo bench ...` is how a run is made to outlive its terminal
    log = tmp_path / "requests.jsonl"
    url = fake_server("--itl-ms", "5", "--log", str(log))
    bench = Bench(tmp_path, "--url", url, "-c", "2", "-n", "20", "--input-len", "8", "--output-len", "40", "--json",
                  nohup=True)
    try:
        _wait_for_lines(log, 3 + 2, bench)
        bench.proc.send_signal(signal.SIGHUP)
        assert bench.proc.wait(60) == 0, bench.stderr()
        assert json.loads(bench.stdout())["points"][0]["summary"]["completed"] == 20
    finally:
        bench.kill()


def test_a_signal_while_prompts_are_built_stops_at_once(fake_server, tmp_path):
    # 200k prompts of 512 tokens take seconds to build before the clock starts: Ctrl-C must not wait
    log = tmp_path / "requests.jsonl"
    url = fake_server("--log", str(log))
    bench = Bench(tmp_path, "--url", url, "-n", "200000", "--input-len", "512", "--output-len", "4")
    try:
        deadline = time.monotonic() + 30
        while not log.exists() or len(log.read_text().splitlines()) < 3:  # readiness and calibration done
            assert time.monotonic() < deadline and bench.proc.poll() is None, bench.stderr()
            time.sleep(0.05)
        time.sleep(0.3)
        took = bench.signal_and_wait(signal.SIGINT, timeout=20)
        assert bench.proc.returncode == 130, bench.stderr()
        assert took < 2, f"{took:.1f}s to stop"
        assert len(log.read_text().splitlines()) == 3  # no load was sent
    finally:
        bench.kill()


def _fake_engine_profile(tmp_path: Path, name: str, engine_args: list[str], worker_extra: str = "",
                         restart: str = "") -> Path:
    """A profile whose one worker is tests/fakes/fake_engine.py started with ``engine_args``."""
    fake_engine = Path(__file__).resolve().parents[1] / "fakes" / "fake_engine.py"
    command = json.dumps([sys.executable, str(fake_engine), "--port", "{port}", *engine_args])
    profile = tmp_path / f"{name}.yaml"
    profile.write_text(textwrap.dedent(f"""\
        name: {name}
        model: {{name: fake}}
        backend: mocker
        nats: {{port: 0}}
        frontend: {{host: 127.0.0.1, port: 0}}
        ports: {{base: 0}}
        restart: {{{restart}}}
        workers:
          w: {{replicas: 1, command: {command}, {worker_extra}}}
        """))
    return profile
