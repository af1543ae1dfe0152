"""TensorRT-LLM workers: ``trtllm-serve MODEL`` with an LLM-API options file per worker.

The options file (``--extra_llm_api_options``, written into the run directory before the
worker starts) carries what has no portable command-line flag: the KV cache block size
(``tokens_per_block`` = the profile's block size), the KV event buffer that fills
``POST /kv_cache_events`` (TensorRT-LLM has no ZMQ publisher; the router polls), and for
prefill (context) and decode (generation) workers the cache transceiver that moves KV
between them. A group's ``args: {extra_llm_api_options: {...}}`` mapping is merged into it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import Any

from ruamel.yaml import YAML

from dynamo.backends.base import WorkerContext, WorkerLaunch, one_token_warmup
from dynamo.backends.engine_flags import EngineBackend, advertised_host, url_host
from dynamo.core.errors import PlanError
from dynamo.core.plan import RUN_DIR
from dynamo.core.profile import ReadinessProbe

EXECUTABLE = "trtllm-serve"
OPTIONS_KEYS = ("extra_llm_api_options", "config")  # --config is an alias in newer trees
KV_EVENT_BUFFER = 1024
# trtllm-serve's default --max_num_tokens: the transfer buffer should hold a whole prompt
DEFAULT_TRANSFER_TOKENS = 8192


class TrtllmBackend(EngineBackend):
    name = "trtllm"
    uses_gpus = True
    default_grace_period = 60.0
    default_startup_timeout = 1800.0  # first start may build engines
    flag_file = "trtllm_flags.txt"
    flag_section = "serve"
    pipeline_flags = ("pp_size", "pipeline_parallel_size", "pp-size", "pipeline-parallel-size")
    owned_flags = {
        "host": "workers.<group>.host",
        "port": "workers.<group>.port or ports.base",
        "served_model_name": "model.name",
        "max_seq_len": "model.max_model_len",
        "tp_size": "workers.<group>.gpus (tensor parallel = GPUs per replica / pp_size)",
        "tensor_parallel_size": "workers.<group>.gpus (tensor parallel = GPUs per replica / pp_size)",
        "server_role": "workers.<group>.role (prefill or decode)",
        "disagg_cluster_uri": "remove it: the launcher's frontend orchestrates prefill and decode",
        "metadata_server_config_file": "remove it: the launcher's frontend orchestrates prefill and decode",
    }

    def launch(self, ctx: WorkerContext) -> WorkerLaunch:
        profile = ctx.profile
        role = ctx.group.role
        argv = [
            EXECUTABLE, profile.model.source,
            "--host", ctx.host, "--port", str(ctx.port),
            "--served_model_name", profile.model.name,
            "--tp_size", str(self.tensor_parallel_size(ctx)),
        ]
        if profile.model.max_model_len:
            argv += ["--max_seq_len", str(profile.model.max_model_len)]
        options_path = f"{RUN_DIR}/trtllm-{ctx.name}.yaml"
        argv += ["--extra_llm_api_options", options_path]

        args = dict(ctx.group.args)
        user_options: dict[str, Any] = {}
        notes: list[str] = []
        for key in list(args):
            if str(key).lstrip("-").replace("-", "_") in OPTIONS_KEYS:
                value = args.pop(key)
                if ctx.args_from_other_backend:
                    continue
                if not isinstance(value, dict):
                    raise PlanError(
                        f"workers.{ctx.group_name}.args.{key}: give the LLM-API options as a mapping "
                        f"(for example {{kv_cache_config: {{free_gpu_memory_fraction: 0.8}}}}); "
                        f"the launcher writes them into the options file with its own"
                    )
                user_options = _merge(user_options, value)
        argv += self.convert_args(ctx, args, notes)

        options = self.llm_api_options(ctx, user_options)
        host = advertised_host(ctx)
        return WorkerLaunch(
            argv=argv, notes=notes,
            files={options_path: _dump_yaml(options, f"LLM-API options for {ctx.name} (role {role}), written by dynamo")},
            # trtllm-serve listens only once the model is loaded: connection refused means "starting"
            readiness_probe=ReadinessProbe(http_get={"path": "/health"}, warmup=one_token_warmup(ctx), period=2.0, timeout=5.0),
            discovery={"engine": "trtllm", "kv_format": "trtllm-http",
                       "kv_events": f"http://{url_host(host)}:{ctx.port}/kv_cache_events"},
        )

    def llm_api_options(self, ctx: WorkerContext, user: dict[str, Any]) -> dict[str, Any]:
        """The launcher's options for this role with the group's own merged over them."""
        where = f"workers.{ctx.group_name}.args.extra_llm_api_options"
        block = ctx.profile.model.block_size
        given = (user.get("kv_cache_config") or {}).get("tokens_per_block")
        if given is not None and given != block:
            raise PlanError(f"{where}.kv_cache_config.tokens_per_block: the launcher sets it to model.block_size "
                            f"({block}); change model.block_size instead")
        options: dict[str, Any] = {
            "kv_cache_config": {"tokens_per_block": block, "enable_block_reuse": True,
                                "event_buffer_max_size": KV_EVENT_BUFFER},
        }
        if ctx.group.role in ("prefill", "decode"):
            options["cache_transceiver_config"] = {
                "backend": "DEFAULT",
                "max_tokens_in_buffer": ctx.profile.model.max_model_len or DEFAULT_TRANSFER_TOKENS,
            }
        if ctx.group.role == "prefill":
            # context-only servers run one step per request: overlap scheduling buys nothing there
            options["disable_overlap_scheduler"] = True
        merged = _merge(options, user)
        if ctx.group.role in ("prefill", "decode") and not merged.get("cache_transceiver_config"):
            raise PlanError(f"{where}.cache_transceiver_config: a {ctx.group.role} worker needs it to move KV")
        return merged

    def missing_executable(self) -> str | None:
        if shutil.which(EXECUTABLE) is None:
            return ("backend trtllm: trtllm-serve is not on PATH (install TensorRT-LLM on a GPU machine, "
                    "for example NVIDIA's container), or run the profile with --backend mocker")
        return None

    # Click: make_context parses and checks every option without running the command.
    validator_script = r"""
