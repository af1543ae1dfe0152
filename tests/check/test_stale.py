"""Stale engine processes: detection over process info, tested with real orphaned processes."""

from __future__ import annotations

import json
import os
import sys

import psutil
import pytest

from dynamo.core.check.stale import (ProcessInfo, ProcessTable, engine_of, find_stale, fix_for, run_is_active,
                                     scan_processes)
from tests.check.conftest import SLEEP, run_check


@pytest.mark.parametrize("name, cmdline, engine", [
    ("vllm", ["/venv/bin/vllm", "serve", "Qwen/Qwen3-0.6B"], "vllm"),
    ("VLLM::EngineCor", ["VLLM::EngineCore"], "vllm"),
    ("python3", ["/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"], "vllm"),
    ("python3", ["python3", "/venv/bin/vllm", "serve", "m"], "vllm"),
    ("sglang::schedul", ["sglang::scheduler_TP0"], "sglang"),
    ("python", ["python", "-m", "sglang.launch_server", "--model-path", "m"], "sglang"),
    ("trtllm-serve", ["/venv/bin/trtllm-serve", "m"], "tensorrt_llm"),
    ("python", ["python", "-m", "dynamo.backends.mocker", "--port", "1"], "mocker"),
    ("python", ["python", "train.py", "--vllm"], None),
    ("vim", ["vim", "vllm.yaml"], None),
    ("bash", ["bash"], None),
])
def test_engine_of_recognises_engines_by_name_argv_and_module(name, cmdline, engine):
    assert engine_of(name, cmdline) == engine


def _proc(pid, ppid=1, name="vllm", cmdline=("vllm", "serve", "m"), marker=None, status="sleeping"):
    return ProcessInfo(pid=pid, ppid=ppid, name=name, cmdline=tuple(cmdline), run_marker=marker, status=status)


def test_find_stale_verdicts_over_process_info():
    table = ProcessTable([
        _proc(10),                                        # orphaned engine: stale
        _proc(11, ppid=500),                              # engine with a live parent: someone's foreground vllm
        _proc(12, name="python", cmdline=("python", "x.py")),  # orphan, but not an engine
        _proc(13, marker="/runs/dead"),                   # leftover of a dead run
        _proc(14, ppid=1, marker="/runs/alive"),          # engine of a live run (its supervisor reparented it)
        _proc(15, name="python", cmdline=("python", "-m", "dynamo.core.frontend"), ppid=7, marker="/runs/dead"),
        _proc(16, marker="/runs/sentinel-alive"),         # run found alive by its sentinel process
        _proc(17, status="zombie"),                       # zombies hold nothing
    ], live_markers={"/runs/sentinel-alive"})
    stale = find_stale(table, run_is_active=lambda marker: marker == "/runs/alive", gpu_memory_mb={10: 20480})
    by_pid = {s.info.pid: s for s in stale}
    assert sorted(by_pid) == [10, 13, 15]
    assert by_pid[10].engine == "vllm" and by_pid[10].gpu_memory_mb == 20480
    assert "parent pid 1" in by_pid[10].reason
    assert "/runs/dead" in by_pid[13].reason and by_pid[13].gpu_memory_mb is None
    assert by_pid[15].engine is None  # a leftover frontend is stale too, though not an engine


def test_children_pid_1_meant_to_have_are_not_orphans():
    # A container whose entrypoint script (pid 1, session 1) started the engine with `&`, and a
    # systemd service: both have parent pid 1 on purpose.
    table = ProcessTable([
        _proc(30),
        ProcessInfo(pid=31, ppid=1, name="vllm", cmdline=("vllm", "serve"), session=1),
        ProcessInfo(pid=32, ppid=1, name="vllm", cmdline=("vllm", "serve"), session=32, service="vllm.service"),
        ProcessInfo(pid=33, ppid=1, name="vllm", cmdline=("vllm", "serve"), session=33),
    ], init_session=1)
    assert sorted(s.info.pid for s in find_stale(table, run_is_active=lambda m: False)) == [30, 33]


