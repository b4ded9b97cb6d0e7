"""Evidence against servers, re-checked before it counts: a proven fault is the heaviest mark on a
server's reliability; a false accusation is a mark on the accuser's API key.

The relay trusts neither side. It checks that the server really signed the disputed outputs for
exactly those inputs (its receipts, under the key its DHT record announces), then recomputes the
span itself, in float32 from its own copy of the checkpoint, and compares. Evidence whose receipts
do not hold, or whose outputs agree with the recomputation, is a false accusation; a key with
MAX_FALSE_ACCUSATIONS of them is not heard any more.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import secrets
import time
from concurrent.futures import Executor
from typing import Callable, Mapping, Optional

import safetensors.torch
import torch
from hivemind.p2p import P2P

from client import SpanPlan, SwarmError, forward_span
from dht.records import ServerInfo
from dht.swarm_dht import SwarmDHT
from protocol.receipts import Receipt
from relay.generation import ModelService
from relay.http import HTTPError
from relay.schemas import EvidenceReport
from relay.store import Store
from verification.evidence import Claim, check_receipts
from verification.referee import LocalReferee
from verification.tolerance import discrepancy, tolerance

logger = logging.getLogger(__name__)

MAX_FALSE_ACCUSATIONS = 3
OWN_ACCUSER = "relay"  # the relay's own generations, in place of an API key's hash
MAX_POSITIONS = 1 << 16
MAX_BATCH = 64


class EvidenceJudge:
    def __init__(
        self,
        store: Store,
        services: Mapping[str, ModelService],
        dht: Callable[[], Optional[SwarmDHT]],
        executor: Executor,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.services = services
        self.dht = dht
        self.executor = executor
        self.clock = clock
        self._one_at_a_time = asyncio.Semaphore(1)  # a re-check computes on the relay's cores: one at a time
        self._referees: dict[str, LocalReferee] = {}  # per model: each keeps the blocks it loaded

    async def judge(self, accuser: str, report: EvidenceReport) -> dict:
        """The verdict on `report` from API key `accuser` (its SHA-256); raises HTTPError when the
        evidence is refused: 403 (this key is no longer heard), 404 (unknown model or server),
        400 (malformed), 422 (it does not hold: counted against the key)."""
        row = await self.store.fetch_one("SELECT false_accusations FROM accusers WHERE key_hash = ?", accuser)
        if row is not None and row["false_accusations"] >= MAX_FALSE_ACCUSATIONS:
            raise HTTPError(
                403, f"this key made {row['false_accusations']} false accusations; its evidence is no longer accepted"
            )
        service = self.services.get(report.model)
        if service is None:
            raise HTTPError(404, f"the model {report.model!r} is not served by this relay")
        checkpoint = service.model.checkpoint
        if not report.start_block < report.end_block <= checkpoint.num_blocks:
            raise HTTPError(
                400,
                f"blocks {report.start_block}:{report.end_block} are not within the model's 0:{checkpoint.num_blocks}",
            )
        if report.adapter:  # the relay holds no adapter: it cannot judge, which is nobody's fault
            raise HTTPError(503, f"the relay cannot re-check a session that ran with LoRA adapter {report.adapter!r}")
        dtype = getattr(torch, report.dtype)  # one of the three names the schema allows
        inputs, outputs, mask = self._tensors(report, checkpoint.hidden_size, dtype)
        key = await self._receipt_key(report.model, checkpoint.num_blocks, report.peer_id)
        receipts = [
            Receipt(r.position, r.tokens, r.input_digest, r.output_digest, r.signature) for r in report.receipts
        ]
        problem = await asyncio.get_running_loop().run_in_executor(
            self.executor,
            lambda: check_receipts(
                key,
                report.model,
                report.start_block,
                report.end_block,
                report.session_id,
                dtype,
                receipts,
                inputs,
                outputs,
                report.verified,
                mask,
                report.quant,
            ),
        )
        if problem is not None:
            raise await self._false(accuser, f"the evidence does not hold: {problem}")

        judged = await self._error(
            service,
            Claim(
                peer_id=report.peer_id,
                start=report.start_block,
                end=report.end_block,
                dtype=dtype,
                inputs=inputs,
                outputs=outputs,
                mask=mask,
                verified=report.verified,
                quant=report.quant,  # signed in every receipt: the accuser cannot change it
            ),
        )
        if judged is None:
            raise HTTPError(
                503,
                f"the relay cannot hold blocks {report.start_block}:{report.end_block} in memory "
                f"to re-check this evidence",
            )
        error, limit = judged
        if error <= limit:
            raise await self._false(
                accuser,
                f"the server's signed outputs agree with the relay's recomputation "
                f"(relative error {error:.3g} within the tolerance {limit:.3g})",
            )
        summary = {
            "session_id": report.session_id,
            "positions": [report.verified, inputs.shape[1]],
            "dtype": report.dtype,
            "receipts": len(receipts),
        }
        # One fault per server and session, whatever stretch of it (and by whomever) it is sent.
        fingerprint = hashlib.sha256(json.dumps([report.peer_id, report.model, report.session_id]).encode()).hexdigest()
        count, new = await self.record_fault(
            report.peer_id,
            report.model,
            report.start_block,
            report.end_block,
            error,
            limit,
            accuser,
            summary,
            fingerprint,
        )
        return {
            "confirmed": True,
            "peer_id": report.peer_id,
            "relative_error": error,
            "tolerance": limit,
            "proven_faults": count,
            "already_known": not new,
        }

    async def record_fault(
        self,
        peer_id: str,
        model: str,
        start: int,
        end: int,
        error: float,
        limit: float,
        accuser: str,
        summary: dict,
        fingerprint: Optional[str] = None,
    ) -> tuple[int, bool]:
        """Stores a proven fault, unless one with the same `fingerprint` is stored (None: always new);
        returns how many are proven against `peer_id` now and whether this one was new."""
        fingerprint = fingerprint or secrets.token_hex(32)
        known = await self.store.fetch_one("SELECT id FROM faults WHERE fingerprint = ?", fingerprint)
        if known is None:
            await self.store.insert(
                "faults",
                {
                    "peer_id": peer_id,
                    "model": model,
                    "start_block": start,
                    "end_block": end,
                    "relative_error": error,
                    "tolerance": limit,
                    "accuser": accuser,
                    "evidence": json.dumps(summary),
                    "fingerprint": fingerprint,
                    "created_at": self.clock(),
                },
            )
            logger.warning(
                "proven fault of server %s on blocks %d:%d of %s (relative error %.3g > %.3g)",
                peer_id,
                start,
                end,
                model,
                error,
                limit,
            )
        count = (await self.store.fetch_one("SELECT COUNT(*) AS n FROM faults WHERE peer_id = ?", peer_id))["n"]
        return count, known is None

    async def faults(self) -> list[dict]:
        """Every proven fault, newest first (the accuser as the first 8 characters of its key's hash)."""
        rows = await self.store.fetch("SELECT * FROM faults ORDER BY id DESC")
        return [
            {
                "peer_id": row["peer_id"],
                "model": row["model"],
                "blocks": [row["start_block"], row["end_block"]],
                "relative_error": row["relative_error"],
                "tolerance": row["tolerance"],
                "accuser": row["accuser"] if row["accuser"] == OWN_ACCUSER else row["accuser"][:8],
                "evidence": json.loads(row["evidence"]),
                "created_at": row["created_at"],
            }
            for row in rows
        ]

    async def canary(self, service: ModelService, info: ServerInfo, p2p: P2P, timeout: float, tokens: int = 8) -> bool:
        """Sends one server a stateless forward of `tokens` random tokens' embeddings, as any client
        would, and compares it with the relay's own computation; a wrong answer is a proven fault (the
        relay saw it itself). Returns whether the server answered right (or could not be judged)."""
        record = info.record
        dtype = getattr(torch, record.dtype)  # one of the three names a record may hold
        ids = torch.randint(0, service.model.config.vocab_size, (1, tokens))
        hidden = service.model.head.embed_tokens(ids).float()
        plan = SpanPlan(info.peer_id, record.start_block, record.end_block, info)
        try:
            output = await forward_span(p2p, service.name, plan, hidden, None, tokens, timeout)
        except SwarmError as e:  # an absent or failing server is not a wrong one
            logger.info("canary to %s got no answer: %s", info.peer_id, e)
            return True
        judged = await self._error(
            service,
            Claim(
                peer_id=info.peer_id,
                start=record.start_block,
                end=record.end_block,
                dtype=dtype,
                inputs=hidden,
                outputs=output,
                mask=None,
                verified=0,
                quant=record.quant,
            ),
        )
        if judged is None:
            return True
        error, limit = judged
        logger.info(
            "canary to %s on blocks %d:%d: relative error %.3g (tolerance %.3g)",
            info.peer_id,
            record.start_block,
            record.end_block,
            error,
            limit,
        )
        if error <= limit:
            return True
        await self.record_fault(
            info.peer_id,
            service.name,
            record.start_block,
            record.end_block,
            error,
            limit,
            OWN_ACCUSER,
            {"canary": True, "tokens": tokens, "dtype": record.dtype, "quant": record.quant},
        )
        return False

    async def _error(self, service: ModelService, claim: Claim) -> Optional[tuple[float, float]]:
        """(relative error, tolerance) of the claim's outputs (positions from `claim.verified` on)
        against the relay's own float32 recomputation; None if the relay cannot hold the blocks."""
        async with self._one_at_a_time:
            if service.name not in self._referees:
                self._referees[service.name] = LocalReferee(service.model.checkpoint, self.executor, keep_sessions=0)
            reference = await self._referees[service.name](claim, frozenset())
        if reference is None:
            return None
        mask = claim.mask[:, claim.verified :] if claim.mask is not None else None
        error = discrepancy(claim.outputs, reference.outputs[:, claim.verified :], mask)
        return error, tolerance(claim.dtype, torch.float32, claim.end - claim.start, claim.quant)

    def _tensors(self, report: EvidenceReport, hidden: int, dtype: torch.dtype):
        try:
            tensors = safetensors.torch.load(base64.b64decode(report.tensors, validate=True))
        except (binascii.Error, ValueError, safetensors.SafetensorError, OverflowError) as e:
            raise HTTPError(400, f"tensors must be base64 safetensors: {e}") from None
        inputs, outputs, mask = tensors.get("inputs"), tensors.get("outputs"), tensors.get("mask")
        if inputs is None or outputs is None:
            raise HTTPError(400, "tensors must hold 'inputs' and 'outputs'")
        if (
            inputs.dtype != torch.float32
            or inputs.ndim != 3
            or inputs.shape[2] != hidden
            or not 0 < inputs.shape[0] <= MAX_BATCH
            or not 0 < inputs.shape[1] <= MAX_POSITIONS
        ):
            raise HTTPError(
                400,
                f"inputs must be float32 [batch ≤ {MAX_BATCH}, positions ≤ {MAX_POSITIONS}, {hidden}], "
                f"got {str(inputs.dtype).removeprefix('torch.')} {list(inputs.shape)}",
            )
        if not report.verified < inputs.shape[1]:
            raise HTTPError(400, f"verified ({report.verified}) must be below the positions given ({inputs.shape[1]})")
        expected = [inputs.shape[0], inputs.shape[1] - report.verified, hidden]
        if outputs.dtype != dtype or list(outputs.shape) != expected:
            raise HTTPError(
                400,
                f"outputs must be {report.dtype} {expected}, got "
                f"{str(outputs.dtype).removeprefix('torch.')} {list(outputs.shape)}",
            )
        if mask is not None and (
            mask.dtype != torch.int64
            or list(mask.shape) != list(inputs.shape[:2])
            or bool(((mask != 0) & (mask != 1)).any())
        ):
            raise HTTPError(400, f"mask must be int64 zeros and ones of shape {list(inputs.shape[:2])}")
        if not bool(torch.isfinite(inputs).all()) or not bool(torch.isfinite(outputs.float()).all()):
            raise HTTPError(400, "tensors must be finite")
        return inputs, outputs, mask

    async def _receipt_key(self, model: str, num_blocks: int, peer_id: str) -> str:
        """The receipt key the accused announces in the DHT (its identity signs the record)."""
        dht = self.dht()
        servers = await dht.fetch_servers(model, num_blocks) if dht is not None else []
        for block in servers:
            info = block.get(peer_id)
            if info is not None and info.record.receipt_key:
                return info.record.receipt_key
        raise HTTPError(404, f"no server {peer_id!r} that signs receipts announces blocks of {model!r} now")

    async def _false(self, accuser: str, message: str) -> HTTPError:
        """Counts a false accusation against `accuser` and returns the 422 to raise."""
        now = self.clock()
        await self.store.execute(
            "INSERT INTO accusers (key_hash, false_accusations, updated_at) VALUES (?, 1, ?) ON CONFLICT (key_hash) "
            "DO UPDATE SET false_accusations = accusers.false_accusations + 1, updated_at = ?",
            accuser,
            now,
            now,
        )
        logger.info("false accusation by key %s…: %s", accuser[:8], message)
        return HTTPError(422, message)
