"""The router over a fixed read of the swarm: a block whose only servers are banned waits for the first
ban to end, within the caller's bound, and never for a server banned for good."""

from __future__ import annotations

import pytest

from client.bans import BanList
from client.errors import MissingBlocksError
from client.router import Router
from client.routing import RouteIndex
from tests.helpers.records import servers


class FixedView:
    """One read of the swarm, always the same (the DHT is not what these tests are about)."""

    model_name = "m"

    def __init__(self, blocks):
        self.blocks = blocks
        self.num_blocks = len(blocks)

    async def index(self, max_age: float = 0.0) -> RouteIndex:
        return RouteIndex(self.blocks)

    async def servers(self):
        return self.blocks


class NoPings:
    async def refresh(self, servers) -> None:
        pass

    def route_rtts(self) -> dict[str, float]:
        return {}


def router(bans: BanList) -> Router:
    return Router(FixedView(servers(("a", 0, 8), ("b", 4, 8))), bans, NoPings())


@pytest.mark.asyncio
async def test_the_only_server_of_some_blocks_is_waited_for_while_its_short_ban_lasts():
    bans = BanList(base=0.2)
    bans.ban("a", "timed out")
    with pytest.raises(MissingBlocksError) as error:
        await router(bans).chain()  # no waiting asked for: fails at once, naming the blocks
    assert error.value.blocks == [0, 1, 2, 3]
    chain = await router(bans).chain(wait_for_bans=10)
    assert chain[0].peer_id == "a" and chain[0].start == 0
    assert "a" not in bans.banned()


@pytest.mark.asyncio
async def test_no_wait_for_a_ban_longer_than_allowed_or_for_good_or_for_an_excluded_server():
    long_ban = BanList(base=60)
    long_ban.ban("a", "timed out")
    with pytest.raises(MissingBlocksError):
        await router(long_ban).chain(wait_for_bans=1)
    assert long_ban.ends_in("a") > 50  # raised without sitting out the ban
    for_good = BanList(base=0.2)
    for_good.ban_forever("a", "wrong results")
    with pytest.raises(MissingBlocksError):
        await router(for_good).chain(wait_for_bans=10)
    excluded = BanList(base=0.2)
    excluded.ban("a", "timed out")
    with pytest.raises(MissingBlocksError):
        await router(excluded).chain(exclude={"a"}, wait_for_bans=10)
