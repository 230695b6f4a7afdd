"""The real mesh backend: one persistent Petals inference session per chat session.

Petals is blocking (its client waits on a background event loop and sleeps in retry loops),
so a whole turn runs in one worker thread from a bounded pool, stepping the remote session
token by token and handing events to asyncio with ``call_soon_threadsafe``. Only the new
turn's tokens go through the servers; their attention caches hold the history. The session
keeps the token transcript, so if the remote session breaks (dead server, expired cache) the
next turn opens a fresh one and replays the transcript. Every Petals/hivemind/torch failure is
translated to our errors in :func:`translate_error`, the one boundary.
"""

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farmesh_ws.core.types import (
    ChatMessage,
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
    MeshTimeout,
    MeshUnavailable,
    ModelNotFound,
    SessionClosed,
)
from farmesh_ws.logcontext import run_in_context
from farmesh_ws.mesh import compat
from farmesh_ws.mesh.attribution import StepRecorder
from farmesh_ws.mesh.chat_turns import ChatTurns
from farmesh_ws.mesh.discovery import ModelCoverage, discover, model_coverage
from farmesh_ws.mesh.sampling import make_generator, next_token
from farmesh_ws.mesh.text_stream import IncrementalDecoder, StopMatcher

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model the gateway can serve: its id, a local folder with its config, tokenizer and
    non-block weights (embeddings, norm, head), and the DHT prefix its servers announce."""

    model_id: str
    path: Path
    dht_prefix: str


@dataclass(frozen=True, slots=True)
class PetalsBackendConfig:
    initial_peers: tuple[str, ...]
    models: tuple[ModelSpec, ...]
    max_concurrent_turns: int = 8
    max_session_length: int = 2048
    max_retries: int = 2
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    update_period_s: float = 10.0
    ban_timeout_s: float = 15.0


def translate_error(exc: BaseException) -> FarmeshError:
    """Map a Petals/hivemind/torch exception to a typed farmesh error (the one boundary)."""
    if isinstance(exc, FarmeshError):
        return exc
    from petals.client.routing.sequence_manager import MissingBlocksError

    if isinstance(exc, MissingBlocksError):
        return MeshUnavailable("no server in the mesh currently serves part of this model")
    if isinstance(exc, TimeoutError | concurrent.futures.TimeoutError):
        return MeshTimeout("the mesh did not answer in time")
    if isinstance(exc, ValueError) and "Maximum length exceeded" in str(exc):
        return ContextOverflow("the session's max_length is reached")
    if _is_p2p_failure(exc):
        return MeshUnavailable("a mesh server failed and no replacement answered")
    return MeshError("the mesh failed to run this step", retryable=True)


def _is_p2p_failure(exc: BaseException) -> bool:
    from hivemind.p2p import P2PDaemonError, P2PHandlerError
    from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure

    return isinstance(exc, ControlFailure | P2PHandlerError | P2PDaemonError | ConnectionError)


class _LoadedModel:
    """A model's client half: tokenizer, embeddings, final norm, LM head, sequence manager."""

    def __init__(self, spec: ModelSpec, config: PetalsBackendConfig) -> None:
        import torch
        from petals import AutoDistributedModelForCausalLM
        from transformers import AutoTokenizer

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(str(spec.path))
        self.model = AutoDistributedModelForCausalLM.from_pretrained(
            str(spec.path),
            initial_peers=list(config.initial_peers),
            dht_prefix=spec.dht_prefix,
            torch_dtype=torch.float32,
            max_retries=config.max_retries,
            connect_timeout=config.connect_timeout_s,
            request_timeout=config.request_timeout_s,
            update_period=config.update_period_s,
            ban_timeout=config.ban_timeout_s,
            show_route=False,
        )
        self.model.eval()
        self.turns = ChatTurns(self.tokenizer)
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self.num_blocks = int(self.model.config.num_hidden_layers)

    @property
    def sequence_manager(self) -> Any:
        return self.model.model.layers.sequence_manager

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def close(self) -> None:
        """Stop the routing thread, the replicated p2p client and the client DHT process."""
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

        manager = self.sequence_manager
        manager.shutdown()
        RemoteExpertWorker.run_coroutine(manager.state.p2p.shutdown())
        manager.dht.shutdown()


