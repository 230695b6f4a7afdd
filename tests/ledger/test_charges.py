"""Schema v3 on a version 2 database, and a wallet's charges by the principal that made them."""

from dataclasses import replace
from decimal import Decimal

import pytest

from farmesh_ws.core.principal import Limits
from farmesh_ws.ledger import schema
from farmesh_ws.ledger.balances import (
    BalanceInfo,
    BalanceRequestError,
    PrincipalCharges,
    balances,
    charges,
    credit,
)
from farmesh_ws.ledger.hold_batch import take_hold
from farmesh_ws.ledger.keys import list_keys
from farmesh_ws.ledger.store import Ledger
from tests.ledger.conftest import make_turn, old_ledger

D = Decimal
WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"


async def test_a_version_2_database_upgrades_in_place_to_balances(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await old_ledger(ledger_url, 2, monkeypatch)
    old = Ledger(ledger_url)
    with monkeypatch.context() as patch:
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
        await old.connect()
    key_id = "fk_0123456789abcdef"
    await old.database.execute(  # as a version 2 release wrote it
        """INSERT INTO api_keys (key_id, secret_sha256, wallet, name, created_at)
           VALUES (:key_id, :digest, 'wallet-a', NULL, 1.0)""",
        {"key_id": key_id, "digest": "0" * 64},
    )
    await old.aclose()

    upgraded = Ledger(ledger_url)
    await upgraded.connect()
    try:
        versions = await upgraded.database.fetch_all(
            "SELECT version FROM schema_migrations ORDER BY version"
        )
        assert [row["version"] for row in versions] == [1, 2, 3, 4, 5, 6]
        (info,) = await list_keys(upgraded)
        assert (info.key_id, info.limits) == (key_id, Limits())  # no caps of its own
        (session,) = await upgraded.recent_sessions()
        assert (session.session_id, session.principal, session.client_address_hash) == (
            "s1",
            None,
            None,
        )
        assert await credit(upgraded, "wallet-a", D(1)) == D(1)
        await take_hold(
            upgraded, wallet="wallet-a", hold_id="s2:r1", minimum=D(1), maximum=D(1), expires_at=2e9
        )
        turn = replace(make_turn("r1", session_id="s2"), principal="open", hold_id="s2:r1")
        assert await upgraded.record_turn(turn)
        assert await balances(upgraded) == [BalanceInfo("wallet-a", D("0.9951"), D(0), D("0.9951"))]
        assert await upgraded.turn_count() == 2
    finally:
        await upgraded.aclose()


async def test_a_wallets_charges_are_grouped_by_principal(ledger: Ledger) -> None:
    key = "key:fk_0123456789abcdef"
    signed = f"wallet:{WALLET}"
    await ledger.record_turn(make_turn("r1", session_id="old", wallet=WALLET))  # no principal
    for session, principal, cost in [
        ("k1", key, "0.001"),
        ("k1", key, "0.002"),
        ("k2", key, "0.004"),
        ("w1", signed, "0.0005"),
    ]:
        turn = make_turn(f"r-{cost}", session_id=session, wallet=WALLET, cost=cost, shares=())
        await ledger.record_turn(replace(turn, principal=principal))
    other = make_turn("r9", session_id="x", wallet="wallet-b", cost="5", shares=())
    await ledger.record_turn(replace(other, principal=key))

    await credit(ledger, WALLET, D(1))
    await take_hold(
        ledger, wallet=WALLET, hold_id="k3:r1", minimum=D("0.01"), maximum=D("0.01"), expires_at=2e9
    )
    prepaid = make_turn("r1", session_id="k3", wallet=WALLET, cost="0.003", shares=())
    await ledger.record_turn(replace(prepaid, principal=key, hold_id="k3:r1"))

    expected = [
        PrincipalCharges(key, 3, 4, 48, 196, D("0.010"), D("0.003")),
        PrincipalCharges(None, 1, 1, 12, 49, D("0.0049"), D(0)),
        PrincipalCharges(signed, 1, 1, 12, 49, D("0.0005"), D(0)),
    ]
    assert await charges(ledger, WALLET) == expected
    assert await charges(ledger, WALLET.lower()) == expected  # hex addresses in any case
    assert await charges(ledger, "nobody") == []
    with pytest.raises(BalanceRequestError):
        await charges(ledger, "not a wallet")
