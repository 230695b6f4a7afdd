"""Who hears about turns besides the client: metrics and the ledger.

The session reports each request's life to a :class:`TurnObserver`; :class:`FanOut` sends
every event to several. Observers must be quick and must not raise: they run on the path
that streams tokens (the ledger only enqueues or writes a small checkpoint file).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from farmesh_ws.mesh.base import TurnDone


@dataclass(frozen=True, slots=True)
class TurnContext:
    """Who asked for a request and when; ``session_id`` is the chat session's (or, for a
    one-shot ``generate``, its own)."""

    session_id: str
    request_id: str
    kind: str
    wallet: str | None
    model_id: str
    started_at: float


class TurnObserver:
    """Hears a request's life. Every method does nothing here: subclasses override the
    events they care about."""

    def turn_started(self, context: TurnContext) -> None:
        """A request was accepted and is about to run."""

    def token(
        self,
        context: TurnContext,
        *,
        delivered: int,
        prompt_tokens: int,
        cost: Decimal,
        inter_token_s: float | None,
    ) -> None:
        """A token frame was sent; ``delivered`` tokens so far cost ``cost``."""

    def turn_finished(
        self,
        context: TurnContext,
        done: TurnDone,
        *,
        finish_reason: str,
        completion_tokens: int,
        cost: Decimal,
    ) -> None:
        """The request ended; ``completion_tokens`` and ``cost`` are what was billed."""

    def error(self, code: str) -> None:
        """An error frame with ``code`` was sent."""


class FanOut(TurnObserver):
    """Forwards every event to each observer in order."""

    def __init__(self, observers: Sequence[TurnObserver]) -> None:
        self._observers = tuple(observers)

    def turn_started(self, context: TurnContext) -> None:
        for observer in self._observers:
            observer.turn_started(context)

    def token(
        self,
        context: TurnContext,
        *,
        delivered: int,
        prompt_tokens: int,
        cost: Decimal,
        inter_token_s: float | None,
    ) -> None:
        for observer in self._observers:
            observer.token(
                context,
                delivered=delivered,
                prompt_tokens=prompt_tokens,
                cost=cost,
                inter_token_s=inter_token_s,
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
        for observer in self._observers:
            observer.turn_finished(
                context,
                done,
                finish_reason=finish_reason,
                completion_tokens=completion_tokens,
                cost=cost,
            )

    def error(self, code: str) -> None:
        for observer in self._observers:
            observer.error(code)
