"""The frontend's streaming relay against scripted workers: fragmentation, migration, slow and vanishing clients.

No NATS: the frontend's discovery view is a stub holding the scripted workers, so each test
controls exactly how the worker's bytes arrive.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from contextlib import asynccontextmanager

import aiohttp
from aiohttp.test_utils import TestServer

from dynamo.core.discovery import Instance
from dynamo.core.frontend import Frontend, parse_args
from dynamo.core.upstream import UpstreamPool

MODEL = "m"


def event(text: str, finish: str | None = None) -> bytes:
    chunk = {"id": "x", "object": "text_completion", "model": MODEL,
             "choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class ScriptedWorker:
    """Answers each POST with an SSE stream; ``script(body)`` returns (fragments, then_close)."""

    def __init__(self, script):
        self.script = script
        self.bodies: list[dict] = []
        self.closed = asyncio.Event()
        self.longest_drain = 0.0  # seconds the longest write waited for the frontend to take it
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                body = json.loads(await reader.readexactly(length))
                self.bodies.append(body)
                fragments, then_close = self.script(body)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                for fragment in fragments:
                    writer.write(fragment)
                    started = asyncio.get_running_loop().time()
                    await writer.drain()
                    self.longest_drain = max(self.longest_drain, asyncio.get_running_loop().time() - started)
                    await asyncio.sleep(0.001)
                if then_close:
                    writer.transport.abort()
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()
            writer.close()


def chat_event(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    chunk = {"id": "x", "object": "chat.completion.chunk", "model": MODEL,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        chunk["usage"] = usage
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"  # compact, as engines send


def http_chunks(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` as HTTP chunks of random sizes, then cut into random fragments across chunk boundaries."""
    framed, pos = [], 0
    while pos < len(data):
        size = rng.randint(1, 90)
        framed.append(b"%x\r\n%s\r\n" % (len(data[pos:pos + size]), data[pos:pos + size]))
        pos += size
    raw = b"".join(framed)
    cuts = sorted(rng.sample(range(1, len(raw)), 25))
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]


class Discovery:
    def __init__(self, urls: list[str]):
        self.instances = {f"w{i}": Instance(f"w{i}", {"url": url, "role": "agg", "name": f"w{i}"})
                          for i, url in enumerate(urls)}

    async def close(self) -> None:
        pass


@asynccontextmanager
async def running_frontend(urls: list[str], *args: str):
    """A frontend over the scripted workers at ``urls`` (frontend flags ``args``), closed on exit."""
    frontend = Frontend(parse_args(["--port", "0", "--nats-url", "nats://unused", "--namespace", "t", *args]))
    frontend.watcher = Discovery(urls)
    frontend.upstream = UpstreamPool()
    app = frontend.app()
    app.on_startup.clear()  # no NATS: the discovery stub above stands in
    server = TestServer(app)
    await server.start_server()
    try:
        yield frontend, server
    finally:
        await server.close()
        await frontend.upstream.close()


async def stream(url: str, body: dict, path: str = "/v1/completions") -> bytes:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, json=body) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream", await resp.text()
            return await resp.read()


