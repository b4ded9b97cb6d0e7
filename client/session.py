"""An inference session: one step of hidden states through the whole chain, KV caches kept on servers."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Optional

import torch

from client.errors import SwarmError
from client.remote import RemoteModel
from client.span import SpanSession

logger = logging.getLogger(__name__)


class InferenceSession:
    """Holds a stream to every server of a chain; `step()` sends new tokens' hidden states through all.

    Used as a context manager (`with model.inference_session(max_length=128) as session:`), it keeps
    the servers' caches across several `generate()` calls. `token_ids` and `position` let `generate()`
    continue where the previous call stopped.
    """

    def __init__(self, remote: RemoteModel, max_length: int):
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.remote = remote
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex[:12]
        self.spans: list[SpanSession] = []
        self.batch_size: Optional[int] = None
        self.position = 0
        self.token_ids: Optional[torch.Tensor] = None  # every token of the session, fed or not yet fed
        self.attention_mask: Optional[torch.Tensor] = None
        self.closed = False

    async def _open(self, batch_size: int) -> None:
        chain = await self.remote.make_chain()
        opened = []
        try:
            for plan in chain:
                span = SpanSession(plan, self.remote.request_timeout)
                await span.open(self.remote.p2p, self.remote.model_name, batch_size, self.max_length, self.session_id)
                opened.append(span)
        except BaseException:
            await asyncio.gather(*(span.close() for span in opened), return_exceptions=True)
            raise
        self.spans = opened
        self.batch_size = batch_size
        logger.debug("session %s: chain %s", self.session_id,
                     " → ".join(f"{s.plan.peer_id[-6:]}[{s.plan.start}:{s.plan.end}]" for s in opened))

    async def astep(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Runs new positions [batch, tokens, hidden] through every block; returns the last block's output.

        `mask` is the attention mask of the whole session so far, new tokens included ([batch, position + tokens]).
        """
        if self.closed:
            raise SwarmError("inference session is closed")
        batch, tokens = hidden.shape[:2]
        if self.batch_size is None:
            await self._open(batch)
        elif batch != self.batch_size:
            raise ValueError(f"session was opened with batch size {self.batch_size}, got {batch}")
        if self.position + tokens > self.max_length:
            raise ValueError(
                f"session max_length is {self.max_length} tokens; {self.position} used, {tokens} more requested"
            )
        dtype = hidden.dtype
        chunk = self.remote.chunk_tokens(batch, [span.plan for span in self.spans])
        outputs = []
        for offset in range(0, tokens, chunk):
            part = hidden[:, offset:offset + chunk]
            part_mask = mask[:, : self.position + offset + part.shape[1]] if mask is not None else None
            for span in self.spans:
                part = await span.step(part, part_mask)
            outputs.append(part)
        self.position += tokens
        return torch.cat(outputs, dim=1).to(dtype)

    def step(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.remote.runtime.run(self.astep(hidden, mask))

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            await asyncio.gather(*(span.close() for span in self.spans), return_exceptions=True)

    def close(self) -> None:
        if not self.closed:
            self.remote.runtime.run(self.aclose(), timeout=10)

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
