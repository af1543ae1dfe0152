"""The GPU section's rendering of an NVML inventory, fed through the inventory seam (no GPU here)."""

from __future__ import annotations

import os

from dynamo.core.check import gpus
from dynamo.core.check.context import CheckContext, CheckOptions
from dynamo.core.check.model import Results
from dynamo.core.gpus import Gpu, GpuInventory
from tests.check.conftest import SLEEP


def _run(inventory: GpuInventory, tmp_path, profile: str | None = None) -> dict[str, list]:
    ctx = CheckContext(CheckOptions(profile=profile, home=tmp_path))
    ctx._nvml = inventory  # what NVML would have answered
    out = Results("gpus")
    gpus.run(ctx, out)
    found: dict[str, list] = {}
    for result in out.snapshot():
        found.setdefault(result.name, []).append(result)
    return found


def test_gpus_driver_memory_and_a_stale_engine_holding_gpu_memory(orphans, engine_named_vllm, tmp_path):
    stale_pid = orphans(engine_named_vllm, [engine_named_vllm, *SLEEP])
    inventory = GpuInventory(
        gpus=(Gpu(0, "NVIDIA H100 80GB HBM3", 81559, 75000), Gpu(1, "NVIDIA H100 80GB HBM3", 81559, 500)),
        source="nvml", detail="2 GPUs from NVML", driver_version="570.124.06", cuda_version="12.8",
        processes=({"gpu": 0, "pid": stale_pid, "used_mb": 74000}, {"gpu": 1, "pid": os.getpid(), "used_mb": 400}),
    )
    found = _run(inventory, tmp_path)
    assert found["gpus"][0].status == "ok" and found["gpus"][0].message == "2 GPUs: 2 × NVIDIA H100 80GB HBM3"
    assert "driver 570.124.06, CUDA 12.8" in found["driver"][0].message
    busy, idle = found["gpu 0 memory"][0], found["gpu 1 memory"][0]
    assert busy.status == "warn" and "over 90%" in busy.message and str(stale_pid) in busy.message
    assert idle.status == "ok"
    stale = [r for r in found["stale process"] if r.data["pid"] == stale_pid]
    assert len(stale) == 1 and stale[0].status == "error"  # it holds GPU memory: an error, not a warning
    assert "holds 74000 MiB on GPU 0" in stale[0].message
    assert stale[0].fix.startswith(f"kill {stale_pid}")
    # a process holding GPU memory that is not stale is listed for information
    [mine] = [r for r in found["gpu process"] if r.data["pid"] == os.getpid()]
    assert mine.status == "info" and "holds 400 MiB" in mine.message


def test_no_gpu_is_an_error_only_when_the_profile_needs_gpus(tmp_path):
    none = GpuInventory(source="none", detail="no NVIDIA driver (NVML Shared Library Not Found)")
    assert _run(none, tmp_path)["nvidia"][0].status == "info"
    profile = tmp_path / "g.yaml"
    profile.write_text("name: g\nmodel: {name: m}\nbackend: vllm\nworkers:\n  w: {replicas: 1, gpus: 2}\n")
    [line] = _run(none, tmp_path, str(profile))["nvidia"]
    assert line.status == "error" and "the profile needs 2" in line.message
    mocker = tmp_path / "m.yaml"
    mocker.write_text("name: m\nmodel: {name: m}\nbackend: mocker\nworkers:\n  w: {replicas: 1}\n")
    assert _run(none, tmp_path, str(mocker))["nvidia"][0].status == "info"
