"""Degraded mode: Redis down, partitioned or absent; calls keep working, then it resyncs.

Each test runs a redis-server of its own (see ThrowawayRedis) so it can kill or pause it.
"""

import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from farmesh_ws.state import StateStore, WalletUsage, open_state_store
from tests.state.support import ThrowawayRedis, eventually, free_port


async def open_fast(url: str) -> StateStore:
    """Short timeout and reconnect interval, so outages show and heal quickly."""
    return await open_state_store(url, timeout_s=0.3, reconnect_interval_s=0.05)


async def register(store: StateStore, session_id: str) -> None:
    await store.register_session(
        session_id, process_id="proc-a", wallet=None, model_id="m", ttl_s=60
    )


async def recovered(store: StateStore) -> None:
    async def not_degraded() -> bool:
        return not store.degraded

    await eventually(not_degraded)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ThrowawayRedis]:
    redis_server = ThrowawayRedis(tmp_path, password=f"pw-{uuid.uuid4().hex}")
    await redis_server.start()
    yield redis_server
    await redis_server.kill()


async def test_redis_down_then_back(
    server: ThrowawayRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="farmesh_ws.state")
    store = await open_fast(server.url)
    try:
        await register(store, "s1")
        await store.add_wallet_usage("0xw", tokens=5, cost_far_e8=50)
        assert not store.degraded
        await server.kill()

        await register(store, "s2")
        assert store.degraded
        reason = store.degraded_reason
        assert reason is not None
        assert "redis" in reason
        assert server.password not in reason
        assert "127.0.0.1" not in reason
        assert await store.active_sessions() == 2  # this process's sessions only
        assert await store.session_location("s1") == "proc-a"
        assert await store.touch_session("s1", 60)
        assert (await store.take_tokens("ip", rate_per_s=1, burst=1)).allowed
        assert not (await store.take_tokens("ip", rate_per_s=1, burst=1)).allowed
        await store.add_wallet_usage("0xw", tokens=3, cost_far_e8=30)
        assert await store.wallet_usage("0xw") == WalletUsage(tokens=3, cost_far_e8=30)
        assert not await store.healthy()

        await server.start()  # same port, empty: nothing is persisted
        await recovered(store)
        assert store.degraded_reason is None
        assert await store.healthy()
        peer = await open_fast(server.url)
        try:
            assert await peer.active_sessions() == 2
            assert await peer.session_location("s2") == "proc-a"
            # The 5 died with the server; the 3 counted while it was down were handed over.
            assert await peer.wallet_usage("0xw") == WalletUsage(tokens=3, cost_far_e8=30)
        finally:
            await peer.aclose()
    finally:
        await store.aclose()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert server.password not in caplog.text
    assert str(server.port) not in caplog.text


async def test_partition_then_resync(server: ThrowawayRedis) -> None:
    """Redis keeps its data through a stall: the resync must delete and add what changed."""
    store = await open_fast(server.url)
    peer = await open_fast(server.url)
    admin = server.client()
    try:
        await register(store, "gone")
        await register(store, "kept")
        await store.add_wallet_usage("0xw", tokens=5, cost_far_e8=50)
        await admin.client_pause(1500)  # every client stalls (ALL), no one is disconnected

        await store.unregister_session("gone")  # times out: recorded locally
        assert store.degraded
        assert store.degraded_reason == "redis: no answer within 0.3 s"
        await register(store, "new")
        await store.add_wallet_usage("0xw", tokens=2, cost_far_e8=20)

        await recovered(store)
        assert await peer.active_sessions() == 2
        assert await peer.session_location("gone") is None
        assert await peer.session_location("new") == "proc-a"
        assert await peer.wallet_usage("0xw") == WalletUsage(tokens=7, cost_far_e8=70)
    finally:
        await admin.aclose()
        await peer.aclose()
        await store.aclose()


async def test_starts_degraded_without_redis() -> None:
    store = await open_fast(f"redis://:secret@127.0.0.1:{free_port()}/0")
    try:
        assert store.degraded
        await register(store, "s1")
        assert await store.active_sessions() == 1
        assert (await store.take_tokens("ip", rate_per_s=1, burst=1)).allowed
        assert not await store.healthy()
    finally:
        await store.aclose()


async def test_values_while_down_are_handed_over(server: ThrowawayRedis) -> None:
    store = await open_fast(server.url)
    try:
        await store.put_value("before", "lost with the server", 60)
        await server.kill()

        await store.put_value("failing", "dropped", 60)  # this call finds Redis down
        assert store.degraded
        assert await store.get_value("failing") is None
        await store.put_value("taken", "t", 60)
        await store.put_value("kept", "k", 60)
        assert await store.take_value("taken") == "t"
        assert await store.take_value("taken") is None
        assert await store.get_value("kept") == "k"

        await server.start()  # empty
        await recovered(store)
        peer = await open_fast(server.url)
        try:
            assert await peer.get_value("before") is None
            assert await peer.get_value("taken") is None
            assert await peer.take_value("kept") == "k"
            assert await store.take_value("kept") is None  # moved, not copied
        finally:
            await peer.aclose()
    finally:
        await store.aclose()


async def test_a_value_taken_during_a_stall_is_not_taken_again(server: ThrowawayRedis) -> None:
    """A take whose reply is lost may have deleted the value: it answers None, never twice."""
    store = await open_fast(server.url)
    peer = await open_fast(server.url)
    admin = server.client()
    try:
        await store.put_value("nonce", "issued", 60)
        await admin.client_pause(1000, all=False)  # writes stall; GETDEL is a write
        assert await store.take_value("nonce") is None
        assert store.degraded
        await recovered(store)
        taken = [await peer.take_value("nonce"), await store.take_value("nonce")]
        assert taken.count("issued") <= 1
    finally:
        await admin.aclose()
        await peer.aclose()
        await store.aclose()
