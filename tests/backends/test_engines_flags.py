"""Engine args passthrough: the documented flag lists, owned flags, nearest-flag hints, value spelling."""

from __future__ import annotations

import re

import pytest

from dynamo.backends.engine_flags import load_flag_list
from dynamo.core.errors import PlanError
from dynamo.core.gpus import assumed_inventory
from dynamo.core.plan import build_plan
from dynamo.core.profile import parse_profile


def worker_argv(backend: str, args: str, role: str = "agg", backend_override: str | None = None, gpus: int = 1):
    text = f"name: p\nmodel: {{name: m}}\nbackend: {backend}\nworkers:\n  w: {{role: {role}, gpus: {gpus}, args: {args}}}\n"
    plan = build_plan(parse_profile(text, "p.yaml", env={}, backend=backend_override), assumed_inventory(8))
    return plan.get("w-0")


def after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# ----------------------------------------------------------------------------- the lists


@pytest.mark.parametrize("filename, engine, section, expected, count", [
    ("vllm_flags.txt", "vllm", None, {"max-num-seqs", "kv-events-config", "no-enable-prefix-caching"}, 400),
    ("sglang_flags.txt", "sglang", None, {"page-size", "disaggregation-bootstrap-port", "tp-size"}, 500),
    ("trtllm_flags.txt", "trtllm", "serve", {"tp_size", "extra_llm_api_options", "max_batch_size"}, 55),
])
def test_flag_lists_parse_into_the_documented_flags(filename, engine, section, expected, count):
    flags = load_flag_list(filename, engine, section)
    assert expected <= flags.names
    assert len(flags.names) >= count
    assert all(not name.startswith("-") for name in flags.names)


def test_trtllm_list_keeps_only_the_serve_command():
    flags = load_flag_list("trtllm_flags.txt", "trtllm", "serve")
    assert "config_file" not in flags.names  # a `disaggregated` option, not a `serve` one
    assert "extra_encoder_options" not in flags.names
    assert {"middleware", "custom_module_dirs"} <= flags.repeated


def test_nargs_notes_are_read():
    assert "served-model-name" in load_flag_list("vllm_flags.txt", "vllm").many
    assert "cuda-graph-bs-decode" in load_flag_list("sglang_flags.txt", "sglang").many


# ----------------------------------------------------------------------------- values


def test_values_become_flags_in_the_engines_spelling():
    argv = worker_argv("vllm", "{max-num-seqs: 8, enforce_eager: true, enable-chunked-prefill: false, "
                               "compilation-config: {level: 0}, cudagraph-capture-sizes: [1, 2], seed: null}").argv
    assert after(argv, "--max-num-seqs") == "8"
    assert "--enforce-eager" in argv  # vLLM accepts _ too; the launcher writes the canonical form
    assert "--no-enable-chunked-prefill" in argv
    assert after(argv, "--compilation-config") == '{"level":0}'
    i = argv.index("--cudagraph-capture-sizes")
    assert argv[i + 1:i + 3] == ["1", "2"]
    assert "--seed" not in argv


def test_false_switch_without_a_negative_form_is_left_off():
    argv = worker_argv("sglang", "{trust-remote-code: false, enable-metrics-for-all-schedulers: true}").argv
    assert "--trust-remote-code" not in argv and "--no-trust-remote-code" not in argv
    assert "--enable-metrics-for-all-schedulers" in argv


def test_switch_given_a_value_is_refused():
    with pytest.raises(PlanError, match="--enforce-eager is a switch: write true or false"):
        worker_argv("vllm", "{enforce-eager: 3}")


def test_trtllm_dashes_become_underscores_and_multiple_repeats():
    argv = worker_argv("trtllm", "{max-batch-size: 16, middleware: [a.b, c.d]}").argv
    assert after(argv, "--max_batch_size") == "16"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--middleware"] == ["a.b", "c.d"]


def test_sglang_abbreviations_resolve_to_the_full_flag():
    argv = worker_argv("sglang", "{mem-fraction: 0.8}").argv
    assert after(argv, "--mem-fraction-static") == "0.8"


