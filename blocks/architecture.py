"""What a checkpoint's `config.json` says about its architecture, read without transformers.

Importing transformers' config classes pulls in `torch._dynamo` (seconds of start-up for every
server); the few fields a decoder layer needs are read here instead, with the defaults that
transformers' `LlamaConfig`, `MistralConfig`, `Qwen2Config` and `Qwen3Config` give missing keys,
so a span built from an `Architecture` computes what the transformers model computes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from blocks.errors import CheckpointError, UnsupportedModelError

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class _FamilyDefaults:
    num_key_value_heads: int | None  # None: as many as attention heads
    head_dim: int | None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int
    qkv_bias: bool | None  # None: from `attention_bias`
    o_bias: bool | None
    qk_norm: bool = False
    sliding_window: int | None = None
    uses_sliding_flag: bool = False  # Qwen: `sliding_window` counts only with `use_sliding_window`


_FAMILIES: dict[str, _FamilyDefaults] = {
    "llama": _FamilyDefaults(None, None, 2048, None, None),
    "mistral": _FamilyDefaults(8, None, 4096 * 32, False, False, sliding_window=4096),
    "qwen2": _FamilyDefaults(32, None, 32768, True, False, sliding_window=4096, uses_sliding_flag=True),
    "qwen3": _FamilyDefaults(32, 128, 32768, None, None, qk_norm=True, sliding_window=4096, uses_sliding_flag=True),
}


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


@dataclass(frozen=True)
class Rope:
    """Rotary embedding parameters (transformers' `rope_parameters`, standardised)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: Rope
    sliding_window: int | None
    layer_types: tuple[str, ...]
    tie_word_embeddings: bool
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def attention_kind(self, layer_index: int) -> str:
        return self.layer_types[layer_index]

    @property
    def digest(self) -> str:
        """Digest of everything that changes what a block computes: servers and clients compare it."""
        fields = asdict(self)
        fields.pop("raw")
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()

    @classmethod
    def from_file(cls, path: str | Path) -> "Architecture":
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from e
        if not isinstance(config, dict):
            raise CheckpointError(f"{path} does not hold a JSON object")
        return cls.from_dict(config)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "Architecture":
        model_type = config.get("model_type")
        defaults = _FAMILIES.get(model_type)  # type: ignore[arg-type]
        if defaults is None:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
            )
        try:
            return _build(config, model_type, defaults)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"config.json of this {model_type} checkpoint is invalid: {e!r}") from e


def _int(config: Mapping[str, Any], key: str, default: Any = KeyError) -> int:
    value = config.get(key, default)
    if value is KeyError:
        raise KeyError(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer, not {value!r}")
    return value


def _build(config: Mapping[str, Any], model_type: str, defaults: _FamilyDefaults) -> Architecture:
    hidden = _int(config, "hidden_size", 4096)
    heads = _int(config, "num_attention_heads", 32)
    layers = _int(config, "num_hidden_layers", 32)
    if heads == 0 or hidden == 0 or layers == 0:
        raise ValueError("hidden_size, num_attention_heads and num_hidden_layers must be positive")
    kv_heads = config.get("num_key_value_heads", defaults.num_key_value_heads)
    kv_heads = heads if kv_heads is None else _int({"num_key_value_heads": kv_heads}, "num_key_value_heads")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = config.get("head_dim", defaults.head_dim)
    head_dim = hidden // heads if head_dim is None else _int({"head_dim": head_dim}, "head_dim")
    attention_bias = bool(config.get("attention_bias", False))
    sliding = config.get("sliding_window", defaults.sliding_window)
    if defaults.uses_sliding_flag and not config.get("use_sliding_window", False):
        sliding = None
    if sliding is not None:
        sliding = _int({"sliding_window": sliding}, "sliding_window")
    layer_types = config.get("layer_types")
    if layer_types is None:
        if defaults.uses_sliding_flag:
            max_window_layers = _int(config, "max_window_layers", 28)
            layer_types = [
                SLIDING_ATTENTION if sliding is not None and i >= max_window_layers else FULL_ATTENTION
                for i in range(layers)
            ]
        else:
            layer_types = [SLIDING_ATTENTION if sliding is not None else FULL_ATTENTION] * layers
    if len(layer_types) != layers or any(kind not in (FULL_ATTENTION, SLIDING_ATTENTION) for kind in layer_types):
        raise ValueError(
            f"layer_types must name {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r} for each of {layers} layers"
        )
    if SLIDING_ATTENTION in layer_types and not sliding:
        raise ValueError("sliding attention layers need a positive sliding_window")
    hidden_act = config.get("hidden_act", "silu")
    if hidden_act not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return Architecture(
        model_type=model_type,
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=_int(config, "intermediate_size"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_int(config, "vocab_size"),
        max_position_embeddings=_int(config, "max_position_embeddings", defaults.max_position_embeddings),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        hidden_act=hidden_act,
        qkv_bias=attention_bias if defaults.qkv_bias is None else defaults.qkv_bias,
        o_bias=attention_bias if defaults.o_bias is None else defaults.o_bias,
        mlp_bias=bool(config.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=defaults.qk_norm,
        rope=_rope(config),
        sliding_window=sliding,
        layer_types=tuple(layer_types),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        raw=dict(config),
    )


def _rope(config: Mapping[str, Any]) -> Rope:
    """transformers' standardisation: `rope_parameters` (or legacy `rope_scaling`) + `rope_theta`."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"rotary embedding type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported")
    rope = Rope(
        rope_type=rope_type,
        theta=float(theta),
        factor=None if params.get("factor") is None else float(params["factor"]),
        low_freq_factor=params.get("low_freq_factor"),
        high_freq_factor=params.get("high_freq_factor"),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        attention_factor=params.get("attention_factor"),
        beta_fast=params.get("beta_fast"),
        beta_slow=params.get("beta_slow"),
        truncate=bool(params.get("truncate", True)),
    )
    needed = {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "yarn": ("original_max_position_embeddings",),
    }.get(rope_type, ())
    missing = [name for name in needed if getattr(rope, name) is None]
    if missing:
        raise ValueError(f"rope type {rope_type!r} needs {', '.join(missing)}")
    return rope
