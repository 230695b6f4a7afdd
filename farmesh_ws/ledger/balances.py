"""Prepaid $FAR balances (issue 9): credits, a hold taken before each request, one settlement.

Shapes and units. Amounts are ``Decimal`` $FAR here and BIGINT counts of 10⁻⁸ $FAR in SQL
(``to_e8``); times are Unix seconds. A wallet's ``balances`` row holds ``balance`` (credited
minus charged) and ``held`` (the sum of its unsettled holds); ``available = balance - held``. A
wallet without a row has balance 0. ``0 <= held <= balance`` always (CHECK constraints too), so a
balance never goes negative.

A hold's life: :func:`~farmesh_ws.ledger.hold_batch.take_hold` (or a batch of them) reserves
part of the available balance before a request reaches the mesh; it is settled exactly once,
for the request's cost clamped to the hold, either by the ledger when it stores the request's
turn (``TurnRecord.hold_id``, in the turn's own transaction: ``store.settle_hold_in``), by
:func:`settle_hold`, or for nothing by :func:`release_expired_holds` once ``expires_at`` has
passed (its process died unrecovered); a hold its request never used is removed by
:func:`release_hold`.

Wallets follow protocol v1 (1-128 characters of ``A-Z a-z 0-9 _ . : -``); a ``0x`` address of 40
hex digits is stored in lower case, so EIP-55 checksum case and lower case are one balance (as
:func:`~farmesh_ws.core.principal.same_wallet` compares them).

Errors: bad input raises :class:`BalanceRequestError` (a ValueError; a hold id already used,
:class:`DuplicateHold`); a hold the available balance cannot cover raises
:class:`~farmesh_ws.errors.InsufficientBalance`; a database failure raises
:class:`~farmesh_ws.ledger.store.LedgerUnavailable`.
"""

import re
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec

from farmesh_ws.core.money import far, far_text, from_e8, to_e8
from farmesh_ws.ledger.store import Ledger, guarded, settle_hold_in
from farmesh_ws.protocol import Wallet

MAX_CREDIT_FAR = Decimal(10) ** 10
"""The largest credit, and the largest balance: 10¹⁸ e8 units stay far inside a BIGINT."""
_MAX_BALANCE_E8 = to_e8(MAX_CREDIT_FAR)
_NOTE_MAX_CHARS = 256
_HEX_ADDRESS = re.compile(r"0[xX][0-9a-fA-F]{40}")


class BalanceRequestError(ValueError):
    """A balances request the store refuses; the message is one line."""


class DuplicateHold(BalanceRequestError):
    """A hold with this id was already taken (settled or not)."""


@dataclass(frozen=True, slots=True)
class BalanceInfo:
    """One wallet's balance, held amount and what is available for new holds ($FAR)."""

    wallet: str
    balance: Decimal
    held: Decimal
    available: Decimal


@dataclass(frozen=True, slots=True)
class PrincipalCharges:
    """What one principal billed to a wallet. ``principal`` is who opened the sessions
    (``key:fk_...``, ``wallet:0x...``, ``anonymous``, ``open``; None for sessions stored before
    schema v3); ``spent_far`` the turns' cost, ``prepaid_far`` the part settled from the
    prepaid balance ($FAR)."""

    principal: str | None
    sessions: int
    turns: int
    prompt_tokens: int
    completion_tokens: int
    spent_far: Decimal
    prepaid_far: Decimal


