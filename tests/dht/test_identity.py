"""A node's identity: the key file, and the owner subkey that names the peer holding it."""

from __future__ import annotations

from hivemind.p2p import PeerID

from dht.identity import ensure_identity, make_validator, peer_id_of_subkey


def test_owner_subkey_names_the_peer_that_holds_the_key(tmp_path):
    path = ensure_identity(tmp_path / "id.key")
    validator = make_validator(path)
    assert peer_id_of_subkey(validator.local_public_key) == PeerID.from_identity(path.read_bytes()).to_base58()
    assert (path.stat().st_mode & 0o777) == 0o400
    for bad in [b"[owner:garbage]", b"plain", "text", None, 5]:
        assert peer_id_of_subkey(bad) is None
