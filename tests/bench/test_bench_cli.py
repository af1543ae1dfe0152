"""The command line: usage errors exit 2 with one message, help defines every metric, list syntax."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

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
    # an empty item is a typo, not a shorter list (--ready-timeout: would the run start, it ends soon)
    (["--url", "http://x", "-c", "1,,2", "--ready-timeout", "1"], "--concurrency '1,,2': an empty value"),
    (["--url", "http://x", "-c", "1,2,", "--ready-timeout", "1"], "--concurrency '1,2,': an empty value"),
    (["--url", "http://x", "--request-rate", "1,,2", "--ready-timeout", "1"], "--request-rate '1,,2': an empty value"),
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


@pytest.mark.parametrize("url, message", [
    ("not-a-url", "--url not-a-url: not a URL: expected http://HOST:PORT"),
    ("ftp://x", "--url ftp://x: the scheme must be http or https, not ftp"),
    ("http://127.0.0.1:99999", "--url http://127.0.0.1:99999: the port must be a number from 1 to 65535, not 99999"),
    ("http://", "--url http://: no host"),
])
def test_a_url_that_cannot_work_is_refused_at_once(bench_process, url, message):
    # with the default --ready-timeout (120 s): refused before any connection is tried
    started = time.monotonic()
    proc = bench_process("--url", url, "-n", "1", "--no-progress", timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {message}") and proc.stderr.count("\n") == 1, proc.stderr
    assert time.monotonic() - started < 15


def test_a_port_that_does_not_speak_http_is_named_so(nats_like_server, bench):
    started = time.monotonic()
    proc = bench("--url", nats_like_server, "-n", "1", "--ready-timeout", "10")
    assert proc.returncode == 2, proc.stderr
    assert (f"error: {nats_like_server}/v1 does not speak HTTP (it answers like a NATS server, not an HTTP "
            "server): check its host and port") in proc.stderr
    assert "INFO" not in proc.stderr and "Bad status line" not in proc.stderr
    assert time.monotonic() - started < 5  # waiting would not make it speak HTTP


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


def _sweep(url: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynamo.cli.bench", "--url", url, "-c", "1,2", "-n", "4",
                           "--output-len", "4", "--input-len", "8", "--no-progress"], capture_output=True, text=True,
                          env=env, timeout=90, stdin=subprocess.DEVNULL)


def _sweep_lines(stdout: str) -> list[str]:
    return stdout[stdout.index("dynamo bench sweep: throughput"):].splitlines()


def test_tables_are_not_cut_when_stdout_is_not_a_terminal(fake_server):
    url = fake_server("--itl-ms", "1")
    # a pipe without width hints (readline may have put COLUMNS in this process's environment)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = _sweep(url, env)
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout and "…" not in proc.stderr, proc.stdout
    sweep = _sweep_lines(proc.stdout)
    headers = " ".join(line for line in sweep if line.startswith("┃"))
    for name in ("Load", "OK", "Err", "Req/s", "Out tok/s", "Tok/s/user p50", "Goodput", "TTFT p50", "TTFT p99",
                 "ITL p50", "ITL p99", "TPOT p50", "E2EL p50"):
        assert name in headers, headers
    # the sweep is as readable in a file as on a terminal: no line of 130 columns
    assert max(len(line) for line in sweep) <= 80, "\n".join(sweep)
    assert re.search(r"^model fake-model at \S+ \(chat, per-chunk usage yes, seed \d+\)$", proc.stdout, re.MULTILINE)


def test_tables_fit_an_80_column_terminal_without_cutting_numbers(fake_server):
    url = fake_server("--itl-ms", "1")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = _sweep(url, {**env, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout, proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80, proc.stdout
    sweep = _sweep_lines(proc.stdout)
    rows = [line for line in sweep if line.startswith("│ c")]
    assert [row.split()[1] for row in rows] == ["c1", "c2", "c1", "c2"], sweep  # throughput, then latency
    for row in rows:  # every cell is a whole number: digits, separators, a decimal point
        cells = [c.strip() for c in row.strip("│").split("│")][1:]
        assert all(re.fullmatch(r"[0-9][0-9,]*(\.[0-9]+)?|-", c) for c in cells), row
