"""`serial_torch`: a thread that calls it runs torch without an OpenMP team of its own, so that one
thread's team is the only one of a process (GNU OpenMP stops spinning when teams outnumber the CPUs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import os, sys, threading
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

out = []
thread = threading.Thread(target=fill, args=(sys.argv[1] == "serial", out))
thread.start()
thread.join()
print(out[0])
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads in /proc (Linux)")
def test_a_thread_that_calls_serial_torch_starts_no_openmp_team():
    """Each case in a process of its own: a thread's team outlives the thread for a while, and its
    threads leaving would be counted against the next case."""
    root = Path(__file__).resolve().parents[2]
    without, with_serial = (
        int(
            subprocess.run(
                [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, cwd=root, check=True
            ).stdout
        )
        for mode in ("parallel", "serial")
    )
    assert without >= 1  # torch's parallel fill started a team: its worker threads are new
    assert with_serial == 0
