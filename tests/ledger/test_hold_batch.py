"""Holds taken in batches (ledger/hold_batch.py, ledger/holds.py) on SQLite and PostgreSQL:
many holds asked at once share few transactions and follow the one-by-one rule, a database
failure takes nothing, and a hold whose request went away is given back."""

import asyncio
from decimal import Decimal

import pytest

from farmesh_ws.errors import AuthUnavailable, InsufficientBalance
from farmesh_ws.ledger.balances import DuplicateHold, balances, credit
from farmesh_ws.ledger.hold_batch import HoldBatcher, hold_request, take_hold
from farmesh_ws.ledger.holds import LedgerHolds
from farmesh_ws.ledger.store import Ledger, LedgerUnavailable

D = Decimal


def _request(index: int, wallet: str = "wallet-a", maximum: str = "0.01") -> object:
    return hold_request(
        wallet=wallet,
        hold_id=f"s:r{index}",
        minimum=D("0.01"),
        maximum=D(maximum),
        expires_at=2e9,
    )


async def test_holds_asked_together_commit_together(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D("1.5"))  # pays for 150 of the 200
    await credit(ledger, "wallet-b", D("0.05"))
    batcher = HoldBatcher(ledger)
    asked = [_request(i) for i in range(200)] + [_request(1000 + i, "wallet-b") for i in range(9)]
    results = await asyncio.gather(
        *(batcher.take(request) for request in asked),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    a, b = results[:200], results[200:]
    assert a[:150] == [D("0.01")] * 150  # in the order asked, as one by one
    assert all(isinstance(r, InsufficientBalance) for r in a[150:])
    assert b[:5] == [D("0.01")] * 5
    assert all(isinstance(r, InsufficientBalance) for r in b[5:])
    assert batcher.batches < 10  # not one transaction per hold
    assert [(i.wallet, i.balance, i.held) for i in await balances(ledger)] == [
        ("wallet-a", D("1.5"), D("1.5")),
        ("wallet-b", D("0.05"), D("0.05")),
    ]


async def test_the_last_hold_takes_what_is_left(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D("0.035"))
    batcher = HoldBatcher(ledger)
    asked = [_request(i, maximum="0.02") for i in range(3)]
    results = await asyncio.gather(*(batcher.take(r) for r in asked), return_exceptions=True)  # type: ignore[arg-type]
    assert results[:2] == [D("0.02"), D("0.015")]  # min(maximum, available), in order
    assert isinstance(results[2], InsufficientBalance)  # 0 left, below the minimum 0.01


async def test_a_hold_id_is_taken_once_in_a_batch_and_across_batches(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D(1))
    assert await take_hold(
        ledger,
        wallet="wallet-a",
        hold_id="s:r1",
        minimum=D("0.01"),
        maximum=D("0.01"),
        expires_at=2e9,
    ) == D("0.01")
    batcher = HoldBatcher(ledger)
    results = await asyncio.gather(
        *(batcher.take(_request(i)) for i in (1, 2, 2)),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [DuplicateHold, Decimal, DuplicateHold]
    (info,) = await balances(ledger, "wallet-a")
    assert info.held == D("0.02")  # the refused duplicates hold nothing


async def test_a_database_failure_takes_nothing(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D(1))
    batcher = HoldBatcher(ledger)
    await ledger.database.execute("DROP TABLE balance_holds")  # every insert now fails
    results = await asyncio.gather(
        *(batcher.take(_request(i)) for i in range(3)),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [LedgerUnavailable] * 3
    (info,) = await balances(ledger, "wallet-a")
    assert info.held == 0  # rolled back with the batch


async def test_a_hold_whose_request_went_away_is_given_back(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D(1))
    holds = LedgerHolds(ledger, 3600)
    taking = asyncio.create_task(
        holds.take(wallet="wallet-a", hold_id="s:gone", minimum=D("0.1"), maximum=D("0.5"))
    )
    await asyncio.sleep(0)  # the hold is queued
    taking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taking
    await holds.aclose()  # the batch commits, then the hold is given back
    (info,) = await balances(ledger, "wallet-a")
    assert info.held == 0
    gone = await ledger.database.fetch_val(
        "SELECT COUNT(*) FROM balance_holds WHERE hold_id = 's:gone'"
    )
    assert gone == 0


async def test_a_ledger_that_cannot_answer_is_auth_unavailable() -> None:
    down = Ledger("postgresql+asyncpg://farmesh@127.0.0.1:1/nothing-listens-here")
    holds = LedgerHolds(down, 3600)
    with pytest.raises(AuthUnavailable):
        await holds.take(wallet="wallet-a", hold_id="s:r", minimum=D("0.1"), maximum=D("0.1"))
