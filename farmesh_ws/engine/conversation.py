"""A client and its conversation, as the engine keeps them between requests.

A :class:`Client` is whoever sends requests over one connection (rules per connection: one
request at a time, ``request_id`` unique). A :class:`Conversation` is one chat session: a
persistent mesh session plus what its requests need (system prompt, sampling defaults,
budget, spend). It belongs to the :class:`~farmesh_ws.engine.sessions.SessionManager`, not to
the socket; a request's output goes to the sink it was launched with, not to the conversation.
"""

from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from farmesh_ws.core.principal import Principal
from farmesh_ws.core.types import ChatMessage, SamplingOverrides
from farmesh_ws.engine.quotas import Reservation
from farmesh_ws.mesh.base import Mark, MeshSession

if TYPE_CHECKING:
    from farmesh_ws.engine.request import ActiveRequest


@dataclass(slots=True)
class Client:
    """One connection's requester: ``principal`` is who it proved to be (its caps and rate
    limit, the wallet it may bill); ``client_key`` names the connection in logs."""

    client_key: str
    principal: Principal
    running: "ActiveRequest | None" = None
    request_ids: set[str] = field(default_factory=set)

    @property
    def busy(self) -> bool:
        return self.running is not None


@dataclass(frozen=True, slots=True)
class TurnMark:
    """Where a turn began in its session (``mark``) and the token ids it sent."""

    mark: Mark
    token_ids: tuple[int, ...]


@dataclass(slots=True)
class Conversation:
    """One chat session over one mesh session. ``kind``: ``chat`` (protocol v1) or
    ``petals_v2``; ``wallet``: the wallet it bills; ``principal``: who opened it;
    ``reservation``: its ``max_length`` held against the principal's and the mesh's caps;
    ``budget_far``: the session's ``max_cost_far`` (None: no limit); ``history``: its chat
    turns that reached the mesh, oldest first (for ``rewind`` and ``regenerate``)."""

    session_id: str
    kind: str
    wallet: str | None
    principal: Principal
    model_id: str
    mesh: MeshSession
    reservation: Reservation
    system_prompt: str | None = None
    sampling: SamplingOverrides = field(default_factory=SamplingOverrides)
    budget_far: Decimal | None = None
    spent_far: Decimal = Decimal(0)
    closed: bool = False
    history: list[TurnMark] = field(default_factory=list)

    @property
    def budget_left_far(self) -> Decimal | None:
        return None if self.budget_far is None else self.budget_far - self.spent_far

    def turn_messages(self, text: str) -> list[ChatMessage]:
        """A user turn; the custom system prompt goes with the first turn that reaches the
        mesh (a refused or cancelled-before-start turn does not use it up)."""
        messages = [ChatMessage(role="user", content=text)]
        fresh = self.mesh.position == 0 and self.mesh.pending_tokens == 0
        if fresh and self.system_prompt is not None:
            messages.insert(0, ChatMessage(role="system", content=self.system_prompt))
        return messages
