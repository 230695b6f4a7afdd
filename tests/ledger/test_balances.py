"""Prepaid balances on SQLite and PostgreSQL: credits, holds, settlement, expiry, no overdraft."""

import asyncio
from decimal import Decimal

import pytest

from farmesh_ws.errors import InsufficientBalance
from farmesh_ws.ledger.balances import (
    BalanceInfo,
    BalanceRequestError,
    DuplicateHold,
    balances,
    credit,
    release_expired_holds,
    release_hold,
    settle_hold,
)
from farmesh_ws.ledger.hold_batch import take_hold
from farmesh_ws.ledger.store import Ledger

WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"
D = Decimal


async def _hold(
    ledger: Ledger,
    hold_id: str,
    minimum: str,
    maximum: str,
    *,
    wallet: str = "wallet-a",
    expires_at: float = 2_000_000_000.0,
) -> Decimal:
    return await take_hold(
        ledger,
        wallet=wallet,
        hold_id=hold_id,
        minimum=D(minimum),
        maximum=D(maximum),
        expires_at=expires_at,
        now=1_700_000_000.0,
    )


async def _info(ledger: Ledger, wallet: str = "wallet-a") -> BalanceInfo:
    (info,) = await balances(ledger, wallet)
    return info


async def test_credits_add_up_exactly_and_leave_an_audit_row(ledger: Ledger) -> None:
    assert await credit(ledger, "wallet-a", D("0.1"), "first", now=1_700_000_000.0) == D("0.1")
    for _ in range(9):
        await credit(ledger, "wallet-a", D("0.1"))
    assert await credit(ledger, "wallet-b", D("0.00000001")) == D("0.00000001")
    assert await balances(ledger) == [
        BalanceInfo("wallet-a", D(1), D(0), D(1)),
        BalanceInfo("wallet-b", D("0.00000001"), D(0), D("0.00000001")),
    ]
    rows = await ledger.database.fetch_all(
        "SELECT wallet, amount_e8, note, created_at FROM balance_credits ORDER BY created_at"
    )
    assert len(rows) == 11
    assert (rows[0]["wallet"], rows[0]["amount_e8"], rows[0]["note"]) == (
        "wallet-a",
        10_000_000,
        "first",
    )
    assert sum(row["amount_e8"] for row in rows) == 100_000_001


async def test_a_wallet_without_a_row_has_balance_zero(ledger: Ledger) -> None:
    assert await balances(ledger) == []
    assert await _info(ledger, "nobody") == BalanceInfo("nobody", D(0), D(0), D(0))
    with pytest.raises(
        InsufficientBalance, match=r"^balance 0 \$FAR available; this request needs at least 1$"
    ):
        await _hold(ledger, "s:r", "1", "2", wallet="nobody")


async def test_hex_addresses_are_one_balance_in_any_case(ledger: Ledger) -> None:
    await credit(ledger, WALLET, D(2))
    await credit(ledger, WALLET.lower(), D(1))
    assert await _info(ledger, WALLET.upper().replace("0X", "0x")) == BalanceInfo(
        WALLET.lower(), D(3), D(0), D(3)
    )
    assert await _hold(ledger, "s:r", "1", "1", wallet=WALLET) == D(1)
    assert (await _info(ledger, WALLET)).held == D(1)


@pytest.mark.parametrize(
    ("amount", "note"),
    [
        ("0", None),
        ("-1", None),
        ("0.000000001", None),
        ("NaN", None),
        ("Infinity", None),
        ("10000000000.00000001", None),
        ("1", ""),
        ("1", "two\nlines"),
        ("1", "x" * 257),
    ],
)
async def test_bad_credits_are_refused_and_change_nothing(
    ledger: Ledger, amount: str, note: str | None
) -> None:
    with pytest.raises(BalanceRequestError):
        await credit(ledger, "wallet-a", D(amount), note)
    assert await balances(ledger) == []


