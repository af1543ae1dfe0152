"""Readiness and health probes: HTTP GET 2xx, TCP connect, or a log line already seen."""

from __future__ import annotations

import asyncio

import aiohttp

from dynamo.core.plan import ProbeSpec


class Prober:
    """Runs probes; owns one HTTP session for all of them."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def check(self, probe: ProbeSpec, log_matched: bool, live: bool = False) -> bool:
        """Whether the probe passes; ``live``: the health check of a ready process (``live_url`` if set)."""
        if probe.kind == "log":
            return log_matched
        if probe.kind == "tcp":
            return await self._tcp(probe)
        return await self._http(probe, probe.http_url(live))

    async def warmup(self, probe: ProbeSpec) -> bool:
        """The one-off request a process must answer before it is ready (no-op without one)."""
        if not probe.warmup_url:
            return True
        session = self._http_session()
        try:
            async with session.post(probe.warmup_url, json=probe.warmup_body,
                                    timeout=aiohttp.ClientTimeout(total=max(probe.timeout, 30.0))) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    def _http_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True), trust_env=False
            )
        return self._session

    async def _tcp(self, probe: ProbeSpec) -> bool:
        """The port accepts a connection and, with ``greeting``, the server says it within the timeout."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(probe.host, probe.port), probe.timeout)
        except (OSError, asyncio.TimeoutError):
            return False
        try:
            if probe.greeting:
                first = await asyncio.wait_for(reader.readexactly(len(probe.greeting)), probe.timeout)
                return first == probe.greeting.encode()
            return True
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def _http(self, probe: ProbeSpec, url: str | None) -> bool:
        try:
            async with self._http_session().get(url, timeout=aiohttp.ClientTimeout(total=probe.timeout)) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
