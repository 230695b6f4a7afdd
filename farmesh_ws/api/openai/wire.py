"""OpenAI request bodies, decoded with msgspec, and their engine requests (http.md §3-§4).

Field names are OpenAI's. Unknown fields are ignored, as OpenAI's API does; a field of the
wrong type or out of range raises :class:`OpenAIRequestError` naming it (``param``), which
becomes a 400 ``invalid_request_error``. ``user`` is accepted and never bills anyone: the
wallet is always the credential's.
"""

import re
from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

from farmesh_ws.core.types import ChatMessage, SamplingOverrides
from farmesh_ws.engine.runner import RequestSpec
from farmesh_ws.errors import InvalidRequest

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]
PositiveTokens = Annotated[int, Meta(ge=1)]
StopSequence = Annotated[str, Meta(min_length=1, max_length=64)]
StopList = Annotated[list[StopSequence], Meta(max_length=4)]
ModelName = Annotated[str, Meta(min_length=1, max_length=200)]
User = Annotated[str, Meta(max_length=256)]

_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for system instructions
    "user": "user",
    "assistant": "assistant",
}


class OpenAIRequestError(InvalidRequest):
    """A request body OpenAI would refuse with 400; ``param`` names the field, if one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class Message(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    """Fields both endpoints share."""

    model: ModelName | None = None
    max_tokens: PositiveTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: StopSequence | StopList | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: User | None = None


class ChatCompletionRequest(_Common, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: PositiveTokens | None = None


class CompletionRequest(_Common, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=1)]


R = TypeVar("R", bound="_Common")
_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


def decode(body: bytes, kind: type[R]) -> R:
    """Decode a JSON body into ``kind``; raises :class:`OpenAIRequestError`."""
    try:
        request = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        found = _PATH.search(text)
        param = found.group(1) if found else None
        message = text[: found.start()] if found else text
        raise OpenAIRequestError(message, param or None) from None
    except msgspec.DecodeError:
        raise OpenAIRequestError("the request body is not valid JSON") from None
    if not isinstance(request, _Common):
        raise OpenAIRequestError("the request body is not a JSON object")
    if request.n is not None and request.n != 1:
        raise OpenAIRequestError("only n=1 is supported: one choice per request", "n")
    if request.stream_options is not None and not request.stream:
        raise OpenAIRequestError(
            "stream_options is only allowed with stream=true", "stream_options"
        )
    return request


def chat_spec(request: ChatCompletionRequest, request_id: str) -> RequestSpec:
    """A one-shot request over the whole conversation: it continues the principal's kept mesh
    session whose transcript its prompt extends, else opens a fresh one (engine/reuse.py)."""
    messages = tuple(_message(message, index) for index, message in enumerate(request.messages))
    max_tokens = request.max_completion_tokens or request.max_tokens
    return RequestSpec(
        request_id=request_id,
        kind="chat_completion",
        text="",
        messages=messages,
        sampling=_sampling(request, max_tokens),
        model_id=request.model,
        reuse=True,
    )


def completion_spec(request: CompletionRequest, request_id: str) -> RequestSpec:
    """A one-shot request whose prompt is raw text (no chat template), reusing kept mesh
    sessions as chat completions do."""
    prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
    if not prompt:
        raise OpenAIRequestError("prompt must not be empty", "prompt")
    return RequestSpec(
        request_id=request_id,
        kind="completion",
        text=prompt,
        raw_text=True,
        sampling=_sampling(request, request.max_tokens),
        model_id=request.model,
        reuse=True,
    )


def _message(message: Message, index: int) -> ChatMessage:
    role = _ROLES.get(message.role)
    if role is None:
        raise OpenAIRequestError(
            f"role {message.role[:32]!r} is not supported here (system, developer, user, "
            "assistant)",
            f"messages.[{index}].role",
        )
    content = message.content
    if content is None:
        raise OpenAIRequestError("content is required", f"messages.[{index}].content")
    if isinstance(content, list):
        texts: list[str] = []
        for part_index, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise OpenAIRequestError(
                    "only text content parts are supported",
                    f"messages.[{index}].content.[{part_index}]",
                )
            texts.append(part.text)
        content = "".join(texts)
    return ChatMessage(role=role, content=content)


def _sampling(request: _Common, max_tokens: int | None) -> SamplingOverrides:
    stop = request.stop
    return SamplingOverrides(
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        max_new_tokens=max_tokens,
        stop=None if stop is None else (stop,) if isinstance(stop, str) else tuple(stop),
    )
