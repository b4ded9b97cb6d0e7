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
from dataclasses import dataclass
from typing import Optional

import torch

from client.errors import (
    InputMismatch,
    MissingBlocksError,
    ServerFailure,
    ServerProvenWrongError,
    SwarmBusyError,
    SwarmError,
)
from client.remote import FailureBudget, RemoteModel, step_deadline
from client.span import SpanSession
from verification.evidence import Claim

logger = logging.getLogger(__name__)

# Steps a session may run ahead of a spot check in flight: a span's first check (its prefill, small
# and decisive against a server that is always wrong), then any later one (a longer history).
FIRST_CHECK_LAG = 4
CHECK_LAG = 16


@dataclass(frozen=True)
class Rollback:
    """Positions from `position` on were computed with a server proven wrong (`peers`) and are void."""

    position: int
    peers: tuple[str, ...]


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
        self.broken: Optional[str] = None  # why the servers' caches may no longer match this session
        self.failovers = 0
        self.push = remote.push
        self._step_id = 0
        self._mask: Optional[torch.Tensor] = None  # the attention mask of positions [0, position), if padded
        self._checks: dict[asyncio.Task, tuple[int, int]] = {}  # check in flight -> (step it followed, lag)
        self._steps = 0
        self._rollback: Optional[Rollback] = None
        self._retired: list[tuple[str, int]] = []  # (peer, verified position) of spans replaced after a failure
        remote.sessions.add(self)

    @property
    def chain(self) -> list[tuple[str, int, int]]:
        """(peer id, start, end) of every span in use."""
        return [(span.plan.peer_id, span.plan.start, span.plan.end) for span in self.spans]

    async def _connect(
        self,
        start: int,
        end: int,
        history: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        failures: FailureBudget,
    ) -> list[SpanSession]:
        """Opens sessions for blocks [start, end) and replays `history` (inputs of block `start` so far).

        Server failures count toward the step's one `failures` budget; servers that answer "busy"
        are skipped, so the loop ends when no other server is left."""
        batch = self.batch_size
        busy: set[str] = set()
        last_error: Optional[Exception] = None
        while True:
            try:
                chain = await self.remote.make_chain(start, end, exclude=busy)
            except MissingBlocksError:
                if busy:
                    raise SwarmBusyError(
                        f"swarm busy: every server for blocks {start}-{end - 1} refused a new session for lack of room"
                    ) from last_error
                raise
            opened = [
                SpanSession(plan, self.remote.request_timeout, keep_outputs=self.remote.verifier is not None)
                for plan in chain
            ]
            errors: list[BaseException] = []
            try:
                # All at once: over a WAN each opening costs round trips, which a chain should pay once, not per span.
                bridges = self.remote.bridges_to_avoid()
                outcomes = await asyncio.gather(
                    *(
                        span.open(self.remote.p2p, self.remote.model_name, batch, self.max_length, bridges)
                        for span in opened
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
                if not isinstance(error, (SwarmBusyError, ServerFailure)):
                    raise error  # ours, not a server's
            for error in errors:
                if isinstance(error, SwarmBusyError):
                    busy.add(error.peer_id)
                else:
                    self.remote.report_failure(error.peer_id, str(error), error.bridge)
                    failures.add(error)
            last_error = errors[0]

    async def _replay(self, spans: list[SpanSession], history: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Rebuilds the replacement servers' caches from the inputs the failed span had received."""
        chunk = self.remote.chunk_tokens(history.shape[0])
        for offset in range(0, history.shape[1], chunk):
            part = history[:, offset : offset + chunk]
            part_mask = mask[:, offset : offset + part.shape[1]] if mask is not None else None
            for span in spans:
                part = await span.step(part, part_mask)

    async def astep(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Runs new positions [batch, tokens, hidden] through every block; returns the last block's output.

        `mask` is the attention mask of the whole session so far, new tokens included ([batch, position + tokens]).
        """
        if self.closed:
            raise SwarmError("inference session is closed")
        if self.broken is not None:
            raise SwarmError(
                f"inference session is broken by an earlier failed step ({self.broken}); "
                f"open a new session and send its tokens again"
            )
        await self._wait_for_lagging_checks()
        if self._rollback is not None:
            raise ServerProvenWrongError(
                f"server(s) {', '.join(self._rollback.peers)} returned wrong results: this session's outputs from "
                f"position {self._rollback.position} on are void; call rewind({self._rollback.position}) and resend"
            )
        batch, tokens = hidden.shape[:2]
        if self.spans and batch != self.batch_size:
            raise ValueError(f"session was opened with batch size {self.batch_size}, got {batch}")
        if self.position + tokens > self.max_length:
            raise ValueError(
                f"session max_length is {self.max_length} tokens; {self.position} used, {tokens} more requested"
            )
        async with step_deadline(self.remote.step_timeout, "step"):
            return await self._step(hidden, mask)

    async def _step(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        batch, tokens = hidden.shape[:2]
        failures = FailureBudget(self.remote.max_retries)
        if not self.spans:
            self.batch_size = batch
            try:
                self.spans = await self._connect(0, self.remote.num_blocks, None, None, failures)
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
        self._steps += 1
        if mask is not None:
            self._mask = mask[:, : self.position]
        self._start_checks()
        return torch.cat(outputs, dim=1).to(dtype)

    def _start_checks(self, everything: bool = False) -> None:
        """Spot-checks each span's outputs since its last check: always after its first step, then
        at the verifier's rate (one draw per step for the whole chain), or now (`everything`). Checks
        run in the background; one span has at most one check in flight."""
        verifier = self.remote.verifier
        if verifier is None:
            return
        sampled = everything or verifier.sample()
        for span in self.spans:
            if span.checking or span.position <= span.verified or not (sampled or span.checks == 0):
                continue
            claim = Claim(
                peer_id=span.plan.peer_id,
                start=span.plan.start,
                end=span.plan.end,
                dtype=span.dtype,
                inputs=span.history(),
                outputs=span.outputs(),
                mask=self._mask,
                verified=span.verified,
                model=span.model,
                session_id=span.key,
                receipts=tuple(span.receipts),
                owner=span.plan.info.record.public_name,
            )
            span.checks += 1
            span.checking = True
            task = asyncio.create_task(self._check(span, claim, span.rewinds))
            self._checks[task] = (self._steps, FIRST_CHECK_LAG if span.checks == 1 else CHECK_LAG)
            task.add_done_callback(lambda done: self._checks.pop(done, None))

    async def _wait_for_lagging_checks(self) -> None:
        """A session runs at most FIRST_CHECK_LAG steps ahead of a span's first check and CHECK_LAG
        steps ahead of a later one: a server that is always wrong is caught within 5 tokens even where
        checks are slower than steps, and a rollback never throws away more than that much work."""
        lagging = [task for task, (started, lag) in self._checks.items() if self._steps - started >= lag]
        if lagging:
            await asyncio.wait(lagging)

    async def _check(self, span: SpanSession, claim: Claim, rewinds: int) -> None:
        try:
            verdict = await self.remote.verifier.check(claim)
        except Exception:
            logger.exception("session %s: spot check of %s failed", self.session_id, claim.peer_id)
            return
        finally:
            span.checking = False
        if verdict.verified and span.rewinds == rewinds:
            span.verified = max(span.verified, claim.outputs.shape[1])
        for evidence in verdict.wrong:
            self.remote.convict(evidence)

    def server_proven_wrong(self, peer_id: str) -> None:
        """Called for every session when a server is proven wrong: positions computed with it after its
        last verified one are void, and the next step starts there."""
        positions = [span.verified for span in self.spans if span.plan.peer_id == peer_id]
        positions += [verified for peer, verified in self._retired if peer == peer_id]
        if not positions:
            return
        position = min(positions)
        if self._rollback is not None:
            position = min(position, self._rollback.position)
            peer_ids = tuple(sorted(set(self._rollback.peers) | {peer_id}))
        else:
            peer_ids = (peer_id,)
        self._rollback = Rollback(position, peer_ids)
        logger.warning(
            "session %s: server %s was proven wrong; rolling back to position %d", self.session_id, peer_id, position
        )

    def take_rollback(self) -> Optional[Rollback]:
        """The pending rollback, if a server of this session was proven wrong (the caller rewinds)."""
        return self._rollback

    async def asettle(self) -> Optional[Rollback]:
        """Checks every output not checked yet (after the checks in flight) and waits for the verdicts;
        returns the rollback they call for, if any. Outputs that nobody can recompute stay unchecked."""
        await self._checks_done()
        if self._rollback is None:
            self._start_checks(everything=True)
            await self._checks_done()
        return self._rollback

    async def _checks_done(self) -> None:
        while self._checks:
            await asyncio.gather(*list(self._checks), return_exceptions=True)

    def settle(self) -> Optional[Rollback]:
        return self.remote.runtime.run(self.asettle())

    async def arewind(self, position: int) -> None:
        """Makes the session hold only positions [0, position): servers proven wrong are replaced (their
        replacements rebuild the cache from the inputs before `position`), the others forget the rest."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to position {position}: the session holds {self.position}")
        failures = FailureBudget(self.remote.max_retries)
        mask = self._mask[:, :position] if self._mask is not None and position else None
        spans: list[SpanSession] = []
        for span in self.spans:
            if span.plan.peer_id in self.remote.convicted:
                history = span.history()
                await span.close()
                spans += await self._connect(
                    span.plan.start, span.plan.end, history[:, :position] if position else None, mask, failures
                )
            else:
                span.rewind(position)
                spans.append(span)
        self.spans = spans
        self.position = position
        self._mask = mask
        self._rollback = None
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
        index, send_to = 0, 0
        while index < len(self.spans):
            span = self.spans[index]
            try:
                if index == send_to:
                    later = self.spans[index + 1 :]
                    fits = all(part.shape[1] <= other.max_chunk_tokens for other in self.spans[index:])
                    if self.push and fits:
                        span.send(
                            part,
                            new_mask,
                            self._step_id,
                            [other.hop() for other in later],
                            rewind=any(other.rewinding for other in later),
                        )
                        output = await span.receive(part)
                    else:
                        output = await span.step(part, new_mask)
                        send_to = index + 1
                else:
                    output = await span.receive(part, self.spans[index - 1].plan.peer_id, self._step_id)
            except ServerFailure as e:
                if isinstance(e, InputMismatch):
                    # One of the two lies, and the client cannot tell which: it stops using push, so
                    # that every server computes on what the client holds (what spot checks judge),
                    # and rebuilds this span's cache from it (the same server may serve it again).
                    logger.warning("session %s: %s; sending every step itself from now on", self.session_id, e)
                    self.push = False
                else:
                    self.remote.report_failure(e.peer_id, str(e), e.bridge)
                await span.close()
                failures.add(e)
                history = span.history()
                history_mask = mask[:, : history.shape[1]] if mask is not None and history is not None else None
                replacement = await self._connect(span.plan.start, span.plan.end, history, history_mask, failures)
                self.spans[index : index + 1] = replacement
                self._retired.append((span.plan.peer_id, span.verified))
                self.failovers += 1
                send_to = index
                logger.warning(
                    "session %s: replaced %s for blocks %d:%d; chain now %s",
                    self.session_id,
                    e.peer_id,
                    span.plan.start,
                    span.plan.end,
                    self._describe(),
                )
                continue
            part = output
            index += 1
        return part

    def _describe(self) -> str:
        return " → ".join(f"{peer[-6:]}[{start}:{end}]" for peer, start, end in self.chain)

    def step(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.remote.runtime.run(self.astep(hidden, mask))

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            for task in list(self._checks):
                task.cancel()
            self.remote.sessions.discard(self)
            await asyncio.gather(*(span.close() for span in self.spans), return_exceptions=True)

    def close(self) -> None:
        if not self.closed:
            self.remote.runtime.run(self.aclose(), timeout=10)

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
