"""The supervisor: start a plan in order, gate on readiness, restart, stop in reverse.

One asyncio loop. Each process has a ``Component`` task that runs its life cycle
(start → ready → watch → maybe restart); the supervisor starts stages in order
(nats → router → workers → frontend), waits for each to be ready, and on a stop request
or a fatal failure stops stages in reverse order: SIGTERM to the process group and its
recorded descendants, the component's grace period, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from nats.errors import NoRespondersError

from dynamo.core import proctree
from dynamo.core.discovery import DEFAULT_TTL, DiscoveryPublisher, instance_key
from dynamo.core.nats_server import redact_url
from dynamo.core.plan import Plan, ProbeSpec, ProcessSpec, RUN_DIR, STAGES
from dynamo.core.ports import describe_process, listener_pids
from dynamo.core.printer import Printer
from dynamo.core.probes import Prober
from dynamo.core.restart import backoff_delay, wants_restart
from dynamo.core.rundir import RotatingLog, RunDir, write_owner_only
from dynamo.core.signals import silence, stop_signals, terminal_fds
from dynamo.core.text import quantity

_NATS_INFO = " [INF] "  # nats-server's informational lines; warnings and errors still reach the console

USAGE_ERROR = 2  # the exit code of a process refusing its arguments (argparse, our CLIs): not worth a restart
_LIVENESS_MIN_PERIOD = 2.0
_DESCENDANT_SCAN_PERIOD = 3.0


@dataclass
class Component:
    spec: ProcessSpec
    status: str = "pending"  # pending starting ready unhealthy backoff exited failed stopping stopped
    proc: asyncio.subprocess.Process | None = None
    pid: int | None = None
    restarts: int = 0  # consecutive failures since the last stable period
    total_restarts: int = 0
    started_at: float | None = None
    ready_at: float | None = None
    exit_code: int | None = None
    reason: str | None = None
    descendants: dict[int, float] = field(default_factory=dict)
    log_matched: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # ready once, or failed for good
    task: asyncio.Task | None = None
    reader: asyncio.Task | None = None
    log: RotatingLog | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def snapshot(self) -> dict[str, Any]:
        return {
            "kind": self.spec.kind, "group": self.spec.group, "role": self.spec.role, "node": self.spec.node,
            "status": self.status, "pid": self.pid, "restarts": self.total_restarts,
            "started_at": self.started_at, "ready_at": self.ready_at, "exit_code": self.exit_code,
            "reason": self.reason, "ports": self.spec.ports, "url": self.spec.url, "gpus": self.spec.gpus,
            "descendants": sorted(self.descendants), "required": self.spec.required,
        }


EXTERNAL_NATS_WAIT = 300.0  # NATS started elsewhere (another node, a service) may come up after us
NATS_WAIT_REPORT = 10.0  # seconds between "still waiting" lines meanwhile


class Supervisor:
    def __init__(self, plan: Plan, run: RunDir, printer: Printer, rng: random.Random | None = None):
        self.plan = plan
        self.run = run
        self.printer = printer
        self.rng = rng or random.Random()
        self.components = [Component(spec) for spec in plan.processes]
        self.prober = Prober()
        self.discovery: DiscoveryPublisher | None = None
        self.status = "starting"
        self.failure: str | None = None
        self.failure_code = 1  # 2 when the failure is bad input (a usage error, a port held by another program)
        self.stop_requested = False
        self._stop = asyncio.Event()
        self._sentinel: subprocess.Popen | None = None
        self._sentinel_pipe: int | None = None
        self.started = time.time()
        self._terminal: list[int] = []  # stdout/stderr fds that are a terminal (dropped if it hangs up)

    # ------------------------------------------------------------------ public

    async def run_until_stopped(self) -> int:
        """Start everything, serve until stopped; return the exit code (0 clean, 1 failure)."""
        loop = asyncio.get_running_loop()
        handled = stop_signals()  # SIGHUP (the terminal closed) stops the run too, unless nohup ignores it
        self._terminal = terminal_fds()
        for sig in handled:
            loop.add_signal_handler(sig, self.request_stop, sig)
        self._start_sentinel()
        self._write_state()
        scanner = asyncio.create_task(self._scan_descendants())
        try:
            await self._start_stages()
            if not self._stop.is_set():
                self.status = "ready"
                self._write_state()
                self.run.event("dynamo", "ready", seconds=round(time.time() - self.started, 3))
                where = f" on {self.plan.endpoint}" if self.plan.endpoint else ""
                self.printer.system(f"ready in {time.time() - self.started:.2f}s{where} (run {self.run.id})")
                await self._stop.wait()
        finally:
            scanner.cancel()
            await self._shutdown()
            for sig in handled:
                loop.remove_signal_handler(sig)
        return self.failure_code if self.failure else 0

    def request_stop(self, sig: int | None = None) -> None:
        if sig == signal.SIGHUP:
            silence(self._terminal)  # it hung up: what the run prints from now on is only in its logs
        if not self.stop_requested:
            name = signal.Signals(sig).name if sig else "request"
            self.printer.system(f"{name} received: stopping (again to skip the grace period)")
            self.run.event("dynamo", "stop-requested", signal=name)
        elif sig is not None:
            self.printer.system("stopping now: killing every process")
            for comp in self.components:
                proctree.signal_all(comp.pid, comp.descendants, signal.SIGKILL)
        self.stop_requested = True
        self._stop.set()

    # ------------------------------------------------------------------ stages

    async def _start_stages(self) -> None:
        if not any(c.spec.kind == "nats" for c in self.components):
            await self._open_discovery()  # external NATS, or a node without it
        for stage in STAGES:
            if self._stop.is_set():
                return
            comps = [c for c in self.components if c.spec.kind == stage]
            if not comps:
                continue
            for comp in comps:
                comp.task = asyncio.create_task(self._life(comp), name=comp.name)
            waits = [asyncio.create_task(c.settled.wait()) for c in comps]
            stopper = asyncio.create_task(self._stop.wait())
            pending = set(waits)
            try:
                while pending and not self._stop.is_set():
                    done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
                    pending.discard(stopper)
            finally:
                stopper.cancel()
                for task in waits:
                    task.cancel()
            if stage == "nats" and not self._stop.is_set():
                await self._open_discovery()

    async def _open_discovery(self) -> None:
        if self.discovery is not None or not self.plan.nats_url:
            return
        local = any(c.spec.kind == "nats" for c in self.components)
        if not local:
            self.printer.system(f"connecting to NATS at {redact_url(self.plan.nats_url)} (started elsewhere)")
        patience = 5.0 if local else EXTERNAL_NATS_WAIT
        try:
            # NATS on another node may start after us: wait for it (interrupted by a stop request)
            opening = asyncio.create_task(DiscoveryPublisher.open(self.plan.nats_url, DEFAULT_TTL, timeout=patience))
            stopper = asyncio.create_task(self._stop.wait())
            waited = 0.0
            while not (await asyncio.wait({opening, stopper}, timeout=NATS_WAIT_REPORT,
                                          return_when=asyncio.FIRST_COMPLETED))[0]:
                waited += NATS_WAIT_REPORT
                self.printer.system(f"still waiting for NATS at {redact_url(self.plan.nats_url)} after {waited:.0f}s "
                                    f"(giving up at {patience:.0f}s); is it running? `dynamo check` tests it")
            stopper.cancel()
            if not opening.done():
                opening.cancel()
                return
            self.discovery = opening.result()
        except ConnectionError as exc:
            self._fail(str(exc))

    # ------------------------------------------------------------------ one component

    async def _life(self, comp: Component) -> None:
        spec = comp.spec
        policy = spec.restart
        while not self.stop_requested:
            if not await self._spawn(comp):
                return
            outcome = await self._until_ready(comp)
            if outcome == "impostor" or (outcome == "exited" and comp.exit_code == USAGE_ERROR):
                # bad input: restarting cannot help
                if outcome == "exited":
                    comp.reason = (f"exited with code {USAGE_ERROR} before becoming ready (a usage error; "
                                   f"see its log: dynamo logs {self.run.id} {comp.name})")
                else:
                    await self._terminate(comp)
                comp.status = "failed"
                comp.settled.set()
                self._lifecycle(comp, "failed", f"failed: {comp.reason}; not restarted", error=True)
                if comp.spec.required:
                    self._fail(f"{comp.name} {comp.reason}", code=USAGE_ERROR)
                return
            if outcome == "ready":
                comp.status = "ready"
                comp.ready_at = time.time()
                comp.settled.set()
                took = comp.ready_at - (comp.started_at or comp.ready_at)
                self._lifecycle(comp, "ready", f"ready after {took:.2f}s")
                await self._register(comp)
                outcome = await self._watch(comp)
                if not self.stop_requested:  # on a stop, workers leave discovery after the frontend drained
                    await self._deregister(comp)
            if self.stop_requested:
                return
            failed_probe = outcome in ("timeout", "unhealthy")
            if failed_probe:
                why = (f"never became ready within {spec.readiness_probe.startup_timeout:g}s (startup_timeout)"
                       if outcome == "timeout" else "stopped answering its probe")
                comp.reason = f"{why} ({spec.readiness_probe.describe()})"
                self._lifecycle(comp, outcome, f"{why}: stopping it", error=True)
                await self._terminate(comp)
            # the probe's verdict, not the exit code of the process it got stopped with
            ended = why if failed_probe else self._ended(comp)
            if comp.ready_at and time.time() - comp.ready_at >= policy.reset_after:
                comp.restarts = 0
            if not wants_restart(policy, comp.exit_code, failed_probe):
                comp.status = "exited" if comp.exit_code == 0 and not failed_probe else "failed"
                self._write_state()
                comp.settled.set()
                if spec.required:
                    self._fail(f"{comp.name} {ended} and restart policy is {policy.policy!r}")
                return
            if comp.restarts >= policy.max_restarts:
                comp.status = "failed"
                comp.settled.set()
                restarts = f"{quantity(comp.total_restarts, 'restart')}"
                self._lifecycle(comp, "failed", f"failed: {ended} after {restarts} "
                                f"(max_restarts {policy.max_restarts})", error=True)
                if spec.required:
                    self._fail(f"{comp.name} failed after {restarts}: {ended}")
                return
            comp.restarts += 1
            comp.total_restarts += 1
            delay = backoff_delay(policy.backoff, comp.restarts, self.rng)
            comp.status = "backoff"
            self._lifecycle(comp, "restarting", f"restarting in {delay:.2f}s (restart {comp.restarts}/{policy.max_restarts})")
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                return
            except asyncio.TimeoutError:
                pass

    def _ended(self, comp: Component) -> str:
        if comp.reason and comp.exit_code is None:
            return comp.reason
        code = comp.exit_code
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    async def _spawn(self, comp: Component) -> bool:
        spec = comp.spec
        env = dict(os.environ)
        env.update({k: v.replace(RUN_DIR, str(self.run.path)) for k, v in spec.env.items()})
        env[proctree.RUN_MARKER] = self.run.marker
        env[proctree.PROCESS_MARKER] = spec.name
        env["PYTHONUNBUFFERED"] = "1"
        argv = [a.replace(RUN_DIR, str(self.run.path)) for a in spec.argv]
        if spec.kind == "nats":
            os.makedirs(self.run.path / "nats", exist_ok=True)
        for path, content in spec.files.items():
            target = path.replace(RUN_DIR, str(self.run.path))
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            write_owner_only(target, content.replace(RUN_DIR, str(self.run.path)))  # may hold the NATS token
        comp.exited.clear()
        comp.log_matched = False
        comp.exit_code = None
        comp.reason = None
        comp.ready_at = None
        comp.status = "starting"
        if comp.log is None:
            comp.log = self.run.log(spec.name)
        try:
            comp.proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=proctree.die_with_parent,
            )
        except OSError as exc:
            comp.status = "failed"
            comp.reason = f"cannot start {argv[0]}: {exc.strerror}"
            comp.settled.set()
            self._lifecycle(comp, "failed", comp.reason, error=True)
            if spec.required:
                self._fail(f"{comp.name}: {comp.reason}")
            return False
        comp.pid = comp.proc.pid
        comp.started_at = time.time()
        comp.descendants = {}
        self._lifecycle(comp, "started", f"started pid {comp.pid}: {' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''}")
        comp.reader = asyncio.create_task(self._pump(comp))
        return True

    async def _pump(self, comp: Component) -> None:
        """Copy output to the log file and the console; watch for the ready log line; reap."""
        assert comp.proc is not None and comp.proc.stdout is not None
        pattern = re.compile(comp.spec.readiness_probe.pattern) if comp.spec.readiness_probe.kind == "log" else None
        stream = comp.proc.stdout
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the stream limit
                raw = await stream.read(65536)
            if not raw:
                break
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            comp.log.write(line)
            if comp.spec.kind != "nats" or _NATS_INFO not in line:  # its 25-line banner and chatter: log only
                self.printer.output(comp.name, line)
            if pattern is not None and not comp.log_matched and pattern.search(line):
                comp.log_matched = True
        code = await comp.proc.wait()
        comp.exit_code = code
        comp.exited.set()
        if not self.stop_requested or comp.status not in ("stopping",):
            self._lifecycle(comp, "exited", self._ended(comp), error=code != 0 and not self.stop_requested)

    async def _until_ready(self, comp: Component) -> str:
        probe = comp.spec.readiness_probe
        deadline = time.monotonic() + probe.startup_timeout
        if probe.initial_delay and await self._exited_within(comp, probe.initial_delay):
            return "exited"
        while True:
            if comp.exited.is_set():
                return "exited"
            if self.stop_requested:
                return "stopped"
            if await self.prober.check(probe, comp.log_matched) and await self.prober.warmup(probe):
                if comp.exited.is_set():
                    return "exited"
                holder = await self._held_elsewhere(comp)
                if holder:
                    comp.reason = holder
                    return "impostor"
                return "ready"
            if time.monotonic() >= deadline:
                return "timeout"
            if await self._exited_within(comp, min(probe.period, max(0.0, deadline - time.monotonic()))):
                return "exited"

    async def _held_elsewhere(self, comp: Component) -> str | None:
        """Whether the probe was answered by a process outside this run (another program or run on
        the port; this one's process then failed to bind): who holds the port, or None."""
        probe = comp.spec.readiness_probe
        port = probe.port if probe.kind == "tcp" else (urlsplit(probe.url).port if probe.url else None)
        if not port:
            return None
        listeners = await asyncio.to_thread(listener_pids, port)
        listeners.discard(None)  # another user's process (a container's port proxy, say): cannot tell
        if not listeners or comp.pid in listeners:
            return None
        if listeners & set(await asyncio.to_thread(proctree.marked_processes, self.run.marker)):
            return None  # a descendant of this run serves it
        holder = describe_process(min(listeners))
        return f"found port {port} held by {holder}, not by itself (another program or run uses it)"

    async def _watch(self, comp: Component) -> str:
        """After readiness: wait for exit, probing health; ``failure_threshold`` misses in a row → unhealthy."""
        probe = comp.spec.readiness_probe
        period = max(probe.period, _LIVENESS_MIN_PERIOD)
        misses = 0
        while not self.stop_requested:
            if await self._exited_within(comp, period):
                return "exited"
            if (probe.kind == "log" and not probe.live_subject) or self.stop_requested:
                continue
            if await (self._answers_on_nats(probe) if probe.live_subject
                      else self.prober.check(probe, comp.log_matched, live=True)):
                if misses:
                    comp.status = "ready"
                    await self._register(comp)
                    self._lifecycle(comp, "healthy", "healthy again")
                misses = 0
            else:
                misses += 1
                if misses == 1:
                    comp.status = "unhealthy"
                    await self._deregister(comp)
                    self._lifecycle(comp, "unhealthy", f"probe failed ({probe.describe()})", error=True)
                if misses >= probe.failure_threshold:
                    return "unhealthy"
        return "stopped"

    async def _answers_on_nats(self, probe: ProbeSpec) -> bool:
        """Whether the process answers a NATS request to its ``live_subject`` in time; no verdict
        against it (True) while NATS itself cannot be asked."""
        nc = self.discovery.nc if self.discovery is not None else None
        nats_ready = all(c.status == "ready" for c in self.components if c.spec.kind == "nats")
        if nc is None or not nc.is_connected or not nats_ready:
            return True
        try:
            await nc.request(probe.live_subject, b"", timeout=probe.timeout)
            return True
        except (asyncio.TimeoutError, NoRespondersError):
            return False
        except Exception:  # NATS trouble: not the process's fault
            return True

    async def _exited_within(self, comp: Component, seconds: float) -> bool:
        try:
            await asyncio.wait_for(comp.exited.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    # ------------------------------------------------------------------ discovery

    async def _register(self, comp: Component) -> None:
        if self.discovery is None or comp.spec.discovery is None:
            return
        published = {k: v.replace(RUN_DIR, str(self.run.path)) if isinstance(v, str) else v
                     for k, v in comp.spec.discovery.items()}
        entry = {"name": comp.name, "namespace": self.plan.namespace, "node": comp.spec.node,
                 "pid": comp.pid, "run": self.run.id, **published}
        try:
            await self.discovery.register(instance_key(self.plan.namespace, comp.name), entry)
        except Exception as exc:
            self.printer.system(f"could not register {comp.name} in discovery: {exc}", error=True)

    async def _deregister(self, comp: Component) -> None:
        if self.discovery is not None and comp.spec.discovery is not None:
            await self.discovery.remove(instance_key(self.plan.namespace, comp.name))

    # ------------------------------------------------------------------ stopping

    def _fail(self, why: str, code: int = 1) -> None:
        if self.failure is None:
            self.failure, self.failure_code = why, code
            self.printer.system(f"stopping the run: {why}", error=True)
            self.run.event("dynamo", "failed", reason=why)
        self.stop_requested = True
        self._stop.set()

    async def _shutdown(self) -> None:
        self.stop_requested = True
        self.status = "stopping"
        self._write_state()
        t0 = time.time()
        for stage in reversed(STAGES):  # the frontend first: it drains while the workers still serve
            if stage == "worker" and self.discovery is not None:
                await self.discovery.close()  # workers leave discovery before they stop (bounded if NATS is gone)
            comps = [c for c in self.components if c.spec.kind == stage and c.proc is not None]
            await asyncio.gather(*(self._terminate(c, final=True) for c in comps))
        for comp in self.components:
            if comp.task is not None:
                comp.task.cancel()
            if comp.reader is not None:
                try:
                    await asyncio.wait_for(comp.reader, 1.0)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    comp.reader.cancel()
            if comp.log is not None:
                comp.log.close()
        leftovers = proctree.marked_processes(self.run.marker)
        if leftovers:
            self.printer.system(f"killing {len(leftovers)} leftover processes of this run: {sorted(leftovers)}")
            proctree.signal_all(None, leftovers, signal.SIGKILL)
        await self.prober.close()
        self._stop_sentinel()
        self.status = "failed" if self.failure else "stopped"
        self._write_state()
        self.run.event("dynamo", self.status, seconds_to_stop=round(time.time() - t0, 3), reason=self.failure)
        self.printer.system(f"stopped in {time.time() - t0:.2f}s" + (f" after a failure: {self.failure}" if self.failure else ""))

    async def _terminate(self, comp: Component, final: bool = False) -> None:
        """SIGTERM the group and descendants, wait the grace period, then SIGKILL what is left."""
        if comp.proc is None:
            return
        tree = {**comp.descendants, **proctree.descendants(comp.proc.pid),
                **proctree.marked_processes(self.run.marker, comp.name)}
        if comp.exited.is_set() and not proctree.alive(tree):
            if final:
                comp.status = comp.status if comp.status in ("failed", "exited") else "stopped"
            return
        previous = comp.status
        comp.status = "stopping"
        self._write_state()
        proctree.signal_all(comp.proc.pid, tree, signal.SIGTERM)
        proctree.signal_all(comp.proc.pid, tree, signal.SIGCONT)  # a frozen (stopped) process acts on it only once continued
        grace = comp.spec.grace_period
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if comp.exited.is_set() and not proctree.alive(tree):
                break
            await asyncio.sleep(0.05)
        else:
            left = proctree.alive({**tree, **proctree.descendants(comp.proc.pid)})
            self._lifecycle(comp, "killed", f"still running after {grace:g}s grace: SIGKILL "
                            f"(group {comp.proc.pid}{', ' + str(len(left)) + ' descendants' if left else ''})", error=True)
            proctree.signal_all(comp.proc.pid, left, signal.SIGKILL)
            try:
                await asyncio.wait_for(comp.exited.wait(), 5.0)
            except asyncio.TimeoutError:
                pass
        if final:
            comp.status = "failed" if previous == "failed" else "stopped"
            self._lifecycle(comp, "stopped", f"stopped ({self._ended(comp)})")
        self._write_state()

    async def _scan_descendants(self) -> None:
        """Record every child's descendants while they run, so escaped ones can be found later."""
        while True:
            await asyncio.sleep(_DESCENDANT_SCAN_PERIOD)
            changed = False
            running = [c for c in self.components if c.proc is not None and not c.exited.is_set()]
            trees = proctree.descendants_of_many([c.proc.pid for c in running])
            for comp in running:
                found = trees.get(comp.proc.pid, {})
                new = {p: t for p, t in found.items() if p not in comp.descendants}
                if new:
                    comp.descendants.update(new)
                    changed = True
            if changed:
                self._write_state()

    # ------------------------------------------------------------------ sentinel, state, output

    def _start_sentinel(self) -> None:
        read_end, write_end = os.pipe()
        env = {k: v for k, v in os.environ.items() if k not in (proctree.RUN_MARKER, proctree.PROCESS_MARKER)}
        self._sentinel = subprocess.Popen(
            [sys.executable, "-m", "dynamo.core.sentinel", self.run.marker],
            stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env=env, close_fds=True,
        )
        os.close(read_end)
        self._sentinel_pipe = write_end

    def _stop_sentinel(self) -> None:
        if self._sentinel_pipe is not None:
            os.close(self._sentinel_pipe)
            self._sentinel_pipe = None
        if self._sentinel is not None:
            try:
                self._sentinel.wait(5)
            except subprocess.TimeoutExpired:
                self._sentinel.kill()

    def _lifecycle(self, comp: Component, event: str, text: str, error: bool = False) -> None:
        self.printer.system(f"{comp.name}: {text}", error=error)
        self.run.event(comp.name, event, pid=comp.pid, message=text)
        self._write_state()

    def _write_state(self) -> None:
        self.run.write_state({
            "run_id": self.run.id,
            "profile": self.plan.profile,
            "profile_path": self.plan.profile_path,
            "backend": self.plan.backend,
            "model": self.plan.model,
            "node": self.plan.node,
            "status": self.status,
            "failure": self.failure,
            "endpoint": self.plan.endpoint,
            "nats_url": self.plan.nats_url,
            "marker": self.run.marker,
            "supervisor_pid": os.getpid(),
            "supervisor_started": _own_create_time(),
            "sentinel_pid": self._sentinel.pid if self._sentinel else None,
            "started_at": self.started,
            "updated_at": time.time(),
            "processes": {c.name: c.snapshot() for c in self.components},
        })


_CREATE_TIME: float | None = None


def _own_create_time() -> float:
    global _CREATE_TIME
    if _CREATE_TIME is None:
        import psutil

        _CREATE_TIME = psutil.Process().create_time()
    return _CREATE_TIME


def run_plan(plan: Plan, run: RunDir, printer: Printer) -> int:
    """Run the supervisor on uvloop when available; return the exit code."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(Supervisor(plan, run, printer).run_until_stopped())
