"""The frontend's HTTP/1.1 client against a scripted server: framing, keep-alive, broken connections."""

from __future__ import annotations

import asyncio
import random

import pytest

from dynamo.core.upstream import UpstreamAborted, UpstreamError, UpstreamPool


class ScriptedServer:
    """Answers each request with the next scripted reply, written in the given fragments."""

    def __init__(self, replies: list[list[bytes] | None]):
        self.replies = replies
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                self.requests.append(head + await reader.readexactly(length))
                reply = self.replies.pop(0)
                if reply is None:  # close without answering
                    break
                for fragment in reply:
                    writer.write(fragment)
                    await writer.drain()
                    await asyncio.sleep(0)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, pos = [], 0
    for size in sizes:
        out.append(b"%x\r\n%s\r\n" % (size, body[pos:pos + size]))
        pos += size
    return b"".join(out) + b"0\r\n\r\n"


def fragments(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


class Sink:
    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.done = asyncio.get_running_loop().create_future()

    def feed(self, data: bytes) -> None:
        self.pieces.append(data)

    def finish(self, error: Exception | None) -> None:
        self.done.set_result(error)


def test_chunked_bodies_survive_any_fragmentation_and_the_connection_is_reused():
    async def main() -> None:
        rng = random.Random(7)
        bodies, replies = [], []
        for _ in range(40):
            body = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
            sizes, left = [], len(body)
            while left:
                sizes.append(rng.randint(1, left))
                left -= sizes[-1]
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
            bodies.append(body)
            replies.append(fragments(head + chunked(body, sizes), rng))
        server = ScriptedServer(replies)
        pool = UpstreamPool()
        async with server as url:
            for i, body in enumerate(bodies):
                response = await pool.request(url, "/v1/x", b'{"n": %d}' % i, {"x-request-id": str(i)})
                assert response.status == 200 and response.content_type == "text/event-stream"
                if i % 2:
                    assert await response.read() == body
                else:
                    sink = Sink()
                    response.stream(sink)
                    assert await sink.done is None
                    response.release()
                    assert b"".join(sink.pieces) == body
        await pool.close()
        assert server.connections == 1
        assert server.requests[3].endswith(b'{"n": 3}') and b"x-request-id: 3\r\n" in server.requests[3]

    asyncio.run(main())


def test_content_length_and_close_delimited_bodies():
    async def main() -> None:
        replies = [
            [b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n", b"\r\nhel", b"lo"],
            [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil", b" the end"],
        ]
        server = ScriptedServer(replies)
        pool = UpstreamPool()
        async with server as url:
            first = await pool.request(url, "/", b"")
            assert first.status == 404 and await first.read() == b"hello"
            assert await (await pool.request(url, "/", b"")).read() == b""
            assert await (await pool.request(url, "/", b"")).read() == b"until the end"
        await pool.close()

    asyncio.run(main())


def test_a_pooled_connection_closed_meanwhile_is_replaced_transparently():
    async def main() -> None:
        ok = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        server = ScriptedServer([ok, None, ok])
        pool = UpstreamPool()
        async with server as url:
            assert await (await pool.request(url, "/", b"")).read() == b"ok"
            # the server reads the next request on the pooled connection, then closes it unanswered
            assert await (await pool.request(url, "/", b"")).read() == b"ok"
        await pool.close()
        assert server.connections == 2

    asyncio.run(main())


def test_a_body_cut_midway_reports_an_error_and_unreachable_workers_raise():
    async def main() -> None:
        server = ScriptedServer([[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nab"]])
        pool = UpstreamPool(connect_timeout=2)
        async with server as url:
            response = await pool.request(url, "/", b"")
            sink = Sink()
            response.stream(sink)
            error = await sink.done
            assert isinstance(error, UpstreamError) and b"".join(sink.pieces) == b"helloab"
            response.close()
        with pytest.raises(UpstreamError):
            await pool.request(url, "/", b"")  # the server is gone
        await pool.close()

    asyncio.run(main())


def test_giving_up_on_a_worker_fails_only_its_stuck_movable_requests():
    async def main() -> None:
        silent = asyncio.Event()  # a frozen worker: takes requests, never answers

        async def frozen(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            await silent.wait()
            writer.close()

        async def streaming(reader, writer):  # answers at once, then nothing for a while
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await silent.wait()
            writer.close()

        servers = [await asyncio.start_server(handler, "127.0.0.1", 0) for handler in (frozen, streaming)]
        urls = [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
        pool = UpstreamPool()
        try:
            waiting = [asyncio.ensure_future(pool.request(urls[0], "/v1/completions", b"{}", movable=True))
                       for _ in range(3)]
            unary = asyncio.ensure_future(pool.request(urls[0], "/v1/completions", b"{}"))  # not movable
            flowing = await pool.request(urls[1], "/v1/completions", b"{}", movable=True, migratable=True)
            sink = Sink()
            flowing.stream(sink)
            final = await pool.request(urls[1], "/v1/completions", b"{}", movable=True)  # cannot continue elsewhere
            kept = Sink()
            final.stream(kept)
            await asyncio.sleep(0.1)
            assert not any(w.done() for w in (*waiting, unary))
            assert pool.abort_stuck(urls[0], "left rotation", stalled_after=1.0) == 3
            assert pool.abort_stuck(urls[1], "left rotation", stalled_after=1.0) == 0  # answered 0.1 s ago
            for w in waiting:
                with pytest.raises(UpstreamAborted, match="left rotation"):
                    await asyncio.wait_for(w, 1)
            await asyncio.sleep(0.05)
            assert sink.pieces == [b"hello"] and not sink.done.done() and not unary.done()
            # the stream has been silent longer than 0.1 s: stuck, it fails (its caller migrates it); the
            # one that could not continue elsewhere is left to its worker
            assert pool.abort_stuck(urls[1], "left rotation", stalled_after=0.1) == 1
            assert isinstance(await asyncio.wait_for(sink.done, 1), UpstreamAborted)
            assert not kept.done.done()
            final.close()
            unary.cancel()
            flowing.close()
        finally:
            silent.set()
            await pool.close()
            for s in servers:
                s.close()

    asyncio.run(main())
