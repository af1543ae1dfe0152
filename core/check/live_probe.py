"""Probing a live run or endpoint for `dynamo check`: components, discovery, one token.

Everything is probed concurrently on one event loop with short timeouts.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

from dynamo.core.check.context import CheckContext
from dynamo.core.check.model import Results
from dynamo.core.check.net import is_loopback
from dynamo.core.nats_server import redact_url
from dynamo.core.text import quantity

PROBE_TIMEOUT = 0.8
NATS_TIMEOUT = 1.0
REQUEST_TIMEOUT = 1.5
DISCOVERY_TTL = 10.0


def check_run_dir(ctx: CheckContext, out: Results, run) -> None:
    asyncio.run(check_run(ctx, out, run))


def check_url(ctx: CheckContext, out: Results, url: str) -> None:
    asyncio.run(check_endpoint(ctx, out, url))


# ---------------------------------------------------------------------------- a run


async def check_run(ctx: CheckContext, out: Results, run) -> None:
    from dynamo.core.rundir import DEAD, pid_alive

    state = run.read_state()
    plan = _read_plan(run.path)
    status = state.get("status", "unknown")
    supervisor = state.get("supervisor_pid")
    alive = pid_alive(supervisor, state.get("supervisor_started"))
    ref = run_ref(run, ctx.home())
    data = {"run": run.id, "path": str(run.path), "status": status, "supervisor_pid": supervisor}
    if status in ("starting", "ready", "stopping") and not alive:
        out.error("run", f"{run.id} is {DEAD}: pid {supervisor} no longer runs, its state still says {status}; "
                  "its processes may still hold GPUs and ports",
                  f"dynamo stop {ref} (kills what is left and marks the run failed)", **data)
        return
    if status not in ("starting", "ready", "stopping"):
        failure = f": {state.get('failure')}" if state.get("failure") else ""
        out.info("run", f"{run.id} is {status}{failure}; nothing live to check", **data)
        return
    text = f"{run.id} ({state.get('profile')}, supervisor pid {supervisor}) is {status}"
    if state.get("endpoint"):
        text += f", endpoint {state['endpoint']}"
    if status == "ready":
        out.ok("run", text, **data)
    else:
        out.warn("run", text, f"wait for it, or see dynamo logs {ref}", **data)

    processes: dict[str, dict] = state.get("processes") or {}
    namespace = (plan or {}).get("namespace") or state.get("profile") or ""
    specs = {p["name"]: p for p in (plan or {}).get("processes", [])}
    import aiohttp

    timeout = min(REQUEST_TIMEOUT, max(0.2, ctx.deadline - time.monotonic() - 0.3))
    async with aiohttp.ClientSession(trust_env=False, connector=aiohttp.TCPConnector(force_close=True)) as session:
        probes = {name: asyncio.create_task(_probe(session, specs.get(name), proc)) for name, proc in processes.items()}
        discovery = asyncio.create_task(_bounded(_discovery_entries(state.get("nats_url"), namespace),
                                                 ctx.deadline - time.monotonic() - 0.2))
        health = {name: await task for name, task in probes.items()}
        # a frontend with no worker to serve (its /health 503) would hold the request for a worker to
        # join, past this check's timeout: its probe already says what is wrong
        serving = (health.get("frontend") or {}).get("ok") is not False
        headers = _auth(ctx)
        answer = (asyncio.create_task(_one_token(session, state["endpoint"], state.get("model"), timeout, headers))
                  if state.get("endpoint") and status == "ready" and serving else None)
        entries = await discovery
        reply = await answer if answer else None

    down: set[str] = set()
    for name, proc in processes.items():
        if not _component(out, ref, name, proc, health[name]):
            down.add(name)
    workers = {name: specs.get(name, {}) for name, proc in processes.items() if proc.get("kind") == "worker"}
    _compare_discovery(out, run.id, ref, namespace, workers, processes, down, entries)
    if reply is not None and reply.get("status") in (401, 403):
        # the frontend's frontend.api_key: its logs would not say more than that the key is missing
        _report_refused(out, state["endpoint"], reply["status"], bool(headers))
    elif reply is not None:
        _report_answer(out, ref, reply)


async def _bounded(coro, seconds: float) -> dict:
    try:
        return await asyncio.wait_for(coro, max(0.1, seconds))
    except asyncio.TimeoutError:
        return {"error": f"discovery did not answer within {max(0.1, seconds):.1f}s"}


def _read_plan(path: Path) -> dict | None:
    try:
        return json.loads((path / "plan.json").read_text())
    except (OSError, ValueError):
        return None


def _process_alive(proc: dict) -> bool:
    """The recorded pid still runs and is the process the supervisor started (not a reused pid)."""
    import psutil

    pid = proc.get("pid")
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        if proc.get("started_at") and abs(p.create_time() - proc["started_at"]) > 2.0:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def _probe(session, spec: dict | None, proc: dict) -> dict:
    """Run the component's own readiness probe once: {"ok": bool, "what": ..., "detail": ...}."""
    probe = (spec or {}).get("readiness_probe") or {}
    kind = probe.get("kind")
    if kind is None and proc.get("url"):
        kind, probe = "http", {"kind": "http", "url": proc["url"] + "/health"}
    started = time.monotonic()
    if kind == "http":
        url = probe["url"]
        try:
            async with session.get(url, timeout=_timeout(PROBE_TIMEOUT)) as resp:
                body = await resp.read()
                return {"ok": 200 <= resp.status < 300, "what": f"GET {url}", "status": resp.status,
                        "ms": (time.monotonic() - started) * 1000, "body": body[:4000]}
        except Exception as exc:  # aiohttp raises many types; all mean "no healthy answer"
            return {"ok": False, "what": f"GET {url}", "detail": _describe(exc)}
    if kind == "tcp":
        host, port = probe.get("host"), probe.get("port")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
            writer.close()
            return {"ok": True, "what": f"tcp {host}:{port}", "ms": (time.monotonic() - started) * 1000}
        except (OSError, asyncio.TimeoutError) as exc:
            return {"ok": False, "what": f"tcp {host}:{port}", "detail": _describe(exc)}
    return {"ok": None, "what": "log line (not probed again)"}


