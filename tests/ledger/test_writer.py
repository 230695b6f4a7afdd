"""The writer keeps records when the database is down and stores each exactly once later."""

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from farmesh_ws.ledger.records import TurnRecord
from farmesh_ws.ledger.store import Ledger
from farmesh_ws.ledger.writer import LedgerWriter
from tests.ledger.conftest import make_turn


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 30) -> None:
    """Poll a condition the writer's retry loop will make true (bounded in time)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


async def test_records_are_stored_and_acknowledged(ledger_url: str, tmp_path: Path) -> None:
    writer = LedgerWriter(Ledger(ledger_url), tmp_path / "spool", retry_s=0.2)
    await writer.start()
    stored: list[TurnRecord] = []
    for index in range(10):
        writer.submit(make_turn(f"r{index}"), on_stored=stored.append)
    await writer.flush()
    assert len(stored) == 10
    assert await writer.ledger.turn_count() == 10
    assert not writer.degraded
    await writer.aclose()


async def test_sqlite_unreachable_then_back_stores_everything_once(tmp_path: Path) -> None:
    missing_dir = tmp_path / "not-yet"
    url = f"sqlite+aiosqlite:///{missing_dir / 'ledger.sqlite3'}"
    writer = LedgerWriter(Ledger(url), tmp_path / "spool", retry_s=0.2)
    await writer.start()
    assert writer.degraded
    acknowledged: list[TurnRecord] = []
    for index in range(5):
        writer.submit(make_turn(f"r{index}"), on_stored=acknowledged.append)
    await writer.flush()
    assert len(acknowledged) == 5  # durable in the spool
    assert len(writer.spool) == 5

    missing_dir.mkdir()

    async def all_stored() -> bool:
        return not writer.degraded and len(writer.spool) == 0

    await _eventually(all_stored)
    writer.submit(make_turn("r0"))  # a retry of an already stored request
    await writer.flush()
    assert await writer.ledger.turn_count() == 5
    await writer.aclose()


async def test_close_flushes_to_the_spool_when_the_database_is_down(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'ledger.sqlite3'}"
    writer = LedgerWriter(Ledger(url), tmp_path / "spool", retry_s=60)
    await writer.start()
    for index in range(3):
        writer.submit(make_turn(f"r{index}"))
    await writer.aclose()
    assert len(writer.spool) == 3

    (tmp_path / "missing").mkdir()
    second = LedgerWriter(Ledger(url), tmp_path / "spool", retry_s=0.2)
    await second.start()

    async def replayed() -> bool:
        # A file being replayed is renamed first: an empty spool alone is not "replayed".
        return len(second.spool) == 0 and await second.ledger.turn_count() == 3

    await _eventually(replayed)
    await second.aclose()


def _postgres(action: str) -> None:
    version = subprocess.run(
        ["ls", "/etc/postgresql"], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    subprocess.run(
        [
            "pg_ctlcluster",
            "--skip-systemctl-redirect",
            version,
            "main",
            action,
            *(["-m", "fast"] if action == "stop" else []),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.disruptive
async def test_postgres_stopped_mid_run_then_restarted_keeps_every_record_once(
    postgres_url: str, tmp_path: Path
) -> None:
    writer = LedgerWriter(Ledger(postgres_url), tmp_path / "spool", retry_s=0.2)
    await writer.start()
    for index in range(20):
        writer.submit(make_turn(f"before-{index}"))
    await writer.flush()

    _postgres("stop")
    try:
        for index in range(20):
            writer.submit(make_turn(f"during-{index}"))
            writer.submit(make_turn(f"before-{index}"))  # retries of stored turns
        await writer.flush()
        assert writer.degraded
        assert len(writer.spool) > 0
    finally:
        _postgres("start")

    async def recovered() -> bool:
        return not writer.degraded and len(writer.spool) == 0

    await _eventually(recovered, timeout_s=60)
    for index in range(5):
        writer.submit(make_turn(f"after-{index}"))
    await writer.flush()
    assert await writer.ledger.turn_count() == 45
    (spend,) = await writer.ledger.wallet_spend()
    assert spend.turns == 45
    await writer.aclose()
