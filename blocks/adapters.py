"""LoRA adapters in PEFT's format, applied to a span's projections per session.

An adapter is a directory as `peft` saves it: `adapter_config.json` and `adapter_model.safetensors`
(`base_model.model.model.layers.{i}.{module}.lora_A.weight` [r, in] and `lora_B.weight` [out, r]).
Only safetensors are read, never a pickle (`adapter_model.bin`): a file from a stranger must not run
code. A span reads only its own blocks' tensors. What PEFT can express beyond plain LoRA on the
decoder layers' projections (DoRA, LoRA biases, modules to save, per-module alphas, …) is refused
with a message naming it, rather than computed differently.

Each projection adds `lora_B(lora_A(x)) · scaling` to its output for the rows of sessions that use
the adapter, as `peft`'s `Linear` does (`scaling` = alpha / r, or alpha / √r with rsLoRA), so a
session's output is the local `peft` model's.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from blocks.architecture import Architecture
from blocks.errors import CheckpointError

MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
MAX_RANK = 1024
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(" + "|".join(map(re.escape, MODULES)) + r")\.lora_([AB])\.weight$"
)
# PEFT settings that change what an adapter computes beyond plain LoRA: each must be off.
_UNSUPPORTED = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "layer_replication",
    "alpha_pattern",
    "alora_invocation_tokens",
    "trainable_token_indices",
    "target_parameters",
    "arrow_config",
)


class AdapterError(CheckpointError, ValueError):
    """An adapter that cannot be used: the message says why."""


@dataclass(frozen=True)
class AdapterConfig:
    """What of `adapter_config.json` the computation needs."""

    alpha: float
    rslora: bool = False

    def scaling(self, rank: int) -> float:
        return self.alpha / math.sqrt(rank) if self.rslora else self.alpha / rank

    @classmethod
    def from_peft(cls, data: Mapping) -> "AdapterConfig":
        if not isinstance(data, Mapping):
            raise AdapterError("adapter_config.json must hold an object")
        if data.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"only LoRA adapters are supported, not {data.get('peft_type')!r}")
        if data.get("bias", "none") != "none":
            raise AdapterError(f"adapters with bias={data.get('bias')!r} are not supported (only 'none')")
        on = [name for name in _UNSUPPORTED if data.get(name)]
        if on:
            raise AdapterError(f"adapter settings not supported: {', '.join(on)}")
        alpha = data.get("lora_alpha", 8)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= 1e6:
            raise AdapterError(f"lora_alpha must be a positive number, got {alpha!r}")
        return cls(alpha=float(alpha), rslora=bool(data.get("use_rslora", False)))


@dataclass
class LoraAdapter:
    """One adapter's tensors for blocks [start, end) of a model: (A [r, in], B [out, r], scaling) per
    block (global index) and projection. `digest` identifies exactly these tensors (a prefix cache
    key and a receipt say which adapter computed)."""

    name: str
    start: int
    end: int
    layers: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = field(repr=False)
    digest: str = ""
    config: AdapterConfig = AdapterConfig(alpha=8.0)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for modules in self.layers.values() for a, b, _ in modules.values())

    def lookup(self, block: int, module: str) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
        return self.layers.get(block, {}).get(module)

    def covers(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end


def lora_delta(x: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
    """`lora_B(lora_A(x)) · scaling`, in the adapter's dtype, as peft computes it."""
    a, b, scaling = lora
    return F.linear(F.linear(x.to(a.dtype), a), b) * scaling


def adapter_from_tensors(
    name: str,
    config: AdapterConfig,
    tensors: Mapping[str, torch.Tensor],
    arch: Architecture,
    start: int,
    end: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> LoraAdapter:
    """The adapter for blocks [start, end) from PEFT-named tensors, every shape checked against the
    model's (an adapter of another model, or a malformed one, is refused with the first mismatch)."""
    dims = _dimensions(arch)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"unexpected tensor {key!r}: only LoRA weights of the decoder layers' projections")
        block, module, which = int(match.group(1)), match.group(2), match.group(3)
        if not 0 <= block < arch.num_hidden_layers:
            raise AdapterError(f"tensor {key!r} is for block {block}; the model has {arch.num_hidden_layers}")
        if start <= block < end:
            pairs.setdefault((block, module), {})[which] = tensor
    layers: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    digest = hashlib.sha256(f"{start}:{end}|{config.alpha}|{config.rslora}".encode())
    for (block, module), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"block {block} {module} has lora_{'A' if 'A' in pair else 'B'} without its pair")
        a, b = pair["A"], pair["B"]
        out_features, in_features = dims[module]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape[0] != out_features:
            raise AdapterError(
                f"block {block} {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit a "
                f"{in_features} → {out_features} projection"
            )
        rank = a.shape[0]
        if b.shape[1] != rank or not 0 < rank <= MAX_RANK:
            raise AdapterError(f"block {block} {module}: rank {rank} of lora_A and {b.shape[1]} of lora_B")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"block {block} {module}: LoRA weights must be floating point")
        a, b = a.to(device=device, dtype=dtype).contiguous(), b.to(device=device, dtype=dtype).contiguous()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"block {block} {module}: LoRA weights must be finite")
        layers.setdefault(block, {})[module] = (a, b, config.scaling(rank))
        for tensor in (a, b):
            digest.update(f"{block}.{module}{list(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return LoraAdapter(name, start, end, layers, digest.hexdigest(), config)


def check_adapter(path: str | Path, arch: Architecture, name: Optional[str] = None) -> LoraAdapter:
    """The whole adapter at `path`, every tensor checked against the model (AdapterError otherwise,
    or when it has no LoRA weights at all)."""
    adapter = load_adapter(path, arch, 0, arch.num_hidden_layers, name=name)
    if not adapter.layers:
        raise AdapterError(f"{path} holds no LoRA weights for this model's blocks")
    return adapter


def read_adapter_config(path: Path) -> AdapterConfig:
    try:
        data = json.loads((path / "adapter_config.json").read_text())
    except OSError as e:
        raise AdapterError(f"{path} is not a PEFT adapter: cannot read adapter_config.json ({e.strerror})") from None
    except ValueError as e:
        raise AdapterError(f"{path}/adapter_config.json is not valid JSON: {e}") from None
    return AdapterConfig.from_peft(data)


def load_adapter(
    path: str | Path,
    arch: Architecture,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    name: Optional[str] = None,
) -> LoraAdapter:
    """The adapter saved by `peft` at `path`, for blocks [start, end) only (named after its folder
    unless `name` is given)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    name = name or path.name
    if not re.match(NAME_PATTERN, name):
        raise AdapterError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    config = read_adapter_config(path)
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        raise AdapterError(
            f"{path} has no adapter_model.safetensors"
            + (
                f" ({', '.join(pickled)} is a pickle, which is never loaded: convert it to safetensors)"
                if pickled
                else ""
            )
        )
    tensors = {}
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                match = _KEY.match(key)
                if match is None or start <= int(match.group(1)) < end:
                    tensors[key] = f.get_tensor(key)
    except (OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"cannot read {file}: {e}") from None
    return adapter_from_tensors(name, config, tensors, arch, start, end, dtype, device)


def _dimensions(arch: Architecture) -> dict[str, tuple[int, int]]:
    """(out, in) of every projection of a decoder layer."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * head_dim, arch.num_key_value_heads * head_dim
    return {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (arch.intermediate_size, hidden),
        "mlp.up_proj": (arch.intermediate_size, hidden),
        "mlp.down_proj": (hidden, arch.intermediate_size),
    }