def _timeout(seconds: float):
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)


def _describe(exc: BaseException) -> str:
    from dynamo.core.bench.client import not_http

    if isinstance(exc, asyncio.TimeoutError):
        return "no answer (timed out)"
    reason = not_http(exc)
    if reason:
        return f"does not speak HTTP ({reason})"
    text = str(exc) or type(exc).__name__
    return text if len(text) < 160 else text[:157] + "..."


def _exit(code: int | None) -> str:
    if code is None:
        return ""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_ref(run, home: Path) -> str:
    """How to name the run on the command line: its id under $DYNAMO_HOME, else its directory."""
    try:
        if run.path.resolve().parent == (home / "runs").resolve():
            return run.id
    except OSError:
        pass
    return str(run.path)


def _component(out: Results, ref: str, name: str, proc: dict, health: dict) -> bool:
    """Report one component; True when it is up and healthy."""
    status = proc.get("status", "?")
    pid = proc.get("pid")
    alive = _process_alive(proc)
    data = {"component": name, "kind": proc.get("kind"), "status": status, "pid": pid, "alive": alive,
            "probe": health.get("what"), "probe_ok": health.get("ok")}
    logs = f"dynamo logs {ref} {name}"
    answered = ""
    if health.get("ok"):
        code = f" {health['status']}" if health.get("status") else ""
        answered = f"{health['what']} answered{code} in {health['ms']:.0f} ms"
    if status in ("failed", "exited"):
        why = proc.get("reason") or _exit(proc.get("exit_code"))
        out.error(name, f"{status}{': ' + why if why else ''} (pid {pid} {'still runs' if alive else 'is gone'})",
                  f"{logs} shows why; restart the run to bring it back (dynamo stop {ref}, then dynamo serve)",
                  **data)
        return False
    if status in ("ready", "unhealthy", "starting") and pid and not alive:
        out.error(name, f"pid {pid} is gone (the state still says {status}): it died moments ago",
                  f"{logs} shows why; the supervisor restarts it if its restart policy allows", **data)
        return False
    if status == "backoff":
        restarts = proc.get("restarts", 0)
        out.warn(name, f"restarting after a failure ({quantity(restarts, 'restart')} so far)",
                 f"{logs} shows why it fails", **data)
        return False
    if status == "starting":
        out.warn(name, f"still starting (pid {pid})", f"wait, or see {logs}", **data)
        return False
    if status in ("stopping", "stopped", "pending"):
        out.warn(name, f"{status} (pid {pid or '-'})", None, **data)
        return False
    if health.get("ok") is False:
        out.error(name, f"{status}, pid {pid} runs, but its probe fails: {health['what']}: "
                  f"{health.get('detail') or 'status ' + str(health.get('status'))}",
                  f"{logs} shows what it is doing", **data)
        return False
    extra = ""
    if proc.get("kind") == "frontend" and health.get("body"):
        try:
            seen = [w.get("name") for w in json.loads(health["body"]).get("workers", [])]
            extra = f"; routes to {quantity(len(seen), 'worker')}: {', '.join(map(str, seen))}"
            data["routes_to"] = seen
        except (ValueError, AttributeError):
            pass
    out.ok(name, f"{status}, pid {pid}" + (f", {answered}" if answered else "") + extra, **data)
    return True


