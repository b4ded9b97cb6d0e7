"""Where a family's tensors live in a checkpoint.

All supported families (see `blocks.architecture`) share the Llama tensor layout
(`model.layers.{i}.…`, `model.embed_tokens`, `model.norm`, `lm_head`) and one decoder layer
(`blocks.layers`), configured by the checkpoint's `Architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocks.architecture import Architecture


@dataclass(frozen=True)
class Family:
    model_type: str

    @staticmethod
    def layer_prefix(index: int) -> str:
        return f"model.layers.{index}."

    embed_name = "model.embed_tokens.weight"
    norm_name = "model.norm.weight"
    lm_head_name = "lm_head.weight"


def get_family(config: Architecture) -> Family:
    return Family(model_type=config.model_type)
