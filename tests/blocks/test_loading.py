"""Block spans loaded from a checkpoint compute exactly what the full transformers model computes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blocks.checkpoint import Checkpoint
from blocks.errors import CheckpointError
from blocks.loading import load_head, load_span
from blocks.synthetic import make_random_checkpoint
from tests.helpers.models import reference_model


def run_chain(head, spans, ids, steps: int, chunk: int | None = None):
    """Greedy decoding through `spans` with a KV cache each, prefill optionally in chunks."""
    caches = [span.new_cache() for span in spans]
    tokens, feed = ids, ids
    for _ in range(steps):
        parts = [feed] if chunk is None else list(feed.split(chunk, dim=1))
        for part in parts:
            hidden = head.embed_tokens(part)
            for span, cache in zip(spans, caches):
                hidden = span.forward(hidden, cache)
        feed = head.logits(hidden[:, -1]).argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, feed], dim=1)
    return tokens


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_spans_match_the_full_model(tmp_path, model_type, tied):
    path = make_random_checkpoint(tmp_path / model_type, model_type, num_layers=5, tie_word_embeddings=tied, seed=4)
    ref = reference_model(path)
    checkpoint = Checkpoint(path)
    head = load_head(checkpoint)
    spans = [load_span(checkpoint, 0, 2), load_span(checkpoint, 2, 3), load_span(checkpoint, 3, 5)]
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert torch.equal(run_chain(head, spans, ids, 10), expected)
    assert torch.equal(run_chain(head, spans, ids, 10, chunk=4), expected)  # chunked prefill
    hidden = head.embed_tokens(ids)
    for span in spans:
        hidden = span.forward(hidden)
    with torch.no_grad():
        torch.testing.assert_close(head.logits(hidden), ref(ids).logits, atol=1e-5, rtol=1e-5)


VARIANTS = {
    "llama3-rope": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            )
        ),
    ),
    "linear-rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "yarn-rope": (
        "qwen2",
        dict(
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)
        ),
    ),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=32)),
    "mistral-window": ("mistral", dict(sliding_window=4)),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "qwen3-window-bias": (
        "qwen3",
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=1, attention_bias=True, head_dim=8),
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_architecture_variants_match_the_full_model(tmp_path, variant):
    """config.json is read without transformers: rotary scalings, sliding windows (prompt + generation
    longer than the window), biases and head sizes must still compute what transformers computes."""
    model_type, overrides = VARIANTS[variant]
    path = make_random_checkpoint(tmp_path / variant, model_type, num_layers=4, seed=6, **overrides)
    ref = reference_model(path)
    checkpoint = Checkpoint(path)
    head = load_head(checkpoint)
    spans = [load_span(checkpoint, 0, 1), load_span(checkpoint, 1, 4)]
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert torch.equal(run_chain(head, spans, ids, 12), expected)
    assert torch.equal(run_chain(head, spans, ids, 12, chunk=3), expected)
    hidden = head.embed_tokens(ids)
    for span in spans:
        hidden = span.forward(hidden)
    with torch.no_grad():
        torch.testing.assert_close(head.logits(hidden), ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_sub_range_of_a_span_keeps_its_own_cache_positions(tmp_path):
    path = make_random_checkpoint(tmp_path / "qwen2", "qwen2", num_layers=4)
    ref = reference_model(path)
    checkpoint = Checkpoint(path)
    head, whole, tail = load_head(checkpoint), load_span(checkpoint, 0, 4), load_span(checkpoint, 2, 4)
    ids = torch.randint(3, 100, (1, 6))
    cache_a, cache_b = whole.new_cache(), tail.new_cache()
    tokens, feed = ids, ids
    for _ in range(8):
        hidden = whole.forward(head.embed_tokens(feed), cache_a, start=0, end=2)
        hidden = tail.forward(hidden, cache_b, start=2, end=4)
        feed = head.logits(hidden[:, -1]).argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, feed], dim=1)
    assert torch.equal(tokens, ref.generate(ids, max_new_tokens=8, do_sample=False))
    with pytest.raises(ValueError, match="not within this span"):
        tail.forward(head.embed_tokens(ids), start=1, end=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_spans_stay_close(tmp_path, dtype):
    path = make_random_checkpoint(tmp_path / "llama", "llama", num_layers=2)
    checkpoint = Checkpoint(path)
    ids = torch.randint(3, 100, (1, 8))
    head = load_head(checkpoint)
    full = load_span(checkpoint, 0, 2).forward(head.embed_tokens(ids))
    half = load_span(checkpoint, 0, 2, dtype=dtype).forward(head.embed_tokens(ids))
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.05)


def test_a_span_reads_only_its_own_tensors(tmp_path):
    path = make_random_checkpoint(tmp_path / "llama", "llama", num_layers=4)
    # Keep only blocks 1-2 in the weight file: loading them must not need anything else.
    with safe_open(path / "model.safetensors", framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("model.layers.1.", "model.layers.2."))}
    save_file(kept, path / "model.safetensors", metadata={"format": "pt"})
    checkpoint = Checkpoint(path)
    span = load_span(checkpoint, 1, 3)
    assert (span.start, span.end, len(span)) == (1, 3, 2)
    with pytest.raises(CheckpointError, match="no tensors for block 0"):
        load_span(checkpoint, 0, 1)


def test_sharded_checkpoint_follows_its_index(tmp_path):
    path = make_random_checkpoint(tmp_path / "qwen2", "qwen2", num_layers=3, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    checkpoint = Checkpoint(path)
    assert (
        checkpoint.weight_map["model.layers.2.mlp.up_proj.weight"].name
        == index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    )
    load_span(checkpoint, 2, 3)
