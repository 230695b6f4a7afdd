"""A prepaid hold is settled through the ledger's own write path, exactly once: with the turn
record, after a retry, from a crashed process's checkpoint, from the spool; expired ones are
released."""

import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from farmesh_ws.core.settlement import Settlement
from farmesh_ws.core.types import TurnDone
from farmesh_ws.engine.events import RequestContext, RequestFinished, TokensDelivered
from farmesh_ws.ledger.balances import BalanceInfo, balances, credit, settle_hold
from farmesh_ws.ledger.checkpoints import TurnCheckpoints
from farmesh_ws.ledger.hold_batch import take_hold
from farmesh_ws.ledger.observer import LedgerObserver, recover_interrupted_turns
from farmesh_ws.ledger.records import TurnRecord, turn_record
from farmesh_ws.ledger.store import Ledger
from farmesh_ws.ledger.writer import LedgerWriter

D = Decimal
NOW = 1_700_000_000.0


def _context(request_id: str, *, held: str | None = "0.01") -> RequestContext:
    return RequestContext(
        session_id="s1",
        request_id=request_id,
        kind="turn",
        wallet="wallet-a",
        model_id="SmolLM2-135M-Instruct",
        started_at=NOW,
        principal_id="key:fk_0123456789abcdef",
        address_hash="00ff00ff00ff00ff",
        held_far=None if held is None else D(held),
    )


def _finished(context: RequestContext, cost: str) -> RequestFinished:
    done = TurnDone(
        finish_reason="stop",
        text="",
        prompt_tokens=12,
        completion_tokens=5,
        cached_tokens=0,
        position=17,
        max_length=2048,
        contributions=(),
        routes=(),
        time_to_first_token_s=0.05,
        duration_s=0.5,
    )
    settlement = Settlement("stop", 12, 5, 0, D(cost), (), None)
    return RequestFinished(context, done, settlement)


def _delivered(context: RequestContext, tokens: int, cost: str) -> TokensDelivered:
    return TokensDelivered(context, tokens, 12, D(cost), None)


async def _hold(ledger: Ledger, context: RequestContext, *, expires_at: float = 2e9) -> None:
    assert context.held_far is not None
    await take_hold(
        ledger,
        wallet="wallet-a",
        hold_id=context.hold_id,
        minimum=context.held_far,
        maximum=context.held_far,
        expires_at=expires_at,
    )


async def _balance(ledger: Ledger) -> BalanceInfo:
    (info,) = await balances(ledger, "wallet-a")
    return info


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def _crash(checkpoints: TurnCheckpoints) -> Path:
    """Leave ``checkpoints`` as a SIGKILLed process would: its directory, its pid dead."""
    dead = checkpoints.root / str(_dead_pid())
    checkpoints.directory.rename(dead)
    return dead


@pytest.fixture
async def writer(ledger_url: str, tmp_path: Path) -> AsyncIterator[LedgerWriter]:
    writer = LedgerWriter(Ledger(ledger_url), tmp_path / "spool", retry_s=60)
    await writer.start()
    await credit(writer.ledger, "wallet-a", D(1))
    yield writer
    await writer.aclose()


async def test_a_finished_request_settles_its_hold_with_its_turn_once(
    writer: LedgerWriter, tmp_path: Path
) -> None:
    observer = LedgerObserver(writer, TurnCheckpoints(tmp_path / "checkpoints"))
    context = _context("r1")
    await _hold(writer.ledger, context)
    assert await _balance(writer.ledger) == BalanceInfo("wallet-a", D(1), D("0.01"), D("0.99"))

    observer.notify(_finished(context, "0.0005"))
    await writer.flush()
    settled = BalanceInfo("wallet-a", D("0.9995"), D(0), D("0.9995"))
    assert await _balance(writer.ledger) == settled

    observer.notify(_finished(context, "0.0005"))  # a retried or replayed record
    writer.submit(replace(turn_record(_finished(context, "0.009"), ended_at=NOW), request_id="r1"))
    await writer.flush()
    assert not await settle_hold(writer.ledger, context.hold_id, D("0.0005"))
    assert await _balance(writer.ledger) == settled
    assert await writer.ledger.turn_count() == 1

    (session,) = await writer.ledger.recent_sessions()
    assert (session.principal, session.client_address_hash) == (
        "key:fk_0123456789abcdef",
        "00ff00ff00ff00ff",
    )


async def test_a_request_without_a_hold_settles_none(writer: LedgerWriter, tmp_path: Path) -> None:
    observer = LedgerObserver(writer, TurnCheckpoints(tmp_path / "checkpoints"))
    held = _context("r1")
    await _hold(writer.ledger, held)
    observer.notify(_finished(_context("r1", held=None), "0.0005"))  # balances off
    await writer.flush()
    assert turn_record(_finished(_context("r1", held=None), "0"), ended_at=NOW).hold_id is None
    assert await writer.ledger.turn_count() == 1
    assert await _balance(writer.ledger) == BalanceInfo("wallet-a", D(1), D("0.01"), D("0.99"))


