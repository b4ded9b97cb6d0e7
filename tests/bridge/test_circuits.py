"""A bridge's circuits on loopback, with real libp2p daemons: what it carries, what it refuses,
and its bounds (the NAT test covers the same path behind a real NAT)."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from bridge.attached import BridgeAttachment, ask_dial_back
from bridge.dial import Target, call, iterate
from bridge.frames import CircuitError
from bridge.node import BridgeLimits, BridgeNode
from dht.dialing import dial
from dht.ports import free_port

HANDLER = "swarm.BlockService.rpc_test_echo"


async def daemon(port: int = 0) -> P2P:
    return await P2P.create(
        host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"],
        nat_port_map=False,
        auto_nat=False,
        use_relay=False,
        use_auto_relay=False,
        check_if_identity_free=False,
    )


async def echo(requests, context):
    async for request in requests:
        yield runtime_pb2.ExpertResponse(metadata=request.metadata)


async def echo_once(request, context):
    return runtime_pb2.ExpertResponse(metadata=request.metadata)


CARRIED = {HANDLER, HANDLER + "_unary"}


def announced(*peers: str):
    """A proof that holds for `peers` only (what the DHT would say: the bridge's use of it is what these
    tests are about; the NAT test proves servers through the real DHT)."""

    async def prove(peer: str, model: str, start_block: int) -> bool:
        return peer in peers and (model, start_block) == ("m", 0)

    return prove


async def attached(p2p: P2P, bridge_addr: str) -> BridgeAttachment:
    changed = asyncio.Event()

    async def on_change(bridges):
        if bridges:
            changed.set()

    attachment = BridgeAttachment(p2p, lambda: _as_list(bridge_addr), on_change, lambda: ("m", 0), want=1)
    attachment.task = asyncio.create_task(attachment.run())
    await asyncio.wait_for(changed.wait(), 30)
    return attachment


async def until(condition, what: str, timeout: float = 60.0) -> None:
    """Polls `condition` (bounded: slow days are slow)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not true within {timeout:.0f} s: {what}"
        await asyncio.sleep(0.1)


async def _as_list(addr: str) -> list[str]:
    return [addr]


@pytest.mark.asyncio
async def test_a_bridge_carries_swarm_rpcs_to_attached_servers_only_and_within_its_limits():
    bridge_port, client_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    bridge = await daemon(bridge_port)
    home, other, client = await daemon(), await daemon(), await daemon(client_port)
    bridge_addr = f"/ip4/127.0.0.1/tcp/{bridge_port}/p2p/{bridge.peer_id.to_base58()}"
    attachments = []
    try:
        node = BridgeNode(
            bridge,
            CARRIED,
            announced(home.peer_id.to_base58()),
            BridgeLimits(max_servers=1, max_circuits=4, max_bytes=20_000, max_seconds=60),
        )
        await node.start()
        for p2p in (home, other):
            await p2p.add_protobuf_handler(
                HANDLER, echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
            )
            await p2p.add_protobuf_handler(HANDLER + "_unary", echo_once, runtime_pb2.ExpertRequest)
        attachments.append(await attached(home, bridge_addr))
        assert node.attached.keys() == {home.peer_id.to_base58()}
        await dial(client, bridge.peer_id.to_base58(), [bridge_addr], 30)
        through = Target(home.peer_id.to_base58(), bridge=bridge_addr)

        # A stream and a unary call reach the attached server through the bridge, intact.
        async def requests(*payloads):
            for payload in payloads:
                yield runtime_pb2.ExpertRequest(metadata=payload)

        replies = [reply.metadata async for reply in await iterate(client, through, HANDLER, requests(b"a", b"bc"))]
        assert replies == [b"a", b"bc"]
        reply = await call(client, through, HANDLER + "_unary", runtime_pb2.ExpertRequest(metadata=b"info"))
        assert reply.metadata == b"info"

        # Refused: a server that is not attached, an RPC that is not the swarm's, a second attachment
        # beyond max_servers.
        with pytest.raises(CircuitError, match="not attached"):
            await iterate(client, Target(other.peer_id.to_base58(), bridge=bridge_addr), HANDLER, requests(b"x"))
        with pytest.raises(CircuitError, match="carries only the swarm's RPCs"):
            await call(
                client,
                Target(home.peer_id.to_base58(), bridge=bridge_addr),
                "hivemind.Other.rpc",
                runtime_pb2.ExpertRequest(),
            )
        refused = BridgeAttachment(
            other, lambda: _as_list(bridge_addr), lambda bridges: asyncio.sleep(0), lambda: ("m", 0), want=1
        )
        await refused.top_up()
        assert refused.bridges == ()
        assert node.attached.keys() == {home.peer_id.to_base58()}

        # A circuit that carries more than max_bytes is cut (the caller sees its stream end early).
        replies = [reply async for reply in await iterate(client, through, HANDLER, requests(*[b"y" * 8000] * 5))]
        assert len(replies) < 5
        await until(lambda: node.circuits == 0, "every circuit is accounted for once it ends")

        # Dial-back: the bridge reaches a listening port at the address it sees, not a closed one.
        answer = await ask_dial_back(client, [bridge_addr], [client_port])
        assert answer.reachable is True and answer.observed_ip == "127.0.0.1"
        answer = await ask_dial_back(client, [bridge_addr], [free_port("127.0.0.1")])
        assert answer.reachable is False

        # The bridge going away ends the attachment: the server notices and says it holds none.
        attachment = attachments[0]
        await bridge.shutdown()
        await until(lambda: attachment.bridges == (), "the server sees it lost its bridge")
    finally:
        for attachment in attachments:
            attachment.task.cancel()
        for p2p in (client, other, home, bridge):
            await p2p.shutdown()


