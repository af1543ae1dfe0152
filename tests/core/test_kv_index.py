"""The KV index and routing costs: pure functions, no processes."""

import random

import msgspec
import pytest

from dynamo.core.hashing import chain_block_hashes
from dynamo.core.kv_index import KvIndex
from dynamo.core.router import Router, apply_batch
from dynamo.core.routing import WorkerLoad, kv_cost, pick_lowest

BS = 4


def test_hashes_chain_and_ignore_partial_blocks():
    ids = list(range(10))
    hashes = chain_block_hashes(ids, BS)
    assert len(hashes) == 2
    assert chain_block_hashes(ids[:8], BS) == hashes
    assert chain_block_hashes([0, 1, 2, 3, 9, 9, 9, 9], BS)[0] == hashes[0]
    assert chain_block_hashes([9, 9, 9, 9, 4, 5, 6, 7], BS)[1] != hashes[1]  # same block, other parent
    assert chain_block_hashes(ids[4:8], BS, parent_hash=hashes[0]) == hashes[1:]


def test_stored_events_index_our_hashes_whatever_the_engine_calls_them():
    index = KvIndex(BS)
    ids = list(range(12))
    index.stored("w1", [111, 222], None, ids[:8])
    index.stored("w1", [333], 222, ids[8:12])  # child of the engine's 222
    ours = chain_block_hashes(ids, BS)
    assert index.overlap(ours) == {"w1": 3}
    index.removed("w1", [333])
    assert index.overlap(ours) == {"w1": 2}
    index.cleared("w1")
    assert index.overlap(ours) == {}


def test_overlap_counts_leading_blocks_per_worker():
    index = KvIndex(BS)
    ids = list(range(16))
    index.stored("a", [1, 2, 3, 4], None, ids)
    index.stored("b", [5, 6], None, ids[:8])
    index.stored("c", [7], None, [99, 99, 99, 99])
    assert index.overlap(chain_block_hashes(ids, BS)) == {"a": 4, "b": 2}


def test_unknown_parent_is_counted_not_guessed():
    index = KvIndex(BS)
    index.stored("w", [5], 404, [1, 2, 3, 4])
    assert index.total_blocks == 0 and index.orphan_blocks == 1


def test_approximate_mode_expires():
    index = KvIndex(BS)
    hashes = chain_block_hashes(list(range(8)), BS)
    index.predict("w", hashes, ttl=10, now=100.0)
    assert index.overlap(hashes) == {"w": 2}
    index.expire(now=111.0)
    assert index.overlap(hashes) == {}


def test_vllm_batches_in_both_encodings_apply():
    index = KvIndex(BS)
    ids = list(range(8))
    as_maps = msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": [10, 20], "parent_block_hash": None,
                                             "token_ids": ids, "block_size": BS, "lora_id": None, "medium": "GPU",
                                             "lora_name": None}], 0])
    apply_batch(index, "w", as_maps)
    assert index.overlap(chain_block_hashes(ids, BS)) == {"w": 2}
    as_arrays = msgspec.msgpack.encode([1.0, [["BlockRemoved", [20], "GPU"], ["AllBlocksCleared"]], 0])
    apply_batch(index, "w", as_arrays)
    assert index.total_blocks == 0


def test_cost_matches_nvidia_dynamo_worked_example():
    # worker 1: 8 prefill + 10 decode; worker 2: 5 + 5 (selected); worker 3: 2 + 9
    costs = {"1": kv_cost(8, 0, 10 - 8, 1.0), "2": kv_cost(5, 0, 0, 1.0), "3": kv_cost(2, 0, 9 - 2, 1.0)}
    assert costs == {"1": 18, "2": 10, "3": 11}
    assert pick_lowest(costs, 0.0, random.Random(0)) == "2"


def test_queued_prefill_counts_against_a_worker():
    # "busy" holds the whole prefix but must first prefill 40 blocks for requests routed before;
    # "idle" holds nothing and prefills only this request's 8 blocks.
    busy = kv_cost(8, 8, 4, 1.0, queued_prefill_blocks=40)
    idle = kv_cost(8, 0, 0, 1.0)
    assert idle < busy
    assert kv_cost(8, 8, 4, 1.0) < idle  # without the queue the holder would have won


def test_a_queue_computing_the_requests_own_prefix_is_not_charged():
    shared = list(range(100, 110))
    load = WorkerLoad()
    load.add("first", blocks=len(shared), prefill_blocks=10, prefill_hashes=shared)
    load.add("other", blocks=6, prefill_blocks=6, prefill_hashes=range(200, 206))
    assert load.queued_prefill_blocks(shared + [7, 8], overlap_blocks=10) == 6  # only "other" delays it
    assert load.queued_prefill_blocks([1, 2, 3], overlap_blocks=0) == 16
    load.first_token("first")
    assert load.pending.keys() == set(range(200, 206)) and load.prefill_blocks == 6
    load.finish("other")
    assert not load.pending and load.prefill_blocks == 0


def test_temperature_samples_but_prefers_cheap_workers():
    rng = random.Random(0)
    picks = [pick_lowest({"cheap": 1.0, "dear": 50.0}, 0.5, rng) for _ in range(2000)]
    share = picks.count("cheap") / len(picks)
    assert 0.75 < share < 0.95


