"""One admitted request from its first mesh step to its settlement.

:class:`ActiveRequest` runs one or more mesh turns (``step``), applies the budget to every
generated token (protocol.md §3.7: the token that would cross the limit is neither delivered
nor billed), tallies usage and contributions over the steps, and settles once (``finish``).
It is made only by :class:`~farmesh_ws.engine.runner.RequestRunner` after admission.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from farmesh_ws.core.money import Prices
from farmesh_ws.core.settlement import SettledReason, Settlement, settle
from farmesh_ws.core.types import (
    Contribution,
    FinishReason,
    RouteHop,
    SamplingParams,
    TokenEvent,
    TurnDone,
)
from farmesh_ws.engine.conversation import Client, Conversation
from farmesh_ws.engine.events import (
    Observer,
    RequestContext,
    RequestFinished,
    TokensDelivered,
)
from farmesh_ws.errors import BudgetExceeded, FarmeshError, MeshError
from farmesh_ws.mesh.base import MeshSession, MeshTurn, RewindMethod


@dataclass(slots=True)
class _Tally:
    """A request's totals over its mesh steps, merged into one :class:`TurnDone`."""

    started: float
    max_length: int
    position: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None
    text: str = ""
    last_reason: FinishReason = "cancelled"
    first_token_at: float | None = None
    work: dict[tuple[str, str | None, int, int], Contribution] = field(default_factory=dict)
    routes: list[tuple[RouteHop, ...]] = field(default_factory=list)

    def add_step(self, done: TurnDone) -> None:
        if self.cached_tokens is None:
            self.cached_tokens = done.cached_tokens
        self.prompt_tokens += done.prompt_tokens
        self.completion_tokens += done.completion_tokens
        self.position = done.position
        self.text += done.text
        self.last_reason = done.finish_reason
        for part in done.contributions:
            key = (part.peer_id, part.public_name, part.start_block, part.end_block)
            earlier = self.work.get(key)
            self.work[key] = part if earlier is None else part.plus(earlier)
        self.routes.extend(done.routes)

    def result(self) -> TurnDone:
        return TurnDone(
            finish_reason=self.last_reason,
            text=self.text,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.position if self.cached_tokens is None else self.cached_tokens,
            position=self.position,
            max_length=self.max_length,
            contributions=tuple(self.work.values()),
            routes=tuple(self.routes),
            time_to_first_token_s=(
                None if self.first_token_at is None else self.first_token_at - self.started
            ),
            duration_s=time.perf_counter() - self.started,
        )


