"""Taking prepaid holds, many at once: a few statements and one commit per batch.

A thousand chat turns that start within a few milliseconds each need a hold before their first
token (protocol.md §7). One transaction per hold made them wait on each other: SQLite lets one
writer in at a time and PostgreSQL locks the wallet's row, so the last of 1,000 turns got its
first token 3.2 s after asking (scripts/bench_ws.py); one transaction per group with two
statements per hold still took 0.9 s. :func:`take_holds` takes a whole batch in one transaction
with a fixed number of statements: lock and read the wallets' balances, decide each hold in
order in Python, insert the holds in one ``INSERT`` (the rows as one JSON value), add them to
``held_e8`` with one ``UPDATE`` per wallet. :class:`HoldBatcher` gathers the holds asked while
a batch commits into the next one ("group commit").

The rule per hold, in the order asked: it holds ``min(maximum, available)`` if at least
``minimum`` is available, else it is refused with
:class:`~farmesh_ws.errors.InsufficientBalance`; a hold id used before (in the database or
earlier in the batch) is refused with :class:`~farmesh_ws.ledger.balances.DuplicateHold`. A
database failure rolls back the whole batch: each of its holds raises
:class:`~farmesh_ws.ledger.store.LedgerUnavailable` and none was taken.
"""

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from databases import Database

from farmesh_ws.core.money import far_text, from_e8
from farmesh_ws.errors import InsufficientBalance
from farmesh_ws.ledger.balances import BalanceRequestError, DuplicateHold, amount_e8, wallet_key
from farmesh_ws.ledger.store import Ledger, LedgerUnavailable, guarded

Outcome = int | InsufficientBalance | DuplicateHold
"""A hold's result: the amount held (10⁻⁸ $FAR), or its refusal."""


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """One hold to take; amounts in 10⁻⁸ $FAR, times in Unix seconds, ``wallet`` as balances
    stores it (:func:`~farmesh_ws.ledger.balances.wallet_key`)."""

    hold_id: str
    wallet: str
    minimum_e8: int
    maximum_e8: int
    expires_at: float
    now: float


async def take_holds(db: Database, postgresql: bool, requests: list[HoldRequest]) -> list[Outcome]:
    """Take ``requests`` inside the caller's write transaction; one outcome per request."""
    wallets = sorted({request.wallet for request in requests})
    available = await _lock_available(db, postgresql, wallets)
    outcomes: list[Outcome] = []
    seen: set[str] = set()
    for request in requests:
        left = available.get(request.wallet, 0)
        if request.hold_id in seen:
            outcomes.append(DuplicateHold(f"hold {request.hold_id} was already taken"))
        elif left < request.minimum_e8:
            outcomes.append(
                InsufficientBalance(
                    f"balance {far_text(from_e8(left))} $FAR available; this request needs"
                    f" at least {far_text(from_e8(request.minimum_e8))}"
                )
            )
        else:
            amount = min(request.maximum_e8, left)
            available[request.wallet] = left - amount
            outcomes.append(amount)
        seen.add(request.hold_id)
    taken: list[tuple[HoldRequest, int]] = [
        (r, o) for r, o in zip(requests, outcomes, strict=True) if isinstance(o, int)
    ]
    inserted = await _insert(db, postgresql, taken)
    held: Counter[str] = Counter()
    for index, (request, outcome) in enumerate(zip(requests, outcomes, strict=True)):
        if not isinstance(outcome, int):
            continue
        if request.hold_id in inserted:
            held[request.wallet] += outcome
        else:  # the id was used by an earlier request
            outcomes[index] = DuplicateHold(f"hold {request.hold_id} was already taken")
    now = max(request.now for request in requests)
    for wallet, amount in held.items():
        await db.execute(
            """UPDATE balances SET held_e8 = held_e8 + :amount, updated_at = :now
               WHERE wallet = :wallet""",
            {"wallet": wallet, "amount": amount, "now": now},
        )
    return outcomes


async def _lock_available(db: Database, postgresql: bool, wallets: list[str]) -> dict[str, int]:
    """Each wallet's ``balance_e8 - held_e8``, its row locked for the rest of the transaction.

    PostgreSQL: ``FOR UPDATE`` (rows in wallet order, so two batches never deadlock). SQLite:
    the transaction writes first, which takes the database's write lock before it reads.
    """
    names = {f"w{i}": wallet for i, wallet in enumerate(wallets)}
    listed = ", ".join(f":{name}" for name in names)
    if not postgresql:
        await db.execute(
            f"UPDATE balances SET updated_at = updated_at WHERE wallet IN ({listed})", names
        )
    lock = " ORDER BY wallet FOR UPDATE" if postgresql else ""
    rows = await db.fetch_all(
        f"SELECT wallet, balance_e8 - held_e8 AS available FROM balances"
        f" WHERE wallet IN ({listed}){lock}",
        names,
    )
    return {row["wallet"]: int(row["available"]) for row in rows}


