"""Choosing a chain of servers that covers blocks [start, end): a pure function of the DHT records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

from client.errors import MissingBlocksError
from dht.records import ServerInfo, ServerState


@dataclass(frozen=True)
class SpanPlan:
    """Use server `peer_id` for blocks [start, end)."""

    peer_id: str
    start: int
    end: int
    info: ServerInfo


def usable(info: ServerInfo, exclude: Collection[str]) -> bool:
    record = info.record
    return info.peer_id not in exclude and record.state == ServerState.ONLINE and record.cache_tokens_free > 0


def make_chain(
    model: str, servers: list[dict[str, ServerInfo]], start: int = 0, end: int | None = None, exclude: Collection[str] = ()
) -> list[SpanPlan]:
    """The chain with the fewest hops: at each block, the usable server that reaches furthest
    (ties: higher inference throughput, then peer id so the choice is deterministic)."""
    end = len(servers) if end is None else end
    missing = [b for b in range(start, end) if not any(usable(i, exclude) for i in servers[b].values())]
    if missing:
        raise MissingBlocksError(model, missing)
    chain, block = [], start
    while block < end:
        best = max(
            (i for i in servers[block].values() if usable(i, exclude)),
            key=lambda i: (min(i.record.end_block, end), i.record.throughput.inference, i.peer_id),
        )
        span_end = min(best.record.end_block, end)
        chain.append(SpanPlan(best.peer_id, block, span_end, best))
        block = span_end
    return chain
