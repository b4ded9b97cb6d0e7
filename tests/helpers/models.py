"""The single-process transformers model a swarm's output is compared with, and waiting for a route."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def reference_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def wait_for_route(model, *peers: str, timeout: float = 120) -> None:
    """Waits (bounded) until routing starts every chain with `peers`: on a loaded machine a server
    that has just started may miss its first ping and be routed around for a few seconds."""
    remote = model.remote
    deadline = time.monotonic() + timeout
    while [plan.peer_id for plan in remote.runtime.run(remote.make_chain(), 60)][: len(peers)] != list(peers):
        assert time.monotonic() < deadline, f"routing never chose {peers} in {timeout:.0f} s"
        time.sleep(1)


# Packing rows into one matrix product may change the last bits of a float sum; nothing more.
ATOL = 1e-5
