"""Requests and their replies: :class:`ReplyStream` (one request's events, in order) and
:class:`Chat` (the connection's chat session, which sends turns as streams)."""

import asyncio
import contextlib
from collections.abc import Callable, Generator, Sequence
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypedDict, Unpack

from farmesh_ws import protocol as p
from farmesh_ws.client import wire
from farmesh_ws.client.errors import ConnectionLost, FarmeshClientError, RequestTimeout
from farmesh_ws.client.events import (
    ChatInfo,
    ContributionEvent,
    DoneEvent,
    Event,
    Reply,
    TokenEvent,
)

if TYPE_CHECKING:
    from farmesh_ws.client.connection import FarmeshClient

StreamItem = Event | p.Error | FarmeshClientError
"""What the reader hands a stream: an event, an error frame, or why the stream must end."""


class ReplyStream:
    """One request (a chat turn or a one-shot ``generate``) and its events, in order.

    Iterate it for :class:`TokenEvent` values then the end of the request: a turn ends with
    its :class:`DoneEvent` then its :class:`ContributionEvent`, a ``generate`` with the
    contribution then the done (protocol.md §3.2, §3.3). Or ``await`` it for the whole
    :class:`Reply`. The request is sent when iteration (or the await) starts. An ``error``
    frame for it is raised as :class:`FarmeshClientError`.
    """

    def __init__(
        self,
        client: "FarmeshClient",
        message: p.Turn | p.Generate,
        *,
        on_done: Callable[[DoneEvent], None] | None = None,
    ) -> None:
        self.request_id = message.request_id
        self._client = client
        self._frame = wire.encode(message)
        self._terminal: type[Event] = (
            ContributionEvent if isinstance(message, p.Turn) else DoneEvent
        )
        self._on_done = on_done
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._state: Literal["new", "running", "finished"] = "new"
        self._cancel_sent = False
        self._parts: list[str] = []
        self.done: DoneEvent | None = None
        self.contribution: ContributionEvent | None = None

    @property
    def text(self) -> str:
        """The reply's text received so far."""
        return "".join(self._parts)

    @property
    def finished(self) -> bool:
        return self._state == "finished"

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if self._state == "new":
            await self._start()
        while self._state == "running":
            item = await self._next_item()
            if isinstance(item, FarmeshClientError):
                self._finish()
                raise item
            if isinstance(item, p.Error):
                if item.code == "unknown_request" and self._cancel_sent:
                    continue  # our cancel crossed the end of the request: nothing to stop
                raise await self._failed(item)
            return self._accept(item)
        raise StopAsyncIteration

    async def collect(self) -> Reply:
        """Run the request to its end and return the whole reply."""
        async for _ in self:
            pass
        if self.done is None or self.contribution is None:
            raise FarmeshClientError(
                "cancelled",
                "the request was cancelled before it was sent",
                request_id=self.request_id,
            )
        return Reply(self.request_id, self.text, self.done, self.contribution)

    def __await__(self) -> Generator[Any, None, Reply]:
        return self.collect().__await__()

    async def cancel(self) -> None:
        """Stop the request after its current step (protocol.md §3.4); the stream then ends
        with a ``cancelled`` done and its contribution. A request not sent yet never is."""
        if self._state == "new":
            self._state = "finished"
            return
        if self._state == "finished" or self._cancel_sent:
            return
        self._cancel_sent = True
        await self._client._send(p.Cancel(request_id=self.request_id))

    async def aclose(self) -> None:
        """Cancel the request if it still runs and wait for its end, so the connection is
        free for the next one (the server runs one request at a time)."""
        if self._state != "running":
            self._state = "finished"
            return
        with contextlib.suppress(FarmeshClientError):
            await self.cancel()
            async for _ in self:
                pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # Called by the client's reader task.
    def _feed(self, item: StreamItem) -> None:
        self._queue.put_nowait(item)
        if isinstance(item, DoneEvent) and self._on_done is not None:
            self._on_done(item)
        if isinstance(item, self._terminal):
            self._client._forget(self)

    async def _start(self) -> None:
        client = self._client
        if self.request_id in client._used_request_ids:
            self._state = "finished"
            raise FarmeshClientError(
                "duplicate_request_id",
                f"request_id {self.request_id!r} was already used on this connection",
                request_id=self.request_id,
            )
        client._used_request_ids.add(self.request_id)
        client._streams[self.request_id] = self
        self._state = "running"
        try:
            await client._send_text(self._frame, request_id=self.request_id)
        except FarmeshClientError:
            self._finish()
            raise

    async def _next_item(self) -> StreamItem:
        timeout = self._client.timeout
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            self._finish()
            # Best effort, so the server does not keep generating for nobody.
            with contextlib.suppress(FarmeshClientError):
                await self._client._send(p.Cancel(request_id=self.request_id))
            raise RequestTimeout(
                f"no frame for request {self.request_id!r} within {timeout:g} s",
                request_id=self.request_id,
            ) from None

    def _accept(self, event: Event) -> Event:
        if isinstance(event, TokenEvent):
            self._parts.append(event.text)
        elif isinstance(event, DoneEvent):
            self.done = event
        else:
            self.contribution = event
        if isinstance(event, self._terminal):
            self._finish()
        return event

    async def _failed(self, error: p.Error) -> FarmeshClientError:
        """The request failed. Its done and contribution follow the error frame when it ran
        far enough to be billed (protocol.md §3.7, §4.3), and not when it was refused; the
        server writes them right after the error, so they are here once a ping sent now is
        answered (frames arrive in order)."""
        with contextlib.suppress(FarmeshClientError):
            await self._client.ping()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, DoneEvent):
                self.done = item
            elif isinstance(item, ContributionEvent):
                self.contribution = item
        self._finish()
        return FarmeshClientError.from_frame(error, done=self.done, contribution=self.contribution)

    def _finish(self) -> None:
        self._state = "finished"
        self._client._forget(self)


