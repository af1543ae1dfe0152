"""``dynamo ps``, ``logs`` and ``stop`` with real runs: dead runs, runs kept in their own --run-dir."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import FAKE_ENGINE, dynamo, fake_profile, marked

pytestmark = pytest.mark.slow


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _gone(pid: int, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def test_stop_of_a_run_whose_supervisor_was_killed_kills_its_leftovers_and_check_turns_green(tmp_path, serve):
    # The worker's helper process runs without the run's marker (env -i), so the sentinel cannot find it,
    # and was forked (no parent-death signal), so it outlives the supervisor.
    engine = f"env -i sleep 300 & exec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_ENGINE))} --port {{port}}"
    profile = fake_profile(tmp_path, replicas=1)
    text = profile.read_text().splitlines()
    text = [f"    command: {json.dumps(['sh', '-c', engine])}" if line.strip().startswith("command:") else line
            for line in text]
    profile.write_text("\n".join(text) + "\n")
    env = {"DYNAMO_HOME": str(tmp_path / "home")}
    run = serve(profile)
    leftover = None
    try:
        run.wait_ready()
        run.wait_for(lambda: run.state()["processes"]["w-0"]["descendants"], 15, "the engine recorded")
        [leftover] = run.state()["processes"]["w-0"]["descendants"]
        os.kill(run.state()["supervisor_pid"], signal.SIGKILL)
        run.wait_for(lambda: not marked(run.marker), 5, "the sentinel's sweep")
        assert not _gone(leftover, 0.5), "the test needs a process that outlives the supervisor"

        shown = dynamo("ps", str(run.dir), env={**env, "COLUMNS": "200"}).stdout
        assert "dead (supervisor gone)" in shown and "gone (1 descendant still running)" in shown, shown
        assert dynamo("check", "--only", "live", "--run", str(run.dir), env=env).returncode == 1

        stop = dynamo("stop", str(run.dir), env=env)
        assert stop.returncode == 0, stop.stderr
        assert f"run {run.id} was dead (supervisor gone): killed 1 leftover process; marked it failed" in stop.stdout
        assert _gone(leftover), "dynamo stop left the recorded engine running"

        state = run.state()
        assert state["status"] == "failed" and f"(pid {state['supervisor_pid']}) died" in state["failure"]
        assert {p["status"] for p in state["processes"].values()} <= {"stopped", "failed", "exited", "pending"}
        shown = dynamo("ps", str(run.dir), env=env).stdout
        assert f"run {run.id} failed" in shown and "dead" not in shown and " ready " not in shown, shown
        check = dynamo("check", "--only", "live", "--run", str(run.dir), env=env)
        assert check.returncode == 0, check.stdout
        check = dynamo("check", "--only", "live", env=env)  # without naming it: no active run left
        assert check.returncode == 0 and "no active run" in check.stdout, check.stdout
        again = dynamo("stop", str(run.dir), env=env)
        assert again.returncode == 0 and f"run {run.id} is not running (failed)" in again.stdout
    finally:
        if leftover:
            _kill([leftover])


def test_stop_of_a_dead_run_spares_processes_that_only_reuse_recorded_pids(tmp_path):
    """A recorded pid now belongs to another process (started later, or in another session): not ours."""
    others = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(2)]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        run_dir = tmp_path / "home" / "runs" / "crashed"
        run_dir.mkdir(parents=True)
        now = time.time()
        (run_dir / "state.json").write_text(json.dumps({
            "run_id": "crashed", "profile": "x", "status": "ready", "supervisor_pid": dead.pid,
            "supervisor_started": now - 600, "started_at": now - 600, "updated_at": now + 5,  # w-1's timing fits
            "processes": {
                # a process recorded ten minutes ago: the live one under its pid started just now
                "w-0": {"kind": "worker", "status": "ready", "pid": others[0].pid, "started_at": now - 600,
                        "descendants": []},
                # a descendant must be in its process's session: this one is in its own
                "w-1": {"kind": "worker", "status": "ready", "pid": dead.pid, "started_at": now - 1,
                        "descendants": [others[1].pid]},
            },
        }))
        env = {"DYNAMO_HOME": str(tmp_path / "home")}
        assert "dead (supervisor gone)" in dynamo("ps", "crashed", env=env).stdout
        stop = dynamo("stop", "crashed", env=env)
        assert stop.returncode == 0 and "nothing of it was left running; marked it failed" in stop.stdout, stop.stdout
        assert all(p.poll() is None for p in others), "dynamo stop killed a process that was not the run's"
        assert json.loads((run_dir / "state.json").read_text())["status"] == "failed"
    finally:
        for proc in others:
            proc.kill()
            proc.wait()


def test_a_run_in_its_own_run_dir_is_found_from_its_home_and_its_hints_work_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.delenv("DYNAMO_HOME", raising=False)  # the commands run below inherit the environment
    profile = fake_profile(tmp_path, replicas=1)
    home, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    where = tmp_path / "runs-kept-here" / "mine"
    (home / ".dynamo" / "runs").mkdir(parents=True)
    (home / ".dynamo" / "runs" / "deleted").symlink_to(tmp_path / "a-run-dir-since-deleted")
    try:
        # DYNAMO_HOME unset: the default ./.dynamo of the directory serve runs in
        result = dynamo("serve", str(profile), "--detach", "--run-dir", str(where), cwd=home, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"logs:     dynamo logs {where} -f" in result.stdout
        assert f"stop:     dynamo stop {where}" in result.stdout
        assert sorted(p.name for p in (home / ".dynamo" / "runs").iterdir()) == ["mine"]  # dead links pruned

        # from the directory serve ran in, without naming it: the newest run, in every list, by id
        assert "run mine ready" in dynamo("ps", cwd=home).stdout
        [row] = json.loads(dynamo("ps", "--all", "--json", cwd=home).stdout)
        assert row["run"] == "mine" and row["path"] == str(where) and row["status"] == "ready"
        assert "fake engine listening on" in dynamo("logs", "mine", "w-0", cwd=home).stdout
        check = dynamo("check", "--only", "live", "--json", cwd=home)
        [live] = [r for s in json.loads(check.stdout)["sections"] for r in s["results"] if r["name"] == "run"]
        assert live["status"] == "ok" and live["data"]["path"] == str(where), live

        # anywhere else: the commands serve printed
        assert "no active run" in dynamo("ps", cwd=elsewhere).stderr
        assert "run mine ready" in dynamo("ps", str(where), cwd=elsewhere).stdout
        logs = subprocess.run([sys.executable, "-m", "dynamo.cli.app", "logs", str(where), "w-0"],
                              capture_output=True, text=True, cwd=elsewhere, timeout=30)
        assert "fake engine listening on" in logs.stdout
        stop = dynamo("stop", str(where), cwd=elsewhere, timeout=60)
        assert stop.returncode == 0 and "run mine stopped" in stop.stdout, stop.stdout + stop.stderr
        assert marked(str(where.resolve())) == []
    finally:
        dynamo("stop", str(where), "--timeout", "5", cwd=elsewhere)


def test_a_run_dir_holding_other_files_is_refused_before_anything_is_written(tmp_path):
    profile = fake_profile(tmp_path, replicas=1)
    env = {"DYNAMO_HOME": str(tmp_path / "home")}
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    try:
        result = dynamo("serve", str(profile), "--detach", "--run-dir", str(mine), env=env)
    finally:
        if (mine / "state.json").exists():  # wrongly started: not left running
            dynamo("stop", str(mine), "--timeout", "5", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--run-dir {mine} is not empty and is not a dynamo run directory (it holds notes.txt)" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = dynamo("serve", str(profile), "--detach", "--run-dir", str(a_file), env=env)
    assert result.returncode == 2 and f"--run-dir {a_file}: not a directory" in result.stderr, result.stderr


def test_stop_with_timeout_0_kills_the_run_at_once_and_records_it_stopped(tmp_path, serve):
    run = serve(fake_profile(tmp_path, replicas=1))
    run.wait_ready()
    stop = dynamo("stop", str(run.dir), "--timeout", "0")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert f"run {run.id} killed; marked it stopped" in stop.stdout
    assert marked(run.marker) == []
    state = run.state()
    assert state["status"] == "stopped" and "killed by dynamo stop" in state["note"]
    shown = dynamo("ps", str(run.dir), env={"COLUMNS": "200"}).stdout
    assert "dead" not in shown and f"run {run.id} stopped" in shown, shown


@pytest.mark.parametrize("value", ["-5", "nan", "inf"])
def test_stop_refuses_a_timeout_that_is_not_a_number_of_seconds(value):
    result = dynamo("stop", "--timeout", value)
    assert result.returncode == 2 and "expected a number of seconds >= 0" in result.stderr, result.stderr


@pytest.mark.parametrize("where", ["home", "run-dir", "home-is-a-file"])
def test_serve_with_nowhere_to_write_its_run_is_a_clear_exit_2(tmp_path, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args, env, setting = ["serve", str(fake_profile(tmp_path, replicas=1))], {}, "DYNAMO_HOME"
    if where == "home":
        env["DYNAMO_HOME"] = "/proc/dynamo-home"
    elif where == "home-is-a-file":
        env["DYNAMO_HOME"] = str(blocker)
    else:
        args += ["--run-dir", "/proc/dynamo-run"]
        env["DYNAMO_HOME"], setting = str(tmp_path / "home"), "--run-dir"
    result = dynamo(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert "cannot write the run directory" in result.stderr and f"choose a writable {setting}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_prefix_matching_several_runs_picks_the_one_still_active(tmp_path):
    me = psutil.Process()
    for run_id, status, pid in (("agg-20261202-100000-aaaa", "stopped", None),
                                ("agg-20261202-110000-bbbb", "ready", me.pid),
                                ("agg-20261202-090000-cccc", "failed", None)):
        (tmp_path / "runs" / run_id).mkdir(parents=True)
        (tmp_path / "runs" / run_id / "state.json").write_text(json.dumps({
            "run_id": run_id, "profile": "agg", "status": status, "supervisor_pid": pid,
            "supervisor_started": me.create_time() if pid else None, "started_at": time.time(), "processes": {}}))
    env = {"DYNAMO_HOME": str(tmp_path)}
    shown = dynamo("ps", "agg", "--json", env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["run_id"] == "agg-20261202-110000-bbbb", shown.stderr
    (tmp_path / "runs" / "agg-20261202-110000-bbbb" / "state.json").write_text(json.dumps({
        "run_id": "agg-20261202-110000-bbbb", "profile": "agg", "status": "stopped", "processes": {}}))
    ambiguous = dynamo("ps", "agg", env=env)
    assert ambiguous.returncode == 2 and "'agg' matches 3 runs" in ambiguous.stderr, ambiguous.stderr
    assert "give more of the id" in ambiguous.stderr


def test_logs_follow_ends_saying_how_the_run_ended(tmp_path, serve):
    run = serve(fake_profile(tmp_path, replicas=1))
    run.wait_ready()
    follow = subprocess.Popen([sys.executable, "-m", "dynamo.cli.app", "logs", str(run.dir), "-f"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        os.kill(run.state()["supervisor_pid"], signal.SIGKILL)
        out, err = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 0
    assert "fake engine listening" in out
    assert f"run {run.id} is dead (supervisor gone); no more logs to follow" in err, err


def test_stop_takes_no_guess_when_a_prefix_matches_several_runs(tmp_path):
    supervisor = subprocess.Popen(["sleep", "60"], start_new_session=True)  # stands in for a live run's
    try:
        started = psutil.Process(supervisor.pid).create_time()
        for run_id, pid in (("agg-20261202-100000-aaaa", None),  # its supervisor died
                            ("agg-20261202-110000-bbbb", supervisor.pid)):
            (tmp_path / "runs" / run_id).mkdir(parents=True)
            (tmp_path / "runs" / run_id / "state.json").write_text(json.dumps({
                "run_id": run_id, "profile": "agg", "status": "ready", "supervisor_pid": pid,
                "supervisor_started": started if pid else None, "started_at": time.time(), "processes": {}}))
        stop = dynamo("stop", "agg", env={"DYNAMO_HOME": str(tmp_path)})
        assert stop.returncode == 2 and "'agg' matches 2 runs" in stop.stderr, stop.stderr
        assert supervisor.poll() is None, "stop guessed the live run"
    finally:
        supervisor.kill()
        supervisor.wait()
