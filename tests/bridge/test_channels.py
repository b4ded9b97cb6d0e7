"""Channels over one bundle stream, between two real libp2p daemons on loopback: many streams to one
peer share one stream and its messages, each channel gets its own replies, and one channel's end or
failure is its own."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from bridge import channels
from bridge.channels import iterate_channel, serve_channels
from bridge.dial import Target
from dht.dialing import dial
from protocol.bundles import unpack_bundle
from protocol.errors import ErrorKind, WireError
from protocol.messages import RPC_BUNDLE, StepDone, read_header

ECHO, BOOM, HOLD, SUM, GATED = "t.echo", "t.boom", "t.hold", "t.sum", "t.gated"
TIMEOUT = 60


async def daemon() -> P2P:
    return await P2P.create(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        nat_port_map=False,
        auto_nat=False,
        use_relay=False,
        use_auto_relay=False,
        check_if_identity_free=False,
    )


class Peer:
    """A peer serving four test RPCs over bundle streams, counting what arrives."""

    def __init__(self):
        self.streams = 0  # bundle streams opened to it
        self.live = 0  # bundle streams open now
        self.parts: list[int] = []  # messages in each bundle that arrived
        self.clean_ends = 0  # ECHO handlers whose requests ended as a stream's do
        self.break_on = b""  # a message that breaks the bundle stream it comes on
        self.gate = asyncio.Event()  # GATED handlers answer each message once it is set

    async def echo(self, requests, context):
        async for request in requests:
            yield runtime_pb2.ExpertResponse(metadata=request.metadata)
        self.clean_ends += 1

    async def boom(self, requests, context):
        async for request in requests:
            yield runtime_pb2.ExpertResponse(metadata=b"first")
            raise RuntimeError("a handler's own bug")

    async def hold(self, requests, context):
        async for _ in requests:
            await asyncio.sleep(3600)
            yield runtime_pb2.ExpertResponse()

    async def gated(self, requests, context):
        async for request in requests:
            await self.gate.wait()
            yield runtime_pb2.ExpertResponse(metadata=request.metadata)

    async def sum(self, requests, context):
        """A push stream's shape: one reply once the requests end."""
        return runtime_pb2.ExpertResponse(metadata=b"".join([r.metadata async for r in requests]))

    async def bundles(self, requests, context):
        self.streams += 1
        self.live += 1

        async def counted():
            async for bundle in requests:
                messages = [message for _, message in unpack_bundle(bundle, request=True) if message is not None]
                if self.break_on and any(message.metadata == self.break_on for message in messages):
                    raise ConnectionResetError("the stream broke")
                self.parts.append(len(messages))
                yield bundle

        handlers = {ECHO: self.echo, BOOM: self.boom, HOLD: self.hold, SUM: self.sum, GATED: self.gated}
        try:
            async for bundle in serve_channels(counted(), context, handlers):
                yield bundle
        finally:
            self.live -= 1


@pytest.fixture
async def pair():
    server, client = await daemon(), await daemon()
    peer = Peer()
    await server.add_protobuf_handler(
        RPC_BUNDLE, peer.bundles, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
    )
    addrs = tuple(str(addr) for addr in await server.get_visible_maddrs())
    await dial(client, server.peer_id.to_base58(), addrs, TIMEOUT)
    try:
        yield client, Target(server.peer_id.to_base58(), addrs), peer, server
    finally:
        await client.shutdown()
        await server.shutdown()


async def requests(*payloads: bytes, hold: asyncio.Event | None = None, then: bytes = b""):
    for payload in payloads:
        yield runtime_pb2.ExpertRequest(metadata=payload)
    if hold is not None:
        await hold.wait()
    if then:
        yield runtime_pb2.ExpertRequest(metadata=then)


