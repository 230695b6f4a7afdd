"""The servers and client helpers ``scripts/bench_ws.py`` and ``scripts/soak.py`` share.

Servers run alone in a child process (multiprocessing spawn, stock asyncio, as in production):
``gateway`` (GatewayServer + SyntheticBackend, API keys and prepaid holds in a SQLite ledger),
``gateway_noholds`` (the same without balances), ``gateway_noauth`` (``auth = off``) and
``bare`` (a bare ``websockets`` server sending frames recorded from one gateway turn). The
gateway's WebSocket compression is its Settings' unless ``args.gateway_compression`` (and
``args.gateway_window_bits``, ``args.gateway_mem_level``) say otherwise; ``bare`` uses
websockets' default permessage-deflate (12 window bits, memLevel 5, both directions).
Memory figures are MiB (2**20 bytes) read with psutil.
"""

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from farmesh_ws import protocol as p
from farmesh_ws.api.v1 import V1Session
from farmesh_ws.auth.connection import ConnectionIdentity
from farmesh_ws.auth.credentials import Authenticator
from farmesh_ws.config import Settings, env_names, load_settings
from farmesh_ws.core.principal import Principal, PrincipalKind
from farmesh_ws.engine.engine import Engine
from farmesh_ws.engine.events import Observer
from farmesh_ws.gateway import tune_gc_for_serving
from farmesh_ws.ledger import balances
from farmesh_ws.ledger.holds import LedgerHolds
from farmesh_ws.ledger.keys import KeyPrincipal, authenticate, create_key
from farmesh_ws.ledger.store import Ledger
from farmesh_ws.ledger.writer import LedgerWriter
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.mesh.synthetic import SYNTHETIC_MODEL_ID, SyntheticBackend, SyntheticConfig
from farmesh_ws.metrics import Metrics
from farmesh_ws.state import MemoryStateStore
from farmesh_ws.state.registry import SessionRegistry
from farmesh_ws.transport.compression import COMPRESSION_MODES
from farmesh_ws.transport.ws import GatewayServer

MIB = 2**20
HANDSHAKES_IN_FLIGHT = 100
OPEN = '{"type":"open"}'
TOKEN_PREFIX, DONE_PREFIX = '{"type":"token"', '{"type":"done"'
BENCH_WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"


def turn_frame(tokens: int, request_id: str = "t1", text: str = "Tell me a story.") -> str:
    return json.dumps(
        {"type": "turn", "request_id": request_id, "text": text, "max_new_tokens": tokens}
    )


# --- servers (child processes) ---------------------------------------------------------------


def gateway_settings(tokens: int, *, auth: bool = True, **overrides: Any) -> Settings:
    """Auth on: every client presents an API key and each turn takes a prepaid hold, as in
    production; off: ``auth = off``. Caps are raised so that all clients of this one address
    and key fit: the admission checks still run, none refuses. ``overrides``: other Settings
    fields (the WebSocket compression, say)."""
    return replace(
        Settings(port=0, **overrides),
        default_model_id=SYNTHETIC_MODEL_ID,
        max_connections=20_000,
        idle_timeout_s=3600.0,
        shutdown_grace_s=2.0,
        max_new_tokens_limit=max(1024, tokens),
        auth="required" if auth else "off",
        max_connections_per_address=20_000,
        max_pending_auth_per_address=20_000,
        max_connections_per_principal=20_000,
        max_requests_per_principal=20_000,
        max_sessions_per_principal=20_000,
        max_reserved_tokens_per_principal=10**9,
        requests_per_minute=1e7,
        requests_burst=1_000_000,
    )


@contextlib.asynccontextmanager
async def keyed_ledger(folder: Path) -> AsyncIterator[tuple[Ledger, str]]:
    """A SQLite ledger with one API key and a large prepaid balance for its wallet."""
    writer = LedgerWriter(Ledger(f"sqlite+aiosqlite:///{folder / 'ledger.db'}"), folder / "spool")
    await writer.start()
    try:
        _, key = await create_key(writer.ledger, BENCH_WALLET, "bench")
        await balances.credit(writer.ledger, BENCH_WALLET, Decimal(10) ** 9)
        yield writer.ledger, key
    finally:
        await writer.aclose()