async def stream_slowly(server: TestServer, body: dict, pause: float) -> bytes:
    """Read the response through a small receive buffer, stopping for ``pause`` after the first bytes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data))
    await reader.readuntil(b"\r\n\r\n")
    raw = await reader.read(100)
    await asyncio.sleep(pause)
    raw += await reader.read()
    writer.close()
    out, pos = b"", 0
    while True:  # undo the chunked framing
        line_end = raw.index(b"\r\n", pos)
        size = int(raw[pos:line_end], 16)
        if not size:
            return out
        out += raw[line_end + 2:line_end + 2 + size]
        pos = line_end + 4 + size


def test_events_split_anywhere_arrive_whole_and_are_counted():
    async def main() -> None:
        rng = random.Random(3)
        events = b"".join(event(f" t{i}") for i in range(40)) + event(" end", "length") + b"data: [DONE]\n\n"
        worker = ScriptedWorker(lambda body: (http_chunks(events, rng) + [b"0\r\n\r\n"], False))
        async with running_frontend([await worker.start()]) as (frontend, server):
            for _ in range(3):
                got = await stream(str(server.make_url("")), {"model": MODEL, "prompt": "p", "stream": True})
                assert got == events
            assert frontend.m_output.value == 3 * 41  # no usage event (this worker ignores the ask): the events sent
            assert sum(frontend.m_itl.counts) == 3 * 40 and sum(frontend.m_ttft.counts) == 3

    asyncio.run(main())


def test_a_stream_broken_midway_continues_on_another_worker_from_the_text_sent():
    async def main() -> None:
        rng = random.Random(5)
        first = b"".join(event(f" a{i}") for i in range(10))
        # the break falls inside the 11th event: the client must never see that half
        broken = http_chunks(first + event(" lost")[:30], rng)
        rest = event(" b0") + event(" b1", "length") + b"data: [DONE]\n\n"
        workers = [ScriptedWorker(lambda body: (broken, True)),
                   ScriptedWorker(lambda body: (http_chunks(rest, rng) + [b"0\r\n\r\n"], False))]
        async with running_frontend([await w.start() for w in workers]) as (frontend, server):
            body = {"model": MODEL, "prompt": "p", "stream": True, "max_tokens": 12}
            got = await stream(str(server.make_url("")), body)
            assert got == first + rest
            continued = workers[1].bodies[0]
            assert continued["prompt"] == "p" + "".join(f" a{i}" for i in range(10))
            assert continued["max_tokens"] == 2
            assert frontend.m_migrations.value == 1

    asyncio.run(main())


def test_a_migrated_chat_stream_has_one_role_chunk_and_counts_only_tokens():
    async def main() -> None:
        role = chat_event({"role": "assistant", "content": ""})
        first = b"".join(chat_event({"content": f" a{i}"}) for i in range(5))
        usage = {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42}
        rest = chat_event({"content": " b0"}) + chat_event({"content": " b1"}, "length", usage) + b"data: [DONE]\n\n"
        rng = random.Random(7)
        workers = [ScriptedWorker(lambda body: (http_chunks(role + first, rng), True)),
                   ScriptedWorker(lambda body: (http_chunks(role + rest, rng) + [b"0\r\n\r\n"], False))]
        async with running_frontend([await w.start() for w in workers]) as (frontend, server):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                    "max_tokens": 7, "stream_options": {"include_usage": True}}
            got = await stream(str(server.make_url("")), body, "/v1/chat/completions")
            events = [json.loads(e[6:]) for e in got.split(b"\n\n") if e.startswith(b"data: {")]
            assert sum("role" in e["choices"][0]["delta"] for e in events) == 1
            assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == " a0 a1 a2 a3 a4 b0 b1"
            continued = workers[1].bodies[0]
            assert continued["messages"][-1] == {"role": "assistant", "content": " a0 a1 a2 a3 a4"}
            assert continued["max_tokens"] == 2  # 7 asked, 5 tokens already sent (the role chunk is no token)
            assert events[-1]["usage"]["completion_tokens"] == 7

    asyncio.run(main())


def test_a_slow_client_gets_everything_and_a_vanished_client_stops_the_worker():
    async def main() -> None:
        big = event("x" * 60_000)
        many = [b"%x\r\n%s\r\n" % (len(big), big)] * 150
        done = b"data: [DONE]\n\n"
        worker = ScriptedWorker(lambda body: (many + [b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done)], False))
        async with running_frontend([await worker.start()]) as (frontend, server):
            url = str(server.make_url(""))
            got = await stream_slowly(server, {"model": MODEL, "prompt": "p", "stream": True}, pause=0.5)
            assert got == big * 150 + done
            # the worker's stream waited for the paused client instead of piling up in the frontend
            assert worker.longest_drain > 0.3

            endless = ScriptedWorker(lambda body: ([b"%x\r\n%s\r\n" % (len(big), big)] * 100_000, False))
            frontend.watcher = Discovery([await endless.start()])
            async with aiohttp.ClientSession() as session:
                async with session.post(url + "/v1/completions",
                                        json={"model": MODEL, "prompt": "p", "stream": True}) as resp:
                    await resp.content.readany()
            # the client is gone: the frontend closes the worker connection instead of draining it
            await asyncio.wait_for(endless.closed.wait(), 5)
            gone = frontend.m_requests.labels("/v1/completions", "stream", "499")
            for _ in range(100):
                if gone.value:
                    break
                await asyncio.sleep(0.01)
            assert gone.value == 1

    asyncio.run(main())


def usage_event(prompt: int, completion: int) -> bytes:
    chunk = {"id": "x", "object": "chat.completion.chunk", "model": MODEL, "choices": [],
             "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def test_stream_usage_is_counted_even_when_the_client_does_not_ask_for_it():
    async def main() -> None:
        def script(body: dict):  # a worker that honours stream_options as vLLM does
            events = b"".join(chat_event({"content": f" t{i}"}) for i in range(6))
            if (body.get("stream_options") or {}).get("include_usage"):
                events += usage_event(11, 6)
            return [b"%x\r\n%s\r\n0\r\n\r\n" % (len(events + b"data: [DONE]\n\n"), events + b"data: [DONE]\n\n")], False

        worker = ScriptedWorker(script)
        async with running_frontend([await worker.start()]) as (frontend, server):
            url = str(server.make_url(""))
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
            got = await stream(url, body, "/v1/chat/completions")
            assert b'"usage"' not in got and got.endswith(b"data: [DONE]\n\n")  # not asked for: not sent
            assert worker.bodies[0]["stream_options"] == {"include_usage": True}
            assert (frontend.m_input.value, frontend.m_output.value) == (11, 6)
            asked = await stream(url, {**body, "stream_options": {"include_usage": True}}, "/v1/chat/completions")
            assert asked == got[:-len(b"data: [DONE]\n\n")] + usage_event(11, 6) + b"data: [DONE]\n\n"
            assert (frontend.m_input.value, frontend.m_output.value) == (22, 12)

    asyncio.run(main())


def test_a_migrated_stream_with_per_chunk_usage_continues_from_the_text_sent():
    async def main() -> None:
        def with_usage(delta: dict, prompt: int, done: int, finish: str | None = None) -> bytes:
            return chat_event(delta, finish, {"prompt_tokens": prompt, "completion_tokens": done,
                                              "total_tokens": prompt + done})

        role = with_usage({"role": "assistant", "content": ""}, 12, 0)
        first = b"".join(with_usage({"content": f" a{i}"}, 12, i + 1) for i in range(5))
        # the continuation's prompt holds the 5 tokens sent: the worker counts 17 prompt tokens
        rest = (with_usage({"role": "assistant", "content": ""}, 17, 0) + with_usage({"content": " b0"}, 17, 1)
                + with_usage({"content": " b1"}, 17, 2, "length") + usage_event(17, 2) + b"data: [DONE]\n\n")
        rng = random.Random(11)
        workers = [ScriptedWorker(lambda body: (http_chunks(role + first, rng), True)),
                   ScriptedWorker(lambda body: (http_chunks(rest, rng) + [b"0\r\n\r\n"], False))]
        async with running_frontend([await w.start() for w in workers]) as (frontend, server):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 7,
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
            got = await stream(str(server.make_url("")), body, "/v1/chat/completions")
            events = [json.loads(e[6:]) for e in got.split(b"\n\n") if e.startswith(b"data: {")]
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
            assert text == " a0 a1 a2 a3 a4 b0 b1"
            assert workers[1].bodies[0]["messages"][-1] == {"role": "assistant", "content": " a0 a1 a2 a3 a4"}
            assert workers[1].bodies[0]["max_tokens"] == 2
            # every chunk's usage is the client's whole request: prompt 12, tokens so far
            assert [e["usage"]["completion_tokens"] for e in events][-3:] == [6, 7, 7]
            assert {e["usage"]["prompt_tokens"] for e in events} == {12}
            assert (frontend.m_input.value, frontend.m_output.value) == (12, 7)  # once per request

    asyncio.run(main())


def test_api_key_guards_every_v1_route_and_rejections_are_counted():
    async def main() -> None:
        done = event(" t", "length") + b"data: [DONE]\n\n"
        worker = ScriptedWorker(lambda body: ([b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done)], False))
        async with running_frontend([await worker.start()], "--api-key", "k3y", "--model", MODEL) as (frontend, server):
            url = str(server.make_url(""))
            body = {"model": MODEL, "prompt": "p", "stream": True}
            async with aiohttp.ClientSession() as session:
                for path in ("/v1/models",):
                    async with session.get(url + path) as resp:
                        assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
                        assert resp.headers["x-request-id"]
                key = {"Authorization": "Bearer k3y"}
                async with session.get(url + "/v1/models", headers=key) as resp:
                    assert resp.status == 200
                async with session.post(url + "/v1/completions", json=body) as resp:
                    assert resp.status == 401
                async with session.post(url + "/v1/completions", json={**body, "model": "other"}, headers=key) as resp:
                    assert resp.status == 404
                async with session.post(url + "/v1/completions", json=body, headers=key) as resp:
                    assert resp.status == 200 and await resp.read() == done
                async with session.get(url + "/v1/completions", headers=key) as resp:
                    assert resp.status == 405 and resp.headers["Allow"] == "POST"
                    assert (await resp.json())["error"]["code"] == 405
            counted = {(kind, status): frontend.m_requests.labels("/v1/completions", kind, status).value
                       for kind, status in (("unknown", "401"), ("stream", "404"), ("stream", "200"))}
            assert list(counted.values()) == [1, 1, 1]  # the body of a refused request is never read
            assert len(worker.bodies) == 1  # only the authorised, valid request reached the worker

    asyncio.run(main())


class SilentWorker:
    """Takes requests and never answers, as a frozen process does."""

    def __init__(self):
        self.got = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            self.got.set()
            await reader.read()  # until the frontend gives up on us
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


def test_a_prefill_worker_leaving_rotation_unanswered_is_given_up_and_decode_computes_the_prompt():
    async def main() -> None:
        done = event(" t", "length") + b"data: [DONE]\n\n"
        decode = ScriptedWorker(lambda body: ([b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done)], False))
        frozen = SilentWorker()
        async with running_frontend([await decode.start()], "--disagg-protocol", "vllm") as (frontend, server):
            frontend.watcher.instances["p0"] = Instance("p0", {"url": await frozen.start(), "role": "prefill",
                                                               "name": "p0", "pid": 1})
            frontend._workers_changed()
            reply = asyncio.ensure_future(stream(str(server.make_url("")), {"model": MODEL, "prompt": "p", "stream": True}))
            await asyncio.wait_for(frozen.got.wait(), 5)
            del frontend.watcher.instances["p0"]  # its health probe failed: out of rotation
            frontend._workers_changed()
            assert await asyncio.wait_for(reply, 5) == done
            assert "kv_transfer_params" not in decode.bodies[0]  # decode computed the prompt itself
            assert frontend.m_disagg.labels("prefill_failed").value == 1

    asyncio.run(main())


def test_a_broken_stream_waits_for_its_restarted_worker_and_counts_only_real_migrations():
    async def main() -> None:
        rng = random.Random(13)
        first = b"".join(event(f" a{i}") for i in range(3))
        rest = event(" b0", "length") + b"data: [DONE]\n\n"
        crashing = ScriptedWorker(lambda body: (http_chunks(first, rng), True))
        restarted = ScriptedWorker(lambda body: (http_chunks(rest, rng) + [b"0\r\n\r\n"], False))
        async with running_frontend([await crashing.start()]) as (frontend, server):
            url = str(server.make_url(""))
            frontend.watcher.instances["w0"].data["pid"] = 1
            frontend._workers_changed()
            body = {"model": MODEL, "prompt": "p", "stream": True, "max_tokens": 4}
            reply = asyncio.ensure_future(stream(url, body))
            await asyncio.wait_for(crashing.closed.wait(), 5)
            await asyncio.sleep(0.2)
            # the supervisor restarted it: same name, new process
            frontend.watcher.instances["w0"] = Instance("w0", {"url": await restarted.start(), "role": "agg",
                                                               "name": "w0", "pid": 2})
            frontend._workers_changed()
            assert await asyncio.wait_for(reply, 5) == first + rest
            assert restarted.bodies[0]["prompt"] == "p a0 a1 a2"
            assert frontend.m_migrations.value == 1

            # nothing comes back: an error event ends the stream, and no migration is counted
            gone = ScriptedWorker(lambda body: (http_chunks(first, rng), True))
            frontend.watcher.instances["w0"] = Instance("w0", {"url": await gone.start(), "role": "agg",
                                                               "name": "w0", "pid": 3})
            frontend._workers_changed()
            ended = await stream(url, body)
            assert b'"error"' in ended and ended.startswith(first)
            assert frontend.m_migrations.value == 1

    asyncio.run(main())


# ----------------------------------------------------------------------------- streams opened before their first event

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class RawWorker:
    """Answers each POST with ``script(writer)``, an async function writing raw HTTP."""

    def __init__(self, script):
        self.script = script
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                await self.script(writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@asynccontextmanager
async def raw_workers(*scripts):
    """One RawWorker per script; yields their URLs and closes their servers on exit."""
    workers = [RawWorker(script) for script in scripts]
    try:
        yield [await worker.start() for worker in workers]
    finally:
        for worker in workers:
            if worker.server is not None:
                worker.server.close()


async def accept_then_die(writer: asyncio.StreamWriter) -> None:
    writer.write(SSE_HEAD)  # the client's stream opens now
    await writer.drain()
    await asyncio.sleep(0.3)  # its prefill
    writer.transport.abort()


async def refuse_with_400(writer: asyncio.StreamWriter) -> None:
    body = json.dumps({"error": {"message": "This model's maximum context length is 4096 tokens",
                                 "type": "BadRequestError", "param": "messages", "code": 400}}).encode()
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    await writer.drain()


async def answer(writer: asyncio.StreamWriter) -> None:
    done = event(" ok", "length") + b"data: [DONE]\n\n"
    writer.write(SSE_HEAD)
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
    await writer.drain()


async def raw_post(server: TestServer, version: bytes = b"1.1", extra: bytes = b"Connection: close\r\n",
                   timeout: float = 10) -> tuple[bytes, bytes]:
    """A streamed completion over a raw socket: the response head and everything after it."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    data = json.dumps({"model": MODEL, "prompt": "p", "stream": True}).encode()
    writer.write(b"POST /v1/completions HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n%s\r\n%s" % (version, len(data), extra, data))
    head = await reader.readuntil(b"\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    return head, rest


def first_error(body: bytes) -> dict:
    return json.loads(body.split(b"data: ", 1)[1].split(b"\n\n", 1)[0])["error"]


def test_a_retry_into_an_open_stream_refused_with_a_400_gives_the_client_the_workers_error():
    # A accepts (the client's headers go out) and dies before its first event; B refuses the retry
    async def main() -> None:
        async with raw_workers(accept_then_die, refuse_with_400) as urls, running_frontend(urls) as (frontend, server):
            head, rest = await raw_post(server)
            assert head.startswith(b"HTTP/1.1 200")
            error = first_error(rest)
            assert (error["code"], error["type"], error["param"]) == (400, "BadRequestError", "messages"), error
            assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the last chunk
            assert frontend.m_errors.labels("upstream_400").value == 1
            assert {key[2] for key in frontend.m_requests._children} == {"400"}

    asyncio.run(main())


def test_an_open_stream_that_finds_no_worker_ends_with_a_503_event_counted_as_a_503():
    async def main() -> None:
        async with raw_workers(accept_then_die) as urls, running_frontend(urls) as (frontend, server):
            head, rest = await raw_post(server)  # the retry waits 3 s for a worker to join
            assert head.startswith(b"HTTP/1.1 200")
            error = first_error(rest)
            assert (error["code"], error["type"]) == (503, "service_unavailable"), error
            assert "1 worker tried, none answered" in error["message"]
            assert {key[2] for key in frontend.m_requests._children} == {"503"}
            assert frontend.m_errors.labels("service_unavailable").value == 1
            assert frontend.m_errors.labels("stream_interrupted").value == 0

    asyncio.run(main())


def test_an_http_1_0_client_asking_for_keep_alive_gets_the_end_of_its_stream():
    # HTTP/1.0 has no chunked encoding: the stream must end with the connection
    async def main() -> None:
        async with raw_workers(answer) as urls, running_frontend(urls) as (frontend, server):
            head, rest = await raw_post(server, b"1.0", b"Connection: keep-alive\r\n", timeout=5)
            assert head.startswith(b"HTTP/1.0 200") and rest.endswith(b"data: [DONE]\n\n"), (head, rest)

    asyncio.run(main())


def test_workers_answering_a_request_with_500_are_tried_twice_then_their_error_is_a_502():
    # A request that makes every worker fail (an engine bug it triggers) must not go round every
    # worker, nor wait for more to join: one retry elsewhere, then the worker's own message.
    posts = []

    async def internal_error(writer: asyncio.StreamWriter) -> None:
        posts.append(1)
        body = json.dumps({"error": {"message": "internal error in the engine", "type": "InternalServerError",
                                     "param": None, "code": 500}}).encode()
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    async def main() -> None:
        async with raw_workers(internal_error, internal_error, internal_error) as urls, \
                running_frontend(urls) as (frontend, server):
            head, rest = await raw_post(server)
            assert head.startswith(b"HTTP/1.1 502"), head
            error = json.loads(rest)["error"]
            assert error["type"] == "upstream_error" and error["code"] == 502
            assert error["message"] == ("2 workers failed this request (the last answered 500: "
                                        "internal error in the engine)"), error
            assert len(posts) == 2
            assert not frontend.suspect  # they answered: a request's failure does not take them out of rotation

    asyncio.run(main())


def test_a_stream_broken_midway_after_an_earlier_500_is_a_migration_not_a_refusal():
    # A answers 500; B streams, then dies: that is B failing mid-stream, not workers refusing the request
    calls = []

    async def first_500_then_stream_and_die(writer: asyncio.StreamWriter) -> None:
        calls.append(1)
        if len(calls) == 1:
            body = b'{"error": {"message": "internal error", "type": "InternalServerError", "code": 500}}'
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            return
        events = event(" a") + event(" b")
        writer.write(SSE_HEAD + b"%x\r\n%s\r\n" % (len(events), events))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()

    async def main() -> None:
        async with raw_workers(first_500_then_stream_and_die, first_500_then_stream_and_die) as urls, \
                running_frontend(urls) as (frontend, server):
            head, rest = await raw_post(server)  # the migration waits 3 s for a worker to join
            assert head.startswith(b"HTTP/1.1 200")
            assert b'" a"' in rest and b'" b"' in rest
            error = first_error(rest.split(b'" b"', 1)[1])
            assert "no worker left to continue the stream" in error["message"], error

    asyncio.run(main())
