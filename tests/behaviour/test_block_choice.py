"""Servers started without --blocks cover the model, and move to blocks that lose their servers."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
import torch

from blocks.checkpoint import Checkpoint
from blocks.synthetic import make_random_checkpoint
from client import AutoDistributedModelForCausalLM
from dht.records import ServerState
from dht.swarm_dht import SwarmDHT, start_dht
from harness.local_swarm import LocalSwarm
from tests.helpers.models import reference_model

pytestmark = pytest.mark.slow

FAST_RECORDS = ["--throughput", "100", "--record-ttl", "4", "--announce-period", "1"]


def blocks_of(child) -> tuple[int, int]:
    """The range a server reported last (its online line, or its latest 'moved' line)."""
    line = [line for line in child.stdout if " blocks " in line][-1]
    start, end = re.search(r"blocks (\d+):(\d+)", line).groups()
    return int(start), int(end)


def online_ranges(reader, name, num_blocks) -> dict[str, tuple[int, int]]:
    blocks = asyncio.run(reader.fetch_servers(name, num_blocks))
    return {
        info.peer_id: (info.record.start_block, info.record.end_block)
        for block in blocks
        for info in block.values()
        if info.record.state == ServerState.ONLINE
    }


def test_servers_choose_missing_blocks_and_rebalance(tmp_path):
    path = make_random_checkpoint(tmp_path / "llama6", "llama", num_layers=6, seed=8)
    name = Checkpoint(path).default_model_name
    ids = torch.randint(3, 100, (1, 6))
    expected = reference_model(path).generate(ids, max_new_tokens=12, do_sample=False)
    with LocalSwarm(path, [], server_args=FAST_RECORDS, workdir=tmp_path / "swarm") as swarm:
        first = [swarm.add_server(None, None, "--num-blocks", "2") for _ in range(3)]
        assert sorted(blocks_of(child) for child in first) == [(0, 2), (2, 4), (4, 6)]

        dht, validator = start_dht(swarm.initial_peers, client_mode=True)
        reader = SwarmDHT(dht, validator)
        try:
            with AutoDistributedModelForCausalLM.from_pretrained(
                path, swarm.initial_peers, request_timeout=60
            ) as model:
                assert torch.equal(model.generate(ids, max_new_tokens=12), expected)

                mover = swarm.add_server(None, None, "--num-blocks", "2", "--rebalance-period", "1")
                assert blocks_of(mover) == (0, 2)  # all equal: the leftmost window
                victim = next(child for child in first if blocks_of(child) == (4, 6))
                victim.kill()
                deadline = time.monotonic() + 60
                # It says so on stdout and in the DHT (in either order).
                while blocks_of(mover) != (4, 6) or online_ranges(reader, name, 6).get(mover.peer_id) != (4, 6):
                    assert time.monotonic() < deadline, "the idle server did not move to the orphaned blocks"
                    time.sleep(0.5)
                assert torch.equal(model.generate(ids, max_new_tokens=12), expected)
        finally:
            dht.shutdown()


def test_a_server_whose_move_fails_to_load_keeps_its_blocks_or_leaves_cleanly(tmp_path):
    """Moving frees the old blocks first; if the new ones cannot be loaded, the server loads its old
    blocks again, and if even that fails it announces offline and exits with status 1."""
    path = make_random_checkpoint(tmp_path / "llama6", "llama", num_layers=6, seed=10)
    name = Checkpoint(path).default_model_name
    with LocalSwarm(path, [], server_args=FAST_RECORDS, workdir=tmp_path / "swarm") as swarm:
        first = [swarm.add_server(None, None, "--num-blocks", "2") for _ in range(3)]
        movers = {
            how: swarm.add_server(
                None,
                None,
                "--num-blocks",
                "2",
                "--rebalance-period",
                "1",
                module="tests.helpers.faulty_server",
                env={"FAULTY_SERVER_LOAD_FAIL": how},
            )
            for how in ("4:6", "*")
        }
        keeper, leaver = movers["4:6"], movers["*"]
        home = blocks_of(keeper)
        dht, validator = start_dht(swarm.initial_peers, client_mode=True)
        reader = SwarmDHT(dht, validator)
        try:
            next(child for child in first if blocks_of(child) == (4, 6)).kill()
            assert leaver.proc.wait(120) == 1
            assert "leaving the swarm" in leaver.log_path.read_text()
            deadline = time.monotonic() + 120
            while "could not load blocks 4:6" not in keeper.log_path.read_text():
                assert time.monotonic() < deadline, "the keeper never tried to move"
                time.sleep(0.5)
            while True:  # back online on its old blocks
                info = asyncio.run(reader.fetch_servers(name, 6))[home[0]].get(keeper.peer_id)
                if info is not None and info.record.state == ServerState.ONLINE:
                    assert (info.record.start_block, info.record.end_block) == home
                    break
                assert time.monotonic() < deadline, f"the keeper's record under its blocks: {info}"
                time.sleep(0.5)
            assert keeper.proc.poll() is None
        finally:
            dht.shutdown()


def test_num_blocks_defaults_to_what_fits_in_memory(tmp_path):
    path = make_random_checkpoint(tmp_path / "llama3", "llama", num_layers=3, seed=9)
    with LocalSwarm(path, [], server_args=["--throughput", "100"], workdir=tmp_path / "swarm") as swarm:
        child = swarm.add_server(None, None)
        assert blocks_of(child) == (0, 3)  # a tiny model fits whole
