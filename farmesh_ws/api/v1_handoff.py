"""Protocol v1 sessions that move between gateways sharing a state store (protocol.md §2.3).

The gateway holding a session (its *owner*) keeps a :class:`~farmesh_ws.engine.snapshot.
SessionSnapshot` of it in the state store (Redis when configured), written when it opens, when
a request starts and settles, and after a rewind, and renewed every third of
``resume_grace_s`` for that long: a snapshot outlives a dead owner by ``resume_grace_s`` at
most. A ``resume`` this gateway cannot serve from its own sessions reads the snapshot; the
session moves here when its owner lets it go:

- the owner shut down: it *released* the session (the snapshot, owner None, with the frames
  its outbox kept, so a client that missed the end of a reply gets it here);
- the owner's lease (:meth:`~farmesh_ws.state.registry.SessionRegistry.process_alive`) lapsed:
  it died, and its frames since the last snapshot are lost;
- the owner is alive and the session waits there for a resume: this gateway asks for it
  (``session-wanted:<id>``, kept ``coordinator_lease_s``) and answers ``session_elsewhere``
  (retryable); the owner releases it within a third of ``coordinator_lease_s``.

Exactly one gateway takes a snapshot (the state store's single-use take); it then rebuilds the
conversation (:meth:`~farmesh_ws.engine.sessions.SessionManager.restore`) and owns it.
"""

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from farmesh_ws import protocol as p
from farmesh_ws.api.v1_frames import error_frame
from farmesh_ws.config import Settings
from farmesh_ws.core.principal import Principal
from farmesh_ws.core.tasks import cancel_and_wait
from farmesh_ws.engine.conversation import Conversation
from farmesh_ws.engine.snapshot import (
    SessionSnapshot,
    decode_snapshot,
    encode_snapshot,
    snapshot_of,
)
from farmesh_ws.errors import CoordinatorLost, ResumeDenied, SessionElsewhere, SessionExpired
from farmesh_ws.state.registry import SessionRegistry

logger = logging.getLogger(__name__)

_SNAPSHOT_KEY = "session-snapshot:"
_WANTED_KEY = "session-wanted:"
_frame_decoder: msgspec.json.Decoder[p.ServerMessage] = msgspec.json.Decoder(p.ServerMessage)


@dataclass(slots=True)
class _Held:
    token_hash: str
    snapshot: SessionSnapshot | None = None