class PetalsBackend:
    """Opens chat sessions over a Petals swarm. Create with :meth:`start`."""

    def __init__(self, config: PetalsBackendConfig) -> None:
        self.config = config
        self._models: dict[str, _LoadedModel] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.max_concurrent_turns, thread_name_prefix="farmesh-mesh"
        )
        self._sessions: set[PetalsChatSession] = set()

    @classmethod
    async def start(cls, config: PetalsBackendConfig) -> "PetalsBackend":
        """Load every model's client half (blocking work, in a thread)."""
        compat.apply()
        from farmesh_ws.mesh import attribution

        attribution.install()
        backend = cls(config)
        try:
            for spec in config.models:
                backend._models[spec.model_id] = await asyncio.to_thread(_LoadedModel, spec, config)
        except BaseException:
            await backend.aclose()
            raise
        return backend

    @property
    def model_ids(self) -> list[str]:
        return list(self._models)

    def num_blocks(self, model_id: str) -> int:
        return self._model(model_id).num_blocks

    async def open_session(self, model_id: str, *, max_length: int) -> "PetalsChatSession":
        if not 1 <= max_length <= self.config.max_session_length:
            raise InvalidRequest(
                f"max_length must be between 1 and {self.config.max_session_length}"
            )
        session = PetalsChatSession(self, self._model(model_id), max_length)
        self._sessions.add(session)
        return session

    async def coverage(self, model_id: str) -> ModelCoverage:
        """Which servers cover which blocks of one model, straight from the DHT."""
        loaded = self._model(model_id)
        dht = loaded.sequence_manager.dht
        return await asyncio.to_thread(
            model_coverage, dht, loaded.spec.dht_prefix, loaded.num_blocks
        )

    async def refresh_routes(self, model_id: str) -> None:
        """Reload one model's routing table from the DHT now, instead of at the next periodic
        update (``update_period_s``), so that servers that just joined can be chosen."""
        manager = self._model(model_id).sequence_manager
        await asyncio.to_thread(manager.update, wait=True)

    async def discover(self) -> list[ModelCoverage]:
        """Every model the DHT announces, with coverage (not only the ones served here)."""
        if not self._models:
            return []
        dht = next(iter(self._models.values())).sequence_manager.dht
        return await asyncio.to_thread(discover, dht)

    async def aclose(self) -> None:
        for session in list(self._sessions):
            await session.aclose()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        for loaded in self._models.values():
            await asyncio.to_thread(loaded.close)
        self._models.clear()

    def _model(self, model_id: str) -> _LoadedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise ModelNotFound(f"model {model_id!r} is not served here") from None

    def _forget(self, session: "PetalsChatSession") -> None:
        self._sessions.discard(session)

    def _submit(self, fn: Any, *args: Any) -> "concurrent.futures.Future[None]":
        """Run ``fn`` on a mesh worker thread, with the caller's log context (conn, session)."""
        return self._executor.submit(run_in_context(fn), *args)


