"""Connection and session ids reach every log record, from the socket down to the mesh worker."""

import asyncio
import json
import logging
import subprocess
import sys
from typing import Any

import pytest
from websockets.asyncio.client import connect

from farmesh_ws.logcontext import LogContextFilter, bind_log_context, log_context
from farmesh_ws.mesh.fake import FakeBackend
from tests.transport.support import fake_gateway


async def test_the_mesh_worker_thread_logs_with_the_callers_ids(backend: Any) -> None:
    async def request() -> dict[str, str]:
        bind_log_context(conn="c0ffee", session="5e55")
        future = backend._submit(log_context)
        ids: dict[str, str] = await asyncio.wrap_future(future)
        return ids

    assert await asyncio.create_task(request()) == {"conn": "c0ffee", "session": "5e55"}
    assert log_context() == {}  # bound in that task only


async def test_a_connections_records_carry_its_ids(caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(LogContextFilter())
    caplog.set_level(logging.DEBUG, logger="farmesh_ws")
    server = await fake_gateway(FakeBackend(reply="x"))
    try:
        async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            await ws.send(json.dumps({"type": "open"}))
            opened = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "cancel", "request_id": "nope"}))
            await ws.recv()
    finally:
        await server.shutdown()
    connected = next(r for r in caplog.records if r.getMessage().startswith("connected from"))
    conn = connected.log_context.split()[0]
    assert conn.startswith("conn=")
    closed = next(r for r in caplog.records if r.getMessage().startswith("closed ("))
    assert closed.log_context == f"{conn} session={opened['session_id'][:8]} "


def test_debug_logging_never_shows_websockets_headers_or_frames() -> None:
    """websockets logs handshake headers (Authorization: Bearer ...) and frames (auth messages,
    user text) at DEBUG; the CLI keeps that logger at INFO even with --log-level DEBUG."""
    script = (
        "import logging, sys\n"
        "from farmesh_ws.cli import main\n"
        "main(['--log-level', 'DEBUG'])\n"
        "print(logging.getLogger('websockets.server').isEnabledFor(logging.DEBUG),"
        " logging.getLogger('farmesh_ws').isEnabledFor(logging.DEBUG))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "True"]
