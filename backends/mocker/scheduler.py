"""Continuous-batching scheduler of the simulated engine (pure logic, no I/O).

One call to :meth:`Scheduler.schedule` plans one engine step the way vLLM's
v1 scheduler does:

1. running requests first, in order: each gets the tokens it still has to
   compute (1 for a decoding request, the rest of its prompt, or a chunk of
   it when the ``max_num_batched_tokens`` budget runs short: chunked
   prefill); when the KV pool has no block left for one of them, the newest
   running request is preempted (its blocks freed, back to the head of the
   waiting queue, recomputed later);
2. then, if nothing was preempted, waiting requests in FCFS order while there
   is token budget, a free ``max_num_seqs`` slot and room in the KV pool.
   A waiting request first takes its longest cached prefix (always leaving at
   least one token to compute).

Blocks that the step fills completely enter the prefix cache when the step
is planned (as vLLM's ``allocate_slots`` does), so their ``BlockStored``
events belong to that step. :meth:`Scheduler.complete` applies a step:
computed tokens advance and every request whose computed tokens caught up
with its tokens samples one new token. The caller (the asyncio
engine) sleeps the modelled step time between the two calls.

Requests arriving with remote-prefill parameters (disaggregated decode) skip
the compute: they get blocks for the whole prompt, are parked in
``transferring`` while the KV transfer is simulated, and join the running
batch through :meth:`Scheduler.finish_transfer` with only the last prompt
token left to compute (so their next step is a cheap decode step), or through
:meth:`Scheduler.fail_transfer` with their whole uncached prompt left to compute.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable

from .kv_cache import KvCache, chain_block_hashes
from .metrics import EngineMetrics

__all__ = ["Sequence", "Scheduler", "Batch", "GenerationVocab"]


class GenerationVocab:
    """What the simulated model may emit: candidate ids, their text, the EOS id."""

    __slots__ = ("ids", "text", "eos_token_id")

    def __init__(self, ids: list[int], text: dict[int, str], eos_token_id: int) -> None:
        if not ids:
            raise ValueError("generation vocabulary is empty")
        self.ids = ids
        self.text = text
        self.eos_token_id = eos_token_id


class Sequence:
    """One request inside the engine.

    ``out`` collects what the HTTP layer streams: ints are token ids whose
    text is the tokenizer's per-token text; strings are text deltas (used
    when stop strings force the text to be held back). ``waiter`` is a future
    a streaming handler parks on (resolved when output arrives),
    ``done_waiter`` one a non-streaming handler parks on (resolved at the end).
    """

    __slots__ = (
        "request_id", "prompt_len", "all_ids", "num_computed", "num_output",
        "max_tokens", "min_tokens", "eos_at", "stop", "max_stop_len",
        "include_stop", "rng", "blocks", "hashes", "num_cached_blocks",
        "finished", "finish_reason", "stop_reason", "out", "waiter", "done_waiter",
        "arrival", "first_scheduled", "first_token_time", "last_token_time",
        "text", "sent", "remote", "remote_done", "hold", "num_hit_tokens",
        "transfer_tokens",
    )

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        max_tokens: int,
        *,
        seed: int,
        min_tokens: int = 0,
        eos_at: int | None = None,
        stop: list[str] | None = None,
        include_stop: bool = False,
        remote: dict | None = None,
        hold: bool = False,
        arrival: float = 0.0,
    ) -> None:
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.request_id = request_id
        self.prompt_len = len(prompt_ids)
        self.all_ids = list(prompt_ids)
        self.num_computed = 0
        self.num_output = 0
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.eos_at = eos_at
        self.stop = stop or None
        self.max_stop_len = max((len(s) for s in stop), default=0) if stop else 0
        self.include_stop = include_stop
        self.rng = random.Random(seed)
        self.blocks: list[int] = []
        self.hashes: list[int] = []
        self.num_cached_blocks = 0
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self.out: list[Any] = []
        self.waiter = None
        self.done_waiter = None
        self.arrival = arrival
        self.first_scheduled: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time = 0.0
        self.text = ""
        self.sent = 0
        self.remote = remote
        self.remote_done = False
        self.hold = hold
        self.num_hit_tokens = 0
        self.transfer_tokens = 0

    @property
    def output_ids(self) -> list[int]:
        return self.all_ids[self.prompt_len :]

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)


class Batch:
    """One planned engine step."""

    __slots__ = ("seqs", "num_new", "prefill_tokens", "num_decodes", "transfers", "kv_usage")

    def __init__(self) -> None:
        self.seqs: list[Sequence] = []
        self.num_new: list[int] = []
        self.prefill_tokens = 0
        self.num_decodes = 0
        self.transfers: list[Sequence] = []
        self.kv_usage = 0.0

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def add(self, seq: Sequence, num_new: int) -> None:
        self.seqs.append(seq)
        self.num_new.append(num_new)
        if num_new == 1 and (seq.num_output or seq.remote_done):
            self.num_decodes += 1
        else:
            self.prefill_tokens += num_new


class Scheduler:
    """Plans and applies engine steps over a :class:`KvCache`."""

    def __init__(
        self,
        kv: KvCache,
        vocab: GenerationVocab,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_model_len: int = 32768,
        metrics: EngineMetrics | None = None,
        on_finish: Callable[[Sequence], None] | None = None,
    ) -> None:
        self.kv = kv
        self.block_size = kv.block_size
        self.vocab = vocab
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.metrics = metrics or EngineMetrics()
        self.on_finish = on_finish
        # When False, only first tokens and finished requests wake their
        # handler right away; the caller flushes the rest (flush_outputs).
        self.wake_every_token = True
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.transferring: dict[int, Sequence] = {}
        self.leases: dict[str, Sequence] = {}

    # ------------------------------------------------------------- lifecycle
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_schedulable_work(self) -> bool:
        return bool(self.running or self.waiting)

    def abort(self, seq: Sequence, now: float = 0.0) -> bool:
        """Stop ``seq`` wherever it is and free its blocks at once."""
        if seq.finished:
            return False
        try:
            self.running.remove(seq)
        except ValueError:
            try:
                self.waiting.remove(seq)
            except ValueError:
                self.transferring.pop(id(seq), None)
        self._finish(seq, "abort", now)
        return True

    def release_lease(self, request_id: str) -> bool:
        """Free the blocks a finished remote-decode prefill kept for its decode worker."""
        seq = self.leases.pop(request_id, None)
        if seq is None:
            return False
        self.kv.free(seq.blocks)
        seq.blocks = []
        return True

    def flush_outputs(self) -> None:
        """Wake every running request that has undelivered output."""
        for seq in self.running:
            if seq.out:
                seq.wake()

    # ------------------------------------------------------------- planning
    def _ensure_hashes(self, seq: Sequence, nblocks: int) -> None:
        have = len(seq.hashes)
        if have < nblocks:
            bs = self.block_size
            seq.hashes.extend(
                chain_block_hashes(
                    seq.all_ids[have * bs : nblocks * bs], bs, seq.hashes[-1] if have else None
                )
            )

    def block_hashes(self, seq: Sequence, nblocks: int) -> list[int]:
        """The chained hashes of ``seq``'s blocks, computed up to at least its first ``nblocks``."""
        self._ensure_hashes(seq, nblocks)
        return seq.hashes

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.num_cached_blocks = 0
        self.waiting.appendleft(seq)
        self.metrics.num_preemptions += 1

    def schedule(self, now: float = 0.0) -> Batch:
        """Plan one step; returns an empty batch when nothing can run."""
        kv = self.kv
        bs = self.block_size
        batch = Batch()
        budget = self.max_num_batched_tokens
        running = self.running
        preempted = False
        caching = kv.enable_prefix_caching

        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            remaining = len(seq.all_ids) - seq.num_computed
            num_new = remaining if remaining <= budget else budget
            need = -(-(seq.num_computed + num_new) // bs) - len(seq.blocks)
            if need > 0:
                self_preempted = False
                while need > kv.num_free:
                    victim = running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        self_preempted = True
                        break
                if self_preempted:
                    break
                seq.blocks.extend(kv.allocate(need))
            if caching:
                self._cache_blocks(seq, seq.num_computed + num_new)
            batch.add(seq, num_new)
            budget -= num_new
            i += 1

        if not preempted:
            waiting = self.waiting
            metrics = self.metrics
            while waiting and len(running) + len(self.transferring) < self.max_num_seqs:
                seq = waiting[0]
                is_remote = seq.remote is not None and not seq.remote_done
                if budget <= 0 and not is_remote:
                    break
                n_tokens = len(seq.all_ids)
                hit: list[int] = []
                if caching:
                    self._ensure_hashes(seq, n_tokens // bs)
                    hit = kv.match_prefix(seq.hashes, (n_tokens - 1) // bs)
                computed = len(hit) * bs
                if is_remote:
                    target = n_tokens
                else:
                    target = computed + min(n_tokens - computed, budget)
                fresh = -(-target // bs) - len(hit)
                if kv.blocks_needed(hit, fresh) > kv.num_free:
                    break
                waiting.popleft()
                kv.touch(hit)
                seq.blocks = hit + kv.allocate(fresh)
                seq.num_computed = computed
                seq.num_cached_blocks = len(hit)
                seq.num_hit_tokens = computed
                if caching:
                    metrics.prefix_cache_queries += n_tokens
                    metrics.prefix_cache_hits += computed
                if seq.first_scheduled is None:
                    seq.first_scheduled = now
                    metrics.queue_time.observe(max(0.0, now - seq.arrival))
                    metrics.prompt_tokens += seq.prompt_len
                if is_remote:
                    seq.transfer_tokens = n_tokens - computed
                    self.transferring[id(seq)] = seq
                    batch.transfers.append(seq)
                    continue
                running.append(seq)
                num_new = target - computed
                if caching:
                    self._cache_blocks(seq, target)
                batch.add(seq, num_new)
                budget -= num_new
        batch.kv_usage = kv.usage
        return batch

    # ------------------------------------------------------------- applying
    def finish_transfer(self, seq: Sequence) -> bool:
        """The simulated KV transfer of ``seq`` is done: it joins the running batch."""
        if seq.finished or self.transferring.pop(id(seq), None) is None:
            return False
        seq.remote_done = True
        seq.num_computed = len(seq.all_ids) - 1
        if self.kv.enable_prefix_caching:
            self._cache_blocks(seq, seq.num_computed)
        self.running.append(seq)
        return True

    def fail_transfer(self, seq: Sequence) -> bool:
        """The KV transfer of ``seq`` failed: it joins the running batch and computes its prompt here.

        Its blocks stay allocated; only the tokens its own prefix cache covered count as
        computed. It is not sent for a transfer again, even after a preemption.
        """
        if seq.finished or self.transferring.pop(id(seq), None) is None:
            return False
        seq.remote_done = True
        seq.num_computed = seq.num_hit_tokens
        self.running.append(seq)
        return True

    def _cache_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the full blocks among the first ``num_tokens`` tokens of ``seq``."""
        full = num_tokens // self.block_size
        if full > seq.num_cached_blocks:
            self._ensure_hashes(seq, full)
            self.kv.register_full_blocks(seq.blocks, seq.hashes, seq.all_ids, seq.num_cached_blocks, full)
            seq.num_cached_blocks = full

    def complete(self, batch: Batch, now: float = 0.0) -> list[Sequence]:
        """Apply a planned step: advance computed tokens, cache blocks, sample tokens."""
        finished: list[Sequence] = []
        for seq, num_new in zip(batch.seqs, batch.num_new):
            if seq.finished:
                continue  # aborted while the step was running
            computed = seq.num_computed + num_new
            seq.num_computed = computed
            if computed == len(seq.all_ids):
                if self._sample(seq, now):
                    finished.append(seq)
        if finished:
            self.running = [s for s in self.running if not s.finished]
        return finished

    def _sample(self, seq: Sequence, now: float) -> bool:
        vocab = self.vocab
        metrics = self.metrics
        n = seq.num_output + 1
        eos = seq.eos_at is not None and n >= seq.eos_at
        tok = vocab.eos_token_id if eos else vocab.ids[seq.rng.randrange(len(vocab.ids))]
        seq.all_ids.append(tok)
        seq.num_output = n
        metrics.generation_tokens += 1
        if n == 1:
            seq.first_token_time = now
            metrics.ttft.observe(now - seq.arrival)
        else:
            metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        finish = None
        if eos:
            finish = "stop"
        elif seq.stop is not None:
            delta = self._stop_delta(seq, vocab.text.get(tok, ""))
            if delta:
                seq.out.append(delta)
            if seq.stop_reason is not None:
                finish = "stop"
        else:
            seq.out.append(tok)
        if finish is None and (n >= seq.max_tokens or len(seq.all_ids) >= self.max_model_len):
            finish = "length"
        if finish is not None:
            self._finish(seq, finish, now)
            return True
        if n == 1 or self.wake_every_token:
            seq.wake()
        return False

    @staticmethod
    def _stop_delta(seq: Sequence, piece: str) -> str:
        """Append ``piece`` to the text, detect stop strings, return the releasable delta."""
        prev = len(seq.text)
        text = seq.text = seq.text + piece
        if seq.num_output >= seq.min_tokens:
            start = max(0, prev - seq.max_stop_len + 1)
            best = -1
            best_stop = ""
            for s in seq.stop:  # type: ignore[union-attr]
                p = text.find(s, start)
                if p >= 0 and (best < 0 or p < best):
                    best, best_stop = p, s
            if best >= 0:
                end = best + len(best_stop) if seq.include_stop else best
                seq.text = text = text[:end]
                seq.stop_reason = best_stop
                delta = text[seq.sent :]
                seq.sent = len(text)
                return delta
        safe = len(text) - (seq.max_stop_len - 1)
        if safe > seq.sent:
            delta = text[seq.sent : safe]
            seq.sent = safe
            return delta
        return ""

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        seq.finished = True
        seq.finish_reason = reason
        if seq.stop is not None and reason != "abort" and seq.sent < len(seq.text):
            rest = seq.text[seq.sent :]
            seq.sent = len(seq.text)
            if seq.out and type(seq.out[-1]) is str:
                seq.out[-1] += rest  # the final token's text stays one event
            else:
                seq.out.append(rest)
        if seq.hold and reason != "abort":
            self.leases[seq.request_id] = seq
        else:
            self.kv.free(seq.blocks)
            seq.blocks = []
        m = self.metrics
        m.request_success[reason] = m.request_success.get(reason, 0) + 1
        if reason != "abort":
            m.e2e.observe(max(0.0, now - seq.arrival))
            m.request_prompt_tokens.observe(seq.prompt_len)
            m.request_generation_tokens.observe(seq.num_output)
        if self.on_finish is not None:
            self.on_finish(seq)
        seq.wake()
        w = seq.done_waiter
        if w is not None:
            seq.done_waiter = None
            if not w.done():
                w.set_result(None)
