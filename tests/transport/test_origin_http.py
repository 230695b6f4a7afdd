"""What the gateway answers over HTTP, through real sockets (scripted mesh): the origin rule at
the handshake of both WebSocket paths, and the headers of every response."""

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus

from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.transport.responses import PAGE_CSP
from farmesh_ws.transport.ws import PETALS_V2_PATH, WEBSOCKET_PATH, GatewayServer
from tests.transport.support import fake_gateway

PATHS = pytest.mark.parametrize("path", [WEBSOCKET_PATH, PETALS_V2_PATH])
LISTED = "https://chat.example"


@pytest.fixture
async def server() -> AsyncIterator[GatewayServer]:
    gateway = await fake_gateway(FakeBackend(reply="abc"), allowed_origins=(LISTED,))
    yield gateway
    await gateway.shutdown()


async def opens(server: GatewayServer, path: str, headers: Any = None, **kwargs: Any) -> None:
    """The handshake succeeds and the session works: one ``open`` on its path."""
    async with connect(
        f"ws://127.0.0.1:{server.port}{path}", additional_headers=headers, **kwargs
    ) as ws:
        assert ws.response is not None
        assert ws.response.headers["Server"] == "farmesh-ws"
        if path == WEBSOCKET_PATH:
            await ws.send(json.dumps({"type": "open"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "opened"
        else:
            await ws.send(json.dumps({"type": "open_inference_session", "max_length": 64}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"ok": True}


async def refused(server: GatewayServer, path: str, headers: Any = None, **kwargs: Any) -> None:
    """The handshake gets HTTP 403 ``origin_not_allowed``."""
    with pytest.raises(InvalidStatus) as caught:
        await connect(f"ws://127.0.0.1:{server.port}{path}", additional_headers=headers, **kwargs)
    response = caught.value.response
    assert response.status_code == 403
    assert json.loads(response.body) == {"error": "origin_not_allowed"}
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Server"] == "farmesh-ws"


@PATHS
async def test_clients_without_origin_connect(server: GatewayServer, path: str) -> None:
    await opens(server, path)


@PATHS
async def test_the_gateways_own_origin_connects(server: GatewayServer, path: str) -> None:
    await opens(server, path, origin=f"http://127.0.0.1:{server.port}")
    await opens(server, path, origin=f"HTTP://127.0.0.1:{server.port}")


@PATHS
async def test_listed_origins_connect(server: GatewayServer, path: str) -> None:
    await opens(server, path, origin=LISTED)
    await opens(server, path, origin="https://CHAT.example:443")


@PATHS
@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "http://127.0.0.1",
        "http://127.0.0.1:1",
        "http://localhost:{port}",
        "https://chat.example:8443",
        "null",
        "http://127.0.0.1:{port}/",
    ],
)
async def test_other_origins_are_refused(server: GatewayServer, path: str, origin: str) -> None:
    await refused(server, path, origin=origin.format(port=server.port))


@PATHS
async def test_two_origin_headers_are_refused(server: GatewayServer, path: str) -> None:
    own = f"http://127.0.0.1:{server.port}"
    await refused(server, path, headers=[("Origin", own), ("Origin", own)])


@PATHS
async def test_without_listed_origins_only_the_own_origin_connects(path: str) -> None:
    gateway = await fake_gateway(FakeBackend(reply="abc"))
    try:
        await opens(gateway, path, origin=f"http://127.0.0.1:{gateway.port}")
        await opens(gateway, path)
        await refused(gateway, path, origin=LISTED)
    finally:
        await gateway.shutdown()


async def test_the_origin_is_checked_before_the_connection_limit() -> None:
    """A foreign page learns nothing about the gateway's load."""
    gateway = await fake_gateway(FakeBackend(reply="abc"), max_connections=1)
    try:
        async with connect(f"ws://127.0.0.1:{gateway.port}/ws") as ws:
            await ws.send(json.dumps({"type": "open"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "opened"
            with pytest.raises(InvalidStatus) as full:
                await connect(f"ws://127.0.0.1:{gateway.port}/ws")
            assert full.value.response.status_code == 503
            await refused(gateway, WEBSOCKET_PATH, origin="http://evil.example")
    finally:
        await gateway.shutdown()


def _get(server: GatewayServer, path: str) -> tuple[int, Headers]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, Headers(reply.headers.items())
    except urllib.error.HTTPError as error:
        return error.code, Headers(error.headers.items())


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/static/app.js", "text/javascript; charset=utf-8"),
        ("/static/style.css", "text/css; charset=utf-8"),
    ],
)
async def test_the_page_has_a_content_security_policy(
    server: GatewayServer, path: str, content_type: str
) -> None:
    status, headers = await asyncio.to_thread(_get, server, path)
    assert status == 200
    assert headers["Content-Type"] == content_type
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Server"] == "farmesh-ws"
    assert headers.get_all("Content-Security-Policy") == [PAGE_CSP]
    directives = dict(d.strip().split(" ", 1) for d in PAGE_CSP.split(";"))
    assert directives["frame-ancestors"] == "'none'"
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"


@pytest.mark.parametrize(
    ("path", "status", "content_type"),
    [
        ("/health", 200, "application/json"),
        ("/mesh/status", 200, "application/json"),
        ("/models", 200, "application/json"),
        ("/metrics", 200, "text/plain; version=0.0.4; charset=utf-8"),
        ("/nowhere", 404, "application/json"),
        ("/static/missing.js", 404, "application/json"),
    ],
)
async def test_every_response_is_nosniff_and_names_no_version(
    server: GatewayServer, path: str, status: int, content_type: str
) -> None:
    got, headers = await asyncio.to_thread(_get, server, path)
    assert (got, headers["Content-Type"]) == (status, content_type)
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Server"] == "farmesh-ws"
    assert "Content-Security-Policy" not in headers


async def test_a_plain_get_of_a_websocket_path_names_no_version(server: GatewayServer) -> None:
    """websockets' own 426 refusal gets the same Server header."""
    status, headers = await asyncio.to_thread(_get, server, WEBSOCKET_PATH)
    assert status == 426
    assert headers["Server"] == "farmesh-ws"
