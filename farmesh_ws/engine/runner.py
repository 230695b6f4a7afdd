"""THE place where a request is admitted, run and settled, for every surface.

Admission (:meth:`RequestRunner.admit`) checks, in order and before anything reaches the
mesh: the server is not stopping, the session is open, the client is not busy, the
``request_id`` is new, the text and ``max_new_tokens`` are within the configured limits, the
billed wallet is the principal's own (``wallet_mismatch``), the principal has a request slot
(``quota_exceeded``), the model is served (a one-shot request opens its own mesh session and
reserves prompt + ``max_new_tokens`` of context), the turn fits the session's remaining
``max_length`` (context room), the budget pays for at least one token, the anonymous free
quota has room, the prepaid hold on the wallet's balance is taken
(:mod:`~farmesh_ws.engine.allowances`), and last the principal's rate limit (a hold taken is
given back when a later check refuses). A refused request raises a
:class:`~farmesh_ws.errors.FarmeshError` and leaves no trace (nothing sent to the mesh,
billed or recorded; protocol.md §3.2). An admitted request always settles
(:meth:`~farmesh_ws.engine.request.ActiveRequest.finish`).
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Protocol

from farmesh_ws.config import Settings
from farmesh_ws.core.money import far_text
from farmesh_ws.core.settlement import Settlement
from farmesh_ws.core.types import ChatMessage, SamplingOverrides, SamplingParams, TokenEvent
from farmesh_ws.engine.allowances import BalanceHolds, FreeTokens
from farmesh_ws.engine.conversation import Client, Conversation, TurnMark
from farmesh_ws.engine.events import Observer, RequestContext, RequestStarted
from farmesh_ws.engine.history import last_turn, rewind
from farmesh_ws.engine.limits import (
    check_max_new_tokens,
    check_room,
    check_text,
    check_text_total,
    default_max_new_tokens,
)
from farmesh_ws.engine.one_shot import OneShot, OneShots
from farmesh_ws.engine.quotas import Quotas
from farmesh_ws.engine.rate_limit import take_rate_token
from farmesh_ws.engine.request import ActiveRequest
from farmesh_ws.errors import (
    BudgetExceeded,
    Busy,
    DuplicateRequestId,
    FarmeshError,
    InvalidRequest,
    SessionClosed,
    ShuttingDown,
)
from farmesh_ws.mesh.base import MeshSession
from farmesh_ws.state import StateStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """What a surface asks for, decoded from its wire format.

    ``text``: the user's text (a chat turn, a one-shot prompt, or raw v2 ``inputs``; checked
    against ``max_text_chars``). ``token_ids``: raw tokens to send as they are (v2); when None,
    ``text`` is one chat turn under the model's template. ``sampling``: complete, or overrides
    whose gaps take the defaults (greedy, ``default_max_new_tokens``). ``conversation`` None: a
    one-shot request on a fresh mesh session of ``model_id``, closed afterwards. ``wallet``: the
    wallet a one-shot request names, a claim checked against the principal (a conversation's
    wallet is its own). ``total_new_tokens``: the most the whole request may generate over
    all its steps (chat.petals.dev's loop), when more than ``sampling.max_new_tokens``; its
    hold and free quota cover that many. ``messages``: a one-shot chat over a whole
    conversation (system, user and assistant messages, OpenAI's stateless chat completions),
    templated as one turn in place of ``text`` (which is then ignored); the text limit
    applies to the sum of their contents. ``raw_text``: ``text`` is a raw prompt, tokenized
    as it is with no chat template (OpenAI's completions). ``reuse``: a one-shot request that
    may continue a kept mesh session of the same principal and leave its own for the next
    (:mod:`~farmesh_ws.engine.reuse`). ``regenerate``: the conversation's last turn again,
    in place of its reply (the session goes back to where that turn began; ``text`` ignored).
    """

    request_id: str
    kind: str
    text: str
    sampling: SamplingParams | SamplingOverrides
    conversation: Conversation | None = None
    token_ids: tuple[int, ...] | None = None
    max_cost_far: Decimal | None = None
    model_id: str | None = None
    wallet: str | None = None
    total_new_tokens: int | None = None
    messages: tuple[ChatMessage, ...] | None = None
    raw_text: bool = False
    reuse: bool = False
    regenerate: bool = False


class RequestSink(Protocol):
    """Where a launched request's output goes (a wire adapter encodes it)."""

    async def token(self, active: ActiveRequest, event: TokenEvent) -> None: ...

    async def finished(self, active: ActiveRequest, settlement: Settlement) -> None: ...


class RequestRunner:
    """Admits, runs and settles requests; see the module docstring for the rules' order."""

    def __init__(
        self,
        *,
        settings: Settings,
        one_shots: OneShots,
        store: StateStore,
        observer: Observer,
        stopping: Callable[[], bool],
        quotas: Quotas,
        free_tokens: FreeTokens,
        holds: BalanceHolds | None = None,
    ) -> None:
        self._settings = settings
        self._one_shots = one_shots
        self._store = store
        self._observer = observer
        self._stopping = stopping
        self._quotas = quotas
        self._free = free_tokens
        self._holds = holds if settings.balances == "prepaid" else None
        self.active: set[ActiveRequest] = set()

    async def admit(self, client: Client, spec: RequestSpec) -> ActiveRequest:
        """Check every rule; return the started request or raise its error."""
        conversation = spec.conversation
        if client.running is not None and client.running.settled:
            await client.running.ended.wait()  # only its last frames are still going out
        if self._stopping():
            raise ShuttingDown("the server is shutting down; retry on another server")
        if conversation is not None and conversation.closed:
            raise SessionClosed("the session is closed")
        if client.running is not None:
            raise Busy(
                f"request {client.running.request_id!r} is still running; wait for its done "
                "frame or cancel it"
            )
        if spec.request_id in client.request_ids:
            raise DuplicateRequestId(
                f"request_id {spec.request_id!r} was already used on this connection"
            )
        if spec.messages is not None:
            if conversation is not None or spec.token_ids is not None or not spec.messages:
                raise InvalidRequest("messages are a non-empty one-shot chat")
            check_text_total(self._settings, (m.content for m in spec.messages), "messages")
        else:
            check_text(self._settings, spec.text, "text" if spec.token_ids is None else "inputs")
        model_id = conversation.mesh.model_id if conversation is not None else spec.model_id
        model_id = model_id or self._settings.default_model_id
        sampling = spec.sampling
        if isinstance(sampling, SamplingOverrides):
            default = default_max_new_tokens(self._settings, model_id)
            sampling = sampling.resolve(default_max_new_tokens=default)
        check_max_new_tokens(self._settings, sampling.max_new_tokens, model_id)
        principal = client.principal
        if conversation is None:
            wallet = principal.billed_wallet(spec.wallet)
        else:
            wallet = conversation.wallet
        self._quotas.begin_request(principal)
        try:
            return await self._admit_on_mesh(client, spec, sampling, wallet)
        except BaseException:
            self._quotas.end_request(principal)
            raise

    async def _admit_on_mesh(
        self, client: Client, spec: RequestSpec, sampling: SamplingParams, wallet: str | None
    ) -> ActiveRequest:
        conversation = spec.conversation
        shot: OneShot | None = None
        if conversation is None:
            shot = await self._one_shots.open(
                client.principal,
                wallet,
                spec.model_id,
                sampling.max_new_tokens,
                lambda mesh: self._encode(spec, mesh),
                reuse=spec.reuse,
            )
            mesh, token_ids = shot.mesh, shot.token_ids
        elif spec.regenerate:
            mesh = conversation.mesh
            token_ids = list(last_turn(conversation).token_ids)  # it fitted where it began
        else:
            mesh = conversation.mesh
            token_ids = self._encode(spec, mesh)
            check_room(mesh, token_ids)
        hold: Decimal | None = None
        try:
            total = spec.total_new_tokens or sampling.max_new_tokens
            free_left: int | None = None
            budget = self._budget(spec, conversation, len(token_ids), mesh.model_id)
            if self._free.applies(client.principal):
                allowance = await self._free.allowance(client.principal, len(token_ids))
                if allowance < total:
                    total = free_left = allowance
                if allowance < sampling.max_new_tokens:
                    sampling = replace(sampling, max_new_tokens=allowance)
            context = self._context(client, spec, mesh, wallet)
            hold = await self._hold(context, len(token_ids), total)
            balance_bound = hold is not None and (budget is None or hold < budget)
            if hold is not None:
                budget = hold if budget is None else min(budget, hold)
                context = replace(context, held_far=hold)
            # after the hold: a request refused for its balance uses no rate token, and a
            # rate-limited one gives its hold back (below)
            await take_rate_token(self._store, self._settings, client.principal)
            if self._stopping():  # shutdown began while this request was being admitted
                raise ShuttingDown("the server is shutting down; retry on another server")
            rewound = None
            if conversation is not None and spec.regenerate:
                rewound = await rewind(conversation, 1)
        except BaseException:
            if hold is not None and self._holds is not None:
                await self._holds.release(context.hold_id)
            if shot is not None:
                await self._one_shots.abandon(shot)
            raise
        active = self._start(client, spec, context, mesh, token_ids, sampling, budget, shot)
        active.rewound = rewound
        active.free_tokens_left = free_left
        active.balance_bound = balance_bound
        return active

    def launch(self, active: ActiveRequest, sink: RequestSink) -> None:
        """Run a one-step request (a chat turn or one-shot) in its own task, into ``sink``."""
        active.task = asyncio.create_task(
            self._run(active, sink), name=f"farmesh-{active.context.kind}-{active.request_id}"
        )

    async def _run(self, active: ActiveRequest, sink: RequestSink) -> None:
        error: FarmeshError | None = None
        try:
            try:
                async for event in active.step(active.token_ids, active.sampling):
                    await sink.token(active, event)
                    active.delivered(1)
            except FarmeshError as exc:
                error = exc
            except Exception:
                logger.exception("request %s failed", active.request_id)
                error = FarmeshError("internal error")
            settlement = active.finish(error)
            await active.aclose()
            await sink.finished(active, settlement)
        finally:
            if not active.settled:  # the task itself was cancelled
                active.finish(FarmeshError("internal error"))
                await asyncio.shield(active.aclose())
            active.release()

    async def _hold(
        self, context: RequestContext, prompt_tokens: int, new_tokens: int
    ) -> Decimal | None:
        """The prepaid hold for a wallet's request of at most ``new_tokens`` (None: balances
        off or no wallet)."""
        if self._holds is None or context.wallet is None:
            return None
        prices = self._settings.prices_for(context.model_id)
        maximum = prices.cost(prompt_tokens, new_tokens)
        if maximum <= 0:  # a free mesh: nothing to hold
            return None
        return await self._holds.take(
            wallet=context.wallet,
            hold_id=context.hold_id,
            minimum=min(prices.cost(prompt_tokens, 1), maximum),
            maximum=maximum,
        )

    @staticmethod
    def _encode(spec: RequestSpec, mesh: MeshSession) -> list[int]:
        if spec.token_ids is not None:
            return list(spec.token_ids)
        if spec.conversation is not None:
            return mesh.encode_turn(spec.conversation.turn_messages(spec.text))
        if spec.messages is not None:
            return mesh.encode_turn(spec.messages)
        if spec.raw_text:
            return mesh.encode(spec.text)
        return mesh.encode_turn([ChatMessage(role="user", content=spec.text)])

    def _budget(
        self,
        spec: RequestSpec,
        conversation: Conversation | None,
        prompt_tokens: int,
        model_id: str,
    ) -> Decimal | None:
        """The tighter of the request's ``max_cost_far`` and what is left of the session's;
        refused when it cannot pay for one token (protocol.md §3.7)."""
        limits = [spec.max_cost_far] if spec.max_cost_far is not None else []
        left = conversation.budget_left_far if conversation is not None else None
        if left is not None:
            limits.append(left)
        if not limits:
            return None
        budget = min(limits)
        if left is not None and left <= 0:
            raise BudgetExceeded("the session's max_cost_far budget is spent")
        if budget < self._settings.prices_for(model_id).cost(prompt_tokens, 1):
            raise BudgetExceeded(
                f"max_cost_far {far_text(budget)} does not pay for one token of this request"
            )
        return budget

    def _context(
        self, client: Client, spec: RequestSpec, mesh: MeshSession, wallet: str | None
    ) -> RequestContext:
        conversation = spec.conversation
        return RequestContext(
            session_id=conversation.session_id if conversation is not None else uuid.uuid4().hex,
            request_id=spec.request_id,
            kind=spec.kind,
            wallet=wallet,
            model_id=mesh.model_id,
            started_at=time.time(),
            principal_id=client.principal.principal_id,
            address_hash=client.principal.address_hash,
        )

    def _after(self, shot: OneShot) -> Callable[[ActiveRequest], Awaitable[None]]:
        async def after(active: ActiveRequest) -> None:
            await self._one_shots.end(shot, failed=active.failed)

        return after

    def _start(
        self,
        client: Client,
        spec: RequestSpec,
        context: RequestContext,
        mesh: MeshSession,
        token_ids: list[int],
        sampling: SamplingParams,
        budget: Decimal | None,
        shot: OneShot | None,
    ) -> ActiveRequest:
        conversation = spec.conversation
        if conversation is not None:
            conversation.reservation.allocated()
        elif shot is not None:
            shot.reservation.allocated()
        before = mesh.mark() if spec.kind in ("turn", "regenerate") else None
        prices = self._settings.prices_for(mesh.model_id)
        if spec.regenerate:  # the turn's prompt was billed the first time
            prices = replace(prices, per_prompt_token=Decimal(0))

        def on_end(active: ActiveRequest) -> None:
            if active not in self.active:
                return
            self.active.discard(active)
            self._quotas.end_request(client.principal)
            if conversation is not None and before is not None and mesh.mark() != before:
                conversation.history.append(TurnMark(before, tuple(token_ids)))
            if self._free.applies(client.principal) and active.result is not None:
                self._free.spent(client.principal, active.result.prompt_tokens + active.generated)

        active = ActiveRequest(
            context=context,
            client=client,
            conversation=conversation,
            mesh=mesh,
            token_ids=token_ids,
            sampling=sampling,
            budget_far=budget,
            prices=prices,
            observer=self._observer,
            on_end=on_end,
            after=None if shot is None else self._after(shot),
        )
        client.running = active
        client.request_ids.add(spec.request_id)
        self.active.add(active)
        self._observer.notify(RequestStarted(context))
        return active
