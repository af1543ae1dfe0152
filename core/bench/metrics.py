"""From per-request records to the numbers a benchmark reports.

Definitions (also in ``dynamo bench --help`` and docs/bench.md), for successful requests:

- TTFT: request sent -> first chunk that carries a token (role-only chunks do not count).
- ITL (per token): for each token-carrying chunk after the first, the gap since the
  previous one divided by the number of tokens it carried; one sample per token. Token
  counts per chunk come from the server's running usage when it sends it, else from
  the client tokenizer, else one per chunk.
- ICL (per chunk): the raw gaps between consecutive token-carrying chunks.
- TPOT: (last token time - first token time) / (output tokens - 1), per request
  (aiperf calls this "ITL"). Requests with one output token have none.
- E2EL: request sent -> last byte of the response.
- Output tokens/s per user: (output tokens - 1) / (last token time - first token time),
  i.e. 1000 / TPOT in ms.
- Throughputs divide totals over successful requests by the measured duration: first
  request sent -> last response finished.
- Goodput: successful requests per second that meet every SLO of ``--goodput``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from dynamo.core.bench.client import RequestRecord
from dynamo.core.errors import UsageError

__all__ = [
    "PERCENTILES",
    "SLO_METRICS",
    "distribution",
    "itl_samples",
    "parse_goodput",
    "request_metrics",
    "summarize",
]

PERCENTILES = (50, 90, 95, 99)
SLO_METRICS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2el_ms", "itl": "itl_max_ms"}


def distribution(values: Sequence[float] | np.ndarray) -> dict | None:
    """mean, std, min, max and p50/p90/p95/p99 (linear interpolation); None when empty."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return None
    pct = np.percentile(arr, PERCENTILES)
    out = {"count": int(arr.size), "mean": float(arr.mean()), "std": float(arr.std()),
           "min": float(arr.min()), "max": float(arr.max())}
    for p, v in zip(PERCENTILES, pct):
        out[f"p{p}"] = float(v)
    return out


def itl_samples(rec: RequestRecord) -> tuple[list[float], list[float]]:
    """(per-token ITL samples, per-chunk gaps) of one request, in seconds.

    A chunk that carried no token (by usage) merges its gap into the next one that did.
    """
    per_token: list[float] = []
    per_chunk: list[float] = []
    offs, toks = rec.chunk_offsets, rec.chunk_tokens
    if len(offs) < 2:
        return per_token, per_chunk
    prev_chunk = offs[0]
    prev_token = offs[0]
    for t, k in zip(offs[1:], toks[1:]):
        per_chunk.append(t - prev_chunk)
        prev_chunk = t
        if k > 0:
            gap = (t - prev_token) / k
            per_token.extend([gap] * k)
            prev_token = t
    return per_token, per_chunk


def request_metrics(rec: RequestRecord) -> dict:
    """Per-request derived metrics in ms (None when not defined)."""
    out = rec.output_tokens
    ttft_ms = rec.ttft * 1000 if rec.ttft is not None else None
    e2el_ms = rec.e2el * 1000 if rec.e2el is not None else None
    tpot_ms = per_user = None
    if rec.chunk_offsets and out is not None and out > 1:
        span = rec.chunk_offsets[-1] - rec.chunk_offsets[0]
        tpot_ms = span * 1000 / (out - 1)
        per_user = (out - 1) / span if span > 0 else None
    per_token, _ = itl_samples(rec)
    itl_max = max(per_token) * 1000 if per_token else None
    return {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "e2el_ms": e2el_ms, "itl_max_ms": itl_max,
            "output_tokens_per_s_per_user": per_user}