class PetalsTurn:
    """A running turn. Async-iterate for events; ``cancel()`` stops after the current step."""

    def __init__(self, session: "PetalsChatSession") -> None:
        self._session = session
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[TurnEvent] = asyncio.Queue()
        self.cancel_requested = threading.Event()
        self.future: concurrent.futures.Future[None] | None = None
        self.state: _TurnState | None = None

    def cancel(self) -> None:
        self.cancel_requested.set()

    def emit(self, event: TurnEvent) -> None:
        """Called from the worker thread."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def __aiter__(self) -> AsyncIterator[TurnEvent]:
        try:
            while True:
                event = await self._events.get()
                yield event
                if isinstance(event, TurnDone):
                    return
        finally:
            self.cancel()
            if self.future is not None:
                await asyncio.wrap_future(self.future)


class PetalsChatSession:
    """One chat session: a persistent remote inference session plus its token transcript."""

    def __init__(self, backend: PetalsBackend, model: _LoadedModel, max_length: int) -> None:
        self._backend = backend
        self._model = model
        self._max_length = max_length
        self._lock = threading.Lock()
        self._inference: Any = None
        self._held_ids: list[int] = []
        self._pending_id: int | None = None
        self._closed = False
        self._routes_stale = False
        self.remote_sessions_opened = 0

    @property
    def model_id(self) -> str:
        return self._model.spec.model_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def position(self) -> int:
        """Tokens the mesh holds in its attention caches for this session."""
        return len(self._held_ids)

    @property
    def pending_tokens(self) -> int:
        """1 if the last generated token has not been sent to the mesh yet, else 0."""
        return 0 if self._pending_id is None else 1

    def encode_turn(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The chat template over ``messages`` only: the first turn while the session holds
        nothing, else the continuation after the previous reply."""
        turns = self._model.turns
        if self.position == 0 and self._pending_id is None:
            return turns.first_turn_ids(messages)
        closed = self._pending_id == self._model.eos_token_id
        return turns.next_turn_ids(messages, previous_reply_closed=closed)

    def run_tokens(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        replace_last_token: int | None = None,
    ) -> PetalsTurn:
        """Continue the transcript with raw ``token_ids`` (no template), for clients that
        format prompts themselves. ``replace_last_token`` swaps the last generated token,
        not yet sent to the mesh, for another (e.g. a stop sequence's token)."""
        return self._start(list(token_ids), sampling, replace_last_token)

    def encode(self, text: str) -> list[int]:
        """Tokenise raw text the way the model's tokenizer does by default."""
        return list(self._model.tokenizer(text)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        """Raw ids to text with special tokens kept and no space clean-up; an incomplete
        UTF-8 character at the end decodes to U+FFFD (callers buffer on that)."""
        text = self._model.tokenizer.decode(
            list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return str(text)

    def _start(
        self,
        new_ids: list[int],
        sampling: SamplingParams,
        replace_last_token: int | None,
    ) -> PetalsTurn:
        if self._closed:
            raise SessionClosed("the session is closed")
        turn = PetalsTurn(self)
        turn.future = self._backend._submit(
            self._run_turn_in_thread, turn, new_ids, sampling, replace_last_token
        )
        return turn

    async def aclose(self) -> None:
        """Close the remote session (waits for a running turn to stop first)."""
        self._closed = True
        self._backend._forget(self)
        await asyncio.to_thread(self._close_inference)

    def _close_inference(self) -> None:
        with self._lock:
            self._drop_inference()

    def _drop_inference(self) -> None:
        if self._inference is not None:
            inference, self._inference = self._inference, None
            try:
                inference.close()
            except Exception:
                logger.debug("closing a broken remote session failed", exc_info=True)

    def _run_turn_in_thread(
        self,
        turn: PetalsTurn,
        new_ids: list[int],
        sampling: SamplingParams,
        replace_last_token: int | None,
    ) -> None:
        started = time.perf_counter()
        with self._lock:
            try:
                if replace_last_token is not None and self._pending_id is not None:
                    self._pending_id = replace_last_token
                self._run_turn_locked(turn, new_ids, sampling, started)
            except Exception as exc:  # one boundary: everything becomes a typed error event
                error = translate_error(exc)
                if not isinstance(exc, FarmeshError):
                    logger.warning("turn failed: %s", error.code, exc_info=True)
                if turn.state is not None:
                    turn.state.fail()
                turn.emit(self._done(turn, started, error=error))

    def _run_turn_locked(
        self,
        turn: PetalsTurn,
        new_ids: list[int],
        sampling: SamplingParams,
        started: float,
    ) -> None:
        if self._closed:
            raise SessionClosed("the session is closed")
        model = self._model
        inputs = ([self._pending_id] if self._pending_id is not None else []) + new_ids
        if self.position + len(inputs) > self._max_length:
            raise ContextOverflow(
                f"this turn needs {len(inputs)} tokens but only "
                f"{self._max_length - self.position} of max_length {self._max_length} are left"
            )
        state = _TurnState(model, sampling, prompt_tokens=len(new_ids), cached=self.position)
        turn.state = state
        generator = make_generator(sampling.seed)
        while state.finish is None:
            if turn.cancel_requested.is_set():
                state.cancel()
                break
            hidden = self._step(inputs, state.recorder)
            token_id = next_token(self._logits(hidden), sampling, self._held_ids, generator)
            self._pending_id = token_id
            turn.emit(state.accept(token_id, room=self._max_length - self.position))
            inputs = [token_id]
        turn.emit(self._done(turn, started))

    def _step(self, inputs: list[int], recorder: StepRecorder) -> Any:
        """Run new tokens through the mesh; reopen and replay if the remote session broke."""
        import torch

        replay: list[int] = []
        if self._inference is None:
            from petals.client.inference_session import InferenceSession

            replay = list(self._held_ids)
            if self._routes_stale:
                self._model.sequence_manager.update(wait=True)
                self._routes_stale = False
            self._inference = InferenceSession(self._model.sequence_manager, self._max_length)
            self.remote_sessions_opened += 1
            if replay:
                logger.info("reopening the remote session; replaying %d tokens", len(replay))
        ids = torch.tensor([replay + inputs], dtype=torch.long)
        try:
            with torch.inference_mode(), recorder.step(new_tokens=len(inputs)):
                hidden = self._inference.step(self._model.model.model.embed_tokens(ids))
        except Exception:
            self._drop_inference()
            self._routes_stale = True
            raise
        self._held_ids = self._held_ids + inputs
        return hidden

    def _logits(self, hidden: Any) -> Any:
        import torch

        with torch.inference_mode():
            last = self._model.model.model.norm(hidden[:, -1:, :])
            return self._model.model.lm_head(last)[0, -1]

    def _done(
        self, turn: PetalsTurn, started: float, *, error: FarmeshError | None = None
    ) -> TurnDone:
        state = turn.state
        return TurnDone(
            finish_reason=(state.finish if state and state.finish and not error else "error"),
            text=state.text if state else "",
            prompt_tokens=state.prompt_tokens if state else 0,
            completion_tokens=state.generated if state else 0,
            cached_tokens=state.cached if state else self.position,
            position=self.position,
            max_length=self._max_length,
            contributions=state.recorder.contributions() if state else (),
            routes=tuple(state.recorder.routes) if state else (),
            time_to_first_token_s=state.first_token_s(started) if state else None,
            duration_s=time.perf_counter() - started,
            error=error,
        )


class _TurnState:
    """Counters, text and stop conditions of one turn (worker-thread only)."""

    def __init__(
        self, model: _LoadedModel, sampling: SamplingParams, *, prompt_tokens: int, cached: int
    ) -> None:
        self.recorder = StepRecorder()
        self.prompt_tokens = prompt_tokens
        self.cached = cached
        self.generated = 0
        self.text = ""
        self._eos = model.eos_token_id
        self._sampling = sampling
        self._decoder = IncrementalDecoder(model.decode)
        self._stops = StopMatcher(sampling.stop)
        self._first_token_at: float | None = None
        self.finish: FinishReason | None = None

    def accept(self, token_id: int, *, room: int) -> TokenEvent:
        """Take one generated token; ``room`` is how many more tokens the session can hold."""
        if self._first_token_at is None:
            self._first_token_at = time.perf_counter()
        self.generated += 1
        is_eos = token_id == self._eos
        ends = is_eos or self.generated >= self._sampling.max_new_tokens or room < 1
        delta = "" if is_eos else self._decoder.push(token_id)
        if ends:
            delta += self._decoder.flush()
        safe = self._stops.feed(delta)
        if ends:
            safe += self._stops.flush()
        self.text += safe
        if is_eos or self._stops.stopped:
            self.finish = "stop"
        elif ends:
            self.finish = "length"
        return TokenEvent(
            text=safe,
            token_id=token_id,
            tokens_generated=self.generated,
            prompt_tokens=self.prompt_tokens,
        )

    def cancel(self) -> None:
        self.text += self._stops.feed(self._decoder.flush()) + self._stops.flush()
        self.finish = "cancelled"

    def fail(self) -> None:
        self.finish = "error"

    def first_token_s(self, started: float) -> float | None:
        return None if self._first_token_at is None else self._first_token_at - started
