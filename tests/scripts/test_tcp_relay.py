"""scripts/tcp_relay.py, the bare proxy hop bench_gateway.py measures as the floor under a gateway's cost.

Its numbers are reported next to the frontend's, so it must relay correctly: every byte both
ways, across several upstreams in turn, large bodies under backpressure, and closes passed on.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import REPO

RELAY = REPO / "scripts" / "tcp_relay.py"


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        reply = self.server.name + b":" + body
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def upstreams():
    servers = []
    for name in (b"a", b"b"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        server.name = name
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def relay(upstreams):
    addresses = [f"127.0.0.1:{s.server_address[1]}" for s in upstreams]
    proc = subprocess.Popen([sys.executable, str(RELAY), "--upstream", *addresses], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0  # SIGTERM is a clean stop


def test_relays_requests_to_each_upstream_in_turn(relay):
    seen = set()
    for i in range(4):
        with httpx.Client(base_url=relay, timeout=10) as client:  # a new connection: the next upstream
            reply = client.post("/", content=f"hello {i}".encode()).content
        name, _, echoed = reply.partition(b":")
        assert echoed == f"hello {i}".encode()
        seen.add(name)
    assert seen == {b"a", b"b"}


def test_large_bodies_and_keep_alive(relay):
    payload = bytes(range(256)) * 20_000  # 5 MB: more than any socket buffer, so flow control takes part
    with httpx.Client(base_url=relay, timeout=30) as client:
        for _ in range(3):  # one connection, one upstream, several requests
            reply = client.post("/", content=payload).content
            assert reply[2:] == payload


def test_a_refused_upstream_closes_the_client_connection():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        proc = subprocess.Popen([sys.executable, str(RELAY), "--upstream", f"127.0.0.1:{port}"],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            listening = int(proc.stdout.readline().split()[1])
            with socket.create_connection(("127.0.0.1", listening), timeout=10) as client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert client.recv(100) == b""  # closed, not left hanging
        finally:
            proc.terminate()
            proc.wait(10)
