"""An asyncio client for farmesh_ws (protocol.md, version 1), for agents and tools.

::

    async with FarmeshClient.connect("ws://127.0.0.1:8100/ws") as client:
        chat = await client.open_chat(system_prompt="You are terse.")
        async for event in chat.send("What is the capital of France?", max_new_tokens=64):
            if isinstance(event, TokenEvent):
                print(event.text, end="")
        reply = await chat.ask("And of Germany?")  # the whole reply at once
        print(reply.text, reply.done.usage.cost_far)

One :class:`FarmeshClient` is one WebSocket connection, holding at most one chat session
(protocol.md §2). A single reader task decodes every frame and routes it by ``request_id`` to
the :class:`ReplyStream` that asked, so the caller never reads the socket itself; message types
this client does not know are ignored (§10). Money is ``Decimal`` end to end, as on the wire.
Every wait on the server is bounded by the client's ``timeout``.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any, Final, Literal, Self, TypedDict, Unpack, get_args

import msgspec
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as _ws_connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from farmesh_ws import __version__
from farmesh_ws import protocol as p

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Chat",
    "ChatInfo",
    "ConnectFailed",
    "ConnectionLost",
    "ContributionEvent",
    "DoneEvent",
    "Event",
    "FarmeshClient",
    "FarmeshClientError",
    "NodeShare",
    "Reply",
    "ReplyStream",
    "RequestTimeout",
    "Sampling",
    "TokenEvent",
    "Usage",
    "connect",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S: Final = 60.0
"""Seconds any single wait on the server may take: the handshake, a reply, the next frame."""

FinishReason = Literal["stop", "length", "cancelled", "error", "budget"]
Sampling = p.Sampling
"""Default sampling of a chat session (``open_chat(sampling=...)``); a mapping works too."""


# Events ------------------------------------------------------------------------------------


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
    """One server and block span that computed part of a request, and its share of the cost."""

    peer_id: str
    name: str | None
    start_block: int
    end_block: int
    tokens: int
    replayed_tokens: int
    work: int
    share_far: Decimal


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


# Errors ------------------------------------------------------------------------------------


class FarmeshClientError(Exception):
    """An ``error`` frame from the server (protocol.md §5), or a failure of the client's own
    (``connect_failed``, ``connection_lost``, ``timeout``, ``protocol_error``, or
    ``invalid_message`` for arguments the protocol's static limits refuse, found before
    sending). ``done`` and ``contribution`` are set when the request ran far enough to be
    billed (a ``budget_exceeded`` stop, a mesh failure mid-reply)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        request_id: str | None = None,
        done: DoneEvent | None = None,
        contribution: ContributionEvent | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.request_id = request_id
        self.done = done
        self.contribution = contribution

    @classmethod
    def from_frame(
        cls,
        frame: p.Error,
        *,
        done: DoneEvent | None = None,
        contribution: ContributionEvent | None = None,
    ) -> "FarmeshClientError":
        return cls(
            frame.code,
            frame.message,
            retryable=frame.retryable,
            request_id=frame.request_id,
            done=done,
            contribution=contribution,
        )


class ConnectFailed(FarmeshClientError):
    """The WebSocket connection could not be made (refused, handshake failed, timed out)."""

    def __init__(self, message: str) -> None:
        super().__init__("connect_failed", message, retryable=True)


class ConnectionLost(FarmeshClientError):
    """The connection closed; its chat session is gone with it (protocol.md §2), so this is
    not retryable on the same client: connect again and open a new chat."""

    def __init__(
        self, message: str, *, close_code: int | None = None, close_reason: str = ""
    ) -> None:
        super().__init__("connection_lost", message)
        self.close_code = close_code
        self.close_reason = close_reason


