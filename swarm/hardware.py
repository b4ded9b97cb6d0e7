"""A short description of the device a server computes on, for its DHT record."""

from __future__ import annotations

import platform

import psutil
import torch

from dht.records import HardwareSummary


def free_memory(device: str) -> int:
    """Bytes the device can still give to blocks and caches."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev.index if dev.index is not None else torch.cuda.current_device())[0]
    return psutil.virtual_memory().available


def describe_device(device: str) -> HardwareSummary:
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return HardwareSummary(
            device_type="cuda", device_name=torch.cuda.get_device_name(index)[:128], memory_total=total, memory_free=free
        )
    memory = psutil.virtual_memory()
    name = platform.processor() or platform.machine() or "cpu"
    return HardwareSummary(
        device_type=dev.type, device_name=name[:128], memory_total=memory.total, memory_free=memory.available
    )
