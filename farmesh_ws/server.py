"""The I/O layer: a websockets asyncio server with the HTTP GET routes on the same port.

WebSocket sessions live at ``/ws`` (protocol.md); ``/health``, ``/mesh/status``, ``/models``
and ``/metrics`` answer plain GETs from cached state. One reader task per connection decodes
frames and hands them to :class:`~farmesh_ws.session.ChatSession`; everything else about
chat is there. Errors follow protocol.md §6: a bad frame gets an ``error`` frame and the
connection stays open; oversize frames close with 1009 (websockets does this); our own bug
closes with 1011 after an ``internal_error`` frame; shutdown closes with 1001.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

import msgspec
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from farmesh_ws import __version__
from farmesh_ws import protocol as p
from farmesh_ws.config import Settings
from farmesh_ws.errors import FarmeshError
from farmesh_ws.ledger.money import far_text
from farmesh_ws.mesh.base import MeshBackend
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics, MetricsObserver
from farmesh_ws.observers import FanOut, TurnObserver
from farmesh_ws.petals_v2 import PETALS_V2_PATH, serve_petals_v2
from farmesh_ws.registry import SessionRegistry
from farmesh_ws.session import ChatSession
from farmesh_ws.state import MemoryStateStore

logger = logging.getLogger(__name__)

WEBSOCKET_PATH = "/ws"
HealthCheck = Callable[[], str | None]
"""Returns None when the component is fine, else a short reason (shown in /health)."""


class _ConnectionLog(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[conn {self.extra['conn'] if self.extra else '?'}] {msg}", kwargs


class GatewayServer:
    """Serves WebSocket chat sessions and the status endpoints on one port."""

    def __init__(
        self,
        settings: Settings,
        backend: MeshBackend,
        status: MeshStatusCache,
        metrics: Metrics,
        *,
        observers: Sequence[TurnObserver] = (),
        health_checks: Mapping[str, HealthCheck] | None = None,
        registry: SessionRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.status = status
        self.metrics = metrics
        self.observer = FanOut([MetricsObserver(metrics), *observers])
        self.registry = registry or SessionRegistry(MemoryStateStore())
        self.health_checks: dict[str, HealthCheck] = {"state": self._state_problem}
        self.health_checks.update(health_checks or {})
        self._server: Server | None = None
        self._sessions: dict[ServerConnection, ChatSession] = {}
        self._petals_v2: set[ServerConnection] = set()
        self._started_at = time.monotonic()
        self._shutting_down = False
        self._routes: dict[str, Callable[[], Awaitable[Response]]] = {
            "/health": self._health,
            "/mesh/status": self._mesh_status,
            "/models": self._models,
            "/metrics": self._metrics,
        }

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not started")
        sockets = list(self._server.sockets)
        return int(sockets[0].getsockname()[1])

    @property
    def active_sessions(self) -> int:
        return sum(1 for session in self._sessions.values() if session.state != "open")

    async def start(self) -> None:
        self.registry.start()
        origins: list[Any] | None = None
        if self.settings.allowed_origins:
            origins = [*self.settings.allowed_origins, None]
        self._server = await serve(
            self._handle,
            self.settings.host,
            self.settings.port,
            process_request=self._process_request,
            max_size=self.settings.max_frame_bytes,
            origins=origins,
            server_header=f"farmesh-ws/{__version__}",
        )

    async def shutdown(self) -> None:
        """Stop accepting, let running turns finish until the grace deadline, close 1001."""
        if self._server is None:
            return
        self._shutting_down = True
        self._server.close(close_connections=False)
        running = [session.wait_idle() for session in self._sessions.values() if session.busy]
        if running:
            logger.info(
                "shutdown: waiting up to %.0f s for %d turns",
                self.settings.shutdown_grace_s,
                len(running),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*running, return_exceptions=True),
                    self.settings.shutdown_grace_s,
                )
        closing = [
            connection.close(CloseCode.GOING_AWAY, "server shutting down")
            for connection in [*self._sessions, *self._petals_v2]
        ]
        await asyncio.gather(*closing, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        await self.registry.aclose()

    # HTTP (protocol.md §8)
    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = request.path.split("?", 1)[0]
        route = self._routes.get(path)
        if route is not None:
            return await route()
        if path == "/" or path.startswith("/static/"):
            return _static_file("index.html" if path == "/" else path.removeprefix("/static/"))
        if path not in (WEBSOCKET_PATH, PETALS_V2_PATH):
            return _json_response(HTTPStatus.NOT_FOUND, {"error": "not_found", "path": path})
        if self._shutting_down:
            return _json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "shutting_down"})
        if len(self._sessions) + len(self._petals_v2) >= self.settings.max_connections:
            return _json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "too_many_connections"})
        return None

    def _state_problem(self) -> str | None:
        return self.registry.store.degraded_reason

    async def _health(self) -> Response:
        mesh_online = all(status.status == "online" for status in self.status.all())
        components: dict[str, str | None] = {
            "mesh": None if mesh_online else "not every block is served"
        }
        components.update({name: check() for name, check in self.health_checks.items()})
        healthy = all(problem is None for problem in components.values())
        return _json_response(
            HTTPStatus.OK,
            {
                "status": "ok" if healthy else "degraded",
                "components": {
                    name: "ok" if problem is None else f"degraded: {problem}"
                    for name, problem in components.items()
                },
                "version": __version__,
                "protocol_version": p.PROTOCOL_VERSION,
                "uptime_s": round(time.monotonic() - self._started_at, 3),
                "connections": len(self._sessions) + len(self._petals_v2),
            },
        )

    async def _mesh_status(self) -> Response:
        model = self.status.get(self.settings.default_model_id)
        active_sessions = await self.registry.active_sessions()
        return _json_response(
            HTTPStatus.OK,
            {
                "model_id": model.model_id,
                "active_nodes": model.active_nodes,
                "active_sessions": active_sessions,
                "price_per_token_far": far_text(self.settings.price_per_token_far),
                "status": model.status,
                "num_blocks": model.num_blocks,
                "missing_blocks": list(model.missing_blocks),
            },
        )

    async def _models(self) -> Response:
        return _json_response(
            HTTPStatus.OK,
            {
                "models": [
                    {
                        "model_id": model.model_id,
                        "active_nodes": model.active_nodes,
                        "price_per_token_far": far_text(self.settings.price_per_token_far),
                        "status": model.status,
                        "num_blocks": model.num_blocks,
                        "max_length": self.settings.max_length_limit,
                    }
                    for model in self.status.all()
                ]
            },
        )

    async def _metrics(self) -> Response:
        self.metrics.sessions_active.set(self.active_sessions)
        return Response(
            HTTPStatus.OK.value,
            HTTPStatus.OK.phrase,
            Headers([("Content-Type", "text/plain; version=0.0.4; charset=utf-8")]),
            self.metrics.render(),
        )

    # WebSocket (protocol.md §2–§7)
    async def _handle(self, connection: ServerConnection) -> None:
        if connection.request is not None and connection.request.path.startswith(PETALS_V2_PATH):
            await self._handle_petals_v2(connection)
            return
        log = _ConnectionLog(logger, {"conn": uuid.uuid4().hex[:8]})
        send = _sender(connection)
        session = ChatSession(
            backend=self.backend,
            settings=self.settings,
            send=send,
            observer=self.observer,
        )
        self._sessions[connection] = session
        self.metrics.connections_total.inc()
        self.metrics.connections_active.inc()
        log.debug("connected from %s", connection.remote_address)
        try:
            await self._read_loop(connection, session, send, log)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("connection handler failed")
            with contextlib.suppress(ConnectionClosed):
                await send(p.Error(code="internal_error", message="internal error"))
                await connection.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            await session.aclose()
            if session.session_id is not None:
                await self.registry.unregister(session.session_id)
            del self._sessions[connection]
            self.metrics.connections_active.dec()
            log.debug("closed (%s)", connection.close_code)

    async def _handle_petals_v2(self, connection: ServerConnection) -> None:
        """chat.petals.dev's API (petals_v2.py), with the same limits and accounting."""
        self.metrics.connections_total.inc()
        self.metrics.connections_active.inc()
        self._petals_v2.add(connection)
        try:
            await serve_petals_v2(
                connection, backend=self.backend, settings=self.settings, observer=self.observer
            )
        finally:
            self._petals_v2.discard(connection)
            self.metrics.connections_active.dec()

    async def _read_loop(
        self,
        connection: ServerConnection,
        session: ChatSession,
        send: Callable[[p.ServerMessage], Awaitable[None]],
        log: _ConnectionLog,
    ) -> None:
        errors_in_a_row = 0
        connection_key = f"connection:{self.registry.process_id}:{id(connection)}"
        while True:
            if errors_in_a_row >= self.settings.max_consecutive_errors:
                log.info("closing after %d invalid messages in a row", errors_in_a_row)
                await connection.close(CloseCode.POLICY_VIOLATION, "too many invalid messages")
                return
            try:
                frame = await asyncio.wait_for(connection.recv(), self.settings.idle_timeout_s)
            except TimeoutError:
                if session.busy:
                    continue
                log.info("idle for %.0f s; closing", self.settings.idle_timeout_s)
                await connection.close(CloseCode.NORMAL_CLOSURE, "idle timeout")
                return
            opened_before = session.session_id
            error = await self._dispatch(frame, session, connection_key)
            if session.session_id is not None and opened_before is None:
                await self.registry.register(
                    session.session_id, wallet=session.user_wallet, model_id=session.model_id
                )
            if error is None:
                errors_in_a_row = 0
            else:
                errors_in_a_row += 1
                self.metrics.errors_total.labels(code=error.code).inc()
                await send(error)
            if session.state == "closed":
                await connection.close(CloseCode.NORMAL_CLOSURE, "closed by client")
                return

    async def _rate_limit(
        self, session: ChatSession, request_id: str, connection_key: str
    ) -> p.Error | None:
        """Requests per wallet (or per connection without one), shared across processes."""
        key = f"wallet:{session.user_wallet}" if session.user_wallet else connection_key
        decision = await self.registry.store.take_tokens(
            f"requests:{key}",
            rate_per_s=self.settings.requests_per_minute / 60,
            burst=self.settings.requests_burst,
        )
        if decision.allowed:
            return None
        return p.Error(
            code="rate_limited",
            message=f"too many requests; retry in {decision.retry_after_s:.1f} s",
            retryable=True,
            request_id=request_id,
        )

    async def _dispatch(
        self, frame: str | bytes, session: ChatSession, connection_key: str
    ) -> p.Error | None:
        """Decode and handle one frame; return the error frame to send, if any."""
        if isinstance(frame, bytes):
            return p.Error(
                code="invalid_message", message="binary frames are not supported; send JSON text"
            )
        try:
            message = p.decode_client_message(frame)
        except msgspec.ValidationError as exc:
            return p.Error(code="invalid_message", message=str(exc))
        except msgspec.DecodeError:
            return p.Error(code="invalid_json", message="the frame is not valid JSON")
        if isinstance(message, p.Turn | p.Generate):
            refused = await self._rate_limit(session, message.request_id, connection_key)
            if refused is not None:
                return refused
        try:
            await session.handle(message)
        except FarmeshError as exc:
            return p.Error(
                code=exc.code,
                message=exc.message,
                retryable=exc.retryable,
                request_id=getattr(exc, "request_id", None) or _request_id(message),
            )
        except TimeoutError:
            return p.Error(
                code="mesh_timeout", message="the mesh did not answer in time", retryable=True
            )
        return None