@pytest.mark.parametrize("wallet", ["", "a b", "w\n", "x" * 129, "0x12/34"])
async def test_bad_wallets_are_refused(ledger: Ledger, wallet: str) -> None:
    with pytest.raises(BalanceRequestError, match=r"^wallet must be"):
        await credit(ledger, wallet, D(1))
    with pytest.raises(BalanceRequestError, match=r"^wallet must be"):
        await balances(ledger, wallet)
    with pytest.raises(BalanceRequestError, match=r"^wallet must be"):
        await _hold(ledger, "s:r", "1", "1", wallet=wallet)


async def test_a_balance_cannot_pass_the_maximum(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D(10) ** 10)
    with pytest.raises(BalanceRequestError, match=r"would exceed 10000000000 \$FAR"):
        await credit(ledger, "wallet-a", D("0.00000001"))
    assert (await _info(ledger)).balance == D(10) ** 10
    assert await ledger.database.fetch_val("SELECT COUNT(*) FROM balance_credits") == 1


async def test_a_hold_takes_up_to_its_maximum_of_what_is_available(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D(1))
    assert await _hold(ledger, "s:r1", "0.1", "0.3") == D("0.3")
    assert await _info(ledger) == BalanceInfo("wallet-a", D(1), D("0.3"), D("0.7"))
    assert await _hold(ledger, "s:r2", "0.5", "2") == D("0.7")  # all that is left
    with pytest.raises(InsufficientBalance) as refused:
        await _hold(ledger, "s:r3", "0.00000001", "1")
    assert refused.value.code == "insufficient_balance"
    assert await _info(ledger) == BalanceInfo("wallet-a", D(1), D(1), D(0))


async def test_the_refusal_says_what_is_available_and_what_is_needed(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D("0.0001"))
    with pytest.raises(InsufficientBalance) as refused:
        await _hold(ledger, "s:r", "0.00032", "0.01")
    assert str(refused.value) == (
        "balance 0.0001 $FAR available; this request needs at least 0.00032"
    )
    assert await _info(ledger) == BalanceInfo("wallet-a", D("0.0001"), D(0), D("0.0001"))
    assert await ledger.database.fetch_val("SELECT COUNT(*) FROM balance_holds") == 0


@pytest.mark.parametrize(
    ("minimum", "maximum"), [("0", "1"), ("-1", "1"), ("2", "1"), ("0.000000001", "1")]
)
async def test_bad_hold_amounts_are_refused(ledger: Ledger, minimum: str, maximum: str) -> None:
    await credit(ledger, "wallet-a", D(5))
    with pytest.raises(BalanceRequestError):
        await _hold(ledger, "s:r", minimum, maximum)
    assert (await _info(ledger)).held == D(0)


async def test_a_hold_id_is_used_once(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D(1))
    await _hold(ledger, "s:r1", "0.1", "0.1")
    with pytest.raises(DuplicateHold, match=r"^hold s:r1 was already taken$"):
        await _hold(ledger, "s:r1", "0.1", "0.1")
    assert await settle_hold(ledger, "s:r1", D("0.05"))
    with pytest.raises(DuplicateHold):
        await _hold(ledger, "s:r1", "0.1", "0.1")
    assert await _info(ledger) == BalanceInfo("wallet-a", D("0.95"), D(0), D("0.95"))


async def test_a_released_hold_leaves_no_trace(ledger: Ledger) -> None:
    """A hold of a request refused after taking it: as if never taken, its id free again."""
    await credit(ledger, "wallet-a", D(1))
    await _hold(ledger, "s:r1", "0.1", "0.4")
    assert await release_hold(ledger, "s:r1")
    assert not await release_hold(ledger, "s:r1")  # once
    assert await _info(ledger) == BalanceInfo("wallet-a", D(1), D(0), D(1))
    assert await _hold(ledger, "s:r1", "0.1", "0.4") == D("0.4")  # the request may run now
    assert await settle_hold(ledger, "s:r1", D("0.2"))
    assert not await release_hold(ledger, "s:r1")  # a settled hold is not given back
    assert await _info(ledger) == BalanceInfo("wallet-a", D("0.8"), D(0), D("0.8"))


