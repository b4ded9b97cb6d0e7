"""Server records in the DHT, their expiry, graceful shutdown, and clear client errors."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import torch

from blocks.checkpoint import Checkpoint
from blocks.synthetic import make_random_checkpoint
from client import AutoDistributedModelForCausalLM, MissingBlocksError, ModelMismatchError
from dht.records import ServerState
from dht.swarm_dht import SwarmDHT, start_dht
from harness.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reader(llama_swarm):
    dht, validator = start_dht(llama_swarm.initial_peers, client_mode=True)
    yield SwarmDHT(dht, validator)
    dht.shutdown()


def fetch(reader, model, num_blocks):
    return asyncio.run(reader.fetch_servers(model, num_blocks))


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_records_have_the_schema_of_r2(reader, llama_path):
    checkpoint = Checkpoint(llama_path)
    name = checkpoint.default_model_name
    blocks = fetch(reader, name, 4)
    assert [len(servers) for servers in blocks] == [1, 1, 1, 1]
    first, second = next(iter(blocks[0].values())), next(iter(blocks[2].values()))
    assert first.peer_id != second.peer_id
    assert blocks[1][first.peer_id].record == first.record  # one record under every block it serves
    record = first.record
    assert record.state == ServerState.ONLINE
    assert (record.start_block, record.end_block) == (0, 2)
    assert record.throughput.inference == record.throughput.forward == 100
    assert record.cache_tokens_total == 16384 and 0 < record.cache_tokens_free <= 16384
    assert record.hardware.device_type == "cpu" and record.hardware.memory_total > 0
    assert record.dtype == "float32" and record.max_length == 256 and record.version
    assert all(addr.startswith("/ip4/127.0.0.1/tcp/") for addr in record.addrs)
    assert 0 < first.expiration_time - time.time() <= 95
    metas = asyncio.run(reader.fetch_meta(name))
    assert {first.peer_id, second.peer_id} <= set(metas)  # each server announces it, under its own signature
    meta = metas[first.peer_id]
    assert all(other == meta for other in metas.values())
    assert meta.num_blocks == 4 and meta.family == "llama" and meta.config_digest == checkpoint.config_digest


def test_records_expire_when_a_server_is_killed(reader, llama_swarm, llama_path):
    name = Checkpoint(llama_path).default_model_name
    child = llama_swarm.add_server(2, 4, "--record-ttl", "5", "--announce-period", "1")
    try:
        wait_until(lambda: len(fetch(reader, name, 4)[3]) == 2, 180, "the extra server's records")
        child.kill()  # SIGKILL to the whole process group: no goodbye
        wait_until(lambda: len(fetch(reader, name, 4)[3]) == 1, 180, "the dead server's records to expire")
    finally:
        child.stop()
        llama_swarm.servers.remove(child)


def test_sigterm_announces_offline_and_exits_zero(reader, llama_swarm, llama_path):
    name = Checkpoint(llama_path).default_model_name
    child = llama_swarm.add_server(0, 2)
    try:
        wait_until(lambda: len(fetch(reader, name, 4)[0]) == 2, 180, "the extra server's records")
        # Other servers were online when it started: it measured its bandwidth to them.
        record = wait_until(lambda: fetch(reader, name, 4)[0].get(child.peer_id) or None, 180, "its record").record
        wait_until(lambda: fetch(reader, name, 4)[0][child.peer_id].record.network_mbps, 180, "a bandwidth estimate")
        assert record.start_block == 0
        child.signal(signal.SIGTERM)
        assert child.proc.wait(30) == 0
        states = {info.record.state for info in fetch(reader, name, 4)[0].values()}
        assert states == {ServerState.ONLINE, ServerState.OFFLINE}
    finally:
        child.stop()
        llama_swarm.servers.remove(child)


def test_a_server_that_started_alone_measures_its_bandwidth_once_another_comes(tmp_path):
    path = make_random_checkpoint(tmp_path / "llama", "llama", num_layers=2, seed=5)
    name = Checkpoint(path).default_model_name
    with LocalSwarm(
        path, [(0, 2)], server_args=["--throughput", "10", "--announce-period", "1"], workdir=tmp_path / "swarm"
    ) as swarm:
        dht, validator = start_dht(swarm.initial_peers, client_mode=True)
        try:
            reader = SwarmDHT(dht, validator)
            first = swarm.servers[0].peer_id
            record = wait_until(lambda: fetch(reader, name, 2)[0].get(first), 180, "the first server's record")
            assert record.record.network_mbps is None  # nobody to measure it to yet
            swarm.add_server(0, 2)
            estimate = wait_until(
                lambda: fetch(reader, name, 2)[0][first].record.network_mbps, 180, "the first server's bandwidth"
            )
            assert estimate > 0
        finally:
            dht.shutdown()


def test_missing_blocks_is_a_clear_error_not_a_hang(tmp_path):
    path = make_random_checkpoint(tmp_path / "mistral", "mistral", num_layers=4, seed=3)
    with LocalSwarm(path, [(0, 2)], server_args=["--throughput", "10"], workdir=tmp_path / "swarm") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, request_timeout=20) as model:
            with pytest.raises(MissingBlocksError, match=r"block\(s\) 2-3") as info:
                model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3)
            assert info.value.blocks == [2, 3]


def test_server_of_another_model_is_a_clear_error(llama_swarm, qwen2_path):
    llama_name = Checkpoint(llama_swarm.model).default_model_name
    with AutoDistributedModelForCausalLM.from_pretrained(
        qwen2_path, llama_swarm.initial_peers, model_name=llama_name, request_timeout=20
    ) as model:
        with pytest.raises(ModelMismatchError, match="different model"):
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3)
