"""The mesh backend interface: what the engine needs of a mesh (Petals, or a test double).

A backend opens sessions on a model. A session holds the remote attention caches of one
conversation and runs turns of *token ids*: :meth:`MeshSession.encode_turn` renders chat
messages with the model's chat template (the raw-token capability chat.petals.dev's v2 API
needs is :meth:`MeshSession.encode` / :meth:`MeshSession.decode` with
:meth:`MeshSession.run_tokens`, on every session). Encoding before running lets the engine
check context room and budget before anything reaches the mesh. A turn yields
:class:`~farmesh_ws.core.types.TokenEvent` values, then exactly one
:class:`~farmesh_ws.core.types.TurnDone`. Implementations: :mod:`.petals` (real),
:mod:`.fake` (scripted, for tests), :mod:`.synthetic` (paced, for benchmarks).
"""

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from farmesh_ws.core.types import ChatMessage, SamplingParams, TurnEvent

RewindMethod = Literal["rollback", "replay"]
"""How a session went back: the servers rolled their caches back, or a new remote session was
opened and the kept history replayed into it (Petals 2.2 servers cannot roll back)."""


@dataclass(frozen=True, slots=True)
class Mark:
    """A point in a session's history: ``position`` tokens held and the ``pending`` token."""

    position: int
    pending: int | None


class MeshTurn(Protocol):
    """A running turn: iterate for events; ``cancel`` stops it after the current step."""

    def __aiter__(self) -> AsyncIterator[TurnEvent]: ...

    def cancel(self) -> None: ...


class MeshSession(Protocol):
    """One conversation over the mesh, holding remote attention caches between turns.

    - ``position``: tokens the mesh holds for this session; ``pending_tokens`` (0 or 1): a
      generated token not yet sent to the mesh, which the next turn sends first. A turn of
      ``n`` new tokens fits when ``position + pending_tokens + n <= max_length``.
    - ``transcript``: the ``position`` token ids the mesh holds, in order (a prompt that
      starts with them continues this session: :mod:`farmesh_ws.engine.reuse`), or empty
      when the session does not keep them;
      ``discard_pending()`` forgets the pending token, which then is never sent.
    - ``restore(transcript, pending)``: start from another session's history (below).
    - ``mark()`` / ``rewind(mark)``: go back to an earlier point of the history (between turns):
      what the mesh holds after it is forgotten, and its pending token restored. Returns the
      :data:`RewindMethod`; raises ValueError for a mark beyond the current position.
    - ``encode_turn(messages)``: the chat template over ``messages`` only (the first turn if
      the session holds nothing yet, else a continuation after the previous reply); message
      content is tokenized literally, so user text never becomes a control token.
    - ``encode(text)`` / ``decode(ids)``: the tokenizer as-is (special-token text parsed;
      special tokens kept, an incomplete UTF-8 character decodes to U+FFFD).
    - ``run_tokens(ids, sampling, replace_last_token=...)``: feed the pending token, if any,
      then ``ids``, and generate until end of sequence (``stop``), ``max_new_tokens`` or a
      full session (``length``); ``replace_last_token`` first swaps the pending token.
      Raises :class:`~farmesh_ws.errors.SessionClosed` on a closed session.
    """

    @property
    def model_id(self) -> str: ...

    @property
    def max_length(self) -> int: ...

    @property
    def position(self) -> int: ...

    @property
    def pending_tokens(self) -> int: ...

    @property
    def transcript(self) -> Sequence[int]: ...

    def discard_pending(self) -> None: ...

    def mark(self) -> Mark: ...

    async def rewind(self, mark: Mark) -> RewindMethod: ...

    def restore(self, transcript: Sequence[int], pending: int | None) -> None:
        """Take over another session's history (a session moved from another gateway,
        protocol.md §2.3) before the first step: the first step opens the remote session and
        replays ``transcript``, credited to the servers that run it and not billed to the
        user, then sends ``pending``. Raises RuntimeError once this session has started and
        ValueError when ``transcript`` does not fit ``max_length``."""
        ...

    def limit_length(self, max_length: int) -> None:
        """Lower ``max_length`` before the first step: servers allocate the attention cache
        for ``max_length`` tokens when the first step arrives, so a one-shot request that knows
        its prompt reserves only what it needs. Raises RuntimeError after the first step and
        ValueError for a length above the current one or below 1."""
        ...

    def encode_turn(self, messages: Sequence[ChatMessage]) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def run_tokens(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        replace_last_token: int | None = None,
    ) -> MeshTurn: ...

    async def aclose(self) -> None: ...


class MeshBackend(Protocol):
    """Opens sessions on the mesh for the models it serves.

    ``open_session`` raises :class:`~farmesh_ws.errors.ModelNotFound` for a model it does not
    serve and :class:`~farmesh_ws.errors.InvalidRequest` for a ``max_length`` out of range.
    """

    @property
    def model_ids(self) -> list[str]: ...

    async def open_session(self, model_id: str, *, max_length: int) -> MeshSession: ...

    async def aclose(self) -> None: ...


def check_restore(started: bool, transcript: Sequence[int], max_length: int) -> None:
    """:meth:`MeshSession.restore`'s preconditions; raises RuntimeError or ValueError."""
    if started:
        raise RuntimeError("restore() is only allowed before the session's first step")
    if len(transcript) >= max_length:
        raise ValueError(f"{len(transcript)} tokens do not fit max_length {max_length}")


def lowered_length(current: int, requested: int, *, started: bool) -> int:
    """The rule of :meth:`MeshSession.limit_length` for every backend: ``requested`` if a
    session of ``current`` tokens that has not ``started`` may lower to it. Raises
    RuntimeError once started, ValueError outside 1..``current``."""
    if started:
        raise RuntimeError("max_length can only be lowered before the first step")
    if not 1 <= requested <= current:
        raise ValueError(f"max_length must be between 1 and {current}")
    return requested
