"""`python -m bootstrap`: a long-lived DHT entry point with a stable identity.

Prints each full multiaddr (`/ip4/…/tcp/…/p2p/…`) on its own line on stdout as soon as it listens,
then runs until SIGINT/SIGTERM. Servers and clients pass one of these lines as `--initial-peers`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from configs.loader import cli_options
from configs.schema import BootstrapOptions

logger = logging.getLogger("bootstrap")

EPILOG = """\
example:
  python -m bootstrap --host 127.0.0.1 --port 31337 --identity bootstrap.key

The identity file is created on first start and keeps the peer id (and so the multiaddrs) stable
across restarts."""


def main(argv: list[str] | None = None) -> int:
    options = cli_options(BootstrapOptions, "python -m bootstrap", "Run a bootstrap node of a Swarm DHT.", EPILOG, argv)
    from discovery.mdns import MdnsUnavailable, lan_python

    try:
        if options.mdns:
            lan_python()
    except MdnsUnavailable as e:
        print(f"bootstrap: error: {e}", file=sys.stderr)
        return 2
    from dht.swarm_dht import public_announce, start_dht
    from discovery.presence import LanPresence  # hivemind: only once the options are known to be good

    lan = LanPresence(options.mdns)
    try:
        initial_peers = asyncio.run(lan.initial_peers(options.initial_peers))
        port, announce = public_announce(options.public_ip, options.host, options.port, options.announce_maddrs)
        dht, validator = start_dht(
            initial_peers,
            require_peers=not lan.found_at_start,
            host=options.host,
            port=port,
            identity_path=options.identity,
            nat_port_map=options.nat_port_map,
            announce_maddrs=announce,
        )
    except MdnsUnavailable as e:
        print(f"bootstrap: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"bootstrap: error: could not start the DHT node: {e}", file=sys.stderr)
        return 1
    addrs = [str(addr) for addr in dht.get_visible_maddrs()]  # hivemind answers this only outside an event loop
    try:
        asyncio.run(serve(dht, validator, options, addrs, lan))
    finally:
        dht.shutdown()
    return 0


async def serve(dht, validator, options: BootstrapOptions, addrs: list[str], lan) -> None:
    """Answers reachability checks and bridges for servers behind NAT (unless --no-bridge) until
    SIGINT/SIGTERM. (Signal handlers only now: the DHT's forked child keeps the default ones.)"""
    from bridge.node import BridgeLimits, BridgeNode, swarm_membership
    from dht.swarm_dht import SwarmDHT
    from protocol.messages import SWARM_RPCS

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    p2p = await dht.replicate_p2p()
    try:
        swarm_dht = SwarmDHT(dht, validator)
        prove = swarm_membership(swarm_dht, dht.peer_id.to_base58())
        await BridgeNode(p2p, SWARM_RPCS, prove, BridgeLimits.of(options), carry=not options.no_bridge).start()
        for addr in addrs:
            print(addr, flush=True)
        lan.announce(swarm_dht, reachable=True)
        logger.info(
            "bootstrap node %s is up%s; Ctrl-C to stop",
            dht.peer_id,
            "" if options.no_bridge else ", a bridge for servers behind NAT",
        )
        await stop.wait()
        logger.info("shutting down")
    finally:
        await lan.close()
        await p2p.shutdown()


if __name__ == "__main__":
    sys.exit(main())
