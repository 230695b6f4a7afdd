"""A scripted mesh for tests: the role httpx's ``MockTransport`` plays. Public; never a default.

No model, no threads, no sockets: a turn runs on the event loop and replies with a scripted
text. Tokens are characters (id = code point); the ChatML markers ``<|im_start|>`` (id 1) and
``<|im_end|>`` (id 2, end of sequence) are the only special tokens. :meth:`FakeSession.encode`
matches them in raw text like a real tokenizer; :meth:`FakeSession.encode_turn` renders a
ChatML template whose content is literal. Controls for tests:

- ``reply``: the text every turn generates (then end of sequence), or a function of the
  turn's decoded prompt;
- ``gate``: when set, every generated token first acquires it (release it to let tokens
  through: deterministic pacing without sleeps); ``cancel()`` wakes a turn waiting on it;
- ``open_gate`` / ``close_gate``: when set, opening / closing a session waits for the event
  (a slow mesh at those moments); ``open_started`` is set when an open begins;
- ``fail_after``: end every turn with ``error`` once it has generated that many tokens.

Each session counts what reached the "mesh" (``tokens_sent``), so tests can prove that a
refused request sent nothing.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from farmesh_ws.core.types import (
    ChatMessage,
    Contribution,
    FinishReason,
    SamplingParams,
    TokenEvent,
    TurnDone,
    TurnEvent,
)
from farmesh_ws.errors import (
    ContextOverflow,
    FarmeshError,
    InvalidRequest,
    MeshError,
    ModelNotFound,
    SessionClosed,
)
from farmesh_ws.mesh.base import Mark, RewindMethod, check_restore, lowered_length
from farmesh_ws.mesh.discovery import ModelCoverage, ServerSpan
from farmesh_ws.mesh.text_stream import StopMatcher

FAKE_MODEL_ID: Final = "fake-model"
IM_START: Final = 1
IM_END: Final = 2
SPECIAL_TOKENS: Final = {"<|im_start|>": IM_START, "<|im_end|>": IM_END}
DEFAULT_SYSTEM_PROMPT: Final = "You are a scripted test assistant."


@dataclass(slots=True)
class FakeBackend:
    """Opens :class:`FakeSession` objects on ``model_ids``; see the module docstring."""

    reply: str | Callable[[str], str] = "Hello from the fake mesh."
    model_ids: list[str] = field(default_factory=lambda: [FAKE_MODEL_ID])
    spans: tuple[tuple[str, int, int], ...] = (("fake-peer-a", 0, 15), ("fake-peer-b", 15, 30))
    max_session_length: int = 2048
    gate: asyncio.Semaphore | None = None
    open_gate: asyncio.Event | None = None
    close_gate: asyncio.Event | None = None
    open_started: asyncio.Event = field(default_factory=asyncio.Event)
    fail_after: int | None = None
    cache_tokens: int | None = None
    """Attention cache of each scripted server, in tokens of sessions; None: not reported.
    As on Petals, a session takes its ``max_length`` when its first step runs, and a server
    announces what is left in Petals' unit (2 per token per block it holds)."""
    sessions: list["FakeSession"] = field(default_factory=list)
    announced_elsewhere: tuple[str, ...] = ()
    """DHT prefixes of models the scripted DHT announces but this backend does not serve."""

    async def open_session(self, model_id: str, *, max_length: int) -> "FakeSession":
        self.open_started.set()
        if self.open_gate is not None:
            await self.open_gate.wait()
        if model_id not in self.model_ids:
            raise ModelNotFound(f"model {model_id!r} is not served here")
        if not 1 <= max_length <= self.max_session_length:
            raise InvalidRequest(f"max_length must be between 1 and {self.max_session_length}")
        session = FakeSession(self, model_id, max_length)
        self.sessions.append(session)
        return session

    async def coverage(self, model_id: str) -> ModelCoverage:
        """Every block served by the scripted peers (for the status cache)."""
        free = None
        if self.cache_tokens is not None:
            used = sum(s.max_length for s in self.sessions if s.position and not s.closed)
            free = self.cache_tokens - used
        servers = tuple(
            ServerSpan(
                peer,
                peer,
                start,
                end,
                "ONLINE",
                1.0,
                None if free is None else free * 2 * (end - start),
            )
            for peer, start, end in self.spans
        )
        return ModelCoverage(model_id, max(end for _, _, end in self.spans), servers, ())

    async def discover(self, skip: frozenset[str] = frozenset()) -> list[ModelCoverage]:
        """Every model the scripted DHT announces but those in ``skip``: the served ones
        (prefix = model id), then ``announced_elsewhere``."""
        prefixes = [*self.model_ids, *self.announced_elsewhere]
        return [await self.coverage(prefix) for prefix in prefixes if prefix not in skip]

    async def aclose(self) -> None:
        for session in self.sessions:
            await session.aclose()

    def reply_for(self, prompt: str) -> str:
        return self.reply if isinstance(self.reply, str) else self.reply(prompt)


