"""What the relay's OpenAI-compatible API costs over the client library, on the same local swarm.

Measures, for greedy decoding of the same prompt: tokens/s with the client library in-process, and
through `POST /v1/completions` of a local relay (non-streaming, and streaming with its time to the
first token), plus the aggregate rate of several concurrent streaming requests. Prints one JSON object.

  .venv/bin/python bench/relay.py                    # random Llama (~60 M parameters), 2 servers
  .venv/bin/python bench/relay.py --model embedded   # SmolLM2-135M-Instruct, 3 servers
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see harness/processes.py
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # threads stay awake within a step (harness/processes.py)

import openai  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blocks.checkpoint import Checkpoint  # noqa: E402
from blocks.embedded import ensure_embedded_checkpoint  # noqa: E402
from blocks.synthetic import make_char_tokenizer, make_random_checkpoint  # noqa: E402
from client import AutoDistributedModelForCausalLM  # noqa: E402
from harness.local_swarm import LocalSwarm, even_splits  # noqa: E402
from harness.processes import Child, child_env  # noqa: E402

PROMPT = "The swarm of servers"


def start_relay(workdir: Path, peers: list[str], model: Path) -> tuple[Child, str]:
    relay = Child(
        "relay",
        [
            sys.executable,
            "-m",
            "relay",
            "--initial-peers",
            *peers,
            "--host",
            "127.0.0.1",
            "--mgmt-port",
            "0",
            "--obs-port",
            "0",
            "--api-port",
            "0",
            "--db",
            f"sqlite:///{workdir / 'relay.db'}",
            "--api-keys",
            "bench",
            "--models",
            str(model),
            "--log-level",
            "warning",
        ],
        workdir / "relay.log",
        env=child_env({}),
    )
    line = relay.wait_for_line(lambda text: text.startswith("relay ready:"), 180)
    return relay, re.search(r"api (http://[\d.]+:\d+)", line).group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random", help="'random', 'embedded', or a checkpoint path with a tokenizer")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--concurrent", type=int, default=4, help="simultaneous streaming requests in the last test")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is reported")
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")

    workdir = Path(tempfile.mkdtemp(prefix="swarm-bench-relay-"))
    if args.model == "random":
        path = make_random_checkpoint(
            workdir / "model",
            "llama",
            hidden_size=512,
            num_layers=8,
            num_heads=8,
            num_kv_heads=4,
            intermediate_size=1408,
            vocab_size=128,
            max_position_embeddings=2048,
        )
        make_char_tokenizer(path)
    elif args.model == "embedded":
        path = ensure_embedded_checkpoint()
    else:
        path = Path(args.model)
    checkpoint = Checkpoint(path)
    ids = torch.tensor([AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"]])

    splits = even_splits(checkpoint.num_blocks, args.servers)
    with LocalSwarm(path, splits, server_args=["--throughput", "1"], workdir=workdir / "swarm") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers) as model:
            model.generation_config.eos_token_id = None
            model.generate(ids, max_new_tokens=4)
            direct = max(
                _rate(lambda: model.generate(ids, max_new_tokens=args.new_tokens).shape[1] - ids.shape[1])
                for _ in range(args.repeats)
            )
        relay, api = start_relay(workdir, swarm.initial_peers, path)
        try:
            client = openai.OpenAI(base_url=f"{api}/v1", api_key="bench", max_retries=0, timeout=600)
            name = client.models.list().data[0].id

            def complete() -> int:
                reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=args.new_tokens, temperature=0)
                return reply.usage.completion_tokens  # fewer than asked if the model ends the text

            def stream() -> tuple[float, int]:
                started, first, chunks = time.perf_counter(), None, 0
                for chunk in client.completions.create(
                    model=name, prompt=PROMPT, max_tokens=args.new_tokens, temperature=0, stream=True
                ):
                    if chunk.choices and chunk.choices[0].text and first is None:
                        first = time.perf_counter() - started
                    chunks += 1
                return first or 0.0, chunks - 1  # one chunk per token, then one with the finish reason

            complete()
            api_rate = max(_rate(complete) for _ in range(args.repeats))
            ttft = min(stream()[0] for _ in range(args.repeats))
            with concurrent.futures.ThreadPoolExecutor(args.concurrent) as pool:
                started = time.perf_counter()
                tokens = sum(count for _, count in pool.map(lambda _: stream(), range(args.concurrent)))
                concurrent_rate = tokens / (time.perf_counter() - started)
        finally:
            relay.stop()

    print(
        json.dumps(
            {
                "model": str(args.model if args.model != "random" else "random-llama"),
                "layers": checkpoint.num_blocks,
                "servers": len(splits),
                "new_tokens": args.new_tokens,
                "client_library_tokens_per_s": round(direct, 2),
                "relay_api_tokens_per_s": round(api_rate, 2),
                "relay_over_client_ratio": round(api_rate / direct, 3),
                "relay_stream_first_token_s": round(ttft, 3),
                "concurrent_requests": args.concurrent,
                "relay_concurrent_tokens_per_s": round(concurrent_rate, 2),
            }
        )
    )


def _rate(fn) -> float:
    """Tokens per second of one call of `fn`, which returns how many tokens it generated."""
    started = time.perf_counter()
    tokens = fn()
    return tokens / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
