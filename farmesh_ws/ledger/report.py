"""`farmesh-ws ledger nodes|wallets|sessions`: the payment views as tables or JSON lines.

``nodes`` shows earnings per payee (:mod:`farmesh_ws.ledger.payees`): a proven payout wallet
with every peer id it was proven for, or an unbound peer id."""

import json
from dataclasses import asdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from farmesh_ws.core.money import far_text
from farmesh_ws.ledger.payees import payee_earnings
from farmesh_ws.ledger.store import Ledger, database_url


async def print_report(
    configured_url: str, home: Path, report: str, *, as_json: bool, limit: int, out: TextIO
) -> None:
    ledger = Ledger(database_url(configured_url, home))
    await ledger.connect()
    try:
        if report == "nodes":
            rows: list[Any] = await payee_earnings(ledger)
        elif report == "wallets":
            rows = await ledger.wallet_spend()
        else:
            rows = await ledger.recent_sessions(limit)
    finally:
        await ledger.aclose()
    records = [{key: plain_value(key, value) for key, value in asdict(row).items()} for row in rows]
    if as_json:
        for record in records:
            out.write(json.dumps(record) + "\n")
    else:
        cells = [{key: table_cell(value) for key, value in record.items()} for record in records]
        out.write(text_table(cells) if cells else "(no records)\n")


def plain_value(key: str, value: object) -> object:
    """Money as its exact decimal string, times as ISO 8601 UTC, the rest as it is."""
    if isinstance(value, Decimal):
        return far_text(value)
    if key.endswith("_at") and isinstance(value, float):
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")
    return value


def table_cell(value: object) -> object:
    """A list (peer ids, names) as one comma-separated cell; anything else as it is."""
    if isinstance(value, tuple | list):
        return ",".join(str(item) for item in value)
    return value


def text_table(records: list[dict[str, object]]) -> str:
    headers = list(records[0])
    cells = [[("" if r[h] is None else str(r[h])) for h in headers] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines) + "\n"
