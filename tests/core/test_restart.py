"""Restart decisions and backoff: exponential, capped, jittered, policy-driven."""

import random

from dynamo.core.profile import Backoff, RestartPolicy
from dynamo.core.restart import backoff_delay, wants_restart


def test_backoff_grows_then_caps():
    backoff = Backoff(initial=1, max=8, multiplier=2, jitter=0)
    assert [backoff_delay(backoff, n) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]


def test_jitter_stays_within_its_fraction():
    backoff = Backoff(initial=10, max=100, multiplier=2, jitter=0.1)
    rng = random.Random(1)
    delays = [backoff_delay(backoff, 1, rng) for _ in range(200)]
    assert min(delays) >= 9 and max(delays) <= 11
    assert len(set(delays)) > 100  # jitter spreads restarts of many workers


def test_policies():
    assert wants_restart(RestartPolicy(policy="always"), 0, False)
    assert wants_restart(RestartPolicy(policy="on-failure"), 1, False)
    assert wants_restart(RestartPolicy(policy="on-failure"), -9, False)
    assert not wants_restart(RestartPolicy(policy="on-failure"), 0, False)
    assert wants_restart(RestartPolicy(policy="on-failure"), None, True)
    assert not wants_restart(RestartPolicy(policy="no"), 1, True)
