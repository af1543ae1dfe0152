"""A small HTTP/1.1 client for the frontend's hot path: pooled keep-alive connections to workers.

General-purpose clients (aiohttp's included) spend most of a short streamed request on
machinery the frontend does not need: request objects, header multidicts, a stream reader
and a task wake-up per body chunk. This client writes a request as one buffer and hands each
decoded body piece to a :class:`BodySink` straight from the protocol callback, so a streamed
chunk costs one ``data_received`` call and no task switch.

Only what workers speak is supported: plain ``http://``, ``Content-Length``, chunked and
close-delimited bodies, keep-alive.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Protocol
from urllib.parse import urlsplit

_MAX_HEAD = 64 * 1024
_REUSE_RETRIES = 1  # a pooled connection the worker closed meanwhile: try once more on a fresh one


class UpstreamError(Exception):
    """The worker could not be reached, or the connection broke before the response was complete."""


class UpstreamAborted(UpstreamError):
    """We gave up on the worker (it left rotation) before it answered at all."""


class BodySink(Protocol):
    def feed(self, data: bytes) -> None:
        """A decoded piece of the response body, in order."""

    def finish(self, error: Exception | None) -> None:
        """The body ended: completely (None) or broken (an :class:`UpstreamError`)."""


class _Collect:
    """The default sink: keep the body for ``read()``."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def feed(self, data: bytes) -> None:
        self.pieces.append(data)

    def finish(self, error: Exception | None) -> None:
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)


class _Discard:
    def feed(self, data: bytes) -> None:
        pass

    def finish(self, error: Exception | None) -> None:
        pass


_DISCARD = _Discard()


