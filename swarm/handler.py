"""RPC handlers of a block server: validate every message, reserve cache, run blocks, reply.

Two stream protocols share one step: an inference session (`OpenSession`, then steps, the KV cache
kept between them, steps also pushed by the previous server of the chain) and a stateless forward
(`ForwardRequest`, then the input in token chunks, nothing kept). Where a session's steps come from
is `swarm.sessions`; what a step does (validate, compute, push on, sign, reply) is `_run_step`.

Bad input is answered with a typed error to that caller only; the stream ends and every other
session goes on. A session's cache is reserved and released in one place (`_open`), on every exit
path (end of stream, client gone, error, idle timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from blocks.adapters import AdapterConfig, AdapterError, LoraAdapter, adapter_from_tensors
from blocks.checkpoint import dtype_name, parse_dtype
from blocks.kv_pool import PooledCache
from blocks.span import BlockSpan
from bridge.channels import serve_channels
from protocol.errors import ErrorKind, WireError, bad_request
from protocol.messages import (
    ECHO_MAX_BYTES,
    PREFIX_BLOCK_TOKENS,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_PUSH_STREAM,
    ForwardRequest,
    Hop,
    ImportHeld,
    ImportProbe,
    ImportSession,
    OpenSession,
    Push,
    PushAccepted,
    ServerInfoReply,
    SessionImported,
    SessionOpened,
    Step,
    StepDone,
    error_response,
    pack,
    read_header,
)
from protocol.receipts import TIER_TARGET, export_message, mask_digest, precision, receipt_message, sign, verify
from protocol.tensors import all_finite, message_bytes, off_loop, read_tensors, tensor_digest
from swarm.batching import StepScheduler
from swarm.cache import CacheBudget
from swarm.handover import KVDigest
from swarm.kv_tier import HostTier, RedisTier
from swarm.metrics import ServerMetrics
from swarm.prefix_cache import Page, block_keys, prefix_root
from swarm.push import LocalPush, PushStream
from swarm.quotas import PeerLimits, PeerQuotas
from swarm.sessions import ServerSession
from telemetry import tracing

logger = logging.getLogger(__name__)

MOVED_LINGER = 10.0  # seconds a moved session's stream stays for its client to read where it went
# An import reads its chunks between the rounds of the sessions decoding here for this long at most,
# then at full speed: an exporter gives up after 60 s (swarm.handover.EXPORT_TIMEOUT).
IMPORT_PACING_SECONDS = 15.0


@dataclass
class _Label:
    """Who a stream is from and which session it is, for the log lines about it."""

    peer: object
    session: str = "-"


@dataclass
class _Imported:
    """A session another server handed over, waiting for its client: what holds its cache and quota,
    and the timer that releases them if the client never comes."""

    session: ServerSession
    header: ImportSession
    held: contextlib.ExitStack
    expiry: Any


async def _no_key() -> str:
    return ""


@dataclass(frozen=True)
class Limits:
    max_length: int
    max_batch_size: int
    max_chunk_tokens: int
    session_timeout: float
    max_client_adapter_bytes: int = 0  # the largest adapter a client may send for its session (0: none)


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
        push: Optional[Callable[[Hop, Callable[[str], None]], PushStream | LocalPush]] = None,
        signer: Optional[Ed25519PrivateKey] = None,
        peer_limits: PeerLimits = PeerLimits(),
        peer_id: str = "",
        receipt_key_of: Callable[[str, int], Awaitable[str]] = lambda peer, block: _no_key(),
        move_session: Optional[Callable[[ServerSession, str], Awaitable[tuple[Any, bool]]]] = None,
        kv_tier: Optional[RedisTier] = None,
        spill_session: Optional[Callable[[ServerSession], Awaitable[Any]]] = None,
        host_tier: Optional[HostTier] = None,
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
        # opens a stream to a later server of the chain, with what to call if it breaks (None: steps
        # with a route are refused)
        self.push = push
        self.signer = signer  # signs a receipt of every session step (None: no receipts)
        self.quotas = PeerQuotas(peer_limits, budget.total, limits.max_length)
        self._sessions: set[ServerSession] = set()
        self._keyed: dict[str, ServerSession] = {}  # sessions by the id their client gave, for pushes
        self._imported: dict[str, _Imported] = {}  # sessions handed over here, until their client resumes them
        self.peer_id = peer_id  # this server's own (what an exporter signs a handover to)
        self.receipt_key_of = receipt_key_of  # (peer, one of its blocks) -> the receipt key it announces
        self.move_session = move_session  # hands a session to the server its client names (`MoveSession`)
        self.tier = kv_tier  # where prefix pages leaving the pool go, and come back from
        self.host_tier = host_tier  # the same in host memory first (a pool on an accelerator)
        self.spill_session = spill_session  # an idle session to the tier: the client's notice, or None
        if kv_tier is not None or host_tier is not None:
            loop = asyncio.get_running_loop()
            keep = host_tier.put if host_tier is not None else kv_tier.put_later
            budget.on_evict = lambda key, page: loop.call_soon_threadsafe(keep, key, page)
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

    def movable_sessions(self) -> list[ServerSession]:
        """Open sessions another server could take over with their caches: those of a client, past
        their first step, and with no adapter of the client's own (the importer would need it too)."""
        return [
            session
            for session in self._sessions
            if session.key
            and session.closed is None
            and session.cache is not None
            and session.key not in self._imported
            and self._keyed.get(session.key) is session
            and session.adapter_room is None
        ]

    def precision_of(self, session: ServerSession) -> str:
        """What a session computes in here (its receipts and a handover name it)."""
        return self._precision(session.adapter)

    def _precision(self, adapter: Optional[LoraAdapter] = None) -> str:
        """What this server's receipts and prefix-cache keys name as what a session computes in."""
        return precision(dtype_name(self.span.dtype), self.span.quant, adapter.name if adapter is not None else "")

    def retire_span(self, reason: str) -> int:
        """Stops serving the current span: every session still open is closed (its next message is
        answered with `reason`, its cache and budget are freed now) and nothing references the
        span's weights any more. Returns how many sessions were closed."""
        closed = 0
        for session in self._sessions:
            if session.closed is None:
                closed += 1
                session.release(reason)
        self.span = None
        self.budget.unbind()
        return closed

    # ---- unary RPCs ---------------------------------------------------------------------------

    async def rpc_echo(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Sends the payload back, so another server can time a round trip of a known size."""
        try:
            payload = read_tensors(request, max_count=1, max_bytes=ECHO_MAX_BYTES)
        except WireError as e:
            return error_response(e)
        return pack(None, payload, request=False)

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

    # ---- pushes from the previous server of a chain --------------------------------------------

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A step pushed by the previous server of a chain, for a session its client opened here.

        Accepted once its header parses and names an open session; the session checks it like a
        step from its client (position, shape, dtype, values) and answers on the client's stream."""
        try:
            session_id = self.accept_push(request, str(context.remote_id))
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
                session_id = self.accept_push(request, str(context.remote_id))
            except WireError as e:
                logger.info("push from %s refused: %s: %s", context.remote_id, e.kind.value, e.message)
        return pack(PushAccepted(session_id=session_id), request=False)

    def accept_push(self, request: runtime_pb2.ExpertRequest, pusher: str) -> str:
        """Queues a step that peer `pusher` pushed in the session it names; returns that session's id."""
        header = read_header(request, Push)
        session = self._keyed.get(header.session_id)
        if session is None:
            raise bad_request("no open session with this id here")
        session.accept_push(request, pusher)
        if self.metrics is not None:
            self.metrics.pushed_steps.inc()
        return header.session_id

    # ---- the two stream protocols --------------------------------------------------------------

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A session: OpenSession, then any number of Steps; the KV cache lives until the stream ends."""
        label = _Label(context.remote_id)
        async for reply in self._replying(self._inference(requests, label), label):
            yield reply

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A stateless forward: ForwardRequest, then the input in token chunks; nothing is kept afterwards."""
        label = _Label(context.remote_id)
        async for reply in self._replying(self._forward(requests, label), label):
            yield reply

    async def rpc_bundle(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Sessions, stateless forwards and push streams of one peer as channels of one stream
        (`bridge.channels`): each runs as on a stream of its own, and a round's replies go together."""
        handlers = {
            RPC_INFERENCE: self.rpc_inference,
            RPC_FORWARD: self.rpc_forward,
            RPC_PUSH_STREAM: self.rpc_push_stream,
        }
        async for bundle in serve_channels(requests, context, handlers):
            yield bundle

    async def _inference(self, requests, label: "_Label") -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with self.quotas.stream(str(label.peer)):
            async for reply in self._session(requests, label):
                yield reply

    async def _session(self, requests, label: "_Label") -> AsyncIterator[runtime_pb2.ExpertResponse]:
        first = await self._next(requests)
        if first is None:
            return
        header = read_header(first, OpenSession)
        if header.resume:
            async with self._resumed(header, label) as session:
                opened = SessionOpened(
                    session_id=session.key, max_length=session.max_length, cached_tokens=session.position
                )
                yield pack(opened, request=False)
                async for reply in self._serve(session, requests, header, label):
                    yield reply
            return
        if header.session_id and (header.session_id in self._keyed or header.session_id in self._imported):
            raise bad_request("a session with this id is already open here")
        tensors = read_tensors(
            first, max_count=1 + 2 * len(header.client_adapter.entries if header.client_adapter else ())
        )
        prompt, sent_adapter = self._split_open(tensors, header)
        prompt = self._prompt_ids(prompt, header)
        adapter = await self._session_adapter(header, sent_adapter)
        key = label.session = header.session_id or uuid.uuid4().hex[:12]
        async with self._open(header, header.batch_size, header.max_length, key, label) as session:
            session.route_key = bytes.fromhex(header.route_key)
            if adapter is not None:
                self._charge(session, adapter, header.client_adapter is not None)
            cached = await self._reuse_prefix(session, header, prompt, str(label.peer))
            yield pack(SessionOpened(session_id=key, max_length=header.max_length, cached_tokens=cached), request=False)
            async for reply in self._serve(session, requests, header, label):
                yield reply

    async def _serve(
        self, session: ServerSession, requests, header: OpenSession, label: "_Label"
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A session's steps, the client's and pushed ones, each answered in turn, until the client's
        stream ends (or the session moves to another server: its last reply says where)."""
        reader = asyncio.create_task(session.read_client(requests))
        try:
            async for reply in self._steps(session, header, label):
                yield reply
            if session.moved_away:  # the stream stays until the client, told where, leaves it
                await session.until_client_leaves(MOVED_LINGER)
        except asyncio.TimeoutError:  # idle too long: to the KV tier, where there is one, else closed
            spilled = await self.spill_session(session) if self.spill_session is not None else None
            if spilled is None:
                raise
            yield spilled
        finally:
            reader.cancel()

    async def _steps(
        self, session: ServerSession, header: OpenSession, label: "_Label"
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """The session's steps answered in turn (a step refused as a pusher's fault is answered so)."""
        async for step, message, pusher in session.steps(self.limits.session_timeout):
            if step is None:
                yield message  # a notice for the client: a push failed, or the session moved
                continue
            try:
                if pusher:
                    step = session.pushed_step(step)
                if step.rewind and step.position < session.position:
                    session.rewind(step.position)
                reply = await self._run_step(session, step, message, header)
            except WireError as e:
                if not pusher or e.kind not in (ErrorKind.BAD_REQUEST, ErrorKind.BAD_PUSH):
                    raise
                # Not the client's fault, and the session is as it was: the client hears whom
                # to blame on its own stream, and may send the step again itself.
                logger.info("session %s: push from %s refused: %s", label.session, pusher, e.message)
                session.refused_pushers.add(pusher)
                reply = error_response(WireError(ErrorKind.BAD_PUSH, f"push from {pusher}: {e.message}"))
            yield reply

    # ---- sessions handed over by another server ----------------------------------------------

    async def rpc_import(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Another server hands over one of its open sessions with its KV cache (`swarm.handover`)."""
        label = _Label(context.remote_id)
        async for reply in self._replying(self._import(requests, label), label):
            yield reply

    async def _import(self, requests, label: "_Label") -> AsyncIterator[runtime_pb2.ExpertResponse]:
        first = await self._next(requests)
        if first is None:
            return
        probe, pages = _probe(first), []
        prefixes = self.budget.prefixes
        try:
            if probe is not None:  # what of the prompt is cached here already: kept for this import
                if not await self.receipt_key_of(str(label.peer), probe.start_block):
                    raise bad_request("only a server announcing the session's blocks may hand it over")
                if prefixes is not None:
                    pages = prefixes.match([bytes.fromhex(key) for key in probe.probe_keys])
                yield pack(ImportHeld(tokens=len(pages) * PREFIX_BLOCK_TOKENS), request=False)
                first = await self._next(requests)
                if first is None:
                    return
            header = read_header(first, ImportSession)
            label.session = header.session_id
            if header.exporter != str(label.peer):
                raise bad_request("a session is handed over by the server that held it, not by another peer")
            if probe is not None and header.prefix_keys[: len(pages)] != probe.probe_keys[: len(pages)]:
                raise bad_request("the handed-over session's prompt keys are not those it asked about")
            key = await self.receipt_key_of(header.exporter, header.start_block)

            async def next_tensors() -> list[torch.Tensor]:
                message = await self._next(requests)
                return read_tensors(message, max_count=1) if message is not None else []

            await self._accept(header, key, self.peer_id, next_tensors, pages)
        finally:
            if pages:
                prefixes.unpin(pages)
        logger.info(
            "session %s of %s imported from %s at position %d (%d positions from this server's prefix cache)",
            header.session_id,
            header.owner,
            label.peer,
            header.position,
            header.skip,
        )
        yield pack(SessionImported(session_id=header.session_id), request=False)

    async def _accept(
        self,
        header: ImportSession,
        exporter_key: str,
        signed_to: str,
        next_tensors: Callable[[], Awaitable[list[torch.Tensor]]],
        pages: Sequence[Page] = (),
    ) -> _Imported:
        """Takes a handed-over session once everything about it is checked (model, blocks, precision,
        positions, the exporter's signature with `exporter_key` for `signed_to`, every chunk, the
        digest), into a cache reserved under its client's quotas, and keeps it for that client. Its
        first `header.skip` positions are the prefix cache's `pages`, this server's own."""
        self._check_open(header, header.batch_size, header.max_length)
        if (
            header.skip % PREFIX_BLOCK_TOKENS
            or header.skip > min(len(pages), len(header.prefix_keys)) * PREFIX_BLOCK_TOKENS
            or header.skip > header.position
        ):
            raise bad_request(f"{header.skip} positions cannot come from this server's prefix cache")
        adapter = self._served_adapter(header.adapter, header.start_block, header.end_block)
        if header.precision != self._precision(adapter):
            raise bad_request(f"the session computes in {header.precision}; this server in {self._precision(adapter)}")
        if header.position > header.max_length:
            raise bad_request(f"position {header.position} exceeds the session's length {header.max_length}")
        if header.session_id in self._keyed or header.session_id in self._imported:
            raise bad_request("a session with this id is already open here")
        signed = export_message(
            header.model,
            header.start_block,
            header.end_block,
            header.session_id,
            header.precision,
            header.batch_size,
            header.max_length,
            header.position,
            header.digest,
            signed_to,
        )
        if not exporter_key or not verify(exporter_key, signed, header.signature):
            raise bad_request("the handed-over session is not signed by the server that announces it")
        held = contextlib.ExitStack()
        held.enter_context(self.quotas.session(header.owner, header.batch_size * header.max_length, True))
        try:
            cache = self.budget.reserve(header.batch_size, header.max_length)
        except BaseException:
            held.close()
            raise
        session = ServerSession(
            cache=cache,
            batch=header.batch_size,
            max_length=header.max_length,
            key=header.session_id,
            peer=header.owner,
            quotas=self.quotas,
        )
        held.callback(session.release)
        try:
            await self._receive_kv(session, header, next_tensors, pages[: header.skip // PREFIX_BLOCK_TOKENS])
        except BaseException:
            held.close()
            raise
        session.route_key = bytes.fromhex(header.route_key)
        session.last_step_id = header.last_step_id
        session.adapter = adapter
        session.blocks = (header.start_block, header.end_block)
        session.prompt_keys = [bytes.fromhex(key) for key in header.prefix_keys]
        session.computed = True
        if self.move_session is not None:
            session.mover = lambda peer_id: self.move_session(session, peer_id)
        expiry = asyncio.get_running_loop().call_later(
            self.limits.session_timeout, self._expire_import, header.session_id
        )
        imported = self._imported[header.session_id] = _Imported(session, header, held, expiry)
        self._sessions.add(session)
        self._keyed[header.session_id] = session  # pushes reach it as soon as its client steps again
        return imported

    async def _from_tier(self, header: OpenSession, label: "_Label") -> Optional[_Imported]:
        """A session that went to the KV tier idle (here, or on a server gone since), taken back for
        its own client: None if the tier holds none such."""
        stored = self.host_tier.take_session(header.session_id) if self.host_tier is not None else None
        if stored is None and self.tier is not None:
            stored = await self.tier.take_session(header.session_id)
        if stored is None:
            return None
        try:
            origin = ImportSession.model_validate(stored[0])
        except ValueError:
            return None
        if origin.owner != str(label.peer) or origin.session_id != header.session_id:
            return None
        tensors = iter([[tensor] for tensor in stored[1]])

        async def next_tensors() -> list[torch.Tensor]:
            return next(tensors, [])

        key = header.exporter_key or await self.receipt_key_of(origin.exporter, origin.start_block)
        imported = await self._accept(origin, key, TIER_TARGET, next_tensors)
        logger.info(
            "session %s of %s taken back from the KV tier at position %d",
            origin.session_id,
            label.peer,
            origin.position,
        )
        return imported

    async def _receive_kv(
        self,
        session: ServerSession,
        header: ImportSession,
        next_tensors: Callable[[], Awaitable[list[torch.Tensor]]],
        pages: Sequence[Page],
    ) -> None:
        """Reads the handed-over KV cache into the session's own slice after the prefix cache's `pages`,
        every chunk checked (shape, dtype, positions) and all of it against the signed digest."""
        span, batch = self.span, header.batch_size
        layers = header.end_block - header.start_block
        first_layer = header.start_block - span.start
        heads, head_dim = span.config.num_key_value_heads, span.config.head_dim
        chunks, written = [], header.skip
        digest = KVDigest(header.prefix_keys, header.skip)
        paced_until = asyncio.get_running_loop().time() + IMPORT_PACING_SECONDS
        for _ in range(header.chunks):
            tensors = await next_tensors()
            if not tensors:
                raise bad_request(f"the export ended after {written} of {header.position} positions")
            chunk = tensors[0]
            if (
                chunk.dtype != span.dtype
                or chunk.ndim != 4
                or tuple(chunk.shape[:2]) != (layers * 2 * batch, heads)
                or chunk.shape[3] != head_dim
                or not 0 < chunk.shape[2] <= header.position - written
            ):
                raise bad_request(
                    f"a KV chunk must be {dtype_name(span.dtype)} [{layers * 2 * batch}, {heads}, tokens, {head_dim}] "
                    f"within the {header.position} positions handed over"
                )
            chunks.append(chunk)
            written += chunk.shape[2]
            await off_loop(lambda: digest.add(chunk), chunk.nbytes)
            # Sessions decoding here go first: a round of theirs runs before the next chunk is read
            # (and the sender, its stream's window full, waits), so a long import does not stall them.
            if asyncio.get_running_loop().time() < paced_until:
                await self.scheduler.after_round()
        if written != header.position:
            raise bad_request(f"the export carries {written} positions, not {header.position}")
        mask = None
        if header.masked:
            tensors = await next_tensors()
            if not tensors or tensors[0].dtype != torch.bool or tuple(tensors[0].shape) != (batch, header.position):
                raise bad_request(f"the attention mask must be bool [{batch}, {header.position}]")
            mask = tensors[0]
            digest.add(mask)
        if digest.hexdigest() != header.digest:
            raise bad_request("the KV cache handed over does not match its signed digest")

        if pages:
            sources = torch.cat([torch.arange(page.start, page.start + PREFIX_BLOCK_TOKENS) for page in pages])
            await self.scheduler.compute.run(session.cache.fill, sources)
        at = header.skip
        for chunk in chunks:  # a chunk per turn of the compute thread: other sessions' rounds go between
            tokens = chunk.shape[2]
            view = chunk.view(layers, 2, batch, heads, tokens, head_dim)
            await self.scheduler.compute.run(session.cache.write_layers, view, at, first_layer)
            at += tokens
        if mask is not None:
            session.mask = torch.ones(batch, header.max_length, dtype=torch.bool)
            session.mask[:, : header.position] = mask
        session.position = header.position

    def _expire_import(self, key: str) -> None:
        imported = self._imported.pop(key, None)
        if imported is None:
            return
        logger.info("session %s handed over here was never resumed by its client; released", key)
        self._forget(imported.session)
        imported.held.close()

    def _forget(self, session: ServerSession) -> None:
        """The session is over here (before its cache is released): no round waits for its steps,
        and it is neither counted nor found by its id any more."""
        if session.cache is not None:
            self.scheduler.left(session.cache)
        self._sessions.discard(session)
        if self._keyed.get(session.key) is session:
            del self._keyed[session.key]

    @contextlib.asynccontextmanager
    async def _resumed(self, header: OpenSession, label: "_Label") -> AsyncIterator[ServerSession]:
        """The session handed over here under `header.session_id`, for its own client only; released
        as any session is when its stream ends."""
        imported = self._imported.get(header.session_id)
        if imported is None and header.from_tier:
            imported = await self._from_tier(header, label)
        if imported is None:
            raise bad_request("no session was handed over here under this id")
        origin = imported.header
        if str(label.peer) != origin.owner:
            raise bad_request("only the client whose session it is may resume it")
        if (header.model, header.start_block, header.end_block, header.batch_size, header.max_length) != (
            origin.model,
            origin.start_block,
            origin.end_block,
            origin.batch_size,
            origin.max_length,
        ):
            raise bad_request("the session handed over here has other blocks, batch or length")
        del self._imported[header.session_id]
        imported.expiry.cancel()
        label.session = header.session_id
        session = imported.session
        session.timing = self.metrics.session(prompt_only=False) if self.metrics is not None else None
        ok = False
        try:
            yield session
            ok = True
        finally:
            for stream in session.push_streams.values():
                stream.close()
            if ok:
                self._keep_prompt(session)
            self._forget(session)
            imported.held.close()
            if session.timing is not None:
                session.timing.finished(ok=ok)

    def _split_open(self, tensors: list[torch.Tensor], header: OpenSession) -> tuple[list[torch.Tensor], list]:
        """An OpenSession's tensors: (the prompt ids, if sent; the client's adapter's, if sent: last)."""
        sent = 2 * len(header.client_adapter.entries) if header.client_adapter is not None else 0
        if len(tensors) < sent or len(tensors) > sent + 1:
            raise bad_request(f"an OpenSession carries the prompt ids (optional) and {sent} adapter tensors")
        return tensors[: len(tensors) - sent], tensors[len(tensors) - sent :]

    async def _session_adapter(self, header: OpenSession, sent: list[torch.Tensor]) -> Optional[LoraAdapter]:
        """The LoRA adapter a session asks for: one this server serves, or the client's own (checked
        against the model and this server's size limit, converted off the event loop); None: none."""
        if header.client_adapter is None:
            return self._served_adapter(header.adapter, header.start_block, header.end_block)
        limit = self.limits.max_client_adapter_bytes
        size = sum(t.numel() * t.element_size() for t in sent)
        if not header.adapter:
            raise bad_request("a client's own adapter needs a name (OpenSession.adapter)")
        if size > limit:
            raise bad_request(
                f"the adapter's {size / 2**20:.1f} MiB for blocks {header.start_block}:{header.end_block} exceed "
                f"this server's limit of {limit / 2**20:.1f} MiB"
                if limit
                else "this server takes no client adapters"
            )
        names = [
            f"base_model.model.model.layers.{block}.{module}.lora_{ab}.weight"
            for block, module in header.client_adapter.entries
            for ab in "AB"
        ]
        if len(set(names)) != len(names):
            raise bad_request("the adapter lists a projection twice")
        config = AdapterConfig(alpha=header.client_adapter.alpha, rslora=header.client_adapter.rslora)
        try:
            return await off_loop(
                lambda: adapter_from_tensors(
                    header.adapter,
                    config,
                    dict(zip(names, sent)),
                    self.span.config,
                    header.start_block,
                    header.end_block,
                    self.span.dtype,
                    self.span.device,
                ),
                size,
            )
        except AdapterError as e:
            raise bad_request(f"adapter {header.adapter!r}: {e}") from None

    def _served_adapter(self, name: str, start: int, end: int) -> Optional[LoraAdapter]:
        if not name:
            return None
        adapter = self.span.adapters.get(name)
        if adapter is None:
            held = ", ".join(sorted(self.span.adapters)) or "none"
            raise bad_request(f"this server serves no adapter named {name!r} (it serves: {held})")
        if not adapter.covers(start, end):
            raise bad_request(f"adapter {name!r} is loaded here for blocks {adapter.start}:{adapter.end} only")
        return adapter

    def _charge(self, session: ServerSession, adapter: LoraAdapter, own: bool) -> None:
        """The session runs with `adapter`; a client's own is charged to the cache budget (as the KV
        tokens its bytes would hold) and freed with the session."""
        if own:
            per_token = max(1, self.span.kv_bytes_per_token())
            try:
                session.adapter_room = self.budget.reserve(1, -(-adapter.nbytes // per_token))
            except WireError:
                raise WireError(ErrorKind.BUSY, "no room left in the cache budget for this session's adapter") from None
        session.adapter = adapter

    def _prompt_ids(self, tensors: list[torch.Tensor], header: OpenSession) -> Optional[list[int]]:
        """The prompt's token ids an OpenSession may carry, checked (None: it carries none)."""
        if not tensors:
            if header.reuse_tokens:
                raise bad_request("reuse_tokens needs the prompt's token ids")
            return None
        ids = tensors[0]
        if header.batch_size != 1:
            raise bad_request("prompt token ids are for a batch of one only")
        longest = min(header.max_length, self.limits.max_length)  # checked before anything is read of them
        if ids.dtype != torch.int64 or ids.ndim != 1 or not 0 < ids.shape[0] <= longest:
            raise bad_request(
                f"prompt token ids must be int64 of shape [tokens], 1 to {longest} tokens, "
                f"got {str(ids.dtype).removeprefix('torch.')} {list(ids.shape)}"
            )
        vocab = self.span.config.vocab_size if self.span is not None else 0
        if vocab and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise bad_request(f"prompt token ids must be in [0, {vocab})")
        if header.reuse_tokens > ids.shape[0]:
            raise bad_request(f"reuse_tokens {header.reuse_tokens} exceeds the {ids.shape[0]} prompt tokens sent")
        return ids.tolist()

    async def _reuse_prefix(
        self, session: ServerSession, header: OpenSession, prompt: Optional[list[int]], peer: str
    ) -> int:
        """Keys the session's prompt for the prefix cache and starts the session from as much of the
        prompt's cached KV as the client asked to reuse (copied into its own slice); returns how much."""
        prefixes = self.budget.prefixes
        if prompt is None or prefixes is None:
            return 0
        precision = self._precision(session.adapter)
        if session.adapter is not None:  # the adapter's very tensors: another one of the same name keys apart
            precision += f"#{session.adapter.digest}"
        root = prefix_root(self.model, header.start_block, header.end_block, precision, peer)
        session.prompt_keys = block_keys(root, prompt)
        wanted = session.prompt_keys[: header.reuse_tokens // PREFIX_BLOCK_TOKENS]
        pages = prefixes.match(wanted)
        try:
            if pages:
                sources = torch.cat([torch.arange(page.start, page.start + PREFIX_BLOCK_TOKENS) for page in pages])
                await self.scheduler.compute.run(session.cache.fill, sources)
        finally:
            prefixes.unpin(pages)
        session.position = len(pages) * PREFIX_BLOCK_TOKENS
        if (self.tier is not None or self.host_tier is not None) and len(pages) < len(wanted):
            # what left the pool: from host memory first, then from Redis
            span, config = self.span, self.span.config
            shape = (len(span), 2, config.num_key_value_heads, PREFIX_BLOCK_TOKENS, config.head_dim)
            rest = wanted[len(pages) :]
            taken = self.host_tier.take(rest, shape, span.dtype) if self.host_tier is not None else []
            if self.tier is not None and len(taken) < len(rest):
                taken += await self.tier.take(rest[len(taken) :], shape, span.dtype)

            def write() -> None:
                for page in taken:
                    session.cache.write_layers(page.unsqueeze(2), session.position, 0)
                    session.position += PREFIX_BLOCK_TOKENS

            await self.scheduler.compute.run(write)
        if self.metrics is not None:
            self.metrics.prefix_lookup(len(prompt), session.position)
        return session.position

    def _keep_prompt(self, session: ServerSession) -> None:
        """A session that ended well leaves its prompt's KV to the prefix cache (the rest goes back)."""
        prefixes = self.budget.prefixes
        if prefixes is None or session.cache is None or session.closed is not None or not session.prompt_keys:
            return
        tokens = session.kept_prompt_tokens(PREFIX_BLOCK_TOKENS)
        if tokens:
            start = session.cache.release(keep=tokens)
            session.cache = None
            prefixes.store(session.prompt_keys[: tokens // PREFIX_BLOCK_TOKENS], start)

    async def _forward(self, requests, label: "_Label") -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with self.quotas.stream(str(label.peer)):
            async for reply in self._stateless(requests, label):
                yield reply

    async def _stateless(self, requests, label: "_Label") -> AsyncIterator[runtime_pb2.ExpertResponse]:
        message = await self._next(requests)
        if message is None:
            return
        header = read_header(message, ForwardRequest)
        adapter = self._served_adapter(header.adapter, header.start_block, header.end_block)
        async with self._open(header, header.batch_size, header.total_tokens, "", label) as session:
            session.adapter = adapter
            step = Step(position=0)
            while True:
                yield await self._run_step(session, step, message, header)
                if session.position == session.max_length:
                    return
                message = await self._next(requests)
                if message is None:
                    raise bad_request(f"stream ended after {session.position} of {session.max_length} tokens")
                step = read_header(message, Step)

    @contextlib.asynccontextmanager
    async def _open(
        self, header: OpenSession | ForwardRequest, batch: int, max_length: int, key: str, label: "_Label"
    ) -> AsyncIterator[ServerSession]:
        """A session's whole lifetime: checked, within its peer's quota, its cache reserved and admitted,
        registered under `key` (a stateless forward has none) and timed; on every way out its cache
        and its share of the peer's quota go back."""
        self._check_open(header, batch, max_length)
        persistent = isinstance(header, OpenSession)
        peer = str(label.peer)
        with contextlib.ExitStack() as quota:
            quota.enter_context(self.quotas.session(peer, batch * max_length, persistent))
            cache = self.budget.reserve(batch, max_length)
            try:
                # Load control last: a session refused as busy (no cache room) uses none of the hourly quota.
                self.admit(self.open_sessions)
            except WireError:
                cache.release()
                raise
            async with self._registered(header, cache, batch, max_length, key, peer, label) as session:
                yield session

    @contextlib.asynccontextmanager
    async def _registered(
        self,
        header: OpenSession | ForwardRequest,
        cache: PooledCache,
        batch: int,
        max_length: int,
        key: str,
        peer: str,
        label: "_Label",
    ) -> AsyncIterator[ServerSession]:
        session = ServerSession(cache=cache, batch=batch, max_length=max_length, key=key, peer=peer, quotas=self.quotas)
        session.blocks = (header.start_block, header.end_block)
        persistent = isinstance(header, OpenSession)
        if persistent and self.move_session is not None:
            session.mover = lambda peer_id: self.move_session(session, peer_id)
        self._sessions.add(session)
        if persistent and header.session_id:
            self._keyed[header.session_id] = session
        session.timing = self.metrics.session(prompt_only=not persistent) if self.metrics is not None else None
        logger.debug(
            "session %s opened by %s: blocks %d:%d, batch %d, max_length %d",
            label.session,
            label.peer,
            header.start_block,
            header.end_block,
            batch,
            max_length,
        )
        ok = False
        try:
            yield session
            ok = True
        finally:
            for stream in session.push_streams.values():
                stream.close()
            if ok:
                self._keep_prompt(session)
            self._forget(session)
            session.release()
            if session.timing is not None:
                session.timing.finished(ok=ok)

    async def _replying(self, replies: AsyncIterator, label: "_Label") -> AsyncIterator:
        """The protocol's replies, and for whatever went wrong one typed error reply, mapped here once:
        the caller's fault, a session idle too long, or the server's own failure."""
        try:
            async for reply in replies:
                yield reply
        except WireError as e:
            logger.info("session %s from %s refused: %s: %s", label.session, label.peer, e.kind.value, e.message)
            yield error_response(e)
        except asyncio.TimeoutError:
            logger.info(
                "session %s from %s closed after %.0f s idle", label.session, label.peer, self.limits.session_timeout
            )
            idle = f"session idle for more than {self.limits.session_timeout:.0f} s"
            yield error_response(WireError(ErrorKind.EXPIRED, idle))
        except Exception as e:
            logger.exception("session %s from %s failed", label.session, label.peer)
            yield error_response(WireError(ErrorKind.SERVER_ERROR, f"{type(e).__name__}: {e}"))

    # ---- one step ------------------------------------------------------------------------------

    async def _run_step(
        self, session: ServerSession, step: Step, message, header: OpenSession | ForwardRequest
    ) -> runtime_pb2.ExpertResponse:
        """Validates a step against its session, computes it in the next batching round, pushes the
        output on along the step's route, and returns the reply (signed, in a session)."""
        with tracing.span(
            "swarm.server.step",
            kind="server",
            parent=step.traceparent,
            attributes={
                "gen_ai.request.model": self.model,
                "swarm.blocks": f"{header.start_block}:{header.end_block}",
                "swarm.session_id": session.key or None,
                "swarm.position": step.position,
                "swarm.step_id": step.step_id,
            },
        ) as current:
            return await self._traced_step(session, step, message, header, current)

    async def _traced_step(
        self, session: ServerSession, step: Step, message, header: OpenSession | ForwardRequest, current
    ) -> runtime_pb2.ExpertResponse:
        if session.closed is not None:
            raise WireError(ErrorKind.WRONG_MODEL, session.closed)
        if step.route and self.push is None:
            raise bad_request("this server does not push steps to other servers")
        hidden, mask = await off_loop(
            lambda: self._check_step(read_tensors(message, max_count=2), session, step),
            message_bytes(message),
        )
        full_mask = session.extend_mask(mask, hidden.shape[1])
        began = time.perf_counter()
        # hidden: [batch, tokens, hidden_size]; full_mask: [batch, position + tokens] or None
        output = await self.scheduler.run(
            self.span, hidden, session.cache, full_mask, header.start_block, header.end_block, session.adapter
        )
        if session.timing is not None:
            session.timing.step(hidden.shape[1], time.perf_counter() - began)
        session.computed = True
        position = session.position
        if step.step_id:
            session.last_step_id = step.step_id
        session.position += hidden.shape[1]
        tracing.set_attributes(current, **{"swarm.tokens": hidden.shape[1], "swarm.batch_size": hidden.shape[0]})
        if step.route:
            with tracing.span("swarm.push", kind="producer", attributes={"swarm.next_peer": step.route[0].peer_id}):
                await self.push_on(session, step, output, mask)
            await _pushes_first()

        def reply() -> runtime_pb2.ExpertResponse:
            done = self._step_done(
                session, header.start_block, header.end_block, position, step.step_id, hidden, output
            )
            return pack(done, [output], request=False)

        with tracing.span("swarm.reply", kind="internal"):
            return await off_loop(reply, output.numel() * output.element_size())

    def _step_done(
        self,
        session: ServerSession,
        start: int,
        end: int,
        position: int,
        step_id: int,
        hidden: torch.Tensor,
        output: torch.Tensor,
    ) -> StepDone:
        """The reply header; in a session, with digests of the step's input and output and their signed
        receipt, which covers the dtype and the mask attended with too (a stateless forward's reply
        carries none: nobody checks it against anything)."""
        done = position + hidden.shape[1]
        if not session.key:
            return StepDone(position=done, step_id=step_id)
        input_digest, output_digest = tensor_digest(hidden), tensor_digest(output)
        receipt = ""
        if self.signer is not None:
            mask = session.mask[:, :done] if session.mask is not None else None
            message = receipt_message(
                self.model,
                start,
                end,
                session.key,
                self._precision(session.adapter),
                position,
                hidden.shape[1],
                input_digest,
                output_digest,
                mask_digest(mask, session.batch, done),
            )
            receipt = sign(self.signer, message)
        return StepDone(
            position=done, step_id=step_id, input_digest=input_digest, output_digest=output_digest, receipt=receipt
        )

    async def push_on(
        self, session: ServerSession, step: Step, output: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> None:
        """Sends the output to the route's first hop, in its dtype, with the rest of the route (its sealed
        part, for that hop to open), on the session's stream to that server; the reply to the client is
        not held up by it."""
        hop = step.route[0]
        header = Push(
            position=step.position,
            step_id=step.step_id,
            route=step.route[1:],
            sealed_route=step.sealed_route,
            rewind=step.rewind,
            session_id=hop.session_id,
            traceparent=tracing.traceparent(),
        )
        message = await off_loop(
            lambda: pack(
                header, [output.to(parse_dtype(hop.dtype))] + ([mask] if mask is not None else []), request=True
            ),
            output.numel() * output.element_size(),
        )
        key = (hop.peer_id, hop.session_id)
        if key not in session.push_streams:
            session.push_streams[key] = self.push(hop, lambda reason: session.push_failed(key, reason))
        session.push_streams[key].send(message)

    async def _next(self, requests) -> Optional[runtime_pb2.ExpertRequest]:
        return await asyncio.wait_for(anext(requests, None), timeout=self.limits.session_timeout)

    def _check_open(self, header: OpenSession | ForwardRequest, batch: int, max_length: int) -> None:
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

    def _check_step(
        self, tensors: list[torch.Tensor], session: ServerSession, step: Step
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch, position, max_length = session.batch, session.position, session.max_length
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
        if not all_finite(hidden):
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


async def _pushes_first() -> None:
    """Yields the event loop twice after a step's push is queued: the other steps of its round queue
    theirs (their coroutines are next in line), then the push streams write them all, and only then
    does any step build its reply. The next server's round waits for every push of this one, the
    client for its replies from this span not at all. (Sixteen sessions on 2 cores: the next server's
    round began 16 ms after this one's end instead of 26, while this server built its replies.)"""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def _probe(message: runtime_pb2.ExpertRequest) -> Optional[ImportProbe]:
    """An import's first message as an `ImportProbe` (checked), or None if it is the `ImportSession`."""
    return read_header(message, ImportProbe) if b"probe_keys" in message.metadata else None
