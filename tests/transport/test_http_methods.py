"""The status routes and the page answer GET and HEAD only (RFC 9110 §9.3.2, §15.5.6)."""

import asyncio
import http.client

import pytest

from farmesh_ws.mesh.fake import FakeBackend
from tests.transport.support import fake_gateway


def _request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=b"" if method == "POST" else None)
        reply = connection.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path", ["/", "/health", "/metrics", "/ws", "/api/v2/generate"])
async def test_other_methods_get_405_with_allow(path: str) -> None:
    server = await fake_gateway(FakeBackend())
    try:
        for method in ("POST", "PUT", "DELETE"):
            status, headers, _ = await asyncio.to_thread(_request, server.port, method, path)
            assert (status, headers["Allow"]) == (405, "GET, HEAD")
    finally:
        await server.shutdown()


async def test_head_answers_like_get_without_a_body() -> None:
    server = await fake_gateway(FakeBackend())
    try:
        for path in ("/", "/health", "/models"):
            got = await asyncio.to_thread(_request, server.port, "GET", path)
            head = await asyncio.to_thread(_request, server.port, "HEAD", path)
            assert (head[0], head[1]["Content-Type"]) == (got[0], got[1]["Content-Type"])
            assert got[2]
            assert head[2] == b""
        status, headers, _ = await asyncio.to_thread(_request, server.port, "HEAD", "/ws")
        assert (status, headers["Allow"]) == (405, "GET")
    finally:
        await server.shutdown()
