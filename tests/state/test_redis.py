"""What only the Redis store does: sharing between processes, key layout, self-healing."""

import asyncio
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from farmesh_ws.state import MemoryStateStore, StateStore, open_state_store
from tests.state.support import REDIS_URL, eventually

OpenStore = Callable[..., Awaitable[StateStore]]


async def test_two_processes_share_the_registry(open_redis_store: OpenStore) -> None:
    process_a, process_b = await open_redis_store(), await open_redis_store()
    await process_a.register_session("s1", process_id="a", wallet=None, model_id="m", ttl_s=60)
    await process_b.register_session("s2", process_id="b", wallet=None, model_id="m", ttl_s=60)
    assert await process_a.active_sessions() == await process_b.active_sessions() == 2
    assert await process_a.session_location("s2") == "b"
    assert await process_b.session_location("s1") == "a"
    await process_b.unregister_session("s2")
    assert await process_a.active_sessions() == 1


async def test_a_dead_process_sessions_expire(open_redis_store: OpenStore) -> None:
    survivor, doomed = await open_redis_store(), await open_redis_store()
    await survivor.register_session("s1", process_id="a", wallet=None, model_id="m", ttl_s=60)
    await doomed.register_session("s2", process_id="b", wallet=None, model_id="m", ttl_s=0.3)
    await doomed.aclose()  # dies without unregistering or heartbeats

    async def only_survivor_left() -> bool:
        return await survivor.active_sessions() == 1

    await eventually(only_survivor_left)
    assert await survivor.session_location("s2") is None


async def test_key_layout(open_redis_store: OpenStore, key_prefix: str) -> None:
    store = await open_redis_store()
    await store.register_session("s1", process_id="a", wallet="0xw", model_id="m", ttl_s=60)
    await store.add_wallet_usage("0xw", tokens=2, cost_far_e8=5)
    await store.take_tokens("ip:1", rate_per_s=1, burst=5)
    await store.put_value("siwe-nonce:n1", "issued", 30)
    admin = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        assert sorted(await admin.keys(f"{key_prefix}*")) == [
            f"{key_prefix}bucket:ip:1",
            f"{key_prefix}session:s1",
            f"{key_prefix}sessions",
            f"{key_prefix}value:siwe-nonce:n1",
            f"{key_prefix}wallet:0xw",
        ]
        assert await admin.get(f"{key_prefix}value:siwe-nonce:n1") == "issued"
        assert 29_000 < await admin.pttl(f"{key_prefix}value:siwe-nonce:n1") <= 30_000
        assert await admin.hgetall(f"{key_prefix}session:s1") == {
            "process_id": "a",
            "wallet": "0xw",
            "model_id": "m",
        }
        assert 0 < await admin.pttl(f"{key_prefix}session:s1") <= 60_000
        assert 0 < await admin.pttl(f"{key_prefix}bucket:ip:1") <= 1_001
        assert await admin.hgetall(f"{key_prefix}wallet:0xw") == {
            "tokens": "2",
            "cost_far_e8": "5",
        }
    finally:
        await admin.aclose()


async def test_heartbeat_restores_a_session_redis_lost(
    open_redis_store: OpenStore, key_prefix: str
) -> None:
    store = await open_redis_store()
    await store.register_session("s1", process_id="a", wallet=None, model_id="m", ttl_s=60)
    admin = Redis.from_url(REDIS_URL)
    try:
        await admin.delete(f"{key_prefix}session:s1", f"{key_prefix}sessions")  # a restart
    finally:
        await admin.aclose()
    assert await store.active_sessions() == 0
    assert await store.touch_session("s1", 60)
    assert await store.active_sessions() == 1
    assert await store.session_location("s1") == "a"


async def test_a_value_is_taken_once_across_processes(open_redis_store: OpenStore) -> None:
    stores = [await open_redis_store() for _ in range(4)]
    await stores[0].put_value("nonce", "issued", 60)
    assert await stores[1].get_value("nonce") == "issued"
    taken = await asyncio.gather(*(store.take_value("nonce") for store in stores * 3))
    assert [value for value in taken if value is not None] == ["issued"]


async def test_no_url_means_the_in_process_store() -> None:
    for url in (None, ""):
        store = await open_state_store(url)
        assert isinstance(store, MemoryStateStore)
        await store.aclose()
