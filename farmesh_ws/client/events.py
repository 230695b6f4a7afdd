"""The values the client hands its caller: a request's events, a whole reply, a chat's info.

Frozen dataclasses with money as ``Decimal``; :mod:`farmesh_ws.client.wire` builds them from
server frames.
"""

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "error", "budget"]


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token (protocol.md §4.2). ``text`` may be ``""`` while a character or a
    possible stop sequence is incomplete; ``cost_far`` is the request's running cost."""

    request_id: str
    text: str
    tokens_generated: int
    cost_far: Decimal


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts and cost of one request (protocol.md §4.3)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_far: Decimal


@dataclass(frozen=True, slots=True)
class DoneEvent:
    """The end of a request (protocol.md §4.3)."""

    request_id: str
    finish_reason: FinishReason
    usage: Usage
    position: int
    max_length: int
    duration_ms: float
    time_to_first_token_ms: float | None = None
    error: str | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """Generated tokens over the request's whole duration; None if nothing was timed."""
        if self.duration_ms <= 0 or self.usage.completion_tokens == 0:
            return None
        return self.usage.completion_tokens / (self.duration_ms / 1000)

    @property
    def room(self) -> int:
        """Tokens left in the session (its ``max_length`` minus what the mesh holds)."""
        return self.max_length - self.position


@dataclass(frozen=True, slots=True)
class NodeShare:
    """One server and block span that computed part of a request, and its share of the cost;
    ``payout_wallet`` the wallet the server proved (``payout_bound``), else None."""

    peer_id: str
    name: str | None
    start_block: int
    end_block: int
    tokens: int
    replayed_tokens: int
    work: int
    share_far: Decimal
    payout_wallet: str | None = None
    payout_bound: bool = False


@dataclass(frozen=True, slots=True)
class ContributionEvent:
    """Who computed a request (protocol.md §4.4); the shares sum exactly to ``cost_far``."""

    request_id: str
    cost_far: Decimal
    nodes: tuple[NodeShare, ...]


Event = TokenEvent | DoneEvent | ContributionEvent


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole reply: its text (stop sequences and the end-of-turn token excluded), its
    ``done`` and its ``contribution``."""

    request_id: str
    text: str
    done: DoneEvent
    contribution: ContributionEvent

    @property
    def usage(self) -> Usage:
        return self.done.usage

    @property
    def cost_far(self) -> Decimal:
        return self.done.usage.cost_far


@dataclass(frozen=True, slots=True)
class ChatInfo:
    """What ``opened`` said about the chat session (protocol.md §4.1)."""

    session_id: str
    model: str
    max_length: int
    price_per_token_far: Decimal
    price_per_prompt_token_far: Decimal
    protocol_version: int


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the gateway says this connection is (``authenticated``, protocol.md §2.1):
    ``principal`` (``key:fk_…``, ``wallet:0x…``), the ``wallet`` it bills. After a Sign-In
    with Ethereum, ``token`` is the session token that authenticates later connections
    until ``expires_at`` (Unix seconds); keep it as secret as a key."""

    principal: str
    wallet: str | None
    token: str | None = field(default=None, repr=False)  # never printed
    expires_at: float | None = None
