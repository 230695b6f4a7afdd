"""Group commit of prepaid holds (ledger/group_commit.py, ledger/holds.py) on SQLite and
PostgreSQL: many holds asked at once share few transactions, refusals stay their own, a
database failure takes nothing, and a hold whose request went away is given back."""

import asyncio
from decimal import Decimal

import pytest
from databases import Database

from farmesh_ws.errors import AuthUnavailable, InsufficientBalance
from farmesh_ws.ledger.balances import balances, credit, hold_step
from farmesh_ws.ledger.group_commit import GroupCommit
from farmesh_ws.ledger.holds import LedgerHolds
from farmesh_ws.ledger.store import Ledger, LedgerUnavailable

D = Decimal
HOLDS = 200


def _step(ledger: Ledger, index: int) -> object:
    return hold_step(
        ledger,
        wallet="wallet-a",
        hold_id=f"s:r{index}",
        minimum=D("0.01"),
        maximum=D("0.01"),
        expires_at=2e9,
    )


async def test_holds_asked_together_commit_together(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D("1.5"))  # pays for 150 of the 200
    group = GroupCommit(ledger)
    results = await asyncio.gather(
        *(group.run(_step(ledger, i)) for i in range(HOLDS)),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    held = [r for r in results if isinstance(r, Decimal)]
    refused = [r for r in results if isinstance(r, InsufficientBalance)]
    assert (len(held), len(refused)) == (150, 50)
    assert group.groups < 10  # not one transaction per hold
    (info,) = await balances(ledger, "wallet-a")
    assert (info.balance, info.held) == (D("1.5"), D("1.5"))


async def test_a_database_failure_takes_nothing_from_the_group(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D(1))
    group = GroupCommit(ledger)

    async def broken(db: Database) -> None:
        await db.execute("SELECT * FROM no_such_table")

    results = await asyncio.gather(
        group.run(_step(ledger, 1)),  # type: ignore[arg-type]
        group.run(broken),
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [LedgerUnavailable, LedgerUnavailable]
    (info,) = await balances(ledger, "wallet-a")
    assert info.held == 0  # the first step's hold was rolled back with the group


async def test_a_hold_whose_request_went_away_is_given_back(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D(1))
    holds = LedgerHolds(ledger, 3600)
    taking = asyncio.create_task(
        holds.take(wallet="wallet-a", hold_id="s:gone", minimum=D("0.1"), maximum=D("0.5"))
    )
    await asyncio.sleep(0)  # the step is queued
    taking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taking
    await holds.aclose()  # the step commits, then its hold is released
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
