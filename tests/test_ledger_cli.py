"""`farmesh-ws ledger ...` as a user runs it: reports, prepaid balances (credit, balances,
charges) on SQLite and PostgreSQL, and one line when a request is refused or the database is
down."""

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from farmesh_ws.ledger.hold_batch import take_hold
from farmesh_ws.ledger.store import Ledger
from tests.cli_home import CliHome, cli_homes
from tests.ledger.conftest import make_turn


def _ledger(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "farmesh_ws", "ledger", *args],
        env={**os.environ, "FARMESH_HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_report_on_a_fresh_ledger_prints_and_exits_0(tmp_path: Path) -> None:
    result = _ledger(tmp_path, "wallets", "--json")
    assert (result.returncode, result.stdout) == (0, "")
    assert (tmp_path / "ledger.sqlite3").exists()


def test_an_unreachable_database_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = _ledger(tmp_path, "nodes", POSTGRES_URL="postgresql://nobody@127.0.0.1:1/none")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("farmesh-ws: ")


WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"


@pytest.fixture(params=["sqlite", "postgresql"])
async def home(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CliHome]:
    async for found in cli_homes(request.param, tmp_path, "ledger"):
        yield found


async def _charge(home: CliHome) -> None:
    """Two turns billed to WALLET: one by an API key from its prepaid balance, one signed."""
    ledger = Ledger(home.url)
    await ledger.connect()
    try:
        await take_hold(
            ledger,
            wallet=WALLET,
            hold_id="s1:r1",
            minimum=Decimal("0.01"),
            maximum=Decimal("0.01"),
            expires_at=2e9,
        )
        keyed = make_turn("r1", session_id="s1", wallet=WALLET, cost="0.004", shares=())
        await ledger.record_turn(
            replace(keyed, principal="key:fk_0123456789abcdef", hold_id="s1:r1")
        )
        signed = make_turn("r1", session_id="s2", wallet=WALLET, cost="0.0005", shares=())
        await ledger.record_turn(replace(signed, principal=f"wallet:{WALLET}"))
    finally:
        await ledger.aclose()


async def test_credit_balances_and_charges_as_a_user_runs_them(home: CliHome) -> None:
    credited = home.run("credit", WALLET, "12.5", "--note", "invoice 7")
    assert (credited.returncode, credited.stdout) == (0, f"{WALLET.lower()}: 12.5 $FAR\n")
    assert home.run("credit", WALLET.lower(), "0.00000001").stdout == (
        f"{WALLET.lower()}: 12.50000001 $FAR\n"
    )
    assert home.run("credit", "wallet-b", "3").returncode == 0

    table = home.run("balances")
    assert table.returncode == 0, table.stderr
    header, _, *rows = table.stdout.splitlines()
    assert header.split() == ["wallet", "balance", "held", "available"]
    assert [row.split() for row in rows] == [
        [WALLET.lower(), "12.50000001", "0", "12.50000001"],
        ["wallet-b", "3", "0", "3"],
    ]
    assert home.run("balances", "--wallet", "nobody", "--json").stdout == (
        '{"wallet": "nobody", "balance": "0", "held": "0", "available": "0"}\n'
    )
    assert home.run("charges", "--wallet", WALLET).stdout == "(no charges)\n"

    await _charge(home)
    (line,) = home.run("balances", "--wallet", WALLET, "--json").stdout.splitlines()
    assert json.loads(line) == {
        "wallet": WALLET.lower(),
        "balance": "12.49600001",
        "held": "0",
        "available": "12.49600001",
    }
    charges = home.run("charges", "--wallet", WALLET, "--json")
    assert charges.returncode == 0, charges.stderr
    assert [json.loads(line) for line in charges.stdout.splitlines()] == [
        {
            "principal": "key:fk_0123456789abcdef",
            "sessions": 1,
            "turns": 1,
            "prompt_tokens": 12,
            "completion_tokens": 49,
            "spent_far": "0.004",
            "prepaid_far": "0.004",
        },
        {
            "principal": f"wallet:{WALLET}",
            "sessions": 1,
            "turns": 1,
            "prompt_tokens": 12,
            "completion_tokens": 49,
            "spent_far": "0.0005",
            "prepaid_far": "0",
        },
        {
            "principal": "total",
            "sessions": 2,
            "turns": 2,
            "prompt_tokens": 24,
            "completion_tokens": 98,
            "spent_far": "0.0045",
            "prepaid_far": "0.004",
        },
    ]
    header, _, *rows = home.run("charges", "--wallet", WALLET.lower()).stdout.splitlines()
    assert header.split()[0] == "principal"
    assert [row.split()[0] for row in rows] == [
        "key:fk_0123456789abcdef",
        f"wallet:{WALLET}",
        "total",
    ]


BAD_WALLET = (
    "farmesh-ws: wallet must be 1-128 characters of A-Z a-z 0-9 _ . : - (e.g. a 0x address)"
)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("credit", "w", "abc"), "farmesh-ws: amount must be a decimal number of $FAR, e.g. 12.5"),
        (
            ("credit", "w", "1.000000001"),
            "farmesh-ws: amount must be more than 0 and at most 10000000000 $FAR,"
            " with at most 8 decimals",
        ),
        (
            ("credit", "w", "-1"),
            "farmesh-ws: amount must be more than 0 and at most 10000000000 $FAR,"
            " with at most 8 decimals",
        ),
        (("credit", "a b", "1"), BAD_WALLET),
        (
            ("credit", "w", "1", "--note", "two\nlines"),
            "farmesh-ws: note must be 1-256 printable characters",
        ),
        (("balances", "--wallet", "a b"), BAD_WALLET),
        (("charges", "--wallet", "a b"), BAD_WALLET),
    ],
)
def test_balance_refusals_are_one_line_and_exit_code_2(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = _ledger(tmp_path, *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [message]
    assert _ledger(tmp_path, "balances").stdout == "(no balances)\n"


def test_a_credit_with_the_database_down_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = _ledger(
        tmp_path, "credit", "w", "1", POSTGRES_URL="postgresql://nobody@127.0.0.1:1/none"
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("farmesh-ws: ")


async def test_nodes_shows_earnings_per_payout_wallet_or_unbound_peer(home: CliHome) -> None:
    turn = make_turn("r1")
    bound = replace(turn.contributions[0], payout_wallet=WALLET, payout_bound=True)
    ledger = Ledger(home.url)
    await ledger.connect()
    try:
        await ledger.record_turn(replace(turn, contributions=(bound, turn.contributions[1])))
    finally:
        await ledger.aclose()
    result = home.run("nodes", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["payee"], r["payout_bound"], r["peer_ids"]) for r in rows] == [
        (WALLET, True, ["peer-a"]),
        ("peer-b", False, ["peer-b"]),
    ]
    assert [r["earned_far"] for r in rows] == ["0.00245", "0.00245"]
    assert [(r["withheld_far"], r["withheld_work"], r["flags"]) for r in rows] == [("0", 0, [])] * 2
    table = home.run("nodes").stdout.splitlines()
    assert table[0].split() == [
        "payee",
        "payout_bound",
        "peer_ids",
        "public_names",
        "spans",
        "tokens",
        "replayed_tokens",
        "work",
        "verified_work",
        "withheld_work",
        "earned_far",
        "withheld_far",
        "flags",
    ]
