"""Group commit: write steps that arrive together share one transaction (one durable commit).

A thousand chat turns that start within a few milliseconds each need a prepaid hold before
their first token. One transaction per hold makes them wait on each other's commits (SQLite
lets one writer in at a time; PostgreSQL locks the wallet's row, and each commit waits for its
log flush): measured with scripts/bench_ws.py, the last of 1,000 turns got its first token
3.2 s after asking. :class:`GroupCommit` runs every step queued while a transaction is
committing in the next transaction, one after the other, and commits once for all of them, as
databases do with their own log writes ("group commit").

A step's refusal (a :class:`ValueError` or :class:`~farmesh_ws.errors.FarmeshError` it raises,
such as an insufficient balance) is its own result and does not affect the others. Any other
error rolls back the whole group: every step of it raises
:class:`~farmesh_ws.ledger.store.LedgerUnavailable`, and none has taken effect. A step's result
is delivered only after its transaction committed.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from databases import Database

from farmesh_ws.errors import FarmeshError
from farmesh_ws.ledger.store import Ledger, LedgerUnavailable, guarded

logger = logging.getLogger(__name__)

T = TypeVar("T")
Step = Callable[[Database], Awaitable[Any]]
_REFUSALS = (ValueError, FarmeshError)


class GroupCommit:
    """Batches write steps on ``ledger`` into shared transactions."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._queue: list[tuple[Step, asyncio.Future[Any]]] = []
        self._worker: asyncio.Task[None] | None = None
        self.groups = 0
        """Transactions committed so far (each for one group of steps)."""

    async def run(self, step: Callable[[Database], Awaitable[T]]) -> T:
        """Run ``step`` in the next group's transaction; its result once that committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((step, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="farmesh-ledger-group-commit")
        return await future

    async def aclose(self) -> None:
        """Wait until every queued step has committed (or failed)."""
        if self._worker is not None:
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _drain(self) -> None:
        while self._queue:
            group, self._queue = self._queue, []
            await self._commit(group)

    async def _commit(self, group: list[tuple[Step, asyncio.Future[Any]]]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            async with guarded("write"), self._ledger.write_transaction():
                database = self._ledger.database
                for step, _ in group:
                    try:
                        outcomes.append((True, await step(database)))
                    except _REFUSALS as refusal:
                        outcomes.append((False, refusal))
        except LedgerUnavailable as failure:
            logger.warning("a group of %d ledger writes failed: %s", len(group), failure)
            for _, future in group:
                if not future.done():
                    future.set_exception(failure)
            return
        self.groups += 1
        for (_, future), (ok, value) in zip(group, outcomes, strict=True):
            if future.done():  # its caller was cancelled meanwhile
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
