"""The session registry, on both stores."""

import pytest

from tests.state.support import Harness, eventually


async def register(harness: Harness, session_id: str, *, ttl_s: float = 60.0) -> None:
    await harness.store.register_session(
        session_id, process_id="proc-a", wallet="0xabc", model_id="smollm2", ttl_s=ttl_s
    )


async def test_register_locate_unregister(harness: Harness) -> None:
    store = harness.store
    assert await store.active_sessions() == 0
    await register(harness, "s1")
    await store.register_session(
        "s2", process_id="proc-b", wallet=None, model_id="smollm2", ttl_s=60
    )
    assert await store.active_sessions() == 2
    assert await store.session_location("s1") == "proc-a"
    assert await store.session_location("s2") == "proc-b"
    await store.unregister_session("s1")
    assert await store.active_sessions() == 1
    assert await store.session_location("s1") is None


async def test_unregister_unknown_session_is_a_no_op(harness: Harness) -> None:
    await harness.store.unregister_session("nobody")
    assert await harness.store.active_sessions() == 0


async def test_register_again_moves_the_session(harness: Harness) -> None:
    store = harness.store
    await register(harness, "s1")
    await store.register_session("s1", process_id="proc-b", wallet=None, model_id="m", ttl_s=60)
    assert await store.active_sessions() == 1
    assert await store.session_location("s1") == "proc-b"


async def test_sessions_without_heartbeat_expire(harness: Harness) -> None:
    store = harness.store
    await register(harness, "s1", ttl_s=0.2)
    assert await store.session_location("s1") == "proc-a"
    harness.pass_time(0.3)

    async def expired() -> bool:
        return await store.active_sessions() == 0

    await eventually(expired)
    assert await store.session_location("s1") is None
    assert not await store.touch_session("s1", 60)


async def test_touch_keeps_a_session_alive(harness: Harness) -> None:
    store = harness.store
    await register(harness, "idle", ttl_s=0.3)
    await register(harness, "busy", ttl_s=0.3)
    assert await store.touch_session("busy", 60)
    harness.pass_time(0.4)

    async def idle_expired() -> bool:
        return await store.session_location("idle") is None

    await eventually(idle_expired)
    assert await store.session_location("busy") == "proc-a"
    assert await store.active_sessions() == 1


async def test_touch_unknown_session_says_so(harness: Harness) -> None:
    assert not await harness.store.touch_session("nobody", 60)
    assert await harness.store.active_sessions() == 0


@pytest.mark.parametrize("ttl_s", [0.0, -1.0, float("nan")])
async def test_ttl_must_be_positive(harness: Harness, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        await register(harness, "s1", ttl_s=ttl_s)
    await register(harness, "s1")
    with pytest.raises(ValueError, match="ttl_s"):
        await harness.store.touch_session("s1", ttl_s)


async def test_health_of_a_working_store(harness: Harness) -> None:
    store = harness.store
    assert not store.degraded
    assert store.degraded_reason is None
    assert await store.ping() is not None
    assert await store.healthy()
