"""A real `swarm.serve` that cannot reach other servers to push to them, as if a firewall stood between
servers that clients can reach: every push stream fails to dial (at once, like a refused connection).
Everything else (sessions, steps, replies to clients) is the real server."""

import sys

import swarm.push as push_module
from swarm.serve import main


async def _unreachable(p2p, peer_id, *args, **kwargs):
    raise ConnectionRefusedError(f"cannot dial {peer_id} (link cut for the test)")


push_module.reach = _unreachable

if __name__ == "__main__":
    sys.exit(main())
