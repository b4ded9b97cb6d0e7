"""A server answers bad input with a clear error to that client and keeps serving everyone."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.proto import runtime_pb2

from client import BadRequestError
from client.streams import connect
from protocol.errors import ErrorKind, WireError
from protocol.messages import RPC_INFERENCE, RPC_INFO, OpenSession, ServerInfoReply, Step, pack, read_header

pytestmark = pytest.mark.slow


def raw_session(client, messages: list) -> list:
    """Sends raw messages on one inference stream to the first server of the chain; returns the replies."""

    async def go():
        (plan, *_) = await client.remote.make_chain()
        peer = (await connect(client.remote.p2p, plan, 10)).peer

        read_all = asyncio.Event()

        async def requests():
            for message in messages:
                yield message
                await asyncio.sleep(0.05)
            # Keep our side open until the replies are read: ending it races the server's own close
            # after an error reply, and the loser of that race sees a reset instead of the reply.
            await read_all.wait()

        replies = await client.remote.p2p.iterate_protobuf_handler(
            peer, RPC_INFERENCE, requests(), runtime_pb2.ExpertResponse
        )
        received = []
        async for reply in replies:
            received.append(reply)
            if b"error" in reply.metadata or len(received) == len(messages):
                break  # the server ends the stream after an error reply
        read_all.set()
        await replies.aclose()
        return received

    return client.remote.runtime.run(asyncio.wait_for(go(), 30))


def open_message(client, **overrides) -> runtime_pb2.ExpertRequest:
    fields = dict(model=client.model_name, start_block=0, end_block=2, max_length=32, batch_size=1)
    fields.update(overrides)
    return pack(OpenSession(**fields), request=True)


def error_of(reply) -> WireError:
    with pytest.raises(WireError) as info:
        read_header(reply, Step)
    return info.value


def assert_still_serves(client, ref):
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(11))
    assert torch.equal(client.generate(ids, max_new_tokens=20), ref.generate(ids, max_new_tokens=20, do_sample=False))


@pytest.mark.parametrize(
    "tensor, expected",
    [
        (torch.randn(1, 3, 65), "shape [1, tokens, 64]"),  # wrong hidden size
        (torch.randn(2, 3, 64), "shape [1, tokens, 64]"),  # wrong batch
        (torch.randn(1, 3, 64, dtype=torch.float16), "must be float32, got float16"),
        (torch.ones(1, 3, 64, dtype=torch.int64), "must be float32, got int64"),
        (torch.full((1, 3, 64), float("nan")), "NaN"),
        (torch.randn(1, 40, 64), "exceed the session's max_length of 32"),
        (torch.randn(1, 3000, 64), "exceed the limit of 2048; send them in chunks"),
        (torch.randn(1, 140_000, 64), "limit is 33554432"),  # a 36 MB message
    ],
    ids=["hidden-size", "batch", "float16", "int64", "nan", "too-long", "chunk", "message-size"],
)
def test_bad_step_gets_error_then_server_still_serves(llama_client, llama_ref, tensor, expected):
    replies = raw_session(llama_client, [open_message(llama_client), pack(Step(position=0), [tensor], request=True)])
    assert len(replies) == 2  # SessionOpened, then the error; the stream ends
    error = error_of(replies[1])
    assert error.kind == ErrorKind.BAD_REQUEST
    assert expected in error.message
    assert_still_serves(llama_client, llama_ref)


@pytest.mark.parametrize(
    "overrides, kind, expected",
    [
        (dict(max_length=100_000), ErrorKind.BAD_REQUEST, "exceeds this server's limit of 256"),
        (dict(batch_size=1000), ErrorKind.BAD_REQUEST, "batch size 1000"),
        (dict(model="other-model"), ErrorKind.WRONG_MODEL, "not 'other-model'"),
        (dict(start_block=1, end_block=3), ErrorKind.WRONG_MODEL, "this server has 0:2"),
    ],
    ids=["session-length", "batch-size", "model", "blocks"],
)
def test_bad_open_is_refused(llama_client, llama_ref, overrides, kind, expected):
    replies = raw_session(llama_client, [open_message(llama_client, **overrides)])
    assert len(replies) == 1
    error = error_of(replies[0])
    assert error.kind == kind and expected in error.message
    assert_still_serves(llama_client, llama_ref)


def test_garbage_header_is_refused(llama_client, llama_ref):
    garbage = runtime_pb2.ExpertRequest(uid="", tensors=[], metadata=b"\xc1\xff not msgpack")
    replies = raw_session(llama_client, [garbage])
    assert error_of(replies[0]).kind == ErrorKind.BAD_REQUEST
    replies = raw_session(llama_client, [pack(Step(position=0), request=True)])  # a step before opening
    assert "invalid OpenSession" in error_of(replies[0]).message
    assert_still_serves(llama_client, llama_ref)


def test_session_over_server_length_limit_is_a_client_error(llama_client, llama_ref):
    ids = torch.randint(3, 100, (1, 4))
    with pytest.raises(
        BadRequestError, match="accepts a session of 404 tokens at batch 1: the longest they accept is 256"
    ):
        llama_client.generate(ids, max_new_tokens=400)
    assert_still_serves(llama_client, llama_ref)


def test_info_call_reports_what_the_server_serves(llama_client):
    async def go():
        (plan, *_) = await llama_client.remote.make_chain()
        peer = (await connect(llama_client.remote.p2p, plan, 10)).peer
        return await llama_client.remote.p2p.call_protobuf_handler(
            peer, RPC_INFO, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
        )

    deadline = time.monotonic() + 10
    while True:  # sessions of earlier tests are released asynchronously, right after their streams end
        info = read_header(llama_client.remote.runtime.run(go(), 30), ServerInfoReply)
        if info.open_sessions == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (info.model, info.start_block, info.end_block) == (llama_client.model_name, 0, 2)
    assert info.state == "online" and info.dtype == "float32" and info.hidden_size == 64
    assert info.max_length == 256 and info.cache_tokens_free == info.cache_tokens_total == 16384
    assert info.open_sessions == 0


def test_a_declared_message_length_over_the_cap_is_refused_before_buffering(llama_client, llama_ref):
    """A peer that declares a 1 TiB message gets its stream closed at once; nothing waits for the bytes."""
    from hivemind.p2p import P2P

    from protocol.tensors import MAX_STREAM_MESSAGE_BYTES

    async def go():
        (plan, *_) = await llama_client.remote.make_chain()
        peer = (await connect(llama_client.remote.p2p, plan, 10)).peer
        _, reader, writer = await llama_client.remote.p2p.call_binary_stream_handler(peer, RPC_INFERENCE)
        writer.write(P2P.MESSAGE_MARKER + (1 << 40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + b"\0" * 4096)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 60)  # the server closes the stream: EOF
        finally:
            writer.close()

    assert (1 << 40) > MAX_STREAM_MESSAGE_BYTES
    assert llama_client.remote.runtime.run(go()) == b""
    assert_still_serves(llama_client, llama_ref)
