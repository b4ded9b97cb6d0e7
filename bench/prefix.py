"""Prefix caching through a swarm: time to first token (TTFT) with a shared system prompt, cold against
warm, timed in turns in the same run, and a 10-turn chat whose TTFT must not grow with its history.

SmolLM2-135M-Instruct (the embedded model) on 3 servers (`--link-delay-ms` puts a delay proxy in front
of each; 0, the default, is plain loopback). Cold: a client that keeps no memory of prompts
(`prefix_cache_mbytes=0`), so every prompt is computed in full. Warm: a client that asked the same
system prompt once before, so the servers start from their prefix caches and compute only the
question. Each turn asks another question, cold then warm, at 400 and 2 000 system-prompt tokens;
the outputs of both must be identical. Then the chat: each turn's prompt is the last turn's prompt,
its answer and a new question. Bounded: `--turns` turns per size, `--chat-turns` chat turns.
Prints one JSON object. Examples:
  .venv/bin/python bench/prefix.py
  .venv/bin/python bench/prefix.py --link-delay-ms 25 --turns 2
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/generate.py
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # threads stay awake within a step (harness/processes.py)

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser, work_folder  # noqa: E402
from blocks.checkpoint import Checkpoint  # noqa: E402
from blocks.embedded import ensure_embedded_checkpoint  # noqa: E402
from client import AutoDistributedModelForCausalLM, TokenClock  # noqa: E402
from harness.local_swarm import LocalSwarm, even_splits  # noqa: E402

RULES = [
    "Answer in plain English and keep every answer short.",
    "Never invent facts; say so when you do not know.",
    "Prefer examples over definitions.",
    "Use metric units and ISO dates.",
    "Quote the user's words when you correct them.",
    "Do not use lists unless the user asks for one.",
    "Name your sources when the user asks where a fact comes from.",
    "Explain any abbreviation the first time you use it.",
]
QUESTIONS = [
    "How far is the Moon?",
    "Why is the sky blue?",
    "What is a prime number?",
    "How do bees make honey?",
    "What causes tides?",
    "Why do cats purr?",
    "How does a rainbow form?",
    "What is an atom made of?",
    "Why do leaves change colour?",
    "How do airplanes stay up?",
    "What is photosynthesis?",
    "Why is the sea salty?",
]


def system_prompt(tokenizer, tokens: int) -> str:
    """Numbered house rules, repeated with new numbers until the text is `tokens` tokens long."""
    lines, index = [], 0
    while len(tokenizer("\n".join(lines))["input_ids"]) < tokens:
        lines.append(f"Rule {index + 1}: {RULES[index % len(RULES)]}")
        index += 1
    return "\n".join(lines)


def chat_ids(tokenizer, system: str, question: str) -> torch.Tensor:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def follow_up_ids(tokenizer, question: str) -> torch.Tensor:
    """The tokens a chat template adds for one more user turn and the assistant's reply to it."""
    text = f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer(text, return_tensors="pt")["input_ids"]


def timed(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor, int]:
    """TTFT, the output and the prompt tokens the servers started from their prefix caches."""
    clock = TokenClock()
    with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
        output = model.generate(ids, max_new_tokens=new_tokens, streamer=clock, session=session)
        return clock.time_to_first_token, output, session.cached_tokens


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--link-delay-ms", type=float, default=0.0, help="one-way delay of every link (default 0)")
    parser.add_argument("--servers", type=int, default=3, help="servers the blocks are split over (default 3)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 2000], help="system prompt tokens")
    parser.add_argument("--turns", type=int, default=3, help="cold/warm turns per size (default 3)")
    parser.add_argument("--chat-turns", type=int, default=10, help="turns of the chat (default 10)")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens per answer (default 8)")
    args = parser.parse_args()
    logging.basicConfig(level="ERROR")
    workdir = work_folder("prefix")
    path = ensure_embedded_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = even_splits(Checkpoint(path).num_blocks, args.servers)
    sizes, chat = {}, []
    with LocalSwarm(path, splits, workdir=workdir / "swarm", link_delay_ms=args.link_delay_ms) as swarm:
        peers = swarm.initial_peers
        with (
            AutoDistributedModelForCausalLM.from_pretrained(path, peers, verify=0, prefix_cache_mbytes=0) as cold,
            AutoDistributedModelForCausalLM.from_pretrained(path, peers, verify=0) as warm,
        ):
            for model in (cold, warm):
                model.generation_config.eos_token_id = None
                model.generate(chat_ids(tokenizer, "Hi.", "Hi."), max_new_tokens=2)  # warm-up: streams and routes
            questions = iter(QUESTIONS * 4)
            for size in args.sizes:
                system = system_prompt(tokenizer, size)
                timed(warm, chat_ids(tokenizer, system, next(questions)), args.new_tokens)  # the servers keep it
                cold_ttft, warm_ttft, cached, identical = [], [], [], True
                for _ in range(args.turns):  # in turns: a slower minute of the machine hits both
                    ids = chat_ids(tokenizer, system, next(questions))
                    seconds, cold_output, _ = timed(cold, ids, args.new_tokens)
                    cold_ttft.append(seconds)
                    seconds, warm_output, reused = timed(warm, ids, args.new_tokens)
                    warm_ttft.append(seconds)
                    cached.append(reused)
                    identical &= torch.equal(cold_output, warm_output)
                cold_median, warm_median = statistics.median(cold_ttft), statistics.median(warm_ttft)
                sizes[str(size)] = {
                    "prompt_tokens": int(ids.shape[1]),
                    "cached_tokens": cached,
                    "cold_ttft_s": round(cold_median, 4),
                    "warm_ttft_s": round(warm_median, 4),
                    "warm_over_cold": round(warm_median / cold_median, 3),
                    "identical_output": identical,
                }
            system = system_prompt(tokenizer, args.sizes[0])
            ids = chat_ids(tokenizer, system, QUESTIONS[0])
            for turn in range(args.chat_turns):
                seconds, output, reused = timed(warm, ids, args.new_tokens)
                cold_seconds, _, _ = timed(cold, ids, args.new_tokens)
                chat.append(
                    {
                        "turn": turn + 1,
                        "prompt_tokens": int(ids.shape[1]),
                        "cached_tokens": reused,
                        "ttft_s": round(seconds, 4),
                        "cold_ttft_s": round(cold_seconds, 4),
                    }
                )
                ids = torch.cat([output, follow_up_ids(tokenizer, QUESTIONS[(turn + 1) % len(QUESTIONS)])], dim=1)
    warm_turns = [turn["ttft_s"] for turn in chat[1:]]
    print(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct (embedded), float32",
                "servers": [f"{a}:{b}" for a, b in splits],
                "link_delay_ms": args.link_delay_ms,
                "new_tokens": args.new_tokens,
                "turns": args.turns,
                "system_prompt": sizes,
                "chat": chat,
                "chat_ttft_last_over_second_turn": round(warm_turns[-1] / warm_turns[0], 3) if warm_turns else None,
            }
        )
    )


if __name__ == "__main__":
    main()
