"""Discovery: live workers in a NATS JetStream KeyValue bucket.

A node's supervisor puts an entry for each worker once it is ready and refreshes it every
``ttl / 3`` seconds; it deletes the entry when the worker stops or fails. If the supervisor
itself dies, nobody refreshes: watchers drop entries older than ``ttl``, and the bucket's
own TTL removes them from storage.

A watcher that has heard nothing of an entry for ``ttl`` asks the bucket before dropping it:
silence is also what a NATS outage or a watch that has not recovered from a NATS restart
looks like, and then the workers are most likely still serving. Entries are dropped only on
the bucket's word (gone, or not refreshed for ``ttl``), never because NATS is unreachable, and
not in the first ``ttl`` after NATS comes back (a restarted NATS may have lost the entries
until their publishers, reconnecting too, put them again).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from dynamo.core.nats_server import redact_url

BUCKET = "dynamo_instances"
DEFAULT_TTL = 10.0


async def connect(url: str, name: str, timeout: float = 5.0,
                  on_reconnect: Callable[[], None] | None = None) -> nats.NATS:
    """Connect, retrying until ``timeout``; raise ConnectionError with a clear message.

    Once connected, losing NATS and getting it back are one line each on stderr (nats-py's
    default logs a traceback for every failed reconnect attempt).
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    where = redact_url(url)
    connected = True
    client: list[nats.NATS] = []

    async def disconnected() -> None:
        nonlocal connected
        if client and (client[0].is_closed or client[0].is_draining):
            return  # our own close, not a lost connection
        if connected:
            connected = False
            print(f"{name}: lost the connection to NATS at {where}; reconnecting", file=sys.stderr, flush=True)

    async def reconnected() -> None:
        nonlocal connected
        connected = True
        print(f"{name}: reconnected to NATS at {where}", file=sys.stderr, flush=True)
        if on_reconnect is not None:
            on_reconnect()

    async def error(exc: Exception) -> None:
        pass  # a reconnect attempt failed: the lines above say what matters

    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(
                url, name=name, connect_timeout=min(2.0, timeout), allow_reconnect=True,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error,
            )
            client.append(nc)
            return nc
        except Exception as exc:  # nats raises several unrelated types on refusal
            last = exc
            await asyncio.sleep(0.1)
    raise ConnectionError(f"cannot reach NATS at {redact_url(url)}: {last or 'timed out'}")


async def open_bucket(nc: nats.NATS, ttl: float = DEFAULT_TTL):
    js = nc.jetstream()
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(KeyValueConfig(bucket=BUCKET, ttl=ttl, history=1))
    except Exception:
        return await js.key_value(BUCKET)  # another node created it first


def instance_key(namespace: str, name: str) -> str:
    return f"{namespace}.{name}"


