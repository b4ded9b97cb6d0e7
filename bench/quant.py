"""Quantized servers: memory, speed and perplexity of `swarm.serve --quant` none | int8 | nf4.

For each mode, in one run and on one machine, one server holds every block of the model
(`--cache-tokens` small, the same for all modes) and a client that accepts only that mode measures:
- the server's resident memory once it is online and has served a generation (RSS and USS, the
  process's own pages), and what its blocks' weights hold (from its log);
- tokens/s of one session alone (median of 3) and of 16 sessions at once (threads of one client);
- perplexity on a fixed English text shipped in `bench/data/english.txt`, through the swarm (one
  stateless forward pass of the whole text), and its ratio to the full-precision server's.
Prints one JSON object. Example:
  .venv/bin/python bench/quant.py --model embedded     # SmolLM2-135M-Instruct
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # threads stay awake within a step (harness/processes.py)

import psutil  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_flags, bench_model, bench_parser, work_folder  # noqa: E402
from blocks.checkpoint import Checkpoint  # noqa: E402
from client import AutoDistributedModelForCausalLM, load_tokenizer  # noqa: E402
from harness.local_swarm import LocalSwarm  # noqa: E402

TEXT = Path(__file__).resolve().parent / "data" / "english.txt"
MODES = ("none", "int8", "nf4")


def perplexity(model, ids: torch.Tensor) -> float:
    logits = model(ids).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(torch.exp(loss))


def tokens_per_second(model, prompts: list[torch.Tensor], new_tokens: int) -> float:
    """Aggregate new tokens per second of one generation per prompt, all at once (threads)."""
    errors: list[BaseException] = []
    generated: list[int] = []

    def run(ids):
        try:
            generated.append(model.generate(ids, max_new_tokens=new_tokens).shape[1] - ids.shape[1])
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(ids,)) for ids in prompts]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sum(generated) / (time.perf_counter() - started)


def measure(args, model_path: Path, mode: str, text_ids: torch.Tensor, prompts: list[torch.Tensor]) -> dict:
    workdir = work_folder(f"quant-{mode}")
    with LocalSwarm(model_path, [], workdir=workdir) as swarm:
        blocks = Checkpoint(model_path).num_blocks
        server = swarm.add_server(0, blocks, "--quant", mode, "--cache-tokens", str(args.cache_tokens))
        with AutoDistributedModelForCausalLM.from_pretrained(
            model_path, swarm.initial_peers, quant=mode if mode == "none" else [mode], verify=0
        ) as model:
            ppl = perplexity(model, text_ids)
            solo = statistics.median(tokens_per_second(model, prompts[:1], args.new_tokens) for _ in range(3))
            many = tokens_per_second(model, prompts[: args.sessions], args.new_tokens)
            process = psutil.Process(server.proc.pid).memory_full_info()
        held = re.search(r"hold ([0-9.]+) MiB of weights", server.log_path.read_text())
        return {
            "server_rss_mib": round(process.rss / 2**20, 1),
            "server_uss_mib": round(process.uss / 2**20, 1),
            "weights_mib": float(held.group(1)) if held else None,
            "tokens_per_s_1_session": round(solo, 2),
            f"tokens_per_s_{args.sessions}_sessions": round(many, 2),
            "perplexity": round(ppl, 4),
        }


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_flags(parser, hidden=768, layers=8, vocab=32000, choose=True)
    parser.add_argument("--sessions", type=int, default=16, help="sessions at once (default 16)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens each session generates (default 32)")
    parser.add_argument("--cache-tokens", type=int, default=2048, help="the server's KV budget (default 2048)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model_path = bench_model(args, work_folder("quant-model"))
    tokenizer = load_tokenizer(model_path) if (model_path / "tokenizer.json").is_file() else None
    text = TEXT.read_text()
    if tokenizer is not None:
        text_ids = tokenizer(text, return_tensors="pt").input_ids
    else:  # a random model: the text's bytes as ids stand in for tokens
        vocab = Checkpoint(model_path).config.vocab_size
        text_ids = torch.tensor([[byte % vocab for byte in text.encode()[:512]]])
    generator = torch.Generator().manual_seed(0)
    vocab = Checkpoint(model_path).config.vocab_size
    prompts = [torch.randint(3, vocab, (1, 16), generator=generator) for _ in range(args.sessions)]
    result = {"model": str(model_path), "text_tokens": text_ids.shape[1], "modes": {}}
    for mode in args.modes:
        result["modes"][mode] = measure(args, model_path, mode, text_ids, prompts)
    base = result["modes"].get("none")
    if base is not None:
        for mode, figures in result["modes"].items():
            figures["rss_vs_none"] = round(figures["server_rss_mib"] / base["server_rss_mib"], 3)
            figures["uss_vs_none"] = round(figures["server_uss_mib"] / base["server_uss_mib"], 3)
            if figures["weights_mib"] and base["weights_mib"]:
                figures["weights_vs_none"] = round(figures["weights_mib"] / base["weights_mib"], 3)
            figures["perplexity_vs_none"] = round(figures["perplexity"] / base["perplexity"], 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