def test_fix_for_names_the_command(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "state.json").write_text(json.dumps({"status": "ready", "supervisor_pid": 999999999}))
    stale = find_stale(ProcessTable([_proc(21), _proc(22), _proc(23, marker=str(run_dir))]),
                       run_is_active=lambda m: run_is_active(m, tmp_path))
    fix = fix_for(stale, tmp_path)
    assert f"dynamo stop {run_dir}" in fix
    assert "kill 21 22" in fix


def test_a_real_orphan_named_vllm_is_flagged_with_its_gpu_memory(orphans, engine_named_vllm):
    pid = orphans(engine_named_vllm, [engine_named_vllm, *SLEEP])
    assert psutil.Process(pid).name() == "vllm"
    table = scan_processes()
    mine = [p for p in table.processes if p.pid == pid]
    assert mine and mine[0].ppid == 1 and mine[0].run_marker is None
    # the GPU side is a seam: pid → MiB of GPU memory, as NVML reports compute processes
    stale = find_stale(table, run_is_active=lambda m: False, gpu_memory_mb={pid: 4096})
    found = [s for s in stale if s.info.pid == pid]
    assert len(found) == 1
    assert found[0].engine == "vllm" and found[0].gpu_memory_mb == 4096
    assert fix_for(found).startswith(f"kill {pid}")


def test_a_real_orphan_with_argv0_vllm_is_flagged(orphans):
    # exec -a vllm python ...: the name stays python, argv[0] says vllm
    pid = orphans(sys.executable, ["vllm", *SLEEP])
    stale = find_stale(scan_processes(), run_is_active=lambda m: False)
    assert [s.engine for s in stale if s.info.pid == pid] == ["vllm"]


def test_a_process_of_a_dead_run_is_stale_and_of_a_live_run_is_not(orphans, tmp_path):
    dead, alive = tmp_path / "runs" / "dead", tmp_path / "runs" / "alive"
    for path in (dead, alive):
        path.mkdir(parents=True)
    (dead / "state.json").write_text(json.dumps({"status": "stopped"}))
    me = psutil.Process()
    (alive / "state.json").write_text(json.dumps({"status": "ready", "supervisor_pid": me.pid,
                                                  "supervisor_started": me.create_time()}))
    dead_pid = orphans(sys.executable, [sys.executable, *SLEEP], marker=str(dead))
    alive_pid = orphans(sys.executable, [sys.executable, *SLEEP], marker=str(alive))
    stale = find_stale(scan_processes(), run_is_active=lambda m: run_is_active(m, tmp_path))
    pids = {s.info.pid for s in stale}
    assert dead_pid in pids and alive_pid not in pids
    assert fix_for([s for s in stale if s.info.pid == dead_pid], tmp_path) == f"dynamo stop {dead}"


def test_dynamo_check_reports_the_orphan_and_how_to_free_it(orphans, engine_named_vllm, tmp_path):
    pid = orphans(engine_named_vllm, [engine_named_vllm, *SLEEP, "serve", "Qwen/Qwen3-0.6B"])
    check = run_check("--only", "gpus", "--json", env={"DYNAMO_HOME": str(tmp_path / "home")})
    assert check.code in (0, 1), check.stderr
    flagged = [r for r in check.results("gpus", "stale process") if r["data"]["pid"] == pid]
    assert len(flagged) == 1, check.stdout
    result = flagged[0]
    assert result["status"] == "warn"  # no GPU here: it holds no GPU memory, so a warning, not an error
    assert result["data"]["engine"] == "vllm" and result["data"]["ppid"] == 1
    assert f"kill {pid}" in result["fix"]
    assert "serve Qwen/Qwen3-0.6B" in result["message"] and f"pid {pid}" in result["message"]
    strict = run_check("--only", "gpus", "--json", "--strict", env={"DYNAMO_HOME": str(tmp_path / "home")})
    assert strict.code == 1
    assert [r["status"] for r in strict.results("gpus", "stale process") if r["data"]["pid"] == pid] == ["error"]
    os.kill(pid, 9)
