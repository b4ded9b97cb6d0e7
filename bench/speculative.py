"""Speculative decoding through a swarm over WAN-like links: greedy tokens/s with prompt lookup
(`prompt_lookup_num_tokens`) against plain greedy decoding, timed in turns in the same run.

SmolLM2-135M-Instruct (the embedded model) on 3 servers, each behind a delay proxy (`--link-delay-ms`,
25 ms each way; 0 for plain loopback). Three tasks: one that copies and edits its prompt, one that
summarises a given paragraph, and free generation. For each: tokens/s with and without speculation,
tokens per trip through the chain, drafts accepted, the bytes that crossed the links, and whether
the outputs are identical (they must be). Bounded: `--turns` turns of `--new-tokens` tokens per task
and mode. Prints one JSON object. Examples:
  .venv/bin/python bench/speculative.py
  .venv/bin/python bench/speculative.py --link-delay-ms 0
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
from transformers import AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser, work_folder  # noqa: E402
from blocks.checkpoint import Checkpoint  # noqa: E402
from blocks.embedded import ensure_embedded_checkpoint  # noqa: E402
from client import AutoDistributedModelForCausalLM  # noqa: E402
from harness.local_swarm import LocalSwarm, even_splits  # noqa: E402

PARAGRAPH = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. Supporters said the "
    "lanes had made the street safer for children walking to school, and that shops had seen more customers "
    "since the change. Opponents argued that the loss of parking spaces hurt small businesses and that "
    "delivery trucks now block traffic during the morning rush. After three hours of debate, the council "
    "voted five to two to keep the lanes for another year and to add loading zones on two side streets."
)
CODE = """def total_price(items, tax_rate):
    total = 0
    for item in items:
        total = total + item.price * item.quantity
    total = total + total * tax_rate
    return round(total, 2)
"""
TASKS = {
    "copy_edit": f"Rewrite this Python function with the variable `total` renamed to `amount`. Change nothing "
    f"else.\n\n{CODE}",
    "summarise": f"Summarise this paragraph in two sentences, reusing its words.\n\n{PARAGRAPH}",
    "free": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--link-delay-ms", type=float, default=25.0, help="one-way delay of every link (default 25)")
    parser.add_argument("--servers", type=int, default=3, help="servers the blocks are split over (default 3)")
    parser.add_argument("--new-tokens", type=int, default=96, help="tokens per generation (default 96)")
    parser.add_argument("--turns", type=int, default=2, help="turns per task and mode (default 2)")
    parser.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens (default 10)")
    args = parser.parse_args()
    logging.basicConfig(level="ERROR")
    workdir = work_folder("speculative")
    path = ensure_embedded_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = even_splits(Checkpoint(path).num_blocks, args.servers)
    prompts = {
        name: tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        for name, text in TASKS.items()
    }
    results = {}
    with LocalSwarm(path, splits, workdir=workdir / "swarm", link_delay_ms=args.link_delay_ms) as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, verify=0) as model:
            model.generate(prompts["free"], max_new_tokens=4)  # warm-up: streams and routes

            def run(ids, speculate: bool):
                moved = sum(proxy.bytes_forwarded for proxy in swarm.proxies)
                extra = {"prompt_lookup_num_tokens": args.lookup} if speculate else {}
                with model.inference_session(max_length=ids.shape[1] + args.new_tokens) as session:
                    started = time.perf_counter()
                    output = model.generate(ids, max_new_tokens=args.new_tokens, session=session, **extra)
                    seconds = time.perf_counter() - started
                    stats = session.draft_size
                new = output.shape[1] - ids.shape[1]
                return {
                    "tokens_per_s": new / seconds,
                    "output": output,
                    "traversals": stats.traversals if stats else new,
                    "drafted": stats.drafted if stats else 0,
                    "accepted": stats.accepted if stats else 0,
                    "new_tokens": new,
                    "bytes": sum(proxy.bytes_forwarded for proxy in swarm.proxies) - moved,
                }

            for name, ids in prompts.items():
                plain, fast = [], []
                for _ in range(args.turns):  # in turns: a slower minute of the machine hits both
                    plain.append(run(ids, False))
                    fast.append(run(ids, True))
                plain_rate = statistics.median(r["tokens_per_s"] for r in plain)
                fast_rate = statistics.median(r["tokens_per_s"] for r in fast)
                last = fast[-1]
                results[name] = {
                    "new_tokens": last["new_tokens"],
                    "plain_tokens_per_s": round(plain_rate, 2),
                    "speculative_tokens_per_s": round(fast_rate, 2),
                    "speedup": round(fast_rate / plain_rate, 3),
                    "tokens_per_traversal": round(last["new_tokens"] / max(last["traversals"], 1), 2),
                    "drafted": last["drafted"],
                    "accepted": last["accepted"],
                    "plain_link_bytes": plain[-1]["bytes"],
                    "speculative_link_bytes": last["bytes"],
                    "identical_output": all(torch.equal(r["output"], plain[0]["output"]) for r in plain + fast),
                }
    print(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct (embedded), float32",
                "servers": [f"{a}:{b}" for a, b in splits],
                "link_delay_ms": args.link_delay_ms,
                "prompt_lookup_num_tokens": args.lookup,
                "new_tokens": args.new_tokens,
                "turns": args.turns,
                "tasks": results,
            }
        )
    )


if __name__ == "__main__":
    main()
