"""The local referee: a span recomputed on this machine, in float32, from a local copy of the checkpoint
(with its weights quantized as the claim's server quantizes them, if it does).

The client uses it to settle disputes (and as the verifier of last resort), the relay to re-check
evidence and canaries.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable, Optional

import psutil
import torch

from blocks.adapters import LoraAdapter
from blocks.checkpoint import Checkpoint
from blocks.layers import DecoderLayer, KVCache, Rotary
from blocks.loading import load_span
from blocks.span import BlockSpan
from verification.evidence import Claim, Recomputation


@dataclass
class _Progress:
    """What the local referee computed for one session's span: its inputs, outputs and cache."""

    inputs: torch.Tensor
    mask: Optional[torch.Tensor]
    outputs: torch.Tensor
    cache: KVCache


class LocalReferee:
    """Recomputes a span on this machine, in float32, from the client's own checkpoint, when its
    blocks fit in the memory available (with room to spare); None otherwise.

    Blocks it has loaded stay loaded (checks of one session come back to the same blocks), unless
    blocks of another range need their room. For the last `keep_sessions` sessions' spans (within
    `keep_bytes`) it also keeps its own KV cache, so that a later check of the same span computes
    only the positions added since (the inputs it computed on must be a prefix of the new claim's,
    or it starts over): the cost of a check no longer grows with the session's history."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        executor: Executor,
        memory_fraction: float = 0.5,
        keep_sessions: int = 64,
        keep_bytes: int = 1 << 30,
        adapters: Callable[[str, int, int], Optional[LoraAdapter]] = lambda name, start, end: None,
    ):
        self.checkpoint = checkpoint
        self.executor = executor
        self.memory_fraction = memory_fraction
        self.keep_sessions = keep_sessions
        self.keep_bytes = keep_bytes  # what the kept sessions' caches, inputs and outputs may take in all
        self.adapters = adapters  # a LoRA adapter's tensors for blocks [start, end), when this machine has it
        self._blocks: dict[tuple[int, str], DecoderLayer] = {}  # (block, quantization) -> layer
        self._rotary: Optional[Rotary] = None
        self._progress: collections.OrderedDict[tuple[str, int, int, str, str], _Progress] = collections.OrderedDict()
        self._lock = threading.Lock()

    async def __call__(self, claim: Claim, avoid: frozenset[str]) -> Optional[Recomputation]:
        outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self._compute, claim)
        if outputs is None:
            return None
        return Recomputation("client", frozenset(), outputs, torch.float32, quant=claim.quant)

    def _compute(self, claim: Claim) -> Optional[torch.Tensor]:
        with self._lock:
            span = self._span(claim.start, claim.end, claim.quant)
            adapter = self.adapters(claim.adapter, claim.start, claim.end) if claim.adapter else None
            if span is None or (claim.adapter and adapter is None):
                return None
            key = (claim.session_id, claim.start, claim.end, claim.quant, claim.adapter)
            done = self._progress.pop(key, None)
            inputs = claim.inputs.float()
            if done is None or not (_extends(inputs, done.inputs) and _extends(claim.mask, done.mask)):
                empty = inputs[:, :0]
                done = _Progress(empty, None if claim.mask is None else claim.mask[:, :0], empty, span.new_cache())
            if done.inputs.shape[1] < inputs.shape[1]:
                added = span.forward(
                    inputs[:, done.inputs.shape[1] :], cache=done.cache, attention_mask=claim.mask, adapter=adapter
                )
                done = _Progress(inputs, claim.mask, torch.cat([done.outputs, added], dim=1), done.cache)
            if claim.session_id and self.keep_sessions > 0:
                self._progress[key] = done
                while len(self._progress) > self.keep_sessions or (
                    len(self._progress) > 1 and sum(map(_bytes, self._progress.values())) > self.keep_bytes
                ):
                    self._progress.popitem(last=False)
            return done.outputs

    def _span(self, start: int, end: int, quant: str) -> Optional[BlockSpan]:
        """Blocks [start, end) in float32 (quantized as `quant`), loading those not held yet if they fit
        (after letting go of held blocks outside the range, if that is what it takes)."""
        wanted = [(index, quant) for index in range(start, end)]
        missing = [key for key in wanted if key not in self._blocks]
        needed = sum(self.checkpoint.block_bytes(index, torch.float32, quant) for index, _ in missing)
        if needed > psutil.virtual_memory().available * self.memory_fraction:
            for key in [key for key in self._blocks if key not in wanted]:
                del self._blocks[key]
            gc.collect()
            if needed > psutil.virtual_memory().available * self.memory_fraction:
                return None
        for index, _ in missing:
            loaded = load_span(self.checkpoint, index, index + 1, torch.float32, quant=quant)
            self._blocks[index, quant] = loaded.layers[0]
            self._rotary = self._rotary or loaded.rotary
        return BlockSpan(self.checkpoint.config, [self._blocks[key] for key in wanted], self._rotary, start, quant)


def _bytes(progress: _Progress) -> int:
    tensors = [progress.inputs, progress.outputs, *progress.cache.keys, *progress.cache.values]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _extends(tensor: Optional[torch.Tensor], prefix: Optional[torch.Tensor]) -> bool:
    """Whether `tensor` [batch, positions, ...] begins with `prefix` exactly (None only extends None)."""
    if tensor is None or prefix is None:
        return tensor is None and prefix is None
    return (
        tensor.shape[0] == prefix.shape[0]
        and tensor.shape[1] >= prefix.shape[1]
        and torch.equal(tensor[:, : prefix.shape[1]], prefix)
    )
