"""vLLM workers per role, checked against vLLM 0.32.0's documented flags and protocols (no engine started)."""

from __future__ import annotations

import json
import sys

import pytest

from dynamo.backends.engine_flags import load_flag_list
from dynamo.backends.vllm import BACKEND
from dynamo.core.gpus import assumed_inventory
from dynamo.core.plan import build_plan
from dynamo.core.profile import SHIPPED_PROFILES_DIR, load_profile, parse_profile

FLAGS = load_flag_list("vllm_flags.txt", "vllm")

DISAGG = """
name: pd
model: {name: served, path: /models/qwen, block_size: 32, max_model_len: 2048}
backend: vllm
workers:
  prefill: {role: prefill, replicas: 2, gpus: 2}
  decode: {role: decode, replicas: 1, gpus: 4, args: {max-num-seqs: 8}}
"""


def plan(text: str = DISAGG, gpus: int = 8, env: dict | None = None, node: str | None = None):
    return build_plan(parse_profile(text, "p.yaml", env=env or {}), assumed_inventory(gpus), node=node)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def documented(argv: list[str]):
    """Parse the engine's arguments with a parser made of exactly the documented flags."""
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    namespace, unknown = FLAGS.argparser().parse_known_args(argv[3:])
    assert unknown == [], f"undocumented flags: {unknown}"
    return namespace


@pytest.mark.parametrize("name", ["prefill-0", "prefill-1", "decode-0"])
def test_every_flag_is_documented_and_the_server_is_the_module(name):
    documented(plan().get(name).argv)


def test_model_name_host_port_and_block_size():
    p = plan()
    for proc in p.processes:
        if proc.kind != "worker":
            continue
        argv = proc.argv
        assert flag(argv, "--model") == "/models/qwen"
        assert flag(argv, "--served-model-name") == "served"
        assert flag(argv, "--host") == "127.0.0.1"
        assert flag(argv, "--port") == str(proc.ports["http"])
        assert flag(argv, "--block-size") == "32"
        assert flag(argv, "--max-model-len") == "2048"
        assert "--enable-prefix-caching" in argv  # KV events come from the prefix cache


def test_gpus_pin_the_process_and_size_tensor_parallelism():
    p = plan()
    assert p.get("prefill-0").env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert p.get("prefill-1").env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert p.get("decode-0").env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert flag(p.get("prefill-1").argv, "--tensor-parallel-size") == "2"
    assert flag(p.get("decode-0").argv, "--tensor-parallel-size") == "4"


def test_roles_get_nixl_connector_with_their_kv_role():
    p = plan()
    assert json.loads(flag(p.get("prefill-0").argv, "--kv-transfer-config")) == {
        "kv_connector": "NixlConnector", "kv_role": "kv_producer"}
    assert json.loads(flag(p.get("decode-0").argv, "--kv-transfer-config")) == {
        "kv_connector": "NixlConnector", "kv_role": "kv_consumer"}
    agg = plan("name: a\nmodel: {name: m}\nworkers: {w: {replicas: 2}}\n")
    assert "--kv-transfer-config" not in agg.get("w-0").argv
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in agg.get("w-0").env


