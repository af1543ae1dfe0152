"""Paged KV-cache block pool with prefix caching and LRU eviction.

The pool mirrors vLLM's v1 block pool closely enough that the KV events it
produces mean the same thing:

- blocks are fixed-size pages identified by an integer id;
- a block that holds a *full* page of computed tokens is registered in the
  prefix cache under its chained hash (``BlockStored``);
- blocks whose reference count drops to zero go to the tail of a free queue
  but keep their hash, so a later request can still hit them;
- allocation pops from the head of the free queue (least recently freed
  first); popping a block that still carries a hash evicts it from the prefix
  cache (``BlockRemoved``).

Block hashes follow the router's scheme (DESIGN.md, ``dynamo.core.hashing``):
xxh3-64 of the block's token ids as little-endian u32, chained with the parent
hash, so the mocker's own hashes equal the router's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

from dynamo.core.hashing import chain_block_hashes

__all__ = ["chain_block_hashes", "KvCache", "NoFreeBlocks"]

class NoFreeBlocks(Exception):
    """Raised by :meth:`KvCache.allocate` when the pool cannot satisfy a request."""


class KvCache:
    """A fixed pool of KV blocks with an optional prefix cache.

    Events are accumulated as plain dicts in vLLM's field order and drained
    with :meth:`take_events`; the caller decides when to publish them (once
    per engine step, like vLLM).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        medium: str = "GPU",
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.medium = medium
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # Free blocks in eviction order (head = next to be reused).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self._events: list[dict] = []
        self.num_evictions = 0

    # ------------------------------------------------------------------ state
    @property
    def num_free(self) -> int:
        """Blocks not referenced by any request (cached-but-idle ones included)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests, as vLLM's kv_cache_usage_perc."""
        return (self.num_blocks - len(self._free)) / self.num_blocks

    def cached_hashes(self) -> set[int]:
        return set(self.cached)

    # ------------------------------------------------------------ prefix hits
    def match_prefix(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix of ``hashes`` (at most ``max_blocks``).

        Pure lookup: reference counts are not touched.
        """
        if not self.enable_prefix_caching:
            return []
        out: list[int] = []
        cached = self.cached
        for h in hashes[:max_blocks]:
            block = cached.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def blocks_needed(self, hit_blocks: Iterable[int], num_new: int) -> int:
        """Free-queue entries consumed by taking ``hit_blocks`` plus ``num_new`` fresh blocks."""
        ref = self.ref_count
        return num_new + sum(1 for b in hit_blocks if ref[b] == 0)

    def touch(self, blocks: Iterable[int]) -> None:
        """Take a reference on existing (prefix-hit) blocks."""
        ref = self.ref_count
        free = self._free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Pop ``n`` blocks from the head of the free queue, evicting cached ones."""
        if n > len(self._free):
            raise NoFreeBlocks(f"need {n} blocks, {len(self._free)} free")
        out: list[int] = []
        free = self._free
        ref = self.ref_count
        for _ in range(n):
            b, _unused = free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                self._evict(b, h)
            ref[b] = 1
            out.append(b)
        return out

    def _evict(self, block: int, h: int) -> None:
        self.block_hash[block] = None
        if self.cached.get(h) == block:
            del self.cached[h]
        self.num_evictions += 1
        self._events.append({"type": "BlockRemoved", "block_hashes": [h], "medium": self.medium})

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; tail blocks are queued for eviction first."""
        ref = self.ref_count
        free = self._free
        for b in reversed(blocks):
            r = ref[b] - 1
            ref[b] = r
            if r == 0:
                free[b] = None
            elif r < 0:  # pragma: no cover - a bug, keep the traceback
                raise AssertionError(f"block {b} freed twice")

    # ------------------------------------------------------------ registering
    def register_full_blocks(
        self,
        blocks: Sequence[int],
        hashes: Sequence[int],
        token_ids: Sequence[int],
        start: int,
        end: int,
    ) -> None:
        """Register blocks ``start..end-1`` of a sequence as full, cached blocks.

        ``blocks`` and ``hashes`` are the sequence's block table and chained
        hashes; ``token_ids`` its tokens. A block whose hash is already cached
        elsewhere stays anonymous (vLLM keeps one block per hash too), and
        blocks that already carry a hash (prefix hits) are skipped. One
        ``BlockStored`` is emitted per contiguous run of newly cached blocks.
        """
        if not self.enable_prefix_caching or start >= end:
            return
        bs = self.block_size
        run_start = -1
        block_hash = self.block_hash
        cached = self.cached
        for i in range(start, end + 1):
            new = False
            if i < end:
                b = blocks[i]
                h = hashes[i]
                if block_hash[b] is None and h not in cached:
                    block_hash[b] = h
                    cached[h] = b
                    new = True
            if new:
                if run_start < 0:
                    run_start = i
            elif run_start >= 0:
                self._events.append(
                    {
                        "type": "BlockStored",
                        "block_hashes": list(hashes[run_start:i]),
                        "parent_block_hash": hashes[run_start - 1] if run_start > 0 else None,
                        "token_ids": list(token_ids[run_start * bs : i * bs]),
                        "block_size": bs,
                        "lora_id": None,
                        "medium": self.medium,
                        "lora_name": None,
                    }
                )
                run_start = -1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed when no block is referenced (as vLLM)."""
        if self.num_used:
            return False
        for h, b in self.cached.items():
            self.block_hash[b] = None
        self.cached.clear()
        self._events.append({"type": "AllBlocksCleared"})
        return True

    def take_events(self) -> list[dict]:
        events = self._events
        if events:
            self._events = []
        return events
