"""DHT records: typed, validated on read, tolerant of newer fields, signed by their owner."""

from __future__ import annotations

import pytest

from dht.records import MAX_RECORD_BYTES, ModelRecord, ServerRecord, ServerState, parse_server_entry
from tests.helpers.records import record_wire


def test_round_trip_and_unknown_fields_are_ignored():
    record = ServerRecord.from_wire(record_wire(future_field={"x": 1}))
    assert record is not None and record.state == ServerState.ONLINE
    assert ServerRecord.from_wire(record.to_wire()) == record
    assert "future_field" not in record.to_wire()


def test_records_of_servers_from_before_the_bridge_rename_are_read():
    """Servers of the earlier version name their bridges relay_addrs (and relay_node, using_relay)."""
    old = record_wire(reachable=False, relay_addrs=["/ip4/11.0.0.1/tcp/1/p2p/QmB"], relay_node=True, using_relay=True)
    del old["bridged"]
    record = ServerRecord.from_wire(old)
    assert record.bridge_addrs == ("/ip4/11.0.0.1/tcp/1/p2p/QmB",) and record.bridge_node and record.bridged
    wire = record.to_wire()
    assert wire["bridge_addrs"] == ["/ip4/11.0.0.1/tcp/1/p2p/QmB"] and "relay_addrs" not in wire


@pytest.mark.parametrize(
    "raw",
    [
        None,
        42,
        "online",
        [1, 2],
        {},
        record_wire(state="sleeping"),
        record_wire(start_block=3, end_block=3),
        record_wire(start_block=-1),
        record_wire(cache_tokens_free="lots"),
        record_wire(throughput={"inference": -1, "forward": 1}),
        record_wire(public_name="x" * 1000),
        record_wire(dtype="float64"),  # no server computes in it: a client would fail mid-generation
        record_wire(dtype=32),
        record_wire(start_block=0, end_block=100_000),  # more blocks than any model has
        record_wire(addrs=["/ip4/1.2.3.4/" + "a" * 300]),
        record_wire(reachable=False, bridge_addrs=["/ip4/1.2.3.4/tcp/1"]),  # a bridge address names its bridge peer
        record_wire(reachable=False, bridge_addrs=[f"/ip4/1.2.3.{i}/tcp/1/p2p/Qm" for i in range(5)]),
        record_wire(region="r" * (MAX_RECORD_BYTES + 1)),
    ],
)
def test_malformed_or_oversized_records_are_dropped(raw):
    assert ServerRecord.from_wire(raw) is None
    assert parse_server_entry("QmPeer", raw, 0.0) is None


def test_entries_without_an_owner_are_dropped():
    assert parse_server_entry(None, record_wire(), 0.0) is None
    assert parse_server_entry("QmPeer", record_wire(), 5.0).expiration_time == 5.0


def test_model_record_requires_a_full_digest():
    assert ModelRecord.from_wire({"num_blocks": 4, "family": "llama", "config_digest": "ab", "hidden_size": 8}) is None
    # a fake block count cannot make a crawler read 100 000 keys
    assert (
        ModelRecord.from_wire({"num_blocks": 100_000, "family": "llama", "config_digest": "a" * 64, "hidden_size": 8})
        is None
    )
    assert ModelRecord.from_wire({"num_blocks": 4, "family": "llama", "config_digest": "a" * 64, "hidden_size": 8})


def test_an_unreachable_server_is_routed_only_once_it_announces_a_bridge_and_the_health_page_says_so():
    from client.routing import usable
    from relay.health.page import server_row
    from relay.health.state import model_health

    bridged = parse_server_entry(
        "QmHome", record_wire(reachable=False, bridge_addrs=["/ip4/11.0.0.1/tcp/1/p2p/QmR"]), 9e9
    )
    alone = parse_server_entry("QmHome", record_wire(reachable=False), 9e9)
    direct = parse_server_entry("QmHome", record_wire(), 9e9)
    assert usable(bridged, ()) and usable(direct, ()) and not usable(alone, ())
    (row,) = model_health("m", None, [{"QmHome": bridged}] * 4, {"QmHome": 0.01}).servers
    assert row.reachable is True and row.direct is False and row.bridge_addrs == ["/ip4/11.0.0.1/tcp/1/p2p/QmR"]
    assert "· bridged" in server_row(row)
    (row,) = model_health("m", None, [{"QmHome": direct}] * 4, {"QmHome": 0.01}).servers
    assert row.direct is True and "bridged" not in server_row(row)