def test_each_pd_worker_has_its_own_side_channel_port_and_host():
    p = plan()
    workers = [p.get(n) for n in ("prefill-0", "prefill-1", "decode-0")]
    side = [int(w.env["VLLM_NIXL_SIDE_CHANNEL_PORT"]) for w in workers]
    assert len(set(side)) == 3
    assert [w.ports["nixl_side_channel"] for w in workers] == side
    assert all(w.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1" for w in workers)
    claimed = [c.port for c in p.port_claims()]
    assert len(claimed) == len(set(claimed))


def test_loopback_workers_publish_kv_events_on_a_socket_file_in_the_run_dir():
    p = plan()
    for name in ("prefill-0", "decode-0"):
        worker = p.get(name)
        config = json.loads(flag(worker.argv, "--kv-events-config"))
        assert config["enable_kv_cache_events"] is True and config["publisher"] == "zmq"
        assert config["endpoint"] == f"ipc://{{run_dir}}/kv-{name}.sock"
        assert config["replay_endpoint"] == f"ipc://{{run_dir}}/kv-{name}-replay.sock"
        assert worker.discovery["kv_events"] == config["endpoint"]
        assert worker.discovery["kv_replay"] == config["replay_endpoint"]
        assert worker.discovery["kv_format"] == "vllm"
        assert "kv_events" not in worker.ports  # nothing listens on the network


def test_networked_workers_bind_tcp_wildcards_and_advertise_their_address():
    text = DISAGG.replace("{role: prefill, replicas: 2, gpus: 2}", "{role: prefill, replicas: 2, gpus: 2, host: 10.0.0.5}")
    worker = plan(text).get("prefill-1")
    config = json.loads(flag(worker.argv, "--kv-events-config"))
    port, replay = worker.ports["kv_events"], worker.ports["kv_replay"]
    assert config["endpoint"] == f"tcp://*:{port}" and config["replay_endpoint"] == f"tcp://*:{replay}"
    assert worker.discovery["kv_events"] == f"tcp://10.0.0.5:{port}"
    assert worker.discovery["kv_replay"] == f"tcp://10.0.0.5:{replay}"
    assert worker.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.5"
    assert worker.env["VLLM_HOST_IP"] == "10.0.0.5"


def test_wildcard_host_advertises_the_node_address():
    text = """
name: m
model: {name: m}
nats: {host: 10.0.0.1, token: t}
workers:
  decode: {role: decode, host: 0.0.0.0}
  prefill: {role: prefill}
nodes:
  head: {address: 10.0.0.1, run: [nats, frontend, prefill]}
  gpu: {address: 10.0.0.2, run: [decode]}
"""
    worker = plan(text, node="gpu").get("decode-0")
    assert flag(worker.argv, "--host") == "0.0.0.0"
    assert worker.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.2"
    assert worker.discovery["kv_events"].startswith("tcp://10.0.0.2:")


def multinode(node: str | None, env: dict):
    return build_plan(load_profile(SHIPPED_PROFILES_DIR / "multinode.yaml", env=env), assumed_inventory(8), node=node)


def test_multinode_profile_on_its_nodes():
    env = {"DYNAMO_HEAD_ADDR": "10.0.0.1", "DYNAMO_WORKER_ADDR": "10.0.0.2", "DYNAMO_NATS_TOKEN": "s3cret"}
    head, gpu = multinode("head", env), multinode("gpu", env)
    assert [proc.name for proc in head.processes] == ["nats", "prefill-0", "prefill-1", "frontend"]
    assert [proc.name for proc in gpu.processes] == ["decode-0"]
    assert gpu.nats_url == "nats://s3cret@10.0.0.1:4222"
    decode = gpu.get("decode-0")
    assert decode.url.startswith("http://10.0.0.2:") and flag(decode.argv, "--host") == "10.0.0.2"
    assert decode.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.2"
    assert decode.discovery["kv_events"] == f"tcp://10.0.0.2:{decode.ports['kv_events']}"
    assert flag(decode.argv, "--tensor-parallel-size") == "4"
    assert decode.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # the GPU node's own GPUs
    assert head.get("prefill-1").env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.1"
    assert head.get("prefill-1").env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_multinode_profile_on_one_machine_stays_on_loopback():
    p = multinode(None, {})
    for name in ("prefill-0", "decode-0"):
        worker = p.get(name)
        assert worker.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
        assert worker.discovery["kv_events"].startswith("ipc://")


def test_multinode_profile_refuses_an_open_nats_without_a_token():
    from dynamo.core.errors import PlanError

    with pytest.raises(PlanError, match="set nats.token"):
        multinode("head", {"DYNAMO_HEAD_ADDR": "10.0.0.1"})


def test_readiness_and_stop_grace_suit_a_real_engine():
    worker = plan().get("decode-0")
    assert worker.readiness_probe.kind == "http" and worker.readiness_probe.url.endswith("/health")
    assert worker.readiness_probe.startup_timeout >= 600
    assert worker.grace_period >= 60


def test_shutdown_timeout_longer_than_the_grace_period_is_noted():
    worker = plan("name: a\nmodel: {name: m}\nworkers: {w: {args: {shutdown-timeout: 90}}}\n").get("w-0")
    assert any("grace period" in note for note in worker.notes)


def test_vllm_missing_is_explained():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        assert BACKEND.missing_executable() is None
    else:
        message = BACKEND.missing_executable()
        assert "vLLM is not installed" in message and "--backend mocker" in message


def test_validation_by_vllm_is_skipped_quietly_without_vllm(tmp_path):
    # an interpreter that cannot import vLLM: nothing to say, and never an exception
    argv = ["/nonexistent/python", "-m", "vllm.entrypoints.openai.api_server", "--port", "1"]
    assert BACKEND.validate_argv(argv) is None
    assert BACKEND.validate_argv(["other", "program"]) is None
