"""API keys on SQLite and PostgreSQL: authentication, revocation, hashing, migration to v2."""

import hashlib
import re
from pathlib import Path

import pytest

from farmesh_ws.ledger import schema
from farmesh_ws.ledger.keys import (
    KeyInfo,
    KeyPrincipal,
    KeyRequestError,
    UnknownKey,
    authenticate,
    create_key,
    list_keys,
    revoke_key,
)
from farmesh_ws.ledger.store import Ledger
from tests.ledger.conftest import make_turn, old_ledger

WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"
KEY = re.compile(r"fmk_(fk_[0-9a-f]{16})_([A-Za-z0-9_-]{43})")


async def test_a_created_key_authenticates_as_its_wallet(ledger: Ledger) -> None:
    key_id, key = await create_key(ledger, WALLET, "laptop")
    match = KEY.fullmatch(key)
    assert match is not None
    assert match.group(1) == key_id
    assert await authenticate(ledger, key) == KeyPrincipal(key_id, WALLET, "laptop")
    other_id, other = await create_key(ledger, "wallet-b")
    assert await authenticate(ledger, other) == KeyPrincipal(other_id, "wallet-b", None)


async def test_wrong_malformed_unknown_and_revoked_keys_do_not_authenticate(
    ledger: Ledger,
) -> None:
    key_id, key = await create_key(ledger, WALLET)
    secret = key.removeprefix(f"fmk_{key_id}_")
    other_secret = ("A" if secret[0] != "A" else "B") + secret[1:]
    refused = [
        f"fmk_{key_id}_{other_secret}",  # wrong secret
        f"fmk_fk_{'0' * 16}_{secret}",  # unknown key id
        "",
        key[:-1],
        key + "A",
        key + "\n",
        f"Bearer {key}",
        key.upper(),
        f"fmk_{key_id}_{secret[:-1]}=",
        secret,
    ]
    for presented in refused:
        assert await authenticate(ledger, presented) is None, presented
    assert await authenticate(ledger, key) is not None

    revoked = await revoke_key(ledger, key_id, now=1_800_000_000.0)
    assert revoked.revoked_at == 1_800_000_000.0
    assert await authenticate(ledger, key) is None


async def test_revoking_is_idempotent_and_refuses_unknown_or_malformed_ids(
    ledger: Ledger,
) -> None:
    key_id, key = await create_key(ledger, WALLET, now=1_700_000_000.0)
    first = await revoke_key(ledger, key_id, now=1_800_000_000.0)
    again = await revoke_key(ledger, key_id, now=1_900_000_000.0)
    assert first == again == KeyInfo(key_id, WALLET, None, 1_700_000_000.0, 1_800_000_000.0)
    with pytest.raises(UnknownKey, match=r"^unknown key id fk_0{16}$"):
        await revoke_key(ledger, "fk_" + "0" * 16)
    with pytest.raises(KeyRequestError) as refused:
        await revoke_key(ledger, key)  # a whole key is not a key id, and is not echoed
    assert key_id not in str(refused.value)


async def test_the_listing_has_no_secrets_and_filters_by_wallet(ledger: Ledger) -> None:
    first_id, first = await create_key(ledger, WALLET, "laptop", now=1_700_000_000.0)
    second_id, _ = await create_key(ledger, "wallet-b", now=1_700_000_001.0)
    third_id, _ = await create_key(ledger, WALLET, "ci", now=1_700_000_002.0)
    await revoke_key(ledger, third_id, now=1_700_000_003.0)

    listed = await list_keys(ledger)
    assert listed == [
        KeyInfo(first_id, WALLET, "laptop", 1_700_000_000.0, None),
        KeyInfo(second_id, "wallet-b", None, 1_700_000_001.0, None),
        KeyInfo(third_id, WALLET, "ci", 1_700_000_002.0, 1_700_000_003.0),
    ]
    assert [info.key_id for info in await list_keys(ledger, WALLET)] == [first_id, third_id]
    assert await list_keys(ledger, "nobody") == []
    secret = first.removeprefix(f"fmk_{first_id}_")
    assert secret not in repr(listed)


async def test_the_database_holds_the_secret_hash_and_never_the_key(
    ledger: Ledger, ledger_url: str
) -> None:
    key_id, key = await create_key(ledger, WALLET, "laptop")
    secret = key.removeprefix(f"fmk_{key_id}_")
    rows = await ledger.database.fetch_all("SELECT * FROM api_keys")
    stored = " ".join(str(value) for row in rows for value in row._mapping.values())
    assert key_id in stored
    assert hashlib.sha256(secret.encode()).hexdigest() in stored
    assert secret not in stored
    assert secret[:16] not in stored
    if ledger_url.startswith("sqlite"):  # every byte on disk, the write-ahead log included
        path = Path(ledger_url.removeprefix("sqlite+aiosqlite:///"))
        files = [path, path.with_name(path.name + "-wal")]
        on_disk = b"".join(file.read_bytes() for file in files if file.exists())
        assert key_id.encode() in on_disk
        assert secret.encode() not in on_disk


@pytest.mark.parametrize(
    "wallet",
    ["", "a b", "w\n", "x" * 129, "0x12/34", "wallet;DROP TABLE api_keys"],
)
async def test_bad_wallets_are_refused_as_protocol_v1_does(ledger: Ledger, wallet: str) -> None:
    with pytest.raises(KeyRequestError, match=r"^wallet must be"):
        await create_key(ledger, wallet)
    with pytest.raises(KeyRequestError, match=r"^wallet must be"):
        await list_keys(ledger, wallet)
    assert await list_keys(ledger) == []


@pytest.mark.parametrize("name", ["", "x" * 129, "two\nlines", "tab\there"])
async def test_bad_names_are_refused(ledger: Ledger, name: str) -> None:
    with pytest.raises(KeyRequestError, match=r"^name must be"):
        await create_key(ledger, WALLET, name)


async def test_wallets_of_protocol_v1_and_0x_addresses_are_accepted(ledger: Ledger) -> None:
    for wallet in ["wallet-a", "0x" + "ab" * 20, "eip155:1:0xAB.x_y-z", "x" * 128]:
        _, key = await create_key(ledger, wallet, "é ✓")
        principal = await authenticate(ledger, key)
        assert principal is not None
        assert (principal.wallet, principal.name) == (wallet, "é ✓")


async def test_a_version_1_database_upgrades_in_place_and_keeps_its_data(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await old_ledger(ledger_url, 1, monkeypatch)

    upgraded = Ledger(ledger_url)
    await upgraded.connect()
    try:
        versions = await upgraded.database.fetch_all(
            "SELECT version FROM schema_migrations ORDER BY version"
        )
        assert [row["version"] for row in versions] == [v for v, _ in schema.MIGRATIONS]
        assert await upgraded.turn_count() == 1
        (spend,) = await upgraded.wallet_spend()
        assert (spend.wallet, spend.turns) == ("wallet-a", 1)
        assert len(await upgraded.node_earnings()) == 2
        key_id, key = await create_key(upgraded, "wallet-a")
        assert await authenticate(upgraded, key) == KeyPrincipal(key_id, "wallet-a", None)
        assert await upgraded.record_turn(make_turn("r2"))
    finally:
        await upgraded.aclose()
