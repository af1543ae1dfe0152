"""How long a simulated engine step takes.

The default is NVIDIA Dynamo's polynomial fit:

- prefill: ``4.209989e-07*T**2 + 1.518344e-02*T + 16.50142`` ms for ``T`` new
  (uncached) prompt tokens in the step, summed over the batch;
- decode: ``-25.74*u**2 + 54.01*u + 5.74`` ms (at least 1 ms), ``u`` being the
  fraction of KV blocks in use.

A step that mixes both costs the sum. Everything is divided by the speedup
ratio; a ratio of 0 means "no simulated delay at all".

``--perf-table FILE`` replaces either curve with measured points (JSON)::

    {"prefill": [[tokens, ms], ...], "decode": [[kv_usage, ms], ...]}

Points are linearly interpolated; prefill is extrapolated linearly past the
last point, decode is clamped to the table's ends. A table may give only one
of the two curves; the other keeps the polynomial.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PerfModel",
    "PerfTableError",
    "load_perf_model",
    "polynomial_prefill_ms",
    "polynomial_decode_ms",
    "transfer_seconds",
]


def polynomial_prefill_ms(tokens: int) -> float:
    """Dynamo's fitted prefill time in ms for ``tokens`` new tokens."""
    return 4.209989e-07 * tokens * tokens + 1.518344e-02 * tokens + 16.50142


def polynomial_decode_ms(kv_usage: float) -> float:
    """Dynamo's fitted decode step time in ms at KV usage ``kv_usage`` (0..1)."""
    return max(1.0, -25.74 * kv_usage * kv_usage + 54.01 * kv_usage + 5.74)


class PerfTableError(ValueError):
    """The perf table file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class Curve:
    """A piecewise-linear curve through measured points."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    extrapolate: bool

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if len(xs) == 1:
            return ys[0]
        i = bisect.bisect_right(xs, x)
        if i <= 0:
            lo, hi = 0, 1
            if not self.extrapolate:
                return ys[0]
        elif i >= len(xs):
            lo, hi = len(xs) - 2, len(xs) - 1
            if not self.extrapolate:
                return ys[-1]
        else:
            lo, hi = i - 1, i
        x0, x1, y0, y1 = xs[lo], xs[hi], ys[lo], ys[hi]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _curve(name: str, points: object, extrapolate: bool) -> Curve:
    if not isinstance(points, list) or not points:
        raise PerfTableError(f"'{name}' must be a non-empty list of [x, ms] pairs")
    pairs: list[tuple[float, float]] = []
    for i, p in enumerate(points):
        if (
            not isinstance(p, (list, tuple))
            or len(p) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
            or not all(math.isfinite(v) for v in p)
        ):
            raise PerfTableError(f"'{name}'[{i}] must be a pair of finite numbers, got {p!r}")
        if p[1] < 0:
            raise PerfTableError(f"'{name}'[{i}]: time must be >= 0 ms")
        pairs.append((float(p[0]), float(p[1])))
    pairs.sort()
    xs = tuple(x for x, _ in pairs)
    if len(set(xs)) != len(xs):
        raise PerfTableError(f"'{name}' has duplicate x values")
    return Curve(xs, tuple(y for _, y in pairs), extrapolate)


class PerfModel:
    """Step-time model: prefill and decode curves plus the speedup ratio."""

    def __init__(
        self,
        speedup_ratio: float = 1.0,
        prefill_curve: Curve | None = None,
        decode_curve: Curve | None = None,
    ) -> None:
        if speedup_ratio < 0:
            raise ValueError("speedup_ratio must be >= 0")
        self.speedup_ratio = speedup_ratio
        self._prefill = prefill_curve
        self._decode = decode_curve

    @property
    def enabled(self) -> bool:
        return self.speedup_ratio > 0

    def prefill_ms(self, tokens: int) -> float:
        """Unscaled prefill time (ms) for ``tokens`` new tokens."""
        if tokens <= 0:
            return 0.0
        if self._prefill is not None:
            return max(0.0, self._prefill(tokens))
        return polynomial_prefill_ms(tokens)

    def decode_ms(self, kv_usage: float) -> float:
        """Unscaled decode step time (ms) at KV usage ``kv_usage``."""
        if self._decode is not None:
            return max(0.0, self._decode(kv_usage))
        return polynomial_decode_ms(kv_usage)

    def step_seconds(self, prefill_tokens: int, num_decodes: int, kv_usage: float) -> float:
        """Wall-clock seconds one engine step takes (already divided by the speedup)."""
        if self.speedup_ratio <= 0:
            return 0.0
        ms = 0.0
        if prefill_tokens > 0:
            ms += self.prefill_ms(prefill_tokens)
        if num_decodes > 0:
            ms += self.decode_ms(kv_usage)
        return ms / 1000.0 / self.speedup_ratio


def transfer_seconds(
    num_tokens: int, kv_bytes_per_token: int, bandwidth_gbps: float, speedup_ratio: float
) -> float:
    """Seconds to move ``num_tokens`` tokens of KV at ``bandwidth_gbps`` gigabits/s."""
    if speedup_ratio <= 0 or num_tokens <= 0:
        return 0.0
    bits = num_tokens * kv_bytes_per_token * 8
    return bits / (bandwidth_gbps * 1e9) / speedup_ratio


def load_perf_model(path: str | Path | None, speedup_ratio: float) -> PerfModel:
    """Build the perf model, reading measured points from ``path`` when given."""
    if path is None:
        return PerfModel(speedup_ratio)
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise PerfTableError(f"cannot read perf table {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise PerfTableError(f"perf table {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not ({"prefill", "decode"} & data.keys()):
        raise PerfTableError(
            f"perf table {path} must be an object with 'prefill' and/or 'decode' point lists"
        )
    unknown = set(data) - {"prefill", "decode"}
    if unknown:
        raise PerfTableError(f"perf table {path}: unknown keys {sorted(unknown)}")
    prefill = _curve("prefill", data["prefill"], True) if "prefill" in data else None
    decode = _curve("decode", data["decode"], False) if "decode" in data else None
    return PerfModel(speedup_ratio, prefill, decode)

