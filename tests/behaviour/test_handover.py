"""A draining server hands its open sessions, KV caches and all, to another server of the same blocks:
a long session goes on through the drain with transformers' tokens and nothing replayed."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers.generation.streamers import BaseStreamer

from blocks.synthetic import make_random_checkpoint
from client import AutoDistributedModelForCausalLM
from client.streams import connect
from harness.local_swarm import LocalSwarm
from protocol.errors import WireError
from protocol.messages import (
    RPC_IMPORT,
    RPC_INFERENCE,
    ImportProbe,
    ImportSession,
    OpenSession,
    pack,
    read_header,
)
from tests.helpers.client_worker import prompt
from tests.helpers.models import reference_model, wait_for_route

NEW_TOKENS = 1000
DRAIN_AT = 400


class DrainAt(BaseStreamer):
    """Sends a server SIGTERM (it drains) once `at` new tokens have been generated, and notes the
    session's chain just before (the servers it ran on until then)."""

    def __init__(self, server, at: int, session):
        self.server, self.at, self.session, self.puts = server, at, session, 0
        self.chain_before: list[str] = []

    def put(self, value):
        self.puts += 1
        if self.puts == self.at + 1:  # the first put is the prompt
            self.chain_before = [peer for peer, _, _ in self.session.chain]
            self.server.signal(signal.SIGTERM)

    def end(self):
        pass


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    return make_random_checkpoint(
        tmp_path_factory.mktemp("long") / "llama", "llama", num_layers=4, seed=12, max_position_embeddings=2048
    )


@pytest.mark.parametrize(
    "splits, new_tokens", [([(0, 4)], NEW_TOKENS), ([(0, 2), (2, 4)], 600)], ids=["one span", "two spans"]
)
def test_a_long_session_survives_its_server_s_drain_without_replay(long_model, splits, new_tokens, tmp_path):
    ids = prompt(5)
    expected = reference_model(long_model).generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
    )
    with LocalSwarm(long_model, [], workdir=tmp_path / "swarm") as swarm:
        # The chain first: fast servers; then a far slower one of all blocks, where the sessions go
        # (slow enough that no ping delay on a loaded machine makes routing prefer it).
        leaving = [swarm.add_server(start, end, "--throughput", "100000", wait=False) for start, end in splits]
        staying = swarm.add_server(0, 4, "--throughput", "1", wait=False)
        for server in swarm.servers:
            swarm.wait_online(server)
        with AutoDistributedModelForCausalLM.from_pretrained(long_model, swarm.initial_peers) as model:
            wait_for_route(model, *(server.peer_id for server in leaving))
            with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
                drain = DrainAt(leaving[-1], DRAIN_AT, session)
                output = model.generate(ids, max_new_tokens=new_tokens, session=session, streamer=drain)
                assert drain.chain_before == [server.peer_id for server in leaving]
                moved = (session.moves, session.replayed_tokens, session.failovers)
                logs = [server.log_path.read_text()[-3000:] for server in (leaving[-1], staying)]
                assert moved == (1, 0, 0), "\n---\n".join(logs)
                chain = [peer for peer, _, _ in session.chain]
                assert staying.peer_id in chain and leaving[-1].peer_id not in chain
            assert model.convicted == {}
        assert torch.equal(output, expected)
        deadline = time.monotonic() + 60
        while leaving[-1].proc.poll() is None:  # it drained: nothing left to wait for
            assert time.monotonic() < deadline, "the drained server did not exit"
            time.sleep(0.2)
        assert leaving[-1].proc.returncode == 0
        log = leaving[-1].log_path.read_text()
        assert "handed 1 of 1 open session(s) to other servers" in log


def test_a_forged_handover_and_a_stranger_s_resume_are_refused(long_model, tmp_path):

    with LocalSwarm(long_model, [(0, 4)], workdir=tmp_path / "swarm") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(long_model, swarm.initial_peers) as model:
            remote = model.remote
            plan = remote.runtime.run(remote.make_chain(), 60)[0]
            me = remote.p2p.peer_id.to_base58()
            header = dict(
                model=remote.model_name,
                start_block=0,
                end_block=4,
                batch_size=1,
                max_length=64,
                position=8,
                session_id="f" * 32,
                owner=me,
                exporter=me,
                precision="float32",
                chunks=0,
                digest="0" * 64,
                signature="0" * 128,
            )

            async def answer(rpc, message):
                peer = (await connect(remote.p2p, plan, 30)).peer

                async def requests():
                    yield message
                    await asyncio.sleep(60)  # the stream stays open: the server's answer ends it

                replies = await remote.p2p.iterate_protobuf_handler(peer, rpc, requests(), runtime_pb2.ExpertResponse)
                try:
                    read_header(await asyncio.wait_for(anext(replies), 30), ImportSession)
                except WireError as e:
                    return e.message
                finally:
                    await replies.aclose()

            def refusal(rpc, header_model) -> str:
                return remote.runtime.run(answer(rpc, pack(header_model, request=True)), 60)

            stranger = plan.peer_id  # any peer id but the caller's own
            assert "not by another peer" in refusal(RPC_IMPORT, ImportSession(**{**header, "exporter": stranger}))
            assert "not signed by the server that announces it" in refusal(RPC_IMPORT, ImportSession(**header))
            # Nor may a client ask what the server's prefix cache holds, or claim positions from it.
            probe = ImportProbe(start_block=0, probe_keys=("a" * 64,))
            assert "only a server announcing the session's blocks" in refusal(RPC_IMPORT, probe)
            skipping = ImportSession(**{**header, "skip": 16, "prefix_keys": ("a" * 64,)})
            assert "16 positions cannot come from this server's prefix cache" in refusal(RPC_IMPORT, skipping)
            resume = OpenSession(
                model=remote.model_name,
                start_block=0,
                end_block=4,
                max_length=64,
                batch_size=1,
                session_id="f" * 32,
                resume=True,
            )
            assert "no session was handed over here" in refusal(RPC_INFERENCE, resume)
            # And the server serves on as before.
            ids = prompt(1)
            expected = reference_model(long_model).generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
            )
            assert torch.equal(model.generate(ids, max_new_tokens=4), expected)
