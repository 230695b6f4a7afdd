"""What the engine tells observers (metrics, the ledger, wallet counters) about requests.

Every event is one frozen dataclass and every observer has one method,
:meth:`Observer.notify`; :class:`FanOut` hands each event to several. Observers must be quick
and must not raise: they run on the path that streams tokens (the ledger only enqueues, or
writes a small checkpoint file about once a second).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

from farmesh_ws.core.settlement import Settlement
from farmesh_ws.core.types import TurnDone


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who asked for a request and when (``started_at``: Unix time, s). ``session_id`` is the
    conversation's (a one-shot ``generate`` gets its own); ``kind`` is ``turn``,
    ``generate`` or ``petals_v2``. ``wallet`` is the billed wallet, ``principal_id`` who
    proved it (:attr:`~farmesh_ws.core.principal.Principal.principal_id`), ``address_hash``
    the client's hashed address; ``held_far`` the prepaid hold taken on ``wallet``'s balance
    (None: balances off or nothing to hold), settled by the ledger when the request ends
    under the hold id ``session_id:request_id``."""

    session_id: str
    request_id: str
    kind: str
    wallet: str | None
    model_id: str
    started_at: float
    principal_id: str = "open"
    address_hash: str = ""
    held_far: Decimal | None = None

    @property
    def hold_id(self) -> str:
        return f"{self.session_id}:{self.request_id}"


@dataclass(frozen=True, slots=True)
class RequestStarted:
    """A request passed admission and is about to reach the mesh."""

    context: RequestContext


class TokensDelivered(NamedTuple):
    """Tokens reached the client: ``delivered`` so far, costing ``cost_far`` so far;
    ``inter_token_s`` is the time per token since the previous delivery (None for the first).
    A named tuple, not a frozen dataclass: one is made per token, and it builds 3x faster."""

    context: RequestContext
    delivered: int
    prompt_tokens: int
    cost_far: Decimal
    inter_token_s: float | None


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """A started request ended; ``settlement`` is what is billed, ``done`` the mesh's totals."""

    context: RequestContext
    done: TurnDone
    settlement: Settlement


@dataclass(frozen=True, slots=True)
class ErrorSent:
    """An error with wire ``code`` was sent to a client (refusals included)."""

    code: str


RequestEvent = RequestStarted | TokensDelivered | RequestFinished | ErrorSent


class Observer:
    """Hears request events; this base ignores them all."""

    def notify(self, event: RequestEvent) -> None:
        """Called once per event, on the event loop."""


class FanOut(Observer):
    """Forwards every event to each observer in order."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self._observers = tuple(observers)

    def notify(self, event: RequestEvent) -> None:
        for observer in self._observers:
            observer.notify(event)
