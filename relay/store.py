"""The relay's durable state (workers, tokens, scores, jobs) in SQLite or PostgreSQL.

One SQL dialect subset serves both: `?` placeholders (rewritten to `%s` for psycopg), TEXT/INTEGER/
REAL/BIGINT columns, JSON kept as text. The drivers are synchronous, so every statement runs on one
dedicated thread: the event loop never blocks and statements never interleave.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

logger = logging.getLogger(__name__)

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS workers (
        id {serial},
        name TEXT NOT NULL,
        hostname TEXT NOT NULL,
        ip TEXT NOT NULL,
        port INTEGER NOT NULL,
        peer_id TEXT NOT NULL,
        model TEXT NOT NULL,
        role TEXT NOT NULL,
        region TEXT NOT NULL,
        labels TEXT NOT NULL,
        system_reserved TEXT NOT NULL,
        status TEXT NOT NULL,
        load TEXT NOT NULL,
        metrics_url TEXT,
        state TEXT NOT NULL,
        state_message TEXT,
        offline INTEGER NOT NULL DEFAULT 0,
        token_hash TEXT NOT NULL,
        refresh_hash TEXT NOT NULL,
        signing_secret TEXT NOT NULL,
        token_expires_at REAL NOT NULL,
        config TEXT NOT NULL,
        config_version INTEGER NOT NULL,
        tasks_succeeded BIGINT NOT NULL DEFAULT 0,
        tasks_failed BIGINT NOT NULL DEFAULT 0,
        reports_succeeded BIGINT NOT NULL DEFAULT 0,
        reports_failed BIGINT NOT NULL DEFAULT 0,
        online_seconds REAL NOT NULL DEFAULT 0,
        online_periods INTEGER NOT NULL DEFAULT 0,
        unexpected_drops INTEGER NOT NULL DEFAULT 0,
        latency_ms REAL,
        history REAL NOT NULL DEFAULT 0.5,
        online_since REAL,
        heartbeat_time REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS workers_peer ON workers (peer_id)""",
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        request TEXT NOT NULL,
        result TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    )""",
    """CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at)""",
    """CREATE TABLE IF NOT EXISTS faults (
        id {serial},
        peer_id TEXT NOT NULL,
        model TEXT NOT NULL,
        start_block INTEGER NOT NULL,
        end_block INTEGER NOT NULL,
        relative_error REAL NOT NULL,
        tolerance REAL NOT NULL,
        accuser TEXT NOT NULL,
        evidence TEXT NOT NULL,
        fingerprint TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS faults_peer ON faults (peer_id)""",
    """CREATE TABLE IF NOT EXISTS reports (
        key_hash TEXT NOT NULL,
        peer_id TEXT NOT NULL,
        value_sum REAL NOT NULL,
        reports BIGINT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (key_hash, peer_id)
    )""",
    """CREATE TABLE IF NOT EXISTS accusers (
        key_hash TEXT PRIMARY KEY,
        false_accusations INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    )""",
]

# Columns added after a release: databases created before them get them on open.
_ADDED_COLUMNS = [
    ("workers", "reports_succeeded", "BIGINT NOT NULL DEFAULT 0"),
    ("workers", "reports_failed", "BIGINT NOT NULL DEFAULT 0"),
]


class StoreError(RuntimeError):
    """The database cannot be opened or used; the message says which and why."""


class Store:
    """Async facade over one synchronous DB-API connection, used from a single thread."""

    def __init__(self, url: str):
        self.url = url
        self.kind = "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-db")
        self._conn: Any = None

    @property
    def sqlite_path(self) -> Optional[Path]:
        return Path(self.url[len("sqlite:///") :]) if self.kind == "sqlite" else None

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        try:
            if self.kind == "sqlite":
                path = self.sqlite_path
                if str(path) != ":memory:":
                    path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
                self._conn.execute("PRAGMA journal_mode=WAL")
                serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
            else:
                import psycopg

                self._conn = psycopg.connect(self.url, autocommit=True)
                serial = "BIGSERIAL PRIMARY KEY"
            for statement in _SCHEMA:
                self._conn.execute(statement.format(serial=serial))
            for table, column, kind in _ADDED_COLUMNS:
                if column not in self._columns(table):
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except Exception as e:
            raise StoreError(f"cannot open the relay database {self.describe()}: {e}") from e

    def _columns(self, table: str) -> set[str]:
        cursor = self._conn.execute(f"SELECT * FROM {table} WHERE 1 = 0")
        return {column[0] for column in cursor.description}

    def describe(self) -> str:
        """The URL without any password, for logs."""
        if self.kind == "sqlite":
            return self.url
        head, _, tail = self.url.partition("://")
        if "@" in tail:
            credentials, _, rest = tail.rpartition("@")
            user = credentials.split(":", 1)[0]
            return f"{head}://{user}@{rest}"
        return self.url

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.kind == "postgresql" else sql

    def _execute(self, sql: str, params: Sequence[Any]) -> tuple[list[dict[str, Any]], Optional[int]]:
        cursor = self._conn.execute(self._sql(sql), tuple(params))
        rows: list[dict[str, Any]] = []
        if cursor.description is not None:
            names = [column[0] for column in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        return rows, cursor.rowcount

    async def fetch(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        rows, _ = await self._run(self._execute, sql, params)
        return rows

    async def fetch_one(self, sql: str, *params: Any) -> Optional[dict[str, Any]]:
        rows = await self.fetch(sql, *params)
        return rows[0] if rows else None

    async def execute(self, sql: str, *params: Any) -> int:
        """Runs a write; returns the number of rows it touched."""
        _, count = await self._run(self._execute, sql, params)
        return count or 0

    async def insert(self, table: str, values: dict[str, Any], returning: Optional[str] = None) -> Any:
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        sql = f"INSERT INTO {table} ({columns}) VALUES ({marks})"
        if returning:
            rows = await self.fetch(f"{sql} RETURNING {returning}", *values.values())
            return rows[0][returning]
        await self.execute(sql, *values.values())
        return None

    async def update(self, table: str, key: str, key_value: Any, values: dict[str, Any]) -> int:
        assignments = ", ".join(f"{column} = ?" for column in values)
        return await self.execute(f"UPDATE {table} SET {assignments} WHERE {key} = ?", *values.values(), key_value)

    async def get_setting(self, key: str) -> Optional[str]:
        row = await self.fetch_one("SELECT value FROM settings WHERE key = ?", key)
        return row["value"] if row else None

    async def set_setting(self, key: str, value: str) -> None:
        if await self.execute("UPDATE settings SET value = ? WHERE key = ?", value, key) == 0:
            await self.insert("settings", {"key": key, "value": value})


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def loads(text: Optional[str], default: Any = None) -> Any:
    return json.loads(text) if text else default