# The rows travel as one JSON parameter that the database unpacks: binding five parameters per
# row made the ``databases``/SQLAlchemy query compilation the slowest part (82 of 147 ms for
# 1,000 holds on SQLite). "WHERE true" keeps SQLite's parser from reading ON CONFLICT as a join.
_INSERT_SQLITE = """
    INSERT INTO balance_holds (hold_id, wallet, amount_e8, created_at, expires_at)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4
    FROM json_each(:rows) WHERE true
    ON CONFLICT (hold_id) DO NOTHING RETURNING hold_id"""
_INSERT_POSTGRESQL = """
    INSERT INTO balance_holds (hold_id, wallet, amount_e8, created_at, expires_at)
    SELECT r.hold_id, r.wallet, r.amount_e8, r.created_at, r.expires_at
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(
        hold_id text, wallet text, amount_e8 bigint,
        created_at double precision, expires_at double precision)
    ON CONFLICT (hold_id) DO NOTHING RETURNING hold_id"""


async def _insert(db: Database, postgresql: bool, taken: list[tuple[HoldRequest, int]]) -> set[str]:
    """Insert the holds; the ids actually inserted (not already in the table)."""
    if not taken:
        return set()
    if postgresql:
        rows: list[Any] = [
            {
                "hold_id": r.hold_id,
                "wallet": r.wallet,
                "amount_e8": amount,
                "created_at": r.now,
                "expires_at": r.expires_at,
            }
            for r, amount in taken
        ]
    else:
        rows = [[r.hold_id, r.wallet, amount, r.now, r.expires_at] for r, amount in taken]
    query = _INSERT_POSTGRESQL if postgresql else _INSERT_SQLITE
    returned = await db.fetch_all(query, {"rows": json.dumps(rows)})
    return {row["hold_id"] for row in returned}


def hold_request(
    *,
    wallet: str,
    hold_id: str,
    minimum: Decimal,
    maximum: Decimal,
    expires_at: float,
    now: float | None = None,
) -> HoldRequest:
    """A checked hold: raises BalanceRequestError for a bad wallet, an empty hold id, or
    amounts that are not ``0 < minimum <= maximum`` with at most 8 decimals."""
    minimum_e8 = amount_e8(minimum, "minimum")
    maximum_e8 = amount_e8(maximum, "maximum")
    if minimum_e8 > maximum_e8:
        raise BalanceRequestError("a hold's minimum must not exceed its maximum")
    if not hold_id:
        raise BalanceRequestError("a hold needs an id")
    at = time.time() if now is None else now
    return HoldRequest(hold_id, wallet_key(wallet), minimum_e8, maximum_e8, expires_at, at)


async def take_hold(
    ledger: Ledger,
    *,
    wallet: str,
    hold_id: str,
    minimum: Decimal,
    maximum: Decimal,
    expires_at: float,
    now: float | None = None,
) -> Decimal:
    """One hold in its own transaction: ``min(maximum, available)`` $FAR of ``wallet``'s
    balance if at least ``minimum`` is available; the amount held. ``hold_id`` (the request's
    ``session_id:request_id``) settles it later. Raises BalanceRequestError
    (:func:`hold_request`), InsufficientBalance, DuplicateHold, LedgerUnavailable."""
    request = hold_request(
        wallet=wallet,
        hold_id=hold_id,
        minimum=minimum,
        maximum=maximum,
        expires_at=expires_at,
        now=now,
    )
    async with guarded("write"), ledger.write_transaction():
        (outcome,) = await take_holds(ledger.database, ledger.dialect == "postgresql", [request])
    if isinstance(outcome, int):
        return from_e8(outcome)
    raise outcome


class HoldBatcher:
    """Gathers the holds asked on ``ledger`` while a batch commits into the next batch."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._queue: list[tuple[HoldRequest, asyncio.Future[Decimal]]] = []
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0
        """Batches committed so far."""

    async def take(self, request: HoldRequest) -> Decimal:
        """The amount held once its batch committed; raises InsufficientBalance,
        DuplicateHold or LedgerUnavailable."""
        future: asyncio.Future[Decimal] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="farmesh-ledger-holds")
        return await future

    async def aclose(self) -> None:
        """Wait until every queued hold has committed (or failed)."""
        if self._worker is not None:
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            await self._commit(batch)

    async def _commit(self, batch: list[tuple[HoldRequest, asyncio.Future[Decimal]]]) -> None:
        requests = [request for request, _ in batch]
        postgresql = self._ledger.dialect == "postgresql"
        try:
            async with guarded("write"), self._ledger.write_transaction():
                outcomes = await take_holds(self._ledger.database, postgresql, requests)
        except LedgerUnavailable as failure:
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            return
        self.batches += 1
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(outcome, int):
                future.set_result(from_e8(outcome))
            else:
                future.set_exception(outcome)
