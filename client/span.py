"""One server's span of a chain: an open inference session (its stream, what it was sent and answered,
its receipts), and a stateless forward through one span."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Collection, Optional, Sequence

import torch
from hivemind.p2p import P2P

from blocks.adapters import LoraAdapter
from blocks.checkpoint import parse_dtype
from client.errors import InputMismatch, ServerFailure, SessionMoved
from client.routing import SpanPlan
from client.server_errors import TRANSPORT_ERRORS, check_output, server_errors
from client.streams import RequestStream, connect
from dht.records import ServerInfo
from protocol.errors import WireError
from protocol.messages import (
    RPC_FORWARD,
    RPC_INFERENCE,
    ClientAdapter,
    Expect,
    ForwardRequest,
    Hop,
    Moved,
    MoveSession,
    OpenSession,
    PushFailed,
    SessionOpened,
    Step,
    StepDone,
    pack,
    read_header,
)
from protocol.receipts import TIER_TARGET, Receipt, export_message, mask_digest, precision, verify
from protocol.routes import new_route_key, seal_route
from protocol.tensors import message_bytes, off_loop, read_tensors, tensor_digest
from telemetry import tracing

logger = logging.getLogger(__name__)


class SpanSession:
    """Blocks [plan.start, plan.end) on server plan.peer_id, with the KV cache kept there."""

    def __init__(self, plan: SpanPlan, timeout: float, keep_outputs: bool = False):
        self.plan = plan
        self.keep_outputs = keep_outputs
        self.timeout = timeout
        self.dtype = parse_dtype(plan.info.record.dtype)
        self.position = 0
        # This server's id of the session: only the client and the previous server of the chain know it
        # (later hops travel sealed, `protocol.routes`); the route key opens what is sealed for it.
        self.key = uuid.uuid4().hex
        self.route_key = new_route_key()
        self._stream = RequestStream(is_notice=_is_push_failure)
        self._inputs: list[torch.Tensor] = []  # what this server has received, to rebuild its cache elsewhere
        self._mask: Optional[torch.Tensor] = None  # [batch, position] the mask it attended with (None: all)
        self._outputs: list[torch.Tensor] = []  # what it answered, for spot checks
        self.receipts: list[Receipt] = []  # its signatures of each step, for evidence against it
        self.model = ""
        self.adapter = ""  # the LoRA adapter the session runs with (its receipts name it)
        self.verified = 0  # positions [0, verified) of its outputs agreed with a recomputation
        self.checks = 0  # spot checks started on this span
        self.checking = False  # one is in flight
        self.rewound_to: list[int] = []  # the position of each rewind so far, in order
        self._rewind = False
        self.bridge = ""  # the bridge this span's stream goes through, if the server is unreachable
        self.cached = 0  # positions the server started the session from, out of its prefix cache
        self.prompted = False  # the server was told the session's prompt ids (it keeps their KV at the end)

    @property
    def rewinds(self) -> int:
        return len(self.rewound_to)

    @property
    def max_chunk_tokens(self) -> int:
        return self.plan.info.record.max_chunk_tokens

    def hop(self) -> tuple[Hop, str]:
        """Where the previous server of the chain pushes this span's input, and this span's route key
        (to seal its layer of a route: the key itself never leaves the client)."""
        record = self.plan.info.record
        hop = Hop(
            peer_id=self.plan.peer_id,
            session_id=self.key,
            addrs=record.addrs,
            bridge_addrs=record.bridge_addrs,
            dtype=record.dtype,
        )
        return hop, self.route_key

    def history(self) -> Optional[torch.Tensor]:
        """Inputs of block `plan.start` at every position this span has processed ([batch, position, hidden]),
        or None before its first step."""
        return torch.cat(self._inputs, dim=1) if self._inputs else None

    def outputs(self) -> Optional[torch.Tensor]:
        """This span's outputs at every position it has processed, as the client received them (kept
        only with `keep_outputs`, for spot checks)."""
        return torch.cat(self._outputs, dim=1) if self._outputs else None

    def moved_to(self, plan: SpanPlan) -> "SpanSession":
        """This span's session as another server took it over (`SessionMoved`): the same session id,
        route key, history and position, on `plan`'s server; its receipts and checks start anew
        there (what this server computed stays this server's: `verified` is where the other's begin).
        Open it with `resume`."""
        other = SpanSession(plan, self.timeout, self.keep_outputs)
        other.key, other.route_key, other.model, other.adapter = self.key, self.route_key, self.model, self.adapter
        other._inputs, other._outputs, other._mask = list(self._inputs), list(self._outputs), self._mask
        other.position = other.verified = self.position
        other.rewound_to, other.cached, other.prompted = list(self.rewound_to), self.cached, self.prompted
        return other

    async def resume(
        self,
        p2p: P2P,
        moved: Optional[Moved],
        exporter: ServerInfo,
        batch_size: int,
        max_length: int,
        avoid_bridges=(),
    ) -> None:
        """Attaches to the session `exporter` handed over to this span's server (or, with `moved.tier`,
        kept in a KV tier this span's server reaches), once `moved` is shown to be the exporter's signed
        word for this session at this position (ServerFailure otherwise). Without `moved` (the exporter
        failed, perhaps after keeping the session in its tier, perhaps before telling us), it asks the
        tier for it: the server checks the exporter's signature on what it finds, and the position
        must be this span's."""
        record = exporter.record
        if moved is not None:
            self._check_notice(moved, exporter, batch_size, max_length)
        header = self._open_header(
            batch_size,
            max_length,
            adapter=self.adapter,
            resume=True,
            from_tier=moved is None or moved.tier,
            exporter_key=record.receipt_key if moved is None or moved.tier else "",
        )
        opened = await self._open_stream(p2p, header, [], avoid_bridges)
        if opened.cached_tokens != self.position:
            await self._stream.close()
            raise ServerFailure(self.plan.peer_id, f"resumed at {opened.cached_tokens}, not {self.position}")

    def _open_header(self, batch_size: int, max_length: int, **fields) -> OpenSession:
        """The `OpenSession` of this span's session, with `fields` (how it opens)."""
        return OpenSession(
            model=self.model,
            start_block=self.plan.start,
            end_block=self.plan.end,
            max_length=max_length,
            batch_size=batch_size,
            session_id=self.key,
            route_key=self.route_key,
            **fields,
        )

    def _check_notice(self, moved: Moved, exporter: ServerInfo, batch_size: int, max_length: int) -> None:
        """ServerFailure unless `moved` is `exporter`'s signed word for this session at this position."""
        record = exporter.record
        signed = export_message(
            self.model,
            self.plan.start,
            self.plan.end,
            self.key,
            precision(record.dtype, record.quant, self.adapter),
            batch_size,
            max_length,
            moved.position,
            moved.digest,
            TIER_TARGET if moved.tier else moved.moved_to,
        )
        if moved.position != self.position or (not moved.tier and moved.moved_to != self.plan.peer_id):
            raise ServerFailure(exporter.peer_id, f"handed over position {moved.position}, not {self.position}")
        if not record.receipt_key or not verify(record.receipt_key, signed, moved.signature):
            raise ServerFailure(exporter.peer_id, "said it handed its session over, without its signature")

    async def request_move(self, peer_id: str) -> Moved:
        """Asks this span's server to hand the session over to `peer_id` now (between steps): its
        signed `Moved` notice, or the error it answered (the session then stays there)."""
        with server_errors(self.plan.peer_id, lambda: self.bridge):
            self._stream.send(pack(MoveSession(move_to=peer_id), request=True))
            reply = await self._stream.receive(self.timeout)
            moved = _moved(reply)
            if moved is None:
                read_header(reply, StepDone)  # an error reply raises; anything else is a broken server
                raise ServerFailure(self.plan.peer_id, "answered a move with a step")
        return moved

    def rewind(self, position: int) -> None:
        """Forgets positions from `position` on; the next step tells the server to do the same."""
        if position < self.position:
            self._inputs = _trimmed(self._inputs, position)
            self._mask = self._mask[:, :position] if self._mask is not None else None
            self._outputs = _trimmed(self._outputs, position)
            self.receipts = [receipt for receipt in self.receipts if receipt.position + receipt.tokens <= position]
            self.position = position
            self.verified = min(self.verified, position)
            self.rewound_to.append(position)
            self._rewind = True

    async def open(
        self,
        p2p: P2P,
        model: str,
        batch_size: int,
        max_length: int,
        avoid_bridges: Collection[str] = (),
        prompt: Optional[torch.Tensor] = None,
        reuse: int = 0,
        adapter: str = "",
        own: Optional[LoraAdapter] = None,
    ) -> None:
        """Opens the session; with `prompt` (its token ids, [tokens] int64, batch of one), the server
        keeps the prompt's KV when the session ends, and starts it from up to `reuse` tokens of it
        that it kept before (`cached`: how many; `adopt` the inputs and outputs of those). With
        `adapter`, the session runs with that LoRA adapter: one the server serves, or `own`, the
        client's, whose tensors for this span are sent along."""
        self.model = model
        self.adapter = adapter
        reuse = reuse if prompt is not None else 0
        sent, client_adapter = _own_adapter(own)
        header = self._open_header(
            batch_size, max_length, reuse_tokens=reuse, adapter=adapter, client_adapter=client_adapter
        )
        opened = await self._open_stream(p2p, header, ([prompt] if prompt is not None else []) + sent, avoid_bridges)
        if opened.cached_tokens > reuse:
            await self._stream.close()
            raise ServerFailure(
                self.plan.peer_id, f"claims {opened.cached_tokens} cached tokens, {reuse} were asked for"
            )
        self.cached = self.position = opened.cached_tokens
        self.prompted = prompt is not None

    async def _open_stream(
        self, p2p: P2P, header: OpenSession, tensors: list[torch.Tensor], avoid_bridges: Collection[str]
    ) -> SessionOpened:
        """Opens this span's stream to its server with `header` (and `tensors`); the server's answer."""
        with server_errors(self.plan.peer_id, lambda: self.bridge):
            try:
                target = await connect(p2p, self.plan, self.timeout, avoid_bridges)
                self.bridge = target.bridge
                await asyncio.wait_for(self._stream.open(p2p, target, RPC_INFERENCE), self.timeout)
                self._stream.send(pack(header, tensors, request=True))
                return read_header(await self._stream.receive(self.timeout), SessionOpened)
            except Exception:
                await self._stream.close()
                raise

    def adopt(self, inputs: torch.Tensor, outputs: Optional[torch.Tensor], tokens: int) -> None:
        """Takes positions [0, tokens) of a prompt the server holds in its prefix cache as this span's
        own: what it was sent and answered for them in the session that left them there. The server
        forgets what it holds beyond `tokens` at the next step."""
        if not 0 <= tokens <= self.position:
            raise ValueError(f"the server holds {self.position} cached tokens, not {tokens}")
        self._inputs = [inputs[:, :tokens]] if tokens else []
        self._outputs = [outputs[:, :tokens]] if tokens and self.keep_outputs and outputs is not None else []
        self._rewind = tokens < self.position
        self.position = tokens

    async def step(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Sends new positions [batch, tokens, hidden] (in pieces within this server's chunk limit) and
        returns the span's output for them. `mask` [batch, tokens] covers the new positions only:
        the server keeps the session's mask."""
        limit = self.plan.info.record.max_chunk_tokens
        outputs = []
        for offset in range(0, hidden.shape[1], limit):
            part = hidden[:, offset : offset + limit]
            part_mask = mask[:, offset : offset + part.shape[1]] if mask is not None else None
            outputs.append(await self._step(part, part_mask))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def _step(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        await self.send(hidden, mask, 0)  # unnumbered: only routed steps can arrive twice
        return await self.receive(hidden, mask)

    @property
    def rewinding(self) -> bool:
        """The server still holds positions this span has forgotten (see `rewind`)."""
        return self._rewind

    async def send(
        self,
        hidden: torch.Tensor,
        mask: Optional[torch.Tensor],
        step_id: int,
        route: Sequence[tuple[Hop, str]] = (),
        rewind: bool = False,
    ) -> None:
        """Sends one step (within this server's chunk limit); with a `route` (later spans' `hop()`), the
        server pushes its output along it, each server learning only its own next hop (with `rewind`,
        every server on the way first forgets what follows the step's position). The reply is read
        by `receive`. A long input is converted and serialized on a worker thread."""
        rewind = rewind or self._rewind
        trace = tracing.traceparent()  # the current step's span: the server's span of it is its child
        header = Step(position=self.position, step_id=step_id, rewind=rewind, traceparent=trace)
        if route:
            first, sealed = seal_route(route, step_id, self.position, rewind)
            header = Step(
                position=self.position,
                step_id=step_id,
                route=(first,),
                sealed_route=sealed,
                rewind=rewind,
                traceparent=trace,
            )
        self._rewind = False
        self._stream.send(await packed(header, hidden, mask, self.dtype))

    def expect(self, step_id: int) -> None:
        """Tells the server that step `step_id` comes pushed by the previous one: nothing to compute,
        but a write on a dead server's stream fails at once instead of after the read timeout."""
        self._stream.send(pack(Expect(expect_step=step_id), request=True))

    async def receive(
        self,
        hidden: torch.Tensor,
        mask: Optional[torch.Tensor],
        previous_peer_id: str = "",
        step_id: Optional[int] = None,
    ) -> torch.Tensor:
        """This span's output for the step whose input was `hidden` and whose new mask columns were `mask`
        (sent by us, or pushed to the server by the previous one, `previous_peer_id`, as step
        `step_id`: if its reply is late, an `Expect` probes the stream); the input is kept to rebuild
        the cache elsewhere."""
        nudge = (lambda: self.expect(step_id)) if step_id is not None else None
        with server_errors(self.plan.peer_id, lambda: self.bridge):
            reply = await self._stream.receive(self.timeout, nudge)
            moved = _moved(reply)
            if moved is not None:
                raise SessionMoved(self.plan.peer_id, moved)
            done = read_header(reply, StepDone)
        full_mask = self._extended_mask(mask, hidden.shape[0], hidden.shape[1])
        output, receipt = await off_loop(
            lambda: self._check_reply(reply, done, hidden, full_mask, previous_peer_id), message_bytes(reply)
        )
        self.position = done.position
        self._inputs.append(hidden)
        self._mask = full_mask
        if self.keep_outputs:
            self._outputs.append(output)
            if receipt is not None:
                self.receipts.append(receipt)
        self._rewind = False  # the server holds exactly this position now
        return output

    def _check_reply(
        self,
        reply,
        done: StepDone,
        hidden: torch.Tensor,
        mask: Optional[torch.Tensor],
        previous_peer_id: str,
    ) -> tuple[torch.Tensor, Optional[Receipt]]:
        """The reply's output and receipt, checked against what was sent (on a worker thread when large)."""
        with server_errors(self.plan.peer_id, lambda: self.bridge):
            outputs = read_tensors(reply, max_count=1)
        if done.position != self.position + hidden.shape[1] or len(outputs) != 1:
            raise ServerFailure(
                self.plan.peer_id, f"inconsistent reply: position {done.position}, {len(outputs)} tensors"
            )
        sent = tensor_digest(hidden.to(self.dtype))
        if done.input_digest and done.input_digest != sent:
            raise InputMismatch(self.plan.peer_id, previous_peer_id or "(none: the client sent it)")
        receipt = self._receipt(done, sent, hidden.shape[1], outputs[0], mask)
        return check_output(self.plan.peer_id, outputs[0], hidden, self.dtype), receipt

    def _extended_mask(self, new: Optional[torch.Tensor], batch: int, tokens: int) -> Optional[torch.Tensor]:
        """The mask of every position through this step (None while every position so far is attended)."""
        if new is None and self._mask is None:
            return None
        before = self._mask if self._mask is not None else torch.ones(batch, self.position, dtype=torch.bool)
        columns = new.ne(0) if new is not None else torch.ones(batch, tokens, dtype=torch.bool)
        return torch.cat([before, columns], dim=1)

    def _receipt(
        self, done: StepDone, sent: str, tokens: int, output: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> Optional[Receipt]:
        """The step's receipt, checked: a server that announces a receipt key must sign every step, over
        the digests of what the client sent (`sent`), what it received, and the mask attended with."""
        key = self.plan.info.record.receipt_key
        if not key:
            return None
        receipt = Receipt(self.position, tokens, done.input_digest, done.output_digest, done.receipt)
        signed = receipt.message(
            self.model,
            self.plan.start,
            self.plan.end,
            self.key,
            precision(self.plan.info.record.dtype, self.plan.info.record.quant, self.adapter),
            mask_digest(mask, output.shape[0], self.position + tokens),
        )
        if (
            done.input_digest != sent
            or done.output_digest != tensor_digest(output)
            or not verify(key, signed, done.receipt)
        ):
            raise ServerFailure(self.plan.peer_id, "reply without a valid receipt of the step")
        return receipt

    def failed_pushes(self) -> list[str]:
        """Peers this server has said, since the last call, that it cannot push to (`PushFailed`)."""
        failed = []
        while not self._stream.notices.empty():
            failed.append(read_header(self._stream.notices.get_nowait(), PushFailed).failed_push_to)
        return failed

    async def push_failure(self, peer_id: str) -> str:
        """Waits until this server says it cannot push to `peer_id`; returns its reason."""
        while True:
            notice = read_header(await self._stream.notices.get(), PushFailed)
            if notice.failed_push_to == peer_id:
                return notice.reason

    async def close(self) -> None:
        await self._stream.close()


def _trimmed(chunks: list[torch.Tensor], position: int) -> list[torch.Tensor]:
    """The chunks [batch, tokens, ...] of positions [0, position): a rewind by a few positions (a
    speculative step's rejected draft) drops or cuts the last chunks and copies nothing."""
    kept, total = [], 0
    for chunk in chunks:
        if total >= position:
            break
        kept.append(chunk if total + chunk.shape[1] <= position else chunk[:, : position - total])
        total += kept[-1].shape[1]
    return kept


def _moved(reply) -> Optional[Moved]:
    """A server's `Moved` reply (it carries no tensors), or None for any other reply."""
    if reply.tensors:
        return None
    try:
        return read_header(reply, Moved)
    except WireError:
        return None


def _is_push_failure(reply) -> bool:
    """Whether a reply is a server's unasked `PushFailed` notice (it carries no tensors)."""
    if reply.tensors:
        return False
    try:
        read_header(reply, PushFailed)
    except WireError:
        return False
    return True


async def packed(header, hidden: torch.Tensor, mask: Optional[torch.Tensor], dtype: torch.dtype):
    """A step's request: `hidden` in the server's `dtype` and the mask, converted and serialized on a
    worker thread if they are large."""

    def build():
        return pack(header, [hidden.to(dtype)] + ([mask] if mask is not None else []), request=True)

    return await off_loop(build, hidden.numel() * hidden.element_size())


def _own_adapter(own: Optional[LoraAdapter]) -> tuple[list[torch.Tensor], Optional[ClientAdapter]]:
    """The tensors and description of the client's own adapter for one span (nothing without one)."""
    if own is None or not own.layers:
        return [], None
    entries = [(block, module) for block, modules in sorted(own.layers.items()) for module in sorted(modules)]
    tensors = [tensor for block, module in entries for tensor in own.layers[block][module][:2]]
    return tensors, ClientAdapter(alpha=own.config.alpha, rslora=own.config.rslora, entries=tuple(entries))


async def forward_span(
    p2p: P2P,
    model: str,
    plan: SpanPlan,
    hidden: torch.Tensor,
    mask: Optional[torch.Tensor],
    chunk: int,
    timeout: float,
    adapter: str = "",
) -> torch.Tensor:
    """A stateless forward of [batch, tokens, hidden] through one span, sent in token chunks (with
    `adapter`, a LoRA adapter the server serves).

    It is idempotent, so a forward that timed out or lost its stream is sent once more on a fresh
    stream before the server is blamed: rarely, the first message of a new stream is lost between two
    libp2p daemons, and the server never saw the request. An error the server answered is final."""
    try:
        return await _forward_once(p2p, model, plan, hidden, mask, chunk, timeout, adapter, fresh=False)
    except ServerFailure as e:
        if not isinstance(e.__cause__, (asyncio.TimeoutError, *TRANSPORT_ERRORS)):
            raise
        logger.info("stateless forward to %s failed (%s); sending it again on a fresh stream", plan.peer_id, e)
    return await _forward_once(p2p, model, plan, hidden, mask, chunk, timeout, adapter, fresh=True)


async def _forward_once(
    p2p: P2P,
    model: str,
    plan: SpanPlan,
    hidden: torch.Tensor,
    mask: Optional[torch.Tensor],
    chunk: int,
    timeout: float,
    adapter: str,
    fresh: bool,
) -> torch.Tensor:
    stream = RequestStream()
    dtype = parse_dtype(plan.info.record.dtype)
    batch, total = hidden.shape[:2]
    chunk = min(chunk, plan.info.record.max_chunk_tokens)
    outputs = []
    target = None
    try:
        with server_errors(plan.peer_id, lambda: target.bridge if target is not None else ""):
            target = await connect(p2p, plan, timeout)
            await asyncio.wait_for(stream.open(p2p, target, RPC_FORWARD, fresh), timeout)
            for position in range(0, total, chunk):
                part = hidden[:, position : position + chunk]
                part_mask = mask[:, position : position + part.shape[1]] if mask is not None else None
                header = (
                    ForwardRequest(
                        model=model,
                        start_block=plan.start,
                        end_block=plan.end,
                        batch_size=batch,
                        total_tokens=total,
                        adapter=adapter,
                    )
                    if position == 0
                    else Step(position=position)
                )
                stream.send(await packed(header, part, part_mask, dtype))
                reply = await stream.receive(timeout)
                read_header(reply, StepDone)
                outputs.append(await off_loop(lambda: _checked(plan.peer_id, reply, part, dtype), message_bytes(reply)))
    finally:
        await stream.close()
    return torch.cat(outputs, dim=1)


def _checked(peer_id: str, reply, sent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stateless forward's output, read and checked against what was sent (on a worker thread when large)."""
    replied = read_tensors(reply, max_count=1)
    if len(replied) != 1:
        raise ServerFailure(peer_id, f"inconsistent reply: {len(replied)} tensors")
    return check_output(peer_id, replied[0], sent, dtype)
