"""Option schemas: a region is one of the platform's regions, or none."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from configs.schema import REGIONS, GenerateOptions, ServerOptions

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


@pytest.mark.parametrize(
    "schema, required",
    [(ServerOptions, {"model": "m"}), (GenerateOptions, {"model": "m", "initial_peers": [PEER], "prompt": "x"})],
)
def test_a_region_must_be_one_of_the_platforms_regions(schema, required):
    assert schema(**required, region="europe-west").region == "europe-west"
    assert schema(**required).region == ""
    with pytest.raises(ValidationError, match="unknown region 'mars'.*europe-west"):
        schema(**required, region="mars")
    assert len(REGIONS) == 7 and "oceania" in REGIONS


@pytest.mark.parametrize(
    "bad",
    [
        "/ip4/127.0.0.1/tcp/31337",  # no peer id
        "127.0.0.1:31337",
        "/ip4/127.0.0.1/tcp/99999/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
        "/ip4/127.0.0.1/tcp/31337/p2p/not-a-peer-id",
    ],
)
def test_initial_peers_must_be_full_multiaddrs_and_a_bad_one_is_named(bad):
    dns = "/dns/boot.example.org/tcp/31337/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    assert ServerOptions(model="m", initial_peers=[f"{PEER},{dns}"]).initial_peers == [PEER, dns]
    with pytest.raises(ValidationError, match="is not a peer's multiaddr"):
        GenerateOptions(model="m", initial_peers=[PEER, bad], prompt="x")


def test_a_client_needs_initial_peers_or_mdns_and_either_is_enough():
    with pytest.raises(ValidationError, match="give --initial-peers .* or --mdns"):
        GenerateOptions(model="m", prompt="x")
    assert GenerateOptions(model="m", prompt="x", mdns=True).initial_peers == []
    assert not GenerateOptions(model="m", prompt="x", initial_peers=[PEER]).mdns
    assert not ServerOptions(model="m").mdns  # multicast only when asked
