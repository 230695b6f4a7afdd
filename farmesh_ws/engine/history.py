"""Going back in a conversation: ``rewind`` drops its last turns, ``regenerate`` (the runner)
replaces its last reply (protocol.md §3.8, §3.9).

Each chat turn that reached the mesh is a :class:`~farmesh_ws.engine.conversation.TurnMark`
in ``Conversation.history``. Going back restores the session to the mark where a turn began
(:meth:`~farmesh_ws.mesh.base.MeshSession.rewind`): the servers roll their caches back where
they can, else the next step opens a new remote session and replays the kept history, which is
credited to the servers that replay it and not billed to the user.
"""

from farmesh_ws.engine.conversation import Client, Conversation, TurnMark
from farmesh_ws.errors import Busy, InvalidRequest, SessionClosed
from farmesh_ws.mesh.base import RewindMethod


def last_turn(conversation: Conversation) -> TurnMark:
    """The conversation's last turn; raises :class:`InvalidRequest` when it has none."""
    if not conversation.history:
        raise InvalidRequest("there is no reply to regenerate: no turn has run yet")
    return conversation.history[-1]


async def rewind(conversation: Conversation, turns: int) -> RewindMethod:
    """Go back to where the last ``turns`` turns began and forget them. Raises
    :class:`InvalidRequest` unless 1 <= ``turns`` <= the turns the conversation has."""
    if not 1 <= turns <= len(conversation.history):
        raise InvalidRequest(
            f"turns must be between 1 and {len(conversation.history)}, the turns so far"
        )
    method = await conversation.mesh.rewind(conversation.history[-turns].mark)
    del conversation.history[-turns:]
    return method


async def rewind_idle(client: Client, conversation: Conversation, turns: int) -> RewindMethod:
    """A ``rewind`` message: only between requests. Raises :class:`SessionClosed`,
    :class:`Busy` or what :func:`rewind` raises; nothing changes then."""
    if conversation.closed:
        raise SessionClosed("the session is closed")
    if client.running is not None:
        raise Busy(f"request {client.running.request_id!r} is still running")
    return await rewind(conversation, turns)
