"""The I/O layer: a websockets asyncio server with the HTTP GET routes on the same port.

WebSocket sessions live at ``/ws`` (protocol v1, :mod:`farmesh_ws.api.v1`) and
``/api/v2/generate`` (chat.petals.dev, :mod:`farmesh_ws.api.petals_v2`); ``/health``,
``/mesh/status``, ``/models`` and ``/metrics`` answer plain GETs (:mod:`farmesh_ws.api.status`),
``/`` the browser page. The OpenAI-compatible HTTP API (:mod:`.http`) runs beside it on its
own port, started and drained with it. This layer owns sockets only: browser origins
(:mod:`.origin`), connection limits, frame size, idle timeout, the per-connection reader,
close codes (protocol.md §6), shutdown and HTTP response headers; every request rule is the
engine's.
"""

import asyncio
import contextlib
import dataclasses
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from farmesh_ws import protocol as p
from farmesh_ws.api.petals_v2.handler import PetalsV2Connection
from farmesh_ws.api.status import HealthCheck, StatusRoutes
from farmesh_ws.api.v1 import V1Session
from farmesh_ws.api.v1_handoff import Handoff
from farmesh_ws.api.v1_resume import ResumableSessions, announce_going_away
from farmesh_ws.auth.credentials import Authenticator
from farmesh_ws.config import Settings
from farmesh_ws.engine.allowances import BalanceHolds
from farmesh_ws.engine.engine import Engine
from farmesh_ws.engine.events import FanOut, Observer
from farmesh_ws.engine.quotas import MeshCapacity
from farmesh_ws.logcontext import bind_log_context
from farmesh_ws.mesh.base import MeshBackend
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics, MetricsObserver
from farmesh_ws.models.generation import Sampling
from farmesh_ws.state import MemoryStateStore
from farmesh_ws.state.registry import SessionRegistry
from farmesh_ws.transport.compression import server_extensions
from farmesh_ws.transport.handshake import HandshakeGate, client_address
from farmesh_ws.transport.http import HttpApi
from farmesh_ws.transport.nonce import NonceIssuer, nonce_route
from farmesh_ws.transport.origin import origin_allowed, parse_origin
from farmesh_ws.transport.responses import (
    json_response,
    plain_response,
    refusal_response,
    static_file,
)

logger = logging.getLogger(__name__)

WEBSOCKET_PATH: Final = "/ws"
PETALS_V2_PATH: Final = "/api/v2/generate"
NONCE_PATH: Final = "/auth/nonce"

# RFC 9110 §10.2.4: a detailed Server value helps attackers match known holes; /health has the
# version for those who need it.
SERVER_HEADER: Final = "farmesh-ws"


