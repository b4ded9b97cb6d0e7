"""Spot checks: a sample of every span's outputs is recomputed elsewhere and compared.

Servers are strangers: one with a broken GPU, a cheaper model or a lower precision returns plausible
hidden states that nothing else would notice. After a sampled step (and always after a span's first
step), the client sends the span's inputs since its last check to other servers of the same blocks,
which keep a session of their own for that span (`client.check_chain`: each position is sent once),
or runs them itself when it can hold those blocks, and compares the span's outputs since its last
check with the recomputation, position by position.

A disagreement is settled by a referee: the client itself when its checkpoint holds the blocks and
its memory allows (in float32), otherwise a third chain that avoids both servers. Whoever disagrees
with the referee is proven wrong. A session whose server is proven wrong rolls back to the last
position verified for that server.

The comparison is the largest relative L2 error over positions, with a tolerance for the less
precise of the two dtypes, measured on honest servers (see `verification.tolerance`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from blocks.checkpoint import dtype_name
from client.errors import SwarmError
from protocol.tensors import tensor_digest
from verification.evidence import Claim, Evidence, Recomputation
from verification.referee import LocalReferee
from verification.tolerance import discrepancy, tolerance

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """`wrong`: peers proven wrong (with evidence); `verified`: the claim held (up to its end)."""

    verified: bool
    wrong: tuple[Evidence, ...] = ()


Recompute = Callable[[Claim, frozenset[str]], Awaitable[Optional[Recomputation]]]


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
        tol = tolerance(claim.dtype, first.dtype, claim.end - claim.start, claim.quant)
        window = slice(claim.verified, claim.outputs.shape[1])
        claimed = claim.outputs[:, window]
        mask = claim.mask[:, window] if claim.mask is not None else None
        if discrepancy(claimed, first.window(claim), mask) <= tol:
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
        claimed_error = discrepancy(claimed, referee.window(claim), mask)
        verifier_error = discrepancy(first.window(claim), referee.window(claim), mask)
        claimed_tol = tolerance(claim.dtype, referee.dtype, claim.end - claim.start, claim.quant)
        verifier_tol = tolerance(first.dtype, referee.dtype, claim.end - claim.start, claim.quant)
        common = dict(
            start_block=claim.start,
            end_block=claim.end,
            positions=(claim.verified, claim.outputs.shape[1]),
            input_digest=tensor_digest(claim.inputs),
            claimed_digest=tensor_digest(claimed),
            verifier_id=first.by,
            verifier_digest=tensor_digest(first.window(claim)),
            referee=referee.by,
            referee_digest=tensor_digest(referee.window(claim)),
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
                    quant=claim.quant,
                    adapter=claim.adapter,
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
                    quant=first.quant,
                    adapter=claim.adapter,
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
            if result is not None and result.quant != claim.quant:  # weights quantized otherwise judge nothing
                logger.warning(
                    "a recomputation of span %d:%d came back quantized as %s, not %s; ignored",
                    claim.start,
                    claim.end,
                    result.quant,
                    claim.quant,
                )
                continue
            if result is not None:
                return result
        return None
