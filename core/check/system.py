"""System checks: OS, CPU, memory, /dev/shm, ulimits, disk, container, user."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import tempfile
from pathlib import Path

from dynamo.core.check.context import CheckContext
from dynamo.core.check.model import Results
from dynamo.core.text import quantity

GiB = 2**30
MiB = 2**20
MEMORY_WARN_FRACTION = 0.90
SHM_MIN_BYTES = 1 * GiB
NOFILE_MIN = 65536
RUN_DIR_MIN_FREE = 1 * GiB
MODEL_CACHE_MIN_FREE = 10 * GiB
DISK_MIN_FREE_FRACTION = 0.10
ENV_VARS = ("DYNAMO_HOME", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
            "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "DYNAMO_ASSUME_GPUS")


def size(num: float) -> str:
    """Bytes for people: 512 MiB, 23.4 GiB."""
    for unit, factor in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if num >= factor:
            value = num / factor
            return f"{value:.0f} {unit}" if value >= 100 or value == int(value) else f"{value:.1f} {unit}"
    return f"{int(num)} B"


def run(ctx: CheckContext, out: Results) -> None:
    check_os(out)
    check_cpu(out)
    check_memory(out)
    check_shm(out)
    check_ulimits(ctx, out)
    check_disk(ctx, out)
    container = detect_container()
    out.info("container", f"inside a container ({container})" if container else "on the host", container=container)
    check_user(out, container)
    env = {name: os.environ[name] for name in ENV_VARS if name in os.environ}
    if env:
        out.info("environment", " ".join(f"{k}={v}" for k, v in env.items()), **env)


def check_os(out: Results) -> None:
    pretty = platform.system()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                pretty = line.partition("=")[2].strip().strip('"')
    except OSError:
        pass
    uname = platform.uname()
    out.ok("os", f"{pretty}, kernel {uname.release} ({uname.machine}), host {uname.node}",
           os=pretty, kernel=uname.release, machine=uname.machine, hostname=uname.node)
    if uname.system != "Linux":
        out.warn("platform", f"{uname.system} is not supported for serving", "run dynamo on Linux")


def check_cpu(out: Results) -> None:
    logical = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = logical
    quota = _cgroup_cpu_quota()
    text = f"{quantity(logical, 'core')}"
    if usable != logical:
        text += f", {usable} usable by this process (CPU affinity)"
    if quota is not None:
        text += f", cgroup quota {quantity(quota, 'CPU')}"
    out.ok("cpu", text, cores=logical, usable=usable, cgroup_quota=quota)


def _cgroup_cpu_quota() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    return None


def check_memory(out: Results) -> None:
    import psutil

    mem = psutil.virtual_memory()
    used_fraction = (mem.total - mem.available) / mem.total if mem.total else 0.0
    data = {"total_bytes": mem.total, "available_bytes": mem.available, "used_fraction": round(used_fraction, 3)}
    text = f"{size(mem.total - mem.available)} used of {size(mem.total)} ({used_fraction:.0%}), {size(mem.available)} available"
    limit = _cgroup_memory_limit()
    if limit is not None and limit < mem.total:
        text += f"; container limit {size(limit)}"
        data["cgroup_limit_bytes"] = limit
    if used_fraction >= MEMORY_WARN_FRACTION:
        out.warn("memory", text, "stop what uses the memory (engines load the model into host memory first), "
                 "or run on a larger machine", **data)
    else:
        out.ok("memory", text, **data)


def _cgroup_memory_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 2**60:
            return int(raw)
    return None


def check_shm(out: Results) -> None:
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        out.warn("/dev/shm", "/dev/shm is missing: engines share tensors between processes through it",
                 "run the container with --shm-size=8g or --ipc=host")
        return
    total = stat.f_blocks * stat.f_frsize
    free = stat.f_bavail * stat.f_frsize
    text = f"{size(total)} ({size(free)} free)"
    if total < SHM_MIN_BYTES:
        out.warn("/dev/shm", f"{text}: under 1 GiB; NCCL and engine workers run out of shared memory",
                 "run the container with --shm-size=8g (or --ipc=host); on a host: "
                 "mount -o remount,size=8G /dev/shm", total_bytes=total, free_bytes=free)
    else:
        out.ok("/dev/shm", text, total_bytes=total, free_bytes=free)


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def check_ulimits(ctx: CheckContext, out: Results) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    data = {"soft": _limit(soft), "hard": _limit(hard)}
    if soft != resource.RLIM_INFINITY and soft < NOFILE_MIN:
        if hard == resource.RLIM_INFINITY or hard >= NOFILE_MIN:
            fix = f"ulimit -n {NOFILE_MIN} in the shell that starts dynamo (the hard limit allows it)"
        else:
            fix = (f"raise the hard limit: docker run --ulimit nofile={NOFILE_MIN}:{NOFILE_MIN}, or "
                   f"'* hard nofile {NOFILE_MIN}' in /etc/security/limits.conf, then ulimit -n {NOFILE_MIN}")
        out.warn("ulimit nofile", f"open files {_limit(soft)} (hard {_limit(hard)}): under {NOFILE_MIN}; "
                 "many concurrent connections exhaust it", fix, **data)
    else:
        out.ok("ulimit nofile", f"open files {_limit(soft)} (hard {_limit(hard)})", **data)

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    data = {"soft": _limit(soft), "hard": _limit(hard)}
    text = f"locked memory {'unlimited' if soft == resource.RLIM_INFINITY else size(soft)}"
    if soft == resource.RLIM_INFINITY:
        out.ok("ulimit memlock", text, **data)
        return
    fix = "ulimit -l unlimited (docker run --ulimit memlock=-1)"
    state = ctx.profile()
    if state is not None and state.disaggregated and state.uses_gpus:
        out.warn("ulimit memlock", f"{text}: KV transfers between prefill and decode (NIXL/UCX) pin memory "
                 "and need it unlimited", fix, **data)
    else:
        out.info("ulimit memlock", f"{text} (disaggregated serving with NIXL needs unlimited)", fix, **data)


def model_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(ctx: CheckContext, out: Results) -> None:
    run_dir = ctx.home() / "runs"
    where = _existing(run_dir)
    _disk(out, "disk (runs)", run_dir, where, RUN_DIR_MIN_FREE)
    if not where.is_dir():
        out.error("runs writable", f"{where} is a file: dynamo serve cannot create {run_dir}",
                  "set DYNAMO_HOME to a writable directory", path=str(run_dir))
    else:
        try:  # os.access says yes to root everywhere, even in /proc: try it
            os.rmdir(tempfile.mkdtemp(prefix=".dynamo-check-", dir=where))
        except OSError as exc:
            out.error("runs writable", f"cannot create a directory in {where} ({exc.strerror}): dynamo serve "
                      f"cannot create {run_dir}", "set DYNAMO_HOME to a writable directory", path=str(run_dir))
    cache = model_cache_dir()
    _disk(out, "disk (model cache)", cache, _existing(cache), MODEL_CACHE_MIN_FREE)


def _disk(out: Results, name: str, path: Path, where: Path, min_free: int) -> None:
    try:
        usage = shutil.disk_usage(where)
    except OSError as exc:
        out.warn(name, f"{path}: cannot read free space ({exc.strerror})")
        return
    fraction = usage.free / usage.total if usage.total else 0.0
    text = f"{size(usage.free)} free of {size(usage.total)} ({fraction:.0%}) at {path}"
    data = {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total}
    if usage.free < min_free or fraction < DISK_MIN_FREE_FRACTION:
        out.warn(name, f"{text}: under {size(min_free)} or {DISK_MIN_FREE_FRACTION:.0%} free",
                 "free disk space, or point it elsewhere "
                 + ("(DYNAMO_HOME)" if "runs" in name else "(HF_HOME or HF_HUB_CACHE)"), **data)
    else:
        out.ok(name, text, **data)


def detect_container() -> str | None:
    """docker, podman, kubernetes, containerd, lxc ... or None on the host."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "kubernetes"
    if os.path.exists("/run/.containerenv"):
        return "podman"
    if os.path.exists("/.dockerenv"):
        return "docker"
    if os.environ.get("container"):
        return os.environ["container"]
    try:
        cgroup = Path("/proc/1/cgroup").read_text()
    except OSError:
        return None
    for marker in ("kubepods", "docker", "containerd", "lxc", "podman"):
        if marker in cgroup:
            return marker
    return None


def check_user(out: Results, container: str | None) -> None:
    import pwd

    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    text = f"{name} (uid {uid}, gid {os.getgid()})"
    if uid != 0:
        out.ok("user", text, user=name, uid=uid)
    elif container:
        out.info("user", f"{text}: root, as usual inside a container", user=name, uid=uid)
    else:
        out.warn("user", f"{text}: running as root on the host; engine processes get full access",
                 "run dynamo as an unprivileged user (in the video/render groups for GPU access)",
                 user=name, uid=uid)
