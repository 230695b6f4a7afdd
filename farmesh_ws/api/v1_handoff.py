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
from dataclasses import dataclass, field

import msgspec

from farmesh_ws import protocol as p
from farmesh_ws.api.v1_frames import error_frame
from farmesh_ws.api.v1_resume import Outbox
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


@dataclass(slots=True, eq=False)
class _Held:
    """A session of this gateway's: ``written`` is the snapshot it last stored (None: none
    yet). Its writes go one at a time (``lock``), none after it ended here (``ended``), and
    each only if the store still holds ``written``: a write that finds something else means
    another gateway took the session."""

    token_hash: str
    snapshot: SessionSnapshot | None = None
    written: str | None = None
    ended: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Handoff:
    """This gateway's side of moving sessions: its own sessions' snapshots, and taking others'."""

    def __init__(
        self,
        settings: Settings,
        registry: SessionRegistry,
        *,
        waiting: Callable[[], list[str]],
        release: Callable[[str], None],
        lost: Callable[[str], None],
    ) -> None:
        """``waiting()``: the held sessions that have no connection now; ``release(id)``: let
        one go (it ends here with :meth:`forget`, its frames released); ``lost(id)``: end one
        another gateway has taken meanwhile (this gateway's lease had lapsed)."""
        self._settings = settings
        self._registry = registry
        self._waiting = waiting
        self._release = release
        self._lost = lost
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
        """Write the session's snapshot now: its frames up to ``last_seq``, the newest of them
        ``frames``. A session that cannot move (its mesh keeps no transcript) has none."""
        session_id = conversation.session_id
        held = self._held.get(session_id)
        if held is None:
            return
        async with held.lock:
            if held.ended:
                return
            held.snapshot = snapshot_of(
                conversation,
                owner=self._registry.process_id,
                token_hash=held.token_hash,
                last_seq=last_seq,
                running=running,
                frames=[p.encode_server_message(frame) for frame in frames],
            )
            value = None if held.snapshot is None else encode_snapshot(held.snapshot)
            if await self._write(session_id, held, value):
                return
            self._end(session_id, held)
        self._lost(session_id)

    async def forget(self, session_id: str, *, released: Outbox | None) -> None:
        """The session ended here: delete its snapshot, or, with ``released`` (its outbox),
        release it with the frames it kept for another gateway to take."""
        held = self._held.pop(session_id, None)
        if held is None:
            return
        async with held.lock:
            if held.ended:
                return
            held.ended = True
            if released is None or held.snapshot is None:
                await self._write(session_id, held, None)
                return
            frames = [p.encode_server_message(frame) for frame in released.kept()]
            snapshot = msgspec.structs.replace(
                held.snapshot, owner=None, frames=frames, last_seq=released.last_seq
            )
            await self._write(session_id, held, encode_snapshot(snapshot))
        logger.info("session %s released for another gateway", session_id[:8])

    async def give_back(self, snapshot: SessionSnapshot) -> None:
        """Release a snapshot :meth:`take` gave that could not be rebuilt here, for another
        gateway (or a later resume) to try."""
        held = self._held.pop(snapshot.session_id, None)
        if held is not None:
            released = msgspec.structs.replace(snapshot, owner=None)
            await self._write(snapshot.session_id, held, encode_snapshot(released))

    async def take(
        self, session_id: str, token: str, principal: Principal, last_seq: int
    ) -> tuple[SessionSnapshot, list[p.ServerMessage]]:
        """Take another gateway's session for a ``resume`` from ``last_seq``: its snapshot and
        the frames to keep (those a released session kept, when the client may still miss
        some). Raises :class:`SessionExpired` (no snapshot, or one this version cannot read),
        :class:`ResumeDenied` (wrong token or principal, or frames after ``last_seq`` lost with
        a dead owner) or :class:`SessionElsewhere` (its owner still holds it and was asked to
        let it go; or the shared state cannot be reached now)."""
        store = self._registry.store
        raw = await store.get_value(_SNAPSHOT_KEY + session_id)
        if store.degraded:  # this process's stand-in state knows no other gateway's session
            raise SessionElsewhere("the shared session state cannot be reached", retry_after_s=1)
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
        kept = frames_of(snapshot) if last_seq < snapshot.last_seq else []
        if kept is None or not snapshot.last_seq - len(kept) <= last_seq:
            raise ResumeDenied(
                f"frames after seq {last_seq} were lost with the gateway that held the session"
            )
        held = _Held(snapshot.token_hash, snapshot, written=raw)
        mine = msgspec.structs.replace(snapshot, owner=self._registry.process_id, frames=[])
        if not await self._write(session_id, held, encode_snapshot(mine), or_absent=False):
            raise SessionElsewhere("another gateway is taking this session", retry_after_s=1.0)
        self._held[session_id] = held
        logger.info("session %s moved here from %s", session_id[:8], owner or "a drained gateway")
        return snapshot, kept

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
            await asyncio.sleep(min(settings.coordinator_lease_s, self._grace_s) / 3)
            for session_id in self._waiting():
                if await store.take_value(_WANTED_KEY + session_id) is not None:
                    self._release(session_id)
            if loop.time() - renewed >= self._grace_s / 3:
                renewed = loop.time()
                for session_id, held in list(self._held.items()):
                    await self._renew_one(session_id, held)

    async def _renew_one(self, session_id: str, held: _Held) -> None:
        async with held.lock:
            if held.ended or held.written is None:
                return
            if await self._write(session_id, held, held.written):
                return
            self._end(session_id, held)
        self._lost(session_id)

    async def _write(
        self, session_id: str, held: _Held, value: str | None, *, or_absent: bool = True
    ) -> bool:
        """Store ``value`` (None: delete) if the store still holds what this gateway last
        wrote (or, with ``or_absent``, nothing: it expired). False: another gateway holds the
        session now; a store that cannot be reached counts as a success (nothing to learn)."""
        store, key = self._registry.store, _SNAPSHOT_KEY + session_id
        for expected in (held.written, None) if or_absent else (held.written,):
            if await store.swap_value(key, expected, value, self._grace_s) or store.degraded:
                held.written = value
                return True
            if expected is None:
                break
        return False

    def _end(self, session_id: str, held: _Held) -> None:
        held.ended = True
        self._held.pop(session_id, None)
        logger.warning("session %s was taken over by another gateway; ending it here", session_id)

    @property
    def _grace_s(self) -> float:
        return self._settings.resume_grace_s


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


def frames_of(snapshot: SessionSnapshot) -> list[p.ServerMessage] | None:
    """The frames the snapshot kept, oldest first; None when they are not the run of frames
    that ends at its ``last_seq``, or this version cannot read one (a newer gateway's)."""
    try:
        frames = [_frame_decoder.decode(frame) for frame in snapshot.frames]
    except msgspec.MsgspecError:
        return None
    first = snapshot.last_seq - len(frames) + 1
    if [frame.seq for frame in frames] != list(range(first, snapshot.last_seq + 1)):
        return None
    return frames
