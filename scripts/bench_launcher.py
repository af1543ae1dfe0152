#!/usr/bin/env python3
"""Launcher overhead: time to ready, idle supervisor CPU, time to stop.

Serves profiles/agg.yaml with 4 mocker workers through `dynamo serve`, and, side by side
in the same run, a baseline that starts the same processes the way a bash script does
(all at once with `&`, then polling the frontend's /health). Prints both and the ratio.

    python scripts/bench_launcher.py [--workers 4] [--idle 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent


def wait_health(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise TimeoutError(url)


def run_dynamo(workers: int, idle: float, home: Path) -> dict:
    run_dir = home / f"run-{time.monotonic_ns()}"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo.cli.app", "serve", "agg", "--backend", "mocker", "--run-dir", str(run_dir),
         "--set", f"workers.decode.replicas={workers}", "--set", "frontend.port=0", "--set", "nats.port=0",
         "--set", "ports.base=0", "--no-color"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "DYNAMO_HOME": str(home)},  # its runs are not the user's
    )
    state: dict = {}
    while time.monotonic() - t0 < 120:
        try:
            state = json.loads((run_dir / "state.json").read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("status") == "ready":
            break
        if proc.poll() is not None:
            raise RuntimeError(f"dynamo serve exited with {proc.returncode}")
        time.sleep(0.01)
    ready = time.monotonic() - t0
    sup = psutil.Process(proc.pid)
    before = sup.cpu_times()
    time.sleep(idle)
    after = sup.cpu_times()
    cpu = (after.user + after.system - before.user - before.system) / idle * 100
    t1 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(120)
    return {"ready_s": ready, "idle_cpu_pct": cpu, "stop_s": time.monotonic() - t1}


def run_baseline(workers: int, home: Path) -> dict:
    """What a launch script does: start everything at once, poll the frontend, kill 0."""
    from dynamo.core.nats_server import nats_server_binary
    from dynamo.core.ports import pick_free_port

    nats_port, fe_port = pick_free_port(), pick_free_port()
    store = home / f"nats-{time.monotonic_ns()}"
    t0 = time.monotonic()
    procs = [subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", str(store)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    # The baseline frontend needs discovery entries, so register workers the way the supervisor does,
    # but without readiness gating: a single helper publishes them as soon as each answers /health.
    ports = [pick_free_port() for _ in range(workers)]
    for port in ports:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dynamo.backends.mocker", "--host", "127.0.0.1", "--port", str(port),
             "--served-model-name", "Qwen/Qwen3-0.6B"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "dynamo.core.frontend", "--port", str(fe_port), "--nats-url",
         f"nats://127.0.0.1:{nats_port}", "--namespace", "agg"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    register = subprocess.Popen([sys.executable, "-c", _REGISTER, f"nats://127.0.0.1:{nats_port}", *map(str, ports)])
    wait_health(f"http://127.0.0.1:{fe_port}/health", 120)
    ready = time.monotonic() - t0
    t1 = time.monotonic()
    for p in [register, *procs]:
        p.terminate()
    for p in [register, *procs]:
        p.wait(30)
    shutil.rmtree(store, ignore_errors=True)
    return {"ready_s": ready, "stop_s": time.monotonic() - t1}


_REGISTER = """
import asyncio, sys, httpx
from dynamo.core.discovery import DiscoveryPublisher
async def main():
    pub = await DiscoveryPublisher.open(sys.argv[1])
    async with httpx.AsyncClient() as client:
        pending = set(sys.argv[2:])
        while pending:
            for port in list(pending):
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                        await pub.register(f"agg.w{port}", {"url": f"http://127.0.0.1:{port}", "role": "agg",
                                                             "model": "Qwen/Qwen3-0.6B", "name": f"w{port}"})
                        pending.discard(port)
                except httpx.HTTPError:
                    pass
            await asyncio.sleep(0.02)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--idle", type=float, default=10.0, help="Seconds to sample supervisor CPU while idle.")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="dynamo-bench-"))
    ours, base = [], []
    for _ in range(args.rounds):
        ours.append(run_dynamo(args.workers, args.idle, home))
        base.append(run_baseline(args.workers, home))
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    print(f"{args.workers} mocker workers + nats + frontend, {args.rounds} rounds, medians")
    print(f"{'':28}{'dynamo serve':>14}{'bash-style':>14}{'ratio':>8}")
    print(f"{'seconds to ready':28}{med(ours, 'ready_s'):>14.2f}{med(base, 'ready_s'):>14.2f}"
          f"{med(ours, 'ready_s') / med(base, 'ready_s'):>8.2f}")
    print(f"{'seconds to stop':28}{med(ours, 'stop_s'):>14.2f}{med(base, 'stop_s'):>14.2f}"
          f"{med(ours, 'stop_s') / med(base, 'stop_s'):>8.2f}")
    print(f"{'supervisor CPU idle (%)':28}{med(ours, 'idle_cpu_pct'):>14.2f}{'-':>14}")
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("NO_COLOR", "1")
    main()
