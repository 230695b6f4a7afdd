"""A synthetic mesh backend FOR BENCHMARKS ONLY: no model, no Petals, no network, no threads.

:class:`SyntheticBackend` implements what the engine needs
(``model_ids``, ``open_session``) plus ``coverage`` for the status cache, and its sessions and
turns follow the :class:`~farmesh_ws.mesh.base.MeshSession` / ``MeshTurn`` protocols. A turn
yields ``max_new_tokens`` :class:`TokenEvent` values on a fixed schedule (token k is due at
turn start + k / ``tokens_per_s``, paced by event-loop timers exactly like ``asyncio.sleep``),
then one :class:`TurnDone` with plausible counters and one synthetic :class:`Contribution` per
fake peer. ``cancel()`` wakes the pending timer at once and ends the turn as ``cancelled``.

It exists so ``scripts/bench_ws.py`` can measure the gateway's own cost (sessions, frames,
sockets) without a model in the way. It is never a default: nothing in farmesh_ws imports it,
and it must not serve real clients. Sampling options and stop sequences are ignored.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from farmesh_ws.core.types import (
    ChatMessage,
    Contribution,
    FinishReason,
    RouteHop,
    SamplingParams,
    TokenEvent,
    TurnDone,
    TurnEvent,
)
from farmesh_ws.errors import ContextOverflow, InvalidRequest, ModelNotFound, SessionClosed
from farmesh_ws.mesh.base import Mark, RewindMethod, check_restore, lowered_length
from farmesh_ws.mesh.discovery import ModelCoverage, ServerSpan

SYNTHETIC_MODEL_ID = "synthetic/bench-only"
TEMPLATE_TOKENS_PER_MESSAGE = 4
"""Chat-template overhead added to each message's word count to make a prompt-token count."""
SYNTHETIC_TOKEN_ID = 1000