async def test_settling_charges_once_clamped_to_the_hold(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D(1))
    await _hold(ledger, "s:r1", "0.1", "0.3")
    await _hold(ledger, "s:r2", "0.1", "0.3")
    assert await settle_hold(ledger, "s:r1", D("0.12345678"))
    assert await _info(ledger) == BalanceInfo(
        "wallet-a", D("0.87654322"), D("0.3"), D("0.57654322")
    )
    assert not await settle_hold(ledger, "s:r1", D("0.12345678"))  # a second time: nothing
    assert not await settle_hold(ledger, "s:r1", D(0))
    assert await settle_hold(ledger, "s:r2", D(5))  # more than held: the hold is the limit
    assert await _info(ledger) == BalanceInfo("wallet-a", D("0.57654322"), D(0), D("0.57654322"))
    assert not await settle_hold(ledger, "s:unknown", D(1))
    rows = await ledger.database.fetch_all(
        "SELECT hold_id, charged_e8 FROM balance_holds ORDER BY hold_id"
    )
    assert [(row["hold_id"], row["charged_e8"]) for row in rows] == [
        ("s:r1", 12_345_678),
        ("s:r2", 30_000_000),
    ]


@pytest.mark.parametrize("charged", ["-0.1", "0.000000001", "NaN"])
async def test_bad_charges_are_refused(ledger: Ledger, charged: str) -> None:
    await credit(ledger, "wallet-a", D(1))
    await _hold(ledger, "s:r1", "0.1", "0.3")
    with pytest.raises(BalanceRequestError):
        await settle_hold(ledger, "s:r1", D(charged))
    assert (await _info(ledger)).held == D("0.3")


async def test_concurrent_settlements_of_one_hold_charge_once(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D(1))
    await _hold(ledger, "s:r1", "0.3", "0.3")
    settled = await asyncio.gather(*(settle_hold(ledger, "s:r1", D("0.2")) for _ in range(20)))
    assert settled.count(True) == 1
    assert await _info(ledger) == BalanceInfo("wallet-a", D("0.8"), D(0), D("0.8"))


async def test_expired_unsettled_holds_are_released_for_nothing(ledger: Ledger) -> None:
    await credit(ledger, "wallet-a", D(1))
    await _hold(ledger, "s:old", "0.1", "0.1", expires_at=1_700_000_100.0)
    await _hold(ledger, "s:settled", "0.2", "0.2", expires_at=1_700_000_100.0)
    await _hold(ledger, "s:new", "0.3", "0.3", expires_at=1_700_000_300.0)
    assert await settle_hold(ledger, "s:settled", D("0.2"))

    assert await release_expired_holds(ledger, 1_700_000_200.0) == 1
    assert await _info(ledger) == BalanceInfo("wallet-a", D("0.8"), D("0.3"), D("0.5"))
    assert await release_expired_holds(ledger, 1_700_000_200.0) == 0
    assert not await settle_hold(ledger, "s:old", D("0.1"))  # released: settled already
    assert await release_expired_holds(ledger, 1_700_000_301.0) == 1
    assert await _info(ledger) == BalanceInfo("wallet-a", D("0.8"), D(0), D("0.8"))


@pytest.mark.parametrize(
    ("minimum", "maximum", "granted"), [("0.1", "0.1", 10), ("0.05", "0.15", 7)]
)
async def test_50_concurrent_holds_on_one_wallet_never_overdraw(
    ledger: Ledger, minimum: str, maximum: str, granted: int
) -> None:
    await credit(ledger, "wallet-a", D(1))

    async def attempt(index: int) -> Decimal | None:
        try:
            return await _hold(ledger, f"s:r{index}", minimum, maximum)
        except InsufficientBalance:
            return None

    held = [amount for amount in await asyncio.gather(*map(attempt, range(50))) if amount]
    assert len(held) == granted
    assert sum(held) == D(1)
    assert all(D(minimum) <= amount <= D(maximum) for amount in held)
    assert await _info(ledger) == BalanceInfo("wallet-a", D(1), D(1), D(0))
    stored = await ledger.database.fetch_val("SELECT SUM(amount_e8) FROM balance_holds")
    assert stored == 100_000_000

    charges = await asyncio.gather(
        *(settle_hold(ledger, f"s:r{index}", D(maximum)) for index in range(50))
    )
    assert charges.count(True) == granted
    assert await _info(ledger) == BalanceInfo("wallet-a", D(0), D(0), D(0))