async def until(condition, what: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_channels_to_one_peer_share_one_stream_and_its_messages_and_each_gets_its_own_replies(pair):
    client, target, peer, _ = pair
    done = asyncio.Event()

    async def session(n: int) -> list[bytes]:
        sent = [f"{n}:{i}".encode() for i in range(3)]
        replies = await iterate_channel(client, target, ECHO, requests(*sent, hold=done))
        received = [(await anext(replies)).metadata for _ in sent]
        await replies.aclose()
        return received

    async with asyncio.timeout(TIMEOUT):
        received = await asyncio.gather(*(session(n) for n in range(8)))
    done.set()

    assert received == [[f"{n}:{i}".encode() for i in range(3)] for n in range(8)]
    assert peer.streams == 1
    assert sum(peer.parts) == 24 and max(peer.parts) > 1, peer.parts  # messages of several channels went as one


@pytest.mark.asyncio
async def test_a_push_shaped_channel_gets_its_one_reply_once_its_requests_end(pair):
    client, target, _, _ = pair
    async with asyncio.timeout(TIMEOUT):
        replies = await iterate_channel(client, target, SUM, requests(b"a", b"b", b"c"))
        assert [reply.metadata async for reply in replies] == [b"abc"]


@pytest.mark.asyncio
async def test_a_caller_that_leaves_ends_its_requests_and_the_last_channel_closes_the_stream(pair):
    """Leaving a channel ends its requests as closing a stream does, so its handler finishes as it
    would then (a session keeps its prompt's cache only if it does), and the bundle stream ends with
    its last channel: the next channel opens another."""
    client, target, peer, _ = pair
    hold = asyncio.Event()
    async with asyncio.timeout(TIMEOUT):
        first = await iterate_channel(client, target, ECHO, requests(b"x", hold=hold))
        other = await iterate_channel(client, target, ECHO, requests(b"y", hold=hold))
        assert (await anext(first)).metadata == b"x" and (await anext(other)).metadata == b"y"

        await first.aclose()
        await until(lambda: peer.clean_ends == 1, "the first channel's handler finished")
        assert peer.live == 1
        await other.aclose()
        await until(lambda: peer.clean_ends == 2 and peer.live == 0, "the stream closed with its last channel")

        again = await iterate_channel(client, target, ECHO, requests(b"z", hold=hold))
        assert (await anext(again)).metadata == b"z"
        assert peer.streams == 2
        await again.aclose()
    hold.set()


@pytest.mark.asyncio
async def test_a_failing_handler_fails_its_own_channel_and_no_other(pair):
    client, target, _, _ = pair
    hold = asyncio.Event()
    async with asyncio.timeout(TIMEOUT):
        echo = await iterate_channel(client, target, ECHO, requests(b"1", hold=hold))
        assert (await anext(echo)).metadata == b"1"
        boom = await iterate_channel(client, target, BOOM, requests(b"go", hold=hold))
        first, error = [reply async for reply in boom]
        assert first.metadata == b"first"
        with pytest.raises(WireError) as raised:
            read_header(error, StepDone)
        assert raised.value.kind == ErrorKind.SERVER_ERROR and "a handler's own bug" not in raised.value.message
        other = await iterate_channel(client, target, ECHO, requests(b"2", hold=hold))
        assert (await anext(other)).metadata == b"2"
        await echo.aclose()
        await other.aclose()
    hold.set()


@pytest.mark.asyncio
async def test_a_channel_that_leaves_too_much_unread_is_refused_alone(pair, monkeypatch):
    client, target, _, _ = pair
    monkeypatch.setattr(channels, "MAX_UNREAD", 3)
    hold = asyncio.Event()
    async with asyncio.timeout(TIMEOUT):
        greedy = await iterate_channel(client, target, HOLD, requests(*[b"z"] * 8, hold=hold))
        refused = [reply async for reply in greedy]
        with pytest.raises(WireError, match="left unread") as raised:
            read_header(refused[-1], StepDone)
        assert raised.value.kind == ErrorKind.BAD_REQUEST
        fine = await iterate_channel(client, target, ECHO, requests(b"ok", hold=hold))
        assert (await anext(fine)).metadata == b"ok"
        await fine.aclose()
    hold.set()


@pytest.mark.asyncio
async def test_a_caller_that_sends_faster_than_its_handlers_read_is_held_back(pair, monkeypatch):
    """What the handlers have not read yet is bounded in bytes: past it, the next bundle is not read
    until they catch up (nothing is refused, nothing is lost)."""
    client, target, peer, _ = pair
    monkeypatch.setattr(channels, "MAX_UNREAD_BYTES", 1000)
    sent = [bytes([i]) * 600 for i in range(20)]

    async def slowly():
        for payload in sent:
            yield runtime_pb2.ExpertRequest(metadata=payload)
            await asyncio.sleep(0.01)  # each in a bundle of its own

    async with asyncio.timeout(TIMEOUT):
        replies = await iterate_channel(client, target, GATED, slowly())
        # The handler holds the first message; the second and third pass the budget (messages that
        # went in one bundle on a slow day are read together: a few more, never all).
        await until(lambda: sum(peer.parts) >= 3, "three messages read")
        await asyncio.sleep(0.5)
        assert sum(peer.parts) < len(sent) // 2, peer.parts
        peer.gate.set()
        assert [reply.metadata async for reply in replies] == sent


@pytest.mark.asyncio
async def test_a_channel_that_opens_an_rpc_the_peer_does_not_carry_is_refused_alone(pair):
    client, target, _, _ = pair
    async with asyncio.timeout(TIMEOUT):
        hold = asyncio.Event()
        fine = await iterate_channel(client, target, ECHO, requests(b"1", hold=hold))
        refused = [reply async for reply in await iterate_channel(client, target, "t.nothing", requests(b"x"))]
        with pytest.raises(WireError, match="opens 't.nothing'") as raised:
            read_header(refused[0], StepDone)
        assert len(refused) == 1 and raised.value.kind == ErrorKind.BAD_REQUEST
        assert (await anext(fine)).metadata == b"1"
        await fine.aclose()
        hold.set()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "bundle, says",
    [
        (runtime_pb2.ExpertRequest(metadata=b"\xc1"), "not valid msgpack"),
        (runtime_pb2.ExpertRequest(metadata=msgpack.packb({"parts": [{"channel": 1, "tensors": 2}]})), "claim"),
    ],
)
async def test_a_bundle_stream_that_carries_garbage_is_answered_with_an_error_and_the_peer_keeps_serving(
    pair, bundle, says
):
    client, target, _, _ = pair

    async def one():
        yield bundle

    async with asyncio.timeout(TIMEOUT):
        replies = await client.iterate_protobuf_handler(target.peer, RPC_BUNDLE, one(), runtime_pb2.ExpertResponse)
        reply = await anext(replies)
        await replies.aclose()
        with pytest.raises(WireError, match=says) as raised:
            unpack_bundle(reply, request=False)
        assert raised.value.kind == ErrorKind.BAD_REQUEST
        fine = await iterate_channel(client, target, ECHO, requests(b"still"))
        assert [reply.metadata async for reply in fine] == [b"still"]


