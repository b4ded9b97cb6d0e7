"""Which servers a request goes through: the fastest chain over the latest read of the swarm, with
fresh pings, without banned servers, and avoiding low reliability scores and (for checks) the
checked server's owner wherever other servers cover the blocks. The search itself is the pure
`client.routing`."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Collection, Mapping, Optional

from client.adapters import SessionAdapter
from client.bans import BanList
from client.errors import MissingBlocksError
from client.pings import PingCache
from client.routing import (
    SpanPlan,
    chain_avoiding,
    has_room,
    longest_accepted,
    make_chain,
    prefer_cached,
    usable,
)
from client.swarm_view import SwarmView

logger = logging.getLogger(__name__)

# How long a session or a forward waits, in all, for the bans of the only servers of some blocks to end.
BAN_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class CachedChain:
    """A chain whose servers hold `tokens` of a session's prompt in their prefix caches, for a session
    that will compute about `new_tokens` more."""

    chain: tuple[tuple[str, int, int], ...]  # (peer, start, end) of each span
    tokens: int
    new_tokens: int


class Router:
    def __init__(
        self,
        view: SwarmView,
        bans: BanList,
        pings: PingCache,
        reliability: Optional[Callable[[], Awaitable[Mapping[str, float]]]] = None,
        min_reliability: float = 0.0,
        region: str = "",
        quant: Optional[frozenset[str]] = None,
    ):
        self.region = region  # the client's own region: chains prefer servers that announce it
        self.quant = quant  # the quantizations a chain may use (None: any)
        self.view = view
        self.bans = bans
        self.pings = pings
        self.reliability = reliability
        self.min_reliability = min_reliability
        self.rng = random.Random()

    async def chain(
        self,
        start: int = 0,
        end: Optional[int] = None,
        exclude: Collection[str] = (),
        avoid_owner: str = "",
        max_age: float = 0.0,
        max_length: int = 0,
        batch: int = 1,
        wait_for_bans: float = 0.0,
        cached: Optional[CachedChain] = None,
        region: Optional[str] = None,
        quant: Optional[str] = None,
        adapter: Optional[SessionAdapter] = None,
        prefill: bool = False,
    ) -> list[SpanPlan]:
        """`search` (below); with `wait_for_bans`, when some block is served only by servers banned for
        a failure, waits for the first of their bans to end (if that comes within `wait_for_bans`
        seconds in all) and searches again: a server banned for one timeout may be the only one left
        for its blocks, and failing the whole session is worse than waiting a few seconds for it."""
        give_up = time.monotonic() + wait_for_bans
        while True:
            try:
                return await self.search(
                    start,
                    end,
                    exclude,
                    avoid_owner,
                    max_age,
                    max_length,
                    batch,
                    cached,
                    region,
                    quant,
                    adapter,
                    prefill,
                )
            except MissingBlocksError as e:
                wait = await self._ban_wait(e.blocks, exclude)
                if wait is None or time.monotonic() + wait > give_up:
                    raise
                logger.warning("only banned servers serve block(s) %s; waiting %.1f s for a ban to end", e.blocks, wait)
                await asyncio.sleep(wait)

    async def _ban_wait(self, blocks: list[int], exclude: Collection[str]) -> Optional[float]:
        """Seconds until the first ban ends among the banned servers of `blocks` (None if there are none)."""
        index = await self.view.index(max_age=float("inf"))
        banned = self.bans.banned() - set(exclude)
        peers = set().union(*(index.serving(block) for block in blocks)) & banned
        ends = [self.bans.ends_in(peer) for peer in peers]
        return min(ends) if ends and min(ends) < float("inf") else None

    async def search(
        self,
        start: int = 0,
        end: Optional[int] = None,
        exclude: Collection[str] = (),
        avoid_owner: str = "",
        max_age: float = 0.0,
        max_length: int = 0,
        batch: int = 1,
        cached: Optional[CachedChain] = None,
        region: Optional[str] = None,
        quant: Optional[str] = None,
        adapter: Optional[SessionAdapter] = None,
        prefill: bool = False,
    ) -> list[SpanPlan]:
        """The fastest chain for blocks [start, end) over servers that are neither banned nor in `exclude`
        and accept a session of `batch` × `max_length` tokens (BadRequestError if some block has none),
        preferring servers that announced room for it, servers with a good score and, with
        `avoid_owner`, servers of another owner (another announced `public_name`) wherever other
        servers cover the blocks. With `max_age`, a DHT read that recent is used again instead of a
        new one. With `cached`, the chain that holds the session's prompt in its prefix caches wins
        where the prefill it saves beats its slower steps (and every server of it is still usable).
        `region` is the region preferred for this one search (default: the client's own). With `quant`,
        only servers quantized that way are used (a spot check's recomputation must be); with `adapter`,
        only servers that serve it (or, for the client's own, that take a client's adapter). Servers of
        the other role are avoided where others cover their blocks: `prefill` servers for a session's
        prompt (`prefill=True`: then `decode` servers are avoided), `decode` ones otherwise."""
        index = await self.view.index(max_age)
        model = self.view.model_name
        end = self.view.num_blocks if end is None else end
        excluded = set(exclude) | self.bans.banned() | self._refused(index.infos, quant, adapter)
        # A banned server is not pinged: a hung one would cost another timeout for nothing.
        await self.pings.refresh(index.candidates(start, end, excluded).values())
        preferences = []
        other_role = "decode" if prefill else "prefill"
        role = {info.peer_id for info in index.infos if info.record.role == other_role}
        if role:
            preferences.append((role, f"only {other_role} servers cover some blocks; using them"))
        if avoid_owner:
            owned = {info.peer_id for info in index.infos if info.record.public_name == avoid_owner}
            preferences.append((owned, f"only servers of owner {avoid_owner!r} cover some blocks; using them"))
        unreliable = await self._unreliable()
        if unreliable:
            fallback = f"only servers scoring below {self.min_reliability:.2f} cover some blocks; using them"
            preferences.append((unreliable, fallback))
        if max_length > 0:
            full = {info.peer_id for info in index.infos if not has_room(info, max_length, batch)}
            room = f"only servers that announced no room for {batch}×{max_length} tokens cover some blocks; trying them"
            preferences.append((full, room))
        preferences = [(peers, fallback) for peers, fallback in preferences if peers - excluded]
        rtts = self.pings.route_rtts()
        search = dict(
            rtts=rtts,
            rng=self.rng,
            max_length=max_length,
            batch=batch,
            region=self.region if region is None else region,
        )
        avoided = set().union(*(peers for peers, _ in preferences))
        try:
            if not preferences:
                chain = make_chain(model, index, start, end, excluded, **search)
            else:
                chain = chain_avoiding(model, index, start, end, excluded, avoided, **search)
        except MissingBlocksError as e:
            accepted = {quant} if quant is not None else self.quant
            conditions = [f"with quantization {' or '.join(sorted(accepted))}"] if accepted is not None else []
            if adapter is not None:
                conditions.append("taking a client's adapter" if adapter.own else f"serving adapter {adapter.name!r}")
            if not conditions:
                raise
            raise MissingBlocksError(e.model, e.blocks, " and ".join(conditions)) from None
        for peers, fallback in preferences:
            if any(plan.peer_id in peers for plan in chain):
                logger.info(fallback)
        if cached is not None and (cached.chain[0][1], cached.chain[-1][2]) == (start, end):
            plans = [
                index.plan(peer, first, last, excluded | avoided, max_length, batch)
                for peer, first, last in cached.chain
            ]
            if all(plan is not None for plan in plans):
                chain = prefer_cached(chain, plans, cached.tokens, cached.new_tokens, rtts)
        return chain

    async def longest_session(self) -> int:
        """The longest session (at batch 1) the swarm can hold now: for every block, the most its most
        generous usable server accepts (`max_length`, capped by its whole cache budget), and the least
        of those over blocks (0 if some block has no usable server)."""
        servers = await self.view.servers()
        banned = self.bans.banned() | self._refused([info for block in servers for info in block.values()])
        per_block = [
            max((longest_accepted(info) for info in block.values() if usable(info, banned)), default=0)
            for block in servers
        ]
        return min(per_block, default=0)

    def _refused(self, infos, quant: Optional[str] = None, adapter: Optional[SessionAdapter] = None) -> set[str]:
        """Servers of a quantization this client does not accept (or, with `quant`, of any other), and
        with `adapter`, those that cannot run it."""
        accepted = {quant} if quant is not None else self.quant
        return {
            info.peer_id
            for info in infos
            if (accepted is not None and info.record.quant not in accepted)
            or (adapter is not None and not adapter.served_by(info))
        }

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
