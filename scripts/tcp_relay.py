#!/usr/bin/env python3
"""A bare TCP relay: the cheapest proxy hop a Python process can add, for bench_gateway.py.

Each accepted connection is paired with a new connection to the next upstream (round-robin)
and bytes are copied both ways from the protocol callbacks, with no HTTP parsing, routing,
metrics or retries. Whatever it costs against direct connections is the price of the extra
hop itself (two more socket writes per chunk, two more wake-ups) on this machine, which no
gateway written on asyncio can undercut.

    python scripts/tcp_relay.py --port 0 --upstream 127.0.0.1:8001 127.0.0.1:8002

It prints ``listening <port>`` once it accepts connections and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from itertools import cycle


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection: writes what it reads to its peer, with flow control."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []  # read before the peer was connected

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


def _client_side(upstreams) -> _Pipe:
    client = _Pipe()
    host, port = next(upstreams)

    async def connect() -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(_Pipe, host, port)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        upstream.peer, client.peer = client, upstream
        for data in client.pending:
            upstream.transport.write(data)
        client.pending.clear()
        if client.transport is None or client.transport.is_closing():
            upstream.transport.close()

    asyncio.ensure_future(connect())
    return client


async def serve(port: int, upstreams: list[tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    targets = cycle(upstreams)
    server = await loop.create_server(lambda: _client_side(targets), "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="Port on 127.0.0.1 (0: any free one).")
    parser.add_argument("--upstream", nargs="+", required=True, metavar="HOST:PORT")
    args = parser.parse_args()
    upstreams = []
    for item in args.upstream:
        host, _, port = item.rpartition(":")
        upstreams.append((host, int(port)))
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port, upstreams))


if __name__ == "__main__":
    main()
