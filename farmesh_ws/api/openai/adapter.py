"""OpenAI's endpoints over the engine: decode, admit, launch, encode (http.md).

Each HTTP request is its own :class:`~farmesh_ws.engine.conversation.Client` for the
principal its credential proved: the per-principal caps, rate limit and prepaid holds are the
engine's admission, as on the WebSocket. A stateless request is a one-shot request; its mesh
session may continue one the principal's previous request left (http.md §9). A refused
request gets only its error (nothing reaches the mesh or is billed); an admitted one always
settles, billed for what was generated.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from farmesh_ws.api.openai import objects as o
from farmesh_ws.api.openai.wire import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequestError,
    chat_spec,
    completion_spec,
    decode,
)
from farmesh_ws.core.principal import Principal
from farmesh_ws.core.settlement import Settlement
from farmesh_ws.core.types import TokenEvent
from farmesh_ws.engine.conversation import Client
from farmesh_ws.engine.engine import Engine
from farmesh_ws.engine.request import ActiveRequest
from farmesh_ws.engine.runner import RequestSpec
from farmesh_ws.errors import FarmeshError, ModelNotFound

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JsonReply:
    status: int
    body: o.Json
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class StreamReply:
    """A started streaming request: ``events`` are its SSE bytes; closing the iterator early
    (the client went away) cancels the request, which settles for what it generated."""

    active: ActiveRequest
    events: AsyncIterator[bytes]


@dataclass(slots=True)
class PendingReply:
    """A started request answered as one JSON object once it settles (``reply()``);
    ``active.cancel()`` stops it early (the client went away)."""

    active: ActiveRequest
    sink: "_Collect"

    async def reply(self) -> JsonReply:
        result = await self.sink.result
        text, settlement = result
        if settlement.finish_reason == "error" and settlement.error is not None:
            error = _error(settlement.error)
            return JsonReply(
                error.status, {**error.body, "farmesh": o.farmesh_field(settlement)}, error.headers
            )
        return JsonReply(200, self.sink.encode(self.sink.head, text, settlement))


Reply = JsonReply | StreamReply | PendingReply


@dataclass(frozen=True, slots=True)
class _Route:
    request_type: type[ChatCompletionRequest] | type[CompletionRequest]
    id_prefix: str
    whole: Callable[[o.Head, str, Settlement], o.Json]


def _spec(request: ChatCompletionRequest | CompletionRequest, request_id: str) -> RequestSpec:
    if isinstance(request, ChatCompletionRequest):
        return chat_spec(request, request_id)
    return completion_spec(request, request_id)


CHAT = _Route(ChatCompletionRequest, "chatcmpl-", o.chat_completion)
COMPLETION = _Route(CompletionRequest, "cmpl-", o.text_completion)


class OpenAIApi:
    """The endpoints; the transport supplies the principal and the request body."""

    def __init__(self, engine: Engine, *, process_id: str) -> None:
        self._engine = engine
        self._process_id = process_id

    def models(self) -> o.Json:
        return {"object": "list", "data": [self._model(m) for m in self._engine.backend.model_ids]}

    def model(self, model_id: str) -> JsonReply:
        if model_id not in self._engine.backend.model_ids:
            return self.error(ModelNotFound(f"model {model_id[:200]!r} is not served here"))
        return JsonReply(200, self._model(model_id))

    @staticmethod
    def _model(model_id: str) -> o.Json:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "farmesh"}

    def error(self, error: FarmeshError) -> JsonReply:
        """An error answered before any request started (counted like an error frame)."""
        self._engine.error_sent(error.code)
        reply = _error(error)
        return JsonReply(reply.status, reply.body, reply.headers)

    async def chat_completions(self, principal: Principal, body: bytes) -> Reply:
        return await self._start(CHAT, principal, body)

    async def completions(self, principal: Principal, body: bytes) -> Reply:
        return await self._start(COMPLETION, principal, body)

    async def _start(self, route: _Route, principal: Principal, body: bytes) -> Reply:
        request_id = f"{route.id_prefix}{uuid.uuid4().hex}"
        client = Client(f"http:{self._process_id}:{request_id}", principal)
        try:
            request = decode(body, route.request_type)
            spec = _spec(request, request_id)
            active = await self._engine.runner.admit(client, spec)
        except FarmeshError as exc:
            return self.error(exc)
        if request.user is not None:
            logger.debug("request %s for user %r", request_id, request.user[:64])
        head = o.Head(request_id, int(time.time()), active.context.model_id)
        if not request.stream:
            sink = _Collect(head, route.whole)
            self._engine.runner.launch(active, sink)
            return PendingReply(active, sink)
        include_usage = request.stream_options is not None and request.stream_options.include_usage
        stream = _Stream(head, chat=route is CHAT, include_usage=include_usage)
        self._engine.runner.launch(active, stream)
        return StreamReply(active, stream.events(active))


def _error(error: FarmeshError) -> o.ErrorReply:
    param = error.param if isinstance(error, OpenAIRequestError) else None
    return o.error_reply(error, param=param)


class _Collect:
    """The engine's sink for a non-streaming request: the text, then the settlement."""

    def __init__(self, head: o.Head, encode: Callable[[o.Head, str, Settlement], o.Json]) -> None:
        self.head = head
        self.encode = encode
        self._text: list[str] = []
        self.result: asyncio.Future[tuple[str, Settlement]] = (
            asyncio.get_running_loop().create_future()
        )

    async def token(self, active: ActiveRequest, event: TokenEvent) -> None:
        self._text.append(event.text)

    async def finished(self, active: ActiveRequest, settlement: Settlement) -> None:
        if not self.result.done():
            self.result.set_result(("".join(self._text), settlement))