class FakeSession:
    """A conversation whose "attention cache" is the list of token ids sent."""

    def __init__(self, backend: FakeBackend, model_id: str, max_length: int) -> None:
        self._backend = backend
        self._model_id = model_id
        self._max_length = max_length
        self.sent: list[int] = []
        self.pending: int | None = None
        self.closed = False
        self.restored = 0
        """Tokens taken over from another session by :meth:`restore`."""

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def limit_length(self, max_length: int) -> None:
        started = bool(self.position or self.pending_tokens)
        self._max_length = lowered_length(self._max_length, max_length, started=started)

    @property
    def position(self) -> int:
        return len(self.sent)

    @property
    def pending_tokens(self) -> int:
        return 0 if self.pending is None else 1

    @property
    def transcript(self) -> list[int]:
        return list(self.sent)

    def discard_pending(self) -> None:
        self.pending = None

    def mark(self) -> Mark:
        return Mark(len(self.sent), self.pending)

    def restore(self, transcript: Sequence[int], pending: int | None) -> None:
        """Held as if sent: the scripted mesh keeps no caches to replay into."""
        check_restore(bool(self.sent) or self.pending is not None, transcript, self._max_length)
        self.sent, self.pending = list(transcript), pending
        self.restored = len(transcript)

    async def rewind(self, mark: Mark) -> RewindMethod:
        if mark.position > self.position:
            raise ValueError(f"cannot rewind to {mark.position} from {self.position}")
        self.sent, self.pending = self.sent[: mark.position], mark.pending
        return "replay"

    @property
    def tokens_sent(self) -> int:
        """Tokens that reached the scripted mesh so far."""
        return len(self.sent)

    def encode_turn(self, messages: Sequence[ChatMessage]) -> list[int]:
        ids: list[int] = []
        if self.position == 0 and self.pending is None:
            if not any(message.role == "system" for message in messages):
                ids += _block("system", DEFAULT_SYSTEM_PROMPT)
        elif self.pending != IM_END:
            ids += [IM_END, *_literal("\n")]
        else:
            ids += _literal("\n")
        for message in messages:
            ids += _block(message.role, message.content)
        return [*ids, IM_START, *_literal("assistant\n")]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        index = 0
        while index < len(text):
            special = next((s for s in SPECIAL_TOKENS if text.startswith(s, index)), None)
            if special is not None:
                ids.append(SPECIAL_TOKENS[special])
                index += len(special)
            else:
                ids.append(ord(text[index]))
                index += 1
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        names = {value: key for key, value in SPECIAL_TOKENS.items()}
        return "".join(names.get(token, chr(token)) for token in token_ids)

    def run_tokens(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        replace_last_token: int | None = None,
    ) -> "FakeTurn":
        if self.closed:
            raise SessionClosed("the session is closed")
        if replace_last_token is not None and self.pending is not None:
            self.pending = replace_last_token
        return FakeTurn(self, list(token_ids), sampling)

    async def aclose(self) -> None:
        if self._backend.close_gate is not None:
            await self._backend.close_gate.wait()
        self.closed = True


