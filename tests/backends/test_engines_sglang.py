"""SGLang workers per role, checked against SGLang 0.5.23's documented flags and protocols.

SGLang needs CUDA, so it cannot run here: the argv is parsed with a parser made of exactly
the documented flags, and validation by "the engine's own parser" runs against a stand-in
``sglang`` package whose ``ServerArgs.add_cli_args`` registers those same flags.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from dynamo.backends.engine_flags import load_flag_list
from dynamo.backends.sglang import BACKEND
from dynamo.core.gpus import assumed_inventory
from dynamo.core.plan import build_plan
from dynamo.core.profile import SHIPPED_PROFILES_DIR, load_profile, parse_profile

FLAGS = load_flag_list("sglang_flags.txt", "sglang", abbreviations=True)

DISAGG = """
name: pd
model: {name: served, path: /models/qwen, block_size: 64, max_model_len: 8192}
backend: sglang
workers:
  prefill: {role: prefill, replicas: 2, gpus: 1}
  decode: {role: decode, replicas: 1, gpus: 2, args: {mem-fraction-static: 0.8}}
"""


def plan(text: str = DISAGG, gpus: int = 8):
    return build_plan(parse_profile(text, "p.yaml", env={}), assumed_inventory(gpus))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("name", ["prefill-0", "prefill-1", "decode-0"])
def test_every_flag_is_documented(name):
    argv = plan().get(name).argv
    assert argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    _, unknown = FLAGS.argparser().parse_known_args(argv[3:])
    assert unknown == []


def test_model_name_host_port_page_size_and_tensor_parallelism():
    p = plan()
    decode = p.get("decode-0")
    argv = decode.argv
    assert flag(argv, "--model-path") == "/models/qwen"
    assert flag(argv, "--served-model-name") == "served"
    assert flag(argv, "--host") == "127.0.0.1" and flag(argv, "--port") == str(decode.ports["http"])
    assert flag(argv, "--page-size") == "64"  # = the profile's block size, so router blocks are SGLang pages
    assert flag(argv, "--context-length") == "8192"
    assert flag(argv, "--tp-size") == "2"
    assert decode.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert p.get("prefill-1").env["CUDA_VISIBLE_DEVICES"] == "1"


def test_disaggregation_flags_per_role():
    p = plan()
    for name, role in (("prefill-0", "prefill"), ("prefill-1", "prefill"), ("decode-0", "decode")):
        argv = p.get(name).argv
        assert flag(argv, "--disaggregation-mode") == role
        assert flag(argv, "--disaggregation-transfer-backend") == "nixl"
    bootstrap = [p.get(n).ports["bootstrap"] for n in ("prefill-0", "prefill-1")]
    assert len(set(bootstrap)) == 2  # two prefill servers on one host need their own bootstrap ports
    assert flag(p.get("prefill-1").argv, "--disaggregation-bootstrap-port") == str(bootstrap[1])
    assert p.get("prefill-1").discovery["bootstrap_port"] == bootstrap[1]
    assert p.get("prefill-1").discovery["bootstrap_host"] == "127.0.0.1"
    assert "--disaggregation-bootstrap-port" not in p.get("decode-0").argv
    assert p.get("decode-0").env["SGLANG_HOST_IP"] == "127.0.0.1"
    agg = plan("name: a\nmodel: {name: m}\nbackend: sglang\nworkers: {w: {}}\n").get("w-0")
    assert "--disaggregation-mode" not in agg.argv and "SGLANG_HOST_IP" not in agg.env


def test_kv_events_name_the_zmq_publisher_and_bind_on_loopback():
    p = plan()
    for name in ("prefill-0", "decode-0"):
        worker = p.get(name)
        config = json.loads(flag(worker.argv, "--kv-events-config"))
        # without "publisher": "zmq" SGLang silently publishes nothing
        assert config["publisher"] == "zmq" and "enable_kv_cache_events" not in config
        assert config["endpoint"] == f"tcp://127.0.0.1:{worker.ports['kv_events']}" and config["bind"] is True
        assert config["replay_endpoint"] == f"tcp://127.0.0.1:{worker.ports['kv_replay']}"
        assert worker.discovery["kv_events"] == config["endpoint"]
        assert worker.discovery["kv_format"] == "sglang"
    claimed = [c.port for c in p.port_claims()]
    assert len(claimed) == len(set(claimed))


def test_networked_worker_binds_the_wildcard_and_advertises_its_address():
    worker = plan(DISAGG.replace("{role: prefill, replicas: 2, gpus: 1}",
                                 "{role: prefill, replicas: 2, gpus: 1, host: 10.1.2.3}")).get("prefill-0")
    config = json.loads(flag(worker.argv, "--kv-events-config"))
    assert config["endpoint"] == f"tcp://*:{worker.ports['kv_events']}" and "bind" not in config
    assert worker.discovery["kv_events"] == f"tcp://10.1.2.3:{worker.ports['kv_events']}"
    assert worker.discovery["bootstrap_host"] == "10.1.2.3"
    assert worker.env["SGLANG_HOST_IP"] == "10.1.2.3"


def test_readiness_waits_for_warm_up_and_stop_grace_is_long():
    worker = plan().get("decode-0")
    probe = worker.readiness_probe
    assert probe.kind == "http" and probe.url.endswith("/health")  # 503 until warm-up, then a 1-token probe
    assert probe.timeout > 20  # SGLANG_HEALTH_CHECK_TIMEOUT
    assert worker.grace_period >= 60


def test_shipped_profiles_plan():
    for name in ("agg_sglang", "disagg_sglang"):
        p = build_plan(load_profile(SHIPPED_PROFILES_DIR / f"{name}.yaml", env={}), assumed_inventory(8))
        assert p.backend == "sglang" and any(proc.kind == "worker" for proc in p.processes)


def test_missing_sglang_is_explained():
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        message = BACKEND.missing_executable()
        assert "SGLang is not installed" in message and "--backend mocker" in message


STAND_IN = """
from dynamo.backends.engine_flags import load_flag_list

class ServerArgs:
    @staticmethod
    def add_cli_args(parser):
        for flag in load_flag_list("sglang_flags.txt", "sglang", abbreviations=True).flags.values():
            if flag.name == "help":
                continue
            if flag.takes_value:
                parser.add_argument("--" + flag.name, nargs="+" if flag.name.endswith("buckets") else None)
            else:
                parser.add_argument("--" + flag.name, action="store_true")
"""


def test_the_engines_own_parser_validates_the_argv(tmp_path, monkeypatch):
    package = tmp_path / "sglang" / "srt"
    package.mkdir(parents=True)
    (tmp_path / "sglang" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "server_args.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    p = plan()
    argvs = [p.get(n).argv for n in ("prefill-0", "decode-0")]
    results = BACKEND.validate_argvs([*argvs, argvs[1] + ["--page-sise", "4"]])
    assert results[:2] == [None, None]
    assert results[2].startswith("sglang rejects the planned flags: unrecognized arguments: --page-sise")
