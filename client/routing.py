"""Choosing a chain of servers that covers blocks [start, end): a pure function of records, pings and bans.

The chain minimises the estimated time of one decode step: for every hop, the round trip to the
server plus the compute time of the blocks it runs, from the throughput it announces. A server may
be used for part of its range, so a chain can switch servers at any block. A little random jitter
(`rng`) spreads clients over near-equal choices instead of piling them on one server.

A `RouteIndex` arranges one DHT read's records once (a swarm of 10 000 servers has about 100 000
(block, record) pairs, too many to walk in Python for every search); each search over it is a
dynamic program over blocks, vectorised over the records present at each block.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Collection, Mapping, Optional

import numpy as np

from client.errors import BadRequestError, MissingBlocksError
from dht.records import ServerInfo, ServerState

DEFAULT_RTT = 0.05  # seconds, for servers not measured yet
# What a hop to a server of another region than the client's costs on top of its round trip: a
# measured round trip says how far a server is now, the region that a link that far tends to be
# slower and dearer (the same-region chain wins among comparable ones).
CROSS_REGION_SECONDS = 0.05


@dataclass(frozen=True)
class SpanPlan:
    """Use server `peer_id` for blocks [start, end)."""

    peer_id: str
    start: int
    end: int
    info: ServerInfo


def usable(info: ServerInfo, exclude: Collection[str]) -> bool:
    record = info.record
    return (
        info.peer_id not in exclude
        and record.state == ServerState.ONLINE
        and record.available
        and record.cache_tokens_free > 0
        and (record.reachable or bool(record.bridge_addrs))
    )


def longest_accepted(info: ServerInfo) -> int:
    """The longest session of batch 1 this server accepts at all: its `max_length`, capped by its
    whole cache budget (a server with a small --cache-tokens refuses what its max_length allows)."""
    return min(info.record.max_length, info.record.cache_tokens_total)


def has_room(info: ServerInfo, max_length: int, batch: int = 1) -> bool:
    """Whether the server announced enough free cache for the session (as of its last announce)."""
    return info.record.cache_tokens_free >= batch * max_length


def seconds_per_block(info: ServerInfo) -> float:
    record = info.record
    return 1.0 / (max(record.throughput.inference, 1e-6) * (record.end_block - record.start_block))


class RouteIndex:
    """The records of one read of `servers` (per block, {peer: record}), arranged for many searches.

    A record counts only over consecutive blocks where it is stored and that it claims to serve, so
    a moved server's stale records elsewhere, or a record planted under a block it does not serve,
    are never routed to."""

    def __init__(self, servers: list[dict[str, ServerInfo]]):
        self.num_blocks = len(servers)
        runs: dict[tuple[str, int, int], int] = {}
        current: dict[str, tuple[ServerInfo, int, int]] = {}  # peer -> (record object, its run, its end) as last seen
        infos: list[ServerInfo] = []
        first: list[int] = []
        last: list[int] = []
        for block, entries in enumerate(servers):
            previous = block - 1
            for peer, info in entries.items():
                seen = current.get(peer)
                if seen is not None and seen[0] is info:
                    run = seen[1]
                    if last[run] == previous and block < seen[2]:
                        last[run] = block  # the same record object as one block before: most pairs
                        continue
                record = info.record
                if info.peer_id != peer or not record.start_block <= block < record.end_block:
                    continue
                key = (peer, record.start_block, record.end_block)
                run = runs.get(key)
                if run is None or last[run] != previous:
                    run = runs[key] = len(infos)
                    infos.append(info)
                    first.append(block)
                    last.append(block)
                else:
                    last[run] = block
                current[peer] = (info, run, record.end_block)
        self.infos = infos
        self.peers = sorted({info.peer_id for info in infos})
        self.position = {peer: i for i, peer in enumerate(self.peers)}
        self.peer_of = np.array([self.position[info.peer_id] for info in infos], dtype=np.int64)
        self.runs_of: dict[str, list[int]] = {}
        for run, info in enumerate(infos):
            self.runs_of.setdefault(info.peer_id, []).append(run)
        self.per_block = np.array([seconds_per_block(info) for info in infos], dtype=np.float64)
        self.open = np.array([usable(info, ()) for info in infos], dtype=bool)
        self.max_length = np.array([info.record.max_length for info in infos], dtype=np.int64)
        self.cache_total = np.array([info.record.cache_tokens_total for info in infos], dtype=np.int64)
        self.region = np.array([info.record.region for info in infos], dtype=object)
        self.first, self.last = np.array(first, dtype=np.int64), np.array(last, dtype=np.int64)
        self.present = [
            np.flatnonzero((self.first <= block) & (self.last >= block)) for block in range(self.num_blocks)
        ]

    def serving(self, block: int) -> set[str]:
        """Peers whose usable records cover `block`."""
        return {self.infos[run].peer_id for run in self.present[block] if self.open[run]}

    def record_of(self, peer_id: str) -> Optional[ServerInfo]:
        """One of `peer_id`'s records in this read, or None."""
        runs = self.runs_of.get(peer_id)
        return self.infos[runs[0]] if runs else None

    def plan(
        self, peer_id: str, start: int, end: int, exclude: Collection[str], max_length: int = 0, batch: int = 1
    ) -> Optional[SpanPlan]:
        """Server `peer_id` for blocks [start, end), if one of its usable records covers them, it is not
        in `exclude` and it accepts the session; else None."""
        if peer_id in exclude:
            return None
        accepted = self.accepted(batch)
        for run in self.runs_of.get(peer_id, []):
            info = self.infos[run]
            covers = self.first[run] <= start and self.last[run] >= end - 1
            fits = max_length <= 0 or int(accepted[run]) >= max_length
            if covers and fits and self.open[run]:
                return SpanPlan(peer_id, start, end, info)
        return None

    def accepted(self, batch: int) -> np.ndarray:
        """Per record, the longest session it accepts at `batch`: its max_length, capped by its whole cache."""
        return np.minimum(self.max_length, self.cache_total // batch)

    def candidates(self, start: int, end: int, exclude: Collection[str]) -> dict[str, ServerInfo]:
        """One usable record per peer present in blocks [start, end) (the servers worth pinging)."""
        runs = np.flatnonzero(self.open & (self.first < end) & (self.last >= start))
        chosen: dict[str, ServerInfo] = {}
        for run in runs:
            info = self.infos[run]
            if info.peer_id not in exclude:
                chosen.setdefault(info.peer_id, info)
        return chosen


def make_chain(
    model: str,
    servers: list[dict[str, ServerInfo]] | RouteIndex,
    start: int = 0,
    end: Optional[int] = None,
    exclude: Collection[str] = (),
    rtts: Mapping[str, float] | None = None,
    rng: Optional[random.Random] = None,
    jitter: float = 0.1,
    max_length: int = 0,
    batch: int = 1,
    region: str = "",
) -> list[SpanPlan]:
    """The fastest chain over usable servers that accept a session of `batch` × `max_length` tokens;
    raises MissingBlocksError naming uncovered blocks, or BadRequestError if servers cover them but
    none of some block accepts a session that long. With the client's `region`, a hop to a server
    that announces another region costs CROSS_REGION_SECONDS more: among comparable chains the
    same-region one wins, and a block only other regions serve is still served."""
    index = servers if isinstance(servers, RouteIndex) else RouteIndex(servers)
    end = index.num_blocks if end is None else end
    ok = index.open.copy()
    for peer in exclude:
        ok[index.runs_of.get(peer, [])] = False
    missing = [block for block in range(start, end) if not ok[index.present[block]].any()]
    if missing:
        raise MissingBlocksError(model, missing)
    if max_length > 0:
        accepted = index.accepted(batch)
        fitting = ok & (accepted >= max_length)
        short = [block for block in range(start, end) if not fitting[index.present[block]].any()]
        if short:
            longest = min(int(accepted[index.present[block]][ok[index.present[block]]].max()) for block in short)
            raise BadRequestError(
                f"no server of block(s) {_ranges(short)} of {model} accepts a session of {max_length} tokens"
                f" at batch {batch}: the longest they accept is {longest}"
            )
        ok = fitting

    peer_rtt = np.full(len(index.peers), DEFAULT_RTT)
    for peer, rtt in (rtts or {}).items():
        if peer in index.position:
            peer_rtt[index.position[peer]] = rtt
    noise = np.ones(len(index.peers))
    if rng is not None:
        noise += np.random.default_rng(rng.getrandbits(64)).random(len(index.peers)) * jitter
    per_block = index.per_block * noise[index.peer_of]
    # An unusable record costs an infinite round trip: it is never chosen, and the arrays keep their shape.
    rtt = np.where(ok, peer_rtt[index.peer_of] * noise[index.peer_of], np.inf)
    if region:
        rtt = rtt + np.where((index.region != "") & (index.region != region), CROSS_REGION_SECONDS, 0.0)

    # best[j]: fastest way to have blocks [start, j) done. entry[r]: the least best[i] - i * per_block[r]
    # over the blocks i at which record r could have been entered so far (entered_at[r] is that i).
    best = [0.0] * (end + 1)
    came_from: list[tuple[int, int]] = [(0, 0)] * (end + 1)
    entry = np.full(len(index.infos), np.inf)
    entered_at = np.zeros(len(index.infos), dtype=np.int64)
    for j in range(start + 1, end + 1):
        here = index.present[j - 1]
        slope = per_block[here]
        entering = best[j - 1] - (j - 1) * slope
        known = entry[here]
        better = entering < known
        known = np.where(better, entering, known)
        entry[here] = known
        since = np.where(better, j - 1, entered_at[here])
        entered_at[here] = since
        cost = known + j * slope + rtt[here]
        k = int(cost.argmin())
        best[j], came_from[j] = float(cost[k]), (int(since[k]), int(here[k]))

    chain, j = [], end
    while j > start:
        i, run = came_from[j]
        info = index.infos[run]
        chain.append(SpanPlan(info.peer_id, i, j, info))
        j = i
    return chain[::-1]


def _ranges(blocks: list[int]) -> str:
    """[1, 2, 3, 7] → "1-3, 7"."""
    parts, first = [], blocks[0]
    for previous, block in zip(blocks, blocks[1:] + [None]):
        if block != previous + 1:
            parts.append(f"{first}-{previous}" if previous > first else str(first))
            first = block
    return ", ".join(parts)


def chain_avoiding(
    model: str,
    index: RouteIndex,
    start: int,
    end: int,
    exclude: Collection[str],
    avoid: Collection[str],
    rtts: Mapping[str, float] | None = None,
    rng: random.Random | None = None,
    max_length: int = 0,
    batch: int = 1,
    region: str = "",
) -> list[SpanPlan]:
    """The fastest chain that uses servers in `avoid` only for blocks that no other server covers
    (so one block without an alternative does not bring every avoided server back)."""
    avoid = set(avoid)
    while True:
        try:
            return make_chain(
                model,
                index,
                start,
                end,
                set(exclude) | avoid,
                rtts=rtts,
                rng=rng,
                max_length=max_length,
                batch=batch,
                region=region,
            )
        except BadRequestError:
            if not avoid:
                raise
            avoid = set()  # the others are too small for the session somewhere: avoided servers may fit there
        except MissingBlocksError as e:
            needed = {peer for block in e.blocks for peer in index.serving(block)} & avoid
            if not needed:
                raise
            avoid -= needed


def prefill_seconds(chain: list[SpanPlan], tokens: int) -> float:
    """What computing `tokens` prompt tokens costs `chain`, at its servers' announced forward throughput."""
    seconds = 0.0
    for plan in chain:
        record = plan.info.record
        share = (plan.end - plan.start) / max(record.end_block - record.start_block, 1)
        seconds += tokens * share / max(record.throughput.forward, 1e-6)
    return seconds


def prefer_cached(
    best: list[SpanPlan],
    cached: list[SpanPlan],
    cached_tokens: int,
    new_tokens: int,
    rtts: Mapping[str, float] | None = None,
) -> list[SpanPlan]:
    """`cached` (the chain whose servers hold `cached_tokens` of the prompt) instead of the fastest
    chain `best` when the prefill it saves beats what its slower steps cost over `new_tokens` tokens."""
    saving = prefill_seconds(cached, cached_tokens)
    extra = (estimated_step_time(cached, rtts) - estimated_step_time(best, rtts)) * new_tokens
    return cached if saving > extra else best


def estimated_step_time(chain: list[SpanPlan], rtts: Mapping[str, float] | None = None) -> float:
    rtts = rtts or {}
    return sum(rtts.get(p.peer_id, DEFAULT_RTT) + (p.end - p.start) * seconds_per_block(p.info) for p in chain)