async def credit(
    ledger: Ledger,
    wallet: str,
    amount: Decimal,
    note: str | None = None,
    *,
    now: float | None = None,
) -> Decimal:
    """Add ``amount`` $FAR to ``wallet``'s balance; return the new balance.

    The balance and its audit row (``balance_credits``) change in one transaction. Raises
    BalanceRequestError for a bad wallet or note, an amount that is not positive, has more than
    8 decimals or exceeds :data:`MAX_CREDIT_FAR`, or a balance that would exceed that maximum;
    LedgerUnavailable if the write fails.
    """
    key = wallet_key(wallet)
    credited_e8 = amount_e8(amount, "amount")
    if note is not None and not (0 < len(note) <= _NOTE_MAX_CHARS and note.isprintable()):
        raise BalanceRequestError(f"note must be 1-{_NOTE_MAX_CHARS} printable characters")
    at = time.time() if now is None else now
    db = ledger.database
    async with guarded("write"), ledger.write_transaction():
        balance_e8 = await db.fetch_val(
            """INSERT INTO balances (wallet, balance_e8, held_e8, updated_at)
               VALUES (:wallet, :amount_e8, 0, :now)
               ON CONFLICT (wallet) DO UPDATE
               SET balance_e8 = balances.balance_e8 + excluded.balance_e8,
                   updated_at = excluded.updated_at
               WHERE balances.balance_e8 + excluded.balance_e8 <= :max_e8
               RETURNING balance_e8""",
            {"wallet": key, "amount_e8": credited_e8, "now": at, "max_e8": _MAX_BALANCE_E8},
        )
        if balance_e8 is not None:
            await db.execute(
                """INSERT INTO balance_credits (id, wallet, amount_e8, note, created_at)
                   VALUES (:id, :wallet, :amount_e8, :note, :now)""",
                {
                    "id": uuid.uuid4().hex,
                    "wallet": key,
                    "amount_e8": credited_e8,
                    "note": note,
                    "now": at,
                },
            )
    if balance_e8 is None:
        raise BalanceRequestError(
            f"the balance of {key} would exceed {far_text(MAX_CREDIT_FAR)} $FAR"
        )
    return from_e8(int(balance_e8))


async def settle_hold(
    ledger: Ledger, hold_id: str, charged: Decimal, *, now: float | None = None
) -> bool:
    """Settle hold ``hold_id`` for ``charged`` $FAR (clamped to the hold), exactly once.

    In one transaction the hold is marked settled, the balance drops by the charge and the held
    amount by the hold. Returns False, changing nothing, if the hold is unknown or already
    settled (by an earlier call, the turn's ledger write, or an expiry release). Raises
    BalanceRequestError if ``charged`` is negative or has more than 8 decimals,
    LedgerUnavailable if the write fails.
    """
    if not (charged.is_finite() and charged >= 0 and far(charged) == charged):
        raise BalanceRequestError("charged must be zero or more, with at most 8 decimals")
    at = time.time() if now is None else now
    db = ledger.database
    async with guarded("write"), ledger.write_transaction():
        return await settle_hold_in(db, hold_id, to_e8(charged), at)


async def release_hold(ledger: Ledger, hold_id: str, *, now: float | None = None) -> bool:
    """Give back a hold no request used (its admission was refused after the hold was taken):
    the hold is removed as if never taken, so its request id stays free and nothing records a
    request that never ran. Returns False if the hold is unknown or already settled. Raises
    LedgerUnavailable if the write fails."""
    at = time.time() if now is None else now
    db = ledger.database
    async with guarded("write"), ledger.write_transaction():
        row = await db.fetch_one(
            """DELETE FROM balance_holds WHERE hold_id = :hold_id AND settled_at IS NULL
               RETURNING wallet, amount_e8""",
            {"hold_id": hold_id},
        )
        if row is None:
            return False
        await db.execute(
            """UPDATE balances SET held_e8 = held_e8 - :amount_e8, updated_at = :now
               WHERE wallet = :wallet""",
            {"wallet": row["wallet"], "amount_e8": int(row["amount_e8"]), "now": at},
        )
    return True


async def release_expired_holds(ledger: Ledger, now: float) -> int:
    """Settle for nothing every unsettled hold whose ``expires_at`` is before ``now`` (Unix s);
    return how many were released. Each is its own transaction, and one settled meanwhile by
    its turn is left alone. Raises LedgerUnavailable if the database fails."""
    db = ledger.database
    released = 0
    async with guarded("write"):
        rows = await db.fetch_all(
            """SELECT hold_id FROM balance_holds
               WHERE settled_at IS NULL AND expires_at < :now ORDER BY expires_at""",
            {"now": now},
        )
        for row in rows:
            async with ledger.write_transaction():
                released += await settle_hold_in(db, row["hold_id"], 0, now)
    return released


