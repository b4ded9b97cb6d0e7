"""Failover cost: time from a server's death to the next token, and decode speed with and without it.

A 3-server chain (plus one slow spare that covers every block) generates greedily; in each timed run
the middle server of the chain is SIGKILLed (with its DHT and libp2p daemons) halfway through, then
restarted for the next run. Prints one JSON object. Example:
  .venv/bin/python bench/failover.py --runs 5
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/generate.py
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # threads stay awake within a step (harness/processes.py)

import torch  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_flags, bench_model, bench_parser, work_folder  # noqa: E402
from client import AutoDistributedModelForCausalLM  # noqa: E402
from harness.local_swarm import LocalSwarm, even_splits  # noqa: E402


class Clock(BaseStreamer):
    """Timestamps every new token; runs `action` right after the n-th."""

    def __init__(self, n: int, action=None):
        self.n, self.action, self.times = n, action, []
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if self.action and len(self.times) == self.n:
            self.killed_at = time.perf_counter()
            self.action()

    def end(self):
        pass


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_flags(parser, hidden=512, layers=12, vocab=8000)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--request-timeout", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level="ERROR")
    workdir = work_folder("failover")
    path = bench_model(args, workdir)
    splits = even_splits(args.layers, 3)
    ids = torch.randint(3, args.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    kill_at = args.new_tokens // 2
    recoveries, with_failure, without_failure, identical = [], [], [], True
    with LocalSwarm(path, splits, server_args=["--throughput", "100"], workdir=workdir / "swarm") as swarm:
        swarm.add_server(0, args.layers, "--throughput", "1")  # a slow spare: never chosen while the chain is up
        with AutoDistributedModelForCausalLM.from_pretrained(
            path, swarm.initial_peers, request_timeout=args.request_timeout
        ) as model:
            model.generation_config.eos_token_id = None
            reference = model.generate(ids, max_new_tokens=args.new_tokens)
            for _ in range(args.runs):
                clock = Clock(kill_at)
                started = time.perf_counter()
                model.generate(ids, max_new_tokens=args.new_tokens, streamer=clock)
                without_failure.append(args.new_tokens / (time.perf_counter() - started))

                with model.inference_session(max_length=ids.shape[1] + args.new_tokens) as session:
                    victim = {}

                    def kill():
                        peer, start, end = session.chain[1]
                        victim.update(start=start, end=end)
                        swarm.server(peer).kill()

                    clock = Clock(kill_at, kill)
                    started = time.perf_counter()
                    output = model.generate(ids, max_new_tokens=args.new_tokens, session=session, streamer=clock)
                    with_failure.append(args.new_tokens / (time.perf_counter() - started))
                    recoveries.append(clock.times[kill_at] - clock.killed_at)
                    identical &= bool(torch.equal(output, reference))
                swarm.add_server(victim["start"], victim["end"], "--throughput", "100")
                model.remote.bans = type(model.remote.bans)()  # the restarted server has a new peer id anyway
    normal_step = statistics.median(1 / rate for rate in without_failure)
    print(
        json.dumps(
            {
                "model": f"random-llama hidden {args.hidden}, {args.layers} layers",
                "chain": [f"{a}:{b}" for a, b in splits],
                "runs": args.runs,
                "new_tokens": args.new_tokens,
                "killed_after_token": kill_at,
                "death_to_next_token_s_median": round(statistics.median(recoveries), 4),
                "death_to_next_token_s_all": [round(r, 4) for r in recoveries],
                "normal_step_s_median": round(normal_step, 4),
                "tokens_per_s_without_failure": round(statistics.median(without_failure), 2),
                "tokens_per_s_with_failure": round(statistics.median(with_failure), 2),
                "identical_output": identical,
            }
        )
    )


if __name__ == "__main__":
    main()
