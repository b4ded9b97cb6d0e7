"""What spot checks cost and what they catch, on a local swarm of a random Llama.

Three parts, each with fresh clients:
- cost: tokens/s of one session with checks at the default rate against checks off (two clients
  timed in turns, medians), through a chain where every span has a second server to check it;
- detection: a server that is always wrong, and one wrong on 5 % of steps, announce the whole model
  faster than anyone (every chain starts with them); tokens generated until each is proven wrong,
  over --runs clients (median and worst), and whether every output still equals `transformers`;
- false positives: honest float32 and bfloat16 servers of the same blocks checking each other at
  every step (verify=1) over --honest-runs generations; disputes and convictions counted.

Prints one JSON object. Example:
  .venv/bin/python bench/verify.py --runs 10
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
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_flags, bench_model, bench_parser, work_folder  # noqa: E402
from client import AutoDistributedModelForCausalLM  # noqa: E402
from configs.schema import DEFAULT_VERIFY_RATE  # noqa: E402
from harness.local_swarm import LocalSwarm  # noqa: E402


class Counter(BaseStreamer):
    def __init__(self):
        self.puts = 0

    def put(self, value) -> None:
        self.puts += 1

    def end(self) -> None:
        pass


def prompt(seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (1, 8 + seed % 9), generator=torch.Generator().manual_seed(seed))


def cost(path, peers, rate: float, ids, new_tokens: int, repeats: int) -> dict:
    """Tokens/s of one session with checks off and at `rate`, two clients timed in turns (the median
    of `repeats` each), so that both see the same machine."""
    times: dict[float, list[float]] = {0.0: [], rate: []}
    with (
        AutoDistributedModelForCausalLM.from_pretrained(path, peers, verify=0.0) as off,
        AutoDistributedModelForCausalLM.from_pretrained(path, peers, verify=rate) as on,
    ):
        for model in (off, on):
            model.generation_config.eos_token_id = None
            model.generate(ids, max_new_tokens=4)
        for _ in range(repeats):
            for verify, model in ((0.0, off), (rate, on)):
                started = time.perf_counter()
                model.generate(ids, max_new_tokens=new_tokens)
                times[verify].append(time.perf_counter() - started)
    off_rate, on_rate = (new_tokens / statistics.median(times[verify]) for verify in (0.0, rate))
    return {
        "tokens_per_s_off": round(off_rate, 2),
        "tokens_per_s_default_rate": round(on_rate, 2),
        "slowdown": round(1 - on_rate / off_rate, 3),
    }


def detection(path, swarm, reference, env: dict, runs: int, new_tokens: int, vocab: int) -> dict:
    """Adds a liar, then one client per run until it is caught: tokens generated when it was."""
    caught_after, identical = [], True
    for run in range(runs):
        liar = swarm.add_server(
            0,
            swarm_blocks(path),
            "--throughput",
            "100000",
            module="tests.helpers.lying_server",
            env={**env, "LYING_SERVER_SEED": str(run)},
        )
        try:
            with AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers) as model:
                model.generation_config.eos_token_id = None
                counter, caught = Counter(), []
                model.on_wrong_result(lambda evidence: caught.append(counter.puts))
                generated = 0
                while not caught and generated < new_tokens:
                    counter.puts = 0
                    ids = prompt(run * 100 + generated, vocab)
                    output = model.generate(ids, max_new_tokens=min(64, new_tokens - generated), streamer=counter)
                    expected = reference.generate(ids, max_new_tokens=output.shape[1] - ids.shape[1], do_sample=False)
                    identical &= bool(torch.equal(output, expected))
                    if caught:
                        caught[0] += generated - 1  # tokens before this generation, less the prompt's put
                    generated += output.shape[1] - ids.shape[1]
                caught_after.append(caught[0] if caught else None)
        finally:
            liar.stop()
    found = [value for value in caught_after if value is not None]
    return {
        "runs": runs,
        "caught": len(found),
        "tokens_until_caught_median": statistics.median(found) if found else None,
        "tokens_until_caught_max": max(found) if found else None,
        "outputs_identical": identical,
    }


def swarm_blocks(path) -> int:
    return json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_flags(parser, hidden=512, layers=8, kv_heads=2, vocab=4000, positions=4096)
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per generation in the cost part")
    parser.add_argument("--repeats", type=int, default=7, help="timed generations per setting in the cost part")
    parser.add_argument("--runs", type=int, default=5, help="clients per misbehaving server")
    parser.add_argument("--max-tokens", type=int, default=500, help="tokens a run may take to catch a liar")
    parser.add_argument("--honest-runs", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level="ERROR")

    workdir = work_folder("verify")
    path = bench_model(args, workdir)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    half = args.layers // 2
    result: dict = {"layers": args.layers, "hidden_size": args.hidden, "default_verify_rate": DEFAULT_VERIFY_RATE}

    with LocalSwarm(
        path,
        [(0, half), (half, args.layers), (0, half), (half, args.layers)],
        server_args=["--throughput", "100"],
        workdir=workdir / "swarm",
    ) as swarm:
        ids = prompt(0, args.vocab)
        result["cost"] = cost(path, swarm.initial_peers, DEFAULT_VERIFY_RATE, ids, args.new_tokens, args.repeats)
        result["always_wrong"] = detection(path, swarm, reference, {}, args.runs, args.max_tokens, args.vocab)
        result["wrong_5_percent"] = detection(
            path, swarm, reference, {"LYING_SERVER_PROBABILITY": "0.05"}, args.runs, args.max_tokens, args.vocab
        )

    with LocalSwarm(path, [], workdir=workdir / "honest") as swarm:
        for dtype in ("float32", "bfloat16"):
            swarm.add_server(0, half, "--throughput", "100", "--dtype", dtype)
            swarm.add_server(half, args.layers, "--throughput", "100", "--dtype", dtype)
        checks = disputes = convicted = 0
        for run in range(args.honest_runs):  # a fresh client each time: routing's jitter mixes the dtypes
            with AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, verify=1.0) as model:
                model.generate(prompt(run, args.vocab), max_new_tokens=32)
                checks += model.remote.audit.verifier.checks
                disputes += model.remote.audit.verifier.disputes
                convicted += len(model.convicted)
        result["honest"] = {
            "generations": args.honest_runs,
            "checks": checks,
            "disputes": disputes,
            "false_convictions": convicted,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
