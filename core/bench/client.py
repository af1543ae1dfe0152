"""The request driver: one pooled aiohttp session, streaming SSE parsed as it arrives.

Timing is taken with ``time.perf_counter()`` when a read from the socket returns, so
several SSE events delivered in one TCP read share a timestamp: that is what the
client observed. A chunk counts as carrying tokens when it has text (content,
reasoning or completion text) or when the server's running ``usage`` says tokens
were generated. Every failure becomes an error type on the record; nothing raised by
one request stops the run.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec

from dynamo.core.errors import UsageError

__all__ = ["RequestRecord", "EndpointClient", "ServerInfo", "ServerNotReady", "ServerRefused", "EndpointNotHTTP",
           "normalize_base_url", "not_http", "make_session"]


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: Any = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None
    message: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


@dataclass
class RequestRecord:
    """Everything measured about one request. Times are seconds; offsets are from ``sent``."""

    index: int
    session: int = 0
    turn: int = 0
    scheduled: float | None = None  # when the load model wanted it sent (since the point's start)
    sent: float = 0.0  # when it was sent (since the point's start)
    ok: bool = False
    error: str | None = None
    error_detail: str | None = None
    status: int | None = None
    ttft: float | None = None
    e2el: float | None = None
    chunk_offsets: list[float] = field(default_factory=list)  # arrival of each token-carrying chunk
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each such chunk (see tokens_source)
    tokens_source: str = "chunks"  # usage | tokenizer | chunks: where chunk_tokens came from
    requested_output_tokens: int = 0
    input_tokens_client: int | None = None
    input_tokens_server: int | None = None
    output_tokens_client: int | None = None
    output_tokens_server: int | None = None
    finish_reason: str | None = None
    text: str = ""  # the generated text; dropped before records are written
    chunk_texts: list[str] | None = None  # kept only to recount chunk tokens with a tokenizer

    @property
    def output_tokens(self) -> int | None:
        """The output token count metrics use: the server's when it reported one."""
        if self.output_tokens_server is not None:
            return self.output_tokens_server
        return self.output_tokens_client

    @property
    def input_tokens(self) -> int | None:
        if self.input_tokens_server is not None:
            return self.input_tokens_server
        return self.input_tokens_client


