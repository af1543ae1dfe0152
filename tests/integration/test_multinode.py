"""Multinode for real: three hosts made of network namespaces, one `dynamo serve --node` per host.

The head runs NATS (token-protected, on its own address), the KV router and the frontend;
two worker hosts run one mocker worker each. The official openai client, inside the head's
namespace, streams requests while one worker host's supervisor is SIGKILLed: every request
still completes (migrated), the dead host's worker leaves discovery within the TTL, and KV
events from both hosts reached the router.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CLIENT = r'''
import asyncio, json, sys, threading, time
import nats, openai
url, nats_url, duration, kill_flag = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
ok, failed, lock = [], [], threading.Lock()
deadline = time.monotonic() + duration
def worker(i):
    n = 0
    while time.monotonic() < deadline:
        n += 1
        try:
            text = ""
            for chunk in api.completions.create(model="m", prompt=f"client {i} request {n} " * 20, max_tokens=80,
                                                stream=True):
                if chunk.choices:
                    text += chunk.choices[0].text or ""
            with lock:
                ok.append(len(text))
        except Exception as exc:
            with lock:
                failed.append(repr(exc))
        if i == 0 and n == 2:
            open(kill_flag, "w").close()  # load is flowing: the test may kill a host now
threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
async def stats():
    nc = await nats.connect(nats_url)
    msg = await nc.request("mn.router.stats", b"", timeout=5)
    await nc.close()
    return json.loads(msg.data)
print(json.dumps({"ok": len(ok), "failed": failed, "router": asyncio.run(stats())}))
'''


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def hosts():
    """Three namespaces on one bridge: head, na, nb at 10.<x>.<y>.1..3. Removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed: apt-get install iproute2")
    tag = f"dyn{os.getpid() % 10000}"
    probe = _ip("netns", "add", f"{tag}-probe", check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
    _ip("netns", "del", f"{tag}-probe", check=False)
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    names = {"head": f"{tag}-head", "na": f"{tag}-na", "nb": f"{tag}-nb"}
    switch = f"{tag}-sw"
    created = []
    try:
        for ns in [switch, *names.values()]:
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        addresses = {}
        for index, (node, ns) in enumerate(names.items(), start=1):
            inside, outside = f"v{index}", f"{tag}p{index}"
            _ip("link", "add", inside, "netns", ns, "type", "veth", "peer", "name", outside, "netns", switch)
            _ip("-n", switch, "link", "set", outside, "master", "br0", "up")
            addresses[node] = f"{subnet}.{index}"
            _ip("-n", ns, "addr", "add", f"{addresses[node]}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
        yield {"ns": names, "addr": addresses}
    finally:
        for ns in created:
            _ip("netns", "del", ns, check=False)


def test_three_hosts_survive_losing_one(tmp_path: Path, hosts):
    addr = hosts["addr"]
    profile = tmp_path / "mn.yaml"
    profile.write_text(textwrap.dedent(f"""\
        name: mn
        model: {{name: m, block_size: 16}}
        backend: mocker
        nats: {{port: 4222, token: multinode-test-token}}
        frontend: {{port: 8000, migration_limit: 3}}
        router: {{mode: kv}}
        ports: {{base: 9100}}
        restart: {{policy: on-failure, max_restarts: 0}}
        workers:
          a: {{replicas: 1, args: {{speedup-ratio: 2}}}}
          b: {{replicas: 1, args: {{speedup-ratio: 2}}}}
        nodes:
          head: {{address: {addr['head']}, run: [nats, router, frontend]}}
          na: {{address: {addr['na']}, run: [a]}}
          nb: {{address: {addr['nb']}, run: [b]}}
        """))
    procs: dict[str, subprocess.Popen] = {}
    run_dirs = {node: tmp_path / f"run-{node}" for node in hosts["ns"]}
    env = {**os.environ, "DYNAMO_HOME": str(tmp_path / "home")}
    try:
        for node, ns in hosts["ns"].items():
            out = open(tmp_path / f"{node}.out", "wb")
            procs[node] = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "dynamo.cli.app", "serve", str(profile),
                 "--node", node, "--run-dir", str(run_dirs[node]), "--no-color"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

        def state(node: str) -> dict:
            try:
                return json.loads((run_dirs[node] / "state.json").read_text())
            except (OSError, ValueError):
                return {}

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(state(n).get("status") == "ready" for n in procs):
            for node, proc in procs.items():
                assert proc.poll() is None, (tmp_path / f"{node}.out").read_text()
            time.sleep(0.2)
        assert all(state(n).get("status") == "ready" for n in procs), {
            n: (tmp_path / f"{n}.out").read_text()[-2000:] for n in procs}
        assert state("na")["processes"]["a-0"]["url"] == f"http://{addr['na']}:9101" or \
            state("na")["processes"]["a-0"]["url"].startswith(f"http://{addr['na']}:")

        kill_flag = tmp_path / "kill-now"
        client = subprocess.Popen(
            ["ip", "netns", "exec", hosts["ns"]["head"], sys.executable, "-c", CLIENT, f"http://{addr['head']}:8000",
             f"nats://multinode-test-token@{addr['head']}:4222", "12", str(kill_flag)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 30
        while not kill_flag.exists() and time.monotonic() < deadline and client.poll() is None:
            time.sleep(0.05)
        assert kill_flag.exists(), client.communicate()
        os.kill(state("nb")["supervisor_pid"], signal.SIGKILL)
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        assert report["failed"] == [], report["failed"]
        assert report["ok"] >= 12
        router = report["router"]
        assert router["batches"] > 0 and router["indexed_blocks"] > 0  # KV events crossed hosts

        # the dead host's worker leaves discovery within the TTL (10 s)
        health = f"http://{addr['head']}:8000/health"
        deadline = time.monotonic() + 20
        names = None
        while time.monotonic() < deadline:
            probe = subprocess.run(["ip", "netns", "exec", hosts["ns"]["head"], sys.executable, "-c",
                                    f"import httpx; print(httpx.get('{health}').text)"],
                                   capture_output=True, text=True)
            names = sorted(w["name"] for w in json.loads(probe.stdout)["workers"])
            if names == ["a-0"]:
                break
            time.sleep(0.5)
        assert names == ["a-0"]
    finally:
        for node, proc in procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for node, proc in procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        from dynamo.core.proctree import marked_processes, signal_all

        for run_dir in run_dirs.values():
            signal_all(None, marked_processes(str(run_dir.resolve())), signal.SIGKILL)
