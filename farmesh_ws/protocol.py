"""Protocol v1 messages (protocol.md): one tagged union per direction, decoded with msgspec.

Client messages forbid unknown fields and carry their limits in ``Meta``, so a bad frame
becomes one readable ``invalid_message`` error naming the JSON path. Limits that depend on
configuration (max_length, max_new_tokens, text size) are checked by the engine
(:mod:`farmesh_ws.engine.limits`). Patterns end in ``\\Z``: Python's ``$`` also matches
before a final newline, which would let ``"w\n"`` pass as a wallet.
"""

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from farmesh_ws.core.money import far_text
from farmesh_ws.core.settlement import Settlement
from farmesh_ws.errors import InvalidJson, InvalidMessage

PROTOCOL_VERSION: Final = 1

RequestId = Annotated[str, Meta(min_length=1, max_length=128)]
Wallet = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+\Z")]
ModelName = Annotated[str, Meta(min_length=1, max_length=200)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=0, le=1000)]
RepetitionPenalty = Annotated[float, Meta(ge=1.0, le=2.0)]
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]
PositiveTokens = Annotated[int, Meta(ge=1)]
FarAmount = Annotated[str, Meta(pattern=r"^[0-9]{1,12}(\.[0-9]{1,8})?\Z")]
StopSequence = Annotated[str, Meta(min_length=1, max_length=64)]
StopList = Annotated[list[StopSequence], Meta(max_length=8)]


class _ClientMessage(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"
):
    pass


