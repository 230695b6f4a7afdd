"""Spot-check outcomes in the ledger: passed checks (``node_checks``) and flags
(``node_flags``), schema version 6.

The mesh reports from its worker threads (:class:`farmesh_ws.mesh.spot_check.IntegrityMonitor`
listeners); :class:`IntegrityRecorder` hands each report to the event loop and writes it in
its own statement, off the token path. A flag's ``withheld_since`` makes the
``contribution_status`` view withhold the node's work in turns ended after its last passed
check. A write that fails is logged; the node stays excluded in this process either way.
"""

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from farmesh_ws.ledger.store import Ledger, LedgerUnavailable, guarded
from farmesh_ws.mesh.spot_check import IntegrityEvent, NodeFlag

logger = logging.getLogger(__name__)

_UPSERT_PASS = """
    INSERT INTO node_checks (peer_id, passed_checks, last_passed_at)
    VALUES (:peer_id, 1, :at)
    ON CONFLICT (peer_id) DO UPDATE SET
        passed_checks = node_checks.passed_checks + 1,
        last_passed_at = CASE WHEN excluded.last_passed_at > node_checks.last_passed_at
                              THEN excluded.last_passed_at ELSE node_checks.last_passed_at END
"""
_INSERT_FLAG = """
    INSERT INTO node_flags (flag_id, peer_id, kind, flagged_at, step, evidence, withheld_since)
    VALUES (:flag_id, :peer_id, :kind, :flagged_at, :step, :evidence, :withheld_since)
"""


async def record_pass(ledger: Ledger, peer_id: str, at: float) -> None:
    """Count one passed check of ``peer_id`` at Unix time ``at``."""
    async with guarded("write"):
        await ledger.database.execute(_UPSERT_PASS, {"peer_id": peer_id, "at": at})


async def record_flag(ledger: Ledger, flag: NodeFlag) -> None:
    """Store ``flag``; a ``tampered_output`` flag withholds work (others withhold none)."""
    withheld = flag.withheld_since if flag.kind == "tampered_output" else None
    async with guarded("write"):
        await ledger.database.execute(
            _INSERT_FLAG,
            {
                "flag_id": uuid.uuid4().hex,
                "peer_id": flag.peer_id,
                "kind": flag.kind,
                "flagged_at": flag.flagged_at,
                "step": flag.step,
                "evidence": flag.evidence,
                "withheld_since": withheld,
            },
        )


async def node_flags(ledger: Ledger) -> list[Mapping[str, Any]]:
    """Every flag, oldest first, as rows of ``node_flags``."""
    async with guarded("query"):
        rows = await ledger.database.fetch_all("SELECT * FROM node_flags ORDER BY flagged_at")
    return [dict(row._mapping) for row in rows]


class IntegrityRecorder:
    """Writes a monitor's passes and flags to ``ledger``; subscribe :meth:`listener`."""

    def __init__(self, ledger: Ledger, loop: asyncio.AbstractEventLoop) -> None:
        self._ledger = ledger
        self._loop = loop
        self._tasks: set[asyncio.Task[None]] = set()

    def listener(self, event: IntegrityEvent) -> None:
        """Called from any thread: schedule the write of a pass or a flag."""
        if event.flag is None and event.result != "pass":
            return
        self._loop.call_soon_threadsafe(self._start, event)

    def _start(self, event: IntegrityEvent) -> None:
        task = asyncio.create_task(self._write(event), name="farmesh-integrity-write")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, event: IntegrityEvent) -> None:
        try:
            if event.flag is not None:
                await record_flag(self._ledger, event.flag)
            else:
                await record_pass(self._ledger, event.peer_id, event.at)
        except LedgerUnavailable:
            logger.error("could not store a spot-check outcome of %s", event.peer_id)

    async def flush(self) -> None:
        """Wait for every write scheduled so far (scheduled from other threads included)."""
        await asyncio.sleep(0)
        while self._tasks:
            await asyncio.gather(*self._tasks)
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        await self.flush()
