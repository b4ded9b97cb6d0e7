"""Starting a DHT node (a real hivemind DHT on loopback)."""

from __future__ import annotations

import tempfile

from hivemind.p2p import PeerID

from dht.identity import peer_id_of_subkey
from dht.swarm_dht import start_dht


def test_a_throwaway_identity_leaves_no_key_on_disk(tmp_path, monkeypatch):
    """A node started without an identity file runs on a fresh key whose temp file is gone once it has
    started: private keys of every client and test run must not pile up in the temp folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dht, validator = start_dht(require_peers=False)
    try:
        assert list(tmp_path.glob("swarm-identity-*")) == []
        assert dht.is_alive()
        assert peer_id_of_subkey(validator.local_public_key) == dht.peer_id.to_base58()
        second, _ = start_dht([str(addr) for addr in dht.get_visible_maddrs()], client_mode=True)
        try:
            assert second.peer_id != dht.peer_id and isinstance(second.peer_id, PeerID)
            assert list(tmp_path.glob("swarm-identity-*")) == []
        finally:
            second.shutdown()
    finally:
        dht.shutdown()


def test_a_given_identity_stays_where_it_is(tmp_path):
    path = tmp_path / "node.key"
    dht, _ = start_dht(identity_path=str(path), require_peers=False)
    try:
        assert path.exists()
        peer_id = dht.peer_id
    finally:
        dht.shutdown()
    again, _ = start_dht(identity_path=str(path), require_peers=False)
    try:
        assert again.peer_id == peer_id  # the same key, the same peer
    finally:
        again.shutdown()
