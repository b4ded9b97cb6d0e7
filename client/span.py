"""One open inference stream to one server for a block range; it turns wire errors into client errors."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import AsyncIterator, Callable, Collection, Optional, Sequence

import torch
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError

from blocks.checkpoint import parse_dtype
from bridge.dial import Target, iterate, reach
from client.errors import BadRequestError, InputMismatch, ServerFailure, SwarmBusyError, SwarmError
from client.routing import SpanPlan
from protocol.errors import ErrorKind, MalformedMessage, WireError
from protocol.messages import (
    RPC_FORWARD,
    RPC_INFERENCE,
    Expect,
    ForwardRequest,
    Hop,
    OpenSession,
    SessionOpened,
    Step,
    StepDone,
    pack,
    read_header,
)
from protocol.receipts import Receipt, verify
from protocol.tensors import read_tensors, tensor_digest

logger = logging.getLogger(__name__)


# A pushed step's reply that takes longer than this makes the client write a small `Expect` on the
# server's stream: a write to a dead server fails at once, where a read might wait out the whole timeout.
NUDGE_AFTER = 1.0

# What a failing link or peer raises: the server's fault (or its network's), never the caller's.
TRANSPORT_ERRORS = (ConnectionError, OSError, EOFError, P2PDaemonError, P2PHandlerError, asyncio.IncompleteReadError)


def to_client_error(peer_id: str, error: BaseException, bridge: str = "") -> BaseException:
    """Maps what went wrong talking to one server to the error type that says what the caller should do.

    Only what the server or the link to it did is a `ServerFailure` (ban, reroute): transport errors,
    timeouts, errors the server reports as its own, a reply that cannot be parsed, and a server that no
    longer serves what its record says (it has just moved blocks). Anything else is this process's own
    bug and is returned as it is, so that it propagates at once and bans nobody.
    """
    if isinstance(error, SwarmError):
        return error
    if isinstance(error, MalformedMessage):
        return ServerFailure(peer_id, f"malformed reply: {error.message}", bridge)
    if isinstance(error, WireError):
        if error.kind == ErrorKind.BAD_REQUEST:
            return BadRequestError(f"server {peer_id} refused the request: {error.message}")
        if error.kind == ErrorKind.BUSY:
            return SwarmBusyError(f"server {peer_id} is busy: {error.message}", peer_id=peer_id)
        if error.kind == ErrorKind.WRONG_MODEL:
            return ServerFailure(peer_id, f"serves other blocks than it announced: {error.message}", bridge)
        return ServerFailure(peer_id, error.message, bridge)
    if isinstance(error, asyncio.TimeoutError):
        return ServerFailure(peer_id, "timed out", bridge)
    if isinstance(error, TRANSPORT_ERRORS):
        return ServerFailure(peer_id, f"{type(error).__name__}: {error}", bridge)
    return error


def raise_for_server(peer_id: str, error: BaseException, bridge: str = "") -> None:
    """Raises what `to_client_error` maps `error` to (the error itself, traceback kept, if it is ours)."""
    mapped = to_client_error(peer_id, error, bridge)
    if mapped is error:
        raise error
    raise mapped from error


def check_output(peer_id: str, output: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A span's output must have its input's shape, the announced dtype and finite values, or the server failed."""
    if output.shape != like.shape or output.dtype != dtype:
        raise ServerFailure(
            peer_id,
            f"reply of shape {list(output.shape)} and dtype {output.dtype}, expected {list(like.shape)} and {dtype}",
        )
    if not bool(torch.isfinite(output).all()):
        raise ServerFailure(peer_id, "reply holds NaN or infinite values")
    return output


async def connect(p2p: P2P, plan: SpanPlan, timeout: float, avoid_bridges: Collection[str] = ()) -> Target:
    """Dials the server of `plan`, or the first of its bridges that answers (those in `avoid_bridges`,
    which failed lately, only if no other is left); a failure is the server's."""
    record = plan.info.record
    bridges = [addr for addr in record.bridge_addrs if addr not in avoid_bridges] or list(record.bridge_addrs)
    try:
        return await reach(p2p, plan.peer_id, record.addrs, bridges, timeout)
    except Exception as e:
        raise ServerFailure(plan.peer_id, f"cannot connect: {e}") from e


