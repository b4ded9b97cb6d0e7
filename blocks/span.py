"""BlockSpan: a contiguous range of decoder layers that runs on hidden states with a KV cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from blocks.adapters import LoraAdapter
from blocks.architecture import SLIDING_ATTENTION, Architecture
from blocks.kv_pool import KVPool
from blocks.layers import DecoderLayer, KVCache, Rotary, Segment

logger = logging.getLogger(__name__)


class BlockSpan:
    """Layers `[start, end)` of a model, their rotary embedding, and nothing else.

    A span's cache holds one entry per layer of the span, addressed by the layer's local index.
    """

    def __init__(
        self, config: Architecture, layers: list[DecoderLayer], rotary: Rotary, start: int, quant: str = "none"
    ):
        self.config = config
        self.quant = quant  # how the layers' linear weights are stored (`blocks.quantization`)
        self.adapters: dict[str, LoraAdapter] = {}  # the LoRA adapters served with it, by name
        self.layers = layers
        self.rotary = rotary
        self.start = start
        self.end = start + len(layers)
        self.kinds = [config.attention_kind(start + i) for i in range(len(layers))]
        first = layers[0].input_layernorm.weight  # never quantized
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device

    def __len__(self) -> int:
        return len(self.layers)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def cache_length(self, cache: KVCache | None, block: int | None = None) -> int:
        """Tokens already in `cache` for `block` (default: the span's first block)."""
        if cache is None:
            return 0
        return cache.length((self.start if block is None else block) - self.start)

    def kv_bytes_per_token(self) -> int:
        """What one token's keys and values take in every layer of the span."""
        config = self.config
        element = torch.empty(0, dtype=self.dtype).element_size()
        return len(self.layers) * 2 * config.num_key_value_heads * config.head_dim * element

    def new_pool(self, tokens: int) -> KVPool:
        """Preallocated KV memory for `tokens` tokens in every layer of the span."""
        return KVPool(
            len(self.layers), self.config.num_key_value_heads, self.config.head_dim, tokens, self.dtype, self.device
        )

    def forward(
        self,
        hidden: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        start: int | None = None,
        end: int | None = None,
        adapter: Optional[LoraAdapter] = None,
    ) -> torch.Tensor:
        """Runs `hidden` [batch, tokens, hidden_size] through blocks `[start, end)` (global indices,
        default: the whole span), appending to `cache` (a `KVCache` or `PooledCache`) if given.

        `attention_mask` [batch, past + tokens] (1 = real token, 0 = padding) follows transformers'
        convention: positions are counted over real tokens only, as `generate()` does.
        """
        return self.forward_batch([SpanInput(hidden, cache, attention_mask, adapter)], start, end)[0]

    @torch.inference_mode()
    def forward_batch(
        self, inputs: Sequence[SpanInput], start: int | None = None, end: int | None = None
    ) -> list[torch.Tensor]:
        """Runs several callers' steps through blocks `[start, end)` as one batch: their rows are packed
        into one tensor for every projection and MLP, while each keeps its own positions, mask and
        cache in attention. Each output is what `forward` would return for that input alone."""
        first = (self.start if start is None else start) - self.start
        last = (self.end if end is None else end) - self.start
        if not 0 <= first < last <= len(self.layers):
            raise ValueError(f"blocks {start}:{end} are not within this span {self.start}:{self.end}")
        kinds = self.kinds[first:last]
        window = self.config.sliding_window
        segments, rows, cos, sin = [], [], [], []
        for item in inputs:
            hidden = item.hidden.to(device=self.device, dtype=self.dtype)
            batch, tokens = hidden.shape[:2]
            past = self.cache_length(item.cache, first + self.start)
            masks = {
                kind: causal_mask(
                    batch,
                    tokens,
                    past,
                    item.attention_mask,
                    hidden.device,
                    window if kind == SLIDING_ATTENTION else None,
                )
                for kind in set(kinds)
            }
            item_cos, item_sin = self.rotary(hidden, _position_ids(hidden, past, item.attention_mask))
            cos.append(item_cos.reshape(batch * tokens, -1))
            sin.append(item_sin.reshape(batch * tokens, -1))
            segments.append(Segment(batch, tokens, masks, item.cache, item.adapter))
            rows.append(hidden.reshape(batch * tokens, -1))
        if len(rows) == 1:
            packed, cos_sin = rows[0], (cos[0], sin[0])
        else:
            packed, cos_sin = torch.cat(rows), (torch.cat(cos), torch.cat(sin))
        for index, (layer, kind) in enumerate(zip(self.layers[first:last], kinds), start=first):
            packed = layer(packed, cos_sin, segments, kind, index, self.start + index)
        outputs, offset = [], 0
        for segment in segments:
            outputs.append(packed[offset : offset + segment.size].view(segment.batch, segment.tokens, -1))
            offset += segment.size
        return outputs


@dataclass(frozen=True)
class SpanInput:
    """One caller's step: hidden states [batch, tokens, hidden_size], its cache and attention mask."""

    hidden: torch.Tensor
    cache: Any = None
    attention_mask: Optional[torch.Tensor] = None
    adapter: Optional[LoraAdapter] = None  # a LoRA adapter this caller's rows run with


def causal_mask(
    batch: int,
    tokens: int,
    past: int,
    attention_mask: torch.Tensor | None,
    device: torch.device,
    window: int | None = None,
) -> torch.Tensor | None:
    """Boolean [batch, 1, tokens, past + tokens] mask (True = attend), or None where plain causal
    attention is the same (then SDPA's `is_causal` is used, as transformers does)."""
    kv_length = past + tokens
    padding = None
    if attention_mask is not None:
        padding = attention_mask.to(device=device, dtype=torch.bool)
        if padding.shape[-1] < kv_length:
            padding = torch.nn.functional.pad(padding, (0, kv_length - padding.shape[-1]))
        padding = padding[:, :kv_length]
    if window is None or kv_length < window:
        no_padding = padding is None or bool(padding.all())
        if (tokens == 1 or kv_length == tokens) and no_padding:
            return None
        if past == 0 and (padding is None or (bool(padding[:, :tokens].all()) and not bool(padding[:, tokens:].any()))):
            return None
    q_index = torch.arange(past, kv_length, device=device)[:, None]
    kv_index = torch.arange(kv_length, device=device)[None, :]
    mask = kv_index <= q_index
    if window is not None:
        mask = mask & (kv_index > q_index - window)
    mask = mask[None, None].expand(batch, 1, tokens, kv_length)
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    return mask


def _position_ids(hidden: torch.Tensor, past: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    batch, tokens = hidden.shape[:2]
    if attention_mask is None:
        positions = torch.arange(past, past + tokens, device=hidden.device)
        return positions.unsqueeze(0).expand(batch, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -tokens:].to(hidden.device)
