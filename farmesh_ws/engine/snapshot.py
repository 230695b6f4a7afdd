"""What another gateway needs to rebuild a conversation (protocol.md §2.3, ARCHITECTURE.md
"Sessions outlive hiccups"): the token ids the mesh holds, the session's settings, its budget
and spend, its turns, and where its numbered frames stand.

A :class:`SessionSnapshot` is plain data (msgspec; money as decimal strings, never float). The
engine takes one of a :class:`~farmesh_ws.engine.conversation.Conversation` with
:func:`snapshot_of` and rebuilds a conversation from it with
:meth:`~farmesh_ws.engine.sessions.SessionManager.restore`; where snapshots are kept and who may
take one is :mod:`farmesh_ws.api.v1_handoff`'s.
"""

from decimal import Decimal

import msgspec

from farmesh_ws.core.types import SamplingOverrides
from farmesh_ws.engine.conversation import Conversation, TurnMark
from farmesh_ws.mesh.base import Mark

SNAPSHOT_VERSION = 1


class TurnRecord(msgspec.Struct, frozen=True, array_like=True):
    """A :class:`~farmesh_ws.engine.conversation.TurnMark`: where the turn began (tokens held,
    the pending token) and the token ids it sent."""

    position: int
    pending: int | None
    token_ids: list[int]


class SessionSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One chat session between requests.

    ``owner``: the gateway process that holds it (None: released, free to move);
    ``token_hash``: SHA-256 of its resume token (hex); ``transcript``/``pending``: the ids the
    mesh holds and the generated token not yet sent; ``last_seq``: the seq of its last frame;
    ``running``: the id of a request started and not yet settled (lost if the owner died);
    ``frames``: its newest frames (protocol v1 JSON, the last has ``last_seq``): a settled
    request's last ones, or every one a released session kept.
    """

    session_id: str
    owner: str | None
    token_hash: str
    principal_id: str
    wallet: str | None
    model_id: str
    max_length: int
    system_prompt: str | None
    sampling: SamplingOverrides
    budget_far: Decimal | None
    spent_far: Decimal
    transcript: list[int]
    pending: int | None
    history: list[TurnRecord]
    last_seq: int
    running: str | None = None
    frames: list[str] = msgspec.field(default_factory=list)
    version: int = SNAPSHOT_VERSION


def snapshot_of(
    conversation: Conversation,
    *,
    owner: str | None,
    token_hash: str,
    last_seq: int,
    running: str | None,
    frames: list[str] | None = None,
) -> SessionSnapshot | None:
    """The conversation as it stands, or None when its mesh session keeps no transcript (a
    synthetic session): such a conversation cannot move."""
    mesh = conversation.mesh
    transcript = list(mesh.transcript)
    if len(transcript) != mesh.position:
        return None
    mark = mesh.mark()
    return SessionSnapshot(
        session_id=conversation.session_id,
        owner=owner,
        token_hash=token_hash,
        principal_id=conversation.principal.principal_id,
        wallet=conversation.wallet,
        model_id=conversation.model_id,
        max_length=mesh.max_length,
        system_prompt=conversation.system_prompt,
        sampling=conversation.sampling,
        budget_far=conversation.budget_far,
        spent_far=conversation.spent_far,
        transcript=transcript,
        pending=mark.pending,
        history=[
            TurnRecord(turn.mark.position, turn.mark.pending, list(turn.token_ids))
            for turn in conversation.history
        ],
        last_seq=last_seq,
        running=running,
        frames=frames or [],
    )


def history_of(snapshot: SessionSnapshot) -> list[TurnMark]:
    return [
        TurnMark(Mark(turn.position, turn.pending), tuple(turn.token_ids))
        for turn in snapshot.history
    ]


def encode_snapshot(snapshot: SessionSnapshot) -> str:
    return msgspec.json.encode(snapshot).decode()


def decode_snapshot(text: str) -> SessionSnapshot | None:
    """The snapshot, or None for one this version cannot read (another version's, or
    damaged): such a session cannot move here."""
    try:
        snapshot = msgspec.json.decode(text, type=SessionSnapshot)
    except msgspec.DecodeError:
        return None
    return snapshot if snapshot.version == SNAPSHOT_VERSION else None