# ---------------------------------------------------------------------------- discovery


async def _discovery_entries(nats_url: str | None, namespace: str | None) -> dict:
    """{"entries": {key: data}} from the discovery bucket, or {"error": why}."""
    if not nats_url or not namespace:
        return {"error": "the run has no NATS URL"}
    import nats
    from nats.js.errors import BucketNotFoundError

    from dynamo.core.discovery import BUCKET

    try:
        nc = await asyncio.wait_for(nats.connect(nats_url, name="dynamo-check", connect_timeout=NATS_TIMEOUT,
                                                 allow_reconnect=False, max_reconnect_attempts=0),
                                    NATS_TIMEOUT + 0.2)
    except Exception as exc:  # nats-py raises several unrelated types on refusal
        return {"error": f"cannot reach NATS at {redact_url(nats_url)}: {_describe(exc)}"}
    try:
        try:
            kv = await nc.jetstream().key_value(BUCKET)
        except BucketNotFoundError:
            return {"error": f"the discovery bucket {BUCKET} does not exist"}
        watcher = await kv.watch(f"{namespace}.>", ignore_deletes=True)
        entries: dict[str, Any] = {}
        while True:
            entry = await watcher.updates(timeout=0.5)
            if entry is None:
                break
            if entry.value:
                try:
                    entries[entry.key] = json.loads(entry.value)
                except ValueError:
                    entries[entry.key] = {"unreadable": entry.value[:100].decode("utf-8", "replace")}
        await watcher.stop()
        return {"entries": entries}
    except Exception as exc:
        return {"error": f"cannot read discovery: {_describe(exc)}"}
    finally:
        try:
            await nc.close()
        except Exception:
            pass


def _compare_discovery(out: Results, run_id: str, ref: str, namespace: str, workers: dict[str, dict],
                       processes: dict[str, dict], down: set[str], found: dict) -> None:
    if "error" in found:
        out.error("discovery", found["error"], f"dynamo logs {ref} nats", run=run_id)
        return
    entries: dict[str, dict] = found["entries"]
    now = time.time()
    problems: list[tuple[str, str]] = []
    missing: list[str] = []
    registered = 0
    for name, spec in workers.items():
        key = f"{namespace}.{name}"
        entry = entries.pop(key, None)
        planned_url = (spec.get("discovery") or {}).get("url") or processes[name].get("url")
        if entry is None:
            if name in down:
                missing.append(name)
            else:
                problems.append((name, f"{name} is ready but not registered: the frontend cannot route to it"))
            continue
        if name in down:
            problems.append((name, f"{name} is registered but not healthy: the frontend may send requests to it "
                                   f"until its entry expires"))
            continue
        if planned_url and entry.get("url") != planned_url:
            problems.append((name, f"{name} is registered at {entry.get('url')}, planned at {planned_url}"))
            continue
        age = now - float(entry.get("ts", now))
        if age > DISCOVERY_TTL:
            problems.append((name, f"{name}'s entry was last refreshed {age:.0f}s ago (TTL {DISCOVERY_TTL:g}s): "
                                   "the supervisor stopped refreshing it"))
            continue
        registered += 1
    foreign = {key: entry for key, entry in entries.items()}
    for name, text in problems:
        out.error("discovery", text, f"dynamo logs {ref} {name}; restarting the run re-registers it",
                  worker=name)
    for key, entry in foreign.items():
        owner = entry.get("run")
        out.warn("discovery", f"{key} is in namespace {namespace} but not planned by this run"
                 + (f" (run {owner})" if owner and owner != run_id else ""),
                 "two runs share the profile name on one NATS: give one another name:, or stop it", key=key)
    summary = f"{registered} of {len(workers)} planned workers registered (namespace {namespace})"
    data = {"registered": registered, "planned": len(workers), "missing": missing}
    if missing:
        out.warn("discovery", f"{summary}; not registered because they are down: {', '.join(missing)}",
                 "see the failed workers above", **data)
    elif not problems:
        out.ok("discovery", summary, **data)


# ---------------------------------------------------------------------------- the frontend answers


async def _one_token(session, endpoint: str, model: str | None, timeout: float, headers: dict | None = None) -> dict:
    """POST a one-token completion; {"ok", "ms", "status", "detail"}."""
    url = endpoint.rstrip("/") + "/v1/completions"
    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    started = time.monotonic()
    try:
        async with session.post(url, json=body, headers=headers, timeout=_timeout(timeout)) as resp:
            raw = await resp.read()
            ms = (time.monotonic() - started) * 1000
            detail = ""
            try:
                payload = json.loads(raw)
                detail = (payload.get("error") or {}).get("message", "") if isinstance(payload, dict) else ""
            except ValueError:
                detail = raw[:200].decode("utf-8", "replace")
            return {"ok": resp.status == 200, "status": resp.status, "ms": ms, "detail": detail, "url": url,
                    "model": model}
    except Exception as exc:
        return {"ok": False, "status": None, "detail": _describe(exc), "url": url, "model": model,
                "ms": (time.monotonic() - started) * 1000}


