"""A stateless forward through the whole chain (`model(ids)`: every position's hidden states, no cache
kept): span after span, a failing server replaced for its span within the step's failure budget."""

from __future__ import annotations

from typing import Awaitable, Callable, Optional

import torch

from client.adapters import SessionAdapter
from client.errors import BadRequestError, ServerFailure, SwarmBusyError
from client.failures import FailureBudget, FailurePolicy
from client.router import BAN_WAIT_SECONDS, Router
from client.routing import SpanPlan

Forward = Callable[[SpanPlan, torch.Tensor, Optional[torch.Tensor]], Awaitable[torch.Tensor]]


async def forward_chain(
    router: Router,
    failures: FailurePolicy,
    forward: Forward,
    hidden: torch.Tensor,
    mask: Optional[torch.Tensor],
    max_retries: int,
    adapter: Optional[SessionAdapter] = None,
) -> torch.Tensor:
    """`hidden` [batch, tokens, hidden] after every block; `forward(plan, hidden, mask)` runs one span.
    Only servers that accept a request this long (and serve `adapter`, if any) are routed to. A busy
    server, like a failed one, is routed around (only a failed one is banned), and so is one that
    refuses the request's size."""
    batch, tokens = hidden.shape[0], hidden.shape[1]
    chain = await router.chain(max_length=tokens, batch=batch, wait_for_bans=BAN_WAIT_SECONDS, adapter=adapter)
    dtype = hidden.dtype
    budget = FailureBudget(max_retries)
    refused: set[str] = set()
    index = 0
    while index < len(chain):
        plan = chain[index]
        try:
            hidden = await forward(plan, hidden, mask)
            index += 1
            continue
        except (ServerFailure, SwarmBusyError) as e:
            if isinstance(e, ServerFailure):
                failures.report(plan.peer_id, str(e), e.bridge)
            budget.add(e)
            exclude = refused | {plan.peer_id}
        except BadRequestError as e:
            if e.peer_id is None:
                raise
            refused.add(e.peer_id)  # too long for it, though its record said otherwise: nobody's fault
            exclude = refused
        replacement = await router.chain(
            plan.start,
            plan.end,
            exclude=exclude,
            max_length=tokens,
            batch=batch,
            wait_for_bans=BAN_WAIT_SECONDS,
            adapter=adapter,
        )
        chain[index:] = replacement + chain[index + 1 :]
    return hidden.to(dtype)
