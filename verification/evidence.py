"""The evidence model: what a check claims, what a recomputation found, and what proves a server wrong
in a way a third party (the relay) can re-check from the server's own signed receipts."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import safetensors.torch
import torch

from protocol.receipts import Receipt, mask_digest, precision, verify
from protocol.tensors import tensor_digest


@dataclass
class Evidence:
    """What proves a server wrong: the disputed span and positions, digests of its input and of each
    party's output, who refereed, the accused's error against the referee (`claimed_error`, over
    `tolerance`) and the other party's (`verifier_error`). With the server's signed
    receipts and the tensors themselves (`inputs` at every position so far, its `outputs` at the
    disputed ones), a third party can re-check it (`evidence_body`, `check_receipts`)."""

    peer_id: str
    start_block: int
    end_block: int
    positions: tuple[int, int]
    input_digest: str
    claimed_digest: str
    verifier_id: str
    verifier_digest: str
    referee: str
    referee_digest: str
    claimed_error: float
    verifier_error: float
    tolerance: float
    model: str = ""
    session_id: str = ""
    dtype: str = "float32"
    quant: str = "none"
    adapter: str = ""
    receipts: tuple[Receipt, ...] = ()
    inputs: Optional[torch.Tensor] = field(default=None, repr=False)
    outputs: Optional[torch.Tensor] = field(default=None, repr=False)
    mask: Optional[torch.Tensor] = field(default=None, repr=False)
    at: float = field(default_factory=time.time)


def evidence_body(evidence: Evidence) -> dict:
    """The JSON body of `POST /api/v1/evidence` on a relay: receipts, and the tensors as base64 safetensors."""
    tensors = {"inputs": evidence.inputs.float().contiguous(), "outputs": evidence.outputs.contiguous()}
    if evidence.mask is not None:
        tensors["mask"] = evidence.mask.to(torch.int64).contiguous()
    return {
        "model": evidence.model,
        "peer_id": evidence.peer_id,
        "start_block": evidence.start_block,
        "end_block": evidence.end_block,
        "dtype": evidence.dtype,
        "quant": evidence.quant,
        "adapter": evidence.adapter,
        "session_id": evidence.session_id,
        "verified": evidence.positions[0],
        "receipts": [
            {
                "position": r.position,
                "tokens": r.tokens,
                "input_digest": r.input_digest,
                "output_digest": r.output_digest,
                "signature": r.signature,
            }
            for r in evidence.receipts
        ],
        "tensors": base64.b64encode(safetensors.torch.save(tensors)).decode(),
    }


def check_receipts(
    receipt_key: str,
    model: str,
    start: int,
    end: int,
    session_id: str,
    dtype: torch.dtype,
    receipts: Sequence[Receipt],
    inputs: torch.Tensor,
    outputs: torch.Tensor,
    verified: int,
    mask: Optional[torch.Tensor] = None,
    quant: str = "none",
    adapter: str = "",
) -> Optional[str]:
    """Why signed receipts do not prove that the server computed `outputs` (its outputs at positions
    [verified, end of inputs)) from exactly `inputs` (every position of the session from 0) in
    `dtype` with attention `mask` (None: every position), or None if they do: one receipt per step,
    contiguous from position 0, each signed by `receipt_key` over the dtype and the mask up to its
    step's end, the input digests over `inputs` in that dtype and the output digests over `outputs`."""
    total = inputs.shape[1]
    batch, name = inputs.shape[0], precision(str(dtype).removeprefix("torch."), quant, adapter)
    if outputs.shape[1] != total - verified:
        return f"outputs cover {outputs.shape[1]} positions, not the {total - verified} from {verified} to {total}"
    position = 0
    for receipt in sorted(receipts, key=lambda r: r.position):
        if receipt.position != position or receipt.tokens <= 0 or position + receipt.tokens > total:
            return f"receipts are not one contiguous run of steps from position 0 to {total} (at {position})"
        if position < verified < position + receipt.tokens:
            return f"position {verified} is not where a step starts"
        through = position + receipt.tokens
        attended = mask_digest(mask[:, :through] if mask is not None else None, batch, through)
        if not verify(receipt_key, receipt.message(model, start, end, session_id, name, attended), receipt.signature):
            return (
                f"the receipt of positions {position}:{through} is not signed by the server "
                f"(for this dtype and attention mask)"
            )
        if tensor_digest(inputs[:, position : position + receipt.tokens].to(dtype)) != receipt.input_digest:
            return f"inputs at positions {position}:{position + receipt.tokens} are not what the server signed"
        if (
            position >= verified
            and tensor_digest(outputs[:, position - verified : position - verified + receipt.tokens])
            != receipt.output_digest
        ):
            return f"outputs at positions {position}:{position + receipt.tokens} are not what the server signed"
        position += receipt.tokens
    if position != total:
        return f"receipts cover positions 0:{position}, the inputs 0:{total}"
    return None


@dataclass(frozen=True)
class Claim:
    """One span's outputs to check: positions [verified, end) of `outputs`, computed by `peer_id` in `dtype`
    from `inputs` (every position so far, [batch, end, hidden]). `session_id` is the span's session on
    that server, `rewinds` the positions it was rewound to so far (in order: a checker that keeps its
    own session of the span follows them), and `max_length` the longest that session may grow."""

    peer_id: str
    start: int
    end: int
    dtype: torch.dtype
    inputs: torch.Tensor
    outputs: torch.Tensor
    mask: Optional[torch.Tensor]
    verified: int
    model: str = ""
    session_id: str = ""
    receipts: tuple[Receipt, ...] = ()
    owner: str = ""  # the server's announced public_name: checks prefer servers of other owners
    rewinds: tuple[int, ...] = ()
    max_length: int = 0  # 0: as long as `inputs`
    quant: str = "none"  # how the server's weights are quantized: only a recomputation quantized alike judges it
    adapter: str = ""  # the LoRA adapter the span ran with: only a recomputation with it judges it


@dataclass(frozen=True)
class Recomputation:
    """A recomputation of a claim's outputs at positions [since, end) (`since` ≤ the claim's verified
    position): by whom (peer ids, or "client"), in which dtype."""

    by: str
    peers: frozenset[str]
    outputs: torch.Tensor
    dtype: torch.dtype
    since: int = 0
    quant: str = "none"

    def window(self, claim: "Claim") -> torch.Tensor:
        """The outputs at the positions the claim puts to the check, [claim.verified, end)."""
        return self.outputs[:, claim.verified - self.since :]
