"""Unit tests of continuous batching, chunked prefill, preemption and sampling (no processes)."""

from __future__ import annotations

from dynamo.backends.mocker.kv_cache import KvCache, chain_block_hashes
from dynamo.backends.mocker.scheduler import GenerationVocab, Scheduler, Sequence

VOCAB = GenerationVocab(list(range(10, 20)), {i: f" w{i}" for i in range(10, 20)}, eos_token_id=2)


def make(num_blocks=64, block_size=4, **kw) -> Scheduler:
    return Scheduler(KvCache(num_blocks, block_size), VOCAB, **kw)


def run_to_end(s: Scheduler, limit: int = 10_000) -> int:
    steps = 0
    while s.has_schedulable_work() and steps < limit:
        batch = s.schedule()
        assert batch, "scheduler stalled"
        s.complete(batch)
        steps += 1
    return steps


def seq(rid="r", n=8, max_tokens=4, seed=1, **kw) -> Sequence:
    return Sequence(rid, list(range(100, 100 + n)), max_tokens, seed=seed, **kw)


def test_prefill_then_decode_one_token_per_step():
    s = make()
    r = seq(n=10, max_tokens=3)
    s.add(r)
    b = s.schedule()
    assert b.prefill_tokens == 10 and b.num_decodes == 0
    s.complete(b)
    assert r.num_output == 1 and r.out == [r.all_ids[10]]
    b = s.schedule()
    assert b.prefill_tokens == 0 and b.num_decodes == 1
    s.complete(b)
    s.complete(s.schedule())
    assert r.finished and r.finish_reason == "length" and r.num_output == 3
    assert s.kv.num_used == 0  # blocks are freed when the request ends


def test_output_is_deterministic_per_seed():
    def out(seed):
        s = make()
        r = seq(max_tokens=20, seed=seed)
        s.add(r)
        run_to_end(s)
        return r.output_ids

    assert out(7) == out(7)
    assert out(7) != out(8)
    assert all(t in VOCAB.ids for t in out(7))


def test_continuous_batching_respects_max_num_seqs():
    s = make(max_num_seqs=2)
    rs = [seq(f"r{i}", max_tokens=5) for i in range(3)]
    for r in rs:
        s.add(r)
    b = s.schedule()
    assert len(b.seqs) == 2 and len(s.waiting) == 1
    run_to_end(s)
    assert all(r.finished for r in rs)


def test_chunked_prefill_splits_long_prompts():
    s = make(max_num_batched_tokens=8)
    r = seq(n=20, max_tokens=1)
    s.add(r)
    chunks = []
    while not r.finished:
        b = s.schedule()
        chunks.append(b.prefill_tokens)
        s.complete(b)
    assert chunks == [8, 8, 4]


def test_decodes_and_a_new_prefill_share_the_token_budget():
    s = make(max_num_batched_tokens=10)
    a = seq("a", n=4, max_tokens=50)
    s.add(a)
    s.complete(s.schedule())
    b = seq("b", n=30, max_tokens=1, seed=3)
    s.add(b)
    batch = s.schedule()
    assert batch.num_decodes == 1 and batch.prefill_tokens == 9


def test_prefix_cache_hit_leaves_one_token_to_compute():
    s = make(block_size=4)
    a = seq("a", n=8, max_tokens=1)
    s.add(a)
    run_to_end(s)
    b = seq("b", n=8, max_tokens=1)
    s.add(b)
    batch = s.schedule()
    # 8 tokens = 2 full blocks, but at least one token must be computed: 1 block hit.
    assert b.num_hit_tokens == 4 and batch.prefill_tokens == 4
    c = seq("c", n=9, max_tokens=1)
    s.add(c)
    s.complete(batch)
    batch = s.schedule()
    assert c.num_hit_tokens == 8 and batch.prefill_tokens == 1
    assert s.metrics.prefix_cache_hits == 12 and s.metrics.prefix_cache_queries == 25


