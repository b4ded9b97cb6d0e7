"""How fast this server runs its blocks, measured once per (model, dtype, device, version) and cached
on disk, so routing has real numbers and restarts do not pay for the measurement again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from blocks.span import BlockSpan
from dht.records import Throughput

logger = logging.getLogger(__name__)

_PREFILL_TOKENS = 64
_DECODE_STEPS = 8


def measure_throughput(span: BlockSpan) -> Throughput:
    """Tokens/s of one-token decode steps (inference) and of a prefill (forward) through the whole span."""
    hidden_size = span.config.hidden_size
    prompt = torch.randn(1, _PREFILL_TOKENS, hidden_size, dtype=span.dtype, device=span.device)
    with tqdm(
        total=2 + _DECODE_STEPS, desc="measuring throughput", unit="step", file=sys.stderr, disable=None, leave=False
    ) as bar:
        span.forward(prompt[:, :4], span.new_cache())  # warm-up: first calls pay for lazy init
        bar.update(1)
        cache = span.new_cache()
        started = time.perf_counter()
        span.forward(prompt, cache)
        _sync(span.device)
        forward = _PREFILL_TOKENS / max(time.perf_counter() - started, 1e-9)
        bar.update(1)
        started = time.perf_counter()
        for _ in range(_DECODE_STEPS):
            span.forward(prompt[:, :1], cache)
            bar.update(1)
        _sync(span.device)
        inference = _DECODE_STEPS / max(time.perf_counter() - started, 1e-9)
    return Throughput(inference=inference, forward=forward)


def cached_throughput(
    span: BlockSpan, model: str, device_name: str, version: str, cache_dir: Path, quant: str = "none"
) -> Throughput:
    """The span's throughput from the per-block timing cached for this model/dtype/quantization/device/
    version, measuring (and caching) it first if needed. Scaled to the span's length."""
    parts = [model, str(span.dtype), str(span.device), device_name, version] + ([quant] if quant != "none" else [])
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]
    path = cache_dir / "throughput" / f"{key}.json"
    blocks = len(span)
    try:
        cached = json.loads(path.read_text())
        per_block = Throughput(inference=cached["inference_per_block"], forward=cached["forward_per_block"])
        logger.info("throughput from cache %s", path)
    except (OSError, ValueError, KeyError, TypeError):
        measured = measure_throughput(span)
        per_block = Throughput(inference=measured.inference * blocks, forward=measured.forward * blocks)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "model": model,
                    "dtype": str(span.dtype),
                    "quant": quant,
                    "device": device_name,
                    "version": version,
                    "inference_per_block": per_block.inference,
                    "forward_per_block": per_block.forward,
                }
            )
        )
        tmp.replace(path)
    return Throughput(inference=per_block.inference / blocks, forward=per_block.forward / blocks)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
