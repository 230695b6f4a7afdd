"""The mesh backend interface and the events a turn produces.

A backend opens chat sessions on a model; a session runs turns given only the new turn's
messages and yields :class:`TokenEvent` values, then exactly one :class:`TurnDone`. The
session layer above knows nothing of Petals; a test double can implement the same protocol.
"""

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from farmesh_ws.errors import FarmeshError

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each token. ``temperature == 0`` means greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token: its text delta (possibly empty while a UTF-8 character or a
    possible stop sequence is incomplete), its id, and the count so far in this turn."""

    text: str
    token_id: int
    tokens_generated: int
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Contribution:
    """The work one server did for a turn over one span of blocks.

    ``tokens`` counts every token the server processed for this turn, prefill and failover
    replay included (``replayed_tokens`` of them were replay); ``work`` is tokens × blocks.
    """

    peer_id: str
    public_name: str | None
    start_block: int
    end_block: int
    tokens: int
    replayed_tokens: int

    @property
    def blocks(self) -> int:
        return self.end_block - self.start_block

    @property
    def work(self) -> int:
        return self.tokens * self.blocks


@dataclass(frozen=True, slots=True)
class RouteHop:
    """One server on the route of one step."""

    peer_id: str
    start_block: int
    end_block: int
    tokens: int


@dataclass(frozen=True, slots=True)
class TurnDone:
    """The end of a turn. ``prompt_tokens`` counts only this turn's new tokens;
    ``cached_tokens`` the history the mesh already held and did not receive again."""

    finish_reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    position: int
    max_length: int
    contributions: tuple[Contribution, ...]
    routes: tuple[tuple[RouteHop, ...], ...] = field(repr=False)
    time_to_first_token_s: float | None
    duration_s: float
    error: FarmeshError | None = None


TurnEvent = TokenEvent | TurnDone


class MeshTurn(Protocol):
    """A running turn: iterate for events; ``cancel`` stops it after the current step."""

    def __aiter__(self) -> AsyncIterator[TurnEvent]: ...

    def cancel(self) -> None: ...


class MeshSession(Protocol):
    """One chat session over the mesh, holding remote attention caches between turns."""

    @property
    def model_id(self) -> str: ...

    @property
    def max_length(self) -> int: ...

    @property
    def position(self) -> int: ...

    def run_turn(self, messages: Sequence[ChatMessage], sampling: SamplingParams) -> MeshTurn: ...

    async def aclose(self) -> None: ...


class MeshBackend(Protocol):
    """Opens sessions on the mesh for the models it serves."""

    @property
    def model_ids(self) -> list[str]: ...

    async def open_session(self, model_id: str, *, max_length: int) -> MeshSession: ...

    async def aclose(self) -> None: ...
