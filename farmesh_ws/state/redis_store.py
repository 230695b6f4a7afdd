"""Gateway state in Redis, shared by every gateway process (ARCHITECTURE.md §3 "Scale-out").

Key layout (``P`` is the key prefix, default ``farmesh:``):

- ``P session:<id>``: hash ``process_id``, ``wallet`` ("" for none), ``model_id``. It expires at
  the session's deadline, so the sessions of a process that died vanish on their own.
- ``P sessions``: sorted set, session id scored by that deadline (ms on the Redis clock).
  Counting live sessions is one ZCOUNT, O(log n); each registration prunes expired members.
- ``P wallet:<wallet>``: hash ``tokens``, ``cost_far_e8`` (integers, both HINCRBY in one MULTI).
- ``P bucket:<name>``: hash ``tokens``, ``at_ms``. One Lua script refills and takes, so takes
  from every process are atomic; the key expires once the bucket would be full (absent = full).
- ``P value:<key>``: a string with its own expiry (SET PX); taken with GETDEL, so of concurrent
  takers in any process exactly one gets it; swapped (compare and set) by a Lua script.

The Lua scripts are in :mod:`.redis_scripts`.

Deadlines and refills read the Redis clock (TIME inside the scripts), so skewed hosts agree.

Degraded mode: Redis helps the gateway but must not stop a chat. Every call is bounded by
``timeout_s``. When one fails (unreachable, timeout, error reply) the store turns degraded:
``degraded`` is True, ``degraded_reason`` names the error class (never the URL, which may hold
a password), one warning is logged, and calls are answered by an in-process
:class:`MemoryStateStore` without waiting on Redis. A background task pings Redis every
``reconnect_interval_s`` (``ping`` and ``healthy`` probe too). Once it answers, the store
re-registers the sessions live in this process, deletes those unregistered meanwhile, adds the
wallet usage counted meanwhile, copies the values put meanwhile (one MULTI), and only then leaves
degraded mode; writes, and reads of values, that arrive during this resync wait for it, so none
is lost or reordered.

While degraded, ``active_sessions`` and ``session_location`` see only this process's sessions,
``wallet_usage`` only what this process counted since Redis failed, and rate limits hold per
process. Usage is counted at least once: an increment whose reply was lost may count twice.
A value is never in Redis and in this process at once, so it is taken once at most: one put
while degraded lives here until the resync moves it; a put whose Redis call fails is dropped
(Redis may or may not hold it), and a take whose reply was lost returns None.
Sessions registered here are always mirrored locally: a resync needs them, and a touch
re-creates a session missing from Redis (a restart that lost its data without a call failing).
"""

import asyncio
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from farmesh_ws.state.base import (
    RateDecision,
    SessionInfo,
    WalletUsage,
    check_bucket,
    check_ttl,
    check_usage,
)
from farmesh_ws.state.memory import MemoryStateStore
from farmesh_ws.state.redis_scripts import COUNT_SESSIONS, SWAP_VALUE, TAKE_TOKENS, UPSERT_SESSION

logger = logging.getLogger(__name__)

T = TypeVar("T")

# OSError covers refused connections and the TimeoutError of asyncio.timeout.
_FAILURES = (RedisError, OSError)


class _Unavailable(enum.Enum):
    """What a failed Redis call returns (a successful one may return None)."""

    REDIS = "redis"


