"""The frontend: one OpenAI-compatible endpoint in front of the workers found in discovery.

Validates requests, picks a worker (round_robin, random or least_loaded over the ready
workers of the namespace), and proxies the request, streaming SSE chunks through as they
arrive over pooled keep-alive connections. A request that fails before any byte of the
response is retried on another worker.

Run as ``python -m dynamo.core.frontend --port 8000 --nats-url nats://127.0.0.1:4222 --namespace NAME``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import signal
import sys
import time
import uuid
from collections import defaultdict

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from dynamo.core.discovery import DEFAULT_TTL, DiscoveryWatcher, Instance, connect

MAX_BODY = 32 * 2**20
_RETRYABLE = (aiohttp.ClientConnectionError, asyncio.TimeoutError)
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


def openai_error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or status}}
    return web.json_response(body, status=status)


class WorkerPicker:
    """Chooses a worker among the ready ones; the routing mode is a small policy."""

    def __init__(self, mode: str, rng: random.Random | None = None):
        self.mode = mode
        self.rng = rng or random.Random()
        self.counter = itertools.count()
        self.in_flight: dict[str, int] = defaultdict(int)

    def pick(self, workers: list[Instance], exclude: set[str]) -> Instance | None:
        candidates = [w for w in workers if w.key not in exclude]
        if not candidates:
            return None
        if self.mode == "random":
            return self.rng.choice(candidates)
        if self.mode == "least_loaded":
            least = min(self.in_flight[w.key] for w in candidates)
            tied = [w for w in candidates if self.in_flight[w.key] == least]
            return tied[next(self.counter) % len(tied)]
        return candidates[next(self.counter) % len(candidates)]


class Frontend:
    def __init__(self, nats_url: str, namespace: str, model: str | None, router_mode: str,
                 ttl: float = DEFAULT_TTL, api_key: str | None = None):
        self.nats_url = nats_url
        self.namespace = namespace
        self.model = model
        self.api_key = api_key
        self.ttl = ttl
        self.picker = WorkerPicker(router_mode)
        self.watcher: DiscoveryWatcher | None = None
        self.nc = None
        self.session: aiohttp.ClientSession | None = None
        self.registry = CollectorRegistry()
        self.m_requests = Counter("dynamo_frontend_requests", "Requests by endpoint and status",
                                  ["endpoint", "status"], registry=self.registry)
        self.m_inflight = Gauge("dynamo_frontend_inflight_requests", "Requests in flight", registry=self.registry)
        self.m_retries = Counter("dynamo_frontend_retries", "Requests retried on another worker", registry=self.registry)

    # --------------------------------------------------------------- lifecycle

    async def start(self, app: web.Application) -> None:
        self.nc = await connect(self.nats_url, "dynamo-frontend", timeout=10.0)
        self.watcher = DiscoveryWatcher(self.nc, self.namespace, self.ttl)
        await self.watcher.start()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60), trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )

    async def stop(self, app: web.Application) -> None:
        if self.watcher:
            await self.watcher.close()
        if self.session:
            await self.session.close()
        if self.nc:
            try:
                await self.nc.close()
            except Exception:
                pass

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
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
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400 and request.path.startswith("/v1/"):
                return openai_error(exc.status, exc.reason or "error", code=str(exc.status))
            raise

    # --------------------------------------------------------------- routes

    def ready_workers(self) -> list[Instance]:
        if self.watcher is None:
            return []
        return sorted((i for i in self.watcher.instances.values() if i.role in ("agg", "decode")),
                      key=lambda i: i.key)

    async def health(self, request: web.Request) -> web.Response:
        workers = self.ready_workers()
        body = {
            "status": "healthy" if workers else "unhealthy",
            "workers": [{"name": w.data.get("name"), "url": w.url, "role": w.role, "node": w.data.get("node")}
                        for w in workers],
        }
        if not workers:
            body["message"] = "no worker is ready"
        return web.json_response(body, status=200 if workers else 503)

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain", charset="utf-8")

    async def models(self, request: web.Request) -> web.Response:
        names = sorted({w.data.get("model") for w in self.ready_workers() if w.data.get("model")})
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "dynamo"} for n in names]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/chat/completions", "messages")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/completions", "prompt")

    # --------------------------------------------------------------- proxying

    async def _generate(self, request: web.Request, path: str, field: str) -> web.StreamResponse:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return openai_error(401, "invalid or missing API key", "authentication_error")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return openai_error(413, f"request body larger than {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return openai_error(400, f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return openai_error(400, "request body must be a JSON object")
        if field not in body:
            return openai_error(400, f"'{field}' is required", param=field)
        model = body.get("model")
        if not isinstance(model, str):
            return openai_error(400, "'model' is required and must be a string", param="model")
        if self.model and model != self.model:
            return openai_error(404, f"the model {model!r} does not exist; this endpoint serves {self.model!r}",
                                "not_found_error", param="model", code="model_not_found")
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        self.m_inflight.inc()
        try:
            response = await self._forward(request, path, raw, request_id)
        finally:
            self.m_inflight.dec()
        self.m_requests.labels(path, str(response.status)).inc()
        return response

    async def _forward(self, request: web.Request, path: str, raw: bytes, request_id: str) -> web.StreamResponse:
        tried: set[str] = set()
        headers = {"Content-Type": "application/json", "x-request-id": request_id}
        while True:
            worker = self.picker.pick(self.ready_workers(), tried)
            if worker is None:
                if tried:
                    return openai_error(503, f"all {len(tried)} workers failed to answer", "service_unavailable")
                return openai_error(503, "no worker is ready", "service_unavailable")
            tried.add(worker.key)
            self.picker.in_flight[worker.key] += 1
            try:
                return await self._relay(request, worker, path, raw, headers, request_id)
            except _RETRYABLE:
                self.m_retries.inc()
                continue
            finally:
                self.picker.in_flight[worker.key] -= 1

    async def _relay(self, request: web.Request, worker: Instance, path: str, raw: bytes,
                     headers: dict[str, str], request_id: str) -> web.StreamResponse:
        """Send to one worker; raises a retryable error only before anything reached the client."""
        assert self.session is not None
        async with self.session.post(worker.url + path, data=raw, headers=headers) as upstream:
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
            out_headers["x-request-id"] = request_id
            if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                body = await upstream.read()
                return web.Response(body=body, status=upstream.status, headers=out_headers)
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                error = {"error": {"message": f"worker {worker.data.get('name')} failed mid-stream: {exc}",
                                   "type": "upstream_error", "param": None, "code": 502}}
                await response.write(f"data: {json.dumps(error)}\n\n".encode())
            await response.write_eof()
            return response


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dynamo.core.frontend", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--model", default=None, help="The served model name; other names get 404.")
    parser.add_argument("--router-mode", default="round_robin", choices=["round_robin", "random", "least_loaded"])
    parser.add_argument("--discovery-ttl", type=float, default=DEFAULT_TTL)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    frontend = Frontend(args.nats_url, args.namespace, args.model, args.router_mode, args.discovery_ttl, args.api_key)

    async def serve() -> None:
        runner = web.AppRunner(frontend.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            print(f"frontend: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr, flush=True)
            await runner.cleanup()
            raise SystemExit(2)
        print(f"frontend listening on http://{args.host}:{args.port} (namespace {args.namespace}, "
              f"router {args.router_mode})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
