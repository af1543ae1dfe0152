"""Port planning and checks: every listening port is planned, unique and free before start."""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class PortClaim:
    host: str
    port: int
    owner: str  # "frontend", "decode-0 http", ...
    setting: str = ""  # the --set that moves it (port_setting)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now (for ``port: 0`` and ``ports.base: 0``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", 0))
        return sock.getsockname()[1]


class PortAllocator:
    """Hands out ports from a base upward, skipping any already claimed in the plan."""

    def __init__(self, base: int, host: str = "127.0.0.1"):
        self.next = base
        self.host = host
        self.taken: set[int] = set()

    def claim(self, port: int) -> int:
        self.taken.add(port)
        return port

    def any_free(self) -> int:
        """A port the OS picks (``port: 0``), not one already claimed in the plan."""
        while True:
            port = pick_free_port(self.host)
            if port not in self.taken:
                return self.claim(port)

    def allocate(self) -> int:
        if self.next == 0:
            return self.any_free()
        while self.next in self.taken:
            self.next += 1
        if self.next > 65535:
            from dynamo.core.errors import PlanError

            raise PlanError("ran out of ports above ports.base; lower ports.base or use 0 for free ports")
        port = self.next
        self.next += 1
        return self.claim(port)


def port_is_free(host: str, port: int) -> bool:
    bind_host = "0.0.0.0" if host in ("", "*") else host
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            if exc.errno == errno.EADDRNOTAVAIL:
                return True  # an address of another node: not ours to check
            raise
    return True


def listener_pids(port: int) -> set[int | None]:
    """The local processes listening on ``port`` (None for another user's); empty if none is visible."""
    try:
        connections = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, PermissionError):
        return set()
    return {conn.pid for conn in connections
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN}


def port_holder(port: int) -> str | None:
    """Describe the process listening on ``port`` (``pid 123 (nats-server -p 4222)``), if visible."""
    try:
        connections = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, PermissionError):
        return None
    for conn in connections:
        if conn.laddr and conn.laddr.port == port and conn.status in (psutil.CONN_LISTEN, psutil.CONN_NONE):
            return describe_process(conn.pid)
    return None


def describe_process(pid: int | None) -> str:
    """``pid 123 (nats-server -p 4222)`` on one line; None is another user's process."""
    if pid is None:
        return "another user's process"
    try:
        proc = psutil.Process(pid)
        cmd = " ".join(" ".join(proc.cmdline()).split()) or proc.name()  # one line, whatever the argv holds
    except psutil.Error:
        cmd = "?"
    if len(cmd) > 80:
        cmd = cmd[:77] + "..."
    return f"pid {pid} ({cmd})"


def port_setting(owner: str, key: str | None = None) -> str:
    """The profile setting (as a ``--set``) that moves the port of ``owner`` (``frontend http``...).

    ``key`` is the profile key that set the port explicitly (``workers.decode.port``), if one did.
    """
    if owner.startswith("frontend"):
        return "frontend.port=0 (0 has the OS pick a free port)"
    if owner.startswith("nats"):
        return "nats.port=0"
    if key:
        return f"{key}=0 (0 takes ports from ports.base), or another port"
    return "ports.base=0 (0 has the OS pick free ports)"


def busy_ports(claims: list[PortClaim]) -> list[str]:
    """One message per planned port that is already taken."""
    problems = []
    for claim in claims:
        if not port_is_free(claim.host, claim.port):
            holder = port_holder(claim.port)
            held = f" by {holder}" if holder else ""
            problems.append(f"port {claim.port} ({claim.owner}) is already in use{held}; "
                            f"free it, or choose another port: --set {claim.setting or port_setting(claim.owner)}")
    return problems
