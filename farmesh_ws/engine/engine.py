"""The engine every surface talks to: sessions, the request runner, observers, shutdown.

Wire adapters (``api/``) hold an :class:`Engine` and only decode and encode; every rule lives
behind it. Shutdown (protocol.md §2): :meth:`Engine.drain` refuses new sessions and requests
(``shutting_down``) and waits up to a grace period for the running ones, on every surface.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable

from farmesh_ws.config import Settings
from farmesh_ws.engine.allowances import BalanceHolds, FreeTokens
from farmesh_ws.engine.events import ErrorSent, Observer
from farmesh_ws.engine.one_shot import OneShots
from farmesh_ws.engine.quotas import MeshCapacity, Quotas
from farmesh_ws.engine.request import ActiveRequest
from farmesh_ws.engine.reuse import ReuseCache
from farmesh_ws.engine.runner import RequestRunner
from farmesh_ws.engine.sessions import SessionManager
from farmesh_ws.mesh.base import MeshBackend
from farmesh_ws.state.registry import SessionRegistry

logger = logging.getLogger(__name__)


class Engine:
    """Owns the session manager, the runner and the caps; ``observer`` hears every request
    event; ``capacity`` reads the mesh's free attention cache per model (None: not checked);
    ``holds`` takes prepaid holds (None: no balances, as with ``balances = off``)."""

    def __init__(
        self,
        *,
        settings: Settings,
        backend: MeshBackend,
        registry: SessionRegistry,
        observer: Observer,
        capacity: Callable[[str], MeshCapacity] | None = None,
        holds: BalanceHolds | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.observer = observer
        self.quotas = Quotas(settings, capacity)
        self.free_tokens = FreeTokens(registry.store, settings.anonymous_tokens_per_day)
        self.sessions = SessionManager(
            settings=settings, backend=backend, registry=registry, quotas=self.quotas
        )
        self.reuse = ReuseCache(settings, self.quotas)
        self.quotas.kept = self.reuse
        self.runner = RequestRunner(
            settings=settings,
            one_shots=OneShots(settings, backend, self.quotas, self.reuse),
            store=registry.store,
            observer=observer,
            stopping=lambda: self.sessions.stopping,
            quotas=self.quotas,
            free_tokens=self.free_tokens,
            holds=holds,
        )

    def error_sent(self, code: str) -> None:
        """A surface sent an error frame with ``code`` (for the error counters)."""
        self.observer.notify(ErrorSent(code))

    async def aclose(self) -> None:
        """After :meth:`drain`: close the kept mesh sessions and write the last free-token
        counts."""
        await self.reuse.aclose()
        await self.free_tokens.aclose()

    async def drain(self, grace_s: float) -> None:
        """Refuse new work, wait up to ``grace_s`` for running requests to end, then cancel
        the rest and wait for them to settle and send their last frames (a cancel takes effect
        after the current mesh step, at most ``mesh_request_timeout_s``)."""
        self.sessions.stopping = True
        running = list(self.runner.active)
        if not running:
            return
        logger.info("shutdown: waiting up to %.0f s for %d requests", grace_s, len(running))
        if await _all_ended(running, grace_s):
            return
        late = [active for active in running if not active.ended.is_set()]
        logger.info("shutdown: cancelling %d requests after the grace period", len(late))
        for active in late:
            active.cancel()
        await _all_ended(late, self.settings.mesh_request_timeout_s)


async def _all_ended(requests: list[ActiveRequest], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for every request to end; True if they all did."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(r.ended.wait() for r in requests)), timeout_s)
        return True
    return False
