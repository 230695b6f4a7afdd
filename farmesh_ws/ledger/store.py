"""The ledger database: SQLite by default, PostgreSQL when configured, through ``databases``.

Each turn is written in one transaction, keyed by ``(session_id, request_id)``: writing the
same turn again changes nothing, so a retried request, a replayed spool or a recovered
checkpoint never bills twice. A turn that names a prepaid hold settles it in that same
transaction (:func:`settle_hold_in`), so the hold is charged exactly when the turn is first
stored. Database errors surface as :class:`LedgerUnavailable` so the writer can spool and retry.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from databases import Database

from farmesh_ws.core.money import from_e8
from farmesh_ws.ledger.records import TurnRecord
from farmesh_ws.ledger.schema import migrate

logger = logging.getLogger(__name__)
_CLOSE_TIMEOUT_S = 2.0
# TurnRecord fields that are not columns of ``turns``.
_NOT_TURN_COLUMNS = frozenset(("contributions", "principal", "client_address_hash", "hold_id"))


class LedgerUnavailable(RuntimeError):
    """The ledger database cannot be reached or refused a write; the record is not stored."""


@asynccontextmanager
async def guarded(operation: str) -> AsyncIterator[None]:
    """Database errors as LedgerUnavailable, naming only the exception type (no values)."""
    try:
        yield
    except Exception as exc:
        raise LedgerUnavailable(f"ledger {operation} failed ({type(exc).__name__})") from exc


def database_url(configured: str, home: Path) -> str:
    """The ``databases`` URL: PostgreSQL (asyncpg) if configured, else a SQLite file."""
    if not configured:
        return f"sqlite+aiosqlite:///{home / 'ledger.sqlite3'}"
    for prefix in ("postgres://", "postgresql://"):
        if configured.startswith(prefix):
            return "postgresql+asyncpg://" + configured.removeprefix(prefix)
    return configured


def redacted(url: str) -> str:
    """A URL safe for logs: no password."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


@dataclass(frozen=True, slots=True)
class NodeEarnings:
    peer_id: str
    public_name: str | None
    spans: int
    tokens: int
    replayed_tokens: int
    work: int
    earned_far: Decimal


@dataclass(frozen=True, slots=True)
class WalletSpend:
    wallet: str
    sessions: int
    turns: int
    prompt_tokens: int
    completion_tokens: int
    spent_far: Decimal


@dataclass(frozen=True, slots=True)
class SessionSummary:
    session_id: str
    kind: str
    wallet: str | None
    model_id: str
    started_at: float
    ended_at: float | None
    turns: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_far: Decimal
    principal: str | None
    client_address_hash: str | None


async def settle_hold_in(database: Database, hold_id: str, charged_e8: int, now: float) -> bool:
    """Settle hold ``hold_id`` for ``charged_e8`` (clamped to the hold) inside the caller's
    transaction: the hold is marked settled, the wallet's balance drops by the charge and its
    held amount by the whole hold. Returns False, changing nothing, if the hold is unknown or
    already settled; the conditional UPDATE locks the hold row, so two settlements of one hold
    cannot both pass it."""
    row = await database.fetch_one(
        """UPDATE balance_holds
           SET settled_at = :now,
               charged_e8 = CASE WHEN :charged_e8 < amount_e8 THEN :charged_e8 ELSE amount_e8 END
           WHERE hold_id = :hold_id AND settled_at IS NULL
           RETURNING wallet, amount_e8, charged_e8""",
        {"hold_id": hold_id, "charged_e8": charged_e8, "now": now},
    )
    if row is None:
        return False
    await database.execute(
        """UPDATE balances
           SET balance_e8 = balance_e8 - :charged_e8, held_e8 = held_e8 - :amount_e8,
               updated_at = :now
           WHERE wallet = :wallet""",
        {
            "wallet": row["wallet"],
            "charged_e8": int(row["charged_e8"]),
            "amount_e8": int(row["amount_e8"]),
            "now": now,
        },
    )
    return True


