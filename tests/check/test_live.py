"""The live section against a real `dynamo serve` (fake-engine workers), then with one worker killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.check.conftest import fake_engine_profile, run_check

pytestmark = pytest.mark.slow


@pytest.fixture
def live_run(tmp_path):
    """A detached run under $DYNAMO_HOME/runs/, stopped with `dynamo stop DIR` whatever happens."""
    home = tmp_path / "home"
    run_dir = home / "runs" / "checkrun"
    env = {**os.environ, "DYNAMO_HOME": str(home)}
    profile = fake_engine_profile(tmp_path)
    try:
        started = subprocess.run(
            [sys.executable, "-m", "dynamo.cli.app", "serve", str(profile), "--detach", "--run-dir", str(run_dir)],
            capture_output=True, text=True, env=env, timeout=90,
        )
        assert started.returncode == 0, f"dynamo serve --detach failed:\n{started.stdout}\n{started.stderr}"
        yield home, run_dir
    finally:
        subprocess.run([sys.executable, "-m", "dynamo.cli.app", "stop", str(run_dir)], capture_output=True,
                       env=env, timeout=60)


def _state(run_dir) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def test_a_healthy_run_then_one_worker_killed(live_run, tmp_path):
    home, run_dir = live_run
    env = {"DYNAMO_HOME": str(home)}

    healthy = run_check("--only", "live", "--json", env=env)
    assert healthy.code == 0, healthy.stdout
    statuses = {r["name"]: r["status"] for r in healthy.results("live")}
    assert statuses == {"run": "ok", "nats": "ok", "w-0": "ok", "w-1": "ok", "frontend": "ok",
                        "discovery": "ok", "request": "ok"}
    assert "routes to 2 workers: w-0, w-1" in healthy.one("live", "frontend")["message"]
    assert healthy.one("live", "discovery")["data"] == {"registered": 2, "planned": 2, "missing": []}
    assert healthy.report["seconds"] < 2.0  # the checks themselves, within their budget

    # the same endpoint through --url, as for any OpenAI-compatible server
    endpoint = _state(run_dir)["endpoint"]
    by_url = run_check("--only", "live", "--json", "--url", endpoint, env=env)
    assert by_url.code == 0, by_url.stdout
    assert by_url.one("live", "models")["data"]["model"] == "fake"
    assert by_url.one("live", "request")["status"] == "ok"

    # a profile wanting the run's frontend port: the holder is named as that run, with the way to stop it
    port = int(endpoint.rsplit(":", 1)[1])
    other = fake_engine_profile(tmp_path, name="other", frontend_port=port)
    clash = run_check(str(other), "--only", "profile", "--json", env=env)
    taken = clash.one("profile", "port")
    assert taken["status"] == "error" and "part of run checkrun (running)" in taken["message"]
    assert f"dynamo stop {run_dir}" in taken["fix"]

    # kill one worker; its restart policy is "no" and it is not required, so the run stays up without it
    victim = _state(run_dir)["processes"]["w-1"]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while _state(run_dir)["processes"]["w-1"]["status"] == "ready" and time.monotonic() < deadline:
        time.sleep(0.05)
    broken = run_check("--only", "live", "--json", env=env)
    assert broken.code == 1, broken.stdout
    worker = broken.one("live", "w-1")
    assert worker["status"] == "error"
    assert "killed by SIGKILL" in worker["message"] and f"pid {victim} is gone" in worker["message"]
    assert "dynamo logs checkrun w-1" in worker["fix"]
    assert broken.one("live", "w-0")["status"] == "ok"
    discovery = broken.one("live", "discovery")
    assert discovery["status"] == "warn" and discovery["data"]["missing"] == ["w-1"]
    assert "routes to 1 worker: w-0" in broken.one("live", "frontend")["message"]
    assert broken.one("live", "request")["status"] == "ok"  # the frontend still answers through w-0

    text = run_check("--only", "live", "--no-color", env=env)
    assert "✗" in text.stdout and "fix: dynamo logs checkrun w-1" in text.stdout.replace("\n", " ").replace("  ", " ")


def test_a_run_whose_supervisor_died_is_an_error(tmp_path):
    run_dir = tmp_path / "home" / "runs" / "crashed"
    run_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "state.json").write_text(json.dumps({
        "run_id": "crashed", "profile": "x", "status": "ready", "supervisor_pid": dead.pid,
        "supervisor_started": time.time() - 5, "started_at": time.time() - 5, "processes": {},
    }))
    check = run_check("--only", "live", "--json", env={"DYNAMO_HOME": str(tmp_path / "home")})
    assert check.code == 1
    result = check.one("live", "run")
    assert result["status"] == "error" and "supervisor" in result["message"] and "gone" in result["message"]
    assert result["fix"].startswith("dynamo stop crashed")


def test_a_state_that_says_ready_for_a_dead_worker_is_caught(tmp_path):
    # The supervisor is alive (this test process stands in for it) but has not yet noticed a death.
    run_dir = tmp_path / "home" / "runs" / "lagging"
    run_dir.mkdir(parents=True)
    me = psutil.Process()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run_dir / "state.json").write_text(json.dumps({
        "run_id": "lagging", "profile": "x", "status": "ready", "supervisor_pid": me.pid,
        "supervisor_started": me.create_time(), "started_at": time.time(), "nats_url": None,
        "processes": {"w-0": {"kind": "worker", "status": "ready", "pid": gone.pid, "started_at": time.time(),
                              "url": "http://127.0.0.1:9"}},
    }))
    check = run_check("--only", "live", "--json", env={"DYNAMO_HOME": str(tmp_path / "home")})
    worker = check.one("live", "w-0")
    assert worker["status"] == "error" and f"pid {gone.pid} is gone (the state still says ready)" in worker["message"]
    assert check.one("live", "discovery")["status"] == "error"  # no NATS URL to read discovery from


def test_no_active_run_is_one_info_line(tmp_path):
    check = run_check("--only", "live", "--json", env={"DYNAMO_HOME": str(tmp_path)})
    assert check.code == 0
    [result] = check.results("live")
    assert result["status"] == "info" and "no active run" in result["message"]


def test_a_run_that_does_not_exist_is_a_usage_error(tmp_path):
    check = run_check("--run", "nope", env={"DYNAMO_HOME": str(tmp_path)})
    assert check.code == 2 and "no run 'nope'" in check.stderr
