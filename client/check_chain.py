"""A spot check that keeps its KV: inference sessions on other servers that recompute one span's claims,
each position sent once.

A stateless check resends the span's whole history every time: over an n-token session that is
O(rate · n²) traffic and compute on the checking servers. A check chain holds the history's KV on its
servers, as the checked span does on its own, and is sent only the positions added since the last
check (after a rewind of the span, only those after the position it was rewound to).
"""

from __future__ import annotations

from typing import Awaitable, Callable, Optional

import torch

from client.span import SpanSession
from verification.evidence import Claim

Step = Callable[[SpanSession, torch.Tensor, Optional[torch.Tensor]], Awaitable[torch.Tensor]]


class CheckChain:
    """Sessions on the servers of one chain that recompute the claims of one span (`Claim.session_id`):
    its inputs go through `spans` in order and the last span's outputs are the recomputation."""

    def __init__(self, spans: list[SpanSession]):
        self.spans = spans
        self.peers = frozenset(span.plan.peer_id for span in spans)
        self.position = 0  # positions the chain's servers hold
        self.sent = 0  # positions sent in all (after rewinds some are sent again): the check's traffic
        self._rewinds_seen = 0  # of the span's rewinds (`Claim.rewinds`), those this chain has followed
        self._outputs: list[tuple[int, torch.Tensor]] = []  # (first position, the chain's outputs from there)

    async def advance(self, claim: Claim, step: Step, chunk: int) -> tuple[int, torch.Tensor]:
        """Sends the claim's positions that the chain does not hold yet, in chunks of `chunk` tokens
        (`step(span, hidden, new_mask)` runs one through one span); returns (p, the chain's outputs at
        positions [p, end)) with p ≤ `claim.verified`. Raises what a step raises: the chain is then
        unusable, some of its servers having advanced and others not."""
        total = claim.inputs.shape[1]
        agreed = min([self.position, total, *claim.rewinds[self._rewinds_seen :]])
        if agreed < self.position:
            for span in self.spans:
                span.rewind(agreed)
            self._outputs = [(first, out[:, : agreed - first]) for first, out in self._outputs if first < agreed]
            self.position = agreed
        for offset in range(agreed, total, chunk):
            part = claim.inputs[:, offset : offset + chunk]
            mask = claim.mask[:, offset : offset + part.shape[1]] if claim.mask is not None else None
            self.sent += part.shape[1]
            for span in self.spans:
                part = await step(span, part, mask)
            self._outputs.append((offset, part))
            self.position = offset + part.shape[1]
        self._rewinds_seen = len(claim.rewinds)
        # Outputs before the claim's verified position are never compared again: a later claim's starts
        # there or later, unless the span is rewound before it, and then this chain is rewound too.
        self._outputs = [(first, out) for first, out in self._outputs if first + out.shape[1] > claim.verified]
        if not self._outputs:
            return total, claim.inputs[:, total:]
        return self._outputs[0][0], torch.cat([out for _, out in self._outputs], dim=1)

    async def close(self) -> None:
        for span in self.spans:
            await span.close()
