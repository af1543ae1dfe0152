"""An endpoint that refuses what bench asks (no or a wrong API key, a model it does not serve)
fails at once with exit 2 and says what to change, in ``dynamo bench`` and ``dynamo check`` (``--url``,
or a run whose frontend wants a key)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch):
    for name in ("DYNAMO_API_KEY", "OPENAI_API_KEY", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)


def bench_args(url: str, *args: str) -> list[str]:
    return ["--url", url, "-n", "2", "--input-len", "4", "--output-len", "2", "--ready-timeout", "30", *args]


def test_a_missing_api_key_fails_at_once_with_a_hint(fake_server, bench_process):
    url = fake_server("--api-key", "sekrit")
    started = time.monotonic()
    proc = bench_process(*bench_args(url))
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - started < 15  # not the whole --ready-timeout
    assert "requires an API key (GET /v1/models answered HTTP 401: invalid or missing API key)" in proc.stderr
    assert "pass it with --api-key KEY or set $DYNAMO_API_KEY" in proc.stderr
    assert "not ready" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_wrong_api_key_fails_at_once(fake_server, bench):
    url = fake_server("--api-key", "sekrit")
    proc = bench(*bench_args(url, "--api-key", "wrong"))
    assert proc.returncode == 2, proc.stderr
    assert "refused the API key" in proc.stderr and "check --api-key" in proc.stderr


def test_the_api_key_is_taken_from_dynamo_api_key(fake_server, bench, monkeypatch):
    url = fake_server("--api-key", "sekrit")
    monkeypatch.setenv("DYNAMO_API_KEY", "sekrit")
    proc = bench(*bench_args(url, "--json"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["points"][0]["summary"]["completed"] == 2


def test_a_model_that_is_not_served_is_named_with_the_served_ones(mocker, bench):
    url = mocker("--speedup-ratio", "0")
    proc = bench(*bench_args(url, "--model", "nope"))
    assert proc.returncode == 2, proc.stderr
    assert f"model 'nope' is not served at {url}/v1" in proc.stderr
    assert "it serves mock-model: choose one with --model" in proc.stderr
    assert "--no-ignore-eos" not in proc.stderr


def check_live(*args: str, env: dict | None = None) -> tuple[int, list[dict]]:
    proc = subprocess.run([sys.executable, "-m", "dynamo.cli.app", "check", *args, "--only", "live", "--json"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
                          stdin=subprocess.DEVNULL)
    results = [r for s in json.loads(proc.stdout)["sections"] for r in s["results"]]
    return proc.returncode, results


def check_url(url: str, env: dict | None = None) -> tuple[int, list[dict]]:
    return check_live("--url", url, env=env)


def test_check_says_the_api_key_is_missing_or_wrong(fake_server):
    url = fake_server("--api-key", "sekrit")
    code, results = check_url(url)
    assert code == 1
    auth = [r for r in results if r["name"] == "auth"]
    assert len(auth) == 1 and auth[0]["status"] == "error", results
    assert "requires an API key (HTTP 401)" in auth[0]["message"] and "DYNAMO_API_KEY" in auth[0]["fix"]
    assert not any("may not be ready" in (r.get("fix") or "") for r in results), results

    code, results = check_url(url, {"DYNAMO_API_KEY": "wrong"})
    auth = [r for r in results if r["name"] == "auth"]
    assert code == 1 and "refused the API key (HTTP" in auth[0]["message"], results

    code, results = check_url(url, {"DYNAMO_API_KEY": "sekrit"})
    assert code == 0, results
    assert [r["status"] for r in results if r["name"] == "request"] == ["ok"]


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", "/"])
def test_check_accepts_the_url_with_or_without_v1_as_bench_does(fake_server, suffix):
    url = fake_server()
    code, results = check_url(url + suffix)
    assert code == 0, results
    status = {r["name"]: r["status"] for r in results}
    assert status == {"health": "ok", "models": "ok", "request": "ok"}, results
    assert not any("/v1/v1" in json.dumps(r) for r in results), results


def test_check_of_a_run_whose_frontend_wants_a_key_says_to_pass_it(fake_server, tmp_path):
    # A ready run whose frontend (here the fake server) requires frontend.api_key; this test process
    # stands in for the supervisor. The fix is the key, not the frontend's logs.
    url = fake_server("--api-key", "sekrit")
    frontend = next(p for p in psutil.Process().children() if "--api-key" in p.cmdline())
    run_dir = tmp_path / "home" / "runs" / "keyed"
    run_dir.mkdir(parents=True)
    me = psutil.Process()
    (run_dir / "state.json").write_text(json.dumps({
        "run_id": "keyed", "profile": "keyed", "status": "ready", "supervisor_pid": me.pid,
        "supervisor_started": me.create_time(), "started_at": time.time(), "nats_url": None,
        "endpoint": url, "model": "fake-model",
        "processes": {"frontend": {"kind": "frontend", "status": "ready", "pid": frontend.pid, "url": url}},
    }))
    env = {"DYNAMO_HOME": str(tmp_path / "home")}
    code, results = check_live(env=env)
    auth = [r for r in results if r["name"] == "auth"]
    assert code == 1 and len(auth) == 1, results
    assert "requires an API key (HTTP 401); none was sent" in auth[0]["message"]
    assert "--api-key KEY" in auth[0]["fix"] and "DYNAMO_API_KEY" in auth[0]["fix"]
    assert not any("dynamo logs" in (r.get("fix") or "") for r in results if r["name"] in ("auth", "request"))

    code, results = check_live(env={**env, "DYNAMO_API_KEY": "wrong"})
    auth = [r for r in results if r["name"] == "auth"]
    assert len(auth) == 1 and "refused the API key (HTTP 401)" in auth[0]["message"], results

    code, results = check_live(env={**env, "DYNAMO_API_KEY": "sekrit"})
    assert [r["status"] for r in results if r["name"] == "request"] == ["ok"], results
