"""What a server runs on: a short summary for its DHT record, and a full system status with exactly
the field names of GPUStack's worker `status` object (seed gpustack-workers-api), for the relay."""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import platform
import time
from typing import Optional

import psutil
import torch
from pydantic import BaseModel

from dht.records import HardwareSummary

logger = logging.getLogger(__name__)


def free_memory(device: str) -> int:
    """Bytes the device can still give to blocks and caches."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev.index if dev.index is not None else torch.cuda.current_device())[0]
    return psutil.virtual_memory().available


def release_memory(device: str) -> None:
    """Returns what dropped tensors held to the system (CPU) or to the device's free pool (CUDA)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def describe_device(device: str) -> HardwareSummary:
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return HardwareSummary(
            device_type="cuda",
            device_name=torch.cuda.get_device_name(index)[:128],
            memory_total=total,
            memory_free=free,
        )
    memory = psutil.virtual_memory()
    name = platform.processor() or platform.machine() or "cpu"
    return HardwareSummary(
        device_type=dev.type, device_name=name[:128], memory_total=memory.total, memory_free=memory.available
    )


class Cpu(BaseModel):
    total: int
    utilization_rate: float


class Memory(BaseModel):
    total: int
    used: int
    allocated: int
    utilization_rate: float
    is_unified_memory: bool


class Swap(BaseModel):
    total: int
    used: int
    utilization_rate: float


class Filesystem(BaseModel):
    name: str
    mount_point: str
    mount_from: str
    total: int
    used: int
    free: int
    available: int


class OperatingSystem(BaseModel):
    name: str
    version: str


class Kernel(BaseModel):
    name: str
    release: str
    version: str
    architecture: str


class Uptime(BaseModel):
    uptime: float
    boot_time: str


class Core(BaseModel):
    total: int
    utilization_rate: float


class GpuDevice(BaseModel):
    name: str
    uuid: str
    vendor: str
    index: int
    core: Core
    memory: Memory
    temperature: Optional[float]
    labels: dict[str, str]
    type: str  # cuda | npu | mps | cpu


class RpcServer(BaseModel):
    pid: int
    port: int
    gpu_index: int


class SystemStatus(BaseModel):
    cpu: Cpu
    memory: Memory
    swap: Swap
    filesystem: list[Filesystem]
    os: OperatingSystem
    kernel: Kernel
    uptime: Uptime
    gpu_devices: list[GpuDevice]
    rpc_servers: dict[str, RpcServer]


def probe_status(device: str = "cpu", port: int = 0) -> SystemStatus:
    """Reads the machine's state now (psutil, NVML where present); `port` is this server's RPC port."""
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    gpus = _gpu_devices()
    dev = torch.device(device)
    gpu_index = dev.index if dev.type == "cuda" and dev.index is not None else 0
    rpc = {str(gpu_index): RpcServer(pid=os.getpid(), port=port, gpu_index=gpu_index)} if dev.type != "cpu" else {}
    return SystemStatus(
        cpu=Cpu(total=psutil.cpu_count() or 1, utilization_rate=psutil.cpu_percent(interval=None)),
        memory=Memory(
            total=memory.total,
            used=memory.total - memory.available,
            allocated=0,
            utilization_rate=memory.percent,
            is_unified_memory=dev.type == "mps",
        ),
        swap=Swap(total=swap.total, used=swap.used, utilization_rate=swap.percent),
        filesystem=_filesystems(),
        os=_operating_system(),
        kernel=Kernel(
            name=platform.system(),
            release=platform.release(),
            version=platform.version(),
            architecture=platform.machine(),
        ),
        uptime=Uptime(
            uptime=time.time() - psutil.boot_time(),
            boot_time=dt.datetime.fromtimestamp(psutil.boot_time(), dt.timezone.utc).isoformat(timespec="milliseconds"),
        ),
        gpu_devices=gpus,
        rpc_servers=rpc,
    )


def _filesystems() -> list[Filesystem]:
    result = []
    for part in psutil.disk_partitions(all=False):
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue
        result.append(
            Filesystem(
                name="",
                mount_point=part.mountpoint,
                mount_from=part.device,
                total=usage.total,
                used=usage.used,
                free=usage.free,
                available=usage.free,
            )
        )
    return result


def _operating_system() -> OperatingSystem:
    try:
        info = platform.freedesktop_os_release()
        return OperatingSystem(name=info.get("NAME", platform.system()), version=info.get("VERSION", ""))
    except OSError:
        return OperatingSystem(name=platform.system(), version=platform.release())


def _gpu_devices() -> list[GpuDevice]:
    devices = _nvml_devices()
    if devices is not None:
        return devices
    if torch.cuda.is_available():
        result = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            props = torch.cuda.get_device_properties(index)
            result.append(
                GpuDevice(
                    name=props.name,
                    uuid=str(getattr(props, "uuid", "")),
                    vendor="NVIDIA",
                    index=index,
                    core=Core(total=props.multi_processor_count, utilization_rate=0.0),
                    memory=Memory(
                        total=total,
                        used=total - free,
                        allocated=torch.cuda.memory_allocated(index),
                        utilization_rate=100.0 * (total - free) / total,
                        is_unified_memory=False,
                    ),
                    temperature=None,
                    labels={},
                    type="cuda",
                )
            )
        return result
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        memory = psutil.virtual_memory()
        return [
            GpuDevice(
                name="Apple GPU",
                uuid="",
                vendor="Apple",
                index=0,
                core=Core(total=0, utilization_rate=0.0),
                memory=Memory(
                    total=memory.total,
                    used=memory.total - memory.available,
                    allocated=0,
                    utilization_rate=memory.percent,
                    is_unified_memory=True,
                ),
                temperature=None,
                labels={},
                type="mps",
            )
        ]
    return []


def _nvml_devices() -> Optional[list[GpuDevice]]:
    """NVIDIA GPUs through NVML (utilization and temperature included), or None where NVML is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        result = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            result.append(
                GpuDevice(
                    name=name.decode() if isinstance(name, bytes) else name,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                    vendor="NVIDIA",
                    index=index,
                    core=Core(
                        total=pynvml.nvmlDeviceGetNumGpuCores(handle)
                        if hasattr(pynvml, "nvmlDeviceGetNumGpuCores")
                        else 0,
                        utilization_rate=float(utilization.gpu),
                    ),
                    memory=Memory(
                        total=memory.total,
                        used=memory.used,
                        allocated=torch.cuda.memory_allocated(index) if torch.cuda.is_available() else 0,
                        utilization_rate=100.0 * memory.used / max(memory.total, 1),
                        is_unified_memory=False,
                    ),
                    temperature=float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
                    labels={},
                    type="cuda",
                )
            )
        return result
    except Exception:
        logger.debug("NVML query failed", exc_info=True)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
