"""Against a real nats-server: NATS outages do not empty the worker list (dead nodes still leave), and a
frozen router costs one timeout per quiet period, not one per request."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest

from dynamo.core.discovery import DiscoveryPublisher, DiscoveryWatcher, connect
from dynamo.core.nats_server import nats_server_argv, nats_server_binary
from dynamo.core.ports import pick_free_port
from dynamo.core.router import route_subject
from dynamo.core.router_client import NatsRouterClient

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(nats_server_binary() is None, reason="nats-server is not installed")]
TTL = 2.0


@pytest.fixture
def nats_server(tmp_path):
    """Start (and restart) a JetStream nats-server on 127.0.0.1; always stopped at the end."""
    port = pick_free_port()
    argv = nats_server_argv(nats_server_binary(), "127.0.0.1", port, str(tmp_path / "js"), None)
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        return procs[-1]

    start()
    yield f"nats://127.0.0.1:{port}", procs, start
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(10)


@asynccontextmanager
async def watched(url: str) -> AsyncIterator[tuple[DiscoveryPublisher, DiscoveryWatcher]]:
    """A publisher with one live entry and a watcher that lists it; both closed at the end."""
    publisher = await DiscoveryPublisher.open(url, ttl=TTL)
    await publisher.register("ns.w0", {"url": "http://127.0.0.1:1", "pid": 1})
    watcher = DiscoveryWatcher(await connect(url, "test-watcher"), "ns", ttl=TTL)
    await watcher.start()
    for _ in range(100):
        if "ns.w0" in watcher.instances:
            break
        await asyncio.sleep(0.05)
    assert "ns.w0" in watcher.instances
    try:
        yield publisher, watcher
    finally:
        await watcher.close()
        await watcher.nc.close()
        publisher._task.cancel()
        await publisher.nc.close()


async def present_throughout(watcher: DiscoveryWatcher, seconds: float) -> str:
    """'' if the entry stayed listed all along, else when it went missing (for the failure message)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if "ns.w0" not in watcher.instances:
            return (f"dropped after {time.monotonic() - started:.1f}s (reconnects {watcher.nc.stats.get('reconnects')},"
                    f" connected {watcher.nc.is_connected})")
        await asyncio.sleep(0.1)
    return ""


def test_a_frozen_or_restarted_nats_does_not_empty_the_worker_list(nats_server):
    url, procs, start = nats_server

    async def main() -> None:
        async with watched(url) as (publisher, watcher):
            os.kill(procs[0].pid, signal.SIGSTOP)  # NATS frozen for 2 and a half: nothing is heard, nothing is known
            assert not (gone := await present_throughout(watcher, 2.5 * TTL)), f"NATS frozen: {gone}"
            os.kill(procs[0].pid, signal.SIGCONT)
            procs[0].kill()  # NATS restarted: the watch takes several seconds to recover
            procs[0].wait(10)
            start()
            assert not (gone := await present_throughout(watcher, 3 * TTL)), f"NATS restarted: {gone}"
            # the node dies (nobody refreshes, nobody deletes): the bucket says so and the entry goes
            publisher._task.cancel()
            deadline = time.monotonic() + 8 * TTL
            while "ns.w0" in watcher.instances and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert "ns.w0" not in watcher.instances, f"a dead node's entry stayed (NATS up: {procs[-1].poll() is None})"

    asyncio.run(main())


def test_a_nats_that_thaws_after_a_freeze_does_not_drop_live_workers(nats_server):
    # its first answers come before the publishers, stalled like everyone, have put their entries again
    url, procs, _ = nats_server

    async def main() -> None:
        async with watched(url) as (_, watcher):
            os.kill(procs[0].pid, signal.SIGSTOP)
            assert not (gone := await present_throughout(watcher, 2.5 * TTL)), f"NATS frozen: {gone}"
            os.kill(procs[0].pid, signal.SIGCONT)
            assert not (gone := await present_throughout(watcher, 3 * TTL)), f"NATS thawed: {gone}"

    asyncio.run(main())


def test_a_router_that_stops_answering_is_asked_once_per_quiet_period(nats_server):
    url, _, _ = nats_server

    async def main() -> None:
        nc = await connect(url, "test")
        asked = 0

        async def frozen(msg) -> None:
            nonlocal asked
            asked += 1  # received, never answered

        stuck = await nc.subscribe(route_subject("ns"), cb=frozen)
        client = NatsRouterClient(nc, "ns")
        started = time.monotonic()
        decisions = [await client.route(f"r{i}", [1, 2], "agg", True, 0.2) for i in range(20)]
        assert decisions == [None] * 20
        assert asked == 1 and time.monotonic() - started < 0.2 * 3  # one timeout, not twenty
        await asyncio.sleep(NatsRouterClient.QUIET_SECONDS)
        # after the quiet period one request finds out, the others do not wait on it
        started = time.monotonic()
        together = await asyncio.gather(*(client.route(f"a{i}", [1], "agg", True, 0.2) for i in range(10)))
        assert together == [None] * 10 and asked == 2 and time.monotonic() - started < 0.2 * 2

        async def back(msg) -> None:  # the router answers again: used at once after the quiet period
            await msg.respond(b'{"worker": "w0", "url": "http://127.0.0.1:1", "overlap": 0}')

        await stuck.unsubscribe()
        await nc.subscribe(route_subject("ns"), cb=back)
        await asyncio.sleep(NatsRouterClient.QUIET_SECONDS)
        assert (await client.route("b", [1], "agg", True, 0.2))["worker"] == "w0"
        assert [(await client.route(f"c{i}", [1], "agg", True, 0.2))["worker"] for i in range(3)] == ["w0"] * 3
        await nc.close()

    asyncio.run(main())
