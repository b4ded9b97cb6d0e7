"""The chain a client picks: fewest round trips, fast servers, avoided ones last, the fastest of all chains."""

from __future__ import annotations

import random

import pytest

from client.errors import BadRequestError, MissingBlocksError
from client.routing import RouteIndex, chain_avoiding, estimated_step_time, make_chain, seconds_per_block, usable
from tests.helpers.records import servers


def chain_of(blocks, **kwargs):
    return [(plan.peer_id, plan.start, plan.end) for plan in make_chain("m", blocks, **kwargs)]


def test_chain_minimises_hops_when_round_trips_dominate():
    blocks = servers(("a", 0, 3), ("b", 0, 5), ("c", 3, 8), ("d", 5, 8))
    slow_network = {peer: 1.0 for peer in "abcd"}
    chain = chain_of(blocks, rtts=slow_network)
    assert len(chain) == 2 and chain[0][:2] == ("b", 0) and chain[-1][2] == 8
    assert chain_of(blocks, start=2, end=4, rtts=slow_network) == [("b", 2, 4)]


def test_chain_prefers_fast_servers_and_splits_overlapping_ranges():
    fast_and_slow = servers(("slow", 0, 8, "online", 100, 1.0), ("fast", 0, 8, "online", 100, 5.0))
    assert chain_of(fast_and_slow) == [("fast", 0, 8)]
    # A 100x faster server for blocks 4-7 is worth one more hop; a far one (1 s RTT) is not.
    blocks = servers(("a", 0, 8, "online", 100, 1.0), ("b", 4, 8, "online", 100, 100.0))
    assert chain_of(blocks) == [("a", 0, 4), ("b", 4, 8)]
    assert chain_of(blocks, rtts={"a": 0.01, "b": 1.0}) == [("a", 0, 8)]
    assert estimated_step_time(make_chain("m", blocks)) == pytest.approx(0.05 + 4 / 8 + 0.05 + 4 / 400)


def test_avoided_servers_are_used_only_for_blocks_nobody_else_covers():
    # "low" and "high" serve 0:4; "only" alone serves 4:8. Avoiding both "low" and "only" (say, both
    # score low) must still avoid "low", and use "only" just because nobody else has its blocks.
    index = RouteIndex(servers(("low", 0, 4, "online", 100, 50.0), ("high", 0, 4), ("only", 4, 8)))
    chain = [(plan.peer_id, plan.start, plan.end) for plan in chain_avoiding("m", index, 0, 8, (), {"low", "only"})]
    assert chain == [("high", 0, 4), ("only", 4, 8)]
    assert chain_avoiding("m", index, 0, 8, (), ())[0].peer_id == "low"  # the fastest, when nothing is avoided
    with pytest.raises(MissingBlocksError):
        chain_avoiding("m", index, 0, 8, {"only"}, {"low"})  # an excluded server stays excluded


def test_jitter_spreads_clients_over_equal_servers():
    blocks = servers(("a", 0, 8), ("b", 0, 8))
    picks = {chain_of(blocks, rng=random.Random(seed))[0][0] for seed in range(40)}
    assert picks == {"a", "b"}
    assert chain_of(blocks) == chain_of(blocks)  # without rng the choice is deterministic


def test_chain_skips_unusable_servers_and_names_missing_blocks():
    blocks = servers(
        ("a", 0, 4), ("b", 4, 8, "draining"), ("c", 4, 6, "online", 0), ("d", 6, 8), ("e", 4, 8, "offline")
    )
    with pytest.raises(MissingBlocksError) as info:
        make_chain("m", blocks)
    assert info.value.blocks == [4, 5] and "block(s) 4-5" in str(info.value)
    with pytest.raises(MissingBlocksError, match=r"0-3"):
        make_chain("m", servers(("a", 0, 4), ("d", 4, 8)), exclude={"a"})
    assert chain_of(servers(("a", 0, 8), ("b", 0, 8)), exclude={"a"}) == [("b", 0, 8)]


def fastest_by_brute_force(blocks, start, end, exclude, rtts):
    """The least estimated step time over every chain, by trying every (entry, exit, server) triple:
    a server may run [i, j) if its record is usable, claims those blocks and sits under each of them."""
    best = {start: 0.0}
    for j in range(start + 1, end + 1):
        options = []
        for i in range(start, j):
            for peer, info in blocks[i].items():
                rec = info.record
                if (
                    i in best
                    and usable(info, exclude)
                    and rec.start_block <= i
                    and j <= rec.end_block
                    and all(
                        (other := blocks[b].get(peer)) is not None
                        and (other.record.start_block, other.record.end_block) == (rec.start_block, rec.end_block)
                        for b in range(i, j)
                    )
                ):
                    options.append(best[i] + rtts.get(peer, 0.05) + (j - i) * seconds_per_block(info))
        if options:
            best[j] = min(options)
    return best.get(end)


