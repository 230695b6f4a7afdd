"""`farmesh-ws keys create|list|revoke` end to end, as a user runs it, on SQLite and PostgreSQL."""

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from farmesh_ws.core.principal import Limits
from farmesh_ws.ledger.keys import KeyPrincipal, authenticate
from farmesh_ws.ledger.store import Ledger
from tests.cli_home import CliHome, cli_homes

WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"
KEY = re.compile(r"fmk_(fk_[0-9a-f]{16})_[A-Za-z0-9_-]{43}")


async def _authenticate(home: CliHome, key: str) -> KeyPrincipal | None:
    ledger = Ledger(home.url)
    await ledger.connect()
    try:
        return await authenticate(ledger, key)
    finally:
        await ledger.aclose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def home(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CliHome]:
    async for found in cli_homes(request.param, tmp_path, "keys"):
        yield found


async def test_create_list_revoke_as_a_user_runs_them(home: CliHome) -> None:
    created = home.run("create", "--wallet", WALLET, "--name", "laptop")
    assert created.returncode == 0, created.stderr
    (key,) = created.stdout.splitlines()  # the key alone on stdout, scriptable
    match = KEY.fullmatch(key)
    assert match is not None
    key_id = match.group(1)
    (warning,) = created.stderr.splitlines()
    assert key_id in warning
    assert "cannot be shown again" in warning
    assert key not in warning
    assert await _authenticate(home, key) == KeyPrincipal(key_id, WALLET, "laptop")
    if "POSTGRES_URL" not in home.env:
        assert (home.path / "ledger.sqlite3").exists()

    assert home.run("create", "--wallet", "wallet-b").returncode == 0
    table = home.run("list")
    assert table.returncode == 0, table.stderr
    header, _, *rows = table.stdout.splitlines()
    assert header.split() == [
        "key_id",
        "wallet",
        "name",
        "status",
        "created_at",
        "revoked_at",
        "caps",
    ]
    assert len(rows) == 2
    assert rows[0].split()[:4] == [key_id, WALLET, "laptop", "active"]
    lines = home.run("list", "--wallet", WALLET, "--json").stdout.splitlines()
    assert [json.loads(line) for line in lines] == [
        {
            "key_id": key_id,
            "wallet": WALLET,
            "name": "laptop",
            "status": "active",
            "created_at": json.loads(lines[0])["created_at"],
            "revoked_at": None,
            "caps": {},
        }
    ]
    secret = key.removeprefix(f"fmk_{key_id}_")
    assert secret not in table.stdout + "".join(lines)

    revoked = home.run("revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.startswith(f"revoked {key_id} (wallet {WALLET}) at ")
    assert await _authenticate(home, key) is None
    (listed,) = home.run("list", "--wallet", WALLET, "--json").stdout.splitlines()
    assert json.loads(listed)["status"] == "revoked"
    assert json.loads(listed)["revoked_at"] is not None
    again = home.run("revoke", key_id)  # idempotent: the first time stays, and it says so
    assert (again.returncode, again.stdout) == (0, f"already {revoked.stdout}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("revoke", "fk_" + "0" * 16), "farmesh-ws: unknown key id fk_0000000000000000"),
        (("revoke", "nope"), "farmesh-ws: not a key id (expected fk_ and 16 hex digits)"),
        (
            ("create", "--wallet", "not a wallet"),
            "farmesh-ws: wallet must be 1-128 characters of A-Z a-z 0-9 _ . : - "
            "(e.g. a 0x address)",
        ),
        (
            ("list", "--wallet", "w\n"),
            "farmesh-ws: wallet must be 1-128 characters of A-Z a-z 0-9 _ . : - "
            "(e.g. a 0x address)",
        ),
    ],
)
async def test_refusals_are_one_line_and_exit_code_2(
    home: CliHome, args: tuple[str, ...], message: str
) -> None:
    result = home.run(*args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [message]


async def test_a_whole_key_given_as_key_id_is_not_echoed(home: CliHome) -> None:
    key = home.run("create", "--wallet", WALLET).stdout.strip()
    assert KEY.fullmatch(key) is not None
    result = home.run("revoke", key)
    assert result.returncode == 2
    assert result.stderr == "farmesh-ws: not a key id (expected fk_ and 16 hex digits)\n"
    assert await _authenticate(home, key) is not None


async def test_a_key_gets_its_own_caps(home: CliHome) -> None:
    created = home.run(
        "create", "--wallet", WALLET, "--max-sessions", "2", "--requests-per-minute", "6.5"
    )
    assert created.returncode == 0, created.stderr
    principal = await _authenticate(home, created.stdout.strip())
    assert principal is not None
    assert principal.limits == Limits(max_sessions=2, requests_per_minute=6.5)
    (line,) = home.run("list", "--json").stdout.splitlines()
    assert json.loads(line)["caps"] == {"max_sessions": 2, "requests_per_minute": 6.5}
    assert "max_sessions=2,requests_per_minute=6.5" in home.run("list").stdout
    refused = home.run("create", "--wallet", WALLET, "--max-sessions", "0")
    assert (refused.returncode, refused.stderr.strip()) == (
        2,
        "farmesh-ws: max_sessions must be positive",
    )
