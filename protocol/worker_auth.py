"""How a worker (a server registered with a relay) authenticates its requests (spec R5, seed 001):
access tokens that live 24 h and are rotated 4 h before they expire, and HMAC-SHA256 signatures over
`METHOD:PATH:SHA256(body):TIMESTAMP` in `X-Signature` / `X-Timestamp`.

Both sides use this module: the server to sign (`swarm.coordinator`), the relay to check
(`relay.auth`), so the two can never disagree on the bytes signed.
"""

from __future__ import annotations

import hashlib
import hmac

ACCESS_TOKEN_TTL = 24 * 3600.0
REFRESH_BEFORE_EXPIRY = 4 * 3600.0


def needs_refresh(expires_at: float, now: float) -> bool:
    """A worker refreshes its access token 4 h before it expires."""
    return now >= expires_at - REFRESH_BEFORE_EXPIRY


def signing_payload(method: str, path: str, body: bytes, timestamp: str) -> bytes:
    return f"{method.upper()}:{path}:{hashlib.sha256(body).hexdigest()}:{timestamp}".encode()


def sign(signing_secret: str, method: str, path: str, body: bytes, timestamp: str) -> str:
    return hmac.new(signing_secret.encode(), signing_payload(method, path, body, timestamp), hashlib.sha256).hexdigest()


def signature_headers(secret: str, method: str, path: str, body: bytes, now: float) -> dict[str, str]:
    """`X-Timestamp` and `X-Signature` of one request, stamped at `now` (unix seconds)."""
    timestamp = f"{now:.6f}"
    return {"X-Timestamp": timestamp, "X-Signature": sign(secret, method, path, body, timestamp)}
