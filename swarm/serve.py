"""`python -m swarm.serve`: host a range of a model's blocks in a swarm."""

from __future__ import annotations

import asyncio
import logging
import sys

from blocks.errors import BlocksError
from configs.loader import ConfigError, build_parser, load_config
from configs.schema import ServerOptions
from swarm.server import Server

EPILOG = """\
example:
  python -m swarm.serve --model ./SmolLM2-135M --blocks 0:15 \\
      --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/QmBootstrap...

The server announces its blocks in the DHT, serves inference sessions until SIGINT/SIGTERM,
then announces itself offline and exits 0."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        ServerOptions,
        prog="python -m swarm.serve",
        description="Host transformer blocks [START:END) of a model and serve them to Swarm clients.",
        epilog=EPILOG,
    )
    try:
        options = load_config(ServerOptions, parser, argv)
    except ConfigError as e:
        parser.error(str(e))
    configure_logging(options.log_level)
    try:
        server = Server(options)
    except (BlocksError, ValueError, OSError) as e:
        print(f"swarm.serve: error: {e}", file=sys.stderr)
        return 2
    asyncio.run(server.run())
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


if __name__ == "__main__":
    sys.exit(main())
