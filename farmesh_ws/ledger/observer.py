"""The ledger's view of turns: checkpoints while a turn streams, one record when it ends."""

import logging
import time
from collections.abc import Callable
from pathlib import Path

from farmesh_ws.engine.events import Observer, RequestEvent, RequestFinished, TokensDelivered
from farmesh_ws.ledger.checkpoints import TurnCheckpoints
from farmesh_ws.ledger.records import TurnRecord, checkpoint_record, turn_record
from farmesh_ws.ledger.writer import LedgerWriter

logger = logging.getLogger(__name__)


class LedgerObserver(Observer):
    """Checkpoints running requests and hands finished ones to the ledger writer; a request's
    record (and checkpoint) names its prepaid hold, settled when the record is stored."""

    def __init__(self, writer: LedgerWriter, checkpoints: TurnCheckpoints) -> None:
        self._writer = writer
        self._checkpoints = checkpoints

    def notify(self, event: RequestEvent) -> None:
        if isinstance(event, TokensDelivered):
            self._checkpoint(event)
        elif isinstance(event, RequestFinished):
            record = turn_record(event, ended_at=time.time())
            self._writer.submit(record, on_stored=self._checkpoints.clear)

    def _checkpoint(self, event: TokensDelivered) -> None:
        context = event.context
        if self._checkpoints.due(context.session_id, context.request_id):
            self._checkpoints.write(checkpoint_record(event, now=time.time()))


async def recover_interrupted_turns(checkpoints: TurnCheckpoints, writer: LedgerWriter) -> int:
    """Close the turns a crashed process left running, billed as far as they were delivered
    (settling their holds for that), then release the expired holds nothing settled."""
    found = checkpoints.orphaned()
    for path, record in found:
        writer.submit(record, on_stored=_remover(path))
    await writer.flush()
    for directory in {path.parent for path, _ in found}:
        if not any(directory.iterdir()):
            directory.rmdir()
    if found:
        logger.info("closed %d turns interrupted by a crash", len(found))
    await writer.release_expired_holds()
    return len(found)


def _remover(path: Path) -> Callable[[TurnRecord], None]:
    def remove(record: TurnRecord) -> None:
        path.unlink(missing_ok=True)

    return remove
