"""The real mesh backend: one persistent Petals inference session per chat session.

Petals is blocking (its client waits on a background event loop and sleeps in retry loops),
so a whole turn runs in one worker thread, stepping the remote session token by token and
handing events to asyncio with ``call_soon_threadsafe``. The pool holds up to
``max_concurrent_turns`` threads (256 by default), started on demand: a worker waiting on the
network costs a parked thread (about 110 KiB of resident memory, measured in README "Many
turns at once"), so the pool is sized to what the mesh can serve, not to the CPU count. Only the new
turn's tokens go through the servers; their attention caches hold the history. The session
keeps the token transcript, so if the remote session breaks (dead server, expired cache) the
next turn opens a fresh one and replays the transcript.

This module opens sessions (:class:`PetalsBackend`) and is the import path for the backend's
public names. The parts: :mod:`.petals_model` (configuration, a model's client half),
:mod:`.petals_session` (a session's remote state and its worker loop), :mod:`.petals_turn` (a
turn's events, counters and text), :mod:`.petals_errors` (:func:`translate_error`, the one
boundary where Petals, hivemind and torch exceptions become ours).
"""

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable
from typing import Any

from farmesh_ws.errors import InvalidRequest, ModelNotFound
from farmesh_ws.logcontext import run_in_context
from farmesh_ws.mesh import compat, spot_check_run
from farmesh_ws.mesh.discovery import ModelCoverage, announced_models, discover, model_coverage
from farmesh_ws.mesh.petals_errors import translate_error
from farmesh_ws.mesh.petals_model import LoadedModel, ModelSpec, PetalsBackendConfig
from farmesh_ws.mesh.petals_session import PetalsChatSession
from farmesh_ws.mesh.petals_turn import PetalsTurn
from farmesh_ws.mesh.spot_check import IntegrityMonitor
from farmesh_ws.mesh.spot_check_run import SpotChecker
from farmesh_ws.payout.bindings import PayoutBindings, running_with
from farmesh_ws.payout.dht import fetch_statements

__all__ = [
    "ModelSpec",
    "PetalsBackend",
    "PetalsBackendConfig",
    "PetalsChatSession",
    "PetalsTurn",
    "translate_error",
]


