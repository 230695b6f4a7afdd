"""One turn over the mesh: the handle the engine iterates, and the worker's bookkeeping."""

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator

from farmesh_ws.core.types import FinishReason, SamplingParams, TokenEvent, TurnDone, TurnEvent
from farmesh_ws.mesh.attribution import StepRecorder
from farmesh_ws.mesh.text_stream import Decode, IncrementalDecoder, StopMatcher


class PetalsTurn:
    """A running turn. Async-iterate for events; ``cancel()`` stops after the current step.

    Create it on the event loop thread; the worker thread hands events over with
    :meth:`emit`. Leaving the iteration early cancels the turn and waits for the worker.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[TurnEvent] = asyncio.Queue()
        self.cancel_requested = threading.Event()
        self.future: concurrent.futures.Future[None] | None = None

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


class TurnState:
    """Counters, text and stop conditions of one turn (worker-thread only).

    ``cached``: tokens the mesh held before the turn; ``prompt_tokens``: the turn's new
    tokens, 0 until :meth:`send_prompt` (a turn that never reached the mesh sent none).
    """

    def __init__(
        self,
        *,
        eos_token_id: int,
        decode: Decode,
        sampling: SamplingParams,
        cached: int,
    ) -> None:
        self.recorder = StepRecorder()
        self.prompt_tokens = 0
        self.cached = cached
        self.generated = 0
        self.text = ""
        self._eos = eos_token_id
        self._sampling = sampling
        self._decoder = IncrementalDecoder(decode)
        self._stops = StopMatcher(sampling.stop)
        self._first_token_at: float | None = None
        self.finish: FinishReason | None = None

    def send_prompt(self, prompt_tokens: int) -> None:
        """The first step is going out with the turn's ``prompt_tokens`` new tokens."""
        self.prompt_tokens = prompt_tokens

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
        """Seconds from ``started`` (a ``time.perf_counter()`` value) to the first token."""
        return None if self._first_token_at is None else self._first_token_at - started
