"""Gateway state shared between processes: sessions, wallet counters, rate limits, and
short-lived values (sign-in nonces, session tokens).

:func:`open_state_store` picks the store: Redis when ``REDIS_URL`` is set (several gateway
processes share it), otherwise this process's memory.
"""

from farmesh_ws.state.base import RateDecision, StateStore, WalletUsage
from farmesh_ws.state.memory import MemoryStateStore
from farmesh_ws.state.redis_store import RedisStateStore

__all__ = [
    "MemoryStateStore",
    "RateDecision",
    "RedisStateStore",
    "StateStore",
    "WalletUsage",
    "open_state_store",
]


async def open_state_store(
    redis_url: str | None,
    *,
    key_prefix: str = "farmesh:",
    timeout_s: float = 1.0,
    reconnect_interval_s: float = 1.0,
) -> StateStore:
    """The Redis store for a URL, else the in-process one.

    Never fails because Redis is down: the store then starts degraded (see
    :mod:`farmesh_ws.state.redis_store`). A malformed URL raises ``ValueError``.
    """
    if not redis_url:
        return MemoryStateStore()
    store = RedisStateStore.from_url(
        redis_url,
        key_prefix=key_prefix,
        timeout_s=timeout_s,
        reconnect_interval_s=reconnect_interval_s,
    )
    await store.ping()
    return store
