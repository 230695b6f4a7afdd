"""The OpenAI-compatible HTTP API (http.md): Starlette routes served by uvicorn in the
gateway's own event loop, on ``http_port`` (default: the WebSocket port + 1).

websockets' HTTP parser refuses request bodies, so POST routes need their own server. This
layer owns the HTTP side only: the listening socket, the ``Authorization: Bearer`` credential
(the WebSocket handshake's rules: :class:`~farmesh_ws.auth.credentials.Authenticator`), the
request body size, client disconnects (they cancel the running request, which is billed for
what it generated) and shutdown. Everything else is :mod:`farmesh_ws.api.openai`'s and the
engine's.
"""

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from farmesh_ws.api.openai.adapter import JsonReply, OpenAIApi, PendingReply, StreamReply
from farmesh_ws.api.seed import SeedGenerate
from farmesh_ws.auth.credentials import Authenticator, bearer_token
from farmesh_ws.config import Settings
from farmesh_ws.core.principal import Principal
from farmesh_ws.engine.engine import Engine
from farmesh_ws.errors import FarmeshError, InvalidRequest, ShuttingDown, Unauthorized
from farmesh_ws.transport.handshake import normalized_address

logger = logging.getLogger(__name__)

API_PREFIX: Final = "/v1"
SEED_GENERATE_PATH: Final = "/inference/generate"
_NO_STORE: Final = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_SSE_HEADERS: Final = {**_NO_STORE, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the gateway owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpApi:
    """The HTTP API of one gateway process; ``start`` binds, ``shutdown`` drains."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        authenticator: Authenticator,
        *,
        process_id: str,
        stopping: Callable[[], bool],
    ) -> None:
        self._settings = settings
        self._authenticator = authenticator
        self._stopping = stopping
        # a frame's worth plus the longest text, each character JSON-escaped (\uXXXX)
        self._body_limit = settings.max_frame_bytes + 6 * settings.max_text_chars
        self.api = OpenAIApi(engine, process_id=process_id)
        self.seed = SeedGenerate(engine, process_id=process_id)
        self.app = Starlette(
            routes=[
                Route(f"{API_PREFIX}/chat/completions", self._chat, methods=["POST"]),
                Route(f"{API_PREFIX}/completions", self._completions, methods=["POST"]),
                Route(f"{API_PREFIX}/models", self._models, methods=["GET"]),
                Route(f"{API_PREFIX}/models/{{model_id:path}}", self._model, methods=["GET"]),
                Route(SEED_GENERATE_PATH, self._seed_generate, methods=["POST"]),
            ]
        )
        self._socket: socket.socket | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the HTTP API is not started")
        return int(self._socket.getsockname()[1])

    async def start(self) -> None:
        """Bind the port now (a busy port fails here, not later), then serve in a task."""
        settings = self._settings
        self._socket = _listening_socket(settings.host, settings.http_listen_port)
        config = uvicorn.Config(
            self.app,
            log_config=None,
            lifespan="off",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=int(settings.shutdown_grace_s + settings.open_timeout_s),
            headers=[("X-Content-Type-Options", "nosniff")],
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))

    def stop_accepting(self) -> None:
        """Close the port; running requests go on (keep-alive connections end after them)."""
        if self._server is not None:
            self._server.should_exit = True

    async def shutdown(self) -> None:
        """Wait for the running requests' responses (the engine drains them), then stop."""
        if self._server is None or self._task is None:
            return
        self.stop_accepting()
        await self._task
        self._server = self._task = None
        self._socket = None

    async def _principal(self, request: Request) -> Principal:
        """The caller, by the WebSocket handshake's rules; raises Unauthorized/AuthUnavailable."""
        address = normalized_address(request.client.host if request.client else None)
        token = bearer_token(request.headers.get("Authorization"))
        principal, _ = await self._authenticator.from_header(token, address)
        if principal is None:
            raise Unauthorized(
                "this gateway requires an API key: send 'Authorization: Bearer fmk_…'"
            )
        return principal

    async def _chat(self, request: Request) -> Response:
        return await self._run(request, self.api.chat_completions)

    async def _completions(self, request: Request) -> Response:
        return await self._run(request, self.api.completions)

    async def _seed_generate(self, request: Request) -> Response:
        return await self._run(request, self.seed.generate, refuse=self.seed.error)

    async def _models(self, request: Request) -> Response:
        try:
            await self._principal(request)
        except FarmeshError as exc:
            return _json(self.api.error(exc))
        return _json(JsonReply(200, self.api.models()))

    async def _model(self, request: Request) -> Response:
        try:
            await self._principal(request)
        except FarmeshError as exc:
            return _json(self.api.error(exc))
        return _json(self.api.model(request.path_params["model_id"]))

    async def _run(
        self,
        request: Request,
        start: Callable[[Principal, bytes], Awaitable[JsonReply | StreamReply | PendingReply]],
        *,
        refuse: Callable[[FarmeshError], JsonReply] | None = None,
    ) -> Response:
        """Authenticate, read the body, start; a refusal in ``refuse``'s shape (OpenAI's by
        default)."""
        try:
            if self._stopping():
                raise ShuttingDown("the server is shutting down; retry on another server")
            principal = await self._principal(request)
            body = await _body(request, self._body_limit)
        except ClientDisconnect:
            return Response(status_code=499)
        except FarmeshError as exc:
            return _json((refuse or self.api.error)(exc))
        reply = await start(principal, body)
        if isinstance(reply, JsonReply):
            return _json(reply)
        if isinstance(reply, StreamReply):
            return StreamingResponse(
                reply.events, media_type="text/event-stream", headers=_SSE_HEADERS
            )
        watcher = asyncio.create_task(_cancel_on_disconnect(request, reply))
        try:
            return _json(await reply.reply())
        finally:
            watcher.cancel()


async def _cancel_on_disconnect(request: Request, pending: PendingReply) -> None:
    """Cancel a non-streaming request whose client went away (it settles as delivered)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    pending.active.cancel()


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused past ``limit`` bytes before it is all read."""
    declared = request.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidRequest(f"the request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidRequest(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(reply: JsonReply) -> Response:
    return Response(
        msgspec.json.encode(reply.body),
        status_code=reply.status,
        media_type="application/json",
        headers={**_NO_STORE, **reply.headers},
    )


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.setblocking(False)
    return sock
