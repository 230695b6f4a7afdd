"""Earnings per payee: what `farmesh-ws ledger nodes` shows.

A payee is a proven payout wallet, whatever peer ids its work came from (a restarted server
without a persistent identity, or one operator's several servers), or, for work no wallet was
proven for, the peer id itself, marked unbound. Sums come from the ``payout_earnings`` view
(schema version 5); amounts are exact (``Decimal`` $FAR, from integer 10⁻⁸ units).
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from farmesh_ws.core.money import from_e8
from farmesh_ws.ledger.store import Ledger, guarded


@dataclass(frozen=True, slots=True)
class PayeeEarnings:
    """One payee: ``payee`` is ``payout_wallet`` when ``payout_bound``, else the peer id.
    ``work`` is tokens × blocks summed over ``spans`` contributions; ``earned_far`` in $FAR."""

    payee: str
    payout_bound: bool
    peer_ids: tuple[str, ...]
    public_names: tuple[str, ...]
    spans: int
    tokens: int
    replayed_tokens: int
    work: int
    earned_far: Decimal


async def payee_earnings(ledger: Ledger) -> list[PayeeEarnings]:
    """Every payee, most earned first. Raises LedgerUnavailable if the query fails."""
    async with guarded("query"):
        rows = await ledger.database.fetch_all("SELECT * FROM payout_earnings")
    return roll_up(dict(row._mapping) for row in rows)


def roll_up(rows: Iterable[Mapping[str, Any]]) -> list[PayeeEarnings]:
    """Fold ``payout_earnings`` rows (one per wallet and peer id) into payees."""
    groups: dict[tuple[bool, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        wallet = row["payout_wallet"]
        key = (True, str(wallet)) if wallet is not None else (False, str(row["peer_id"]))
        groups.setdefault(key, []).append(row)
    payees = [
        PayeeEarnings(
            payee=payee,
            payout_bound=bound,
            peer_ids=tuple(sorted({str(row["peer_id"]) for row in group})),
            public_names=tuple(sorted({str(r["public_name"]) for r in group if r["public_name"]})),
            spans=sum(int(row["spans"]) for row in group),
            tokens=sum(int(row["tokens"]) for row in group),
            replayed_tokens=sum(int(row["replayed_tokens"]) for row in group),
            work=sum(int(row["work"]) for row in group),
            earned_far=from_e8(sum(int(row["earned_far_e8"]) for row in group)),
        )
        for (bound, payee), group in groups.items()
    ]
    return sorted(payees, key=lambda p: (-p.earned_far, not p.payout_bound, p.payee))
