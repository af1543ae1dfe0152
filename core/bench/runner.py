"""Drives the load: closed loop (fixed concurrency), open loop (Poisson or gamma arrivals)
or trace replay, with warmup, a request or time budget, and sweeps over load points.

Everything runs on one event loop (uvloop when installed). In open-loop mode each
arrival's intended send time is recorded next to the actual one, so ``schedule_lag_ms``
shows whether the generator kept up. A request that is due is sent at once even if it
is late: the achieved rate never silently drops because of a slow loop.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from dynamo.core.bench.client import EndpointClient, RequestRecord, ServerInfo, make_session
from dynamo.core.bench.metrics import distribution, summarize
from dynamo.core.bench.workloads import BenchTokenizer, MultiTurnWorkload, Session

__all__ = ["LoadPoint", "BenchSettings", "LiveStats", "PointResult", "BenchResult", "BenchInterrupted",
           "arrival_intervals", "run_benchmark", "run_async"]


@dataclass(frozen=True)
class LoadPoint:
    """One load level: a fixed concurrency, or an arrival rate (optionally capped), or trace timestamps."""

    concurrency: int | None = None
    request_rate: float | None = None  # requests/s; math.inf sends everything at once
    burstiness: float = 1.0
    max_concurrency: int | None = None
    trace: bool = False

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"c{self.concurrency}"
        if self.request_rate is not None:
            return "rate-inf" if math.isinf(self.request_rate) else f"rate-{self.request_rate:g}"
        return "trace"

    @property
    def x(self) -> float | None:
        """The value plots put on the x axis."""
        if self.concurrency is not None:
            return float(self.concurrency)
        return self.request_rate

    def describe(self) -> dict:
        return {"label": self.label, "concurrency": self.concurrency,
                "request_rate": None if self.request_rate is None else
                ("inf" if math.isinf(self.request_rate) else self.request_rate),
                "burstiness": self.burstiness, "max_concurrency": self.max_concurrency, "trace": self.trace}


@dataclass
class BenchSettings:
    num_requests: int | None = None
    duration: float | None = None
    warmup: int = 0
    grace_period: float = 30.0
    seed: int = 0
    turn_delay: float = 0.0


@dataclass
class LiveStats:
    """Counters the live display reads; updated inline by the runner (same loop, no locks)."""

    label: str = ""
    phase: str = "starting"
    target: int | None = None
    duration: float | None = None
    started: float = field(default_factory=time.perf_counter)
    issued: int = 0
    completed: int = 0
    failed: int = 0
    in_flight: int = 0
    output_tokens: int = 0

    def reset(self, label: str, phase: str, target: int | None, duration: float | None) -> None:
        self.label, self.phase, self.target, self.duration = label, phase, target, duration
        self.started = time.perf_counter()
        self.issued = self.completed = self.failed = self.in_flight = self.output_tokens = 0


@dataclass
class PointResult:
    point: LoadPoint
    records: list[RequestRecord]
    summary: dict


@dataclass
class BenchResult:
    config: dict
    server: ServerInfo
    points: list[PointResult]


class BenchInterrupted(Exception):
    """The benchmark was cancelled (a signal) after something was measured: ``result`` holds the points
    that finished and, marked ``interrupted`` in its summary, the part of the current one that did."""

    def __init__(self, result: BenchResult):
        super().__init__(f"interrupted after {len(result.points)} load point(s)")
        self.result = result


def arrival_intervals(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Gaps between arrivals: gamma(shape=burstiness, mean=1/rate); burstiness 1 is Poisson, inf is constant."""
    if math.isinf(rate) or math.isinf(burstiness):
        gap = 0.0 if math.isinf(rate) else 1.0 / rate
        while True:
            yield gap
    theta = 1.0 / (rate * burstiness)
    while True:
        yield rng.gammavariate(burstiness, theta)


