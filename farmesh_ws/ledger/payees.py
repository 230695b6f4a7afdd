"""Earnings per payee: what `farmesh-ws ledger nodes` shows.

A payee is a proven payout wallet, whatever peer ids its work came from (a restarted server
without a persistent identity, or one operator's several servers), or, for work no wallet was
proven for, the peer id itself, marked unbound. Sums come from the ``payout_earnings`` view
(schema version 6: ``earned_far`` leaves out work withheld after a failed spot check, shown
as ``withheld_far``); amounts are exact (``Decimal`` $FAR, from integer 10⁻⁸ units). Flags come
from ``node_flags`` (:mod:`farmesh_ws.ledger.integrity`).
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
    ``work`` is tokens × blocks summed over ``spans`` contributions, ``verified_work`` the part
    a later spot check vouched for, ``withheld_work`` the part withheld; ``earned_far`` (owed)
    and ``withheld_far`` in $FAR; ``flags``: the kinds of its peer ids' flags, oldest first."""

    payee: str
    payout_bound: bool
    peer_ids: tuple[str, ...]
    public_names: tuple[str, ...]
    spans: int
    tokens: int
    replayed_tokens: int
    work: int
    verified_work: int
    withheld_work: int
    earned_far: Decimal
    withheld_far: Decimal
    flags: tuple[str, ...]


async def payee_earnings(ledger: Ledger) -> list[PayeeEarnings]:
    """Every payee, most earned first. Raises LedgerUnavailable if the query fails."""
    async with guarded("query"):
        rows = await ledger.database.fetch_all("SELECT * FROM payout_earnings")
        flags = await ledger.database.fetch_all(
            "SELECT peer_id, kind FROM node_flags ORDER BY flagged_at"
        )
    kinds: dict[str, list[str]] = {}
    for flag in flags:
        kinds.setdefault(str(flag._mapping["peer_id"]), []).append(str(flag._mapping["kind"]))
    return roll_up((dict(row._mapping) for row in rows), kinds)


def roll_up(
    rows: Iterable[Mapping[str, Any]], flags: Mapping[str, list[str]] | None = None
) -> list[PayeeEarnings]:
    """Fold ``payout_earnings`` rows (one per wallet and peer id) into payees, with the
    ``flags`` (kinds) of each peer id."""
    flags = flags or {}
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
            verified_work=sum(int(row["verified_work"]) for row in group),
            withheld_work=sum(int(row["withheld_work"]) for row in group),
            earned_far=from_e8(sum(int(row["earned_far_e8"]) for row in group)),
            withheld_far=from_e8(sum(int(row["withheld_far_e8"]) for row in group)),
            flags=tuple(
                kind
                for peer in sorted({str(r["peer_id"]) for r in group})
                for kind in flags.get(peer, [])
            ),
        )
        for (bound, payee), group in groups.items()
    ]
    credited = {peer for payee in payees for peer in payee.peer_ids}
    payees += [
        PayeeEarnings(
            peer, False, (peer,), (), 0, 0, 0, 0, 0, 0, Decimal(0), Decimal(0), tuple(kinds)
        )
        for peer, kinds in flags.items()
        if peer not in credited
    ]
    return sorted(payees, key=lambda p: (-p.earned_far, not p.payout_bound, p.payee))
