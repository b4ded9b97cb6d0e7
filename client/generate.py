"""`python -m client.generate`: answer one prompt through the swarm, streaming tokens to the terminal."""

from __future__ import annotations

import os
import sys

from configs.loader import cli_options
from configs.schema import GenerateOptions

EPILOG = """\
example:
  python -m client.generate --model ./SmolLM2-135M-Instruct \\
      --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/QmBootstrap... \\
      --prompt "What is the capital of France?" --max-new-tokens 32
  python -m client.generate --model ./SmolLM2-135M-Instruct --mdns --prompt "Hi"   # a swarm on this LAN

The checkpoint directory must also hold the tokenizer."""


def main(argv: list[str] | None = None) -> int:
    options = cli_options(
        GenerateOptions,
        "python -m client.generate",
        "Generate text with a model whose blocks are served by a swarm.",
        EPILOG,
        argv,
    )
    # torch, transformers and hivemind only once the options are known to be good: --help and a bad flag answer at once.
    from transformers import TextStreamer

    from blocks.errors import BlocksError
    from client.errors import SwarmError
    from client.model import AutoDistributedModelForCausalLM
    from client.timing import TokenClock
    from client.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(options.model)
    except (OSError, ValueError) as e:
        print(f"client.generate: error: cannot load a tokenizer from {options.model}: {e}", file=sys.stderr)
        return 2
    chat = options.chat if options.chat is not None else bool(getattr(tokenizer, "chat_template", None))
    if chat:
        input_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": options.prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        input_ids = tokenizer(options.prompt, return_tensors="pt").input_ids
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            options.model,
            options.initial_peers,
            mdns=options.mdns,
            model_name=options.model_name,
            request_timeout=options.request_timeout,
            step_timeout=options.step_timeout,
            verify=options.verify,
            region=options.region,
            otlp_endpoint=options.otlp_endpoint,
        )
    except (BlocksError, SwarmError, ValueError, OSError) as e:
        print(f"client.generate: error: {e}", file=sys.stderr)
        return 1
    try:
        streamer = TokenClock(inner=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
        if not chat:
            print(options.prompt, end="", flush=True)
        model.generate(
            input_ids,
            max_new_tokens=options.max_new_tokens,
            do_sample=options.do_sample,
            temperature=options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            repetition_penalty=options.repetition_penalty,
            streamer=streamer,
            **({"prompt_lookup_num_tokens": options.prompt_lookup} if options.prompt_lookup else {}),
        )
    except SwarmError as e:
        print(f"\nclient.generate: error: {e}", file=sys.stderr)
        return 1
    finally:
        model.shutdown()
    print(f"\n[{streamer.summary()}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    code = main()
    # All is said and the swarm left (DHT process joined, spans sent): skip the interpreter's teardown of
    # torch and the other big modules, a second or more of waiting for nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
