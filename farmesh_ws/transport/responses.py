"""The HTTP responses the WebSocket port gives itself: JSON bodies, refusals and the browser
page's static files, each with the headers every response of ours carries."""

import json
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final

from websockets.datastructures import Headers
from websockets.http11 import Response

from farmesh_ws.transport.handshake import Refusal

# The page's Content Security Policy (W3C CSP Level 3): its own scripts, styles and images
# (and the data: favicon), fetches and WebSockets to itself only ('self' matches ws:/wss: to the
# same host and port: CSP3 "Does url match expression in origin with redirect count?"), no
# <base>, forms to itself, and no framing by any page (frame-ancestors, against clickjacking).
PAGE_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


def static_file(name: str) -> Response:
    """A file of the browser page; only plain names directly in static/ are served."""
    path = _STATIC_DIR / name
    content_type = _STATIC_TYPES.get(path.suffix)
    if "/" in name or name.startswith(".") or content_type is None or not path.is_file():
        return json_response(HTTPStatus.NOT_FOUND, {"error": "not_found", "path": f"/{name}"})
    page_headers = [("Cache-Control", "no-cache"), ("Content-Security-Policy", PAGE_CSP)]
    return plain_response(HTTPStatus.OK, content_type, path.read_bytes(), page_headers)


def refusal_response(refusal: Refusal) -> Response:
    response = json_response(refusal.status, {"error": refusal.code, "message": refusal.message})
    for name, value in refusal.headers:
        response.headers[name] = value
    return response


def json_response(status: HTTPStatus, body: dict[str, Any]) -> Response:
    no_store = [("Cache-Control", "no-store")]
    return plain_response(status, "application/json", json.dumps(body).encode(), no_store)


def plain_response(
    status: HTTPStatus, content_type: str, body: bytes, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    """Every body we serve is only what its Content-Type says: no MIME sniffing (WHATWG Fetch,
    "X-Content-Type-Options header")."""
    return Response(
        status.value,
        status.phrase,
        Headers([("Content-Type", content_type), ("X-Content-Type-Options", "nosniff"), *headers]),
        body,
    )