import contextlib, io, json, sys
import click
from tensorrt_llm.commands import serve as module
command = getattr(module, "serve", None)
if not isinstance(command, click.Command) or isinstance(command, click.Group):
    command = module.main
    if isinstance(command, click.Group):
        command = command.get_command(None, "serve") or command
out = []
for args in json.load(sys.stdin):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            command.make_context("trtllm-serve", list(args), resilient_parsing=False)
        out.append(None)
    except click.exceptions.UsageError as exc:
        out.append(exc.format_message())
    except click.exceptions.Exit:
        out.append(None)
print(json.dumps(out))
"""

    def validator_argv(self, argv: list[str]) -> tuple[list[str], list[str]] | None:
        if not argv or argv[0] != EXECUTABLE:
            return None
        program = shutil.which(EXECUTABLE)
        python = _script_python(program) if program else None
        if python is None:
            return None
        # the options file is written at start: an existing empty file stands in for it
        return [python], [os.devnull if RUN_DIR in arg else arg for arg in argv[1:]]


def _script_python(program: str) -> str | None:
    """The interpreter of a console script (its ``#!`` line)."""
    try:
        with open(program, "rb") as fh:
            first = fh.readline().decode(errors="replace").strip()
    except OSError:
        return None
    if first.startswith("#!") and "python" in first:
        return first[2:].strip().split()[0]
    return None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _dump_yaml(data: dict[str, Any], comment: str) -> str:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    buffer = io.StringIO()
    # profile values arrive as YAML scalar subclasses; plain JSON types dump cleanly
    yaml.dump(json.loads(json.dumps(data)), buffer)
    return f"# {comment}\n{buffer.getvalue()}"


BACKEND = TrtllmBackend()
