"""Mocker settings and the argv that reproduces them (import-light, for the launcher)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields

__all__ = ["KV_TRANSFER_MODES", "MockerConfig", "READY_MARKER", "mocker_command"]

READY_MARKER = "Mocker ready on http://"
# model: wait the modelled transfer time; nixl: move real bytes (nixl_transfer.py).
KV_TRANSFER_MODES = ("model", "nixl")


@dataclass
class MockerConfig:
    """Everything the CLI decides; see ``python -m dynamo.backends.mocker --help``."""

    port: int
    served_model_name: str
    host: str = "127.0.0.1"
    model_path: str | None = None
    block_size: int = 16
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 32768
    enable_prefix_caching: bool = True
    speedup_ratio: float = 1.0
    perf_table: str | None = None
    startup_time: float = 0.0
    seed: int = 0
    role: str = "agg"
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    kv_events_topic: str = ""
    kv_transfer_bandwidth_gbps: float = 25.0
    kv_bytes_per_token: int = 131072
    kv_transfer: str = "model"

    def to_argv(self) -> list[str]:
        """CLI flags for this config (only the ones that differ from the defaults)."""
        out: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.name in ("port", "served_model_name"):
                out += [flag, str(value)]
            elif f.name == "enable_prefix_caching":
                if not value:
                    out.append("--no-enable-prefix-caching")
            elif value is not None and value != f.default:
                out += [flag, str(value)]
        return out


def mocker_command(config: MockerConfig, python: str | None = None) -> list[str]:
    """The full command line that starts a mocker with ``config``.

    The process prints one line containing :data:`READY_MARKER` on stdout when
    it serves, and exits 0 on SIGTERM.
    """
    return [python or sys.executable, "-m", "dynamo.backends.mocker", *config.to_argv()]
