"""vLLM workers: ``vllm serve`` (the engine's own OpenAI server) with the flags each role needs."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

from dynamo.backends.base import Backend, WorkerContext, WorkerLaunch
from dynamo.core.profile import ReadinessProbe


class VllmBackend(Backend):
    name = "vllm"
    uses_gpus = True
    default_grace_period = 30.0
    default_startup_timeout = 900.0
    owned_flags = {
        "host": "workers.<group>.host",
        "port": "workers.<group>.port or ports.base",
        "model": "model.path",
        "served-model-name": "model.name",
        "block-size": "model.block_size",
        "max-model-len": "model.max_model_len",
        "tensor-parallel-size": "workers.<group>.gpus",
        "kv-transfer-config": "workers.<group>.role",
        "kv-events-config": "nothing (planned per worker)",
    }

    def launch(self, ctx: WorkerContext) -> WorkerLaunch:
        profile = ctx.profile
        kv_port = ctx.allocate_port()
        replay_port = ctx.allocate_port()
        argv = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", profile.model.source, "--served-model-name", profile.model.name,
            "--host", ctx.host, "--port", str(ctx.port),
            "--block-size", str(profile.model.block_size),
            "--tensor-parallel-size", str(max(1, len(ctx.gpus))),
            "--enable-prefix-caching",
            "--kv-events-config", json.dumps({
                "enable_kv_cache_events": True, "publisher": "zmq",
                "endpoint": f"tcp://*:{kv_port}", "replay_endpoint": f"tcp://*:{replay_port}",
            }, separators=(",", ":")),
        ]
        if profile.model.max_model_len:
            argv += ["--max-model-len", str(profile.model.max_model_len)]
        env: dict[str, str] = {}
        ports = {"kv_events": kv_port, "kv_replay": replay_port}
        if ctx.group.role in ("prefill", "decode"):
            side_port = ctx.allocate_port()
            argv += ["--kv-transfer-config",
                     json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"}, separators=(",", ":"))]
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_port)
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1" if ctx.host in ("0.0.0.0", "") else ctx.host
            ports["nixl_side_channel"] = side_port
        notes: list[str] = []
        argv += self.engine_flags(ctx, notes)
        return WorkerLaunch(
            argv=argv, env=env, ports=ports, notes=notes,
            readiness_probe=ReadinessProbe(http_get={"path": "/health"}, period=1.0, timeout=5.0),
            discovery={"kv_events": f"tcp://{ctx.host}:{kv_port}", "kv_replay": f"tcp://{ctx.host}:{replay_port}"},
        )

    def missing_executable(self) -> str | None:
        if importlib.util.find_spec("vllm") is None and shutil.which("vllm") is None:
            return ("backend vllm: vLLM is not installed in this environment "
                    "(pip install vllm on a GPU machine); on a CPU, run the profile with --backend mocker")
        return None


BACKEND = VllmBackend()
