"""End to end against the fake server: exact timing model, failure modes, arrival rates, pooling."""

from __future__ import annotations

import asyncio
import json
import re
import socket

import pytest

from dynamo.core.bench.client import make_session


def summary_of(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert len(doc["points"]) == 1
    return doc["points"][0]["summary"]


def test_ttft_itl_and_tpot_match_the_server_timing(fake_server, bench, tokenizer_dir):
    # First token 100 ms after the request; then a chunk of 4 tokens every 20 ms; a role-only chunk first.
    url = fake_server("--ttft-ms", "100", "--itl-ms", "20", "--tokens-per-chunk", "4", "--role-chunk")
    s = summary_of(bench("--url", url, "-c", "2", "-n", "12", "--input-len", "50", "--output-len", "29",
                         "--tokenizer", str(tokenizer_dir), "--json"))
    assert s["completed"] == 12 and s["failed"] == 0
    assert 100 <= s["ttft_ms"]["p50"] <= 100 * 1.15  # the role-only chunk is not the first token
    assert s["icl_ms"]["p50"] == pytest.approx(20, rel=0.15)
    assert s["itl_ms"]["p50"] == pytest.approx(5, rel=0.15)  # 20 ms / 4 tokens
    assert s["itl_ms"]["count"] == 12 * 28 and s["icl_ms"]["count"] == 12 * 7
    assert s["tpot_ms"]["p50"] == pytest.approx(5, rel=0.15)
    assert s["e2el_ms"]["p50"] == pytest.approx(100 + 140, rel=0.15)
    t = s["tokens"]
    assert t["output_server"] == t["output_client"] == t["output_requested"] == 12 * 29
    assert t["input_client"] == 12 * 50 and t["chunk_token_source"] == {"usage": 12}


def test_without_per_chunk_usage_tokens_come_from_the_tokenizer(fake_server, bench, tokenizer_dir):
    url = fake_server("--itl-ms", "10", "--tokens-per-chunk", "2", "--reject-continuous")
    s = summary_of(bench("--url", url, "-c", "1", "-n", "3", "--output-len", "9", "--endpoint", "completions",
                         "--tokenizer", str(tokenizer_dir), "--json"))
    assert s["tokens"]["chunk_token_source"] == {"tokenizer": 3}
    assert s["itl_ms"]["count"] == 3 * 8 and s["icl_ms"]["count"] == 3 * 4
    assert s["itl_ms"]["p50"] == pytest.approx(5, rel=0.2)


def test_the_table_says_where_tokens_per_chunk_came_from(fake_server, bench, tokenizer_dir):
    url = fake_server("--itl-ms", "1", "--tokens-per-chunk", "2", "--reject-continuous")
    proc = bench("--url", url, "-n", "3", "--output-len", "9", "--tokenizer", str(tokenizer_dir), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^Tokens per chunk from +tokenizer \(3 requests\) *$", proc.stdout, re.MULTILINE), proc.stdout


def test_errors_and_dropped_connections_are_counted(fake_server, bench, tmp_path):
    # Of requests 1..30: every 3rd is a 500, then every 5th is cut before the response,
    # then every 4th is cut after two chunks.
    url = fake_server("--error-every", "3", "--drop-early-every", "5", "--drop-every", "4", "--itl-ms", "1")
    out = tmp_path / "out"
    proc = bench("--url", url, "-c", "3", "-n", "30", "--output-len", "8", "--json", "-o", str(out))
    s = summary_of(proc)
    assert s["errors"] == {"disconnected": 8, "http_500": 10}
    assert s["completed"] == 12 and s["failed"] == 18
    lines = [json.loads(x) for x in (out / "requests-c3.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and sum(1 for x in lines if x["ok"]) == 12
    assert {x["status"] for x in lines if x["error"] == "http_500"} == {500}


def test_a_stalled_stream_times_out_and_the_run_goes_on(fake_server, bench):
    url = fake_server("--stall-every", "2", "--itl-ms", "1")
    s = summary_of(bench("--url", url, "-c", "4", "-n", "4", "--output-len", "8", "--timeout", "1", "--json"))
    assert s["errors"] == {"timeout": 2} and s["completed"] == 2


def test_every_request_failing_exits_1(fake_server, bench_process):
    url = fake_server("--error-every", "1")
    proc = bench_process("--url", url, "-n", "3", "--no-progress")
    assert proc.returncode == 1
    assert "every request failed (3 requests sent: http_500 3)" in proc.stderr and "Traceback" not in proc.stderr
    # the report says how many were sent and that all failed (not "requested 0": no tokens to count)
    assert re.search(r"^Requests +3 sent: 0 ok, 3 failed \(every request failed\) *$", proc.stdout, re.MULTILINE), \
        proc.stdout
    assert "requested 0" not in proc.stdout and "Output tokens client / server" not in proc.stdout


def test_an_unreachable_server_fails_the_readiness_check(bench):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = bench("--url", f"http://127.0.0.1:{port}", "--ready-timeout", "0.5")
    assert proc.returncode == 1
    assert "is not ready after 0.5s" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("refused, extra, hint", [
    ("ignore_eos", None, True),
    ("min_tokens", None, True),
    ("top_k", '{"top_k": 5}', False),  # the 400 is about --extra-body, not ignore_eos
    ("stream_options", None, False),  # about another field bench sends
])
def test_the_no_ignore_eos_hint_only_when_the_400_is_about_ignore_eos(fake_server, bench, refused, extra, hint):
    url = fake_server("--reject-field", refused)
    proc = bench("--url", url, "-n", "2", "--output-len", "4", "--no-progress",
                 *(["--extra-body", extra] if extra else []))
    assert proc.returncode == 1, proc.stderr
    assert "a one-token test request" in proc.stderr and f"{refused}: extra inputs are not permitted" in proc.stderr
    assert ("--no-ignore-eos" in proc.stderr) is hint, proc.stderr


def test_poisson_arrivals_reach_the_asked_rate(fake_server, bench, tmp_path):
    url = fake_server()
    out = tmp_path / "out"
    # seed 0: this draw of 1500 gaps has a mean within 1 % of 1/300 s, so the check is about the driver
    s = summary_of(bench("--url", url, "--request-rate", "300", "-n", "1500", "--seed", "0", "--output-len", "4",
                         "--input-len", "8", "--json", "-o", str(out)))
    assert s["completed"] == 1500
    sent = sorted(json.loads(x)["sent_s"] for x in (out / "requests-rate-300.jsonl").read_text().splitlines())
    achieved = (len(sent) - 1) / (sent[-1] - sent[0])
    assert achieved == pytest.approx(300, rel=0.05)
    assert s["schedule_lag_ms"]["p50"] < 5
    assert s["client_loop_lag_ms"]["count"] > 100  # the event loop was watched all along


def test_non_streaming_requests(fake_server, bench):
    url = fake_server("--ttft-ms", "20")
    s = summary_of(bench("--url", url, "-n", "3", "--no-stream", "--output-len", "5", "--json"))
    assert s["completed"] == 3 and s["ttft_ms"] is None and s["e2el_ms"]["p50"] >= 20
    assert s["tokens"]["output_server"] == 15


def test_connections_are_pooled_with_tcp_nodelay(fake_server):
    url = fake_server("--itl-ms", "2")

    async def check() -> tuple[set, set]:
        session = make_session(4, 10)
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": 5, "stream": True}
        try:
            flags, sockets = set(), set()
            for _ in range(5):
                async with session.post(url + "/v1/completions", json=body) as resp:
                    sock = resp.connection.transport.get_extra_info("socket")
                    flags.add(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                    sockets.add(sock.getsockname())
                    await resp.read()
            return flags, sockets
        finally:
            await session.close()

    flags, sockets = asyncio.run(check())
    assert flags == {1}
    assert len(sockets) == 1  # keep-alive: one connection reused for sequential requests


def test_requests_carry_ignore_eos_usage_options_and_extra_body(fake_server, bench, tmp_path):
    log = tmp_path / "bodies.jsonl"
    url = fake_server("--log", str(log))
    proc = bench("--url", url, "-n", "2", "--output-len", "7", "--extra-body", '{"temperature": 0.5}', "--json")
    assert proc.returncode == 0, proc.stderr
    bodies = [json.loads(x) for x in log.read_text().splitlines() if json.loads(x)["max_tokens"] == 7]
    assert len(bodies) == 2
    b = bodies[0]
    assert b["ignore_eos"] is True and b["min_tokens"] == 7 and b["temperature"] == 0.5
    assert b["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert b["model"] == "fake-model" and b["messages"][0]["role"] == "user"


@pytest.mark.parametrize("load", [["-c", "1,2", "-n", "3"], ["-c", "1,2", "-n", "2", "--warmup", "1"],
                                  ["--request-rate", "200,400", "-n", "3"]],
                         ids=["sweep", "warmup", "open-loop"])
def test_every_conversation_is_sent_once_before_any_is_repeated(fake_server, bench, tmp_path, load):
    # Six conversations, six requests over the points (and warmup): each prompt exactly once. A point
    # that stopped drawing prompts one too far used to skip one, and the dataset's cycling then sent
    # another one twice.
    data = [{"conversations": [{"from": "human", "value": f"question {k} " + "word " * (5 + k)},
                               {"from": "gpt", "value": "an answer of several words"}]} for k in range(6)]
    dataset = tmp_path / "six.json"
    dataset.write_text(json.dumps(data))
    log = tmp_path / "bodies.jsonl"
    url = fake_server("--log", str(log))
    proc = bench("--url", url, "--dataset", str(dataset), "--output-len", "4", "--seed", "3", "--json",
                 "--no-progress", *load)
    assert proc.returncode == 0, proc.stderr
    prompts = [json.loads(x)["messages"][0]["content"] for x in log.read_text().splitlines()
               if json.loads(x)["max_tokens"] == 4]
    assert sorted(p.split()[1] for p in prompts) == [str(k) for k in range(6)]
