#!/usr/bin/env python3
"""Routing quality on a shared-prefix workload: kv vs round_robin vs random (vs sglang-router cache_aware).

Serves 4 mocker workers with the default timing model and a KV cache too small to hold
every prefix on every worker, so where a request lands decides whether its prefix is a
cache hit. The same shuffled workload (G groups × P prompts sharing an L-token prefix)
runs through the frontend once per router mode, side by side, and optionally through
sglang-router's cache_aware policy in front of the same workers
(`--sglang-python /path/to/venv/bin/python`, a venv with `pip install sglang-router`).
`--modes ... pinned` adds a reference with no gateway at all: the client sends each group's
prompts straight to the one worker the group is pinned to.

    python scripts/bench_routing.py [--groups 64] [--per-group 16] [--prefix 2000] [--concurrency 16 | --rate 40]
        [--modes kv round_robin random pinned] [--overlap-weight 4 16] [--placement process frontend] [--repeat 2]
        [--sglang-python /path/to/venv/bin/python [--sglang-policies cache_aware round_robin]]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from dynamo.core.rundir import wait_until_ready
from sglang_baseline import start_sglang_router, stop_sglang_router

MODEL = "Qwen/Qwen3-0.6B"
def group_sizes(groups: int, per_group: int, skew: float) -> list[int]:
    """Prompts per group: ``per_group`` each, or with ``skew`` > 0 the same total split by Zipf
    popularity (group k gets a share ∝ 1/k^skew, at least one prompt): a few hot system prompts."""
    if skew <= 0:
        return [per_group] * groups
    weights = [1 / (k + 1) ** skew for k in range(groups)]
    total = groups * per_group
    shares = [total * w / sum(weights) for w in weights]
    sizes = [max(1, int(share)) for share in shares]
    by_remainder = sorted(range(groups), key=lambda k: sizes[k] - shares[k])
    for k in by_remainder[:max(0, total - sum(sizes))]:  # largest remainders first
        sizes[k] += 1
    return sizes


def workload(groups: int, per_group: int, prefix_tokens: int, skew: float = 0.0,
             seed: int = 0) -> list[tuple[int, str]]:
    """(group, prompt) pairs, shuffled. Text prompts (sglang-router takes only text): a shared prefix plus
    a 32-token question, made by decoding random ids with the mocker's built-in tokenizer so lengths are
    close to exact."""
    from dynamo.core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    words = [w for i in range(tokenizer.vocab_size) if (w := tokenizer.decode([i])).startswith(" ")
             and w[1:].isalpha() and tokenizer.encode(w, add_special_tokens=False) == [i]]
    rng = random.Random(seed)
    prompts = []
    for group, size in enumerate(group_sizes(groups, per_group, skew)):
        prefix = "".join(rng.choice(words) for _ in range(prefix_tokens))
        for _ in range(size):
            prompts.append((group, prefix + "".join(rng.choice(words) for _ in range(32))))
    rng.shuffle(prompts)
    return prompts


async def drive(requests: list[tuple[str, str]], concurrency: int, tokens: int, rate: float = 0.0) -> dict:
    """Stream every (base URL, prompt) once. Closed loop with ``concurrency`` clients, or, with ``rate`` > 0,
    open loop: Poisson arrivals at ``rate`` requests/s (seeded), so a slower router builds a queue
    instead of slowing the clients down, as production traffic does."""
    queue = list(requests)
    ttfts: list[float] = []
    itls: list[float] = []  # per request: mean gap between its streamed tokens
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def request(url: str, prompt: str) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                async with session.post(url + "/v1/completions", json={
                        "model": MODEL, "prompt": prompt, "max_tokens": tokens, "stream": True}) as resp:
                    first = last = None
                    events = 0
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            last = time.perf_counter() - t0
                            first = last if first is None else first
                            events += 1
                    if first is None:
                        errors += 1
                    else:
                        ttfts.append(first)
                        if events > 1:
                            itls.append((last - first) / (events - 1))
            except aiohttp.ClientError:
                errors += 1

        async def client() -> None:
            while queue:
                await request(*queue.pop())

        async def arrivals() -> None:
            rng = random.Random(1)
            tasks = []
            due = time.perf_counter()
            for url, prompt in reversed(queue):
                due += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                tasks.append(asyncio.ensure_future(request(url, prompt)))
            await asyncio.gather(*tasks)

        start = time.perf_counter()
        if rate > 0:
            await arrivals()
        else:
            await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ttfts.sort()
    if not ttfts:
        raise RuntimeError(f"every request failed ({errors} errors)")
    return {"ttft_p50": statistics.median(ttfts) * 1000, "ttft_p99": ttfts[int(0.99 * (len(ttfts) - 1))] * 1000,
            "itl_p50": statistics.median(itls) * 1000 if itls else 0.0, "req_s": len(ttfts) / elapsed, "errors": errors}


def serve(mode: str, args: argparse.Namespace, home: Path, weight: float,
          placement: str = "process") -> tuple[subprocess.Popen, dict]:
    run_dir = home / f"run-{mode}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo.cli.app", "serve", "agg", "--backend", "mocker", "--run-dir", str(run_dir),
         "--set", f"workers.decode.replicas={args.workers}", "--set", f"router.mode={mode}",
         "--set", f"workers.decode.args.num-gpu-blocks={args.blocks}",
         "--set", f"router.overlap_weight={weight}", "--set", f"router.placement={placement}",
         *(["--set", f"router.step_tokens={args.step_tokens}"] if args.step_tokens is not None else []),
         "--set", "frontend.port=0", "--set", "nats.port=0", "--set", "ports.base=0", "--no-color"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "DYNAMO_HOME": str(home)})  # its runs are not the user's
    return proc, wait_until_ready(run_dir, proc)


def worker_stats(state: dict) -> tuple[float, list[int]]:
    """Prefix-cache hit rate (hits / queries summed over the workers, vLLM metric names) and
    requests served per worker, busiest first."""
    import httpx

    hits = queries = 0.0
    served = []
    for proc in state["processes"].values():
        if proc["kind"] != "worker":
            continue
        count = 0.0
        for line in httpx.get(proc["url"] + "/metrics", timeout=5).text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:request_success_total"):
                count += float(line.rsplit(" ", 1)[1])
        served.append(int(count))
    return (hits / queries if queries else 0.0), sorted(served, reverse=True)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(60)


def worker_urls(state: dict) -> list[str]:
    return [p["url"] for _, p in sorted(state["processes"].items()) if p["kind"] == "worker"]


def pin_groups(sizes: list[int], workers: int) -> list[int]:
    """Worker of each group: the biggest groups first, each to the worker with the fewest prompts so far
    (with equal groups: group g on worker g mod W)."""
    loads = [0] * workers
    owner = [0] * len(sizes)
    for group in sorted(range(len(sizes)), key=lambda g: -sizes[g]):
        owner[group] = min(range(workers), key=loads.__getitem__)
        loads[owner[group]] += sizes[group]
    return owner


def run_dynamo(mode: str, weight: float, placement: str, args: argparse.Namespace, prompts: list[tuple[int, str]],
               home: Path) -> dict:
    proc, state = serve("round_robin" if mode == "pinned" else mode, args, home, weight, placement)
    try:
        if mode == "pinned":  # no gateway: the client sends each group's prompts straight to its own worker
            urls = worker_urls(state)
            owner = pin_groups(group_sizes(args.groups, args.per_group, args.skew), len(urls))
            requests = [(urls[owner[group]], prompt) for group, prompt in prompts]
        else:
            requests = [(state["endpoint"], prompt) for _, prompt in prompts]
        result = asyncio.run(drive(requests, args.concurrency, args.tokens, args.rate))
        result["hit_rate"], result["served"] = worker_stats(state)
        return result
    finally:
        stop(proc)


def run_sglang(policy: str, args: argparse.Namespace, prompts: list[tuple[int, str]], home: Path) -> dict:
    """sglang-router with ``policy`` in front of the same mocker workers (served by dynamo, its frontend unused)."""
    proc, state = serve("round_robin", args, home, args.overlap_weight[0])
    try:
        router, url = start_sglang_router(args.sglang_python, worker_urls(state), policy, home)
        try:
            result = asyncio.run(drive([(url, prompt) for _, prompt in prompts], args.concurrency, args.tokens,
                                       args.rate))
            result["hit_rate"], result["served"] = worker_stats(state)
            return result
        finally:
            stop_sglang_router(router)
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--per-group", type=int, default=16)
    parser.add_argument("--skew", type=float, default=0.0,
                        help="Zipf exponent of group popularity (0: every group has --per-group prompts; 1: the "
                             "hottest of 64 groups gets about a fifth of all requests, as a popular system prompt).")
    parser.add_argument("--prefix", type=int, default=2000, help="Shared prefix length in tokens.")
    parser.add_argument("--blocks", type=int, default=4000,
                        help="KV blocks per worker (default 4000: a worker caches about half of the 64 default "
                             "prefixes, so where a request lands decides whether it hits).")
    parser.add_argument("--concurrency", type=int, default=16, help="Closed-loop clients (unless --rate).")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="Open loop instead: Poisson arrivals at this many requests/s.")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--overlap-weight", type=float, nargs="+", default=[16.0],
                        help="router.overlap_weight for kv; several values run kv once per value.")
    parser.add_argument("--step-tokens", type=int, default=None,
                        help="router.step_tokens for kv (default: the profile's, 8192; 0 charges a worker's whole "
                             "prefill queue, as NVIDIA Dynamo does).")
    parser.add_argument("--modes", nargs="+", default=["kv", "round_robin", "random"],
                        choices=["kv", "round_robin", "random", "least_loaded", "pinned"],
                        help="router.mode values to compare; 'pinned' is a reference without any gateway: the "
                             "client sends every prompt of a group straight to the one worker that group is pinned "
                             "to (groups spread evenly), so every repeat of a prefix is a hit on an evenly loaded "
                             "worker, with no proxy hop and no routing time. With equal groups no router can do "
                             "much better on TTFT p50.")
    parser.add_argument("--placement", nargs="+", default=["process"], choices=["process", "frontend"],
                        help="router.placement for kv: its own process (asked over NATS) or inside the frontend.")
    parser.add_argument("--sglang-python", default=None, help="Python of a venv with sglang-router installed.")
    parser.add_argument("--sglang-policies", nargs="+", default=["cache_aware"],
                        help="sglang-router policies to run (with --sglang-python).")
    parser.add_argument("--repeat", type=int, default=1,
                        help="Rounds; each round runs every router once, in turn, and the table shows medians "
                             "(this machine is noisy: interleaving keeps the comparison side by side).")
    args = parser.parse_args()
    prompts = workload(args.groups, args.per_group, args.prefix, args.skew)
    home = Path(tempfile.mkdtemp(prefix="dynamo-routing-"))
    runs: dict[str, list[dict]] = {}
    entries: list[tuple[str, str, float, str]] = []
    for mode in args.modes:
        if mode == "kv":
            for placement in args.placement:
                for w in args.overlap_weight:
                    label = "kv" + (f" {placement}" if len(args.placement) > 1 else "")
                    label += f" (weight {w:g})" if len(args.overlap_weight) > 1 else ""
                    entries.append((label, mode, w, placement))
        else:
            entries.append((mode, mode, args.overlap_weight[0], "process"))
    if args.sglang_python:
        entries += [(f"sglang {policy}", "sglang", 0.0, "") for policy in args.sglang_policies]
    try:
        for round_no in range(args.repeat):
            for name, mode, weight, placement in entries:
                result = (run_sglang(name.split()[1], args, prompts, home) if mode == "sglang"
                          else run_dynamo(mode, weight, placement, args, prompts, home))
                runs.setdefault(name, []).append(result)
                print(f"round {round_no + 1} {name}: TTFT p50 {result['ttft_p50']:.1f} ms, p99 {result['ttft_p99']:.1f} ms, "
                      f"ITL p50 {result['itl_p50']:.2f} ms, "
                      f"{result['req_s']:.1f} req/s, hit rate {result['hit_rate']:.0%}, served {result['served']}",
                      flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    results = {name: {key: statistics.median(r[key] for r in rs) for key in ("ttft_p50", "ttft_p99", "itl_p50", "req_s", "hit_rate")}
               | {"errors": sum(r["errors"] for r in rs), "served": rs[-1]["served"]}
               for name, rs in runs.items()}
    base = results.get("round_robin")
    groups = (f"{args.groups} groups (Zipf {args.skew:g}: {group_sizes(args.groups, args.per_group, args.skew)[0]} in the "
              f"hottest)" if args.skew > 0 else f"{args.groups} groups × {args.per_group}")
    print(f"\n{len(prompts)} requests: {groups} sharing {args.prefix} tokens, "
          f"{args.workers} mocker workers × {args.blocks} blocks, "
          f"{f'Poisson {args.rate:g} req/s' if args.rate else f'concurrency {args.concurrency}'}, "
          f"{args.tokens} output tokens; medians of {args.repeat} interleaved round(s)")
    print(f"{'router':22}{'TTFT p50 ms':>12}{'TTFT p99 ms':>12}{'ITL p50 ms':>11}{'req/s':>8}{'hit rate':>9}{'p50 vs rr':>11}"
          f"{'errors':>8}  requests per worker (last round)")
    for name, r in results.items():
        ratio = f"{base['ttft_p50'] / r['ttft_p50']:.2f}x" if base else "-"
        served = "/".join(map(str, r["served"]))
        print(f"{name:22}{r['ttft_p50']:>12.1f}{r['ttft_p99']:>12.1f}{r['itl_p50']:>11.2f}{r['req_s']:>8.1f}{r['hit_rate']:>9.0%}{ratio:>11}"
              f"{r['errors']:>8}  {served}")


if __name__ == "__main__":
    main()
