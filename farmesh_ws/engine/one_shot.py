"""The mesh session of a one-shot request: a fresh one sized for the request, or one kept by
the :class:`~farmesh_ws.engine.reuse.ReuseCache` that the request's prompt continues.

A fresh session reserves prompt + ``max_new_tokens`` of context (a refused reservation raises
:class:`~farmesh_ws.errors.QuotaExceeded`); one that may be kept for reuse reserves room for
the conversation to grow, ``reuse_max_length`` or twice what it needs, whichever is more (at
most ``max_length_limit``), when that fits without closing another kept session. After the
request (:meth:`OneShots.end`) a reusable session that ended without an error is kept; any
other is closed and its reservation released.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from farmesh_ws.config import Settings
from farmesh_ws.core.principal import Principal
from farmesh_ws.engine.limits import check_max_length, check_room, open_mesh_session
from farmesh_ws.engine.quotas import Quotas, Reservation
from farmesh_ws.engine.reuse import KeptSession, ReuseCache
from farmesh_ws.errors import QuotaExceeded
from farmesh_ws.mesh.base import MeshBackend, MeshSession


@dataclass(slots=True, eq=False)
class OneShot:
    """``session``: the mesh session with its reservation; ``token_ids``: what the first step
    sends (the prompt after the ids the session holds); ``reused``: the session was kept from
    an earlier request; ``reusable``: keep it after this request if it ends well."""

    session: KeptSession
    token_ids: list[int]
    reused: bool
    reusable: bool

    @property
    def mesh(self) -> MeshSession:
        return self.session.mesh

    @property
    def reservation(self) -> Reservation:
        return self.session.reservation


class OneShots:
    """Opens one-shot mesh sessions and decides what becomes of them afterwards."""

    def __init__(
        self, settings: Settings, backend: MeshBackend, quotas: Quotas, cache: ReuseCache
    ) -> None:
        self._settings = settings
        self._backend = backend
        self._quotas = quotas
        self.cache = cache

    async def open(
        self,
        principal: Principal,
        wallet: str | None,
        model_id: str | None,
        max_new_tokens: int,
        encode: Callable[[MeshSession], list[int]],
        *,
        reuse: bool,
    ) -> OneShot:
        """The session for a prompt that ``encode`` turns into token ids on a fresh session.
        Raises what :func:`open_mesh_session`, ``encode``, :func:`check_room` and
        :meth:`Quotas.reserve` raise; nothing is held then."""
        settings = self._settings
        model_id = model_id or settings.default_model_id
        limit = settings.max_length_limit_for(model_id)
        mesh = await open_mesh_session(self._backend, model_id, limit, settings)
        owner = (principal.quota_key, wallet)
        reuse = reuse and self.cache.enabled
        kept: KeptSession | None = None
        reservation: Reservation | None = None
        try:
            prompt = encode(mesh)
            check_room(mesh, prompt)
            needed = len(prompt) + max_new_tokens
            check_max_length(settings, needed, mesh.model_id)
            kept = self.cache.take(owner, mesh.model_id, prompt, max_new_tokens) if reuse else None
            if kept is None:
                reservation = self._reserve(principal, mesh.model_id, needed, reuse=reuse)
                mesh.limit_length(reservation.tokens)
                shot = OneShot(KeptSession(owner, mesh, reservation), prompt, False, reuse)
            else:
                await mesh.aclose()  # never stepped: nothing on the servers
                # the previous reply's last token was never sent: the prompt says what follows
                kept.mesh.discard_pending()
                shot = OneShot(kept, prompt[kept.mesh.position :], True, True)
        except BaseException:
            if kept is not None:
                self.cache.put_back(kept)
            if reservation is not None:
                self._quotas.release(reservation, session=False)
            await asyncio.shield(mesh.aclose())
            raise
        return shot

    def _reserve(
        self, principal: Principal, model_id: str, needed: int, *, reuse: bool
    ) -> Reservation:
        """Room to grow when that fits as it is (no other kept session closed for it),
        else what the request needs."""
        limit = self._settings.max_length_limit_for(model_id)
        grown = min(limit, max(self._settings.reuse_max_length, 2 * needed))
        if reuse and grown > needed:
            try:
                return self._quotas.reserve(
                    principal, model_id, grown, session=False, reclaim=False
                )
            except QuotaExceeded:
                pass  # no room to grow: reserve what this request needs, as without reuse
        return self._quotas.reserve(principal, model_id, needed, session=False)

    async def abandon(self, shot: OneShot) -> None:
        """The request was refused after :meth:`open`: a kept session goes back untouched."""
        if shot.reused:
            self.cache.put_back(shot.session)
        else:
            await self._close(shot.session)

    async def end(self, shot: OneShot, *, failed: bool) -> None:
        """The request settled: keep its session for reuse, or close it."""
        if shot.reusable and not failed:
            self.cache.keep(shot.session)
        else:
            await self._close(shot.session)

    async def _close(self, session: KeptSession) -> None:
        self._quotas.release(session.reservation, session=False)
        await session.mesh.aclose()