def normalize_base_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/``, ``http://h:p/v1`` and ``h:p`` all become ``http://h:p/v1``.

    Raises :class:`UsageError` for anything that cannot be an HTTP endpoint (another scheme, no
    host, a port outside 1-65535, a bare word): such a URL would never become ready, so waiting
    for it would only hide the typo.
    """
    given = url
    url = url.strip()
    expected = "expected http://HOST:PORT or https://HOST[:PORT], with or without /v1"
    if not url or any(c.isspace() for c in url):
        raise UsageError(f"--url {given!r} is not a URL: {expected}")
    if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url):
        # HOST:PORT alone is a common shorthand; a bare word (a typo, a missing scheme) is not.
        if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^/:\[\]]+):[0-9]+(/.*)?", url):
            raise UsageError(f"--url {given}: not a URL: {expected}")
        url = "http://" + url
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise UsageError(f"--url {given}: the scheme must be http or https, not {parts.scheme or 'empty'}: {expected}")
    if not parts.hostname:
        raise UsageError(f"--url {given}: no host: {expected}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.netloc.endswith(":") or (port is not None and not 1 <= port <= 65535):
        text = parts.netloc.rsplit("]", 1)[-1].rpartition(":")[2]
        raise UsageError(f"--url {given}: the port must be a number from 1 to 65535, not {text or 'empty'}")
    for suffix in ("/chat/completions", "/completions"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    if not url.endswith("/v1"):
        url += "/v1"
    return url


def not_http(exc: BaseException) -> str | None:
    """Why an answer was not HTTP at all (a NATS port answers ``INFO {...}``), or None.

    aiohttp reports such an answer as a 400 "Bad status line" carrying the raw bytes; they mean
    nothing to a user, who needs to hear that the host and port are not an HTTP endpoint.
    """
    if not isinstance(exc, aiohttp.ClientResponseError):
        return None
    text = str(exc.message)
    if not text.startswith("Bad status line"):
        return None
    for greeting, what in (("INFO {", "a NATS server"), ("SSH-", "an SSH server")):
        if greeting in text:
            return f"it answers like {what}, not an HTTP server"
    if "\\x15\\x03" in text or "\\x16\\x03" in text:
        return "it answers with TLS: an https:// endpoint?"
    return "its answer is not an HTTP response"


def _nodelay_socket(addr_info) -> socket.socket:
    # aiohttp already sets TCP_NODELAY once connected; doing it at creation makes it explicit.
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    if family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def make_session(max_connections: int, timeout: float) -> aiohttp.ClientSession:
    """A keep-alive pool sized for the load (0 = unlimited), TCP_NODELAY on every socket."""
    kwargs: dict[str, Any] = dict(limit=max_connections, limit_per_host=0, keepalive_timeout=60,
                                  ttl_dns_cache=300, enable_cleanup_closed=False)
    try:
        connector = aiohttp.TCPConnector(socket_factory=_nodelay_socket, **kwargs)
    except TypeError:  # aiohttp < 3.12 has no socket_factory; it still sets TCP_NODELAY itself
        connector = aiohttp.TCPConnector(**kwargs)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(timeout, 30.0), sock_read=timeout),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


@dataclass
class ServerInfo:
    model: str
    continuous_usage: bool
    models: list[str]


class EndpointClient:
    """Sends one benchmark request and fills its :class:`RequestRecord`."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, model: str, endpoint: str = "chat",
                 stream: bool = True, ignore_eos: bool = True, continuous_usage: bool = True,
                 extra_body: dict | None = None, api_key: str | None = None):
        self.session = session
        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.endpoint = endpoint
        self.url = self.base_url + ("/chat/completions" if endpoint == "chat" else "/completions")
        self.stream = stream
        self.ignore_eos = ignore_eos
        self.continuous_usage = continuous_usage
        self.extra_body = extra_body or {}
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def payload(self, prompt: str | list[dict], max_tokens: int) -> bytes:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "stream": self.stream}
        if self.endpoint == "chat":
            body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.stream:
            opts = {"include_usage": True}
            if self.continuous_usage:
                opts["continuous_usage_stats"] = True
            body["stream_options"] = opts
        if self.ignore_eos:
            body["ignore_eos"] = True
            body["min_tokens"] = max_tokens
        body.update(self.extra_body)
        return msgspec.json.encode(body)

    async def send(self, rec: RequestRecord, prompt: str | list[dict], max_tokens: int, t_base: float) -> None:
        """Send one request; ``rec`` gets times relative to ``t_base`` (a perf_counter value)."""
        data = self.payload(prompt, max_tokens)
        rec.requested_output_tokens = max_tokens
        t0 = time.perf_counter()
        rec.sent = t0 - t_base
        try:
            async with self.session.post(self.url, data=data, headers=self.headers) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    body = await resp.read()
                    rec.error = f"http_{resp.status}"
                    rec.error_detail = body[:300].decode("utf-8", "replace")
                    rec.e2el = time.perf_counter() - t0
                    return
                if self.stream:
                    await self._read_stream(resp, rec, t0)
                else:
                    await self._read_whole(resp, rec, t0)
        except asyncio.CancelledError:
            rec.error = rec.error or "cancelled"
            raise
        except asyncio.TimeoutError:
            rec.error, rec.error_detail = "timeout", "no data for longer than --timeout"
        except aiohttp.ClientConnectorError as exc:
            rec.error, rec.error_detail = "connect_error", str(exc)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            rec.error, rec.error_detail = "disconnected", f"{type(exc).__name__}: {exc}"
        except aiohttp.ClientResponseError as exc:
            rec.error = "bad_response"
            reason = not_http(exc)
            rec.error_detail = f"the server does not speak HTTP: {reason}" if reason else f"{type(exc).__name__}: {exc}"
        except aiohttp.ClientError as exc:
            rec.error, rec.error_detail = "client_error", f"{type(exc).__name__}: {exc}"
        except OSError as exc:
            rec.error, rec.error_detail = "os_error", str(exc)
        except Exception as exc:  # noqa: BLE001 - one odd response must not end a long benchmark
            rec.error = "unexpected_" + type(exc).__name__
            rec.error_detail = f"{type(exc).__name__}: {exc}"
        if rec.error is None:
            rec.ok = True
        elif rec.e2el is None:
            rec.e2el = time.perf_counter() - t0

    async def _read_stream(self, resp: aiohttp.ClientResponse, rec: RequestRecord, t0: float) -> None:
        buf = b""
        done = False
        last_usage = 0
        saw_continuous = False
        texts: list[str] = []
        offsets = rec.chunk_offsets
        tokens = rec.chunk_tokens
        async for data in resp.content.iter_any():
            now = time.perf_counter() - t0
            buf += data
            if b"\n" not in data:
                continue
            lines = buf.split(b"\n")
            buf = lines.pop()
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # comments, event:, id:, blank separators
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                try:
                    chunk = _decode_chunk(payload)
                except msgspec.DecodeError as exc:
                    rec.error, rec.error_detail = "bad_response", f"undecodable SSE data: {exc}"
                    return
                if chunk.error is not None:
                    rec.error, rec.error_detail = "stream_error", str(chunk.error)[:300]
                    return
                text = ""
                for choice in chunk.choices:
                    d = choice.delta
                    if d is not None:
                        text += (d.content or "") + (d.reasoning_content or d.reasoning or "")
                        if d.tool_calls and not text:
                            text = " "
                    elif choice.text:
                        text += choice.text
                    if choice.finish_reason:
                        rec.finish_reason = choice.finish_reason
                n_new = 0
                u = chunk.usage
                if u is not None:
                    if u.prompt_tokens is not None:
                        rec.input_tokens_server = u.prompt_tokens
                    if u.completion_tokens is not None:
                        if chunk.choices:
                            saw_continuous = True
                        n_new = u.completion_tokens - last_usage
                        last_usage = u.completion_tokens
                        rec.output_tokens_server = u.completion_tokens
                if text or (n_new > 0 and chunk.choices):
                    if rec.ttft is None:
                        rec.ttft = now
                    offsets.append(now)
                    tokens.append(n_new)
                    if text:
                        texts.append(text)
        rec.e2el = time.perf_counter() - t0
        rec.text = "".join(texts)
        if buf.strip().startswith(b"data:") and buf.strip()[5:].strip() == b"[DONE]":
            done = True
        if not done and rec.finish_reason is None:
            rec.error, rec.error_detail = "incomplete_stream", "the stream ended without [DONE] or a finish_reason"
            return
        if not offsets:
            rec.error, rec.error_detail = "empty_output", "the stream carried no tokens"
            return
        if saw_continuous and sum(tokens) > 0:
            rec.tokens_source = "usage"
        else:
            rec.tokens_source = "chunks"
            tokens[:] = [1] * len(offsets)
            rec.chunk_texts = texts

    async def _read_whole(self, resp: aiohttp.ClientResponse, rec: RequestRecord, t0: float) -> None:
        body = await resp.read()
        rec.e2el = time.perf_counter() - t0
        try:
            obj = msgspec.json.decode(body, type=_Chunk)
        except msgspec.DecodeError as exc:
            rec.error, rec.error_detail = "bad_response", f"undecodable body: {exc}"
            return
        if obj.error is not None:
            rec.error, rec.error_detail = "stream_error", str(obj.error)[:300]
            return
        text = ""
        for choice in obj.choices:
            if choice.message is not None:
                text += (choice.message.content or "") + (choice.message.reasoning_content or "")
            elif choice.text:
                text += choice.text
            rec.finish_reason = choice.finish_reason or rec.finish_reason
        rec.text = text
        if obj.usage is not None:
            rec.input_tokens_server = obj.usage.prompt_tokens
            rec.output_tokens_server = obj.usage.completion_tokens
        if not text and not rec.output_tokens_server:
            rec.error, rec.error_detail = "empty_output", "the response carried no tokens"

    async def server_info(self, model: str | None, timeout: float) -> ServerInfo:
        """Wait until the server lists models and answers a one-token request.

        Also learns whether the server accepts ``stream_options.continuous_usage_stats``
        (vLLM-style per-chunk usage); if it refuses it, requests go without it.
        """
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        models: list[str] = []
        while True:
            try:
                async with self.session.get(self.base_url + "/models", headers=self.headers) as resp:
                    if resp.status == 200:
                        obj = await resp.json(content_type=None)
                        models = [m.get("id") for m in obj.get("data", []) if isinstance(m, dict) and m.get("id")]
                        if models or model:
                            break
                        last = "/v1/models lists no model"
                    elif resp.status in (401, 403):
                        body = (await resp.read())[:1000].decode("utf-8", "replace")
                        raise ServerRefused(self._refused("GET /v1/models", resp.status, body))
                    else:
                        last = f"/v1/models answered HTTP {resp.status}"
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
                reason = not_http(exc)
                if reason:  # it will not start speaking HTTP: the host or port is wrong
                    raise EndpointNotHTTP(f"{self.base_url} does not speak HTTP ({reason}): check its host and port")
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise ServerNotReady(f"{self.base_url} is not ready after {timeout:g}s ({last})")
            await asyncio.sleep(0.2)
        self.model = model or models[0]
        # One-token inference: proves the model actually serves, and probes per-chunk usage.
        while True:
            for continuous in ((True, False) if self.continuous_usage else (False,)):
                self.continuous_usage = continuous
                rec = RequestRecord(index=-1)
                await self.send(rec, "Hello", 1, time.perf_counter())
                if rec.ok:
                    return ServerInfo(self.model, continuous, models)
                last = f"{rec.error}: {rec.error_detail}"
                if rec.status not in (400, 422):
                    break
            if rec.status in (401, 403):
                raise ServerRefused(self._refused("a one-token request", rec.status, rec.error_detail or ""))
            if rec.status is not None and 400 <= rec.status < 500 and models and self.model not in models:
                reason = _error_message(rec.error_detail or "")
                raise ServerRefused(f"model {self.model!r} is not served at {self.base_url} (a one-token request "
                                    f"answered HTTP {rec.status}" + (f": {reason}" if reason else "") + "); "
                                    f"it serves {', '.join(models)}: choose one with --model, or leave --model out")
            if rec.status is not None and 400 <= rec.status < 500 and rec.status not in (408, 429):
                hint = (" (a server without vLLM extensions may need --no-ignore-eos)"
                        if rec.status in (400, 422) and self._refuses_ignore_eos(rec.error_detail or "") else "")
                raise ServerNotReady(f"a one-token test request to {self.url} failed: {last}{hint}")
            if time.monotonic() > deadline:
                raise ServerNotReady(f"{self.url} did not answer a one-token request within {timeout:g}s ({last})")
            await asyncio.sleep(0.2)

    def _refuses_ignore_eos(self, detail: str) -> bool:
        """Whether a 400/422 is about the ``ignore_eos``/``min_tokens`` fields bench added: they were
        sent and the error names one (servers that refuse unknown fields name the field)."""
        text = detail.lower()
        return self.ignore_eos and ("ignore_eos" in text or "min_tokens" in text)

    def _refused(self, what: str, status: int, body: str) -> str:
        """The message for a 401/403: no key sent, or the key sent is wrong."""
        reason = _error_message(body)
        said = f"{what} answered HTTP {status}" + (f": {reason}" if reason else "")
        if "Authorization" in self.headers:
            return (f"{self.base_url} refused the API key ({said}); "
                    "check --api-key (default $DYNAMO_API_KEY, else $OPENAI_API_KEY)")
        return (f"{self.base_url} requires an API key ({said}); "
                "pass it with --api-key KEY or set $DYNAMO_API_KEY")

    async def prompt_tokens(self, text: str) -> int | None:
        """The server's prompt token count for ``text`` (one-token request), None if it does not say."""
        rec = RequestRecord(index=-1)
        await self.send(rec, text, 1, time.perf_counter())
        return rec.input_tokens_server if rec.ok else None


def _error_message(body: str) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's start."""
    try:
        message = msgspec.json.decode(body.encode()).get("error", {}).get("message")
    except (msgspec.DecodeError, AttributeError):
        message = None
    return str(message) if message else body.strip()[:200]


class ServerNotReady(Exception):
    """The endpoint did not become ready (readiness check failed)."""


class ServerRefused(UsageError):
    """The endpoint answers but refuses what was asked (no or a wrong API key, a model it does not
    serve): waiting would not help, the command line must change (exit 2)."""


class EndpointNotHTTP(UsageError):
    """Something answers at the endpoint's host and port, but not in HTTP (a NATS port, say):
    the URL is wrong, so it is a usage error (exit 2) rather than a server to wait for."""
