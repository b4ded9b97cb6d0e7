"""Quantized blocks: the linear projections of a decoder layer stored as int8 or NF4, for servers that
lend less memory than a model's full precision needs (`swarm.serve --quant`).

- `int8`: weight-only int8, per output channel (torchao's `Int8WeightOnlyConfig`). Chosen by measuring
  it against bitsandbytes' `Linear8bitLt` on a 2-core CPU (a 1024 → 2816 projection, one row: 0.66 ms
  against 3.1 ms; 256 rows: 14.5 ms against 15.8 ms; float32 0.38 and 11.5 ms).
- `nf4`: 4-bit NormalFloat in blocks of 64 weights (bitsandbytes' `Linear4bit`). On a CPU it
  dequantizes the weight for every product (0.86 ms for that projection and one row).

Norms, rotary embeddings and activations stay in the span's dtype; the KV cache is not quantized.
Quantizing is deterministic: every server (and every referee) that quantizes the same checkpoint the
same way holds the same weights. The libraries are imported only when a mode asks for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

QUANT_MODES = ("none", "int8", "nf4")
NF4_BLOCK = 64  # weights per NF4 block (bitsandbytes' default), each with an absmax
NF4_NESTED_BLOCK = 256  # absmaxes per block of the nested quantization of absmaxes (8-bit, float32 scale)


def valid_quant(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}: one of {', '.join(QUANT_MODES)}")
    return mode


def is_quantized(name: str) -> bool:
    """Whether a block's tensor (`self_attn.q_proj.weight`, …) is stored quantized: the weights of its
    linear projections; their biases, the norms and everything else are not."""
    return name.endswith("_proj.weight")


def bytes_per_weight(mode: str, dtype: torch.dtype) -> float:
    """Memory one weight of a linear projection takes, its share of scales included."""
    if mode == "int8":
        return 1.0
    if mode == "nf4":
        return 0.5 + (1 + 4 / NF4_NESTED_BLOCK) / NF4_BLOCK
    return torch.empty(0, dtype=dtype).element_size()


def quantize_layer(layer: nn.Module, mode: str, device: torch.device | str) -> nn.Module:
    """`layer` (on `device`) with its linear projections quantized in place; `mode` "none" leaves it."""
    linears = [(name, module) for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
    if mode == "none" or not linears:
        return layer
    _own_memory(layer)
    if mode == "int8":
        with _quiet("torchao", "torch.utils._pytree"):  # it warns of CUDA kernels a CPU has no use for
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

        for _, module in linears:  # one at a time: each one's temporaries are handed back before the next
            quantize_(module, Int8WeightOnlyConfig())
            _return_freed_memory()
    elif mode == "nf4":
        for name, module in linears:
            _set_child(layer, name, _nf4(module, device))
            _return_freed_memory()
    else:
        raise ValueError(f"unknown quantization {mode!r}")
    return layer


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Warnings of these loggers (and their children) are dropped inside the block."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _return_freed_memory() -> None:
    """Hands the block's full-precision weights, just freed, back to the system: glibc's allocator
    would keep them for reuse, and a quantized span would stay as resident as a full one. (Reference
    counting has freed them already: no garbage collection needed.)"""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


def _own_memory(layer: nn.Module) -> None:
    """Tensors read from a checkpoint may be views of the file's memory map, and one small tensor
    left there (a norm's weight) keeps the whole mapping, and every page of it that quantizing read,
    resident: the tensors that stay unquantized get memory of their own."""
    with torch.no_grad():
        for name, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
            if not is_quantized(name):
                tensor.data = tensor.data.clone()


def _nf4(linear: nn.Linear, device: torch.device | str) -> nn.Module:
    with _quiet("bitsandbytes"):
        import bitsandbytes as bnb

    dtype = linear.weight.dtype
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        quant_type="nf4",
        device="meta",
    )
    weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCK, compress_statistics=True
    )
    quantized.weight = weight.to(device)  # quantizes
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return quantized


def _set_child(root: nn.Module, dotted: str, child: nn.Module) -> None:
    parent_name, _, attribute = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attribute, child)


def resident_bytes(modules: Iterable[nn.Module]) -> int:
    """The memory the modules' parameters and buffers really hold (a quantized tensor counted by the
    plain tensors it is made of, its scales included)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            total += _tensor_bytes(tensor, seen)
        for sub in module.modules():
            state = getattr(getattr(sub, "weight", None), "quant_state", None)
            if state is not None:  # bitsandbytes keeps the NF4 absmaxes (themselves quantized) beside the weight
                total += _tensor_bytes(state.absmax, seen)
                if state.state2 is not None:
                    total += _tensor_bytes(state.state2.absmax, seen)
    return total


def _tensor_bytes(tensor: torch.Tensor, seen: set[int]) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass made of plain tensors (torchao's int8)
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name), seen) for name in names)
    storage = tensor.untyped_storage()
    if storage.data_ptr() in seen:
        return 0
    seen.add(storage.data_ptr())
    return storage.nbytes()
