"""Step receipts: a server signs what it computed for a client, so a third party (the relay) can tell
a server's real answer from one an accuser made up.

A receipt covers one step of one session: the blocks, the client's session id, the dtype computed in
(and the weights' quantization, `precision`),
the positions, SHA-256 digests of the step's input and output bytes, and a digest of the attention
mask the step attended with (every position so far): whatever a third party recomputes with is
signed. The key is an Ed25519 key derived from the server's identity (`dht.identity.receipt_signer`)
and announced in its DHT record, which its identity signs; Ed25519 costs tens of microseconds per
step, where RSA would cost a millisecond.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

VERSION = "swarm-receipt-v2"


@dataclass(frozen=True)
class Receipt:
    """One signed step: positions [position, position + tokens) of session `session_id`."""

    position: int
    tokens: int
    input_digest: str
    output_digest: str
    signature: str

    def message(self, model: str, start: int, end: int, session_id: str, dtype: str, mask_digest: str) -> bytes:
        """What was signed; `mask_digest` is `mask_digest()` of the mask up to this step's end."""
        return receipt_message(
            model,
            start,
            end,
            session_id,
            dtype,
            self.position,
            self.tokens,
            self.input_digest,
            self.output_digest,
            mask_digest,
        )


def receipt_message(
    model: str,
    start: int,
    end: int,
    session_id: str,
    dtype: str,
    position: int,
    tokens: int,
    input_digest: str,
    output_digest: str,
    mask_digest: str,
) -> bytes:
    fields = [VERSION, model, str(start), str(end), session_id, dtype, str(position), str(tokens)]
    return "|".join(fields + [input_digest, output_digest, mask_digest]).encode()


EXPORT_VERSION = "swarm-kv-export-v1"
TIER_TARGET = "kv-tier"  # what an export to a KV tier names as the importer


def export_message(
    model: str,
    start: int,
    end: int,
    session_id: str,
    precision: str,
    batch: int,
    max_length: int,
    position: int,
    digest: str,
    moved_to: str,
) -> bytes:
    """What an exporting server signs when it hands a session's KV cache to server `moved_to`: the
    importer and the client check it against the exporter's announced receipt key."""
    fields = [EXPORT_VERSION, model, str(start), str(end), session_id, precision]
    return "|".join(fields + [str(batch), str(max_length), str(position), digest, moved_to]).encode()


def precision(dtype: str, quant: str = "none", adapter: str = "") -> str:
    """What a receipt names as the dtype computed in: the dtype, the quantization of the weights when
    they are quantized and the LoRA adapter a session runs with ("float32+int8+lora:math"), so that
    nobody can claim a server computed otherwise."""
    return dtype + (f"+{quant}" if quant != "none" else "") + (f"+lora:{adapter}" if adapter else "")


def mask_digest(mask: Optional[torch.Tensor], batch: int, length: int) -> str:
    """Digest of the attention mask of positions [0, length) ([batch, length], nonzero: attended; None:
    every position), the same whichever way it is written down."""
    if mask is None:  # most sessions, at both ends of every step: the bytes without a tensor (36 µs less)
        return hashlib.sha256(f"{batch},{length}|".encode() + b"\x01" * (batch * length)).hexdigest()
    shape = ",".join(str(size) for size in mask.shape)
    attended = mask.detach().ne(0).to(torch.uint8).cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(shape.encode() + b"|" + attended).hexdigest()


def public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    return key.sign(message).hex()


def verify(public_key: str, message: bytes, signature: str) -> bool:
    """Whether `signature` (hex) is `public_key`'s (hex, raw Ed25519) over `message`; False for malformed input."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key)).verify(bytes.fromhex(signature), message)
    except (ValueError, InvalidSignature):
        return False
    return True