def _request_id(message: p.ClientMessage) -> str | None:
    request_id = getattr(message, "request_id", None)
    return request_id if isinstance(request_id, str) else None


def _sender(connection: ServerConnection) -> Callable[[p.ServerMessage], Awaitable[None]]:
    """Frames to a closed connection are dropped: the reader task sees the close and
    tears the session down (cancelling its turn), so the turn need not care."""

    async def send(message: p.ServerMessage) -> None:
        with contextlib.suppress(ConnectionClosed):
            await connection.send(p.encode_server_message(message))

    return send


_STATIC_DIR = Path(__file__).parent / "static"
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


def _static_file(name: str) -> Response:
    """A file of the browser page; only plain names directly in static/ are served."""
    path = _STATIC_DIR / name
    content_type = _STATIC_TYPES.get(path.suffix)
    if "/" in name or name.startswith(".") or content_type is None or not path.is_file():
        return _json_response(HTTPStatus.NOT_FOUND, {"error": "not_found", "path": f"/{name}"})
    return Response(
        HTTPStatus.OK.value,
        HTTPStatus.OK.phrase,
        Headers([("Content-Type", content_type), ("Cache-Control", "no-cache")]),
        path.read_bytes(),
    )


def _json_response(status: HTTPStatus, body: dict[str, Any]) -> Response:
    return Response(
        status.value,
        status.phrase,
        Headers([("Content-Type", "application/json"), ("Cache-Control", "no-store")]),
        json.dumps(body).encode(),
    )
