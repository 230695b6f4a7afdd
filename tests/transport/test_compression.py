"""The permessage-deflate parameters the gateway negotiates are the ones its settings name
(transport/compression.py), on both WebSocket paths."""

import json

import pytest
import websockets
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.headers import parse_extension

from farmesh_ws.config import ConfigError, load_settings
from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.transport.compression import server_extensions
from tests.transport.support import fake_gateway


async def negotiated(
    path: str = "/ws", **overrides: object
) -> tuple[list[tuple[str, list[tuple[str, str | None]]]], list[object]]:
    """(the server's Sec-WebSocket-Extensions, parsed; the client's active extensions),
    for a websockets client offering its default permessage-deflate."""
    server = await fake_gateway(FakeBackend(), **overrides)
    try:
        url = f"ws://127.0.0.1:{server.port}{path}"
        async with websockets.connect(url, proxy=None) as ws:
            assert ws.response is not None
            header = ws.response.headers.get_all("Sec-WebSocket-Extensions")
            await ws.send(json.dumps({"type": "ping"}) if path == "/ws" else "{}")
            await ws.recv()  # a compressed exchange works both ways
            return [ext for value in header for ext in parse_extension(value)], list(
                ws.protocol.extensions
            )
    finally:
        await server.shutdown()


async def test_the_default_keeps_the_servers_context_and_not_the_clients() -> None:
    header, active = await negotiated()
    assert header == [
        (
            "permessage-deflate",
            [
                ("client_no_context_takeover", None),
                ("server_max_window_bits", "9"),
                ("client_max_window_bits", "9"),
            ],
        )
    ]
    [extension] = active
    assert isinstance(extension, PerMessageDeflate)
    # seen from the client: the server keeps its context, the client keeps none
    assert extension.remote_no_context_takeover is False
    assert extension.local_no_context_takeover is True
    assert (extension.remote_max_window_bits, extension.local_max_window_bits) == (9, 9)


@pytest.mark.parametrize("path", ["/ws", "/api/v2/generate"])
async def test_configured_window_and_stateless_mode(path: str) -> None:
    header, active = await negotiated(
        path, ws_compression="stateless", ws_deflate_window_bits=12, ws_deflate_mem_level=3
    )
    assert header == [
        (
            "permessage-deflate",
            [
                ("server_no_context_takeover", None),
                ("client_no_context_takeover", None),
                ("server_max_window_bits", "12"),
                ("client_max_window_bits", "12"),
            ],
        )
    ]
    [extension] = active
    assert isinstance(extension, PerMessageDeflate)
    assert extension.remote_no_context_takeover
    assert extension.local_no_context_takeover


async def test_off_negotiates_no_extension() -> None:
    header, active = await negotiated(ws_compression="off")
    assert header == []
    assert active == []


def test_the_mem_level_reaches_the_servers_compressor() -> None:
    settings = load_settings({"FARMESH_WS_DEFLATE_MEM_LEVEL": "4"})
    [factory] = server_extensions(settings)
    assert factory.compress_settings == {"memLevel": 4}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FARMESH_WS_COMPRESSION", "gzip"),
        ("FARMESH_WS_DEFLATE_WINDOW_BITS", "8"),
        ("FARMESH_WS_DEFLATE_WINDOW_BITS", "16"),
        ("FARMESH_WS_DEFLATE_MEM_LEVEL", "0"),
        ("FARMESH_WS_DEFLATE_MEM_LEVEL", "10"),
    ],
)
def test_out_of_range_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name.removeprefix("FARMESH_").lower()):
        load_settings({name: value})
