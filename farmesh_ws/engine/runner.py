"""THE place where a request is admitted, run and settled, for every surface.

Admission (:meth:`RequestRunner.admit`) checks, in order and before anything reaches the
mesh: the server is not stopping, the session is open, the client is not busy, the
``request_id`` is new, the text and ``max_new_tokens`` are within the configured limits, the
model is served (one-shot requests open their own mesh session), the turn fits the session's
remaining ``max_length`` (context room), the budget pays for at least one token, and last
the client's rate limit. A refused request raises a :class:`~farmesh_ws.errors.FarmeshError`
and leaves no trace (nothing sent to the mesh, billed or recorded; protocol.md §3.2).
An admitted request always settles (:meth:`~farmesh_ws.engine.request.ActiveRequest.finish`).
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from farmesh_ws.config import Settings
from farmesh_ws.core.money import far_text
from farmesh_ws.core.settlement import Settlement
from farmesh_ws.core.types import ChatMessage, SamplingOverrides, SamplingParams, TokenEvent
from farmesh_ws.engine.conversation import Client, Conversation
from farmesh_ws.engine.events import Observer, RequestContext, RequestStarted
from farmesh_ws.engine.limits import check_max_new_tokens, check_text, open_mesh_session
from farmesh_ws.engine.request import ActiveRequest
from farmesh_ws.errors import (
    BudgetExceeded,
    Busy,
    ContextOverflow,
    DuplicateRequestId,
    FarmeshError,
    RateLimited,
    SessionClosed,
    ShuttingDown,
)
from farmesh_ws.mesh.base import MeshBackend, MeshSession
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
    wallet a one-shot request names (a conversation's wallet is its own).
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
        backend: MeshBackend,
        store: StateStore,
        observer: Observer,
        stopping: Callable[[], bool],
    ) -> None:
        self._settings = settings
        self._backend = backend
        self._store = store
        self._observer = observer
        self._stopping = stopping
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
        check_text(self._settings, spec.text, "text" if spec.token_ids is None else "inputs")
        sampling = spec.sampling
        if isinstance(sampling, SamplingOverrides):
            default = self._settings.default_max_new_tokens
            sampling = sampling.resolve(default_max_new_tokens=default)
        check_max_new_tokens(self._settings, sampling.max_new_tokens)
        mesh = conversation.mesh if conversation is not None else await self._open_one_shot(spec)
        try:
            token_ids = self._tokens(spec, mesh)
            budget = self._budget(spec, conversation, len(token_ids))
            await self._take_rate_token(client, self._wallet(client, spec))
            if self._stopping():  # shutdown began while this request was being admitted
                raise ShuttingDown("the server is shutting down; retry on another server")
        except BaseException:
            if conversation is None:
                await mesh.aclose()
            raise
        return self._start(client, spec, mesh, token_ids, sampling, budget)

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

    async def _open_one_shot(self, spec: RequestSpec) -> MeshSession:
        model_id = spec.model_id or self._settings.default_model_id
        return await open_mesh_session(
            self._backend, model_id, self._settings.default_max_length, self._settings
        )

    def _tokens(self, spec: RequestSpec, mesh: MeshSession) -> list[int]:
        if spec.token_ids is not None:
            token_ids = list(spec.token_ids)
        elif spec.conversation is not None:
            token_ids = mesh.encode_turn(spec.conversation.turn_messages(spec.text))
        else:
            token_ids = mesh.encode_turn([ChatMessage(role="user", content=spec.text)])
        needed = mesh.pending_tokens + len(token_ids)
        if mesh.position + needed > mesh.max_length:
            raise ContextOverflow.session_full(
                position=mesh.position, needed=needed, max_length=mesh.max_length
            )
        return token_ids

    def _budget(
        self, spec: RequestSpec, conversation: Conversation | None, prompt_tokens: int
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
        if budget < self._settings.prices.cost(prompt_tokens, 1):
            raise BudgetExceeded(
                f"max_cost_far {far_text(budget)} does not pay for one token of this request"
            )
        return budget

    @staticmethod
    def _wallet(client: Client, spec: RequestSpec) -> str | None:
        if spec.conversation is not None:
            return spec.conversation.wallet
        return spec.wallet or client.wallet

    async def _take_rate_token(self, client: Client, wallet: str | None) -> None:
        """Requests per wallet, or per connection without one, shared across processes."""
        key = f"wallet:{wallet}" if wallet else client.client_key
        decision = await self._store.take_tokens(
            f"requests:{key}",
            rate_per_s=self._settings.requests_per_minute / 60,
            burst=self._settings.requests_burst,
        )
        if not decision.allowed:
            raise RateLimited(f"too many requests; retry in {decision.retry_after_s:.1f} s")

    def _start(
        self,
        client: Client,
        spec: RequestSpec,
        mesh: MeshSession,
        token_ids: list[int],
        sampling: SamplingParams,
        budget: Decimal | None,
    ) -> ActiveRequest:
        conversation = spec.conversation
        context = RequestContext(
            session_id=conversation.session_id if conversation is not None else uuid.uuid4().hex,
            request_id=spec.request_id,
            kind=spec.kind,
            wallet=self._wallet(client, spec),
            model_id=mesh.model_id,
            started_at=time.time(),
        )
        active = ActiveRequest(
            context=context,
            client=client,
            conversation=conversation,
            mesh=mesh,
            token_ids=token_ids,
            sampling=sampling,
            budget_far=budget,
            prices=self._settings.prices,
            observer=self._observer,
            one_shot=conversation is None,
            on_end=self.active.discard,
        )
        client.running = active
        client.request_ids.add(spec.request_id)
        self.active.add(active)
        self._observer.notify(RequestStarted(context))
        return active
