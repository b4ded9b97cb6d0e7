"""Every RPC of a live server gets garbage — random bytes, wrong msgpack types, wrong or huge declared
sizes, truncated streams, steps before opening, streams dropped mid-way — and the server still
serves a correct generation afterwards, with its cache budget and memory back where they were."""

from __future__ import annotations

import asyncio
import random
import time

import msgpack
import psutil
import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from client import AutoDistributedModelForCausalLM
from client.streams import connect
from harness.local_swarm import LocalSwarm
from protocol.messages import (
    RPC_BUNDLE,
    RPC_ECHO,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    ForwardRequest,
    OpenSession,
    ServerInfoReply,
    Step,
    pack,
    read_header,
)
from tests.helpers.client_worker import prompt

pytestmark = pytest.mark.slow

SEED = 20261124
HIDDEN = 64  # the test model's hidden size (conftest's llama)


def _headers(rng: random.Random, model: str) -> list[bytes]:
    """Headers that are not msgpack, are msgpack of the wrong type, or carry wrong values."""
    good_open = dict(model=model, start_block=0, end_block=4, max_length=16, batch_size=1)
    wrong = [
        [],
        5,
        "open",
        None,
        2**64 - 1,
        {"model": 5},
        {"position": -5},
        {"position": 2**64 - 1},
        [good_open],
        {**good_open, "start_block": -1},
        {**good_open, "end_block": 10**9},
        {**good_open, "max_length": 0},
        {**good_open, "batch_size": -3},
        {**good_open, "max_length": 2**62},
        {**good_open, "model": "x" * 10_000},
        {"error": "bad_request", "message": "a client pretending to be an error reply"},
        {**good_open, "session_id": {"nested": [1, 2, {"deep": True}]}},
    ]
    headers = [msgpack.packb(value, use_bin_type=True) for value in wrong]
    headers += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) for _ in range(8)]
    headers.append(b"\x91" * 100_000)  # deeply nested and over the header cap
    return headers


def _tensors(rng: random.Random) -> list[runtime_pb2.Tensor]:
    """Tensor protos whose declared shape, dtype or size does not match what they carry."""
    good = pack(None, [torch.randn(1, 2, HIDDEN)], request=True).tensors[0]
    bad = []
    for size, dtype, buffer in [
        ([1, 2**30, HIDDEN], "float32", good.buffer),  # a huge declared shape, a small buffer
        ([2**32 - 1, 2, HIDDEN], "float32", good.buffer),  # the largest dimension the wire can declare
        ([1, 2, HIDDEN], "complex128", good.buffer),
        ([1, 2, HIDDEN], "float32", good.buffer[:-4]),  # truncated buffer
        ([1, 2, HIDDEN, 1, 1, 1], "float32", good.buffer),  # too many dimensions
        ([1, 2, HIDDEN + 1], "float32", good.buffer),
        ([1, 2, HIDDEN], "float16", good.buffer),  # another dtype than announced
        ([1, 2, HIDDEN], "float32", bytes(rng.getrandbits(8) for _ in range(len(good.buffer)))),  # random values
        ([0, 0, 0], "float32", b""),
        ([2**31 - 1] * 3, "int64", b""),
    ]:
        proto = runtime_pb2.Tensor()
        proto.CopyFrom(good)
        del proto.size[:]
        proto.size.extend(size)
        proto.dtype = dtype
        proto.buffer = buffer
        bad.append(proto)
    return bad


WAIT = 10.0  # for an answer to one garbage stream; the server being alive and well afterwards is what counts


async def _exchange(p2p: P2P, peer, handler: str, messages: list, settle: float = 0.01) -> list:
    """Sends `messages` on one stream and reads replies until the server ends it (bounded by WAIT)."""
    try:
        return await asyncio.wait_for(_talk(p2p, peer, handler, messages, settle), WAIT)
    except asyncio.TimeoutError:
        return []


async def _talk(p2p: P2P, peer, handler: str, messages: list, settle: float) -> list:
    done = asyncio.Event()

    async def requests():
        for message in messages:
            yield message
            await asyncio.sleep(settle)
        await done.wait()

    received = []
    try:
        replies = await p2p.iterate_protobuf_handler(peer, handler, requests(), runtime_pb2.ExpertResponse)
        async for reply in replies:
            received.append(reply)
            if b"error" in reply.metadata or len(received) >= len(messages):
                break
        done.set()
        await replies.aclose()
    except Exception:  # the server may close the stream on garbage: that is an acceptable answer
        pass
    return received


