"""Plans: GPUs, ports, argv and env decided before anything starts (dry-run), with clear errors."""

from __future__ import annotations

import json
import re
import os
import socket
import sys
from pathlib import Path

import pytest

from dynamo.core.errors import PlanError, UsageError
from dynamo.core.gpus import assumed_inventory, detect_inventory
from dynamo.core.nats_server import nats_server_binary
from dynamo.core.plan import build_plan, check_executables, check_ports
from dynamo.core.profile import SHIPPED_PROFILES_DIR, parse_profile
from tests.conftest import dynamo

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def plan_of(text: str, gpus: int = 8, overrides=(), backend=None):
    return build_plan(parse_profile(text, "p.yaml", env={}, overrides=overrides, backend=backend), assumed_inventory(gpus))


TWO_GROUPS = """
name: p
model: {name: m}
workers:
  prefill: {role: prefill, replicas: 2, gpus: 2}
  decode: {role: decode, replicas: 1, gpus: [6, 7]}
"""


def test_gpus_are_assigned_in_order_and_pinned_with_cuda_visible_devices():
    plan = plan_of(TWO_GROUPS)
    assert plan.get("prefill-0").gpus == [0, 1]
    assert plan.get("prefill-1").gpus == [2, 3]
    assert plan.get("decode-0").gpus == [6, 7]
    assert plan.get("prefill-1").env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "--tensor-parallel-size" in plan.get("decode-0").argv
    argv = plan.get("decode-0").argv
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"


def test_counted_gpus_skip_explicit_ids():
    plan = plan_of("name: p\nmodel: {name: m}\nworkers:\n  a: {gpus: [0]}\n  b: {replicas: 2, gpus: 1}\n", gpus=3)
    assert plan.get("a-0").gpus == [0]
    assert [plan.get("b-0").gpus, plan.get("b-1").gpus] == [[1], [2]]


@pytest.mark.parametrize(
    "text, gpus, expected",
    [
        ("name: p\nmodel: {name: m}\nworkers:\n  w: {replicas: 4, gpus: 2}\n", 4, "the profile needs 8 GPUs (workers.w: 4 replicas × 2 GPUs); 4 GPUs available"),
        ("name: p\nmodel: {name: m}\nworkers:\n  w: {replicas: 2, gpus: 1}\n", 1, "the profile needs 2 GPUs (workers.w: 2 replicas × 1 GPU); 1 GPU available: 0"),
        ("name: p\nmodel: {name: m}\nworkers:\n  w: {gpus: [9]}\n", 8, "GPU 9 does not exist"),
        ("name: p\nmodel: {name: m}\nworkers:\n  a: {gpus: [1]}\n  b: {gpus: [1]}\n", 8, "GPU 1 is already used by a-0"),
        ("name: p\nmodel: {name: m}\nworkers:\n  w: {gpus: 1}\n", 0, "no NVIDIA GPU"),
    ],
)
def test_gpu_problems_are_errors(text, gpus, expected):
    with pytest.raises(PlanError) as info:
        plan_of(text, gpus=gpus)
    assert expected in str(info.value)


def test_mocker_needs_no_gpu():
    plan = plan_of(TWO_GROUPS, gpus=0, backend="mocker")
    assert all(not p.gpus and "CUDA_VISIBLE_DEVICES" not in p.env for p in plan.processes)


def test_ports_are_unique_and_start_at_the_base():
    plan = plan_of(TWO_GROUPS, overrides=["ports.base=9100"])
    claimed = [c.port for c in plan.port_claims()]
    assert len(claimed) == len(set(claimed))
    assert plan.get("prefill-0").ports["http"] == 9100
    assert plan.get("nats").ports == {"client": 4222}
    assert plan.get("frontend").ports == {"http": 8000}


def test_explicit_worker_port_collision_is_refused():
    with pytest.raises(PlanError, match=r"port 8000 is planned for both frontend \(frontend.port\) and w-0 \(workers.w.port\)"):
        plan_of("name: p\nmodel: {name: m}\nworkers:\n  w: {port: 8000}\n")


