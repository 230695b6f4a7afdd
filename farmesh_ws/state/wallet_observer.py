"""Per-wallet usage counters in the state store, fed by finished turns (off the hot path)."""

import asyncio
from decimal import Decimal

from farmesh_ws.ledger.money import to_e8
from farmesh_ws.mesh.base import TurnDone
from farmesh_ws.observers import TurnContext, TurnObserver
from farmesh_ws.state.base import StateStore


class WalletUsageObserver(TurnObserver):
    """Adds each finished turn to its wallet's totals."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._pending: set[asyncio.Task[None]] = set()

    def turn_finished(
        self,
        context: TurnContext,
        done: TurnDone,
        *,
        finish_reason: str,
        completion_tokens: int,
        cost: Decimal,
    ) -> None:
        if context.wallet is None:
            return
        task = asyncio.create_task(
            self._store.add_wallet_usage(
                context.wallet,
                tokens=done.prompt_tokens + completion_tokens,
                cost_far_e8=to_e8(cost),
            )
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def aclose(self) -> None:
        """Wait for the counters still being written."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
