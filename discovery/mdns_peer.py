"""The py-libp2p side of LAN discovery, run as its own process by `discovery.mdns.LanDiscovery`.

py-libp2p cannot share a process (nor an environment: it needs protobuf < 7) with hivemind, so this
script runs under the Python of its own environment (`.venv-lan`, made by scripts/install.sh) and
imports nothing of Swarm. It browses the LAN with libp2p's mDNS discovery (`_p2p._udp.local`, TXT
`dnsaddr=` records, as go-libp2p and rust-libp2p do) and talks to its parent in JSON lines:

    stdin:  {"advertise": ["/ip4/192.168.1.5/tcp/31337/p2p/Qm..."]}   announce these addresses
    stdout: {"ready": true}                                            browsing
            {"peer_id": "Qm...", "addrs": ["/ip4/192.168.1.7/tcp/4001"]}  a peer was found

It exits when its standard input closes (its parent is gone), withdrawing what it announced.
"""

from __future__ import annotations

import json
import logging
import sys
import threading

import trio
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.discovery.mdns import MDNSDiscovery
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore

MAX_LINE = 64 * 1024  # a command longer than this is not one the parent writes
_write = threading.Lock()


def _say(message: dict) -> None:
    with _write:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


class _Node:
    """What MDNSDiscovery asks of a libp2p swarm: a peer id and a peer store. Browsing needs no
    host: this process never dials anyone; its parent's DHT does."""

    def __init__(self, peer_id: ID):
        self.peer_id = peer_id
        self.peerstore = PeerStore()

    def get_peer_id(self) -> ID:
        return self.peer_id


def _found(info) -> None:
    _say({"peer_id": info.peer_id.to_base58(), "addrs": [str(addr) for addr in info.addrs]})


async def main() -> None:
    # A throwaway id names this browser's own service; the addresses announced carry the parent's id.
    node = _Node(ID(b"\x00\x24" + bytes(range(36))))
    peerDiscovery.register_peer_discovered_handler(_found)
    mdns = MDNSDiscovery(node)
    started = False
    _say({"ready": True})
    try:
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                return
            try:
                command = json.loads(line[:MAX_LINE])
                addrs = [str(a) for a in command["advertise"]][:16]
            except (ValueError, KeyError, TypeError):
                continue
            ids = {addr.rsplit("/p2p/", 1)[-1] for addr in addrs}
            if not started and addrs and len(ids) == 1 and all("/p2p/" in addr for addr in addrs):
                # The records name the parent's peer id (the DHT node others dial), not this browser's.
                mdns.broadcaster.peer_id = ID.from_base58(ids.pop()).to_base58()
                mdns.broadcaster.listen_addrs = addrs
                mdns.start()
                started = True
    finally:
        mdns.stop() if started else (mdns.listener.stop(), mdns.zeroconf.close())


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)  # py-libp2p warns a lot about nothing
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
