"""The ledger on SQLite and PostgreSQL: exact sums, idempotency, migrations, the views."""

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from farmesh_ws.core.money import FAR_QUANTUM, split_by_work
from farmesh_ws.ledger.schema import MIGRATIONS
from farmesh_ws.ledger.store import Ledger, database_url, redacted
from tests.ledger.conftest import make_turn


async def test_a_turn_is_stored_with_its_contributions_and_session_totals(ledger: Ledger) -> None:
    assert await ledger.record_turn(make_turn("r1"))
    assert await ledger.record_turn(
        make_turn("r2", cost="0.0001", shares=(("peer-a", 0, 30, "0.0001"),))
    )

    earnings = {node.peer_id: node for node in await ledger.node_earnings()}
    assert earnings["peer-a"].earned_far == Decimal("0.00255")
    assert earnings["peer-b"].earned_far == Decimal("0.00245")
    assert earnings["peer-a"].work == 61 * 15 + 61 * 30

    (spend,) = await ledger.wallet_spend()
    assert (spend.wallet, spend.turns, spend.sessions) == ("wallet-a", 2, 1)
    assert spend.spent_far == Decimal("0.0050")
    assert spend.completion_tokens == 98

    (session,) = await ledger.recent_sessions()
    assert session.turns == 2
    assert session.cost_far == Decimal("0.0050")
    assert session.cached_tokens == 80


async def test_the_same_request_id_never_bills_twice(ledger: Ledger) -> None:
    assert await ledger.record_turn(make_turn("r1"))
    assert not await ledger.record_turn(make_turn("r1"))
    assert not await ledger.record_turn(make_turn("r1", cost="9"))
    assert await ledger.turn_count() == 1
    (spend,) = await ledger.wallet_spend()
    assert spend.spent_far == Decimal("0.0049")
    assert sum(node.earned_far for node in await ledger.node_earnings()) == Decimal("0.0049")


async def test_the_same_request_id_in_another_session_is_another_turn(ledger: Ledger) -> None:
    assert await ledger.record_turn(make_turn("r1", session_id="s1"))
    assert await ledger.record_turn(make_turn("r1", session_id="s2"))
    assert await ledger.turn_count() == 2


async def test_many_small_amounts_sum_exactly(ledger: Ledger) -> None:
    for index in range(200):
        await ledger.record_turn(
            make_turn(f"r{index}", cost="0.1", shares=(("peer-a", 0, 30, "0.1"),))
        )
    (spend,) = await ledger.wallet_spend()
    assert spend.spent_far == Decimal("20")  # 0.1 summed 200 times in binary floats is not 20
    (node,) = await ledger.node_earnings()
    assert node.earned_far == Decimal("20")


async def test_migrations_apply_once(ledger_url: str) -> None:
    first, second = Ledger(ledger_url), Ledger(ledger_url)
    await first.connect()
    await second.connect()
    try:
        versions = await first._database.fetch_all("SELECT version FROM schema_migrations")
        assert [row["version"] for row in versions] == [version for version, _ in MIGRATIONS]
    finally:
        await first.aclose()
        await second.aclose()


def test_database_url_and_redaction(tmp_path: object) -> None:
    from pathlib import Path

    home = Path(str(tmp_path))
    assert database_url("", home) == f"sqlite+aiosqlite:///{home / 'ledger.sqlite3'}"
    assert database_url("postgres://u:pw@db/x", home) == "postgresql+asyncpg://u:pw@db/x"
    assert redacted("postgresql+asyncpg://u:pw@db:5432/x") == "postgresql+asyncpg://u:***@db:5432/x"
    assert "pw" not in redacted("postgresql://u:pw@db/x")


@given(
    total_e8=st.integers(min_value=0, max_value=10**15),
    works=st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=12),
)
def test_shares_always_sum_exactly_and_are_never_negative(total_e8: int, works: list[int]) -> None:
    total = Decimal(total_e8) * FAR_QUANTUM
    shares = split_by_work(total, works)
    assert sum(shares) == total
    assert all(share >= 0 for share in shares)
    assert all(share == share.quantize(FAR_QUANTUM) for share in shares)
    if sum(works):
        for share, work in zip(shares, works, strict=True):
            assert abs(share - total * work / sum(works)) <= FAR_QUANTUM
