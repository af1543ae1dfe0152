"""The router's KV index: which worker holds which block, fed by normalized KV events.

Engines name blocks by their own hashes (vLLM: sha256-derived, SGLang: its own). The index
keys blocks by *our* chained hash of the token ids the event carries, and keeps, per
worker, the engine hash → our hash map needed to apply removals and to chain children.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from dynamo.core.hashing import chain_block_hashes


@dataclass
class _WorkerBlocks:
    ours: dict[int, int] = field(default_factory=dict)  # engine hash -> our hash
    confirmed: dict[int, int] = field(default_factory=dict)  # our hash -> how many engine blocks carry it
    expires: dict[int, float] = field(default_factory=dict)  # predicted: our hash -> deadline


class KvIndex:
    """Holders are kept as an int bitmask per block (bit i = worker i): no per-block container
    objects, so a million-block index costs the garbage collector nothing and overlap is ``&``."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.holders: dict[int, int] = {}
        self.workers: dict[str, _WorkerBlocks] = {}
        self.bits: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._deadlines: list[tuple[float, int, str, tuple[int, ...]]] = []
        self._seq = 0
        self.events_applied = 0
        self.orphan_blocks = 0  # stored blocks whose parent we never saw

    # ------------------------------------------------------------ events

    def _bit(self, worker: str) -> int:
        bit = self.bits.get(worker)
        if bit is None:
            used = set(self.bits.values())
            bit = next(i for i in range(len(used) + 1) if 1 << i not in used)
            bit = self.bits[worker] = 1 << bit
            self._names[bit] = worker
        return bit

    def stored(self, worker: str, engine_hashes: Sequence[int], parent: int | None, token_ids: Sequence[int],
               block_size: int | None = None) -> None:
        blocks = self.workers.setdefault(worker, _WorkerBlocks())
        bit = self._bit(worker)
        size = block_size or self.block_size
        parent_ours = None
        if parent is not None:
            parent_ours = blocks.ours.get(parent)
            if parent_ours is None:
                self.orphan_blocks += len(engine_hashes)
                return
        ours = chain_block_hashes(token_ids[:len(engine_hashes) * size], size, parent_ours)
        holders = self.holders
        confirmed = blocks.confirmed
        for engine_hash, our_hash in zip(engine_hashes, ours):
            if engine_hash in blocks.ours:
                continue
            blocks.ours[engine_hash] = our_hash
            confirmed[our_hash] = confirmed.get(our_hash, 0) + 1
            holders[our_hash] = holders.get(our_hash, 0) | bit
        self.events_applied += 1

    def removed(self, worker: str, engine_hashes: Sequence[int]) -> None:
        blocks = self.workers.get(worker)
        if blocks is None:
            return
        for engine_hash in engine_hashes:
            our_hash = blocks.ours.pop(engine_hash, None)
            if our_hash is None:
                continue
            left = blocks.confirmed.get(our_hash, 1) - 1
            if left > 0:
                blocks.confirmed[our_hash] = left
                continue
            blocks.confirmed.pop(our_hash, None)
            if our_hash not in blocks.expires:
                self._drop(our_hash, worker)
        self.events_applied += 1

    def cleared(self, worker: str) -> None:
        blocks = self.workers.pop(worker, None)
        if blocks:
            for our_hash in (*blocks.confirmed, *blocks.expires):
                self._drop(our_hash, worker)
        self.events_applied += 1

    def remove_worker(self, worker: str) -> None:
        self.cleared(worker)
        bit = self.bits.pop(worker, None)
        if bit is not None:
            del self._names[bit]

    def _drop(self, our_hash: int, worker: str) -> None:
        holders = self.holders.get(our_hash)
        bit = self.bits.get(worker)
        if holders is not None and bit is not None:
            holders &= ~bit
            if holders:
                self.holders[our_hash] = holders
            else:
                del self.holders[our_hash]

    # ------------------------------------------------------------ predictions

    def predict(self, worker: str, hashes: Sequence[int], ttl: float, now: float | None = None) -> None:
        """Assume ``worker`` caches these blocks for ``ttl`` seconds: the whole truth in approximate mode
        (no events), and a bridge until the events arrive otherwise (requests sharing a prefix that
        arrive together follow the first one)."""
        if not hashes:
            return
        blocks = self.workers.setdefault(worker, _WorkerBlocks())
        bit = self._bit(worker)
        deadline = (now or time.monotonic()) + ttl
        holders = self.holders
        for our_hash in hashes:
            blocks.expires[our_hash] = deadline
            holders[our_hash] = holders.get(our_hash, 0) | bit
        self._seq += 1
        heapq.heappush(self._deadlines, (deadline, self._seq, worker, tuple(hashes)))

    def expire(self, now: float | None = None) -> int:
        """Forget predictions past their deadline; cheap when nothing is due (a heap of deadlines)."""
        now = now or time.monotonic()
        dropped = 0
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, _, worker, hashes = heapq.heappop(heap)
            blocks = self.workers.get(worker)
            if blocks is None:
                continue
            for our_hash in hashes:
                if blocks.expires.get(our_hash) == deadline:  # not predicted again since
                    del blocks.expires[our_hash]
                    if our_hash not in blocks.confirmed:
                        self._drop(our_hash, worker)
                    dropped += 1
        return dropped

    # ------------------------------------------------------------ queries

    def overlap(self, hashes: Sequence[int]) -> dict[str, int]:
        """For each worker, how many leading blocks of ``hashes`` it holds."""
        depth_of: dict[int, int] = {}
        active = -1
        holders = self.holders
        depth = 0
        for depth, our_hash in enumerate(hashes):
            mask = holders.get(our_hash, 0) & active
            if not mask:
                break
            if mask != active:
                dropped = active & ~mask if active != -1 else 0
                self._record(depth_of, dropped, depth)
                active = mask
        else:
            depth = len(hashes)
        if active != -1:
            self._record(depth_of, active, depth)
        return {self._names[bit]: d for bit, d in depth_of.items() if d}

    def _record(self, depth_of: dict[int, int], mask: int, depth: int) -> None:
        while mask:
            low = mask & -mask
            if low in self._names:
                depth_of[low] = depth
            mask ^= low

    def block_count(self, worker: str) -> int:
        blocks = self.workers.get(worker)
        return len(blocks.confirmed.keys() | blocks.expires.keys()) if blocks else 0

    @property
    def total_blocks(self) -> int:
        return len(self.holders)
