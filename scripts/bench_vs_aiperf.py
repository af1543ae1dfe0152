#!/usr/bin/env python3
"""`dynamo bench` vs aiperf: same server, same load; then the highest load each drives.

    python scripts/bench_vs_aiperf.py [--aiperf /path/to/venv/bin/aiperf] [--out DIR]
                                      [--concurrency 8] [--requests 200] [--isl 256] [--osl 64]
                                      [--speedup 1.0] [--capacity-only] [--no-capacity]

1. Agreement. A local tokenizer (byte-level BPE trained here with `tokenizers` on text that
   ships with Python) is given to both the mocker (`--model-path`) and both clients. The
   mocker serves with its timing model; both tools run streaming chat with the same
   concurrency, request count, ISL/OSL and `ignore_eos`. Printed: TTFT p50, ITL p50 and
   request throughput side by side. aiperf's "ITL" is (latency - TTFT)/(OSL - 1) per
   request, which is our TPOT; it is also shown next to our per-token ITL. `dynamo bench`
   runs twice (before and after aiperf) to show the run-to-run noise.
2. Capacity. A canned server (raw asyncio on uvloop, answers every request with the same
   16-token SSE stream from memory) stands in for an infinitely fast engine. Each client
   runs a closed loop at high concurrency, then open-loop rates; the report gives the
   achieved request rate and the client's CPU use (one core = 100 %).

aiperf is optional and large (~1.2 GB with torch): install it in its own virtualenv
(`python -m venv /opt/aiperf && /opt/aiperf/bin/pip install aiperf`) and pass its
executable with --aiperf (or $AIPERF). Without it this script says so and measures only
`dynamo bench`. Results go to --out (default ./bench-vs-aiperf) as report.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

CANNED_TOKENS = 16


# ----------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Background:
    """A server process in its own session, killed (group) on exit."""

    def __init__(self, argv: list[str], ready: str, log: Path, timeout: float = 60):
        self.log = log
        self.out = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while ready not in log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{argv[:4]} did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.out.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def timed_run(argv: list[str], log: Path, timeout: float = 1800, env: dict | None = None) -> tuple[int, float, float]:
    """Run a client; return (exit code, wall seconds, CPU seconds of it and its children)."""
    before = os.times()
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout,
                              env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return proc.returncode, wall, cpu


def build_tokenizer(directory: Path) -> Path:
    """A byte-level BPE (8k vocab) trained on English text from Python's own docs and sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "tokenizer.json").exists():
        return directory
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.glob("*.py"))[:400]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": None,
        "model_max_length": 32768, "clean_up_tokenization_spaces": False,
    }))
    return directory


def server_histograms(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the mocker's vLLM-style TTFT and ITL histograms from /metrics."""
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"):
            for part in ("_sum", "_count"):
                if line.startswith(name + part):
                    out.setdefault(name, [0.0, 0.0])[0 if part == "_sum" else 1] += float(line.split()[-1])
        for part, idx in (("vllm:prefix_cache_hits_total", 0), ("vllm:prefix_cache_queries_total", 1)):
            if line.startswith(part):
                out.setdefault("prefix_cache", [0.0, 0.0])[idx] += float(line.split()[-1])
    return {k: (v[0], v[1]) for k, v in out.items()}


def server_means(before: dict, after: dict) -> dict:
    """Server-side mean TTFT and ITL (ms) of the requests between two scrapes."""
    res = {}
    for key, name in (("ttft_mean_server", "vllm:time_to_first_token_seconds"),
                      ("itl_mean_server", "vllm:inter_token_latency_seconds")):
        s0, c0 = before.get(name, (0.0, 0.0))
        s1, c1 = after.get(name, (0.0, 0.0))
        res[key] = 1000 * (s1 - s0) / (c1 - c0) if c1 > c0 else None
    h0, q0 = before.get("prefix_cache", (0.0, 0.0))
    h1, q1 = after.get("prefix_cache", (0.0, 0.0))
    res["prefix_cache_hit_pct"] = 100 * (h1 - h0) / (q1 - q0) if q1 > q0 else None
    return res


def find_aiperf(explicit: str | None) -> str | None:
    for cand in (explicit, os.environ.get("AIPERF"), shutil.which("aiperf")):
        if cand and Path(cand).exists() and os.access(cand, os.X_OK):
            return cand
    return None


# ----------------------------------------------------------------------------- canned server

def serve_canned(port: int) -> None:
    """Answer /v1/models and any completion request from memory (16-token SSE stream)."""

    def sse(chat: bool) -> bytes:
        parts = []
        for i in range(1, CANNED_TOKENS + 1):
            choice = {"index": 0, "finish_reason": "length" if i == CANNED_TOKENS else None}
            choice.update({"delta": {"content": " tok"}} if chat else {"text": " tok"})
            usage = {"prompt_tokens": 8, "completion_tokens": i, "total_tokens": 8 + i}
            parts.append(b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "model": "canned",
                                                 "choices": [choice], "usage": usage}).encode() + b"\n\n")
        usage = {"prompt_tokens": 8, "completion_tokens": CANNED_TOKENS, "total_tokens": 8 + CANNED_TOKENS}
        parts.append(b"data: " + json.dumps({"id": "x", "choices": [], "usage": usage}).encode() + b"\n\n")
        parts.append(b"data: [DONE]\n\n")
        body = b"".join(parts)
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(body)) + body

    models = json.dumps({"object": "list", "data": [{"id": "canned", "object": "model"}]}).encode()
    responses = {
        "models": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(models) + models,
        "chat": sse(True),
        "completions": sse(False),
    }

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buf = b""

        def data_received(self, data):
            self.buf += data
            while True:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end].decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    key, _, value = line.partition(":")
                    if key.strip().lower() == "content-length":
                        length = int(value)
                if len(self.buf) < end + 4 + length:
                    return
                self.buf = self.buf[end + 4 + length:]
                path = head.split(" ", 2)[1]
                kind = "models" if path.endswith("/models") else "chat" if "chat" in path else "completions"
                self.transport.write(responses[kind])

    async def main():
        server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port, backlog=4096)
        print(f"canned server ready on http://127.0.0.1:{port}", flush=True)
        await server.serve_forever()

    import uvloop

    uvloop.run(main())


