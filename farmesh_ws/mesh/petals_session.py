"""One chat session over Petals: a persistent remote inference session, its transcript, and
the worker loop that steps it token by token.

The session keeps the token ids the mesh holds, so if the remote session breaks (dead
server, expired cache) the next step opens a fresh one and replays them.
"""

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from farmesh_ws.core.types import ChatMessage, SamplingParams, TurnDone
from farmesh_ws.errors import ContextOverflow, FarmeshError, SessionClosed
from farmesh_ws.mesh.attribution import StepRecorder
from farmesh_ws.mesh.base import Mark, RewindMethod, check_restore, lowered_length
from farmesh_ws.mesh.petals_errors import translate_error
from farmesh_ws.mesh.petals_model import LoadedModel
from farmesh_ws.mesh.petals_turn import PetalsTurn, TurnState
from farmesh_ws.mesh.sampling import make_generator, next_token
from farmesh_ws.mesh.spot_check_run import SpotCheckFailed

logger = logging.getLogger(__name__)

Submit = Callable[..., "concurrent.futures.Future[None]"]
_MAX_REROUTES = 3
"""Steps redone in a row after spot checks blamed a node on the route (then the step fails)."""


class PetalsChatSession:
    """One chat session: a persistent remote inference session plus its token transcript.

    ``submit(fn, *args)`` runs blocking work (a turn, a close) on a mesh worker thread;
    ``forget(session)`` is called once when the session closes.
    """

    def __init__(
        self,
        model: LoadedModel,
        max_length: int,
        *,
        submit: Submit,
        forget: Callable[["PetalsChatSession"], None],
    ) -> None:
        self._model = model
        self._max_length = max_length
        self._submit = submit
        self._forget = forget
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

    def limit_length(self, max_length: int) -> None:
        started = self._inference is not None or self.position > 0
        self._max_length = lowered_length(self._max_length, max_length, started=started)

    @property
    def position(self) -> int:
        """Tokens the mesh holds in its attention caches for this session."""
        return len(self._held_ids)

    @property
    def pending_tokens(self) -> int:
        """1 if the last generated token has not been sent to the mesh yet, else 0."""
        return 0 if self._pending_id is None else 1

    @property
    def transcript(self) -> list[int]:
        """The ids the mesh holds (a list no step changes: a step makes a new one)."""
        return self._held_ids

    def discard_pending(self) -> None:
        """Forget the last generated token, not sent to the mesh (between turns only)."""
        self._pending_id = None

    def mark(self) -> Mark:
        return Mark(len(self._held_ids), self._pending_id)

    def restore(self, transcript: Sequence[int], pending: int | None) -> None:
        """Hold ``transcript`` with no remote session yet: the first step replays it."""
        started = self._inference is not None or self.position > 0
        check_restore(started or self._pending_id is not None, transcript, self._max_length)
        with self._lock:
            self._held_ids, self._pending_id = list(transcript), pending

    async def rewind(self, mark: Mark) -> RewindMethod:
        """Keep the first ``mark.position`` ids and close the remote session: the next step
        opens a new one and replays them (Petals 2.2.0.post1 servers keep no way to move a
        session's position back)."""
        if mark.position > self.position:
            raise ValueError(f"cannot rewind to {mark.position} from {self.position}")
        await asyncio.wrap_future(self._submit(self._rewind_locked, mark))
        return "replay"

    def _rewind_locked(self, mark: Mark) -> None:
        with self._lock:
            self._held_ids = self._held_ids[: mark.position]
            self._pending_id = mark.pending
            self._drop_inference()

    def encode_turn(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The chat template over ``messages`` only: the first turn while the session holds
        nothing, else the continuation after the previous reply. Content is literal."""
        turns = self._model.turns
        if self.position == 0 and self._pending_id is None:
            return turns.first_turn_ids(messages)
        closed = self._pending_id == self._model.eos_token_id
        return turns.next_turn_ids(messages, previous_reply_closed=closed)

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

    def run_tokens(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        replace_last_token: int | None = None,
    ) -> PetalsTurn:
        """Feed the pending token, if any, then ``token_ids``, and generate. Returns at once;
        the turn runs on a worker thread. ``replace_last_token`` swaps the last generated
        token, not yet sent to the mesh, for another (e.g. a stop sequence's token).
        Raises :class:`SessionClosed` on a closed session; failures later in the turn end
        it with a :class:`TurnDone` carrying the error."""
        if self._closed:
            raise SessionClosed("the session is closed")
        turn = PetalsTurn()
        turn.future = self._submit(
            self._run_turn_in_thread, turn, list(token_ids), sampling, replace_last_token
        )
        return turn

    async def aclose(self) -> None:
        """Close the remote session. A running turn stops after its current step (finish
        reason ``cancelled``); the close waits for that, on a mesh worker, not on asyncio's
        small default pool, which many closes at once would exhaust."""
        if self._closed:
            return
        self._closed = True
        self._forget(self)
        await asyncio.wrap_future(self._submit(self._close_inference))

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
            model = self._model
            state = TurnState(
                eos_token_id=model.eos_token_id,
                decode=model.decode,
                sampling=sampling,
                cached=self.position,
            )
            checker = model.spot_checker
            try:
                with checker.turn() if checker is not None else contextlib.nullcontext():
                    self._run_turn_locked(turn, state, new_ids, sampling, replace_last_token)
            except Exception as exc:  # one boundary: everything becomes a typed error event
                error = translate_error(exc)
                if not isinstance(exc, FarmeshError):
                    logger.warning("turn failed: %s", error.code, exc_info=True)
                state.fail()
                turn.emit(self._done(state, started, error=error))
            else:
                turn.emit(self._done(state, started))

    def _run_turn_locked(
        self,
        turn: PetalsTurn,
        state: TurnState,
        new_ids: list[int],
        sampling: SamplingParams,
        replace_last_token: int | None,
    ) -> None:
        """Step the mesh until ``state`` finishes. The session changes only with a step that
        succeeds: a turn cancelled before its first step, or whose first step fails, leaves
        the position and the pending token as they were."""
        if self._closed:
            raise SessionClosed("the session is closed")
        if turn.cancel_requested.is_set():
            state.cancel()
            return
        pending = self._pending_id
        if pending is not None and replace_last_token is not None:
            pending = replace_last_token
        inputs = ([pending] if pending is not None else []) + new_ids
        if self.position + len(inputs) > self._max_length:
            raise ContextOverflow.session_full(
                position=self.position, needed=len(inputs), max_length=self._max_length
            )
        state.send_prompt(len(new_ids))
        generator = make_generator(sampling.seed)
        while True:
            hidden = self._step(inputs, state.recorder)
            token_id = next_token(self._model.logits(hidden), sampling, self._held_ids, generator)
            self._pending_id = token_id
            turn.emit(state.accept(token_id, room=self._max_length - self.position))
            if state.finish is not None:
                return
            if turn.cancel_requested.is_set() or self._closed:
                state.cancel()
                return
            inputs = [token_id]

    def _step(self, inputs: list[int], recorder: StepRecorder) -> Any:
        """Run new tokens through the mesh; reopen and replay if the remote session broke, or
        if a spot check caught a node on the route (:mod:`.spot_check_run`): then the step is
        redone without it, up to ``_MAX_REROUTES`` times. Returns the last block's hidden
        states ``[1, n, hidden]``."""
        for _ in range(_MAX_REROUTES):
            try:
                return self._step_once(inputs, recorder)
            except SpotCheckFailed as failed:
                self._drop_inference()
                if not failed.permanent:
                    from hivemind.p2p import PeerID

                    self._model.sequence_manager.on_request_failure(
                        PeerID.from_base58(failed.peer_id)
                    )
                logger.warning("redoing a step without %s (spot check)", failed.peer_id)
        return self._step_once(inputs, recorder)

    def _step_once(self, inputs: list[int], recorder: StepRecorder) -> Any:
        import torch

        checker = self._model.spot_checker
        if (
            self._inference is not None
            and checker is not None
            and checker.holds_excluded(self._inference._server_sessions)
        ):
            logger.info("the route holds a node excluded by a spot check; rerouting")
            self._drop_inference()
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
        checks = checker.step() if checker is not None else contextlib.nullcontext(None)
        try:
            with torch.inference_mode(), recorder.step(new_tokens=len(inputs)), checks as step:
                hidden = self._inference.step(self._model.embed(ids))
                if step is not None:
                    try:
                        step.join()
                    except SpotCheckFailed:
                        recorder.discard_step()
                        raise
        except SpotCheckFailed:
            raise
        except Exception:
            self._drop_inference()
            self._routes_stale = True
            raise
        self._held_ids = self._held_ids + inputs
        return hidden

    def _done(
        self, state: TurnState, started: float, *, error: FarmeshError | None = None
    ) -> TurnDone:
        return TurnDone(
            finish_reason=state.finish if error is None and state.finish is not None else "error",
            text=state.text,
            prompt_tokens=state.prompt_tokens,
            completion_tokens=state.generated,
            cached_tokens=state.cached,
            position=self.position,
            max_length=self._max_length,
            contributions=state.recorder.contributions(),
            routes=tuple(state.recorder.routes),
            time_to_first_token_s=state.first_token_s(started),
            duration_s=time.perf_counter() - started,
            error=error,
        )
