"""DHT records and route tables as servers would announce them, for unit tests of readers and routing."""

from __future__ import annotations

from dht.records import ServerInfo, ServerRecord


def servers(*specs, num_blocks=8, limits=None):
    """specs: (peer, start, end[, state[, free[, throughput]]]) -> per-block {peer: ServerInfo};
    `limits`: {peer: record fields} for the ones a spec does not set (max_length, cache_tokens_total)."""
    blocks = [{} for _ in range(num_blocks)]
    for peer, start, end, *rest in specs:
        state, free, throughput = (rest + ["online", 100, 10.0][len(rest) :])[:3]
        record = ServerRecord.from_wire(
            record_wire(
                start_block=start,
                end_block=end,
                state=state,
                cache_tokens_free=free,
                throughput={"inference": throughput, "forward": throughput},
                **(limits or {}).get(peer, {}),
            )
        )
        for block in range(start, end):
            blocks[block][peer] = ServerInfo(peer_id=peer, record=record, expiration_time=0)
    return blocks


def record_wire(**overrides):
    wire = dict(
        state="online",
        start_block=0,
        end_block=4,
        throughput={"inference": 10.0, "forward": 100.0},
        cache_tokens_free=100,
        cache_tokens_total=200,
        max_length=64,
        dtype="float32",
        hardware={"device_type": "cpu", "device_name": "x86_64", "memory_total": 1, "memory_free": 1},
        region="europe-west",
        version="0.1.0",
        public_name="alice",
        bridged=False,
        addrs=["/ip4/127.0.0.1/tcp/1/p2p/Qm"],
    )
    wire.update(overrides)
    return wire