# ----------------------------------------------------------------------------- runs

def dynamo_bench(url: str, out: Path, args: list[str], log: Path) -> tuple[dict, float, float]:
    argv = [sys.executable, "-m", "dynamo.cli.bench", "--url", url, "--no-progress", "-o", str(out),
            "--no-save-requests", "--no-plots", *args]
    code, wall, cpu = timed_run(argv, log)
    if code != 0:
        raise SystemExit(f"dynamo bench failed ({code}):\n{log.read_text()[-3000:]}")
    return json.loads((out / "results.json").read_text()), wall, cpu


def aiperf_run(aiperf: str, url: str, model: str, tokenizer: Path, out: Path, args: list[str],
               log: Path) -> tuple[dict, float, float]:
    argv = [aiperf, "profile", "--model", model, "--url", url, "--endpoint-type", "chat", "--streaming",
            "--tokenizer", str(tokenizer), "--artifact-dir", str(out), "--ui-type", "none", *args]
    code, wall, cpu = timed_run(argv, log, env={"TOKENIZERS_PARALLELISM": "false"})
    if code != 0:
        raise SystemExit(f"aiperf failed ({code}):\n{log.read_text(errors='replace')[-3000:]}")
    # The top-level export is the profiling phase; phases/warmup/ holds the warmup's own.
    found = out / "profile_export_aiperf.json"
    if not found.exists():
        candidates = sorted(out.rglob("profiling/profile_export_aiperf.json"))
        if not candidates:
            raise SystemExit(f"aiperf wrote no profile_export_aiperf.json under {out}")
        found = candidates[0]
    return json.loads(found.read_text()), wall, cpu


def aiperf_metric(doc: dict, name: str, stat: str) -> float | None:
    m = doc.get(name)
    if m is None and isinstance(doc.get("records"), dict):
        m = doc["records"].get(name)
    if isinstance(m, dict):
        v = m.get(stat)
        return float(v) if v is not None else None
    return None


def ours(doc: dict) -> dict:
    s = doc["points"][0]["summary"]
    return {"ttft_p50": s["ttft_ms"]["p50"], "ttft_mean": s["ttft_ms"]["mean"], "itl_p50": s["itl_ms"]["p50"], "tpot_p50": s["tpot_ms"]["p50"],
            "icl_p50": s["icl_ms"]["p50"], "req_per_s": s["request_throughput"], "completed": s["completed"],
            "failed": s["failed"], "mean_concurrency": s["mean_concurrency"]}


