"""Live-run checks: an active run (or any endpoint with ``--url``), probed right now.

For a run: the supervisor is alive; each component's process is alive and answers its
own readiness probe (from the run's plan.json); discovery holds exactly the workers that
are ready, at their planned URLs; the frontend answers a one-token request. The probing
(live_probe.py) runs on one event loop, imported only when there is something to probe.
"""

from __future__ import annotations

from pathlib import Path

from dynamo.core.check.context import CheckContext
from dynamo.core.check.model import Results


def run(ctx: CheckContext, out: Results) -> None:
    if ctx.options.url:
        from dynamo.core.check import live_probe

        live_probe.check_url(ctx, out, server_root(ctx.options.url))
        return
    run_dir = pick_run(ctx, out)
    if run_dir is not None:
        from dynamo.core.check import live_probe

        live_probe.check_run_dir(ctx, out, run_dir)


def server_root(url: str) -> str:
    """``http://h:p``, ``http://h:p/``, ``http://h:p/v1`` and ``http://h:p/v1/`` all become ``http://h:p``:
    the OpenAI base URL clients are configured with works here as it does for ``dynamo bench``.

    A URL that cannot be an HTTP endpoint (no host, a port outside 1-65535) is a UsageError (exit 2),
    with the message ``dynamo bench --url`` gives."""
    from dynamo.core.bench.client import normalize_base_url

    return normalize_base_url(url).removesuffix("/v1")


def pick_run(ctx: CheckContext, out: Results):
    """The run to check: --run, else the newest active run (preferring the profile's), else report none."""
    from dynamo.core.rundir import RunDir, find_run, list_runs, pid_alive

    home = ctx.home()
    if ctx.options.run:
        path = Path(ctx.options.run)
        return RunDir(path) if (path / "state.json").exists() else find_run(ctx.options.run, home)
    runs = list_runs(home)
    active = [r for r in runs if r.is_active()]
    state = ctx.profile() if ctx.options.profile else None
    name = state.loaded.profile.name if state is not None and state.valid else None
    preferred = [r for r in active if name and r.read_state().get("profile") == name]
    if preferred or active:
        return (preferred or active)[0]
    crashed = [r for r in runs if r.read_state().get("status") in ("starting", "ready", "stopping")
               and not pid_alive(r.read_state().get("supervisor_pid"), r.read_state().get("supervisor_started"))]
    if crashed:
        return crashed[0]
    where = home / "runs"
    out.info("run", f"no active run under {where}; start one with dynamo serve PROFILE (or check an endpoint "
             "with --url)", home=str(home))
    return None
