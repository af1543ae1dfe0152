"""Against the mocker: measured TTFT/ITL follow its timing model, token counts are exact,
sweeps write their artifacts and plots, multi-turn and trace workloads run, --profile works."""

from __future__ import annotations

import json
import math
import textwrap

import pytest


def prefill_ms(tokens: int) -> float:
    return 4.209989e-07 * tokens**2 + 1.518344e-02 * tokens + 16.50142


def decode_ms(usage: float) -> float:
    return max(1.0, -25.74 * usage**2 + 54.01 * usage + 5.74)


def summary_of(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["points"][0]["summary"]


def test_ttft_and_itl_follow_the_mocker_timing_model(mocker, bench, tokenizer_dir):
    # 500 prompt tokens in a pool of 64 blocks of 16: KV usage ~0.5 while decoding, so the decode
    # step (~26 ms) is far from its empty-cache value (~6 ms). Speedup 0.25 makes every delay 4x
    # longer, so the model's times dominate HTTP and scheduling noise on a busy 2-core machine.
    speedup, prompt, out, blocks, bs = 0.25, 500, 6, 64, 16
    url = mocker("--model-path", str(tokenizer_dir), "--speedup-ratio", str(speedup), "--num-gpu-blocks", str(blocks),
                 "--block-size", str(bs))
    s = summary_of(bench("--url", url, "--endpoint", "completions", "--tokenizer", str(tokenizer_dir), "-c", "1",
                         "-n", "4", "--input-len", str(prompt), "--output-len", str(out), "--json"))
    ttft = prefill_ms(prompt) / speedup
    itl = sum(decode_ms(math.ceil((prompt + i) / bs) / blocks) for i in range(1, out)) / (out - 1) / speedup
    assert s["ttft_ms"]["p50"] == pytest.approx(ttft, rel=0.12)
    assert s["itl_ms"]["p50"] == pytest.approx(itl, rel=0.10)
    assert s["tpot_ms"]["p50"] == pytest.approx(itl, rel=0.10)
    assert s["e2el_ms"]["p50"] == pytest.approx(ttft + (out - 1) * itl, rel=0.10)
    t = s["tokens"]
    assert t["input_client"] == t["input_server"] == 4 * prompt
    assert t["output_client"] == t["output_server"] == t["output_requested"] == 4 * out


def test_token_counts_are_exact_on_the_chat_endpoint(mocker, bench, tokenizer_dir):
    url = mocker("--model-path", str(tokenizer_dir), "--speedup-ratio", "0")
    s = summary_of(bench("--url", url, "--tokenizer", str(tokenizer_dir), "-c", "4", "-n", "20", "--input-len", "64",
                         "--input-len-std", "16", "--output-len", "24", "--output-len-std", "8", "--json"))
    t = s["tokens"]
    assert s["completed"] == 20
    assert t["output_client"] == t["output_server"] == t["output_requested"] and t["output_difference"] == 0
    assert t["short_outputs"] == 0
    # the server also counts the chat template; the client counts the message text only
    assert t["input_server"] > t["input_client"] and t["input_difference"] < 0
    assert s["output_tokens"]["min"] < s["output_tokens"]["max"]


def test_sweep_writes_artifacts_plots_and_compares(mocker, bench, tmp_path):
    url = mocker("--speedup-ratio", "0")
    out = tmp_path / "sweep"
    proc = bench("--url", url, "-c", "1,2", "-n", "6", "--input-len", "32", "--output-len", "8", "-o", str(out),
                 "--goodput", "ttft:1000", "tpot:1000")
    assert proc.returncode == 0, proc.stderr
    assert "dynamo bench sweep" in proc.stdout and "c2" in proc.stdout
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "summary.csv", "requests-c1.jsonl", "requests-c2.jsonl", "ttft.png", "itl.png",
            "throughput.png", "throughput_per_user.png"} <= names
    for png in ("ttft.png", "itl.png", "throughput.png", "throughput_per_user.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "results.json").read_text())
    assert [p["point"]["label"] for p in doc["points"]] == ["c1", "c2"]
    assert doc["server"]["model"] == "mock-model" and doc["config"]["goodput_slos_ms"] == {"ttft": 1000, "tpot": 1000}
    assert all(p["summary"]["goodput_fraction"] == 1.0 for p in doc["points"])
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "ttft_ms_p99" in csv_lines[0]
    assert len((out / "requests-c2.jsonl").read_text().splitlines()) == 6

    proc = bench("compare", str(out), str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [p["label"] for p in data["points"]] == ["c1", "c2"]
    ratios = {r["metric"]: r["ratio"] for r in data["points"][0]["metrics"]}
    assert ratios["TTFT p50 (ms)"] == pytest.approx(1.0) and ratios["Request throughput (req/s)"] == pytest.approx(1.0)
    proc = bench("compare", str(out), str(out / "results.json"))
    assert proc.returncode == 0 and "B/A" in proc.stdout and "1.000" in proc.stdout


def test_multi_turn_conversations_carry_their_history(mocker, bench, tokenizer_dir, tmp_path):
    url = mocker("--model-path", str(tokenizer_dir), "--speedup-ratio", "0")
    out = tmp_path / "mt"
    s = summary_of(bench("--url", url, "--tokenizer", str(tokenizer_dir), "--workload", "multi-turn", "--turns", "3",
                         "-c", "2", "-n", "6", "--input-len", "20", "--output-len", "10", "-o", str(out), "--json"))
    assert s["completed"] == 6
    reqs = [json.loads(x) for x in (out / "requests-c2.jsonl").read_text().splitlines()]
    by_session: dict[int, list[dict]] = {}
    for r in reqs:
        by_session.setdefault(r["session"], []).append(r)
    assert len(by_session) == 2
    for turns in by_session.values():
        turns.sort(key=lambda r: r["turn"])
        assert [r["turn"] for r in turns] == [0, 1, 2]
        assert [r["input_tokens_client"] for r in turns] == [20, 50, 80]  # history: user 20 + reply 10 per turn
        server = [r["input_tokens_server"] for r in turns]
        assert server[0] < server[1] < server[2]
        assert turns[1]["sent_s"] >= turns[0]["sent_s"] + turns[0]["e2el_ms"] / 1000


def test_mooncake_trace_replay(mocker, bench, tokenizer_dir, tmp_path):
    url = mocker("--model-path", str(tokenizer_dir), "--speedup-ratio", "0")
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 200 * i, "input_length": 40 + i, "output_length": 4, "hash_ids": [7, 8, 100 + i]}
            for i in range(6)]
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "trace"
    s = summary_of(bench("--url", url, "--tokenizer", str(tokenizer_dir), "--dataset", str(trace),
                         "--trace-block-size", "16", "--trace-speedup", "2", "-o", str(out), "--json"))
    assert s["completed"] == 6
    assert s["tokens"]["input_client"] == sum(40 + i for i in range(6))
    reqs = sorted((json.loads(x) for x in (out / "requests-trace.jsonl").read_text().splitlines()),
                  key=lambda r: r["scheduled_s"])
    assert [r["scheduled_s"] for r in reqs] == pytest.approx([0.1 * i for i in range(6)])
    for r in reqs:
        assert r["sent_s"] - r["scheduled_s"] < 0.05


PROFILE = """\
name: benchtest
model: {name: bench-model}
backend: mocker
nats: embedded
frontend: {host: 127.0.0.1, port: 0}
ports: {base: 0}
router: {mode: round_robin}
workers:
  decode: {role: agg, replicas: 1, args: {speedup-ratio: 0}}
"""


@pytest.mark.slow
def test_profile_is_served_benchmarked_and_stopped(bench_process, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMO_HOME", str(tmp_path / "home"))  # its run's link goes there, not into the repo
    profile = tmp_path / "benchtest.yaml"
    profile.write_text(textwrap.dedent(PROFILE))
    out = tmp_path / "out"
    proc = bench_process("--profile", str(profile), "-n", "5", "--input-len", "16", "--output-len", "4",
                         "-o", str(out), "--json", timeout=120)
    if proc.returncode != 0 and "dynamo serve" in proc.stderr and "failed" in proc.stderr:
        pytest.skip(f"dynamo serve cannot run this profile here: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["server"]["model"] == "bench-model" and doc["points"][0]["summary"]["completed"] == 5
    state = json.loads((out / "serve-run" / "state.json").read_text())
    assert state.get("status") == "stopped"
