"""Prepaid holds for the engine (:class:`~farmesh_ws.engine.allowances.BalanceHolds`) on the
ledger's balances (:mod:`farmesh_ws.ledger.balances`), taken in batches
(:mod:`farmesh_ws.ledger.hold_batch`).

A hold whose request went away while it was being taken (the client left during admission) is
given back as soon as its batch commits. Errors: ``insufficient_balance`` as the ledger says,
``auth_unavailable`` (retryable) when the ledger cannot answer, ``duplicate_request_id`` for a
request id that already holds part of the balance.
"""

import asyncio
import logging
import time
from decimal import Decimal

from farmesh_ws.errors import AuthUnavailable, DuplicateRequestId
from farmesh_ws.ledger import balances
from farmesh_ws.ledger.hold_batch import HoldBatcher, hold_request
from farmesh_ws.ledger.store import Ledger, LedgerUnavailable

logger = logging.getLogger(__name__)


class LedgerHolds:
    """Prepaid holds on the ledger's balances (:class:`~farmesh_ws.engine.allowances.BalanceHolds`),
    taken in batches; a hold left unsettled by a dead process is released after
    ``ttl_s``."""

    def __init__(self, ledger: Ledger, ttl_s: float) -> None:
        self._ledger = ledger
        self._ttl_s = ttl_s
        self._batcher = HoldBatcher(ledger)
        self._orphans: set[asyncio.Task[None]] = set()

    async def take(
        self, *, wallet: str, hold_id: str, minimum: Decimal, maximum: Decimal
    ) -> Decimal:
        request = hold_request(
            wallet=wallet,
            hold_id=hold_id,
            minimum=minimum,
            maximum=maximum,
            expires_at=time.time() + self._ttl_s,
        )
        taking = asyncio.ensure_future(self._batcher.take(request))
        try:
            return await asyncio.shield(taking)
        except asyncio.CancelledError:  # the request is gone: give back what it takes
            taking.add_done_callback(lambda _: self._release_orphan(taking, hold_id))
            raise
        except LedgerUnavailable:
            raise AuthUnavailable("balances cannot be checked right now; retry") from None
        except balances.DuplicateHold:
            raise DuplicateRequestId(
                f"request {hold_id} already holds part of the balance"
            ) from None

    async def release(self, hold_id: str) -> None:
        try:
            await balances.release_hold(self._ledger, hold_id)
        except LedgerUnavailable:
            logger.warning("could not release hold %s; it expires by itself", hold_id)

    async def aclose(self) -> None:
        """Wait for the holds queued and those being given back."""
        await self._batcher.aclose()
        if self._orphans:
            await asyncio.gather(*self._orphans, return_exceptions=True)

    def _release_orphan(self, taking: "asyncio.Future[Decimal]", hold_id: str) -> None:
        if taking.cancelled() or taking.exception() is not None:
            return
        task = asyncio.ensure_future(self.release(hold_id))
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)
