"""A cached view of the mesh for the HTTP endpoints, refreshed in the background.

``/models`` and ``/mesh/status`` must answer at once, so they read the last snapshot; a
background task asks the DHT every ``refresh_s`` seconds, each query under a timeout.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from farmesh_ws.core.tasks import cancel_and_wait
from farmesh_ws.mesh.discovery import ModelCoverage

logger = logging.getLogger(__name__)

Probe = Callable[[str], Awaitable[ModelCoverage]]
Discover = Callable[[frozenset[str]], Awaitable[list[ModelCoverage]]]
"""Every model the DHT announces but the given DHT prefixes."""


@dataclass(frozen=True, slots=True)
class ModelStatus:
    model_id: str
    num_blocks: int
    active_nodes: int
    missing_blocks: tuple[int, ...]
    status: str
    checked_at: float
    cache_tokens_left: int | None = None
    """The longest session (in tokens) the best route could still hold: for each block, the
    most any online server holding it could give one more session, the least over blocks
    (:func:`route_cache_tokens_left`). None while unknown or not reported."""


def status_of(model_id: str, coverage: ModelCoverage, checked_at: float) -> ModelStatus:
    nodes = len(coverage.online_peer_ids())
    if coverage.fully_served:
        status = "online"
    elif nodes:
        status = "degraded"
    else:
        status = "offline"
    return ModelStatus(
        model_id,
        coverage.num_blocks,
        nodes,
        coverage.missing_blocks,
        status,
        checked_at,
        route_cache_tokens_left(coverage),
    )


def route_cache_tokens_left(coverage: ModelCoverage) -> int | None:
    """See :attr:`ModelStatus.cache_tokens_left`; 0 when some block has no online server.

    Petals servers announce ``cache_tokens_left`` as their free cache bytes over
    ``hidden_size * dtype_bytes / num_key_value_groups`` (petals/server/server.py,
    ModuleAnnouncerThread), which is half of what one token takes in one block: a session of
    ``max_length`` L allocates keys and values of that size for each of the server's B blocks
    (petals/server/backend.py, ``get_inference_cache_descriptors``), 2 * B * L units in all.
    So a server has room for a session of ``cache_tokens_left // (2 * B)`` tokens.
    """
    online = [span for span in coverage.servers if span.state == "ONLINE"]
    if coverage.num_blocks <= 0 or any(s.cache_tokens_left is None for s in online):
        return None
    best = [0] * coverage.num_blocks
    for span in online:
        blocks = max(span.end - span.start, 1)
        room = (span.cache_tokens_left or 0) // (2 * blocks)
        for block in range(max(span.start, 0), min(span.end, coverage.num_blocks)):
            best[block] = max(best[block], room)
    return min(best)


class MeshStatusCache:
    """Keeps the latest :class:`ModelStatus` of each model; ``unknown`` until first checked.

    With ``discover`` (every model the DHT announces) and ``served_prefixes`` (the DHT
    prefixes of the served models), :attr:`unservable` lists the announced models this
    gateway cannot serve: it has no client half (config, tokenizer, embeddings) for them."""

    def __init__(
        self,
        model_ids: list[str],
        probe: Probe,
        *,
        refresh_s: float,
        discover: Discover | None = None,
        served_prefixes: frozenset[str] = frozenset(),
    ) -> None:
        self._model_ids = list(model_ids)
        self._probe = probe
        self._refresh_s = refresh_s
        self._discover = discover
        self._served_prefixes = served_prefixes
        self.unservable: tuple[ModelCoverage, ...] = ()
        self._discovery: asyncio.Task[list[ModelCoverage]] | None = None
        self._latest: dict[str, ModelStatus] = {}
        self._task: asyncio.Task[None] | None = None
        self.on_update: Callable[[ModelStatus], None] | None = None

    def get(self, model_id: str) -> ModelStatus:
        return self._latest.get(
            model_id, ModelStatus(model_id, 0, 0, (), "unknown", checked_at=0.0)
        )

    def all(self) -> list[ModelStatus]:
        return [self.get(model_id) for model_id in self._model_ids]

    async def refresh(self) -> None:
        """Query every model once (each under a timeout); keep the old entry on failure."""
        for model_id in self._model_ids:
            try:
                coverage = await asyncio.wait_for(self._probe(model_id), self._refresh_s * 2)
            except Exception as exc:  # noqa: BLE001 - a failed probe keeps the last snapshot
                logger.warning("mesh status of %s unavailable: %s", model_id, type(exc).__name__)
                continue
            status = status_of(model_id, coverage, time.time())
            self._latest[model_id] = status
            if self.on_update is not None:
                self.on_update(status)
        await self._refresh_unservable()

    async def _refresh_unservable(self) -> None:
        """At most one discovery at a time: one that outlives the timeout goes on in the
        background (its DHT queries cannot be interrupted) and the next refresh waits for it
        instead of starting another."""
        if self._discover is None:
            return
        if self._discovery is None or self._discovery.done():
            self._discovery = asyncio.ensure_future(self._discover(self._served_prefixes))
        try:
            announced = await asyncio.wait_for(asyncio.shield(self._discovery), self._refresh_s * 2)
        except Exception as exc:  # noqa: BLE001 - a failed probe keeps the last snapshot
            logger.warning("announced models unavailable: %s", type(exc).__name__)
            return
        self.unservable = tuple(
            model for model in announced if model.dht_prefix not in self._served_prefixes
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="farmesh-mesh-status")

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        with contextlib.suppress(Exception):  # a failed discovery was logged already
            await cancel_and_wait(self._discovery)
        self._task = self._discovery = None

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_s)
