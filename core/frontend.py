"""The frontend: one OpenAI-compatible endpoint in front of the workers found in discovery.

Per request: validate (OpenAI-style 4xx errors), pick a worker (locally for round_robin,
random and least_loaded; by asking the KV router over NATS for ``kv``, falling back to
round-robin when it does not answer in time), orchestrate prefill → decode when prefill
workers exist (vLLM's ``kv_transfer_params`` protocol), and stream the answer through
over pooled keep-alive connections. A request that fails before its first token is
retried on another worker; a stream that breaks midway is migrated to another worker,
continuing from the text generated so far, up to ``--migration-limit`` times.

Run as ``python -m dynamo.core.frontend --port 8000 --nats-url nats://127.0.0.1:4222 --namespace NAME``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import random
import re
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import msgspec
from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestPayloadError

from dynamo.core.disagg import PROTOCOLS, EarlyFinish, strip_foreign
from dynamo.core.discovery import DEFAULT_TTL, DiscoveryWatcher, Instance, connect
from dynamo.core.hashing import chain_block_hashes
from dynamo.core.metrics import Counter, Gauge, Histogram, MetricSet
from dynamo.core.nats_server import NATS_URL_ENV
from dynamo.core.routing import DEFAULT_OVERLAP_WEIGHT
from dynamo.core.upstream import UpstreamError, UpstreamPool, UpstreamResponse
from dynamo.core.text import quantity

SUSPECT_SECONDS = 2.0
STALLED_SECONDS = 2.0  # a stream silent this long on a worker that left rotation moves to another one
MOVE_STUCK_FOR = 30.0  # how long after a worker left rotation its stuck requests are still looked for
REPLACEMENT_WAIT = 3.0  # how long a request finding no worker (or whose every worker failed) waits for one to (re)join
ANSWERED_TRIES = 2  # workers that answer a request with a 500 (or 501...): one retry elsewhere, then their error
_GONE = (502, 503, 504)  # a worker (or a proxy in front of it) that cannot serve now: not about this request
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding", "date", "server"}
_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# markers of the SSE events that need a closer look; any other event is a plain content chunk
_SPECIAL_EVENTS = (b"data: [DONE]", b'data: {"error"', b'"usage":{')
_WRITE_HIGH_WATER = 256 * 1024  # client-side buffer above which the worker stream is paused
_SHUTTING_DOWN = "the server is shutting down"
_STARTED = web.RequestKey("stream_started", bool) if hasattr(web, "RequestKey") else "dynamo_stream_started"
log = logging.getLogger("dynamo.frontend")
# The router's key for a request: unique per request however clients set x-request-id (two requests
# under one id must not share load accounting), and across the frontend replicas of one router.
_ROUTE_PREFIX = os.urandom(4).hex()
_route_seq = itertools.count()


def _route_id() -> str:
    return f"{_ROUTE_PREFIX}-{next(_route_seq)}"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.retry_after = retry_after  # seconds, for a 503 that should soon pass
        self.request_id: str | None = None
        self.close = False  # end the connection after the answer (what is left of the request is unreadable)

    def response(self, request_id: str | None = None) -> web.Response:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}
        headers = {"x-request-id": request_id} if request_id else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        response = web.Response(body=_json_encode(body), status=self.status, content_type="application/json",
                                headers=headers)
        if self.close:
            response.force_close()
        return response


_REQUEST_ID = re.compile(r"[\x20-\x7e]{1,256}")


def _request_id(request: web.Request) -> str:
    """The client's x-request-id when it is 1-256 printable ASCII characters (it is echoed in headers
    and sent to workers), else a fresh one: an odd id is no reason to refuse the request."""
    given = request.headers.get("x-request-id")
    return given if given is not None and _REQUEST_ID.fullmatch(given) else os.urandom(16).hex()


class UpstreamFailed(Exception):
    """A worker failed before any event reached the client: safe to retry elsewhere.

    ``response``: the client's event stream, if its headers were already sent; the retry
    writes into it."""

    def __init__(self, message: str, response: web.StreamResponse | None = None,
                 answer: tuple[int, bytes] | None = None):
        super().__init__(message)
        self.response = response
        self.answer = answer  # the worker's own 5xx (status, body): it is alive, and it refused this request


# --------------------------------------------------------------------------- validation


_MAX_TOKEN_ID = 2**32  # block hashes pack token ids as u32


def _token_ids(value: object) -> bool:
    """A non-empty array of token ids (engines judge the vocabulary; the router hashes them as u32)."""
    return isinstance(value, list) and bool(value) and all(
        type(t) is int and 0 <= t < _MAX_TOKEN_ID for t in value)


def _valid_prompt(prompt: object) -> bool:
    """What OpenAI's completions API takes: text, token ids, or an array of either."""
    if isinstance(prompt, str) or _token_ids(prompt):
        return True
    return isinstance(prompt, list) and bool(prompt) and (
        all(isinstance(p, str) for p in prompt) or all(_token_ids(p) for p in prompt))


