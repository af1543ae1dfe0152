"""Start sglang-router (the Rust load balancer from `pip install sglang-router`) for side-by-side benchmarks.

Used by bench_gateway.py and bench_routing.py. sglang-router lives in its own venv
(`--sglang-python /path/to/venv/bin/python`); it gets its own Prometheus port on 127.0.0.1
(its default 29000 collides with a second instance) and is waited for until it answers.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx

from dynamo.core.ports import pick_free_port


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until ``url`` answers 200; fails with the process's log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[2]} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


def start_sglang_router(python: str, worker_urls: list[str], policy: str, log_dir: Path) -> tuple[subprocess.Popen, str]:
    """sglang-router with ``policy`` in front of ``worker_urls``; returns the process and its URL once ready."""
    port = pick_free_port()
    log_path = log_dir / f"sglang-router-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([python, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
                                 "--policy", policy, "--host", "127.0.0.1", "--port", str(port),
                                 "--prometheus-host", "127.0.0.1", "--prometheus-port", str(pick_free_port())],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/v1/models", proc, log_path)
    except BaseException:
        stop_sglang_router(proc)
        raise
    return proc, url


def stop_sglang_router(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