class ActiveRequest:
    """A request between admission and settlement. ``token_ids`` and ``sampling`` are the
    admitted first step; ``budget_far`` the most it may cost (None: no limit)."""

    def __init__(
        self,
        *,
        context: RequestContext,
        client: Client,
        conversation: Conversation | None,
        mesh: MeshSession,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        budget_far: Decimal | None,
        prices: Prices,
        observer: Observer,
        on_end: Callable[["ActiveRequest"], None],
        after: Callable[["ActiveRequest"], Awaitable[None]] | None = None,
    ) -> None:
        self.context = context
        self.client = client
        self.conversation = conversation
        self.mesh = mesh
        self.token_ids = list(token_ids)
        self.sampling = sampling
        self.budget_far = budget_far
        self.failed = False
        """Settled with an error (its mesh session is not kept for reuse)."""
        self.rewound: RewindMethod | None = None
        """How the session went back before a ``regenerate`` ran (None: it did not)."""
        self.balance_bound = False
        """True when the budget is the prepaid hold (smaller than any ``max_cost_far``)."""
        self.free_tokens_left: int | None = None
        """When the anonymous free quota is smaller than what the request may generate: how
        many tokens it may generate over all its steps (None: the quota does not bind)."""
        self._on_end = on_end
        self._after = after
        self.ended = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._prices = prices
        self._observer = observer
        self._tally = _Tally(time.perf_counter(), mesh.max_length, mesh.position)
        self._turn: MeshTurn | None = None
        self._cancelled = False
        self._over_budget = False
        self._billed = 0
        self._prompt = 0
        self._cost = Decimal(0)
        self._delivered = 0
        self.last_step: TurnDone | None = None
        self._last_delivery: float | None = None
        self.result: TurnDone | None = None
        self.settled = False

    @property
    def request_id(self) -> str:
        return self.context.request_id

    @property
    def generated(self) -> int:
        """Tokens generated and billable so far (a token held back by the budget is not)."""
        return self._billed

    @property
    def cost_far(self) -> Decimal:
        """What the request costs so far (protocol.md §7); computed once per token."""
        return self._cost

    @property
    def stopped(self) -> bool:
        """Cancelled, or stopped by its budget: no further step should run."""
        return self._cancelled or self._over_budget

    def cancel(self) -> None:
        """Stop after the current mesh step; takes effect even before the first step."""
        self._cancelled = True
        if self._turn is not None:
            self._turn.cancel()

    async def step(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        replace_last_token: int | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Run one mesh turn and yield its billable tokens; then ``last_step`` is its end."""
        turn = self.mesh.run_tokens(token_ids, sampling, replace_last_token=replace_last_token)
        self._turn = turn
        if self._cancelled:
            turn.cancel()
        billed_before, prompt_before = self._billed, self._tally.prompt_tokens
        self.last_step = None
        try:
            async for event in turn:
                if isinstance(event, TurnDone):
                    self.last_step = event
                    self._tally.add_step(event)
                    self._prompt = self._tally.prompt_tokens
                    self._cost = self._prices.cost(self._prompt, self._billed)
                    continue
                if self._over_budget:
                    continue
                prompt = prompt_before + event.prompt_tokens
                cost = self._prices.cost(prompt, billed_before + event.tokens_generated)
                if self.budget_far is not None and cost > self.budget_far:
                    self._over_budget = True
                    turn.cancel()
                    continue
                if self._tally.first_token_at is None:
                    self._tally.first_token_at = time.perf_counter()
                self._billed = billed_before + event.tokens_generated
                self._prompt, self._cost = prompt, cost
                yield event
        finally:
            self._turn = None

    def delivered(self, count: int) -> None:
        """``count`` more tokens reached the client (observers: metrics, ledger checkpoints)."""
        now = time.perf_counter()
        inter = None if self._last_delivery is None else (now - self._last_delivery) / count
        self._last_delivery = now
        self._delivered += count
        self._observer.notify(
            TokensDelivered(
                self.context,
                delivered=self._delivered,
                prompt_tokens=self._prompt,
                cost_far=self.cost_far,
                inter_token_s=inter,
            )
        )

    def finish(self, error: FarmeshError | None = None) -> Settlement:
        """Settle once: bill what was generated (and not held back) and tell the observers.
        ``error``: what ended the request, if anything. The client stays busy until
        :meth:`release`, after the request's last frames."""
        done = self.result = self._tally.result()
        reason: SettledReason = done.finish_reason
        if error is None and self.last_step is not None:
            error = self.last_step.error
        if self._over_budget:
            reason, error = (
                "budget",
                BudgetExceeded(
                    "the request used up the prepaid balance held for it"
                    if self.balance_bound
                    else "the request reached its max_cost_far budget"
                ),
            )
        elif error is not None:
            reason = "error"
        self.failed = reason == "error"
        settlement = settle(
            done, self._prices, finish_reason=reason, completion_tokens=self._billed, error=error
        )
        if self.conversation is not None:
            self.conversation.spent_far += settlement.cost_far
        self.settled = True
        self._observer.notify(RequestFinished(self.context, done, settlement))
        return settlement

    def release(self) -> None:
        """The request is over, its last frames sent: free the client. Idempotent."""
        if self.client.running is self:
            self.client.running = None
        self._on_end(self)
        self.ended.set()

    async def aclose(self) -> None:
        """Once settled: hand a one-shot request's mesh session on (kept for reuse or closed;
        a conversation keeps its own). Idempotent."""
        after, self._after = self._after, None
        if after is not None:
            await after(self)


def require_step(active: ActiveRequest) -> TurnDone:
    """The end of the step just run; a mesh turn always ends with one."""
    if active.last_step is None:
        raise MeshError("the mesh turn ended without a result")
    return active.last_step
