"""The supervisor with real processes: order, readiness, restarts, stops, orphans, ports, run commands."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import Run, dynamo, fake_profile, kill_run, marked

pytestmark = pytest.mark.slow


def _started(events: list[dict]) -> list[str]:
    return [e["process"] for e in events if e["event"] == "started"]


def test_start_order_readiness_gating_and_reverse_stop(tmp_path, serve):
    profile = fake_profile(tmp_path, engine_args="--ready-after 0.5")
    run = serve(profile)
    state = run.wait_ready()
    events = run.events()
    order = [(e["process"], e["event"]) for e in events if e["event"] in ("started", "ready")]
    # nats first, workers after nats is ready, the frontend only after both workers are ready
    assert order[0] == ("nats", "started") and order[1] == ("nats", "ready")
    frontend_started = order.index(("frontend", "started"))
    for worker in ("w-0", "w-1"):
        assert order.index((worker, "started")) > 1
        assert order.index((worker, "ready")) < frontend_started
    assert state["processes"]["w-0"]["status"] == "ready"

    # the frontend serves through the workers found in discovery
    reply = httpx.post(state["endpoint"] + "/v1/chat/completions",
                       json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"].startswith("pid ")
    health = httpx.get(state["endpoint"] + "/health", timeout=5).json()
    assert sorted(w["name"] for w in health["workers"]) == ["w-0", "w-1"]

    run.proc.send_signal(signal.SIGINT)
    assert run.wait_exit() == 0
    stops = [e["process"] for e in run.events() if e["event"] == "stopped"]
    assert stops.index("frontend") < stops.index("w-0") < stops.index("nats")
    assert stops.index("w-1") < stops.index("nats")
    assert marked(run.marker) == []
    assert run.state()["status"] == "stopped"
    # nats-server's banner and chatter go to its log, not to the console
    assert "[INF]" in (run.dir / "logs" / "nats.log").read_text() and "[INF]" not in run.text()


def test_worker_that_exits_at_once_restarts_with_growing_delays_then_fails(tmp_path, serve):
    profile = fake_profile(
        tmp_path, replicas=1, engine_args="--exit-at-once 3",
        restart="{policy: on-failure, max_restarts: 3, backoff: {initial: 0.2s, max: 5s, multiplier: 2, jitter: 0}}",
    )
    run = serve(profile)
    code = run.wait_exit(60)
    assert code == 1
    restarts = [e for e in run.events() if e["process"] == "w-0" and e["event"] == "restarting"]
    delays = [float(e["message"].split("restarting in ")[1].split("s")[0]) for e in restarts]
    assert delays == [0.2, 0.4, 0.8]
    assert _started(run.events()).count("w-0") == 4
    state = run.state()
    assert state["status"] == "failed"
    assert state["processes"]["w-0"]["status"] == "failed"
    assert "w-0 failed after 3 restarts" in state["failure"]
    assert "frontend" not in _started(run.events())  # never started: its dependencies never became ready
    assert marked(run.marker) == []


def test_worker_that_never_becomes_ready_hits_the_probe_timeout(tmp_path, serve):
    profile = fake_profile(
        tmp_path, replicas=1, engine_args="--never-ready", restart="{policy: on-failure, max_restarts: 0}",
        extra="",
    )
    text = profile.read_text().replace("readiness_probe: {period: 0.1}", "readiness_probe: {period: 0.1, startup_timeout: 1.5s}")
    profile.write_text(text)
    run = serve(profile)
    assert run.wait_exit(30) == 1
    timeouts = [e for e in run.events() if e["process"] == "w-0" and e["event"] == "timeout"]
    assert timeouts and "never became ready" in timeouts[0]["message"]
    assert "GET http://127.0.0.1:" in run.state()["processes"]["w-0"]["reason"]
    assert marked(run.marker) == []


def test_a_worker_never_ready_after_its_restarts_fails_saying_why_not_with_its_exit_code(tmp_path, serve):
    profile = fake_profile(tmp_path, replicas=1, engine_args="--never-ready",
                           restart="{policy: on-failure, max_restarts: 2, backoff: {initial: 0.1s, jitter: 0}}")
    profile.write_text(profile.read_text().replace("readiness_probe: {period: 0.1}",
                                                   "readiness_probe: {period: 0.1, startup_timeout: 1s}"))
    run = serve(profile)
    assert run.wait_exit(40) == 1
    [failed] = [e for e in run.events() if e["process"] == "w-0" and e["event"] == "failed"]
    # stopped with SIGTERM, the fake engine exits 0: that exit code is not why it failed
    assert failed["message"].startswith("failed: never became ready within 1s (startup_timeout) after 2 restarts")
    assert run.state()["failure"] == "w-0 failed after 2 restarts: never became ready within 1s (startup_timeout)"
    assert "w-0 failed after 2 restarts: never became ready within 1s" in run.text()
    assert marked(run.marker) == []


def test_sigterm_during_startup_stops_everything_cleanly(tmp_path, serve):
    profile = fake_profile(tmp_path, engine_args="--ready-after 30")
    run = serve(profile)
    run.wait_for(lambda: run.state().get("processes", {}).get("w-1", {}).get("status") == "starting",
                 what="workers starting")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit(30) == 0
    assert run.state()["status"] == "stopped"
    assert "frontend" not in _started(run.events())
    assert marked(run.marker) == []


def test_a_closed_terminal_sighup_stops_the_run_as_ctrl_c_does(tmp_path, serve):
    run = serve(fake_profile(tmp_path))
    run.wait_ready()
    run.proc.send_signal(signal.SIGHUP)
    assert run.wait_exit(30) == 0
    assert run.state()["status"] == "stopped"
    assert any(e["event"] == "stop-requested" and e.get("signal") == "SIGHUP" for e in run.events())
    assert marked(run.marker) == []


def test_a_sighup_ignored_at_start_nohup_leaves_the_run_serving(tmp_path):
    profile, run_dir, output = fake_profile(tmp_path, replicas=1), tmp_path / "run", tmp_path / "serve.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen(["nohup", sys.executable, "-m", "dynamo.cli.app", "serve", str(profile),
                                 "--run-dir", str(run_dir), "--no-color"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "DYNAMO_HOME": str(tmp_path / "home")})
    run = Run(proc, run_dir, output)
    try:
        run.wait_ready()
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # long enough for a stop to have begun
        assert proc.poll() is None and run.state()["status"] == "ready", run.text()
        assert not any(e["event"] == "stop-requested" for e in run.events())
    finally:
        kill_run(run)


def test_serve_says_which_engine_args_it_dropped_and_names_a_likely_typo(tmp_path, serve):
    profile = tmp_path / "v.yaml"
    profile.write_text("name: v\nbackend: vllm\nmodel: {name: m}\nnats: {port: 0}\nfrontend: {port: 0}\n"
                       "ports: {base: 0}\nworkers:\n  w:\n    replicas: 2\n"
                       "    args: {max-num-seq: 64, gpu-memory-utilization: 0.8}\n")
    run = serve(profile, "--backend", "mocker")
    run.wait_ready()
    text = run.text()
    assert "note: workers.w: dropped --max-num-seq (not a mocker flag; did you mean 'max-num-seqs'?)" in text
    assert text.count("dropped --gpu-memory-utilization (not a mocker flag)") == 1, text  # once for both replicas


def test_sigkill_of_the_supervisor_leaves_no_process_behind(tmp_path, serve):
    escape_port = _free_port()
    profile = fake_profile(tmp_path, replicas=2, engine_args=f"--escape-port {escape_port}")
    # only replica 0 holds the escape port; replica 1 escapes without a port
    profile.write_text(profile.read_text().replace("replicas: 2", "replicas: 1"))
    run = serve(profile)
    run.wait_ready()
    assert len(marked(run.marker)) >= 4  # nats, worker, its escaped grandchild, frontend
    os.kill(run.state()["supervisor_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while marked(run.marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marked(run.marker) == [], "processes of the run survived their supervisor"
    _assert_port_free(escape_port)
    shown = dynamo("ps", str(run.dir)).stdout
    assert "dead (supervisor gone)" in shown
    assert " ready " not in shown and shown.count(" gone ") >= 3, shown  # not its last stale statuses


def test_escaped_descendants_are_killed_on_a_normal_stop(tmp_path, serve):
    escape_port = _free_port()
    profile = fake_profile(tmp_path, replicas=1, engine_args=f"--escape-port {escape_port}")
    run = serve(profile)
    run.wait_ready()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait_exit() == 0
    assert marked(run.marker) == []
    _assert_port_free(escape_port)


def test_worker_ignoring_sigterm_is_killed_after_its_grace_period(tmp_path, serve):
    profile = fake_profile(tmp_path, replicas=1, engine_args="--ignore-sigterm")
    profile.write_text(profile.read_text().replace("readiness_probe: {period: 0.1}",
                                                   "readiness_probe: {period: 0.1}\n    grace_period: 1s"))
    run = serve(profile)
    run.wait_ready()
    started = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait_exit() == 0
    assert 0.9 <= time.monotonic() - started < 10
    killed = [e for e in run.events() if e["process"] == "w-0" and e["event"] == "killed"]
    assert killed and "after 1s grace: SIGKILL" in killed[0]["message"]
    assert marked(run.marker) == []


def test_a_crashed_ready_worker_is_restarted_and_rejoins(tmp_path, serve):
    profile = fake_profile(tmp_path, replicas=1,
                           restart="{policy: on-failure, max_restarts: 2, backoff: {initial: 0.1s, jitter: 0}}")
    run = serve(profile)
    state = run.wait_ready()
    first_pid = state["processes"]["w-0"]["pid"]
    os.kill(first_pid, signal.SIGKILL)
    run.wait_for(lambda: (p := run.state()["processes"]["w-0"])["status"] == "ready" and p["pid"] != first_pid,
                 what="restarted worker ready")
    endpoint = run.state()["endpoint"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        workers = httpx.get(endpoint + "/health", timeout=5).json().get("workers", [])
        if workers:
            break
        time.sleep(0.1)
    reply = httpx.post(endpoint + "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert reply.status_code == 200
    assert run.state()["processes"]["w-0"]["restarts"] == 1


def test_port_conflict_is_refused_before_anything_starts(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        profile = fake_profile(tmp_path)
        result = dynamo("serve", str(profile), "--set", f"frontend.port={port}", env={"DYNAMO_HOME": str(tmp_path)})
        assert result.returncode == 2
        assert f"port {port} (frontend http) is already in use by pid {os.getpid()}" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "runs").exists(), "nothing may be started or created"
    finally:
        holder.close()


def test_detach_ps_logs_stop(tmp_path):
    profile = fake_profile(tmp_path)
    env = {"DYNAMO_HOME": str(tmp_path / "home")}
    run_id = None
    try:
        result = dynamo("serve", str(profile), "--detach", env=env, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "endpoint: http://127.0.0.1:" in result.stdout
        run_id = result.stdout.split()[1]

        ps = dynamo("ps", "--json", env=env)
        state = json.loads(ps.stdout)
        assert state["run_id"] == run_id and state["status"] == "ready"
        assert {n: p["status"] for n, p in state["processes"].items()} == {
            "nats": "ready", "w-0": "ready", "w-1": "ready", "frontend": "ready"}
        table = dynamo("ps", env=env).stdout
        assert "w-1" in table and "ready" in table

        logs = dynamo("logs", "--no-prefix", "w-0", env=env).stdout
        assert "fake engine listening on" in logs
        logs = dynamo("logs", "--tail", "1", "--grep", "listening", "--timestamps", env=env).stdout
        lines = [line for line in logs.splitlines() if line.strip()]
        assert any(line.startswith("w-0") and "Z fake engine listening" in line for line in lines)
        assert all("listening" in line for line in lines)
        assert dynamo("logs", run_id, "nope", env=env).returncode == 2

        stop = dynamo("stop", env=env, timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert "stopped" in stop.stdout
        assert dynamo("ps", run_id, "--json", env=env).stdout and json.loads(
            dynamo("ps", run_id, "--json", env=env).stdout)["status"] == "stopped"
        assert marked(str((tmp_path / "home" / "runs" / run_id).resolve())) == []
    finally:
        if run_id:
            dynamo("stop", run_id, "--timeout", "5", env=env)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_interrupting_a_detached_start_stops_the_run_instead_of_leaving_it_starting(tmp_path, sig):
    profile = fake_profile(tmp_path, replicas=1, engine_args="--ready-after 30")
    env = {**os.environ, "DYNAMO_HOME": str(tmp_path / "home")}
    cli = subprocess.Popen([sys.executable, "-m", "dynamo.cli.app", "serve", str(profile), "--detach"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    runs = tmp_path / "home" / "runs"
    try:
        deadline = time.monotonic() + 30
        while not list(runs.glob("*/state.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        run_dir = next(runs.glob("*/state.json")).parent
        time.sleep(0.5)  # the supervisor is starting its processes
        cli.send_signal(sig)
        out, err = cli.communicate(timeout=60)
        assert cli.returncode == 128 + sig, out + err
        assert f"stopped: interrupted by {signal.Signals(sig).name} while starting" in err
        assert json.loads((run_dir / "state.json").read_text())["status"] == "stopped"
        assert marked(str(run_dir.resolve())) == []
    finally:
        if cli.poll() is None:
            cli.kill()
        dynamo("stop", "--timeout", "5", env={"DYNAMO_HOME": str(tmp_path / "home")})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_port_free(port: int) -> None:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.05)
    raise AssertionError(f"port {port} is still held by an escaped process")


def test_a_worker_refusing_its_arguments_fails_the_run_with_exit_2_and_no_restarts(tmp_path, serve):
    profile = fake_profile(tmp_path, replicas=1, engine_args="--exit-at-once 2",
                           restart="{policy: on-failure, max_restarts: 3, backoff: {initial: 0.2s}}")
    run = serve(profile)
    assert run.wait_exit(60) == 2
    assert not [e for e in run.events() if e["event"] == "restarting"]
    assert "a usage error" in run.state()["failure"]
    assert marked(run.marker) == []


def test_two_runs_racing_for_the_same_ports_one_wins_the_other_exits_2(tmp_path):
    ports = ("--set", f"frontend.port={_free_port()}", "--set", f"nats.port={_free_port()}",
             "--set", "ports.base=0")
    profile = fake_profile(tmp_path)
    env = {"DYNAMO_HOME": str(tmp_path / "home")}
    import subprocess
    import sys

    runs = [subprocess.Popen([sys.executable, "-m", "dynamo.cli.app", "serve", str(profile), *ports, "--detach",
                              "--run-dir", str(tmp_path / name)], env={**os.environ, **env}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in ("a", "b")]
    try:
        results = [(r.wait(90), *r.communicate()) for r in runs]
        assert sorted(code for code, _, _ in results) == [0, 2], results
        loser = next(err for code, _, err in results if code == 2)
        # refused before starting (the port check) or once its process found the port taken: never "ready"
        assert "already in use" in loser or "held by" in loser, loser
        assert "Traceback" not in loser
    finally:
        for name in ("a", "b"):
            dynamo("stop", str(tmp_path / name), "--timeout", "10", env=env)
    for name in ("a", "b"):
        assert marked(str((tmp_path / name).resolve())) == []


def test_a_run_directory_in_use_is_refused_and_reused_once_stopped(tmp_path):
    profile = fake_profile(tmp_path, replicas=1)
    env = {"DYNAMO_HOME": str(tmp_path / "home")}
    where = str(tmp_path / "same")
    try:
        assert dynamo("serve", str(profile), "--detach", "--run-dir", where, env=env, timeout=60).returncode == 0
        again = dynamo("serve", str(profile), "--detach", "--run-dir", where, env=env, timeout=60)
        assert again.returncode == 2 and "in use by a running supervisor" in again.stderr
        assert dynamo("stop", where, env=env, timeout=60).returncode == 0
        reused = dynamo("serve", str(profile), "--detach", "--run-dir", where, env=env, timeout=60)
        assert reused.returncode == 0 and "is ready" in reused.stdout, reused.stderr  # not the old "stopped"
    finally:
        dynamo("stop", where, "--timeout", "10", env=env)
    assert marked(str((tmp_path / "same").resolve())) == []


def test_ctrl_c_with_nats_frozen_stops_promptly_and_says_how_long_it_took(tmp_path, serve):
    run = serve(fake_profile(tmp_path, replicas=1))
    state = run.wait_ready()
    os.kill(state["processes"]["nats"]["pid"], signal.SIGSTOP)  # discovery can no longer be updated
    started = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait_exit(30) == 0
    took = time.monotonic() - started
    assert took < 10, f"stopping took {took:.1f}s"  # not NATS's request timeouts, entry by entry
    stopped = next(e for e in run.events() if e["event"] == "stopped" and e["process"] == "dynamo")
    assert stopped["seconds_to_stop"] >= min(took, 2.0) - 0.5  # the time reported includes the discovery wait
    assert marked(run.marker) == []


def test_a_frozen_nats_is_noticed_and_restarted_and_serving_goes_on(tmp_path, serve):
    run = serve(fake_profile(tmp_path, replicas=1))
    state = run.wait_ready()
    run.freeze_until_replaced("nats", 40)  # its port still accepts connections (the kernel does that), but it is silent
    assert [e for e in run.events() if e["process"] == "nats" and e["event"] == "unhealthy"]
    reply = httpx.post(state["endpoint"] + "/v1/chat/completions", timeout=10,
                       json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200  # the worker stayed in discovery through the NATS restart
