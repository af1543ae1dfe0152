"""Small network probes for `dynamo check`: NATS's INFO greeting, loopback tests, URL redaction."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from dynamo.core import ports
from dynamo.core.nats_server import redact_url

NATS_DEFAULT_PORT = 4222


@dataclass(frozen=True)
class NatsServer:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def nats_servers(url: str) -> list[NatsServer]:
    """The servers of a NATS URL (``nats://[user:pass@]host[:port][,...]``); credentials are dropped."""
    servers = []
    for part in url.split(","):
        part = part.strip()
        if not part:
            continue
        if "://" not in part:
            part = "nats://" + part
        split = urlsplit(part)
        try:
            port = split.port or NATS_DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{redact_url(part)}: the port is not a number") from None
        if not split.hostname:
            raise ValueError(f"{redact_url(part)}: no host")
        servers.append(NatsServer(split.scheme or "nats", split.hostname, port))
    if not servers:
        raise ValueError("empty NATS URL")
    return servers


def nats_info(url: str, timeout: float = 1.0) -> dict:
    """Connect to the first reachable server of ``url`` and return its INFO greeting.

    Every NATS server greets a new connection with ``INFO {json}`` before anything else
    (before TLS too), so this proves a NATS server answers there, and tells its version and
    whether JetStream is on, without a client library or credentials. Raises ConnectionError.
    """
    deadline = time.monotonic() + timeout
    problems = []
    for server in nats_servers(url):
        left = deadline - time.monotonic()
        if left <= 0:
            problems.append(f"{server}: no time left")
            break
        try:
            return _greeting(server, left)
        except (OSError, ValueError) as exc:
            problems.append(f"{server}: {_why(exc)}")
    raise ConnectionError("; ".join(problems))


def _why(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "no answer (timed out)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    return getattr(exc, "strerror", None) or str(exc)


def _greeting(server: NatsServer, timeout: float) -> dict:
    started = time.monotonic()
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        data = b""
        while b"\r\n" not in data and len(data) < 65536:
            sock.settimeout(max(0.01, timeout - (time.monotonic() - started)))
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    line = data.split(b"\r\n", 1)[0].decode("utf-8", "replace")
    if not line.startswith("INFO "):
        raise ValueError(f"something answers there, but not NATS ({line[:40]!r})")
    info = json.loads(line[5:])
    info["_seconds"] = time.monotonic() - started
    info["_server"] = str(server)
    return info


def is_loopback(host: str) -> bool:
    """Loopback, counting an empty host (a URL without one) as local."""
    return host == "" or ports.is_loopback(host)
