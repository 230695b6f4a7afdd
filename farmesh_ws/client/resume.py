"""Re-attaching a chat session after its connection dropped (protocol.md §2.2).

The client remembers the session's ``resume_token`` and the ``seq`` of the last frame it
routed; when the connection drops, or the server closes it after ``going_away`` (it lets its
sessions go to another gateway behind the same URL, §2.3), it reconnects with exponential
backoff (0.1 s doubling up to 2 s) for up to ``resume_within_s`` and sends ``resume``: the
server replays the frames after that ``seq``, so every stream continues with nothing lost or
repeated. Retryable refusals (``session_elsewhere`` while another gateway lets the session
go) are retried the same way.
"""

import asyncio
import time
from dataclasses import dataclass, field

import msgspec
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from farmesh_ws import protocol as p
from farmesh_ws.client import wire
from farmesh_ws.client.errors import ConnectFailed, FarmeshClientError
from farmesh_ws.client.handshake import open_websocket

FIRST_DELAY_S = 0.1
MAX_DELAY_S = 2.0


@dataclass(slots=True)
class ResumePoint:
    """Where a session's frames stand: ``last_seq`` is the last one routed."""

    session_id: str
    resume_token: str = field(repr=False)
    last_seq: int


async def reattach(
    url: str, point: ResumePoint, *, token: str | None, timeout_s: float, within_s: float
) -> ClientConnection:
    """A new connection that holds the session again, the replayed frames waiting in it.
    Raises :class:`FarmeshClientError` with the server's code (``resume_denied``,
    ``session_expired``, ``unauthorized``, …) when the server refuses, or
    :class:`ConnectFailed` when no connection could be made within ``within_s``."""
    deadline = time.monotonic() + within_s
    delay = FIRST_DELAY_S
    while True:
        try:
            return await _try(url, point, token=token, timeout_s=timeout_s)
        except FarmeshClientError as exc:
            if not exc.retryable or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)  # backoff before the next attempt
        delay = min(delay * 2, MAX_DELAY_S)


async def _try(
    url: str, point: ResumePoint, *, token: str | None, timeout_s: float
) -> ClientConnection:
    connection = await open_websocket(url, timeout_s=timeout_s, token=token)
    message = p.Resume(
        session_id=point.session_id, resume_token=point.resume_token, last_seq=point.last_seq
    )
    try:
        await connection.send(wire.encode(message))
        frame = await asyncio.wait_for(connection.recv(), timeout_s)
        answer = wire.DECODER.decode(frame)
    except (ConnectionClosed, TimeoutError, msgspec.MsgspecError) as exc:
        await connection.close()
        raise ConnectFailed(f"the resume on {url} got no answer: {exc!r}") from None
    if isinstance(answer, p.Resumed):
        return connection
    await connection.close()
    if isinstance(answer, p.Error):
        raise FarmeshClientError.from_frame(answer)
    kind = str(type(answer).__struct_config__.tag)
    raise FarmeshClientError("protocol_error", f"expected 'resumed', got {kind!r}")
