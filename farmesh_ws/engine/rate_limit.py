"""The request rate limit: a token bucket per principal, in the shared state store, so every
gateway process sharing it counts together (protocol.md §9)."""

import math

from farmesh_ws.config import Settings
from farmesh_ws.core.principal import Principal, PrincipalKind
from farmesh_ws.errors import RateLimited
from farmesh_ws.state import StateStore


async def take_rate_token(store: StateStore, settings: Settings, principal: Principal) -> None:
    """Take one request from the principal's bucket (anonymous: per client address):
    ``requests_per_minute`` (``anonymous_requests_per_minute``, or the key's own rate, with a
    burst of at most that many) refilled continuously, ``requests_burst`` deep. Raises
    :class:`RateLimited` with ``retry_after_s`` when it is empty."""
    per_minute = principal.limits.requests_per_minute or (
        settings.anonymous_requests_per_minute
        if principal.kind is PrincipalKind.ANONYMOUS
        else settings.requests_per_minute
    )
    burst = settings.requests_burst
    if principal.limits.requests_per_minute is not None:  # a key's own rate: its own burst
        burst = min(burst, max(1, math.ceil(principal.limits.requests_per_minute)))
    decision = await store.take_tokens(
        f"requests:{principal.quota_key}", rate_per_s=per_minute / 60, burst=burst
    )
    if not decision.allowed:
        wait = round(decision.retry_after_s, 1)
        raise RateLimited(f"too many requests; retry in {wait:.1f} s", retry_after_s=wait)
