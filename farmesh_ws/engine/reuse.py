"""Reuse of the mesh's attention caches across stateless requests (http.md §9).

OpenAI clients send the whole conversation with every request. After such a request the
engine keeps its mesh session, whose servers hold the attention caches of the prompt and the
reply, for ``reuse_ttl_s``. A later request of the same principal, billing the same wallet, on
the same model, whose prompt's token ids start with that session's whole
:attr:`~farmesh_ws.mesh.base.MeshSession.transcript` continues the session: only the ids after
it reach the mesh. Anything else (an edited or branched history, another model, wallet or
principal) finds nothing here and opens a fresh session. A kept session serves one request at
a time: :meth:`ReuseCache.take` removes it from the cache until :meth:`ReuseCache.keep`.

Bounds, all configurable (.env.example): ``reuse_sessions_per_principal`` kept
sessions per principal (0 turns reuse off) and ``reuse_max_sessions`` in all, the least
recently used evicted first; each kept session's ``max_length`` stays reserved
(:mod:`~farmesh_ws.engine.quotas`) against its principal's reserved-token cap, where
:meth:`ReuseCache.reclaim` gives it up for that principal's next reservation, and against the
mesh, where all kept sessions together hold at most ``reuse_max_cache_share`` of what this
gateway could hold.
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
    ``owner``: the principal's quota key and the wallet its requests bill."""

    owner: tuple[str, str | None]
    mesh: MeshSession
    reservation: Reservation
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


class ReuseCache:
    """Kept sessions by owner, in least-recently-used order."""

    def __init__(self, settings: Settings, quotas: Quotas) -> None:
        self._settings = settings
        self._quotas = quotas
        self._kept: OrderedDict[KeptSession, None] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self.hits = 0
        """Requests that continued a kept session."""

    @property
    def enabled(self) -> bool:
        return (
            self._settings.reuse_sessions_per_principal > 0
            and self._settings.reuse_max_sessions > 0
        )

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
        strictly extends, removed from the cache; None if there is none. A matching session
        without room for ``prompt`` and ``max_new_tokens`` more is closed: its conversation has
        outgrown it."""
        best: KeptSession | None = None
        best_length = 0
        for kept in self._kept:
            if kept.owner != owner or kept.mesh.model_id != model_id:
                continue
            transcript = kept.mesh.transcript
            length = len(transcript)
            if best_length < length < len(prompt) and list(prompt[:length]) == list(transcript):
                best, best_length = kept, length
        if best is None:
            return None
        self._remove(best)
        if len(prompt) + max_new_tokens > best.mesh.max_length:
            self._close(best)
            return None
        self.hits += 1
        return best

    def keep(self, kept: KeptSession) -> None:
        """Keep a session after its request, as the most recently used, and evict what the
        bounds no longer allow (this session last: it is closed if it does not fit alone)."""
        if kept.mesh.position == 0:
            self._close(kept)
            return
        self._kept[kept] = None
        kept.expiry = asyncio.get_running_loop().call_later(
            self._settings.reuse_ttl_s, self._expire, kept
        )
        owned = [k for k in self._kept if k.owner == kept.owner]
        for old in owned[: max(0, len(owned) - self._settings.reuse_sessions_per_principal)]:
            self._evict(old)
        while len(self._kept) > self._settings.reuse_max_sessions or self._over_share(kept):
            self._evict(next(iter(self._kept)))

    def reclaim(self, quota_key: str) -> bool:
        """Give up the principal's least recently used kept session (its reservation at once,
        its mesh session soon); False if it keeps none."""
        for kept in self._kept:
            if kept.owner[0] == quota_key:
                self._evict(kept)
                return True
        return False

    def close(self, kept: KeptSession) -> None:
        """Close a session that will not be kept; its reservation is released at once."""
        self._close(kept)

    async def aclose(self) -> None:
        """Close every kept session (server shutdown)."""
        for kept in list(self._kept):
            self._evict(kept)
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _over_share(self, newest: KeptSession) -> bool:
        """Kept sessions on ``newest``'s model hold more than ``reuse_max_cache_share`` of
        what this gateway could hold there (unknown capacity: no share applies)."""
        if newest not in self._kept:
            return False
        model_id = newest.mesh.model_id
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
