"""Gateway state in this process: the store without ``REDIS_URL``, and Redis's stand-in.

Every call runs without awaiting, so each is atomic between asyncio tasks. Time comes from a
monotonic clock (injectable for tests). Sessions expire through a heap of deadlines that may
hold stale entries (from touches and unregisters); it is rebuilt once they outnumber the live
sessions, so each operation is O(log n) amortised. A full bucket is the same as no bucket, so
full ones are swept once the table has doubled since the last sweep; expired values likewise.
"""

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

from farmesh_ws.state.base import (
    RateDecision,
    SessionInfo,
    WalletUsage,
    check_bucket,
    check_ttl,
    check_usage,
)

_MIN_SWEEP = 1024


@dataclass(slots=True)
class _Session:
    info: SessionInfo
    deadline: float


@dataclass(frozen=True, slots=True)
class _Value:
    value: str
    deadline: float


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    full_at: float


class MemoryStateStore:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._wallets: dict[str, WalletUsage] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._sweep_buckets_at = _MIN_SWEEP
        self._values: dict[str, _Value] = {}
        self._sweep_values_at = _MIN_SWEEP

    @property
    def degraded(self) -> bool:
        return False

    @property
    def degraded_reason(self) -> str | None:
        return None

    async def register_session(
        self, session_id: str, *, process_id: str, wallet: str | None, model_id: str, ttl_s: float
    ) -> None:
        check_ttl(ttl_s)
        now = self._expire()
        info = SessionInfo(process_id=process_id, wallet=wallet, model_id=model_id)
        self._sessions[session_id] = _Session(info, now + ttl_s)
        self._push_deadline(session_id, now + ttl_s)

    async def touch_session(self, session_id: str, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        now = self._expire()
        session = self._sessions.get(session_id)
        if session is None:
            return False
        session.deadline = now + ttl_s
        self._push_deadline(session_id, session.deadline)
        return True

    async def unregister_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    async def active_sessions(self) -> int:
        self._expire()
        return len(self._sessions)

    async def session_location(self, session_id: str) -> str | None:
        info = self.session_info(session_id)
        return None if info is None else info.process_id

    def session_info(self, session_id: str) -> SessionInfo | None:
        self._expire()
        session = self._sessions.get(session_id)
        return None if session is None else session.info

    def live_sessions(self) -> list[tuple[str, SessionInfo, float]]:
        """(id, info, seconds left) of every live session: what a resync must re-register."""
        now = self._expire()
        return [(sid, s.info, s.deadline - now) for sid, s in self._sessions.items()]

    async def add_wallet_usage(self, wallet: str, *, tokens: int, cost_far_e8: int) -> None:
        check_usage(tokens, cost_far_e8)
        usage = self._wallets.get(wallet, WalletUsage())
        self._wallets[wallet] = WalletUsage(
            tokens=usage.tokens + tokens, cost_far_e8=usage.cost_far_e8 + cost_far_e8
        )

    async def wallet_usage(self, wallet: str) -> WalletUsage:
        return self._wallets.get(wallet, WalletUsage())

    def pop_wallet_usage(self) -> dict[str, WalletUsage]:
        """Take every counter and start again from zero (to hand them over to Redis)."""
        wallets, self._wallets = self._wallets, {}
        return wallets

    async def take_tokens(
        self, bucket: str, *, rate_per_s: float, burst: int, cost: int = 1
    ) -> RateDecision:
        check_bucket(rate_per_s, burst, cost)
        now = self._clock()
        state = self._buckets.get(bucket)
        tokens = (
            float(burst)
            if state is None
            else min(float(burst), state.tokens + (now - state.at) * rate_per_s)
        )
        if tokens >= cost:
            tokens -= cost
            decision = RateDecision(allowed=True, retry_after_s=0.0)
        else:
            decision = RateDecision(allowed=False, retry_after_s=(cost - tokens) / rate_per_s)
        self._buckets[bucket] = _Bucket(tokens, now, now + (burst - tokens) / rate_per_s)
        if len(self._buckets) >= self._sweep_buckets_at:
            self._buckets = {k: b for k, b in self._buckets.items() if b.full_at > now}
            self._sweep_buckets_at = max(_MIN_SWEEP, 2 * len(self._buckets))
        return decision

    async def put_value(self, key: str, value: str, ttl_s: float) -> None:
        check_ttl(ttl_s)
        now = self._clock()
        self._values[key] = _Value(value, now + ttl_s)
        if len(self._values) >= self._sweep_values_at:
            self._values = {k: v for k, v in self._values.items() if v.deadline > now}
            self._sweep_values_at = max(_MIN_SWEEP, 2 * len(self._values))

    async def get_value(self, key: str) -> str | None:
        stored = self._values.get(key)
        if stored is None or stored.deadline <= self._clock():
            return None
        return stored.value

    async def swap_value(
        self, key: str, expected: str | None, value: str | None, ttl_s: float
    ) -> bool:
        check_ttl(ttl_s)
        if await self.get_value(key) != expected:
            return False
        if value is None:
            self._values.pop(key, None)
        else:
            await self.put_value(key, value, ttl_s)
        return True

    async def take_value(self, key: str) -> str | None:
        stored = self._values.pop(key, None)
        if stored is None or stored.deadline <= self._clock():
            return None
        return stored.value

    def pop_values(self) -> list[tuple[str, str, float]]:
        """Take every live value as (key, value, seconds left), to hand them over to Redis."""
        now = self._clock()
        values, self._values = self._values, {}
        return [(k, v.value, v.deadline - now) for k, v in values.items() if v.deadline > now]

    async def ping(self) -> float | None:
        return 0.0

    async def healthy(self) -> bool:
        return True

    async def aclose(self) -> None:
        """Nothing to release; here so both stores close the same way."""

    def _expire(self) -> float:
        now = self._clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, session_id = heapq.heappop(self._deadlines)
            session = self._sessions.get(session_id)
            if session is not None and session.deadline <= now:
                del self._sessions[session_id]
        return now

    def _push_deadline(self, session_id: str, deadline: float) -> None:
        heapq.heappush(self._deadlines, (deadline, session_id))
        if len(self._deadlines) > 2 * len(self._sessions) + 64:
            self._deadlines = [(s.deadline, sid) for sid, s in self._sessions.items()]
            heapq.heapify(self._deadlines)
