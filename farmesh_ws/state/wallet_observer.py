"""Per-wallet usage counters in the state store, fed by finished requests (off the hot path)."""

import asyncio

from farmesh_ws.core.money import to_e8
from farmesh_ws.engine.events import Observer, RequestEvent, RequestFinished
from farmesh_ws.state.base import StateStore


class WalletUsageObserver(Observer):
    """Adds each finished request to its wallet's totals."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._pending: set[asyncio.Task[None]] = set()

    def notify(self, event: RequestEvent) -> None:
        if not isinstance(event, RequestFinished) or event.context.wallet is None:
            return
        settlement = event.settlement
        task = asyncio.create_task(
            self._store.add_wallet_usage(
                event.context.wallet,
                tokens=settlement.prompt_tokens + settlement.completion_tokens,
                cost_far_e8=to_e8(settlement.cost_far),
            )
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def aclose(self) -> None:
        """Wait for the counters still being written."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