@dataclass(frozen=True, slots=True)
class SyntheticConfig:
    """How the fake mesh behaves. ``num_peers`` (1 or 2) fake servers split the blocks."""

    model_id: str = SYNTHETIC_MODEL_ID
    tokens_per_s: float = 20.0
    token_text: str = " tok"
    num_blocks: int = 30
    num_peers: int = 2
    max_session_length: int = 2048

    def __post_init__(self) -> None:
        if self.tokens_per_s <= 0:
            raise ValueError("tokens_per_s must be positive")
        if self.num_peers not in (1, 2) or self.num_blocks < self.num_peers:
            raise ValueError("num_peers must be 1 or 2, with at least one block each")

    def spans(self) -> list[tuple[str, int, int]]:
        """(peer_id, start_block, end_block) of each fake server."""
        bounds = [0, self.num_blocks // 2] if self.num_peers == 2 else [0]
        bounds.append(self.num_blocks)
        return [
            (f"synthetic-peer-{index}", bounds[index], bounds[index + 1])
            for index in range(self.num_peers)
        ]


class SyntheticBackend:
    """Opens :class:`SyntheticSession` objects; see the module docstring (benchmarks only)."""

    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = config or SyntheticConfig()
        self.spans = self.config.spans()
        self._sessions: set[SyntheticSession] = set()

    @property
    def model_ids(self) -> list[str]:
        return [self.config.model_id]

    async def open_session(self, model_id: str, *, max_length: int) -> "SyntheticSession":
        if model_id != self.config.model_id:
            raise ModelNotFound(f"model {model_id!r} is not served here")
        if not 1 <= max_length <= self.config.max_session_length:
            raise InvalidRequest(
                f"max_length must be between 1 and {self.config.max_session_length}"
            )
        session = SyntheticSession(self, max_length)
        self._sessions.add(session)
        return session

    async def coverage(self, model_id: str) -> ModelCoverage:
        """Every block served by the fake peers (for :class:`MeshStatusCache`)."""
        if model_id != self.config.model_id:
            raise ModelNotFound(f"model {model_id!r} is not served here")
        servers = tuple(
            ServerSpan(peer, f"synthetic-{peer[-1]}", start, end, "ONLINE", 100.0, None)
            for peer, start, end in self.spans
        )
        return ModelCoverage(model_id, self.config.num_blocks, servers, ())

    async def aclose(self) -> None:
        for session in list(self._sessions):
            await session.aclose()

    def _forget(self, session: "SyntheticSession") -> None:
        self._sessions.discard(session)


class SyntheticSession:
    """A chat session that only counts tokens; its "cache" is the ``position`` counter."""

    def __init__(self, backend: SyntheticBackend, max_length: int) -> None:
        self._backend = backend
        self._max_length = max_length
        self._position = 0
        self._closed = False
        self._turn: SyntheticTurn | None = None

    @property
    def model_id(self) -> str:
        return self._backend.config.model_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def limit_length(self, max_length: int) -> None:
        started = bool(self.position or self.pending_tokens)
        self._max_length = lowered_length(self._max_length, max_length, started=started)

    @property
    def position(self) -> int:
        return self._position

    @property
    def pending_tokens(self) -> int:
        return 0

    @property
    def transcript(self) -> list[int]:
        """None kept: every synthetic token has the same id, so no prompt could be checked
        against the history (such a session is never reused)."""
        return []

    def discard_pending(self) -> None:
        """No token is ever pending here."""

    def mark(self) -> Mark:
        return Mark(self._position, None)

    def restore(self, transcript: Sequence[int], pending: int | None) -> None:
        """Position only: a synthetic session keeps no transcript to replay."""
        check_restore(self._position > 0, transcript, self._max_length)
        self._position = len(transcript) + (pending is not None)

    async def rewind(self, mark: Mark) -> RewindMethod:
        if mark.position > self._position:
            raise ValueError(f"cannot rewind to {mark.position} from {self._position}")
        self._position = mark.position
        return "replay"

    def encode_turn(self, messages: Sequence[ChatMessage]) -> list[int]:
        """One id per word, plus the template's tokens per message."""
        count = sum(len(m.content.split()) + TEMPLATE_TOKENS_PER_MESSAGE for m in messages)
        return [SYNTHETIC_TOKEN_ID] * count

    def encode(self, text: str) -> list[int]:
        return [SYNTHETIC_TOKEN_ID] * len(text.split())

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._backend.config.token_text * len(token_ids)

    def run_tokens(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        replace_last_token: int | None = None,
    ) -> "SyntheticTurn":
        if self._closed:
            raise SessionClosed("the session is closed")
        self._turn = SyntheticTurn(self, max(len(token_ids), 1), sampling.max_new_tokens)
        return self._turn

    async def aclose(self) -> None:
        self._closed = True
        if self._turn is not None:
            self._turn.cancel()
        self._backend._forget(self)


class SyntheticTurn:
    """A running synthetic turn. Async-iterate for events; ``cancel()`` ends it at once."""

    def __init__(self, session: SyntheticSession, prompt_tokens: int, max_new_tokens: int) -> None:
        self._session = session
        self._config = session._backend.config
        self._prompt_tokens = prompt_tokens
        self._max_new_tokens = max_new_tokens
        self._cancelled = False
        self._waiter: asyncio.Future[None] | None = None

    def cancel(self) -> None:
        self._cancelled = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def __aiter__(self) -> AsyncIterator[TurnEvent]:
        session, config = self._session, self._config
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        start_at = loop.time()
        cached = session.position
        room = session.max_length - cached - self._prompt_tokens
        if room < 1:
            error = ContextOverflow(f"the turn does not fit: {max(room, 0)} tokens are left")
            yield self._done("error", 0, cached, started, None, error)
            return
        limit = min(self._max_new_tokens, room)
        generated, first_token_s = 0, None
        while generated < limit and not self._cancelled:
            await self._sleep_until(loop, start_at + (generated + 1) / config.tokens_per_s)
            if self._cancelled:
                break
            generated += 1
            if first_token_s is None:
                first_token_s = time.perf_counter() - started
            yield TokenEvent(config.token_text, 1000 + generated, generated, self._prompt_tokens)
        session._position = cached + self._prompt_tokens + generated
        finish: FinishReason = "cancelled" if self._cancelled else "length"
        yield self._done(finish, generated, cached, started, first_token_s, None)

    async def _sleep_until(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """``asyncio.sleep`` until ``when`` (loop time), but ``cancel()`` can wake it early."""
        waiter: asyncio.Future[None] = loop.create_future()
        handle = loop.call_at(when, _wake, waiter)
        self._waiter = waiter
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None

    def _done(
        self,
        finish: FinishReason,
        generated: int,
        cached: int,
        started: float,
        first_token_s: float | None,
        error: ContextOverflow | None,
    ) -> TurnDone:
        tokens = self._prompt_tokens + generated if error is None else 0
        spans = self._session._backend.spans
        routes: tuple[tuple[RouteHop, ...], ...] = ()
        if tokens:  # one route per step: the prefill, then one token each (one shared tuple)
            step = tuple(RouteHop(peer, start, end, 1) for peer, start, end in spans)
            prefill = tuple(
                RouteHop(peer, start, end, self._prompt_tokens) for peer, start, end in spans
            )
            routes = (prefill, *([step] * generated))
        return TurnDone(
            finish_reason=finish,
            text=self._config.token_text * generated,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=generated,
            cached_tokens=cached,
            position=self._session.position,
            max_length=self._session.max_length,
            contributions=tuple(
                Contribution(peer, f"synthetic-{peer[-1]}", start, end, tokens, 0)
                for peer, start, end in spans
            )
            if tokens
            else (),
            routes=routes,
            time_to_first_token_s=first_token_s,
            duration_s=time.perf_counter() - started,
            error=error,
        )


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
