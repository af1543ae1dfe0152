#!/usr/bin/env python3
"""Gateway overhead: streamed tokens/s and TTFT through the frontend vs directly to the same workers.

Two setups, one after the other, each with its own `dynamo serve` of mocker workers:

- **CPU-bound** (speedup_ratio 0): the engines simulate no time at all, so client, gateway
  and workers compete for the CPU and every cycle the gateway spends shows up. This is the
  issue's benchmark and the worst case for any proxy on a small machine.
- **timed** (speedup_ratio ``--timed-speedup``, default 1: Dynamo's fitted step times, the
  engine being the bottleneck as with real GPUs). Labelled as such; skip with 0.

For each concurrency the same streaming load goes directly to the workers (client-side
round-robin), through the frontend and, with ``--sglang-python``, through sglang-router
(round_robin) in front of the same workers, and with ``--relay`` through a bare TCP relay
(scripts/tcp_relay.py: bytes copied both ways, nothing parsed; the floor for any proxy hop
on this machine), in interleaved rounds so all targets see the
same machine noise; the tables show medians and ratios computed round by round. Each target
gets a warm-up (connections opened) before it is measured, and the gateway's own CPU time
per streamed token is reported from its process counters.

    python scripts/bench_gateway.py [--workers 2] [--concurrency 1 16 64 256] [--requests 400] [--tokens 64]
        [--repeat 3] [--timed-speedup 1] [--sglang-python /path/to/sglang-venv/bin/python] [--relay]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path

import aiohttp
import psutil

from dynamo.core.rundir import wait_until_ready
from sglang_baseline import start_sglang_router, stop_sglang_router

MODEL = "Qwen/Qwen3-0.6B"
_EVENT = b"data: {"


async def drive(urls: list[str], concurrency: int, requests: int, tokens: int) -> dict:
    """Stream `requests` completions at `concurrency`; count SSE token events and TTFT.

    The client counts events in the raw bytes it receives instead of iterating lines: it
    shares the CPU with what it measures, and a costly client would hide gateway overhead.
    """
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
                tail = b""
                try:
                    async with session.post(url + "/v1/completions", json=body) as resp:
                        async for piece in resp.content.iter_any():
                            data = tail + piece  # an event marker may be split between reads
                            found = data.count(_EVENT)
                            if found:
                                if first is None:
                                    first = time.perf_counter() - t0
                                chunks += found
                            tail = data[-(len(_EVENT) - 1):]
                except aiohttp.ClientError:
                    errors += 1
                if first is not None:
                    ttfts.append(first)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"tokens": chunks, "tokens_per_s": chunks / elapsed,
            "ttft_p50_ms": statistics.median(ttfts) * 1000 if ttfts else float("nan"), "errors": errors}


@dataclass
class Target:
    name: str
    urls: list[str]
    process: psutil.Process | None = None  # the gateway, for its CPU time

    def cpu_seconds(self) -> float:
        if self.process is None:
            return 0.0
        total = 0.0
        for proc in (self.process, *self.process.children(recursive=True)):
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total


def measure(target: Target, conc: int, requests: int, tokens: int) -> dict:
    cpu = target.cpu_seconds()
    result = asyncio.run(drive(target.urls, conc, requests, tokens))
    if target.process is not None and result["tokens"]:
        result["cpu_us_per_token"] = (target.cpu_seconds() - cpu) / result["tokens"] * 1e6
    return result


def start_run(workers: int, speedup: float, home: Path) -> tuple[subprocess.Popen, dict]:
    run_dir = home / f"run-{speedup:g}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo.cli.app", "serve", "agg", "--backend", "mocker", "--run-dir", str(run_dir),
         "--set", f"workers.decode.replicas={workers}", "--set", f"workers.decode.args.speedup-ratio={speedup:g}",
         "--set", "frontend.port=0", "--set", "nats.port=0", "--set", "ports.base=0", "--no-color"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "DYNAMO_HOME": str(home)})  # its runs are not the user's
    return proc, wait_until_ready(run_dir, proc)


def start_relay(workers: list[str]) -> tuple[subprocess.Popen, str]:
    """scripts/tcp_relay.py in front of ``workers``; returns the process and its URL once it listens."""
    upstreams = [url.removeprefix("http://") for url in workers]
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("tcp_relay.py")), "--upstream", *upstreams],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if not line.startswith("listening "):
        proc.kill()
        raise RuntimeError(f"tcp_relay.py did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def run_setup(args: argparse.Namespace, speedup: float, requests_for, home: Path) -> dict[int, dict]:
    """All concurrencies against one `dynamo serve`; returns the medians per concurrency."""
    proc, state = start_run(args.workers, speedup, home)
    workers = [p["url"] for p in state["processes"].values() if p["kind"] == "worker"]
    frontend_pid = state["processes"]["frontend"]["pid"]
    targets = [Target("direct", workers), Target("frontend", [state["endpoint"]], psutil.Process(frontend_pid))]
    sglang = start_sglang_router(args.sglang_python, workers, "round_robin", home) if args.sglang_python else None
    if sglang:
        targets.append(Target("sglang", [sglang[1]], psutil.Process(sglang[0].pid)))
    relay = start_relay(workers) if args.relay else None
    if relay:
        targets.append(Target("relay", [relay[1]], psutil.Process(relay[0].pid)))
    label = "CPU-bound, speedup 0" if speedup == 0 else f"timed, speedup {speedup:g}"
    results: dict[int, dict] = {}
    try:
        print(f"\n{label}: {args.workers} mocker workers, {args.tokens}-token streams, "
              f"medians of {args.repeat} interleaved rounds")
        head = (f"{'conc':>5}{'reqs':>6}{'direct tok/s':>14}{'frontend tok/s':>16}{'ratio':>7}{'TTFT direct':>13}"
                f"{'TTFT fe':>9}{'added ms':>10}{'fe µs/tok':>11}")
        if sglang:
            head += f"{'sglang tok/s':>14}{'ours/sglang':>12}{'sgl added':>11}{'sgl µs/tok':>12}"
        if relay:
            head += f"{'relay ratio':>12}{'relay added':>12}{'relay µs/tok':>13}"
        print(head, flush=True)
        for conc in args.concurrency:
            requests = requests_for(conc)
            for target in targets:  # warm-up: connections opened, first-request costs paid
                asyncio.run(drive(target.urls, conc, conc, args.tokens))
            rounds = []
            for i in range(args.repeat):
                order = targets[i % len(targets):] + targets[:i % len(targets)]  # rotate who goes first
                rounds.append({t.name: measure(t, conc, requests, args.tokens) for t in order})
            results[conc] = row = summarize(rounds, requests)
            print(render(conc, row, bool(sglang)), flush=True)
    finally:
        if sglang:
            stop_sglang_router(sglang[0])
        if relay:
            relay[0].terminate()
            relay[0].wait(10)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    return results


def summarize(rounds: list[dict], requests: int) -> dict:
    med = statistics.median
    row = {"requests": requests}
    for name in rounds[0]:
        row[name] = {key: med(r[name][key] for r in rounds) for key in ("tokens_per_s", "ttft_p50_ms")}
        row[name]["errors"] = sum(r[name]["errors"] for r in rounds)
        if "cpu_us_per_token" in rounds[0][name]:
            row[name]["cpu_us_per_token"] = med(r[name].get("cpu_us_per_token", float("nan")) for r in rounds)
        if name != "direct":
            row[name]["ratio"] = med(r[name]["tokens_per_s"] / r["direct"]["tokens_per_s"] for r in rounds)
            row[name]["added_ms"] = med(r[name]["ttft_p50_ms"] - r["direct"]["ttft_p50_ms"] for r in rounds)
    if "sglang" in row:
        row["ours_vs_sglang"] = med(r["frontend"]["tokens_per_s"] / r["sglang"]["tokens_per_s"]
                                    if r["sglang"]["tokens_per_s"] else float("inf") for r in rounds)
    return row


def render(conc: int, row: dict, with_sglang: bool) -> str:
    d, f = row["direct"], row["frontend"]
    line = (f"{conc:>5}{row['requests']:>6}{d['tokens_per_s']:>14,.0f}{f['tokens_per_s']:>16,.0f}{f['ratio']:>7.2f}"
            f"{d['ttft_p50_ms']:>13.2f}{f['ttft_p50_ms']:>9.2f}{f['added_ms']:>10.2f}{f['cpu_us_per_token']:>11.1f}")
    if with_sglang:
        s = row["sglang"]
        line += (f"{s['tokens_per_s']:>14,.0f}{row['ours_vs_sglang']:>12.2f}{s['added_ms']:>11.2f}"
                 f"{s['cpu_us_per_token']:>12.1f}")
    if "relay" in row:
        r = row["relay"]
        line += f"{r['ratio']:>12.2f}{r['added_ms']:>12.2f}{r['cpu_us_per_token']:>13.1f}"
    errors = {name: row[name]["errors"] for name in ("direct", "frontend", "sglang", "relay") if name in row}
    if any(errors.values()):
        line += "  errors " + " ".join(f"{k}={v}" for k, v in errors.items())
    return line


def print_side_by_side(cpu: dict[int, dict], timed: dict[int, dict], speedup: float, with_sglang: bool) -> None:
    print(f"\nside by side: frontend vs direct (and vs sglang-router), CPU-bound | timed (speedup {speedup:g})")
    cols = ["ratio", "added ms"] + (["ours/sgl"] if with_sglang else [])
    print(f"{'conc':>5}" + "".join(f"{c:>10}" for c in cols) + "  |" + "".join(f"{c:>10}" for c in cols))
    for conc in cpu:
        parts = []
        for row in (cpu[conc], timed.get(conc)):
            if row is None:
                parts.append("".join(f"{'-':>10}" for _ in cols))
                continue
            cells = [f"{row['frontend']['ratio']:>10.2f}", f"{row['frontend']['added_ms']:>10.2f}"]
            if with_sglang:
                cells.append(f"{row['ours_vs_sglang']:>10.2f}")
            parts.append("".join(cells))
        print(f"{conc:>5}{parts[0]}  |{parts[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--requests", type=int, default=400,
                        help="Requests per measurement in the CPU-bound setup: this many, or 8 per concurrent stream "
                             "if more (at concurrency 256, 400 requests would be mostly ramp-up: 1.6 per stream).")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3,
                        help="Interleaved rounds per concurrency; the tables show medians (ratios per round).")
    parser.add_argument("--timed-speedup", type=float, default=1.0,
                        help="speedup_ratio of the timed setup (1: Dynamo's fitted step times; 0: skip it).")
    parser.add_argument("--timed-requests", type=int, default=24,
                        help="Requests per measurement in the timed setup: this many, or 4 per concurrent stream "
                             "if more (streams take real time there).")
    parser.add_argument("--sglang-python", default=None,
                        help="Also measure sglang-router (round_robin) in front of the same workers: the Python of "
                             "a venv with `pip install sglang-router`.")
    parser.add_argument("--relay", action="store_true",
                        help="Also measure a bare TCP relay (scripts/tcp_relay.py) in front of the same workers: "
                             "the cost of the extra hop alone, the floor under any gateway's ratio here.")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    home = Path(tempfile.mkdtemp(prefix="dynamo-gw-"))
    try:
        cpu = run_setup(args, 0, lambda conc: max(args.requests, 8 * conc), home)
        if args.timed_speedup > 0:
            timed = run_setup(args, args.timed_speedup, lambda conc: max(args.timed_requests, 4 * conc), home)
            print_side_by_side(cpu, timed, args.timed_speedup, bool(args.sglang_python))
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