class RedisStateStore:
    def __init__(
        self,
        client: Redis,
        *,
        key_prefix: str = "farmesh:",
        timeout_s: float = 1.0,
        reconnect_interval_s: float = 1.0,
    ) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._sessions_key = f"{key_prefix}sessions"
        self._timeout_s = timeout_s
        self._reconnect_interval_s = reconnect_interval_s
        self._upsert_session = client.register_script(UPSERT_SESSION)
        self._count_sessions = client.register_script(COUNT_SESSIONS)
        self._take_tokens = client.register_script(TAKE_TOKENS)
        self._swap = client.register_script(SWAP_VALUE)
        self._local = MemoryStateStore()
        self._unregistered: set[str] = set()  # while degraded; deleted from Redis on resync
        self._degraded_reason: str | None = None
        self._failures = 0
        self._resynced = asyncio.Event()
        self._resynced.set()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str = "farmesh:",
        timeout_s: float = 1.0,
        reconnect_interval_s: float = 1.0,
    ) -> "RedisStateStore":
        # No client-side retries: a retried HINCRBY could count twice, and the pool replaces
        # dead connections by itself. The timeout bounds connects and replies as well.
        client = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(
            client,
            key_prefix=key_prefix,
            timeout_s=timeout_s,
            reconnect_interval_s=reconnect_interval_s,
        )

    @property
    def degraded(self) -> bool:
        return self._degraded_reason is not None

    @property
    def degraded_reason(self) -> str | None:
        return self._degraded_reason

    async def register_session(
        self, session_id: str, *, process_id: str, wallet: str | None, model_id: str, ttl_s: float
    ) -> None:
        await self._local.register_session(
            session_id, process_id=process_id, wallet=wallet, model_id=model_id, ttl_s=ttl_s
        )
        self._unregistered.discard(session_id)
        await self._resynced.wait()
        if not self.degraded:
            info = SessionInfo(process_id=process_id, wallet=wallet, model_id=model_id)
            await self._try(self._upsert(self._redis, session_id, info, ttl_s))

    async def touch_session(self, session_id: str, ttl_s: float) -> bool:
        info = self._local.session_info(session_id)
        if info is None or not await self._local.touch_session(session_id, ttl_s):
            return False
        await self._resynced.wait()
        if not self.degraded:
            await self._try(self._upsert(self._redis, session_id, info, ttl_s))
        return True

    async def unregister_session(self, session_id: str) -> None:
        await self._local.unregister_session(session_id)
        await self._resynced.wait()
        if self.degraded or isinstance(
            await self._try(self._transaction(lambda pipe: self._queue_delete(pipe, session_id))),
            _Unavailable,
        ):
            self._unregistered.add(session_id)

    async def active_sessions(self) -> int:
        if not self.degraded:
            count = await self._try(self._count_sessions(keys=[self._sessions_key]))
            if not isinstance(count, _Unavailable):
                return int(count)
        return await self._local.active_sessions()

    async def session_location(self, session_id: str) -> str | None:
        if not self.degraded:
            raw = await self._try(self._redis.hget(self._session_key(session_id), "process_id"))
            if not isinstance(raw, _Unavailable):
                return None if raw is None else _text(raw)
        return await self._local.session_location(session_id)

    async def add_wallet_usage(self, wallet: str, *, tokens: int, cost_far_e8: int) -> None:
        check_usage(tokens, cost_far_e8)
        usage = WalletUsage(tokens=tokens, cost_far_e8=cost_far_e8)
        await self._resynced.wait()
        if self.degraded or isinstance(
            await self._try(self._transaction(lambda pipe: self._queue_usage(pipe, wallet, usage))),
            _Unavailable,
        ):
            await self._local.add_wallet_usage(wallet, tokens=tokens, cost_far_e8=cost_far_e8)

    async def wallet_usage(self, wallet: str) -> WalletUsage:
        if not self.degraded:
            raw = await self._try(
                self._redis.hmget(self._wallet_key(wallet), ["tokens", "cost_far_e8"])
            )
            if not isinstance(raw, _Unavailable):
                tokens, cost_far_e8 = raw
                return WalletUsage(tokens=int(tokens or 0), cost_far_e8=int(cost_far_e8 or 0))
        return await self._local.wallet_usage(wallet)

    async def take_tokens(
        self, bucket: str, *, rate_per_s: float, burst: int, cost: int = 1
    ) -> RateDecision:
        check_bucket(rate_per_s, burst, cost)
        if not self.degraded:
            raw = await self._try(
                self._take_tokens(
                    keys=[f"{self._prefix}bucket:{bucket}"], args=[rate_per_s, burst, cost]
                )
            )
            if not isinstance(raw, _Unavailable):
                allowed, wait_ms = raw
                return RateDecision(allowed=bool(allowed), retry_after_s=float(wait_ms) / 1000)
        return await self._local.take_tokens(bucket, rate_per_s=rate_per_s, burst=burst, cost=cost)

    async def put_value(self, key: str, value: str, ttl_s: float) -> None:
        check_ttl(ttl_s)
        await self._resynced.wait()
        if self.degraded:
            await self._local.put_value(key, value, ttl_s)
        else:
            px = max(1, math.ceil(ttl_s * 1000))
            await self._try(self._redis.set(self._value_key(key), value, px=px))

    async def get_value(self, key: str) -> str | None:
        await self._resynced.wait()
        if not self.degraded:
            raw = await self._try(self._redis.get(self._value_key(key)))
            if not isinstance(raw, _Unavailable):
                return None if raw is None else _text(raw)
        return await self._local.get_value(key)

    async def swap_value(
        self, key: str, expected: str | None, value: str | None, ttl_s: float
    ) -> bool:
        check_ttl(ttl_s)
        await self._resynced.wait()
        if not self.degraded:
            px = max(1, math.ceil(ttl_s * 1000))
            args: list[str | int] = [
                int(expected is None),
                expected or "",
                int(value is None),
                value or "",
                px,
            ]
            done = await self._try(self._swap(keys=[self._value_key(key)], args=args))
            if not isinstance(done, _Unavailable):
                return bool(done)
        return await self._local.swap_value(key, expected, value, ttl_s)

    async def take_value(self, key: str) -> str | None:
        await self._resynced.wait()
        if not self.degraded:
            raw = await self._try(self._redis.getdel(self._value_key(key)))
            if not isinstance(raw, _Unavailable):
                return None if raw is None else _text(raw)
        return await self._local.take_value(key)

    async def ping(self) -> float | None:
        started = time.monotonic()
        if isinstance(await self._try(self._redis.ping()), _Unavailable):
            return None
        round_trip_s = time.monotonic() - started
        if self.degraded:
            await self._resync()
        return round_trip_s

    async def healthy(self) -> bool:
        return await self.ping() is not None and not self.degraded

    async def aclose(self) -> None:
        self._closed = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            await asyncio.wait([self._reconnect_task])
        await self._redis.aclose()
        await self._local.aclose()

    async def _try(self, call: Awaitable[T]) -> T | _Unavailable:
        """Run one Redis call under the timeout; a failure turns the store degraded."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except _FAILURES as exc:
            self._degrade(exc)
            return _Unavailable.REDIS

    def _degrade(self, exc: BaseException) -> None:
        # The class name only: redis-py's messages carry the host and port.
        if isinstance(exc, TimeoutError | RedisTimeoutError):
            reason = f"redis: no answer within {self._timeout_s:g} s"
        else:
            reason = f"redis: {type(exc).__name__}"
        self._failures += 1
        if self._degraded_reason is None:
            logger.warning("Shared state degraded (%s): serving it from this process", reason)
        self._degraded_reason = reason
        if not self._closed and (self._reconnect_task is None or self._reconnect_task.done()):
            self._reconnect_task = asyncio.create_task(
                self._reconnect(), name="farmesh-state-reconnect"
            )

    async def _reconnect(self) -> None:
        while self.degraded:
            await asyncio.sleep(self._reconnect_interval_s)
            await self.ping()

    async def _resync(self) -> None:
        """Hand this process's state over to Redis, then leave degraded mode.

        A call that failed meanwhile (its data went to the local store) keeps the store
        degraded until the next attempt picks that data up.
        """
        if not self._resynced.is_set():
            await self._resynced.wait()
            return
        self._resynced.clear()
        try:
            failures = self._failures
            sessions = self._local.live_sessions()
            unregistered, self._unregistered = self._unregistered, set()
            usage = self._local.pop_wallet_usage()
            values = self._local.pop_values()
            pushed = await self._try(self._push(sessions, unregistered, usage, values))
            if isinstance(pushed, _Unavailable):
                self._unregistered |= unregistered
                for wallet, counted in usage.items():
                    await self._local.add_wallet_usage(
                        wallet, tokens=counted.tokens, cost_far_e8=counted.cost_far_e8
                    )
                for key, value, left_s in values:
                    await self._local.put_value(key, value, left_s)
            elif self._failures == failures:
                self._degraded_reason = None
                logger.info("Shared state back in Redis (%d sessions re-registered)", len(sessions))
        finally:
            self._resynced.set()

    async def _push(
        self,
        sessions: list[tuple[str, SessionInfo, float]],
        unregistered: set[str],
        usage: dict[str, WalletUsage],
        values: list[tuple[str, str, float]],
    ) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for session_id in unregistered:
                self._queue_delete(pipe, session_id)
            for session_id, info, left_s in sessions:
                await self._upsert(pipe, session_id, info, left_s)
            for wallet, counted in usage.items():
                self._queue_usage(pipe, wallet, counted)
            for key, value, left_s in values:
                pipe.set(self._value_key(key), value, px=max(1, math.ceil(left_s * 1000)))
            await pipe.execute()

    def _upsert(self, client: Redis, session_id: str, info: SessionInfo, ttl_s: float) -> Any:
        return self._upsert_session(
            keys=[self._session_key(session_id), self._sessions_key],
            args=[
                session_id,
                max(1, math.ceil(ttl_s * 1000)),
                info.process_id,
                info.wallet or "",
                info.model_id,
            ],
            client=client,
        )

    async def _transaction(self, queue: Callable[[Pipeline], None]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            queue(pipe)
            await pipe.execute()

    def _queue_delete(self, pipe: Pipeline, session_id: str) -> None:
        pipe.delete(self._session_key(session_id))
        pipe.zrem(self._sessions_key, session_id)

    def _queue_usage(self, pipe: Pipeline, wallet: str, usage: WalletUsage) -> None:
        pipe.hincrby(self._wallet_key(wallet), "tokens", usage.tokens)
        pipe.hincrby(self._wallet_key(wallet), "cost_far_e8", usage.cost_far_e8)

    def _session_key(self, session_id: str) -> str:
        return f"{self._prefix}session:{session_id}"

    def _wallet_key(self, wallet: str) -> str:
        return f"{self._prefix}wallet:{wallet}"

    def _value_key(self, key: str) -> str:
        return f"{self._prefix}value:{key}"


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
