"""The state gateway processes share: live sessions, wallet counters, rate-limit buckets,
and short-lived values (sign-in nonces, session tokens).

One interface, two stores: :mod:`.memory` keeps it in this process (one gateway), and
:mod:`.redis_store` in a Redis shared by every gateway process (ARCHITECTURE.md §3
"Scale-out"). Money is counted in integer 10⁻⁸ $FAR (``cost_far_e8``), never as a float.
"""

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class WalletUsage:
    tokens: int = 0
    cost_far_e8: int = 0


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    retry_after_s: float
    """0 when allowed; else how long until the bucket holds ``cost`` tokens again."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    process_id: str
    wallet: str | None
    model_id: str


class StateStore(Protocol):
    """Shared gateway state. Calls never raise because a shared backend is down (see
    ``degraded``); they do raise ``ValueError`` on arguments no store could honour."""

    @property
    def degraded(self) -> bool:
        """True while the shared backend is unreachable and this process's state stands in."""
        ...

    @property
    def degraded_reason(self) -> str | None:
        """Why ``degraded`` is set, for ``/health``; never contains a URL or password."""
        ...

    async def register_session(
        self, session_id: str, *, process_id: str, wallet: str | None, model_id: str, ttl_s: float
    ) -> None:
        """Record that ``process_id`` holds the session until ``ttl_s`` from now (or a touch)."""
        ...

    async def touch_session(self, session_id: str, ttl_s: float) -> bool:
        """Heartbeat: keep a session registered here live for ``ttl_s`` more.

        False if this store does not know it or it already expired: register it again.
        """
        ...

    async def unregister_session(self, session_id: str) -> None: ...

    async def active_sessions(self) -> int:
        """Live sessions of every process sharing this store."""
        ...

    async def session_location(self, session_id: str) -> str | None:
        """The process holding a live session, so a reconnect can be sent there."""
        ...

    async def add_wallet_usage(self, wallet: str, *, tokens: int, cost_far_e8: int) -> None: ...

    async def wallet_usage(self, wallet: str) -> WalletUsage: ...

    async def take_tokens(
        self, bucket: str, *, rate_per_s: float, burst: int, cost: int = 1
    ) -> RateDecision:
        """Token bucket: starts full with ``burst`` tokens, refills at ``rate_per_s``."""
        ...

    async def put_value(self, key: str, value: str, ttl_s: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl_s`` seconds, replacing what was there."""
        ...

    async def get_value(self, key: str) -> str | None:
        """The live value under ``key``, or None (never stored, expired or taken)."""
        ...

    async def swap_value(
        self, key: str, expected: str | None, value: str | None, ttl_s: float
    ) -> bool:
        """Compare and set, in one step across every process sharing the store: if ``key``
        holds ``expected`` (None: nothing), replace it with ``value`` kept ``ttl_s`` seconds
        (None: delete it) and return True; else change nothing and return False."""
        ...

    async def take_value(self, key: str) -> str | None:
        """Get and delete in one step: of any number of takers, in any process sharing the
        store, exactly one gets a stored value and the others None (single-use values)."""
        ...

    async def ping(self) -> float | None:
        """Round trip to the shared backend in seconds (0 for none), or None if unreachable.

        A successful ping also ends degraded mode.
        """
        ...

    async def healthy(self) -> bool:
        """Probe now: True when the shared backend answers and the store is not degraded."""
        ...

    async def aclose(self) -> None: ...


def check_ttl(ttl_s: float) -> None:
    if not ttl_s > 0:
        raise ValueError("ttl_s must be positive")


def check_usage(tokens: int, cost_far_e8: int) -> None:
    if tokens < 0 or cost_far_e8 < 0:
        raise ValueError("usage must not be negative")


def check_bucket(rate_per_s: float, burst: int, cost: int) -> None:
    """A cost above ``burst`` could never be granted, so it is a caller bug, not a refusal."""
    if not rate_per_s > 0:
        raise ValueError("rate_per_s must be positive")
    if not 1 <= cost <= burst:
        raise ValueError("cost must be between 1 and burst")
