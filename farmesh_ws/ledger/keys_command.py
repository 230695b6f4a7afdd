"""`farmesh-ws keys create|list|revoke`: API keys from the command line (see keys.py).

``create`` writes the key alone on stdout (so ``KEY=$(farmesh-ws keys create ...)`` captures
just the key) and a one-line warning on stderr. ``list`` prints a table or JSON lines, never a
secret. Refused requests raise :class:`~farmesh_ws.ledger.keys.KeyRequestError` (exit 2 in the
CLI), an unreachable database :class:`~farmesh_ws.ledger.store.LedgerUnavailable` (exit 1).
"""

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from farmesh_ws.core.principal import Limits
from farmesh_ws.ledger.keys import KeyInfo, create_key, list_keys, revoke_key
from farmesh_ws.ledger.report import plain_value, text_table
from farmesh_ws.ledger.store import Ledger, database_url


async def run_keys_command(
    configured_url: str, home: Path, args: argparse.Namespace, *, out: TextIO, err: TextIO
) -> None:
    """Run ``args.action`` (create, list or revoke) against the configured ledger database."""
    ledger = Ledger(database_url(configured_url, home))
    await ledger.connect()
    try:
        if args.action == "create":
            limits = Limits(
                max_connections=args.max_connections,
                max_requests=args.max_requests,
                max_sessions=args.max_sessions,
                max_reserved_tokens=args.max_reserved_tokens,
                requests_per_minute=args.requests_per_minute,
            )
            key_id, key = await create_key(ledger, args.wallet, args.name, limits=limits)
            out.write(f"{key}\n")
            err.write(
                f"farmesh-ws: key {key_id} for wallet {args.wallet} created; it is shown once"
                " and cannot be shown again, store it now\n"
            )
        elif args.action == "list":
            records = [_record(info) for info in await list_keys(ledger, args.wallet)]
            if args.json:
                out.writelines(json.dumps(record) + "\n" for record in records)
            elif records:
                out.write(text_table([{**r, "caps": _caps_text(r["caps"])} for r in records]))
            else:
                out.write("(no keys)\n")
        else:
            now = time.time()
            info = await revoke_key(ledger, args.key_id, now=now)
            already = "already " if info.revoked_at != now else ""
            revoked_at = plain_value("revoked_at", info.revoked_at)
            out.write(f"{already}revoked {info.key_id} (wallet {info.wallet}) at {revoked_at}\n")
    finally:
        await ledger.aclose()


def _record(info: KeyInfo) -> dict[str, Any]:
    """One listed key: ids, status, ISO 8601 UTC times (``revoked_at`` None while active) and
    ``caps``, the key's own limits that are set (``{}``: the gateway's)."""
    return {
        "key_id": info.key_id,
        "wallet": info.wallet,
        "name": info.name,
        "status": "active" if info.revoked_at is None else "revoked",
        "created_at": plain_value("created_at", info.created_at),
        "revoked_at": plain_value("revoked_at", info.revoked_at),
        "caps": {name: value for name, value in asdict(info.limits).items() if value is not None},
    }


def _caps_text(caps: dict[str, Any]) -> str:
    return ",".join(f"{name}={value:g}" for name, value in caps.items()) or "-"