class RequestStream:
    """A request queue feeding a hivemind protobuf stream, and its reply iterator."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self.replies: Optional[AsyncIterator] = None

    async def _requests(self):
        while True:
            message = await self._queue.get()
            if message is None:
                return
            yield message

    async def open(self, p2p: P2P, target: Target, handler: str) -> None:
        self.replies = await iterate(p2p, target, handler, self._requests())

    def send(self, message) -> None:
        self._queue.put_nowait(message)

    async def receive(self, timeout: float, nudge: Optional[Callable[[], None]] = None):
        """The next reply; `nudge` is called once if none has come within `NUDGE_AFTER` seconds."""
        late = (
            asyncio.get_running_loop().call_later(NUDGE_AFTER, nudge)
            if nudge is not None and NUDGE_AFTER < timeout
            else None
        )
        try:
            reply = await asyncio.wait_for(anext(self.replies, None), timeout)
        finally:
            if late is not None:
                late.cancel()
        if reply is None:
            raise ConnectionError("stream closed by the server")
        return reply

    async def close(self) -> None:
        self._queue.put_nowait(None)
        if self.replies is not None:
            try:
                await self.replies.aclose()
            except Exception:
                logger.debug("error while closing a stream", exc_info=True)


class SpanSession:
    """Blocks [plan.start, plan.end) on server plan.peer_id, with the KV cache kept there."""

    def __init__(self, plan: SpanPlan, timeout: float, keep_outputs: bool = False):
        self.plan = plan
        self.keep_outputs = keep_outputs
        self.timeout = timeout
        self.dtype = parse_dtype(plan.info.record.dtype)
        self.position = 0
        self.key = uuid.uuid4().hex  # this server's id of the session: only the client and the previous server know it
        self._stream = RequestStream()
        self._step_id = 0
        self._inputs: list[torch.Tensor] = []  # what this server has received, to rebuild its cache elsewhere
        self._outputs: list[torch.Tensor] = []  # what it answered, for spot checks
        self.receipts: list[Receipt] = []  # its signatures of each step, for evidence against it
        self.model = ""
        self.verified = 0  # positions [0, verified) of its outputs agreed with a recomputation
        self.checks = 0  # spot checks started on this span
        self.checking = False  # one is in flight
        self.rewinds = 0
        self._rewind = False
        self.bridge = ""  # the bridge this span's stream goes through, if the server is unreachable

    @property
    def max_chunk_tokens(self) -> int:
        return self.plan.info.record.max_chunk_tokens

    def hop(self) -> Hop:
        """Where the previous server of the chain pushes this span's input."""
        record = self.plan.info.record
        return Hop(
            peer_id=self.plan.peer_id,
            session_id=self.key,
            addrs=record.addrs,
            bridge_addrs=record.bridge_addrs,
            dtype=record.dtype,
        )

    def history(self) -> Optional[torch.Tensor]:
        """Inputs of block `plan.start` at every position this span has processed ([batch, position, hidden]),
        or None before its first step."""
        return torch.cat(self._inputs, dim=1) if self._inputs else None

    def outputs(self) -> Optional[torch.Tensor]:
        """This span's outputs at every position it has processed, as the client received them (kept
        only with `keep_outputs`, for spot checks)."""
        return torch.cat(self._outputs, dim=1) if self._outputs else None

    def rewind(self, position: int) -> None:
        """Forgets positions from `position` on; the next step tells the server to do the same."""
        if position < self.position:
            self._inputs = [self.history()[:, :position]] if position else []
            self._outputs = [self.outputs()[:, :position]] if position and self._outputs else []
            self.receipts = [receipt for receipt in self.receipts if receipt.position + receipt.tokens <= position]
            self.position = position
            self.verified = min(self.verified, position)
            self.rewinds += 1
            self._rewind = True

    async def open(
        self, p2p: P2P, model: str, batch_size: int, max_length: int, avoid_bridges: Collection[str] = ()
    ) -> None:
        self.model = model
        try:
            target = await connect(p2p, self.plan, self.timeout, avoid_bridges)
            self.bridge = target.bridge
            await asyncio.wait_for(self._stream.open(p2p, target, RPC_INFERENCE), self.timeout)
            self._stream.send(
                pack(
                    OpenSession(
                        model=model,
                        start_block=self.plan.start,
                        end_block=self.plan.end,
                        max_length=max_length,
                        batch_size=batch_size,
                        session_id=self.key,
                    ),
                    request=True,
                )
            )
            read_header(await self._stream.receive(self.timeout), SessionOpened)
        except Exception as e:
            await self._stream.close()
            raise_for_server(self.plan.peer_id, e, self.bridge)

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
        self._step_id += 1
        self.send(hidden, mask, self._step_id)
        return await self.receive(hidden)

    @property
    def rewinding(self) -> bool:
        """The server still holds positions this span has forgotten (see `rewind`)."""
        return self._rewind

    def send(
        self,
        hidden: torch.Tensor,
        mask: Optional[torch.Tensor],
        step_id: int,
        route: Sequence[Hop] = (),
        rewind: bool = False,
    ) -> None:
        """Sends one step (within this server's chunk limit); with a `route`, the server pushes its
        output along it (with `rewind`, every server on the way first forgets what follows the
        step's position). The reply is read by `receive`."""
        tensors = [hidden.to(self.dtype)] + ([mask] if mask is not None else [])
        header = Step(position=self.position, step_id=step_id, route=tuple(route), rewind=rewind or self._rewind)
        self._stream.send(pack(header, tensors, request=True))
        self._rewind = False

    def expect(self, step_id: int) -> None:
        """Tells the server that step `step_id` comes pushed by the previous one: nothing to compute,
        but a write on a dead server's stream fails at once instead of after the read timeout."""
        self._stream.send(pack(Expect(expect_step=step_id), request=True))

    async def receive(
        self, hidden: torch.Tensor, previous_peer_id: str = "", step_id: Optional[int] = None
    ) -> torch.Tensor:
        """This span's output for the step whose input was `hidden` (sent by us, or pushed to the server
        by the previous one, `previous_peer_id`, as step `step_id`: if its reply is late, an `Expect`
        probes the stream); the input is kept to rebuild the cache elsewhere."""
        nudge = (lambda: self.expect(step_id)) if step_id is not None else None
        try:
            reply = await self._stream.receive(self.timeout, nudge)
            done = read_header(reply, StepDone)
            outputs = read_tensors(reply, max_count=1)
        except Exception as e:
            raise_for_server(self.plan.peer_id, e, self.bridge)
        if done.position != self.position + hidden.shape[1] or len(outputs) != 1:
            raise ServerFailure(
                self.plan.peer_id, f"inconsistent reply: position {done.position}, {len(outputs)} tensors"
            )
        sent = tensor_digest(hidden.to(self.dtype))
        if done.input_digest and done.input_digest != sent:
            raise InputMismatch(self.plan.peer_id, previous_peer_id or "(none: the client sent it)")
        receipt = self._receipt(done, sent, hidden.shape[1], outputs[0])
        output = check_output(self.plan.peer_id, outputs[0], hidden, self.dtype)
        self.position = done.position
        self._inputs.append(hidden)
        if self.keep_outputs:
            self._outputs.append(output)
            if receipt is not None:
                self.receipts.append(receipt)
        self._rewind = False  # the server holds exactly this position now
        return output

    def _receipt(self, done: StepDone, sent: str, tokens: int, output: torch.Tensor) -> Optional[Receipt]:
        """The step's receipt, checked: a server that announces a receipt key must sign every step, over
        the digests of what the client sent (`sent`) and what it received."""
        key = self.plan.info.record.receipt_key
        if not key:
            return None
        receipt = Receipt(self.position, tokens, done.input_digest, done.output_digest, done.receipt)
        if (
            done.input_digest != sent
            or done.output_digest != tensor_digest(output)
            or not verify(key, receipt.message(self.model, self.plan.start, self.plan.end, self.key), done.receipt)
        ):
            raise ServerFailure(self.plan.peer_id, "reply without a valid receipt of the step")
        return receipt

    async def close(self) -> None:
        await self._stream.close()