async def test_recovery_settles_the_hold_for_the_checkpointed_cost_once(
    writer: LedgerWriter, tmp_path: Path
) -> None:
    context = _context("r1")
    await _hold(writer.ledger, context)
    before = TurnCheckpoints(tmp_path / "checkpoints")
    LedgerObserver(writer, before).notify(_delivered(context, 3, "0.0003"))
    saved = tmp_path / "saved"
    shutil.copytree(before.directory, saved)
    _crash(before)

    assert await recover_interrupted_turns(TurnCheckpoints(tmp_path / "checkpoints"), writer) == 1
    charged = BalanceInfo("wallet-a", D("0.9997"), D(0), D("0.9997"))
    assert await _balance(writer.ledger) == charged
    (session,) = await writer.ledger.recent_sessions()
    assert session.principal == "key:fk_0123456789abcdef"

    # A process that stored the turn but died before removing its checkpoint: recovered again,
    # the turn and its hold are already settled and nothing changes.
    shutil.copytree(saved, tmp_path / "checkpoints" / str(_dead_pid()))
    assert await recover_interrupted_turns(TurnCheckpoints(tmp_path / "checkpoints"), writer) == 1
    assert await _balance(writer.ledger) == charged
    assert await writer.ledger.turn_count() == 1


async def test_at_start_expired_holds_are_released_after_interrupted_turns_settle(
    writer: LedgerWriter, tmp_path: Path
) -> None:
    checkpointed, lost, running = _context("r1"), _context("r2"), _context("r3")
    await _hold(writer.ledger, checkpointed, expires_at=NOW)
    await _hold(writer.ledger, lost, expires_at=NOW)  # its process died before any token
    await _hold(writer.ledger, running, expires_at=2e9)
    crashed = TurnCheckpoints(tmp_path / "checkpoints")
    LedgerObserver(writer, crashed).notify(_delivered(checkpointed, 4, "0.0004"))
    _crash(crashed)

    assert await recover_interrupted_turns(TurnCheckpoints(tmp_path / "checkpoints"), writer) == 1
    assert await _balance(writer.ledger) == BalanceInfo(
        "wallet-a", D("0.9996"), D("0.01"), D("0.9896")
    )
    rows = await writer.ledger.database.fetch_all(
        "SELECT hold_id, charged_e8 FROM balance_holds ORDER BY hold_id"
    )
    assert [(row["hold_id"], row["charged_e8"]) for row in rows] == [
        ("s1:r1", 40_000),
        ("s1:r2", 0),
        ("s1:r3", None),
    ]


async def test_the_writer_releases_expired_holds_as_it_runs(
    ledger_url: str, tmp_path: Path
) -> None:
    ledger = Ledger(ledger_url)
    await ledger.connect()
    await credit(ledger, "wallet-a", D(1))
    await _hold(ledger, _context("r1"), expires_at=NOW)
    await ledger.aclose()
    writer = LedgerWriter(Ledger(ledger_url), tmp_path / "spool", retry_s=60, hold_sweep_s=0)
    await writer.start()
    writer.submit(turn_record(_finished(_context("r2", held=None), "0"), ended_at=NOW))
    await writer.flush()  # the loop sweeps before it takes the record
    assert await _balance(writer.ledger) == BalanceInfo("wallet-a", D(1), D(0), D(1))
    await writer.aclose()


async def test_a_spooled_turn_settles_its_hold_once_when_replayed(tmp_path: Path) -> None:
    directory = tmp_path / "db"
    directory.mkdir()
    url = f"sqlite+aiosqlite:///{directory / 'ledger.sqlite3'}"
    ledger = Ledger(url)
    await ledger.connect()
    await credit(ledger, "wallet-a", D(1))
    context = _context("r1")
    await _hold(ledger, context)
    await ledger.aclose()

    directory.rename(tmp_path / "away")  # the database is unreachable
    writer = LedgerWriter(Ledger(url), tmp_path / "spool", retry_s=60)
    await writer.start()
    assert writer.degraded
    observer = LedgerObserver(writer, TurnCheckpoints(tmp_path / "checkpoints"))
    observer.notify(_finished(context, "0.0005"))
    observer.notify(_finished(context, "0.0005"))  # retried while down: spooled twice
    await writer.flush()
    assert len(writer.spool) == 2

    (tmp_path / "away").rename(directory)
    observer.notify(_finished(context, "0.0005"))  # the next record reconnects and replays
    await writer.flush()
    assert not writer.degraded
    assert len(writer.spool) == 0
    assert await _balance(writer.ledger) == BalanceInfo("wallet-a", D("0.9995"), D(0), D("0.9995"))
    assert await writer.ledger.turn_count() == 1
    await writer.aclose()


def test_records_spooled_before_holds_existed_still_load() -> None:
    line = turn_record(_finished(_context("r1"), "0.0005"), ended_at=NOW).to_json()
    assert line["hold_id"] == "s1:r1"
    old = {
        k: v for k, v in line.items() if k not in ("principal", "client_address_hash", "hold_id")
    }
    record = TurnRecord.from_json(old)
    assert (record.principal, record.client_address_hash, record.hold_id) == (None, None, None)
    assert record.cost_far_e8 == 50_000