def test_start_order_and_dependencies():
    plan = plan_of(TWO_GROUPS)
    kinds = [p.kind for p in plan.processes]
    assert kinds == ["nats", "worker", "worker", "worker", "frontend"]
    assert plan.get("frontend").depends_on == ["nats", "prefill-0", "prefill-1", "decode-0"]
    assert plan.get("decode-0").depends_on == ["nats"]


def test_external_nats_starts_nothing():
    plan = plan_of("name: p\nmodel: {name: m}\nnats: nats://10.1.2.3:4222\nworkers: {w: {}}\n")
    assert [p.name for p in plan.processes] == ["w-0", "frontend"]
    assert plan.nats_url == "nats://10.1.2.3:4222"


def test_nats_on_a_public_address_needs_a_token():
    with pytest.raises(PlanError, match="nats.token"):
        plan_of("name: p\nmodel: {name: m}\nnats: {host: 0.0.0.0}\nworkers: {w: {}}\n")


@pytest.mark.parametrize("url", ["nats://u:pw9@10.0.0.5:4222", "u:pw9@10.0.0.5:4222",
                                 "nats://10.0.0.4:4222,nats://u:pw9@10.0.0.5:4222"])
def test_external_nats_credentials_stay_off_command_lines_and_out_of_dry_runs(url):
    plan = plan_of(f"name: p\nmodel: {{name: m}}\nnats: {{url: '{url}'}}\nworkers: {{w: {{}}}}\n")
    assert plan.get("frontend").env["DYNAMO_NATS_URL"] == url
    assert not any("pw9" in arg for proc in plan.processes for arg in proc.argv)
    assert "pw9" not in plan.redacted().model_dump_json()


