"""What the benches share: their argument parser, a work folder and the random model they run on.

Each bench keeps its own default size (a bench of routing needs no model, one of a WAN a bigger
one), but the flags that set it mean the same everywhere.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
import time
from pathlib import Path


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose --help prints the bench's docstring as written (its examples included)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_flags(
    parser: argparse.ArgumentParser,
    *,
    hidden: int,
    layers: int,
    heads: int = 8,
    kv_heads: int = 4,
    intermediate: int | None = None,
    vocab: int,
    positions: int = 512,
    choose: bool = False,
) -> None:
    """The size flags of a random Llama; with `choose`, also --model (random, embedded or a path)."""
    if choose:
        parser.add_argument(
            "--model", default="random", help="'random' (built from the size flags), 'embedded', or a path"
        )
    parser.add_argument("--hidden", type=int, default=hidden, help=f"hidden size (default {hidden})")
    parser.add_argument("--layers", type=int, default=layers, help=f"decoder layers (default {layers})")
    parser.add_argument("--heads", type=int, default=heads, help=f"attention heads (default {heads})")
    parser.add_argument("--kv-heads", type=int, default=kv_heads, help=f"key/value heads (default {kv_heads})")
    parser.add_argument(
        "--intermediate", type=int, default=intermediate, help=f"MLP size (default {intermediate or '2 × hidden'})"
    )
    parser.add_argument("--vocab", type=int, default=vocab, help=f"vocabulary size (default {vocab})")
    parser.set_defaults(max_positions=positions)


def work_folder(name: str) -> Path:
    """A temporary folder for a bench's model and swarm, removed when the bench exits."""
    path = Path(tempfile.mkdtemp(prefix=f"swarm-bench-{name}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def bench_model(args: argparse.Namespace, workdir: Path) -> Path:
    """The checkpoint the flags name: a random Llama of their size (the default), the embedded model
    or a local path."""
    model = getattr(args, "model", "random")
    if model == "embedded":
        from blocks.embedded import ensure_embedded_checkpoint

        return ensure_embedded_checkpoint()
    if model != "random":
        return Path(model)
    from blocks.synthetic import make_random_checkpoint

    return make_random_checkpoint(
        workdir / "model",
        "llama",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=args.max_positions,
    )


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large copy (each byte read and written), the best of `repeats`: the memory
    roofline of this machine, measured in the same run as the steps it bounds."""
    import torch

    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * source.element_size() / best


def roofline(checkpoint, dtype, position: int, bandwidth: float) -> dict:
    """What one decode step must read at least: every block's weights, the LM head, and the KV cache
    of `position` tokens (of a `blocks.checkpoint.Checkpoint` in `dtype`); and the time that takes at
    `bandwidth`."""
    import torch

    weights = sum(checkpoint.block_bytes(index, dtype) for index in range(checkpoint.num_blocks))
    head = checkpoint.config.vocab_size * checkpoint.hidden_size * torch.empty(0, dtype=dtype).element_size()
    kv = checkpoint.num_blocks * checkpoint.kv_bytes_per_token(dtype) * position
    return {
        "step_weight_mbytes": round((weights + head) / 2**20, 1),
        "step_kv_mbytes": round(kv / 2**20, 2),
        "memory_bandwidth_gbytes_per_s": round(bandwidth / 1e9, 2),
        "roofline_ms_per_output_token": round(1000 * (weights + head + kv) / bandwidth, 2),
    }