def parse_goodput(specs: Iterable[str]) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` (or one string with spaces/commas) -> ``{"ttft": 200.0, ...}`` in ms."""
    out: dict[str, float] = {}
    for spec in specs:
        for item in spec.replace(",", " ").split():
            key, sep, value = item.partition(":")
            key = key.strip().lower()
            if not sep or key not in SLO_METRICS:
                raise UsageError(f"--goodput {item!r}: expected METRIC:MS with METRIC one of "
                                 f"{', '.join(SLO_METRICS)} (e.g. --goodput ttft:200 tpot:50)")
            try:
                ms = float(value)
            except ValueError:
                raise UsageError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
            if not ms > 0 or math.isinf(ms):
                raise UsageError(f"--goodput {item!r}: the SLO must be a positive number of milliseconds")
            out[key] = ms
    return out


def _peak_concurrency(recs: Sequence[RequestRecord]) -> int:
    events = sorted([(r.sent, 1) for r in recs] + [(r.sent + (r.e2el or 0.0), -1) for r in recs],
                    key=lambda e: (e[0], e[1]))
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def summarize(records: Sequence[RequestRecord], goodput: dict[str, float] | None = None,
              cancelled: int = 0) -> dict:
    """The summary of one load point (all times in ms, rates per second)."""
    goodput = goodput or {}
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    if records:
        start = min(r.sent for r in records)
        end = max(r.sent + (r.e2el or 0.0) for r in records)
        duration = max(end - start, 1e-9)
    else:
        duration = 0.0

    per_req = [request_metrics(r) for r in ok]
    itl_tok: list[float] = []
    itl_chunk: list[float] = []
    for r in ok:
        a, b = itl_samples(r)
        itl_tok.extend(a)
        itl_chunk.extend(b)

    def col(key: str) -> list[float]:
        return [m[key] for m in per_req if m[key] is not None]

    def total(values: Iterable[int | None]) -> int | None:
        vals = list(values)
        return sum(v for v in vals if v is not None) if vals and all(v is not None for v in vals) else None

    out_tokens = [r.output_tokens or 0 for r in ok]
    in_tokens = [r.input_tokens or 0 for r in ok]
    good = 0
    for m in per_req:
        if all(m[SLO_METRICS[k]] is None or m[SLO_METRICS[k]] <= limit for k, limit in goodput.items()):
            good += 1

    tokens = {
        "input_client": total(r.input_tokens_client for r in ok),
        "input_server": total(r.input_tokens_server for r in ok),
        "output_client": total(r.output_tokens_client for r in ok),
        "output_server": total(r.output_tokens_server for r in ok),
        "output_requested": sum(r.requested_output_tokens for r in ok),
    }
    for kind in ("input", "output"):
        c, s = tokens[f"{kind}_client"], tokens[f"{kind}_server"]
        tokens[f"{kind}_difference"] = (c - s) if c is not None and s is not None else None
        tokens[f"{kind}_difference_pct"] = (100.0 * (c - s) / s) if c is not None and s else None
    tokens["short_outputs"] = sum(1 for r in ok if r.output_tokens is not None
                                  and r.output_tokens < r.requested_output_tokens)
    sources: dict[str, int] = {}
    for r in ok:
        sources[r.tokens_source] = sources.get(r.tokens_source, 0) + 1
    tokens["chunk_token_source"] = sources

    lags = [(r.sent - r.scheduled) * 1000 for r in records if r.scheduled is not None]
    ms = lambda v: [x * 1000 for x in v]  # noqa: E731
    summary = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "cancelled": cancelled,
        "errors": dict(sorted(errors.items())),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_token_throughput": sum(out_tokens) / duration if duration else 0.0,
        "total_token_throughput": (sum(out_tokens) + sum(in_tokens)) / duration if duration else 0.0,
        "goodput": good / duration if (duration and goodput) else None,
        "goodput_fraction": good / len(ok) if (ok and goodput) else None,
        "goodput_slos_ms": goodput or None,
        "mean_concurrency": sum(r.e2el or 0.0 for r in records) / duration if duration else 0.0,
        "peak_concurrency": _peak_concurrency(records),
        "tokens": tokens,
        "ttft_ms": distribution(col("ttft_ms")),
        "itl_ms": distribution(ms(itl_tok)),
        "icl_ms": distribution(ms(itl_chunk)),
        "tpot_ms": distribution(col("tpot_ms")),
        "e2el_ms": distribution(col("e2el_ms")),
        "output_tokens_per_s_per_user": distribution(col("output_tokens_per_s_per_user")),
        "input_tokens": distribution(in_tokens),
        "output_tokens": distribution(out_tokens),
        "schedule_lag_ms": distribution(lags),
    }
    return summary
