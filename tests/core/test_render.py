"""dynamo render: Kubernetes manifests valid against the Kubernetes API schema, and a Slurm script."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import kubernetes_validate
import pytest

from dynamo.core.gpus import assumed_inventory
from dynamo.core.plan import build_plan
from dynamo.core.profile import SHIPPED_PROFILES_DIR, load_profile, parse_profile
from dynamo.core.render import render_kubernetes, render_slurm
from tests.conftest import dynamo

K8S_VERSION = "1.30.0"
PROFILES = sorted(p.stem for p in SHIPPED_PROFILES_DIR.glob("*.yaml"))
TOKEN = ["nats.token=tok"]  # the rendered manifests then carry the token's Secret


def by_kind(manifests: list[dict], kind: str) -> list[dict]:
    return [m for m in manifests if m["kind"] == kind]


@pytest.mark.parametrize("name", PROFILES)
def test_every_shipped_profile_renders_to_valid_manifests(name):
    manifests = render_kubernetes(load_profile(name, TOKEN), "registry.example.com/dynamo:1")
    for manifest in manifests:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    kinds = {m["kind"] for m in manifests}
    assert {"ConfigMap", "Deployment", "StatefulSet", "Service"} <= kinds


def test_workers_request_gpus_and_probe_like_the_supervisor():
    loaded = load_profile("disagg", TOKEN)
    manifests = render_kubernetes(loaded, "img")
    sets = {m["metadata"]["name"]: m for m in by_kind(manifests, "StatefulSet")}
    profile = loaded.profile
    for group_name, group in profile.workers.items():
        sts = sets[f"dynamo-disagg-{group_name}"]
        assert sts["spec"]["replicas"] == group.replicas
        container = sts["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == group.gpus
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert container["startupProbe"]["failureThreshold"] >= 60  # engines take minutes to load
        assert "--replica" in container["command"][-1] and f"--node {group_name}" in container["command"][-1]
        env = {e["name"] for e in container["env"]}
        assert "POD_IP" in env


def test_the_pod_profile_plans_one_worker_on_the_pod_ip():
    manifests = render_kubernetes(load_profile("agg", TOKEN), "img")
    text = by_kind(manifests, "ConfigMap")[0]["data"]["profile.yaml"]
    pod = parse_profile(str(text), "pod.yaml", env={"POD_IP": "10.1.2.3", "DYNAMO_NATS_TOKEN": "tok"})
    plan = build_plan(pod, assumed_inventory(1), node="decode", replica=1)
    assert [p.name for p in plan.processes] == ["decode-1"]
    worker = plan.processes[0]
    assert worker.host == "10.1.2.3" and worker.url.startswith("http://10.1.2.3:")
    assert worker.env["CUDA_VISIBLE_DEVICES"] == "0"
    frontend = build_plan(pod, assumed_inventory(0), node="frontend").processes
    assert [p.kind for p in frontend] == ["frontend"]
    assert frontend[0].env["DYNAMO_NATS_URL"] == "nats://tok@dynamo-agg-nats:4222"
    assert not any("tok@" in arg for arg in frontend[0].argv)


def test_nats_token_goes_in_a_secret_and_nodes_become_node_selectors():
    text = ("name: mn\nmodel: {name: m}\nnats: {token: s3cret}\nworkers:\n  w: {gpus: 2}\n"
            "nodes:\n  head: {address: 10.0.0.1, run: [nats, frontend]}\n  gpu: {address: 10.0.0.2, run: [w]}\n")
    manifests = render_kubernetes(parse_profile(text, "mn.yaml", env={}), "img")
    for manifest in manifests:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    secret = by_kind(manifests, "Secret")[0]
    assert secret["stringData"]["token"] == "s3cret"
    config = by_kind(manifests, "ConfigMap")[0]["data"]["profile.yaml"]
    assert "s3cret" not in config and "${DYNAMO_NATS_TOKEN}@" in config
    sts = by_kind(manifests, "StatefulSet")[0]
    assert sts["spec"]["template"]["spec"]["nodeSelector"] == {"dynamo.dev/node": "gpu"}


def test_slurm_script_starts_each_node_with_every_address(tmp_path):
    loaded = load_profile("multinode", overrides=["nats.token=tok"])
    script = render_slurm(loaded, "profiles/multinode.yaml", ["router.mode=kv"], "gpu", "02:00:00", None)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "#SBATCH --nodes=2" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gpus-per-node=4" in script
    for node in loaded.profile.nodes:
        assert f"--node {node}" in script
        assert f'--set "nodes.{node}.address=' in script
    assert script.count("dynamo serve \"$PROFILE\"") == 2


def test_slurm_backend_reaches_every_node_and_sizes_the_gpu_request():
    result = dynamo("render", "slurm", "multinode", "--backend", "mocker", env={"DYNAMO_NATS_TOKEN": "tok"})
    assert result.returncode == 0, result.stderr
    serves = [line for line in result.stdout.splitlines() if "dynamo serve" in line and line.startswith("srun")]
    assert len(serves) == 2 and all("--backend mocker" in line for line in serves), serves
    assert "--gpus-per-node" not in result.stdout  # the mocker needs no GPU


def test_slurm_refuses_a_secret_given_with_set():
    # the script repeats each --set on every node's command line
    result = dynamo("render", "slurm", "multinode", "--set", "nats.token=s3cret-tok")
    assert result.returncode == 2 and "export DYNAMO_NATS_TOKEN" in result.stderr


def test_slurm_refuses_an_open_nats_on_the_cluster_network():
    result = dynamo("render", "slurm", "multinode", env={"DYNAMO_NATS_TOKEN": ""})
    assert result.returncode == 2 and "nats.token" in result.stderr
    # the profile has a token line: the problem is the unset variable, and the error says so, with its line
    assert "multinode.yaml:20:3: nats.token is empty: export the variable it names" in result.stderr, result.stderr


@pytest.mark.parametrize("args, expected", [
    (["--image", ""], "--image '': expected a container image reference"),
    (["--image", "img:1", "-n", "Bad_NS"], "--namespace 'Bad_NS': a Kubernetes namespace is at most 63"),
])
def test_k8s_refuses_values_kubernetes_would_reject(args, expected):
    result = dynamo("render", "k8s", "agg", *args, "--set", "nats.token=tok")
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert result.stdout == ""


def test_render_cli_writes_yaml():
    result = dynamo("render", "k8s", "agg", "--image", "img:1", "--set", "nats.token=tok")
    assert result.returncode == 0, result.stderr
    assert "kind: StatefulSet" in result.stdout and "nvidia.com/gpu: 1" in result.stdout


def test_k8s_nats_always_takes_a_token_from_a_secret():
    # NATS is a Service every pod of the cluster can reach: never open, with or without nats.token
    result = dynamo("render", "k8s", "agg", "--image", "img")
    assert result.returncode == 0, result.stderr
    assert "kubectl create secret generic dynamo-agg-nats-token --from-literal=token=" in result.stderr
    manifests = render_kubernetes(load_profile("agg"), "img")
    assert not by_kind(manifests, "Secret")  # the user creates it, as the command above says
    nats = next(m for m in by_kind(manifests, "Deployment") if m["metadata"]["name"] == "dynamo-agg-nats")
    command = nats["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "DYNAMO_NATS_TOKEN" in command[2] and "--auth" not in command[2]
    for workload in by_kind(manifests, "Deployment") + by_kind(manifests, "StatefulSet"):
        env = workload["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": "DYNAMO_NATS_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": "dynamo-agg-nats-token", "key": "token"}}} in env
    given = dynamo("render", "k8s", "multinode", "--image", "img", env={"DYNAMO_NATS_TOKEN": "tok"})
    assert given.returncode == 0 and "kind: Secret" in given.stdout and "kubectl" not in given.stderr
    # an external NATS is secured by whoever runs it
    external = parse_profile("name: p\nmodel: {name: m}\nnats: nats://nats.example:4222\nworkers:\n  w: {}\n", env={})
    assert not by_kind(render_kubernetes(external, "img"), "Secret")


@pytest.mark.parametrize("args", [["k8s", "agg", "--image", "img", "--set", "nats.token=tok"], ["slurm", "agg"]])
def test_render_into_a_missing_directory_is_a_clear_error(tmp_path, args):
    target = tmp_path / "nodir" / "out"
    result = dynamo("render", *args, "-o", str(target))
    assert result.returncode == 2, result.stderr
    assert f"--output {target}: cannot write: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_slurm_script_stops_every_node_when_one_exits_and_keeps_its_status(tmp_path):
    """The script's own supervision tail, run for real under its `set -euo pipefail`, with the
    srun lines replaced by a node that fails (exit 3) and a node that keeps running."""
    script = render_slurm(load_profile("multinode", TOKEN), "profiles/multinode.yaml", [], None, None, None)
    lines = script.splitlines()
    last_srun = max(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert "set -euo pipefail" in lines[:last_srun]
    survivor_pid = tmp_path / "survivor.pid"
    path = tmp_path / "tail.sh"
    path.write_text("\n".join(["set -euo pipefail",
                               f"sleep 60 >/dev/null 2>&1 & echo $! > {survivor_pid}",  # not holding our pipe open
                               "(sleep 0.3; exit 3) &",
                               *lines[last_srun + 1:]]) + "\n")
    # its own session: the script's `kill 0` must reach its children, not pytest
    proc = subprocess.Popen(["bash", str(path)], start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=30)
        survivor_alive = _running(int(survivor_pid.read_text()))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 3, output
    assert not survivor_alive, "the other node's supervisor was left running"
    assert "a node supervisor exited (3)" in output


def test_k8s_nats_container_takes_its_token_from_a_file_not_its_command_line(tmp_path):
    """The container's start command, run in sh with the real nats-server: the token works and is in no argv."""
    import asyncio
    import shutil

    import nats as nats_client

    from dynamo.core.nats_server import nats_server_binary
    from dynamo.core.ports import pick_free_port

    if nats_server_binary() is None or shutil.which("sh") is None:
        pytest.skip("needs nats-server and sh")
    manifests = render_kubernetes(load_profile("agg", TOKEN), "img")
    nats = next(m for m in by_kind(manifests, "Deployment") if m["metadata"]["name"] == "dynamo-agg-nats")
    script = nats["spec"]["template"]["spec"]["containers"][0]["command"][2]
    port = pick_free_port()
    script = (script.replace("/tmp/nats.conf", str(tmp_path / "nats.conf")).replace("/data", str(tmp_path / "js"))
              .replace("-p 4222", f"-a 127.0.0.1 -p {port}"))
    bindir = os.path.dirname(nats_server_binary())
    proc = subprocess.Popen(["sh", "-c", script], env={"PATH": f"{bindir}:/usr/bin:/bin", "DYNAMO_NATS_TOKEN": "tok-1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        async def connect(token: str) -> bool:
            for _ in range(50):
                try:
                    nc = await nats_client.connect(f"nats://{token}@127.0.0.1:{port}", allow_reconnect=False,
                                                   connect_timeout=1, max_reconnect_attempts=0)
                except Exception as exc:
                    if "Authorization" in str(exc):
                        return False
                    await asyncio.sleep(0.1)
                    continue
                await nc.close()
                return True
            raise AssertionError("nats-server did not start")

        assert asyncio.run(connect("tok-1")) and not asyncio.run(connect("wrong"))
        with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:  # exec: the shell became nats-server
            assert b"tok-1" not in fh.read()
        assert oct((tmp_path / "nats.conf").stat().st_mode & 0o777) == "0o600"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
