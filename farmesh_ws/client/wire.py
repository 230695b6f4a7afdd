"""Frames on the wire: client messages encoded (checked against the protocol's static limits)
and server frames decoded into the client's events."""

import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final, get_args

import msgspec

from farmesh_ws import protocol as p
from farmesh_ws.client.errors import FarmeshClientError
from farmesh_ws.client.events import (
    ContributionEvent,
    DoneEvent,
    Event,
    NodeShare,
    TokenEvent,
    Usage,
)
from farmesh_ws.errors import FarmeshError


class _Envelope(msgspec.Struct):
    """Enough of a server frame to know its type and request before decoding it fully."""

    type: str
    request_id: str | None = None
    seq: int | None = None


ENVELOPE: Final = msgspec.json.Decoder(_Envelope)
DECODER: Final = msgspec.json.Decoder(p.ServerMessage)
KNOWN_TYPES: Final = frozenset(str(m.__struct_config__.tag) for m in get_args(p.ServerMessage))


def new_request_id() -> str:
    return uuid.uuid4().hex


def encode(message: p.ClientMessage) -> str:
    """Encode a client message, checked against the protocol's static limits first, so a bad
    argument fails here with its JSON path rather than as an anonymous server error."""
    frame = msgspec.json.encode(message).decode()
    try:
        p.decode_client_message(frame)
    except FarmeshError as exc:
        raise FarmeshClientError(
            exc.code, exc.message, request_id=getattr(message, "request_id", None)
        ) from None
    return frame


def amount(value: Decimal | str | None) -> str | None:
    """A $FAR amount in its wire form (a fixed-point string, never a float)."""
    if value is None or isinstance(value, str):
        return value
    return format(value, "f")


def sampling(value: p.Sampling | Mapping[str, Any] | None) -> p.Sampling | None:
    if value is None or isinstance(value, p.Sampling):
        return value
    try:
        return msgspec.convert(dict(value), p.Sampling)
    except msgspec.ValidationError as exc:
        raise FarmeshClientError("invalid_message", f"sampling: {exc}") from None


def decode_event(message: p.Token | p.Done | p.ContributionReport) -> Event:
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
                payout_wallet=node.payout_wallet,
                payout_bound=node.payout_bound,
            )
            for node in message.nodes
        ),
    )
