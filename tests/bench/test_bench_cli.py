"""The command line: usage errors exit 2 with one message, help defines every metric, list syntax."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --url URL or --profile PROFILE"),
    (["--url", "http://x", "--profile", "agg"], "give exactly one of"),
    (["--url", "http://x", "-c", "2", "--request-rate", "5"], "--concurrency and --request-rate are exclusive"),
    (["--url", "http://x", "-c", "0"], "--concurrency '0' is not valid"),
    (["--url", "http://x", "--request-rate", "-1"], "--request-rate '-1' is not valid"),
    (["--url", "http://x", "--goodput", "latency:5"], "expected METRIC:MS"),
    (["--url", "http://x", "--workload", "trace"], "--workload trace needs --dataset FILE"),
    (["--url", "http://x", "--workload", "nope"], "--workload must be one of"),
    (["--url", "http://x", "--dataset", "/nonexistent.json"], "no such file"),
    (["--url", "http://x", "--endpoint", "embeddings"], "--endpoint must be chat or completions"),
    (["--url", "http://x", "--duration", "soon"], "--duration: expected a duration"),
    (["--url", "http://x", "--extra-body", "[1]"], "--extra-body must be a JSON object"),
    (["--url", "http://x", "--max-concurrency", "4"], "--max-concurrency applies to --request-rate"),
    (["--url", "http://x", "--tokenizer", "/nonexistent/dir/"], "--tokenizer"),
])
def test_usage_errors_exit_2_with_one_message(bench, args, message):
    proc = bench(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_usage_error_in_a_real_process(bench_process):
    proc = bench_process("--url", "http://127.0.0.1:1", "-c", "1", "--request-rate", "2")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --concurrency and --request-rate")
    assert "Traceback" not in proc.stderr


def test_compare_missing_results_exit_2(bench, tmp_path):
    proc = bench("compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert proc.returncode == 2 and "error: cannot read" in proc.stderr


def test_help_defines_every_metric(bench, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")
    proc = bench("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for phrase in ("Load-benchmark an OpenAI-compatible endpoint", "TTFT: request sent -> first response chunk that carries a token",
                   "ITL (per token):", "ICL (per chunk):", "TPOT: (last token time - first token time) / (output tokens - 1)",
                   "E2EL: request sent -> last byte", "Goodput:", "Output tok/s per user:", "Schedule lag:",
                   "the server's final count equals the number of chunks (chunks)",
                   "plus mean, min and max; the standard deviation (std) too in --json, results.json and summary.csv",
                   "--goodput", "--burstiness", "--concurrency", "--shared-prefix-len", "--dataset", "--output-dir"):
        assert phrase in text, phrase


def test_space_separated_lists_like_vllm(fake_server, bench):
    url = fake_server()
    proc = bench("--url", url, "-c", "1", "2", "-n", "4", "--output-len", "4", "--input-len", "8",
                 "--goodput", "ttft:5000", "tpot:5000", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [p["point"]["label"] for p in doc["points"]] == ["c1", "c2"]
    assert doc["config"]["goodput_slos_ms"] == {"ttft": 5000.0, "tpot": 5000.0}
    assert all(p["summary"]["goodput_fraction"] == 1.0 for p in doc["points"])


def test_duration_mode_with_rate_and_table_output(fake_server, bench, tmp_path):
    url = fake_server("--itl-ms", "5")
    proc = bench("--url", url, "--request-rate", "40", "--duration", "1s", "--output-len", "5", "--input-len", "8",
                 "--warmup", "3", "--endpoint", "completions", "-o", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stderr
    assert "TTFT (ms)" in proc.stdout and "Request throughput" in proc.stdout
    doc = json.loads((tmp_path / "d" / "results.json").read_text())
    s = doc["points"][0]["summary"]
    assert 20 <= s["completed"] <= 70 and s["failed"] == 0  # ~40 arrivals in 1 s; warmup excluded
    assert doc["config"]["duration_s"] == 1.0


def test_tables_are_not_cut_when_stdout_is_not_a_terminal(fake_server):
    url = fake_server("--itl-ms", "1")
    # a pipe without width hints (readline may have put COLUMNS in this process's environment)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.run([sys.executable, "-m", "dynamo.cli.bench", "--url", url, "-c", "1,2", "-n", "4",
                           "--output-len", "4", "--input-len", "8", "--no-progress"], capture_output=True, text=True,
                          env=env, timeout=90, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "dynamo bench sweep" in proc.stdout
    assert "…" not in proc.stdout and "…" not in proc.stderr, proc.stdout
    header = next(line for line in proc.stdout.splitlines() if "Tok/s/user p50" in line)
    for name in ("Req/s", "Out tok/s", "TTFT p50", "TTFT p99", "ITL p99", "TPOT p50", "E2EL p50", "Goodput"):
        assert name in header, header
    assert re.search(r"^model fake-model at \S+ \(chat, per-chunk usage yes, seed \d+\)$", proc.stdout, re.MULTILINE)
