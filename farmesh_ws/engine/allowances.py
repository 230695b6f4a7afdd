"""What a principal may still spend: a wallet's prepaid balance, or the anonymous free tokens.

Prepaid (``balances = prepaid``, protocol.md §7): before a request of a wallet starts, a hold
is taken on the wallet's balance in the ledger for at most what the request can cost (prompt
plus ``max_new_tokens``), and at least what its prompt plus one token costs, else
:class:`~farmesh_ws.errors.InsufficientBalance`. The amount held is the request's budget; the
ledger settles the hold for the real cost when it records the request, exactly once.

Anonymous (``auth = optional``): each client address has ``anonymous_tokens_per_day`` free
tokens (prompt + completion) per UTC day, counted in the shared state store. A request needs
room for its prompt plus one token, else :class:`~farmesh_ws.errors.QuotaExceeded`; its
``max_new_tokens`` is cut to what is left.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Protocol

from farmesh_ws.core.principal import Principal
from farmesh_ws.errors import QuotaExceeded
from farmesh_ws.state import StateStore

logger = logging.getLogger(__name__)

_DAY_S = 86400


class BalanceHolds(Protocol):
    """Holds on prepaid balances (the ledger's; see :mod:`farmesh_ws.ledger.balances`)."""

    async def take(
        self, *, wallet: str, hold_id: str, minimum: Decimal, maximum: Decimal
    ) -> Decimal:
        """Hold between ``minimum`` and ``maximum`` $FAR; raises InsufficientBalance, or
        AuthUnavailable when the ledger cannot answer."""
        ...

    async def release(self, hold_id: str) -> None:
        """Give a hold back unspent (a request refused after its hold was taken)."""
        ...


class FreeTokens:
    """The anonymous free quota per client address and UTC day, in the state store."""

    def __init__(
        self, store: StateStore, tokens_per_day: int, *, now: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._per_day = tokens_per_day
        self._now = now
        self._pending: set[asyncio.Task[None]] = set()

    def applies(self, principal: Principal) -> bool:
        return principal.kind.value == "anonymous"

    async def allowance(self, principal: Principal, prompt_tokens: int) -> int:
        """How many new tokens a request with ``prompt_tokens`` may generate; raises
        QuotaExceeded when not even one fits."""
        used = (await self._store.wallet_usage(self._bucket(principal))).tokens
        left = self._per_day - used - prompt_tokens
        if left < 1:
            day_left_s = _DAY_S - self._now() % _DAY_S
            raise QuotaExceeded(
                f"the free quota of {self._per_day} tokens a day for anonymous use is spent "
                f"({used} used; this prompt has {prompt_tokens}); use an API key",
                retry_after_s=round(day_left_s, 1),
            )
        return left

    def spent(self, principal: Principal, tokens: int) -> None:
        """Count ``tokens`` against today's quota (in the background: called as a request ends)."""
        if tokens <= 0:
            return
        task = asyncio.create_task(
            self._store.add_wallet_usage(self._bucket(principal), tokens=tokens, cost_far_e8=0)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def aclose(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _bucket(self, principal: Principal) -> str:
        day = int(self._now() // _DAY_S)
        return f"free-tokens:{principal.quota_key}:{day}"
