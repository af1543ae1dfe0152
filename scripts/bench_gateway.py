#!/usr/bin/env python3
"""Gateway overhead: streamed tokens/s and TTFT through the frontend vs directly to the same workers.

Starts `dynamo serve` (mocker workers with speedup_ratio 0, so the engines are never the
bottleneck), then drives the same streaming load at each concurrency twice, side by side:
directly to the workers (client-side round-robin) and through the frontend. Prints the
throughput ratio and the TTFT the gateway adds. Optionally also through sglang-router
(`--sglang-python /path/to/venv/bin/python`, a venv with `pip install sglang-router`) in front of the same workers.

    python scripts/bench_gateway.py [--workers 2] [--concurrency 1 16 64 256] [--requests 400] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import cycle
from pathlib import Path

import aiohttp

from dynamo.core.rundir import wait_until_ready
from sglang_baseline import start_sglang_router, stop_sglang_router

MODEL = "Qwen/Qwen3-0.6B"


async def drive(urls: list[str], concurrency: int, requests: int, tokens: int) -> dict:
    """Stream `requests` completions at `concurrency`; count SSE token chunks and TTFT."""
    targets = cycle(urls)
    ttfts: list[float] = []
    chunks = 0
    errors = 0
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": tokens, "min_tokens": tokens, "stream": True,
            "ignore_eos": True}
    remaining = requests
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> None:
            nonlocal remaining, chunks, errors
            while remaining > 0:
                remaining -= 1
                url = next(targets)
                t0 = time.perf_counter()
                first = None
                try:
                    async with session.post(url + "/v1/completions", json=body) as resp:
                        async for line in resp.content:
                            if line.startswith(b"data: {"):
                                if first is None:
                                    first = time.perf_counter() - t0
                                chunks += 1
                except aiohttp.ClientError:
                    errors += 1
                if first is not None:
                    ttfts.append(first)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ttfts.sort()
    return {"tokens_per_s": chunks / elapsed, "ttft_p50_ms": statistics.median(ttfts) * 1000 if ttfts else float("nan"),
            "errors": errors}


def start_run(workers: int, home: Path) -> tuple[subprocess.Popen, dict]:
    run_dir = home / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo.cli.app", "serve", "agg", "--backend", "mocker", "--run-dir", str(run_dir),
         "--set", f"workers.decode.replicas={workers}", "--set", "workers.decode.args.speedup-ratio=0",
         "--set", "frontend.port=0", "--set", "nats.port=0", "--set", "ports.base=0", "--no-color"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, wait_until_ready(run_dir, proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3,
                        help="Interleaved rounds per concurrency; the table shows medians (ratios per round).")
    parser.add_argument("--sglang-python", default=None,
                        help="Also measure sglang-router (round_robin) in front of the same workers: the Python of "
                             "a venv with `pip install sglang-router`.")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    home = Path(tempfile.mkdtemp(prefix="dynamo-gw-"))
    proc, state = start_run(args.workers, home)
    workers = [p["url"] for p in state["processes"].values() if p["kind"] == "worker"]
    sglang = start_sglang_router(args.sglang_python, workers, "round_robin", home) if args.sglang_python else None
    try:
        print(f"{args.workers} mocker workers (speedup 0), {args.requests} streamed requests × {args.tokens} tokens, "
              f"medians of {args.repeat} interleaved rounds")
        head = f"{'conc':>5}{'direct tok/s':>14}{'frontend tok/s':>16}{'ratio':>7}{'TTFT direct':>13}{'TTFT fe':>9}{'added ms':>10}"
        if sglang:
            head += f"{'sglang tok/s':>14}{'ours/sglang':>12}"
        print(head)
        for conc in args.concurrency:
            rounds = []
            for _ in range(args.repeat):  # interleaved pairs: both sides see the same machine noise
                direct = asyncio.run(drive(workers, conc, args.requests, args.tokens))
                via = asyncio.run(drive([state["endpoint"]], conc, args.requests, args.tokens))
                sg = asyncio.run(drive([sglang[1]], conc, args.requests, args.tokens)) if sglang else None
                rounds.append((direct, via, sg))
            med = statistics.median
            d_tok, v_tok = med(r[0]["tokens_per_s"] for r in rounds), med(r[1]["tokens_per_s"] for r in rounds)
            ratio = med(r[1]["tokens_per_s"] / r[0]["tokens_per_s"] for r in rounds)
            d_ttft, v_ttft = med(r[0]["ttft_p50_ms"] for r in rounds), med(r[1]["ttft_p50_ms"] for r in rounds)
            added = med(r[1]["ttft_p50_ms"] - r[0]["ttft_p50_ms"] for r in rounds)
            line = f"{conc:>5}{d_tok:>14,.0f}{v_tok:>16,.0f}{ratio:>7.2f}{d_ttft:>13.2f}{v_ttft:>9.2f}{added:>10.2f}"
            if sglang:
                s_tok = med(r[2]["tokens_per_s"] for r in rounds)
                vs = med(r[1]["tokens_per_s"] / r[2]["tokens_per_s"] if r[2]["tokens_per_s"] else float("inf")
                         for r in rounds)
                line += f"{s_tok:>14,.0f}{vs:>12.2f}"
            errors = [sum(r[i]["errors"] for r in rounds) for i in range(2)]
            if any(errors):
                line += f"  errors direct={errors[0]} frontend={errors[1]}"
            print(line, flush=True)
    finally:
        if sglang:
            stop_sglang_router(sglang[0])
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