class _PointRun:
    """One load point: issues requests under a budget and collects their records."""

    def __init__(self, client: EndpointClient, point: LoadPoint, settings: BenchSettings,
                 tokenizer: BenchTokenizer | None, stats: LiveStats, multi_turn: bool,
                 num_requests: int | None, duration: float | None):
        self.client, self.point, self.settings = client, point, settings
        self.tokenizer, self.stats, self.multi_turn = tokenizer, stats, multi_turn
        self.num_requests, self.duration = num_requests, duration
        self.records: list[RequestRecord] = []
        self.loop_lag: list[float] = []
        self.cancelled = 0
        self.issued = 0
        self.unsent: list[Session] = []  # drawn but not sent (time ran out): the next point sends them first
        self.t0 = 0.0
        self.cap = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None
        self._tasks: set[asyncio.Task] = set()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _time_left(self) -> bool:
        return self.duration is None or time.perf_counter() - self.t0 < self.duration

    def _can_start(self) -> bool:
        """Whether another session may start: time and request budget left. Checked before a session
        is drawn, so a point never draws a prompt it will not send (the next point sends it)."""
        return self._time_left() and (self.num_requests is None or self.issued < self.num_requests)

    def _take(self, sess: Session) -> int:
        """Reserve a session's requests from the budget: all its turns when they fit, else what
        is left. A conversation, once started, is never cut short by another one starting.
        Returns how many turns may be sent (0: the budget or the time is used up)."""
        if not self._time_left():
            return 0
        turns = len(sess.turns)
        if self.num_requests is not None:
            turns = min(turns, self.num_requests - self.issued)
            if turns <= 0:
                return 0
        self.issued += turns
        return turns

    async def _session(self, sess: Session, scheduled: float | None, turns: int) -> None:
        """Send the first ``turns`` turns of a session one after the other (already reserved)."""
        if self.cap is not None:
            async with self.cap:
                await self._turns(sess, scheduled, turns)
        else:
            await self._turns(sess, scheduled, turns)

    async def _turns(self, sess: Session, scheduled: float | None, reserved: int) -> None:
        history: list[dict] = []
        history_text = ""
        history_tokens: int | None = 0
        for k, turn in enumerate(sess.turns[:reserved]):
            if k > 0:
                if self.settings.turn_delay > 0:
                    await asyncio.sleep(self.settings.turn_delay)
                if not self._time_left():
                    return
            self.stats.issued += 1
            rec = RequestRecord(index=len(self.records), session=sess.id, turn=k,
                                scheduled=scheduled if k == 0 else None)
            if self.client.endpoint == "chat":
                prompt: Any = history + [{"role": "user", "content": turn.prompt}] if history else turn.prompt
            else:
                prompt = history_text + turn.prompt
            if turn.input_tokens is not None and history_tokens is not None:
                rec.input_tokens_client = history_tokens + turn.input_tokens
            self.stats.in_flight += 1
            try:
                await self.client.send(rec, prompt, turn.output_tokens, self.t0)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.stats.in_flight -= 1
            rec.index = len(self.records)
            self.records.append(rec)
            if rec.ok:
                self.stats.completed += 1
                self.stats.output_tokens += rec.output_tokens_server or len(rec.chunk_offsets)
            else:
                self.stats.failed += 1
                return  # a conversation stops at its first failure
            if self.multi_turn and k + 1 < len(sess.turns):
                history = history + [{"role": "user", "content": turn.prompt},
                                     {"role": "assistant", "content": rec.text}]
                history_text += turn.prompt + rec.text
                if turn.input_tokens is None or history_tokens is None:
                    history_tokens = None
                else:
                    reply = self.tokenizer.count(rec.text) if self.tokenizer else rec.output_tokens_server
                    history_tokens = None if reply is None else history_tokens + turn.input_tokens + reply

    async def run(self, sessions: Iterator[Session]) -> None:
        self.t0 = time.perf_counter()
        monitor = asyncio.create_task(self._watch_loop())
        try:
            if self.point.concurrency is not None:
                await self._closed_loop(sessions, self.point.concurrency)
            else:
                await self._open_loop(sessions)
        finally:
            monitor.cancel()
            # Interrupted (Ctrl-C, SIGTERM): no user may keep sending, and a cancelled asyncio.wait in
            # _drain leaves them running; cancel them before the session closes under them.
            leftover = list(self._tasks)
            for task in leftover:
                task.cancel()
            if leftover:
                await asyncio.gather(*leftover, return_exceptions=True)

    async def _watch_loop(self, period: float = 0.005) -> None:
        """Sample how late the event loop wakes up: when it is busy, every timestamp is late too."""
        while True:
            t = time.perf_counter()
            await asyncio.sleep(period)
            self.loop_lag.append(max(0.0, time.perf_counter() - t - period))

    async def _closed_loop(self, sessions: Iterator[Session], concurrency: int) -> None:
        async def user() -> None:
            while self._can_start():
                sess = next(sessions, None)
                if sess is None:
                    return
                turns = self._take(sess)
                if not turns:  # time ran out while it was being built
                    self.unsent.append(sess)
                    return
                await self._session(sess, None, turns)

        await self._drain([self._spawn(user()) for _ in range(concurrency)])

    async def _open_loop(self, sessions: Iterator[Session]) -> None:
        point = self.point
        rng = random.Random(self.settings.seed)
        gaps = arrival_intervals(point.request_rate or math.inf, point.burstiness, rng) if not point.trace else None
        t_sched = 0.0
        t_first: float | None = None
        n = 0
        while self._can_start():
            sess = next(sessions, None)
            if sess is None:
                break
            if point.trace:
                if t_first is None:
                    t_first = sess.timestamp or 0.0
                t_sched = (sess.timestamp or 0.0) - t_first
            elif n > 0:
                t_sched += next(gaps)  # type: ignore[arg-type]
            if self.duration is not None and t_sched >= self.duration:
                self.unsent.append(sess)
                break
            delay = self.t0 + t_sched - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            turns = self._take(sess)
            if not turns:
                self.unsent.append(sess)
                break
            self._spawn(self._session(sess, t_sched, turns))
            n += 1
        await self._drain(list(self._tasks))

    async def _drain(self, tasks: list[asyncio.Task]) -> None:
        """Wait for in-flight requests; in duration mode at most the grace period, then cancel."""
        if not tasks:
            return
        if self.duration is None:
            await asyncio.gather(*tasks, return_exceptions=True)
            return
        remaining = self.duration - (time.perf_counter() - self.t0)
        timeout = max(0.0, remaining) + self.settings.grace_period
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def _finalize(records: list[RequestRecord], tokenizer: BenchTokenizer | None) -> None:
    """Client-side token counts (batched, after the load) and per-chunk token fallbacks."""
    if tokenizer is not None:
        ok = [r for r in records if r.ok]
        for r, n in zip(ok, tokenizer.count_batch([r.text for r in ok])):
            r.output_tokens_client = n
    for r in records:
        if r.ok and r.tokens_source == "chunks" and r.chunk_texts is not None:
            total = r.output_tokens
            if total is not None and total != len(r.chunk_offsets) and tokenizer is not None:
                r.chunk_tokens = [max(0, n) for n in tokenizer.count_batch(r.chunk_texts)]
                r.tokens_source = "tokenizer"
        if r.ok and r.output_tokens_client is None and r.output_tokens_server is None:
            r.output_tokens_client = sum(r.chunk_tokens) if r.chunk_tokens else None
        r.chunk_texts = None
        r.text = ""