async def gateway_frames(tokens: int) -> list[str]:
    """The frames the gateway sends for ``open`` + one turn, recorded once (fast backend)."""
    frames: list[str] = []

    async def send(message: p.ServerMessage) -> None:
        frames.append(p.encode_server_message(message))

    backend = SyntheticBackend(SyntheticConfig(tokens_per_s=1e6))
    engine = Engine(
        settings=gateway_settings(tokens),
        backend=backend,
        registry=SessionRegistry(MemoryStateStore()),
        observer=Observer(),
    )
    settings = engine.settings
    identity = ConnectionIdentity(
        Authenticator(settings),
        engine.quotas,
        principal=Principal(PrincipalKind.OPEN, "open", None, "bench"),
        address="127.0.0.1",
        domain="bench",
    )
    session = V1Session(engine, send, client_key="bench", identity=identity)
    for frame in (OPEN, turn_frame(tokens)):
        await session.handle_frame(frame)
    running = session.client.running if session.client is not None else None
    if running is not None and running.task is not None:
        await running.task
    await session.aclose()
    return frames  # opened, N tokens, done, contribution


async def bare_handler(frames: list[str], rate: float, ws: ServerConnection) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            if '"open"' in message:
                await ws.send(frames[0])
            elif '"turn"' in message:
                start = loop.time()
                for k, frame in enumerate(frames[1:-2], 1):
                    await asyncio.sleep(start + k / rate - loop.time())
                    await ws.send(frame)
                for frame in frames[-2:]:
                    await ws.send(frame)


def gateway_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The gateway's settings named on the command line (none: its defaults): the compression
    options, and any ``--gateway-setting NAME=VALUE`` (a Settings field, parsed as its
    environment variable would be)."""
    names = ("compression", "deflate_window_bits", "deflate_mem_level")
    given = {f"ws_{name}": getattr(args, f"gateway_{name}", None) for name in names}
    for item in getattr(args, "gateway_setting", None) or ():
        name, _, value = item.partition("=")
        given[name] = getattr(load_settings({env_names(name)[0]: value}), name)
    return {name: value for name, value in given.items() if value is not None}


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """``--compression``: what the benchmark's clients offer the server."""
    parser.add_argument(
        "--compression",
        choices=("deflate", "none"),
        default="deflate",
        help="what the clients offer",
    )


def add_gateway_options(parser: argparse.ArgumentParser) -> None:
    """The command-line options :func:`gateway_overrides` reads."""
    parser.add_argument(
        "--gateway-compression",
        choices=COMPRESSION_MODES,
        help="the gateway's FARMESH_WS_COMPRESSION (default: its default)",
    )
    parser.add_argument("--gateway-deflate-window-bits", type=int)
    parser.add_argument("--gateway-deflate-mem-level", type=int)
    parser.add_argument(
        "--gateway-setting",
        action="append",
        metavar="NAME=VALUE",
        help="another gateway setting, e.g. resume_outbox_frames=64 (repeatable)",
    )


async def serve_until_told(
    kind: str, tokens: int, rate: float, overrides: dict[str, Any], pipe: Connection
) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(pipe.fileno(), stop.set)
    if kind.startswith("gateway"):
        async with contextlib.AsyncExitStack() as stack:
            backend = SyntheticBackend(SyntheticConfig(tokens_per_s=rate))
            stack.push_async_callback(backend.aclose)
            status = MeshStatusCache(backend.model_ids, backend.coverage, refresh_s=60.0)
            await status.refresh()
            settings = gateway_settings(tokens, auth=kind != "gateway_noauth", **overrides)
            key, extra = None, {}
            if kind != "gateway_noauth":
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                ledger, key = await stack.enter_async_context(keyed_ledger(folder))

                async def verify(presented: str) -> KeyPrincipal | None:
                    return await authenticate(ledger, presented)

                extra = {
                    "authenticator": Authenticator(settings, keys=verify),
                    "holds": (
                        LedgerHolds(ledger, settings.balance_hold_ttl_s)
                        if kind == "gateway"
                        else None
                    ),
                }
            gateway = GatewayServer(settings, backend, status, Metrics(), **extra)
            await gateway.start()
            stack.push_async_callback(gateway.shutdown)
            tune_gc_for_serving()  # as `farmesh-ws serve` does once it is up
            pipe.send((gateway.port, key))
            await stop.wait()
    else:
        handler = partial(bare_handler, await gateway_frames(tokens), rate)
        async with serve(handler, "127.0.0.1", 0) as server:
            pipe.send((next(iter(server.sockets)).getsockname()[1], None))
            await stop.wait()


