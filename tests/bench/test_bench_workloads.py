"""Workloads and arrival processes: exact prompt lengths, shared prefixes, traces, datasets, rates."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics

import pytest

from dynamo.core.bench import workloads as wl
from dynamo.core.bench.runner import arrival_intervals
from dynamo.core.errors import UsageError


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return wl.load_tokenizer(str(tokenizer_dir))


def take(workload, n):
    return list(itertools.islice(workload.sessions(), n))


def test_synthetic_prompts_have_exact_token_counts(tok):
    maker = wl.TextMaker(tok)
    sessions = take(wl.SyntheticWorkload(maker, 300, 40, input_std=50, output_std=10, seed=3), 50)
    ins = [s.turns[0].input_tokens for s in sessions]
    for s in sessions:
        assert tok.count(s.turns[0].prompt) == s.turns[0].input_tokens
    assert 250 < statistics.mean(ins) < 350 and statistics.pstdev(ins) > 20
    assert len({s.turns[0].prompt for s in sessions}) == 50
    again = take(wl.SyntheticWorkload(wl.TextMaker(tok), 300, 40, input_std=50, output_std=10, seed=3), 50)
    assert [s.turns[0].prompt for s in again] == [s.turns[0].prompt for s in sessions]


def test_fixed_lengths_without_std(tok):
    sessions = take(wl.SyntheticWorkload(wl.TextMaker(tok), 128, 16), 10)
    assert {s.turns[0].input_tokens for s in sessions} == {128}
    assert {s.turns[0].output_tokens for s in sessions} == {16}


def test_without_tokenizer_lengths_scale_with_calibration():
    maker = wl.TextMaker(None)
    assert not maker.exact
    text, count = maker.text(100, random.Random(0))
    assert count is None and len(text.split()) == 100
    maker.tokens_per_word = 2.0
    text, _ = maker.text(100, random.Random(0))
    assert len(text.split()) == 50


def test_shared_prefix_groups(tok):
    w = wl.SharedPrefixWorkload(wl.TextMaker(tok), groups=3, prompts_per_group=4, prefix_len=64, input_len=20,
                                output_len=8, seed=1)
    sessions = take(w, 12)
    assert sorted(s.group for s in sessions) == sorted([0, 1, 2] * 4)
    by_group: dict[int, list[str]] = {}
    for s in sessions:
        assert s.turns[0].input_tokens == 84 == tok.count(s.turns[0].prompt)
        by_group.setdefault(s.group, []).append(s.turns[0].prompt)
    prefixes = set()
    for prompts in by_group.values():
        words = [p.split() for p in prompts]
        assert all(w[:64] == words[0][:64] for w in words)
        assert len({" ".join(w[64:]) for w in words}) == len(words)
        prefixes.add(" ".join(words[0][:64]))
    assert len(prefixes) == 3


def test_multi_turn_sessions(tok):
    sessions = take(wl.MultiTurnWorkload(wl.TextMaker(tok), turns=3, input_len=10, output_len=5), 2)
    assert all(len(s.turns) == 3 for s in sessions)
    assert all(t.input_tokens == 10 for s in sessions for t in s.turns)


def test_trace_replay_shares_blocks_and_keeps_lengths(tmp_path, tok):
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"timestamp": 1000, "input_length": 40, "output_length": 5, "hash_ids": [1, 2, 3]},
        {"timestamp": 1500, "input_length": 35, "output_length": 7, "hash_ids": [1, 2, 4]},
        {"timestamp": 3000, "input_length": 10, "output_length": 1, "hash_ids": [9]},
    ]
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    w = wl.TraceWorkload(trace, wl.TextMaker(tok), block_size=16, speedup=2.0)
    s = take(w, 10)
    assert len(s) == 3
    assert [x.timestamp for x in s] == [0.0, 0.25, 1.0]
    assert [x.turns[0].input_tokens for x in s] == [40, 35, 10]
    assert [tok.count(x.turns[0].prompt) for x in s] == [40, 35, 10]
    a, b = s[0].turns[0].prompt.split(), s[1].turns[0].prompt.split()
    assert a[:32] == b[:32] and a[32:35] != b[32:35]


def test_trace_errors(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5}\n')
    with pytest.raises(UsageError, match="bad.jsonl:1"):
        wl.TraceWorkload(bad, wl.TextMaker(tok))


def test_sharegpt_dataset(tmp_path, tok):
    words = tok.single_token_words()
    para = lambda n, k=0: "".join(words[(k + i) % len(words)] for i in range(n)).strip()  # noqa: E731
    data = [
        {"conversations": [{"from": "human", "value": para(20)}, {"from": "gpt", "value": para(30, 5)}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": para(30)}]},  # too short
        {"conversations": [{"from": "gpt", "value": para(10)}]},  # no human turn
        {"conversations": [{"from": "human", "value": para(12, 3)}, {"from": "gpt", "value": para(9)}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    w = wl.ShareGPTWorkload(path, tok, seed=0)
    assert sorted((t.input_tokens, t.output_tokens) for t in w.pairs) == [(12, 9), (20, 30)]
    fixed = wl.ShareGPTWorkload(path, tok, output_len=50)
    assert {t.output_tokens for t in fixed.pairs} == {50}
    assert len(take(w, 5)) == 5
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(UsageError):
        wl.ShareGPTWorkload(tmp_path / "x.json", tok)


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrival_intervals_have_the_asked_mean_and_shape(burstiness):
    rate = 50.0
    gaps = list(itertools.islice(arrival_intervals(rate, burstiness, random.Random(7)), 40000))
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.02)
    cv = statistics.pstdev(gaps) / mean  # gamma(k): CV = 1/sqrt(k); Poisson: 1
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_infinite_rate_sends_everything_at_once_and_infinite_burstiness_is_constant():
    assert list(itertools.islice(arrival_intervals(math.inf, 1.0, random.Random(0)), 5)) == [0.0] * 5
    assert list(itertools.islice(arrival_intervals(4.0, math.inf, random.Random(0)), 3)) == [0.25] * 3
