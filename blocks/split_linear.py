"""A linear layer over few rows on a CPU, computed as one batched product over row blocks of its weight.

A decode step multiplies a few rows by every weight, so its time is the time to read the weights.
For float32 on a CPU, `F.linear` over one to four rows reads them at about half the memory
bandwidth: 13 GB/s against 25 GB/s for a plain sum on the 2-core machine where this was measured
(2026-12-07, torch 2.13 with MKL), on one thread or two. The same product as `torch.bmm` over row
blocks of the weight reads them at 19–25 GB/s. One row through six layers of the 201 M bench model
took 12–19 ms against 24–32 ms, through four layers of the 99.5 M one 6.5–8.6 ms against 17.5 ms,
and their LM heads 2–7 ms against 9–12 ms. Above four rows (measured from 6 to 16), and for
bfloat16, the batched form was as often slower as faster (by up to a quarter, depending on the
shapes), so those go through the layer itself. Each output is the same dot product; only the
kernel differs (the results agree to float32 rounding).
"""

from __future__ import annotations

import torch
from torch import nn

MAX_ROWS = 4


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, through row blocks of the weight where that reads it faster."""
    weight = getattr(module, "weight", None)
    if (
        type(module) is not nn.Linear
        or type(weight) not in (torch.Tensor, nn.Parameter)  # quantized weights are tensor subclasses
        or weight.dtype != torch.float32
        or weight.device.type != "cpu"
        or x.dtype != torch.float32
    ):
        return module(x)
    rows = x.numel() // x.shape[-1]
    blocks = max(2, torch.get_num_threads())
    if rows > MAX_ROWS or weight.shape[0] % blocks or not weight.is_contiguous():
        return module(x)
    flat = x.reshape(rows, x.shape[-1])
    split = weight.view(blocks, weight.shape[0] // blocks, weight.shape[1])
    out = torch.bmm(split, flat.t().expand(blocks, -1, -1))  # [blocks, out / blocks, rows]
    out = out.permute(2, 0, 1).reshape(*x.shape[:-1], weight.shape[0])
    return out if module.bias is None else out + module.bias
