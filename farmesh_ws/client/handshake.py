"""Opening the WebSocket: the handshake, with a credential as ``Authorization: Bearer``
(protocol.md §2.1), its refusals as the client's errors, and a websockets logger that never
writes a credential."""

import logging
import re
from typing import Any, Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.frames import Frame

from farmesh_ws import __version__
from farmesh_ws.client.errors import (
    ConnectFailed,
    FarmeshClientError,
    has_own_class,
    http_refusal,
)

_CREDENTIAL_FRAME: Final = re.compile(rb'fm[ks]_|"siwe"|"type"\s*:\s*"auth')
"""Frames that may carry a credential: an ``auth`` message, an ``authenticated`` answer with
a session token, or anything showing a key's or a token's prefix."""


class _RedactingLogger(logging.LoggerAdapter[logging.Logger]):
    """websockets' logger for the client's connections. At DEBUG websockets writes every
    handshake header and the start and end of every frame; the ``Authorization`` header and
    frames that may carry a credential are written without their content."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            if len(args) == 2 and str(args[0]).lower() == "authorization":
                args = (args[0], "[redacted]")
            args = tuple(_redacted(arg) for arg in args)
            super().log(level, msg, *args, **kwargs)


def _redacted(arg: object) -> object:
    if isinstance(arg, Frame) and _CREDENTIAL_FRAME.search(arg.data):
        return f"{arg.opcode.name} [redacted: may hold a credential, {len(arg.data)} bytes]"
    return arg


_LOGGER: Final = _RedactingLogger(logging.getLogger("websockets.client"))


async def open_websocket(url: str, *, timeout_s: float, token: str | None) -> ClientConnection:
    """The WebSocket to ``url``; ``token`` (an API key or session token) goes in the
    handshake. Raises :class:`ConnectFailed`, or for a refused credential
    :class:`~farmesh_ws.client.errors.Unauthorized` (HTTP 401),
    :class:`~farmesh_ws.client.errors.AuthUnavailable` (HTTP 503 ``auth_unavailable``), and
    :class:`~farmesh_ws.client.errors.QuotaExceeded` (HTTP 429: too many connections)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    try:
        return await connect(
            url,
            additional_headers=headers,
            open_timeout=timeout_s,
            close_timeout=min(timeout_s, 10.0),
            user_agent_header=f"farmesh-ws-client/{__version__}",
            logger=_LOGGER,
        )
    except TimeoutError:
        raise ConnectFailed(f"{url} did not answer within {timeout_s:g} s") from None
    except InvalidStatus as exc:
        raise _refusal(url, exc) from None
    except (OSError, WebSocketException) as exc:
        raise ConnectFailed(f"cannot connect to {url}: {exc}") from None


def _refusal(url: str, refused: InvalidStatus) -> FarmeshClientError:
    """A refused handshake as the error of the gateway's body ``{"error": code, "message"}``
    where that code has a class of its own (401 ``unauthorized``, 503 ``auth_unavailable``,
    429 ``quota_exceeded``), else as a failed connect (403 ``origin_not_allowed``, 503 when
    full, …)."""
    refusal = http_refusal(refused.response.body)
    if refusal is not None and has_own_class(refusal[0]):
        code, message = refusal
        status = refused.response.status_code
        where = f"HTTP {status} from {url}"
        return FarmeshClientError.from_code(code, f"{message} ({where})" if message else where)
    code = f" ({refusal[0]})" if refusal is not None else ""
    return ConnectFailed(f"cannot connect to {url}: {refused}{code}")
