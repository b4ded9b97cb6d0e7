"""The client's side of verification: spot checks recomputed by other servers (or the local referee),
servers proven wrong convicted, and each session's checks and rollbacks.

`ClientAudit` is one per client: it recomputes claims, keeps the convicted servers and sends the
evidence to a relay. `SessionAudit` is one per inference session: it starts the checks of its
spans, holds the session back when checks lag too far, and tells the session where to roll back to
once a server it used is convicted. Sessions ask for that (`rollback`); nothing calls back into them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, Sequence

import torch

from blocks.checkpoint import Checkpoint, parse_dtype
from client.adapters import LocalAdapters, SessionAdapter
from client.bans import BanList
from client.check_chain import CheckChain
from client.errors import BadRequestError, MissingBlocksError, ServerFailure, SwarmBusyError
from client.failures import FailurePolicy
from client.pings import PingCache
from client.reliability import RelayScores
from client.router import Router
from client.routing import SpanPlan
from client.span import SpanSession
from client.verify import SpotChecker
from verification.evidence import Claim, Evidence, Recomputation
from verification.referee import LocalReferee
from verification.tolerance import least_precise

logger = logging.getLogger(__name__)

CHECK_ROUTE_MAX_AGE = 10.0  # seconds a spot check may route on an earlier DHT read (bans still apply at once)
# Steps a session may run ahead of a spot check in flight: a span's first check (its prefill, small
# and decisive against a server that is always wrong), then any later one (a longer history).
FIRST_CHECK_LAG = 4
CHECK_LAG = 16
# Check chains kept open at once (each holds a session, and its KV, on every server of its chain); the
# least recently used is closed past it, and its span's next check starts over.
MAX_CHECK_CHAINS = 32
# A check chain's session takes a server's KV only where the server announced room for this many such
# sessions: room goes to the sessions that generate, and a check where room is short goes stateless.
CHECK_CHAIN_ROOM = 2

# (plan, hidden, mask, adapter name) -> the span's output of a stateless forward
Forward = Callable[[SpanPlan, torch.Tensor, Optional[torch.Tensor], str], Awaitable[torch.Tensor]]
# (plan, batch, max length, adapter) -> an open session
OpenSpan = Callable[[SpanPlan, int, int, Optional[SessionAdapter]], Awaitable[SpanSession]]


@dataclass(frozen=True)
class Rollback:
    """Positions from `position` on were computed with a server proven wrong (`peers`) and are void."""

    position: int
    peers: tuple[str, ...]


class ClientAudit:
    """`rate` is the spot-check rate (0: no checks, and no verifier). A span's checks go to a check
    chain (`CheckChain`) of inference sessions that `open_span(plan, batch, max_length)` opens on other
    servers and that is then sent only the new positions, `chunk_tokens(batch)` at a time; disputes
    and claims of no session are recomputed by `forward(plan, hidden, mask)`, a stateless forward
    through one server."""

    def __init__(
        self,
        rate: float,
        checkpoint: Checkpoint,
        router: Router,
        failures: FailurePolicy,
        bans: BanList,
        pings: PingCache,
        forward: Forward,
        open_span: OpenSpan,
        chunk_tokens: Callable[[int], int],
        reliability=None,
        adapters: Optional[LocalAdapters] = None,
    ):
        self.adapters = adapters or LocalAdapters(checkpoint)  # the client's own LoRA adapters
        self.router = router
        self.failures = failures
        self.bans = bans
        self.pings = pings
        self.forward = forward
        self.open_span = open_span
        self.chunk_tokens = chunk_tokens
        self.reliability = reliability
        self.chains: collections.OrderedDict[str, CheckChain] = collections.OrderedDict()  # span's session -> chain
        self._closing: set[asyncio.Task] = set()
        self.convicted: dict[str, Evidence] = {}
        self.fault_listeners: list[Callable[[Evidence], None]] = []
        self._reports: set[asyncio.Task] = set()  # evidence on its way to the relay
        self._checking: dict[str, set[asyncio.Task]] = {}  # server -> recomputations waiting on it
        self._abandoned: set[asyncio.Task] = set()
        self._referee_executor = ThreadPoolExecutor(1, thread_name_prefix="referee")
        self.verifier: Optional[SpotChecker] = (
            SpotChecker(
                rate, self.recompute, LocalReferee(checkpoint, self._referee_executor, adapters=self.adapters.for_span)
            )
            if rate > 0
            else None
        )
        failures.on_ban.append(self._abandon_checks_on)

    def convict(self, evidence: Evidence) -> None:
        """A server proven to return wrong results: banned for good; every session that used it rolls
        back to the last position verified for it when it next asks (`SessionAudit.rollback`)."""
        peer = evidence.peer_id
        first = peer not in self.convicted
        self.convicted.setdefault(peer, evidence)
        reason = (
            f"returned wrong results for blocks {evidence.start_block}:{evidence.end_block} (relative error "
            f"{evidence.claimed_error:.2g} > {evidence.tolerance:.2g} against {evidence.referee})"
        )
        self.bans.ban_forever(peer, reason)
        self.pings.forget(peer)
        if first:
            self.failures.notify(peer, reason)
            for listener in self.fault_listeners:
                listener(evidence)
            if isinstance(self.reliability, RelayScores) and evidence.receipts:
                task = asyncio.get_running_loop().create_task(self._report(self.reliability, evidence))
                self._reports.add(task)
                task.add_done_callback(self._reports.discard)

    async def _report(self, relay: RelayScores, evidence: Evidence) -> None:
        try:
            verdict = await relay.report_evidence(evidence)
            logger.info("relay confirmed that %s returned wrong results: %s", evidence.peer_id, verdict)
        except Exception as e:  # the relay is optional: a refusal or an outage changes nothing here
            logger.warning("relay did not take the evidence against %s: %s: %s", evidence.peer_id, type(e).__name__, e)

    async def recompute(self, claim: Claim, avoid: frozenset[str]) -> Optional[Recomputation]:
        """A claim's outputs recomputed by a chain of other servers (none of `avoid`); None if no such
        chain exists. A span's own check goes to its check chain, which is sent only what it does not
        hold yet; a dispute's referee (more servers to avoid) gets the whole history, stateless."""
        if not claim.session_id or avoid != {claim.peer_id}:
            return await self._recompute_stateless(claim, avoid)
        chain = self.chains.pop(claim.session_id, None)
        if chain is not None and chain.peers & (avoid | self.bans.banned()):
            self._close(chain)
            chain = None
        if chain is not None:
            try:
                return self._kept(claim, chain, await chain.advance(claim, self._step, self._chunk(claim)))
            except ServerFailure as e:  # a session kept idle may have been closed by its server: start over
                logger.info("check chain of span %s failed (%s); opening another", claim.session_id, e)
                self._close(chain)
            except BaseException:
                self._close(chain)
                raise
        chain = await self._open_chain(claim, avoid)
        if chain is None:
            return await self._recompute_stateless(claim, avoid)
        try:
            return self._kept(claim, chain, await chain.advance(claim, self._step, self._chunk(claim)))
        except BaseException as e:
            self._close(chain)
            if isinstance(e, ServerFailure):
                self._blame(e)
            raise

    def _kept(self, claim: Claim, chain: CheckChain, result: tuple[int, torch.Tensor]) -> Recomputation:
        self.chains[claim.session_id] = chain
        while len(self.chains) > MAX_CHECK_CHAINS:
            self._close(self.chains.popitem(last=False)[1])
        since, outputs = result
        return Recomputation(
            by=" → ".join(span.plan.peer_id for span in chain.spans),
            peers=chain.peers,
            outputs=outputs,
            dtype=least_precise([span.dtype for span in chain.spans]),
            since=since,
            quant=claim.quant,  # the chain was routed over servers quantized alike
        )

    def _chunk(self, claim: Claim) -> int:
        return self.chunk_tokens(claim.inputs.shape[0])

    async def _step(self, span: SpanSession, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return await self._unless_failed(span.plan.peer_id, span.step(hidden, mask))

    async def _open_chain(self, claim: Claim, avoid: frozenset[str]) -> Optional[CheckChain]:
        """Sessions for the claim's blocks on other servers, long enough for the claim's session; None
        if no chain exists or its servers have no room to spare (the check is then stateless)."""
        batch, length = claim.inputs.shape[0], max(claim.max_length, claim.inputs.shape[1])
        plans = await self._check_route(claim, avoid, length)
        needed = CHECK_CHAIN_ROOM * batch * length
        if plans is None or any(plan.info.record.cache_tokens_free < needed for plan in plans):
            return None
        adapter = self.adapters.session_adapter(claim.adapter)
        outcomes = await asyncio.gather(
            *(self.open_span(plan, batch, length, adapter) for plan in plans), return_exceptions=True
        )
        spans = [outcome for outcome in outcomes if isinstance(outcome, SpanSession)]
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if not errors:
            return CheckChain(spans)
        await asyncio.gather(*(span.close() for span in spans), return_exceptions=True)
        for error in errors:
            if isinstance(error, ServerFailure):
                self._blame(error)
                raise error
            if not isinstance(error, (SwarmBusyError, BadRequestError)):
                raise error
        return None  # busy, or not this long after all

    async def _check_route(self, claim: Claim, avoid: frozenset[str], length: int) -> Optional[list[SpanPlan]]:
        try:
            return await self.router.chain(
                claim.start,
                claim.end,
                exclude=avoid,
                avoid_owner=claim.owner,
                max_age=CHECK_ROUTE_MAX_AGE,
                max_length=length,
                batch=claim.inputs.shape[0],
                quant=claim.quant,
                adapter=self.adapters.session_adapter(claim.adapter),
            )
        except (MissingBlocksError, BadRequestError):  # nobody else, or nobody else holds a history this long
            return None

    def _blame(self, error: ServerFailure) -> None:
        if error.peer_id not in self.bans.banned():  # an abandoned request's server is banned already
            self.failures.report(error.peer_id, str(error), error.bridge)

    async def _recompute_stateless(self, claim: Claim, avoid: frozenset[str]) -> Optional[Recomputation]:
        """The claim's whole input history as one stateless prefill through a chain of other servers
        (none for a session with the client's own adapter: a stateless forward cannot carry it)."""
        adapter = self.adapters.session_adapter(claim.adapter)
        if adapter is not None and adapter.own:
            return None
        chain = await self._check_route(claim, avoid, claim.inputs.shape[1])
        if chain is None:
            return None
        hidden = claim.inputs
        for plan in chain:
            try:
                hidden = await self._unless_failed(plan.peer_id, self.forward(plan, hidden, claim.mask, claim.adapter))
            except ServerFailure as e:
                self._blame(e)
                raise
        return Recomputation(
            by=" → ".join(plan.peer_id for plan in chain),
            peers=frozenset(p.peer_id for p in chain),
            outputs=hidden,
            dtype=least_precise([parse_dtype(plan.info.record.dtype) for plan in chain]),
            quant=claim.quant,
        )

    def forget(self, session_ids) -> None:
        """Closes the check chains of these spans' sessions (the spans are gone)."""
        for session_id in session_ids:
            chain = self.chains.pop(session_id, None)
            if chain is not None:
                self._close(chain)

    def _close(self, chain: CheckChain) -> None:
        task = asyncio.get_running_loop().create_task(chain.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _unless_failed(self, peer_id: str, request: Awaitable[torch.Tensor]) -> torch.Tensor:
        """Awaits `request` to `peer_id`, abandoning it as soon as a session reports that server failed:
        a server killed mid-request may leave the stream open, and a check must not wait out the whole
        request timeout (sessions wait for lagging checks)."""
        task = asyncio.ensure_future(request)
        if peer_id in self.bans.banned():
            task.cancel()
            raise ServerFailure(peer_id, "failed in another request")
        waiting = self._checking.setdefault(peer_id, set())
        waiting.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            if task not in self._abandoned:
                raise
            raise ServerFailure(peer_id, "failed in another request; its part of this check was abandoned") from None
        finally:
            waiting.discard(task)
            if not waiting and self._checking.get(peer_id) is waiting:
                del self._checking[peer_id]
            self._abandoned.discard(task)

    def _abandon_checks_on(self, peer_id: str) -> None:
        for task in self._checking.pop(peer_id, ()):
            self._abandoned.add(task)
            task.cancel()

    def shutdown(self) -> None:
        self._referee_executor.shutdown(wait=False, cancel_futures=True)


class SessionAudit:
    """One session's spot checks: started after each step, waited for when they lag, and the
    rollback that a conviction of one of the session's servers calls for."""

    def __init__(self, audit: ClientAudit, session_id: str, max_length: int = 0):
        self.audit = audit
        self.session_id = session_id
        self.max_length = max_length
        self.steps = 0
        self._checked: set[str] = set()  # sessions of the spans checked so far (each may have a check chain)
        self._checks: dict[asyncio.Task, tuple[int, int]] = {}  # check in flight -> (step it followed, lag)
        self._retired: list[tuple[str, int]] = []  # (peer, verified position) of spans replaced after a failure
        self._rolled_back: set[str] = set()  # convicted servers this session has rolled back from already

    def retire(self, span: SpanSession) -> None:
        """A span replaced after a failure: what was verified of it still bounds a later rollback."""
        self._retired.append((span.plan.peer_id, span.verified))
        self.drop(span)

    def drop(self, span: SpanSession) -> None:
        """A span no longer in use: its check chain is closed."""
        self._checked.discard(span.key)
        self.audit.forget([span.key])

    def stepped(self, spans: Sequence[SpanSession], mask: Optional[torch.Tensor]) -> None:
        """After each step: spot-checks each span's outputs since its last check."""
        self.steps += 1
        self.start_checks(spans, mask)

    def start_checks(
        self, spans: Sequence[SpanSession], mask: Optional[torch.Tensor], everything: bool = False
    ) -> None:
        """Checks each span's outputs since its last check: always after its first step, then at the
        verifier's rate (one draw per step for the whole chain), or now (`everything`). Checks run in
        the background; one span has at most one check in flight."""
        verifier = self.audit.verifier
        if verifier is None:
            return
        sampled = everything or verifier.sample()
        for span in spans:
            if span.checking or span.position <= span.verified or not (sampled or span.checks == 0):
                continue
            claim = Claim(
                peer_id=span.plan.peer_id,
                start=span.plan.start,
                end=span.plan.end,
                dtype=span.dtype,
                inputs=span.history(),
                outputs=span.outputs(),
                mask=mask,
                verified=span.verified,
                model=span.model,
                session_id=span.key,
                receipts=tuple(span.receipts),
                owner=span.plan.info.record.public_name,
                rewinds=tuple(span.rewound_to),
                max_length=self.max_length,
                quant=span.plan.info.record.quant,
                adapter=span.adapter,
            )
            self._checked.add(span.key)
            span.checks += 1
            span.checking = True
            task = asyncio.create_task(self._check(span, claim, span.rewinds))
            self._checks[task] = (self.steps, FIRST_CHECK_LAG if span.checks == 1 else CHECK_LAG)
            task.add_done_callback(lambda done: self._checks.pop(done, None))

    async def wait_for_lagging_checks(self) -> None:
        """A session runs at most FIRST_CHECK_LAG steps ahead of a span's first check and CHECK_LAG
        steps ahead of a later one: a server that is always wrong is caught within 5 tokens even where
        checks are slower than steps, and a rollback never throws away more than that much work."""
        lagging = [task for task, (started, lag) in self._checks.items() if self.steps - started >= lag]
        if lagging:
            await asyncio.wait(lagging)

    async def _check(self, span: SpanSession, claim: Claim, rewinds: int) -> None:
        try:
            verdict = await self.audit.verifier.check(claim)
        except Exception:
            logger.exception("session %s: spot check of %s failed", self.session_id, claim.peer_id)
            return
        finally:
            span.checking = False
        if verdict.verified and span.rewinds == rewinds:
            span.verified = max(span.verified, claim.outputs.shape[1])
        for evidence in verdict.wrong:
            self.audit.convict(evidence)

    def rollback(self, spans: Sequence[SpanSession]) -> Optional[Rollback]:
        """Where the session must roll back to, if a server it used has been proven wrong since: the
        last position verified for that server (the least, if several)."""
        positions, peers = [], []
        for peer in self.audit.convicted.keys() - self._rolled_back:
            found = [span.verified for span in spans if span.plan.peer_id == peer]
            found += [verified for retired, verified in self._retired if retired == peer]
            if found:
                positions += found
                peers.append(peer)
        if not positions:
            return None
        return Rollback(min(positions), tuple(sorted(peers)))

    def rolled_back(self, rollback: Rollback) -> None:
        self._rolled_back.update(rollback.peers)

    async def settle(self, spans: Sequence[SpanSession], mask: Optional[torch.Tensor]) -> Optional[Rollback]:
        """Checks every output not checked yet (after the checks in flight) and waits for the verdicts;
        returns the rollback they call for, if any. Outputs that nobody can recompute stay unchecked."""
        await self._checks_done()
        if self.rollback(spans) is None:
            self.start_checks(spans, mask, everything=True)
            await self._checks_done()
        return self.rollback(spans)

    async def _checks_done(self) -> None:
        while self._checks:
            await asyncio.gather(*list(self._checks), return_exceptions=True)

    def cancel(self) -> None:
        """The session is closed: its checks stop and their chains close."""
        for task in list(self._checks):
            task.cancel()
        self.audit.forget(self._checked)
        self._checked.clear()
