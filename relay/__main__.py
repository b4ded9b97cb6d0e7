"""`python -m relay`: the optional coordinator of a swarm."""

from __future__ import annotations

import asyncio
import signal
import sys

from configs.loader import cli_options
from configs.schema import RelayOptions

EPILOG = """\
example:
  python -m relay --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/QmBootstrap... \\
      --models ./SmolLM2-135M --api-keys K1 --admin-token T
  python -m swarm.serve --model ./SmolLM2-135M --initial-peers ... --relay http://127.0.0.1:8000

ports: management 1026 (probes, /, instances), observability 1027 (/metrics, health page at /),
API 8000 (workers, jobs, OpenAI-compatible /v1/..., /openapi.json). Without --initial-peers the relay
starts a new swarm: servers join it through the DHT address it prints."""


async def serve(options: RelayOptions) -> int:
    # torch, transformers and hivemind only once the options are known to be good: --help and a bad flag answer at once.
    from relay.app import Relay
    from relay.store import StoreError

    relay = Relay(options)
    try:
        await relay.start()
    except (StoreError, OSError, ValueError) as e:
        print(f"relay: error: {e}", file=sys.stderr)
        await relay.stop()
        return 2
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # only now: the DHT's forked children keep default handlers
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if relay.generated_admin_token:
        print(
            "relay: generated admin token (shown once; pass --admin-token to choose one): "
            f"{relay.generated_admin_token}",
            flush=True,
        )
    if relay.generated_join_token:
        print(
            f"relay: generated join token for servers' --relay-join-token (shown once; pass --join-token to choose "
            f"one, or --open-registration to need none): {relay.generated_join_token}",
            flush=True,
        )
    if not options.api_keys:
        print(
            "relay: warning: no --api-keys given, so the jobs and OpenAI-compatible APIs refuse every request",
            file=sys.stderr,
            flush=True,
        )
    host = options.host
    print(f"relay: database {relay.store.describe()}", flush=True)
    print(f"relay: dht {' '.join(relay.dht.visible_maddrs()[:2])}", flush=True)
    print(
        f"relay ready: management http://{host}:{relay.ports['mgmt']}/, observability "
        f"http://{host}:{relay.ports['obs']}/metrics, api http://{host}:{relay.ports['api']}/v1 "
        f"(models: {', '.join(relay.services) or 'none'})",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await relay.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    options = cli_options(
        RelayOptions,
        "python -m relay",
        "Coordinate a swarm: workers, tokens, reliability, metrics, probes, jobs and an OpenAI-compatible API.",
        EPILOG,
        argv,
    )
    return asyncio.run(serve(options))


if __name__ == "__main__":
    sys.exit(main())
