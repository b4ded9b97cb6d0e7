"""The server's KV-cache budget comes back in full on every exit path of a session."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from hivemind.proto import runtime_pb2

from client.streams import connect
from protocol.errors import ErrorKind, WireError
from protocol.messages import (
    RPC_INFERENCE,
    RPC_INFO,
    OpenSession,
    ServerInfoReply,
    SessionOpened,
    Step,
    pack,
    read_header,
)

pytestmark = pytest.mark.slow

HOLDER = """
import sys, time, torch
from client import AutoDistributedModelForCausalLM
model = AutoDistributedModelForCausalLM.from_pretrained(sys.argv[1], [sys.argv[2]])
sessions = [model.inference_session(max_length=100) for _ in range(5)]
for s in sessions:
    s.step(torch.randn(1, 3, model.config.hidden_size))
print("holding", flush=True)
time.sleep(600)
"""


async def first_server(client):
    (plan, *_) = await client.remote.make_chain()
    return plan, (await connect(client.remote.p2p, plan, 10)).peer


async def info(client, peer=None) -> ServerInfoReply:
    """The info reply of `peer`, or of the first server the client routes to."""
    if peer is None:
        _, peer = await first_server(client)
    reply = await client.remote.p2p.call_protobuf_handler(
        peer, RPC_INFO, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
    )
    return read_header(reply, ServerInfoReply)


async def broken_session(client, plan, peer, pattern: int) -> bool:
    """Opens a session on the first server and breaks it in one of several ways; True if it opened.

    Every wait is bounded: a client that gives up waiting is one more way to break a session."""
    opened = pack(
        OpenSession(model=client.model_name, start_block=plan.start, end_block=plan.end, max_length=50, batch_size=1),
        request=True,
    )
    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (message := await queue.get()) is not None:
            yield message

    queue.put_nowait(opened)
    replies = None
    try:
        replies = await asyncio.wait_for(
            client.remote.p2p.iterate_protobuf_handler(peer, RPC_INFERENCE, requests(), runtime_pb2.ExpertResponse), 10
        )
        await asyncio.wait_for(anext(replies), 10)  # SessionOpened: the cache is reserved now
        if pattern == 1:  # a normal step, then a clean end of stream
            queue.put_nowait(pack(Step(position=0), [torch.randn(1, 4, 64)], request=True))
            await asyncio.wait_for(anext(replies), 10)
            queue.put_nowait(None)
            await asyncio.wait_for(anext(replies, None), 10)
        elif pattern == 2:  # a bad step: the server answers an error and ends the session
            queue.put_nowait(pack(Step(position=0), [torch.randn(1, 4, 63)], request=True))
            await asyncio.wait_for(anext(replies), 10)
        elif pattern == 3:  # a step sent, then the client disappears before reading the answer
            queue.put_nowait(pack(Step(position=0), [torch.randn(1, 4, 64)], request=True))
            await asyncio.sleep(0.01)
        return True  # pattern 0: the client vanishes without a word
    except asyncio.TimeoutError:
        return False
    finally:
        if replies is not None:
            await replies.aclose()


def wait_for_full_budget(client, timeout: float = 60, peer=None) -> ServerInfoReply:
    """Polls until the server (`peer`, or the first one routed to) has every cache token free again."""
    deadline = time.monotonic() + timeout
    while True:
        reply = client.remote.runtime.run(info(client, peer), 30)
        if reply.open_sessions == 0 and reply.cache_tokens_free == reply.cache_tokens_total:
            return reply
        if time.monotonic() > deadline:
            raise AssertionError(f"cache not returned: {reply}")
        time.sleep(0.2)


def test_memory_returned_after_hundreds_of_broken_sessions(llama_client, llama_swarm, llama_path, llama_ref):
    async def storm():
        plan, peer = await first_server(llama_client)
        opened = 0
        for batch in range(20):
            results = await asyncio.gather(
                *(broken_session(llama_client, plan, peer, (batch + i) % 4) for i in range(12))
            )
            opened += sum(results)
        return opened

    assert llama_client.remote.runtime.run(storm(), 600) >= 200  # of 240

    # A client process holding sessions is killed outright.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(llama_path), llama_swarm.initial_peers[0]],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        during = llama_client.remote.runtime.run(info(llama_client), 30)
        assert during.open_sessions >= 5 and during.cache_tokens_free <= during.cache_tokens_total - 500
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the client and its DHT process, as a crash would
        holder.wait(30)

    reply = wait_for_full_budget(llama_client)
    assert reply.cache_tokens_free == 16384
    ids = torch.randint(3, 100, (1, 5))
    assert torch.equal(
        llama_client.generate(ids, max_new_tokens=10), llama_ref.generate(ids, max_new_tokens=10, do_sample=False)
    )


def test_idle_sessions_expire(llama_swarm, llama_path, tmp_path):
    from client import AutoDistributedModelForCausalLM

    # The session must outlive one step and one info call (a fraction of a second, even on a slow day).
    child = llama_swarm.add_server(
        0, 4, "--session-timeout", "8", "--throughput", "100000", "--model-name", "idle-test"
    )
    try:
        with AutoDistributedModelForCausalLM.from_pretrained(
            llama_path, llama_swarm.initial_peers, model_name="idle-test"
        ) as model:
            first, second = torch.randn(1, 3, 64), torch.randn(1, 2, 64)
            with model.inference_session(max_length=100) as fresh:
                fresh.step(first)
                expected = fresh.step(second)
            session = model.inference_session(max_length=100)
            session.step(first)
            assert model.remote.runtime.run(info(model), 30).open_sessions == 1
            assert wait_for_full_budget(model, timeout=180).open_sessions == 0
            # The client goes on: it opens the session again on the same server (not at fault, not
            # banned: no other server has these blocks) and replays what it had sent.
            assert torch.allclose(session.step(second), expected, atol=1e-5)
            assert session.replayed_tokens == 3 and session.chain == [(child.peer_id, 0, 4)]
            session.close()
        assert re.search(r"closed after \d+ s idle", child.log_path.read_text())
    finally:
        child.stop()
        llama_swarm.servers.remove(child)


async def open_session(client, plan, peer, max_length: int):
    """Opens a session on `peer`: (its first reply's header, or the WireError it answered; a close() coroutine)."""
    queue: asyncio.Queue = asyncio.Queue()
    queue.put_nowait(
        pack(
            OpenSession(
                model=client.model_name, start_block=plan.start, end_block=plan.end, max_length=max_length, batch_size=1
            ),
            request=True,
        )
    )

    async def requests():
        while (message := await queue.get()) is not None:
            yield message

    replies = await asyncio.wait_for(
        client.remote.p2p.iterate_protobuf_handler(peer, RPC_INFERENCE, requests(), runtime_pb2.ExpertResponse), 60
    )

    async def close():
        queue.put_nowait(None)
        await replies.aclose()

    try:
        return read_header(await asyncio.wait_for(anext(replies), 60), SessionOpened), close
    except WireError as e:
        await close()
        return e, close


def test_sessions_refused_as_busy_use_none_of_the_hourly_quota(llama_swarm, llama_path):
    from client import AutoDistributedModelForCausalLM

    child = llama_swarm.add_server(
        0,
        4,
        "--cache-tokens",
        "40",
        "--max-sessions-per-hour",
        "2",
        "--throughput",
        "100",
        "--model-name",
        "quota-test",
    )
    try:
        with AutoDistributedModelForCausalLM.from_pretrained(
            llama_path, llama_swarm.initial_peers, model_name="quota-test"
        ) as model:
            run = model.remote.runtime.run
            plan, peer = run(first_server(model), 60)
            first, close_first = run(open_session(model, plan, peer, 40), 120)
            assert isinstance(first, SessionOpened)  # it holds the whole cache: the first of 2 sessions this hour
            for _ in range(3):
                refused, _ = run(open_session(model, plan, peer, 40), 120)
                assert isinstance(refused, WireError) and refused.kind == ErrorKind.BUSY
                assert "cache" in refused.message  # refused for room, not for the quota
            run(close_first(), 60)
            wait_for_full_budget(model, timeout=180, peer=peer)
            second, close_second = run(open_session(model, plan, peer, 40), 120)
            assert isinstance(second, SessionOpened)  # the refusals above used none of the quota
            run(close_second(), 60)
            wait_for_full_budget(model, timeout=180, peer=peer)
            third, _ = run(open_session(model, plan, peer, 40), 120)
            assert isinstance(third, WireError) and "2 new sessions per hour" in third.message
    finally:
        child.stop()
        llama_swarm.servers.remove(child)