async def balances(ledger: Ledger, wallet: str | None = None) -> list[BalanceInfo]:
    """Every wallet's balance by wallet, or ``wallet``'s alone (zero if it has no row).

    Raises BalanceRequestError for a bad wallet, LedgerUnavailable if the query fails.
    """
    query = "SELECT wallet, balance_e8, held_e8 FROM balances"
    values: dict[str, Any] = {}
    if wallet is not None:
        values["wallet"] = wallet_key(wallet)
        query += " WHERE wallet = :wallet"
    async with guarded("query"):
        rows = await ledger.database.fetch_all(query + " ORDER BY wallet", values)
    if wallet is not None and not rows:
        return [BalanceInfo(values["wallet"], Decimal(0), Decimal(0), Decimal(0))]
    return [
        BalanceInfo(
            wallet=row["wallet"],
            balance=from_e8(int(row["balance_e8"])),
            held=from_e8(int(row["held_e8"])),
            available=from_e8(int(row["balance_e8"]) - int(row["held_e8"])),
        )
        for row in rows
    ]


async def charges(ledger: Ledger, wallet: str) -> list[PrincipalCharges]:
    """What each principal billed to ``wallet`` (a hex address in any case), most first.

    Turns are grouped by the principal that opened their session. Raises BalanceRequestError
    for a bad wallet, LedgerUnavailable if the query fails.
    """
    key = wallet_key(wallet)
    match = "lower(t.wallet)" if _HEX_ADDRESS.fullmatch(key) else "t.wallet"
    async with guarded("query"):
        rows = await ledger.database.fetch_all(
            f"""SELECT s.principal AS principal,
                       COUNT(DISTINCT t.session_id) AS sessions,
                       COUNT(*) AS turns,
                       SUM(t.prompt_tokens) AS prompt_tokens,
                       SUM(t.completion_tokens) AS completion_tokens,
                       SUM(t.cost_far_e8) AS spent_far_e8,
                       SUM(COALESCE(h.charged_e8, 0)) AS prepaid_far_e8
                FROM turns t
                JOIN inference_sessions s ON s.session_id = t.session_id
                LEFT JOIN balance_holds h ON h.hold_id = t.session_id || ':' || t.request_id
                WHERE {match} = :wallet
                GROUP BY s.principal
                ORDER BY SUM(t.cost_far_e8) DESC, COALESCE(s.principal, '')""",
            {"wallet": key},
        )
    return [
        PrincipalCharges(
            principal=row["principal"],
            sessions=int(row["sessions"]),
            turns=int(row["turns"]),
            prompt_tokens=int(row["prompt_tokens"]),
            completion_tokens=int(row["completion_tokens"]),
            spent_far=from_e8(int(row["spent_far_e8"])),
            prepaid_far=from_e8(int(row["prepaid_far_e8"])),
        )
        for row in rows
    ]


def wallet_key(wallet: str) -> str:
    """``wallet`` as balances store it (a hex address in lower case), after checking it against
    protocol v1's rule. Raises BalanceRequestError."""
    try:
        msgspec.convert(wallet, Wallet)
    except msgspec.ValidationError:
        raise BalanceRequestError(
            "wallet must be 1-128 characters of A-Z a-z 0-9 _ . : - (e.g. a 0x address)"
        ) from None
    return wallet.lower() if _HEX_ADDRESS.fullmatch(wallet) else wallet


def amount_e8(amount: Decimal, name: str) -> int:
    """``amount`` $FAR in 10⁻⁸ units: more than 0, at most MAX_CREDIT_FAR, 8 decimals at most;
    raises BalanceRequestError naming ``name``."""
    if not (amount.is_finite() and 0 < amount <= MAX_CREDIT_FAR and far(amount) == amount):
        raise BalanceRequestError(
            f"{name} must be more than 0 and at most {far_text(MAX_CREDIT_FAR)} $FAR,"
            " with at most 8 decimals"
        )
    return to_e8(amount)
