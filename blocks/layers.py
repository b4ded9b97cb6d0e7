"""The decoder layer of the supported families (Llama, Mistral, Qwen2, Qwen3) in plain torch.

Written to compute exactly what transformers' layers compute (same operations in the same order,
same attention kernel inputs), without importing transformers, whose modeling code costs every
server seconds of start-up. Tensor names match the checkpoints' (`self_attn.q_proj.weight`, …), so
`load_state_dict` takes a block's tensors as they are stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from blocks.adapters import LoraAdapter, lora_delta
from blocks.architecture import Architecture, Rope
from blocks.split_linear import linear as split_linear

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.eps)
        return self.weight * hidden.to(dtype)


class KVCache:
    """Keys and values of the tokens a session has sent, per layer of a span: [batch, kv_heads, tokens, head_dim]."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def length(self, layer: int) -> int:
        keys = self.keys[layer]
        return 0 if keys is None else keys.shape[2]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values


@dataclass
class Segment:
    """One caller's rows in a packed batch: `batch × tokens` rows with their own masks (boolean
    [batch, 1, tokens, kv] per attention kind, or None for plain causal), cache and LoRA adapter."""

    batch: int
    tokens: int
    masks: dict[str, Optional[torch.Tensor]]
    cache: Any
    adapter: Optional[LoraAdapter] = None

    @property
    def size(self) -> int:
        return self.batch * self.tokens


def inverse_frequencies(rope: Rope, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2], attention scaling) as transformers' `ROPE_INIT_FUNCTIONS` compute them."""
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    return _yarn(rope, dim, max_position_embeddings)


def _yarn(rope: Rope, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    original = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / original

    def mscale(scale: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * math.log(scale) + 1.0

    attention_factor = rope.attention_factor if rope.attention_factor is not None else mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, float(attention_factor)


class Rotary(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        inv_freq, self.scaling = inverse_frequencies(arch.rope, arch.head_dim, arch.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=like.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(like.dtype), (emb.sin() * self.scaling).to(like.dtype)


def _project(linear: nn.Module, x: torch.Tensor, segments: "list[Segment]", block: int, module: str) -> torch.Tensor:
    """`linear` over all rows, plus each segment's LoRA on its own rows (as peft adds it)."""
    out = split_linear(linear, x)
    if all(segment.adapter is None for segment in segments):
        return out
    offset = 0
    for segment in segments:
        rows = slice(offset, offset + segment.size)
        offset += segment.size
        lora = segment.adapter.lookup(block, module) if segment.adapter is not None else None
        if lora is not None:
            out[rows] = out[rows] + lora_delta(x[rows], lora).to(out.dtype)
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, heads, tokens, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, tokens, dim).reshape(batch, heads * groups, tokens, dim)


class Attention(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.head_dim = arch.head_dim
        self.groups = arch.num_attention_heads // arch.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(arch.hidden_size, arch.num_attention_heads * arch.head_dim, bias=arch.qkv_bias)
        self.k_proj = nn.Linear(arch.hidden_size, arch.num_key_value_heads * arch.head_dim, bias=arch.qkv_bias)
        self.v_proj = nn.Linear(arch.hidden_size, arch.num_key_value_heads * arch.head_dim, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(arch.num_attention_heads * arch.head_dim, arch.hidden_size, bias=arch.o_bias)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.qk_norm = arch.qk_norm

    def forward(
        self,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        segments: "list[Segment]",
        kind: str,
        layer: int,
        block: int,
    ) -> torch.Tensor:
        """`hidden` [rows, hidden_size]: the rows of every segment, one after the other, and `cos_sin`
        [rows, head_dim] their rotary embedding. Projections and rotary run over all rows at once;
        cache and attention run per segment (`layer`: its index in the span's cache; `block`: in the model)."""
        heads_shape = (hidden.shape[0], -1, self.head_dim)
        queries = _project(self.q_proj, hidden, segments, block, "self_attn.q_proj").view(heads_shape)
        keys = _project(self.k_proj, hidden, segments, block, "self_attn.k_proj").view(heads_shape)
        if self.qk_norm:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        values = _project(self.v_proj, hidden, segments, block, "self_attn.v_proj").view(heads_shape)
        cos, sin = (t.unsqueeze(1) for t in cos_sin)
        queries = queries * cos + _rotate_half(queries) * sin
        keys = keys * cos + _rotate_half(keys) * sin
        outputs = []
        offset = 0
        for segment in segments:
            rows = slice(offset, offset + segment.size)
            offset += segment.size
            shape = (segment.batch, segment.tokens, -1, self.head_dim)
            query, key = queries[rows].view(shape).transpose(1, 2), keys[rows].view(shape).transpose(1, 2)
            value = values[rows].view(shape).transpose(1, 2)
            if segment.cache is not None:
                key, value = segment.cache.update(layer, key, value)
            output = _sdpa(query, key, value, segment.masks[kind], self.groups, self.scaling)
            outputs.append(output.reshape(segment.size, -1))
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return _project(self.o_proj, output, segments, block, "self_attn.o_proj")


def _sdpa(query, key, value, mask, groups: int, scaling: float) -> torch.Tensor:
    """Scaled dot-product attention with the same kernel inputs as transformers' sdpa integration."""
    q_len = query.shape[2]
    kwargs = {}
    if groups > 1:
        if mask is None and key.shape[-1] <= 256:
            kwargs["enable_gqa"] = True
        elif q_len == 1:
            batch, heads, _, dim = query.shape
            query = query.reshape(batch, heads // groups, groups, dim)
            if mask is not None and mask.shape[1] != 1:
                mask = mask.reshape(batch, heads // groups, groups, -1)
        else:
            key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    is_causal = q_len > 1 and mask is None
    if is_causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, is_causal=is_causal, **kwargs
    )
    output = output.reshape(output.shape[0], -1, q_len, value.shape[-1])
    return output.transpose(1, 2).contiguous()


class MLP(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=arch.mlp_bias)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=arch.mlp_bias)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=arch.mlp_bias)
        self.act = _ACTIVATIONS[arch.hidden_act]

    def forward(self, x: torch.Tensor, segments: "list[Segment]", block: int) -> torch.Tensor:
        gate = _project(self.gate_proj, x, segments, block, "mlp.gate_proj")
        inner = self.act(gate) * _project(self.up_proj, x, segments, block, "mlp.up_proj")
        return _project(self.down_proj, inner, segments, block, "mlp.down_proj")


class DecoderLayer(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.self_attn = Attention(arch)
        self.mlp = MLP(arch)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        segments: "list[Segment]",
        kind: str,
        layer: int,
        block: int,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos_sin, segments, kind, layer, block)
        return hidden + self.mlp(self.post_attention_layernorm(hidden), segments, block)
