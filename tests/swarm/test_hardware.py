"""The system probe speaks GPUStack's `status` field names exactly, with real readings of this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import torch

from swarm.hardware import GpuDevice, SystemStatus, describe_device, probe_status

EXAMPLE = json.loads((Path(__file__).parent / "data" / "gpustack_status_example.json").read_text())


def shape(value):
    """Field names, recursively (first element of lists; values of keyed maps)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None


def test_field_names_match_the_gpustack_seed():
    status = probe_status("cpu").model_dump()
    expected = shape(EXAMPLE)
    assert set(status) == set(expected)
    for key in ("cpu", "memory", "swap", "os", "kernel", "uptime"):
        assert shape(status[key]) == expected[key], key
    assert shape(status["filesystem"])[0] == expected["filesystem"][0]
    gpu = GpuDevice.model_validate(EXAMPLE["gpu_devices"][0]).model_dump()
    assert shape(gpu) == expected["gpu_devices"][0]
    SystemStatus.model_validate(EXAMPLE)  # the seed's own example parses as our model


def test_readings_are_this_machines():
    status = probe_status("cpu")
    assert status.cpu.total == psutil.cpu_count()
    assert status.memory.total == psutil.virtual_memory().total
    assert 0 < status.memory.used <= status.memory.total
    assert any(fs.mount_point == "/" for fs in status.filesystem)
    assert status.kernel.name == "Linux" and status.kernel.release == os.uname().release
    assert status.uptime.uptime > 0 and status.uptime.boot_time.endswith("+00:00")
    if not torch.cuda.is_available():
        assert status.gpu_devices == [] and status.rpc_servers == {}  # nothing to report on a CPU-only machine
    summary = describe_device("cpu")
    assert summary.device_type == "cpu" and summary.memory_total == status.memory.total
