"""Server-to-server push: a step goes client → server 1 → … → server S → client, outputs unchanged,
failover intact, and a server accepts pushes only into sessions a client opened there."""

from __future__ import annotations

import uuid

import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM

from blocks.synthetic import make_random_checkpoint
from client import AutoDistributedModelForCausalLM
from dht.dialing import dial
from harness.local_swarm import LocalSwarm
from protocol.errors import ErrorKind, WireError
from protocol.messages import (
    RPC_PUSH,
    Push,
    PushAccepted,
    pack,
    read_header,
)
from tests.helpers.metrics import scrape
from tests.helpers.models import reference_model
from tests.helpers.streamers import AtToken


def pushed_steps(metrics_url: str) -> float:
    return sum(scrape(metrics_url, "swarm_pushed_steps_total").values())


@pytest.mark.slow
@pytest.mark.parametrize("push", [True, False])
def test_generation_with_and_without_push_matches_transformers(qwen2_swarm, qwen2_path, qwen2_ref, push):
    """Three servers; with push the second and third get every step from the server before them."""
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the mask travels with pushed steps too
    expected = qwen2_ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    before = [pushed_steps(server.metrics_url) for server in qwen2_swarm.servers]
    with AutoDistributedModelForCausalLM.from_pretrained(
        qwen2_path, qwen2_swarm.initial_peers, request_timeout=60, push=push
    ) as model:
        output = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(output, expected)
    received = [pushed_steps(server.metrics_url) - count for server, count in zip(qwen2_swarm.servers, before)]
    if push:
        # 11 steps (prompt + 10 tokens, the last token not sent) reach servers 2 and 3 by push, none server 1.
        assert received == [0, 10, 10]
    else:
        assert received == [0, 0, 0]


@pytest.mark.slow
def test_a_middle_server_dies_with_push_on_and_the_output_is_unchanged(tmp_path):
    path = make_random_checkpoint(tmp_path / "llama6", "llama", num_layers=6, seed=12)
    ref = reference_model(path)
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(12))
    expected = ref.generate(ids, max_new_tokens=30, do_sample=False)
    with LocalSwarm(
        path, [(0, 2), (2, 4), (2, 4), (4, 6)], server_args=["--throughput", "100"], workdir=tmp_path / "swarm"
    ) as swarm:
        # A stream to a killed server sometimes sees no reset and waits out its timeout: keep it short.
        with AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, request_timeout=15) as model:
            with model.inference_session(max_length=ids.shape[1] + 30) as session:
                victims = []

                def kill_middle():
                    victims.append(session.chain[1][0])
                    swarm.server(victims[0]).kill()

                output = model.generate(ids, max_new_tokens=30, session=session, streamer=AtToken(10, kill_middle))
            assert torch.equal(output, expected)
            assert session.failovers >= 1 and victims[0] not in [peer for peer, _, _ in session.chain]
            assert len(session.chain) == 3


@pytest.mark.slow
def test_a_push_into_a_session_nobody_opened_is_refused(llama_client, llama_swarm):
    remote = llama_client.remote
    server = llama_swarm.servers[1]
    servers = remote.runtime.run(remote.dht.fetch_servers(llama_client.model_name, remote.num_blocks), 30)
    record = servers[2][server.peer_id].record

    async def push():
        peer = await dial(remote.p2p, server.peer_id, record.addrs, 30)
        message = pack(
            Push(position=0, step_id=1, session_id=uuid.uuid4().hex),
            [torch.zeros(1, 1, llama_client.config.hidden_size)],
            request=True,
        )
        reply = await remote.p2p.call_protobuf_handler(peer, RPC_PUSH, message, runtime_pb2.ExpertResponse)
        return read_header(reply, PushAccepted)

    with pytest.raises(WireError) as error:
        remote.runtime.run(push(), 60)
    assert error.value.kind == ErrorKind.BAD_REQUEST and "no open session" in error.value.message


@pytest.mark.slow
def test_a_chain_that_uses_one_server_for_two_spans_pushes_within_it(llama_path, llama_ref, tmp_path):
    """After B dies, A serves both spans (A[0:2] → A[2:4]): A pushes into its own other session."""
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(13))
    expected = llama_ref.generate(ids, max_new_tokens=16, do_sample=False)
    with LocalSwarm(llama_path, [], workdir=tmp_path / "swarm") as swarm:
        a = swarm.add_server(0, 4, "--throughput", "1")
        b = swarm.add_server(2, 4, "--throughput", "100000")  # so fast that the chain switches to it at block 2
        with AutoDistributedModelForCausalLM.from_pretrained(
            llama_path, swarm.initial_peers, request_timeout=15
        ) as model:
            with model.inference_session(max_length=ids.shape[1] + 16) as session:
                output = model.generate(ids, max_new_tokens=16, session=session, streamer=AtToken(5, b.kill))
                assert session.chain == [(a.peer_id, 0, 2), (a.peer_id, 2, 4)]
        assert pushed_steps(a.metrics_url) > 0
    assert torch.equal(output, expected)


@pytest.mark.slow
def test_a_server_that_cannot_push_to_the_next_says_so_and_the_client_relays_that_hop(llama_path, llama_ref, tmp_path):
    """A's pushes to B fail: A tells the client on its stream at once, the client sends B that step and
    every later one itself (A still gets every step), nobody is banned and no failover happens. Were
    the client to wait out its request timeout instead, this test would run past its own."""
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(15))
    expected = llama_ref.generate(ids, max_new_tokens=12, do_sample=False)
    with LocalSwarm(llama_path, [], workdir=tmp_path / "swarm") as swarm:
        a = swarm.add_server(0, 2, "--throughput", "100", module="tests.helpers.cut_link_server")
        b = swarm.add_server(2, 4, "--throughput", "100")
        with AutoDistributedModelForCausalLM.from_pretrained(
            llama_path, swarm.initial_peers, request_timeout=3600
        ) as model:
            with model.inference_session(max_length=ids.shape[1] + 12) as session:
                output = model.generate(ids, max_new_tokens=12, session=session)
                assert session.chain == [(a.peer_id, 0, 2), (b.peer_id, 2, 4)]
                assert session.links_relayed == {(a.peer_id, b.peer_id)}
                assert session.failovers == 0 and session.push
            assert not model.remote.bans.banned()
        assert pushed_steps(b.metrics_url) == 0
        assert "cannot dial" in a.log_path.read_text()
    assert torch.equal(output, expected)


@pytest.mark.slow
def test_a_bfloat16_chain_with_push_matches_transformers_in_bfloat16(llama_path, tmp_path):
    """bf16 steps travel as two bytes per value, client → server → server → client."""
    ref = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(14))
    expected = ref.generate(ids, max_new_tokens=12, do_sample=False)
    with LocalSwarm(
        llama_path,
        [(0, 2), (2, 4)],
        server_args=["--throughput", "100", "--dtype", "bfloat16"],
        workdir=tmp_path / "swarm",
    ) as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(
            llama_path, swarm.initial_peers, request_timeout=60, dtype=torch.bfloat16
        ) as model:
            output = model.generate(ids, max_new_tokens=12)
        assert pushed_steps(swarm.servers[1].metrics_url) > 0
    assert torch.equal(output, expected)
