"""State-store fixtures: the shared suite runs on the in-process store and on a real Redis.

The Redis stores use the local server (127.0.0.1:6379) under a key prefix of their own that is
deleted afterwards. The memory store runs on a clock the test moves.
"""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from farmesh_ws.state import MemoryStateStore, StateStore, open_state_store
from tests.state.support import REDIS_URL, FakeClock, Harness, delete_keys


@pytest.fixture
def key_prefix() -> str:
    return f"farmesh-test:{uuid.uuid4().hex}:"


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()
        memory = MemoryStateStore(clock=clock)
        yield Harness(memory, clock.advance)
        await memory.aclose()
        return
    store = await open_state_store(REDIS_URL, key_prefix=key_prefix)
    assert not store.degraded, "tests need the Redis at 127.0.0.1:6379"
    yield Harness(store, lambda _seconds: None)
    await store.aclose()
    await delete_keys(key_prefix)


@pytest.fixture
async def open_redis_store(key_prefix: str) -> AsyncIterator[Callable[..., Awaitable[StateStore]]]:
    """Opens stores on the local Redis, all under this test's prefix (one per "process")."""
    opened: list[StateStore] = []

    async def open_store(**options: Any) -> StateStore:
        store = await open_state_store(REDIS_URL, key_prefix=key_prefix, **options)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.aclose()
    await delete_keys(key_prefix)
