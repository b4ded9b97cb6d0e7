"""Decode steps of one session while another session of the same process sends long prefills to the
same server, against the same decode steps alone, timed in turns in the same run.

The model is built so that moving a prefill costs far more than computing it: a random Llama of
hidden size 4096 (a 2 048-token bfloat16 prefill is 16 MiB each way) with one block of tiny attention
and MLP. What is left of a prefill is then hashing, checking, converting and (de)serializing its
megabytes, on the server and in the client: done on an event loop, it would hold up every other
session's replies there for as long. Bounded: `--turns` turns of `--steps` decode steps each. Prints
one JSON object; the figures to watch are `p99_with_prefill_over_alone` and `max_with_prefill_ms`
against `prefill_seconds` (a step held up by a whole prefill would take about that long). Example:
  .venv/bin/python bench/prefill_stall.py --turns 3
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/generate.py
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # threads stay awake within a step (harness/processes.py)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser, work_folder  # noqa: E402
from blocks.synthetic import make_random_checkpoint  # noqa: E402
from client import AutoDistributedModelForCausalLM  # noqa: E402
from harness.local_swarm import LocalSwarm  # noqa: E402


class Prefiller(threading.Thread):
    """Sends `tokens`-long prefills, each in a new session, until `stop` is set."""

    def __init__(self, model, tokens: int, hidden: int):
        super().__init__(daemon=True)
        self.model, self.tokens = model, tokens
        self.inputs = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(1))
        self.stop = threading.Event()
        self.seconds: list[float] = []

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            with self.model.inference_session(max_length=self.tokens) as session:
                session.step(self.inputs)
            self.seconds.append(time.perf_counter() - started)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def decode_steps(session, steps: int, hidden: int) -> list[float]:
    """Milliseconds of each of `steps` one-token steps."""
    times = []
    for _ in range(steps):
        step = torch.randn(1, 1, hidden)
        started = time.perf_counter()
        session.step(step)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (default 4096)")
    parser.add_argument("--prefill-tokens", type=int, default=2048, help="tokens of each prefill (default 2048)")
    parser.add_argument("--steps", type=int, default=60, help="decode steps per turn and phase (default 60)")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", help="the server's --dtype (default bfloat16)")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=2048,
        help="the server's --max-batch-tokens (default 2048): a decode step may wait for one round of a "
        "prefill's compute, as many tokens as this",
    )
    args = parser.parse_args()
    logging.basicConfig(level="ERROR")
    workdir = work_folder("prefill-stall")
    path = make_random_checkpoint(
        workdir / "model",
        "llama",
        hidden_size=args.hidden,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        vocab_size=256,
        max_position_embeddings=max(4096, args.prefill_tokens),
        head_dim=16,
    )
    element = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    alone, during, prefills = [], [], []
    server_args = ["--dtype", args.dtype, "--max-batch-tokens", str(args.max_batch_tokens)]
    with LocalSwarm(path, [(0, 1)], server_args=server_args, workdir=workdir / "swarm") as swarm:
        with (
            AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, verify=0) as model,
            model.inference_session(max_length=2 * args.turns * args.steps + 1) as session,
        ):
            decode_steps(session, 1, args.hidden)  # opens the session
            for _ in range(args.turns):
                alone += decode_steps(session, args.steps, args.hidden)
                prefiller = Prefiller(model, args.prefill_tokens, args.hidden)
                prefiller.start()
                while not prefiller.seconds:  # the first one pays for opening streams
                    time.sleep(0.01)
                during += decode_steps(session, args.steps, args.hidden)
                prefiller.stop.set()
                prefiller.join(300)
                prefills += prefiller.seconds[1:]
    print(
        json.dumps(
            {
                "model": f"random-llama hidden {args.hidden}, 1 block of 2 heads × 16 and MLP 64, {args.dtype}",
                "prefill_tokens": args.prefill_tokens,
                "prefill_mbytes_each_way": round(args.prefill_tokens * args.hidden * element / 2**20, 1),
                "server_max_batch_tokens": args.max_batch_tokens,
                "turns": args.turns,
                "prefills_during_decode": len(prefills),
                "prefill_seconds": round(statistics.median(prefills), 3) if prefills else None,
                "decode_ms_alone": {
                    "p50": round(statistics.median(alone), 2),
                    "p99": round(percentile(alone, 0.99), 2),
                    "max": round(max(alone), 2),
                },
                "decode_ms_with_prefill": {
                    "p50": round(statistics.median(during), 2),
                    "p99": round(percentile(during, 0.99), 2),
                    "max": round(max(during), 2),
                },
                "p99_with_prefill_over_alone": round(percentile(during, 0.99) / percentile(alone, 0.99), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
