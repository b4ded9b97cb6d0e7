"""A Hugging Face checkpoint directory: its config, where each tensor lives, and its identity.

Only `safetensors` files are read, and only the tensors asked for, so a server hosting 8 of 80
blocks reads about a tenth of the bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import defaultdict
from functools import cached_property
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from blocks.architecture import Architecture
from blocks.errors import CheckpointError
from blocks.family import Family, get_family
from blocks.quantization import bytes_per_weight, is_quantized

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_INDEX_FILE = "model.safetensors.index.json"
_FINGERPRINT_BYTES = 1 << 20


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


class Checkpoint:
    """Read-only view of `config.json` + `*.safetensors` in one local directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} is not a checkpoint directory: config.json not found")
        self.config: Architecture = Architecture.from_file(self.path / "config.json")
        self.family: Family = get_family(self.config)

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @cached_property
    def weight_map(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file that holds it."""
        index = self.path / _INDEX_FILE
        if index.is_file():
            with open(index) as f:
                mapping = json.load(f)["weight_map"]
            return {name: self.path / file for name, file in mapping.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.path}")
        result = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    result[name] = file
        return result

    def block_tensor_names(self, index: int) -> list[str]:
        prefix = self.family.layer_prefix(index)
        names = [name for name in self.weight_map if name.startswith(prefix)]
        if not names:
            raise CheckpointError(f"checkpoint {self.path} has no tensors for block {index}")
        return names

    def read(
        self, names: Iterable[str], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Reads exactly the named tensors, each file opened once."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            file = self.weight_map.get(name)
            if file is None:
                raise CheckpointError(f"tensor {name!r} not found in checkpoint {self.path}")
            by_file[file].append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        return tensors

    def block_bytes(self, index: int, dtype: torch.dtype, quant: str = "none") -> int:
        """Memory one block's weights take in `dtype` (its linear weights stored as `quant`), from the
        files' headers (no tensor is read)."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in self.block_tensor_names(index):
            by_file[self.weight_map[name]].append(name)
        total = 0.0
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    numel = math.prod(f.get_slice(name).get_shape())
                    size = bytes_per_weight(quant, dtype) if is_quantized(name) else bytes_per_weight("none", dtype)
                    total += numel * size
        return int(total)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV-cache memory of one token in one block."""
        config = self.config
        return 2 * config.num_key_value_heads * config.head_dim * torch.empty(0, dtype=dtype).element_size()

    @cached_property
    def config_digest(self) -> str:
        """Digest of the architecture: servers and clients compare it to know they run the same model."""
        return self.config.digest

    @cached_property
    def fingerprint(self) -> str:
        """Digest of config and weights, cheap enough for 100 GB checkpoints.

        Hashes each weight file's header (names, shapes, offsets) and the first MiB of its tensor data,
        which differs between fine-tunes of the same architecture.
        """
        digest = hashlib.sha256(self.config_digest.encode())
        for file in sorted(set(self.weight_map.values())):
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                digest.update(f.read(header_len))
                digest.update(f.read(_FINGERPRINT_BYTES))
        return digest.hexdigest()

    @property
    def default_model_name(self) -> str:
        """A DHT-safe name that every peer holding the same checkpoint derives identically."""
        return f"{self.family.model_type}-{self.num_blocks}l-{self.hidden_size}h-{self.fingerprint[:12]}"


_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def validate_model_name(name: str) -> str:
    """Model names become DHT keys (`NAME.block`): keep them short and unambiguous."""
    if not _MODEL_NAME_RE.match(name) or name.endswith(".") or ".." in name:
        raise ValueError(f"invalid model name {name!r}: use 1-128 characters from letters, digits, '_', '-', '.'")
    return name
