"""The mesh session of a one-shot request: a fresh one sized for the request, or one kept by
the :class:`~farmesh_ws.engine.reuse.ReuseCache` that the request's prompt continues.

A fresh session reserves prompt + ``max_new_tokens`` of context (a refused reservation raises
:class:`~farmesh_ws.errors.QuotaExceeded`); one that may be kept for reuse reserves
``reuse_max_length`` (``default_max_length`` when 0) if that is more and fits, so that the
conversation can grow in it. After the request (:meth:`OneShots.end`) a reusable session that
ended without an error is kept; any other is closed and its reservation released.
"""

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
        mesh = await open_mesh_session(self._backend, model_id, settings.max_length_limit, settings)
        owner = (principal.quota_key, wallet)
        reuse = reuse and self.cache.enabled
        try:
            prompt = encode(mesh)
            check_room(mesh, prompt)
            needed = len(prompt) + max_new_tokens
            check_max_length(settings, needed)
            kept = self.cache.take(owner, mesh.model_id, prompt, max_new_tokens) if reuse else None
            if kept is None:
                reservation = self._reserve(principal, mesh.model_id, needed, reuse=reuse)
                mesh.limit_length(reservation.tokens)
        except BaseException:
            await mesh.aclose()
            raise
        if kept is None:
            return OneShot(KeptSession(owner, mesh, reservation), prompt, False, reuse)
        await mesh.aclose()  # never stepped: nothing on the servers
        # the previous reply's last token was never sent: the prompt says what follows it
        kept.mesh.discard_pending()
        return OneShot(kept, prompt[kept.mesh.position :], True, True)

    def _reserve(
        self, principal: Principal, model_id: str, needed: int, *, reuse: bool
    ) -> Reservation:
        size = self._settings.reuse_max_length or self._settings.default_max_length
        if reuse and size > needed:
            try:
                return self._quotas.reserve(principal, model_id, size, session=False)
            except QuotaExceeded:
                pass  # no room to grow: reserve what this request needs, as without reuse
        return self._quotas.reserve(principal, model_id, needed, session=False)

    async def abandon(self, shot: OneShot) -> None:
        """The request was refused after :meth:`open`: a kept session goes back untouched."""
        if shot.reused:
            self.cache.keep(shot.session)
        else:
            await self._close(shot.session)

    async def end(self, shot: OneShot, *, failed: bool) -> None:
        """The request settled: keep its session for reuse, or close it."""
        if shot.reusable and not failed and shot.mesh.position > 0:
            self.cache.keep(shot.session)
        else:
            await self._close(shot.session)

    async def _close(self, session: KeptSession) -> None:
        self._quotas.release(session.reservation, session=False)
        await session.mesh.aclose()
