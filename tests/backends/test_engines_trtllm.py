"""TensorRT-LLM workers per role, checked against trtllm-serve's documented flags and LLM-API options.

TensorRT-LLM cannot be installed here: the argv is parsed with exactly the documented
``serve`` flags, the options file is read back as YAML, and validation by the engine's own
parser runs against a stand-in ``trtllm-serve`` (a Click command with the documented flags).
"""

from __future__ import annotations

import os
import stat
import sys
import textwrap

import pytest
from ruamel.yaml import YAML

from dynamo.backends.engine_flags import load_flag_list
from dynamo.backends.trtllm import BACKEND
from dynamo.core.errors import PlanError
from dynamo.core.gpus import assumed_inventory
from dynamo.core.plan import build_plan
from dynamo.core.profile import SHIPPED_PROFILES_DIR, load_profile, parse_profile

FLAGS = load_flag_list("trtllm_flags.txt", "trtllm", "serve")

DISAGG = """
name: pd
model: {name: served, path: /models/qwen, block_size: 32, max_model_len: 4096}
backend: trtllm
workers:
  prefill: {role: prefill, replicas: 1, gpus: 2, args: {max_num_tokens: 8192}}
  decode: {role: decode, replicas: 2, gpus: 1, args: {max_batch_size: 32, extra_llm_api_options: {kv_cache_config: {free_gpu_memory_fraction: 0.7}, cache_transceiver_config: {backend: UCX}}}}
"""


def plan(text: str = DISAGG, gpus: int = 8):
    return build_plan(parse_profile(text, "p.yaml", env={}), assumed_inventory(gpus))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def options(worker) -> dict:
    path = flag(worker.argv, "--extra_llm_api_options")
    assert path == f"{{run_dir}}/trtllm-{worker.name}.yaml"
    return YAML(typ="safe").load(worker.files[path])


@pytest.mark.parametrize("name", ["prefill-0", "decode-0", "decode-1"])
def test_every_flag_is_documented_and_the_model_is_positional(name):
    argv = plan().get(name).argv
    assert argv[:2] == ["trtllm-serve", "/models/qwen"]
    _, unknown = FLAGS.argparser().parse_known_args(argv[2:])
    assert unknown == []


def test_model_name_host_port_tensor_parallelism_and_gpus():
    p = plan()
    prefill = p.get("prefill-0")
    argv = prefill.argv
    assert flag(argv, "--served_model_name") == "served"
    assert flag(argv, "--host") == "127.0.0.1" and flag(argv, "--port") == str(prefill.ports["http"])
    assert flag(argv, "--tp_size") == "2" and prefill.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert flag(argv, "--max_seq_len") == "4096"
    assert flag(argv, "--max_num_tokens") == "8192"
    assert p.get("decode-1").env["CUDA_VISIBLE_DEVICES"] == "3"


def test_options_file_carries_block_size_kv_events_and_the_cache_transceiver():
    p = plan()
    prefill, decode = options(p.get("prefill-0")), options(p.get("decode-0"))
    for opts in (prefill, decode):
        assert opts["kv_cache_config"]["tokens_per_block"] == 32
        assert opts["kv_cache_config"]["event_buffer_max_size"] > 0  # fills POST /kv_cache_events
        assert opts["kv_cache_config"]["enable_block_reuse"] is True
        assert opts["cache_transceiver_config"]["max_tokens_in_buffer"] == 4096
    assert prefill["cache_transceiver_config"]["backend"] == "DEFAULT"
    assert prefill["disable_overlap_scheduler"] is True
    # the group's own options are merged over the launcher's
    assert decode["cache_transceiver_config"]["backend"] == "UCX"
    assert decode["kv_cache_config"]["free_gpu_memory_fraction"] == 0.7
    assert "disable_overlap_scheduler" not in decode
    assert p.get("decode-0").argv.count("--extra_llm_api_options") == 1  # the group's mapping is not a second flag


def test_aggregated_workers_need_no_transceiver():
    worker = plan("name: a\nmodel: {name: m}\nbackend: trtllm\nworkers: {w: {}}\n").get("w-0")
    assert "cache_transceiver_config" not in options(worker)


def test_options_conflicting_with_the_profile_are_refused():
    with pytest.raises(PlanError, match="tokens_per_block: the launcher sets it to model.block_size"):
        plan(DISAGG.replace("free_gpu_memory_fraction: 0.7", "tokens_per_block: 64"))
    with pytest.raises(PlanError, match="give the LLM-API options as a mapping"):
        plan("name: a\nmodel: {name: m}\nbackend: trtllm\nworkers: {w: {args: {extra_llm_api_options: x.yaml}}}\n")
    with pytest.raises(PlanError, match="a decode worker needs it"):
        plan("name: a\nmodel: {name: m}\nbackend: trtllm\nworkers: {w: {role: decode, "
             "args: {extra_llm_api_options: {cache_transceiver_config: null}}}}\n")


def test_kv_events_are_polled_over_http():
    worker = plan().get("decode-0")
    assert worker.discovery["kv_format"] == "trtllm-http"
    assert worker.discovery["kv_events"] == f"{worker.url}/kv_cache_events"
    assert set(worker.ports) == {"http"}  # transceiver ports are the engine's own


def test_readiness_and_grace():
    worker = plan().get("prefill-0")
    assert worker.readiness_probe.url.endswith("/health")
    assert worker.readiness_probe.startup_timeout >= 1200 and worker.grace_period >= 60


def test_shipped_profiles_plan():
    for name in ("agg_trtllm", "disagg_trtllm"):
        p = build_plan(load_profile(SHIPPED_PROFILES_DIR / f"{name}.yaml", env={}), assumed_inventory(8))
        assert all(flag(proc.argv, "--extra_llm_api_options") in proc.files for proc in p.processes if proc.kind == "worker")


def test_missing_trtllm_is_explained(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    message = BACKEND.missing_executable()
    assert "trtllm-serve is not on PATH" in message and "--backend mocker" in message


STAND_IN = """
import click
from dynamo.backends.engine_flags import load_flag_list

@click.group()
def main():
    pass

def _options(command):
    for flag in load_flag_list("trtllm_flags.txt", "trtllm", "serve").flags.values():
        if flag.name.startswith("no-"):
            continue
        negative = "no-" + flag.name
        if not flag.takes_value:
            command = click.option("--" + flag.name, is_flag=True)(command)
        else:
            command = click.option("--" + flag.name, multiple=flag.name in ("middleware", "custom_module_dirs"))(command)
    return command

@main.command("serve")
@click.argument("model")
@_options
def serve(model, **kwargs):
    raise SystemExit("must not run")
"""


def test_the_engines_own_parser_validates_the_argv(tmp_path, monkeypatch):
    package = tmp_path / "tensorrt_llm" / "commands"
    package.mkdir(parents=True)
    (tmp_path / "tensorrt_llm" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "serve.py").write_text(textwrap.dedent(STAND_IN))
    script = tmp_path / "bin" / "trtllm-serve"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\nfrom tensorrt_llm.commands.serve import main\nmain()\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    assert BACKEND.missing_executable() is None
    p = plan()
    argvs = [p.get(n).argv for n in ("prefill-0", "decode-0")]
    results = BACKEND.validate_argvs([*argvs, argvs[0] + ["--max_batch_sise", "4"]])
    assert results[:2] == [None, None]
    assert results[2].startswith("trtllm rejects the planned flags: No such option") and "--max_batch_sise" in results[2]