async def forward_span(
    p2p: P2P, model: str, plan: SpanPlan, hidden: torch.Tensor, mask: Optional[torch.Tensor], chunk: int, timeout: float
) -> torch.Tensor:
    """A stateless forward of [batch, tokens, hidden] through one span, sent in token chunks."""
    stream = RequestStream()
    dtype = parse_dtype(plan.info.record.dtype)
    batch, total = hidden.shape[:2]
    chunk = min(chunk, plan.info.record.max_chunk_tokens)
    outputs = []
    bridge = ""
    try:
        target = await connect(p2p, plan, timeout)
        bridge = target.bridge
        await asyncio.wait_for(stream.open(p2p, target, RPC_FORWARD), timeout)
        for position in range(0, total, chunk):
            part = hidden[:, position : position + chunk].to(dtype)
            tensors = [part] + ([mask[:, position : position + part.shape[1]]] if mask is not None else [])
            header = (
                ForwardRequest(
                    model=model, start_block=plan.start, end_block=plan.end, batch_size=batch, total_tokens=total
                )
                if position == 0
                else Step(position=position)
            )
            stream.send(pack(header, tensors, request=True))
            reply = await stream.receive(timeout)
            read_header(reply, StepDone)
            replied = read_tensors(reply, max_count=1)
            if len(replied) != 1:
                raise ServerFailure(plan.peer_id, f"inconsistent reply: {len(replied)} tensors")
            outputs.append(check_output(plan.peer_id, replied[0], part, dtype))
    except Exception as e:
        raise_for_server(plan.peer_id, e, bridge)
    finally:
        await stream.close()
    return torch.cat(outputs, dim=1)
