"""A stateless forward through the whole chain (`model(ids)`: every position's hidden states, no cache
kept): span after span, a failing server replaced for its span within the step's failure budget."""

from __future__ import annotations

from typing import Awaitable, Callable, Optional

import torch

from client.errors import ServerFailure, SwarmBusyError
from client.failures import FailureBudget, FailurePolicy
from client.router import Router
from client.routing import SpanPlan

Forward = Callable[[SpanPlan, torch.Tensor, Optional[torch.Tensor]], Awaitable[torch.Tensor]]


async def forward_chain(
    router: Router,
    failures: FailurePolicy,
    forward: Forward,
    hidden: torch.Tensor,
    mask: Optional[torch.Tensor],
    max_retries: int,
) -> torch.Tensor:
    """`hidden` [batch, tokens, hidden] after every block; `forward(plan, hidden, mask)` runs one span.
    A busy server, like a failed one, is routed around (only a failed one is banned)."""
    chain = await router.chain()
    dtype = hidden.dtype
    budget = FailureBudget(max_retries)
    index = 0
    while index < len(chain):
        plan = chain[index]
        try:
            hidden = await forward(plan, hidden, mask)
            index += 1
        except (ServerFailure, SwarmBusyError) as e:
            if isinstance(e, ServerFailure):
                failures.report(plan.peer_id, str(e), e.bridge)
            budget.add(e)
            replacement = await router.chain(plan.start, plan.end, exclude={plan.peer_id})
            chain[index:] = replacement + chain[index + 1 :]
    return hidden.to(dtype)
