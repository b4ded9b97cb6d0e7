"""Does lossless compression of activations pay on the wire? lz4 over byte-shuffled tensors, measured.

Takes real hidden states (the embedded SmolLM2-135M-Instruct, a 128-token prompt, the middle
layer's output, and one decode step's) in float32 and bfloat16, serializes them as the wire does
(hivemind's `serialize_torch_tensor`), and reports for each: bytes on the wire, bytes after
byte-shuffle + lz4, the time to compress and decompress, and the link speed below which the bytes
saved take longer to send than the compression costs. Prints one JSON object. lz4 is not a
dependency of Swarm (this measurement is why); install it with the `bench` extra. Example:
  .venv/bin/uv pip install --python .venv/bin/python lz4==4.4.5   # or: pip install -e '.[bench]'
  .venv/bin/python bench/compression.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import lz4.frame
import torch
from hivemind.compression import serialize_torch_tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blocks.embedded import ensure_embedded_checkpoint  # noqa: E402


def shuffled(data: bytes, element: int) -> bytes:
    """Byte-shuffle: all first bytes of the elements, then all second bytes… (exponents end up together)."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    usable = raw.numel() - raw.numel() % element
    return raw[:usable].view(-1, element).t().contiguous().numpy().tobytes() + bytes(raw[usable:].numpy())


def measure(name: str, tensor: torch.Tensor, repeats: int = 20) -> dict:
    wire = serialize_torch_tensor(tensor).buffer
    element = 4 if tensor.dtype in (torch.float32, torch.bfloat16) else tensor.element_size()  # bf16 travels as fp32
    compress, decompress = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        packed = lz4.frame.compress(shuffled(wire, element))
        compress.append(time.perf_counter() - started)
        started = time.perf_counter()
        lz4.frame.decompress(packed)
        decompress.append(time.perf_counter() - started)
    cost = statistics.median(compress) + statistics.median(decompress)
    saved = len(wire) - len(packed)
    return {
        "tensor": name,
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "wire_bytes": len(wire),
        "lz4_bytes": len(packed),
        "ratio": round(len(packed) / len(wire), 3),
        "compress_ms": round(1000 * statistics.median(compress), 3),
        "decompress_ms": round(1000 * statistics.median(decompress), 3),
        # Below this link speed the saved bytes take longer to send than compressing costs.
        "pays_below_mbit_s": round(8 * saved / cost / 1e6, 1) if saved > 0 else 0.0,
    }


def main() -> None:
    path = ensure_embedded_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = (
        "The history of the swarm begins with volunteers who lent their machines to run a large model "
        "that none of them could run alone. "
    ) * 8
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        middle = len(out.hidden_states) // 2
        prefill = out.hidden_states[middle]
        step = model(ids[:, :1], output_hidden_states=True).hidden_states[middle]
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        results.append(measure("prefill (128 tokens)", prefill.to(dtype)))
        results.append(measure("decode step (1 token)", step.to(dtype)))
    print(json.dumps({"model": "SmolLM2-135M-Instruct", "layer": middle, "results": results}))


if __name__ == "__main__":
    main()
