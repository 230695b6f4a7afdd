"""Reuse of the mesh's attention caches across stateless requests (http.md §9).

OpenAI clients send the whole conversation with every request. After such a request the
engine keeps its mesh session, whose servers hold the attention caches of the prompt and the
reply, for ``reuse_ttl_s``. A later request of the same principal, billing the same wallet, on
the same model, whose prompt's token ids start with that session's whole
:attr:`~farmesh_ws.mesh.base.MeshSession.transcript` continues the session: only the ids after
it reach the mesh. Anything else (an edited or branched history, another model, wallet or
principal) finds nothing here and opens a fresh session. A kept session serves one request at
a time: :meth:`ReuseCache.take` removes it from the cache until :meth:`ReuseCache.keep` (or
:meth:`ReuseCache.put_back` when that request was refused).

Bounds, all configurable (.env.example): ``reuse_sessions_per_principal`` kept sessions per
principal (0 turns reuse off) and ``reuse_max_sessions`` in all, the least recently used
evicted first. A kept session's ``max_length`` stays reserved (:mod:`~farmesh_ws.engine.quotas`,
which sees the cache as its :class:`~farmesh_ws.engine.quotas.KeptReservations`): against its
principal's reserved-token cap, given back when that principal needs it; and against the mesh,
where the kept sessions of a model together hold at most ``reuse_max_cache_share`` of what this
gateway could hold there (no share applies while the mesh's capacity is unknown), and give way
when the mesh is too full for new work.
"""

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from farmesh_ws.config import Settings
from farmesh_ws.engine.quotas import Quotas, Reservation
from farmesh_ws.mesh.base import MeshSession

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class KeptSession:
    """A mesh session between requests, with the reservation of its ``max_length``.
    ``owner``: the principal's quota key and the wallet its requests bill; ``expires_at``:
    when the cache drops it (event loop time, s)."""

    owner: tuple[str, str | None]
    mesh: MeshSession
    reservation: Reservation
    expires_at: float = 0.0
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


class ReuseCache:
    """Kept sessions in least-recently-used order."""

    def __init__(self, settings: Settings, quotas: Quotas) -> None:
        self._settings = settings
        self._quotas = quotas
        self._kept: OrderedDict[KeptSession, None] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def enabled(self) -> bool:
        s = self._settings
        return s.reuse_sessions_per_principal > 0 and s.reuse_max_sessions > 0

    def __len__(self) -> int:
        return len(self._kept)

    def take(
        self,
        owner: tuple[str, str | None],
        model_id: str,
        prompt: Sequence[int],
        max_new_tokens: int,
    ) -> KeptSession | None:
        """The owner's kept session on ``model_id`` with the longest transcript that ``prompt``
        strictly extends and room for ``prompt`` and ``max_new_tokens`` more, removed from the
        cache; None if there is none."""
        best: KeptSession | None = None
        best_length = 0
        for kept in self._kept:
            mesh = kept.mesh
            if kept.owner != owner or mesh.model_id != model_id:
                continue
            if len(prompt) + max_new_tokens > mesh.max_length:
                continue
            transcript = mesh.transcript
            length = len(transcript)
            if best_length < length < len(prompt) and list(prompt[:length]) == list(transcript):
                best, best_length = kept, length
        if best is not None:
            self._remove(best)
        return best

    def keep(self, kept: KeptSession) -> None:
        """Keep a session after its request, as the most recently used, for ``reuse_ttl_s``."""
        loop = asyncio.get_running_loop()
        kept.expires_at = loop.time() + self._settings.reuse_ttl_s
        self._insert(kept)

    def put_back(self, kept: KeptSession) -> None:
        """Return a session :meth:`take` gave to a request that was then refused, with the
        time to live it had."""
        self._insert(kept)

    def held_by(self, quota_key: str) -> int:
        return sum(k.reservation.tokens for k in self._kept if k.owner[0] == quota_key)

    def reclaim(self, quota_key: str) -> bool:
        for kept in self._kept:
            if kept.owner[0] == quota_key:
                self._evict(kept)
                return True
        return False

    def give_way(self, model_id: str, tokens: int) -> None:
        freed = 0
        for kept in [k for k in self._kept if k.mesh.model_id == model_id]:
            if freed >= tokens:
                return
            freed += kept.reservation.tokens
            self._evict(kept)

    async def aclose(self) -> None:
        """Close every kept session, and any handed back later (server shutdown)."""
        self._closed = True
        for kept in list(self._kept):
            self._evict(kept)
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _insert(self, kept: KeptSession) -> None:
        """Add ``kept`` as the most recently used and evict what the bounds no longer allow
        (``kept`` last: it is closed if it does not fit alone)."""
        if self._closed or not kept.mesh.transcript:
            self._close(kept)
            return
        loop = asyncio.get_running_loop()
        self._kept[kept] = None
        kept.expiry = loop.call_at(kept.expires_at, self._expire, kept)
        owned = [k for k in self._kept if k.owner[0] == kept.owner[0]]
        for old in owned[: max(0, len(owned) - self._settings.reuse_sessions_per_principal)]:
            self._evict(old)
        while len(self._kept) > self._settings.reuse_max_sessions:
            self._evict(next(iter(self._kept)))
        model_id = kept.mesh.model_id
        for old in [k for k in self._kept if k.mesh.model_id == model_id]:
            if not self._over_share(model_id):
                break
            self._evict(old)

    def _over_share(self, model_id: str) -> bool:
        """The kept sessions on ``model_id`` hold more than ``reuse_max_cache_share`` of what
        this gateway could hold there (unknown capacity: no share applies)."""
        could_hold = self._quotas.could_hold(model_id)
        if could_hold is None:
            return False
        kept = sum(k.reservation.tokens for k in self._kept if k.mesh.model_id == model_id)
        return kept > self._settings.reuse_max_cache_share * could_hold

    def _expire(self, kept: KeptSession) -> None:
        if kept in self._kept:
            self._evict(kept)

    def _evict(self, kept: KeptSession) -> None:
        self._remove(kept)
        self._close(kept)

    def _remove(self, kept: KeptSession) -> None:
        self._kept.pop(kept, None)
        if kept.expiry is not None:
            kept.expiry.cancel()
            kept.expiry = None

    def _close(self, kept: KeptSession) -> None:
        self._quotas.release(kept.reservation, session=False)
        task = asyncio.get_running_loop().create_task(
            self._close_mesh(kept.mesh), name="farmesh-reuse-close"
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_mesh(mesh: MeshSession) -> None:
        try:
            await mesh.aclose()
        except Exception:
            logger.warning("closing a kept mesh session failed", exc_info=True)
