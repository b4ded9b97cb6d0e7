"""Tiny random checkpoints written with transformers' own `save_pretrained`, for tests, benches and demos.

No weights ever come from the network: everything that is not the embedded demo model is made here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def make_random_checkpoint(
    path: str | Path,
    model_type: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 128,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **config_overrides,
) -> Path:
    """Writes `config.json` + safetensors of a randomly initialised model to `path` and returns it;
    `config_overrides` are further config fields (rope scaling, sliding windows, biases…)."""
    path = Path(path)
    config = AutoConfig.for_model(
        model_type,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or hidden_size * 2,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init of some families is near-degenerate (tiny std); widen it so greedy decoding is informative.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def make_char_tokenizer(path: str | Path, vocab_size: int = 128) -> Path:
    """Saves a character-level tokenizer (printable ASCII) next to a synthetic checkpoint, so that
    text-in/text-out tools work on it. Ids 0-2 are <unk>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    chars = [chr(c) for c in range(32, 127)][: vocab_size - len(specials)]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return Path(path)
