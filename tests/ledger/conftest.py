"""Ledger fixtures: the same tests run on SQLite (a temp file) and a real PostgreSQL.

Each PostgreSQL test gets a database of its own on the local server (127.0.0.1:5432, trust
auth), dropped afterwards, so tests never see each other's rows.
"""

import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from farmesh_ws.core.money import to_e8
from farmesh_ws.ledger import schema
from farmesh_ws.ledger.records import ContributionRecord, TurnRecord
from farmesh_ws.ledger.store import Ledger

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    async for url in _fresh_postgres_database():
        yield url


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    async for url in _fresh_postgres_database():
        yield url


async def _fresh_postgres_database() -> AsyncIterator[str]:
    name = f"farmesh_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    admin = await asyncpg.connect(POSTGRES_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[Ledger]:
    store = Ledger(ledger_url)
    await store.connect()
    yield store
    await store.aclose()


def make_turn(
    request_id: str = "r1",
    *,
    session_id: str = "s1",
    wallet: str | None = "wallet-a",
    cost: str = "0.0049",
    shares: tuple[tuple[str, int, int, str], ...] = (
        ("peer-a", 0, 15, "0.00245"),
        ("peer-b", 15, 30, "0.00245"),
    ),
    completion_tokens: int = 49,
) -> TurnRecord:
    return TurnRecord(
        session_id=session_id,
        request_id=request_id,
        kind="turn",
        wallet=wallet,
        model_id="SmolLM2-135M-Instruct",
        started_at=1_700_000_000.0,
        ended_at=1_700_000_001.0,
        prompt_tokens=12,
        completion_tokens=completion_tokens,
        cached_tokens=40,
        finish_reason="stop",
        cost_far_e8=to_e8(Decimal(cost)),
        ttft_ms=80.0,
        duration_ms=900.0,
        contributions=tuple(
            ContributionRecord(
                peer_id=peer,
                public_name=f"name-{peer}",
                start_block=start,
                end_block=end,
                tokens=61,
                replayed_tokens=0,
                work=61 * (end - start),
                share_far_e8=to_e8(Decimal(share)),
            )
            for peer, start, end, share in shares
        ),
    )


async def old_ledger(url: str, version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leave at ``url`` the database a release at schema ``version`` made: its migrations and
    turn ``r1`` of ``make_turn()`` in session ``s1``, written with that version's columns."""
    turn = make_turn("r1")
    with monkeypatch.context() as patch:
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:version])
        old = Ledger(url)
        await old.connect()
    db = old.database
    try:
        await db.execute(
            """INSERT INTO inference_sessions (session_id, kind, wallet, model_id, started_at,
                   ended_at, turns, prompt_tokens, completion_tokens, cached_tokens, cost_far_e8)
               VALUES ('s1', 'chat', :wallet, :model_id, :started_at, :ended_at, 1,
                   :prompt_tokens, :completion_tokens, :cached_tokens, :cost_far_e8)""",
            {
                "wallet": turn.wallet,
                "model_id": turn.model_id,
                "started_at": turn.started_at,
                "ended_at": turn.ended_at,
                "prompt_tokens": turn.prompt_tokens,
                "completion_tokens": turn.completion_tokens,
                "cached_tokens": turn.cached_tokens,
                "cost_far_e8": turn.cost_far_e8,
            },
        )
        columns = [
            key
            for key in turn.to_json()
            if key not in ("contributions", "principal", "client_address_hash", "hold_id")
        ]
        await db.execute(
            f"INSERT INTO turns ({', '.join(columns)}) "
            f"VALUES ({', '.join(':' + key for key in columns)})",
            {key: getattr(turn, key) for key in columns},
        )
        for contribution in turn.contributions:
            await db.execute(
                """INSERT INTO node_contributions (session_id, request_id, peer_id, public_name,
                       start_block, end_block, tokens, replayed_tokens, work, share_far_e8)
                   VALUES ('s1', 'r1', :peer_id, :public_name, :start_block, :end_block,
                       :tokens, :replayed_tokens, :work, :share_far_e8)""",
                {
                    key: value
                    for key, value in asdict(contribution).items()
                    if key not in ("payout_wallet", "payout_bound")
                },
            )
    finally:
        await old.aclose()
