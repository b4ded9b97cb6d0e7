"""Pure pieces: the chain a client picks, the cache budget, the wire checks, the configuration loader."""

from __future__ import annotations

import random

import pytest
import torch

from blocks.kv_pool import KVPool, PoolFull
from client.errors import MissingBlocksError
from client.routing import RouteIndex, chain_avoiding, estimated_step_time, make_chain, seconds_per_block, usable
from configs.loader import ConfigError, build_parser, load_config
from configs.schema import ServerOptions
from dht.records import ServerInfo, ServerRecord
from protocol.errors import ErrorKind, WireError
from protocol.messages import Step, pack, read_header
from protocol.tensors import read_tensors
from swarm.cache import CacheBudget
from tests.test_records import record_wire


def servers(*specs, num_blocks=8):
    """specs: (peer, start, end[, state[, free[, throughput]]]) -> per-block {peer: ServerInfo}."""
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
            )
        )
        for block in range(start, end):
            blocks[block][peer] = ServerInfo(peer_id=peer, record=record, expiration_time=0)
    return blocks


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


def test_cache_budget_refuses_when_full_and_releases_once():
    budget = CacheBudget(100)
    with pytest.raises(WireError) as info:
        budget.reserve(1, 10)  # no span served yet: no pool
    assert info.value.kind == ErrorKind.BUSY
    budget.bind(KVPool(1, 1, 2, 100, torch.float32, "cpu"))
    first = budget.reserve(2, 30)
    with pytest.raises(WireError) as info:
        budget.reserve(1, 50)
    assert info.value.kind == ErrorKind.BUSY
    with pytest.raises(WireError) as info:
        budget.reserve(1, 101)
    assert info.value.kind == ErrorKind.BAD_REQUEST
    first.release()
    first.release()
    assert budget.free == 100


def test_the_kv_pool_hands_out_slices_writes_in_place_and_merges_what_comes_back():
    pool = KVPool(num_layers=2, kv_heads=2, head_dim=4, tokens=100, dtype=torch.float32, device="cpu")
    a, b, c = pool.allocate(2, 20), pool.allocate(1, 30), pool.allocate(1, 30)
    with pytest.raises(PoolFull):
        pool.allocate(1, 11)
    keys, values = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    seen_keys, seen_values = a.update(1, keys, values)
    assert a.length(1) == 3 and a.length(0) == 0
    assert torch.equal(seen_keys, keys) and torch.equal(seen_values, values)
    assert seen_keys.untyped_storage().data_ptr() == pool.storage.untyped_storage().data_ptr()  # a view, not a copy
    more = torch.randn(2, 2, 1, 4)
    seen_keys, _ = a.update(1, more, more)
    assert torch.equal(seen_keys, torch.cat([keys, more], dim=2))
    b.update(0, torch.ones(1, 2, 30, 4), torch.ones(1, 2, 30, 4))
    assert torch.equal(a.update(0, keys, values)[0], keys)  # a neighbour's writes do not leak in
    with pytest.raises(ValueError, match="cache slots"):
        c.update(0, torch.zeros(1, 2, 31, 4), torch.zeros(1, 2, 31, 4))
    a.restore([0, 0])
    assert a.length(1) == 0
    b.release()
    with pytest.raises(PoolFull):
        pool.allocate(1, 40)  # only b's 30 are free
    a.release()
    assert pool.largest_free_run() == 70  # a's 40 and b's 30 merged
    c.release()
    c.release()
    assert pool.largest_free_run() == 100
    with pytest.raises(RuntimeError, match="given back"):
        c.update(0, keys, values)


def test_wire_checks_sizes_before_allocating():
    message = pack(Step(position=1), [torch.zeros(1, 2, 4)], request=True)
    assert read_header(message, Step).position == 1
    message.tensors[0].size[:] = [1000, 1000, 1000]
    with pytest.raises(WireError, match="expected 4000000000$"):
        read_tensors(message, max_count=1)
    with pytest.raises(WireError, match="at most 1 tensors"):
        read_tensors(pack(None, [torch.zeros(1), torch.zeros(1)], request=True), max_count=1)
    with pytest.raises(WireError, match="position"):
        read_header(pack(Step(position=0), request=True).__class__(metadata=b"\x81\xa8position\xa1x"), Step)


def parse(argv, environ=None):
    return load_config(ServerOptions, build_parser(ServerOptions, "serve", "test"), argv, environ or {})


def test_config_precedence_cli_over_env_over_yaml_over_default(tmp_path):
    yaml_file = tmp_path / "server.yaml"
    yaml_file.write_text(
        "cache_tokens: 111\nregion: asia-east\ndtype: bfloat16\ninitial_peers: [/ip4/127.0.0.1/tcp/1/p2p/QmA]\n"
    )
    base = ["--model", "m", "--blocks", "0:2", "--config", str(yaml_file)]
    options = parse(base)
    assert (options.cache_tokens, options.region, options.dtype) == (111, "asia-east", "bfloat16")
    assert options.session_timeout == 300 and options.nat_port_map is False
    options = parse(base, {"SWARM_CACHE_TOKENS": "222", "SWARM_REGION": "oceania", "SWARM_INITIAL_PEERS": "a,b"})
    assert (options.cache_tokens, options.region, options.initial_peers) == (222, "oceania", ["a", "b"])
    options = parse(base + ["--cache-tokens", "333", "--nat-port-map"], {"SWARM_CACHE_TOKENS": "222"})
    assert options.cache_tokens == 333 and options.nat_port_map is True
    assert options.block_range == (0, 2)


