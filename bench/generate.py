"""Greedy decoding speed through a local swarm vs single-process transformers on the same model.

The swarm is measured with server-to-server push (the default) and without it, and with spot checks at
the default rate and off; single-process transformers is timed in turns with them, in the same
repeats, so that a slower minute of the machine hits every variant alike. The memory roofline
of a decode step is reported beside it: the bytes a step must read (every block's weights, the LM
head, the KV cache at the generation's middle position) over the bandwidth of a large copy measured
in the same run, and the share of it that the swarm's and the single process's steps reach.

Prints one JSON object. Examples:
  .venv/bin/python bench/generate.py                       # random Llama, ~220 M parameters, 2 servers
  .venv/bin/python bench/generate.py --model embedded      # SmolLM2-135M-Instruct, 3 servers
  .venv/bin/python bench/generate.py --layers 24 --servers 3 --dtype bfloat16
  .venv/bin/python bench/generate.py --servers 4 --link-delay-ms 25   # every server behind a 25 ms link, and without
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

# The client idles while servers compute on the same cores: its OpenMP threads must not spin (see harness/processes.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # threads stay awake within a step (harness/processes.py)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_model_flags,
    bench_model,
    bench_parser,
    memory_bandwidth,
    roofline,
    work_folder,
)
from blocks.checkpoint import Checkpoint, parse_dtype  # noqa: E402
from client import AutoDistributedModelForCausalLM, TokenClock  # noqa: E402
from harness.local_swarm import LocalSwarm, even_splits  # noqa: E402


def timed_generate(generate, ids, new_tokens: int) -> tuple[float, torch.Tensor, TokenClock]:
    clock = TokenClock()
    output = generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
    return time.perf_counter() - clock.started, output, clock


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_flags(
        parser, hidden=1024, layers=12, heads=16, intermediate=2816, vocab=32000, positions=4096, choose=True
    )
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument(
        "--link-delay-ms",
        type=float,
        default=0.0,
        help="one-way delay of every link to a server (a delay proxy in front of each); a second, "
        "undelayed swarm is measured in turns with it, for the extra time per token",
    )
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")
    torch.set_num_threads(args.threads)

    workdir = work_folder("generate")
    path = bench_model(args, workdir)
    dtype = parse_dtype(args.dtype)
    checkpoint = Checkpoint(path)
    ids = torch.randint(
        3, min(checkpoint.config.vocab_size, 30000), (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)
    )

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    reference.generation_config.eos_token_id = None  # always generate exactly --new-tokens tokens
    params = sum(p.numel() for p in reference.parameters())
    with torch.no_grad():
        reference.generate(ids, max_new_tokens=4, do_sample=False)
    local_runs = []

    splits = even_splits(checkpoint.num_blocks, args.servers)
    delays = [args.link_delay_ms, 0.0] if args.link_delay_ms > 0 else [0.0]
    runs: dict[tuple[float, bool], list[tuple[float, torch.Tensor]]] = {}
    with contextlib.ExitStack() as stack:
        models = {}
        for delay in delays:
            swarm = stack.enter_context(
                LocalSwarm(
                    path,
                    splits,
                    server_args=["--dtype", args.dtype, "--throughput", "1"],
                    workdir=workdir / f"swarm-{delay:g}ms",
                    env={"OMP_NUM_THREADS": str(args.threads)},
                    link_delay_ms=delay,
                )
            )
            for push in (True, False):
                model = stack.enter_context(
                    AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, dtype=dtype, push=push)
                )
                model.generation_config.eos_token_id = None
                model.generate(ids, max_new_tokens=4)
                models[delay, push] = model
            if delay == args.link_delay_ms:  # and with spot checks off
                model = stack.enter_context(
                    AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, dtype=dtype, verify=0)
                )
                model.generation_config.eos_token_id = None
                model.generate(ids, max_new_tokens=4)
                models["checks_off"] = model
        for _ in range(args.repeats):  # in turns, so that a slower minute of the machine hits every variant
            with torch.no_grad():
                local_runs.append(timed_generate(reference.generate, ids, args.new_tokens))
            for key, model in models.items():
                runs.setdefault(key, []).append(timed_generate(model.generate, ids, args.new_tokens))
    del reference
    local_time, local_output, _ = min(local_runs, key=lambda run: run[0])
    swarm_time, swarm_output, _ = min(runs[args.link_delay_ms, True], key=lambda run: run[0])
    star_time, star_output, _ = min(runs[args.link_delay_ms, False], key=lambda run: run[0])
    unchecked_time = min(run[0] for run in runs["checks_off"])

    local_rate = args.new_tokens / local_time
    swarm_rate = args.new_tokens / swarm_time
    bound = roofline(checkpoint, dtype, args.prompt_tokens + args.new_tokens // 2, memory_bandwidth())
    swarm_tpot = statistics.median(clock.time_per_output_token for _, _, clock in runs[args.link_delay_ms, True])
    local_tpot = statistics.median(clock.time_per_output_token for _, _, clock in local_runs)
    print(
        json.dumps(
            {
                "model": str(args.model if args.model != "random" else "random-llama"),
                "parameters_m": round(params / 1e6, 1),
                "layers": checkpoint.num_blocks,
                "hidden_size": checkpoint.hidden_size,
                "dtype": args.dtype,
                "servers": len(splits),
                "split": [f"{a}:{b}" for a, b in splits],
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "threads_per_process": args.threads,
                "link_delay_ms": args.link_delay_ms,
                "swarm_ms_per_token": round(1000 * swarm_time / args.new_tokens, 1),
                "swarm_without_push_ms_per_token": round(1000 * star_time / args.new_tokens, 1),
                "swarm_without_push_tokens_per_s": round(args.new_tokens / star_time, 2),
                "single_process_tokens_per_s": round(local_rate, 2),
                "swarm_tokens_per_s": round(swarm_rate, 2),
                "ratio": round(swarm_rate / local_rate, 3),
                "swarm_checks_off_tokens_per_s": round(args.new_tokens / unchecked_time, 2),
                "ratio_checks_off": round(local_time / unchecked_time, 3),
                **bound,
                # the share of the roofline a step reaches: far below 1 is overhead above the bytes read
                "swarm_roofline_fraction": round(bound["roofline_ms_per_output_token"] / (1000 * swarm_tpot), 3),
                "single_process_roofline_fraction": round(
                    bound["roofline_ms_per_output_token"] / (1000 * local_tpot), 3
                ),
                "identical_output": all(
                    torch.equal(local_output, output) for variant in runs.values() for _, output, _ in variant
                ),
                **(extra_per_token(runs, args) if args.link_delay_ms > 0 else {}),
            }
        )
    )


def extra_per_token(runs: dict, args) -> dict:
    """What the links add to a token, with push and without: the median over repeats of (delayed minus
    undelayed time per output token after the first, measured back to back), and its share of the
    2·S·delay that a star (client → server → client for every server) would add. The first token
    (the sessions' opening and the prompt) is reported apart."""
    star_legs_ms = 2 * args.servers * args.link_delay_ms
    report = {}
    for push, name in ((True, "push"), (False, "without_push")):
        delayed, undelayed = runs[args.link_delay_ms, push], runs[0.0, push]
        extras = [
            1000 * (slow.time_per_output_token - fast.time_per_output_token)
            for (_, _, slow), (_, _, fast) in zip(delayed, undelayed)
        ]
        whole = [1000 * (slow - fast) / args.new_tokens for (slow, _, _), (fast, _, _) in zip(delayed, undelayed)]
        for label, variant in (("delayed", delayed), ("undelayed", undelayed)):
            report[f"{label}_{name}_ms_per_output_token"] = round(
                1000 * statistics.median(clock.time_per_output_token for _, _, clock in variant), 1
            )
            report[f"{label}_{name}_first_token_ms"] = round(
                1000 * statistics.median(clock.times[0] - clock.started for _, _, clock in variant), 1
            )
        report[f"extra_{name}_ms_per_output_token"] = round(statistics.median(extras), 1)
        report[f"extra_{name}_ms_per_output_token_each_repeat"] = [round(extra, 1) for extra in extras]
        report[f"extra_{name}_over_2_s_delay"] = round(statistics.median(extras) / star_legs_ms, 3)
        # the same over whole generations (opening, prompt and every token, divided by --new-tokens)
        report[f"extra_{name}_whole_generation_over_2_s_delay"] = round(statistics.median(whole) / star_legs_ms, 3)
    return report


if __name__ == "__main__":
    main()
