"""`python -m relay.health`: the swarm's public health page, built from a crawl of the DHT.

Needs no relay registration: any peer address of the swarm is enough.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from configs.loader import cli_options
from configs.schema import HealthOptions

EPILOG = """\
example:
  python -m relay.health --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/QmBootstrap... --port 8080
then open http://127.0.0.1:8080/ (HTML) or http://127.0.0.1:8080/api/v1/state (JSON)."""


async def serve(options: HealthOptions) -> None:
    # hivemind and aiohttp only once the options are known to be good: --help and a bad flag answer at once.
    from aiohttp import web

    from dht.swarm_dht import SwarmDHT, start_dht
    from relay.health.app import make_app
    from relay.health.crawler import Crawler

    dht, validator = start_dht(
        options.initial_peers, host=options.host, client_mode=True, nat_port_map=options.nat_port_map
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # only now: the DHT's forked child keeps default handlers
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    p2p = await dht.replicate_p2p()
    runner = web.AppRunner(make_app(Crawler(SwarmDHT(dht, validator), p2p, options.refresh_period)))
    try:
        await runner.setup()
        site = web.TCPSite(runner, options.host, options.port)
        await site.start()
        port = runner.addresses[0][1]  # the port bound (0 asks for a free one)
        print(f"relay.health serving http://{options.host}:{port}/", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        await p2p.shutdown()
        dht.shutdown()


def main(argv: list[str] | None = None) -> int:
    options = cli_options(HealthOptions, "python -m relay.health", "Serve the swarm's health page.", EPILOG, argv)
    asyncio.run(serve(options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
