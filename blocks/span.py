"""BlockSpan: a contiguous range of decoder layers that runs on hidden states with a KV cache."""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from blocks.family import FULL_ATTENTION, SLIDING_ATTENTION, attention_kind

logger = logging.getLogger(__name__)

_MASK_BUILDERS = {FULL_ATTENTION: create_causal_mask, SLIDING_ATTENTION: create_sliding_window_causal_mask}


class BlockSpan:
    """Layers `[start, end)` of a model, their rotary embedding, and nothing else.

    Each layer is built with its global index (so a family picks sliding or full attention as the
    full model does) and then addresses the span's own cache by its local index.
    """

    def __init__(self, config: PretrainedConfig, layers: list[torch.nn.Module], rotary: torch.nn.Module, start: int):
        self.config = config
        self.layers = layers
        self.rotary = rotary
        self.start = start
        self.end = start + len(layers)
        self.kinds = [attention_kind(config, start + i) for i in range(len(layers))]
        for local_index, layer in enumerate(layers):
            layer.self_attn.layer_idx = local_index
        first = next(layers[0].parameters())
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device

    def __len__(self) -> int:
        return len(self.layers)

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    def cache_length(self, cache: DynamicCache | None, block: int | None = None) -> int:
        """Tokens already in `cache` for `block` (default: the span's first block)."""
        if cache is None:
            return 0
        local = (self.start if block is None else block) - self.start
        return cache.get_seq_length(local) if local < len(cache.layers) else 0

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        cache: DynamicCache | None = None,
        attention_mask: torch.Tensor | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """Runs `hidden` [batch, tokens, hidden_size] through blocks `[start, end)` (global indices,
        default: the whole span), appending to `cache` if given.

        `attention_mask` [batch, past + tokens] (1 = real token, 0 = padding) follows transformers'
        convention: positions are counted over real tokens only, as `generate()` does.
        """
        first = (self.start if start is None else start) - self.start
        last = (self.end if end is None else end) - self.start
        if not 0 <= first < last <= len(self.layers):
            raise ValueError(f"blocks {start}:{end} are not within this span {self.start}:{self.end}")
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        past = self.cache_length(cache, first + self.start)
        position_ids = _position_ids(hidden, past, attention_mask)
        mask_args = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
            layer_idx=first,
        )
        kinds = self.kinds[first:last]
        masks = {kind: _MASK_BUILDERS[kind](**mask_args) for kind in set(kinds)}
        position_embeddings = self.rotary(hidden, position_ids)
        for layer, kind in zip(self.layers[first:last], kinds):
            hidden = layer(
                hidden,
                attention_mask=masks[kind],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return hidden


def _position_ids(hidden: torch.Tensor, past: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    batch, tokens = hidden.shape[:2]
    if attention_mask is None:
        positions = torch.arange(past, past + tokens, device=hidden.device)
        return positions.unsqueeze(0).expand(batch, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -tokens:].to(hidden.device)