def test_preemption_when_blocks_run_out_and_recovery():
    s = make(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    a = seq("a", n=8, max_tokens=12, seed=1)
    b = seq("b", n=8, max_tokens=12, seed=2)
    s.add(a)
    s.add(b)
    run_to_end(s)
    assert a.finished and b.finished and a.num_output == 12 and b.num_output == 12
    assert s.metrics.num_preemptions >= 1
    assert s.kv.num_used == 0

    # The preempted request's tokens are identical to an uncontended run.
    ref = make(num_blocks=64, block_size=4)
    rb = seq("b", n=8, max_tokens=12, seed=2)
    ref.add(rb)
    run_to_end(ref)
    assert rb.output_ids == b.output_ids


def test_eviction_under_memory_pressure_emits_block_removed():
    s = make(num_blocks=4, block_size=4)
    for i in range(3):
        r = Sequence(f"r{i}", list(range(i * 100, i * 100 + 8)), 1, seed=i)
        s.add(r)
        run_to_end(s)
    events = s.kv.take_events()
    stored = {h for e in events if e["type"] == "BlockStored" for h in e["block_hashes"]}
    removed = {h for e in events if e["type"] == "BlockRemoved" for h in e["block_hashes"]}
    assert removed and removed <= stored
    assert set(s.kv.cached) == stored - removed


def test_abort_frees_blocks_immediately():
    s = make()
    r = seq(n=16, max_tokens=100)
    s.add(r)
    batch = s.schedule()
    assert s.kv.num_used == 4
    assert s.abort(r)
    assert s.kv.num_used == 0 and r.finish_reason == "abort" and not s.running
    s.complete(batch)  # the step that was running when the abort came is ignored
    assert r.num_output == 0


def test_stop_string_truncates_and_min_tokens_delays_it():
    s = make()
    probe = seq(max_tokens=10, seed=5)
    s.add(probe)
    run_to_end(s)
    text = "".join(VOCAB.text[t] for t in probe.output_ids)
    third = VOCAB.text[probe.output_ids[2]]

    s = make()
    r = seq(max_tokens=10, seed=5, stop=[third])
    s.add(r)
    run_to_end(s)
    assert r.finish_reason == "stop" and r.stop_reason == third
    streamed = "".join(r.out)
    assert streamed == text[: text.index(third)]

    s = make()
    r = seq(max_tokens=10, seed=5, stop=[third], include_stop=True, min_tokens=10)
    s.add(r)
    run_to_end(s)
    assert r.finish_reason == "length" and "".join(r.out) == text


def test_eos_ends_the_request_with_stop():
    s = make()
    r = seq(max_tokens=100, eos_at=5)
    s.add(r)
    run_to_end(s)
    assert r.finish_reason == "stop" and r.num_output == 5 and r.all_ids[-1] == VOCAB.eos_token_id
    assert len(r.out) == 4  # the EOS token has no text


def test_remote_prefill_skips_compute_and_matches_local_output():
    local = make()
    a = seq(n=12, max_tokens=6, seed=9)
    local.add(a)
    run_to_end(local)

    s = make()
    r = seq(n=12, max_tokens=6, seed=9, remote={"do_remote_prefill": True})
    s.add(r)
    batch = s.schedule()
    assert not batch and batch.transfers == [r] and r.transfer_tokens == 12
    assert s.kv.num_used == 3
    assert s.finish_transfer(r)
    batch = s.schedule()
    assert batch.prefill_tokens == 0 and batch.num_decodes == 1
    s.complete(batch)
    run_to_end(s)
    assert r.output_ids == a.output_ids
    # The transferred prompt blocks are now in the decode worker's prefix cache.
    assert set(chain_block_hashes(r.all_ids[:12], 4)) <= set(s.kv.cached)


def test_hold_keeps_blocks_until_the_lease_is_released():
    s = make()
    r = seq(n=8, max_tokens=1, hold=True)
    s.add(r)
    run_to_end(s)
    assert r.finished and s.kv.num_used == 2 and r.request_id in s.leases
    assert s.release_lease(r.request_id)
    assert s.kv.num_used == 0 and not s.release_lease(r.request_id)
