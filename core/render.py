"""Render a profile for the schedulers that run clusters: Kubernetes manifests and a Slurm batch script.

Both run the same thing as a single machine: ``dynamo serve PROFILE --node NAME`` per
component (Kubernetes: one pod per worker replica, ``--replica`` from the StatefulSet
ordinal), so probes, restarts, discovery and engine flags stay identical.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from ruamel.yaml.scalarstring import LiteralScalarString

from dynamo.backends import get_backend
from dynamo.core.errors import UsageError
from dynamo.core.gpus import assumed_inventory
from dynamo.core.plan import ProbeSpec, build_plan
from dynamo.core.profile import LoadedProfile, parse_profile

PROFILE_PATH = "/etc/dynamo/profile.yaml"
RUN_DIR = "/tmp/dynamo-run"
NODE_LABEL = "dynamo.dev/node"
_POD_IP = "${POD_IP}"


def _dns(name: str) -> str:
    """A DNS-1123 label: lower case, digits and '-', at most 63 characters."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return label[:63].rstrip("-") or "dynamo"


def _profile_node(profile, component: str) -> str | None:
    for node_name, node in profile.nodes.items():
        if component in node.run:
            return node_name
    return None


# ---------------------------------------------------------------------------- Kubernetes


def kubernetes_profile(loaded: LoadedProfile, nats_url: str) -> dict:
    """The profile each pod loads: one node per component at the pod's own IP, NATS as a Service."""
    profile = loaded.profile
    data = profile.model_dump(mode="json", exclude_none=True)
    data["nats"] = {"url": nats_url}
    components = ["frontend", *profile.workers] + (["router"] if profile.router.mode == "kv" else [])
    data["nodes"] = {c: {"address": _POD_IP, "run": [c]} for c in components}
    for group in data["workers"].values():
        group.pop("host", None)
        group.pop("port", None)
        if isinstance(group.get("gpus"), list):  # a pod sees only its own GPUs, as 0..n-1
            group["gpus"] = len(group["gpus"]) // max(group.get("replicas", 1), 1)
    data["frontend"].pop("host", None)
    return data


