"""How the launcher starts a mocker worker (the profile adapter of the simulated engine)."""

from __future__ import annotations

import contextlib
import io
import sys

from dynamo.backends.base import Backend, WorkerContext, WorkerLaunch, model_dir
from dynamo.core.profile import ReadinessProbe


class MockerBackend(Backend):
    name = "mocker"
    uses_gpus = False
    default_grace_period = 5.0
    default_startup_timeout = 60.0
    owned_flags = {
        "host": "workers.<group>.host",
        "port": "workers.<group>.port or ports.base",
        "served-model-name": "model.name",
        "model-path": "model.path",
        "block-size": "model.block_size",
        "role": "workers.<group>.role",
        "kv-events-endpoint": "nothing (planned per worker)",
        "kv-events-replay-endpoint": "nothing (planned per worker)",
    }
    known_flags = frozenset({
        "num-gpu-blocks", "max-num-seqs", "max-num-batched-tokens", "max-model-len",
        "enable-prefix-caching", "speedup-ratio", "perf-table", "startup-time", "seed",
        "kv-transfer-bandwidth-gbps", "kv-bytes-per-token", "kv-events-topic", "kv-transfer",
    })

    def launch(self, ctx: WorkerContext) -> WorkerLaunch:
        profile = ctx.profile
        kv_port = ctx.allocate_port()
        replay_port = ctx.allocate_port()
        argv = [
            sys.executable, "-m", "dynamo.backends.mocker",
            "--host", ctx.host, "--port", str(ctx.port),
            "--served-model-name", profile.model.name,
            "--block-size", str(profile.model.block_size),
            "--role", ctx.group.role,
            "--kv-events-endpoint", f"tcp://{ctx.host}:{kv_port}",
            "--kv-events-replay-endpoint", f"tcp://{ctx.host}:{replay_port}",
        ]
        local_model = model_dir(profile)
        if local_model is not None:
            argv += ["--model-path", str(local_model)]
        if profile.model.max_model_len:
            argv += ["--max-model-len", str(profile.model.max_model_len)]
        notes: list[str] = []
        argv += self.engine_flags(ctx, notes)
        return WorkerLaunch(
            notes=notes,
            argv=argv,
            ports={"kv_events": kv_port, "kv_replay": replay_port},
            readiness_probe=ReadinessProbe(http_get={"path": "/health"}, period=0.1),
            discovery={
                "kv_events": f"tcp://{ctx.host}:{kv_port}",
                "kv_replay": f"tcp://{ctx.host}:{replay_port}",
            },
        )


    def validate_argvs(self, argvs: list[list[str]]) -> list[str | None]:
        """The mocker's own parser on each planned argv, in this process (it is always installed):
        a bad flag value is an error before anything starts, not a worker that exits at once."""
        from dynamo.backends.mocker.__main__ import parse_args

        results: list[str | None] = []
        for argv in argvs:
            errors = io.StringIO()
            try:
                with contextlib.redirect_stderr(errors):
                    parse_args(argv[3:])  # after: python -m dynamo.backends.mocker
                results.append(None)
            except SystemExit:
                lines = errors.getvalue().strip().splitlines()
                reason = lines[-1].split("error: ", 1)[-1] if lines else "bad arguments"
                results.append(f"the mocker rejects the planned flags: {reason}")
        return results


BACKEND = MockerBackend()
