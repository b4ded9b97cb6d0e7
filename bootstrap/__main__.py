"""`python -m bootstrap`: a long-lived DHT entry point with a stable identity.

Prints each full multiaddr (`/ip4/…/tcp/…/p2p/…`) on its own line on stdout as soon as it listens,
then runs until SIGINT/SIGTERM. Servers and clients pass one of these lines as `--initial-peers`.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

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
    from dht.swarm_dht import start_dht  # hivemind: only once the options are known to be good

    try:
        dht, _ = start_dht(
            options.initial_peers,
            host=options.host,
            port=options.port,
            identity_path=options.identity,
            nat_port_map=options.nat_port_map,
            announce_maddrs=options.announce_maddrs,
        )
    except Exception as e:
        print(f"bootstrap: error: could not start the DHT node: {e}", file=sys.stderr)
        return 1
    # Installed only now: the DHT's forked child must keep the default handlers so that it can be stopped.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    for addr in dht.get_visible_maddrs():
        print(addr, flush=True)
    logger.info("bootstrap node %s is up; Ctrl-C to stop", dht.peer_id)
    stop.wait()
    logger.info("shutting down")
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
