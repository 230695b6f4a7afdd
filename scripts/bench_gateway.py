"""Gateways on the real local swarm (2 Petals servers, the bundled model) for the benchmarks
that compare wire paths: ``bench_http.py``, ``bench_resume.py``."""

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from farmesh_ws.config import Settings
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics
from farmesh_ws.state.memory import MemoryStateStore
from farmesh_ws.state.registry import SessionRegistry
from farmesh_ws.transport.ws import GatewayServer

BENCH_SETTINGS = Settings(port=0, http_port=0, auth="off", balances="off", requests_burst=1000)
"""No credentials, no balances, a burst no benchmark reaches."""


@contextlib.asynccontextmanager
async def swarm_gateways(
    variants: Sequence[Callable[[Settings], Settings]], *, name: str, shared_state: bool = False
) -> AsyncIterator[list[GatewayServer]]:
    """One started gateway per entry of ``variants`` (each makes its settings from
    :data:`BENCH_SETTINGS`), all on one backend over a fresh local swarm; everything is
    stopped and the swarm's logs removed on exit. ``name`` tags the log folder; with
    ``shared_state`` the gateways share one state store, as gateways sharing Redis do."""
    from farmesh_ws.home import farmesh_home
    from farmesh_ws.mesh.petals import ModelSpec, PetalsBackend, PetalsBackendConfig
    from farmesh_ws.models import BUNDLED_MODEL_ID, dht_prefix_for
    from farmesh_ws.models.bundled import prepare_bundled_model
    from farmesh_ws.swarm import LocalSwarm, SwarmConfig, read_num_blocks

    model_path = await asyncio.to_thread(prepare_bundled_model, farmesh_home(), progress=False)
    log_dir = Path(tempfile.mkdtemp(prefix=f"farmesh-bench-{name}-"))
    prefix = dht_prefix_for(BUNDLED_MODEL_ID)
    swarm = LocalSwarm(SwarmConfig(model_path, prefix, read_num_blocks(model_path), log_dir))
    async with contextlib.AsyncExitStack() as cleanup:  # runs in reverse order, always
        cleanup.callback(shutil.rmtree, log_dir, ignore_errors=True)
        cleanup.push_async_callback(asyncio.to_thread, swarm.stop)
        await asyncio.to_thread(swarm.start)
        spec = ModelSpec(BUNDLED_MODEL_ID, model_path, prefix)
        config = PetalsBackendConfig(initial_peers=tuple(swarm.initial_peers), models=(spec,))
        backend: Any = await PetalsBackend.start(config)
        cleanup.push_async_callback(backend.aclose)
        status = MeshStatusCache(backend.model_ids, backend.coverage, refresh_s=60.0)
        await status.refresh()
        gateways = []
        shared = MemoryStateStore()
        for variant in variants:
            registry = SessionRegistry(shared) if shared_state else None
            settings = variant(BENCH_SETTINGS)
            gateway = GatewayServer(settings, backend, status, Metrics(), registry=registry)
            await gateway.start()
            cleanup.push_async_callback(gateway.shutdown)
            gateways.append(gateway)
        yield gateways
