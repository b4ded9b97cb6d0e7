"""discovery.mdns: what a stranger on the LAN announces is kept only when well formed, only LAN
addresses are announced, and a missing py-libp2p environment is a clear error."""

from __future__ import annotations

import json

import pytest

from discovery.mdns import MAX_ADDRS, LanDiscovery, MdnsUnavailable, lan_addrs, parse_found

QM = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
ED = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


def line(peer_id, addrs) -> str:
    return json.dumps({"peer_id": peer_id, "addrs": addrs})


def test_a_well_formed_announcement_gives_full_multiaddrs():
    assert parse_found(line(QM, ["/ip4/10.0.0.5/tcp/31337", "/ip6/fe80::1/tcp/4001"])) == (
        QM,
        [f"/ip4/10.0.0.5/tcp/31337/p2p/{QM}", f"/ip6/fe80::1/tcp/4001/p2p/{QM}"],
    )
    assert parse_found(line(ED, ["/ip4/192.168.1.2/tcp/1"])) == (ED, [f"/ip4/192.168.1.2/tcp/1/p2p/{ED}"])


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"ready": true}',
        line("Qmshort", ["/ip4/10.0.0.5/tcp/1"]),
        line(QM + "/p2p-circuit", ["/ip4/10.0.0.5/tcp/1"]),
        line(QM, "/ip4/10.0.0.5/tcp/1"),
        line(QM, []),
        line(QM, ["/ip4/10.0.0.5/udp/1/quic"]),
        line(QM, ["/ip4/10.0.0.5/tcp/0"]),
        line(QM, ["/ip4/10.0.0.5/tcp/70000"]),
        line(QM, ["/dns4/evil.example/tcp/1"]),
        line(QM, ["/ip4/10.0.0.5/tcp/1/p2p/" + ED]),
        line(QM, [5]),
        line(5, ["/ip4/10.0.0.5/tcp/1"]),
        line(QM, ["/ip4/10.0.0.5/tcp/1"]) + " " * 20_000,
    ],
)
def test_a_malformed_announcement_is_dropped(text):
    assert parse_found(text) is None


def test_an_announcement_keeps_a_bounded_number_of_addresses():
    found = parse_found(line(QM, [f"/ip4/10.0.0.{i}/tcp/1" for i in range(1, 100)]))
    assert found is not None and len(found[1]) == MAX_ADDRS


def test_only_addresses_another_machine_can_dial_are_announced():
    addrs = [
        f"/ip4/127.0.0.1/tcp/1/p2p/{QM}",
        f"/ip6/::1/tcp/1/p2p/{QM}",
        f"/ip4/0.0.0.0/tcp/1/p2p/{QM}",
        f"/ip4/10.0.0.5/tcp/1/p2p/{QM}",
        f"/ip4/10.0.0.9/tcp/1/p2p/{ED}/p2p-circuit/p2p/{QM}",
    ]
    assert lan_addrs(addrs) == [f"/ip4/10.0.0.5/tcp/1/p2p/{QM}"]


def test_without_a_py_libp2p_environment_mdns_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_LAN_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(MdnsUnavailable, match="run scripts/install.sh .*SWARM_LAN_PYTHON"):
        LanDiscovery()


def test_a_discovery_process_that_dies_at_start_is_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named libp2p' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SWARM_LAN_PYTHON", str(fake))
    with pytest.raises(MdnsUnavailable, match="did not start: ModuleNotFoundError: No module named libp2p"):
        LanDiscovery()