class _TurnOptions(TypedDict, total=False):
    request_id: str | None
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    seed: int | None
    stop: Sequence[str] | None
    max_cost_far: Decimal | str | None


class Chat:
    """The connection's chat session (protocol.md §3.1, §3.2). The mesh keeps the history in
    its attention caches, so each turn sends only its new text."""

    def __init__(self, client: "FarmeshClient", info: ChatInfo) -> None:
        self.info = info
        self._client = client
        self._streams: list[ReplyStream] = []
        self._closed = False
        self.position = 0
        """Tokens the session holds on the mesh, as of the last finished turn."""
        self.total_cost_far = Decimal(0)
        """What the session's finished requests cost so far."""

    @property
    def session_id(self) -> str:
        return self.info.session_id

    @property
    def model(self) -> str:
        return self.info.model

    @property
    def max_length(self) -> int:
        return self.info.max_length

    @property
    def room(self) -> int:
        """Tokens left for further turns."""
        return self.info.max_length - self.position

    @property
    def closed(self) -> bool:
        return self._closed or self._client.closed

    def send(
        self,
        text: str,
        *,
        request_id: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        max_cost_far: Decimal | str | None = None,
    ) -> ReplyStream:
        """One user turn; iterate the result for its events or await it for the reply.
        Options left at None take the session's defaults, then the server's."""
        if self._closed:
            raise FarmeshClientError("session_closed", "this chat session is closed")
        message = p.Turn(
            request_id=request_id or wire.new_request_id(),
            text=text,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            max_new_tokens=max_new_tokens,
            stop=list(stop) if stop is not None else None,
            max_cost_far=wire.amount(max_cost_far),
        )
        stream = ReplyStream(self._client, message, on_done=self._account)
        self._streams = [s for s in self._streams if not s.finished]
        self._streams.append(stream)
        return stream

    async def ask(self, text: str, **options: Unpack[_TurnOptions]) -> Reply:
        """One user turn, run to its end: ``send(text, ...)`` collected into a :class:`Reply`."""
        return await self.send(text, **options)

    async def cancel(self) -> None:
        """Cancel the running turn, if any (the stream then ends with a ``cancelled`` done)."""
        for stream in [s for s in self._streams if not s.finished]:
            await stream.cancel()

    async def aclose(self) -> None:
        """Close the chat session on the mesh; the protocol then closes the connection too
        (protocol.md §3.5), so open a new client for a new session."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._client.closed:
                with contextlib.suppress(ConnectionLost):
                    await self._client._control_request(p.Close())
        finally:
            await self._client.aclose()

    def _account(self, done: DoneEvent) -> None:
        self.position = done.position
        self.total_cost_far += done.usage.cost_far