def _probe(probe: ProbeSpec, port: int | None, kind: str) -> dict | None:
    """A Kubernetes probe matching ours: same target, period, timeout and threshold."""
    if probe.kind == "http" and port:
        url = probe.http_url(live=kind == "liveness")
        path = "/" + url.split("/", 3)[3] if url and url.count("/") >= 3 else "/health"
        action: dict[str, Any] = {"httpGet": {"path": path, "port": port}}
    elif probe.kind == "tcp" and port:
        action = {"tcpSocket": {"port": port}}
    else:
        return None
    # liveness runs at most every 2 s, as the supervisor's own health checks do
    period = max(2 if kind == "liveness" else 1, round(probe.period))
    out = {**action, "periodSeconds": period, "timeoutSeconds": max(1, round(probe.timeout)),
           "failureThreshold": probe.failure_threshold}
    if kind == "startup":
        out["failureThreshold"] = max(1, int(probe.startup_timeout // period))
    return out


def nats_token_secret(profile) -> str:
    """The Secret (key ``token``) the NATS pod and every client read the NATS token from."""
    return _dns(f"dynamo-{profile.name}-nats-token")


def token_secret_command(profile, k8s_namespace: str | None = None) -> str | None:
    """How to create the NATS token Secret when the rendered manifests do not carry it."""
    if not profile.nats.embedded or profile.nats.token:
        return None
    where = f" -n {k8s_namespace}" if k8s_namespace else ""
    return (f"kubectl create secret generic {nats_token_secret(profile)}{where} "
            f"--from-literal=token=$(openssl rand -hex 24)")


_K8S_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # an RFC 1123 label


def render_kubernetes(loaded: LoadedProfile, image: str, k8s_namespace: str | None = None) -> list[dict]:
    """Manifests: NATS (unless external), then per component a Deployment or StatefulSet, and Services."""
    if not image.strip() or any(c.isspace() for c in image):
        raise UsageError(f"--image {image!r}: expected a container image reference, e.g. "
                         "nvcr.io/nvidia/ai-dynamo/vllm-runtime:0.4.0")
    if k8s_namespace is not None and not _K8S_NAMESPACE.fullmatch(k8s_namespace):
        raise UsageError(f"--namespace {k8s_namespace!r}: a Kubernetes namespace is at most 63 lower-case letters, "
                         "digits or '-', starting and ending with a letter or digit")
    profile = loaded.profile
    base = _dns(f"dynamo-{profile.name}")
    labels = {"app.kubernetes.io/part-of": "dynamo", "dynamo.dev/profile": _dns(profile.name)}
    meta = (lambda name, extra=None: {"name": name, "labels": {**labels, **(extra or {})},
                                      **({"namespace": k8s_namespace} if k8s_namespace else {})})
    manifests: list[dict] = []
    token_env: list[dict] = []

    if profile.nats.embedded:
        # NATS is a Service every pod of the cluster can reach: it always takes a token, from a Secret. With
        # nats.token the Secret is rendered here; without, the user creates it (token_secret_command).
        nats_name = f"{base}-nats"
        nats_port = 4222
        if profile.nats.token:
            manifests.append({"apiVersion": "v1", "kind": "Secret", "metadata": meta(nats_token_secret(profile)),
                              "type": "Opaque", "stringData": {"token": profile.nats.token}})
        token_env = [{"name": "DYNAMO_NATS_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": nats_token_secret(profile), "key": "token"}}}]
        # The token goes in a config file, not on nats-server's command line (ps on the node shows those).
        start_nats = ("umask 077 && printf '{\"authorization\": {\"token\": \"%s\"}}\\n' \"$DYNAMO_NATS_TOKEN\" "
                      f"> /tmp/nats.conf && exec nats-server -c /tmp/nats.conf -js -sd /data -p {nats_port}")
        selector = {"app.kubernetes.io/name": nats_name}
        manifests.append({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(nats_name, {"app.kubernetes.io/component": "nats"}),
            "spec": {"replicas": 1, "selector": {"matchLabels": selector}, "template": {
                "metadata": {"labels": {**labels, **selector}},
                "spec": {"containers": [{
                    "name": "nats", "image": "nats:2.10-alpine", "command": ["sh", "-c", start_nats], "env": token_env,
                    "ports": [{"name": "client", "containerPort": nats_port}],
                    "readinessProbe": {"tcpSocket": {"port": nats_port}, "periodSeconds": 2},
                    "livenessProbe": {"tcpSocket": {"port": nats_port}, "periodSeconds": 10},
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": [{"name": "data", "emptyDir": {}}]}}}})
        manifests.append({"apiVersion": "v1", "kind": "Service", "metadata": meta(nats_name),
                          "spec": {"selector": selector, "ports": [{"name": "client", "port": nats_port,
                                                                    "targetPort": nats_port}]}})
        nats_url = f"nats://${{DYNAMO_NATS_TOKEN}}@{nats_name}:{nats_port}"
    else:
        nats_url = profile.nats.url or ""

    data = kubernetes_profile(loaded, nats_url)
    text = _yaml_text(data)
    manifests.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(f"{base}-profile"),
                      "data": {"profile.yaml": LiteralScalarString(text)}})
    pod_profile = parse_profile(text, "k8s-profile.yaml", env={"POD_IP": "10.0.0.1", "DYNAMO_NATS_TOKEN": "t"})
    backend = get_backend(profile.backend)
    max_gpus = max([g.gpus if isinstance(g.gpus, int) else len(g.gpus) // max(g.replicas, 1)
                    for g in profile.workers.values()] + [1])

    def container(component: str, command: list[str], spec, extra: dict) -> dict:
        port = (spec.ports.get("http") if spec else None)
        probe = spec.readiness_probe if spec else None
        out: dict[str, Any] = {
            "name": _dns(component), "image": image, "command": command,
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}, *token_env,
                    *({"name": k, "value": v} for k, v in {**profile.env}.items())],
            "volumeMounts": [{"name": "profile", "mountPath": "/etc/dynamo"}],
        }
        if port:
            out["ports"] = [{"name": "http", "containerPort": port}]
        if probe is not None:
            for key, kind in (("startupProbe", "startup"), ("readinessProbe", "readiness"), ("livenessProbe", "liveness")):
                rendered = _probe(probe, port, kind)
                if rendered:
                    out[key] = rendered
        out.update(extra)
        return out

    def pod_spec(containers: list[dict], component: str, grace: float) -> dict:
        spec: dict[str, Any] = {"containers": containers, "terminationGracePeriodSeconds": int(grace) + 10,
                                "volumes": [{"name": "profile", "configMap": {"name": f"{base}-profile"}}]}
        placed = _profile_node(profile, component)
        if placed:
            spec["nodeSelector"] = {NODE_LABEL: placed}
        return spec

    serve = ["dynamo", "serve", PROFILE_PATH, "--run-dir", RUN_DIR, "--no-color"]
    singles = [("frontend", "frontend")] + ([("router", "router")] if profile.router.mode == "kv" else [])
    for component, kind in singles:
        plan = build_plan(pod_profile, assumed_inventory(0), node=component)
        spec = next(p for p in plan.processes if p.kind == kind)
        name = f"{base}-{component}"
        selector = {"app.kubernetes.io/name": name}
        manifests.append({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": meta(name, {"app.kubernetes.io/component": component}),
            "spec": {"replicas": 1, "selector": {"matchLabels": selector}, "template": {
                "metadata": {"labels": {**labels, **selector}},
                "spec": pod_spec([container(component, [*serve, "--node", component],
                                            spec if kind == "frontend" else None, {})], component, spec.grace_period)}}})
        if kind == "frontend":
            port = spec.ports["http"]
            manifests.append({"apiVersion": "v1", "kind": "Service", "metadata": meta(name),
                              "spec": {"selector": selector, "ports": [{"name": "http", "port": port, "targetPort": port}]}})

    for group_name, group in profile.workers.items():
        if not group.replicas:
            continue
        per_replica = group.gpus if isinstance(group.gpus, int) else len(group.gpus) // group.replicas
        plan = build_plan(pod_profile, assumed_inventory(max_gpus), node=group_name, replica=0)
        spec = next(p for p in plan.processes if p.kind == "worker")
        name = _dns(f"{base}-{group_name}")
        selector = {"app.kubernetes.io/name": name}
        extra: dict[str, Any] = {}
        if backend.uses_gpus and per_replica:
            extra["resources"] = {"limits": {"nvidia.com/gpu": per_replica}}
        command = ["sh", "-c", " ".join(map(shlex.quote, [*serve, "--node", group_name])) + ' --replica "${HOSTNAME##*-}"']
        manifests.append({"apiVersion": "v1", "kind": "Service", "metadata": meta(name),
                          "spec": {"clusterIP": "None", "selector": selector,
                                   "ports": [{"name": "http", "port": spec.ports["http"]}]}})
        manifests.append({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": meta(name, {"app.kubernetes.io/component": "worker", "dynamo.dev/role": group.role}),
            "spec": {"serviceName": name, "replicas": group.replicas, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": selector}, "template": {
                         "metadata": {"labels": {**labels, **selector}},
                         "spec": pod_spec([container(group_name, command, spec, extra)], group_name, spec.grace_period)}}})
    return manifests


def _yaml_text(data: dict) -> str:
    from io import StringIO

    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.default_flow_style = False
    out = StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def to_yaml_stream(manifests: list[dict]) -> str:
    from io import StringIO

    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.default_flow_style = False
    out = StringIO()
    yaml.dump_all(manifests, out)
    return out.getvalue()


# ---------------------------------------------------------------------------- Slurm


_SECRET_KEYS = {"nats.token": "DYNAMO_NATS_TOKEN", "frontend.api_key": "DYNAMO_API_KEY"}


def render_slurm(loaded: LoadedProfile, profile_path: str, overrides: list[str], partition: str | None,
                 time_limit: str | None, account: str | None) -> str:
    """An sbatch script: one `dynamo serve --node` per allocated node, told every node's address.

    Each ``--set`` and a ``--backend`` the profile was loaded with are passed on to every node's
    ``dynamo serve``."""
    profile = loaded.profile
    passed_on = [f"--set {shlex.quote(o)}" for o in overrides]
    if ("backend",) in loaded.sources.overrides:
        passed_on.append(f"--backend {shlex.quote(profile.backend)}")
    nodes = list(profile.nodes) or ["local"]
    gpus_per_node = {}
    for group_name, group in profile.workers.items():
        placed = _profile_node(profile, group_name) or nodes[0]
        count = (group.gpus * group.replicas) if isinstance(group.gpus, int) else len(group.gpus)
        gpus_per_node[placed] = gpus_per_node.get(placed, 0) + count
    gpus = max(gpus_per_node.values(), default=0) if get_backend(profile.backend).uses_gpus else 0
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in _SECRET_KEYS:  # the script repeats every --set on each node's `dynamo serve` command line
            raise UsageError(f"--set {key}: a secret would sit in the script and on every node's command line; "
                             f"write {key}: ${{{_SECRET_KEYS[key]}}} in the profile and export {_SECRET_KEYS[key]} "
                             "before sbatch (Slurm passes the environment on)")
    if profile.nodes and profile.nats.embedded and not profile.nats.token:
        where = loaded.sources.where(("nats", "token"))
        if ("nats", "token") in loaded.sources.positions:  # written, but it came out empty: ${VAR} unset
            raise UsageError(f"{where}: nats.token is empty: export the variable it names (e.g. export "
                             "DYNAMO_NATS_TOKEN=$(openssl rand -hex 16)); a multinode profile on Slurm needs a NATS "
                             "token: NATS must not be open on the cluster network")
        raise UsageError("nats.token: a multinode profile on Slurm needs a NATS token "
                         "(nats.token: ${DYNAMO_NATS_TOKEN}); NATS must not be open on the cluster network")
    lines = [
        "#!/bin/bash",
        " ".join(["# Generated by: dynamo render slurm", profile_path, *passed_on]),
        f"#SBATCH --job-name={_dns('dynamo-' + profile.name)}",
        f"#SBATCH --nodes={len(nodes)}",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --exclusive",
    ]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    lines += [
        "set -euo pipefail",
        f"PROFILE={shlex.quote(profile_path)}",
        'mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        "# Each profile node gets one allocated host; its address is the host's first IP.",
        "addr() { srun --nodes=1 --ntasks=1 -w \"$1\" hostname -I | awk '{print $1}'; }",
    ]
    sets = []
    for index, node in enumerate(nodes):
        var = f"ADDR_{index}"
        lines.append(f'{var}=$(addr "${{HOSTS[{index}]}}")')
        if profile.nodes:
            sets.append(f'--set "nodes.{node}.address=${{{var}}}"')
    head = _profile_node(profile, "frontend") or nodes[0]
    lines.append(f'echo "frontend: http://${{ADDR_{nodes.index(head)}}}:{profile.frontend.port}"')
    extra = " ".join(passed_on)
    lines.append("# The supervisors stop their processes on SIGTERM (scancel) and exit with their status.")
    for index, node in enumerate(nodes):
        node_flag = f" --node {node}" if profile.nodes else ""
        lines.append(
            f'srun --nodes=1 --ntasks=1 -w "${{HOSTS[{index}]}}" --kill-on-bad-exit=1 '
            f'dynamo serve "$PROFILE"{node_flag} {" ".join(sets)} {extra} '
            f'--run-dir "$HOME/.dynamo/runs/slurm-${{SLURM_JOB_ID}}-{node}" --no-color &'.replace("  ", " "))
    # `|| status=$?` so that errexit does not end the script before the others are stopped; the script
    # ignores the SIGTERM it sends its own process group, waits for the supervisors, then exits with the status.
    lines += ["status=0", "wait -n || status=$?", 'echo "a node supervisor exited ($status): stopping the job"',
              "trap '' TERM", "kill 0", "wait || true", 'exit "$status"']
    return "\n".join(lines) + "\n"
