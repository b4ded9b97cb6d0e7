"""Chaos: servers are SIGKILLed (and replaced) and SIGSTOPped (and resumed) at random while clients
generate in a loop; every generation must end token-identical to single-process transformers or with
a typed error, and none may hang. Prints one JSON object (sessions run, identical, typed errors by
type, wrong tokens, longest generation, faults injected). Example:
  .venv/bin/python bench/chaos.py --duration 120 --clients 4
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/generate.py
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # threads stay awake within a step (harness/processes.py)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_flags, bench_model, bench_parser, work_folder  # noqa: E402
from harness.chaos import run_chaos  # noqa: E402
from harness.local_swarm import even_splits  # noqa: E402


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_flags(parser, hidden=256, layers=8, vocab=4000)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of chaos")
    parser.add_argument("--clients", type=int, default=4, help="client generation loops")
    parser.add_argument("--ranges", type=int, default=2, help="block ranges of the model")
    parser.add_argument("--servers-per-range", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument(
        "--request-timeout", type=float, default=5.0, help="how long a client waits for a stopped server"
    )
    parser.add_argument("--step-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level="ERROR")
    workdir = work_folder("chaos")
    path = bench_model(args, workdir)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(args.seed)
    cases = []
    for _ in range(8):
        ids = torch.randint(
            3, args.vocab, (1, int(torch.randint(4, 24, (1,), generator=generator))), generator=generator
        )
        with torch.no_grad():
            cases.append((ids, reference.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)))
    splits = [span for span in even_splits(args.layers, args.ranges) for _ in range(args.servers_per_range)]
    started = time.monotonic()
    report = run_chaos(
        path,
        splits,
        cases,
        workdir / "swarm",
        duration=args.duration,
        clients=args.clients,
        max_new_tokens=args.new_tokens,
        request_timeout=args.request_timeout,
        step_timeout=args.step_timeout,
        seed=args.seed,
    )
    print(
        json.dumps(
            {
                "duration_s": args.duration,
                "wall_s": round(time.monotonic() - started, 1),
                "clients": args.clients,
                "servers": len(splits),
                "layers": args.layers,
                "hidden": args.hidden,
                **report.as_dict(),
            }
        )
    )


if __name__ == "__main__":
    main()
