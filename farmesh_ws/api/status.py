"""The status endpoints (protocol.md §8): ``/health``, ``/mesh/status``, ``/models``, ``/metrics``.

Bodies are built from cached state (mesh coverage refreshed in the background, the shared
session registry): an HTTP request never waits on the DHT. ``/health`` carries the fields of
the seed's health check (``status`` ``healthy``, ``service``, ``version``) plus ours.
"""

import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from farmesh_ws import __version__
from farmesh_ws import protocol as p
from farmesh_ws.config import Settings
from farmesh_ws.core.money import far_text
from farmesh_ws.engine.engine import Engine
from farmesh_ws.engine.limits import default_max_length
from farmesh_ws.mesh.status import MeshStatusCache, ModelStatus
from farmesh_ws.metrics import Metrics
from farmesh_ws.models.generation import Sampling

SERVICE_NAME: Final = "farmesh-ws"
UNSERVABLE_REASON: Final = (
    "announced in the DHT, but this gateway has no client half for it (config, tokenizer, "
    "embeddings); list its folder in FARMESH_MODELS_FILE, or put it in $FARMESH_HOME/models "
    "under the model's name and restart"
)
HealthCheck = Callable[[], str | None]
"""Returns None when the component is fine, else a short reason (shown in /health)."""


class StatusRoutes:
    """Builds the JSON bodies of the status endpoints."""

    def __init__(
        self,
        *,
        engine: Engine,
        status: MeshStatusCache,
        metrics: Metrics,
        health_checks: Mapping[str, HealthCheck],
        connections: Callable[[], int],
        generation: Mapping[str, Sampling] | None = None,
    ) -> None:
        self._engine = engine
        self._settings: Settings = engine.settings
        self._status = status
        self._metrics = metrics
        self._health_checks = dict(health_checks)
        self._connections = connections
        self._generation = dict(generation or {})
        self._started_at = time.monotonic()

    def health(self) -> dict[str, Any]:
        mesh_online = all(model.status == "online" for model in self._status.all())
        problems: dict[str, str | None] = {
            "mesh": None if mesh_online else "not every block is served"
        }
        problems.update({name: check() for name, check in self._health_checks.items()})
        saturation = self._saturation()
        problems["capacity"] = _saturated(saturation, self._settings)
        healthy = all(problem is None for problem in problems.values())
        return {
            "status": "healthy" if healthy else "degraded",
            "service": SERVICE_NAME,
            "version": __version__,
            "components": {
                name: "ok" if problem is None else f"degraded: {problem}"
                for name, problem in problems.items()
            },
            "protocol_version": p.PROTOCOL_VERSION,
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "connections": self._connections(),
            "saturation": saturation,
        }

    def _saturation(self) -> dict[str, Any]:
        """What is in use against the limits that refuse new work (protocol.md §8)."""
        quotas = self._engine.quotas
        models = {}
        for model in self._status.all():
            left = model.cache_tokens_left
            uncounted = quotas.uncounted_tokens(model.model_id, model.checked_at)
            models[model.model_id] = {
                "reserved_tokens": quotas.totals.reserved[model.model_id],
                "cache_tokens_free": None if left is None else max(left - uncounted, 0),
            }
        return {
            "connections": {"used": self._connections(), "limit": self._settings.max_connections},
            "requests": quotas.totals.requests,
            "sessions": quotas.totals.sessions,
            "models": models,
        }

    async def mesh_status(self) -> dict[str, Any]:
        """The default model's fields at the top (the seed's shape), every served model in
        ``models``."""
        models = [self._coverage(model) for model in self._status.all()]
        return {
            **self._coverage(self._status.get(self._settings.default_model_id)),
            "active_sessions": await self._engine.sessions.registry.active_sessions(),
            "models": models,
        }

    def _coverage(self, model: ModelStatus) -> dict[str, Any]:
        return {
            "model_id": model.model_id,
            "active_nodes": model.active_nodes,
            "price_per_token_far": far_text(self._settings.prices_for(model.model_id).per_token),
            "status": model.status,
            "num_blocks": model.num_blocks,
            "missing_blocks": list(model.missing_blocks),
        }

    def models(self) -> dict[str, Any]:
        """Each served model with its price and limits; ``generation`` is the sampling its
        folder recommends (protocol v1 fields, :mod:`farmesh_ws.models.generation`), or
        ``{}``. Models the DHT announces that this gateway cannot serve follow, with
        ``servable`` false and the reason."""
        served = [self._served_entry(model) for model in self._status.all()]
        served_ids = {entry["model_id"] for entry in served}
        unservable = [
            {
                "model_id": coverage.dht_prefix,
                "servable": False,
                "reason": UNSERVABLE_REASON,
                "active_nodes": len(coverage.online_peer_ids()),
                "num_blocks": coverage.num_blocks,
            }
            for coverage in self._status.unservable
            if coverage.dht_prefix not in served_ids
        ]
        return {"models": served + unservable}

    def _served_entry(self, model: ModelStatus) -> dict[str, Any]:
        settings = self._settings
        prices = settings.prices_for(model.model_id)
        return {
            "model_id": model.model_id,
            "servable": True,
            "active_nodes": model.active_nodes,
            "price_per_token_far": far_text(prices.per_token),
            "price_per_prompt_token_far": far_text(prices.per_prompt_token),
            "status": model.status,
            "num_blocks": model.num_blocks,
            "max_length": settings.max_length_limit_for(model.model_id),
            "max_new_tokens": settings.max_new_tokens_limit_for(model.model_id),
            "generation": dict(self._generation.get(model.model_id, {})),
        }

    def metrics(self) -> bytes:
        self._metrics.sessions_active.set(self._engine.sessions.count)
        self._metrics.reuse_sessions_kept.set(len(self._engine.reuse))
        return self._metrics.render()


def _saturated(saturation: dict[str, Any], settings: Settings) -> str | None:
    """Why new work would be refused now, or None: every connection slot taken, or a model
    without attention cache left for a session of its default length (``default_max_length``
    within the model's own limit)."""
    connections = saturation["connections"]
    if connections["used"] >= connections["limit"]:
        return f"all {connections['limit']} connection slots are taken"
    for model_id, model in saturation["models"].items():
        length = default_max_length(settings, model_id)
        if model["cache_tokens_free"] is not None and model["cache_tokens_free"] < length:
            return f"no attention cache left for a {length}-token session of {model_id}"
    return None