def single_prompt(prompt: object) -> str | list[int] | None:
    """The one prompt of a completions request (a one-element array unwrapped); None for a batch."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and type(prompt[0]) is int):
        return prompt
    return None


def validate(body: object, field_name: str, served_model: str | None) -> dict:
    """Check what the gateway must know is right; engines validate the rest."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if field_name not in body:
        raise ApiError(400, f"'{field_name}' is required", param=field_name)
    if field_name == "messages":
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty array", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ApiError(400, f"'messages[{i}]' must be an object with a 'role'", param="messages")
    elif not _valid_prompt(body["prompt"]):
        raise ApiError(400, "'prompt' must be a string, an array of token ids (each 0 <= id < 2^32), or a "
                            "non-empty array of either", param="prompt")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if served_model and model is not None and model != served_model:
        raise ApiError(404, f"the model {model!r} does not exist; this endpoint serves {served_model!r}",
                       "not_found_error", param="model", code="model_not_found")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    for key, least in (("max_tokens", 1), ("max_completion_tokens", 1), ("min_tokens", 0), ("n", 1)):
        value = body.get(key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if value is not None and (type(value) is not int or value < least):
            raise ApiError(400, f"'{key}' must be an integer of at least {least}", param=key)
    return body


# --------------------------------------------------------------------------- worker choice


def _ask_usage(attempt: Attempt) -> None:
    """A stream's usage is asked of the worker even when the client did not ask for it, so that
    the token metrics and a migrated stream's usage are exact; the client is not sent it."""
    options = attempt.body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") not in (None, False):
        return  # asked for by the client already, or malformed (the worker answers that)
    options = {k: v for k, v in options.items() if k != "continuous_usage_stats"}  # off without include_usage
    attempt.body = {**attempt.body, "stream_options": {**options, "include_usage": True}}
    attempt.raw = _json_encode(attempt.body)
    attempt.hide_usage = True


def _is_role_only(choice: dict) -> bool:
    """A chat stream's opening chunk: the assistant's role, no content, no finish: no token."""
    delta = choice.get("delta")
    return isinstance(delta, dict) and "role" in delta and not delta.get("content") and not choice.get("finish_reason")


def _incarnation(worker: Instance) -> tuple:
    """A worker process, not its slot: a replacement under the same name starts with a clean record."""
    return worker.key, worker.data.get("pid")


class WorkerPicker:
    """Local routing modes: round_robin, random, least_loaded (by in-flight requests)."""

    def __init__(self, mode: str, rng: random.Random | None = None):
        self.mode = mode
        self.rng = rng or random.Random()
        self.counter = itertools.count()
        self.in_flight: dict[str, int] = defaultdict(int)

    def pick(self, workers: list[Instance]) -> Instance | None:
        if not workers:
            return None
        if self.mode == "random":
            return self.rng.choice(workers)
        if self.mode == "least_loaded":
            least = min(self.in_flight[w.key] for w in workers)
            tied = [w for w in workers if self.in_flight[w.key] == least]
            return tied[next(self.counter) % len(tied)]
        return workers[next(self.counter) % len(workers)]


@dataclass
class Attempt:
    """One request's journey: what has been sent to the client, for metrics and migration."""

    request_id: str
    path: str
    body: dict
    raw: bytes = b""
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    chunks: int = 0
    events: list[bytes] = field(default_factory=list)  # content events sent, as received; parsed only to migrate
    usage: dict | None = None
    finished: bool = False
    replied: bool = False  # an event reached the client: from then on a failure is a migration, not a retry
    status: int | None = None  # the status an opened stream's only event (an error) stands for, in the metrics
    tried: set[tuple] = field(default_factory=set)  # worker incarnations: a restarted worker may be tried again
    fell_back: bool = False  # routed without the router's decision (counted once per request)
    hashes: list[int] | None = None
    prompt_tokens: int | None = None
    migrated: bool = False
    continued_from: int = 0  # tokens generated before the last continuation was sent (its prompt holds them)
    hide_usage: bool = False  # usage asked of the worker for the metrics, not wanted by the client
    drop_role: bool = False  # a continuation's opening role chunk: the client has had one already
    background: asyncio.Future | None = None  # a concurrent prefill request (SGLang)
    answers: list[tuple[int, bytes]] = field(default_factory=list)  # workers' 5xx answers to this request
    route_id: str = field(default_factory=_route_id)  # the router's key for it (request_id is the client's)

    def generated(self) -> tuple[str, int]:
        """The text sent so far and how many tokens it holds (a chat stream's opening chunk, which
        carries only the assistant's role, is no token)."""
        pieces = []
        tokens = 0
        for blob in self.events:
            for event in blob.split(b"\n\n"):
                if not event.startswith(b"data:"):
                    continue
                try:
                    choice = _json_decode(event[5:])["choices"][0]
                except (msgspec.DecodeError, KeyError, IndexError, TypeError):
                    continue
                if _is_role_only(choice):
                    continue
                piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                pieces.append(piece or "")
                tokens += 1
        return "".join(pieces), tokens


class _EventStreamResponse(web.StreamResponse):
    """A StreamResponse whose headers leave with the first events, in one write (as web.Response
    does) instead of in a write of their own, unless ``headers_now``."""

    def __init__(self, *, headers_now: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self._send_headers_immediately = headers_now

    async def prepare(self, request: web.BaseRequest):
        request[_STARTED] = True  # from now on an error cannot be a response of its own
        if request.version < HttpVersion11:
            self.force_close()  # HTTP/1.0 has no chunks: the stream ends when the connection does
        return await super().prepare(request)


class StreamRelay:
    """Forwards one worker's SSE stream to the client: whole events only, each read accounted.

    It is the worker response's body sink, fed straight from the connection's protocol
    callback. Until the client response is ready, whole events are held; after ``go_direct``
    each read is written to the client's transport at once, as one HTTP chunk, with no task
    switch in between. The events that finish a stream are held again, so that the last
    write carries the chunked terminator too.
    """

    def __init__(self, frontend: Frontend, attempt: Attempt, upstream: UpstreamResponse):
        self.frontend = frontend
        self.attempt = attempt
        self.upstream = upstream
        self.partial = b""  # an event not yet complete
        self.held: list[bytes] = []
        self.ended = False  # the worker's stream is over: finished, complete or broken
        self.error: Exception | None = None
        self.client_gone = False
        self._transport: asyncio.Transport | None = None
        self._chunked = True
        self._waiter: asyncio.Future | None = None
        self._paused = False

    # --------------------------------------------------------------- body sink

    def feed(self, data: bytes) -> None:
        if self.ended:
            return
        if self.partial:
            data = self.partial + data
        cut = data.rfind(b"\n\n") + 2
        if cut == 1:
            self.partial = data
            return
        if cut < len(data):
            self.partial, data = data[cut:], data[:cut]
        else:
            self.partial = b""
        out = self.frontend._account(self.attempt, data)
        if not out and not self.attempt.finished:
            return  # nothing to forward (an empty HTTP chunk would end the client's response)
        if self.attempt.finished or self._transport is None:
            self.held.append(out)
            if self.attempt.finished:
                self.ended = True
            self._wake()
        else:
            self._write(out)

    def finish(self, error: Exception | None) -> None:
        if not self.ended:
            self.ended, self.error = True, error
            self._wake()

    # --------------------------------------------------------------- used by the request handler

    async def wait(self) -> None:
        """Until events are held or the stream is over."""
        if self.held or self.ended:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        held, self.held = self.held, []
        return b"".join(held)

    def go_direct(self, transport: asyncio.Transport | None, chunked: bool) -> None:
        """Write every further read to ``transport`` as it arrives."""
        self._transport, self._chunked = transport, chunked
        if transport is None:
            self.client_gone = self.ended = True
        elif self.held:
            self._write(self.take())

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport.is_closing():
            self.client_gone = self.ended = True
            self._wake()
            return
        transport.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
        self.attempt.replied = True
        if not self._paused and transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
            self._paused = True
            self.upstream.pause_reading()
            asyncio.ensure_future(self._resume_when_drained(transport))

    async def _resume_when_drained(self, transport: asyncio.Transport) -> None:
        # a slow client: the worker's stream waits (TCP backpressure) instead of piling up here
        while not self.ended and not transport.is_closing() \
                and transport.get_write_buffer_size() > _WRITE_HIGH_WATER // 4:
            await asyncio.sleep(0.005)
        self._paused = False
        self.upstream.resume_reading()


class Frontend:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.nats_url = args.nats_url
        self.namespace = args.namespace
        self.model = args.model
        self.picker = WorkerPicker(args.router_mode if args.router_mode != "kv" else "round_robin")
        self.protocol = PROTOCOLS[args.disagg_protocol]()
        self.kv_routing = args.router_mode == "kv"
        self.watcher: DiscoveryWatcher | None = None
        self.router_client = None  # set in start() for router mode kv (core/router_client.py)
        self.nc = None
        self.upstream: UpstreamPool | None = None
        self.draining = False  # shutting down: new requests are refused, those in flight go on
        self.closing: str | None = None  # ... until the drain ends: why the rest end now, not tried again
        self.tokenizer = None
        self.exact_tokenizer = args.model_path is not None  # the workers' own tokenizer: exact prompt counts
        self.suspect: dict[tuple, float] = {}  # worker incarnation -> until when it is avoided
        self.known: dict[str, tuple] = {}  # worker key -> (url, pid) as last seen in discovery
        self._discovery_changed: asyncio.Future | None = None  # resolved at the next discovery change
        self.movers: dict[str, asyncio.Future] = {}  # worker key -> task moving its stuck requests
        self.prefill_seen = False  # a prefill worker has been in discovery: disaggregated serving
        metrics = self.metrics_set = MetricSet()
        self.m_requests = metrics.add(Counter("dynamo_frontend_requests",
                                              "Requests by endpoint, type (stream, unary; unknown if refused before "
                                              "the body was read) and status",
                                              ["endpoint", "request_type", "status"]))
        self.m_inflight = metrics.add(Gauge("dynamo_frontend_inflight_requests", "Requests in flight"))
        self.m_ttft = metrics.add(Histogram("dynamo_frontend_time_to_first_token_seconds",
                                            "Time to first token of streamed requests",
                                            _LATENCY_BUCKETS))
        self.m_itl = metrics.add(Histogram("dynamo_frontend_inter_token_latency_seconds", "Gap between streamed chunks",
                                           _LATENCY_BUCKETS))
        self.m_duration = metrics.add(Histogram("dynamo_frontend_request_duration_seconds", "Request duration",
                                                _LATENCY_BUCKETS))
        self.m_input = metrics.add(Counter("dynamo_frontend_input_sequence_tokens", "Prompt tokens"))
        self.m_output = metrics.add(Counter("dynamo_frontend_output_sequence_tokens", "Generated tokens"))
        self.m_errors = metrics.add(Counter("dynamo_frontend_errors", "Errors by type", ["type"]))
        self.m_retries = metrics.add(Counter("dynamo_frontend_retries",
                                             "Requests retried on another worker before their first token"))
        self.m_migrations = metrics.add(Counter("dynamo_frontend_migrations", "Streams moved to another worker midway"))
        self.m_fallbacks = metrics.add(Counter("dynamo_frontend_router_fallbacks",
                                               "Requests routed without the KV router's decision (no answer in "
                                               "time, router down, or it could not decide): round-robin used"))
        self.m_disagg = metrics.add(Counter("dynamo_frontend_disaggregated_requests",
                                            "Requests by prefill path: remote, local (short uncached prompt), "
                                            "prefill_failed, no_prefill_worker", ["path"]))

    # --------------------------------------------------------------- lifecycle

    async def start(self, app: web.Application) -> None:
        self.nc = await connect(self.nats_url, "dynamo-frontend", timeout=10.0)
        self.watcher = DiscoveryWatcher(self.nc, self.namespace, self.args.discovery_ttl,
                                        on_change=self._workers_changed)
        await self.watcher.start()
        self.upstream = UpstreamPool(connect_timeout=5.0)
        if self.args.router_mode == "kv":
            from dynamo.core.router_client import EmbeddedRouter, NatsRouterClient

            if self.args.router_embedded:
                embedded = EmbeddedRouter(self.nc, self.namespace, self.watcher, self.args.block_size,
                                          self.args.overlap_weight, self.args.temperature, not self.args.no_kv_events,
                                          self.args.approx_ttl, self.args.step_tokens)
                await embedded.start()
                self.router_client = embedded
            else:
                self.router_client = NatsRouterClient(self.nc, self.namespace)
        if self.kv_routing or self.args.disagg_threshold or (
                (self.args.migration_limit or self.args.max_model_len) and self.exact_tokenizer):
            from dynamo.core.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(None if self.args.model_path in (None, "builtin") else self.args.model_path)

    async def stop(self, app: web.Application) -> None:
        for mover in list(self.movers.values()):
            mover.cancel()
        if self.router_client is not None:
            await self.router_client.close()
        if self.watcher:
            await self.watcher.close()
        if self.upstream:
            await self.upstream.close()
        if self.nc:
            try:
                await self.nc.close()
            except Exception:
                pass

    def app(self) -> web.Application:
        app = web.Application(client_max_size=int(self.args.max_body_mb * 2**20), middlewares=[self._errors])
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/live", self.live)
        app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            response = await handler(request)
            if not response.prepared and "x-request-id" not in response.headers:  # /v1/models, /health...
                response.headers["x-request-id"] = _request_id(request)
            return response
        except ApiError as exc:
            self.m_errors.labels(exc.kind).inc()
            return exc.response(exc.request_id or _request_id(request))
        except web.HTTPException as exc:
            if exc.status >= 400:
                kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
                response = ApiError(exc.status, exc.reason or "error", kind).response(
                    _request_id(request))
                if "Allow" in exc.headers:  # 405: which methods the route takes
                    response.headers["Allow"] = exc.headers["Allow"]
                return response
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:  # a bug: still an OpenAI-style error the client can read, and counted
            log.exception("frontend: %s %s failed", request.method, request.path)
            self.m_errors.labels("internal_error").inc()
            if request.get(_STARTED):
                raise  # the stream has begun: aiohttp closes the connection, the client sees it cut
            return ApiError(500, "the frontend failed on this request (its log has the traceback)",
                            "internal_error").response(_request_id(request))

    async def drain(self, timeout: float) -> None:
        """Shutting down (the listening socket is closed already): new requests get 503; those in
        flight have ``timeout`` seconds to finish, then each ends with an OpenAI-style error (a
        stream with an error event) instead of being cut when the supervisor's SIGKILL comes."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.m_inflight.value > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.closing = _SHUTTING_DOWN
        if self.m_inflight.value > 0 and self.upstream is not None:
            self.upstream.abort_all(self.closing)  # and it refuses any request sent from now on
            deadline = loop.time() + 0.5
            while self.m_inflight.value > 0 and loop.time() < deadline:
                await asyncio.sleep(0.02)

    # --------------------------------------------------------------- discovery views

    def pool(self, roles: tuple[str, ...]) -> list[Instance]:
        if self.watcher is None:
            return []
        ready = [i for i in self.watcher.instances.values() if i.role in roles]
        if self.suspect:
            now = time.monotonic()
            self.suspect = {key: until for key, until in self.suspect.items() if until > now}
            ready = [i for i in ready if _incarnation(i) not in self.suspect] or ready
        ready.sort(key=_instance_key)
        return ready

    def _workers_changed(self) -> None:
        """Discovery changed. A worker that left rotation (failing health, gone, replaced) may hold
        requests a frozen process would keep forever: streams and prefills it has not answered at
        all, and streams silent for ``STALLED_SECONDS``, move to another worker now (a stream
        continues from the text already sent; nothing the client saw is lost). Streams still
        flowing are left to finish; unary requests, whose answer comes whole at the end, wait for
        the worker or its end."""
        if self._discovery_changed is not None and not self._discovery_changed.done():
            self._discovery_changed.set_result(None)
        current = {i.key: (i.url, i.data.get("pid")) for i in self.watcher.instances.values()}
        left = [(key, url) for key, (url, pid) in self.known.items() if current.get(key) != (url, pid)]
        self.known = current
        if self.upstream is not None:
            for key, url in left:
                previous = self.movers.pop(key, None)
                if previous is not None:
                    previous.cancel()
                self.movers[key] = mover = asyncio.ensure_future(self._move_stuck(key, url))
                mover.add_done_callback(lambda task, key=key: self.movers.pop(key, None)
                                        if self.movers.get(key) is task else None)

    async def _move_stuck(self, key: str, url: str) -> None:
        """While worker ``key`` is out of rotation, its stuck requests move, checked twice a second:
        a stream may fall silent only after its worker left (a freeze is noticed within a probe)."""
        for _ in range(int(MOVE_STUCK_FOR / 0.5)):
            if self.closing:
                return  # shutting down: workers leave as the run stops; the drain ends what is left
            self.upstream.abort_stuck(url, f"worker {key} left rotation", STALLED_SECONDS)
            if not self.upstream.busy(url):
                return
            await asyncio.sleep(0.5)
            if self.known.get(key, (None,))[0] == url:
                return  # back in rotation (healthy again, or replaced: the old connections died with it)

    def serving_workers(self) -> list[Instance]:
        return self.pool(("agg", "decode"))

    # --------------------------------------------------------------- simple routes

    async def health(self, request: web.Request) -> web.Response:
        workers = sorted(self.watcher.instances.values(), key=lambda i: i.key) if self.watcher else []
        now = time.monotonic()
        serving = [w for w in workers if w.role in ("agg", "decode")]
        body = {
            "status": "healthy" if serving else "unhealthy",
            "workers": [{"name": w.data.get("name"), "url": w.url, "role": w.role, "node": w.data.get("node"),
                         "status": "suspect" if self.suspect.get(_incarnation(w), 0) > now else "ready"} for w in workers],
        }
        if not serving:
            body["message"] = "no worker can serve yet"
        return web.json_response(body, status=200 if serving else 503)

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics_set.render(), content_type="text/plain", charset="utf-8")

    async def models(self, request: web.Request) -> web.Response:
        self._check_key(request)
        names = sorted({w.data.get("model") for w in self.serving_workers() if w.data.get("model")})
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "dynamo"} for n in names]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/chat/completions", "messages")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/completions", "prompt")

    # --------------------------------------------------------------- generation

    async def _generate(self, request: web.Request, path: str, field_name: str) -> web.StreamResponse:
        request_id = _request_id(request)
        started = time.perf_counter()
        attempt: Attempt | None = None
        kind, status = "unknown", "500"  # the request type is known once the body is read
        self.m_inflight.inc()
        try:
            if self.draining:
                raise ApiError(503, _SHUTTING_DOWN, "service_unavailable", retry_after=1)
            self._check_key(request)
            too_large = ApiError(413, f"request body is larger than {self.args.max_body_mb:g} MiB "
                                      f"(frontend.max_body_mb)")
            if (request.content_length or 0) > request.client_max_size:  # said up front: no need to wait for it
                too_large.close = True  # the body that may follow is not read
                raise too_large
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise too_large from None
            except RequestPayloadError:  # e.g. a Content-Encoding: gzip body that is not gzip
                request.content.feed_eof()  # or aiohttp reads on after the answer, fails again, resets the connection
                error = ApiError(400, "request body could not be read: it does not decode as its "
                                      f"Content-Encoding ({request.headers.get('Content-Encoding', 'none')}) says")
                error.close = True
                raise error from None
            try:
                body = _json_decode(raw)
            except (msgspec.DecodeError, RecursionError) as exc:
                raise ApiError(400, f"request body is not valid JSON: {exc}") from None
            if isinstance(body, dict):
                kind = "stream" if body.get("stream") is True else "unary"
            validate(body, field_name, self.model)
            attempt = Attempt(request_id, path, body, raw, started=started)
            if kind == "stream":
                _ask_usage(attempt)
            response = await self._serve(request, attempt)
            status = str(attempt.status or response.status)
            return response
        except ApiError as exc:
            status = str(exc.status)
            exc.request_id = request_id
            raise
        except asyncio.CancelledError:
            status = "499"  # the client went away
            raise
        finally:
            self.m_inflight.dec()
            self.m_requests.labels(path, kind, status).inc()
            self.m_duration.observe(time.perf_counter() - started)
            if attempt is not None:
                usage = attempt.usage or self._usage_so_far(attempt)
                self.m_input.inc(usage.get("prompt_tokens") or 0)
                self.m_output.inc(usage.get("completion_tokens") or 0)
                if self.kv_routing:
                    await self._router_event("finished", attempt)

    def _usage_so_far(self, attempt: Attempt) -> dict:
        """What a stream that ended without its usage (client gone, worker failed) cost: the tokens
        sent (a chat stream's opening role chunk is none) and, when the frontend tokenized it,
        the prompt."""
        role_chunk = attempt.path.endswith("chat/completions") and not attempt.migrated and attempt.chunks > 0
        prompt = attempt.prompt_tokens if self.exact_tokenizer else None
        return {"prompt_tokens": prompt or 0, "completion_tokens": attempt.chunks - role_chunk}

    def _check_key(self, request: web.Request) -> None:
        if self.args.api_key and request.headers.get("Authorization") != f"Bearer {self.args.api_key}":
            raise ApiError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")

    async def _serve(self, request: web.Request, attempt: Attempt) -> web.StreamResponse:
        try:
            prefill_fields = await self._maybe_prefill(attempt)
        except EarlyFinish as done:
            return await self._early_finish(request, attempt, done)
        try:
            return await self._decode(request, attempt, prefill_fields)
        finally:
            if attempt.background is not None and not attempt.background.done():
                attempt.background.cancel()

    async def _early_finish(self, request: web.Request, attempt: Attempt, done: EarlyFinish) -> web.StreamResponse:
        """The prefill worker's answer is the whole answer: sent as it is, or as a short stream."""
        answer = done.response
        if isinstance(answer.get("usage"), dict):
            attempt.usage = answer["usage"]
        headers = {"x-request-id": attempt.request_id}
        if not attempt.body.get("stream"):
            return web.Response(body=_json_encode(answer), content_type="application/json", headers=headers)
        events = b"".join(b"data: " + _json_encode(chunk) + b"\n\n" for chunk in done.stream_chunks(not attempt.hide_usage))
        self.m_ttft.observe(time.perf_counter() - attempt.started)
        response = _EventStreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
        await response.prepare(request)
        await response.write_eof(events + b"data: [DONE]\n\n")
        return response

    async def _decode(self, request: web.Request, attempt: Attempt, prefill_fields: dict | None) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        migrations = 0
        again: Counter | None = None  # what the next attempt is: a retry or a migration
        while True:
            if self.closing and again is not None:  # admitted before the stop, failed since: not tried again
                if response is None:
                    raise ApiError(503, self.closing, "service_unavailable", retry_after=1)
                await self._stream_error(attempt, response, self.closing, "service_unavailable", 503)
                return response
            refused = bool(attempt.answers) and not attempt.replied  # a stream moving on is another story
            worker = None if refused and len(attempt.answers) >= ANSWERED_TRIES \
                else await self._choose(attempt, ("agg", "decode"))
            if worker is None and refused:
                return await self._worker_refused(attempt, response)
            if worker is None:
                worker = await self._replacement(attempt)  # e.g. a failed worker, restarted
            if worker is None:
                if attempt.replied:
                    await self._stream_error(attempt, response, "no worker left to continue the stream")
                    return response
                waited = f"none joined within {REPLACEMENT_WAIT:g} s"
                message = (f"{quantity(len(attempt.tried), 'worker')} tried, none answered; {waited}" if attempt.tried
                           else f"no worker is ready; {waited}")
                if response is not None:  # the stream's headers are out: the error is its only event
                    await self._stream_error(attempt, response, message, "service_unavailable", 503)
                    return response
                raise ApiError(503, message, "service_unavailable", retry_after=1)
            if again is not None:
                again.inc()
            attempt.tried.add(_incarnation(worker))
            body = self._body_for(attempt, prefill_fields if not attempt.replied else None)
            self.picker.in_flight[worker.key] += 1
            try:
                migratable = bool(attempt.body.get("stream")) and migrations < self.args.migration_limit \
                    and self._can_continue(attempt)
                result = await self._relay(request, attempt, worker, body, response, migratable)
            except UpstreamFailed as failed:
                if failed.answer is None or failed.answer[0] in _GONE:  # gone, or cannot serve now
                    self.suspect[_incarnation(worker)] = time.monotonic() + SUSPECT_SECONDS
                else:  # alive, and failed this request: maybe the request, not the worker
                    attempt.answers.append(failed.answer)
                response = failed.response or response
                again = self.m_migrations if attempt.replied else self.m_retries  # a continuation moves on
                continue
            finally:
                self.picker.in_flight[worker.key] -= 1
            if isinstance(result, web.StreamResponse) and attempt.finished:
                return result
            # the stream broke midway
            response = result
            if self.closing:
                again = self.m_migrations
                continue  # ended above with the reason, not moved
            self.suspect[_incarnation(worker)] = time.monotonic() + SUSPECT_SECONDS
            if migrations >= self.args.migration_limit or not self._can_continue(attempt):
                await self._stream_error(attempt, response, f"worker {worker.data.get('name')} failed mid-stream")
                return response
            migrations += 1
            attempt.migrated = True
            again = self.m_migrations

    async def _worker_refused(self, attempt: Attempt, response: web.StreamResponse | None) -> web.StreamResponse:
        """Workers answered this request with a 500 (a 5xx other than 502-504): no more tries, and no
        waiting for other workers to join; the client gets the last worker's message as a 502."""
        status, data = attempt.answers[-1]
        message = (f"{quantity(len(attempt.answers), 'worker')} failed this request "
                   f"(the last answered {status}: {_error_message(data)})")
        if response is not None:
            await self._stream_error(attempt, response, message, "upstream_error", 502)
            return response
        raise ApiError(502, message, "upstream_error")

    async def _replacement(self, attempt: Attempt) -> Instance | None:
        """No worker is left to try: wait a little for one to (re)join, as a restarted worker does."""
        deadline = time.monotonic() + REPLACEMENT_WAIT
        while not self.closing and (left := deadline - time.monotonic()) > 0:
            if self._discovery_changed is None or self._discovery_changed.done():
                self._discovery_changed = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._discovery_changed), left)
            except asyncio.TimeoutError:
                return None
            worker = await self._choose(attempt, ("agg", "decode"))
            if worker is not None:
                return worker
        return None

    def _body_for(self, attempt: Attempt, prefill_fields: dict | None) -> bytes:
        """The bytes to send: the client's own body when nothing changes (no re-encoding)."""
        if not (attempt.chunks and not attempt.finished) and not prefill_fields:
            return attempt.raw
        body = attempt.body
        if attempt.chunks and not attempt.finished:
            body = self._continuation(attempt)
        if prefill_fields:
            body = strip_foreign(body, prefill_fields)
        return _json_encode(body)

    def _can_continue(self, attempt: Attempt) -> bool:
        return attempt.path.endswith("chat/completions") or isinstance(single_prompt(attempt.body.get("prompt")), str)

    def _continuation(self, attempt: Attempt) -> dict:
        """The original request, continued from what the client already received."""
        body = dict(attempt.body)
        if self.exact_tokenizer and self.tokenizer is not None:
            self._hashes(attempt)  # the prompt's own token count, for the usage the client gets in the end
        generated, attempt.chunks = attempt.generated()
        if attempt.path.endswith("chat/completions"):
            body["messages"] = [*body["messages"], {"role": "assistant", "content": generated}]
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
            attempt.drop_role = True
        else:
            body["prompt"] = single_prompt(body["prompt"]) + generated
        attempt.continued_from = attempt.chunks
        for key, least in (("max_tokens", 1), ("max_completion_tokens", 1), ("min_tokens", 0)):
            value = body.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                body[key] = max(int(value) - attempt.chunks, least)
        return body

    # --------------------------------------------------------------- routing

    def _hashes(self, attempt: Attempt) -> list[int]:
        if attempt.hashes is None:
            ids: list[int] = []
            if self.tokenizer is not None:
                try:
                    if attempt.path.endswith("chat/completions"):
                        ids = self.tokenizer.apply_chat_template(attempt.body["messages"])
                    else:
                        prompt = single_prompt(attempt.body["prompt"])
                        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt or []
                except Exception:
                    ids = []  # the engine reports template problems itself
            attempt.prompt_tokens = len(ids) if ids else None
            attempt.hashes = chain_block_hashes(ids, self.args.block_size) if ids else []
        return attempt.hashes

    async def _choose(self, attempt: Attempt, roles: tuple[str, ...]) -> Instance | None:
        workers = [w for w in self.pool(roles) if _incarnation(w) not in attempt.tried]
        if not workers:
            return None
        if self.args.router_mode == "kv" and not attempt.tried:
            decision = await self._ask_router(attempt, "agg")
            if decision is not None:
                chosen = next((w for w in workers if w.key == decision.get("worker")), None)
                if chosen is not None:
                    return chosen
        return self.picker.pick(workers)

    async def _ask_router(self, attempt: Attempt, pool: str, account: bool = True) -> dict | None:
        decision = None
        if self.router_client is not None:
            decision = await self.router_client.route(attempt.route_id, self._hashes(attempt), pool, account,
                                                      self.args.router_timeout)
        if decision is None and not attempt.fell_back:  # no answer in time, no router, or it could not decide
            attempt.fell_back = True
            self.m_fallbacks.inc()
        return decision

    async def _router_event(self, event: str, attempt: Attempt) -> None:
        if self.router_client is not None:
            await self.router_client.event(event, attempt.route_id)

    # --------------------------------------------------------------- disaggregation

    def _check_length(self, attempt: Attempt) -> None:
        """Refuse a request that cannot fit the context before a prefill worker computes (and holds)
        its KV for a decode worker that would refuse it; the message is vLLM's."""
        if not (self.args.max_model_len and self.exact_tokenizer and self.tokenizer is not None):
            return
        self._hashes(attempt)
        prompt = attempt.prompt_tokens
        wanted = int(attempt.body.get("max_completion_tokens") or attempt.body.get("max_tokens") or 0)
        if not wanted and not attempt.path.endswith("chat/completions"):
            wanted = 16  # vLLM's default for completions (chat's is what the context leaves)
        if prompt is not None and (prompt + wanted > self.args.max_model_len or prompt >= self.args.max_model_len):
            raise ApiError(400, f"This model's maximum context length is {self.args.max_model_len} tokens. However, "
                                f"you requested {prompt + wanted} tokens ({prompt} in the messages, {wanted} in the "
                                "completion). Please reduce the length of the messages or completion.",
                           param="max_tokens" if wanted else "messages")

    async def _maybe_prefill(self, attempt: Attempt) -> dict | None:
        """Run the prefill step of the backend's protocol; return the fields the decode request needs.

        None means aggregated serving: no prefill workers, a short uncached prompt (below
        ``--disagg-threshold``), or every prefill worker failed (decode then computes the prompt).
        """
        prefill_workers = self.pool(("prefill",))
        if not prefill_workers:
            if self.prefill_seen:  # disaggregated serving, but no prefill worker is there right now
                self.m_disagg.labels("no_prefill_worker").inc()
            return None
        self.prefill_seen = True
        self._check_length(attempt)
        if self.args.disagg_threshold:
            hashes = self._hashes(attempt)
            overlap = 0
            if self.args.router_mode == "kv" and hashes:
                decision = await self._ask_router(attempt, "decode", account=False)
                overlap = (decision or {}).get("overlap", 0)
            if (attempt.prompt_tokens or 0) - overlap * self.args.block_size < self.args.disagg_threshold:
                self.m_disagg.labels("local").inc()
                return None
        tried: set[tuple] = set()
        while True:
            candidates = [w for w in prefill_workers if _incarnation(w) not in tried]
            if not candidates:
                self.m_disagg.labels("prefill_failed").inc()
                return None
            worker = probe = None
            if self.args.router_mode == "kv" and not tried:
                probe = Attempt(attempt.request_id, attempt.path, attempt.body, hashes=self._hashes(attempt),
                                fell_back=attempt.fell_back, route_id=attempt.route_id + "-prefill")
                decision = await self._ask_router(probe, "prefill")
                attempt.fell_back |= probe.fell_back
                if decision:
                    worker = next((w for w in candidates if w.key == decision.get("worker")), None)
                else:  # the router may still count it when it gets to the question: released either way
                    asyncio.ensure_future(self._router_event("finished", probe))
                    probe = None
            worker = worker or self.picker.pick(candidates)
            tried.add(_incarnation(worker))
            prefill_body = self.protocol.prefill_body(attempt.body, worker.data, attempt.request_id)
            if self.protocol.concurrent:  # SGLang: prefill and decode meet over the bootstrap; not movable
                attempt.background = asyncio.ensure_future(self._post_prefill(worker, attempt, prefill_body, probe,
                                                                              movable=False))
                attempt.background.add_done_callback(_ignore_outcome)
                self.m_disagg.labels("remote").inc()
                return self.protocol.decode_fields(attempt.body, None, prefill_body, attempt.path)
            try:
                answer = await self._post_prefill(worker, attempt, prefill_body, probe)
            except (UpstreamError, asyncio.TimeoutError, msgspec.DecodeError):
                self.suspect[_incarnation(worker)] = time.monotonic() + SUSPECT_SECONDS
                continue
            if answer is None:
                continue
            self.m_disagg.labels("remote").inc()
            return self.protocol.decode_fields(attempt.body, answer, prefill_body, attempt.path)

    async def _post_prefill(self, worker: Instance, attempt: Attempt, body: dict,
                            routed: Attempt | None = None, movable: bool = True) -> dict | None:
        """POST the prefill request; None on a worker error (5xx), ApiError on a client error (4xx).

        ``movable``: if the worker leaves rotation before answering (frozen, failing health), it
        fails at once and another prefill worker, or the decode worker, computes the prompt.
        ``routed``: the KV router's accounting of this prefill, released when it is over.
        """
        try:
            resp = await self.upstream.request(worker.url, attempt.path, _json_encode(body), {
                "x-request-id": attempt.request_id, "Content-Type": "application/json"}, movable=movable)
            data = await resp.read()
        finally:
            if routed is not None:
                asyncio.ensure_future(self._router_event("finished", routed))
        if resp.status >= 500:
            return None
        if resp.status >= 400:
            raise ApiError(resp.status, _error_message(data))
        return _json_decode(data) if data else {}

    # --------------------------------------------------------------- proxying

    async def _relay(self, request: web.Request, attempt: Attempt, worker: Instance, body: bytes,
                     response: web.StreamResponse | None, migratable: bool = False) -> web.StreamResponse:
        """Send to one worker. Raises UpstreamFailed when nothing reached the client yet; returns the
        client response otherwise (``attempt.finished`` says whether the stream completed).
        ``migratable``: the stream could continue elsewhere if this worker stalls."""
        try:
            upstream = await self.upstream.request(worker.url, attempt.path, body, {
                "x-request-id": attempt.request_id, "Content-Type": "application/json"},
                movable=bool(attempt.body.get("stream")), migratable=migratable)
        except UpstreamError as exc:
            raise UpstreamFailed(str(exc)) from None
        try:
            if upstream.status >= 500 and not attempt.replied:
                try:
                    data = await upstream.read()
                except UpstreamError as exc:
                    raise UpstreamFailed(str(exc)) from None
                raise UpstreamFailed(f"status {upstream.status}", answer=(upstream.status, data))
            if not upstream.content_type.startswith("text/event-stream"):
                try:
                    data = await upstream.read()
                except UpstreamError as exc:
                    raise UpstreamFailed(str(exc)) from None
                if response is not None:  # a retry or continuation answered with an error; the stream is open
                    if attempt.replied:
                        await self._stream_error(attempt, response, _error_message(data))
                    else:  # the worker's own error, as the client would have had it without the open stream
                        await self._stream_error(attempt, response, _error_message(data), code=upstream.status,
                                                 error=_error_object(data), label=f"upstream_{upstream.status}")
                    attempt.finished = True
                    return response
                self._count_unary(attempt, data, upstream.status)
                attempt.finished = True
                out = {k: v for k, v in upstream.headers.items() if k not in _HOP_HEADERS}
                out["x-request-id"] = attempt.request_id
                return web.Response(body=data, status=upstream.status, headers=out)
            return await self._pipe_stream(request, attempt, upstream, response)
        finally:
            upstream.close()  # a no-op once released; otherwise the worker sees us go and stops

    async def _pipe_stream(self, request: web.Request, attempt: Attempt, upstream: UpstreamResponse,
                           response: web.StreamResponse | None) -> web.StreamResponse:
        relay = StreamRelay(self, attempt, upstream)
        upstream.stream(relay)
        opened = None
        if response is None:
            if relay.ended and not relay.held:
                raise UpstreamFailed(f"stream ended before its first event: {relay.error or 'no event'}")
            # Events that came with the worker's headers (an engine that takes no time) leave with
            # the client's headers, in one write. Otherwise the first event is a prefill away: the
            # headers go now, off that path, and every event leaves straight from the connection's
            # callback as it is read, with no task switch.
            opened = response = _EventStreamResponse(status=upstream.status, headers_now=not relay.held, headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "x-request-id": attempt.request_id})
            if request.version >= HttpVersion11:
                response.enable_chunked_encoding()
            await response.prepare(request)
        if not relay.ended:
            first = relay.take()
            if first:
                await response.write(first)  # with the headers, if they are still held
                attempt.replied = True
            relay.go_direct(request.transport, response.chunked)
            while not relay.ended:
                await relay.wait()
        if relay.client_gone:  # not the worker's fault: end the request as aiohttp does on a disconnect
            raise asyncio.CancelledError
        if attempt.finished:
            upstream.release()
            await response.write_eof(relay.take())
        elif relay.held:  # events of a stream that broke before it was relayed directly
            await response.write(relay.take())
            attempt.replied = True
        elif not attempt.replied:  # it broke before its first event: another worker can start afresh
            raise UpstreamFailed(f"stream ended before its first event: {relay.error or 'no event'}", opened)
        return response

    def _account(self, attempt: Attempt, events: bytes) -> bytes:
        """Account whole SSE events received together; return the bytes to forward.

        The hot path neither parses JSON nor splits events: content chunks are counted (an event
        is a ``data:`` line after a blank line) and kept as received, to be parsed only if the
        stream must migrate. Only from the first [DONE], error or usage event on is a read
        looked at event by event.
        """
        if attempt.drop_role:
            events = self._drop_role_chunk(attempt, events)
        special = -1
        for marker in _SPECIAL_EVENTS:
            at = events.find(marker)
            if at >= 0 and (special < 0 or at < special):
                special = at
        if special < 0:
            return self._count_content(attempt, events)
        cut = events.rfind(b"\n\n", 0, special)
        start = cut + 2 if cut >= 0 else 0  # the special event's own start
        head = self._count_content(attempt, events[:start]) if start else b""
        return head + b"".join([self._observe(attempt, event) for event in events[start:].split(b"\n\n") if event])

    @staticmethod
    def _drop_role_chunk(attempt: Attempt, events: bytes) -> bytes:
        """Remove a continuation's opening role-only chunk (looked at once, in its first read)."""
        attempt.drop_role = False
        end = events.find(b"\n\n") + 2
        try:
            role_only = _is_role_only(_json_decode(events[5:end - 2])["choices"][0])
        except (msgspec.DecodeError, KeyError, IndexError, TypeError, AttributeError):
            return events
        return events[end:] if role_only else events

    def _count_content(self, attempt: Attempt, events: bytes) -> bytes:
        count = events.count(b"\n\ndata:") + events.startswith(b"data:")
        if not count:
            return events
        now = time.perf_counter()
        if attempt.first_token_at is None:
            attempt.first_token_at = now
            self.m_ttft.observe(now - attempt.started)
            if self.kv_routing:
                asyncio.ensure_future(self._router_event("first_token", attempt))
        else:
            self.m_itl.observe(now - attempt.last_token_at)
        if count > 1:
            self.m_itl.observe_zeros(count - 1)  # chunks that arrived together
        attempt.last_token_at = now
        attempt.chunks += count
        if self.args.migration_limit:
            attempt.events.append(events)
        return events

    def _observe(self, attempt: Attempt, event: bytes) -> bytes:
        """Account one SSE event and return the bytes to forward (the slow path of ``_account``)."""
        if not event.startswith(b"data:"):
            return event + b"\n\n"
        if event.startswith(b"data: [DONE]"):
            attempt.finished = True
            return event + b"\n\n"
        if event.startswith(b'data: {"error"'):
            attempt.finished = True
            return event + b"\n\n"
        if b'"usage":{' in event:
            return self._usage_event(attempt, event)
        return self._count_content(attempt, event + b"\n\n")

    def _usage_event(self, attempt: Attempt, event: bytes) -> bytes:
        """An event carrying usage: the last one (``include_usage``) or every one (``continuous_usage_stats``)."""
        try:
            data = _json_decode(event[5:])
        except msgspec.DecodeError:
            return event + b"\n\n"
        usage = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(usage, dict):
            return event + b"\n\n"
        choices = data.get("choices")
        if choices:
            self._count_content(attempt, event + b"\n\n")  # a content chunk that carries usage too
        if attempt.migrated:
            # the client's view of the whole request, not the last worker's continuation (whose prompt
            # holds the text generated before it)
            prompt = (attempt.prompt_tokens if self.exact_tokenizer and attempt.prompt_tokens
                      else max((usage.get("prompt_tokens") or 0) - attempt.continued_from, 0))
            usage = {"prompt_tokens": prompt, "completion_tokens": attempt.chunks, "total_tokens": prompt + attempt.chunks}
            data["usage"] = usage
            event = b"data: " + _json_encode(data)
        attempt.usage = usage
        if attempt.hide_usage:
            if not choices:
                return b""  # the usage chunk the frontend asked for itself
            del data["usage"]
            event = b"data: " + _json_encode(data)
        return event + b"\n\n"

    def _count_unary(self, attempt: Attempt, data: bytes, status: int) -> None:
        if status != 200:
            self.m_errors.labels("upstream_" + str(status)).inc()
            return
        try:
            usage = _json_decode(data).get("usage")
        except (msgspec.DecodeError, AttributeError):
            return
        if isinstance(usage, dict):
            attempt.usage = usage

    async def _stream_error(self, attempt: Attempt, response: web.StreamResponse, message: str,
                            kind: str = "upstream_error", code: int = 502, error: dict | None = None,
                            label: str | None = None) -> None:
        """End an open stream with an OpenAI-style error event (``error``, or one made of ``message``,
        ``kind`` and ``code``) and [DONE]. When no event reached the client before it, the error
        stands for the response the client would otherwise have had: the metrics count its status
        and ``label`` (``kind`` by default), not an interrupted stream."""
        if attempt.replied:
            self.m_errors.labels("stream_interrupted").inc()
        else:
            attempt.status = code
            self.m_errors.labels(label or kind).inc()
        error = error or {"error": {"message": message, "type": kind, "param": None, "code": code}}
        try:
            await response.write(b"data: " + _json_encode(error) + b"\n\ndata: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass


def _ignore_outcome(future: asyncio.Future) -> None:
    """A background request's result or failure is not needed (its failure shows in its partner's)."""
    if not future.cancelled():
        future.exception()


def _instance_key(instance: Instance) -> str:
    return instance.key


def _error_object(data: bytes) -> dict | None:
    """A worker's OpenAI-style error body as it is (``{"error": {...}}``), or None."""
    try:
        body = _json_decode(data)
    except msgspec.DecodeError:
        return None
    return body if isinstance(body, dict) and isinstance(body.get("error"), dict) else None


def _error_message(data: bytes) -> str:
    try:
        return _json_decode(data)["error"]["message"]
    except (msgspec.DecodeError, KeyError, TypeError):
        return data.decode(errors="replace")[:200] or "upstream error"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dynamo.core.frontend", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--nats-url", default=os.environ.get(NATS_URL_ENV), required=not os.environ.get(NATS_URL_ENV),
                        help=f"NATS server URL (default: ${NATS_URL_ENV}, which keeps a token off the command line)")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--model", default=None, help="The served model name; other names get 404.")
    parser.add_argument("--model-path", default=None,
                        help="The workers' tokenizer: a model directory, or 'builtin' (the mocker's). Used for KV "
                             "routing (the built-in tokenizer if unset) and exact prompt counts after a migration "
                             "(estimated from the continuation if unset).")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="The workers' context length: a disaggregated request that cannot fit is refused "
                             "before its prefill (needs --model-path for exact counts).")
    parser.add_argument("--router-mode", default="round_robin", choices=["round_robin", "random", "least_loaded", "kv"])
    parser.add_argument("--router-timeout", type=float, default=0.1, help="Seconds to wait for the KV router.")
    parser.add_argument("--router-embedded", action="store_true",
                        help="kv mode: run the KV router inside this process instead of asking the router process.")
    parser.add_argument("--overlap-weight", type=float, default=DEFAULT_OVERLAP_WEIGHT, help="Embedded router: KV cost weight.")
    parser.add_argument("--temperature", type=float, default=0.0, help="Embedded router: softmax temperature.")
    parser.add_argument("--approx-ttl", type=float, default=120.0, help="Embedded router: approximate-mode TTL.")
    parser.add_argument("--step-tokens", type=int, default=8192,
                        help="Embedded router: prefill tokens an engine batches into one step.")
    parser.add_argument("--no-kv-events", action="store_true", help="Embedded router: approximate mode only.")
    parser.add_argument("--migration-limit", type=int, default=3, help="Times a broken stream may move to another worker.")
    parser.add_argument("--disagg-threshold", type=int, default=0,
                        help="Prompts with fewer uncached tokens than this skip the prefill worker (0: never skip).")
    parser.add_argument("--disagg-protocol", default="vllm", choices=sorted(PROTOCOLS),
                        help="How prefill and decode workers hand over the KV cache (the backend's protocol).")
    parser.add_argument("--discovery-ttl", type=float, default=DEFAULT_TTL)
    parser.add_argument("--max-body-mb", type=float, default=32.0,
                        help="Largest request body accepted, in MiB (larger: 413).")
    parser.add_argument("--drain-timeout", type=float, default=8.0,
                        help="On SIGTERM, seconds the requests in flight have to finish before each ends with an "
                             "error (keep it below the supervisor's grace period).")
    parser.add_argument("--api-key", default=os.environ.get("DYNAMO_API_KEY") or None,
                        help="Require 'Authorization: Bearer KEY' (default $DYNAMO_API_KEY).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    frontend = Frontend(args)

    async def serve() -> None:
        runner = web.AppRunner(frontend.app(), access_log=None, handle_signals=False, handler_cancellation=True,
                               shutdown_timeout=0.5)  # drained already
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            print(f"frontend: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr, flush=True)
            await runner.cleanup()
            raise SystemExit(2)
        print(f"frontend listening on http://{args.host}:{args.port} (namespace {args.namespace}, "
              f"router {args.router_mode}, migration limit {args.migration_limit})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await site.stop()  # no new connections; the requests in flight may finish
        await frontend.drain(args.drain_timeout)
        await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