def server_process(
    kind: str,
    tokens: int,
    rate: float,
    gc_threshold: tuple[int, ...],
    overrides: dict[str, Any],
    pipe: Connection,
) -> None:
    if gc_threshold:
        gc.set_threshold(*gc_threshold)
    asyncio.run(serve_until_told(kind, tokens, rate, overrides, pipe))


class ServerChild:
    """A server in a child process: ``url`` once it listens; ``close()`` stops it."""

    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        overrides = gateway_overrides(args)
        options = (kind, args.tokens, args.rate, args.server_gc, overrides, child_end)
        self.process = context.Process(target=server_process, args=options, daemon=True)
        self.process.start()
        if not self._pipe.poll(180):  # the child imports torch (gateway.py) first
            raise RuntimeError(f"the {kind} server did not start in 180 s")
        port, key = self._pipe.recv()
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.headers = None if key is None else {"Authorization": f"Bearer {key}"}
        self.ps = psutil.Process(self.process.pid)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send("stop")
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class CpuMeter:
    """CPU seconds of the server, of this process and of the whole machine since creation."""

    def __init__(self, server: psutil.Process) -> None:
        self._procs = {"server": server, "client": psutil.Process()}
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        used = {name: sum(proc.cpu_times()[:2]) for name, proc in self._procs.items()}
        machine = psutil.cpu_times()
        used["machine"] = machine.user + machine.nice + machine.system
        return used

    def percent(self, wall_s: float) -> dict[str, float]:
        """% of one core over ``wall_s`` each, and the server's CPU seconds (``server_cpu_s``)."""
        used = {name: value - self._start[name] for name, value in self._read().items()}
        used["others"] = used.pop("machine") - used["server"] - used["client"]
        shares = {f"{name}_cpu_pct": round(100 * s / wall_s, 1) for name, s in used.items()}
        return {**shares, "server_cpu_s": used["server"]}


async def open_session(
    server: "ServerChild", gate: asyncio.Semaphore, args: argparse.Namespace
) -> Any:
    compression = None if args.compression == "none" else "deflate"
    async with gate:
        ws = await connect(
            server.url,
            proxy=None,
            compression=compression,
            open_timeout=60,
            ping_interval=None,
            additional_headers=server.headers,
        )
        await ws.send(OPEN)
        opened = await asyncio.wait_for(ws.recv(), 60)
    if not str(opened).startswith('{"type":"opened"'):
        raise RuntimeError(f"open failed: {opened!r}")
    return ws


async def close_all(sockets: list[ClientConnection]) -> None:
    closing = asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(closing, 120)


async def quiet_machine(max_wait_s: float, busy_pct: float = 25.0) -> float:
    """Wait at most ``max_wait_s`` until the machine's CPU use over 1 s (% of all cores) is
    below ``busy_pct`` (others share this machine); return the last reading."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy: float = await asyncio.to_thread(psutil.cpu_percent, 1.0)
        if busy < busy_pct or time.monotonic() >= deadline:
            return busy


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def arm_watchdog(timeout_s: float) -> threading.Timer:
    """If the run hangs, kill every child (servers, swarm nodes) and exit with status 3."""

    def fire() -> None:
        print(f"bench_ws: no result after {timeout_s:.0f} s; stopping", file=sys.stderr)
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        os._exit(3)

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    return timer