@pytest.mark.parametrize(
    "argv, environ, message",
    [
        (["--model", "m", "--blocks", "0:2", "--cache-tokens", "-5"], {}, "cache_tokens"),
        (["--model", "m", "--blocks", "2"], {}, "blocks"),
        (["--model", "m", "--blocks", "0:2"], {"SWARM_DTYPE": "int8"}, "dtype"),
        (["--model", "m", "--blocks", "0:2", "--announce-period", "100"], {}, "announce_period"),
        (["--blocks", "0:2"], {}, "model"),
    ],
)
def test_config_errors_name_the_key(argv, environ, message):
    with pytest.raises(ConfigError, match=message):
        parse(argv, environ)


def test_yaml_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache_tokenz: 5\n")
    with pytest.raises(ConfigError, match="unknown key.*cache_tokenz"):
        parse(["--model", "m", "--blocks", "0:1", "--config", str(bad)])
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        parse(["--model", "m", "--blocks", "0:1", "--config", str(bad)])
    with pytest.raises(ConfigError, match="cannot read"):
        parse(["--model", "m", "--blocks", "0:1", "--config", str(tmp_path / "missing.yaml")])


def test_a_moved_server_is_used_only_where_its_current_record_is_online():
    blocks = servers(("a", 0, 2), ("b", 2, 4), ("m", 0, 2, "offline"), num_blocks=6)
    moved = servers(("m", 4, 6, "online", 100, 1000.0), num_blocks=6)
    blocks[4], blocks[5] = moved[4], moved[5]
    assert chain_of(blocks) == [("a", 0, 2), ("b", 2, 4), ("m", 4, 6)]


def test_example_yaml_documents_every_option_and_loads():
    from pathlib import Path

    from configs.loader import example_yaml
    from configs.schema import EXAMPLE_SERVER_VALUES

    path = Path(__file__).resolve().parent.parent / "configs" / "example.yaml"
    assert path.read_text() == example_yaml(ServerOptions, "python -m swarm.serve", EXAMPLE_SERVER_VALUES), (
        "configs/example.yaml is out of date: regenerate it with configs.loader.example_yaml"
    )
    options = parse(["--config", str(path)])
    assert options.model == "/path/to/checkpoint" and options.cache_tokens == 16384
    for name in ServerOptions.model_fields:
        assert f"\n{name}:" in path.read_text()


def test_bfloat16_travels_as_two_bytes_per_value_and_the_four_byte_form_is_still_read():
    from hivemind.compression import serialize_torch_tensor

    values = torch.randn(2, 3, 8).to(torch.bfloat16)
    message = pack(Step(position=0), [values], request=True)
    assert len(message.tensors[0].buffer) == values.numel() * 2
    (read,) = read_tensors(message, max_count=1)
    assert read.dtype == torch.bfloat16 and torch.equal(read, values)
    message.tensors[0].CopyFrom(serialize_torch_tensor(values))  # what hivemind's serializer sends: fp32 bytes
    assert len(message.tensors[0].buffer) == values.numel() * 4
    (read,) = read_tensors(message, max_count=1)
    assert read.dtype == torch.bfloat16 and torch.equal(read, values)
    message = pack(Step(position=0), [values], request=True)
    message.tensors[0].buffer = message.tensors[0].buffer[:-2]
    with pytest.raises(WireError, match="expected 96$"):
        read_tensors(message, max_count=1)


def test_renamed_options_still_work_under_their_earlier_names(tmp_path):
    """The NAT side's options were --relay-*/--no-relay; flags, variables and YAML keys of that name still work."""
    assert parse(["--model", "m", "--relay-hop-limit", "7", "--no-relay"]).bridge_max_circuits == 7
    assert parse(["--model", "m", "--no-relay"]).no_bridge is True
    assert parse(["--model", "m"], {"SWARM_RELAY_MAX_SERVERS": "3"}).bridge_max_servers == 3
    assert (
        parse(["--model", "m"], {"SWARM_RELAY_MAX_SERVERS": "3", "SWARM_BRIDGE_MAX_SERVERS": "5"}).bridge_max_servers
        == 5
    )
    old = tmp_path / "old.yaml"
    old.write_text("model: m\nrelay_max_seconds: 12\n")
    assert parse(["--config", str(old)]).bridge_max_seconds == 12
    both = tmp_path / "both.yaml"
    both.write_text("model: m\nrelay_max_seconds: 12\nbridge_max_seconds: 13\n")
    with pytest.raises(ConfigError, match="both relay_max_seconds and bridge_max_seconds"):
        parse(["--config", str(both)])
