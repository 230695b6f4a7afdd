"""`farmesh-ws ledger credit|balances|charges`: prepaid balances from the command line.

- ``credit WALLET AMOUNT [--note TEXT]`` adds AMOUNT $FAR (a decimal, at most 8 places) and
  prints ``WALLET: BALANCE $FAR``, the new balance (a hex address in lower case, as stored).
- ``balances [--wallet W]`` prints wallet, balance, held and available ($FAR).
- ``charges --wallet W`` prints what each principal billed to W: ``key:fk_...``,
  ``wallet:0x...``, ``anonymous``, ``open``, or ``none`` for sessions stored before principals
  were recorded; then a ``total`` row. ``spent_far`` is the turns' cost, ``prepaid_far`` the
  part settled from the balance.

Each prints a table, or with ``--json`` one JSON object per row (amounts as exact decimal
strings). Refused requests raise :class:`~farmesh_ws.ledger.balances.BalanceRequestError`
(exit 2 in the CLI), an unreachable database
:class:`~farmesh_ws.ledger.store.LedgerUnavailable` (exit 1). See balances.py.
"""

import argparse
import json
from dataclasses import asdict
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TextIO

from farmesh_ws.core.money import far_text
from farmesh_ws.ledger.balances import (
    BalanceRequestError,
    PrincipalCharges,
    balances,
    charges,
    credit,
    wallet_key,
)
from farmesh_ws.ledger.report import plain_value, text_table
from farmesh_ws.ledger.store import Ledger, database_url


async def run_balances_command(
    configured_url: str, home: Path, args: argparse.Namespace, *, out: TextIO
) -> None:
    """Run ``args.report`` (credit, balances or charges) against the configured ledger."""
    amount = _amount(args.amount) if args.report == "credit" else None
    ledger = Ledger(database_url(configured_url, home))
    await ledger.connect()
    try:
        if amount is not None:
            balance = await credit(ledger, args.wallet, amount, args.note)
            out.write(f"{wallet_key(args.wallet)}: {far_text(balance)} $FAR\n")
            return
        if args.report == "balances":
            records = [_plain(asdict(info)) for info in await balances(ledger, args.wallet)]
            empty = "(no balances)\n"
        else:
            records = _charge_records(await charges(ledger, args.wallet))
            empty = "(no charges)\n"
    finally:
        await ledger.aclose()
    if args.json:
        out.writelines(json.dumps(record) + "\n" for record in records)
    else:
        out.write(text_table(records) if records else empty)


def _amount(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise BalanceRequestError("amount must be a decimal number of $FAR, e.g. 12.5") from None


def _charge_records(groups: list[PrincipalCharges]) -> list[dict[str, object]]:
    """One row per principal, then their ``total`` (no rows if the wallet was never charged)."""
    if not groups:
        return []
    total = PrincipalCharges(
        principal="total",
        sessions=sum(group.sessions for group in groups),
        turns=sum(group.turns for group in groups),
        prompt_tokens=sum(group.prompt_tokens for group in groups),
        completion_tokens=sum(group.completion_tokens for group in groups),
        spent_far=sum((group.spent_far for group in groups), Decimal(0)),
        prepaid_far=sum((group.prepaid_far for group in groups), Decimal(0)),
    )
    return [
        _plain({**asdict(group), "principal": group.principal or "none"})
        for group in [*groups, total]
    ]


def _plain(record: dict[str, object]) -> dict[str, object]:
    return {key: plain_value(key, value) for key, value in record.items()}
