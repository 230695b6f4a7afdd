"""One WebSocket connection's chat session: the state machine of protocol.md §3.

    open ──open──▶ idle ──turn──▶ generating ──done──▶ idle ──close──▶ closed

No socket and no Petals imports: messages come in decoded, frames go out through ``send``,
and the mesh is a :class:`~farmesh_ws.mesh.base.MeshBackend`. A turn runs in its own task
so ``cancel`` (and a closing socket) can stop it between steps; the chat session survives.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, TypeVar

from farmesh_ws import protocol as p
from farmesh_ws.config import Settings
from farmesh_ws.errors import (
    BudgetExceeded,
    FarmeshError,
    InvalidRequest,
    MeshTimeout,
    ModelNotFound,
)
from farmesh_ws.ledger.money import far_text, split_by_work
from farmesh_ws.mesh.base import (
    ChatMessage,
    MeshBackend,
    MeshSession,
    MeshTurn,
    SamplingParams,
    TokenEvent,
    TurnDone,
)
from farmesh_ws.observers import TurnContext, TurnObserver

logger = logging.getLogger(__name__)

Send = Callable[[p.ServerMessage], Awaitable[None]]
T = TypeVar("T")
State = Literal["open", "idle", "generating", "closed"]


class SessionError(FarmeshError):
    """A request that does not fit the session's current state (protocol.md §6)."""

    def __init__(self, code: str, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


@dataclass(slots=True)
class _Running:
    request_id: str
    task: asyncio.Task[None]
    turn: MeshTurn | None = None
    delivered: int = 0
    over_budget: bool = False


class ChatSession:
    """Handles one connection's decoded messages; see protocol.md for every rule."""

    def __init__(
        self, *, backend: MeshBackend, settings: Settings, send: Send, observer: TurnObserver
    ) -> None:
        self._backend = backend
        self._settings = settings
        self._send = send
        self._observer = observer
        self.state: State = "open"
        self.session_id: str | None = None
        self.user_wallet: str | None = None
        self.model_id: str = settings.default_model_id
        self._mesh: MeshSession | None = None
        self._system_prompt: str | None = None
        self._defaults = p.Sampling()
        self._turns_started = 0
        self._seen_request_ids: set[str] = set()
        self._running: _Running | None = None
        self._session_budget: Decimal | None = None
        self.spent = Decimal(0)

    @property
    def busy(self) -> bool:
        return self._running is not None

    async def handle(self, message: p.ClientMessage) -> None:
        """Act on one client message; raises :class:`FarmeshError` for an ``error`` frame."""
        if isinstance(message, p.Ping):
            await self._send(p.Pong(data=message.data))
        elif isinstance(message, p.Open):
            await self._open(message)
        elif isinstance(message, p.Turn):
            self._start_turn(message)
        elif isinstance(message, p.Generate):
            self._start_generate(message)
        elif isinstance(message, p.Cancel):
            self._cancel(message.request_id)
        elif isinstance(message, p.Close):
            await self.aclose()
            await self._send(p.Closed(session_id=self.session_id))

    async def wait_idle(self) -> None:
        """Wait for the running turn, if any, to finish by itself."""
        running = self._running
        if running is not None:
            await asyncio.shield(running.task)

    async def aclose(self) -> None:
        """Cancel a running turn and close the mesh session. Idempotent."""
        if self.state == "closed":
            return
        self.state = "closed"
        running = self._running
        if running is not None:
            if running.turn is not None:
                running.turn.cancel()
            await asyncio.gather(running.task, return_exceptions=True)
        if self._mesh is not None:
            mesh, self._mesh = self._mesh, None
            await mesh.aclose()

    # protocol.md §3.1
    async def _open(self, message: p.Open) -> None:
        if self.state != "open":
            raise SessionError("already_open", "this connection already has a chat session")
        model_id = message.model or self._settings.default_model_id
        max_length = message.max_length or self._settings.default_max_length
        if model_id not in self._backend.model_ids:
            raise ModelNotFound(f"model {model_id!r} is not served here")
        if max_length > self._settings.max_length_limit:
            raise InvalidRequest(
                f"max_length {max_length} is above the limit {self._settings.max_length_limit}"
            )
        if message.system_prompt is not None:
            self._check_text(message.system_prompt, "system_prompt")
        if message.sampling is not None:
            self._check_max_new_tokens(message.sampling.max_new_tokens)
        mesh = await asyncio.wait_for(
            self._backend.open_session(model_id, max_length=max_length),
            self._settings.open_timeout_s,
        )
        self._mesh = mesh
        self._session_budget = Decimal(message.max_cost_far) if message.max_cost_far else None
        self.state = "idle"
        self.session_id = uuid.uuid4().hex
        self.user_wallet = message.user_wallet
        self.model_id = model_id
        self._system_prompt = message.system_prompt
        self._defaults = message.sampling or p.Sampling()
        await self._send(
            p.Opened(
                session_id=self.session_id,
                model=model_id,
                max_length=max_length,
                price_per_token_far=far_text(self._settings.price_per_token_far),
                price_per_prompt_token_far=far_text(self._settings.price_per_prompt_token_far),
            )
        )

    # protocol.md §3.2
    def _start_turn(self, message: p.Turn) -> None:
        if self.state == "open" or self._mesh is None:
            raise SessionError(
                "no_session", "send an 'open' message first", request_id=message.request_id
            )
        self._check_can_start(message.request_id)
        self._check_text(message.text, "text")
        self._check_max_new_tokens(message.max_new_tokens)
        self._check_stop(message.stop, self._defaults.stop)
        messages = [ChatMessage(role="user", content=message.text)]
        if self._turns_started == 0 and self._system_prompt is not None:
            messages.insert(0, ChatMessage(role="system", content=self._system_prompt))
        sampling = self._sampling(message, self._defaults)
        self._turns_started += 1
        budget = self._budget_for(message.max_cost_far, message.request_id)
        self._launch(
            message.request_id,
            "turn",
            self._mesh,
            messages,
            sampling,
            close_after=False,
            budget=budget,
        )

    # protocol.md §3.3
    def _start_generate(self, message: p.Generate) -> None:
        self._check_can_start(message.request_id)
        self._check_text(message.prompt, "prompt")
        self._check_max_new_tokens(message.max_tokens)
        model_id = message.model_id or self._settings.default_model_id
        if model_id not in self._backend.model_ids:
            raise ModelNotFound(f"model {model_id!r} is not served here")
        sampling = SamplingParams(
            temperature=message.temperature if message.temperature is not None else 0.0,
            top_p=message.top_p if message.top_p is not None else 1.0,
            max_new_tokens=message.max_tokens or self._settings.default_max_new_tokens,
        )
        messages = [ChatMessage(role="user", content=message.prompt)]
        if message.user_wallet and self.user_wallet is None:
            self.user_wallet = message.user_wallet
        budget = self._budget_for(message.max_cost_far, message.request_id)
        self._launch(
            message.request_id,
            "generate",
            model_id,
            messages,
            sampling,
            close_after=True,
            budget=budget,
        )

    def _cancel(self, request_id: str) -> None:
        running = self._running
        if running is None or running.request_id != request_id:
            raise SessionError(
                "unknown_request", f"no running request {request_id!r}", request_id=request_id
            )
        if running.turn is not None:
            running.turn.cancel()
        else:
            running.task.cancel()

    def _check_can_start(self, request_id: str) -> None:
        if self.state == "closed":
            raise SessionError("session_closed", "the session is closed", request_id=request_id)
        if self._running is not None:
            raise SessionError(
                "busy",
                f"request {self._running.request_id!r} is still running; wait for its done "
                "frame or cancel it",
                request_id=request_id,
            )
        if request_id in self._seen_request_ids:
            raise SessionError(
                "duplicate_request_id",
                f"request_id {request_id!r} was already used on this connection",
                request_id=request_id,
            )

    def _check_text(self, text: str, name: str) -> None:
        if len(text) > self._settings.max_text_chars:
            raise InvalidRequest(
                f"{name} has {len(text)} characters; the limit is {self._settings.max_text_chars}"
            )

    def _check_max_new_tokens(self, value: int | None) -> None:
        if value is not None and value > self._settings.max_new_tokens_limit:
            raise InvalidRequest(
                f"max_new_tokens {value} is above the limit {self._settings.max_new_tokens_limit}"
            )

    def _check_stop(self, *stops: Iterable[str] | None) -> None:
        for stop_list in stops:
            for stop in stop_list or ():
                if not stop:
                    raise InvalidRequest("stop sequences must not be empty")

    def _sampling(self, message: p.Turn, defaults: p.Sampling) -> SamplingParams:
        """Per-turn values win over the session's defaults, which win over ours."""
        stop = message.stop if message.stop is not None else defaults.stop
        return SamplingParams(
            temperature=_first(message.temperature, defaults.temperature, default=0.0),
            top_p=_first(message.top_p, defaults.top_p, default=1.0),
            top_k=_first(message.top_k, defaults.top_k, default=0),
            repetition_penalty=_first(
                message.repetition_penalty, defaults.repetition_penalty, default=1.0
            ),
            seed=message.seed if message.seed is not None else defaults.seed,
            max_new_tokens=_first(
                message.max_new_tokens,
                defaults.max_new_tokens,
                default=self._settings.default_max_new_tokens,
            ),
            stop=tuple(stop or ()),
        )

    def _launch(
        self,
        request_id: str,
        kind: str,
        target: MeshSession | str,
        messages: list[ChatMessage],
        sampling: SamplingParams,
        *,
        close_after: bool,
        budget: Decimal | None,
    ) -> None:
        self._seen_request_ids.add(request_id)
        context = TurnContext(
            session_id=self.session_id if kind == "turn" and self.session_id else uuid.uuid4().hex,
            request_id=request_id,
            kind=kind,
            wallet=self.user_wallet,
            model_id=target.model_id if not isinstance(target, str) else target,
            started_at=time.time(),
        )
        self._observer.turn_started(context)
        task = asyncio.create_task(
            self._run(context, target, messages, sampling, close_after, budget),
            name=f"farmesh-{kind}-{request_id}",
        )
        self._running = _Running(request_id, task)
        if self.state == "idle":
            self.state = "generating"

    async def _run(
        self,
        context: TurnContext,
        target: MeshSession | str,
        messages: list[ChatMessage],
        sampling: SamplingParams,
        close_after: bool,
        budget: Decimal | None,
    ) -> None:
        mesh: MeshSession | None = None
        request_id = context.request_id
        running = self._running
        assert running is not None  # set by _launch before this task first runs
        try:
            if isinstance(target, str):
                mesh = await asyncio.wait_for(
                    self._backend.open_session(
                        target, max_length=self._settings.default_max_length
                    ),
                    self._settings.open_timeout_s,
                )
            else:
                mesh = target
            await self._stream(context, mesh, messages, sampling, budget, running)
        except TimeoutError:
            self._release(running)
            await self._send_error(
                MeshTimeout("the mesh did not open a session in time"), request_id
            )
        except FarmeshError as exc:
            self._release(running)
            await self._send_error(exc, request_id)
        except Exception:
            logger.exception("request %s failed", request_id)
            self._release(running)
            await self._send_error(FarmeshError("internal error"), request_id)
        finally:
            self._release(running)
            if close_after and mesh is not None:
                await mesh.aclose()

    def _release(self, running: _Running) -> None:
        """The request is over for the client: the next one may start (even while this
        task still tidies up), so it must not meet a stale ``busy``."""
        if self._running is running:
            self._running = None
            if self.state == "generating":
                self.state = "idle"

    async def _stream(
        self,
        context: TurnContext,
        mesh: MeshSession,
        messages: list[ChatMessage],
        sampling: SamplingParams,
        budget: Decimal | None,
        running: _Running,
    ) -> None:
        turn = mesh.run_turn(messages, sampling)
        running.turn = turn
        last_token_at: float | None = None
        async for event in turn:
            if not isinstance(event, TokenEvent):
                await self._finish(context, event, running)
                continue
            if running.over_budget:
                continue
            cost = self._cost(event.prompt_tokens, event.tokens_generated)
            if budget is not None and cost > budget:
                # protocol.md §3.7: the token that would cross the limit is not sent or billed.
                running.over_budget = True
                turn.cancel()
                continue
            now = time.perf_counter()
            running.delivered = event.tokens_generated
            await self._send(
                p.Token(
                    request_id=context.request_id,
                    token=event.text,
                    tokens_generated=event.tokens_generated,
                    cost_far=far_text(cost),
                )
            )
            self._observer.token(
                context,
                delivered=event.tokens_generated,
                prompt_tokens=event.prompt_tokens,
                cost=cost,
                inter_token_s=None if last_token_at is None else now - last_token_at,
            )
            last_token_at = now

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return self._settings.prices.cost(prompt_tokens, completion_tokens)

    def _budget_for(self, turn_limit: str | None, request_id: str) -> Decimal | None:
        """The tighter of the request's ``max_cost_far`` and what is left of the session's;
        a request with nothing left to spend is refused before it starts."""
        limits = [Decimal(turn_limit)] if turn_limit is not None else []
        if self._session_budget is not None:
            limits.append(self._session_budget - self.spent)
        if not limits:
            return None
        budget = min(limits)
        if budget <= 0:
            error = BudgetExceeded("the session's max_cost_far budget is spent")
            raise SessionError(error.code, error.message, request_id=request_id)
        return budget

    async def _finish(self, context: TurnContext, done: TurnDone, running: _Running) -> None:
        finish_reason: str = done.finish_reason
        completion_tokens = done.completion_tokens
        error = done.error
        if running.over_budget:
            finish_reason, completion_tokens = "budget", running.delivered
            error = BudgetExceeded("the request reached its max_cost_far budget")
        cost = self._cost(done.prompt_tokens, completion_tokens)
        self.spent += cost
        self._release(running)
        self._observer.turn_finished(
            context,
            done,
            finish_reason=finish_reason,
            completion_tokens=completion_tokens,
            cost=cost,
        )
        request_id = context.request_id
        if error is not None:
            await self._send_error(error, request_id)
        done_frame = p.Done(
            request_id=request_id,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            usage=p.Usage(
                prompt_tokens=done.prompt_tokens,
                completion_tokens=completion_tokens,
                cached_tokens=done.cached_tokens,
                cost_far=far_text(cost),
            ),
            position=done.position,
            max_length=done.max_length,
            duration_ms=round(done.duration_s * 1000, 3),
            time_to_first_token_ms=(
                None
                if done.time_to_first_token_s is None
                else round(done.time_to_first_token_s * 1000, 3)
            ),
            error=error.code if error is not None else None,
        )
        contribution = self._contribution_frame(request_id, done, cost)
        if context.kind == "generate":
            await self._send(contribution)
            await self._send(done_frame)
        else:
            await self._send(done_frame)
            await self._send(contribution)

    @staticmethod
    def _contribution_frame(request_id: str, done: TurnDone, cost: Decimal) -> p.ContributionReport:
        shares = split_by_work(cost, [c.work for c in done.contributions])
        return p.ContributionReport(
            request_id=request_id,
            cost_far=far_text(cost),
            nodes=[
                p.NodeShare(
                    peer_id=c.peer_id,
                    name=c.public_name,
                    start_block=c.start_block,
                    end_block=c.end_block,
                    tokens=c.tokens,
                    replayed_tokens=c.replayed_tokens,
                    work=c.work,
                    share_far=far_text(share),
                )
                for c, share in zip(done.contributions, shares, strict=True)
            ],
        )

    async def _send_error(self, error: FarmeshError, request_id: str) -> None:
        self._observer.error(error.code)
        await self._send(
            p.Error(
                code=error.code,
                message=error.message,
                retryable=error.retryable,
                request_id=request_id,
            )
        )


def _first(*values: T | None, default: T) -> T:
    """The first value that is not None, else ``default``."""
    for value in values:
        if value is not None:
            return value
    return default
