"""Metric definitions on hand-made records: per-token vs per-chunk ITL, TPOT, goodput, errors."""

from __future__ import annotations

import re

import pytest

from dynamo.core.bench.client import RequestRecord, normalize_base_url
from dynamo.core.bench.metrics import distribution, itl_samples, parse_goodput, request_metrics, summarize
from dynamo.core.errors import UsageError


def rec(offsets, tokens, sent=0.0, e2el=None, out=None, ok=True, error=None, requested=None):
    r = RequestRecord(index=0, sent=sent, ok=ok, error=error)
    r.chunk_offsets = list(offsets)
    r.chunk_tokens = list(tokens)
    r.ttft = offsets[0] if offsets else None
    r.e2el = e2el if e2el is not None else (offsets[-1] if offsets else 0.1)
    r.output_tokens_server = out if out is not None else sum(tokens)
    r.requested_output_tokens = requested if requested is not None else r.output_tokens_server
    return r


def test_itl_per_token_divides_each_gap_by_its_tokens():
    # first token at 100 ms, then chunks of 3 tokens every 30 ms
    r = rec([0.100, 0.130, 0.160], [1, 3, 3])
    per_token, per_chunk = itl_samples(r)
    assert per_token == pytest.approx([0.010] * 6)
    assert per_chunk == pytest.approx([0.030, 0.030])
    m = request_metrics(r)
    assert m["ttft_ms"] == pytest.approx(100)
    assert m["tpot_ms"] == pytest.approx(60 / 6)  # (160-100)/(7-1)
    assert m["output_tokens_per_s_per_user"] == pytest.approx(100)


def test_chunk_without_tokens_merges_its_gap_into_the_next():
    r = rec([0.1, 0.11, 0.13], [1, 0, 2])
    per_token, per_chunk = itl_samples(r)
    assert per_token == pytest.approx([0.015, 0.015])
    assert per_chunk == pytest.approx([0.01, 0.02])


def test_single_token_request_has_no_tpot():
    m = request_metrics(rec([0.05], [1]))
    assert m["tpot_ms"] is None and m["output_tokens_per_s_per_user"] is None


def test_distribution_percentiles():
    d = distribution(list(range(1, 101)))
    assert d["min"] == 1 and d["max"] == 100 and d["mean"] == 50.5
    assert d["p50"] == pytest.approx(50.5) and d["p99"] == pytest.approx(99.01)
    assert distribution([]) is None


def test_summary_goodput_errors_and_throughput():
    good = rec([0.1, 0.2], [1, 1], sent=0.0, e2el=0.2)  # ttft 100, tpot 100
    slow = rec([0.3, 0.35], [1, 1], sent=0.0, e2el=0.35)  # ttft 300, tpot 50
    failed = RequestRecord(index=2, sent=0.5, error="http_500", e2el=0.5)  # ends at 1.0
    dropped = RequestRecord(index=3, sent=0.1, error="disconnected", e2el=0.1)
    s = summarize([good, slow, failed, dropped], parse_goodput(["ttft:200 tpot:150"]))
    assert s["completed"] == 2 and s["failed"] == 2
    assert s["errors"] == {"disconnected": 1, "http_500": 1}
    assert s["duration_s"] == pytest.approx(1.0)
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["output_token_throughput"] == pytest.approx(4.0)
    assert s["goodput"] == pytest.approx(1.0) and s["goodput_fraction"] == pytest.approx(0.5)
    assert s["ttft_ms"]["count"] == 2
    assert s["peak_concurrency"] == 3


def test_token_count_differences():
    a = rec([0.1, 0.2], [1, 1], out=10, requested=12)
    a.output_tokens_client, a.input_tokens_client, a.input_tokens_server = 9, 100, 110
    s = summarize([a])
    t = s["tokens"]
    assert t["output_client"] == 9 and t["output_server"] == 10 and t["output_difference"] == -1
    assert t["output_difference_pct"] == pytest.approx(-10.0)
    assert t["input_difference"] == -10 and t["short_outputs"] == 1


def test_goodput_parsing():
    assert parse_goodput(["ttft:200", "tpot:50,e2el:1000"]) == {"ttft": 200, "tpot": 50, "e2el": 1000}
    for bad in (["ttft"], ["latency:3"], ["ttft:abc"], ["ttft:-1"]):
        with pytest.raises(UsageError):
            parse_goodput(bad)


@pytest.mark.parametrize("url", ["http://h:1", "http://h:1/", "http://h:1/v1", "h:1", "http://h:1/v1/chat/completions"])
def test_base_url_normalization(url):
    assert normalize_base_url(url) == "http://h:1/v1"


@pytest.mark.parametrize("url, message", [
    ("not-a-url", "not a URL"), ("ftp://x", "the scheme must be http or https, not ftp"), ("http://", "no host"),
    ("http://h:99999", "from 1 to 65535, not 99999"), ("http://h:0", "not 0"), ("http://h:x/v1", "not x"),
    ("h:", "not a URL"), ("http://a b:1", "is not a URL"), ("", "is not a URL"),
])
def test_a_base_url_that_cannot_work_is_a_usage_error(url, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        normalize_base_url(url)


def test_generator_warnings():
    from dynamo.core.bench.runner import LoadPoint, generator_warnings

    calm = {"client_loop_lag_ms": {"p50": 0.1, "p99": 2.0}, "schedule_lag_ms": {"p50": 0.2}}
    assert generator_warnings(calm, LoadPoint(request_rate=10)) == []
    busy = {"client_loop_lag_ms": {"p50": 4.0, "p99": 40.0}, "schedule_lag_ms": {"p50": 30.0}}
    w = generator_warnings(busy, LoadPoint(request_rate=10))
    assert len(w) == 2 and "40 ms late" in w[0] and "30 ms late" in w[1]
    capped = generator_warnings(busy, LoadPoint(request_rate=10, max_concurrency=2))
    assert len(capped) == 1  # a cap delays arrivals on purpose
