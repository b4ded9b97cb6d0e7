"""Choosing a chain of servers that covers blocks [start, end): a pure function of records, pings and bans.

The chain minimises the estimated time of one decode step: for every hop, the round trip to the
server plus the compute time of the blocks it runs, from the throughput it announces. A server may
be used for part of its range, so a chain can switch servers at any block. A little random jitter
(`rng`) spreads clients over near-equal choices instead of piling them on one server.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Collection, Mapping, Optional

from client.errors import MissingBlocksError
from dht.records import ServerInfo, ServerState

DEFAULT_RTT = 0.05  # seconds, for servers not measured yet


@dataclass(frozen=True)
class SpanPlan:
    """Use server `peer_id` for blocks [start, end)."""

    peer_id: str
    start: int
    end: int
    info: ServerInfo


def usable(info: ServerInfo, exclude: Collection[str]) -> bool:
    record = info.record
    return (info.peer_id not in exclude and record.state == ServerState.ONLINE and record.available
            and record.cache_tokens_free > 0)


def seconds_per_block(info: ServerInfo) -> float:
    record = info.record
    return 1.0 / (max(record.throughput.inference, 1e-6) * (record.end_block - record.start_block))


def make_chain(
    model: str,
    servers: list[dict[str, ServerInfo]],
    start: int = 0,
    end: Optional[int] = None,
    exclude: Collection[str] = (),
    rtts: Mapping[str, float] | None = None,
    rng: Optional[random.Random] = None,
    jitter: float = 0.1,
) -> list[SpanPlan]:
    """The fastest chain over usable servers; raises MissingBlocksError naming uncovered blocks."""
    end = len(servers) if end is None else end
    rtts = rtts or {}
    # What the search needs of each record, computed once per record (a record sits under every block it serves).
    records: dict[int, Optional[ServerInfo]] = {}
    for block in range(start, end):
        for info in servers[block].values():
            if id(info) not in records:
                records[id(info)] = info if usable(info, exclude) else None
    missing = [b for b in range(start, end) if not any(records[id(i)] for i in servers[b].values())]
    if missing:
        raise MissingBlocksError(model, missing)
    peers = sorted({info.peer_id for info in records.values() if info is not None})
    noise = {peer: 1.0 + (rng.random() * jitter if rng else 0.0) for peer in peers}
    facts = {key: (info.peer_id, seconds_per_block(info) * noise[info.peer_id],
                   rtts.get(info.peer_id, DEFAULT_RTT) * noise[info.peer_id])
             for key, info in records.items() if info is not None}

    # best[j]: fastest way to have blocks [start, j) done. For each server, keep the best block i at
    # which to enter it (minimising best[i] - i * per_block), updated as j moves right: O(blocks × servers).
    best = [math.inf] * (end + 1)
    best[start] = 0.0
    came_from: list[Optional[tuple[int, ServerInfo]]] = [None] * (end + 1)
    entry: dict[str, tuple[float, int]] = {}
    for j in range(start + 1, end + 1):
        present = set()
        best_before = best[j - 1]
        for info in servers[j - 1].values():
            # A peer that moved may still have an old record under other blocks: judge each record alone.
            known_facts = facts.get(id(info))
            if known_facts is None:
                continue
            peer, per_block, rtt = known_facts
            present.add(peer)
            if best_before < math.inf:
                value = best_before - (j - 1) * per_block
                known = entry.get(peer)
                if known is None or value < known[0]:
                    entry[peer] = known = (value, j - 1)
            else:
                known = entry.get(peer)
                if known is None:
                    continue
            cost = known[0] + j * per_block + rtt
            if cost < best[j]:
                best[j], came_from[j] = cost, (known[1], info)
        # a server can only be extended over consecutive blocks it serves
        if len(entry) > len(present):
            for peer in [peer for peer in entry if peer not in present]:
                del entry[peer]

    chain, j = [], end
    while j > start:
        i, info = came_from[j]
        chain.append(SpanPlan(info.peer_id, i, j, info))
        j = i
    return chain[::-1]


def estimated_step_time(chain: list[SpanPlan], rtts: Mapping[str, float] | None = None) -> float:
    rtts = rtts or {}
    return sum(rtts.get(p.peer_id, DEFAULT_RTT) + (p.end - p.start) * seconds_per_block(p.info) for p in chain)