class RequestTimeout(FarmeshClientError):
    """The server did not answer within the client's ``timeout``."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__("timeout", message, retryable=True, request_id=request_id)


# Wire --------------------------------------------------------------------------------------


class _Envelope(msgspec.Struct):
    """Enough of a server frame to know its type and request before decoding it fully."""

    type: str
    request_id: str | None = None


_ENVELOPE: Final = msgspec.json.Decoder(_Envelope)
_DECODER: Final = msgspec.json.Decoder(p.ServerMessage)
_KNOWN_TYPES: Final = frozenset(str(m.__struct_config__.tag) for m in get_args(p.ServerMessage))

_Item = Event | p.Error | FarmeshClientError
"""What the reader hands a stream: an event, an error frame, or why the stream must end."""


def _new_request_id() -> str:
    return uuid.uuid4().hex


def _encode(message: p.ClientMessage) -> str:
    """Encode a client message, checked against the protocol's static limits first, so a bad
    argument fails here with its JSON path rather than as an anonymous server error."""
    frame = msgspec.json.encode(message)
    try:
        p.decode_client_message(frame)
    except msgspec.ValidationError as exc:
        raise FarmeshClientError(
            "invalid_message", str(exc), request_id=getattr(message, "request_id", None)
        ) from None
    return frame.decode()


def _amount(value: Decimal | str | None) -> str | None:
    """A $FAR amount in its wire form (a fixed-point string, never a float)."""
    if value is None or isinstance(value, str):
        return value
    return format(value, "f")


def _sampling(value: p.Sampling | Mapping[str, Any] | None) -> p.Sampling | None:
    if value is None or isinstance(value, p.Sampling):
        return value
    try:
        return msgspec.convert(dict(value), p.Sampling)
    except msgspec.ValidationError as exc:
        raise FarmeshClientError("invalid_message", f"sampling: {exc}") from None


def _event(message: p.Token | p.Done | p.ContributionReport) -> Event:
    """A server frame as a typed event; ``decimal.InvalidOperation`` on a malformed amount."""
    if isinstance(message, p.Token):
        return TokenEvent(
            request_id=message.request_id,
            text=message.token,
            tokens_generated=message.tokens_generated,
            cost_far=Decimal(message.cost_far),
        )
    if isinstance(message, p.Done):
        usage = message.usage
        return DoneEvent(
            request_id=message.request_id,
            finish_reason=message.finish_reason,
            usage=Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                cost_far=Decimal(usage.cost_far),
            ),
            position=message.position,
            max_length=message.max_length,
            duration_ms=message.duration_ms,
            time_to_first_token_ms=message.time_to_first_token_ms,
            error=message.error,
        )
    return ContributionEvent(
        request_id=message.request_id,
        cost_far=Decimal(message.cost_far),
        nodes=tuple(
            NodeShare(
                peer_id=node.peer_id,
                name=node.name,
                start_block=node.start_block,
                end_block=node.end_block,
                tokens=node.tokens,
                replayed_tokens=node.replayed_tokens,
                work=node.work,
                share_far=Decimal(node.share_far),
            )
            for node in message.nodes
        ),
    )


def _retrieve(future: "asyncio.Future[Any]") -> None:
    """Mark a future's exception as seen, so asyncio does not log it when nobody awaited."""
    if future.done() and not future.cancelled():
        future.exception()


# Requests ----------------------------------------------------------------------------------


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
        self._frame = _encode(message)
        self._terminal: type[Event] = (
            ContributionEvent if isinstance(message, p.Turn) else DoneEvent
        )
        self._on_done = on_done
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
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
    def _feed(self, item: _Item) -> None:
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

    async def _next_item(self) -> _Item:
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
            request_id=request_id or _new_request_id(),
            text=text,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            max_new_tokens=max_new_tokens,
            stop=list(stop) if stop is not None else None,
            max_cost_far=_amount(max_cost_far),
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


# The connection ----------------------------------------------------------------------------


