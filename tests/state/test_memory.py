"""What only the in-process store's fake clock can show quickly."""

from farmesh_ws.state import MemoryStateStore
from tests.state.support import FakeClock


async def test_refill_stops_at_burst() -> None:
    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    assert (await store.take_tokens("b", rate_per_s=1, burst=2)).allowed
    clock.advance(3600)
    decisions = [await store.take_tokens("b", rate_per_s=1, burst=2) for _ in range(3)]
    assert [decision.allowed for decision in decisions] == [True, True, False]


async def test_many_heartbeats_then_expiry() -> None:
    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    await store.register_session("s", process_id="p", wallet=None, model_id="m", ttl_s=10)
    for _ in range(1000):
        clock.advance(1)
        assert await store.touch_session("s", 10)
    clock.advance(9.9)
    assert await store.session_location("s") == "p"
    clock.advance(0.1)
    assert await store.active_sessions() == 0


async def test_expired_values_do_not_pile_up() -> None:
    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    for n in range(10_000):
        await store.put_value(f"nonce-{n}", "issued", 1)
        clock.advance(0.01)  # so at most ~100 are live at any time
    # Nothing public shows the dead entries: the table itself must have been swept.
    assert len(store._values) <= 2 * 1024
    assert len(store.pop_values()) <= 101
    assert store.pop_values() == []


async def test_a_value_expires_at_its_deadline() -> None:
    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    await store.put_value("k", "v", 10)
    clock.advance(9.9)
    assert await store.get_value("k") == "v"
    clock.advance(0.1)
    assert await store.get_value("k") is None
    assert await store.take_value("k") is None
