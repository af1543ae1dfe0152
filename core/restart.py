"""Restart decisions: pure functions of the policy, the exit, and the attempt number."""

from __future__ import annotations

import random

from dynamo.core.profile import Backoff, RestartPolicy


def wants_restart(policy: RestartPolicy, exit_code: int | None, failed_probe: bool) -> bool:
    """Whether the policy restarts a process that ended with ``exit_code``.

    A process killed by the supervisor because it never became ready or stopped answering
    its probe counts as a failure.
    """
    if policy.policy == "always":
        return True
    if policy.policy == "on-failure":
        return failed_probe or exit_code != 0
    return False


def backoff_delay(backoff: Backoff, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before restart number ``attempt`` (1-based): exponential, capped, jittered."""
    base = min(backoff.max, backoff.initial * backoff.multiplier ** max(attempt - 1, 0))
    if backoff.jitter:
        spread = (rng or random).uniform(-backoff.jitter, backoff.jitter)
        base *= 1 + spread
    return max(0.0, min(base, backoff.max * (1 + backoff.jitter)))