def test_vllm_dotted_json_subkeys_pass_through():
    argv = worker_argv("vllm", "{compilation-config.level: 0}").argv
    assert after(argv, "--compilation-config.level") == "0"


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("backend, args, message", [
    ("vllm", "{port: 9}", "the launcher sets --port itself; use workers.<group>.port or ports.base in the profile"),
    ("vllm", "{tensor-parallel-size: 2}", "use workers.<group>.gpus (tensor parallel = GPUs per replica"),
    ("vllm", "{served_model_name: x}", "use model.name in the profile instead"),
    ("vllm", "{kv-transfer-config: {kv_connector: NixlConnector}}", "use workers.<group>.role (prefill or decode)"),
    ("vllm", "{kv-transfer-config.kv_role: kv_both}", "the launcher sets --kv-transfer-config itself"),
    ("vllm", "{kv-events-config: {}}", "remove it: the launcher plans a KV events endpoint per worker"),
    ("vllm", "{block-size: 32}", "use model.block_size"),
    ("vllm", "{data-parallel-size: 2}", "use workers.<group>.replicas"),
    ("sglang", "{tp: 2}", "the launcher sets --tp-size itself"),
    ("sglang", "{page-size: 32}", "use model.block_size"),
    ("sglang", "{disaggregation-transfer-backend: mooncake}", "the launcher uses nixl"),
    ("sglang", "{base-gpu-id: 3}", "use workers.<group>.gpus"),
    ("sglang", "{context-length: 9}", "use model.max_model_len"),
    ("trtllm", "{tp-size: 2}", "the launcher sets --tp_size itself"),
    ("trtllm", "{port: 1}", "use workers.<group>.port or ports.base"),
    ("trtllm", "{server_role: CONTEXT}", "use workers.<group>.role"),
])
def test_flags_the_launcher_owns_are_refused_with_the_key_to_use(backend, args, message):
    with pytest.raises(PlanError) as info:
        worker_argv(backend, args)
    assert message in str(info.value)
    assert re.match(r"p\.yaml:\d+:\d+: workers\.w\.args\.", str(info.value)), str(info.value)  # where the key is


@pytest.mark.parametrize("backend, args, hint", [
    ("vllm", "{max-num-seq: 8}", "did you mean 'max-num-seqs'?"),
    ("vllm", "{gpu-memory-utilisation: 0.9}", "did you mean 'gpu-memory-utilization'?"),
    ("sglang", "{mem-fraction-statik: 0.8}", "did you mean 'mem-fraction-static'?"),
    ("trtllm", "{max_batch_sise: 8}", "did you mean 'max_batch_size'?"),
    ("trtllm", "{kv-cache-free-gpu-mem-fraction: 0.8}", "did you mean 'kv_cache_free_gpu_memory_fraction'?"),
])
def test_unknown_flags_are_refused_with_the_nearest_documented_flag(backend, args, hint):
    with pytest.raises(PlanError) as info:
        worker_argv(backend, args)
    assert hint in str(info.value) and " has no flag --" in str(info.value)


def test_unknown_flag_without_a_near_one_points_at_the_list():
    with pytest.raises(PlanError, match=r"listed in backends/vllm_flags.txt"):
        worker_argv("vllm", "{zzzzqqq: 1}")


def test_sglang_ambiguous_abbreviation_is_refused():
    with pytest.raises(PlanError, match="ambiguous"):
        worker_argv("sglang", "{disaggregation-decode: 1}")


def test_args_written_for_another_engine_are_dropped_with_notes():
    worker = worker_argv("vllm", "{max-num-seqs: 8, enforce-eager: true, port: 5, mem-fraction-static: 0.8}",
                         backend_override="sglang")
    assert "--enforce-eager" not in worker.argv and "--port" in worker.argv
    assert worker.notes == ["dropped --max-num-seqs (not a sglang flag)", "dropped --enforce-eager (not a sglang flag)",
                            "dropped --port (set by the launcher for sglang)"]
    assert after(worker.argv, "--mem-fraction-static") == "0.8"


# ----------------------------------------------------------------------------- parallelism


@pytest.mark.parametrize("backend, flag, pp", [("vllm", "--tensor-parallel-size", "pipeline-parallel-size"),
                                               ("sglang", "--tp-size", "pp-size"), ("trtllm", "--tp_size", "pp_size")])
def test_tensor_parallel_is_gpus_per_replica_over_pipeline_stages(backend, flag, pp):
    assert after(worker_argv(backend, "{}", gpus=4).argv, flag) == "4"
    assert after(worker_argv(backend, f"{{{pp}: 2}}", gpus=4).argv, flag) == "2"
    with pytest.raises(PlanError, match="4 GPUs per replica cannot be split into 3 pipeline stages"):
        worker_argv(backend, f"{{{pp}: 3}}", gpus=4)