@pytest.mark.asyncio
async def test_every_channel_fails_with_its_bundle_stream(pair):
    client, target, peer, _ = pair
    hold = asyncio.Event()
    async with asyncio.timeout(TIMEOUT):
        open_ = [await iterate_channel(client, target, ECHO, requests(b"a", hold=hold, then=b"b")) for _ in range(3)]
        for replies in open_:
            assert (await anext(replies)).metadata == b"a"
        peer.break_on = b"b"
        hold.set()
        for replies in open_:
            with pytest.raises(WireError, match="bundle stream failed") as raised:
                await anext(replies)
            assert raised.value.kind == ErrorKind.SERVER_ERROR
        fine = await iterate_channel(client, target, ECHO, requests(b"new"))
        assert [reply.metadata async for reply in fine] == [b"new"]


@pytest.mark.asyncio
async def test_a_peer_that_does_not_take_bundles_gets_streams_of_their_own():
    """A server of an earlier version serves each RPC on a stream of its own: the caller falls back."""
    server, client = await daemon(), await daemon()
    peer = Peer()
    try:
        await server.add_protobuf_handler(
            ECHO, peer.echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )
        addrs = tuple(str(addr) for addr in await server.get_visible_maddrs())
        await dial(client, server.peer_id.to_base58(), addrs, TIMEOUT)
        target = Target(server.peer_id.to_base58(), addrs)
        async with asyncio.timeout(TIMEOUT):
            for payload in (b"first", b"second"):
                replies = await iterate_channel(client, target, ECHO, requests(payload))
                assert [reply.metadata async for reply in replies] == [payload]
        assert peer.clean_ends == 2
    finally:
        await client.shutdown()
        await server.shutdown()
