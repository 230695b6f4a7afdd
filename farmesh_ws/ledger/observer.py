"""The ledger's view of turns: checkpoints while a turn streams, one record when it ends."""

import logging
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from farmesh_ws.ledger.checkpoints import TurnCheckpoints
from farmesh_ws.ledger.money import to_e8
from farmesh_ws.ledger.records import TurnRecord, turn_record
from farmesh_ws.ledger.writer import LedgerWriter
from farmesh_ws.mesh.base import TurnDone
from farmesh_ws.observers import TurnContext, TurnObserver

logger = logging.getLogger(__name__)


class LedgerObserver(TurnObserver):
    """Checkpoints running turns and hands finished ones to the ledger writer."""

    def __init__(self, writer: LedgerWriter, checkpoints: TurnCheckpoints) -> None:
        self._writer = writer
        self._checkpoints = checkpoints

    def token(
        self,
        context: TurnContext,
        *,
        delivered: int,
        prompt_tokens: int,
        cost: Decimal,
        inter_token_s: float | None,
    ) -> None:
        if not self._checkpoints.due(context.session_id, context.request_id):
            return
        now = time.time()
        self._checkpoints.write(
            TurnRecord(
                session_id=context.session_id,
                request_id=context.request_id,
                kind=context.kind,
                wallet=context.wallet,
                model_id=context.model_id,
                started_at=context.started_at,
                ended_at=now,
                prompt_tokens=prompt_tokens,
                completion_tokens=delivered,
                cached_tokens=0,
                finish_reason="interrupted",
                cost_far_e8=to_e8(cost),
                ttft_ms=None,
                duration_ms=(now - context.started_at) * 1e3,
                contributions=(),
            )
        )

    def turn_finished(
        self,
        context: TurnContext,
        done: TurnDone,
        *,
        finish_reason: str,
        completion_tokens: int,
        cost: Decimal,
    ) -> None:
        record = turn_record(
            session_id=context.session_id,
            request_id=context.request_id,
            kind=context.kind,
            wallet=context.wallet,
            model_id=context.model_id,
            started_at=context.started_at,
            ended_at=time.time(),
            done=done,
            finish_reason=finish_reason,
            completion_tokens=completion_tokens,
            cost=cost,
        )
        self._writer.submit(record, on_stored=self._checkpoints.clear)


async def recover_interrupted_turns(checkpoints: TurnCheckpoints, writer: LedgerWriter) -> int:
    """Close the turns a crashed process left running, billed as far as they were delivered."""
    found = checkpoints.orphaned()
    for path, record in found:
        writer.submit(record, on_stored=_remover(path))
    await writer.flush()
    for directory in {path.parent for path, _ in found}:
        if not any(directory.iterdir()):
            directory.rmdir()
    if found:
        logger.info("closed %d turns interrupted by a crash", len(found))
    return len(found)


def _remover(path: Path) -> Callable[[TurnRecord], None]:
    def remove(record: TurnRecord) -> None:
        path.unlink(missing_ok=True)

    return remove
