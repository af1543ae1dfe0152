"""Routing decisions as small pure functions: a cost per worker, then a pick.

NVIDIA Dynamo's KV cost: ``overlap_weight × prefill_blocks + decode_blocks`` where
``prefill_blocks`` are the request's blocks the worker does not hold yet plus the blocks
the worker still has to prefill for requests already routed to it, and
``decode_blocks`` are the blocks of every active request there plus the request's own. A
prefix shared by several active requests counts once per request (Dynamo's ActiveSequences
counts it once): each decode step reads every sequence's KV, and counting it once let one
hot system prompt pull every request onto its holder (docs/decisions/router-decode-load.md).
The lowest cost wins; with a temperature > 0 the pick is sampled by softmax over the costs
normalised to [0, 1].
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence


DEFAULT_OVERLAP_WEIGHT = 16.0  # NVIDIA Dynamo uses 1; why 16: docs/decisions/router-decode-load.md


@dataclass
class WorkerLoad:
    """What the router knows of a worker's current work (from its own decisions and the frontend).

    ``active_blocks`` sums the blocks of every active request, shared or not. For requests
    that have not produced their first token it also keeps the block hashes they are
    prefilling (``pending``): a later request sharing that prefix is not charged for the
    queue that computes its own prefix (:meth:`queued_prefill_blocks`).
    """

    active_requests: int = 0
    active_blocks: int = 0
    prefill_blocks: int = 0
    requests: dict[str, tuple[int, int, tuple[int, ...]]] = field(default_factory=dict)
    # ^ id -> (its blocks, blocks it prefills, their hashes)
    pending: dict[int, int] = field(default_factory=dict)  # hash being prefilled -> requests prefilling it

    def add(self, request_id: str, blocks: int, prefill_blocks: int, prefill_hashes: Sequence[int] = ()) -> None:
        """Count a request routed here: ``blocks`` in its prompt, of which it must prefill
        ``prefill_blocks`` (``prefill_hashes``)."""
        hashes = tuple(prefill_hashes)
        self.requests[request_id] = (blocks, prefill_blocks, hashes)
        self.active_blocks += blocks
        self.prefill_blocks += prefill_blocks
        self.active_requests += 1
        _hold(self.pending, hashes)

    def _prefilled(self, hashes: tuple[int, ...]) -> None:
        _release(self.pending, hashes)

    def first_token(self, request_id: str) -> None:
        blocks, prefill, hashes = self.requests.get(request_id, (0, 0, ()))
        if prefill or hashes:
            self.prefill_blocks -= prefill
            self._prefilled(hashes)
            self.requests[request_id] = (blocks, 0, ())

    def finish(self, request_id: str) -> None:
        entry = self.requests.pop(request_id, None)
        if entry is not None:
            blocks, prefill, hashes = entry
            self.active_blocks -= blocks
            self.prefill_blocks -= prefill
            self.active_requests -= 1
            self._prefilled(hashes)

    def queued_prefill_blocks(self, hashes: Sequence[int], overlap_blocks: int, step_blocks: int = 0) -> int:
        """Blocks this worker must prefill for earlier requests before ``hashes`` gets its turn,
        not counting those that compute ``hashes``' own first ``overlap_blocks`` blocks.

        With ``step_blocks`` > 0 (an engine step's prefill budget, in blocks) only the queue
        that cannot share a step with this request's own prefill counts: engines batch the
        prefills they have into one step, so a short queue delays the request no more than
        prefilling its own prefix on another worker would.
        """
        if not self.prefill_blocks:
            return 0
        pending = self.pending
        shared = sum(1 for h in hashes[:overlap_blocks] if h in pending) if pending and overlap_blocks else 0
        queued = max(self.prefill_blocks - shared, 0)
        if step_blocks > 0:
            own = max(len(hashes) - overlap_blocks, 0)
            queued = max(queued + own - step_blocks, 0) - max(own - step_blocks, 0)
        return queued


def _hold(counts: dict[int, int], hashes: Sequence[int]) -> None:
    for h in hashes:
        counts[h] = counts.get(h, 0) + 1


def _release(counts: dict[int, int], hashes: Sequence[int]) -> None:
    for h in hashes:
        n = counts.get(h, 0) - 1
        if n > 0:
            counts[h] = n
        else:
            counts.pop(h, None)


def kv_cost(request_blocks: int, overlap_blocks: int, active_blocks: int, overlap_weight: float,
            queued_prefill_blocks: int = 0) -> float:
    """``overlap_weight × prefill_blocks + decode_blocks`` for one worker.

    ``prefill_blocks`` is what the worker must compute before this request's first token: the
    request's uncached blocks plus ``queued_prefill_blocks``, the uncached blocks of requests
    routed there that have not produced their first token yet (NVIDIA Dynamo's prefill load).
    ``decode_blocks`` is the worker's active blocks plus the request's.
    """
    prefill_blocks = max(request_blocks - overlap_blocks, 0) + queued_prefill_blocks
    return overlap_weight * prefill_blocks + active_blocks + request_blocks


def pick_lowest(costs: dict[str, float], temperature: float, rng: random.Random,
                prefer: Mapping[str, int] | None = None) -> str:
    """The lowest-cost worker, or a softmax sample when temperature > 0.

    Ties go to the worker with the highest ``prefer`` value (the router passes the KV
    overlap, so equal costs keep a prefix where it already is), then at random.
    """
    if not costs:
        raise ValueError("no workers to pick from")
    if temperature <= 0:
        best = min(costs.values())
        tied = sorted(w for w, c in costs.items() if c == best)
        if prefer and len(tied) > 1:
            most = max(prefer.get(w, 0) for w in tied)
            tied = [w for w in tied if prefer.get(w, 0) == most]
        return rng.choice(tied)
    low, high = min(costs.values()), max(costs.values())
    span = (high - low) or 1.0
    names = sorted(costs)
    weights = [math.exp(-((costs[n] - low) / span) / temperature) for n in names]
    return rng.choices(names, weights)[0]