async def _raw(p2p: P2P, peer, handler: str, data: bytes, close: bool = True) -> None:
    """Writes bytes below the protobuf layer (framing included, or not) and waits for the server's close."""
    _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, handler), WAIT)
    try:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), WAIT)
        if close:
            writer.write_eof()
        await asyncio.wait_for(reader.read(), WAIT)
    except (ConnectionError, OSError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()


async def _fuzz(model, rng: random.Random) -> int:
    remote = model.remote
    (plan, *_) = await remote.make_chain()
    p2p = remote.p2p
    peer = (await connect(p2p, plan, 30)).peer
    name = model.model_name
    opened = pack(OpenSession(model=name, start_block=0, end_block=4, max_length=16, batch_size=1), request=True)
    step = pack(Step(position=0), [torch.randn(1, 2, HIDDEN)], request=True)
    forward = pack(
        ForwardRequest(model=name, start_block=0, end_block=4, total_tokens=2, batch_size=1),
        [torch.randn(1, 2, HIDDEN)],
        request=True,
    )
    count = 0
    for handler in (RPC_INFERENCE, RPC_FORWARD):
        for header in _headers(rng, name):
            garbage = runtime_pb2.ExpertRequest(uid="", metadata=header)
            await _exchange(p2p, peer, handler, [garbage])
            count += 1
            await _exchange(p2p, peer, handler, [opened if handler == RPC_INFERENCE else forward, garbage])
            count += 1
        for tensor in _tensors(rng):
            bad_step = runtime_pb2.ExpertRequest(uid="", metadata=step.metadata, tensors=[tensor])
            await _exchange(
                p2p,
                peer,
                handler,
                [opened, bad_step]
                if handler == RPC_INFERENCE
                else [runtime_pb2.ExpertRequest(uid="", metadata=forward.metadata, tensors=[tensor])],
            )
            count += 1
        await _exchange(p2p, peer, handler, [step])
        count += 1  # a step before any OpenSession
        await _exchange(p2p, peer, handler, [step] * 3 + [opened])
        count += 1
        for _ in range(6):  # below the protobuf layer: random bytes, truncated and oversized frames
            await _raw(p2p, peer, handler, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2048))))
            count += 1
        await _raw(p2p, peer, handler, P2P.MESSAGE_MARKER + (1000).to_bytes(8, "big") + b"\0" * 10)
        count += 1
        await _raw(p2p, peer, handler, P2P.MESSAGE_MARKER + (2**63).to_bytes(8, "big"))
        count += 1
        await _raw(p2p, peer, handler, P2P.MESSAGE_MARKER + (5).to_bytes(8, "big") + b"\xff" * 5, close=False)
        count += 1
    for header in _headers(rng, name):  # bundles: garbage as a bundle's header, and in a channel
        await _exchange(p2p, peer, RPC_BUNDLE, [runtime_pb2.ExpertRequest(uid="", metadata=header)])
        garbage = runtime_pb2.ExpertRequest(uid="", metadata=header)
        await _exchange(p2p, peer, RPC_BUNDLE, [_bundled(opened, garbage)])
        count += 2
    for tensor in _tensors(rng):
        bad_step = runtime_pb2.ExpertRequest(uid="", metadata=step.metadata, tensors=[tensor])
        await _exchange(p2p, peer, RPC_BUNDLE, [_bundled(opened, bad_step)])
        count += 1
    for _ in range(3):
        await _raw(p2p, peer, RPC_BUNDLE, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2048))))
        count += 1
    for _ in range(5):  # sessions that open, take a step, then vanish without a word
        stream = await p2p.iterate_protobuf_handler(
            peer, RPC_INFERENCE, _forever([opened, step]), runtime_pb2.ExpertResponse
        )
        await asyncio.wait_for(anext(stream), WAIT)
        await asyncio.wait_for(anext(stream), WAIT)
        task = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        count += 1
    for handler in (RPC_INFO, RPC_ECHO):  # unary RPCs
        for header in _headers(rng, name)[:6]:
            request = runtime_pb2.ExpertRequest(uid="", metadata=header, tensors=_tensors(rng)[:2])
            try:
                await asyncio.wait_for(
                    p2p.call_protobuf_handler(peer, handler, request, runtime_pb2.ExpertResponse), WAIT
                )
            except Exception:
                pass
            count += 1
    return count


def _bundled(*messages) -> runtime_pb2.ExpertRequest:
    """`messages` as one bundle on one channel, a session's, packed by hand: an honest caller would
    not pack some of them."""
    parts = [
        {
            "channel": 1,
            "metadata": message.metadata,
            "tensors": len(message.tensors),
            "open": RPC_INFERENCE if i == 0 else "",
        }
        for i, message in enumerate(messages)
    ]
    tensors = [tensor for message in messages for tensor in message.tensors]
    return runtime_pb2.ExpertRequest(
        uid="", metadata=msgpack.packb({"parts": parts}, use_bin_type=True), tensors=tensors
    )


async def _forever(messages):
    for message in messages:
        yield message
    await asyncio.Event().wait()


def _info(model) -> ServerInfoReply:
    async def go():
        (plan, *_) = await model.remote.make_chain()
        peer = (await connect(model.remote.p2p, plan, 30)).peer
        reply = await asyncio.wait_for(
            model.remote.p2p.call_protobuf_handler(
                peer, RPC_INFO, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
            ),
            30,
        )
        return read_header(reply, ServerInfoReply)

    return model.remote.runtime.run(go())


def test_a_server_survives_garbage_on_every_rpc(llama_path, llama_ref, tmp_path):
    ids = prompt(12)
    expected = llama_ref.generate(ids, max_new_tokens=8, do_sample=False)
    with LocalSwarm(
        llama_path, [(0, 4)], server_args=["--throughput", "100", "--session-timeout", "20"], workdir=tmp_path / "swarm"
    ) as swarm:
        server = psutil.Process(swarm.servers[0].proc.pid)
        with AutoDistributedModelForCausalLM.from_pretrained(
            llama_path, swarm.initial_peers, request_timeout=60
        ) as model:
            assert torch.equal(model.generate(ids, max_new_tokens=8), expected)
            before = server.memory_info().rss
            sent = model.remote.runtime.run(_fuzz(model, random.Random(SEED)))
            assert sent > 100
            assert server.is_running() and swarm.servers[0].proc.poll() is None
            # Abandoned sessions are noticed when their streams close, or after --session-timeout at most.
            deadline = time.monotonic() + 180
            while True:
                info = _info(model)
                if info.open_sessions == 0 and info.cache_tokens_free == info.cache_tokens_total:
                    break
                assert time.monotonic() < deadline, f"sessions still open after the fuzzing: {info}"
                time.sleep(0.5)
            assert torch.equal(model.generate(ids, max_new_tokens=8), expected)
            assert server.memory_info().rss < before + 200 * 2**20  # nothing the garbage allocated is kept
