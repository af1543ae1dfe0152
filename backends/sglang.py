"""SGLang workers: ``python -m sglang.launch_server`` with the flags each role needs.

Every worker publishes KV events over ZMQ (``"publisher": "zmq"`` must be explicit: SGLang
ignores vLLM's ``enable_kv_cache_events`` and would silently publish nothing). Prefill and
decode workers add ``--disaggregation-mode``, the NIXL transfer backend and, on prefill, a
bootstrap port of its own (decode servers learn it per request from the router). The page
size is the profile's block size, so the router's blocks and SGLang's pages line up.
"""

from __future__ import annotations

import importlib.util
import sys

from dynamo.backends.base import WorkerContext, WorkerLaunch
from dynamo.backends.engine_flags import (
    ARGPARSE_VALIDATOR, EngineBackend, advertised_host, compact_json, is_ip, is_loopback, url_host,
)
from dynamo.core.profile import ReadinessProbe

SERVER_MODULE = "sglang.launch_server"


class SglangBackend(EngineBackend):
    name = "sglang"
    uses_gpus = True
    default_grace_period = 60.0
    default_startup_timeout = 900.0
    flag_file = "sglang_flags.txt"
    abbreviations = True  # plain argparse: --tp means --tp-size, so owned flags are checked after resolving
    pipeline_flags = ("pp-size", "pipeline-parallel-size", "pp_size", "pipeline_parallel_size")
    owned_flags = {
        "host": "workers.<group>.host",
        "port": "workers.<group>.port or ports.base",
        "model-path": "model.path",
        "model": "model.path",
        "served-model-name": "model.name",
        "page-size": "model.block_size",
        "context-length": "model.max_model_len",
        "tp-size": "workers.<group>.gpus (tensor parallel = GPUs per replica / pp-size)",
        "tensor-parallel-size": "workers.<group>.gpus (tensor parallel = GPUs per replica / pp-size)",
        "base-gpu-id": "workers.<group>.gpus",
        "gpu-id-step": "workers.<group>.gpus",
        "dp-size": "workers.<group>.replicas (each replica is its own server)",
        "data-parallel-size": "workers.<group>.replicas (each replica is its own server)",
        "disaggregation-mode": "workers.<group>.role (prefill or decode)",
        "disaggregation-bootstrap-port": "remove it: the launcher plans one bootstrap port per prefill worker",
        "disaggregation-transfer-backend": "remove it: the launcher uses nixl",
        "kv-events-config": "remove it: the launcher plans a KV events endpoint per worker and publishes it in discovery",
        "config": "remove it: put the flags in workers.<group>.args, where they are checked",
    }

    def launch(self, ctx: WorkerContext) -> WorkerLaunch:
        profile = ctx.profile
        role = ctx.group.role
        argv = [
            sys.executable, "-m", SERVER_MODULE,
            "--model-path", profile.model.source, "--served-model-name", profile.model.name,
            "--host", ctx.host, "--port", str(ctx.port),
            "--page-size", str(profile.model.block_size),
            "--tp-size", str(self.tensor_parallel_size(ctx)),
            "--enable-metrics",
        ]
        if profile.model.max_model_len:
            argv += ["--context-length", str(profile.model.max_model_len)]
        env: dict[str, str] = {}
        host = advertised_host(ctx)
        ports = {"kv_events": ctx.allocate_port(), "kv_replay": ctx.allocate_port()}

        # KV events. A loopback worker binds its PUB socket on 127.0.0.1 (bind must be forced:
        # SGLang, like vLLM, would connect to a non-wildcard address); a networked one on tcp://*.
        events: dict[str, object] = {"publisher": "zmq", "topic": ""}
        if is_loopback(ctx.host):
            events.update(endpoint=f"tcp://127.0.0.1:{ports['kv_events']}", bind=True,
                          replay_endpoint=f"tcp://127.0.0.1:{ports['kv_replay']}")
            reach = "127.0.0.1"
        else:
            events.update(endpoint=f"tcp://*:{ports['kv_events']}", replay_endpoint=f"tcp://*:{ports['kv_replay']}")
            reach = url_host(host)
        argv += ["--kv-events-config", compact_json(events)]
        discovery: dict[str, object] = {
            "engine": "sglang", "kv_format": "sglang",
            "kv_events": f"tcp://{reach}:{ports['kv_events']}", "kv_replay": f"tcp://{reach}:{ports['kv_replay']}",
        }

        # Disaggregation: the router sends the same request to a prefill and a decode server with
        # bootstrap_host/port/room; decode asks the prefill's bootstrap server where the KV is.
        if role in ("prefill", "decode"):
            argv += ["--disaggregation-mode", role, "--disaggregation-transfer-backend", "nixl"]
            if role == "prefill":
                ports["bootstrap"] = ctx.allocate_port()
                argv += ["--disaggregation-bootstrap-port", str(ports["bootstrap"])]
                discovery.update(bootstrap_host=host, bootstrap_port=ports["bootstrap"])
            if is_ip(host):
                # the address the KV sender/receiver advertises; otherwise SGLang guesses it by
                # "connecting" a UDP socket to 8.8.8.8, which fails on air-gapped hosts
                env["SGLANG_HOST_IP"] = host

        notes: list[str] = []
        argv += self.engine_flags(ctx, notes)
        return WorkerLaunch(
            argv=argv, env=env, ports=ports, notes=notes, discovery=discovery,
            # /health answers 503 until the warm-up request succeeded, then runs a one-token
            # generation per call (up to SGLANG_HEALTH_CHECK_TIMEOUT, 20 s)
            readiness_probe=ReadinessProbe(http_get={"path": "/health"}, period=2.0, timeout=25.0),
        )

    def missing_executable(self) -> str | None:
        if importlib.util.find_spec("sglang") is None:
            return (f"backend sglang: SGLang is not installed for {sys.executable} "
                    "(pip install 'sglang[all]' on a CUDA machine; it needs CUDA), or run the profile "
                    "with --backend mocker")
        return None

    validator_script = ARGPARSE_VALIDATOR.replace("{setup}", """
import argparse
from sglang.srt.server_args import ServerArgs
def parse(args):
    parser = argparse.ArgumentParser(prog="sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    parser.parse_args(args)
""")

    def validator_argv(self, argv: list[str]) -> tuple[list[str], list[str]] | None:
        if len(argv) < 3 or argv[1:3] != ["-m", SERVER_MODULE]:
            return None
        return [argv[0]], argv[3:]


BACKEND = SglangBackend()