class DiscoveryPublisher:
    """Used by a supervisor: register, refresh and remove its node's workers."""

    def __init__(self, nc: nats.NATS, kv, ttl: float = DEFAULT_TTL, refresh_now: asyncio.Event | None = None):
        self.nc = nc
        self.kv = kv
        self.ttl = ttl
        self.entries: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task | None = None
        self._refresh_now = refresh_now or asyncio.Event()  # set: put every entry now, not at the next period

    @classmethod
    async def open(cls, url: str, ttl: float = DEFAULT_TTL, timeout: float = 5.0) -> DiscoveryPublisher:
        refresh_now = asyncio.Event()  # after a NATS restart the entries are put again at once
        nc = await connect(url, "dynamo-supervisor", timeout=timeout, on_reconnect=refresh_now.set)
        return cls(nc, await open_bucket(nc, ttl), ttl, refresh_now)

    async def register(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = entry
        await self._put(key, entry)
        if self._task is None:
            self._task = asyncio.create_task(self._refresh())

    async def remove(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            try:
                await self.kv.delete(key)
            except Exception:
                pass  # NATS gone: the TTL removes it

    async def _put(self, key: str, entry: dict[str, Any]) -> None:
        stamped = time.time()
        await self.kv.put(key, json.dumps({**entry, "ts": stamped}).encode())
        if time.time() - stamped > self.ttl / 3:  # held up (a frozen NATS): it landed looking old; put it again
            self._refresh_now.set()

    async def _refresh(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._refresh_now.wait(), self.ttl / 3)
            except asyncio.TimeoutError:
                pass
            self._refresh_now.clear()
            for key, entry in list(self.entries.items()):
                try:
                    await self._put(key, entry)
                except Exception:
                    if not await self._reopen():
                        break  # NATS unreachable: next round
                    try:
                        await self._put(key, entry)
                    except Exception:
                        pass

    async def _reopen(self) -> bool:
        """Open (or create) the bucket again: a NATS that came back without its storage has lost it."""
        try:
            self.kv = await asyncio.wait_for(open_bucket(self.nc, self.ttl), 2.0)
            return True
        except Exception:
            return False

    async def close(self, timeout: float = 2.0) -> None:
        """Remove this node's entries and disconnect, within ``timeout``: with NATS frozen or gone,
        stopping must not wait on it (the entries then expire on their own)."""
        if self._task:
            self._task.cancel()

        async def remove_all() -> None:
            for key in list(self.entries):
                await self.remove(key)
            await self.nc.drain()

        try:
            await asyncio.wait_for(remove_all(), timeout)
        except Exception:  # timeout, or NATS already gone
            try:
                await asyncio.wait_for(self.nc.close(), 0.5)
            except Exception:
                pass


@dataclass
class Instance:
    key: str
    data: dict[str, Any]
    seen: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return self.data["url"]

    @property
    def role(self) -> str:
        return self.data.get("role", "agg")


class DiscoveryWatcher:
    """Used by the frontend and router: the live instances of one namespace."""

    def __init__(self, nc: nats.NATS, namespace: str, ttl: float = DEFAULT_TTL,
                 on_change: Callable[[], None] | None = None):
        self.nc = nc
        self.namespace = namespace
        self.ttl = ttl
        self.instances: dict[str, Instance] = {}
        self.on_change = on_change
        self._tasks: list[asyncio.Task] = []
        self.kv = None
        self._watch = None
        self._reconnects = 0
        self._unreachable = False  # the last question to the bucket went unanswered
        self._settled_at = 0.0  # after a NATS outage, publishers get until then to put their entries again

    async def start(self) -> None:
        self.kv = kv = await open_bucket(self.nc, self.ttl)
        self._watch = watcher = await kv.watch(f"{self.namespace}.>")
        self._tasks = [asyncio.create_task(self._follow(watcher)), asyncio.create_task(self._expire())]

    async def _rewatch(self) -> None:
        """After a reconnect: watch afresh (the bucket may be new, or the old watch slow to recover)."""
        try:
            kv = await asyncio.wait_for(open_bucket(self.nc, self.ttl), 2.0)
            watcher = await asyncio.wait_for(kv.watch(f"{self.namespace}.>"), 2.0)
        except Exception:
            return  # still unreachable: the next reconnect tries again
        self.kv, old, self._watch = kv, self._watch, watcher
        self._tasks[0].cancel()
        self._tasks[0] = asyncio.create_task(self._follow(watcher))
        try:
            await asyncio.wait_for(old.stop(), 1.0)
        except Exception:
            pass

    async def _follow(self, watcher) -> None:
        while True:
            try:
                entry = await watcher.updates(timeout=3600)
            except asyncio.TimeoutError:
                continue
            except Exception:
                await asyncio.sleep(0.5)
                continue
            if entry is None:
                continue  # end of the initial values
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                changed = self.instances.pop(entry.key, None) is not None
            else:
                data = self._fresh(entry.value)
                if data is None:
                    continue  # unreadable, or a stale entry left by a dead node
                changed = _replaced(self.instances.get(entry.key), data)
                self.instances[entry.key] = Instance(entry.key, data)
            if changed and self.on_change:
                self.on_change()

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ttl / 4))
            now = time.monotonic()
            reconnects = self.nc.stats.get("reconnects", 0)
            if reconnects != self._reconnects:  # NATS came back, maybe empty: publishers put their entries again
                self._reconnects, self._settled_at = reconnects, max(self._settled_at, now + self.ttl)
                await self._rewatch()
            changed = False
            for key, inst in [(k, i) for k, i in self.instances.items() if now - i.seen > self.ttl]:
                data = await self._registered(key)
                if data is None:  # NATS is unreachable: keep what we know, and give publishers time after
                    self._unreachable = True
                    self._settled_at = max(self._settled_at, time.monotonic() + self.ttl / 2)
                    break
                if self._unreachable or self.nc.stats.get("reconnects", 0) != reconnects:
                    # NATS answers again (thawed, or back while we asked): publishers stalled like us have not put
                    # their entries again yet, so a gone or stale entry is not the bucket's word for another ttl
                    self._unreachable = False
                    self._settled_at = max(self._settled_at, time.monotonic() + self.ttl)
                if self.instances.get(key) is not inst:
                    continue  # updated or deleted by the watch meanwhile: that is newer
                if data:  # alive; the watch missed its refreshes
                    changed |= _replaced(self.instances.get(key), data)
                    self.instances[key] = Instance(key, data)
                elif time.monotonic() >= self._settled_at:  # (NATS just back, maybe empty after a long outage: not yet)
                    changed |= self.instances.pop(key, None) is not None
            if changed and self.on_change:
                self.on_change()

    async def _registered(self, key: str) -> dict[str, Any] | None:
        """The bucket's current entry for ``key`` if refreshed within ``ttl``, ``{}`` if it is gone or
        stale, None if the bucket cannot be asked."""
        try:
            entry = await asyncio.wait_for(self.kv.get(key), timeout=max(0.5, min(2.0, self.ttl / 4)))
        except KeyNotFoundError:  # deleted, or removed by the bucket's TTL
            return {}
        except Exception:  # no connection, timeout, NATS restarting
            return None
        return self._fresh(entry.value) or {}

    def _fresh(self, value: bytes | None) -> dict[str, Any] | None:
        """An entry's data if it is readable and was refreshed within ``ttl``."""
        try:
            data = json.loads(value or b"")
        except ValueError:
            return None
        if not isinstance(data, dict) or time.time() - data.get("ts", time.time()) > self.ttl:
            return None
        return data

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()


def _replaced(old: Instance | None, data: dict[str, Any]) -> bool:
    """A new instance, or the same name served by another process or at another address."""
    return old is None or any(old.data.get(k) != data.get(k) for k in ("url", "pid"))
