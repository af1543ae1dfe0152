"""How the frontend reaches the KV router: over NATS, or a router embedded in the frontend.

Both placements run the same :class:`~dynamo.core.router.Router` (index, costs, load
accounting); they differ only in where it lives.

- :class:`NatsRouterClient` (``router.placement: process``, the default): the router is its
  own process. A decision is a NATS request/reply on ``<ns>.router.route``; load events
  are published on ``<ns>.router.load``. Several frontends share one router's view.
- :class:`EmbeddedRouter` (``router.placement: frontend``): the frontend process owns a
  router, fed by the same discovery watcher and the workers' KV events, and decides
  without a network round trip (NVIDIA Dynamo's frontend works this way). It answers
  ``<ns>.router.stats`` like the router process does. Each frontend replica keeps its own
  index and load view.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import msgspec

from dynamo.core.discovery import DiscoveryWatcher
from dynamo.core.router import Router, load_subject, route_subject, stats_subject

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class RouterClient(Protocol):
    async def route(self, request_id: str, hashes: list[int], pool: str, account: bool, timeout: float) -> dict | None:
        """The router's decision (``{"worker", "url", "overlap", "cost"}``), or None: route locally."""

    async def event(self, event: str, request_id: str) -> None:
        """Tell the router that a routed request produced its first token or finished."""

    async def close(self) -> None: ...


class NatsRouterClient:
    """Asks the router process over NATS request/reply.

    A router that does not answer in time (frozen, swamped) is not asked again for
    ``QUIET_SECONDS``, and then by one request at a time until it answers: one request per
    period pays the timeout instead of every request.
    """

    QUIET_SECONDS = 1.0

    def __init__(self, nc, namespace: str):
        self.nc = nc
        self.route_subject = route_subject(namespace)
        self.load_subject = load_subject(namespace)
        self.quiet_until = 0.0
        self.doubted = False  # the last answer did not come in time
        self.probing = False  # a request is finding out whether it comes now

    async def route(self, request_id: str, hashes: list[int], pool: str, account: bool, timeout: float) -> dict | None:
        if time.monotonic() < self.quiet_until or (self.doubted and self.probing):
            return None
        payload = _encode({"request_id": request_id, "hashes": hashes, "pool": pool, "account": account})
        probe = self.doubted  # this request finds out whether the router answers again
        if probe:
            self.probing = True
        try:
            msg = await self.nc.request(self.route_subject, payload, timeout=timeout)
            decision = _decode(msg.data)
            self.doubted = False
        except asyncio.TimeoutError:
            self.doubted, self.quiet_until = True, time.monotonic() + self.QUIET_SECONDS
            return None
        except Exception:  # no responders, connection trouble: the caller routes locally
            return None
        finally:
            if probe:
                self.probing = False
        return None if not isinstance(decision, dict) or "error" in decision else decision

    async def event(self, event: str, request_id: str) -> None:
        try:
            await self.nc.publish(self.load_subject, _encode({"event": event, "request_id": request_id}))
        except Exception:
            pass

    async def close(self) -> None:
        pass


class EmbeddedRouter:
    """A :class:`Router` living in the frontend process: decisions are plain function calls."""

    def __init__(self, nc, namespace: str, watcher: DiscoveryWatcher, block_size: int, overlap_weight: float,
                 temperature: float, use_events: bool, approx_ttl: float, step_tokens: int = 0):
        self.nc = nc
        self.namespace = namespace
        self.router = Router(namespace, block_size, overlap_weight, temperature, use_events, approx_ttl,
                             step_tokens=step_tokens)
        self.watcher = watcher
        previous = watcher.on_change

        def changed() -> None:
            self.router.sync(dict(watcher.instances))
            if previous is not None:
                previous()

        watcher.on_change = changed
        self.router.sync(dict(watcher.instances))
        self._stats_sub = None

    async def start(self) -> None:
        async def on_stats(msg) -> None:
            await msg.respond(_encode(self.router.stats() | {"placement": "frontend"}))

        self._stats_sub = await self.nc.subscribe(stats_subject(self.namespace), cb=on_stats)

    async def route(self, request_id: str, hashes: list[int], pool: str, account: bool, timeout: float) -> dict | None:
        decision = self.router.route(request_id, hashes, pool, account)
        return None if "error" in decision else decision

    async def event(self, event: str, request_id: str) -> None:
        self.router.load_event(event, request_id)

    async def close(self) -> None:
        for feed in self.router.feeds.values():
            feed.close()
        self.router.feeds.clear()
        if self._stats_sub is not None:
            try:
                await self._stats_sub.unsubscribe()
            except Exception:
                pass
