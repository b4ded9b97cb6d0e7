"""Builds model parts from a checkpoint, reading only the tensors each part needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from blocks.checkpoint import Checkpoint
from blocks.errors import CheckpointError
from blocks.layers import DecoderLayer, RMSNorm, Rotary
from blocks.quantization import quantize_layer
from blocks.span import BlockSpan
from blocks.split_linear import linear

logger = logging.getLogger(__name__)


def load_span(
    checkpoint: Checkpoint,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
    quant: str = "none",
) -> BlockSpan:
    """Loads blocks `[start, end)`; `progress(i)` is called after each block is in memory. With `quant`
    (`blocks.quantization`), each block's projections are quantized as soon as it is read, so that
    memory holds the quantized blocks read so far and one block at full precision, never more."""
    if not 0 <= start < end <= checkpoint.num_blocks:
        raise ValueError(f"block range {start}:{end} is outside the model's 0:{checkpoint.num_blocks}")
    config, family = checkpoint.config, checkpoint.family
    layers = []
    for index in range(start, end):
        names = checkpoint.block_tensor_names(index)
        tensors = checkpoint.read(names, dtype=dtype, device=device)
        prefix = family.layer_prefix(index)
        with torch.device("meta"):
            layer = DecoderLayer(config)
        try:
            layer.load_state_dict({name[len(prefix) :]: t for name, t in tensors.items()}, strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"block {index} of {checkpoint.path} does not match its config: {e}") from e
        del tensors  # the layer holds them now: quantizing replaces them and lets them go
        layers.append(quantize_layer(layer.eval().requires_grad_(False), quant, device))
        if progress is not None:
            progress(index)
    rotary = Rotary(config).to(device)
    return BlockSpan(config, layers, rotary, start, quant)


@dataclass
class ModelHead:
    """What a client runs locally: token embeddings before the blocks, final norm and LM head after."""

    embed: torch.nn.Embedding
    norm: torch.nn.Module
    lm_head: torch.nn.Linear

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @torch.inference_mode()
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings on the head's device, wherever the ids are."""
        return self.embed(input_ids.to(self.embed.weight.device))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.lm_head.weight.dtype)
        return linear(self.lm_head, self.norm(hidden)).float()


def load_head(
    checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> ModelHead:
    config, family = checkpoint.config, checkpoint.family
    tied = family.lm_head_name not in checkpoint.weight_map
    if tied and not config.tie_word_embeddings:
        raise CheckpointError(f"checkpoint {checkpoint.path} has no {family.lm_head_name} and does not tie embeddings")
    names = [family.embed_name, family.norm_name] + ([] if tied else [family.lm_head_name])
    tensors = checkpoint.read(names, dtype=dtype, device=device)
    embed = torch.nn.Embedding.from_pretrained(tensors[family.embed_name], freeze=True)
    with torch.device("meta"):
        norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    norm.load_state_dict({"weight": tensors[family.norm_name]}, strict=True, assign=True)
    lm_weight = tensors[family.embed_name] if tied else tensors[family.lm_head_name]
    lm_head = torch.nn.Linear(lm_weight.shape[1], lm_weight.shape[0], bias=False, device="meta")
    lm_head.load_state_dict({"weight": lm_weight}, strict=True, assign=True)
    return ModelHead(embed=embed, norm=norm.eval(), lm_head=lm_head.eval().requires_grad_(False))
