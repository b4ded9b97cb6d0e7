"""What a server holds for one open session, and the stream of steps it computes.

A session's next steps come from two places: its client's stream and the previous server of the
chain, which pushes its output straight on. `ServerSession.steps()` merges them in arrival order and
drops what is not a step to compute: a client's `Expect` (it only probes the stream) and a numbered
step whose number is not above the last one computed (pushed twice: by a server the client gave up
on, late, and by its replacement). A pushed step's route is opened here (`protocol.routes`): only
what the client sealed for this session is computed and pushed on. The handler computes what it
yields; nothing here touches the blocks.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import torch
from hivemind.proto import runtime_pb2

from blocks.adapters import LoraAdapter
from blocks.kv_pool import PooledCache
from protocol.errors import ErrorKind, WireError, bad_request
from protocol.messages import Expect, MoveSession, PushFailed, Step, error_response, pack, read_header
from protocol.routes import SealedRouteError, open_route
from protocol.tensors import message_bytes
from swarm.push import LocalPush, PushStream
from swarm.quotas import PeerQuotas

logger = logging.getLogger(__name__)

# Pushed steps waiting in one session; more means the pusher is not waiting for the session's replies.
MAX_QUEUED_PUSHES = 4
# Client messages read ahead of the one being computed (the rest wait in the stream: backpressure).
MAX_QUEUED_CLIENT_MESSAGES = 2
_NOTICE = "\0notice"  # in the inbox in place of a pusher: a reply for the client, not a step
_MOVE = "\0move"  # in the inbox in place of a pusher: a session handover to run between two steps


@dataclass(eq=False)
class ServerSession:
    """One session's cache and what its steps need between them. `key` is the id its client gave (for
    pushes and receipts; empty for a stateless forward) and `route_key` the key of its sealed routes;
    `closed` says why the server ended it (its cache is gone then). `last_step_id` is the number of
    the last numbered step computed."""

    cache: Optional[PooledCache]
    batch: int
    max_length: int
    key: str = ""
    route_key: bytes = b""
    position: int = 0
    last_step_id: int = 0
    push_streams: dict[tuple[str, str], PushStream | LocalPush] = field(default_factory=dict)  # to later servers
    mask: Optional[torch.Tensor] = None  # [batch, max_length] attention mask, once a step has sent one
    closed: Optional[str] = None
    timing: Any = None  # its `swarm.metrics` timing, when the server keeps metrics
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # (pusher or "", message); None ends it
    pushed: int = 0
    refused_pushers: set[str] = field(default_factory=set)  # peers whose push was refused: not heard again
    peer: str = ""  # the client's peer id
    quotas: Optional[PeerQuotas] = None  # per-peer limits: messages waiting here count against their sender
    client_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_QUEUED_CLIENT_MESSAGES))
    prompt_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its prompt's blocks, if sent
    lowest_rewind: Optional[int] = None  # positions from here on may hold other tokens than the prompt's
    computed: bool = False  # a step has been computed (a rewind before that only trims a reused prefix)
    blocks: tuple[int, int] = (0, 0)  # the blocks [start, end) it runs through
    # Hands the session to a server its client names (`MoveSession`): (the reply, whether it moved)
    mover: Optional[Callable[[str], Awaitable[tuple[Any, bool]]]] = None
    adapter: Optional[LoraAdapter] = None  # the LoRA adapter its steps run with
    adapter_room: Optional[PooledCache] = None  # cache budget a client's own adapter is charged, until the end
    moved_away: bool = False  # its last reply told its client that another server holds it now

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
        """Forgets the positions from `position` on, in place (a client rolls back what a wrong server made it
        compute, or the rejected part of a speculative draft)."""
        self.cache.restore([position] * len(self.cache.lengths()))
        self.position = position
        if self.computed:
            self.lowest_rewind = position if self.lowest_rewind is None else min(self.lowest_rewind, position)

    def kept_prompt_tokens(self, block: int) -> int:
        """How much of its prompt's KV the session can leave to the prefix cache when it ends: whole
        blocks, computed once (not since rewound over) with no padding."""
        end = min(len(self.prompt_keys) * block, self.position)
        if self.lowest_rewind is not None:
            end = min(end, self.lowest_rewind)
        end -= end % block
        if self.mask is not None and end and not bool(self.mask[:, :end].all()):
            return 0
        return end

    def release(self, reason: Optional[str] = None) -> None:
        """Gives the cache back, once; with `reason`, the session's next message is answered with it."""
        if reason is not None and self.closed is None:
            self.closed = reason
        if self.cache is not None:
            self.cache.release()
            self.cache = None
        if self.adapter_room is not None:
            self.adapter_room.release()
            self.adapter_room = None
            self.adapter = None
        if reason is None:  # the session is over: what still waits is never computed, its bytes go back
            while not self.inbox.empty():
                sender, message = self.inbox.get_nowait()
                self._taken(sender, message)

    def _hold(self, sender: str, message) -> None:
        if self.quotas is not None and message is not None:
            self.quotas.hold(sender, message_bytes(message))

    def _taken(self, sender: str, message) -> None:
        """A message left the inbox: its sender's bytes waiting here go back."""
        if (
            self.quotas is not None
            and isinstance(message, runtime_pb2.ExpertRequest)
            and sender not in (_NOTICE, _MOVE)
        ):
            self.quotas.drop(sender or self.peer, message_bytes(message))

    def _freed(self, pusher: str) -> None:
        """A step of `pusher` ("": the client) left the inbox: room for another of its steps."""
        if pusher:
            self.pushed -= 1
        else:
            self.client_slots.release()

    def accept_push(self, request: runtime_pb2.ExpertRequest, pusher: str) -> None:
        """Queues a step that peer `pusher` pushed (its header already names this session)."""
        if self.closed is not None:
            raise bad_request("no open session with this id here")
        if pusher in self.refused_pushers:
            raise bad_request("an earlier push from this server into this session was refused")
        if self.pushed >= MAX_QUEUED_PUSHES:
            raise WireError(ErrorKind.BUSY, f"{MAX_QUEUED_PUSHES} pushed steps already wait in this session")
        self._hold(pusher, request)
        self.pushed += 1
        self.inbox.put_nowait((pusher, request))

    def push_failed(self, key: tuple[str, str], reason: str) -> None:
        """The push stream to `key` (next peer, its session) broke: it is dropped (a later push opens a
        new one) and the client is told on its stream, at once, so it sends that hop's steps itself."""
        if self.push_streams.pop(key, None) is None or self.closed is not None:
            return
        notice = pack(PushFailed(failed_push_to=key[0], reason=reason[:1024]), request=False)
        self.inbox.put_nowait((_NOTICE, notice))

    def move_at_boundary(self, mover: Callable[[], Awaitable[Any]]) -> bool:
        """Runs `mover()` once the steps queued so far are computed (a step boundary, between two
        replies). If it returns a reply (the client's `Moved` notice), the session goes with it to the
        client and ends here; if None, it goes on. False if the session is over already."""
        if self.closed is not None or self.cache is None:
            return False
        self.inbox.put_nowait((_MOVE, mover))
        return True

    def pushed_step(self, step: Step) -> Step:
        """A pushed step as the client asked for it: its sealed route opened with this session's key
        (position, rewind and number are checked with it) into where it goes next. WireError
        BAD_PUSH if it was not sealed for this session and step: the pusher's fault, not the client's."""
        if not self.route_key:
            return step  # a client that does not seal routes: the route came in the clear
        if step.route:
            raise WireError(ErrorKind.BAD_PUSH, "a push into this session must carry its route sealed only")
        try:
            following, rest = open_route(
                self.route_key, self.key, step.step_id, step.position, step.rewind, step.sealed_route
            )
        except SealedRouteError as e:
            raise WireError(ErrorKind.BAD_PUSH, str(e)) from None
        route = (following,) if following is not None else ()
        return Step(
            position=step.position,
            step_id=step.step_id,
            route=route,
            sealed_route=rest,
            rewind=step.rewind,
            traceparent=step.traceparent,
        )

    async def read_client(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
        """Moves the client's stream messages into the inbox, a few at most ahead of the one being
        computed; None once the stream ends."""
        try:
            async for message in requests:
                await self.client_slots.acquire()
                self._hold(self.peer, message)
                self.inbox.put_nowait(("", message))
        except WireError as e:  # over the peer's limit: the session ends with that error
            self.inbox.put_nowait(("", e))
        finally:
            self.inbox.put_nowait(("", None))

    async def until_client_leaves(self, timeout: float) -> None:
        """After the session's last reply (it moved away): waits until its client closes the stream,
        which it does once it has read that reply, so that a server leaving right after cannot take
        the reply with it; whatever else arrives meanwhile is dropped. At most `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    pusher, message = await self.inbox.get()
                    self._taken(pusher, message)
                    if pusher in (_NOTICE, _MOVE) or isinstance(message, WireError):
                        continue
                    self._freed(pusher)
                    if message is None and not pusher:
                        return
        except TimeoutError:
            logger.info("session %s: its client did not leave within %.0f s of the move", self.key, timeout)

    async def steps(self, idle_timeout: float) -> AsyncIterator[tuple[Optional[Step], Any, str]]:
        """The session's steps to compute, client's and pushed, with who pushed each ("": the client),
        until the client's stream ends; a session idle for `idle_timeout` seconds raises TimeoutError.
        (None, reply, "") is a notice to pass on to the client as it is."""
        while True:
            pusher, message = await asyncio.wait_for(self.inbox.get(), timeout=idle_timeout)
            self._taken(pusher, message)
            if isinstance(message, WireError):
                raise message
            if pusher == _NOTICE:
                yield None, message, ""
                continue
            if pusher == _MOVE:
                moved = await message()
                if moved is not None:
                    self.moved_away = True
                    yield None, moved, ""
                    return
                continue
            self._freed(pusher)
            if message is None:
                return
            if self.closed is not None:
                raise WireError(ErrorKind.WRONG_MODEL, self.closed)
            if _is_expect(message):
                continue
            move_to = _move_request(message)
            if move_to is not None:
                if self.mover is None:
                    yield None, error_response(bad_request("this session cannot move")), ""
                    continue
                reply, moved = await self.mover(move_to)
                self.moved_away = moved
                yield None, reply, ""
                if moved:
                    return
                continue
            step = read_header(message, Step)  # a push's header was read as a `Push` when it came
            if step.step_id and step.step_id <= self.last_step_id:
                logger.debug("session %s: step %d arrived again or late; computed once", self.key, step.step_id)
                continue
            yield step, message, pusher


def _move_request(message: runtime_pb2.ExpertRequest) -> Optional[str]:
    """The server a client's `MoveSession` names, or None for any other message (a step carries
    tensors: its header is not decoded twice)."""
    if message.tensors:
        return None
    try:
        return read_header(message, MoveSession).move_to
    except WireError:
        return None


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
