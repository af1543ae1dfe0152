#!/usr/bin/env python3
"""Benchmark the mocker's HTTP/streaming hot path, or check its timing model.

Throughput mode (default): starts one mocker with ``--speedup-ratio 0`` (no
simulated delay, so the numbers measure the server itself), then drives it
with an aiohttp streaming client at each concurrency level and prints
requests/s, streamed tokens/s (one SSE chunk per token) and p50/p99 TTFT::

    python scripts/bench_mocker.py                       # concurrency 1,16,64
    python scripts/bench_mocker.py -c 64 --duration 10 --max-tokens 512

Timing mode: starts a mocker with the default timing model (speedup 1) and
checks, at concurrency 1, that the TTFT (best of ``--timing-repeats``; load
on the machine only adds latency) and the mean inter-token latency the client
sees are within ``--tolerance`` (5 %) of the model's prediction::

    python scripts/bench_mocker.py --check-timing

``--url`` drives an already running server instead (throughput mode only;
the model name comes from ``--model``). Exit status 1 when a timing check
fails or a stream comes back short.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import aiohttp

READY = "Mocker ready on http://"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mocker:
    """A mocker subprocess started for the benchmark."""

    def __init__(self, flags: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dynamo.backends.mocker", "--port", str(self.port),
               "--served-model-name", "bench", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"mocker exited with {self.proc.wait()}")
            if READY in line:
                return
        raise TimeoutError("mocker did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Sample:
    ttft: float
    total: float
    tokens: int
    gaps: list[float] = field(default_factory=list)


async def stream_one(session: aiohttp.ClientSession, url: str, body: bytes, keep_gaps: bool) -> Sample:
    t0 = time.perf_counter()
    first = 0.0
    tokens = 0
    gaps: list[float] = []
    last = 0.0
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for chunk in resp.content.iter_any():
            n = chunk.count(b'data: {"id"')
            if n:
                now = time.perf_counter()
                if not tokens:
                    first = now
                elif keep_gaps:
                    gaps.append((now - last) / n)
                last = now
                tokens += n
    return Sample(first - t0, time.perf_counter() - t0, tokens, gaps)


def make_body(model: str, prompt_tokens: int, max_tokens: int, rng: random.Random) -> bytes:
    # Token-id prompts within the built-in tokenizer's vocabulary; random ids
    # make every prompt distinct, so there are no prefix-cache hits.
    prompt = [rng.randrange(300, 1280) for _ in range(prompt_tokens)]
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True}).encode()


def cpu_seconds(pid: int | None) -> float:
    """User+system CPU time of the server process (0 when it is not ours)."""
    if pid is None:
        return 0.0
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def run_level(url: str, model: str, concurrency: int, duration: float, prompt_tokens: int,
                    max_tokens: int, seed: int, pid: int | None = None) -> dict:
    rng = random.Random(seed)
    bodies = [make_body(model, prompt_tokens, max_tokens, rng) for _ in range(64)]
    samples: list[Sample] = []
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    endpoint = url + "/v1/completions"
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm-up: open the connections.
        await asyncio.gather(*(stream_one(session, endpoint, bodies[i % 64], False) for i in range(concurrency)))
        t_start = time.perf_counter()
        cpu_start = cpu_seconds(pid)
        client_start = time.process_time()
        deadline = t_start + duration

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < deadline:
                samples.append(await stream_one(session, endpoint, bodies[k % 64], False))
                k += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - t_start
        cpu = cpu_seconds(pid) - cpu_start
        client_cpu = time.process_time() - client_start
    short = sum(1 for s in samples if s.tokens != max_tokens)
    ttfts = sorted(s.ttft for s in samples)
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(samples) / elapsed, 1),
        "tokens_per_s": round(sum(s.tokens for s in samples) / elapsed, 0),
        "ttft_p50_ms": round(1000 * ttfts[len(ttfts) // 2], 2) if ttfts else None,
        "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))], 2) if ttfts else None,
        "short_streams": short,
        # Server CPU per streamed token: robust to other load on the machine.
        "server_cpu_us_per_token": round(1e6 * cpu / max(1, sum(s.tokens for s in samples)), 2) if pid else None,
        "server_cpu_percent": round(100 * cpu / elapsed, 1) if pid else None,
        "client_cpu_percent": round(100 * client_cpu / elapsed, 1),
    }


async def throughput(args) -> int:
    mocker = None
    url = args.url
    if url is None:
        mocker = Mocker(["--speedup-ratio", "0", *args.mocker_flag])
        mocker.wait_ready()
        url = mocker.url
    try:
        rows = []
        for c in args.concurrency:
            row = await run_level(url, args.model, c, args.duration, args.prompt_tokens, args.max_tokens, args.seed,
                                  mocker.proc.pid if mocker is not None else None)
            rows.append(row)
            if not args.json:
                print(
                    f"concurrency {c:>4}: {row['requests_per_s']:>8.1f} req/s  {row['tokens_per_s']:>9.0f} tok/s  "
                    f"TTFT p50 {row['ttft_p50_ms']:>7.2f} ms  p99 {row['ttft_p99_ms']:>7.2f} ms  "
                    f"({row['requests']} requests in {row['seconds']} s"
                    + (f"; server CPU {row['server_cpu_percent']}%, {row['server_cpu_us_per_token']} us/token"
                       if row["server_cpu_us_per_token"] is not None else "")
                    + f"; client CPU {row['client_cpu_percent']}%)",
                    flush=True,
                )
        if args.json:
            print(json.dumps({"mode": "throughput", "max_tokens": args.max_tokens,
                              "prompt_tokens": args.prompt_tokens, "levels": rows}, indent=2))
        return 1 if any(r["short_streams"] for r in rows) else 0
    finally:
        if mocker is not None:
            mocker.stop()


async def check_timing(args) -> int:
    from dynamo.backends.mocker.timing import polynomial_decode_ms, polynomial_prefill_ms

    blocks, bs = args.num_gpu_blocks, 16
    mocker = Mocker(["--speedup-ratio", "1", "--num-gpu-blocks", str(blocks), *args.mocker_flag])
    mocker.wait_ready()
    rng = random.Random(args.seed)
    failures = 0
    results = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            endpoint = mocker.url + "/v1/completions"
            await stream_one(session, endpoint, make_body("bench", 16, 4, rng), False)  # warm-up
            for prompt_tokens in args.timing_prompts:
                samples = []
                for _ in range(args.timing_repeats):
                    body = make_body("bench", prompt_tokens, args.max_tokens, rng)
                    samples.append(await stream_one(session, endpoint, body, True))
                    await asyncio.sleep(0.05)  # let the engine go idle: TTFT = one prefill step
                # Load on the machine only ever adds latency, so the best of N
                # repeats estimates the mocker's own TTFT; the median is reported too.
                measured_ttft = min(s.ttft for s in samples) * 1000
                median_ttft = statistics.median(s.ttft for s in samples) * 1000
                measured_itl = statistics.mean(g for s in samples for g in s.gaps) * 1000
                predicted_ttft = polynomial_prefill_ms(prompt_tokens)
                # Decode step k computes token prompt+k-1; blocks in use: ceil((prompt+k)/bs).
                itls = [polynomial_decode_ms(-(-(prompt_tokens + k) // bs) / blocks) for k in range(1, args.max_tokens)]
                predicted_itl = statistics.mean(itls)
                row = {
                    "prompt_tokens": prompt_tokens,
                    "ttft_ms": round(measured_ttft, 2), "ttft_median_ms": round(median_ttft, 2),
                    "ttft_model_ms": round(predicted_ttft, 2),
                    "ttft_error": round(measured_ttft / predicted_ttft - 1, 4),
                    "itl_ms": round(measured_itl, 3), "itl_model_ms": round(predicted_itl, 3),
                    "itl_error": round(measured_itl / predicted_itl - 1, 4),
                }
                ok = abs(row["ttft_error"]) <= args.tolerance and abs(row["itl_error"]) <= args.tolerance
                row["ok"] = ok
                failures += not ok
                results.append(row)
                if not args.json:
                    print(
                        f"prompt {prompt_tokens:>5} tok: TTFT {measured_ttft:7.2f} ms (median {median_ttft:7.2f}) "
                        f"vs model {predicted_ttft:7.2f} ms ({row['ttft_error']:+.1%}); ITL {measured_itl:6.3f} ms vs model {predicted_itl:6.3f} ms "
                        f"({row['itl_error']:+.1%})  {'OK' if ok else 'FAIL'}",
                        flush=True,
                    )
    finally:
        mocker.stop()
    if args.json:
        print(json.dumps({"mode": "timing", "tolerance": args.tolerance, "results": results}, indent=2))
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64],
                   help="comma-separated concurrency levels (default: 1,16,64)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per level (default: 5)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per request (default: 256)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default: 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", help="benchmark this running server instead of starting a mocker")
    p.add_argument("--model", default="bench", help="model name with --url (default: bench)")
    p.add_argument("--mocker-flag", action="append", default=[], help="extra flag for the mocker (repeatable)")
    p.add_argument("--check-timing", action="store_true", help="compare client TTFT/ITL with the timing model")
    p.add_argument("--timing-prompts", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8192],
                   help="prompt lengths for --check-timing (default: 2048,4096,8192)")
    p.add_argument("--timing-repeats", type=int, default=7, help="requests per prompt length (default: 7)")
    p.add_argument("--num-gpu-blocks", type=int, default=1024,
                   help="KV blocks for --check-timing, small enough that usage moves decode time (default: 1024)")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed relative error (default: 0.05)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    args = p.parse_args()
    if args.check_timing:
        args.max_tokens = args.max_tokens if args.max_tokens != 256 else 64
    runner_kwargs = {}
    try:
        import uvloop

        runner_kwargs["loop_factory"] = uvloop.new_event_loop
    except ImportError:
        pass
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with asyncio.Runner(**runner_kwargs) as runner:
        return runner.run(check_timing(args) if args.check_timing else throughput(args))


if __name__ == "__main__":
    sys.exit(main())
