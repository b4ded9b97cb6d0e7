"""What a server holds for one open session, and the stream of steps it computes.

A session's next steps come from two places: its client's stream and the previous server of the
chain, which pushes its output straight on. `ServerSession.steps()` merges them in arrival order and
drops what is not a step to compute: a client's `Expect` (it only probes the stream) and a step that
arrives twice (pushed, then sent again by a replacement after a failover). The handler computes
what it yields; nothing here touches the blocks.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import torch
from hivemind.proto import runtime_pb2

from blocks.kv_pool import PooledCache
from protocol.errors import ErrorKind, WireError, bad_request
from protocol.messages import Expect, Step, read_header
from swarm.push import LocalPush, PushStream

logger = logging.getLogger(__name__)

# Pushed steps waiting in one session; more means the pusher is not waiting for the session's replies.
MAX_QUEUED_PUSHES = 4
# Client messages read ahead of the one being computed (the rest wait in the stream: backpressure).
MAX_QUEUED_CLIENT_MESSAGES = 2


@dataclass(eq=False)
class ServerSession:
    """One session's cache and what its steps need between them. `key` is the id its client gave (for
    pushes and receipts; empty for a stateless forward); `closed` says why the server ended it (its
    cache is gone then). `last_step` is (step_id, position) of the last step computed."""

    cache: Optional[PooledCache]
    batch: int
    max_length: int
    key: str = ""
    position: int = 0
    last_step: Optional[tuple[int, int]] = None
    push_streams: dict[tuple[str, str], PushStream | LocalPush] = field(default_factory=dict)  # to later servers
    mask: Optional[torch.Tensor] = None  # [batch, max_length] attention mask, once a step has sent one
    closed: Optional[str] = None
    timing: Any = None  # its `swarm.metrics` timing, when the server keeps metrics
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # (pushed, message); None ends it
    pushed: int = 0
    client_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_QUEUED_CLIENT_MESSAGES))

    def extend_mask(self, new: Optional[torch.Tensor], tokens: int) -> Optional[torch.Tensor]:
        """The attention mask of positions [0, position + tokens), kept here: steps carry only the new
        tokens' columns (none: all real tokens). None while no step has sent a mask."""
        if new is None and self.mask is None:
            return None
        if self.mask is None:
            self.mask = torch.ones(self.batch, self.max_length, dtype=torch.bool)
        self.mask[:, self.position : self.position + tokens] = True if new is None else new.bool()
        return self.mask[:, : self.position + tokens]

    def rewind(self, position: int) -> None:
        """Forgets the positions from `position` on (a client rolls back what a wrong server made it compute)."""
        self.cache.restore([position] * len(self.cache.lengths()))
        self.position = position

    def release(self, reason: Optional[str] = None) -> None:
        """Gives the cache back, once; with `reason`, the session's next message is answered with it."""
        if reason is not None and self.closed is None:
            self.closed = reason
        if self.cache is not None:
            self.cache.release()
            self.cache = None

    def accept_push(self, request: runtime_pb2.ExpertRequest) -> None:
        """Queues a step the previous server pushed (its header already names this session)."""
        if self.closed is not None:
            raise bad_request("no open session with this id here")
        if self.pushed >= MAX_QUEUED_PUSHES:
            raise WireError(ErrorKind.BUSY, f"{MAX_QUEUED_PUSHES} pushed steps already wait in this session")
        self.pushed += 1
        self.inbox.put_nowait((True, request))

    async def read_client(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
        """Moves the client's stream messages into the inbox, a few at most ahead of the one being
        computed; None once the stream ends."""
        try:
            async for message in requests:
                await self.client_slots.acquire()
                self.inbox.put_nowait((False, message))
        finally:
            self.inbox.put_nowait((False, None))

    async def steps(self, idle_timeout: float) -> AsyncIterator[tuple[Step, runtime_pb2.ExpertRequest]]:
        """The session's steps to compute, client's and pushed, until the client's stream ends; a session
        idle for `idle_timeout` seconds raises TimeoutError."""
        while True:
            pushed, message = await asyncio.wait_for(self.inbox.get(), timeout=idle_timeout)
            if pushed:
                self.pushed -= 1
            else:
                self.client_slots.release()
            if message is None:
                return
            if self.closed is not None:
                raise WireError(ErrorKind.WRONG_MODEL, self.closed)
            if _is_expect(message):
                continue
            step = read_header(message, Step)
            if step.step_id and self.last_step == (step.step_id, step.position):
                logger.debug("session %s: step %d arrived again; computed once", self.key, step.step_id)
                continue
            yield step, message


def _is_expect(message: runtime_pb2.ExpertRequest) -> bool:
    """Only a message without tensors can be an Expect (a step always carries its hidden states): a
    step's header is not decoded twice."""
    if message.tensors:
        return False
    try:
        read_header(message, Expect)
    except WireError:
        return False
    return True