class SseQueue:
    """Server-sent events of one started request, in order, for the HTTP response to stream;
    a response closed early (the client went away) cancels the request."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def put_event(self, event: bytes) -> None:
        self._queue.put_nowait(event)

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def events(self, active: ActiveRequest) -> AsyncIterator[bytes]:
        try:
            while (item := await self._queue.get()) is not None:
                yield item
        finally:
            active.cancel()  # a no-op once it settled; else the client went away


class _Stream(SseQueue):
    """The engine's sink for a streaming request: SSE chunks into a queue, in order. A
    failure after the start is an ``error`` event (with what was billed), then the end."""

    def __init__(self, head: o.Head, *, chat: bool, include_usage: bool) -> None:
        self._head = head
        self._chat = chat
        self._usage = include_usage
        super().__init__()
        if chat:  # OpenAI's first chunk names the role
            self._put(o.chat_chunk(head, {"role": "assistant", "content": ""}, None, **self._u))

    @property
    def _u(self) -> dict[str, bool]:
        return {"usage_field": self._usage}

    def _put(self, data: o.Json | bytes) -> None:
        self.put_event(data if isinstance(data, bytes) else o.sse(data))

    def _chunk(self, text: str, reason: str | None) -> o.Json:
        if self._chat:
            return o.chat_chunk(self._head, {"content": text} if text else {}, reason, **self._u)
        return o.completion_chunk(self._head, text, reason, **self._u)

    async def token(self, active: ActiveRequest, event: TokenEvent) -> None:
        if event.text:
            self._put(self._chunk(event.text, None))

    async def finished(self, active: ActiveRequest, settlement: Settlement) -> None:
        extra = o.farmesh_field(settlement)
        if settlement.finish_reason == "error" and settlement.error is not None:
            self._put({**_error(settlement.error).body, "farmesh": extra})
        else:
            last = self._chunk("", o.finish_reason(settlement))
            if self._usage:
                self._put(last)
                last = self._head.object(
                    "chat.completion.chunk" if self._chat else "text_completion",
                    [],
                    usage=o.usage(settlement),
                )
            self._put({**last, "farmesh": extra})
            self._put(o.DONE)
        self.end()
