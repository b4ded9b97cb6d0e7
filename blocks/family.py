"""Model families: the transformers classes that run one decoder layer of each supported architecture.

A family is found by the `model_type` of a checkpoint's config. All supported families share the
Llama tensor layout (`model.layers.{i}.…`, `model.embed_tokens`, `model.norm`, `lm_head`), so only
the classes differ.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from transformers import PretrainedConfig

from blocks.errors import UnsupportedModelError

# model_type -> class-name prefix inside transformers.models.<model_type>.modeling_<model_type>
_PREFIXES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
}

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class Family:
    model_type: str
    layer_class: type
    rotary_class: type
    norm_class: type

    @staticmethod
    def layer_prefix(index: int) -> str:
        return f"model.layers.{index}."

    embed_name = "model.embed_tokens.weight"
    norm_name = "model.norm.weight"
    lm_head_name = "lm_head.weight"


def supported_model_types() -> list[str]:
    return sorted(_PREFIXES)


def get_family(config: PretrainedConfig) -> Family:
    model_type = getattr(config, "model_type", None)
    prefix = _PREFIXES.get(model_type)
    if prefix is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return Family(
        model_type=model_type,
        layer_class=getattr(module, f"{prefix}DecoderLayer"),
        rotary_class=getattr(module, f"{prefix}RotaryEmbedding"),
        norm_class=getattr(module, f"{prefix}RMSNorm"),
    )


def attention_kind(config: PretrainedConfig, layer_index: int) -> str:
    """Which causal mask layer `layer_index` needs, decided exactly as the full transformers model does."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer_index]
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return SLIDING_ATTENTION
    return FULL_ATTENTION
