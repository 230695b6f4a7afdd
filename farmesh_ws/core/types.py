"""The values that flow through a request, shared by the engine, the mesh and the adapters.

Pure data: no I/O, and importable without torch, transformers or sockets. A mesh session
yields :class:`TokenEvent` values, then exactly one :class:`TurnDone`.
"""

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

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
    ``payout_wallet`` is the EIP-55 wallet the server proved with its identity key
    (:mod:`farmesh_ws.payout`), None when it proved none: then it is paid to its peer id.
    """

    peer_id: str
    public_name: str | None
    start_block: int
    end_block: int
    tokens: int
    replayed_tokens: int
    payout_wallet: str | None = None

    @property
    def payout_bound(self) -> bool:
        """True when the share goes to a proven ``payout_wallet``."""
        return self.payout_wallet is not None

    @property
    def blocks(self) -> int:
        return self.end_block - self.start_block

    def plus(self, earlier: "Contribution") -> "Contribution":
        """This contribution with ``earlier``'s tokens added: the same server and span over two
        steps of one request; the latest step's name and payout wallet win."""
        return replace(
            self,
            tokens=self.tokens + earlier.tokens,
            replayed_tokens=self.replayed_tokens + earlier.replayed_tokens,
        )

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


@dataclass(frozen=True, slots=True)
class SamplingOverrides:
    """Sampling values a request or a session sets; ``None`` means "not set here".

    :meth:`over` layers a request's values over a session's; :meth:`resolve` fills what no
    layer set with :class:`SamplingParams`' defaults (greedy) and ``default_max_new_tokens``.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] | None = None

    def over(self, base: "SamplingOverrides") -> "SamplingOverrides":
        """These values where set, else ``base``'s."""
        return replace(base, **self._given())

    def resolve(self, *, default_max_new_tokens: int) -> SamplingParams:
        return replace(SamplingParams(max_new_tokens=default_max_new_tokens), **self._given())

    def _given(self) -> dict[str, Any]:
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        return {name: value for name, value in values.items() if value is not None}
