"""Verified and withheld work (schema version 6) on SQLite and PostgreSQL: a node flagged for
tampering is owed nothing for turns ended after its last passed check, work before a passed
check is verified, plausibility flags withhold nothing, and every flag is listed."""

from dataclasses import replace
from decimal import Decimal

from farmesh_ws.ledger.integrity import node_flags, record_flag, record_pass
from farmesh_ws.ledger.payees import payee_earnings
from farmesh_ws.ledger.store import Ledger
from farmesh_ws.mesh.spot_check import NodeFlag
from tests.ledger.conftest import make_turn

T0 = 1_700_000_001.0  # make_turn's ended_at


def _flag(peer: str, kind: str, withheld_since: float) -> NodeFlag:
    return NodeFlag(
        peer_id=peer,
        kind=kind,  # type: ignore[arg-type]
        flagged_at=T0 + 100,
        step=7,
        evidence="relative difference 5.0e-02 > 1e-03",
        withheld_since=withheld_since,
        withheld_work=300,
    )


async def test_work_after_the_last_passed_check_of_a_caught_node_is_withheld(
    ledger: Ledger,
) -> None:
    await ledger.record_turn(make_turn("r1"))  # ends at T0
    await record_pass(ledger, "peer-b", T0 + 5)
    await record_pass(ledger, "peer-a", T0 + 5)
    await ledger.record_turn(replace(make_turn("r2"), ended_at=T0 + 10))
    await ledger.record_turn(replace(make_turn("r3"), ended_at=T0 + 20))
    await record_flag(ledger, _flag("peer-b", "tampered_output", T0 + 5))
    await record_flag(ledger, _flag("peer-a", "implausible_throughput", T0 + 100))

    payees = {payee.payee: payee for payee in await payee_earnings(ledger)}
    honest, liar = payees["peer-a"], payees["peer-b"]
    share, work = Decimal("0.00245"), 61 * 15
    assert liar.earned_far == share  # r1 only: it ended before the last passed check
    assert liar.withheld_far == 2 * share
    assert (liar.work, liar.verified_work, liar.withheld_work) == (3 * work, work, 2 * work)
    assert liar.flags == ("tampered_output",)
    assert honest.earned_far == 3 * share
    assert honest.withheld_far == 0
    assert (honest.verified_work, honest.withheld_work) == (work, 0)
    assert honest.flags == ("implausible_throughput",)
    assert isinstance(liar.withheld_far, Decimal)


async def test_a_node_caught_before_any_pass_is_owed_nothing_and_listed_without_rows(
    ledger: Ledger,
) -> None:
    await ledger.record_turn(make_turn("r1"))
    await record_flag(ledger, _flag("peer-b", "tampered_output", 0.0))
    await record_flag(ledger, _flag("peer-z", "tampered_output", 0.0))
    payees = {payee.payee: payee for payee in await payee_earnings(ledger)}
    assert payees["peer-b"].earned_far == 0
    assert payees["peer-b"].withheld_far == Decimal("0.00245")
    assert payees["peer-z"].flags == ("tampered_output",)  # caught before it earned anything
    assert payees["peer-z"].work == 0
    flags = await node_flags(ledger)
    assert [(f["peer_id"], f["withheld_since"], f["step"]) for f in flags] == [
        ("peer-b", 0.0, 7),
        ("peer-z", 0.0, 7),
    ]


async def test_passes_count_and_keep_the_latest_time(ledger: Ledger) -> None:
    await record_pass(ledger, "peer-a", T0 + 9)
    await record_pass(ledger, "peer-a", T0 + 3)
    row = await ledger.database.fetch_one("SELECT * FROM node_checks WHERE peer_id = 'peer-a'")
    assert row is not None
    assert (row._mapping["passed_checks"], row._mapping["last_passed_at"]) == (2, T0 + 9)
