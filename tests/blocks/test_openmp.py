"""`serial_torch`: a thread that calls it runs torch without an OpenMP team of its own, so that one
thread's team is the only one of a process (GNU OpenMP stops spinning when teams outnumber the CPUs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import os, threading
import torch
from blocks.openmp import serial_torch

torch.set_num_threads(2)

def threads():
    return len(os.listdir("/proc/self/task"))

def fill(serial, out):
    if serial:
        serial_torch()
    before = threads()
    torch.zeros(1 << 22).fill_(1.0)  # large enough for torch to run it in parallel
    out.append(threads() - before)

for serial in (False, True):
    out = []
    thread = threading.Thread(target=fill, args=(serial, out))
    thread.start()
    thread.join()
    print(out[0])
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads in /proc (Linux)")
def test_a_thread_that_calls_serial_torch_starts_no_openmp_team():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, cwd=root, check=True
    )
    without, with_serial = (int(line) for line in result.stdout.split())
    assert without >= 1  # torch's parallel fill started a team: its worker threads are new
    assert with_serial == 0
