"""The prefix cache's Redis tier: a long prompt taken back from Redis against computed again.

One server holds every block with `--kv-redis` (a redis-server this bench starts on loopback) and a
prefix cache of `--prompt-tokens` tokens. A client sends prompt A cold, then prompt B (whose pages
push A's out of the pool, to Redis), then A again: its pages come back from Redis. Each time it
generates one token; the figure is the time to that first token (TTFT: opening the session and the
prompt), and the ratio of A from Redis to A cold, with A from the pool beside it. Outputs are checked
equal cold and warm. Prints one JSON object. Example:
  .venv/bin/python bench/kv_tier.py                       # random Llama 512 × 8, 2 000-token prompts
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # threads stay awake within a step (harness/processes.py)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_flags, bench_model, bench_parser, work_folder  # noqa: E402
from blocks.checkpoint import Checkpoint  # noqa: E402
from client import AutoDistributedModelForCausalLM, TokenClock  # noqa: E402
from harness.local_swarm import LocalSwarm  # noqa: E402
from tests.helpers.redis_server import RedisServer  # noqa: E402


def first_token(model, ids: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """(TTFT in seconds, prompt tokens the servers started from, the output)."""
    clock = TokenClock()
    with model.inference_session(max_length=ids.shape[1] + 1) as session:
        output = model.generate(ids, max_new_tokens=1, session=session, streamer=clock)
        return clock.time_to_first_token, session.cached_tokens, output


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_flags(parser, hidden=512, layers=8, vocab=32000, positions=4096, choose=True)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model_path = bench_model(args, work_folder("kv-tier-model"))
    vocab, blocks = Checkpoint(model_path).config.vocab_size, Checkpoint(model_path).num_blocks
    tokens = args.prompt_tokens
    rounds: dict[str, list[float]] = {"cold": [], "pool": [], "redis": []}
    reused: dict[str, list[int]] = {"pool": [], "redis": []}
    with RedisServer() as store, LocalSwarm(model_path, [], workdir=work_folder("kv-tier")) as swarm:
        cache = str(2 * (tokens + 16))
        swarm.add_server(
            0, blocks, "--kv-redis", store.url, "--prefix-cache-tokens", str(tokens), "--cache-tokens", cache
        )
        with AutoDistributedModelForCausalLM.from_pretrained(model_path, swarm.initial_peers, verify=0) as model:
            for run in range(args.runs):
                a, b = (
                    torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(10 * run + i))
                    for i in range(2)
                )
                cold, _, expected = first_token(model, a)
                pool, from_pool, same = first_token(model, a)
                assert torch.equal(same, expected)
                first_token(model, b)  # A's pages leave the pool for Redis
                redis, from_redis, again = first_token(model, a)
                assert torch.equal(again, expected)
                rounds["cold"].append(cold)
                rounds["pool"].append(pool)
                rounds["redis"].append(redis)
                reused["pool"].append(from_pool)
                reused["redis"].append(from_redis)
    median = {name: statistics.median(values) for name, values in rounds.items()}
    print(
        json.dumps(
            {
                "model": str(model_path),
                "prompt_tokens": tokens,
                "runs": args.runs,
                "ttft_s": {name: round(value, 3) for name, value in median.items()},
                "redis_over_cold": round(median["redis"] / median["cold"], 3),
                "pool_over_cold": round(median["pool"] / median["cold"], 3),
                "tokens_reused_from_pool": reused["pool"],
                "tokens_reused_from_redis": reused["redis"],
                "pool_tokens_freed_by_spilling": tokens - tokens % 16,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
