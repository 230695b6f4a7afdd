"""Ledger writes off the hot path: queued, batched, one transaction per turn, never lost.

``submit`` only enqueues, so a token frame never waits on the database. One background task
writes batches. If the database is down, records go to the durable spool and the task keeps
retrying; once the database answers, the spool is replayed (idempotent writes make a repeat
harmless, so each record is stored exactly once). ``aclose`` flushes everything: to the
database, or to the spool if it is still down.

A record naming a prepaid hold settles it when it is stored (``Ledger.record_turn``), so a
spooled record settles its hold on replay, once. Every ``hold_sweep_s`` the task also releases
the holds whose deadline passed unsettled (:meth:`LedgerWriter.release_expired_holds`).
"""

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from farmesh_ws.core.tasks import cancel_and_wait
from farmesh_ws.ledger import balances
from farmesh_ws.ledger.records import TurnRecord
from farmesh_ws.ledger.spool import Spool
from farmesh_ws.ledger.store import Ledger, LedgerUnavailable

logger = logging.getLogger(__name__)

OnStored = Callable[[TurnRecord], None]


class LedgerWriter:
    def __init__(
        self,
        ledger: Ledger,
        spool_dir: Path,
        *,
        batch_size: int = 64,
        retry_s: float = 1.0,
        hold_sweep_s: float = 60.0,
    ) -> None:
        self.ledger = ledger
        self.spool = Spool(spool_dir, f"spool-{os.getpid()}")
        self._batch_size = batch_size
        self._retry_s = retry_s
        self._hold_sweep_s = hold_sweep_s
        self._next_sweep = time.monotonic() + hold_sweep_s
        self._queue: asyncio.Queue[tuple[TurnRecord, OnStored | None]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._closing = False
        self.stored = 0
        self.spooled = 0

    @property
    def degraded(self) -> bool:
        """True while the database is unreachable (records are being spooled)."""
        return not self._connected

    async def start(self) -> None:
        await self._try_connect()
        self._task = asyncio.create_task(self._run(), name="farmesh-ledger-writer")

    def submit(self, record: TurnRecord, on_stored: OnStored | None = None) -> None:
        """Queue a record; ``on_stored`` runs once it is durable (in the database or spool)."""
        if self._closing:
            raise RuntimeError("the ledger writer is closed")
        self._queue.put_nowait((record, on_stored))

    async def flush(self) -> None:
        """Wait until everything submitted so far is durable."""
        await self._queue.join()

    async def release_expired_holds(self) -> int:
        """Release (settle for nothing) the holds whose ``expires_at`` has passed; return how
        many. Does nothing, returning 0, while the database is down or spooled records wait:
        those may settle some of the holds for what their requests cost."""
        if not self._connected or self.spool.pending_files():
            return 0
        try:
            released = await balances.release_expired_holds(self.ledger, time.time())
        except LedgerUnavailable as exc:
            self._lost_database(exc)
            return 0
        if released:
            logger.info("released %d expired balance holds", released)
        return released

    async def aclose(self) -> None:
        self._closing = True
        if self._task is not None:
            await self._queue.join()
            await cancel_and_wait(self._task)
            self._task = None
        if self._connected:
            await self.ledger.aclose()
            self._connected = False

    async def _run(self) -> None:
        while True:
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self._hold_sweep_s
                await self.release_expired_holds()
            try:
                first = await asyncio.wait_for(self._queue.get(), self._retry_s)
            except TimeoutError:
                await self._recover()
                continue
            batch = [first]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                if not self._connected or self.spool.pending_files():
                    await self._recover()
                await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[tuple[TurnRecord, OnStored | None]]) -> None:
        """Store each record in its own transaction; spool the rest on the first failure."""
        for index, (record, on_stored) in enumerate(batch):
            if self._connected and not self.spool.pending_files():
                try:
                    await self.ledger.record_turn(record)
                    self.stored += 1
                except LedgerUnavailable as exc:
                    self._lost_database(exc)
                    self._spool(batch[index:])
                    return
                _notify(on_stored, record)
            else:
                self._spool(batch[index:])
                return

    def _spool(self, batch: list[tuple[TurnRecord, OnStored | None]]) -> None:
        self.spool.append([record for record, _ in batch])
        self.spooled += len(batch)
        for record, on_stored in batch:
            _notify(on_stored, record)

    async def _recover(self) -> None:
        """Reconnect if needed, then replay spool files (ours, and those of dead processes)."""
        if not self._connected:
            await self._try_connect()
            if not self._connected:
                return
        for path in self.spool.pending_files():
            if not _replayable(path):
                continue
            replaying = path.with_suffix(".replaying")
            path.rename(replaying)
            try:
                for record in Spool.read(replaying):
                    await self.ledger.record_turn(record)
            except LedgerUnavailable as exc:
                replaying.rename(path.with_name(f"{path.stem}-retry-{os.getpid()}.jsonl"))
                self._lost_database(exc)
                return
            replaying.unlink()
            logger.info("replayed the ledger spool %s", path.name)

    async def _try_connect(self) -> None:
        with contextlib.suppress(Exception):
            await self.ledger.aclose()
        try:
            await self.ledger.connect()
        except LedgerUnavailable as exc:
            self._lost_database(exc)
            return
        if not self._connected:
            logger.info("ledger database connected")
        self._connected = True

    def _lost_database(self, exc: LedgerUnavailable) -> None:
        if self._connected:
            logger.warning("ledger database unavailable (%s); spooling records", exc)
        self._connected = False


def _notify(on_stored: OnStored | None, record: TurnRecord) -> None:
    if on_stored is not None:
        on_stored(record)


def _replayable(path: Path) -> bool:
    """Our own spool, or one whose process is gone (never one another live process appends to)."""
    owner = path.stem.removeprefix("spool-").split("-", 1)[0]
    if not owner.isdigit() or int(owner) == os.getpid():
        return True
    try:
        os.kill(int(owner), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
