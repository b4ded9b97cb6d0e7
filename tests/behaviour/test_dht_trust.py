"""Readers trust only what is signed and sane: forged, unsigned and minority records change nothing."""

from __future__ import annotations

import asyncio
from functools import partial

import hivemind
import pytest
from hivemind.dht.routing import DHTID
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from blocks.checkpoint import Checkpoint
from client import AutoDistributedModelForCausalLM
from dht.records import ModelRecord, block_key
from dht.swarm_dht import SwarmDHT, start_dht
from harness.local_swarm import LocalSwarm
from tests.helpers.client_worker import prompt

pytestmark = pytest.mark.slow


async def _plant(dht, node, keys, subkey, value, expiration_time) -> None:
    """Runs in the stranger's DHT process: puts a record straight into its own storage, as a node
    that ignores validation would, so that it serves the record to anyone who asks."""
    for key in keys:
        node.protocol.storage.store_subkey(DHTID.generate(source=key), subkey, value, expiration_time)


def _raw_node(initial_peers) -> hivemind.DHT:
    """A DHT node without any record validator: it stores and believes anything."""
    return hivemind.DHT(
        initial_peers=initial_peers,
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        nat_port_map=False,
        use_auto_relay=False,
        auto_nat=False,
    )


def test_forged_unsigned_and_minority_records_are_ignored(llama_path, llama_ref, tmp_path):
    name = Checkpoint(llama_path).default_model_name
    keys = [block_key(name, i) for i in range(4)]
    with LocalSwarm(llama_path, [(0, 4)], server_args=["--throughput", "100"], workdir=tmp_path / "swarm") as swarm:
        peers = swarm.initial_peers
        dht, validator = start_dht(peers, client_mode=True)
        reader = SwarmDHT(dht, validator)
        stranger = _raw_node(peers)
        liar, liar_validator = start_dht(peers)
        try:
            [genuine] = asyncio.run(reader.fetch_servers(name, 4))[0].values()
            victim_subkey, entry = next(iter(dht.get(keys[0], latest=True).value.items()))
            # 1. A record under the victim's key that the victim did not sign (a "faster" copy of its record).
            forged = dict(entry.value, throughput={"inference": 1e6, "forward": 1e6})
            stranger.run_coroutine(
                partial(
                    _plant,
                    keys=keys,
                    subkey=victim_subkey,
                    expiration_time=get_dht_time() + 300,
                    value=MSGPackSerializer.dumps(forged),
                )
            )
            # 2. An unsigned record under a subkey that names no key at all (honest nodes store those).
            assert stranger.store(keys[1], dict(entry.value, start_block=1), get_dht_time() + 300, subkey=b"evil")
            # 3. A validly signed model record of the liar's own, that disagrees with every server's.
            liar_swarm = SwarmDHT(liar, liar_validator)
            fake_meta = ModelRecord(num_blocks=4, family="llama", config_digest="f" * 64, hidden_size=64)
            asyncio.run(liar_swarm.announce_meta(name, fake_meta, ttl=300))

            # The forgeries are really out there: a node that validates nothing believes them.
            believed = stranger.get(keys[0], latest=True).value
            assert believed[victim_subkey].value["throughput"]["inference"] == 1e6
            assert b"evil" in stranger.get(keys[1], latest=True).value

            blocks = asyncio.run(reader.fetch_servers(name, 4))
            for servers in blocks:
                assert set(servers) == {genuine.peer_id}
                assert servers[genuine.peer_id].record == genuine.record
                assert servers[genuine.peer_id] is blocks[0][genuine.peer_id]  # parsed once, not once per block
            metas = asyncio.run(reader.fetch_meta(name))
            assert metas[liar_swarm.peer_id] == fake_meta and metas[genuine.peer_id] != fake_meta

            with AutoDistributedModelForCausalLM.from_pretrained(llama_path, peers, request_timeout=60) as model:
                ids = prompt(3)
                assert (
                    model.generate(ids, max_new_tokens=4).tolist()
                    == llama_ref.generate(ids, max_new_tokens=4, do_sample=False).tolist()
                )
        finally:
            for node in (dht, stranger, liar):
                node.shutdown()


class _StalledDHT:
    """A hivemind DHT whose process never answers (the code around it is what is tested)."""

    class peer_id:  # noqa: N801 - mimics hivemind's attribute
        @staticmethod
        def to_base58() -> str:
            return "QmStalled"

    def get_visible_maddrs(self):
        return []

    def is_alive(self) -> bool:
        return True

    def run_coroutine(self, fn, return_future=False):
        return asyncio.get_running_loop().create_future()  # never done


async def test_a_dht_that_does_not_answer_is_a_bounded_wait_and_a_typed_error():
    from dht.swarm_dht import DHTUnavailableError

    reader = SwarmDHT(_StalledDHT(), validator=None, timeout=0.2)
    with pytest.raises(DHTUnavailableError, match="did not finish within 0.2 s"):
        await reader.fetch_servers("m", 4)
    with pytest.raises(DHTUnavailableError):
        await reader.fetch_meta("m")


def test_a_node_restarted_with_its_identity_never_probes_the_gateway(tmp_path, monkeypatch):
    """Every libp2p daemon a node starts has NAT port mapping and AutoNAT off, a restart with an
    existing identity included (hivemind's own identity check would start one with both on)."""
    launched = tmp_path / "daemons.txt"
    make_args = P2P._make_process_args

    def recording(*args, **kwargs):  # runs in the DHT's forked process too: it appends to a file
        result = make_args(*args, **kwargs)
        with open(launched, "a") as f:
            f.write(" ".join(result) + "\n")
        return result

    monkeypatch.setattr(P2P, "_make_process_args", staticmethod(recording))
    first, _ = start_dht(identity_path=str(tmp_path / "first.key"))
    try:
        peers = [str(addr) for addr in first.get_visible_maddrs()]
        for _ in range(2):  # a new identity, then the same one again
            node, _ = start_dht(peers, identity_path=str(tmp_path / "node.key"))
            node.shutdown()
    finally:
        first.shutdown()
    daemons = launched.read_text().splitlines()
    assert len(daemons) == 3
    assert all("-natPortMap=0" in daemon and "-autonat=0" in daemon for daemon in daemons), daemons


def test_relayed_addresses_reach_the_daemon_as_multihashes():
    """/p2p/ components go to the libp2p daemon as the peer id's multihash, as go-multiaddr writes
    them (hivemind's library writes a CID, which the daemon cannot parse), so a relayed address
    (/…/p2p/<relay>/p2p-circuit) can be dialed."""
    import base58

    from dht.dialing import daemon_maddr

    relay = "QmPtAD8sbwDf2opM9VEjfQEFQtbuR459d4yCCpcd4U3Utm"
    multihash = base58.b58decode(relay)
    raw = daemon_maddr(f"/ip4/10.10.0.1/tcp/31337/p2p/{relay}/p2p-circuit").to_bytes()
    assert raw == bytes.fromhex("040a0a0001067a69") + bytes.fromhex("a503") + bytes(
        [len(multihash)]
    ) + multihash + bytes.fromhex("a202")
    assert daemon_maddr("/ip4/10.10.0.1/tcp/31337").to_bytes() == bytes.fromhex("040a0a0001067a69")