class FakeTurn:
    """A running scripted turn; ``cancel()`` stops it before its next token."""

    def __init__(self, session: FakeSession, new_ids: list[int], sampling: SamplingParams) -> None:
        self._session = session
        self._new_ids = new_ids
        self._sampling = sampling
        self._cancelled = False
        self._cancel_event = asyncio.Event()

    def cancel(self) -> None:
        self._cancelled = True
        self._cancel_event.set()

    async def __aiter__(self) -> AsyncIterator[TurnEvent]:
        session, backend = self._session, self._session._backend
        started = time.perf_counter()
        cached = session.position
        pending = [] if session.pending is None else [session.pending]
        inputs = pending + self._new_ids
        reply = backend.reply_for(session.decode(self._new_ids))
        script = [ord(char) for char in reply] + [IM_END]
        stops = StopMatcher(self._sampling.stop)
        generated, processed, text = 0, 0, ""
        finish: FinishReason = "cancelled"
        error: FarmeshError | None = None
        first_token_s: float | None = None
        if session.position + len(inputs) > session.max_length:  # as Petals refuses it
            finish = "error"
            error = ContextOverflow.session_full(
                position=session.position, needed=len(inputs), max_length=session.max_length
            )
        while error is None and not self._cancelled:
            if backend.gate is not None:
                await self._pass_gate(backend.gate)
            else:
                await asyncio.sleep(0)  # a step is never instant: let the loop run between
            if self._cancelled:
                break
            if backend.fail_after is not None and generated >= backend.fail_after:
                finish, error = "error", MeshError("scripted mesh failure")
                break
            session.sent += inputs
            processed += len(inputs)
            token = script[min(generated, len(script) - 1)]
            generated += 1
            session.pending = token
            first_token_s = first_token_s or time.perf_counter() - started
            is_eos = token == IM_END
            ends = is_eos or generated >= self._sampling.max_new_tokens
            ends = ends or session.position + 1 > session.max_length
            safe = stops.feed("" if is_eos else chr(token))
            if ends:
                safe += stops.flush()
            text += safe
            yield TokenEvent(safe, token, generated, len(self._new_ids))
            if is_eos or stops.stopped:
                finish = "stop"
                break
            if ends:
                finish = "length"
                break
            inputs = [token]
        yield TurnDone(
            finish_reason=finish,
            text=text,
            prompt_tokens=len(self._new_ids) if processed else 0,
            completion_tokens=generated,
            cached_tokens=cached,
            position=session.position,
            max_length=session.max_length,
            contributions=tuple(
                Contribution(peer, peer, start, end, processed, 0)
                for peer, start, end in backend.spans
            )
            if processed
            else (),
            routes=(),
            time_to_first_token_s=first_token_s,
            duration_s=time.perf_counter() - started,
            error=error,
        )

    async def _pass_gate(self, gate: asyncio.Semaphore) -> None:
        """Acquire ``gate``, or return as soon as the turn is cancelled."""
        acquire = asyncio.ensure_future(gate.acquire())
        cancelled = asyncio.ensure_future(self._cancel_event.wait())
        await asyncio.wait((acquire, cancelled), return_when=asyncio.FIRST_COMPLETED)
        cancelled.cancel()
        if not acquire.done():
            acquire.cancel()
        elif self._cancelled:
            gate.release()  # not used: give it back


def _literal(text: str) -> list[int]:
    return [ord(char) for char in text]


def _block(role: str, content: str) -> list[int]:
    return [IM_START, *_literal(f"{role}\n{content}"), IM_END, *_literal("\n")]
