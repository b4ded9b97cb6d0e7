"""Spot checks: a sample of every span's outputs is recomputed elsewhere and compared.

Servers are strangers: one with a broken GPU, a cheaper model or a lower precision returns plausible
hidden states that nothing else would notice. After a sampled step (and always after a span's first
step), the client sends the span's whole input history, as one stateless prefill, to other servers
of the same blocks (or runs it itself when it can hold those blocks) and compares the span's outputs
since its last check with the recomputation, position by position.

A disagreement is settled by a referee: the client itself when its checkpoint holds the blocks and
its memory allows (in float32), otherwise a third chain that avoids both servers. Whoever disagrees
with the referee is proven wrong. A session whose server is proven wrong rolls back to the last
position verified for that server.

The comparison is the largest relative L2 error over positions, with a tolerance for the less
precise of the two dtypes, measured on honest servers (see `TOLERANCE`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gc
import logging
import math
import random
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional, Sequence

import psutil
import safetensors.torch
import torch

from blocks.checkpoint import Checkpoint, dtype_name
from blocks.layers import DecoderLayer, KVCache, Rotary
from blocks.loading import load_span
from blocks.span import BlockSpan
from client.errors import SwarmError
from protocol.receipts import Receipt, verify
from protocol.tensors import tensor_digest

logger = logging.getLogger(__name__)

# Largest relative L2 error per position that honest servers of this dtype reach against a float32
# recomputation, with margin. Measured (`tests/test_verify.py` keeps the random-model figures honest):
# float32 KV-cached vs stateless ≤ 3.2e-6; float16 ≤ 7.4e-3 and bfloat16 ≤ 5.1e-2 over spans of
# 1–30 blocks of SmolLM2-135M and a random Llama. A float32 server computing with bfloat16 or float16
# weights or activations is 9e-4 or more away.
TOLERANCE = {torch.float32: 3e-4, torch.float16: 3e-2, torch.bfloat16: 0.15}
MEASURED_BLOCKS = 30  # deeper spans than measured get a tolerance growing with sqrt(depth)


def least_precise(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype of the largest tolerance (one not in the table counts as bfloat16)."""
    return max(dtypes, key=lambda dtype: TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16]))


def tolerance(first: torch.dtype, second: torch.dtype, blocks: int) -> float:
    base = TOLERANCE.get(least_precise([first, second]), TOLERANCE[torch.bfloat16])
    return base * math.sqrt(max(1.0, blocks / MEASURED_BLOCKS))


