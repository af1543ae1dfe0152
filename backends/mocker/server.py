"""The mocker's HTTP server: vLLM's OpenAI surface over the simulated engine.

Routes
- ``POST /v1/chat/completions``, ``POST /v1/completions`` (SSE when ``stream``)
- ``GET /v1/models``, ``GET /health`` (503 while starting), ``GET /metrics``
- ``GET /version``, ``GET|POST /ping``, ``GET /kv_event_sources`` (as vLLM)
- ``POST /kv_transfer/release`` (prefill role: drop a disaggregation lease)
- ``GET /kv_transfer/nixl_metadata`` (with ``--kv-transfer nixl``: the NIXL
  agent metadata and pool layout a decode worker reads blocks with)
- ``GET /debug/kv`` (cached block hashes and pool state, for tests),
  ``POST /reset_prefix_cache`` (emits ``AllBlocksCleared``; 409 while blocks are in use)
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
import uuid
from array import array
from typing import Any

import msgspec
import xxhash
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from . import disagg, nixl_transfer
from .config import READY_MARKER, MockerConfig
from .engine import Engine
from .kv_cache import KvCache
from .metrics import EngineMetrics
from .protocol import ApiError, GenerationRequest, StreamFormat, bad, json_encode, parse_request, usage_dict
from .scheduler import GenerationVocab, Scheduler, Sequence
from .timing import PerfModel
from dynamo.core.tokenizer import MockerTokenizer, TemplateRenderError

__all__ = ["MockerServer", "StartupError", "bind_socket", "build_engine", "serve"]

log = logging.getLogger("dynamo.mocker")

_U64 = (1 << 64) - 1
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_json_decode = msgspec.json.Decoder().decode
VERSION = "0.1.0-mocker"


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class MockerServer:
    """HTTP handlers bound to one engine."""

    def __init__(self, cfg: MockerConfig, tokenizer: MockerTokenizer, engine: Engine, publisher: Any = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.engine = engine
        self.scheduler = engine.scheduler
        self.kv = engine.scheduler.kv
        self.metrics = engine.scheduler.metrics
        self.publisher = publisher
        self.model_name = cfg.served_model_name
        self.ready = False
        self.closing = False
        self.port = cfg.port
        self.created = int(time.time())
        self.engine_id = str(uuid.uuid4())
        vocab = engine.scheduler.vocab
        self.token_text = vocab.text
        self.token_json = {t: json_encode(s) for t, s in vocab.text.items()}
        self.notifier = disagg.ReleaseNotifier()
        self._background: set[asyncio.Task] = set()
        engine.on_transfer_done = self._on_transfer_done
        self.advertised_host = cfg.host if cfg.host not in ("0.0.0.0", "::", "") else "127.0.0.1"

    # ----------------------------------------------------------------- app
    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_post("/v1/completions", self.completions)
        r.add_get("/v1/models", self.models)
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.metrics_handler)
        r.add_get("/version", self.version)
        r.add_route("*", "/ping", self.health)
        r.add_get("/kv_event_sources", self.kv_event_sources)
        r.add_post(disagg.RELEASE_PATH, self.kv_release)
        if self.engine.kv_transfer is not None:
            r.add_get(nixl_transfer.METADATA_PATH, self.nixl_metadata)
        r.add_get("/debug/kv", self.debug_kv)
        r.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ApiError as err:
            return _error_response(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error_response(ApiError(exc.status, exc.reason or "error"))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return _error_response(ApiError(500, "internal error in the mocker; see its log"))

    # ------------------------------------------------------------- simple routes
    async def health(self, request: web.Request) -> web.Response:
        if not self.engine.alive:
            return web.Response(status=503, text="engine dead\n")
        if not self.ready:
            return web.Response(status=503, text="starting\n" if not self.closing else "shutting down\n")
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": VERSION})

    async def models(self, request: web.Request) -> web.Response:
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "vllm",
                        "root": self.cfg.model_path or self.model_name,
                        "parent": None,
                        "max_model_len": self.cfg.max_model_len,
                        "permission": [],
                    }
                ],
            }
        )

    async def metrics_handler(self, request: web.Request) -> web.Response:
        s = self.scheduler
        gauges = {
            "vllm:num_requests_running": ("Number of requests in model execution batches.", len(s.running)),
            "vllm:num_requests_waiting": ("Number of requests waiting to be processed.", len(s.waiting) + len(s.transferring)),
            "vllm:kv_cache_usage_perc": ("KV-cache usage. 1 means 100 percent usage.", self.kv.usage),
            "mocker:kv_cached_blocks": ("Blocks registered in the prefix cache.", len(self.kv.cached)),
            "mocker:kv_free_blocks": ("Blocks not referenced by any request.", self.kv.num_free),
            "mocker:kv_leased_requests": ("Finished prefills whose blocks wait for a decode worker.", len(s.leases)),
        }
        info = {
            "block_size": str(self.cfg.block_size),
            "num_gpu_blocks": str(self.cfg.num_gpu_blocks),
            "enable_prefix_caching": str(self.cfg.enable_prefix_caching),
        }
        counters = None
        transfer = self.engine.kv_transfer
        if transfer is not None:
            gauges.update(transfer.gauges())
            counters = transfer.counters()
        text = self.metrics.render(self.model_name, gauges, info, counters)
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def kv_event_sources(self, request: web.Request) -> web.Response:
        if self.publisher is None:
            return _json({})
        return _json(
            {
                "0": {
                    "enable_kv_cache_events": True,
                    "publisher": "zmq",
                    "endpoint": self.publisher.endpoint,
                    "replay_endpoint": self.publisher.replay_endpoint,
                    "topic": self.cfg.kv_events_topic,
                }
            }
        )

    async def debug_kv(self, request: web.Request) -> web.Response:
        s = self.scheduler
        kv = self.kv
        return _json(
            {
                "block_size": kv.block_size,
                "num_gpu_blocks": kv.num_blocks,
                "num_free_blocks": kv.num_free,
                "num_used_blocks": kv.num_used,
                "usage": kv.usage,
                "prefix_caching": kv.enable_prefix_caching,
                "cached_block_hashes": sorted(kv.cached),
                "num_evictions": kv.num_evictions,
                "running": len(s.running),
                "waiting": len(s.waiting),
                "transferring": len(s.transferring),
                "leases": sorted(s.leases),
                "steps": self.engine.steps,
                "kv_events_next_seq": self.publisher.next_seq if self.publisher is not None else None,
            }
        )

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        if not self.engine.reset_prefix_cache():
            raise ApiError(409, "cannot reset the prefix cache while blocks are in use")
        return _json({"reset": True})

    async def kv_release(self, request: web.Request) -> web.Response:
        try:
            body = _json_decode(await request.read())
        except msgspec.DecodeError:
            raise bad("request body is not valid JSON") from None
        rid = disagg.parse_release(body, self.engine_id)
        if not self.engine.release_lease(rid):
            raise ApiError(404, f"no blocks are held for request {rid!r}", param="remote_request_id")
        return _json({"released": rid})

    async def nixl_metadata(self, request: web.Request) -> web.Response:
        assert self.engine.kv_transfer is not None
        return _json(self.engine.kv_transfer.metadata(self.engine_id))

    # -------------------------------------------------------------- generation
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    def _prompt_ids(self, req: GenerationRequest, remote: dict | None) -> list[int]:
        if remote is not None and remote.get("prompt_token_ids"):
            ids = remote["prompt_token_ids"]
        elif req.chat:
            try:
                ids = self.tokenizer.apply_chat_template(req.messages or [])
            except TemplateRenderError as exc:
                raise bad(str(exc), "messages") from None
        elif isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt)
        else:
            ids = req.prompt or []
        if not ids:
            raise bad("the prompt is empty after tokenization", "messages" if req.chat else "prompt")
        vocab_size = self.tokenizer.vocab_size
        top = max(ids)
        if top >= vocab_size:
            raise bad(f"token id {top} is out of vocabulary (size {vocab_size})", "prompt")
        return ids

    def _make_sequence(self, req: GenerationRequest, request_id: str) -> Sequence:
        cfg = self.cfg
        params = req.kv_transfer_params
        remote = disagg.parse_remote_prefill(params) if cfg.role == "decode" else None
        hold = cfg.role == "prefill" and disagg.wants_remote_decode(params)
        prompt_ids = self._prompt_ids(req, remote)
        n = len(prompt_ids)
        limit = cfg.max_model_len
        if n >= limit:
            raise bad(
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{n} input tokens. Please reduce the length of the input messages.",
                "messages" if req.chat else "prompt",
            )
        if req.max_tokens is not None and n + req.max_tokens > limit:
            raise bad(
                f"'max_tokens' or 'max_completion_tokens' is too large: {req.max_tokens}. This model's "
                f"maximum context length is {limit} tokens and your request has {n} input tokens "
                f"({req.max_tokens} > {limit} - {n}).",
                "max_tokens",
            )
        base_seed = req.seed if req.seed is not None else cfg.seed
        seed = xxhash.xxh3_64_intdigest(array("I", prompt_ids).tobytes(), seed=base_seed & _U64)
        eos_at = None
        if req.max_tokens is None:
            max_tokens = limit - n
            if not req.ignore_eos:
                # No limit given: the simulated model ends its answer by itself
                # after a deterministic, seed-dependent length.
                natural = 16 + xxhash.xxh3_64_intdigest(b"eos", seed=seed) % 241
                eos_at = min(max(natural, req.min_tokens, 1), max_tokens)
        else:
            max_tokens = req.max_tokens
        if req.min_tokens > max_tokens:
            raise bad(f"'min_tokens' ({req.min_tokens}) exceeds the tokens left in the context", "min_tokens")
        final_len = n + (eos_at if eos_at is not None else max_tokens)
        blocks = -(-final_len // cfg.block_size)
        if blocks > cfg.num_gpu_blocks:
            raise bad(
                f"the request needs up to {blocks} KV blocks ({final_len} tokens) but the cache has only "
                f"{cfg.num_gpu_blocks}; lower max_tokens or raise --num-gpu-blocks",
                "max_tokens",
            )
        return Sequence(
            request_id,
            prompt_ids,
            max_tokens,
            seed=seed,
            min_tokens=req.min_tokens,
            eos_at=eos_at,
            stop=req.stop,
            include_stop=req.include_stop,
            remote=remote,
            hold=hold,
            arrival=time.monotonic(),
        )

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        if not self.ready:
            raise ApiError(503, "the mocker is starting up" if not self.closing else "the mocker is shutting down")
        if not self.engine.alive:
            raise ApiError(503, "the engine loop died; see the mocker's log")
        try:
            raw = await request.read()
        except RequestPayloadError:  # e.g. a Content-Encoding: gzip body that is not gzip
            request.content.feed_eof()  # or aiohttp reads on after the answer, fails again and resets the connection
            response = _error_response(ApiError(400, "the request body does not decode as its Content-Encoding says"))
            response.force_close()
            return response
        req = parse_request(raw, chat=chat)
        if req.model is not None and req.model != self.model_name:
            raise ApiError(404, f"The model `{req.model}` does not exist.", param="model")
        rid_header = request.headers.get("X-Request-Id")
        # it becomes the response's id: one with undecodable bytes (surrogates) or controls is replaced
        rid = rid_header if rid_header and rid_header.isprintable() else uuid.uuid4().hex
        response_id = ("chatcmpl-" if chat else "cmpl-") + rid
        seq = self._make_sequence(req, f"{response_id}-{uuid.uuid4().hex[:8]}")
        self.engine.submit(seq)
        try:
            if req.stream:
                return await self._stream(request, req, seq, response_id)
            return await self._complete(req, seq, response_id)
        finally:
            if not seq.finished:
                self.engine.abort(seq)

    def _text(self, items: list) -> str:
        tt = self.token_text
        return "".join(tt[i] if type(i) is int else i for i in items)

    async def _complete(self, req: GenerationRequest, seq: Sequence, response_id: str) -> web.Response:
        loop = asyncio.get_running_loop()
        if not seq.finished:
            fut = loop.create_future()
            seq.done_waiter = fut
            await fut
        if seq.finish_reason == "abort":
            raise ApiError(503, "the request was aborted because the mocker is shutting down")
        text = self._text(seq.out)
        usage = usage_dict(seq.prompt_len, seq.num_output)
        ktp = None
        if seq.hold and seq.request_id in self.scheduler.leases:
            ktp = disagg.prefill_result_params(
                seq, engine_id=self.engine_id, host=self.advertised_host, port=self.port, block_size=self.cfg.block_size
            )
        created = int(time.time())
        if req.chat:
            body = {
                "id": response_id,
                "object": "chat.completion",
                "created": created,
                "model": self.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "annotations": None,
                            "audio": None,
                            "function_call": None,
                            "tool_calls": [],
                            "reasoning_content": None,
                        },
                        "logprobs": None,
                        "finish_reason": seq.finish_reason,
                        "stop_reason": seq.stop_reason,
                    }
                ],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "prompt_logprobs": None,
                "kv_transfer_params": ktp,
            }
        else:
            body = {
                "id": response_id,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": seq.finish_reason,
                        "stop_reason": seq.stop_reason,
                        "prompt_logprobs": None,
                    }
                ],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "kv_transfer_params": ktp,
            }
        return web.Response(body=json_encode(body), content_type="application/json")

    async def _stream(self, request: web.Request, req: GenerationRequest, seq: Sequence, response_id: str) -> web.StreamResponse:
        fmt = StreamFormat(chat=req.chat, response_id=response_id, created=int(time.time()), model=self.model_name)
        resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        head, tail = fmt.head, fmt.tail
        tj = self.token_json
        continuous = req.continuous_usage
        prompt_len = seq.prompt_len
        started = False
        try:
            while True:
                if not seq.out and not seq.finished:
                    fut = loop.create_future()
                    seq.waiter = fut
                    await fut
                items = seq.out
                if items:
                    seq.out = []
                done = seq.finished
                if done and seq.finish_reason == "abort":
                    break
                if not items and not done:
                    continue
                parts: list[bytes] = []
                if not started:
                    started = True
                    if fmt.role_chunk:
                        parts.append(fmt.role_chunk)
                last = None
                if done:
                    last = items.pop() if items else ""
                if continuous:
                    for it in items:
                        chunk = head + (tj[it] if type(it) is int else json_encode(it)) + tail
                        parts.append(fmt.with_usage(chunk, prompt_len, seq.num_output))
                else:
                    for it in items:
                        parts.append(head)
                        parts.append(tj[it] if type(it) is int else json_encode(it))
                        parts.append(tail)
                if done:
                    chunk = (
                        head
                        + (tj[last] if type(last) is int else json_encode(last))
                        + fmt.final_tail(seq.finish_reason or "stop", seq.stop_reason)
                    )
                    if continuous:
                        chunk = fmt.with_usage(chunk, prompt_len, seq.num_output)
                    parts.append(chunk)
                    if req.include_usage:
                        parts.append(fmt.usage_chunk(prompt_len, seq.num_output))
                    parts.append(StreamFormat.DONE)
                await resp.write(b"".join(parts))
                if done:
                    await resp.write_eof()
                    break
        except ConnectionResetError:
            self.engine.abort(seq)
        return resp

    # ------------------------------------------------------------ disaggregation
    def _on_transfer_done(self, seq: Sequence) -> None:
        if seq.remote is None:
            return
        task = asyncio.get_running_loop().create_task(self.notifier.release(seq.remote))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await self.notifier.close()
        if self.engine.kv_transfer is not None:
            await self.engine.kv_transfer.close()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json_encode(data), status=status, content_type="application/json")


def _error_response(err: ApiError) -> web.Response:
    return web.Response(body=err.body(), status=err.status, content_type="application/json")


# --------------------------------------------------------------------- running
class StartupError(Exception):
    """The mocker cannot start (port or KV-events endpoint unavailable...)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front so "port in use" is reported clearly."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def build_engine(
    cfg: MockerConfig, tokenizer: MockerTokenizer, perf: PerfModel, publisher: Any = None, kv_transfer: Any = None
) -> Engine:
    kv = KvCache(cfg.num_gpu_blocks, cfg.block_size, enable_prefix_caching=cfg.enable_prefix_caching)
    vocab = GenerationVocab(tokenizer.generation_ids, tokenizer.token_text, tokenizer.eos_token_id)
    sched = Scheduler(
        kv,
        vocab,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=cfg.max_model_len,
        metrics=EngineMetrics(),
    )
    return Engine(
        sched,
        perf,
        publisher=publisher,
        kv_bytes_per_token=cfg.kv_bytes_per_token,
        kv_transfer_bandwidth_gbps=cfg.kv_transfer_bandwidth_gbps,
        lease_seconds=disagg.LEASE_SECONDS,
        kv_transfer=kv_transfer,
    )


