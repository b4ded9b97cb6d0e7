"""An honest client's decode speed while a greedy peer hammers the same server, against the same client
alone, timed in turns in the same run.

The greedy peer (another client process's worth: its own peer id) opens sessions of the server's
longest length until it is refused, holds them idle, and keeps asking for more (`--greedy-rate` a
second) for the rest of the turn. Per-peer limits (`--max-sessions-per-peer`,
`--max-cache-share-per-peer`, …) keep the rest of the server for others: without them the honest
client would find no room at all. Bounded: `--turns` turns of `--new-tokens` tokens each. Prints one
JSON object; the ratio to watch is `honest_with_greedy_over_alone` (the goal: ≥ 0.8). Example:
  .venv/bin/python bench/greedy_peer.py --turns 3
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

from bench.common import add_model_flags, bench_model, bench_parser, work_folder  # noqa: E402
from client import AutoDistributedModelForCausalLM, SwarmBusyError  # noqa: E402
from harness.local_swarm import LocalSwarm  # noqa: E402


class Greedy(threading.Thread):
    """Holds every session the server lets it open and keeps asking, until `stop` is set."""

    def __init__(self, model, ids: torch.Tensor, max_length: int, rate: float):
        super().__init__(daemon=True)
        self.model, self.ids, self.max_length, self.rate = model, ids, max_length, rate
        self.stop = threading.Event()
        self.held, self.refused, self.requests = [], 0, 0

    def run(self) -> None:
        while not self.stop.is_set():
            session = self.model.inference_session(max_length=self.max_length)
            self.requests += 1
            try:
                self.model.generate(self.ids, max_new_tokens=1, session=session)
                self.held.append(session)  # held open, idle
            except SwarmBusyError:
                session.close()
                self.refused += 1
                self.stop.wait(1 / self.rate)
        for session in self.held:
            session.close()


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_flags(parser, hidden=512, layers=8, vocab=8000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--cache-tokens", type=int, default=2048, help="the server's --cache-tokens (default 2048)")
    parser.add_argument("--max-length", type=int, default=256, help="the server's --max-length (default 256)")
    parser.add_argument(
        "--greedy-rate",
        type=float,
        default=20.0,
        help="new sessions the greedy peer asks for per second once refused (default 20; it runs in this "
        "process, so a faster loop would measure this machine's CPU, not the server)",
    )
    args = parser.parse_args()
    logging.basicConfig(level="ERROR")
    workdir = work_folder("greedy-peer")
    path = bench_model(args, workdir)
    ids = torch.randint(3, args.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    server_args = ["--cache-tokens", str(args.cache_tokens), "--max-length", str(args.max_length)]
    alone, hammered, greedy_held, greedy_refused = [], [], [], []
    with LocalSwarm(path, [(0, args.layers)], server_args=server_args, workdir=workdir / "swarm") as swarm:
        with (
            AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers) as honest,
            AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers) as greedy_model,
        ):
            honest.generation_config.eos_token_id = None
            honest.generate(ids, max_new_tokens=2)  # warm-up
            for _ in range(args.turns):
                started = time.perf_counter()
                honest.generate(ids, max_new_tokens=args.new_tokens)
                alone.append(args.new_tokens / (time.perf_counter() - started))

                greedy = Greedy(greedy_model, ids, args.max_length, args.greedy_rate)
                greedy.start()
                while greedy.refused == 0 and greedy.is_alive():  # until it holds all it may
                    time.sleep(0.05)
                started = time.perf_counter()
                honest.generate(ids, max_new_tokens=args.new_tokens)
                hammered.append(args.new_tokens / (time.perf_counter() - started))
                greedy.stop.set()
                greedy.join(60)
                greedy_held.append(len(greedy.held))
                greedy_refused.append(greedy.refused)
    print(
        json.dumps(
            {
                "model": f"random-llama hidden {args.hidden}, {args.layers} layers",
                "server": {"cache_tokens": args.cache_tokens, "max_length": args.max_length},
                "turns": args.turns,
                "new_tokens": args.new_tokens,
                "honest_alone_tokens_per_s": round(statistics.median(alone), 2),
                "honest_with_greedy_tokens_per_s": round(statistics.median(hammered), 2),
                "honest_with_greedy_over_alone": round(statistics.median(hammered) / statistics.median(alone), 3),
                "greedy_sessions_held": greedy_held,
                "greedy_requests_refused": greedy_refused,
            }
        )
    )


if __name__ == "__main__":
    main()