class FarmeshClient:
    """One WebSocket connection to a farmesh_ws gateway. Make it with :meth:`connect`."""

    def __init__(
        self, connection: ClientConnection, *, url: str, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.chat: Chat | None = None
        """The chat session opened on this connection, if any."""
        self._ws = connection
        self._streams: dict[str, ReplyStream] = {}
        self._used_request_ids: set[str] = set()
        self._pongs: dict[str, asyncio.Future[None]] = {}
        self._control: asyncio.Future[p.ServerMessage] | None = None
        self._control_lock = asyncio.Lock()
        self._closing = False
        self._closed = asyncio.Event()
        self.close_error: ConnectionLost | None = None
        """Why the connection closed, once it has."""
        self._reader = asyncio.create_task(self._read_loop(), name="farmesh-client-reader")

    @classmethod
    def connect(cls, url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> "_Connecting":
        """Connect to ``url`` (``ws://HOST:PORT/ws``): ``await`` the result for a client, or
        use it in ``async with``, which closes the client at the end."""
        return _Connecting(url, timeout)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_code(self) -> int | None:
        """The WebSocket close code once the connection is closed (protocol.md §6)."""
        return self._ws.close_code

    async def wait_closed(self) -> None:
        """Wait until the connection is closed, by either side."""
        await self._closed.wait()

    async def open_chat(
        self,
        *,
        model: str | None = None,
        max_length: int | None = None,
        system_prompt: str | None = None,
        user_wallet: str | None = None,
        sampling: p.Sampling | Mapping[str, Any] | None = None,
        max_cost_far: Decimal | str | None = None,
    ) -> Chat:
        """Open this connection's chat session (protocol.md §3.1). Options left at None
        take the server's defaults."""
        message = p.Open(
            model=model,
            max_length=max_length,
            user_wallet=user_wallet,
            system_prompt=system_prompt,
            sampling=_sampling(sampling),
            max_cost_far=_amount(max_cost_far),
        )
        opened = await self._control_request(message)
        if not isinstance(opened, p.Opened):
            raise FarmeshClientError("protocol_error", f"expected 'opened', got {opened!r}")
        try:
            info = ChatInfo(
                session_id=opened.session_id,
                model=opened.model,
                max_length=opened.max_length,
                price_per_token_far=Decimal(opened.price_per_token_far),
                price_per_prompt_token_far=Decimal(opened.price_per_prompt_token_far),
                protocol_version=opened.protocol_version,
            )
        except InvalidOperation:
            raise FarmeshClientError("protocol_error", f"malformed prices in {opened!r}") from None
        self.chat = Chat(self, info)
        return self.chat

    def generate(
        self,
        prompt: str,
        *,
        request_id: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        user_wallet: str | None = None,
        model: str | None = None,
        max_cost_far: Decimal | str | None = None,
    ) -> ReplyStream:
        """A one-shot request in a fresh mesh session (protocol.md §3.3); no chat needed and
        the chat session, if any, is untouched. ``max_new_tokens`` is the wire's
        ``max_tokens``, ``model`` its ``model_id``."""
        message = p.Generate(
            request_id=request_id or _new_request_id(),
            prompt=prompt,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            user_wallet=user_wallet,
            model_id=model,
            max_cost_far=_amount(max_cost_far),
        )
        return ReplyStream(self, message)

    async def ping(self) -> float:
        """A protocol ``ping`` (§3.6); returns the round trip in seconds."""
        data = uuid.uuid4().hex
        pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[data] = pong
        started = time.perf_counter()
        try:
            await self._send(p.Ping(data=data))
            await asyncio.wait_for(pong, self.timeout)
        except TimeoutError:
            raise RequestTimeout(f"no pong within {self.timeout:g} s") from None
        finally:
            self._pongs.pop(data, None)
            _retrieve(pong)
        return time.perf_counter() - started

    async def aclose(self) -> None:
        """Close the connection; the server then cancels a running request and closes the
        chat session (protocol.md §2). Idempotent."""
        if not self.closed:
            self._closing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ws.close(), self.timeout)
        await asyncio.wait({self._reader}, timeout=self.timeout)
        if not self._reader.done():
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # Sending -----------------------------------------------------------------------------

    async def _send(self, message: p.ClientMessage) -> None:
        await self._send_text(_encode(message), request_id=getattr(message, "request_id", None))

    async def _send_text(self, frame: str, *, request_id: str | None = None) -> None:
        if self.closed:
            raise self.lost_error()
        try:
            await asyncio.wait_for(self._ws.send(frame), self.timeout)
        except ConnectionClosed:
            raise self.lost_error() from None
        except TimeoutError:
            raise RequestTimeout(
                f"could not send within {self.timeout:g} s", request_id=request_id
            ) from None

    async def _control_request(self, message: p.Open | p.Close) -> p.ServerMessage:
        """Send a message answered without a request_id (``opened``/``closed``, or an
        ``error`` without one) and return the answer; error frames are raised."""
        async with self._control_lock:
            reply: asyncio.Future[p.ServerMessage] = asyncio.get_running_loop().create_future()
            self._control = reply
            try:
                await self._send(message)
                answer = await asyncio.wait_for(reply, self.timeout)
            except TimeoutError:
                kind = str(type(message).__struct_config__.tag)
                raise RequestTimeout(f"no answer to {kind!r} within {self.timeout:g} s") from None
            finally:
                self._control = None
                _retrieve(reply)
        if isinstance(answer, p.Error):
            raise FarmeshClientError.from_frame(answer)
        return answer

    def lost_error(self) -> ConnectionLost:
        """A :class:`ConnectionLost` describing how the connection closed."""
        code, reason = self._ws.close_code, self._ws.close_reason or ""
        if self._closing:
            message = "the connection was closed by this client"
        elif code is None or code == 1006:
            message = "the connection to the server was lost"
        else:
            message = f"the server closed the connection ({code}{' ' + reason if reason else ''})"
        return ConnectionLost(message, close_code=code, close_reason=reason)

    def _forget(self, stream: ReplyStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    # Receiving (the one reader task) -----------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._ws.recv()
                if isinstance(frame, str):
                    self._route(frame)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("the reader of %s failed; closing the connection", self.url)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), self.timeout)
        finally:
            self._on_closed()

    def _route(self, frame: str) -> None:
        try:
            envelope = _ENVELOPE.decode(frame)
        except msgspec.MsgspecError as exc:
            logger.warning("ignoring a frame without a message type: %s", exc)
            return
        if envelope.type not in _KNOWN_TYPES:
            # protocol.md §10: a server may add message types within a version.
            logger.debug("ignoring a message of unknown type %r", envelope.type)
            return
        try:
            message = _DECODER.decode(frame)
            item: _Item | p.ServerMessage = (
                _event(message)
                if isinstance(message, p.Token | p.Done | p.ContributionReport)
                else message
            )
        except (msgspec.MsgspecError, InvalidOperation) as exc:
            item = FarmeshClientError(
                "protocol_error",
                f"malformed {envelope.type!r} frame: {exc}",
                request_id=envelope.request_id,
            )
        if isinstance(item, p.Pong):
            pong = self._pongs.get(item.data or "")
            if pong is not None and not pong.done():
                pong.set_result(None)
        elif isinstance(item, p.Opened | p.Closed):
            if self._control is not None and not self._control.done():
                self._control.set_result(item)
        elif isinstance(item, p.Error | FarmeshClientError):
            self._route_error(item)
        elif isinstance(item, TokenEvent | DoneEvent | ContributionEvent):
            stream = self._streams.get(item.request_id)
            if stream is not None:
                stream._feed(item)

    def _route_error(self, error: p.Error | FarmeshClientError) -> None:
        """An error goes to its request; one without a request_id answers the pending
        ``open``/``close`` or else concerns every running request."""
        if error.request_id is not None:
            stream = self._streams.get(error.request_id)
            if stream is not None:
                stream._feed(error)
            return
        if self._control is not None and not self._control.done():
            if isinstance(error, p.Error):
                self._control.set_result(error)
            else:
                self._control.set_exception(error)
            return
        if not self._streams:
            logger.warning("error from the server: %s", error)
        for stream in list(self._streams.values()):
            stream._feed(error)

    def _on_closed(self) -> None:
        """Whatever still waits on this connection learns that it is gone."""
        self.close_error = self.lost_error()
        self._closed.set()
        for stream in list(self._streams.values()):
            stream._feed(self.lost_error())
        self._streams.clear()
        for pong in self._pongs.values():
            if not pong.done():
                pong.set_exception(self.lost_error())
        if self._control is not None and not self._control.done():
            self._control.set_exception(self.lost_error())


class _Connecting:
    """What :meth:`FarmeshClient.connect` returns: awaitable, and an async context manager."""

    def __init__(self, url: str, timeout: float) -> None:
        self._url = url
        self._timeout = timeout
        self._client: FarmeshClient | None = None

    def __await__(self) -> Generator[Any, None, FarmeshClient]:
        return self._connect().__await__()

    async def __aenter__(self) -> FarmeshClient:
        self._client = await self._connect()
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _connect(self) -> FarmeshClient:
        try:
            connection = await _ws_connect(
                self._url,
                open_timeout=self._timeout,
                close_timeout=min(self._timeout, 10.0),
                user_agent_header=f"farmesh-ws-client/{__version__}",
            )
        except TimeoutError:
            raise ConnectFailed(f"{self._url} did not answer within {self._timeout:g} s") from None
        except (OSError, WebSocketException) as exc:
            raise ConnectFailed(f"cannot connect to {self._url}: {exc}") from None
        return FarmeshClient(connection, url=self._url, timeout=self._timeout)


def connect(url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> _Connecting:
    """``FarmeshClient.connect(url)``: ``await`` it, or use it in ``async with``."""
    return FarmeshClient.connect(url, timeout=timeout)