class Ledger:
    """Connects, migrates, writes turns idempotently and answers the payment queries."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._database = Database(url)
        self._sqlite_writer = asyncio.Lock()

    @property
    def database(self) -> Database:
        """The ``databases`` handle, for ledger modules that own tables (``keys.py``)."""
        return self._database

    @property
    def dialect(self) -> str:
        return "postgresql" if self.url.startswith("postgresql") else "sqlite"

    @asynccontextmanager
    async def write_transaction(self) -> AsyncIterator[None]:
        """A write transaction. SQLite allows one writer at a time and makes others busy-wait,
        giving up after 5 s ("database is locked": 45 of 1,000 concurrent holds failed so), so
        on SQLite this process's writers queue here instead; PostgreSQL locks rows itself."""
        if self.dialect == "sqlite":
            async with self._sqlite_writer, self._database.transaction():
                yield
        else:
            async with self._database.transaction():
                yield

    async def connect(self) -> None:
        try:
            await self._database.connect()
            if self.dialect == "sqlite":
                await self._database.execute("PRAGMA journal_mode=WAL")
                await self._database.execute("PRAGMA foreign_keys=ON")
            await migrate(self._database, time.time())
        except Exception as exc:
            raise LedgerUnavailable(
                f"cannot reach the ledger database ({type(exc).__name__})"
            ) from exc

    async def aclose(self) -> None:
        """Disconnect; if the server is gone, drop the connections instead of waiting.

        A transaction that failed on a dead server keeps its pooled connection checked out,
        and asyncpg's ``Pool.close()`` would wait for it forever, so after a short wait the
        pool is terminated. The next ``connect`` starts from a fresh ``Database``.
        """
        database, self._database = self._database, Database(self.url)
        if not database.is_connected:
            return
        try:
            await asyncio.wait_for(asyncio.shield(database.disconnect()), _CLOSE_TIMEOUT_S)
        except Exception:
            pool = getattr(getattr(database, "_backend", None), "_pool", None)
            if pool is not None:
                pool.terminate()
            logger.debug("ledger connections terminated", exc_info=True)

    async def record_turn(self, record: TurnRecord) -> bool:
        """Store one turn, its contributions and the session totals in one transaction, and
        settle its hold (``record.hold_id``) for its cost in the same one. Returns False if this
        turn was already stored (nothing changes, the hold is not settled again)."""
        try:
            return await self._record_turn(record)
        except Exception as exc:
            raise LedgerUnavailable(f"ledger write failed ({type(exc).__name__})") from exc

    async def _record_turn(self, record: TurnRecord) -> bool:
        db = self._database
        async with self.write_transaction():
            await db.execute(
                """INSERT INTO inference_sessions (session_id, kind, wallet, model_id, started_at,
                       principal, client_address_hash)
                   VALUES (:session_id, :kind, :wallet, :model_id, :started_at, :principal,
                       :client_address_hash)
                   ON CONFLICT (session_id) DO NOTHING""",
                {
                    "session_id": record.session_id,
                    "kind": "generate" if record.kind == "generate" else "chat",
                    "wallet": record.wallet,
                    "model_id": record.model_id,
                    "started_at": record.started_at,
                    "principal": record.principal,
                    "client_address_hash": record.client_address_hash,
                },
            )
            inserted = await db.fetch_val(
                """INSERT INTO turns (session_id, request_id, kind, wallet, model_id, started_at,
                       ended_at, prompt_tokens, completion_tokens, cached_tokens, finish_reason,
                       cost_far_e8, ttft_ms, duration_ms)
                   VALUES (:session_id, :request_id, :kind, :wallet, :model_id, :started_at,
                       :ended_at, :prompt_tokens, :completion_tokens, :cached_tokens,
                       :finish_reason, :cost_far_e8, :ttft_ms, :duration_ms)
                   ON CONFLICT (session_id, request_id) DO NOTHING
                   RETURNING request_id""",
                {
                    key: value
                    for key, value in record.to_json().items()
                    if key not in _NOT_TURN_COLUMNS
                },
            )
            if inserted is None:
                return False
            for contribution in record.contributions:
                await db.execute(
                    """INSERT INTO node_contributions (session_id, request_id, peer_id,
                           public_name, start_block, end_block, tokens, replayed_tokens, work,
                           share_far_e8, payout_wallet, payout_bound)
                       VALUES (:session_id, :request_id, :peer_id, :public_name, :start_block,
                           :end_block, :tokens, :replayed_tokens, :work, :share_far_e8,
                           :payout_wallet, :payout_bound)""",
                    {
                        "session_id": record.session_id,
                        "request_id": record.request_id,
                        **asdict(contribution),
                    },
                )
            await db.execute(
                """UPDATE inference_sessions
                   SET turns = turns + 1,
                       prompt_tokens = prompt_tokens + :prompt_tokens,
                       completion_tokens = completion_tokens + :completion_tokens,
                       cached_tokens = cached_tokens + :cached_tokens,
                       cost_far_e8 = cost_far_e8 + :cost_far_e8,
                       ended_at = :ended_at
                   WHERE session_id = :session_id""",
                {
                    "session_id": record.session_id,
                    "prompt_tokens": record.prompt_tokens,
                    "completion_tokens": record.completion_tokens,
                    "cached_tokens": record.cached_tokens,
                    "cost_far_e8": record.cost_far_e8,
                    "ended_at": record.ended_at,
                },
            )
            if record.hold_id is not None:
                await settle_hold_in(db, record.hold_id, record.cost_far_e8, record.ended_at)
        return True

    async def node_earnings(self) -> list[NodeEarnings]:
        rows = await self._fetch("SELECT * FROM node_earnings ORDER BY earned_far_e8 DESC, peer_id")
        return [
            NodeEarnings(
                peer_id=row["peer_id"],
                public_name=row["public_name"],
                spans=int(row["spans"]),
                tokens=int(row["tokens"]),
                replayed_tokens=int(row["replayed_tokens"]),
                work=int(row["work"]),
                earned_far=from_e8(int(row["earned_far_e8"])),
            )
            for row in rows
        ]

    async def wallet_spend(self) -> list[WalletSpend]:
        rows = await self._fetch("SELECT * FROM wallet_spend ORDER BY spent_far_e8 DESC, wallet")
        return [
            WalletSpend(
                wallet=row["wallet"],
                sessions=int(row["sessions"]),
                turns=int(row["turns"]),
                prompt_tokens=int(row["prompt_tokens"]),
                completion_tokens=int(row["completion_tokens"]),
                spent_far=from_e8(int(row["spent_far_e8"])),
            )
            for row in rows
        ]

    async def recent_sessions(self, limit: int = 20) -> list[SessionSummary]:
        rows = await self._fetch(
            "SELECT * FROM inference_sessions ORDER BY started_at DESC LIMIT :limit",
            {"limit": limit},
        )
        return [
            SessionSummary(
                session_id=row["session_id"],
                kind=row["kind"],
                wallet=row["wallet"],
                model_id=row["model_id"],
                started_at=float(row["started_at"]),
                ended_at=None if row["ended_at"] is None else float(row["ended_at"]),
                turns=int(row["turns"]),
                prompt_tokens=int(row["prompt_tokens"]),
                completion_tokens=int(row["completion_tokens"]),
                cached_tokens=int(row["cached_tokens"]),
                cost_far=from_e8(int(row["cost_far_e8"])),
                principal=row["principal"],
                client_address_hash=row["client_address_hash"],
            )
            for row in rows
        ]

    async def turn_count(self, session_id: str | None = None) -> int:
        query = "SELECT COUNT(*) FROM turns"
        values: dict[str, Any] = {}
        if session_id is not None:
            query += " WHERE session_id = :session_id"
            values["session_id"] = session_id
        return int(await self._database.fetch_val(query, values))

    async def _fetch(self, query: str, values: dict[str, Any] | None = None) -> list[Any]:
        try:
            return list(await self._database.fetch_all(query, values or {}))
        except Exception as exc:
            raise LedgerUnavailable(f"ledger query failed ({type(exc).__name__})") from exc
