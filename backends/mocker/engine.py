"""The asyncio engine loop: plan a step, wait the modelled time, apply it.

One task runs steps back to back while there is work. Step ``k`` ends at a
virtual deadline ``start + sum(durations)``, so timer overshoot on one step
is absorbed by the next and the average inter-token latency matches the
timing model (the loop resynchronises when it falls more than
``MAX_LAG`` behind, e.g. on an overloaded machine). With zero durations
(``--speedup-ratio 0``) the loop runs steps back to back and yields to the
HTTP layer after any step with prefill work, waking only the requests that
got their first token, and every ``ZERO_DELAY_YIELD`` (1 ms, or as long as
the previous hand-over took, at most 5 ms), waking every request with
output; a stream then writes the several tokens it received as several SSE
events in one write.

With ``--kv-transfer nixl`` (:mod:`.nixl_transfer`) each step also writes the
KV bytes of the tokens it computes into a host-memory pool, and a remote
prefill's transfer is a real NIXL pull awaited in its own task instead of a
modelled delay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

from .scheduler import Scheduler, Sequence
from .timing import PerfModel, transfer_seconds

if TYPE_CHECKING:  # zmq and nixl are imported only when enabled
    from .kv_events import KvEventPublisher
    from .nixl_transfer import NixlKvTransfer

__all__ = ["Engine"]

log = logging.getLogger("dynamo.mocker.engine")


class Engine:
    """Drives a :class:`Scheduler` in real time and publishes KV events."""

    MAX_LAG = 0.05
    ZERO_DELAY_YIELD = 0.001

    def __init__(
        self,
        scheduler: Scheduler,
        perf: PerfModel,
        *,
        publisher: "KvEventPublisher | None" = None,
        kv_bytes_per_token: int = 131072,
        kv_transfer_bandwidth_gbps: float = 25.0,
        lease_seconds: float = 30.0,
        kv_transfer: "NixlKvTransfer | None" = None,
    ) -> None:
        self.scheduler = scheduler
        self.perf = perf
        self.publisher = publisher
        self.kv_bytes_per_token = kv_bytes_per_token
        self.kv_transfer_bandwidth_gbps = kv_transfer_bandwidth_gbps
        self.lease_seconds = lease_seconds
        # With NIXL, steps write real KV bytes and transfers are real pulls
        # instead of modelled delays.
        self.kv_transfer = kv_transfer
        self._pulls: set[asyncio.Task] = set()
        # Called once a remote prefill's transfer is over, whether or not it succeeded.
        self.on_transfer_done: Callable[[Sequence], None] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self.steps = 0
        self.error: BaseException | None = None
        self._idle_since: float | None = None
        scheduler.on_finish = self._on_finish
        scheduler.wake_every_token = perf.enabled

    # ----------------------------------------------------------- public API
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mocker-engine")
            self._task.add_done_callback(self._on_exit)

    @property
    def alive(self) -> bool:
        return self.error is None

    def _on_exit(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.error = task.exception()
            log.error("engine loop died", exc_info=self.error)
            sched = self.scheduler
            for seq in [*sched.running, *sched.waiting, *sched.transferring.values()]:
                seq.finished = True
                seq.finish_reason = "abort"
                seq.wake()
                if seq.done_waiter is not None and not seq.done_waiter.done():
                    seq.done_waiter.set_result(None)

    def submit(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        if self._idle_since is None:
            # The simulated GPU starts when the first request reaches an idle
            # engine, not when the loop gets around to planning the step.
            self._idle_since = seq.arrival
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        """Abort ``seq`` and free its blocks immediately."""
        if self.scheduler.abort(seq, time.monotonic()):
            self._wake.set()

    def release_lease(self, request_id: str) -> bool:
        released = self.scheduler.release_lease(request_id)
        if released:
            self._wake.set()
        return released

    def reset_prefix_cache(self) -> bool:
        ok = self.scheduler.kv.reset_prefix_cache()
        self._flush_events()
        return ok

    async def shutdown(self) -> None:
        """Abort everything in flight and stop the loop."""
        sched = self.scheduler
        now = time.monotonic()
        for seq in [*sched.running, *sched.waiting, *sched.transferring.values()]:
            sched.abort(seq, now)
        for request_id in list(sched.leases):
            sched.release_lease(request_id)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in list(self._pulls):
            task.cancel()
        if self._pulls:
            await asyncio.gather(*self._pulls, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # ------------------------------------------------------------- internals
    def _later(self, delay: float, fn: Callable, *args) -> None:
        loop = asyncio.get_running_loop()
        holder: list[asyncio.TimerHandle] = []

        def fire() -> None:
            self._timers.discard(holder[0])
            fn(*args)

        handle = loop.call_later(delay, fire)
        holder.append(handle)
        self._timers.add(handle)

    def _on_finish(self, seq: Sequence) -> None:
        if seq.hold and seq.finish_reason != "abort":
            self._later(self.lease_seconds, self.release_lease, seq.request_id)

    def _start_transfers(self, seqs: list[Sequence]) -> None:
        if self.kv_transfer is not None:
            loop = asyncio.get_running_loop()
            for seq in seqs:
                task = loop.create_task(self._pull(seq))
                self._pulls.add(task)
                task.add_done_callback(self._pulls.discard)
            return
        for seq in seqs:
            delay = transfer_seconds(
                seq.transfer_tokens,
                self.kv_bytes_per_token,
                self.kv_transfer_bandwidth_gbps,
                self.perf.speedup_ratio,
            )
            self.scheduler.metrics.kv_transfer_seconds.observe(delay)
            self._later(delay, self._transfer_done, seq)

    async def _pull(self, seq: Sequence) -> None:
        assert self.kv_transfer is not None
        start = time.monotonic()
        try:
            ok = await self.kv_transfer.pull(seq, self.scheduler)
        except Exception:  # a bug in the pull must not leave the request parked for ever
            log.exception("KV pull for %s crashed; computing its prompt here", seq.request_id)
            ok = False
        self.scheduler.metrics.kv_transfer_seconds.observe(time.monotonic() - start)
        if ok:
            self._transfer_done(seq)
        elif self.scheduler.fail_transfer(seq):
            self._wake.set()
            if self.on_transfer_done is not None:
                self.on_transfer_done(seq)

    def _transfer_done(self, seq: Sequence) -> None:
        if self.scheduler.finish_transfer(seq):
            self._flush_events()
            self._wake.set()
            if self.on_transfer_done is not None:
                self.on_transfer_done(seq)

    def _flush_events(self) -> None:
        events = self.scheduler.kv.take_events()
        if events and self.publisher is not None:
            self.publisher.publish(events)

    async def _run(self) -> None:
        clock = time.monotonic
        sched = self.scheduler
        metrics = sched.metrics
        perf = self.perf
        wake = self._wake
        vclock: float | None = None
        max_lag = self.MAX_LAG
        base_yield = yield_every = self.ZERO_DELAY_YIELD
        last_yield = clock()
        while True:
            if not sched.has_schedulable_work():
                vclock = None
                self._idle_since = None
                wake.clear()
                await wake.wait()
                continue
            now = clock()
            batch = sched.schedule(now)
            if batch.transfers:
                self._start_transfers(batch.transfers)
            if not batch:
                # Everything left waits for blocks, a transfer or a lease.
                self._flush_events()
                sched.flush_outputs()
                vclock = None
                self._idle_since = None
                wake.clear()
                await wake.wait()
                continue
            duration = perf.step_seconds(batch.prefill_tokens, batch.num_decodes, batch.kv_usage)
            if duration > 0:
                if vclock is None or vclock < now - max_lag:
                    start = self._idle_since
                    vclock = start if start is not None and now - max_lag <= start <= now else now
                vclock += duration
                delay = vclock - clock()
                await asyncio.sleep(delay if delay > 0 else 0)
            self.steps += 1
            metrics.steps += 1
            metrics.computed_prefill_tokens += batch.prefill_tokens
            if self.kv_transfer is not None:
                self.kv_transfer.store(batch, sched)
            sched.complete(batch, clock())
            self._flush_events()
            if duration <= 0 and clock() - last_yield >= yield_every:
                sched.flush_outputs()
                t = clock()
                await asyncio.sleep(0)
                last_yield = clock()
                # Keep the HTTP writes at most about half of the loop's time.
                yield_every = min(0.005, max(base_yield, last_yield - t))
            elif batch.prefill_tokens:
                # First tokens (already woken) go out before the next step is planned.
                await asyncio.sleep(0)
