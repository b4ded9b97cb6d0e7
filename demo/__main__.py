"""`python -m demo`: a whole swarm on this machine answering one prompt.

Starts a bootstrap node and N block servers on 127.0.0.1 that split the layers of the embedded
SmolLM2-135M-Instruct model (or `--model PATH`), streams the answer to the terminal through the
client library, then shuts everything down.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from harness.local_swarm import LocalSwarm, even_splits
from harness.processes import shared_forker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt", default="What is the capital of France?", help="question to ask")
    parser.add_argument("--servers", type=int, default=3, help="block servers to start (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default: 48)")
    parser.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    # The servers' preloaded parent imports torch and hivemind while this process prepares the model.
    shared_forker()
    from transformers import AutoTokenizer, TextStreamer

    from blocks.checkpoint import Checkpoint
    from blocks.embedded import ensure_embedded_checkpoint
    from client import AutoDistributedModelForCausalLM, TokenClock

    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def say(text: str) -> None:
        print(f"[demo] {text}", file=sys.stderr, flush=True)

    if args.model:
        model_path = args.model
    else:
        say("preparing the embedded model SmolLM2-135M-Instruct (converted once, then cached)…")
        model_path = str(ensure_embedded_checkpoint())
    num_blocks = Checkpoint(model_path).num_blocks
    splits = even_splits(num_blocks, max(1, min(args.servers, num_blocks)))
    say(
        f"starting a bootstrap node and {len(splits)} servers on 127.0.0.1: blocks "
        + ", ".join(f"{a}:{b}" for a, b in splits)
    )
    started = time.monotonic()
    with LocalSwarm(model_path, splits, server_args=["--cache-tokens", "4096"]) as swarm:
        say(f"swarm online in {time.monotonic() - started:.1f} s; logs in {swarm.workdir}")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        with AutoDistributedModelForCausalLM.from_pretrained(model_path, swarm.initial_peers) as model:
            if getattr(tokenizer, "chat_template", None):
                input_ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": args.prompt}],
                    add_generation_prompt=True,
                    return_tensors="pt",
                    return_dict=True,
                )["input_ids"]
            else:
                input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
            print(f"User: {args.prompt}\nAssistant: ", end="", flush=True)
            clock = TokenClock(inner=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
            model.generate(input_ids, max_new_tokens=args.max_new_tokens, streamer=clock)
            say(f"{clock.summary()}, through {len(splits)} servers")
        say("shutting the swarm down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
