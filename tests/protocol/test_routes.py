"""Sealed routes: each server of a pushed chain opens only its own layer, learns only its next hop, and
cannot change what the client asked of the step."""

from __future__ import annotations

import base64
import uuid

import pytest

from protocol.messages import Hop, Step, pack
from protocol.routes import SealedRouteError, new_route_key, open_route, seal_route


def hop(name: str) -> tuple[Hop, str]:
    return Hop(
        peer_id=name, session_id=uuid.uuid4().hex, addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{name}",), dtype="float32"
    ), (new_route_key())


def test_each_server_learns_only_its_next_hop_and_the_last_one_none():
    hops = [hop("b"), hop("c"), hop("d")]
    first, sealed = seal_route(hops, step_id=9, position=5, rewind=False)
    assert first == hops[0][0]
    # What the first server is sent names no later server's session.
    header = pack(Step(position=5, step_id=9, route=(first,), sealed_route=sealed), request=True).metadata
    assert hops[0][0].session_id.encode() in header
    for later, _ in hops[1:]:
        assert later.session_id.encode() not in header and later.session_id.encode() not in base64.b64decode(sealed)
    following = []
    for reader, key in hops:
        following_hop, sealed = open_route(bytes.fromhex(key), reader.session_id, 9, 5, False, sealed)
        following.append(following_hop)
    assert following == [hops[1][0], hops[2][0], None] and sealed == ""


@pytest.mark.parametrize(
    "change",
    ["key", "session", "step", "position", "rewind", "tampered", "missing"],
)
def test_a_layer_opens_only_for_its_session_and_the_step_the_client_sealed(change):
    (reader, key), later = hop("b"), hop("c")
    _, sealed = seal_route([(reader, key), later], step_id=3, position=7, rewind=False)
    args = dict(key=bytes.fromhex(key), session_id=reader.session_id, step_id=3, position=7, rewind=False)
    if change == "key":
        args["key"] = bytes.fromhex(new_route_key())
    elif change == "session":
        args["session_id"] = later[0].session_id
    elif change == "step":
        args["step_id"] = 4
    elif change == "position":
        args["position"] = 0
    elif change == "rewind":
        args["rewind"] = True
    elif change == "tampered":
        raw = bytearray(base64.b64decode(sealed))
        raw[-1] ^= 1
        sealed = base64.b64encode(bytes(raw)).decode()
    else:
        sealed = ""
    with pytest.raises(SealedRouteError):
        open_route(sealed=sealed, **args)
    # Unchanged, it opens.
    if change not in ("tampered", "missing"):
        assert open_route(bytes.fromhex(key), reader.session_id, 3, 7, False, sealed)[0] == later[0]