def test_a_nats_token_that_cannot_travel_in_a_url_is_refused_without_echoing_it(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\nmodel: {name: m}\nbackend: mocker\nnats: {token: 's3cret@x/y'}\nworkers: {w: {}}\n")
    shown = dynamo("serve", str(profile), "--dry-run")
    assert shown.returncode == 2
    assert "nats.token: may hold only letters, digits" in shown.stderr and "s3cret" not in shown.stderr


def test_dry_run_hides_the_api_key_and_the_nats_token(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\nmodel: {name: m}\nbackend: mocker\nnats: {host: 0.0.0.0, token: ${TOK}}\n"
                       "frontend: {api_key: ${KEY}}\nworkers: {w: {}}\n")
    secrets = {"TOK": "nats-secret-1", "KEY": "api-secret-2"}
    for flags in ((), ("--json",)):
        shown = dynamo("serve", str(profile), "--dry-run", *flags, env=secrets)
        assert shown.returncode == 0, shown.stderr
        assert "***" in shown.stdout and "secret" not in shown.stdout
    plan = plan_of(profile.read_text().replace("${TOK}", "t0k").replace("${KEY}", "k3y"))
    assert plan.get("frontend").env["DYNAMO_API_KEY"] == "k3y"  # the processes still get them
    assert not any("t0k" in arg for proc in plan.processes for arg in proc.argv)  # ps shows argv to everyone
    assert plan.get("frontend").env["DYNAMO_NATS_URL"].startswith("nats://t0k@")
    assert "t0k" in "".join(plan.get("nats").files.values())
    assert "t0k" not in plan.redacted().model_dump_json() and "k3y" not in plan.redacted().model_dump_json()


def test_launcher_owned_flags_are_refused_with_the_key_to_use():
    with pytest.raises(PlanError, match=r"the launcher sets --port.*ports.base"):
        plan_of("name: p\nmodel: {name: m}\nworkers:\n  w: {args: {port: 9}}\n")


def test_args_of_another_engine_are_dropped_with_a_note_under_mocker():
    plan = plan_of("name: p\nmodel: {name: m}\nworkers:\n  w: {args: {enforce-eager: true, max-num-seqs: 8}}\n",
                   backend="mocker")
    worker = plan.get("w-0")
    assert "--enforce-eager" not in worker.argv and "--max-num-seqs" in worker.argv
    assert worker.notes == ["dropped --enforce-eager (not a mocker flag)"]


def test_unknown_mocker_flag_suggests_the_nearest():
    with pytest.raises(PlanError, match="did you mean 'max-num-seqs'"):
        plan_of("name: p\nmodel: {name: m}\nbackend: mocker\nworkers:\n  w: {args: {max-num-seq: 8}}\n")


def test_port_0_for_the_frontend_and_nats_has_the_os_pick_a_free_port():
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    plan = plan_of("name: p\nmodel: {name: m}\nworkers: {w: {replicas: 2}}\n", backend="mocker",
                   overrides=["frontend.port=0", "nats.port=0", "ports.base=8100"])
    ports = {proc.kind: proc.ports for proc in plan.processes}
    assert all(low <= port <= high for port in (*ports["frontend"].values(), ports["nats"]["client"])), ports
    assert {port for proc in plan.processes if proc.kind == "worker" for port in proc.ports.values()} <= set(
        range(8100, 8120))  # the rest still come from ports.base


def test_nats_port_0_on_a_cluster_is_the_same_port_on_every_node():
    text = (SHIPPED_PROFILES_DIR / "multinode.yaml").read_text()
    urls = {node: build_plan(parse_profile(text, "m.yaml", env={"DYNAMO_NATS_TOKEN": "t"}, backend="mocker",
                                           overrides=["nats.port=0"]), assumed_inventory(8), node=node).nats_url
            for node in ("head", "gpu")}
    assert urls["head"] == urls["gpu"], urls  # each node's supervisor plans it; the workers must find it


def test_refused_engine_args_do_not_hide_gpu_problems():
    with pytest.raises(PlanError) as info:
        plan_of("name: p\nmodel: {name: m}\nworkers:\n"
                "  a: {replicas: 2, gpus: [0, 1], args: {max-num-seq: 4}}\n  b: {gpus: [1]}\n", gpus=4)
    assert "workers.a.args.max-num-seq" in str(info.value) and "GPU 1 is already used by a-1" in str(info.value)


def test_a_refused_dotted_engine_arg_is_located_at_its_own_line():
    with pytest.raises(PlanError) as info:
        plan_of("name: p\nbackend: mocker\nmodel: {name: m}\nworkers:\n  w:\n    args:\n"
                "      max-num-seqs: 4\n      compilation-config.level: 3\n")
    assert str(info.value).startswith("p.yaml:8:7: workers.w.args.compilation-config.level: "), str(info.value)


@pytest.mark.parametrize("explicit, setting", [
    (True, "workers.w.port=0 (0 takes ports from ports.base), or another port"),
    (False, "ports.base=0 (0 has the OS pick free ports)"),
])
def test_a_taken_worker_port_names_the_key_that_moves_it(explicit, setting):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        moved = [f"workers.w.port={port}", "ports.base=0"] if explicit else [f"ports.base={port}"]
        plan = plan_of("name: p\nmodel: {name: m}\nworkers: {w: {}}\n", backend="mocker",
                       overrides=["frontend.port=0", "nats.port=0", *moved])
        with pytest.raises(UsageError) as info:
            check_ports(plan)
        message = str(info.value)
        assert f"port {port} (w-0 http) is already in use" in message
        assert message.endswith(f"choose another port: --set {setting}"), message
    finally:
        holder.close()


def test_port_in_use_names_the_holder():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        plan = plan_of("name: p\nmodel: {name: m}\nworkers: {w: {}}\n", backend="mocker",
                       overrides=[f"frontend.port={port}", "nats.port=0", "ports.base=0"])
        with pytest.raises(UsageError) as info:
            check_ports(plan)
        message = str(info.value)
        assert f"port {port} (frontend http) is already in use by pid {os.getpid()}" in message
        assert message.endswith("choose another port: --set frontend.port=0 (0 has the OS pick a free port)"), message
    finally:
        holder.close()


def test_missing_engine_executable_is_a_usage_error():
    plan = plan_of("name: p\nmodel: {name: m}\nworkers:\n  w: {command: [/nonexistent/engine, --port, '{port}']}\n",
                   backend="mocker")
    with pytest.raises(UsageError, match="/nonexistent/engine' is missing"):
        check_executables(plan)


def test_assume_gpus_env_seam(monkeypatch):
    monkeypatch.setenv("DYNAMO_ASSUME_GPUS", "4")
    inventory = detect_inventory()
    assert inventory.source == "assumed" and inventory.count == 4


def _normalise(text: str) -> str:
    text = text.replace(sys.executable, "{python}")
    binary = nats_server_binary()
    return text.replace(binary, "{nats-server}") if binary else text


@pytest.mark.parametrize("profile", sorted(p.stem for p in SHIPPED_PROFILES_DIR.glob("*.yaml")))
def test_dry_run_matches_the_golden_plan(profile):
    """Every shipped profile plans to exactly the committed plan on an assumed 8-GPU machine.

    Regenerate after an intended change with: UPDATE_GOLDEN=1 pytest tests/core/test_plan.py
    """
    result = dynamo("serve", profile, "--dry-run", "--json", "--assume-gpus", "8",
                    env={"DYNAMO_MODEL_PATH": "", "DYNAMO_PORT": ""})
    assert result.returncode == 0, result.stderr
    actual = json.loads(_normalise(result.stdout))
    actual["profile_path"] = Path(actual["profile_path"]).name
    golden = GOLDEN / f"{profile}.plan.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(json.dumps(actual, indent=2) + "\n")
    assert actual == json.loads(golden.read_text())


def test_dry_run_text_shows_everything_a_user_needs():
    result = dynamo("serve", "agg", "--dry-run", "--assume-gpus", "8")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for part in ("decode-0", "CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1", "ports:    http=8100",
                 "ready:    GET http://127.0.0.1:8100/health", "after:    nats", "argv:", "frontend"):
        assert part in out, part


def test_dry_run_without_gpus_explains_and_exits_2():
    result = dynamo("serve", "agg", "--dry-run", env={"DYNAMO_ASSUME_GPUS": ""})
    assert result.returncode == 2
    assert "no NVIDIA GPU" in result.stderr and "--backend mocker" in result.stderr
    assert "Traceback" not in result.stderr


def test_set_on_a_misspelt_worker_group_is_an_error_not_a_new_group():
    shown = dynamo("serve", "agg", "--assume-gpus", "8", "--set", "workers.decod.replicas=4", "--dry-run")
    assert shown.returncode == 2
    assert "no worker group 'decod'; did you mean 'decode'?" in shown.stderr
    shown = dynamo("serve", "multinode", "--backend", "mocker", "--set", "nodes.gpus.address=10.0.0.9", "--dry-run")
    assert shown.returncode == 2
    assert "no node 'gpus'; did you mean 'gpu'? (nodes: head, gpu)" in shown.stderr


@pytest.mark.parametrize("workers, expected", [
    ("  p: {role: prefill}\n", "prefill workers need a group with role decode"),
    ("  w: {replicas: 0}\n", "w has replicas: 0"),
    ("  p: {role: prefill}\n  d: {role: decode, replicas: 0}\n", "d has replicas: 0"),
])
def test_a_profile_where_nothing_can_answer_is_refused(workers, expected):
    with pytest.raises(Exception, match=re.escape(expected)):
        plan_of("name: p\nmodel: {name: m}\nworkers:\n" + workers)


def test_bad_mocker_flag_values_are_refused_before_anything_starts(tmp_path):
    result = dynamo("serve", "agg", "--backend", "mocker", "--set", "workers.decode.args.max-num-seqs=",
                    "--set", "frontend.port=0", "--set", "nats.port=0", "--set", "ports.base=0",
                    env={"DYNAMO_HOME": str(tmp_path)}, timeout=30)
    assert result.returncode == 2
    assert "the mocker rejects the planned flags: argument --max-num-seqs: expected a positive integer" in result.stderr
    assert not (tmp_path / "runs").exists()
