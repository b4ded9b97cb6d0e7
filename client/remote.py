"""The client's view of one model in the swarm: DHT lookups, model check, chains, stateless forward."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, Callable, Collection, Mapping, Optional, Sequence

import torch
from hivemind.p2p import P2P

from blocks.checkpoint import Checkpoint, parse_dtype
from client.bans import BanList
from client.errors import (
    MissingBlocksError,
    ModelMismatchError,
    RetriesExhaustedError,
    ServerFailure,
    StepTimeoutError,
    SwarmBusyError,
    SwarmError,
)
from client.pings import PingCache
from client.reliability import RelayScores
from client.routing import RouteIndex, SpanPlan, chain_avoiding, make_chain, usable
from client.runtime import LoopThread
from client.span import forward_span
from client.verify import SpotChecker
from configs.schema import DEFAULT_VERIFY_RATE
from dht.records import ServerInfo
from dht.swarm_dht import DHTUnavailableError, SwarmDHT, agreed_meta, start_dht
from protocol.tensors import MAX_MESSAGE_BYTES, cap_incoming_messages
from verification.evidence import Claim, Evidence, Recomputation
from verification.referee import LocalReferee
from verification.tolerance import least_precise

logger = logging.getLogger(__name__)

BRIDGE_AVOID_SECONDS = 60.0  # a bridge that failed is tried last for this long
CHECK_ROUTE_MAX_AGE = 10.0  # seconds a spot check may route on an earlier DHT read (bans still apply at once)


class FailureBudget:
    """The server failures one step may survive, wherever they happen (a step, a reconnect, a replay):
    one count, so nested retries cannot multiply into (retries + 1)² attempts."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def add(self, error: ServerFailure) -> None:
        self.count += 1
        if self.count > self.limit:
            raise RetriesExhaustedError(f"gave up after {self.count} server failures; last: {error}") from error


@contextlib.asynccontextmanager
async def step_deadline(seconds: Optional[float], what: str) -> AsyncIterator[None]:
    """Raises StepTimeoutError if the body runs past `seconds` (None: no deadline)."""
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            yield
    except TimeoutError as e:
        if not deadline.expired():
            raise
        raise StepTimeoutError(
            f"the {what} did not finish within step_timeout={seconds:g} s (retries and failovers included)"
        ) from e


