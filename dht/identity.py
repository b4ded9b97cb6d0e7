"""One RSA key per peer: the libp2p identity (peer id) and the key that signs its DHT records.

Using the same key for both lets a reader derive the writer's peer id from the public key in the
record's subkey, so nobody can announce records on behalf of another server.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path
from typing import Optional

import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

_OWNER_RE = re.compile(rb"^\[owner:(.+)\]$", re.DOTALL)


def ensure_identity(path: str | os.PathLike) -> Path:
    """Creates a new identity file at `path` if there is none (mode 0400), and returns the path."""
    path = Path(path).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    return path


def load_private_key(path: str | os.PathLike) -> RSAPrivateKey:
    data = crypto_pb2.PrivateKey.FromString(Path(path).read_bytes())
    if data.key_type != crypto_pb2.KeyType.RSA:
        raise ValueError(f"identity {path} is not an RSA key")
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": data.data})
    return key


def make_validator(identity_path: str | os.PathLike) -> RSASignatureValidator:
    return RSASignatureValidator(load_private_key(identity_path))


def peer_id_of_subkey(subkey: object) -> Optional[str]:
    """The base58 peer id that owns an `[owner:<ssh-rsa key>]` subkey, or None if it is not one."""
    if not isinstance(subkey, bytes):
        return None
    match = _OWNER_RE.match(subkey)
    if match is None:
        return None
    try:
        public_key = RSAPublicKey.from_bytes(match.group(1))
    except (ValueError, TypeError):
        return None
    der = public_key._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def ownership_proof(validator: RSASignatureValidator, message: bytes) -> tuple[str, str]:
    """(public key as `[owner:…]` text, base64 signature of `message`): shows a third party (the relay)
    that whoever sends `message` holds this peer's identity key."""
    signature = validator._private_key.sign(message)  # hivemind keeps the key private but offers no signer
    return validator.local_public_key.decode(), base64.b64encode(signature).decode()


def proves_ownership(peer_id: str, public_key: str, message: bytes, signature: str) -> bool:
    """Whether `public_key` is `peer_id`'s identity key and signed `message`."""
    owner = public_key.encode()
    if peer_id_of_subkey(owner) != peer_id:
        return False
    match = _OWNER_RE.match(owner)
    try:
        return RSAPublicKey.from_bytes(match.group(1)).verify(message, base64.b64decode(signature, validate=True))
    except (ValueError, TypeError):
        return False


def receipt_signer(validator: RSASignatureValidator) -> Ed25519PrivateKey:
    """The Ed25519 key that signs a server's step receipts (`protocol.receipts`), derived from its identity
    key: the same across restarts, so evidence outlives the process that made it."""
    der = validator._private_key._private_key.private_bytes(  # hivemind offers no accessor
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"swarm step receipts v1" + der).digest())
