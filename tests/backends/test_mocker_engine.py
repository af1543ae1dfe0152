"""The asyncio engine loop in-process (no HTTP, no subprocesses)."""

from __future__ import annotations

import asyncio
import time

from dynamo.backends.mocker.engine import Engine
from dynamo.backends.mocker.kv_cache import KvCache
from dynamo.backends.mocker.scheduler import GenerationVocab, Scheduler, Sequence
from dynamo.backends.mocker.timing import PerfModel, polynomial_decode_ms, polynomial_prefill_ms

VOCAB = GenerationVocab(list(range(10, 20)), {i: f" w{i}" for i in range(10, 20)}, eos_token_id=2)


def engine(speedup: float, blocks: int = 1024) -> Engine:
    return Engine(Scheduler(KvCache(blocks, 16), VOCAB), PerfModel(speedup))


async def collect(seq: Sequence) -> list[float]:
    """Arrival times of each token as the HTTP layer would see them."""
    loop = asyncio.get_running_loop()
    times: list[float] = []
    seen = 0
    while True:
        if len(seq.out) == seen and not seq.finished:
            seq.waiter = loop.create_future()
            await seq.waiter
        now = time.monotonic()
        times += [now] * (len(seq.out) - seen)
        seen = len(seq.out)
        if seq.finished and seen == len(seq.out):
            return times


def test_step_times_follow_the_model():
    async def main():
        e = engine(speedup=10)
        e.start()
        seq = Sequence("r", list(range(100, 100 + 1000)), 40, seed=1, arrival=time.monotonic())
        e.submit(seq)
        times = await collect(seq)
        await e.shutdown()
        return seq, times

    seq, times = asyncio.run(main())
    assert len(times) == 40 and seq.finish_reason == "length"
    ttft = seq.first_token_time - seq.arrival
    assert abs(ttft - polynomial_prefill_ms(1000) / 10_000) < 0.004
    itl = (seq.last_token_time - seq.first_token_time) / 39
    expected = polynomial_decode_ms(64 / 1024) / 10_000  # ~0.6 ms per step at u ~ 0.06
    assert abs(itl - expected) / expected < 0.25  # the virtual clock absorbs timer jitter


def test_zero_speedup_batches_tokens_and_abort_frees_blocks():
    async def main():
        e = engine(speedup=0)
        e.start()
        seqs = [Sequence(f"r{i}", [5 + i] * 40, 200, seed=i, arrival=time.monotonic()) for i in range(8)]
        for s in seqs:
            e.submit(s)
        done = await asyncio.gather(*(collect(s) for s in seqs[:4]))
        # The other four are still running: abort them.
        victim = seqs[5]
        if not victim.finished:
            e.abort(victim)
        await asyncio.gather(*(collect(s) for s in seqs[4:]))
        kv = e.scheduler.kv
        await e.shutdown()
        return seqs, done, kv

    seqs, done, kv = asyncio.run(main())
    assert all(len(t) == 200 for t in done)
    assert kv.num_used == 0
    assert seqs[5].finish_reason in ("abort", "length")


def test_shutdown_aborts_everything_in_flight():
    async def main():
        e = engine(speedup=1)
        e.start()
        seq = Sequence("r", [7] * 64, 10_000, seed=1, arrival=time.monotonic())
        e.submit(seq)
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await e.shutdown()
        return seq, time.monotonic() - t0, e.scheduler.kv

    seq, took, kv = asyncio.run(main())
    assert seq.finished and seq.finish_reason == "abort" and kv.num_used == 0 and took < 0.5
