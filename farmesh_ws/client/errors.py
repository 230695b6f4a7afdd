"""The client's exceptions: :class:`FarmeshClientError` (a server ``error`` frame or a failure
of the client's own), the subclasses for a failed connect, a lost connection, a timeout, and
one subclass per error code of identity and quotas (protocol.md §2.1, §5), so a caller can
``except QuotaExceeded`` and wait ``retry_after_s``::

    FarmeshClientError
    ├── ConnectFailed          connect_failed        retryable
    ├── ConnectionLost         connection_lost
    ├── RequestTimeout         timeout               retryable
    ├── Unauthorized           unauthorized          also an HTTP 401 at the handshake
    ├── AuthUnavailable        auth_unavailable      retryable; also an HTTP 503 at the handshake
    ├── WalletMismatch         wallet_mismatch
    ├── QuotaExceeded          quota_exceeded        retryable, ``retry_after_s`` when known
    ├── InsufficientBalance    insufficient_balance
    └── RateLimited            rate_limited          retryable, ``retry_after_s``

Other codes (``busy``, ``context_overflow``, …) are :class:`FarmeshClientError` with that
``code``.
"""

from typing import ClassVar

import msgspec

from farmesh_ws import protocol as p
from farmesh_ws.client.events import ContributionEvent, DoneEvent


class FarmeshClientError(Exception):
    """An ``error`` frame from the server (protocol.md §5), or a failure of the client's own
    (``connect_failed``, ``connection_lost``, ``timeout``, ``protocol_error``, or
    ``invalid_message`` for arguments the protocol's static limits refuse, found before
    sending). ``done`` and ``contribution`` are set when the request ran far enough to be
    billed (a ``budget_exceeded`` stop, a mesh failure mid-reply). ``retry_after_s`` is the
    server's advice on when to retry, where it gives one (``rate_limited``, some
    ``quota_exceeded``)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        request_id: str | None = None,
        done: DoneEvent | None = None,
        contribution: ContributionEvent | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.request_id = request_id
        self.done = done
        self.contribution = contribution
        self.retry_after_s = retry_after_s

    @classmethod
    def from_frame(
        cls,
        frame: p.Error,
        *,
        done: DoneEvent | None = None,
        contribution: ContributionEvent | None = None,
    ) -> "FarmeshClientError":
        """The frame as an exception: of the code's own class if it has one."""
        return cls.from_code(
            frame.code,
            frame.message,
            retryable=frame.retryable,
            request_id=frame.request_id,
            done=done,
            contribution=contribution,
            retry_after_s=frame.retry_after_s,
        )

    @staticmethod
    def from_code(
        code: str,
        message: str,
        *,
        retryable: bool | None = None,
        request_id: str | None = None,
        done: DoneEvent | None = None,
        contribution: ContributionEvent | None = None,
        retry_after_s: float | None = None,
    ) -> "FarmeshClientError":
        """An error with a server error ``code``: of the code's own class if it has one
        (``retryable`` then defaults to the code's), else :class:`FarmeshClientError`."""
        coded = _BY_CODE.get(code)
        if coded is not None:
            return coded(
                message,
                retryable=retryable,
                request_id=request_id,
                done=done,
                contribution=contribution,
                retry_after_s=retry_after_s,
            )
        return FarmeshClientError(
            code,
            message,
            retryable=bool(retryable),
            request_id=request_id,
            done=done,
            contribution=contribution,
            retry_after_s=retry_after_s,
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


class _CodedError(FarmeshClientError):
    """A server error code with a class of its own; ``retryable`` defaults to the code's
    (protocol.md §5), a frame's own flag wins."""

    CODE: ClassVar[str]
    RETRYABLE: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        retryable: bool | None = None,
        request_id: str | None = None,
        done: DoneEvent | None = None,
        contribution: ContributionEvent | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(
            self.CODE,
            message,
            retryable=self.RETRYABLE if retryable is None else retryable,
            request_id=request_id,
            done=done,
            contribution=contribution,
            retry_after_s=retry_after_s,
        )


class Unauthorized(_CodedError):
    """No credential where the gateway requires one, or a key or token it does not accept
    (unknown, revoked, expired), or a sign-in message that fails a check. On an ``auth``
    message the connection stays open for another try."""

    CODE = "unauthorized"


class AuthUnavailable(_CodedError):
    """The gateway cannot check credentials right now (its store does not answer)."""

    CODE = "auth_unavailable"
    RETRYABLE = True


class WalletMismatch(_CodedError):
    """``user_wallet`` is not the authenticated principal's wallet (or was named without
    credentials): leave it out to bill the principal's own wallet."""

    CODE = "wallet_mismatch"


class QuotaExceeded(_CodedError):
    """A cap of the principal (or of this address, when anonymous) or of the mesh would be
    exceeded; ``retry_after_s`` says when to retry, if the server knows."""

    CODE = "quota_exceeded"
    RETRYABLE = True


class InsufficientBalance(_CodedError):
    """The wallet's prepaid balance does not cover the request."""

    CODE = "insufficient_balance"


class RateLimited(_CodedError):
    """Too many requests for this principal; ``retry_after_s`` says when to retry."""

    CODE = "rate_limited"
    RETRYABLE = True


_BY_CODE: dict[str, type[_CodedError]] = {
    error.CODE: error
    for error in (
        Unauthorized,
        AuthUnavailable,
        WalletMismatch,
        QuotaExceeded,
        InsufficientBalance,
        RateLimited,
    )
}


def http_refusal(body: bytes | bytearray) -> tuple[str, str] | None:
    """The code and message (maybe ``""``) of a gateway's HTTP error body
    ``{"error": "unauthorized", "message": "…"}``, or None if the body is not one."""
    try:
        reply = msgspec.json.decode(body, type=dict[str, object])
    except msgspec.MsgspecError:
        return None
    code, message = reply.get("error"), reply.get("message")
    if not isinstance(code, str):
        return None
    return code, message if isinstance(message, str) else ""


def has_own_class(code: str) -> bool:
    """Whether errors with ``code`` raise a class of their own (:class:`Unauthorized`, …)."""
    return code in _BY_CODE
