"""The client's exceptions: :class:`FarmeshClientError` (a server ``error`` frame or a failure
of the client's own) and the subclasses for a failed connect, a lost connection, a timeout."""

from farmesh_ws import protocol as p
from farmesh_ws.client.events import ContributionEvent, DoneEvent


class FarmeshClientError(Exception):
    """An ``error`` frame from the server (protocol.md §5), or a failure of the client's own
    (``connect_failed``, ``connection_lost``, ``timeout``, ``protocol_error``, or
    ``invalid_message`` for arguments the protocol's static limits refuse, found before
    sending). ``done`` and ``contribution`` are set when the request ran far enough to be
    billed (a ``budget_exceeded`` stop, a mesh failure mid-reply)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        request_id: str | None = None,
        done: DoneEvent | None = None,
        contribution: ContributionEvent | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.request_id = request_id
        self.done = done
        self.contribution = contribution

    @classmethod
    def from_frame(
        cls,
        frame: p.Error,
        *,
        done: DoneEvent | None = None,
        contribution: ContributionEvent | None = None,
    ) -> "FarmeshClientError":
        return cls(
            frame.code,
            frame.message,
            retryable=frame.retryable,
            request_id=frame.request_id,
            done=done,
            contribution=contribution,
        )


class ConnectFailed(FarmeshClientError):
    """The WebSocket connection could not be made (refused, handshake failed, timed out)."""

    def __init__(self, message: str) -> None:
        super().__init__("connect_failed", message, retryable=True)


class ConnectionLost(FarmeshClientError):
    """The connection closed; its chat session is gone with it (protocol.md §2), so this is
    not retryable on the same client: connect again and open a new chat."""

    def __init__(
        self, message: str, *, close_code: int | None = None, close_reason: str = ""
    ) -> None:
        super().__init__("connection_lost", message)
        self.close_code = close_code
        self.close_reason = close_reason


class RequestTimeout(FarmeshClientError):
    """The server did not answer within the client's ``timeout``."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__("timeout", message, retryable=True, request_id=request_id)
