"""A ``resume`` (protocol.md §2.2, §2.3): find the session, here or at another gateway.

A session this gateway keeps is re-attached as it is (:class:`~.v1_resume.ResumableSessions`);
one it does not is taken from another gateway (:class:`~.v1_handoff.Handoff`) and rebuilt on a
new mesh session, its frames numbered on from where the client stands.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from farmesh_ws import protocol as p
from farmesh_ws.api.v1_handoff import Handoff, lost_request_frames
from farmesh_ws.api.v1_resume import Outbox, ResumableSessions, Send
from farmesh_ws.core.principal import Principal
from farmesh_ws.engine.conversation import Client, Conversation
from farmesh_ws.engine.engine import Engine
from farmesh_ws.errors import SessionExpired

if TYPE_CHECKING:
    from farmesh_ws.api.v1 import V1Session


@dataclass(slots=True)
class Reattached:
    """The session for the resuming connection: ``resumed`` to send first, then the outbox's
    frames after the client's ``last_seq``, then ``lost`` (a request its last gateway did not
    finish, closed: ``error`` and ``done``)."""

    client: Client
    conversation: Conversation
    outbox: Outbox
    resumed: p.Resumed
    lost: list[p.ServerMessage] = field(default_factory=list)


async def reattach(
    holder: "V1Session",
    message: p.Resume,
    principal: Principal,
    *,
    engine: Engine,
    client_key: str,
    send: Send,
    resumable: ResumableSessions,
    handoff: Handoff | None,
) -> Reattached:
    """The session ``message`` names, now held by ``holder``. Raises ``SessionExpired``,
    ``ResumeDenied``, ``SessionElsewhere`` or what opening a conversation raises (then
    nothing changed)."""
    try:
        previous = resumable.take(
            message.session_id,
            message.resume_token,
            principal,
            holder,
            check=lambda outbox: outbox.check_replay(message.last_seq),
        )
    except SessionExpired:
        if handoff is None:
            raise
        moved = await _move_here(holder, message, principal, engine, send, resumable, handoff)
        return Reattached(Client(client_key, principal), *moved)
    previous.moved = True  # its connection, if still open, no longer has the session
    outbox, client, conversation = previous.outbox, previous.client, previous.conversation
    if outbox is None or client is None or conversation is None:
        raise SessionExpired("the session is gone")
    outbox.detach()
    client.principal = principal
    resumed = p.Resumed(
        session_id=conversation.session_id,
        model=conversation.model_id,
        max_length=conversation.mesh.max_length,
        last_seq=outbox.last_seq,
    )
    return Reattached(client, conversation, outbox, resumed)


async def _move_here(
    holder: "V1Session",
    message: p.Resume,
    principal: Principal,
    engine: Engine,
    send: Send,
    resumable: ResumableSessions,
    handoff: Handoff,
) -> tuple[Conversation, Outbox, p.Resumed, list[p.ServerMessage]]:
    snapshot, kept = await handoff.take(
        message.session_id, message.resume_token, principal, message.last_seq
    )
    try:
        conversation = await engine.sessions.restore(snapshot, principal)
    except BaseException:
        await handoff.give_back(snapshot)
        raise
    last_seq = max(snapshot.last_seq, message.last_seq)
    cap = engine.settings.resume_outbox_frames
    outbox = Outbox(cap, send, kept=kept, last_seq=last_seq)
    outbox.detach()
    resumable.add(conversation.session_id, bytes.fromhex(snapshot.token_hash), holder)
    resumed = p.Resumed(
        session_id=conversation.session_id,
        model=conversation.model_id,
        max_length=conversation.mesh.max_length,
        last_seq=last_seq,
        moved=True,
    )
    lost = [] if snapshot.running is None else lost_request_frames(snapshot)
    return conversation, outbox, resumed, lost
