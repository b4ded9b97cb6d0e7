"""Start-up cost: how long the CLIs take to answer `--help`, and a server to go online.

Measures, each `--runs` times (median, min, max in seconds):
- `python -m MODULE --help` for every entry point (fresh interpreters);
- `python -m swarm.serve …` from launch to its `online` line, with a bootstrap node already up,
  started as an operator would (a fresh interpreter);
- the same server forked from the preloaded parent that local swarms use (`harness.forker`);
- the one-line client (`python -m client.generate`, 8 new tokens, a fresh interpreter each run)
  against `--servers` servers already online: its whole wall time, from launch to exit;
- the demo (`python -m demo`, a fresh process each run): its "swarm online in X s" (bootstrap +
  `--servers` servers, from launch to all online) and the whole command's wall time.
Prints one JSON object. Example:
  .venv/bin/python bench/startup.py --runs 3 --model embedded
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.local_swarm import LocalSwarm, even_splits  # noqa: E402
from harness.processes import Child, shared_forker  # noqa: E402

CLIS = ("swarm.serve", "bootstrap", "client.generate", "relay", "relay.health")


def summary(values: list[float]) -> dict:
    return {
        "median_s": round(statistics.median(values), 2),
        "min_s": round(min(values), 2),
        "max_s": round(max(values), 2),
    }


def timed_help(module: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", module, "--help"], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--model",
        default="random",
        help="'random' (a tiny random Llama), 'embedded' (SmolLM2-135M-Instruct) or a checkpoint path",
    )
    parser.add_argument("--servers", type=int, default=3, help="servers of the whole-swarm measurement")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="swarm-bench-startup-"))
    if args.model == "random":
        from blocks.synthetic import make_random_checkpoint

        model = make_random_checkpoint(workdir / "model", "llama", num_layers=4)
    elif args.model == "embedded":
        from blocks.embedded import ensure_embedded_checkpoint

        model = ensure_embedded_checkpoint()
    else:
        model = Path(args.model)
    from blocks.checkpoint import Checkpoint

    num_blocks = Checkpoint(model).num_blocks
    result: dict = {
        "model": str(model),
        "runs": args.runs,
        "help": {module: summary([timed_help(module) for _ in range(args.runs)]) for module in CLIS},
    }

    with LocalSwarm(model, [], workdir=workdir / "base") as swarm:
        # The throughput measurement is cached on disk after the first start: warm it, then time.
        for fork, key in ((False, "server_online_fresh_interpreter"), (True, "server_online_forked")):
            times = []
            for run in range(args.runs + 1):
                started = time.perf_counter()
                child = Child(
                    "server",
                    [
                        sys.executable,
                        "-m",
                        "swarm.serve",
                        "--model",
                        str(model),
                        "--blocks",
                        f"0:{num_blocks}",
                        "--initial-peers",
                        *swarm.initial_peers,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "0",
                        "--identity",
                        str(workdir / f"{key}{run}.key"),
                    ],
                    workdir / f"{key}{run}.log",
                    env=swarm.env,
                    forker=shared_forker() if fork else None,
                )
                try:
                    child.wait_for_line(lambda line: line.startswith("swarm.serve online:"), 600)
                    if run:
                        times.append(time.perf_counter() - started)
                finally:
                    child.stop()
            result[key] = summary(times)
        for start, end in even_splits(num_blocks, args.servers):
            swarm.add_server(start, end, wait=False)
        for server in swarm.servers:
            swarm.wait_online(server)
        wall = []
        for _ in range(args.runs):
            started = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "client.generate",
                    "--model",
                    str(model),
                    "--initial-peers",
                    *swarm.initial_peers,
                    "--prompt",
                    "What is the capital of France?",
                    "--max-new-tokens",
                    "8",
                ],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                check=True,
            )
            wall.append(time.perf_counter() - started)
        result["client_generate"] = {"servers": args.servers, "new_tokens": 8, "whole_command": summary(wall)}

    online, wall = [], []
    for _ in range(args.runs):
        started = time.perf_counter()
        demo = subprocess.run(
            [
                sys.executable,
                "-m",
                "demo",
                "--model",
                str(model),
                "--servers",
                str(args.servers),
                "--max-new-tokens",
                "8",
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=True,
        )
        wall.append(time.perf_counter() - started)
        online.append(float(re.search(r"swarm online in ([0-9.]+) s", demo.stderr).group(1)))
    result["demo"] = {"servers": args.servers, "swarm_online": summary(online), "whole_command": summary(wall)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