class UpstreamResponse:
    """Status and headers of a worker's answer; the body is read whole or streamed to a sink."""

    def __init__(self, conn: _Connection, status: int, headers: dict[str, str]):
        self._conn: _Connection | None = conn  # None once released or closed: the pool may reuse it
        self.status = status
        self.headers = headers  # lower-case names; a repeated header keeps its last value

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    async def read(self) -> bytes:
        """The whole body; raises UpstreamError if the connection breaks first."""
        sink = _Collect()
        self.stream(sink)
        try:
            await sink.done
        except BaseException:
            self.close()
            raise
        self.release()
        return b"".join(sink.pieces)

    def stream(self, sink: BodySink) -> None:
        """Deliver the body to ``sink`` from now on (pieces received so far first)."""
        if self._conn is None:
            raise RuntimeError("the response was already released")
        self._conn.attach(sink)

    def pause_reading(self) -> None:
        if self._conn is not None:
            self._conn.pause_reading()

    def resume_reading(self) -> None:
        if self._conn is not None:
            self._conn.resume_reading()

    def release(self) -> None:
        """Done with this response: the connection returns to the pool once the body has ended
        (the rest of the body, if any, is read and dropped). Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.release()

    def close(self) -> None:
        """Abandon the response and close the connection (the worker sees the client go away).
        Idempotent; does nothing after ``release()``."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, pool: UpstreamPool, key: str):
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.reused = False
        self.movable = False  # the caller may send this request elsewhere until the worker answers
        self.migratable = False  # ... and even after, if it falls silent: it can continue elsewhere
        self._reading_paused = False
        self._reset()

    def _reset(self) -> None:
        self._head: bytes | None = b""  # None once the status line and headers are parsed
        self._head_waiter: asyncio.Future | None = None
        self._sink: BodySink | None = None
        self._pending: list[bytes] = []  # body pieces received before a sink is attached
        self._mode = ""  # "chunked", "length", "close"
        self._left = 0  # bytes left in the current chunk (chunked) or body (length)
        self._chunk_buf = b""  # an incomplete chunk-size line or chunk trailer
        self._trailer = False  # inside the chunk terminator / trailers after the last chunk
        self._complete = False
        self._error: Exception | None = None
        self._released = False
        self._keep_alive = True
        self._got_bytes = False
        self.last_read = 0.0

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool._forget(self)
        if not self._complete:
            self._fail(UpstreamError(f"connection closed by the worker{': ' + str(exc) if exc else ''}"),
                       eof=exc is None)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost settles the message

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        self.last_read = time.monotonic()
        if self._head is not None:
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                if len(head) > _MAX_HEAD:
                    self._fail(UpstreamError("response headers too large"))
                    self.abort()
                else:
                    self._head = head
                return
            self._head = None
            if not self._parse_head(head[:end]):
                return
            data = head[end + 4:]
            if self._mode == "length" and self._left == 0:
                self._message_complete()
                return
            if not data:
                return
        if self._mode == "chunked":
            self._chunked(data)
        elif self._mode == "length":
            if len(data) >= self._left:
                piece, self._left = data[:self._left], 0
                self._deliver(piece)
                self._message_complete()
            else:
                self._left -= len(data)
                self._deliver(data)
        else:
            self._deliver(data)

    # ------------------------------------------------------------ parsing

    def _parse_head(self, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        try:
            if not parts[0].startswith("HTTP/1."):
                raise ValueError
            status = int(parts[1])
        except (ValueError, IndexError):
            self._fail(UpstreamError(f"not an HTTP/1.x response: {lines[0][:80]!r}"))
            self.abort()
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        self._keep_alive = parts[0] == "HTTP/1.1" and "close" not in connection
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode = "chunked"
        elif "content-length" in headers:
            self._mode = "length"
            try:
                self._left = int(headers["content-length"])
            except ValueError:
                self._fail(UpstreamError("bad Content-Length"))
                self.abort()
                return False
        elif status in (204, 304) or 100 <= status < 200:
            self._mode, self._left = "length", 0
        else:
            self._mode, self._keep_alive = "close", False
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(UpstreamResponse(self, status, headers))
        return True

    def _chunked(self, data: bytes) -> None:
        """Decode chunked framing; whole chunks in one read (the usual case) cost one slice each."""
        if self._chunk_buf:
            data = self._chunk_buf + data
            self._chunk_buf = b""
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                self._deliver(data[pos:pos + take] if take < end or pos else data)
                self._left -= take
                pos += take
                if self._left:
                    return
                continue
            if self._trailer:
                # after the last chunk: optional trailer lines, then an empty line
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    self._chunk_buf = data[pos:]
                    return
                if line_end == pos:
                    self._message_complete()
                    return
                pos = line_end + 2
                continue
            # a chunk-size line; a chunk's data is followed by CRLF, consumed here as a leading CRLF
            if data.startswith(b"\r\n", pos):
                pos += 2
                continue
            if end - pos < 2 and data[pos:pos + 1] == b"\r":
                self._chunk_buf = data[pos:]
                return
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                if end - pos > 1024:
                    self._fail(UpstreamError("bad chunk size line"))
                    self.abort()
                    return
                self._chunk_buf = data[pos:]
                return
            try:
                size = int(data[pos:line_end].split(b";", 1)[0], 16)
            except ValueError:
                self._fail(UpstreamError("bad chunk size line"))
                self.abort()
                return
            pos = line_end + 2
            if size == 0:
                self._trailer = True
            else:
                self._left = size

    def _deliver(self, piece: bytes) -> None:
        if self._sink is not None:
            self._sink.feed(piece)
        else:
            self._pending.append(piece)

    def _message_complete(self) -> None:
        self._complete = True
        sink = self._sink
        if sink is not None:
            sink.finish(None)
        if self._released:
            self._recycle()

    def _fail(self, error: Exception, eof: bool = False) -> None:
        if self._error is not None or self._complete:
            return
        if self._mode == "close" and eof and self._head is None:
            self._message_complete()  # a close-delimited body ends at EOF
            return
        self._error = error
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        elif self._sink is not None:
            self._sink.finish(error)

    # ------------------------------------------------------------ used by the pool and responses

    async def send(self, request: bytes) -> UpstreamResponse:
        if self.transport is None or self.transport.is_closing():  # closed by the worker since it opened
            raise UpstreamError("connection closed by the worker before the request was sent")
        self._head_waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self._head_waiter

    def attach(self, sink: BodySink) -> None:
        self._sink = sink
        pending, self._pending = self._pending, []
        for piece in pending:
            sink.feed(piece)
        if self._complete:
            sink.finish(None)
        elif self._error is not None:
            sink.finish(self._error)

    def pause_reading(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._reading_paused:
            self.last_read = time.monotonic()  # the pause was the client's, not the worker's silence
            self._reading_paused = False
            self.transport.resume_reading()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.resume_reading()
        if self._complete:
            self._recycle()
        elif self._error is not None:
            self.abort()
        else:
            self._sink = _DISCARD  # typically just the chunked terminator after ``data: [DONE]``
            self._pending = []

    def _recycle(self) -> None:
        if self._keep_alive and self.transport is not None and not self.transport.is_closing():
            self._reset()
            self.pool._put(self)
        else:
            self.abort()

    def give_up(self, reason: str) -> None:
        """Fail its request with :class:`UpstreamAborted` (its caller may move it) and close."""
        self._fail(UpstreamAborted(reason))
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self.pool._forget(self)


class UpstreamPool:
    """Keep-alive connections per worker address, opened on demand and reused."""

    def __init__(self, connect_timeout: float = 5.0, idle_timeout: float = 30.0):
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout  # below servers' keep-alive timeouts (aiohttp: 75 s)
        self._idle: dict[str, list[_Connection]] = {}
        self._targets: dict[str, tuple[str, int, bytes]] = {}
        self._busy: dict[str, set[_Connection]] = {}  # connections carrying a request, per worker
        self._closed = False
        self._refusing: str | None = None  # why new requests fail at once (after abort_all)

    def _target(self, base_url: str) -> tuple[str, int, bytes]:
        target = self._targets.get(base_url)
        if target is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise UpstreamError(f"unsupported worker URL {base_url!r} (plain http://host:port only)")
            port = parts.port or 80
            target = self._targets[base_url] = (parts.hostname, port, f"Host: {parts.netloc}\r\n".encode("latin-1"))
        return target

    async def request(self, base_url: str, path: str, body: bytes, headers: dict[str, str] | None = None,
                      method: str = "POST", movable: bool = False, migratable: bool = False) -> UpstreamResponse:
        """Send one request; return once the status line and headers are in.

        Raises UpstreamError when the worker cannot be reached or closes before answering.
        ``movable``: :meth:`abort_stuck` may give up on it while the worker has not answered;
        ``migratable``: also once answered, if it falls silent (a stream that can continue elsewhere).
        """
        if self._refusing:
            raise UpstreamAborted(self._refusing)
        host, port, host_line = self._target(base_url)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) if headers else ""
        request = b"".join((f"{method} {path} HTTP/1.1\r\n".encode("latin-1"), host_line,
                            f"Content-Length: {len(body)}\r\n{extra}\r\n".encode("latin-1"), body))
        for attempt in range(_REUSE_RETRIES + 1):
            conn = await self._get(base_url, host, port)
            conn.movable, conn.migratable = movable, migratable
            self._busy.setdefault(base_url, set()).add(conn)
            try:
                return await conn.send(request)
            except UpstreamError as exc:
                conn.abort()
                # only a reused connection that produced nothing may have been closed while idle
                if isinstance(exc, UpstreamAborted) or not conn.reused or conn._got_bytes \
                        or attempt == _REUSE_RETRIES:
                    raise
            except BaseException:
                conn.abort()
                raise
        raise AssertionError("unreachable")

    async def _get(self, key: str, host: str, port: int) -> _Connection:
        if self._closed:
            raise UpstreamError("the connection pool is closed")
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing() \
                    and now - conn.idle_since < self.idle_timeout:
                conn.reused = True
                return conn
            conn.abort()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, key), host, port), self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc or 'timed out'}") from None
        return conn

    def _put(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        self._not_busy(conn)
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)

    def abort_stuck(self, base_url: str, reason: str, stalled_after: float) -> int:
        """Give up on the requests to ``base_url`` that are stuck: movable ones not answered at all
        (no status line yet), and migratable ones silent for ``stalled_after`` seconds (a frozen
        worker's streams; a working one sends tokens every few ms). Each fails with
        :class:`UpstreamAborted`, so its caller can move it (a stream continues from the text
        sent), and its connection closes. Requests still receiving, or paused by a slow client,
        are left to finish; requests that are not movable (unary: the answer comes whole at the
        end) are never touched. Returns how many."""
        aborted = 0
        silent_since = time.monotonic() - stalled_after
        for conn in list(self._busy.get(base_url, ())):
            if conn.movable and conn._error is None and not conn._complete and (conn._head is not None or (
                    conn.migratable and not conn._reading_paused and conn.last_read <= silent_since)):
                conn.give_up(reason)
                aborted += 1
        return aborted

    def abort_all(self, reason: str) -> int:
        """End every request in flight with :class:`UpstreamAborted`, and refuse any sent from now on
        (shutting down); returns how many were in flight."""
        self._refusing = reason
        conns = [conn for busy in self._busy.values() for conn in busy if conn._error is None and not conn._complete]
        for conn in conns:
            conn.give_up(reason)
        return len(conns)

    def busy(self, base_url: str) -> int:
        """Requests to ``base_url`` in flight."""
        return len(self._busy.get(base_url, ()))

    def _not_busy(self, conn: _Connection) -> None:
        busy = self._busy.get(conn.key)
        if busy:
            busy.discard(conn)

    def _forget(self, conn: _Connection) -> None:
        self._not_busy(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in list(conns):
                conn.abort()
        self._idle.clear()
