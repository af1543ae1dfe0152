"""GPU inventory: what NVML reports, or an assumed inventory for planning elsewhere.

The assumed inventory is the documented seam that lets a CPU-only machine plan (and
tests cover) GPU assignment for a GPU machine: ``--assume-gpus 8`` or
``DYNAMO_ASSUME_GPUS=8``.
"""

from __future__ import annotations

import os
from dynamo.core.text import quantity
from dataclasses import dataclass, field

ASSUME_ENV = "DYNAMO_ASSUME_GPUS"


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total_mb: int = 0
    memory_used_mb: int = 0


@dataclass(frozen=True)
class GpuInventory:
    gpus: tuple[Gpu, ...] = ()
    source: str = "nvml"  # nvml | assumed | none
    detail: str = ""
    driver_version: str | None = None
    cuda_version: str | None = None
    processes: tuple[dict, ...] = field(default=())

    @property
    def count(self) -> int:
        return len(self.gpus)

    @property
    def ids(self) -> list[int]:
        return [gpu.index for gpu in self.gpus]


def assumed_inventory(count: int) -> GpuInventory:
    return GpuInventory(
        gpus=tuple(Gpu(i, "assumed GPU") for i in range(count)),
        source="assumed",
        detail=f"assumed {quantity(count, 'GPU')} (--assume-gpus / {ASSUME_ENV})",
    )


def nvml_inventory() -> GpuInventory:
    """Ask NVML; on a machine without an NVIDIA driver return an empty inventory saying why."""
    try:
        import pynvml
    except ImportError:
        return GpuInventory(source="none", detail="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return GpuInventory(source="none", detail=f"no NVIDIA driver ({exc})")
    try:
        gpus = []
        processes: list[dict] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(Gpu(index, name if isinstance(name, str) else name.decode(),
                            memory.total // 2**20, memory.used // 2**20))
            try:
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    processes.append({"gpu": index, "pid": proc.pid,
                                      "used_mb": (proc.usedGpuMemory or 0) // 2**20})
            except Exception:
                pass
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        return GpuInventory(
            gpus=tuple(gpus), source="nvml", detail=f"{quantity(len(gpus), 'GPU')} from NVML",
            driver_version=driver if isinstance(driver, str) else driver.decode(),
            cuda_version=f"{cuda // 1000}.{cuda % 1000 // 10}", processes=tuple(processes),
        )
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def detect_inventory(assume: int | None = None) -> GpuInventory:
    """The inventory to plan with: ``assume`` or $DYNAMO_ASSUME_GPUS first, then NVML."""
    if assume is None and os.environ.get(ASSUME_ENV, "").strip():
        try:
            assume = int(os.environ[ASSUME_ENV])
        except ValueError:
            from dynamo.core.errors import UsageError

            raise UsageError(f"{ASSUME_ENV}={os.environ[ASSUME_ENV]!r}: expected a number of GPUs") from None
    if assume is not None:
        return assumed_inventory(assume)
    return nvml_inventory()