def test_load_accounting():
    load = WorkerLoad()
    load.add("r", blocks=10, prefill_blocks=6)
    assert (load.active_blocks, load.prefill_blocks, load.active_requests) == (10, 6, 1)
    load.first_token("r")
    assert load.prefill_blocks == 0
    load.finish("r")
    assert (load.active_blocks, load.active_requests) == (0, 0)


def test_one_hot_prefix_spreads_once_its_holder_is_busy():
    """Every active request's blocks count, shared or not: a popular system prompt must not pull
    every request onto the one worker that holds it (each decode step reads every sequence's KV)."""
    from dynamo.core.discovery import Instance

    router = Router("ns", BS, overlap_weight=16.0, use_events=False, rng=random.Random(0))
    router.sync({k: Instance(k, {"url": f"http://{k}", "role": "agg"}) for k in ("ns.a", "ns.b", "ns.c")})
    system = list(range(125 * BS))  # a 2,000-token system prompt
    placed = [router.route(f"r{i}", chain_block_hashes(system + [10_000 + i] * 2 * BS, BS), "agg")["worker"]
              for i in range(60)]  # none finishes: 60 requests in flight at once
    per_worker = sorted(placed.count(w) for w in ("ns.a", "ns.b", "ns.c"))
    assert per_worker[0] > 0, per_worker  # every worker took a share once the holder was busy
    assert per_worker[-1] - per_worker[0] <= 20, per_worker  # ~16 × 125 blocks of imbalance at most
    holder = placed[0]
    assert placed[:10] == [holder] * 10  # while the holder is not busy, the prefix stays where it is cached
    load = router.loads[holder]
    assert load.active_blocks == placed.count(holder) * 127
    for i, worker in enumerate(placed):
        router.load_event("finished", f"r{i}")
    assert all(load.active_blocks == 0 and load.active_requests == 0 for load in router.loads.values())


def test_router_prefers_overlap_then_spreads_load():
    from dynamo.core.discovery import Instance

    router = Router("ns", BS, use_events=False, rng=random.Random(0))
    router.sync({k: Instance(k, {"url": f"http://{k}", "role": "agg"}) for k in ("ns.a", "ns.b")})
    shared = chain_block_hashes(list(range(40)), BS)
    first = router.route("r1", shared, "agg")["worker"]
    assert router.route("r2", shared, "agg")["worker"] == first  # approximate mode remembers the prefix
    other = chain_block_hashes(list(range(100, 140)), BS)
    assert router.route("r3", other, "agg")["worker"] != first  # first is busier, nothing cached anywhere
    with pytest.raises(KeyError):
        router.route("r4", shared, "prefill")["worker"]


def test_trtllm_json_events_apply():
    from dynamo.core.router import apply_trtllm_events

    index = KvIndex(BS)
    ids = list(range(8))
    stored = {"event_id": 1, "data": {"type": "stored", "parent_hash": None, "blocks": [
        {"type": "stored_block", "block_hash": h, "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0}
                                                              for t in ids[i * BS:(i + 1) * BS]], "cache_level": 0,
         "priority": 35} for i, h in enumerate((501, 502))]}, "window_size": 32}
    apply_trtllm_events(index, "w", [stored, {"event_id": 0, "data": {"type": "created"}}])
    assert index.overlap(chain_block_hashes(ids, BS)) == {"w": 2}
    apply_trtllm_events(index, "w", [{"event_id": 2, "data": {"type": "removed", "block_hashes": [502]}}])
    assert index.overlap(chain_block_hashes(ids, BS)) == {"w": 1}


def test_a_queue_that_fits_in_one_engine_step_with_the_request_is_not_charged():
    load = WorkerLoad()
    load.add("miss", blocks=125, prefill_blocks=125, prefill_hashes=range(1000, 1125))
    hit = list(range(127))  # a 127-block prompt, 125 of them cached here
    assert load.queued_prefill_blocks(hit, overlap_blocks=125) == 125  # the whole queue (Dynamo)
    assert load.queued_prefill_blocks(hit, overlap_blocks=125, step_blocks=512) == 0  # batched together
    for i in range(9):
        load.add(f"more-{i}", blocks=125, prefill_blocks=125)
    # 1,250 queued blocks: what cannot share the request's step still delays it
    assert load.queued_prefill_blocks(hit, overlap_blocks=125, step_blocks=512) == 1250 + 2 - 512
    # a request longer than a step is charged only for the queue, not for its own extra steps
    assert load.queued_prefill_blocks(list(range(600)), overlap_blocks=0, step_blocks=512) == 1250


def test_a_request_id_routed_twice_does_not_hold_load_forever():
    from dynamo.core.discovery import Instance

    router = Router("ns", BS, use_events=False, rng=random.Random(0))
    router.sync({k: Instance(k, {"url": f"http://{k}", "role": "agg"}) for k in ("ns.a", "ns.b")})
    prompt = chain_block_hashes(list(range(10 * BS)), BS)
    router.route("same", prompt, "agg")  # clients choose x-request-id; two requests may share one
    router.route("same", prompt, "agg")
    router.load_event("finished", "same")
    assert [(load.active_requests, load.active_blocks, load.prefill_blocks) for load in router.loads.values()] \
        == [(0, 0, 0), (0, 0, 0)]
