"""Reliability scores from a relay, for clients that prefer servers with a good record.

    scores = RelayScores("http://127.0.0.1:8000", api_key="K1")
    model = AutoDistributedModelForCausalLM.from_pretrained(path, peers, reliability=scores, min_reliability=0.5)

Scores are cached for `period` seconds; a relay that cannot be reached leaves routing as it would be
without scores (the relay is optional). A client with a relay also sends it the evidence against
every server its spot checks prove wrong, which the relay re-checks before it counts.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional

import aiohttp

from verification.evidence import Evidence, evidence_body


class RelayScores:
    def __init__(self, relay_url: str, api_key: str, period: float = 30.0, timeout: float = 5.0):
        self.base = relay_url.rstrip("/") + "/api/v1"
        self.api_key = api_key
        self.period = period
        self.timeout = timeout
        self._scores: Mapping[str, float] = {}
        self._fetched_at: Optional[float] = None

    async def __call__(self) -> Mapping[str, float]:
        now = time.monotonic()
        if self._fetched_at is None or now - self._fetched_at >= self.period:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
                async with session.get(f"{self.base}/reliability", headers={"X-API-Key": self.api_key}) as response:
                    response.raise_for_status()
                    body = await response.json()
            self._scores = {item["peer_id"]: float(item["score"]) for item in body["data"]}
            self._fetched_at = now
        return self._scores

    async def report(self, peer_id: str, success: bool, latency_ms: Optional[float] = None) -> None:
        """Tells the relay how a session with `peer_id` went (feeds its success-rate component)."""
        body = {"peer_id": peer_id, "success": success, "latency_ms": latency_ms}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            async with session.post(f"{self.base}/reports", json=body, headers={"X-API-Key": self.api_key}) as response:
                response.raise_for_status()

    async def report_evidence(self, evidence: Evidence) -> dict[str, Any]:
        """Sends the evidence against a server proven wrong; returns the relay's verdict (an error status
        raises: the relay refuses evidence that does not hold)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(self.timeout, 120.0))) as session:
            async with session.post(
                f"{self.base}/evidence", json=evidence_body(evidence), headers={"X-API-Key": self.api_key}
            ) as response:
                response.raise_for_status()
                return await response.json()
