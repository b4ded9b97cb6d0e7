"""An inference session: one step of hidden states through the whole chain, KV caches kept on servers.

When a server fails mid-session (disconnect, timeout, error reply), the session bans it, routes a
replacement for exactly its blocks (possibly over several servers), replays the inputs that span has
received so far to rebuild the KV cache there, and carries on with the same step. Retries are
bounded; a request the servers call bad is never retried.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Collection, Optional

import torch

from client.adapters import SessionAdapter
from client.audit import Rollback, SessionAudit
from client.disaggregation import decode_server, prompt_goes_to_prefill
from client.errors import (
    BadPush,
    BadRequestError,
    InputMismatch,
    MissingBlocksError,
    ServerFailure,
    ServerProvenWrongError,
    SessionExpired,
    SessionMoved,
    SwarmBusyError,
    SwarmError,
)
from client.failures import FailureBudget, step_deadline
from client.prefix_memory import RememberedPrompt, RememberedSpan
from client.remote import RemoteModel
from client.router import BAN_WAIT_SECONDS, CachedChain
from client.routing import SpanPlan
from client.span import SpanSession
from protocol.messages import PREFIX_BLOCK_TOKENS
from protocol.tensors import moved
from telemetry import tracing

logger = logging.getLogger(__name__)


class InferenceSession:
    """Holds a stream to every server of a chain; `step()` sends new tokens' hidden states through all.

    Used as a context manager (`with model.inference_session(max_length=128) as session:`), it keeps
    the servers' caches across several `generate()` calls. `token_ids` and `position` let `generate()`
    continue where the previous call stopped.
    """

    def __init__(
        self,
        remote: RemoteModel,
        max_length: int,
        region: Optional[str] = None,
        adapter: Optional[SessionAdapter] = None,
    ):
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.remote = remote
        self.max_length = max_length
        self.adapter = adapter  # the LoRA adapter every span runs with (None: the model alone)
        self.session_id = uuid.uuid4().hex[:12]
        self.region = region  # the region this session's chains prefer (None: the client's own)
        self.spans: list[SpanSession] = []
        self._quant_used: set[str] = set()  # of spans no longer in use (`quant_modes`)
        self.batch_size: Optional[int] = None
        self.position = 0
        self.token_ids: Optional[torch.Tensor] = None  # every token of the session, fed or not yet fed
        self.attention_mask: Optional[torch.Tensor] = None
        self.closed = False
        self.broken: Optional[str] = None  # why the servers' caches may no longer match this session
        self.failovers = 0
        self.replayed_tokens = 0  # positions sent again to rebuild a replacement server's cache
        self.moves = 0  # spans handed to another server with their caches (nothing replayed)
        self._prefill = False  # the prompt runs on prefill servers, then the spans move to decode ones
        self.push = remote.push
        # (pusher, next server) links that failed a push: the client sends those hops' steps itself
        self.links_relayed: set[tuple[str, str]] = set()
        # With speculative decoding: the draft size and the tokens drafted, accepted and traversals made
        self.draft_size = None
        self._step_id = 0
        self._mask: Optional[torch.Tensor] = None  # the attention mask of positions [0, position), if padded
        self.cached_tokens = 0  # prompt positions the servers started this session from (prefix caches)
        self._prompt: Optional[torch.Tensor] = None  # the prompt's ids the servers were told (prefix caches)
        self._lowest_rewind: Optional[int] = None
        self.audit = SessionAudit(remote.audit, self.session_id, max_length)

    @property
    def adapter_name(self) -> Optional[str]:
        """The LoRA adapter this session runs with (None: none)."""
        return self.adapter.name if self.adapter is not None else None

    @property
    def runtime(self):
        """The client's event loop thread (`client.runtime.LoopThread`), where the session's work runs."""
        return self.remote.runtime

    @property
    def chain(self) -> list[tuple[str, int, int]]:
        """(peer id, start, end) of every span in use."""
        return [(span.plan.peer_id, span.plan.start, span.plan.end) for span in self.spans]

    @property
    def quant_modes(self) -> set[str]:
        """The quantizations of every server this session has computed on ("none": full precision)."""
        self._quant_used.update(span.plan.info.record.quant for span in self.spans)
        return set(self._quant_used)

    async def _connect(
        self,
        start: int,
        end: int,
        history: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        failures: FailureBudget,
        prompt: Optional[torch.Tensor] = None,
        remembered: Optional[RememberedPrompt] = None,
        cached: Optional[CachedChain] = None,
        prefill: bool = False,
    ) -> list[SpanSession]:
        """Opens sessions for blocks [start, end) and replays `history` (inputs of block `start` so far).
        With `prompt`, each server is told the prompt's ids and asked to reuse what it cached of them
        where `remembered` holds its span (`cached`: the chain that does, for the router).

        Server failures count toward the step's one `failures` budget; servers that answer "busy", or
        that refuse a session this long (their record did not say so), are skipped, so the loop ends
        when no other server is left."""
        batch = self.batch_size
        busy: set[str] = set()
        too_small: set[str] = set()
        last_error: Optional[Exception] = None
        while True:
            try:
                chain = await self.remote.router.chain(
                    start,
                    end,
                    exclude=busy | too_small,
                    max_length=self.max_length,
                    batch=batch,
                    wait_for_bans=BAN_WAIT_SECONDS,
                    cached=cached,
                    region=self.region,
                    adapter=self.adapter,
                    prefill=prefill,
                )
            except (MissingBlocksError, BadRequestError) as e:
                if busy:
                    raise SwarmBusyError(
                        f"swarm busy: every server for blocks {start}-{end - 1} refused a new session for lack of room"
                    ) from last_error
                if too_small and isinstance(e, MissingBlocksError):
                    raise BadRequestError(
                        f"every server for blocks {start}-{end - 1} refused a session of {self.max_length} tokens"
                        f" at batch {batch}; the last said: {last_error}"
                    ) from last_error
                raise
            opened = [
                SpanSession(plan, self.remote.request_timeout, keep_outputs=self.remote.audit.verifier is not None)
                for plan in chain
            ]
            adapters = await asyncio.gather(*(self.remote.span_adapter(self.adapter, plan) for plan in chain))
            errors: list[BaseException] = []
            try:
                # All at once: over a WAN each opening costs round trips, which a chain should pay once, not per span.
                bridges = self.remote.failures.bridges_to_avoid()
                outcomes = await asyncio.gather(
                    *(
                        span.open(
                            self.remote.p2p,
                            self.remote.model_name,
                            batch,
                            self.max_length,
                            bridges,
                            prompt,
                            min(_reusable(remembered, span.plan, span.keep_outputs), cached.tokens if cached else 0),
                            *adapter,
                        )
                        for span, adapter in zip(opened, adapters)
                    ),
                    return_exceptions=True,
                )
                errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
                if not errors:
                    if history is not None:
                        await self._replay(opened, history, mask)
                    for span in opened:
                        self.remote.bans.succeeded(span.plan.peer_id)
                    return opened
            except (SwarmBusyError, ServerFailure) as e:
                errors = [e]
            except BaseException:
                await asyncio.gather(*(span.close() for span in opened), return_exceptions=True)
                raise
            await asyncio.gather(*(span.close() for span in opened), return_exceptions=True)
            for error in errors:
                if not isinstance(error, (SwarmBusyError, ServerFailure, BadRequestError)) or (
                    isinstance(error, BadRequestError) and error.peer_id is None
                ):
                    raise error  # ours, not a server's
            for error in errors:
                if isinstance(error, SwarmBusyError):
                    busy.add(error.peer_id)
                elif isinstance(error, BadRequestError):
                    too_small.add(error.peer_id)  # opening asks only for room: a refusal is about size
                else:
                    self.remote.failures.report(error.peer_id, str(error), error.bridge)
                    failures.add(error)
            last_error = errors[0]

    async def areuse_prefix(self, ids: torch.Tensor) -> int:
        """Opens the chain for a prompt of one sequence (`ids` [tokens] int64) before its first step,
        telling every server the prompt's ids: each keeps the prompt's KV when the session ends, and
        starts this session from as much of it as it kept before and this client remembers (the
        shortest such prefix over the chain, in whole blocks). Returns how many positions the
        session holds already: the caller sends only the rest. 0 where the client keeps no memory of
        prompts (`prefix_cache_mbytes=0`)."""
        if self.spans or self.position:
            raise ValueError("reuse_prefix() comes before the session's first step")
        memory = self.remote.prefix_memory
        if memory is None or self.closed:
            return 0
        ids = ids.detach().to("cpu", torch.int64)
        if ids.ndim != 1 or not 0 < ids.shape[0] <= self.max_length:
            raise ValueError(f"prompt ids must be [tokens], 1 to {self.max_length} of them, got {list(ids.shape)}")
        entry, tokens = memory.lookup(ids)
        cached = None
        if entry is not None and tokens:
            cached = CachedChain(tuple(entry.chain), tokens, self.max_length - ids.shape[0])
        self.batch_size = 1
        failures = FailureBudget(self.remote.max_retries)
        try:
            async with step_deadline(self.remote.step_timeout, "opening the session"):
                self._prefill = await self._prompt_to_prefill(ids.shape[0] - tokens, 1)
                spans = await self._connect(
                    0, self.remote.num_blocks, None, None, failures, ids, entry, cached, prefill=self._prefill
                )
        except BaseException:
            self.batch_size = None
            raise
        held = min(span.cached for span in spans)
        for span in spans:
            kept = entry.span(span.plan.peer_id, span.plan.start, span.plan.end) if held else None
            span.adopt(kept.inputs if kept else None, kept.outputs if kept else None, held)
        self.spans, self._prompt, self.position, self.cached_tokens = spans, ids, held, held
        logger.info(
            "session %s: chain %s, %d of %d prompt tokens reused", self.session_id, self._describe(), held, len(ids)
        )
        return held

    def reuse_prefix(self, ids: torch.Tensor) -> int:
        return self.remote.runtime.run(self.areuse_prefix(ids))

    def _remember_prompt(self) -> None:
        """Keeps what each span was sent and answered for the prompt's positions, for a later session's
        reuse of the servers' prefix caches (only if every span's server was told the prompt)."""
        memory = self.remote.prefix_memory
        if memory is None or self._prompt is None or self.broken is not None:
            return
        tokens = min(self._prompt.shape[0], self.position)
        if self._lowest_rewind is not None:
            tokens = min(tokens, self._lowest_rewind)
        tokens -= tokens % PREFIX_BLOCK_TOKENS
        if not tokens or any(not span.prompted for span in self.spans):
            return
        remembered = []
        for span in self.spans:
            outputs = span.outputs()
            remembered.append(
                RememberedSpan(
                    span.plan.peer_id,
                    span.plan.start,
                    span.plan.end,
                    span.history()[:, :tokens].clone(),
                    outputs[:, :tokens].clone() if outputs is not None else None,
                )
            )
        memory.remember(self._prompt[:tokens], remembered)

    async def _replay(self, spans: list[SpanSession], history: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Rebuilds the replacement servers' caches from the inputs the failed span had received."""
        chunk = self.remote.chunk_tokens(history.shape[0])
        self.replayed_tokens += history.shape[1]
        for offset in range(0, history.shape[1], chunk):
            part = history[:, offset : offset + chunk]
            part_mask = mask[:, offset : offset + part.shape[1]] if mask is not None else None
            for span in spans:
                part = await span.step(part, part_mask)

    async def astep(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Runs new positions [batch, tokens, hidden] through every block; returns the last block's output.

        `mask` is the attention mask of the whole session so far, new tokens included ([batch, position + tokens]).
        Inputs on a device are copied to host off the event loop, and the output comes back on their device.
        """
        if self.closed:
            raise SwarmError("inference session is closed")
        if self.broken is not None:
            raise SwarmError(
                f"inference session is broken by an earlier failed step ({self.broken}); "
                f"open a new session and send its tokens again"
            )
        await self.audit.wait_for_lagging_checks()
        rollback = self.take_rollback()
        if rollback is not None:
            raise ServerProvenWrongError(
                f"server(s) {', '.join(rollback.peers)} returned wrong results: this session's outputs from "
                f"position {rollback.position} on are void; call rewind({rollback.position}) and resend"
            )
        batch, tokens = hidden.shape[:2]
        if self.spans and batch != self.batch_size:
            raise ValueError(f"session was opened with batch size {self.batch_size}, got {batch}")
        if self.position + tokens > self.max_length:
            raise ValueError(
                f"session max_length is {self.max_length} tokens; {self.position} used, {tokens} more requested"
            )
        device = hidden.device
        attributes = {"swarm.session_id": self.session_id, "swarm.position": self.position, "swarm.tokens": tokens}
        with tracing.span("swarm.client.step", kind="client", attributes=attributes):
            hidden, mask = await moved(hidden, "cpu"), await moved(mask, "cpu")
            async with step_deadline(self.remote.step_timeout, "step"):
                output = await self._step(hidden, mask)
        return await moved(output, device)

    async def _step(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        batch, tokens = hidden.shape[:2]
        failures = FailureBudget(self.remote.max_retries)
        if not self.spans:
            self.batch_size = batch
            try:
                self._prefill = await self._prompt_to_prefill(tokens, batch)
                self.spans = await self._connect(0, self.remote.num_blocks, None, None, failures, prefill=self._prefill)
            except BaseException:
                self.batch_size = None  # nothing was sent: the session can still be used
                raise
            logger.info("session %s: chain %s", self.session_id, self._describe())
        dtype = hidden.dtype
        chunk = self.remote.chunk_tokens(batch)
        if self.push:
            chunk = min([chunk] + [span.max_chunk_tokens for span in self.spans])  # one message per span
        outputs = []
        try:
            for offset in range(0, tokens, chunk):
                part = hidden[:, offset : offset + chunk]
                part_mask = mask[:, : self.position + offset + part.shape[1]] if mask is not None else None
                outputs.append(await self._through_chain(part, part_mask, failures))
        except BaseException as e:
            # Some spans (or chunks) may have advanced and others not: resending these tokens would
            # duplicate them in the caches that did, so every later call fails clearly instead.
            self.broken = f"{type(e).__name__}: {e}"
            raise
        self.position += tokens
        if mask is not None:
            self._mask = mask[:, : self.position]
        self.audit.stepped(self.spans, self._mask)
        if self._prefill:
            self._prefill = False
            await self._move_to_decode(failures)
        return torch.cat(outputs, dim=1).to(dtype)

    async def _prompt_to_prefill(self, tokens: int, batch: int) -> bool:
        """Whether this session's prompt goes to prefill servers (then moves to decode ones)."""
        routes = await self.remote.view.index(max_age=5.0)
        per_token_block = self.remote.checkpoint.kv_bytes_per_token(torch.float32)
        return prompt_goes_to_prefill(routes, tokens, batch, per_token_block, self.remote.num_blocks)

    async def _move_to_decode(self, failures: FailureBudget) -> None:
        """After the prompt: every span on a prefill server moves, KV cache and all, to a decode server
        of its blocks (where there is one with room); the session goes on there. A span whose server
        let go of it but that no decode server took up is replaced as after a failure."""
        routes = await self.remote.view.index(max_age=5.0)
        for index, span in enumerate(list(self.spans)):
            if span.plan.info.record.role != "prefill":
                continue
            exclude = self.remote.bans.banned()
            target = decode_server(routes, span.plan, exclude, self.max_length, self.batch_size, self.adapter)
            if target is None:
                continue
            try:
                moved = await span.request_move(target.peer_id)
            except SwarmError as e:
                logger.info("session %s: span %s stays on its prefill server: %s", self.session_id, span.plan, e)
                continue
            if not await self._take_over(index, SessionMoved(span.plan.peer_id, moved)):
                await self._replace(index, self._mask, failures, span.plan.peer_id)

    def take_rollback(self) -> Optional[Rollback]:
        """The pending rollback, if a server of this session was proven wrong (the caller rewinds)."""
        return self.audit.rollback(self.spans)

    async def asettle(self) -> Optional[Rollback]:
        """Checks every output not checked yet (after the checks in flight) and waits for the verdicts;
        returns the rollback they call for, if any. Outputs that nobody can recompute stay unchecked."""
        return await self.audit.settle(self.spans, self._mask)

    def settle(self) -> Optional[Rollback]:
        return self.remote.runtime.run(self.asettle())

    async def arewind(self, position: int) -> None:
        """Makes the session hold only positions [0, position): servers proven wrong are replaced (their
        replacements rebuild the cache from the inputs before `position`), the others forget the rest."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to position {position}: the session holds {self.position}")
        failures = FailureBudget(self.remote.max_retries)
        rollback = self.take_rollback()
        # A rewind that stops short of a pending rollback (a speculative step's rejected tokens) leaves
        # the rollback pending: the spans of convicted servers are replaced only by one that reaches it.
        reaches = rollback is None or position <= rollback.position
        mask = self._mask[:, :position] if self._mask is not None and position else None
        spans: list[SpanSession] = []
        for span in self.spans:
            if reaches and span.plan.peer_id in self.remote.audit.convicted:
                history = span.history()
                await span.close()
                self.audit.drop(span)
                spans += await self._connect(
                    span.plan.start, span.plan.end, history[:, :position] if position else None, mask, failures
                )
            else:
                span.rewind(position)
                spans.append(span)
        self._quant_used.update(span.plan.info.record.quant for span in self.spans)
        self.spans = spans
        self.position = position
        self._lowest_rewind = position if self._lowest_rewind is None else min(self._lowest_rewind, position)
        self._mask = mask
        if rollback is not None and reaches:
            self.audit.rolled_back(rollback)
        logger.info("session %s: rewound to position %d; chain now %s", self.session_id, position, self._describe())

    def rewind(self, position: int) -> None:
        self.remote.runtime.run(self.arewind(position))

    async def _through_chain(
        self, part: torch.Tensor, mask: Optional[torch.Tensor], failures: FailureBudget
    ) -> torch.Tensor:
        """One chunk through every span (`mask`: the session's attention mask up to the chunk's end;
        only the chunk's columns travel, servers keep the rest).

        With push, the client sends the chunk to the first span only, with the route of the others;
        each server pushes its output to the next, and the client reads every span's output from its
        own stream as it comes (it keeps them to rebuild a replacement's cache). After a failover the
        client sends the step itself to the replacement, which pushes it on."""
        self._step_id += 1
        new_mask = mask[:, -part.shape[1] :] if mask is not None else None
        for span in self.spans:  # links that failed since the last step
            self.links_relayed.update((span.plan.peer_id, peer) for peer in span.failed_pushes())
        index, send_to = 0, 0
        inputs: list[torch.Tensor] = []  # each span's input for this chunk, so far
        while index < len(self.spans):
            span = self.spans[index]
            del inputs[index:]
            inputs.append(part)
            pushed = index != send_to
            try:
                if not pushed:
                    fits = all(part.shape[1] <= other.max_chunk_tokens for other in self.spans[index:])
                    if self.push and fits:
                        route = self.spans[index + 1 : self._route_end(index)]
                        await span.send(
                            part,
                            new_mask,
                            self._step_id,
                            [other.hop() for other in route],
                            rewind=any(other.rewinding for other in route),
                        )
                        output = await span.receive(part, new_mask)
                        send_to = index + 1 + len(route)
                    else:
                        output = await span.step(part, new_mask)
                        send_to = index + 1
                else:
                    output = await self._receive_pushed(span, self.spans[index - 1], part, new_mask)
                    if output is None:  # the link failed: nobody's fault; this hop goes through the client
                        send_to = index
                        continue
            except BadPush as e:
                if not pushed:
                    raise ServerFailure(e.peer_id, f"reported a bad push for a step it was sent: {e}") from e
                # The receiving session dropped the push and is as it was: the pusher is replaced, and
                # its step computed again. Either of the two may lie, so push is off from now on.
                pusher = self.spans[index - 1]
                logger.warning(
                    "session %s: %s; replacing the server that pushed it and sending every step itself from now on",
                    self.session_id,
                    e,
                )
                self.push = False
                self.remote.failures.report(pusher.plan.peer_id, f"pushed a step that was refused ({e})", pusher.bridge)
                failures.add(e)
                pusher.rewind(pusher.position - part.shape[1])
                index = index - 1
                await self._replace(index, mask, failures, pusher.plan.peer_id)
                part, send_to = inputs[index], index
                continue
            except ServerFailure as e:
                if isinstance(e, SessionMoved) and await self._take_over(index, e):
                    send_to = index  # the step goes (again) to the server that now holds the session
                    continue
                if isinstance(e, SessionExpired) or (isinstance(e, SessionMoved) and e.moved.tier):
                    # idle too long, and not (or no longer) kept in a KV tier: replayed; nobody's fault
                    logger.info("session %s: %s; opening it again", self.session_id, e)
                elif isinstance(e, InputMismatch):
                    # One of the two lies, and the client cannot tell which: it stops using push, so
                    # that every server computes on what the client holds (what spot checks judge),
                    # and rebuilds this span's cache from it (the same server may serve it again).
                    logger.warning("session %s: %s; sending every step itself from now on", self.session_id, e)
                    self.push = False
                else:
                    self.remote.failures.report(e.peer_id, str(e), e.bridge)
                    if span.plan.info.record.kv_tier and await self._take_over(index, None):
                        # it had kept the session in its KV tier before it failed (its notice lost)
                        send_to = index
                        continue
                failures.add(e)
                await self._replace(index, mask, failures, e.peer_id)
                send_to = index
                continue
            part = output
            index += 1
        return part

    async def _take_over(self, index: int, moved: Optional[SessionMoved]) -> bool:
        """Span `index`'s server handed its session over as it left: the span goes on on the new
        server at the same position, nothing replayed. Without `moved`, its server failed: a server
        sharing its KV tier takes the session from there if it was kept there. False where that fails
        (the caller then fails over as from any failed server, replaying)."""
        old = self.spans[index]
        notice = moved.moved if moved is not None else None
        try:
            routes = await self.remote.view.index(max_age=0)
        except SwarmError as e:
            logger.warning("session %s: could not take up a session handed over: %s", self.session_id, e)
            return False
        takers = _takers(routes, old, notice, self.remote.bans.banned())
        for info in takers if notice is not None else takers[:1]:  # one asks the shared tier for all
            span = old.moved_to(SpanPlan(info.peer_id, old.plan.start, old.plan.end, info))
            try:
                await span.resume(
                    self.remote.p2p,
                    notice,
                    old.plan.info,
                    self.batch_size,
                    self.max_length,
                    self.remote.failures.bridges_to_avoid(),
                )
                break
            except SwarmError as e:
                logger.warning("session %s: %s could not take up the session: %s", self.session_id, info.peer_id, e)
                if isinstance(e, ServerFailure):  # gone, as a failure of any other kind: not asked again
                    self.remote.failures.report(e.peer_id, str(e), e.bridge)
        else:
            return False
        self.audit.retire(old)
        self._quant_used.add(old.plan.info.record.quant)
        await old.close()
        self.spans[index] = span
        self.moves += 1
        logger.info(
            "session %s: blocks %d:%d moved from %s to %s at position %d, nothing replayed",
            self.session_id,
            span.plan.start,
            span.plan.end,
            old.plan.peer_id,
            span.plan.peer_id,
            span.position,
        )
        return True

    def _route_end(self, index: int) -> int:
        """Where a step sent to span `index` stops being pushed: at the first link that failed a push."""
        end = index + 1
        while end < len(self.spans) and (self.spans[end - 1].plan.peer_id, self.spans[end].plan.peer_id) not in (
            self.links_relayed
        ):
            end += 1
        return end

    async def _receive_pushed(
        self, span: SpanSession, pusher: SpanSession, part: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """`span`'s output for the step `pusher` pushed to it, or None as soon as `pusher` says it could
        not push it there (the link joins `links_relayed`, and the client sends the step itself: a
        server that did get it after all drops it as a duplicate and its reply stands)."""
        receiving = asyncio.ensure_future(span.receive(part, mask, pusher.plan.peer_id, self._step_id))
        failing = asyncio.ensure_future(pusher.push_failure(span.plan.peer_id))
        try:
            await asyncio.wait({receiving, failing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiving, failing):
                if not task.done():
                    task.cancel()
        if receiving.done() and not receiving.cancelled():
            return receiving.result()
        link = (pusher.plan.peer_id, span.plan.peer_id)
        logger.warning(
            "session %s: %s cannot push to %s (%s); the client relays that hop from now on",
            self.session_id,
            link[0],
            link[1],
            failing.result(),
        )
        self.links_relayed.add(link)
        return None

    async def _replace(self, index: int, mask: Optional[torch.Tensor], failures: FailureBudget, failed: str) -> None:
        """Replaces span `index` (after server `failed` failed it) with a chain that rebuilds its cache
        from the inputs it had received."""
        span = self.spans[index]
        await span.close()
        history = span.history()
        history_mask = mask[:, : history.shape[1]] if mask is not None and history is not None else None
        replacement = await self._connect(span.plan.start, span.plan.end, history, history_mask, failures)
        self._quant_used.update(span.plan.info.record.quant for span in self.spans[index : index + 1])
        self.spans[index : index + 1] = replacement
        self.audit.retire(span)
        self.failovers += 1
        logger.warning(
            "session %s: replaced %s for blocks %d:%d; chain now %s",
            self.session_id,
            failed,
            span.plan.start,
            span.plan.end,
            self._describe(),
        )

    def _describe(self) -> str:
        return " → ".join(f"{peer[-6:]}[{start}:{end}]" for peer, start, end in self.chain)

    def step(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.remote.runtime.run(self.astep(hidden, mask))

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.audit.cancel()
            self._remember_prompt()
            await asyncio.gather(*(span.close() for span in self.spans), return_exceptions=True)

    def close(self) -> None:
        if not self.closed:
            self.remote.runtime.run(self.aclose(), timeout=10)

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _takers(routes, old: SpanSession, notice, banned: Collection[str]) -> list:
    """Who may take up a span's session: the server its notice names, and for a session kept in a
    KV tier, any other server of its blocks that reaches the same tier (the named one may be gone);
    none that is banned. A server that names itself (it kept the session in its own tier) is known
    from the span even where a fresh read of the swarm missed its record."""
    named = routes.record_of(notice.moved_to) if notice is not None else None
    if named is None and notice is not None and notice.moved_to == old.plan.peer_id:
        named = old.plan.info
    takers = [named] if named is not None and named.peer_id not in banned else []
    tier = old.plan.info.record.kv_tier
    if (notice is None or notice.tier) and tier:
        avoid = {notice.moved_to} if notice is not None else set()
        for info in routes.candidates(old.plan.start, old.plan.end, {*avoid, *banned}).values():
            record = info.record
            covers = record.start_block <= old.plan.start and old.plan.end <= record.end_block
            same = (record.kv_tier, record.dtype, record.quant) == (
                tier,
                old.plan.info.record.dtype,
                old.plan.info.record.quant,
            )
            if covers and same:
                takers.append(info)
    return takers


def _reusable(remembered: Optional[RememberedPrompt], plan: SpanPlan, with_outputs: bool) -> int:
    """How many prompt tokens server `plan` may start from: those of its span the client remembers."""
    if remembered is None:
        return 0
    kept = remembered.span(plan.peer_id, plan.start, plan.end)
    if kept is None or (with_outputs and kept.outputs is None):
        return 0
    return kept.inputs.shape[1]
