"""Protocol v1 sessions that outlive their connection (protocol.md §2.2).

Every frame of an open session but ``pong`` goes through the session's :class:`Outbox`, which
numbers it (``seq``, from 1) and keeps the last ``resume_outbox_frames`` of them, and none from
before the previous request (:meth:`Outbox.request_started`). When the
connection drops, :class:`ResumableSessions` keeps the session for ``resume_grace_s``: a running
request goes on generating into the outbox, and a ``resume`` on a new connection, by the same
principal with the session's ``resume_token``, re-attaches it and gets the frames after its
``last_seq`` again. While detached, an outbox that reaches ``resume_outbox_frames`` frames
cancels the running request (its closing frames are still kept): what a resume replays is then
complete. After the grace period the session is closed as if the client had closed it.
"""

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from farmesh_ws import protocol as p
from farmesh_ws.config import Settings
from farmesh_ws.core.principal import Principal
from farmesh_ws.errors import ResumeDenied, SessionExpired

if TYPE_CHECKING:
    from farmesh_ws.api.v1 import V1Session

logger = logging.getLogger(__name__)

Send = Callable[[p.ServerMessage], Awaitable[None]]


class Outbox:
    """A session's numbered frames, sent to the attached connection and kept for a resume.
    ``on_overflow`` is called once when a detached outbox reaches ``cap`` new frames."""

    def __init__(
        self, cap: int, send: Send, *, kept: Iterable[p.ServerMessage] = (), last_seq: int = 0
    ) -> None:
        """``kept``/``last_seq``: where a session moved from another gateway stands."""
        self._cap = cap
        self._send: Send | None = send
        self._frames: deque[p.ServerMessage] = deque(kept)
        self.last_seq = last_seq
        self._detached_at_seq: int | None = None
        self._previous_start = 0
        self.on_overflow: Callable[[], None] = lambda: None

    def request_started(self) -> None:
        """A request was admitted: the client, which runs one at a time, had the previous
        request's ``done``, so frames from before that previous request began are dropped
        (a session holds about two replies' frames, not ``cap``, while its client keeps up)."""
        while self._frames and (self._frames[0].seq or 0) <= self._previous_start:
            self._frames.popleft()
        self._previous_start = self.last_seq

    async def send(self, message: p.ServerMessage) -> None:
        await self.deliver(self.number(message))

    def number(self, message: p.ServerMessage) -> p.ServerMessage:
        """Give ``message`` the next ``seq`` and keep it; :meth:`deliver` sends it."""
        self.last_seq += 1
        framed = msgspec.structs.replace(message, seq=self.last_seq)
        self._frames.append(framed)
        return framed

    async def deliver(self, framed: p.ServerMessage) -> None:
        """Send a frame :meth:`number` kept to the attached connection, if any."""
        if self._send is not None:
            while len(self._frames) > self._cap:
                self._frames.popleft()
            await self._send(framed)
        elif (framed.seq or 0) - (self._detached_at_seq or 0) == self._cap:
            self.on_overflow()

    def detach(self) -> None:
        self._send = None
        self._detached_at_seq = self.last_seq

    def check_replay(self, last_seq: int) -> None:
        """Raises :class:`ResumeDenied` unless every frame after ``last_seq`` is kept."""
        first_kept = self._first_kept()
        if not first_kept - 1 <= last_seq <= self.last_seq:
            raise ResumeDenied(
                f"frames after seq {last_seq} are not available (kept: {first_kept} to "
                f"{self.last_seq})"
            )

    async def attach(self, send: Send, last_seq: int) -> None:
        """Send the frames after ``last_seq`` (:meth:`check_replay` first), then every new one."""
        sent = last_seq
        while sent < self.last_seq:  # frames added while replaying are replayed too
            await send(self._frames[sent + 1 - self._first_kept()])
            sent += 1
        self._send, self._detached_at_seq = send, None

    def kept(self) -> list[p.ServerMessage]:
        """The frames kept for a resume, oldest first."""
        return list(self._frames)

    def _first_kept(self) -> int:
        first = self._frames[0].seq if self._frames else None
        return self.last_seq + 1 if first is None else first


@dataclass(slots=True, eq=False)
class _Entry:
    """``holder``: the connection's session that holds the conversation now (or last, while
    ``attached`` is False)."""

    token_hash: bytes
    holder: "V1Session"
    attached: bool = True
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


