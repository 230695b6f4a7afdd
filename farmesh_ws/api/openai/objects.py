"""OpenAI's response objects and error bodies, from the engine's results (http.md §5-§7).

Every object is a plain dict encoded with msgspec. A settled request's usage follows
OpenAI's meaning: ``prompt_tokens`` counts the whole prompt, of which
``prompt_tokens_details.cached_tokens`` were already on the mesh (not sent, not billed).
The extra top-level ``farmesh`` field (cost in $FAR as a decimal string, and each node's
contribution as in protocol v1's ``contribution`` frame) is ignored by OpenAI clients.
"""

import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import msgspec

from farmesh_ws import protocol as p
from farmesh_ws.core.money import far_text
from farmesh_ws.core.settlement import Settlement
from farmesh_ws.errors import FarmeshError, QuotaExceeded, RateLimited

Json = dict[str, Any]


def usage(settlement: Settlement) -> Json:
    prompt = settlement.prompt_tokens + settlement.cached_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": settlement.completion_tokens,
        "total_tokens": prompt + settlement.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": settlement.cached_tokens},
    }


def farmesh_field(settlement: Settlement) -> Json:
    """The extra field: what the request cost and who computed it."""
    nodes = p.node_shares(settlement)
    return {
        "cost_far": far_text(settlement.cost_far),
        "finish_reason": settlement.finish_reason,
        "nodes": msgspec.to_builtins(nodes),
    }


def finish_reason(settlement: Settlement) -> str:
    """OpenAI's ``stop`` or ``length``: a budget or cancel ends a reply as a limit does."""
    return "stop" if settlement.finish_reason == "stop" else "length"


@dataclass(frozen=True, slots=True)
class Head:
    """What every object of one response repeats."""

    id: str
    created: int
    model: str

    def object(self, kind: str, choices: list[Json], **extra: Any) -> Json:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def chat_completion(head: Head, text: str, settlement: Settlement) -> Json:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": None,
        "finish_reason": finish_reason(settlement),
    }
    return head.object(
        "chat.completion", [choice], usage=usage(settlement), farmesh=farmesh_field(settlement)
    )


def text_completion(head: Head, text: str, settlement: Settlement) -> Json:
    reason = finish_reason(settlement)
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return head.object(
        "text_completion", [choice], usage=usage(settlement), farmesh=farmesh_field(settlement)
    )


def chat_chunk(head: Head, delta: Json, reason: str | None, *, usage_field: bool) -> Json:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    extra: Json = {"usage": None} if usage_field else {}
    return head.object("chat.completion.chunk", [choice], **extra)


def completion_chunk(head: Head, text: str, reason: str | None, *, usage_field: bool) -> Json:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    extra: Json = {"usage": None} if usage_field else {}
    return head.object("text_completion", [choice], **extra)


def sse(data: Json | str) -> bytes:
    """One server-sent event (WHATWG HTML §9.2) carrying ``data``."""
    body = data.encode() if isinstance(data, str) else msgspec.json.encode(data)
    return b"data: " + body + b"\n\n"


DONE = sse("[DONE]")


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: HTTPStatus
    type: str
    code: str | None = None
    param: str | None = None


_INVALID = ErrorKind(HTTPStatus.BAD_REQUEST, "invalid_request_error")
_UNAVAILABLE = ErrorKind(HTTPStatus.SERVICE_UNAVAILABLE, "server_error")
ERROR_KINDS: dict[str, ErrorKind] = {
    "unauthorized": ErrorKind(HTTPStatus.UNAUTHORIZED, "authentication_error", "invalid_api_key"),
    "auth_unavailable": _UNAVAILABLE,
    "wallet_mismatch": ErrorKind(HTTPStatus.FORBIDDEN, "permission_error"),
    "rate_limited": ErrorKind(
        HTTPStatus.TOO_MANY_REQUESTS, "rate_limit_error", "rate_limit_exceeded"
    ),
    "quota_exceeded": ErrorKind(HTTPStatus.TOO_MANY_REQUESTS, "rate_limit_error"),
    "insufficient_balance": ErrorKind(
        HTTPStatus.TOO_MANY_REQUESTS, "insufficient_quota", "insufficient_quota"
    ),
    "budget_exceeded": ErrorKind(HTTPStatus.TOO_MANY_REQUESTS, "insufficient_quota"),
    "context_overflow": ErrorKind(
        HTTPStatus.BAD_REQUEST, "invalid_request_error", "context_length_exceeded", "messages"
    ),
    "model_not_found": ErrorKind(
        HTTPStatus.NOT_FOUND, "invalid_request_error", "model_not_found", "model"
    ),
    "shutting_down": _UNAVAILABLE,
    "mesh_error": _UNAVAILABLE,
    "mesh_unavailable": _UNAVAILABLE,
    "mesh_timeout": _UNAVAILABLE,
    "session_closed": _UNAVAILABLE,
    "internal_error": ErrorKind(HTTPStatus.INTERNAL_SERVER_ERROR, "server_error"),
}


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: HTTPStatus
    body: Json
    headers: dict[str, str]


def error_reply(error: FarmeshError, *, param: str | None = None) -> ErrorReply:
    """OpenAI's ``{"error": {message, type, param, code}}`` with its status and headers:
    ``Retry-After`` (whole seconds, rounded up) and ``retry-after-ms`` when the engine says
    when to retry, and ``x-should-retry`` from the error's ``retryable`` flag (OpenAI's SDKs
    follow it instead of guessing from the status)."""
    kind = ERROR_KINDS.get(error.code, _INVALID)
    body = {
        "error": {
            "message": error.message,
            "type": kind.type,
            "param": param or kind.param,
            "code": kind.code or error.code,
        }
    }
    headers = {"x-should-retry": "true" if error.retryable else "false"}
    retry_after = error.retry_after_s if isinstance(error, RateLimited | QuotaExceeded) else None
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        headers["retry-after-ms"] = str(max(1, math.ceil(retry_after * 1000)))
    if kind.status is HTTPStatus.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    return ErrorReply(kind.status, body, headers)
