"""A real `swarm.serve` whose first stateless-forward stream loses its first message, as happens (rarely)
between two libp2p daemons: the stream stays open and nothing is answered on it. Every later stream
is served as usual."""

import sys

from swarm.handler import BlockHandler
from swarm.serve import main

_rpc_forward = BlockHandler.rpc_forward
_lost = [False]


async def _losing_rpc_forward(self, requests, context):
    if not _lost[0]:
        _lost[0] = True
        async for _ in requests:  # read and drop: the server never sees the request
            pass
        return
    async for reply in _rpc_forward(self, requests, context):
        yield reply


BlockHandler.rpc_forward = _losing_rpc_forward

if __name__ == "__main__":
    sys.exit(main())