def _report_answer(out: Results, ref: str | None, reply: dict) -> None:
    data = {k: reply.get(k) for k in ("url", "status", "model")}
    data["ms"] = round(reply.get("ms") or 0, 1)
    if reply["ok"]:
        out.ok("request", f"the frontend answered a one-token request in {reply['ms']:.0f} ms "
               f"(model {reply.get('model')})", **data)
    else:
        status = f"HTTP {reply['status']}" if reply.get("status") else "no answer"
        fix = f"dynamo logs {ref} frontend" if ref is not None else "check the server's logs"
        out.error("request", f"a one-token request to {reply['url']} failed: {status}"
                  + (f": {reply['detail']}" if reply.get("detail") else ""), fix, **data)


# ---------------------------------------------------------------------------- any endpoint


async def check_endpoint(ctx: CheckContext, out: Results, url: str) -> None:
    """--url: an OpenAI-compatible endpoint (ours or anyone's): health, models, one token."""
    import aiohttp
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    timeout = min(REQUEST_TIMEOUT, max(0.2, ctx.deadline - time.monotonic() - 0.3))
    headers = _auth(ctx)
    async with aiohttp.ClientSession(trust_env=not is_loopback(host),
                                     connector=aiohttp.TCPConnector(force_close=True)) as session:
        health_task = asyncio.create_task(_get(session, url + "/health"))
        models = await _get(session, url + "/v1/models", headers)
        health = await health_task
        model = None
        if models.get("status") == 200:
            try:
                data = json.loads(models["body"]).get("data") or []
                model = data[0]["id"] if data else None
            except (ValueError, KeyError, TypeError, AttributeError):
                model = None
        if health.get("not_http"):
            out.error("endpoint", f"{url} does not speak HTTP ({health['not_http']})",
                      "check the host and port: --url is the frontend's HTTP endpoint (dynamo ps shows it)",
                      url=url)
            return
        if health.get("status") is None:
            out.error("endpoint", f"{url} does not answer: {health.get('detail')}",
                      "check the URL, and that the server runs (dynamo ps)", url=url)
            return
        if health["status"] == 200:
            out.ok("health", f"GET {url}/health answered 200 in {health['ms']:.0f} ms", url=url)
        elif health["status"] == 404:
            out.info("health", f"{url} has no /health (404)", url=url)
        else:
            out.error("health", f"GET {url}/health answered {health['status']}: {health['body'][:200]!r}",
                      "the server is up but not healthy: see its logs", url=url)
        if models.get("status") in (401, 403):
            _report_refused(out, url, models["status"], bool(headers))
            return
        if health["status"] == 503:
            return  # no worker can serve: a request would wait for one to join (reported above)
        if model is None:
            out.warn("models", f"GET {url}/v1/models lists no model (HTTP {models.get('status')})",
                     "the workers may not be ready yet", url=url)
            return
        out.ok("models", f"serves {model}", model=model)
        reply = await _one_token(session, url, model, timeout, headers)
    if reply.get("status") in (401, 403):
        _report_refused(out, url, reply["status"], bool(headers))
        return
    _report_answer(out, None, reply)


def _auth(ctx: CheckContext) -> dict | None:
    """The bearer token of --api-key / $DYNAMO_API_KEY, as request headers."""
    return {"Authorization": f"Bearer {ctx.options.api_key}"} if ctx.options.api_key else None


def _report_refused(out: Results, url: str, status: int, sent: bool) -> None:
    """A 401/403 is about the key, not about readiness: say whether one was sent."""
    if not sent:
        out.error("auth", f"{url} requires an API key (HTTP {status}); none was sent",
                  "pass --api-key KEY or export DYNAMO_API_KEY (the frontend's frontend.api_key)",
                  url=url, status=status)
    else:
        out.error("auth", f"{url} refused the API key (HTTP {status})",
                  "give the frontend's key (its frontend.api_key) with --api-key or $DYNAMO_API_KEY",
                  url=url, status=status)


async def _get(session, url: str, headers: dict | None = None) -> dict:
    started = time.monotonic()
    try:
        async with session.get(url, headers=headers, timeout=_timeout(PROBE_TIMEOUT)) as resp:
            body = (await resp.read()).decode("utf-8", "replace")
            return {"status": resp.status, "body": body, "ms": (time.monotonic() - started) * 1000}
    except Exception as exc:
        from dynamo.core.bench.client import not_http

        return {"status": None, "detail": _describe(exc), "not_http": not_http(exc)}
