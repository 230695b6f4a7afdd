"""What :meth:`FarmeshClient.connect` returns, and :func:`connect`."""

from collections.abc import Generator
from types import TracebackType
from typing import Any

from farmesh_ws.client.connection import DEFAULT_TIMEOUT_S, RESUME_WITHIN_S, FarmeshClient
from farmesh_ws.client.handshake import open_websocket


class Connecting:
    """What :meth:`FarmeshClient.connect` returns: awaitable, and an async context manager."""

    def __init__(self, url: str, timeout: float, token: str | None, resume_within_s: float) -> None:
        self._url = url
        self._timeout = timeout
        self._token = token
        self._resume_within_s = resume_within_s
        self._client: FarmeshClient | None = None

    def __await__(self) -> Generator[Any, None, FarmeshClient]:
        return self._connect().__await__()

    async def __aenter__(self) -> FarmeshClient:
        self._client = await self._connect()
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _connect(self) -> FarmeshClient:
        connection = await open_websocket(self._url, timeout_s=self._timeout, token=self._token)
        return FarmeshClient(
            connection,
            url=self._url,
            timeout=self._timeout,
            token=self._token,
            resume_within_s=self._resume_within_s,
        )


def connect(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    token: str | None = None,
    resume_within_s: float = RESUME_WITHIN_S,
) -> Connecting:
    """``FarmeshClient.connect(url)``: ``await`` it, or use it in ``async with``."""
    return FarmeshClient.connect(url, timeout=timeout, token=token, resume_within_s=resume_within_s)
