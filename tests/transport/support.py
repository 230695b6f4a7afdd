"""A real gateway on port 0 over the scripted mesh: real sockets, no swarm."""

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from farmesh_ws.config import Settings
from farmesh_ws.engine.events import Observer
from farmesh_ws.mesh.fake import FAKE_MODEL_ID, FakeBackend
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics
from farmesh_ws.transport.ws import GatewayServer


async def fake_gateway(
    backend: FakeBackend, *, observers: Sequence[Observer] = (), **overrides: Any
) -> GatewayServer:
    settings = replace(Settings(port=0, default_model_id=FAKE_MODEL_ID), **overrides)
    status = MeshStatusCache(backend.model_ids, backend.coverage, refresh_s=60)
    await status.refresh()
    server = GatewayServer(settings, backend, status, Metrics(), observers=observers)
    await server.start()
    return server
