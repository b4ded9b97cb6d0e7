"""Prefill/decode disaggregation, the client's side: when the swarm has servers of both roles, a
session whose prompt is worth it computes the prompt on prefill servers and then moves its KV cache
to decode servers of the same blocks, so that long prompts do not stall the decode servers' other
sessions. Pure decisions over DHT records (the moving itself is `InferenceSession`'s)."""

from __future__ import annotations

import statistics
from typing import Collection, Optional

from client.adapters import SessionAdapter
from client.routing import RouteIndex, SpanPlan, has_room

MOVE_OVERHEAD_SECONDS = 0.1  # a move's round trips: the request, the import stream, the resume
DEFAULT_LINK_MBPS = 100.0  # where no server of the move announces its measured bandwidth


def prompt_goes_to_prefill(
    index: RouteIndex, tokens: int, batch: int, kv_bytes_per_token_block: int, num_blocks: int
) -> bool:
    """Whether a prompt of `tokens` (at `batch`) should be computed on prefill servers: the swarm
    has prefill and decode servers, and moving its KV costs less than the decode servers' computing
    it themselves (estimated from the decode servers' announced forward throughput and bandwidth)."""
    decode = [info for info in index.infos if info.record.role == "decode"]
    if not decode or not any(info.record.role == "prefill" for info in index.infos):
        return False
    per_block_rate = statistics.median(
        info.record.throughput.forward * (info.record.end_block - info.record.start_block) for info in decode
    )
    links = [info.record.network_mbps for info in decode if info.record.network_mbps]
    mbps = statistics.median(links) if links else DEFAULT_LINK_MBPS
    recompute = tokens * batch * num_blocks / max(per_block_rate, 1e-9)
    move = tokens * batch * kv_bytes_per_token_block * num_blocks * 8 / (mbps * 1e6) + MOVE_OVERHEAD_SECONDS
    return move < recompute


def decode_server(
    index: RouteIndex,
    span: SpanPlan,
    exclude: Collection[str],
    max_length: int,
    batch: int,
    adapter: Optional[SessionAdapter] = None,
) -> Optional[SpanPlan]:
    """The decode server to move a prefill server's span to: it serves the span's blocks, in the same
    dtype and quantization, and the session's adapter, and announced room for the session (the
    fastest such, else None). A session with the client's own adapter stays where it is."""
    if adapter is not None and adapter.own:
        return None
    record = span.info.record
    best: Optional[SpanPlan] = None
    for info in index.candidates(span.start, span.end, exclude).values():
        other = info.record
        if other.role != "decode" or (other.dtype, other.quant) != (record.dtype, record.quant):
            continue
        if adapter is not None and adapter.name not in other.adapters:
            continue
        plan = index.plan(info.peer_id, span.start, span.end, exclude, max_length, batch)
        if plan is None or not has_room(info, max_length, batch):
            continue
        if best is None or other.throughput.inference > best.info.record.throughput.inference:
            best = plan
    return best
