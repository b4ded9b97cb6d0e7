"""Server-to-server push: a step goes client → server 1 → … → server S → client, outputs unchanged,
failover intact, and a server accepts pushes only into sessions a client opened there."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM

from blocks.checkpoint import Checkpoint
from blocks.loading import load_span
from blocks.synthetic import make_random_checkpoint
from client import AutoDistributedModelForCausalLM
from dht.dialing import dial
from harness.local_swarm import LocalSwarm
from protocol.errors import ErrorKind, WireError
from protocol.messages import (
    RPC_PUSH,
    OpenSession,
    Push,
    PushAccepted,
    SessionOpened,
    Step,
    StepDone,
    pack,
    read_header,
)
from protocol.tensors import read_tensors
from swarm.batching import StepScheduler
from swarm.cache import CacheBudget
from swarm.compute import ComputeThread
from swarm.handler import BlockHandler, Limits
from tests.conftest import reference_model
from tests.test_batching import scrape
from tests.test_failover import AtToken


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


async def test_a_late_reply_makes_the_client_probe_the_stream_once(monkeypatch):
    """A pushed step's reply that is late gets one `Expect` written on the stream (a write to a dead
    server fails at once); a reply in time gets none."""
    import client.streams
    from client.streams import RequestStream

    monkeypatch.setattr(client.streams, "NUDGE_AFTER", 0.2)
    replies: asyncio.Queue = asyncio.Queue()

    async def from_server():
        while True:
            yield await replies.get()

    stream = RequestStream()
    stream.replies = from_server()
    probes = []
    replies.put_nowait("on time")
    assert await stream.receive(30, nudge=lambda: probes.append("probe")) == "on time"
    asyncio.get_running_loop().call_later(1.0, replies.put_nowait, "late")
    assert await stream.receive(30, nudge=lambda: probes.append("probe")) == "late"
    await asyncio.sleep(0.5)  # no probe is left pending after the reply
    assert probes == ["probe"]


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


class InProcessServer:
    """A BlockHandler on blocks 0:2 of a checkpoint, driven without sockets; `stream()` is one
    client stream to it: (queue of requests to put, iterator of replies)."""

    def __init__(self, path):
        self.span = load_span(Checkpoint(path), 0, 2, torch.float32, "cpu")
        self.compute = ComputeThread()
        self.scheduler = StepScheduler(self.compute, max_batch_tokens=64)
        self.handler = BlockHandler(
            "m",
            self.span,
            CacheBudget(1000),
            self.scheduler,
            Limits(max_length=64, max_batch_size=4, max_chunk_tokens=64, session_timeout=60),
            version="test",
            state=lambda: "online",
            accepting=lambda: True,
        )
        self.queues: list[asyncio.Queue] = []

    def stream(self, peer: str):
        queue: asyncio.Queue = asyncio.Queue()
        self.queues.append(queue)

        async def requests():
            while (message := await queue.get()) is not None:
                yield message

        return queue, self.handler.rpc_inference(requests(), SimpleNamespace(remote_id=peer))

    def close(self) -> None:
        for queue in self.queues:
            queue.put_nowait(None)
        self.scheduler.close()
        self.compute.shutdown()


async def test_a_step_pushed_twice_is_computed_once_and_the_session_goes_on(llama_path):
    """After a failover the replacement pushes a step the next server may already have had."""
    server = InProcessServer(llama_path)
    span, handler, size = server.span, server.handler, server.span.config.hidden_size
    queue, replies = server.stream("client")
    key = uuid.uuid4().hex
    context = SimpleNamespace(remote_id="previous-server")
    try:
        queue.put_nowait(
            pack(
                OpenSession(model="m", start_block=0, end_block=2, max_length=16, batch_size=1, session_id=key),
                request=True,
            )
        )
        read_header(await anext(replies), SessionOpened)
        prompt = torch.randn(1, 3, size)
        pushed = pack(Push(position=0, step_id=7, session_id=key), [prompt], request=True)
        for _ in range(2):
            read_header(await handler.rpc_push(pushed, context), PushAccepted)
        first = await asyncio.wait_for(anext(replies), 60)
        assert read_header(first, StepDone).position == 3
        torch.testing.assert_close(read_tensors(first, max_count=1)[0], span.forward(prompt), atol=1e-5, rtol=0)
        # The duplicate was dropped: the next reply is the client's own next step.
        queue.put_nowait(pack(Step(position=3, step_id=8), [torch.randn(1, 1, size)], request=True))
        assert read_header(await asyncio.wait_for(anext(replies), 60), StepDone).position == 4
        # Another client cannot open a session under the same id.
        other_queue, other = server.stream("someone-else")
        other_queue.put_nowait(
            pack(
                OpenSession(model="m", start_block=0, end_block=2, max_length=16, batch_size=1, session_id=key),
                request=True,
            )
        )
        with pytest.raises(WireError, match="already open"):
            read_header(await asyncio.wait_for(anext(other), 60), SessionOpened)
    finally:
        server.close()


async def test_the_attention_mask_stays_on_the_server_and_steps_carry_only_new_columns(llama_path):
    server = InProcessServer(llama_path)
    span, size = server.span, server.span.config.hidden_size
    queue, replies = server.stream("client")
    generator = torch.Generator().manual_seed(3)
    prompt, token = torch.randn(2, 4, size, generator=generator), torch.randn(2, 1, size, generator=generator)
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    try:
        queue.put_nowait(
            pack(
                OpenSession(
                    model="m", start_block=0, end_block=2, max_length=16, batch_size=2, session_id=uuid.uuid4().hex
                ),
                request=True,
            )
        )
        read_header(await anext(replies), SessionOpened)
        queue.put_nowait(pack(Step(position=0, step_id=1), [prompt, padding], request=True))
        read_header(await asyncio.wait_for(anext(replies), 60), StepDone)
        # The next step sends no mask at all: the server still knows the first row starts with padding.
        queue.put_nowait(pack(Step(position=4, step_id=2), [token], request=True))
        reply = await asyncio.wait_for(anext(replies), 60)
        reference_cache = span.new_cache()
        span.forward(prompt, reference_cache, padding)
        want = span.forward(token, reference_cache, torch.cat([padding, torch.ones(2, 1, dtype=torch.int64)], dim=1))
        torch.testing.assert_close(read_tensors(reply, max_count=1)[0], want, atol=1e-5, rtol=0)
        # A mask of the whole session so far is not what a step carries any more: a clear error.
        queue.put_nowait(pack(Step(position=5, step_id=3), [token, torch.ones(2, 6, dtype=torch.int64)], request=True))
        with pytest.raises(WireError, match=r"new tokens must be .* shape \[2, 1\]"):
            read_header(await asyncio.wait_for(anext(replies), 60), StepDone)
    finally:
        server.close()


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
