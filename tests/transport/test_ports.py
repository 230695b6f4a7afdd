"""The gateway binds its two ports (WebSocket and HTTP API) together or not at all."""

import socket

import pytest
import websockets

from farmesh_ws.mesh.fake import FakeBackend
from tests.transport.support import fake_gateway


async def test_a_busy_http_port_fails_start_and_leaves_nothing_listening() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        with socket.create_server(("127.0.0.1", 0)) as probe:
            ws_port = probe.getsockname()[1]
        with pytest.raises(OSError, match="in use"):
            await fake_gateway(FakeBackend(), port=ws_port, http_port=busy)
    # Nothing kept the WebSocket port: a connection is refused, and a new gateway binds it.
    with pytest.raises(ConnectionRefusedError):
        await websockets.connect(f"ws://127.0.0.1:{ws_port}/ws", open_timeout=5)
    server = await fake_gateway(FakeBackend(), port=ws_port, http_port=0)
    try:
        assert server.port == ws_port
    finally:
        await server.shutdown()
