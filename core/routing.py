"""Routing decisions as small pure functions: a cost per worker, then a pick.

NVIDIA Dynamo's KV cost: ``overlap_weight × prefill_blocks + decode_blocks`` where
``prefill_blocks`` are the request's blocks the worker does not hold yet and
``decode_blocks`` are the worker's active blocks plus the request's. The lowest cost wins;
with a temperature > 0 the pick is sampled by softmax over the costs normalised to [0, 1].
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class WorkerLoad:
    """What the router knows of a worker's current work (from its own decisions and the frontend)."""

    active_blocks: int = 0
    active_requests: int = 0
    prefill_blocks: int = 0
    requests: dict[str, tuple[int, int]] = field(default_factory=dict)  # request id -> (blocks, prefill blocks)

    def add(self, request_id: str, blocks: int, prefill_blocks: int) -> None:
        self.requests[request_id] = (blocks, prefill_blocks)
        self.active_blocks += blocks
        self.prefill_blocks += prefill_blocks
        self.active_requests += 1

    def first_token(self, request_id: str) -> None:
        blocks, prefill = self.requests.get(request_id, (0, 0))
        if prefill:
            self.prefill_blocks -= prefill
            self.requests[request_id] = (blocks, 0)

    def finish(self, request_id: str) -> None:
        entry = self.requests.pop(request_id, None)
        if entry is not None:
            blocks, prefill = entry
            self.active_blocks -= blocks
            self.prefill_blocks -= prefill
            self.active_requests -= 1


def kv_cost(request_blocks: int, overlap_blocks: int, active_blocks: int, overlap_weight: float) -> float:
    prefill_blocks = max(request_blocks - overlap_blocks, 0)
    return overlap_weight * prefill_blocks + active_blocks + request_blocks


def pick_lowest(costs: dict[str, float], temperature: float, rng: random.Random) -> str:
    """The lowest-cost worker (ties broken at random), or a softmax sample when temperature > 0."""
    if not costs:
        raise ValueError("no workers to pick from")
    if temperature <= 0:
        best = min(costs.values())
        return rng.choice(sorted(w for w, c in costs.items() if c == best))
    low, high = min(costs.values()), max(costs.values())
    span = (high - low) or 1.0
    names = sorted(costs)
    weights = [math.exp(-((costs[n] - low) / span) / temperature) for n in names]
    return rng.choices(names, weights)[0]