class Handoff:
    """This gateway's side of moving sessions: its own sessions' snapshots, and taking others'."""

    def __init__(
        self,
        settings: Settings,
        registry: SessionRegistry,
        *,
        waiting: Callable[[], list[str]],
        release: Callable[[str], None],
    ) -> None:
        """``waiting()``: the held sessions that have no connection now; ``release(id)``: let
        one go (it ends here with :meth:`forget`, its frames released)."""
        self._settings = settings
        self._registry = registry
        self._waiting = waiting
        self._release = release
        self._held: dict[str, _Held] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._settings.resume_grace_s > 0

    def hold(self, session_id: str, token_digest: bytes) -> None:
        """Start keeping snapshots of a session this gateway opened or took over."""
        self._held[session_id] = _Held(token_digest.hex())

    async def save(
        self,
        conversation: Conversation,
        last_seq: int,
        running: str | None,
        frames: Sequence[p.ServerMessage] = (),
    ) -> None:
        """Write the session's snapshot now, with its newest ``frames`` (the last has
        ``last_seq``); a session that cannot move writes none."""
        held = self._held.get(conversation.session_id)
        if held is None:
            return
        held.snapshot = snapshot_of(
            conversation,
            owner=self._registry.process_id,
            token_hash=held.token_hash,
            last_seq=last_seq,
            running=running,
            frames=[p.encode_server_message(frame) for frame in frames],
        )
        if held.snapshot is not None:
            await self._put(held.snapshot)

    async def forget(
        self, session_id: str, *, release_frames: list[p.ServerMessage] | None
    ) -> None:
        """The session ended here: delete its snapshot, or, with ``release_frames`` (the
        frames its outbox kept), release it for another gateway to take."""
        held = self._held.pop(session_id, None)
        if held is None:
            return
        if release_frames is None or held.snapshot is None:
            await self._registry.store.take_value(_SNAPSHOT_KEY + session_id)
            return
        frames = [p.encode_server_message(frame) for frame in release_frames]
        await self._put(msgspec.structs.replace(held.snapshot, owner=None, frames=frames))
        logger.info("session %s released for another gateway", session_id[:8])

    async def give_back(self, snapshot: SessionSnapshot) -> None:
        """Put back a snapshot :meth:`take` gave that could not be rebuilt here, released
        for another gateway (or a later resume) to try."""
        self._held.pop(snapshot.session_id, None)
        await self._put(msgspec.structs.replace(snapshot, owner=None))

    async def take(
        self, session_id: str, token: str, principal: Principal, last_seq: int
    ) -> SessionSnapshot:
        """Take another gateway's session for a ``resume``. Raises :class:`SessionExpired`
        (no snapshot, or one this version cannot read), :class:`ResumeDenied` (wrong token or
        principal, or frames after ``last_seq`` lost with a dead owner) or
        :class:`SessionElsewhere` (its owner still holds it; asked to let it go)."""
        store = self._registry.store
        raw = await store.get_value(_SNAPSHOT_KEY + session_id)
        snapshot = None if raw is None else decode_snapshot(raw)
        if snapshot is None:
            raise SessionExpired("the session is gone: closed, or not resumed in time")
        digest = hashlib.sha256(token.encode()).hexdigest()
        if not hmac.compare_digest(snapshot.token_hash, digest):
            raise ResumeDenied("wrong resume_token for this session")
        if snapshot.principal_id != principal.principal_id:
            raise ResumeDenied("the session belongs to another principal")
        owner = snapshot.owner
        if owner is not None and await self._registry.process_alive(owner):
            lease_s = self._settings.coordinator_lease_s
            await store.put_value(_WANTED_KEY + session_id, "1", lease_s)
            raise SessionElsewhere(
                "another gateway holds this session; it moves here when that gateway lets it go",
                retry_after_s=lease_s / 3,
            )
        first_kept = snapshot.last_seq - len(snapshot.frames) + 1
        if not first_kept - 1 <= last_seq:
            raise ResumeDenied(
                f"frames after seq {last_seq} were lost with the gateway that held the session"
            )
        raw = await store.take_value(_SNAPSHOT_KEY + session_id)
        taken = None if raw is None else decode_snapshot(raw)
        if taken is None or taken.owner != owner:
            raise SessionElsewhere("another gateway is taking this session", retry_after_s=1.0)
        self._held[session_id] = _Held(taken.token_hash, taken)
        logger.info("session %s moved here from %s", session_id[:8], owner or "a drained gateway")
        return taken

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._renew(), name="farmesh-session-snapshots")

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _renew(self) -> None:
        """Every third of ``coordinator_lease_s``: let go of the waiting sessions another
        gateway asked for; every third of ``resume_grace_s``: renew every snapshot."""
        settings, store = self._settings, self._registry.store
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(min(settings.coordinator_lease_s, settings.resume_grace_s) / 3)
            for session_id in self._waiting():
                if await store.take_value(_WANTED_KEY + session_id) is not None:
                    self._release(session_id)
            if loop.time() - renewed >= settings.resume_grace_s / 3:
                renewed = loop.time()
                for held in list(self._held.values()):
                    if held.snapshot is not None:
                        await self._put(held.snapshot)

    async def _put(self, snapshot: SessionSnapshot) -> None:
        key = _SNAPSHOT_KEY + snapshot.session_id
        await self._registry.store.put_value(
            key, encode_snapshot(snapshot), self._settings.resume_grace_s
        )


def lost_request_frames(snapshot: SessionSnapshot) -> list[p.ServerMessage]:
    """The end of the request that was running when the session's last gateway died: an
    ``error`` (``coordinator_lost``) and a ``done`` with nothing counted here (what it
    generated there is settled from that gateway's ledger checkpoint, protocol.md §7)."""
    request_id = snapshot.running
    if request_id is None:
        return []
    lost = CoordinatorLost("the gateway running this request stopped before it finished")
    return [
        error_frame(lost, request_id),
        p.Done(
            request_id=request_id,
            finish_reason="error",
            usage=p.Usage(prompt_tokens=0, completion_tokens=0, cached_tokens=0, cost_far="0"),
            position=len(snapshot.transcript),
            max_length=snapshot.max_length,
            duration_ms=0.0,
            error=lost.code,
        ),
    ]


def frames_of(snapshot: SessionSnapshot) -> list[p.ServerMessage]:
    """The frames a released session's outbox kept, oldest first."""
    return [_frame_decoder.decode(frame) for frame in snapshot.frames]