def agreement(args, work: Path, aiperf: str | None) -> dict:
    tok = build_tokenizer(work / "tokenizer")
    port = free_port()
    model = "bench-model"
    report: dict = {"load": {"concurrency": args.concurrency, "rate": args.rate, "requests": args.requests,
                             "isl": args.isl, "osl": args.osl, "mocker_speedup": args.speedup,
                             "endpoint": "chat, streaming, ignore_eos"}, "scenarios": {}}
    # c=1 and a constant rate give both tools exactly the same offered load; at c>1 the
    # requests of a closed loop fall into lockstep waves whose alignment (and so TTFT) varies
    # from run to run, and aiperf's inter-process dispatch leaves slots idle.
    scenarios = [
        ("closed loop c=1", ["-c", "1"], ["--concurrency", "1"], max(20, args.requests // 2)),
        (f"constant {args.rate:g} req/s", ["--request-rate", str(args.rate), "--burstiness", "inf"],
         ["--request-rate", str(args.rate), "--arrival-pattern", "constant"], args.requests),
        (f"closed loop c={args.concurrency}", ["-c", str(args.concurrency)], ["--concurrency", str(args.concurrency)],
         args.requests),
    ]
    with Background([sys.executable, "-m", "dynamo.backends.mocker", "--host", "127.0.0.1", "--port", str(port),
                     "--served-model-name", model, "--model-path", str(tok), "--speedup-ratio", str(args.speedup)],
                    "Mocker ready on", work / "mocker.log"):
        url = f"http://127.0.0.1:{port}"
        seeds: list[int] = []
        for title, our_load, their_load, n_req in scenarios:
            key = title.replace(" ", "-").replace("/", "").replace("=", "")
            common = [*our_load, "-n", str(n_req), "--input-len", str(args.isl), "--output-len", str(args.osl),
                      "--tokenizer", str(tok), "--warmup", str(args.concurrency)]
            seeds.extend([len(seeds) + 1, len(seeds) + 2])  # fresh prompts per run: no prefix-cache hits
            runs = []
            h0 = server_histograms(url)
            first, _, _ = dynamo_bench(url, work / f"{key}-dynamo-1", [*common, "--seed", str(seeds[-2])],
                                       work / f"{key}-dynamo-1.log")
            h1 = server_histograms(url)
            runs.append(("dynamo bench (run 1)", {**ours(first), **server_means(h0, h1)}))
            if aiperf:
                doc, _, _ = aiperf_run(aiperf, url, model, tok, work / f"{key}-aiperf", [
                    *their_load, "--request-count", str(n_req),
                    "--warmup-request-count", str(args.concurrency),
                    "--synthetic-input-tokens-mean", str(args.isl), "--synthetic-input-tokens-stddev", "0",
                    "--output-tokens-mean", str(args.osl), "--output-tokens-stddev", "0",
                    "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{args.osl}",
                    # Output lengths from usage, as dynamo bench does: retokenizing the mocker's
                    # random token ids gives ~8 % more tokens and would bias aiperf's ITL down.
                    "--use-server-token-count",
                ], work / f"{key}-aiperf.log")
                h2 = server_histograms(url)
                runs.append(("aiperf", {
                    **server_means(h1, h2),
                    "ttft_mean": aiperf_metric(doc, "time_to_first_token", "avg"),
                    "ttft_p50": aiperf_metric(doc, "time_to_first_token", "p50"),
                    "itl_p50": aiperf_metric(doc, "inter_token_latency", "p50"),
                    "icl_p50": aiperf_metric(doc, "inter_chunk_latency", "p50"),
                    "req_per_s": aiperf_metric(doc, "request_throughput", "avg"),
                    "completed": aiperf_metric(doc, "request_count", "avg"),
                    "effective_concurrency": aiperf_metric(doc, "effective_concurrency", "avg"),
                    "credit_to_start_ms": aiperf_metric(doc, "credit_to_start_latency", "avg"),
                }))
            h3 = server_histograms(url)
            second, _, _ = dynamo_bench(url, work / f"{key}-dynamo-2", [*common, "--seed", str(seeds[-1])],
                                        work / f"{key}-dynamo-2.log")
            runs.append(("dynamo bench (run 2)", {**ours(second), **server_means(h3, server_histograms(url))}))
            report["scenarios"][title] = scenario = {"runs": {name: r for name, r in runs}}
            print(f"\n== Agreement, {title}: same mocker (speedup {args.speedup:g}), n={n_req}, "
                  f"ISL {args.isl}, OSL {args.osl}, streaming chat")
            print("(TTFT/ITL server = the mocker's own histograms over the same requests, warmup included)")
            print(f"{'':22}{'TTFT p50':>9}{'TTFT mean':>10}{'server':>8}{'ITL p50':>9}{'TPOT p50':>9}{'ICL p50':>8}"
                  f"{'server':>8}{'req/s':>8}{'conc.':>7}{'cache hit':>10}")
            for name, r in runs:
                conc = r.get("mean_concurrency", r.get("effective_concurrency"))
                print(f"{name:22}{_f(r['ttft_p50']):>9}{_f(r.get('ttft_mean')):>10}{_f(r.get('ttft_mean_server')):>8}"
                      f"{_f(r['itl_p50']):>9}{_f(r.get('tpot_p50')):>9}{_f(r.get('icl_p50')):>8}"
                      f"{_f(r.get('itl_mean_server')):>8}{_f(r['req_per_s']):>8}{_f(conc):>7}"
                      f"{_f(r.get('prefix_cache_hit_pct'), '.1f') + ' %':>10}")
            if not aiperf:
                continue
            a = scenario["runs"]["aiperf"]
            d1, d2 = scenario["runs"]["dynamo bench (run 1)"], scenario["runs"]["dynamo bench (run 2)"]
            mean = {k: (d1[k] + d2[k]) / 2 for k in ("ttft_p50", "itl_p50", "tpot_p50", "req_per_s")}
            diffs = {
                "TTFT p50": _pct(mean["ttft_p50"], a["ttft_p50"]),
                "ITL p50 (aiperf ITL vs our TPOT)": _pct(mean["tpot_p50"], a["itl_p50"]),
                "ITL p50 (aiperf ITL vs our per-token ITL)": _pct(mean["itl_p50"], a["itl_p50"]),
                "request throughput": _pct(mean["req_per_s"], a["req_per_s"]),
            }
            noise = {
                "TTFT p50": _pct(d2["ttft_p50"], d1["ttft_p50"]),
                "ITL p50 (aiperf ITL vs our TPOT)": _pct(d2["tpot_p50"], d1["tpot_p50"]),
                "ITL p50 (aiperf ITL vs our per-token ITL)": _pct(d2["itl_p50"], d1["itl_p50"]),
                "request throughput": _pct(d2["req_per_s"], d1["req_per_s"]),
            }
            scenario["difference_pct_ours_vs_aiperf"] = diffs
            scenario["run2_vs_run1_pct"] = noise
            print("dynamo bench (mean of both runs) vs aiperf, and our own run-to-run change:")
            for k, v in diffs.items():
                ok = v is not None and abs(v) <= 5
                print(f"  {k:44} {_f(v, '+.2f'):>7} %  {'within 5 %' if ok else 'OUTSIDE 5 %':12}"
                      f"  (run 2 vs run 1: {_f(noise[k], '+.2f')} %)")
    if not aiperf:
        print("aiperf: not installed, skipped (pip install aiperf into its own venv, then --aiperf PATH)")
    return report


def capacity(args, work: Path, aiperf: str | None) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    report: dict = {"server": f"canned {CANNED_TOKENS}-token SSE stream from memory", "dynamo": {}, "aiperf": {}}
    with Background([sys.executable, __file__, "--serve-canned", str(port)], "canned server ready",
                    work / "canned.log"):
        print(f"\n== Capacity: canned server ({CANNED_TOKENS} tokens per response, answered from memory)")
        print("(lag = schedule lag p99; loop = the client's event-loop lag p99: above ~10 ms the generator is the"
              " limit and its latencies include client delay)")
        print(f"{'client':34}{'target':>10}{'req/s':>10}{'tok/s':>10}{'lag ms':>9}{'loop ms':>9}{'client CPU':>12}")
        n = args.capacity_requests
        for c in (16, 64):
            doc, wall, cpu = dynamo_bench(url, work / f"cap-dyn-c{c}",
                                          ["-c", str(c), "-n", str(n), "--input-len", "16", "--output-len",
                                           str(CANNED_TOKENS)], work / f"cap-dyn-c{c}.log")
            s = doc["points"][0]["summary"]
            row = {"req_per_s": s["request_throughput"], "tok_per_s": s["output_token_throughput"],
                   "loop_lag_p99_ms": s["client_loop_lag_ms"]["p99"], "ttft_p50_ms": s["ttft_ms"]["p50"],
                   "failed": s["failed"], "cpu_pct_of_one_core": 100 * cpu / wall}
            report["dynamo"][f"c{c}"] = row
            print(f"{'dynamo bench closed loop c=' + str(c):34}{'-':>10}{_f(row['req_per_s'], '.0f'):>10}"
                  f"{_f(row['tok_per_s'], '.0f'):>10}{'-':>9}{_f(row['loop_lag_p99_ms'], '.1f'):>9}"
                  f"{_f(row['cpu_pct_of_one_core'], '.0f') + ' %':>12}")
        for rate in args.rates:
            doc, wall, cpu = dynamo_bench(url, work / f"cap-dyn-r{rate}",
                                          ["--request-rate", str(rate), "-n", str(max(n, int(rate * 5))),
                                           "--input-len", "16", "--output-len", str(CANNED_TOKENS)],
                                          work / f"cap-dyn-r{rate}.log")
            s = doc["points"][0]["summary"]
            row = {"req_per_s": s["request_throughput"], "tok_per_s": s["output_token_throughput"],
                   "lag_p99_ms": (s["schedule_lag_ms"] or {}).get("p99"), "failed": s["failed"],
                   "loop_lag_p99_ms": s["client_loop_lag_ms"]["p99"], "ttft_p50_ms": s["ttft_ms"]["p50"],
                   "cpu_pct_of_one_core": 100 * cpu / wall}
            report["dynamo"][f"rate-{rate}"] = row
            print(f"{'dynamo bench rate':34}{rate:>10}{_f(row['req_per_s'], '.0f'):>10}{_f(row['tok_per_s'], '.0f'):>10}"
                  f"{_f(row['lag_p99_ms'], '.1f'):>9}{_f(row['loop_lag_p99_ms'], '.1f'):>9}"
                  f"{_f(row['cpu_pct_of_one_core'], '.0f') + ' %':>12}")
        if aiperf:
            tok = build_tokenizer(work / "tokenizer")
            for label, extra in [("c64", ["--concurrency", "64", "--request-count", str(n)])] + [
                    (f"rate-{r}", ["--request-rate", str(r), "--request-count", str(max(n, int(r * 5)))])
                    for r in args.rates]:
                doc, wall, cpu = aiperf_run(aiperf, url, "canned", tok, work / f"cap-aiperf-{label}", [
                    *extra, "--synthetic-input-tokens-mean", "16", "--synthetic-input-tokens-stddev", "0",
                    "--output-tokens-mean", str(CANNED_TOKENS)], work / f"cap-aiperf-{label}.log")
                row = {"req_per_s": aiperf_metric(doc, "request_throughput", "avg"),
                       "tok_per_s": aiperf_metric(doc, "output_token_throughput", "avg"),
                       "cpu_pct_of_one_core": 100 * cpu / wall, "wall_s": wall}
                report["aiperf"][label] = row
                target = label.split("-")[1] if label.startswith("rate-") else "-"
                print(f"{'aiperf ' + label:34}{target:>10}{_f(row['req_per_s'], '.0f'):>10}"
                      f"{_f(row['tok_per_s'], '.0f'):>10}{'-':>9}{'-':>9}"
                      f"{_f(row['cpu_pct_of_one_core'], '.0f') + ' %':>12}")
        else:
            print("aiperf: not installed, skipped")
    return report


def _f(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _pct(ours_v, theirs_v):
    if ours_v is None or not theirs_v:
        return None
    return 100.0 * (ours_v - theirs_v) / theirs_v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aiperf", help="aiperf executable (default: $AIPERF, then PATH)")
    p.add_argument("--out", type=Path, default=Path("bench-vs-aiperf"))
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rate", type=float, default=8.0, help="arrival rate of the open-loop agreement scenario")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--isl", type=int, default=1024)
    p.add_argument("--osl", type=int, default=64)
    p.add_argument("--speedup", type=float, default=1.0, help="mocker speedup ratio for the agreement run")
    p.add_argument("--capacity-requests", type=int, default=4000)
    p.add_argument("--rates", type=int, nargs="+", default=[250, 500, 1000, 2000])
    p.add_argument("--capacity-only", action="store_true")
    p.add_argument("--no-capacity", action="store_true")
    p.add_argument("--serve-canned", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_canned:
        serve_canned(args.serve_canned)
        return
    aiperf = find_aiperf(args.aiperf)
    if aiperf is None:
        print("aiperf is not installed: only dynamo bench is measured. To compare, install it into its own venv\n"
              "(python -m venv VENV && VENV/bin/pip install aiperf, ~1.2 GB) and pass --aiperf VENV/bin/aiperf.")
    else:
        print(f"aiperf: {aiperf}")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.out))
    report: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "aiperf": aiperf}
    if not args.capacity_only:
        report["agreement"] = agreement(args, work, aiperf)
    if not args.no_capacity:
        report["capacity"] = capacity(args, work, aiperf)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nreport: {args.out / 'report.json'} (logs and raw results in {work})")


if __name__ == "__main__":
    main()