class Sampling(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sampling options; every field optional. ``temperature`` 0 is greedy."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    max_new_tokens: PositiveTokens | None = None
    stop: StopList | None = None


class Open(_ClientMessage, tag="open", frozen=True):
    model: ModelName | None = None
    max_length: PositiveTokens | None = None
    user_wallet: Wallet | None = None
    system_prompt: str | None = None
    sampling: Sampling | None = None
    max_cost_far: FarAmount | None = None


class _TurnOptions(_ClientMessage, frozen=True):
    """What a turn may set for itself over the session's defaults (§3.2)."""

    request_id: RequestId
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    max_new_tokens: PositiveTokens | None = None
    stop: StopList | None = None
    max_cost_far: FarAmount | None = None


class Turn(_TurnOptions, tag="turn", frozen=True, kw_only=True):
    text: Annotated[str, Meta(min_length=1)]


class Regenerate(_TurnOptions, tag="regenerate", frozen=True):
    """§3.8: the last turn again, in place of its reply; sampling as in ``turn``."""


class Rewind(_ClientMessage, tag="rewind", frozen=True):
    """§3.9: drop the last ``turns`` turns."""

    turns: PositiveTokens


class Generate(_ClientMessage, tag="generate", frozen=True):
    request_id: RequestId
    prompt: Annotated[str, Meta(min_length=1)]
    max_tokens: PositiveTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user_wallet: Wallet | None = None
    model_id: ModelName | None = None
    max_cost_far: FarAmount | None = None


class Cancel(_ClientMessage, tag="cancel", frozen=True):
    request_id: RequestId


class Close(_ClientMessage, tag="close", frozen=True):
    pass


class Resume(_ClientMessage, tag="resume", frozen=True):
    """§2.2: re-attach a session whose connection dropped; ``last_seq``: the last frame seen."""

    session_id: Annotated[str, Meta(min_length=1, max_length=64)]
    resume_token: Annotated[str, Meta(min_length=1, max_length=128)]
    last_seq: Annotated[int, Meta(ge=0)]


class Ping(_ClientMessage, tag="ping", frozen=True):
    data: Annotated[str, Meta(max_length=128)] | None = None


class SiweProof(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An EIP-4361 message and its EIP-191 signature (0x + 130 hex digits)."""

    message: Annotated[str, Meta(min_length=1, max_length=4096)]
    signature: Annotated[str, Meta(pattern=r"^0x[0-9a-fA-F]{130}\Z")]


class Auth(_ClientMessage, tag="auth", frozen=True):
    """§2.1: exactly one of ``token`` (an API key or session token) and ``siwe``."""

    token: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    siwe: SiweProof | None = None


ClientMessage = Auth | Open | Resume | Turn | Regenerate | Rewind | Generate | Cancel | Close | Ping


class _ServerMessage(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type"
):
    seq: int | None = None
    """§2.2: the frame's number in its session (every frame of an open session but ``pong``)."""


class Authenticated(_ServerMessage, tag="authenticated", frozen=True):
    """§2.1. ``token`` and ``expires_at`` (Unix s) only after a Sign-In with Ethereum."""

    principal: str
    wallet: str | None = None
    token: str | None = None
    expires_at: float | None = None


class Opened(_ServerMessage, tag="opened", frozen=True):
    session_id: str
    model: str
    max_length: int
    price_per_token_far: str
    price_per_prompt_token_far: str
    protocol_version: int  # no default: omit_defaults would drop it (§4.1 shows it)
    resume_token: str | None = None


class GoingAway(_ServerMessage, tag="going_away", frozen=True):
    """§2: the server is shutting down; running requests have ``time_left_s`` to finish,
    then the connection closes with 1001."""

    time_left_s: float


class Rewound(_ServerMessage, tag="rewound", frozen=True):
    """§3.9: ``turns`` dropped; the session holds ``position`` tokens; ``method``: how."""

    turns: int
    position: int
    method: str


class Resumed(_ServerMessage, tag="resumed", frozen=True):
    """§2.2: the session is attached to this connection; the frames after the client's
    ``last_seq`` follow (``last_seq`` here: the session's latest), then the live ones."""

    session_id: str
    model: str
    max_length: int
    last_seq: int
    moved: bool = False
    """§2.3: the session came from another gateway (rebuilt on a new mesh session)."""


class Token(_ServerMessage, tag="token", frozen=True):
    request_id: str
    token: str
    tokens_generated: int
    cost_far: str


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_far: str


class Done(_ServerMessage, tag="done", frozen=True):
    request_id: str
    finish_reason: Literal["stop", "length", "cancelled", "error", "budget"]
    usage: Usage
    position: int
    max_length: int
    duration_ms: float
    time_to_first_token_ms: float | None = None
    error: str | None = None
    rewound: str | None = None


class NodeShare(msgspec.Struct, frozen=True, kw_only=True):
    peer_id: str
    name: str | None
    start_block: int
    end_block: int
    tokens: int
    replayed_tokens: int
    work: int
    share_far: str
    payout_wallet: str | None = None
    payout_bound: bool = False


def node_shares(settlement: Settlement) -> list[NodeShare]:
    """§4.4's ``nodes``: each node's part of a settled request, amounts as decimal strings."""
    return [
        NodeShare(
            peer_id=node.contribution.peer_id,
            name=node.contribution.public_name,
            start_block=node.contribution.start_block,
            end_block=node.contribution.end_block,
            tokens=node.contribution.tokens,
            replayed_tokens=node.contribution.replayed_tokens,
            work=node.contribution.work,
            share_far=far_text(node.share_far),
            payout_wallet=node.contribution.payout_wallet,
            payout_bound=node.contribution.payout_bound,
        )
        for node in settlement.nodes
    ]


class ContributionReport(_ServerMessage, tag="contribution", frozen=True):
    request_id: str
    cost_far: str
    nodes: list[NodeShare]


class Pong(_ServerMessage, tag="pong", frozen=True):
    data: str | None = None


class Closed(_ServerMessage, tag="closed", frozen=True):
    session_id: str | None = None


class Error(_ServerMessage, tag="error", frozen=True):
    code: str
    message: str
    retryable: bool  # no default: omit_defaults would drop ``false`` (§4.6 shows it)
    request_id: str | None = None
    retry_after_s: float | None = None


ServerMessage = (
    Authenticated
    | Opened
    | Resumed
    | Rewound
    | GoingAway
    | Token
    | Done
    | ContributionReport
    | Pong
    | Closed
    | Error
)

_decoder: Final = msgspec.json.Decoder(ClientMessage)
_encoder: Final = msgspec.json.Encoder()


def decode_client_message(frame: str | bytes) -> ClientMessage:
    """Decode one client text frame (§1).

    Raises :class:`~farmesh_ws.errors.InvalidMessage` for a binary frame or a message of the
    wrong shape (msgspec's one-line text, naming the JSON path), and
    :class:`~farmesh_ws.errors.InvalidJson` for text that is not JSON or nests too deeply.
    """
    if isinstance(frame, bytes):
        raise InvalidMessage("binary frames are not supported; send JSON text")
    try:
        message: ClientMessage = _decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise InvalidMessage(str(exc)) from None
    except msgspec.DecodeError:
        raise InvalidJson("the frame is not valid JSON") from None
    except RecursionError:
        raise InvalidJson("the frame nests too deeply") from None
    return message


def request_id_of(message: ClientMessage) -> str | None:
    """The ``request_id`` a message carries, if its type has one."""
    if isinstance(message, Turn | Regenerate | Generate | Cancel):
        return message.request_id
    return None


def encode_server_message(message: ServerMessage) -> str:
    return _encoder.encode(message).decode()