def new_resume_token() -> tuple[str, bytes]:
    """A resume token (256 random bits, URL-safe) and the SHA-256 digest kept of it."""
    token = secrets.token_urlsafe(32)
    return token, _digest(token)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def announce_going_away(
    connections: Iterable[ServerConnection], time_left_s: float, *, path: str
) -> None:
    """Tell every protocol v1 connection (those on ``path``) the server is going away (§2),
    before its 1001."""
    frame = p.encode_server_message(p.GoingAway(time_left_s=time_left_s))
    for connection in connections:
        request = connection.request
        if request is not None and request.path.split("?")[0] == path:
            with contextlib.suppress(ConnectionClosed):
                await connection.send(frame)


class ResumableSessions:
    """The v1 sessions of this process that a ``resume`` may re-attach, by session id."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._entries: dict[str, _Entry] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self._settings.resume_grace_s > 0

    def add(self, session_id: str, token_hash: bytes, holder: "V1Session") -> None:
        self._entries[session_id] = _Entry(token_hash, holder)

    def forget(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None and entry.expiry is not None:
            entry.expiry.cancel()

    def detach(self, session_id: str) -> bool:
        """The holder's connection dropped: keep the session for ``resume_grace_s``;
        False if it is not resumable (then the caller closes it)."""
        entry = self._entries.get(session_id)
        if entry is None or not self.enabled or not entry.attached:
            return False
        entry.attached = False
        loop = asyncio.get_running_loop()
        entry.expiry = loop.call_later(self._settings.resume_grace_s, self._expire, session_id)
        logger.info("connection lost; session kept for %.0f s", self._settings.resume_grace_s)
        return True

    def take(
        self,
        session_id: str,
        token: str,
        principal: Principal,
        holder: "V1Session",
        *,
        check: Callable[[Outbox], None],
    ) -> "V1Session":
        """The session's last holder, its connection replaced by ``holder``'s, once ``check``
        passed on its outbox. Raises :class:`SessionExpired` (unknown or gone),
        :class:`ResumeDenied` (wrong token or principal) or what ``check`` raises; nothing
        changes then."""
        entry = self._entries.get(session_id)
        if entry is None:
            raise SessionExpired("the session is gone: closed, or not resumed in time")
        if not hmac.compare_digest(entry.token_hash, _digest(token)):
            raise ResumeDenied("wrong resume_token for this session")
        previous = entry.holder
        conversation, outbox = previous.conversation, previous.outbox
        if conversation is None or conversation.closed or outbox is None:
            raise SessionExpired("the session is gone: closed, or not resumed in time")
        if conversation.principal.principal_id != principal.principal_id:
            raise ResumeDenied("the session belongs to another principal")
        check(outbox)
        if entry.expiry is not None:
            entry.expiry.cancel()
            entry.expiry = None
        entry.holder, entry.attached = holder, True
        return previous

    def waiting(self) -> list[str]:
        """The sessions kept here with no connection, waiting for a resume."""
        return [session_id for session_id, e in self._entries.items() if not e.attached]

    async def give_way(self, quota_key: str) -> bool:
        """Close the oldest of the principal's sessions that wait for a resume (a new session
        of its needs the room); False if none waits."""
        for session_id, entry in self._entries.items():  # oldest first
            conversation = entry.holder.conversation
            if entry.attached or conversation is None:
                continue
            if conversation.principal.quota_key != quota_key:
                continue
            logger.info("session %s gives way to a new session of its principal", session_id[:8])
            if entry.expiry is not None:
                entry.expiry.cancel()
            del self._entries[session_id]
            await entry.holder.aclose()
            return True
        return False

    def release(self, session_id: str) -> None:
        """Let a waiting session go to another gateway (protocol.md §2.3) now."""
        entry = self._entries.get(session_id)
        if entry is not None and entry.expiry is not None:
            entry.expiry.cancel()
        self._expire(session_id, release=True)

    def end(self, session_id: str) -> None:
        """Close a session another gateway took over meanwhile (its connection, if any, is
        closed; the store is left to the new holder)."""
        entry = self._entries.pop(session_id, None)
        if entry is None:
            return
        if entry.expiry is not None:
            entry.expiry.cancel()
        entry.holder.moved = True  # its connection no longer has the session
        task = asyncio.get_running_loop().create_task(entry.holder.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _expire(self, session_id: str, *, release: bool = False) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is None or entry.attached:
            return
        if not release:
            logger.info("session %s not resumed in time; closing", session_id[:8])
        task = asyncio.get_running_loop().create_task(entry.holder.aclose(release=release))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Let every detached session go (server shutdown): another gateway may take it."""
        for session_id in self.waiting():
            self.release(session_id)
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