async def run_benchmark(
    *,
    url: str,
    model: str | None,
    endpoint: str,
    stream: bool,
    ignore_eos: bool,
    extra_body: dict | None,
    api_key: str | None,
    workload: Any,
    points: list[LoadPoint],
    settings: BenchSettings,
    tokenizer: BenchTokenizer | None,
    goodput: dict[str, float],
    timeout: float,
    ready_timeout: float,
    stats: LiveStats | None = None,
    on_point: Callable[[PointResult], None] | None = None,
    continuous_usage: bool = True,
) -> BenchResult:
    """Readiness check, then every load point in order. Returns records and summaries.

    Cancelled (Ctrl-C, SIGTERM, SIGHUP) once something was measured, it raises :class:`BenchInterrupted`
    with the points that finished and the finished requests of the current one.
    """
    stats = stats or LiveStats()
    max_conn = 0
    if all(p.concurrency is not None for p in points):
        max_conn = max(p.concurrency for p in points) + 1  # type: ignore[type-var]
    session = make_session(max_conn, timeout)
    results: list[PointResult] = []
    current: list[_PointRun] = []  # the point being measured, if any
    info: ServerInfo | None = None
    interrupted = False
    try:
        client = EndpointClient(session, url, model or "", endpoint, stream, ignore_eos, continuous_usage,
                                extra_body, api_key)
        stats.reset("", "waiting for the server", None, None)
        info = await client.server_info(model, ready_timeout)
        maker = getattr(workload, "maker", None)
        if tokenizer is None and maker is not None:
            stats.phase = "calibrating prompt lengths"
            await _calibrate(client, maker)
        await _run_points(client, workload, points, settings, tokenizer, goodput, stats, on_point, results, current)
    except asyncio.CancelledError:
        if current and current[0].records:
            results.append(_point_result(current[0], tokenizer, goodput, interrupted=True))
        if not results:
            raise
        interrupted = True
    finally:
        try:
            await session.close()
        except asyncio.CancelledError:  # the signal came as the last point finished: it is complete
            if not results:
                raise
            interrupted = True
    if interrupted:
        task = asyncio.current_task()
        if task is not None and hasattr(task, "uncancel"):  # Python 3.11+; 3.10 keeps no cancel count
            task.uncancel()  # handled: the caller gets what was measured, not a cancellation
        raise BenchInterrupted(BenchResult({}, info, results))  # type: ignore[arg-type]
    return BenchResult({}, info, results)  # type: ignore[arg-type]


