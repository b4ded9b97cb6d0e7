"""A separate client process for concurrency tests: greedy generations from several threads at once.

Usage: python -m tests.helpers.client_worker MODEL PEER NEW_TOKENS SEED [SEED ...]; prints one JSON list of
token lists, in the order of the seeds.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from client import AutoDistributedModelForCausalLM


def prompt(seed: int) -> torch.Tensor:
    return torch.randint(3, 100, (1, 5 + seed % 4), generator=torch.Generator().manual_seed(seed))


def main() -> None:
    model_path, peer, new_tokens, *seeds = sys.argv[1:]
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, [peer], request_timeout=60) as model:
        with ThreadPoolExecutor(len(seeds)) as pool:
            outputs = list(
                pool.map(
                    lambda seed: model.generate(prompt(int(seed)), max_new_tokens=int(new_tokens))[0].tolist(), seeds
                )
            )
    print(json.dumps(outputs))


if __name__ == "__main__":
    main()