def discrepancy(claimed: torch.Tensor, reference: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """Largest relative L2 error over positions [batch, tokens, hidden]; padding (mask 0) is ignored."""
    claimed, reference = claimed.float(), reference.float()
    errors = (claimed - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-6)
    if mask is not None:
        errors = errors[mask.bool()]
    return float(errors.max()) if errors.numel() else 0.0


@dataclass
class Evidence:
    """What proves a server wrong: the disputed span and positions, digests of its input and of each
    party's output, who refereed, the accused's error against the referee (`claimed_error`, over
    `tolerance`) and the other party's (`verifier_error`). With the server's signed
    receipts and the tensors themselves (`inputs` at every position so far, its `outputs` at the
    disputed ones), a third party can re-check it (`evidence_body`, `check_receipts`)."""

    peer_id: str
    start_block: int
    end_block: int
    positions: tuple[int, int]
    input_digest: str
    claimed_digest: str
    verifier_id: str
    verifier_digest: str
    referee: str
    referee_digest: str
    claimed_error: float
    verifier_error: float
    tolerance: float
    model: str = ""
    session_id: str = ""
    dtype: str = "float32"
    receipts: tuple[Receipt, ...] = ()
    inputs: Optional[torch.Tensor] = field(default=None, repr=False)
    outputs: Optional[torch.Tensor] = field(default=None, repr=False)
    mask: Optional[torch.Tensor] = field(default=None, repr=False)
    at: float = field(default_factory=time.time)


def evidence_body(evidence: Evidence) -> dict:
    """The JSON body of `POST /api/v1/evidence` on a relay: receipts, and the tensors as base64 safetensors."""
    tensors = {"inputs": evidence.inputs.float().contiguous(), "outputs": evidence.outputs.contiguous()}
    if evidence.mask is not None:
        tensors["mask"] = evidence.mask.to(torch.int64).contiguous()
    return {
        "model": evidence.model,
        "peer_id": evidence.peer_id,
        "start_block": evidence.start_block,
        "end_block": evidence.end_block,
        "dtype": evidence.dtype,
        "session_id": evidence.session_id,
        "verified": evidence.positions[0],
        "receipts": [
            {
                "position": r.position,
                "tokens": r.tokens,
                "input_digest": r.input_digest,
                "output_digest": r.output_digest,
                "signature": r.signature,
            }
            for r in evidence.receipts
        ],
        "tensors": base64.b64encode(safetensors.torch.save(tensors)).decode(),
    }


def check_receipts(
    receipt_key: str,
    model: str,
    start: int,
    end: int,
    session_id: str,
    dtype: torch.dtype,
    receipts: Sequence[Receipt],
    inputs: torch.Tensor,
    outputs: torch.Tensor,
    verified: int,
) -> Optional[str]:
    """Why signed receipts do not prove that the server computed `outputs` (its outputs at positions
    [verified, end of inputs)) from exactly `inputs` (every position of the session from 0), or None
    if they do: one receipt per step, contiguous from position 0, each signed by `receipt_key`, the
    input digests over `inputs` in the server's dtype and the output digests over `outputs`."""
    total = inputs.shape[1]
    if outputs.shape[1] != total - verified:
        return f"outputs cover {outputs.shape[1]} positions, not the {total - verified} from {verified} to {total}"
    position = 0
    for receipt in sorted(receipts, key=lambda r: r.position):
        if receipt.position != position or receipt.tokens <= 0 or position + receipt.tokens > total:
            return f"receipts are not one contiguous run of steps from position 0 to {total} (at {position})"
        if position < verified < position + receipt.tokens:
            return f"position {verified} is not where a step starts"
        if not verify(receipt_key, receipt.message(model, start, end, session_id), receipt.signature):
            return f"the receipt of positions {position}:{position + receipt.tokens} is not signed by the server"
        if tensor_digest(inputs[:, position : position + receipt.tokens].to(dtype)) != receipt.input_digest:
            return f"inputs at positions {position}:{position + receipt.tokens} are not what the server signed"
        if (
            position >= verified
            and tensor_digest(outputs[:, position - verified : position - verified + receipt.tokens])
            != receipt.output_digest
        ):
            return f"outputs at positions {position}:{position + receipt.tokens} are not what the server signed"
        position += receipt.tokens
    if position != total:
        return f"receipts cover positions 0:{position}, the inputs 0:{total}"
    return None


@dataclass(frozen=True)
class Claim:
    """One span's outputs to check: positions [verified, end) of `outputs`, computed by `peer_id` in `dtype`
    from `inputs` (every position so far, [batch, end, hidden])."""

    peer_id: str
    start: int
    end: int
    dtype: torch.dtype
    inputs: torch.Tensor
    outputs: torch.Tensor
    mask: Optional[torch.Tensor]
    verified: int
    model: str = ""
    session_id: str = ""
    receipts: tuple[Receipt, ...] = ()
    owner: str = ""  # the server's announced public_name: checks prefer servers of other owners


@dataclass(frozen=True)
class Recomputation:
    """A recomputation of a claim's outputs: by whom (peer ids, or "client"), in which dtype."""

    by: str
    peers: frozenset[str]
    outputs: torch.Tensor
    dtype: torch.dtype


@dataclass(frozen=True)
class Verdict:
    """`wrong`: peers proven wrong (with evidence); `verified`: the claim held (up to its end)."""

    verified: bool
    wrong: tuple[Evidence, ...] = ()


Recompute = Callable[[Claim, frozenset[str]], Awaitable[Optional[Recomputation]]]


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
    ):
        self.checkpoint = checkpoint
        self.executor = executor
        self.memory_fraction = memory_fraction
        self.keep_sessions = keep_sessions
        self.keep_bytes = keep_bytes  # what the kept sessions' caches, inputs and outputs may take in all
        self._blocks: dict[int, DecoderLayer] = {}
        self._rotary: Optional[Rotary] = None
        self._progress: collections.OrderedDict[tuple[str, int, int], _Progress] = collections.OrderedDict()
        self._lock = threading.Lock()

    async def __call__(self, claim: Claim, avoid: frozenset[str]) -> Optional[Recomputation]:
        outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self._compute, claim)
        if outputs is None:
            return None
        return Recomputation("client", frozenset(), outputs, torch.float32)

    def _compute(self, claim: Claim) -> Optional[torch.Tensor]:
        with self._lock:
            span = self._span(claim.start, claim.end)
            if span is None:
                return None
            key = (claim.session_id, claim.start, claim.end)
            done = self._progress.pop(key, None)
            inputs = claim.inputs.float()
            if done is None or not (_extends(inputs, done.inputs) and _extends(claim.mask, done.mask)):
                empty = inputs[:, :0]
                done = _Progress(empty, None if claim.mask is None else claim.mask[:, :0], empty, span.new_cache())
            if done.inputs.shape[1] < inputs.shape[1]:
                added = span.forward(inputs[:, done.inputs.shape[1] :], cache=done.cache, attention_mask=claim.mask)
                done = _Progress(inputs, claim.mask, torch.cat([done.outputs, added], dim=1), done.cache)
            if claim.session_id and self.keep_sessions > 0:
                self._progress[key] = done
                while len(self._progress) > self.keep_sessions or (
                    len(self._progress) > 1 and sum(map(_bytes, self._progress.values())) > self.keep_bytes
                ):
                    self._progress.popitem(last=False)
            return done.outputs

    def _span(self, start: int, end: int) -> Optional[BlockSpan]:
        """Blocks [start, end) in float32, loading those not held yet if they fit (after letting go of
        held blocks outside the range, if that is what it takes)."""
        missing = [index for index in range(start, end) if index not in self._blocks]
        needed = sum(self.checkpoint.block_bytes(index, torch.float32) for index in missing)
        if needed > psutil.virtual_memory().available * self.memory_fraction:
            for index in [index for index in self._blocks if not start <= index < end]:
                del self._blocks[index]
            gc.collect()
            if needed > psutil.virtual_memory().available * self.memory_fraction:
                return None
        for index in missing:
            loaded = load_span(self.checkpoint, index, index + 1, torch.float32)
            self._blocks[index] = loaded.layers[0]
            self._rotary = self._rotary or loaded.rotary
        return BlockSpan(
            self.checkpoint.config, [self._blocks[index] for index in range(start, end)], self._rotary, start
        )


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


