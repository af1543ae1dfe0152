"""Unit tests of the block pool, prefix cache and block hashing (no processes)."""

from __future__ import annotations

import struct

import pytest
import xxhash

from dynamo.backends.mocker.kv_cache import KvCache, NoFreeBlocks, chain_block_hashes


def test_chain_hash_matches_the_documented_scheme():
    ids = list(range(10))
    h = chain_block_hashes(ids, 4)
    assert len(h) == 2  # the partial third block is ignored
    b0 = xxhash.xxh3_64_intdigest(struct.pack("<4I", 0, 1, 2, 3))
    b1 = xxhash.xxh3_64_intdigest(struct.pack("<4I", 4, 5, 6, 7))
    assert h[0] == b0
    assert h[1] == xxhash.xxh3_64_intdigest(struct.pack("<QQ", b0, b1))
    assert all(0 <= x < 2**64 for x in h)


def test_chain_hash_is_incremental_and_prefix_sensitive():
    ids = list(range(100, 164))
    full = chain_block_hashes(ids, 16)
    assert chain_block_hashes(ids[32:], 16, parent_hash=full[1]) == full[2:]
    other = chain_block_hashes([7] + ids[1:], 16)
    assert all(a != b for a, b in zip(full, other))  # a changed first block changes every hash


def test_allocate_free_and_usage():
    kv = KvCache(4, 2)
    blocks = kv.allocate(3)
    assert kv.num_used == 3 and kv.usage == pytest.approx(0.75)
    with pytest.raises(NoFreeBlocks):
        kv.allocate(2)
    kv.free(blocks)
    assert kv.num_used == 0 and kv.num_free == 4


def test_prefix_hits_and_lru_eviction_with_events():
    kv = KvCache(4, 2)
    ids = [1, 2, 3, 4]
    hashes = chain_block_hashes(ids, 2)
    a = kv.allocate(2)
    kv.register_full_blocks(a, hashes, ids, 0, 2)
    ev = kv.take_events()
    assert ev == [
        {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": None,
            "token_ids": ids,
            "block_size": 2,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
        }
    ]
    kv.free(a)
    # Freed blocks keep their hashes: a new request hits them.
    assert kv.match_prefix(hashes, 2) == a
    assert kv.blocks_needed(a, 1) == 3
    kv.touch(a)
    assert kv.num_used == 2
    kv.free(a)
    # Allocating everything evicts the cached blocks (tail block first).
    kv.allocate(4)
    ev = kv.take_events()
    assert [e["type"] for e in ev] == ["BlockRemoved", "BlockRemoved"]
    assert ev[0]["block_hashes"] == [hashes[1]] and ev[1]["block_hashes"] == [hashes[0]]
    assert kv.cached == {}


def test_duplicate_hash_is_not_registered_twice():
    kv = KvCache(8, 2)
    ids = [5, 6, 7, 8]
    hashes = chain_block_hashes(ids, 2)
    a, b = kv.allocate(2), kv.allocate(2)
    kv.register_full_blocks(a, hashes, ids, 0, 2)
    kv.register_full_blocks(b, hashes, ids, 0, 2)
    events = kv.take_events()
    assert len(events) == 1 and len(kv.cached) == 2
    kv.free(b)
    assert kv.take_events() == []


def test_partial_run_keeps_parent_hash():
    kv = KvCache(8, 2)
    ids = [1, 2, 3, 4, 5, 6]
    hashes = chain_block_hashes(ids, 2)
    blocks = kv.allocate(3)
    kv.register_full_blocks(blocks, hashes, ids, 0, 1)
    kv.register_full_blocks(blocks, hashes, ids, 1, 3)
    ev = kv.take_events()
    assert ev[1]["parent_block_hash"] == hashes[0]
    assert ev[1]["token_ids"] == [3, 4, 5, 6]
    assert chain_block_hashes(ev[1]["token_ids"], 2, ev[1]["parent_block_hash"]) == ev[1]["block_hashes"]


def test_no_prefix_caching_means_no_hits_and_no_events():
    kv = KvCache(4, 2, enable_prefix_caching=False)
    ids = [1, 2, 3, 4]
    hashes = chain_block_hashes(ids, 2)
    a = kv.allocate(2)
    kv.register_full_blocks(a, hashes, ids, 0, 2)
    assert kv.take_events() == [] and kv.match_prefix(hashes, 2) == []


def test_reset_prefix_cache_only_when_idle():
    kv = KvCache(4, 2)
    ids = [1, 2]
    a = kv.allocate(1)
    kv.register_full_blocks(a, chain_block_hashes(ids, 2), ids, 0, 1)
    assert not kv.reset_prefix_cache()
    kv.free(a)
    kv.take_events()
    assert kv.reset_prefix_cache()
    assert kv.take_events() == [{"type": "AllBlocksCleared"}] and kv.cached == {}
