"""Sealed routes: a pushed step's route, readable one hop at a time.

When a client opens a server's session it gives that server a fresh route key, on its own (encrypted)
stream. A step's route then names only its first hop in the clear; what that hop's server needs to push
the step further (its own next hop, and the rest still sealed) is sealed with that server's key, and so
on down the chain. Each server learns only the next hop, whose session it must push into, and never a
later server's session id: an earlier server of the chain cannot push into a later span's session.

A layer is bound to its reader's session id and to the step (its id, position and rewind), so it
cannot be replayed into another step or session, and a pusher cannot change what the client asked.
Layers nest as raw bytes (only the outermost is base64 in a header), so a long route grows linearly.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import struct
from typing import Optional, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from pydantic import ValidationError

from protocol.messages import Hop

ROUTE_KEY_HEX = 64  # 32 bytes
_NONCE = 12
_LENGTH = struct.Struct(">I")


class SealedRouteError(ValueError):
    """A sealed route that its reader's key does not open, or whose contents are not a valid layer."""


def new_route_key() -> str:
    return secrets.token_hex(ROUTE_KEY_HEX // 2)


def _bound_to(session_id: str, step_id: int, position: int, rewind: bool) -> bytes:
    return f"{session_id}\n{step_id}\n{position}\n{int(rewind)}".encode()


def seal_route(hops: Sequence[tuple[Hop, str]], step_id: int, position: int, rewind: bool) -> tuple[Hop, str]:
    """`hops`: the later servers of a chain in order, each with its session's route key. Returns the
    first hop (in the clear, for the server the step is sent to) and the route sealed for that hop's
    server (base64). Every hop gets a layer, the last one too (with no next hop): it is the client's
    word for the step's id, position and rewind, which a pusher cannot change."""
    inner = b""
    for index in range(len(hops) - 1, -1, -1):
        reader, key = hops[index]
        following = hops[index + 1][0].model_dump_json().encode() if index + 1 < len(hops) else b""
        plain = _LENGTH.pack(len(following)) + following + inner
        nonce = os.urandom(_NONCE)
        bound = _bound_to(reader.session_id, step_id, position, rewind)
        inner = nonce + ChaCha20Poly1305(bytes.fromhex(key)).encrypt(nonce, plain, bound)
    return hops[0][0], base64.b64encode(inner).decode()


def open_route(
    key: bytes, session_id: str, step_id: int, position: int, rewind: bool, sealed: str
) -> tuple[Optional[Hop], str]:
    """What the reader of `sealed` (session `session_id`, route key `key`) pushes step `step_id` on to:
    its next hop (None: nowhere) and the rest of the route, still sealed for that hop. Raises
    SealedRouteError unless the client sealed it for this session and this very step."""
    try:
        raw = base64.b64decode(sealed, validate=True)
    except (binascii.Error, ValueError):
        raise SealedRouteError("sealed route is not base64") from None
    if len(raw) < _NONCE + 16:
        raise SealedRouteError("sealed route is missing or too short")
    try:
        bound = _bound_to(session_id, step_id, position, rewind)
        plain = ChaCha20Poly1305(key).decrypt(raw[:_NONCE], raw[_NONCE:], bound)
    except InvalidTag:
        raise SealedRouteError("sealed route was not sealed by this session's client for this step") from None
    if len(plain) < _LENGTH.size:
        raise SealedRouteError("sealed route layer is truncated")
    (length,) = _LENGTH.unpack_from(plain)
    if _LENGTH.size + length > len(plain):
        raise SealedRouteError("sealed route layer is truncated")
    rest = plain[_LENGTH.size + length :]
    if not length:
        if rest:
            raise SealedRouteError("sealed route goes on after its last hop")
        return None, ""
    try:
        hop = Hop.model_validate_json(plain[_LENGTH.size : _LENGTH.size + length])
    except ValidationError as e:
        raise SealedRouteError(f"sealed route names an invalid hop: {e.errors()[0]['msg']}") from None
    if not rest:
        raise SealedRouteError("sealed route names a next hop without its layer")
    return hop, base64.b64encode(rest).decode()