class GatewayServer:
    """Serves WebSocket sessions and the status endpoints on one port."""

    def __init__(
        self,
        settings: Settings,
        backend: MeshBackend,
        status: MeshStatusCache,
        metrics: Metrics,
        *,
        observers: Sequence[Observer] = (),
        health_checks: Mapping[str, HealthCheck] | None = None,
        registry: SessionRegistry | None = None,
        generation: Mapping[str, Sampling] | None = None,
        authenticator: Authenticator | None = None,
        nonces: NonceIssuer | None = None,
        holds: BalanceHolds | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = registry or SessionRegistry(MemoryStateStore())

        def capacity(model_id: str) -> MeshCapacity:
            latest = status.get(model_id)
            return MeshCapacity(latest.cache_tokens_left, latest.checked_at)

        self.engine = Engine(
            settings=settings,
            backend=backend,
            registry=self.registry,
            observer=FanOut([MetricsObserver(metrics), *observers]),
            capacity=capacity,
            holds=holds,
        )
        self.resumable = ResumableSessions(settings)
        self.engine.sessions.yield_waiting = self.resumable.give_way
        self.handoff = Handoff(
            settings,
            self.registry,
            waiting=self.resumable.waiting,
            release=self.resumable.release,
            lost=self.resumable.end,
        )
        self.gate = HandshakeGate(
            settings, authenticator or Authenticator(settings), self.engine.quotas
        )
        checks: dict[str, HealthCheck] = {"state": lambda: self.registry.store.degraded_reason}
        checks.update(health_checks or {})
        self.status = StatusRoutes(
            engine=self.engine,
            status=status,
            metrics=metrics,
            health_checks=checks,
            connections=lambda: len(self._connections),
            generation=generation,
        )
        self._server: Server | None = None
        self._connections: set[ServerConnection] = set()
        self._shutting_down = False
        self._allowed_origins = frozenset(parse_origin(o) for o in settings.allowed_origins)
        self._routes: dict[str, Callable[[], Awaitable[Response]]] = {
            "/health": self._json_route(self.status.health),
            "/mesh/status": self._mesh_status,
            "/models": self._json_route(self.status.models),
            "/metrics": self._metrics,
        }
        self._nonces = nonces
        self.http = HttpApi(
            settings,
            self.engine,
            self.gate.authenticator,
            process_id=self.registry.process_id,
            stopping=lambda: self._shutting_down,
        )

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not started")
        sockets = list(self._server.sockets)
        return int(sockets[0].getsockname()[1])

    @property
    def active_sessions(self) -> int:
        """Conversations open in this process, on every surface."""
        return self.engine.sessions.count

    async def start(self) -> None:
        """Bind both ports or neither: a busy one raises OSError with nothing left listening."""
        self.registry.start()
        self.handoff.start()
        self._server = await serve(
            self._handle,
            self.settings.host,
            self.settings.port,
            process_request=self._process_request,
            max_size=self.settings.max_frame_bytes,
            compression=None,
            extensions=server_extensions(self.settings),
            server_header=SERVER_HEADER,
        )
        try:
            await self.http.start()
        except OSError:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            await self.handoff.aclose()
            await self.registry.aclose()
            raise

    async def shutdown(self) -> None:
        """Stop accepting, let running requests finish until the grace deadline, close 1001."""
        if self._server is None:
            return
        self._shutting_down = True
        self._server.close(close_connections=False)
        self.http.stop_accepting()
        grace_s = self.settings.shutdown_grace_s
        await announce_going_away(list(self._connections), grace_s, path=WEBSOCKET_PATH)
        await self.engine.drain(self.settings.shutdown_grace_s)
        await self.resumable.aclose()
        await self.http.shutdown()
        await self.engine.aclose()  # kept mesh sessions, the last free-token counts
        closing = [
            connection.close(CloseCode.GOING_AWAY, "server shutting down")
            for connection in self._connections
        ]
        await asyncio.gather(*closing, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        await self.handoff.aclose()
        await self.registry.aclose()

    # HTTP (protocol.md §8)
    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """GET (and HEAD, the same without a body; RFC 9110 §9.3.2) only: 405 otherwise."""
        if request.method not in ("GET", "HEAD"):
            refused = json_response(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method_not_allowed"})
            refused.headers["Allow"] = "GET, HEAD"
            return refused
        response = await self._route(connection, request)
        if request.method == "HEAD":
            if response is None:  # a handshake needs GET (RFC 6455 §4.1)
                response = json_response(HTTPStatus.METHOD_NOT_ALLOWED, {})
                response.headers["Allow"] = "GET"
            return dataclasses.replace(response, body=b"")
        return response

    async def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        route = self._routes.get(path)
        if route is not None:
            return await route()
        if path == NONCE_PATH:
            refused = await self._nonce_rate(connection)
            if refused is not None:
                return refused
            status, body = await nonce_route(self._nonces, request, self.settings)
            return json_response(status, body)
        if path == "/" or path.startswith("/static/"):
            return static_file("index.html" if path == "/" else path.removeprefix("/static/"))
        if path not in (WEBSOCKET_PATH, PETALS_V2_PATH):
            return json_response(HTTPStatus.NOT_FOUND, {"error": "not_found", "path": path})
        origins = request.headers.get_all("Origin")
        if not origin_allowed(origins, request.headers.get_all("Host"), self._allowed_origins):
            logger.info("refused a WebSocket handshake from origin %r", origins)
            return json_response(HTTPStatus.FORBIDDEN, {"error": "origin_not_allowed"})
        if self._shutting_down:
            return json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "shutting_down"})
        refusal = await self.gate.check(connection, request)
        return None if refusal is None else refusal_response(refusal)

    async def _nonce_rate(self, connection: ServerConnection) -> Response | None:
        """Nonces are kept in the state store until they expire: at most
        ``siwe_nonces_per_minute`` per client address, so none can fill it (HTTP 429)."""
        per_minute = self.settings.siwe_nonces_per_minute
        address = self.gate.authenticator.address_hash(client_address(connection))
        decision = await self.registry.store.take_tokens(
            f"nonces:{address}", rate_per_s=per_minute / 60, burst=max(1, int(per_minute / 2))
        )
        if decision.allowed:
            return None
        refused = json_response(HTTPStatus.TOO_MANY_REQUESTS, {"error": "rate_limited"})
        refused.headers["Retry-After"] = str(math.ceil(decision.retry_after_s))
        return refused

    @staticmethod
    def _json_route(body: Callable[[], dict[str, Any]]) -> Callable[[], Awaitable[Response]]:
        async def route() -> Response:
            return json_response(HTTPStatus.OK, body())

        return route

    async def _mesh_status(self) -> Response:
        return json_response(HTTPStatus.OK, await self.status.mesh_status())

    async def _metrics(self) -> Response:
        content_type = "text/plain; version=0.0.4; charset=utf-8"
        return plain_response(HTTPStatus.OK, content_type, self.status.metrics())

    # WebSocket (protocol.md §2-§7)
    async def _handle(self, connection: ServerConnection) -> None:
        conn_id = uuid.uuid4().hex[:8]
        bind_log_context(conn=conn_id)
        client_key = f"connection:{self.registry.process_id}:{conn_id}"
        self._connections.add(connection)
        self.metrics.connections_total.inc()
        self.metrics.connections_active.inc()
        logger.debug("connected from %s", connection.remote_address)
        try:
            identity = self.gate.identity(connection)
            request = connection.request
            if request is not None and request.path.startswith(PETALS_V2_PATH):
                await PetalsV2Connection(
                    connection, self.engine, client_key=client_key, identity=identity
                ).run()
            else:
                await self._serve_v1(
                    connection,
                    V1Session(
                        self.engine,
                        _sender(connection),
                        client_key=client_key,
                        identity=identity,
                        resumable=self.resumable,
                        handoff=self.handoff,
                    ),
                )
        finally:
            self._connections.discard(connection)
            self.metrics.connections_active.dec()
            logger.debug("closed (%s)", connection.close_code)

    async def _serve_v1(self, connection: ServerConnection, session: V1Session) -> None:
        send = _sender(connection)
        try:
            await self._read_loop(connection, session)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("connection handler failed")
            with contextlib.suppress(ConnectionClosed):
                await send(
                    p.Error(code="internal_error", message="internal error", retryable=False)
                )
                await connection.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:  # only a dropped socket (no close frame) may come back; a close is meant
            await session.disconnected(
                resumable=connection.close_code == CloseCode.ABNORMAL_CLOSURE
            )

    async def _read_loop(self, connection: ServerConnection, session: V1Session) -> None:
        errors_in_a_row = 0
        auth_deadline = asyncio.get_running_loop().time() + self.settings.auth_timeout_s
        while True:
            if session.identity.principal is None:
                wait_s = auth_deadline - asyncio.get_running_loop().time()
                if wait_s <= 0:
                    logger.info(
                        "not authenticated in %.0f s; closing", self.settings.auth_timeout_s
                    )
                    await connection.close(CloseCode.POLICY_VIOLATION, "authentication timeout")
                    return
            else:
                wait_s = self.settings.idle_timeout_s
            if errors_in_a_row >= self.settings.max_consecutive_errors:
                logger.info("closing after %d invalid messages in a row", errors_in_a_row)
                await session.aclose()  # stop its request now, not after the close handshake
                await connection.close(CloseCode.POLICY_VIOLATION, "too many invalid messages")
                return
            try:
                frame = await asyncio.wait_for(connection.recv(), wait_s)
            except TimeoutError:
                if session.busy or session.identity.principal is None:
                    continue
                logger.info("idle for %.0f s; closing", self.settings.idle_timeout_s)
                await connection.close(CloseCode.NORMAL_CLOSURE, "idle timeout")
                return
            ok = await session.handle_frame(frame)
            errors_in_a_row = 0 if ok else errors_in_a_row + 1
            if session.session_id is not None:
                bind_log_context(session=session.session_id[:8])
            if session.closed:
                await connection.close(CloseCode.NORMAL_CLOSURE, "closed by client")
                return


def _sender(connection: ServerConnection) -> Callable[[p.ServerMessage], Awaitable[None]]:
    """Frames to a closed connection are dropped: the reader task sees the close and
    tears the session down (cancelling its request), so the request need not care."""

    async def send(message: p.ServerMessage) -> None:
        with contextlib.suppress(ConnectionClosed):
            await connection.send(p.encode_server_message(message))

    return send