def test_chain_is_the_fastest_of_all_chains_on_random_swarms():
    """The indexed search against exhaustive search, on swarms with unusable servers, records planted
    under blocks they do not claim, and holes where a server's record is missing under one block."""
    checked = 0
    for seed in range(80):
        rng = random.Random(seed)
        specs = []
        for index in range(rng.randint(5, 12)):
            start = rng.randrange(0, 11)
            specs.append(
                (
                    f"p{index}",
                    start,
                    rng.randint(start + 1, 12),
                    rng.choice(["online"] * 4 + ["draining"]),
                    rng.choice([0, 100, 100, 100]),
                    rng.uniform(1, 50),
                )
            )
        blocks = servers(*specs, num_blocks=12)
        for _ in range(rng.randint(0, 3)):
            block = rng.randrange(12)
            if blocks[block]:
                del blocks[block][rng.choice(sorted(blocks[block]))]  # a hole in one server's run
        planted = servers(("x", 0, 2, "online", 100, 1000.0), num_blocks=12)[0]["x"]
        blocks[rng.randrange(2, 12)]["x"] = planted  # a very fast record under a block it does not serve
        rtts = {peer: rng.uniform(0.001, 0.2) for peer, *_ in specs if rng.random() < 0.7}
        exclude = {rng.choice(specs)[0]} if rng.random() < 0.3 else set()
        start = rng.randrange(0, 6)
        end = rng.randint(start + 1, 12)
        expected = fastest_by_brute_force(blocks, start, end, exclude, rtts)
        index = RouteIndex(blocks)
        if expected is None:
            with pytest.raises(MissingBlocksError):
                make_chain("m", index, start, end, exclude=exclude, rtts=rtts)
            continue
        chain = make_chain("m", index, start, end, exclude=exclude, rtts=rtts)
        assert chain[0].start == start and chain[-1].end == end
        assert all(a.end == b.start for a, b in zip(chain, chain[1:]))
        assert all(
            plan.peer_id not in exclude
            and plan.info.record.start_block <= plan.start
            and plan.end <= plan.info.record.end_block
            for plan in chain
        )
        assert estimated_step_time(chain, rtts) == pytest.approx(expected)
        checked += 1
    assert checked >= 40  # most random swarms are coverable, so the comparison really ran


def test_a_moved_server_is_used_only_where_its_current_record_is_online():
    blocks = servers(("a", 0, 2), ("b", 2, 4), ("m", 0, 2, "offline"), num_blocks=6)
    moved = servers(("m", 4, 6, "online", 100, 1000.0), num_blocks=6)
    blocks[4], blocks[5] = moved[4], moved[5]
    assert chain_of(blocks) == [("a", 0, 2), ("b", 2, 4), ("m", 4, 6)]


def test_a_session_is_routed_only_to_servers_that_accept_its_length_and_batch():
    blocks = servers(
        ("shallow", 0, 8, "online", 64, 1000.0),
        ("short", 0, 8, "online", 4096, 500.0),
        ("big", 0, 4, "online", 4096, 1.0),
        ("big2", 4, 8, "online", 4096, 1.0),
        limits={
            "shallow": {"max_length": 4096, "cache_tokens_total": 64},  # a long max_length, a small cache
            "short": {"max_length": 80, "cache_tokens_total": 4096},
            "big": {"max_length": 512, "cache_tokens_total": 1024},
            "big2": {"max_length": 512, "cache_tokens_total": 4096},
        },
    )
    assert chain_of(blocks) == [("shallow", 0, 8)]  # no length asked: the fastest
    assert chain_of(blocks, max_length=70) == [("short", 0, 8)]  # shallow holds 64 tokens in all
    assert chain_of(blocks, max_length=100) == [("big", 0, 4), ("big2", 4, 8)]
    with pytest.raises(
        BadRequestError, match=r"block\(s\) 0-3 .* 300 tokens at batch 4: the longest they accept is 256"
    ):
        chain_of(blocks, max_length=300, batch=4)  # big holds 1024 tokens: 4 × 256
    with pytest.raises(BadRequestError, match="the longest they accept is 512"):
        chain_of(blocks, max_length=600)
    with pytest.raises(MissingBlocksError):  # nobody serves the blocks at all: not a question of size
        chain_of(servers(("a", 0, 4)), max_length=10)


def test_a_client_prefers_servers_of_its_region_and_still_uses_others_for_blocks_only_they_serve():
    america = {"region": "america-north"}
    regions = {"eu": {"region": "europe-west"}, "us": america, "us-only": america}
    blocks = servers(("eu", 0, 8), ("us", 0, 8), limits=regions)
    assert chain_of(blocks, region="europe-west") == [("eu", 0, 8)]
    assert chain_of(blocks, region="america-north") == [("us", 0, 8)]
    assert chain_of(blocks, region="america-north", rtts={"us": 0.5, "eu": 0.01}) == [("eu", 0, 8)]  # far is far
    partial = servers(("eu", 0, 4), ("us-only", 4, 8), limits=regions)
    assert chain_of(partial, region="europe-west") == [("eu", 0, 4), ("us-only", 4, 8)]


def test_the_chain_that_holds_a_prompt_wins_only_when_the_prefill_it_saves_beats_its_slower_steps():
    from client.routing import prefer_cached

    index = RouteIndex(servers(("slow", 0, 8, "online", 100, 5.0), ("fast", 0, 8, "online", 100, 10.0)))
    best = make_chain("m", index)
    assert [plan.peer_id for plan in best] == ["fast"]
    cached = [index.plan("slow", 0, 8, ())]
    # A step costs the slow server 0.1 s more; 2 000 cached tokens at 5 tokens/s save 400 s.
    assert prefer_cached(best, cached, 2000, 100, {"slow": 0.05, "fast": 0.05}) == cached
    assert prefer_cached(best, cached, 16, 100, {"slow": 0.05, "fast": 0.05}) == best
    assert index.plan("slow", 0, 8, {"slow"}) is None and index.plan("slow", 0, 9, ()) is None