async def serve(
    cfg: MockerConfig, sock: socket.socket, tokenizer: MockerTokenizer, perf: PerfModel, kv_transfer: Any = None
) -> None:
    """Run until SIGTERM/SIGINT; raises :class:`StartupError` for setup failures.

    ``kv_transfer`` is the :class:`~.nixl_transfer.NixlKvTransfer` of ``--kv-transfer nixl``;
    it is closed when the server stops.
    """
    loop = asyncio.get_running_loop()
    publisher = None
    if cfg.kv_events_endpoint:
        from .kv_events import KvEventPublisher, KvEventsError

        try:
            publisher = KvEventPublisher(
                cfg.kv_events_endpoint, cfg.kv_events_replay_endpoint, cfg.kv_events_topic
            )
        except KvEventsError as exc:
            raise StartupError(str(exc)) from None
    engine = build_engine(cfg, tokenizer, perf, publisher, kv_transfer)
    server = MockerServer(cfg, tokenizer, engine, publisher)
    server.port = sock.getsockname()[1]
    runner = web.AppRunner(
        server.build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.2
    )
    await runner.setup()
    await web.SockSite(runner, sock).start()
    engine.start()
    if publisher is not None:
        publisher.start()

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "mocker %s: role=%s blocks=%d x %d tokens, speedup=%g, prefix caching %s, kv transfer %s",
        cfg.served_model_name, cfg.role, cfg.num_gpu_blocks, cfg.block_size, cfg.speedup_ratio,
        "on" if cfg.enable_prefix_caching else "off", cfg.kv_transfer,
    )
    if cfg.startup_time > 0:
        try:
            await asyncio.wait_for(stop.wait(), cfg.startup_time)
        except asyncio.TimeoutError:
            pass
    if not stop.is_set():
        server.ready = True
        print(f"{READY_MARKER}{url_host(cfg.host)}:{server.port}", flush=True)
        await stop.wait()

    server.ready = False
    server.closing = True
    await engine.shutdown()
    try:
        await asyncio.wait_for(runner.cleanup(), 0.6)
    except (asyncio.TimeoutError, Exception):  # exiting anyway; never hang on shutdown
        pass
    await server.close()
    if publisher is not None:
        publisher.close()
