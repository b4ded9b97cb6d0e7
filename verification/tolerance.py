"""Whether two computations of a span agree: the largest relative L2 error over positions, against a
tolerance for the less precise of the two dtypes, measured on honest servers (see `TOLERANCE`)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

# Largest relative L2 error per position that honest servers of this dtype reach against a float32
# recomputation, with margin. Measured (`tests/behaviour/test_verify.py` keeps the random-model figures honest):
# float32 KV-cached vs stateless ≤ 3.2e-6; float16 ≤ 7.4e-3 and bfloat16 ≤ 5.1e-2 over spans of
# 1–30 blocks of SmolLM2-135M and a random Llama. A float32 server computing with bfloat16 or float16
# weights or activations is 9e-4 or more away.
TOLERANCE = {torch.float32: 3e-4, torch.float16: 3e-2, torch.bfloat16: 0.15}
MEASURED_BLOCKS = 30  # deeper spans than measured get a tolerance growing with sqrt(depth)
# A quantized server is only ever compared with a recomputation of the same quantization (its weights
# are then the same: quantizing is deterministic), whose activations may be of another dtype. Against
# a float32 recomputation that quantizes the same way, measured over spans of 1–30 blocks of
# SmolLM2-135M and a random Llama: float32 servers ≤ 1.9e-6 (int8 and nf4 alike); bfloat16 ones ≤ 0.08
# (int8) and ≤ 0.135 (nf4, whose 4-bit blocks are scaled from bfloat16 weights there). Against an
# unquantized float32 recomputation the error is far larger (int8 ≤ 0.11, nf4 ≤ 0.75 over 30 blocks:
# as large as a wrong answer's), so that comparison is never made.
QUANT_FACTOR = {"none": 1.0, "int8": 1.0, "nf4": 1.5}


def least_precise(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype of the largest tolerance (one not in the table counts as bfloat16)."""
    return max(dtypes, key=lambda dtype: TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16]))


def tolerance(first: torch.dtype, second: torch.dtype, blocks: int, quant: str = "none") -> float:
    """How far two computations of `blocks` blocks in these dtypes may be apart, both with weights
    quantized as `quant` (the same for both: see `QUANT_FACTOR`)."""
    base = TOLERANCE.get(least_precise([first, second]), TOLERANCE[torch.bfloat16]) * QUANT_FACTOR[quant]
    return base * math.sqrt(max(1.0, blocks / MEASURED_BLOCKS))


def discrepancy(claimed: torch.Tensor, reference: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """Largest relative L2 error over positions [batch, tokens, hidden]; padding (mask 0) is ignored."""
    claimed, reference = claimed.float(), reference.float()
    errors = (claimed - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-6)
    if mask is not None:
        errors = errors[mask.bool()]
    return float(errors.max()) if errors.numel() else 0.0
