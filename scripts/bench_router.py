#!/usr/bin/env python3
"""Router speed: decision latency with 16 workers × 100,000 indexed blocks, and KV event ingestion.

Baseline side by side: a decision with an empty index (the fixed cost of a decision), so
the ratio shows what the index adds.

    python scripts/bench_router.py [--workers 16] [--blocks 100000] [--decisions 5000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import msgspec

from dynamo.core.discovery import Instance
from dynamo.core.router import Router, apply_batch

BLOCK = 16


def build_batches(workers: int, blocks: int, rng: random.Random) -> list[tuple[str, bytes]]:
    """vLLM-format event batches: each worker stores `blocks` blocks in chains of 64."""
    batches = []
    for w in range(workers):
        stored = 0
        while stored < blocks:
            n = min(64, blocks - stored)
            tokens = [rng.randrange(32000) for _ in range(n * BLOCK)]
            hashes = [rng.getrandbits(64) for _ in range(n)]
            event = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None, "token_ids": tokens,
                     "block_size": BLOCK, "lora_id": None, "medium": "GPU", "lora_name": None}
            batches.append((f"ns.w{w}", msgspec.msgpack.encode([time.time(), [event], 0])))
            stored += n
    return batches


def decisions(router: Router, prompts: list[list[int]]) -> list[float]:
    from dynamo.core.hashing import chain_block_hashes

    out = []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        hashes = chain_block_hashes(prompt, BLOCK)
        router.route(f"r{i}", hashes, "agg")
        router.load_event("finished", f"r{i}")
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=100_000, help="Blocks per worker.")
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    args = parser.parse_args()
    rng = random.Random(0)
    instances = {f"ns.w{w}": Instance(f"ns.w{w}", {"url": f"http://w{w}", "role": "agg"}) for w in range(args.workers)}

    full = Router("ns", BLOCK, use_events=False, rng=random.Random(1))
    full.sync(instances)
    full.feeds = {k: None for k in instances}  # events drive the index: no approximate predictions
    batches = build_batches(args.workers, args.blocks, rng)
    t0 = time.perf_counter()
    for worker, payload in batches:
        apply_batch(full.index, worker, payload)
    ingest = time.perf_counter() - t0
    total_blocks = args.workers * args.blocks

    empty = Router("ns", BLOCK, use_events=False, rng=random.Random(1))
    empty.sync(instances)
    empty.feeds = {k: None for k in instances}
    prompts = [[rng.randrange(32000) for _ in range(args.prompt_tokens)] for _ in range(args.decisions)]
    base = decisions(empty, prompts)
    ours = decisions(full, prompts)

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1e6

    print(f"index: {args.workers} workers × {args.blocks:,} blocks = {full.index.total_blocks:,} distinct blocks")
    print(f"event ingestion: {len(batches):,} batches, {total_blocks:,} blocks in {ingest:.2f}s = "
          f"{len(batches) / ingest:,.0f} events/s, {total_blocks / ingest:,.0f} blocks/s")
    print(f"decision latency ({args.prompt_tokens}-token prompts, hashing included), microseconds:")
    print(f"{'':12}{'full index':>12}{'empty index':>13}{'ratio':>8}")
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        print(f"{name:12}{pct(ours, q):>12.1f}{pct(base, q):>13.1f}{pct(ours, q) / pct(base, q):>8.2f}")
    print(f"{'mean':12}{statistics.mean(ours) * 1e6:>12.1f}{statistics.mean(base) * 1e6:>13.1f}")


if __name__ == "__main__":
    main()
