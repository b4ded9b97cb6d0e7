"""`python -m swarm.serve`: host a range of a model's blocks in a swarm."""

from __future__ import annotations

import asyncio
import sys

from blocks.errors import BlocksError
from configs.loader import cli_options
from configs.schema import ServerOptions
from discovery.mdns import MdnsUnavailable, lan_python
from swarm.preflight import check_model_and_blocks

EPILOG = """\
example:
  python -m swarm.serve --model ./SmolLM2-135M --blocks 0:15 \\
      --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/QmBootstrap...

The server announces its blocks in the DHT, serves inference sessions until SIGINT/SIGTERM,
then announces itself offline and exits 0."""


def main(argv: list[str] | None = None) -> int:
    options = cli_options(
        ServerOptions,
        "python -m swarm.serve",
        "Host transformer blocks [START:END) of a model and serve them to Swarm clients.",
        EPILOG,
        argv,
    )
    try:
        check_model_and_blocks(options)
        if options.mdns:
            lan_python()
    except (BlocksError, ValueError, OSError, MdnsUnavailable) as e:
        print(f"swarm.serve: error: {e}", file=sys.stderr)
        return 2
    from swarm.server import Server  # torch and hivemind: only once the options are known to be good

    try:
        server = Server(options)
    except (BlocksError, ValueError, OSError) as e:
        print(f"swarm.serve: error: {e}", file=sys.stderr)
        return 2
    asyncio.run(server.run())
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())