class PetalsBackend:
    """Opens chat sessions over a Petals swarm. Create with :meth:`start`."""

    def __init__(self, config: PetalsBackendConfig) -> None:
        self.config = config
        self._models: dict[str, LoadedModel] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.max_concurrent_turns, thread_name_prefix="farmesh-mesh"
        )
        self._sessions: set[PetalsChatSession] = set()
        self._busy_lock = threading.Lock()
        self.busy_workers = 0
        """Mesh worker threads running a turn or a close now."""
        self.peak_busy_workers = 0
        """The most worker threads ever busy at once."""
        self.payout_bindings: PayoutBindings | None = None
        """Verified payout bindings from the DHT of the first model, once started."""
        self.integrity = IntegrityMonitor(config.spot_checks)
        """Spot checks and plausibility: node records, flags, counters (every model)."""

    @classmethod
    async def start(cls, config: PetalsBackendConfig) -> "PetalsBackend":
        """Load every model's client half (blocking work, in a thread)."""
        compat.apply()
        from farmesh_ws.mesh import attribution

        attribution.install()
        spot_check_run.install()
        backend = cls(config)
        try:
            for spec in config.models:
                loaded = await asyncio.to_thread(LoadedModel, spec, config)
                loaded.spot_checker = SpotChecker(backend.integrity, loaded.sequence_manager)
                backend._models[spec.model_id] = loaded
            if backend._models:
                dht = next(iter(backend._models.values())).sequence_manager.dht
                backend.payout_bindings = PayoutBindings(
                    functools.partial(fetch_statements, dht), config.payout
                )
        except BaseException:
            await backend.aclose()
            raise
        return backend

    async def add_model(self, spec: ModelSpec) -> None:
        """Load one more model's client half (blocking work, in a thread). Raises
        ``ValueError`` for a model id already served."""
        if spec.model_id in self._models:
            raise ValueError(f"model {spec.model_id!r} is served already")
        self._models[spec.model_id] = await asyncio.to_thread(LoadedModel, spec, self.config)

    @property
    def model_ids(self) -> list[str]:
        return list(self._models)

    def num_blocks(self, model_id: str) -> int:
        return self._model(model_id).num_blocks

    async def open_session(self, model_id: str, *, max_length: int) -> PetalsChatSession:
        """A new session of up to ``max_length`` tokens. Raises :class:`ModelNotFound` for a
        model not served here, :class:`InvalidRequest` for ``max_length`` out of range."""
        if not 1 <= max_length <= self.config.max_session_length:
            raise InvalidRequest(
                f"max_length must be between 1 and {self.config.max_session_length}"
            )
        session = PetalsChatSession(
            self._model(model_id), max_length, submit=self._submit, forget=self._sessions.discard
        )
        self._sessions.add(session)
        return session

    async def coverage(self, model_id: str) -> ModelCoverage:
        """Which servers cover which blocks of one model, straight from the DHT."""
        loaded = self._model(model_id)
        dht = loaded.sequence_manager.dht
        return await asyncio.to_thread(
            model_coverage, dht, loaded.spec.dht_prefix, loaded.num_blocks
        )

    async def refresh_routes(self, model_id: str) -> None:
        """Reload one model's routing table from the DHT now, instead of at the next periodic
        update (``update_period_s``), so that servers that just joined can be chosen."""
        manager = self._model(model_id).sequence_manager
        await asyncio.to_thread(_update_routes_now, manager)

    async def wait_for_checks(self, timeout_s: float = 60.0) -> None:
        """Wait until every sampled spot check started so far has finished."""
        for loaded in self._models.values():
            if loaded.spot_checker is not None:
                await asyncio.to_thread(loaded.spot_checker.wait_background, timeout_s)

    async def announced(self) -> dict[str, int]:
        """Each DHT prefix the mesh announces, with its number of blocks (one DHT query;
        bounded as :func:`~farmesh_ws.mesh.discovery.announced_models`)."""
        if not self._models:
            return {}
        dht = next(iter(self._models.values())).sequence_manager.dht
        return await asyncio.to_thread(announced_models, dht)

    async def discover(self, skip: frozenset[str] = frozenset()) -> list[ModelCoverage]:
        """Every model the DHT announces but the DHT prefixes in ``skip``, with coverage (not
        only the ones served here; bounded as :func:`~farmesh_ws.mesh.discovery.discover`)."""
        if not self._models:
            return []
        dht = next(iter(self._models.values())).sequence_manager.dht
        return await asyncio.to_thread(discover, dht, skip=skip)

    async def aclose(self) -> None:
        """Close every session, wait for running turns, then stop each model's client."""
        for session in list(self._sessions):
            await session.aclose()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        for loaded in self._models.values():
            await asyncio.to_thread(loaded.close)
        self._models.clear()

    def _model(self, model_id: str) -> LoadedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise ModelNotFound(f"model {model_id!r} is not served here") from None

    def _submit(self, fn: Callable[..., None], *args: Any) -> "concurrent.futures.Future[None]":
        """Run ``fn`` on a mesh worker thread, with the caller's log context (conn, session)
        and this backend's payout bindings."""
        work = run_in_context(running_with(self.payout_bindings, fn))
        return self._executor.submit(self._counted, work, *args)

    def _counted(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._busy_lock:
            self.busy_workers += 1
            self.peak_busy_workers = max(self.peak_busy_workers, self.busy_workers)
        try:
            return fn(*args)
        finally:
            with self._busy_lock:
                self.busy_workers -= 1


def _update_routes_now(manager: Any) -> None:
    """``RemoteSequenceManager.update(wait=True)`` waits for its update thread, which Petals
    2.2.0.post1 starts only in the first ``make_sequence``: before any session, it would wait
    forever. Start the thread first, as ``make_sequence`` does (under the same lock)."""
    with manager._thread_start_lock:
        if not manager.is_alive():
            manager._thread.start()
    manager.update(wait=True)
