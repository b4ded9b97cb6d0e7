"""The health page's data: a pure function of what the DHT says and which servers answered a ping."""

from __future__ import annotations

from typing import Mapping, Optional

from pydantic import BaseModel

from dht.records import ModelRecord, ServerInfo, ServerState
from relay.timestamps import iso


class BlockHealth(BaseModel):
    index: int
    servers: int  # online servers hosting it
    throughput: float  # their summed inference throughput, tokens/s


class ServerRow(BaseModel):
    peer_id: str
    public_name: str
    state: ServerState
    available: bool
    start_block: int
    end_block: int
    throughput_inference: float
    throughput_forward: float
    network_mbps: Optional[float]
    cache_tokens_free: int
    cache_tokens_total: int
    region: str
    device_type: str
    device_name: str
    memory_total: int
    version: str
    # Answered the crawler's ping (directly or through a bridge); None: not checked (not online).
    reachable: Optional[bool]
    direct: bool  # what the server announces: peers can dial it (False: behind NAT, reached through bridges)
    bridge_addrs: list[str]  # the bridges it is attached to, when not direct
    rtt_ms: Optional[float]
    last_seen: Optional[str]  # when it last announced, UTC ISO 8601
    expires_at: str


class ModelHealth(BaseModel):
    name: str
    family: str
    num_blocks: int
    healthy: bool  # every block has an online server
    missing_blocks: list[int]
    blocks: list[BlockHealth]
    servers: list[ServerRow]


class SwarmState(BaseModel):
    updated_at: str
    models: list[ModelHealth]


def model_health(
    name: str, meta: Optional[ModelRecord], servers: list[dict[str, ServerInfo]], rtts: Mapping[str, float]
) -> ModelHealth:
    latest: dict[str, ServerInfo] = {}  # a server that moved has older records under its old blocks
    for block in servers:
        for info in block.values():
            if info.peer_id not in latest or info.record.announced_at > latest[info.peer_id].record.announced_at:
                latest[info.peer_id] = info
    rows: dict[str, ServerRow] = {}
    for info in latest.values():
        record = info.record
        online = record.state == ServerState.ONLINE
        rows[info.peer_id] = ServerRow(
            peer_id=info.peer_id,
            public_name=record.public_name,
            state=record.state,
            available=record.available,
            start_block=record.start_block,
            end_block=record.end_block,
            throughput_inference=record.throughput.inference,
            throughput_forward=record.throughput.forward,
            network_mbps=record.network_mbps,
            cache_tokens_free=record.cache_tokens_free,
            cache_tokens_total=record.cache_tokens_total,
            region=record.region,
            device_type=record.hardware.device_type,
            device_name=record.hardware.device_name,
            memory_total=record.hardware.memory_total,
            version=record.version,
            reachable=(info.peer_id in rtts) if online else None,
            direct=record.reachable,
            bridge_addrs=list(record.bridge_addrs),
            rtt_ms=round(rtts[info.peer_id] * 1000, 1) if info.peer_id in rtts else None,
            last_seen=iso(record.announced_at) if record.announced_at > 0 else None,
            expires_at=iso(info.expiration_time),
        )
    blocks = []
    for index, block in enumerate(servers):
        live = [i for i in block.values() if i.record.state == ServerState.ONLINE and i.peer_id in rtts]
        blocks.append(
            BlockHealth(
                index=index, servers=len(live), throughput=round(sum(i.record.throughput.inference for i in live), 2)
            )
        )
    missing = [b.index for b in blocks if b.servers == 0]
    return ModelHealth(
        name=name,
        family=meta.family if meta else "unknown",
        num_blocks=len(servers),
        healthy=not missing,
        missing_blocks=missing,
        blocks=blocks,
        servers=sorted(rows.values(), key=lambda row: (row.start_block, row.end_block, row.peer_id)),
    )
