"""RPC handlers of a block server: validate every message, reserve cache, run blocks, reply.

Bad input is answered with a typed error to that caller only; the stream ends and every other
session goes on. Cache reservations are released on every exit path (end of stream, client gone,
error, idle timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from blocks.checkpoint import dtype_name, parse_dtype
from blocks.kv_pool import PooledCache
from blocks.span import BlockSpan
from protocol.errors import ErrorKind, WireError, bad_request
from protocol.messages import (
    ECHO_MAX_BYTES,
    Expect,
    ForwardRequest,
    Hop,
    OpenSession,
    Push,
    PushAccepted,
    ServerInfoReply,
    SessionOpened,
    Step,
    StepDone,
    error_response,
    pack,
    read_header,
)
from protocol.receipts import receipt_message, sign
from protocol.tensors import read_tensors, tensor_digest
from swarm.batching import StepScheduler
from swarm.cache import CacheBudget
from swarm.metrics import ServerMetrics
from swarm.push import LocalPush, PushStream

logger = logging.getLogger(__name__)


# Pushed steps waiting in one session; more means the pusher is not waiting for the session's replies.
MAX_QUEUED_PUSHES = 4
# Client messages read ahead of the one being computed (the rest wait in the stream: backpressure).
MAX_QUEUED_CLIENT_MESSAGES = 2


@dataclass(eq=False)
class _OpenSession:
    """What an open session holds; `closed` says why the server ended it (its cache is gone then).

    `inbox` holds the session's next messages as (pushed, message): from the client's stream or
    pushed by the previous server. `last_step` is (step_id, position) of the last step computed, so
    that a step arriving twice (pushed, then pushed again by a replacement after a failover) is
    computed once."""

    cache: Optional[PooledCache]
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    client_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_QUEUED_CLIENT_MESSAGES))
    pushed: int = 0
    last_step: Optional[tuple[int, int]] = None
    push_streams: dict[tuple[str, str], PushStream | LocalPush] = field(default_factory=dict)  # to later servers
    mask: Optional[torch.Tensor] = None  # [batch, max_length] attention mask, once a step has sent one
    closed: Optional[str] = None

    def extend_mask(
        self, new: Optional[torch.Tensor], batch: int, position: int, tokens: int, max_length: int
    ) -> Optional[torch.Tensor]:
        """The attention mask of positions [0, position + tokens), kept here: steps carry only the new
        tokens' columns (none: all real tokens). None while no step has sent a mask."""
        if new is None and self.mask is None:
            return None
        if self.mask is None:
            self.mask = torch.ones(batch, max_length, dtype=torch.bool)
        self.mask[:, position : position + tokens] = True if new is None else new.bool()
        return self.mask[:, : position + tokens]


@dataclass(frozen=True)
class Limits:
    max_length: int
    max_batch_size: int
    max_chunk_tokens: int
    session_timeout: float