@pytest.mark.asyncio
async def test_a_bridge_carries_nothing_to_a_server_that_does_not_prove_it_serves_the_swarm_and_detaches_it():
    """Throwaway identities that attach without a record naming the bridge hold few slots, briefly,
    give them up to newcomers, and get no circuit; one caller gets a bounded number of circuits at once."""
    bridge_port = free_port("127.0.0.1")
    bridge = await daemon(bridge_port)
    stranger, honest, client = await daemon(), await daemon(), await daemon()
    bridge_addr = f"/ip4/127.0.0.1/tcp/{bridge_port}/p2p/{bridge.peer_id.to_base58()}"
    attachments = []
    try:
        limits = BridgeLimits(max_servers=4, max_unproven=1, proof_seconds=4, max_circuits_per_source=1)
        node = BridgeNode(bridge, CARRIED, announced(honest.peer_id.to_base58()), limits)
        await node.start()
        for p2p in (stranger, honest):
            await p2p.add_protobuf_handler(
                HANDLER, echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
            )
        attachments.append(await attached(stranger, bridge_addr))
        await dial(client, bridge.peer_id.to_base58(), [bridge_addr], 30)

        async def requests(*payloads):
            for payload in payloads:
                yield runtime_pb2.ExpertRequest(metadata=payload)

        with pytest.raises(CircuitError, match="has not announced a record"):
            await iterate(client, Target(stranger.peer_id.to_base58(), bridge=bridge_addr), HANDLER, requests(b"x"))
        # The unproven slot is taken: a newcomer takes it (the stranger goes) and proves itself.
        attachments.append(await attached(honest, bridge_addr))
        await until(lambda: honest.peer_id.to_base58() in node.proven, "the honest server proven")
        # The stranger's attachment went when the newcomer came (it may have attached again since,
        # as the one unproven server now, and it still gets no circuit).
        since = node.attached.get(stranger.peer_id.to_base58())
        assert since is None or since > node.attached[honest.peer_id.to_base58()]
        assert stranger.peer_id.to_base58() not in node.proven
        through = Target(honest.peer_id.to_base58(), bridge=bridge_addr)

        async def held(*payloads):
            for payload in payloads:
                yield runtime_pb2.ExpertRequest(metadata=payload)
            await asyncio.sleep(30)  # keeps the circuit open

        first = await iterate(client, through, HANDLER, held(b"a"))
        assert (await anext(first)).metadata == b"a"
        with pytest.raises(CircuitError, match="circuits of yours"):
            await iterate(client, through, HANDLER, requests(b"b"))
        await first.aclose()
        # A stranger that attaches once more never proves itself: detached once its time is up, while
        # the proven server stays. (Its retrying attachment is stopped first: one attach, one detach.)
        attachments[0].task.cancel()
        await until(lambda: stranger.peer_id.to_base58() not in node.attached, "the first attachment gone")
        once = BridgeAttachment(
            stranger, lambda: _as_list(bridge_addr), lambda bridges: asyncio.sleep(0), lambda: ("m", 0), want=1
        )
        await once.top_up()
        assert stranger.peer_id.to_base58() in node.attached
        await until(lambda: stranger.peer_id.to_base58() not in node.attached, "the stranger detached")
        assert honest.peer_id.to_base58() in node.attached
    finally:
        for attachment in attachments:
            attachment.task.cancel()
        for p2p in (client, honest, stranger, bridge):
            await p2p.shutdown()
