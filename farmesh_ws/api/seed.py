"""The seed's ``POST /inference/generate`` over the engine: one prompt, tokens as Server-Sent
Events (http.md §6).

The body is a JSON object with protocol v1's ``generate`` fields (protocol.md §3.3) but no
``type``: ``prompt`` (required), ``request_id``, ``max_tokens``, ``temperature``, ``top_p``,
``model_id``, ``user_wallet`` (a claim, checked against the credential), ``max_cost_far``.
The answer is ``text/event-stream`` with exactly these lines: per token
``data: {"token","request_id","tokens_generated","cost_far"}``, then ``data: {"done": true}``;
a request that fails or reaches its budget after it started sends
``data: {"error","message","retryable"}`` before ``done``. A refused request is one JSON error,
``{"error": code, "message", "retryable"}``, with the HTTP status of http.md §5. A client that
goes away cancels the request, which is billed for what it delivered.
"""

import uuid
from decimal import Decimal
from typing import Annotated

import msgspec
from msgspec import Meta

from farmesh_ws import protocol as p
from farmesh_ws.api.openai.adapter import JsonReply, SseQueue, StreamReply
from farmesh_ws.api.openai.objects import error_reply, sse
from farmesh_ws.core.money import far_text
from farmesh_ws.core.principal import Principal
from farmesh_ws.core.settlement import Settlement
from farmesh_ws.core.types import SamplingOverrides, TokenEvent
from farmesh_ws.engine.conversation import Client
from farmesh_ws.engine.engine import Engine
from farmesh_ws.engine.request import ActiveRequest
from farmesh_ws.engine.runner import RequestSpec
from farmesh_ws.errors import FarmeshError, InvalidJson, InvalidMessage

KIND = "inference_generate"
DONE = sse({"done": True})


class GenerateBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    prompt: Annotated[str, Meta(min_length=1)]
    request_id: p.RequestId | None = None
    max_tokens: p.PositiveTokens | None = None
    temperature: p.Temperature | None = None
    top_p: p.TopP | None = None
    model_id: p.ModelName | None = None
    user_wallet: p.Wallet | None = None
    max_cost_far: p.FarAmount | None = None


_decoder = msgspec.json.Decoder(GenerateBody)


def decode(body: bytes) -> GenerateBody:
    """Raises InvalidJson or InvalidMessage (msgspec's one line, naming the field)."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidMessage(str(exc)) from None
    except (msgspec.DecodeError, RecursionError):
        raise InvalidJson("the body is not a JSON object") from None


def _amount(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


class SeedGenerate:
    """``POST /inference/generate`` for one gateway process."""

    def __init__(self, engine: Engine, *, process_id: str) -> None:
        self._engine = engine
        self._process_id = process_id

    def error(self, error: FarmeshError) -> JsonReply:
        """A refusal before the request started (counted like an error frame)."""
        self._engine.error_sent(error.code)
        reply = error_reply(error)
        body = {"error": error.code, "message": error.message, "retryable": error.retryable}
        return JsonReply(reply.status, body, reply.headers)

    async def generate(self, principal: Principal, body: bytes) -> JsonReply | StreamReply:
        try:
            request = decode(body)
            request_id = request.request_id or uuid.uuid4().hex
            client = Client(f"http:{self._process_id}:{uuid.uuid4().hex}", principal)
            spec = RequestSpec(
                request_id=request_id,
                kind=KIND,
                text=request.prompt,
                sampling=SamplingOverrides(
                    temperature=request.temperature,
                    top_p=request.top_p,
                    max_new_tokens=request.max_tokens,
                ),
                max_cost_far=None
                if request.max_cost_far is None
                else Decimal(request.max_cost_far),
                model_id=request.model_id,
                wallet=request.user_wallet,
            )
            active = await self._engine.runner.admit(client, spec)
        except FarmeshError as exc:
            return self.error(exc)
        stream = _Events(self._engine)
        self._engine.runner.launch(active, stream)
        return StreamReply(active, stream.events(active))


class _Events(SseQueue):
    """The engine's sink: one SSE line per token, then ``done``."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self._engine = engine

    async def token(self, active: ActiveRequest, event: TokenEvent) -> None:
        self.put_event(
            sse(
                {
                    "token": event.text,
                    "request_id": active.request_id,
                    "tokens_generated": active.generated,
                    "cost_far": far_text(active.cost_far),
                }
            )
        )

    async def finished(self, active: ActiveRequest, settlement: Settlement) -> None:
        error = settlement.error
        if error is not None:  # a failure or a budget stop: say why before done
            self._engine.error_sent(error.code)
            self.put_event(
                sse({"error": error.code, "message": error.message, "retryable": error.retryable})
            )
        self.put_event(DONE)
        self.end()
