"""Earnings per payee (schema version 5) on SQLite and PostgreSQL: a proven wallet rolls up
its peer ids and restarts, unbound work stays with its peer id, old rows are unbound."""

from dataclasses import replace
from decimal import Decimal

import pytest

from farmesh_ws.ledger.payees import payee_earnings
from farmesh_ws.ledger.records import TurnRecord
from farmesh_ws.ledger.store import Ledger
from tests.ledger.conftest import make_turn, old_ledger

WALLET = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"


def _paid(turn: TurnRecord, payouts: dict[str, str]) -> TurnRecord:
    """``turn`` with the peers in ``payouts`` bound to their wallet."""
    return replace(
        turn,
        contributions=tuple(
            replace(c, payout_wallet=payouts[c.peer_id], payout_bound=True)
            if c.peer_id in payouts
            else c
            for c in turn.contributions
        ),
    )


async def test_a_wallet_rolls_up_its_peer_ids_and_unbound_peers_stay_apart(
    ledger: Ledger,
) -> None:
    await ledger.record_turn(_paid(make_turn("r1"), {"peer-a": WALLET}))
    restarted = make_turn("r2", shares=(("peer-c", 0, 15, "0.003"), ("peer-b", 15, 30, "0.0019")))
    await ledger.record_turn(_paid(restarted, {"peer-c": WALLET}))
    await ledger.record_turn(make_turn("r3", shares=(("peer-a", 0, 30, "0.0049"),)))

    wallet, unbound_a, unbound_b = await payee_earnings(ledger)
    assert (wallet.payee, wallet.payout_bound) == (WALLET, True)
    assert wallet.peer_ids == ("peer-a", "peer-c")
    assert wallet.earned_far == Decimal("0.00245") + Decimal("0.003")
    assert (wallet.spans, wallet.tokens, wallet.work) == (2, 122, 61 * 15 * 2)
    assert (unbound_a.payee, unbound_a.payout_bound) == ("peer-a", False)
    assert unbound_a.earned_far == Decimal("0.0049")  # before it proved a wallet
    assert (unbound_b.payee, unbound_b.peer_ids) == ("peer-b", ("peer-b",))
    assert unbound_b.earned_far == Decimal("0.00245") + Decimal("0.0019")
    assert isinstance(unbound_b.earned_far, Decimal)


async def test_rows_stored_before_version_5_are_unbound(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await old_ledger(ledger_url, 4, monkeypatch)
    ledger = Ledger(ledger_url)
    await ledger.connect()
    try:
        await ledger.record_turn(_paid(make_turn("r2"), {"peer-a": WALLET}))
        payees = {payee.payee: payee for payee in await payee_earnings(ledger)}
    finally:
        await ledger.aclose()
    assert set(payees) == {WALLET, "peer-a", "peer-b"}
    assert not payees["peer-a"].payout_bound
    assert payees["peer-a"].earned_far == payees[WALLET].earned_far == Decimal("0.00245")