class SpotChecker:
    """Decides which steps to check and settles what a check finds.

    `recompute(claim, avoid)` asks servers (none of `avoid`) for a recomputation; `referee` is the
    local one, or None. A claim that cannot be recomputed (no other server, no room here) stays
    unverified: the check is skipped, not failed."""

    def __init__(
        self, rate: float, recompute: Recompute, referee: Optional[LocalReferee], rng: Optional[random.Random] = None
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"verify rate must be within [0, 1], got {rate}")
        self.rate = rate
        self.recompute = recompute
        self.referee = referee
        self.rng = rng or random.Random()
        self.checks = 0
        self.disputes = 0

    def sample(self) -> bool:
        return self.rate > 0 and self.rng.random() < self.rate

    async def check(self, claim: Claim) -> Verdict:
        self.checks += 1
        first = await self._recompute(claim, frozenset({claim.peer_id}))
        if first is None:
            return Verdict(verified=False)
        tol = tolerance(claim.dtype, first.dtype, claim.end - claim.start)
        window = slice(claim.verified, claim.outputs.shape[1])
        claimed = claim.outputs[:, window]
        mask = claim.mask[:, window] if claim.mask is not None else None
        if discrepancy(claimed, first.outputs[:, window], mask) <= tol:
            return Verdict(verified=True)

        self.disputes += 1
        avoid = frozenset({claim.peer_id}) | first.peers
        referee = await self._recompute(claim, avoid, local=first.by != "client", prefer_local=True)
        if referee is None:
            logger.warning(
                "span %d:%d of %s disagrees with %s and no referee is available; not judged",
                claim.start,
                claim.end,
                claim.peer_id,
                first.by,
            )
            return Verdict(verified=False)
        claimed_error = discrepancy(claimed, referee.outputs[:, window], mask)
        verifier_error = discrepancy(first.outputs[:, window], referee.outputs[:, window], mask)
        claimed_tol = tolerance(claim.dtype, referee.dtype, claim.end - claim.start)
        verifier_tol = tolerance(first.dtype, referee.dtype, claim.end - claim.start)
        common = dict(
            start_block=claim.start,
            end_block=claim.end,
            positions=(claim.verified, claim.outputs.shape[1]),
            input_digest=tensor_digest(claim.inputs),
            claimed_digest=tensor_digest(claimed),
            verifier_id=first.by,
            verifier_digest=tensor_digest(first.outputs[:, window]),
            referee=referee.by,
            referee_digest=tensor_digest(referee.outputs[:, window]),
        )
        wrong = []
        if claimed_error > claimed_tol:
            wrong.append(
                Evidence(
                    peer_id=claim.peer_id,
                    claimed_error=claimed_error,
                    verifier_error=verifier_error,
                    tolerance=claimed_tol,
                    model=claim.model,
                    session_id=claim.session_id,
                    dtype=dtype_name(claim.dtype),
                    receipts=claim.receipts,
                    inputs=claim.inputs,
                    outputs=claimed,
                    mask=claim.mask,
                    **common,
                )
            )
        if verifier_error > verifier_tol:  # the verifier's own answer is wrong (no receipts: a stateless forward)
            wrong += [
                Evidence(
                    peer_id=peer,
                    claimed_error=verifier_error,
                    verifier_error=claimed_error,
                    tolerance=verifier_tol,
                    dtype=dtype_name(first.dtype),
                    **common,
                )
                for peer in sorted(first.peers)
            ]
        return Verdict(verified=claimed_error <= claimed_tol, wrong=tuple(wrong))

    async def _recompute(
        self, claim: Claim, avoid: frozenset[str], local: bool = True, prefer_local: bool = False
    ) -> Optional[Recomputation]:
        """From servers avoiding `avoid`, or from the local referee (if `local`: first if
        `prefer_local`, else as the fallback when no other server can do it)."""
        sources: list[Recompute] = [self.recompute]
        if self.referee is not None and local:
            sources.insert(0 if prefer_local else 1, self.referee)
        for source in sources:
            try:
                result = await source(claim, avoid)
            except (SwarmError, MemoryError) as e:  # a failing verifier is not evidence against the claim
                logger.info("recomputing span %d:%d failed: %s: %s", claim.start, claim.end, type(e).__name__, e)
                continue
            if result is not None:
                return result
        return None
