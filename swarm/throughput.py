"""A quick measurement of how fast this server runs its blocks, so routing has real numbers."""

from __future__ import annotations

import time

import torch

from blocks.span import BlockSpan
from dht.records import Throughput

_PREFILL_TOKENS = 64
_DECODE_STEPS = 4


def measure_throughput(span: BlockSpan) -> Throughput:
    """Tokens/s of one-token decode steps (inference) and of a prefill (forward) through the whole span."""
    hidden_size = span.config.hidden_size
    cache = span.new_cache()
    prompt = torch.randn(1, _PREFILL_TOKENS, hidden_size, dtype=span.dtype, device=span.device)
    span.forward(prompt[:, :4], span.new_cache())  # warm-up: first calls pay for lazy init
    started = time.perf_counter()
    span.forward(prompt, cache)
    _sync(span.device)
    forward = _PREFILL_TOKENS / max(time.perf_counter() - started, 1e-9)
    started = time.perf_counter()
    for _ in range(_DECODE_STEPS):
        span.forward(prompt[:, :1], cache)
    _sync(span.device)
    inference = _DECODE_STEPS / max(time.perf_counter() - started, 1e-9)
    return Throughput(inference=inference, forward=forward)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
