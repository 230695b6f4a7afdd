"""Sign-in fixtures: a SiweAuth on the in-process store and on a real Redis, a movable clock,
and wallets made in the test (eth-account, real secp256k1 keys)."""

import uuid
from collections.abc import AsyncIterator

import pytest

from farmesh_ws.config import Settings
from farmesh_ws.state import MemoryStateStore, StateStore, open_state_store
from tests.auth.support import Clock, Gateway
from tests.state.support import REDIS_URL, delete_keys


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        memory = MemoryStateStore(clock=clock)  # the same clock: expiries need no sleeping
        yield memory
        await memory.aclose()
        return
    key_prefix = f"farmesh-test:{uuid.uuid4().hex}:"
    redis_store = await open_state_store(REDIS_URL, key_prefix=key_prefix)
    assert not redis_store.degraded, "tests need the Redis at 127.0.0.1:6379"
    yield redis_store
    await redis_store.aclose()
    await delete_keys(key_prefix)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings() -> Settings:
    return Settings(siwe_chain_id=1, siwe_nonce_ttl_s=300, siwe_session_ttl_s=3600)


@pytest.fixture
def gateway(store: StateStore, settings: Settings, clock: Clock) -> Gateway:
    return Gateway(store, settings, clock)
