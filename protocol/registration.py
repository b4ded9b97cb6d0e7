"""What a server signs to register with a relay, so that only the holder of a peer's identity key can
register as that peer, and a captured registration is good for nothing else: the signature covers
the whole body (peer id, time, name, model, ports, labels, hardware) and the address of the one
relay it was made for, so it cannot be replayed to another relay or with other fields."""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from typing import Any, Mapping

from hivemind.dht.crypto import RSASignatureValidator

from dht.identity import ownership_proof

_PREFIX = b"swarm-relay-register-v2"
_UNSIGNED = frozenset({"peer_signature", "join_token"})  # the signature itself; a secret that is not the peer's


def relay_address(url: str) -> str:
    """`host[:port]` of a relay URL, what a registration is bound to. A default port (80, 443) is
    left out, so that a server's `https://relay.example` matches a relay behind a TLS proxy that
    sees `Host: relay.example` over plain HTTP."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    host = (parts.hostname or "").lower()
    return host if parts.port in (None, 80, 443) else f"{host}:{parts.port}"


def registration_message(relay_url: str, body: Mapping[str, Any]) -> bytes:
    """The bytes signed for `body` (a JSON object, as sent) addressed to the relay at `relay_url`."""
    signed = {key: value for key, value in body.items() if key not in _UNSIGNED}
    digest = hashlib.sha256(json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return b":".join([_PREFIX, relay_address(relay_url).encode(), digest.encode()])


def sign_registration(validator: RSASignatureValidator, relay_url: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """`body` with this peer's public key and its signature over the body, for the relay at `relay_url`."""
    body = {**body, "peer_public_key": validator.local_public_key.decode()}
    _, signature = ownership_proof(validator, registration_message(relay_url, body))
    return {**body, "peer_signature": signature}