class RemoteModel:
    """Connects to the swarm (a client-mode DHT node) and finds servers for `model`'s blocks."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        initial_peers: Sequence[str],
        model_name: Optional[str] = None,
        *,
        request_timeout: float = 30.0,
        max_chunk_tokens: int = 1024,
        max_retries: int = 5,
        step_timeout: Optional[float] = 300.0,
        nat_port_map: bool = False,
        reliability: Optional[Callable[[], Awaitable[Mapping[str, float]]]] = None,
        min_reliability: float = 0.0,
        ban_seconds: float = 5.0,
        push: bool = True,
        verify: float = DEFAULT_VERIFY_RATE,
    ):
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddr of at least one swarm peer")
        self.checkpoint = checkpoint
        self.model_name = model_name or checkpoint.default_model_name
        self.num_blocks = checkpoint.num_blocks
        self.request_timeout = request_timeout
        self.max_chunk_tokens = max_chunk_tokens
        self.max_retries = max_retries
        self.push = push  # servers hand each step's output to the next server of the chain
        if step_timeout is not None and not step_timeout > 0:
            raise ValueError(f"step_timeout must be a positive number of seconds or None, got {step_timeout}")
        self.step_timeout = step_timeout
        self.bans = BanList(base=ban_seconds)
        self.reliability = reliability
        self.min_reliability = min_reliability
        self.failure_listeners: list[Callable[[str, str], None]] = []
        self.fault_listeners: list[Callable[[Evidence], None]] = []
        self.convicted: dict[str, Evidence] = {}
        self._reports: set[asyncio.Task] = set()  # evidence on its way to the relay
        self._checking: dict[str, set[asyncio.Task]] = {}  # server -> recomputations waiting on it
        self._failed_bridges: dict[str, float] = {}  # bridge address -> avoided until (monotonic)
        self._abandoned: set[asyncio.Task] = set()
        self._last_read: Optional[tuple[float, RouteIndex]] = None  # (when, what) of the latest DHT read
        self.sessions: weakref.WeakSet = weakref.WeakSet()  # open inference sessions, to roll back on a conviction
        self._referee_executor = ThreadPoolExecutor(1, thread_name_prefix="referee")
        self.verifier: Optional[SpotChecker] = (
            SpotChecker(verify, self.recompute, LocalReferee(checkpoint, self._referee_executor))
            if verify > 0
            else None
        )
        self.rng = random.Random()
        dht, validator = start_dht(initial_peers, client_mode=True, nat_port_map=nat_port_map)
        self.dht = SwarmDHT(dht, validator)
        self.runtime = LoopThread()
        cap_incoming_messages()  # a server's reply cannot make this process buffer more than the cap either
        self.p2p: P2P = self.runtime.run(dht.replicate_p2p(), timeout=request_timeout)
        self.pings = PingCache(self.p2p, self.bans.ban, timeout=min(request_timeout, 5.0))
        self._meta_checked = False

    async def _check_model(self, servers: list[dict[str, ServerInfo]]) -> None:
        """Fails clearly if the swarm's servers (`servers`, as just read) announce another model under this name.

        The model record that most serving servers sign wins: one stranger's record cannot make
        every client fail."""
        if self._meta_checked:
            return
        agreed = agreed_meta(await self._read_dht(self.dht.fetch_meta(self.model_name)), servers)
        if agreed is None:
            raise MissingBlocksError(self.model_name, list(range(self.num_blocks)))
        if agreed.config_digest != self.checkpoint.config_digest or agreed.num_blocks != self.num_blocks:
            raise ModelMismatchError(
                f"servers announce a different model as {self.model_name!r} ({agreed.family}, {agreed.num_blocks} "
                f"blocks, config {agreed.config_digest[:12]}) than the local checkpoint "
                f"({self.checkpoint.family.model_type}, {self.num_blocks} blocks, "
                f"config {self.checkpoint.config_digest[:12]})"
            )
        self._meta_checked = True

    async def _read_dht(self, read: Awaitable):
        try:
            return await read
        except DHTUnavailableError as e:
            raise SwarmError(f"cannot read the swarm's DHT: {e}") from e

    async def make_chain(
        self,
        start: int = 0,
        end: Optional[int] = None,
        exclude: Collection[str] = (),
        avoid_owner: str = "",
        max_age: float = 0.0,
    ) -> list[SpanPlan]:
        """The fastest chain for blocks [start, end) over servers that are neither banned nor in `exclude`,
        preferring servers with a good score and, with `avoid_owner`, servers of another owner (another
        announced `public_name`) whenever such servers cover the blocks. With `max_age`, a DHT read
        that recent is used again instead of a new one."""
        index = await self._route_index(max_age)
        end = self.num_blocks if end is None else end
        excluded = set(exclude) | self.bans.banned()
        # A banned server is not pinged: a hung one would cost another timeout for nothing.
        await self.pings.refresh(index.candidates(start, end, excluded).values())
        preferences = []
        if avoid_owner:
            preferences.append(
                (
                    {info.peer_id for info in index.infos if info.record.public_name == avoid_owner},
                    f"only servers of owner {avoid_owner!r} cover some blocks; using them",
                )
            )
        unreliable = await self._unreliable()
        if unreliable - excluded:
            preferences.append(
                (unreliable, f"only servers scoring below {self.min_reliability:.2f} cover some blocks; using them")
            )
        for avoided, fallback in preferences:
            if avoided - excluded:
                chain = chain_avoiding(
                    self.model_name, index, start, end, excluded, avoided, rtts=self.pings.route_rtts(), rng=self.rng
                )
                if any(plan.peer_id in avoided for plan in chain):
                    logger.info(fallback)
                return chain
        return make_chain(self.model_name, index, start, end, excluded, rtts=self.pings.route_rtts(), rng=self.rng)

    async def _route_index(self, max_age: float) -> RouteIndex:
        now = time.monotonic()
        if self._last_read is not None and now - self._last_read[0] <= max_age:
            return self._last_read[1]
        servers = await self._read_dht(self.dht.fetch_servers(self.model_name, self.num_blocks))
        await self._check_model(servers)
        index = RouteIndex(servers)
        self._last_read = (now, index)
        return index

    async def longest_session(self) -> int:
        """The longest session the swarm can hold now: for every block, its most generous usable
        server's `max_length`, and the least of those (0 if some block has no usable server)."""
        servers = await self._read_dht(self.dht.fetch_servers(self.model_name, self.num_blocks))
        banned = self.bans.banned()
        per_block = [
            max((info.record.max_length for info in block.values() if usable(info, banned)), default=0)
            for block in servers
        ]
        return min(per_block, default=0)

    async def _unreliable(self) -> set[str]:
        """Peers whose reliability score (from a relay) is below `min_reliability`."""
        if self.reliability is None or self.min_reliability <= 0:
            return set()
        try:
            scores = await self.reliability()
        except Exception as e:
            logger.warning("could not read reliability scores (%s); routing without them", e)
            return set()
        return {peer for peer, score in scores.items() if score < self.min_reliability}

    def report_failure(self, peer_id: str, reason: str, bridge: str = "") -> None:
        """Bans a failed server with backoff and forgets its ping, so it is re-checked before reuse.

        A failure through a bridge may be the bridge's: that bridge is avoided for a while, and the
        server is banned only if it announces no other bridge that has not failed lately."""
        if bridge:
            now = time.monotonic()
            self._failed_bridges[bridge] = now + BRIDGE_AVOID_SECONDS
            if self._other_bridge(peer_id, now):
                logger.warning(
                    "server %s failed through bridge %s; trying its other bridges (%s)", peer_id, bridge, reason
                )
                self.pings.forget(peer_id)
                return
        self.bans.ban(peer_id, reason)
        self.pings.forget(peer_id)
        for task in self._checking.pop(peer_id, ()):
            self._abandoned.add(task)
            task.cancel()
        for listener in self.failure_listeners:
            listener(peer_id, reason)

    def bridges_to_avoid(self) -> frozenset[str]:
        """Bridges that failed in the last BRIDGE_AVOID_SECONDS."""
        now = time.monotonic()
        return frozenset(bridge for bridge, until in self._failed_bridges.items() if until > now)

    def _other_bridge(self, peer_id: str, now: float) -> bool:
        """Whether the latest read of `peer_id`'s record lists a bridge that has not failed lately."""
        if self._last_read is None:
            return False
        info = self._last_read[1].record_of(peer_id)
        return info is not None and any(
            self._failed_bridges.get(bridge, 0.0) <= now for bridge in info.record.bridge_addrs
        )

    def convict(self, evidence: Evidence) -> None:
        """A server proven to return wrong results: banned for good, and every session that used it
        rolls back to the last position verified for it."""
        peer = evidence.peer_id
        first = peer not in self.convicted
        self.convicted.setdefault(peer, evidence)
        reason = (
            f"returned wrong results for blocks {evidence.start_block}:{evidence.end_block} (relative error "
            f"{evidence.claimed_error:.2g} > {evidence.tolerance:.2g} against {evidence.referee})"
        )
        self.bans.ban_forever(peer, reason)
        self.pings.forget(peer)
        for session in list(self.sessions):
            session.server_proven_wrong(peer)
        if first:
            for listener in self.failure_listeners:
                listener(peer, reason)
            for fault_listener in self.fault_listeners:
                fault_listener(evidence)
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
        """A claim's outputs recomputed by a chain of other servers (none of `avoid`), as one stateless
        prefill of its whole input history; None if no such chain exists."""
        try:
            chain = await self.make_chain(
                claim.start, claim.end, exclude=avoid, avoid_owner=claim.owner, max_age=CHECK_ROUTE_MAX_AGE
            )
        except MissingBlocksError:
            return None
        hidden = claim.inputs
        for plan in chain:
            try:
                hidden = await self._unless_failed(
                    plan.peer_id,
                    forward_span(
                        self.p2p,
                        self.model_name,
                        plan,
                        hidden,
                        claim.mask,
                        self.chunk_tokens(hidden.shape[0]),
                        self.request_timeout,
                    ),
                )
            except ServerFailure as e:
                if plan.peer_id not in self.bans.banned():  # an abandoned request's server is banned already
                    self.report_failure(plan.peer_id, str(e), e.bridge)
                raise
        return Recomputation(
            by=" → ".join(plan.peer_id for plan in chain),
            peers=frozenset(p.peer_id for p in chain),
            outputs=hidden,
            dtype=least_precise([parse_dtype(plan.info.record.dtype) for plan in chain]),
        )

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

    def chunk_tokens(self, batch_size: int) -> int:
        """Tokens per message within the client's limit and the message size limit (each span further
        splits by its own server's announced limit)."""
        bytes_per_token = batch_size * self.checkpoint.hidden_size * 4
        return max(1, min(self.max_chunk_tokens, MAX_MESSAGE_BYTES // 2 // bytes_per_token))

    async def aforward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states of all positions after every block, without keeping any cache."""
        async with step_deadline(self.step_timeout, "forward pass"):
            return await self._forward(hidden, mask)

    async def _forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        chain = await self.make_chain()
        dtype = hidden.dtype
        index, failures = 0, 0
        while index < len(chain):
            plan = chain[index]
            try:
                hidden = await forward_span(
                    self.p2p,
                    self.model_name,
                    plan,
                    hidden,
                    mask,
                    self.chunk_tokens(hidden.shape[0]),
                    self.request_timeout,
                )
                index += 1
            except (ServerFailure, SwarmBusyError) as e:
                failures += 1
                if isinstance(e, ServerFailure):
                    self.report_failure(plan.peer_id, str(e), e.bridge)
                if failures > self.max_retries:
                    raise RetriesExhaustedError(f"gave up after {failures} failures; last: {e}") from e
                chain[index:] = await self.make_chain(plan.start, plan.end, exclude={plan.peer_id}) + chain[index + 1 :]
        return hidden.to(dtype)

    def shutdown(self) -> None:
        try:
            self.runtime.run(self.p2p.shutdown(), timeout=5)
        except Exception:
            logger.debug("p2p shutdown failed", exc_info=True)
        self.runtime.stop()
        self.dht.shutdown()
        self._referee_executor.shutdown(wait=False, cancel_futures=True)
