"""An idle session resumed from Redis against replayed: the KV tier's point for live sessions.

Two one-server swarms hold every block with `--session-timeout` short: one with `--kv-redis` (a
redis-server this bench starts on loopback), one without. In turns, a client on each opens a session,
sends a `--prompt-tokens` prompt and takes one token, then stays idle past the timeout. With Redis the
server sends the session there whole (its pool slice freed) and the client takes it back on its next
step; without, the server drops it and the client replays the whole history. The figure is the time
of that next step, one token (resume against replay), with the output checked equal to the same
session never left idle. Also reported: the pool freed by the spill (the server's
`cpu_cache_usage_perc` (a CPU pool) while the session is live and once it is in Redis, in tokens and MiB), and the
hit rate (resumes that replayed nothing). Prints one JSON object. Example:
  .venv/bin/python bench/session_resume.py                # random Llama 512 × 8, 2 000-token sessions
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # threads stay awake within a step (harness/processes.py)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_flags, bench_model, bench_parser, work_folder  # noqa: E402
from blocks.checkpoint import Checkpoint  # noqa: E402
from client import AutoDistributedModelForCausalLM  # noqa: E402
from harness.local_swarm import LocalSwarm  # noqa: E402
from tests.helpers.metrics import scrape  # noqa: E402
from tests.helpers.redis_server import RedisServer  # noqa: E402

TIMEOUT = 2.0  # the servers' --session-timeout: idle longer, a session leaves the pool


def usage(server) -> float:
    """The server's KV pool in use, 0 to 1."""
    return next(iter(scrape(server.metrics_url, "cpu_cache_usage_perc").values()))


def idle_then_step(model, server, ids: torch.Tensor) -> dict:
    """One session: the prompt and a token, idle past the timeout, then one more token (timed)."""
    with model.inference_session(max_length=ids.shape[1] + 2) as session:
        model.generate(ids, max_new_tokens=1, session=session)
        live = usage(server)
        time.sleep(TIMEOUT + 1.5)
        idle = usage(server)
        start = time.perf_counter()
        output = model.generate(None, max_new_tokens=1, session=session)
        return {
            "seconds": time.perf_counter() - start,
            "output": output,
            "replayed": session.replayed_tokens,
            "freed": live - idle,
        }


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_flags(parser, hidden=512, layers=8, vocab=32000, positions=4096, choose=True)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model_path = bench_model(args, work_folder("session-resume-model"))
    checkpoint = Checkpoint(model_path)
    config, blocks = checkpoint.config, checkpoint.num_blocks
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_bytes_per_token = 2 * blocks * kv_heads * head_dim * 4  # float32
    tokens, cache_tokens = args.prompt_tokens, 4 * (args.prompt_tokens + 16)
    common = ["--session-timeout", str(TIMEOUT), "--cache-tokens", str(cache_tokens), "--no-prefix-cache"]
    times: dict[str, list[float]] = {"resume": [], "replay": []}
    replayed: dict[str, list[int]] = {"resume": [], "replay": []}
    freed: list[float] = []
    with (
        RedisServer() as store,
        LocalSwarm(model_path, [], workdir=work_folder("session-resume-redis")) as tiered,
        LocalSwarm(model_path, [], workdir=work_folder("session-resume-plain")) as plain,
    ):
        servers = {
            "resume": (tiered, tiered.add_server(0, blocks, *common, "--kv-redis", store.url)),
            "replay": (plain, plain.add_server(0, blocks, *common)),
        }
        models = {
            name: AutoDistributedModelForCausalLM.from_pretrained(
                model_path, swarm.initial_peers, verify=0, request_timeout=60
            )
            for name, (swarm, _) in servers.items()
        }
        try:
            for run in range(args.runs):
                ids = torch.randint(3, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(run))
                expected = models["replay"].generate(ids, max_new_tokens=2)  # never idle
                for name in ("resume", "replay") if run % 2 == 0 else ("replay", "resume"):
                    result = idle_then_step(models[name], servers[name][1], ids)
                    assert torch.equal(result["output"], expected), f"{name}: the output changed"
                    times[name].append(result["seconds"])
                    replayed[name].append(result["replayed"])
                    if name == "resume":
                        freed.append(result["freed"])
        finally:
            for model in models.values():
                model.shutdown()
    median = {name: statistics.median(values) for name, values in times.items()}
    freed_tokens = statistics.median(freed) * cache_tokens
    print(
        json.dumps(
            {
                "model": str(model_path),
                "session_tokens": tokens,
                "runs": args.runs,
                "next_token_after_idle_s": {name: round(value, 3) for name, value in median.items()},
                "resume_over_replay": round(median["resume"] / median["replay"], 3),
                "replayed_tokens": replayed,
                "hit_rate": sum(n == 0 for n in replayed["resume"]) / len(replayed["resume"]),
                "pool_freed_by_spilling": {
                    "tokens": round(freed_tokens),
                    "mib": round(freed_tokens * kv_bytes_per_token / 2**20, 1),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