class BlockHandler:
    def __init__(
        self,
        model: str,
        span: BlockSpan,
        budget: CacheBudget,
        scheduler: StepScheduler,
        limits: Limits,
        version: str,
        state: Callable[[], str],
        accepting: Callable[[], bool],
        admit: Callable[[int], None] = lambda open_sessions: None,
        metrics: Optional[ServerMetrics] = None,
        push: Optional[Callable[[Hop], PushStream | LocalPush]] = None,
        signer: Optional[Ed25519PrivateKey] = None,
    ):
        self.model = model
        self.span: Optional[BlockSpan] = None  # None while the server moves to other blocks
        self.budget = budget
        self.scheduler = scheduler
        self.limits = limits
        self.version = version
        self.state = state
        self.accepting = accepting
        self.admit = admit
        self.metrics = metrics
        self.push = push  # opens a stream to a later server of the chain (None: steps with a route are refused)
        self.signer = signer  # signs a receipt of every session step (None: no receipts)
        self._sessions: set[_OpenSession] = set()
        self._keyed: dict[str, _OpenSession] = {}  # sessions by the id their client gave, for pushes
        self.serve_span(span)

    @property
    def open_sessions(self) -> int:
        return sum(1 for session in self._sessions if session.closed is None)

    def serve_span(self, span: BlockSpan) -> None:
        """Starts serving `span`, with a fresh KV pool for it."""
        self.span = None
        self.budget.unbind()  # the old pool goes before the new one is allocated
        self.budget.bind(span.new_pool(self.budget.total))
        self.span = span

    def retire_span(self, reason: str) -> int:
        """Stops serving the current span: every session still open is closed (its next message is
        answered with `reason`, its cache and budget are freed now) and nothing references the
        span's weights any more. Returns how many sessions were closed."""
        closed = 0
        for session in self._sessions:
            if session.closed is None:
                closed += 1
                session.closed = reason
                session.cache.release()
                session.cache = None
        self.span = None
        self.budget.unbind()
        return closed

    async def rpc_echo(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Sends the payload back, so another server can time a round trip of a known size."""
        try:
            payload = read_tensors(request, max_count=1, max_bytes=ECHO_MAX_BYTES)
        except WireError as e:
            return error_response(e)
        return pack(None, payload, request=False)

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A step pushed by the previous server of a chain, for a session its client opened here.

        Accepted once its header parses and names an open session; the session checks it like a
        step from its client (position, shape, dtype, values) and answers on the client's stream."""
        try:
            session_id = self.accept_push(request)
        except WireError as e:
            logger.info("push from %s refused: %s: %s", context.remote_id, e.kind.value, e.message)
            return error_response(e)
        return pack(PushAccepted(session_id=session_id), request=False)

    async def rpc_push_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """`rpc_push` for every message of a stream (the previous server's steps of one session), with
        one reply when the stream ends: a reply per step would double the messages on the way.
        Refused pushes are logged here; the client notices the silence and fails over."""
        session_id = ""
        async for request in requests:
            try:
                session_id = self.accept_push(request)
            except WireError as e:
                logger.info("push from %s refused: %s: %s", context.remote_id, e.kind.value, e.message)
        return pack(PushAccepted(session_id=session_id), request=False)

    def accept_push(self, request: runtime_pb2.ExpertRequest) -> str:
        """Queues a pushed step in the session it names; returns that session's id."""
        header = read_header(request, Push)
        session = self._keyed.get(header.session_id)
        if session is None or session.closed is not None:
            raise bad_request("no open session with this id here")
        if session.pushed >= MAX_QUEUED_PUSHES:
            raise WireError(ErrorKind.BUSY, f"{MAX_QUEUED_PUSHES} pushed steps already wait in this session")
        session.pushed += 1
        session.inbox.put_nowait((True, request))
        if self.metrics is not None:
            self.metrics.pushed_steps.inc()
        return header.session_id

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        if self.span is None:
            return error_response(WireError(ErrorKind.BUSY, "server is moving to other blocks"))
        return pack(
            ServerInfoReply(
                model=self.model,
                start_block=self.span.start,
                end_block=self.span.end,
                state=self.state(),
                dtype=dtype_name(self.span.dtype),
                hidden_size=self.span.config.hidden_size,
                max_length=self.limits.max_length,
                max_batch_size=self.limits.max_batch_size,
                max_chunk_tokens=self.limits.max_chunk_tokens,
                cache_tokens_free=self.budget.free,
                cache_tokens_total=self.budget.total,
                open_sessions=self.open_sessions,
                version=self.version,
            ),
            request=False,
        )

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A session: OpenSession, then any number of Steps; the KV cache lives until the stream ends."""
        async for reply in self._session(requests, context, persistent=True):
            yield reply

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A stateless forward: ForwardRequest, then the input in token chunks; nothing is kept afterwards."""
        async for reply in self._session(requests, context, persistent=False):
            yield reply

    async def _session(self, requests, context: P2PContext, persistent: bool):
        cache: Optional[PooledCache] = None
        session: Optional[_OpenSession] = None
        session_id = "-"
        timing = None
        reader: Optional[asyncio.Task] = None
        failed = False  # a session the client closes (even abruptly) succeeded; one answered with an error failed
        try:
            first = await self._next(requests)
            if first is None:
                return
            if persistent:
                header = read_header(first, OpenSession)
                batch, max_length = header.batch_size, header.max_length
                session_id = header.session_id or uuid.uuid4().hex[:12]
                if header.session_id and header.session_id in self._keyed:
                    raise bad_request("a session with this id is already open here")
            else:
                header = read_header(first, ForwardRequest)
                batch, max_length = header.batch_size, header.total_tokens
            start, end = self._check_open(header, batch, max_length)
            cache = self.budget.reserve(batch, max_length)
            try:
                # Load control last: a session refused as busy (no cache room) uses none of the hourly quota.
                self.admit(self.open_sessions)
            except WireError:
                cache.release()
                cache = None
                raise
            session = _OpenSession(cache=cache)
            self._sessions.add(session)
            if persistent and header.session_id:
                self._keyed[header.session_id] = session
            timing = self.metrics.session(prompt_only=not persistent) if self.metrics is not None else None
            logger.debug(
                "session %s opened by %s: blocks %d:%d, batch %d, max_length %d",
                session_id,
                context.remote_id,
                start,
                end,
                batch,
                max_length,
            )
            position = 0
            if persistent:
                yield pack(SessionOpened(session_id=session_id, max_length=max_length), request=False)
                reader = asyncio.create_task(_forward_messages(requests, session))
                message = await self._next_in(session)
            else:
                message = first
            while message is not None:
                if session.closed is not None:
                    raise WireError(ErrorKind.WRONG_MODEL, session.closed)
                if persistent and _is_expect(message):
                    message = await self._next_in(session)
                    continue
                step = read_header(message, Step) if message is not first else Step(position=0)
                if step.step_id and session.last_step == (step.step_id, step.position):
                    logger.debug("session %s: step %d arrived again; computed once", session_id, step.step_id)
                    message = await self._next_in(session)
                    continue
                if step.route and self.push is None:
                    raise bad_request("this server does not push steps to other servers")
                if step.rewind and persistent and step.position < position:
                    session.cache.restore([step.position] * len(session.cache.lengths()))
                    position = step.position
                hidden, mask = self._check_step(read_tensors(message, max_count=2), batch, position, max_length, step)
                full_mask = session.extend_mask(mask, batch, position, hidden.shape[1], max_length)
                began = time.perf_counter()
                output = await self.scheduler.run(self.span, hidden, session.cache, full_mask, start, end)
                if timing is not None:
                    timing.step(hidden.shape[1], time.perf_counter() - began)
                session.last_step = (step.step_id, position)
                position += hidden.shape[1]
                if step.route:
                    self._push_on(session, step, output, mask)
                yield pack(
                    self._step_done(
                        session_id if persistent else "",
                        start,
                        end,
                        position - hidden.shape[1],
                        step.step_id,
                        hidden,
                        output,
                    ),
                    [output],
                    request=False,
                )
                if not persistent and position == max_length:
                    return
                message = await (self._next_in(session) if persistent else self._next(requests))
            if not persistent:
                raise bad_request(f"stream ended after {position} of {max_length} tokens")
        except WireError as e:
            failed = True
            logger.info("session %s from %s refused: %s: %s", session_id, context.remote_id, e.kind.value, e.message)
            yield error_response(e)
        except asyncio.TimeoutError:
            failed = True
            logger.info(
                "session %s from %s closed after %.0f s idle",
                session_id,
                context.remote_id,
                self.limits.session_timeout,
            )
            yield error_response(bad_request(f"session idle for more than {self.limits.session_timeout:.0f} s"))
        except Exception as e:
            failed = True
            logger.exception("session %s from %s failed", session_id, context.remote_id)
            yield error_response(WireError(ErrorKind.SERVER_ERROR, f"{type(e).__name__}: {e}"))
        finally:
            if reader is not None:
                reader.cancel()
            if session is not None:
                for stream in session.push_streams.values():
                    stream.close()
            if cache is not None:
                cache.release()
            self._sessions.discard(session)
            if persistent and session is not None and self._keyed.get(session_id) is session:
                del self._keyed[session_id]
            if timing is not None:
                timing.finished(ok=not failed)

    def _step_done(
        self,
        session_id: str,
        start: int,
        end: int,
        position: int,
        step_id: int,
        hidden: torch.Tensor,
        output: torch.Tensor,
    ) -> StepDone:
        """The reply header; in a session, with digests of the step's input and output and their signed
        receipt (a stateless forward's reply carries none: nobody checks it against anything)."""
        done = position + hidden.shape[1]
        if not session_id:
            return StepDone(position=done, step_id=step_id)
        input_digest, output_digest = tensor_digest(hidden), tensor_digest(output)
        receipt = ""
        if self.signer is not None:
            receipt = sign(
                self.signer,
                receipt_message(
                    self.model, start, end, session_id, position, hidden.shape[1], input_digest, output_digest
                ),
            )
        return StepDone(
            position=done, step_id=step_id, input_digest=input_digest, output_digest=output_digest, receipt=receipt
        )

    def _push_on(self, session: _OpenSession, step: Step, output: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Sends the output to the route's first hop, in its dtype, with the rest of the route, on the
        session's stream to that server; the reply to the client is not held up by it."""
        hop = step.route[0]
        tensors = [output.to(parse_dtype(hop.dtype))] + ([mask] if mask is not None else [])
        message = pack(
            Push(
                position=step.position,
                step_id=step.step_id,
                route=step.route[1:],
                rewind=step.rewind,
                session_id=hop.session_id,
            ),
            tensors,
            request=True,
        )
        key = (hop.peer_id, hop.session_id)
        if key not in session.push_streams:
            session.push_streams[key] = self.push(hop)
        session.push_streams[key].send(message)

    async def _next_in(self, session: _OpenSession) -> Optional[runtime_pb2.ExpertRequest]:
        pushed, message = await asyncio.wait_for(session.inbox.get(), timeout=self.limits.session_timeout)
        if pushed:
            session.pushed -= 1
        else:
            session.client_slots.release()
        return message

    async def _next(self, requests) -> Optional[runtime_pb2.ExpertRequest]:
        return await asyncio.wait_for(anext(requests, None), timeout=self.limits.session_timeout)

    def _check_open(self, header: OpenSession | ForwardRequest, batch: int, max_length: int) -> tuple[int, int]:
        if header.model != self.model:
            raise WireError(ErrorKind.WRONG_MODEL, f"this server serves {self.model!r}, not {header.model!r}")
        if self.span is None:
            raise WireError(ErrorKind.BUSY, "server is moving to other blocks and accepts no new sessions")
        if not self.span.start <= header.start_block < header.end_block <= self.span.end:
            raise WireError(
                ErrorKind.WRONG_MODEL,
                f"blocks {header.start_block}:{header.end_block} requested, "
                f"this server has {self.span.start}:{self.span.end}",
            )
        if not self.accepting():
            raise WireError(ErrorKind.BUSY, f"server is {self.state()} and accepts no new sessions")
        if batch > self.limits.max_batch_size:
            raise bad_request(f"batch size {batch} exceeds this server's limit of {self.limits.max_batch_size}")
        if max_length > self.limits.max_length:
            raise bad_request(f"length {max_length} exceeds this server's limit of {self.limits.max_length} tokens")
        return header.start_block, header.end_block

    def _check_step(
        self, tensors: list[torch.Tensor], batch: int, position: int, max_length: int, step: Step
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not tensors:
            raise bad_request("step carries no hidden states")
        hidden = tensors[0]
        hidden_size = self.span.config.hidden_size
        if hidden.dtype != self.span.dtype:
            raise bad_request(
                f"hidden states must be {dtype_name(self.span.dtype)}, got {str(hidden.dtype).removeprefix('torch.')}"
            )
        if hidden.ndim != 3 or hidden.shape[0] != batch or hidden.shape[2] != hidden_size or hidden.shape[1] == 0:
            raise bad_request(
                f"hidden states must have shape [{batch}, tokens, {hidden_size}], got {list(hidden.shape)}"
            )
        tokens = hidden.shape[1]
        if tokens > self.limits.max_chunk_tokens:
            raise bad_request(
                f"{tokens} tokens in one step exceed the limit of {self.limits.max_chunk_tokens}; send them in chunks"
            )
        if step.position != position:
            raise bad_request(f"client is at position {step.position}, server holds {position} tokens")
        if position + tokens > max_length:
            raise bad_request(f"{position + tokens} tokens exceed the session's max_length of {max_length}")
        if not torch.isfinite(hidden).all():
            raise bad_request("hidden states contain NaN or infinity")
        mask = None
        if len(tensors) == 2:
            mask = tensors[1]
            if mask.dtype not in (torch.int64, torch.bool) or tuple(mask.shape) != (batch, tokens):
                raise bad_request(
                    f"attention mask of the step's new tokens must be int64 or bool of shape [{batch}, {tokens}], "
                    f"got {str(mask.dtype).removeprefix('torch.')} {list(mask.shape)}"
                )
            if ((mask != 0) & (mask != 1)).any():
                raise bad_request("attention mask may hold only 0 and 1")
        return hidden, mask


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


async def _forward_messages(requests, session: _OpenSession) -> None:
    """Moves the client's stream messages into the session's inbox, a few at most ahead of the one
    being computed; None once the stream ends."""
    try:
        async for message in requests:
            await session.client_slots.acquire()
            session.inbox.put_nowait((False, message))
    finally:
        session.inbox.put_nowait((False, None))
