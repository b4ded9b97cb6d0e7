"""Workers of the pool: registration, authenticated heartbeats, pushed config, token rotation,
reliability bookkeeping, and the GPUStack-shaped views of them.

Access and refresh tokens are stored as SHA-256 hashes. A worker's signing secret must be known to
verify its HMAC signatures, so it is stored sealed (Fernet) with a key kept outside the database:
a copy of the database alone can neither authenticate as a worker nor sign for one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from cryptography.fernet import Fernet, InvalidToken

from dht.identity import proves_ownership
from protocol.registration import registration_message, relay_address
from protocol.worker_auth import ACCESS_TOKEN_TTL
from relay.auth import (
    MAX_CLOCK_SKEW,
    AuthError,
    Lockout,
    ReplayGuard,
    ReplayWindowFull,
    RetryableAuthError,
    WindowLimit,
    hash_secret,
    new_secret,
    secret_matches,
    verify_signature,
)
from relay.http import HTTPError
from relay.reliability import WorkerStats, key_effect, reliability_score, report_value, updated_history
from relay.schemas import HeartbeatRequest, LoadConfig, RegisterRequest
from relay.store import Store, dumps, loads
from relay.timestamps import iso

logger = logging.getLogger(__name__)


def load_or_create_key(path: Path) -> bytes:
    """The sealing key, created (mode 0600) on first start."""
    if path.exists():
        key = path.read_bytes().strip()
        try:
            Fernet(key)
        except ValueError:
            raise ValueError(f"{path} does not hold a valid relay key") from None
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    logger.info("created the relay key file %s (keep it with the database)", path)
    return key


def stats_of(row: dict[str, Any], now: float, proven_faults: int = 0, reported: float = 0.0) -> WorkerStats:
    """Reliability counters of a worker row, counting its running online period so far, the faults
    proven against its peer id (`relay.evidence`) and what API keys reported on it (capped per key)."""
    online_seconds = row["online_seconds"]
    if row["online_since"] is not None:
        online_seconds += max(0.0, now - row["online_since"])
    return WorkerStats(
        tasks_succeeded=row["tasks_succeeded"],
        tasks_failed=row["tasks_failed"],
        reported=reported,
        online_seconds=online_seconds,
        online_periods=row["online_periods"],
        unexpected_drops=row["unexpected_drops"],
        latency_ms=row["latency_ms"],
        history=row["history"],
        proven_faults=proven_faults,
    )


REPORTS_PER_HOUR = 20  # per API key and worker
LATENCY_STEP = 0.2  # how far one measured latency moves a worker's moving average


class WorkerRegistry:
    def __init__(
        self,
        store: Store,
        key: bytes,
        heartbeat_timeout: float,
        join_token_hash: Optional[str] = None,
        clock: Callable[[], float] = time.time,
    ):
        """`join_token_hash`: SHA-256 of the token registrations must present (None: open registration)."""
        self.store = store
        self.fernet = Fernet(key)
        self.heartbeat_timeout = heartbeat_timeout
        self.join_token_hash = join_token_hash
        self.clock = clock
        self.lockout = Lockout()
        self.failures_by_source = WindowLimit()  # junk credentials, per address
        self.report_quota = WindowLimit(limit=REPORTS_PER_HOUR, window=3600.0)
        self.replays = ReplayGuard(not_before=clock())
        self.offline_ids: set[int] = set()  # taken offline by the operator (POST /v1/instances/offline)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def register(
        self, body: RegisterRequest, signed: dict[str, Any], relay_url: str, ip: str, join_token: Optional[str]
    ) -> dict[str, Any]:
        """`signed` is the body as sent (what the peer signed), `relay_url` how the peer reached this relay."""
        if self.join_token_hash is not None:
            if not join_token or not secret_matches(join_token, self.join_token_hash):
                raise HTTPError(401, "registration requires the relay's join token (X-Join-Token header)")
        now = self.clock()
        self._check_ownership(body, signed, relay_url, now)
        token, refresh, signing = new_secret(), new_secret(), new_secret()
        expires = now + ACCESS_TOKEN_TTL
        values = {
            "name": body.name,
            "hostname": body.hostname or body.name,
            "ip": ip,
            "port": body.port,
            "peer_id": body.peer_id,
            "model": body.model,
            "role": body.role,
            "region": body.region,
            "labels": dumps(body.labels),
            "system_reserved": dumps({"ram": 0, "vram": 0, **body.system_reserved}),
            "status": dumps(body.status),
            "load": dumps({}),
            "metrics_url": self._metrics_url(ip, body.metrics_port),
            "state": "not_ready",
            "state_message": "registered; waiting for the first heartbeat",
            "token_hash": hash_secret(token),
            "refresh_hash": hash_secret(refresh),
            "signing_secret": self.fernet.encrypt(signing.encode()).decode(),
            "token_expires_at": expires,
            "updated_at": now,
        }
        # A peer registering again (a restart, lost credentials) gets its row back with new credentials:
        # its reliability record and pushed config stay, and the old credentials stop working.
        existing = await self.store.fetch_one(
            "SELECT id, config_version FROM workers WHERE peer_id = ? ORDER BY id LIMIT 1", body.peer_id
        )
        if existing is not None:
            worker_id, config_version = existing["id"], existing["config_version"]
            await self.store.update("workers", "id", worker_id, values)
            logger.info(
                "worker %d registered again: %s (peer %s, model %s)", worker_id, body.name, body.peer_id, body.model
            )
        else:
            config_version = 1
            worker_id = await self.store.insert(
                "workers",
                {
                    **values,
                    "config": dumps(LoadConfig().model_dump()),
                    "config_version": config_version,
                    "created_at": now,
                },
                returning="id",
            )
            logger.info("worker %d registered: %s (peer %s, model %s)", worker_id, body.name, body.peer_id, body.model)
        return {
            "worker_id": worker_id,
            "token": token,
            "refresh_token": refresh,
            "signing_secret": signing,
            "token_expires_at": iso(expires),
            "config_version": config_version,
        }

    def _check_ownership(self, body: RegisterRequest, signed: dict[str, Any], relay_url: str, now: float) -> None:
        """Only the holder of a peer's identity key may register as that peer (its score is at stake),
        with this very body, at this relay."""
        if abs(now - body.signed_at) > MAX_CLOCK_SKEW:
            raise HTTPError(401, f"signed_at is more than {MAX_CLOCK_SKEW:.0f} s away from the relay's clock")
        if not proves_ownership(
            body.peer_id, body.peer_public_key, registration_message(relay_url, signed), body.peer_signature
        ):
            raise HTTPError(
                401,
                "peer_signature does not prove that the sender holds the identity key of peer_id "
                f"and signed this registration for the relay at {relay_address(relay_url)}",
            )
        try:
            # signed_at is in whole seconds: the signature may be up to a second younger than it says
            self.replays.check_and_remember(body.peer_signature, now, signed_at=body.signed_at + 1)
        except AuthError as e:
            raise HTTPError(401, f"registration {e}") from None

    @staticmethod
    def _metrics_url(ip: str, port: Optional[int]) -> Optional[str]:
        """Only the address the worker connected from is ever scraped (no request to a third party)."""
        if port is None:
            return None
        host = f"[{ip}]" if ":" in ip else ip
        return f"http://{host}:{port}/metrics"

    async def row(self, worker_id: int) -> dict[str, Any]:
        row = await self.store.fetch_one("SELECT * FROM workers WHERE id = ?", worker_id)
        if row is None:
            raise HTTPError(404, f"no such worker: {worker_id}")
        return row

    async def authenticate(
        self, worker_id: int, method: str, path: str, body: bytes, headers, source: str
    ) -> dict[str, Any]:
        """Checks the Bearer token and the HMAC signature of a worker's request (from address `source`)."""

        def access_token(row: dict[str, Any], now: float) -> None:
            token = bearer_token(headers)
            if token is None or not secret_matches(token, row["token_hash"]):
                raise AuthError("missing or wrong access token")
            if row["token_expires_at"] <= now:
                raise AuthError("access token expired; refresh it")

        return await self._verified(worker_id, access_token, method, path, body, headers, source)

    async def _verified(
        self,
        worker_id: int,
        credential: Callable[[dict[str, Any], float], None],
        method: str,
        path: str,
        body: bytes,
        headers,
        source: str,
    ) -> dict[str, Any]:
        """The worker's row once `credential` and the request signature check out.

        Only failures that presented the worker's valid credential count toward its lockout (5 lock it
        for 15 minutes: 423); anything else is junk, counted against the sending address instead."""
        now = self.clock()
        try:
            row = await self.row(worker_id)
            credential(row, now)
        except (AuthError, HTTPError) as e:
            wait = self.failures_by_source.hit(source, now)
            if wait is not None:
                raise HTTPError(
                    429,
                    "too many failed authentications from this address; slow down",
                    headers={"Retry-After": str(math.ceil(wait))},
                ) from None
            if isinstance(e, HTTPError):
                raise
            raise HTTPError(401, str(e)) from None
        account = f"worker:{worker_id}"
        try:
            self.lockout.check(account, now)
        except AuthError as e:
            raise HTTPError(423, str(e)) from None
        try:
            verify_signature(
                self._signing_secret(row),
                method,
                path,
                body,
                headers.get("X-Timestamp", ""),
                headers.get("X-Signature", ""),
                now,
                self.replays,
            )
        except ReplayWindowFull as e:
            raise HTTPError(429, str(e), headers={"Retry-After": "5"}) from None
        except RetryableAuthError as e:
            raise HTTPError(401, str(e)) from None
        except AuthError as e:
            self.lockout.failed(account, now)
            logger.warning("worker %d: authentication failed: %s", worker_id, e)
            raise HTTPError(401, str(e)) from None
        self.lockout.succeeded(account)
        return row

    def _signing_secret(self, row: dict[str, Any]) -> str:
        try:
            return self.fernet.decrypt(row["signing_secret"].encode()).decode()
        except InvalidToken:
            raise AuthError(
                "this worker's signing secret cannot be read with the relay's key file; register again"
            ) from None

    async def refresh(
        self, worker_id: int, refresh_token: str, method: str, path: str, body: bytes, headers, source: str
    ) -> dict[str, Any]:
        """New access and refresh tokens; the old refresh token stops working (rotation)."""

        def refresh_credential(row: dict[str, Any], now: float) -> None:
            if not secret_matches(refresh_token, row["refresh_hash"]):
                raise AuthError("wrong refresh token")

        await self._verified(worker_id, refresh_credential, method, path, body, headers, source)
        now = self.clock()
        token, refresh = new_secret(), new_secret()
        expires = now + ACCESS_TOKEN_TTL
        await self.store.update(
            "workers",
            "id",
            worker_id,
            {
                "token_hash": hash_secret(token),
                "refresh_hash": hash_secret(refresh),
                "token_expires_at": expires,
                "updated_at": now,
            },
        )
        logger.info("worker %d: tokens rotated", worker_id)
        return {"worker_id": worker_id, "token": token, "refresh_token": refresh, "token_expires_at": iso(expires)}

    async def heartbeat(self, row: dict[str, Any], body: HeartbeatRequest, ip: str) -> dict[str, Any]:
        now = self.clock()
        values: dict[str, Any] = {"heartbeat_time": now, "updated_at": now, "load": dumps(body.load), "ip": ip}
        if body.hardware is not None:
            values["status"] = dumps(body.hardware)
        if body.metrics_port is not None:
            values["metrics_url"] = self._metrics_url(ip, body.metrics_port)
        if body.latency_ms is not None:
            values["latency_ms"] = body.latency_ms
        online_since = row["online_since"]
        if body.status == "offline":
            if online_since is not None:
                values["online_seconds"] = row["online_seconds"] + max(0.0, now - online_since)
                values["online_since"] = None
            values.update(state="not_ready", state_message="went offline gracefully", offline=1)
        else:
            if online_since is None:
                values["online_since"] = now
                values["online_periods"] = row["online_periods"] + 1
            ready = body.status == "online"
            message = {"joining": "joining: loading blocks", "draining": "draining: finishing open sessions"}
            values.update(state="ready" if ready else "not_ready", state_message=message.get(body.status), offline=0)
        merged = {**row, **values}
        reported = (await self._reported(row["peer_id"])).get(row["peer_id"], 0.0)
        score = reliability_score(stats_of(merged, now, await self._faults_of(row["peer_id"]), reported))
        values["history"] = updated_history(row["history"], score)
        await self.store.update("workers", "id", row["id"], values)
        return {
            "config_changed": body.config_version != row["config_version"],
            "config_version": row["config_version"],
            "reliability_score": score,
            "token_expires_at": iso(row["token_expires_at"]),
        }

    async def get_config(self, worker_id: int) -> dict[str, Any]:
        row = await self.row(worker_id)
        return {"worker_id": worker_id, "config_version": row["config_version"], "config": loads(row["config"], {})}

    async def put_config(self, worker_id: int, config: LoadConfig) -> dict[str, Any]:
        # One statement: two concurrent pushes get two versions, never the same one twice.
        rows = await self.store.fetch(
            "UPDATE workers SET config = ?, config_version = config_version + 1, updated_at = ? WHERE id = ? "
            "RETURNING config_version",
            dumps(config.model_dump()),
            self.clock(),
            worker_id,
        )
        if not rows:
            raise HTTPError(404, f"no such worker: {worker_id}")
        version = rows[0]["config_version"]
        logger.info("worker %d: config version %d pushed", worker_id, version)
        return {"worker_id": worker_id, "config_version": version, "config": config.model_dump()}

    # ---- liveness and reliability ------------------------------------------------------------

    async def sweep(self) -> int:
        """Ends the online period of every worker whose heartbeats stopped: an unexpected drop."""
        now = self.clock()
        cutoff = now - self.heartbeat_timeout
        lost = await self.store.fetch(
            "SELECT * FROM workers WHERE online_since IS NOT NULL AND heartbeat_time < ?", cutoff
        )
        for row in lost:
            await self.store.update(
                "workers",
                "id",
                row["id"],
                {
                    "online_seconds": row["online_seconds"] + max(0.0, row["heartbeat_time"] - row["online_since"]),
                    "online_since": None,
                    "unexpected_drops": row["unexpected_drops"] + 1,
                    "state": "not_ready",
                    "updated_at": now,
                    "state_message": f"heartbeat lost: none for over {self.heartbeat_timeout:.0f} s",
                },
            )
            logger.warning("worker %d (%s): heartbeat lost", row["id"], row["name"])
        return len(lost)

    async def record_outcome(self, peer_id: str, success: bool, latency_ms: Optional[float] = None) -> int:
        """Counts an outcome the relay saw itself for every worker registered with this peer id; returns how many."""
        return await self._count("tasks_succeeded" if success else "tasks_failed", peer_id, latency_ms, LATENCY_STEP)

    async def record_report(
        self, reporter: str, peer_id: str, success: bool, latency_ms: Optional[float] = None
    ) -> int:
        """Counts an outcome an API-key holder reports, at most REPORTS_PER_HOUR per reporter and worker;
        returns how many workers it counted for. The relay cannot check a report, so all of one key's
        reports on a worker move its score by at most MAX_KEY_EFFECT (`relay.reliability`)."""
        wait = self.report_quota.hit((reporter, peer_id), self.clock())
        if wait is not None:
            raise HTTPError(
                429,
                f"this key has reported on {peer_id} {self.report_quota.limit} times in the last "
                f"hour; further reports are not counted",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        counted = await self._count("reports_succeeded" if success else "reports_failed", peer_id, None, 0.0)
        if counted:
            now, value = self.clock(), report_value(success, latency_ms)
            await self.store.execute(
                "INSERT INTO reports (key_hash, peer_id, value_sum, reports, updated_at) VALUES (?, ?, ?, 1, ?) "
                "ON CONFLICT (key_hash, peer_id) DO UPDATE SET value_sum = reports.value_sum + ?, "
                "reports = reports.reports + 1, updated_at = ?",
                reporter,
                peer_id,
                value,
                now,
                value,
                now,
            )
        return counted

    async def _reported(self, peer_id: Optional[str] = None) -> dict[str, float]:
        """Per peer id (or for `peer_id` only), the sum over keys of each key's capped effect."""
        if peer_id is None:
            rows = await self.store.fetch("SELECT peer_id, value_sum FROM reports")
        else:
            rows = await self.store.fetch("SELECT peer_id, value_sum FROM reports WHERE peer_id = ?", peer_id)
        effects: dict[str, float] = {}
        for row in rows:
            effects[row["peer_id"]] = effects.get(row["peer_id"], 0.0) + key_effect(row["value_sum"])
        return effects

    async def _count(self, column: str, peer_id: str, latency_ms: Optional[float], step: float) -> int:
        """One statement per outcome (counters incremented in place), so concurrent outcomes are all
        counted; `latency_ms` moves the average by `step` of the way."""
        if latency_ms is None:
            return await self.store.execute(f"UPDATE workers SET {column} = {column} + 1 WHERE peer_id = ?", peer_id)
        return await self.store.execute(
            f"UPDATE workers SET {column} = {column} + 1, latency_ms = CASE WHEN latency_ms IS NULL THEN ? "
            f"ELSE {1 - step} * latency_ms + {step} * ? END WHERE peer_id = ?",
            latency_ms,
            latency_ms,
            peer_id,
        )

    async def scores(self) -> dict[str, float]:
        """Reliability score per peer id (the latest registration of a peer wins)."""
        now = self.clock()
        result: dict[str, float] = {}
        faults = {
            row["peer_id"]: row["n"]
            for row in await self.store.fetch("SELECT peer_id, COUNT(*) AS n FROM faults GROUP BY peer_id")
        }
        reported = await self._reported()
        for row in await self.store.fetch("SELECT * FROM workers ORDER BY id"):
            peer = row["peer_id"]
            result[peer] = reliability_score(stats_of(row, now, faults.get(peer, 0), reported.get(peer, 0.0)))
        return result

    async def _faults_of(self, peer_id: str) -> int:
        return (await self.store.fetch_one("SELECT COUNT(*) AS n FROM faults WHERE peer_id = ?", peer_id))["n"]

    # ---- views -------------------------------------------------------------------------------

    def _state(self, row: dict[str, Any], now: float) -> tuple[str, Optional[str]]:
        if row["id"] in self.offline_ids:
            return "not_ready", "taken offline by the operator"
        if row["state"] == "ready" and (
            row["heartbeat_time"] is None or row["heartbeat_time"] < now - self.heartbeat_timeout
        ):
            return "not_ready", f"heartbeat lost: none for over {self.heartbeat_timeout:.0f} s"
        return row["state"], row["state_message"]

    def gpustack_item(self, row: dict[str, Any], now: float) -> dict[str, Any]:
        """One worker exactly as GPUStack's `/v1/workers` lists it."""
        state, message = self._state(row, now)
        labels = {"worker-name": row["name"], **loads(row["labels"], {})}
        return {
            "id": row["id"],
            "name": row["name"],
            "hostname": row["hostname"],
            "ip": row["ip"],
            "port": row["port"],
            "labels": labels,
            "system_reserved": loads(row["system_reserved"], {"ram": 0, "vram": 0}),
            "state": state,
            "state_message": message,
            "status": loads(row["status"], {}),
            "unreachable": state != "ready",
            "heartbeat_time": iso(row["heartbeat_time"]),
            "created_at": iso(row["created_at"]),
            "updated_at": iso(row["updated_at"]),
        }

    async def page(self, page: int, per_page: int) -> dict[str, Any]:
        now = self.clock()
        total = (await self.store.fetch_one("SELECT COUNT(*) AS n FROM workers"))["n"]
        rows = await self.store.fetch(
            "SELECT * FROM workers ORDER BY id LIMIT ? OFFSET ?", per_page, (page - 1) * per_page
        )
        return {
            "items": [self.gpustack_item(row, now) for row in rows],
            "pagination": {
                "page": page,
                "perPage": per_page,
                "total": total,
                "totalPage": math.ceil(total / per_page) if total else 0,
            },
        }

    async def detail(self, worker_id: int) -> dict[str, Any]:
        row = await self.row(worker_id)
        now = self.clock()
        reported = (await self._reported(row["peer_id"])).get(row["peer_id"], 0.0)
        stats = stats_of(row, now, await self._faults_of(row["peer_id"]), reported)
        item = self.gpustack_item(row, now)
        item.update(
            peer_id=row["peer_id"],
            model=row["model"],
            role=row["role"],
            region=row["region"],
            load=loads(row["load"], {}),
            config_version=row["config_version"],
            reliability={
                "score": reliability_score(stats),
                "tasks_succeeded": stats.tasks_succeeded,
                "tasks_failed": stats.tasks_failed,
                "online_seconds": round(stats.online_seconds, 3),
                "online_periods": stats.online_periods,
                "unexpected_drops": stats.unexpected_drops,
                "latency_ms": stats.latency_ms,
                "reports_succeeded": row["reports_succeeded"],
                "reports_failed": row["reports_failed"],
                "reported_effect": round(stats.reported, 6),
                "proven_faults": stats.proven_faults,
            },
        )
        return item

    async def all_rows(self) -> list[dict[str, Any]]:
        return await self.store.fetch("SELECT * FROM workers ORDER BY id")

    async def counts(self) -> dict[str, int]:
        now = self.clock()
        rows = await self.all_rows()
        ready = sum(1 for row in rows if self._state(row, now)[0] == "ready")
        return {"ready": ready, "total": len(rows)}


def bearer_token(headers) -> Optional[str]:
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