async def _run_points(client: EndpointClient, workload: Any, points: list[LoadPoint], settings: BenchSettings,
                      tokenizer: BenchTokenizer | None, goodput: dict[str, float], stats: LiveStats,
                      on_point: Callable[[PointResult], None] | None, results: list[PointResult],
                      current: list[_PointRun]) -> None:
    """Warmup and measure each point in order, appending to ``results``; ``current`` holds the point
    being measured (so an interruption can keep what it measured)."""
    multi_turn = isinstance(workload, MultiTurnWorkload)
    sessions = workload.sessions()
    for point in points:
        current.clear()
        if settings.warmup > 0:
            stats.reset(point.label, "warmup", settings.warmup, None)
            width = point.concurrency or point.max_concurrency or settings.warmup
            warm = _PointRun(client, LoadPoint(concurrency=min(width, settings.warmup)), settings, tokenizer,
                             stats, multi_turn, settings.warmup, None)
            await warm.run(sessions)
            sessions = itertools.chain(warm.unsent, sessions)
        num = settings.num_requests
        if num is None and settings.duration is None and not point.trace:
            num = _default_requests(point)
        stats.reset(point.label, "measuring", num, settings.duration)
        run = _PointRun(client, point, settings, tokenizer, stats, multi_turn, num, settings.duration)
        ahead = _prebuild_count(point, num, settings.duration)
        if ahead:
            # Build the prompts before the clock starts so generation never delays sending.
            sessions = itertools.chain(await _build_ahead(sessions, ahead), sessions)
        current.append(run)
        await run.run(sessions)
        current.clear()
        # The next point goes on where this one stopped: no prompt is skipped or sent twice
        # (a dataset smaller than the whole run is cycled by its workload, not here).
        sessions = itertools.chain(run.unsent, sessions)
        stats.phase = "summarizing"
        result = _point_result(run, tokenizer, goodput)
        results.append(result)
        if on_point:
            on_point(result)


def _point_result(run: _PointRun, tokenizer: BenchTokenizer | None, goodput: dict[str, float],
                  interrupted: bool = False) -> PointResult:
    """Summarize one load point; ``interrupted``: it was cut short, the summary covers what finished."""
    _finalize(run.records, tokenizer)
    summary = summarize(run.records, goodput, run.cancelled)
    summary["client_loop_lag_ms"] = distribution([x * 1000 for x in run.loop_lag])
    summary["warnings"] = generator_warnings(summary, run.point)
    summary["interrupted"] = interrupted
    return PointResult(run.point, run.records, summary)


async def _build_ahead(sessions: Iterator[Session], count: int, batch: int = 500) -> list[Session]:
    """The next ``count`` sessions, built in batches that yield to the event loop: building tens of
    thousands of prompts takes seconds, and a Ctrl-C must not wait for it."""
    built: list[Session] = []
    while len(built) < count:
        more = list(itertools.islice(sessions, min(batch, count - len(built))))
        if not more:
            break
        built.extend(more)
        await asyncio.sleep(0)
    return built


async def _calibrate(client: EndpointClient, maker: Any) -> None:
    """Without a tokenizer, learn tokens per prompt word from the server's usage counts."""
    short, long = maker.calibration_texts()
    a = await client.prompt_tokens(short)
    b = await client.prompt_tokens(long)
    if a is not None and b is not None and b > a:
        maker.tokens_per_word = (b - a) / 200.0


def generator_warnings(summary: dict, point: LoadPoint) -> list[str]:
    """Say when the generator itself limited the run (its timestamps then include client delay)."""
    out = []
    loop = summary.get("client_loop_lag_ms") or {}
    if loop.get("p99", 0.0) > 10.0:
        out.append(f"the client's event loop woke up to {loop['p99']:.0f} ms late (p99; p50 {loop['p50']:.1f} ms): "
                   "the generator is near its limit and latencies include up to that much client delay")
    lag = summary.get("schedule_lag_ms") or {}
    if point.max_concurrency is None and lag.get("p50", 0.0) > 5.0:
        out.append(f"requests were sent {lag['p50']:.0f} ms late (p50 schedule lag): the achieved arrival rate "
                   "is below the asked one")
    return out


def _prebuild_count(point: LoadPoint, num: int | None, duration: float | None) -> int:
    """How many sessions to build before a point starts (the rest are built on demand)."""
    if point.trace:
        return 0
    if num is not None:
        return num
    if duration is not None and point.request_rate is not None and not math.isinf(point.request_rate):
        return min(50_000, int(point.request_rate * duration * 1.2) + 10)
    return 0


def _default_requests(point: LoadPoint) -> int:
    if point.concurrency is not None:
        return max(100, 10 * point.concurrency)
    if point.request_rate is not None and not math.isinf(point.request_rate):
        return max(100, int(10 * point.request_rate))
    return 100


def run_async(coro):
    """Run a coroutine on uvloop when it is installed (plain asyncio otherwise)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(coro)
    return uvloop.run(coro)
