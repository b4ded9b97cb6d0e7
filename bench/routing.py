"""Time to choose a chain over a big swarm: synthetic records of N servers over a B-block model.

Each server announces a random range (4 to 16 blocks), throughput and round trip. The bench times
arranging one DHT read's records (`RouteIndex`, once per read), then `make_chain` over them for the
whole model and for one replacement span (a server of the chain excluded, its blocks routed again),
as a client does on failover, with every server's round trip known. Prints one JSON object. Example:
  .venv/bin/python bench/routing.py --servers 10000 --blocks 80
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.routing import RouteIndex, make_chain  # noqa: E402
from dht.records import ServerInfo, ServerRecord  # noqa: E402


def synthetic_swarm(
    num_servers: int, num_blocks: int, seed: int
) -> tuple[list[dict[str, ServerInfo]], dict[str, float]]:
    rng = random.Random(seed)
    blocks: list[dict[str, ServerInfo]] = [{} for _ in range(num_blocks)]
    rtts = {}
    for index in range(num_servers):
        length = rng.randint(4, 16)
        start = rng.randrange(0, num_blocks - length + 1)
        peer = f"peer{index:05d}"
        throughput = rng.uniform(5, 200)
        record = ServerRecord(
            state="online",
            start_block=start,
            end_block=start + length,
            throughput={"inference": throughput, "forward": throughput * 10},
            cache_tokens_free=rng.choice([0, 4096, 16384]),
            cache_tokens_total=16384,
            max_length=4096,
            dtype="bfloat16",
            hardware={"device_type": "cuda", "device_name": "gpu", "memory_total": 1, "memory_free": 1},
            version="bench",
            addrs=(f"/ip4/10.0.0.1/tcp/{1000 + index}/p2p/{peer}",),
        )
        info = ServerInfo(peer_id=peer, record=record, expiration_time=0)
        for block in range(start, start + length):
            blocks[block][peer] = info
        rtts[peer] = rng.uniform(0.005, 0.2)
    return blocks, rtts


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=10000)
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    blocks, rtts = synthetic_swarm(args.servers, args.blocks, args.seed)
    rng = random.Random(args.seed)
    index_ms = timed(lambda: RouteIndex(blocks), max(1, args.repeats // 5))
    index = RouteIndex(blocks)
    chain = make_chain("bench", index, rtts=rtts, rng=rng)
    full = timed(lambda: make_chain("bench", index, rtts=rtts, rng=rng), args.repeats)
    middle = chain[len(chain) // 2]
    replacement = timed(
        lambda: make_chain("bench", index, middle.start, middle.end, exclude={middle.peer_id}, rtts=rtts, rng=rng),
        args.repeats,
    )
    per_block = [len(servers) for servers in blocks]
    print(
        json.dumps(
            {
                "servers": args.servers,
                "blocks": args.blocks,
                "servers_per_block_median": statistics.median(per_block),
                "records": len(index.infos),
                "index_ms_p50": round(statistics.median(index_ms), 2),
                "chain_spans": len(chain),
                "full_chain_ms_p50": round(statistics.median(full), 2),
                "full_chain_ms_p99": round(percentile(full, 0.99), 2),
                "replacement_span_blocks": middle.end - middle.start,
                "replacement_ms_p50": round(statistics.median(replacement), 2),
                "replacement_ms_p99": round(percentile(replacement, 0.99), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
